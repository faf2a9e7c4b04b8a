//! Per-customer rate limits of the ingest endpoints (issue 19, "Fairness"): records per second
//! with a burst, so one customer's runaway SDK cannot starve the others. The limit of a
//! customer is its plan's (`plans.rate_limit_records_per_sec` and `plans.rate_limit_burst`,
//! migration 0012, carried by the key cache), or [`DEFAULT_RECORDS_PER_SEC`] and
//! [`DEFAULT_BURST`] without a live subscription, unless `APEX_CUSTOMER_RATE_LIMIT` or
//! `APEX_CUSTOMER_RATE_BURST` override it for every customer.
//!
//! The buckets are `governor`'s keyed GCRA limiters, one per distinct (rate, burst) pair (a
//! handful: one per plan), keyed by the customer id. A record is one token: a track costs 1,
//! a batch of n records costs n, all or nothing. A batch larger than the burst could never
//! pass and is answered 413 `batch_over_burst` (waiting would not help); anything else over
//! the limit is answered 429 with `Retry-After` and the RateLimit headers of
//! draft-ietf-httpapi-ratelimit-headers (-08 onwards: `RateLimit-Policy` and `RateLimit`),
//! in records, not requests; `t` is the time until this request's records would pass.
//! Tokens are taken before the request is validated or logged: records are charged even
//! when the request then fails (400, 409, 503) and when a retry repeats accepted records.
//! The limits are per edge instance, in memory: n instances let a customer through up to n
//! times the rate, and a restart starts every bucket full.
//! A bucket is one small entry per customer that has sent; [`RateLimits::prune`] (every
//! minute, with the dedup sweep) drops the full ones, which is lossless: a customer without
//! an entry starts with a full bucket. They are kept in `governor`'s sharded `DashMap` store (its `dashmap` feature), not its default
//! mutex-guarded map, so requests of different customers do not queue on one lock.
//! A 429 is held before it is sent ([`RefusalHolds`]), as backpressure on a flooding client.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::names;

/// Records per second of a customer without a live subscription: the migration's default
/// (and the starter plan's), which no well-behaved SDK reaches.
pub const DEFAULT_RECORDS_PER_SEC: NonZeroU32 = NonZeroU32::new(20_000).unwrap();
/// Burst of a customer without a live subscription: the migration's default, twenty batches
/// of the largest default size.
pub const DEFAULT_BURST: NonZeroU32 = NonZeroU32::new(200_000).unwrap();
/// The plan label of customers without a live subscription.
pub const NO_PLAN: &str = "none";

/// A customer's limit as its plan sets it: what the key cache carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLimit {
    /// The plan's id, the metric's label (plans are few: a bounded label).
    pub plan: Arc<str>,
    /// Records per second, sustained.
    pub records_per_sec: NonZeroU32,
    /// Records at once above the rate.
    pub burst: NonZeroU32,
}

impl PlanLimit {
    /// The limit of a customer without a live subscription.
    pub fn default_limit() -> Self {
        Self {
            plan: NO_PLAN.into(),
            records_per_sec: DEFAULT_RECORDS_PER_SEC,
            burst: DEFAULT_BURST,
        }
    }
}

type Limiter<C> =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Why records were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Over the limit now: retry after `retry_after` (whole seconds, at least 1).
    Later {
        /// The bucket's size (RateLimit-Policy `q`).
        burst: u32,
        /// Seconds the whole burst takes to refill (RateLimit-Policy `w`), at least 1.
        window_secs: u64,
        /// Records that would pass now (RateLimit `r`).
        remaining: u32,
        /// Seconds until this request would pass (`Retry-After` and RateLimit `t`), at least 1.
        retry_after: u64,
    },
    /// A batch larger than the burst: it can never pass; split it.
    OverBurst {
        /// Records in the batch.
        records: u32,
        /// The burst (RateLimit-Policy `q`, sent on the 413 too: it says how to split).
        burst: u32,
        /// Seconds the whole burst takes to refill (RateLimit-Policy `w`), at least 1.
        window_secs: u64,
    },
}

/// The edge's limiters. Share it behind an `Arc`. The clock is the monotonic one in the
/// server; tests pass `governor`'s `FakeRelativeClock` so that no assertion depends on how
/// fast the machine runs.
pub struct RateLimits<C: Clock = DefaultClock> {
    rate_override: Option<NonZeroU32>,
    burst_override: Option<NonZeroU32>,
    clock: C,
    limiters: DashMap<(NonZeroU32, NonZeroU32), Arc<Limiter<C>>>,
}

impl RateLimits {
    /// Limits by plan, with `APEX_CUSTOMER_RATE_LIMIT` / `APEX_CUSTOMER_RATE_BURST` overriding
    /// each for every customer when set.
    pub fn new(rate_override: Option<NonZeroU32>, burst_override: Option<NonZeroU32>) -> Self {
        Self::with_clock(rate_override, burst_override, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// [`RateLimits::new`] with every bucket on `clock`.
    pub fn with_clock(
        rate_override: Option<NonZeroU32>,
        burst_override: Option<NonZeroU32>,
        clock: C,
    ) -> Self {
        Self {
            rate_override,
            burst_override,
            clock,
            limiters: DashMap::new(),
        }
    }

    /// Takes `records` tokens from `customer`'s bucket, all or nothing. Counts refused records
    /// in `apex_ingest_rate_limited_records_total{plan}`.
    pub fn check(
        &self,
        customer: &Arc<str>,
        limit: &PlanLimit,
        records: usize,
    ) -> Result<(), Refusal> {
        let rate = self.rate_override.unwrap_or(limit.records_per_sec);
        let burst = self.burst_override.unwrap_or(limit.burst);
        let n = u32::try_from(records).unwrap_or(u32::MAX);
        let Some(n_tokens) = NonZeroU32::new(n) else {
            return Ok(());
        };
        let limiter = self.limiter(rate, burst);
        let window_secs = u64::from(burst.get().div_ceil(rate.get()).max(1));
        let refusal = match limiter.check_key_n(customer, n_tokens) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                Refusal::Later {
                    burst: burst.get(),
                    window_secs,
                    remaining: remaining(n, rate, wait),
                    retry_after: whole_secs(wait),
                }
            }
            Err(_) => Refusal::OverBurst {
                records: n,
                burst: burst.get(),
                window_secs,
            },
        };
        // The label is the plan's shared string: a reference count, no allocation per refusal.
        metrics::counter!(names::RATE_LIMITED_RECORDS_TOTAL, "plan" => limit.plan.clone())
            .increment(u64::from(n));
        Err(refusal)
    }

    /// Drops the buckets that are full again (`governor`'s `retain_recent`: a missing entry is
    /// a full bucket, so nothing is forgotten) and gives their memory back, so that customers
    /// who sent once do not hold memory for the life of the server.
    pub fn prune(&self) {
        for limiter in self.limiters.iter() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// The limiter of one (rate, burst) pair; a lookup in a map of a handful of entries. A
    /// customer whose plan changes moves to another limiter and so starts with a full bucket
    /// (its debt stays behind in the old one until pruned): plan changes are rare and upgrades
    /// should not wait.
    fn limiter(&self, rate: NonZeroU32, burst: NonZeroU32) -> Arc<Limiter<C>> {
        if let Some(limiter) = self.limiters.get(&(rate, burst)) {
            return limiter.clone();
        }
        self.limiters
            .entry((rate, burst))
            .or_insert_with(|| {
                Arc::new(RateLimiter::dashmap_with_clock(
                    Quota::per_second(rate).allow_burst(burst),
                    self.clock.clone(),
                ))
            })
            .clone()
    }
}

/// Holding a 429 of the rate limit before it is sent (`APEX_RATE_LIMITED_DELAY_MS`): the
/// backpressure on a flooding client. HTTP/1.1 reads a connection's next request only after
/// the answer to the last, so a held refusal stops its connection for the hold: a client
/// flooding on n connections gets about n refusals per hold instead of as many as it can
/// send, and the edge's CPU stays with the customers within their limits (issue 19,
/// "Fairness"). HTTP/2 holds each stream, up to its 256 concurrent streams per connection.
///
/// A held request keeps its connection and its connection slot (`APEX_MAX_CONNECTIONS`), so
/// at most `max_held` are held at once (a tenth of the slots, by the server): past that, and
/// while the server drains for shutdown, refusals are answered at once. Clients that open a
/// connection per request (many devices sharing one key) are not slowed by a hold, only
/// answered later; behind an HTTP proxy the held connections are the proxy's, which is why
/// the cap exists and why `APEX_RATE_LIMITED_DELAY_MS=0` turns holding off.
#[derive(Debug)]
pub struct RefusalHolds {
    delay: Duration,
    max_held: usize,
    held: AtomicUsize,
    draining: AtomicBool,
}

/// A refusal being held; dropping it (answered, or its client gone) frees its place.
#[derive(Debug)]
pub struct Hold<'a> {
    holds: &'a RefusalHolds,
    /// How long to hold: the configured delay, never longer than the refusal's `Retry-After`.
    pub duration: Duration,
}

impl RefusalHolds {
    /// Holds of `delay` (zero: none), at most `max_held` at once.
    pub fn new(delay: Duration, max_held: usize) -> Self {
        Self {
            delay,
            max_held,
            held: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// A place to hold a refusal whose `Retry-After` is `retry_after_secs`, or `None`: holding
    /// is off, every place is taken, or the server is draining.
    pub fn try_hold(&self, retry_after_secs: u64) -> Option<Hold<'_>> {
        if self.delay.is_zero() || self.draining.load(Ordering::Relaxed) {
            return None;
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max_held).then_some(held + 1)
            })
            .ok()?;
        Some(Hold {
            holds: self,
            duration: self.delay.min(Duration::from_secs(retry_after_secs)),
        })
    }

    /// Refusals held now (`apex_ingest_rate_limited_held_requests`, read when scraped).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// No more holds: the server is shutting down (those already held end within the delay).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.holds.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whole seconds, rounded up, at least 1 (what `Retry-After` may say).
fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Tokens in the bucket now, from how long `n` of them take to be there: each missing token
/// takes 1/rate seconds.
fn remaining(n: u32, rate: NonZeroU32, wait: Duration) -> u32 {
    let missing = (wait.as_secs_f64() * f64::from(rate.get())).ceil();
    n.saturating_sub(missing.min(f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limit(rate: u32, burst: u32) -> PlanLimit {
        PlanLimit {
            plan: "starter".into(),
            records_per_sec: NonZeroU32::new(rate).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    /// Limits on a clock that moves only when the test advances it (clones share it): exact
    /// however slow the machine.
    fn fake(
        rate_override: Option<NonZeroU32>,
        burst_override: Option<NonZeroU32>,
    ) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(rate_override, burst_override, clock.clone());
        (limits, clock)
    }

    #[test]
    fn a_refusal_is_held_for_the_delay_at_most_its_retry_after_and_within_the_cap() {
        let holds = RefusalHolds::new(Duration::from_millis(500), 2);
        let first = holds.try_hold(1).expect("a place");
        assert_eq!(first.duration, Duration::from_millis(500));
        let second = holds.try_hold(1).expect("a second place");
        assert_eq!(holds.held(), 2);
        assert!(holds.try_hold(1).is_none(), "the cap: answered at once");
        drop(first);
        assert_eq!(holds.held(), 1);
        assert!(holds.try_hold(1).is_some(), "a freed place is taken again");
        assert_eq!(holds.held(), 1, "and freed when dropped");
        drop(second);
        assert_eq!(holds.held(), 0);

        // Never longer than the client is told to wait.
        let long = RefusalHolds::new(Duration::from_secs(3), 2);
        assert_eq!(long.try_hold(1).unwrap().duration, Duration::from_secs(1));
        assert_eq!(long.try_hold(5).unwrap().duration, Duration::from_secs(3));
        // Off, and draining.
        assert!(RefusalHolds::new(Duration::ZERO, 2).try_hold(1).is_none());
        long.drain();
        assert!(long.try_hold(1).is_none());
    }

    #[test]
    fn a_burst_passes_then_the_customer_waits_and_others_do_not() {
        let (limits, clock) = fake(None, None);
        let (a, b): (Arc<str>, Arc<str>) = ("cus_a".into(), "cus_b".into());
        let plan = limit(1, 5);
        for _ in 0..5 {
            assert_eq!(limits.check(&a, &plan, 1), Ok(()));
        }
        assert_eq!(
            limits.check(&a, &plan, 1),
            Err(Refusal::Later {
                burst: 5,
                window_secs: 5,
                remaining: 0,
                retry_after: 1,
            }),
            "the sixth record is over the burst: one token comes back per second"
        );
        assert_eq!(
            limits.check(&b, &plan, 5),
            Ok(()),
            "another customer's bucket"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(limits.check(&a, &plan, 1), Ok(()), "after Retry-After");
    }

    #[test]
    fn pruning_drops_only_full_buckets() {
        let (limits, clock) = fake(None, None);
        let (a, b): (Arc<str>, Arc<str>) = ("cus_a".into(), "cus_b".into());
        let plan = limit(1, 5);
        assert_eq!(limits.check(&a, &plan, 1), Ok(()));
        clock.advance(Duration::from_secs(8));
        assert_eq!(limits.check(&b, &plan, 5), Ok(()));
        clock.advance(Duration::from_secs(2));
        // a's bucket has been full since t = 1 s; b's holds 2 of 5 (2 s after emptying).
        limits.prune();
        let limiter = limits.limiter(plan.records_per_sec, plan.burst);
        assert_eq!(limiter.len(), 1, "only b's bucket is kept");
        assert_eq!(limits.check(&a, &plan, 5), Ok(()), "a starts full");
        assert_eq!(
            limits.check(&b, &plan, 5),
            Err(Refusal::Later {
                burst: 5,
                window_secs: 5,
                remaining: 2,
                retry_after: 3,
            }),
            "b's debt is kept"
        );
    }

    #[test]
    fn batches_cost_their_records_and_can_never_exceed_the_burst() {
        let (limits, clock) = fake(None, None);
        let a: Arc<str> = "cus_a".into();
        assert_eq!(
            limits.check(&a, &limit(1, 10), 11),
            Err(Refusal::OverBurst {
                records: 11,
                burst: 10,
                window_secs: 10,
            })
        );
        assert_eq!(limits.check(&a, &limit(1, 10), 7), Ok(()));
        assert_eq!(
            limits.check(&a, &limit(1, 10), 5),
            Err(Refusal::Later {
                burst: 10,
                window_secs: 10,
                remaining: 3,
                retry_after: 2,
            }),
            "3 tokens left, the 2 missing take 2 s"
        );
        clock.advance(Duration::from_secs(2));
        assert_eq!(limits.check(&a, &limit(1, 10), 5), Ok(()));
    }

    #[test]
    fn the_window_is_whole_seconds_rounded_up() {
        let (limits, _clock) = fake(None, None);
        let a: Arc<str> = "cus_a".into();
        assert_eq!(limits.check(&a, &limit(4, 10), 10), Ok(()));
        assert_eq!(
            limits.check(&a, &limit(4, 10), 1),
            Err(Refusal::Later {
                burst: 10,
                window_secs: 3,
                remaining: 0,
                retry_after: 1,
            }),
            "10 records at 4/s refill in 2.5 s; a quarter second rounds up to 1 s"
        );
    }

    #[test]
    fn overrides_apply_to_every_plan() {
        let (limits, _clock) = fake(NonZeroU32::new(1), NonZeroU32::new(2));
        let a: Arc<str> = "cus_a".into();
        let big = limit(1_000_000, 1_000_000);
        assert_eq!(limits.check(&a, &big, 2), Ok(()));
        assert_eq!(
            limits.check(&a, &big, 1),
            Err(Refusal::Later {
                burst: 2,
                window_secs: 2,
                remaining: 0,
                retry_after: 1,
            })
        );
        assert_eq!(
            limits.check(&a, &big, 3),
            Err(Refusal::OverBurst {
                records: 3,
                burst: 2,
                window_secs: 2,
            })
        );
    }
}
