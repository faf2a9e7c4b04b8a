//! The request rate limit of a Stripe client: `governor`'s GCRA limiter (a token bucket in
//! effect: `burst` requests at once, then `per_second`), plus the pause a `Retry-After`
//! imposes on every request of the client, not only the one that got it. The clock is a
//! parameter, so tests drive it without sleeping.
//!
//! During a pause nothing is let through, and the pause empties the bucket: the first request
//! after it waits one interval, as if the pause had spent the burst (a `Retry-After` is no
//! invitation to send a burst at once).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// A shared request rate limit on clock `C`.
pub struct RequestRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    paused_until: Mutex<Option<C::Instant>>,
}

impl<C: Clock> std::fmt::Debug for RequestRate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestRate").finish_non_exhaustive()
    }
}

impl RequestRate<DefaultClock> {
    /// `per_second` requests a second (above zero), `burst` at once, on the real clock.
    pub fn new(per_second: f64, burst: u32) -> Option<Self> {
        Self::with_clock(per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RequestRate<C> {
    /// Like [`RequestRate::new`], on `clock`. `None` when `per_second` is not a positive,
    /// finite rate.
    pub fn with_clock(per_second: f64, burst: u32, clock: C) -> Option<Self> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / per_second))?
            .allow_burst(NonZeroU32::new(burst.max(1))?);
        Some(Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            paused_until: Mutex::new(None),
        })
    }

    /// Takes a request's place now, or says how long to wait before asking again.
    pub fn check(&self) -> Result<(), Duration> {
        let now = self.clock.now();
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = *paused {
            if until > now {
                return Err(until.duration_since(now).into());
            }
            // The pause is over: start from an empty bucket.
            while self.limiter.check().is_ok() {}
            *paused = None;
        }
        drop(paused);
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(now))
    }

    /// Waits until a request may go (a tokio sleep; never blocks the thread).
    pub async fn acquire(&self) {
        while let Err(wait) = self.check() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Lets nothing through for `wait` from now (Stripe's `Retry-After`); a longer pause
    /// already set stays.
    pub fn pause_for(&self, wait: Duration) {
        let until = self.clock.now() + wait.into();
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn bursts_then_the_rate_then_pauses() {
        let clock = FakeRelativeClock::default();
        let rate = RequestRate::with_clock(80.0, 5, clock.clone()).unwrap();
        for _ in 0..5 {
            assert_eq!(rate.check(), Ok(()));
        }
        let wait = rate.check().unwrap_err();
        assert!((wait.as_secs_f64() - 1.0 / 80.0).abs() < 1e-6, "{wait:?}");
        // Over one second about the rate passes.
        let mut passed = 0;
        for _ in 0..1_000 {
            clock.advance(Duration::from_millis(1));
            if rate.check().is_ok() {
                passed += 1;
            }
        }
        assert!((79..=81).contains(&passed), "{passed}");
        // A Retry-After pause holds everything until it ends.
        clock.advance(Duration::from_secs(2));
        rate.pause_for(Duration::from_secs(3));
        clock.advance(Duration::from_secs(1));
        let wait = rate.check().unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        // A shorter pause does not cut a longer one short.
        rate.pause_for(Duration::from_millis(10));
        assert!(rate.check().is_err());
        // At its end the bucket is empty: one interval later, one request.
        clock.advance(Duration::from_secs(2));
        let wait = rate.check().unwrap_err();
        assert!((wait.as_secs_f64() - 1.0 / 80.0).abs() < 1e-6, "{wait:?}");
        clock.advance(Duration::from_millis(13));
        assert_eq!(rate.check(), Ok(()));
        assert!(rate.check().is_err());
    }

    #[test]
    fn unusable_rates_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(RequestRate::new(bad, 10).is_none(), "{bad}");
        }
    }
}
