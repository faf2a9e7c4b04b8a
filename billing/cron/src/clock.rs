//! The one clock of a process: the wall clock, or a simulated one that runs from a chosen
//! start at a chosen speed, so tests (and the operations issue's simulated month) move time
//! without sleeping it out. Every job, schedule, timeout and history row of the cron process
//! reads this clock, and `apexctl` honours the same settings.
//!
//! The simulated clock is set by three variables:
//! - `APEX_CLOCK_START` (RFC 3339): the simulated time at the epoch;
//! - `APEX_CLOCK_SPEED` (default 1): simulated seconds per real second;
//! - `APEX_CLOCK_EPOCH` (unix seconds, fractions allowed): the wall-clock time at which the
//!   simulated clock reads the start; by default the moment the process read its config.
//!
//! Processes given the same three values read the same simulated time (up to their wall
//! clocks' agreement), so two replicas can be tested together.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apex_core::env::{ConfigError, EnvSource};
use chrono::{DateTime, Utc};

/// A wall-clock wait is cut into pieces of at most this much, so a sleep on the simulated
/// clock corrects its drift and a long sleep notices a shutdown soon.
const MAX_REAL_WAIT: Duration = Duration::from_secs(1);

/// The slowest simulated clock: a thousandth of real time (slower would only stall tests).
pub const MIN_SPEED: f64 = 0.001;
/// The fastest simulated clock: a million simulated seconds (11.6 days) per real second.
pub const MAX_SPEED: f64 = 1_000_000.0;
/// How far `APEX_CLOCK_EPOCH` may be from the wall clock's now, in seconds (a year).
const MAX_EPOCH_DISTANCE_SECS: f64 = 366.0 * 86_400.0;

/// The process's clock. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clock {
    /// The wall clock, in UTC.
    Wall,
    /// A simulated clock: `start` at wall-clock `epoch` (unix seconds), `speed` simulated
    /// seconds per real second.
    Simulated {
        /// The simulated time at the epoch.
        start: DateTime<Utc>,
        /// Simulated seconds per real second (above 0).
        speed: f64,
        /// The wall-clock unix time, in seconds, at which the simulated clock reads `start`.
        epoch: f64,
    },
}

fn wall_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Clock {
    /// The clock the environment asks for: simulated when `APEX_CLOCK_START` is set, else
    /// the wall clock. `APEX_CLOCK_SPEED` or `APEX_CLOCK_EPOCH` without a start is an error.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let Some(start) = env.optional("APEX_CLOCK_START") else {
            for name in ["APEX_CLOCK_SPEED", "APEX_CLOCK_EPOCH"] {
                if env.optional(name).is_some() {
                    return Err(ConfigError::Invalid {
                        name: if name == "APEX_CLOCK_SPEED" {
                            "APEX_CLOCK_SPEED"
                        } else {
                            "APEX_CLOCK_EPOCH"
                        },
                        reason: "a simulated clock needs APEX_CLOCK_START too".to_owned(),
                    });
                }
            }
            return Ok(Clock::Wall);
        };
        let start = DateTime::parse_from_rfc3339(&start)
            .map_err(|e| ConfigError::Invalid {
                name: "APEX_CLOCK_START",
                reason: format!("{start:?} is not an RFC 3339 time: {e}"),
            })?
            .with_timezone(&Utc);
        let speed: f64 = env.parse_or("APEX_CLOCK_SPEED", 1.0)?;
        if !(speed.is_finite() && (MIN_SPEED..=MAX_SPEED).contains(&speed)) {
            return Err(ConfigError::Invalid {
                name: "APEX_CLOCK_SPEED",
                reason: format!("must be from {MIN_SPEED} to {MAX_SPEED}"),
            });
        }
        let now = wall_seconds();
        let epoch: f64 = env.parse_or("APEX_CLOCK_EPOCH", now)?;
        if !(epoch.is_finite() && (epoch - now).abs() <= MAX_EPOCH_DISTANCE_SECS) {
            return Err(ConfigError::Invalid {
                name: "APEX_CLOCK_EPOCH",
                reason: "must be a unix time in seconds, within a year of now".to_owned(),
            });
        }
        Ok(Clock::Simulated {
            start,
            speed,
            epoch,
        })
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        self.at_wall(wall_seconds())
    }

    /// The time this clock reads when the wall clock reads `wall` (unix seconds). A
    /// simulated clock run for tens of real years at top speed would leave chrono's calendar
    /// (262,000 years): it stops at the calendar's end (where no schedule has a next slot)
    /// rather than panic.
    fn at_wall(&self, wall: f64) -> DateTime<Utc> {
        match *self {
            Clock::Wall => {
                DateTime::from_timestamp_micros((wall * 1e6) as i64).unwrap_or_else(Utc::now)
            }
            Clock::Simulated {
                start,
                speed,
                epoch,
            } => {
                // A float-to-integer cast saturates, and any i64 of microseconds is a valid
                // span, so only the addition can leave the calendar.
                let simulated = (wall - epoch) * speed;
                start
                    .checked_add_signed(chrono::Duration::microseconds((simulated * 1e6) as i64))
                    .unwrap_or(if simulated < 0.0 {
                        DateTime::<Utc>::MIN_UTC
                    } else {
                        DateTime::<Utc>::MAX_UTC
                    })
            }
        }
    }

    /// Real time that `span` of this clock's time takes.
    pub fn real(&self, span: chrono::Duration) -> Duration {
        let seconds = span.num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1e6;
        match *self {
            Clock::Wall => Duration::from_secs_f64(seconds),
            Clock::Simulated { speed, .. } => Duration::from_secs_f64(seconds / speed),
        }
    }

    /// This clock's time that passes in `real` time.
    pub fn span(&self, real: Duration) -> chrono::Duration {
        let seconds = match *self {
            Clock::Wall => real.as_secs_f64(),
            Clock::Simulated { speed, .. } => real.as_secs_f64() * speed,
        };
        chrono::Duration::microseconds((seconds * 1e6) as i64)
    }

    /// True for a simulated clock.
    pub fn is_simulated(&self) -> bool {
        matches!(self, Clock::Simulated { .. })
    }

    /// Waits until this clock reads `at` (at once when it already does).
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        loop {
            let now = self.now();
            if now >= at {
                return;
            }
            let wait = self.real(at - now).min(MAX_REAL_WAIT);
            // A wait rounded down to zero would spin: wake at the next tick instead.
            tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
        }
    }

    /// Waits for `span` of this clock's time.
    pub async fn sleep(&self, span: chrono::Duration) {
        let now = self.now();
        self.sleep_until(
            now.checked_add_signed(span)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn the_wall_clock_is_the_default() {
        let clock = Clock::from_env(&EnvSource::from_pairs([])).unwrap();
        assert_eq!(clock, Clock::Wall);
        let drift = (clock.now() - Utc::now()).num_milliseconds().abs();
        assert!(drift < 1_000, "{drift} ms");
    }

    #[test]
    fn a_simulated_clock_runs_from_its_start_at_its_speed() {
        let epoch = wall_seconds().floor();
        let epoch_text = epoch.to_string();
        let env = EnvSource::from_pairs([
            ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
            ("APEX_CLOCK_SPEED", "3600"),
            ("APEX_CLOCK_EPOCH", epoch_text.as_str()),
        ]);
        let clock = Clock::from_env(&env).unwrap();
        assert_eq!(clock.at_wall(epoch), at("2026-01-01T00:00:00Z"));
        // One real second is an hour; half a second is half an hour.
        assert_eq!(clock.at_wall(epoch + 1.0), at("2026-01-01T01:00:00Z"));
        assert_eq!(clock.at_wall(epoch + 0.5), at("2026-01-01T00:30:00Z"));
        assert_eq!(
            clock.real(chrono::Duration::hours(2)),
            Duration::from_secs(2)
        );
        assert_eq!(
            clock.span(Duration::from_millis(1500)),
            chrono::Duration::minutes(90)
        );
        // Far past the calendar's end it stops there instead of panicking.
        assert_eq!(clock.at_wall(epoch + 1e13), DateTime::<Utc>::MAX_UTC);
        assert!(clock.is_simulated());
        // Two processes with the same three values agree.
        assert_eq!(Clock::from_env(&env).unwrap(), clock);
    }

    #[test]
    fn bad_clock_settings_name_their_variable() {
        for (pairs, name) in [
            (vec![("APEX_CLOCK_START", "yesterday")], "APEX_CLOCK_START"),
            (vec![("APEX_CLOCK_SPEED", "10")], "APEX_CLOCK_SPEED"),
            (vec![("APEX_CLOCK_EPOCH", "10")], "APEX_CLOCK_EPOCH"),
            (
                vec![
                    ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
                    ("APEX_CLOCK_SPEED", "0"),
                ],
                "APEX_CLOCK_SPEED",
            ),
            (
                vec![
                    ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
                    ("APEX_CLOCK_SPEED", "fast"),
                ],
                "APEX_CLOCK_SPEED",
            ),
            (
                vec![
                    ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
                    ("APEX_CLOCK_SPEED", "1e-20"),
                ],
                "APEX_CLOCK_SPEED",
            ),
            (
                vec![
                    ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
                    ("APEX_CLOCK_EPOCH", "-1"),
                ],
                "APEX_CLOCK_EPOCH",
            ),
            (
                // Milliseconds, not seconds: far from now.
                vec![
                    ("APEX_CLOCK_START", "2026-01-01T00:00:00Z"),
                    ("APEX_CLOCK_EPOCH", "1790000000000"),
                ],
                "APEX_CLOCK_EPOCH",
            ),
        ] {
            let err = Clock::from_env(&EnvSource::from_pairs(pairs)).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[tokio::test]
    async fn a_sleep_on_the_simulated_clock_ends_when_it_reads_the_target() {
        let clock = Clock::Simulated {
            start: at("2026-01-01T00:00:00Z"),
            speed: 36_000.0,
            epoch: wall_seconds(),
        };
        let target = clock.now() + chrono::Duration::minutes(6);
        clock.sleep_until(target).await;
        assert!(clock.now() >= target);
        // A target already passed returns at once.
        clock.sleep_until(at("2025-01-01T00:00:00Z")).await;
    }
}
