//! `apexctl simulate --report FILE.html`: one self-contained page (no scripts, no fonts or
//! files from elsewhere: it opens from disk with no network) with three charts drawn by
//! `plotters` into inline SVG: every customer's impressions against its plan's allowance
//! over each calendar month, the dunning funnel, and the emails sent per day; then the
//! reconciliation and the timeline itself.

use std::fmt::Write as _;

use chrono::{Datelike, Duration, NaiveDate};
use plotters::prelude::*;

use super::{Outcome, SimulateArgs};

/// Chart size, pixels.
const WIDTH: u32 = 1100;

fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the report's chart: {e}")
}

/// A colour per series, spread around the hue circle.
fn series_colour(i: usize, n: usize) -> RGBColor {
    let hsl = HSLColor(i as f64 / n.max(1) as f64, 0.65, 0.42);
    let (r, g, b) = hsl.rgb();
    RGBColor(r, g, b)
}

/// Impressions used since the start of each calendar month, as Postgres recorded them, in
/// percent of the monthly allowance, per limited customer and simulated day; each line ends
/// in a dot and its customer's name (15 hues are too close to tell apart by a legend), and
/// the configured alert thresholds (`APEX_ALERT_THRESHOLDS`) are drawn.
fn usage_chart(outcome: &Outcome, start: NaiveDate, days: u32) -> anyhow::Result<String> {
    let mut series: Vec<(String, Vec<(u32, f64)>)> = Vec::new();
    for (name, per_day) in &outcome.usage {
        let Some(Some(allowance)) = outcome.allowance.get(name) else {
            continue; // unlimited (Enterprise): nothing to measure against
        };
        let mut used = 0u64;
        let mut points = Vec::new();
        for d in 0..days {
            let day = start + Duration::days(i64::from(d));
            if day.day() == 1 {
                used = 0;
            }
            used += per_day.get(&day).copied().unwrap_or(0);
            points.push((d + 1, used as f64 * 100.0 / (*allowance).max(1) as f64));
        }
        series.push((name.clone(), points));
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(120.0, f64::max)
        .max(outcome.thresholds.iter().copied().max().unwrap_or(0) as f64 + 10.0)
        .ceil();
    // Room right of the last day for the names at the lines' ends.
    let right = days.max(2) + 3;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Impressions used this calendar month, % of the plan's allowance",
                ("sans-serif", 22),
            )
            .margin(12)
            .margin_right(28)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(1u32..right, 0f64..top)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc("simulated day")
            .y_desc("% of allowance")
            .draw()
            .map_err(draw_error)?;
        for &threshold in &outcome.thresholds {
            let y = f64::from(threshold);
            chart
                .draw_series(LineSeries::new(
                    [(1, y), (days.max(2), y)],
                    RED.mix(0.5)
                        .stroke_width(if threshold == 100 { 3 } else { 1 }),
                ))
                .map_err(draw_error)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{threshold} %"),
                    (days.max(2), y),
                    ("sans-serif", 11).into_font().color(&RED),
                )))
                .map_err(draw_error)?;
        }
        let n = series.len();
        for (i, (name, points)) in series.into_iter().enumerate() {
            let colour = series_colour(i, n);
            let end = points.last().copied();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(draw_error)?;
            if let Some((x, y)) = end {
                chart
                    .draw_series([EmptyElement::at((x, y))
                        + Circle::new((0, 0), 4, colour.filled())
                        + Text::new(name, (7, -6), ("sans-serif", 11).into_font().color(&colour))])
                    .map_err(draw_error)?;
            }
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// A bar chart of `bars` (label, value).
fn bar_chart(
    title: &str,
    x_desc: &str,
    bars: &[(String, u64)],
    colour: RGBColor,
) -> anyhow::Result<String> {
    let top = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1) + 1;
    let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(48)
            // Bar `i` is centred on `i`: half a bar's slot either side, no empty slot (a
            // segmented axis adds one past its end).
            .build_cartesian_2d(-0.5f64..(bars.len() as f64 - 0.5), 0u64..top)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(x_desc)
            .x_labels(bars.len().min(40))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 1e-6 || i < 0.0 {
                    return String::new();
                }
                labels.get(i as usize).cloned().unwrap_or_default()
            })
            .draw()
            .map_err(draw_error)?;
        chart
            .draw_series(
                bars.iter()
                    .enumerate()
                    .filter(|(_, (_, v))| *v > 0)
                    .map(|(i, (_, v))| {
                        let x = i as f64;
                        Rectangle::new([(x - 0.35, 0), (x + 0.35, *v)], colour.filled())
                    }),
            )
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// HTML-escapes `text`.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page.
pub(crate) fn html(
    outcome: &Outcome,
    args: &SimulateArgs,
    start: NaiveDate,
) -> anyhow::Result<String> {
    let usage = usage_chart(outcome, start, args.days)?;
    let funnel: Vec<(String, u64)> = outcome
        .funnel()
        .into_iter()
        .map(|(k, v)| (k[2..].to_owned(), v))
        .collect();
    let funnel = bar_chart(
        "Dunning funnel: customers at each step",
        "failed → retried → recovered / suspended → reactivated",
        &funnel,
        RGBColor(0xc0, 0x39, 0x2b),
    )?;
    let emails: Vec<(String, u64)> = (0..args.days)
        .map(|d| {
            let day = start + Duration::days(i64::from(d));
            let sent = outcome
                .timeline
                .emails_per_day
                .get(&day)
                .copied()
                .unwrap_or(0);
            (day.format("%m-%d").to_string(), sent)
        })
        .collect();
    let emails = bar_chart(
        "Emails sent per day",
        "simulated day",
        &emails,
        RGBColor(0x29, 0x80, 0xb9),
    )?;
    let mut page = String::new();
    let end = start + Duration::days(i64::from(args.days) - 1);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>apex simulation, seed {seed}</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222;max-width:1140px}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border-bottom:1px solid #ddd;\
         padding:3px 8px;text-align:left}}.chart{{margin:18px 0}}.ok{{color:#1e8449}}\
         .drift{{color:#c0392b}}</style></head><body>\n\
         <h1>apex simulation</h1>\n<p>{customers} customers, {days} days from {start} to {end}, \
         seed {seed}.</p>\n",
        seed = args.seed,
        customers = args.customers,
        days = args.days,
    );
    let clean = outcome.drifts.is_empty();
    let _ = writeln!(
        page,
        "<p class=\"{}\"><b>Reconciliation ({}): {} pairs, {} ok, {} unsynced, {} drift.</b></p>",
        if clean { "ok" } else { "drift" },
        escape(&outcome.periods.join(", ")),
        outcome.pairs,
        outcome.verdicts.get("ok").copied().unwrap_or(0),
        outcome.verdicts.get("unsynced").copied().unwrap_or(0),
        outcome.drifts.len()
    );
    for drift in &outcome.drifts {
        let _ = writeln!(page, "<p class=\"drift\">{}</p>", escape(drift));
    }
    for (id, svg) in [("usage", usage), ("funnel", funnel), ("emails", emails)] {
        let _ = writeln!(page, "<div class=\"chart\" id=\"{id}\">{svg}</div>");
    }
    page.push_str("<h2>Events</h2>\n<table><tr>");
    for (kind, n) in outcome.timeline.counts() {
        let _ = write!(page, "<td>{kind}: <b>{n}</b></td>");
    }
    page.push_str(
        "</tr></table>\n<h2>Timeline</h2>\n<table>\n<tr><th>day</th><th>time</th>\
                   <th>event</th><th>customer</th><th>detail</th></tr>\n",
    );
    for e in &outcome.timeline.events {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.day,
            escape(&e.time),
            e.kind,
            escape(&e.customer),
            escape(&e.detail)
        );
    }
    page.push_str("</table>\n</body></html>\n");
    Ok(page)
}
