//! `apexctl rollup rebuild` end to end against the real ClickHouse and Postgres: a daily
//! rollup gap made as the ClickHouse server dying between a part and its view's part would
//! make it (the view detached while the pipeline's writer inserts a batch), an excess row, and
//! Postgres hours changed and added behind the pipeline's back; the dry run reports each and
//! changes nothing, the rebuild repairs it (reconcile is clean after), a second rebuild
//! changes nothing; bad requests are refused with a reason.

mod common;

use std::collections::BTreeSet;

use apex_core::model::Metric;
use apex_core::testing::TestStores;
use apex_pipeline::clickhouse_sink::{self, Progress};
use apex_pipeline::postgres_sink;
use apex_pipeline::store::Batch;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::{Value, json};

use common::{at, record, write_usage};

fn apexctl(stores: &TestStores, args: &[&str]) -> (i32, String, String) {
    let out = common::apexctl_command(stores).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `rollup rebuild --store S --from F --to L` of `store` over `first..=last`, then `extra`:
/// the exit code, stdout and stderr.
fn run_rebuild(
    stores: &TestStores,
    store: &str,
    first: NaiveDate,
    last: NaiveDate,
    extra: &[&str],
) -> (i32, String, String) {
    let (from, to) = (first.to_string(), last.to_string());
    let args = [
        "rollup", "rebuild", "--store", store, "--from", &from, "--to", &to,
    ];
    apexctl(stores, &[&args[..], extra].concat())
}

/// `rollup rebuild --json` of `store` over `first..=last`; returns the changes.
fn rebuild(
    stores: &TestStores,
    store: &str,
    first: NaiveDate,
    last: NaiveDate,
    dry: bool,
) -> Value {
    let extra: &[&str] = if dry {
        &["--json", "--dry-run"]
    } else {
        &["--json"]
    };
    let (code, out, err) = run_rebuild(stores, store, first, last, extra);
    assert_eq!(code, 0, "{store} {first}..{last} {extra:?}: {out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["dry_run"], dry);
    assert_eq!(report["store"], store);
    report["changes"].clone()
}

/// Drifts of `reconcile --json` over every month of `days`, as (check, customer, metric,
/// day, difference); asserts the exit code says the same.
fn drifts(
    stores: &TestStores,
    days: &[NaiveDate],
) -> BTreeSet<(String, String, String, String, i64)> {
    let months: BTreeSet<String> = days.iter().map(|d| d.format("%Y-%m").to_string()).collect();
    let mut found = BTreeSet::new();
    for month in months {
        let (code, out, err) = apexctl(stores, &["reconcile", "--period", &month, "--json"]);
        let report: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let mut these = BTreeSet::new();
        for pair in report["pairs"].as_array().unwrap() {
            if pair["verdict"] == "drift" {
                these.insert((
                    pair["check"].as_str().unwrap().to_owned(),
                    pair["customer_id"].as_str().unwrap().to_owned(),
                    pair["metric_type"].as_str().unwrap().to_owned(),
                    pair["day"].as_str().unwrap().to_owned(),
                    pair["difference"].as_i64().unwrap(),
                ));
            }
        }
        assert_eq!(code, if these.is_empty() { 0 } else { 1 }, "{report:#}");
        found.extend(these);
    }
    found
}

async fn daily_total(stores: &TestStores, customer: &str, metric: &str, day: NaiveDate) -> u64 {
    stores
        .config
        .clickhouse()
        .query(
            "SELECT sum(quantity) FROM usage_daily \
             WHERE customer_id = ? AND metric_type = ? AND day = toDate(?)",
        )
        .bind(customer)
        .bind(metric)
        .bind(day.to_string())
        .fetch_one::<u64>()
        .await
        .unwrap()
}

async fn hours(stores: &TestStores) -> Vec<(String, String, DateTime<Utc>, i64)> {
    sqlx::query_as(
        "SELECT customer_id, metric_type, recorded_at, quantity FROM usage_records ORDER BY 1, 2, 3",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_clickhouse_gap_and_postgres_hours_are_rebuilt_from_the_raw_events_once() {
    let stores = TestStores::migrated().await;
    let ch = stores.config.clickhouse();
    let today = Utc::now().date_naive();
    let (d1, d2) = (today - Duration::days(3), today - Duration::days(2));
    let days = [d1, d2];
    let (a, b) = ("cus_rollupAAAAAAAAAAA", "cus_rollupBBBBBBBBBBB");
    let log = "log_rollup";
    let mut position = 0;
    write_usage(
        &stores,
        log,
        &mut position,
        &[
            record(a, Metric::Impressions, 100, at(d1, 10)),
            record(a, Metric::ApiCalls, 50, at(d2, 11)),
            record(b, Metric::DataTransfer, 1_000, at(d1, 5)),
        ],
    )
    .await;
    assert_eq!(drifts(&stores, &days), BTreeSet::new());

    // The gap: a batch whose events part landed without its view's part (the view is
    // detached while the pipeline's writer inserts it, as a server dying between the two
    // parts leaves it).
    ch.query("DETACH TABLE usage_daily_mv")
        .execute()
        .await
        .unwrap();
    write_usage(
        &stores,
        log,
        &mut position,
        &[record(a, Metric::Impressions, 25, at(d1, 14))],
    )
    .await;
    ch.query("ATTACH TABLE usage_daily_mv")
        .execute()
        .await
        .unwrap();
    let gap = (
        "raw_events/clickhouse_daily".to_owned(),
        a.to_owned(),
        "impressions".to_owned(),
        d1.to_string(),
        -25,
    );
    assert_eq!(drifts(&stores, &days), BTreeSet::from([gap]));

    // The dry run says what would change, and changes nothing.
    let expected = json!([{
        "customer_id": a, "metric_type": "impressions", "day": d1.to_string(),
        "current": 100, "rebuilt": 125, "hours": 0, "hours_decreased": 0,
    }]);
    assert_eq!(rebuild(&stores, "clickhouse", d1, d2, true), expected);
    assert_eq!(daily_total(&stores, a, "impressions", d1).await, 100);
    // The rebuild repairs it, and says what it changed; a second one changes nothing.
    assert_eq!(rebuild(&stores, "clickhouse", d1, d2, false), expected);
    assert_eq!(daily_total(&stores, a, "impressions", d1).await, 125);
    assert_eq!(drifts(&stores, &days), BTreeSet::new());
    assert_eq!(rebuild(&stores, "clickhouse", d1, d2, false), json!([]));

    // An excess (a rollup row without raw events) is replaced by the raw total.
    ch.query(
        "INSERT INTO usage_daily (day, customer_id, metric_type, quantity) \
         VALUES (toDate(?), ?, 'data_transfer', 9)",
    )
    .bind(d2.to_string())
    .bind(b)
    .execute()
    .await
    .unwrap();
    assert_eq!(
        rebuild(&stores, "clickhouse", d1, d2, false),
        json!([{
            "customer_id": b, "metric_type": "data_transfer", "day": d2.to_string(),
            "current": 9, "rebuilt": 0, "hours": 0, "hours_decreased": 0,
        }])
    );
    assert_eq!(daily_total(&stores, b, "data_transfer", d2).await, 0);
    assert_eq!(daily_total(&stores, b, "data_transfer", d1).await, 1_000);
    assert_eq!(drifts(&stores, &days), BTreeSet::new());

    // Postgres: an hour short and an hour the raw events never had.
    sqlx::query(
        "UPDATE usage_records SET quantity = quantity - 5 \
         WHERE customer_id = $1 AND metric_type = 'api_calls' AND recorded_at = $2",
    )
    .bind(a)
    .bind(at(d2, 11))
    .execute(&stores.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         VALUES ($1, 'impressions', $2, 40)",
    )
    .bind(b)
    .bind(at(d1, 20))
    .execute(&stores.pool)
    .await
    .unwrap();
    let before = hours(&stores).await;
    assert_eq!(drifts(&stores, &days).len(), 2);
    let expected = json!([
        {"customer_id": a, "metric_type": "api_calls", "day": d2.to_string(),
         "current": 45, "rebuilt": 50, "hours": 1, "hours_decreased": 0},
        {"customer_id": b, "metric_type": "impressions", "day": d1.to_string(),
         "current": 40, "rebuilt": 0, "hours": 1, "hours_decreased": 1},
    ]);
    assert_eq!(rebuild(&stores, "postgres", d1, d2, true), expected);
    assert_eq!(hours(&stores).await, before);
    // Lowering billed usage needs --allow-decrease: refused (naming the day), nothing changed.
    let (code, out, err) = run_rebuild(&stores, "postgres", d1, d2, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("--allow-decrease") && err.contains(&format!("{b} impressions {d1}")),
        "{err}"
    );
    assert_eq!(hours(&stores).await, before);
    let (code, out, err) =
        run_rebuild(&stores, "postgres", d1, d2, &["--allow-decrease", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["changes"], expected);
    assert_eq!(drifts(&stores, &days), BTreeSet::new());
    assert_eq!(rebuild(&stores, "postgres", d1, d2, false), json!([]));
    let after: Vec<(String, String, i64)> = hours(&stores)
        .await
        .into_iter()
        .map(|(c, m, _, q)| (c, m, q))
        .collect();
    assert_eq!(
        after,
        [
            (a.to_owned(), "api_calls".to_owned(), 50),
            (a.to_owned(), "impressions".to_owned(), 100),
            (a.to_owned(), "impressions".to_owned(), 25),
            (b.to_owned(), "data_transfer".to_owned(), 1_000),
        ]
    );

    // The appliers move independently. ClickHouse's has written a batch (two records of d1)
    // that Postgres's has not: reconcile calls the day unsynced, not drift, and the
    // rebuild leaves those records to Postgres's applier.
    let late = [
        record(a, Metric::Impressions, 7, at(d1, 15)),
        record(a, Metric::Impressions, 8, at(d1, 16)),
    ];
    let batch = Batch {
        log_id: log,
        start: position,
        end: position + 200,
        records: &late,
    };
    clickhouse_sink::write_batch(&ch, &batch, &mut Progress::default())
        .await
        .unwrap();
    assert_eq!(drifts(&stores, &days), BTreeSet::new());
    let (_, out, _) = apexctl(
        &stores,
        &[
            "reconcile",
            "--period",
            &d1.format("%Y-%m").to_string(),
            "--json",
        ],
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["summary"]["raw_events/postgres_hourly"]["unsynced"], 1,
        "{report:#}"
    );
    assert_eq!(rebuild(&stores, "postgres", d1, d2, true), json!([]));
    // Postgres's applier takes the first half of that range as a batch of its own: the
    // ClickHouse batch straddles its watermark with records of d1, so the rebuild refuses.
    let mut conn = stores.pool.acquire().await.unwrap();
    let half = |start: u64, end: u64, records| Batch {
        log_id: log,
        start,
        end,
        records,
    };
    postgres_sink::apply_batch(&mut conn, &half(position, position + 100, &late[..1]))
        .await
        .unwrap();
    let (code, out, err) = run_rebuild(&stores, "postgres", d1, d2, &[]);
    // Busy: exit 3, run it again.
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("straddles Postgres's watermark"), "{err}");
    // Once it has the rest, the stores agree and there is nothing to rebuild.
    postgres_sink::apply_batch(&mut conn, &half(position + 100, position + 200, &late[1..]))
        .await
        .unwrap();
    assert_eq!(rebuild(&stores, "postgres", d1, d2, false), json!([]));
    assert_eq!(drifts(&stores, &days), BTreeSet::new());

    // The text form.
    let (code, out, _) = run_rebuild(&stores, "postgres", d1, d2, &[]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to change"), "{out}");
}

#[tokio::test]
async fn bad_rebuild_requests_are_refused_with_a_reason() {
    let stores = TestStores::migrated().await;
    let today = Utc::now().date_naive().to_string();
    for (args, says) in [
        (
            vec![
                "--store",
                "mysql",
                "--from",
                "2026-01-01",
                "--to",
                "2026-01-02",
            ],
            "--store \"mysql\": expected clickhouse or postgres",
        ),
        (
            vec![
                "--store",
                "clickhouse",
                "--from",
                "2026-02-30",
                "--to",
                "2026-03-02",
            ],
            "--from \"2026-02-30\": expected a day YYYY-MM-DD",
        ),
        (
            vec![
                "--store",
                "postgres",
                "--from",
                "2026-01-01",
                "--to",
                "2026-1-2",
            ],
            "--to \"2026-1-2\": expected a day YYYY-MM-DD",
        ),
        (
            vec![
                "--store",
                "postgres",
                "--from",
                "2026-01-05",
                "--to",
                "2026-01-02",
            ],
            "the range is reversed",
        ),
        (
            vec![
                "--store",
                "clickhouse",
                "--from",
                "2026-01-01",
                "--to",
                "2026-03-01",
            ],
            "at most 35 at a time",
        ),
        (
            vec!["--store", "clickhouse", "--from", &today, "--to", &today],
            "is not a complete day yet",
        ),
    ] {
        let mut all = vec!["rollup", "rebuild", "--dry-run"];
        all.extend(&args);
        let (code, out, err) = apexctl(&stores, &all);
        assert_eq!(code, 1, "{all:?}: {out}{err}");
        assert!(err.contains(says), "{all:?}: {err}");
        assert!(out.is_empty(), "{all:?}: {out}");
    }
    // Missing flags are clap's usage errors.
    let (code, _, err) = apexctl(&stores, &["rollup", "rebuild", "--store", "postgres"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn a_rebuild_refuses_while_another_runs_and_asks_to_run_again_while_a_batch_is_open() {
    let stores = TestStores::migrated().await;
    let ch = stores.config.clickhouse();
    let today = Utc::now().date_naive();
    let (d1, d2) = (today - Duration::days(3), today - Duration::days(2));
    let (from, to) = (d1.to_string(), d2.to_string());
    let args = |store| {
        vec![
            "rollup".to_owned(),
            "rebuild".to_owned(),
            "--store".to_owned(),
            store,
            "--from".to_owned(),
            from.clone(),
            "--to".to_owned(),
            to.clone(),
        ]
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        apexctl(&stores, &args)
    };
    // Another ClickHouse rebuild holds the store's lock: refused (two would insert the same
    // shortfall twice); a dry run, which only reads, still runs.
    let mut other = stores.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(0x6170_6578_7262_6368_i64)
        .execute(&mut *other)
        .await
        .unwrap();
    let (code, out, err) = run(args("clickhouse".into()));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("another rollup rebuild of clickhouse is running"),
        "{err}"
    );
    let mut dry = args("clickhouse".into());
    dry.push("--dry-run".into());
    let (code, out, err) = run(dry);
    assert_eq!(code, 0, "{out}{err}");
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *other)
        .await
        .unwrap();

    // A pipeline batch touching the days is being written (a `started` marker without
    // `done`): nothing is changed, exit 3 says to run it again.
    ch.query(
        "INSERT INTO pipeline_batches (log_id, batch_id, end_position, rows, state, min_ts, \
             max_ts) VALUES ('log_open', 0, 100, 1, 'started', toDateTime(?), toDateTime(?))",
    )
    .bind(at(d1, 10).timestamp() as u32)
    .bind(at(d1, 11).timestamp() as u32)
    .execute()
    .await
    .unwrap();
    let (code, out, err) = run(args("clickhouse".into()));
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("being written to ClickHouse"), "{err}");
}
