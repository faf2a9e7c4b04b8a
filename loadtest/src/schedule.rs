//! When each request is due and when a run ends: the open-loop arrival schedule (request `i`
//! is due `i / rate` seconds after the start, whether or not earlier answers have come back)
//! and the bounds every run has in count and in time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest run the harness accepts, whatever the flags say.
pub const MAX_RUN: Duration = Duration::from_secs(24 * 3600);
/// The most requests one run may send, whatever the flags say.
pub const MAX_REQUESTS: u64 = 10_000_000_000;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Open loop: a fixed arrival rate in requests per second. Latency is measured from the
    /// intended send time, so a slow server cannot hide its queueing (coordinated omission).
    Open { rate: f64 },
    /// Closed loop: every connection sends its next request when the previous one is answered.
    Closed,
}

/// When a run stops: after `duration`, after `requests`, or at whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Requests are due only within this time from the start.
    pub duration: Duration,
    /// Requests sent at most.
    pub requests: u64,
    /// How long past `duration` late requests may still go out (open loop behind schedule).
    pub grace: Duration,
}

impl Bounds {
    /// Bounds from the flags: at least one of `duration` and `requests` must be given; both are
    /// capped at [`MAX_RUN`] and [`MAX_REQUESTS`].
    pub fn new(duration: Option<Duration>, requests: Option<u64>) -> Result<Self, String> {
        if duration.is_none() && requests.is_none() {
            return Err("give --duration or --requests (or both)".into());
        }
        if duration.is_some_and(|d| d.is_zero()) || requests == Some(0) {
            return Err("--duration and --requests must be above zero".into());
        }
        let duration = duration.unwrap_or(MAX_RUN).min(MAX_RUN);
        Ok(Self {
            duration,
            requests: requests.unwrap_or(MAX_REQUESTS).min(MAX_REQUESTS),
            grace: (duration / 10).clamp(Duration::from_secs(1), Duration::from_secs(30)),
        })
    }
}

/// Offset from the start at which request `index` is due at `rate` requests per second.
pub fn due_offset(index: u64, rate: f64) -> Duration {
    // f64 keeps full precision for any index below 2^53 (months at millions per second).
    Duration::from_secs_f64(index as f64 / rate)
}

/// Hands out request indexes in order to the connections, so that requests go out in the
/// order they are due whichever connection is free first.
#[derive(Debug, Default)]
pub struct Tickets {
    next: AtomicU64,
}

/// What a connection should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// Send request `index`, due at `due` after the start (closed loop: due now).
    Send { index: u64, due: Duration },
    /// The run is over for this connection.
    Stop,
    /// Request `index` was due in time but its send would come after the grace period: it is
    /// counted as not sent, and the run is over.
    Missed { index: u64 },
}

impl Tickets {
    /// The next ticket, given the time elapsed since the start.
    pub fn take(&self, pacing: Pacing, bounds: &Bounds, elapsed: Duration) -> Ticket {
        if let Pacing::Closed = pacing
            && elapsed >= bounds.duration
        {
            return Ticket::Stop;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= bounds.requests {
            return Ticket::Stop;
        }
        match pacing {
            Pacing::Closed => Ticket::Send {
                index,
                due: elapsed,
            },
            Pacing::Open { rate } => {
                let due = due_offset(index, rate);
                if due >= bounds.duration {
                    Ticket::Stop
                } else if elapsed > bounds.duration + bounds.grace {
                    Ticket::Missed { index }
                } else {
                    Ticket::Send { index, due }
                }
            }
        }
    }
}

impl Tickets {
    /// After a [`Ticket::Missed`]: claims every ticket left in the schedule, so that no other
    /// connection sends them, and returns how many were missed, the missed one included.
    pub fn miss_rest(&self, pacing: Pacing, bounds: &Bounds) -> u64 {
        let Pacing::Open { rate } = pacing else {
            return 1;
        };
        let planned = planned_requests(rate, bounds);
        let before = self.next.fetch_max(planned, Ordering::Relaxed);
        1 + planned.saturating_sub(before)
    }
}

/// Requests an open-loop run should send within `bounds` at `rate`.
pub fn planned_requests(rate: f64, bounds: &Bounds) -> u64 {
    let by_time = (bounds.duration.as_secs_f64() * rate).ceil() as u64;
    by_time.min(bounds.requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn requests_are_due_at_even_intervals() {
        assert_eq!(due_offset(0, 1000.0), Duration::ZERO);
        assert_eq!(due_offset(1, 1000.0), Duration::from_millis(1));
        assert_eq!(due_offset(2500, 1000.0), Duration::from_millis(2500));
        assert_eq!(due_offset(3, 4.0), Duration::from_millis(750));
        // Far into a long run the schedule has not drifted.
        assert_eq!(
            due_offset(3_600 * 100_000, 100_000.0),
            Duration::from_secs(3_600)
        );
    }

    #[test]
    fn an_open_loop_hands_out_exactly_rate_times_duration_tickets() {
        let bounds = Bounds::new(Some(secs(2.0)), None).unwrap();
        let tickets = Tickets::default();
        let pacing = Pacing::Open { rate: 50.0 };
        let mut sent = Vec::new();
        // Taken immediately, as if every connection were free: the schedule alone bounds it.
        loop {
            match tickets.take(pacing, &bounds, Duration::ZERO) {
                Ticket::Send { index, due } => sent.push((index, due)),
                Ticket::Stop => break,
                Ticket::Missed { .. } => panic!("nothing is late"),
            }
        }
        assert_eq!(sent.len(), 100);
        assert_eq!(planned_requests(50.0, &bounds), 100);
        for (i, (index, due)) in sent.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(*due, due_offset(i as u64, 50.0));
        }
        // Every later connection stops too.
        assert_eq!(tickets.take(pacing, &bounds, Duration::ZERO), Ticket::Stop);
    }

    #[test]
    fn a_request_count_ends_a_run_before_its_duration() {
        let bounds = Bounds::new(Some(secs(10.0)), Some(7)).unwrap();
        let tickets = Tickets::default();
        let sends = (0..20)
            .filter(|_| {
                matches!(
                    tickets.take(Pacing::Closed, &bounds, secs(1.0)),
                    Ticket::Send { .. }
                )
            })
            .count();
        assert_eq!(sends, 7);
        assert_eq!(planned_requests(1000.0, &bounds), 7);
    }

    #[test]
    fn a_closed_loop_stops_at_its_duration_and_is_due_immediately() {
        let bounds = Bounds::new(Some(secs(1.0)), None).unwrap();
        let tickets = Tickets::default();
        assert_eq!(
            tickets.take(Pacing::Closed, &bounds, secs(0.5)),
            Ticket::Send {
                index: 0,
                due: secs(0.5)
            }
        );
        assert_eq!(
            tickets.take(Pacing::Closed, &bounds, secs(1.0)),
            Ticket::Stop
        );
    }

    #[test]
    fn an_open_loop_far_behind_schedule_gives_up_after_the_grace_period() {
        let bounds = Bounds::new(Some(secs(10.0)), None).unwrap();
        assert_eq!(bounds.grace, secs(1.0));
        let tickets = Tickets::default();
        let pacing = Pacing::Open { rate: 10.0 };
        // Late but within grace: still sent, with its original due time.
        assert_eq!(
            tickets.take(pacing, &bounds, secs(10.5)),
            Ticket::Send {
                index: 0,
                due: Duration::ZERO
            }
        );
        assert_eq!(
            tickets.take(pacing, &bounds, secs(11.5)),
            Ticket::Missed { index: 1 }
        );
    }

    #[test]
    fn the_rest_of_a_missed_schedule_is_counted_once() {
        let bounds = Bounds::new(Some(secs(10.0)), None).unwrap();
        let pacing = Pacing::Open { rate: 100.0 };
        let tickets = Tickets::default();
        for _ in 0..10 {
            tickets.take(pacing, &bounds, Duration::ZERO);
        }
        // Two connections find themselves past the grace period at once.
        let late = secs(12.0);
        for _ in 0..2 {
            assert!(matches!(
                tickets.take(pacing, &bounds, late),
                Ticket::Missed { .. }
            ));
        }
        let missed = tickets.miss_rest(pacing, &bounds) + tickets.miss_rest(pacing, &bounds);
        // 1,000 planned, 10 sent: 990 missed, whoever counts them.
        assert_eq!(missed, 990);
        assert_eq!(tickets.take(pacing, &bounds, late), Ticket::Stop);
    }

    #[test]
    fn bounds_need_a_limit_and_are_capped() {
        assert!(Bounds::new(None, None).is_err());
        assert!(Bounds::new(Some(Duration::ZERO), None).is_err());
        assert!(Bounds::new(None, Some(0)).is_err());
        let capped = Bounds::new(Some(secs(1e9)), Some(u64::MAX)).unwrap();
        assert_eq!(capped.duration, MAX_RUN);
        assert_eq!(capped.requests, MAX_REQUESTS);
        assert_eq!(capped.grace, secs(30.0));
        let by_count = Bounds::new(None, Some(5)).unwrap();
        assert_eq!(by_count.duration, MAX_RUN);
    }
}
