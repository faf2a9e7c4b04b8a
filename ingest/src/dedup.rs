//! Duplicate detection of client event ids: a record whose `(customer, event_id)` was
//! accepted within the window is answered as a duplicate and counted once.
//!
//! Window and memory bound (defaults, both configurable): 24 hours (Stripe's idempotency
//! anchor) and 8,000,000 ids. An entry is 24 bytes (a 128-bit hash and a 4-byte stamp, padded)
//! plus a control byte, in tables whose bucket counts are powers of two: at the cap each of the
//! 64 shards has 262,144 buckets, so the bound is about 420 MB. The window holds in full up to
//! 92 new ids a second sustained (8,000,000 / 86,400); above that, the oldest ids are evicted
//! first, so the effective window shrinks to capacity ÷ rate (at 10,000 ids/s: 13 minutes,
//! which still covers every SDK retry schedule). Evictions are counted in a metric.
//!
//! Ids are hashed with a per-process random seed (xxh3-128): collisions, which would drop a
//! genuine record, are about 2^-128 per pair and cannot be aimed at. An id is *pending* from
//! the moment a request claims it until the sink acknowledges the record: a concurrent
//! request with the same id gets 409 `duplicate_in_flight` and retries, and a refused record
//! releases its id so the retry is accepted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::names;

const SHARDS: usize = 64;
/// High bit of a stamp: the id is claimed but its record is not yet durable.
const PENDING: u32 = 1 << 31;

/// The outcome of claiming an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time seen: the record goes on, and the caller must later commit or release.
    New(IdKey),
    /// Accepted before, within the window.
    Duplicate,
    /// Another request holding this id is not yet acknowledged.
    InFlight,
}

/// The hashed identity of `(customer, event_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdKey(u64, u64);

struct Shard {
    ids: HashMap<IdKey, u32>,
}

/// The dedup table.
pub struct Dedup {
    shards: Box<[Mutex<Shard>]>,
    window_secs: u32,
    capacity_per_shard: usize,
    seed: u64,
    epoch: SystemTime,
}

impl Dedup {
    /// A table remembering ids for `window` and at most `capacity` of them.
    pub fn new(window: Duration, capacity: usize) -> Self {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("the OS random source is unavailable");
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        ids: HashMap::new(),
                    })
                })
                .collect(),
            window_secs: u32::try_from(window.as_secs())
                .unwrap_or(u32::MAX >> 2)
                .min(PENDING - 1),
            capacity_per_shard: capacity.div_ceil(SHARDS).max(1),
            seed: u64::from_le_bytes(seed),
            epoch: SystemTime::now(),
        }
    }

    fn now(&self) -> u32 {
        // Seconds since the table was made; a clock stepping back reads as no time passing.
        let secs = self.epoch.elapsed().unwrap_or_default().as_secs();
        u32::try_from(secs).unwrap_or(PENDING - 1).min(PENDING - 1)
    }

    /// The key of `(customer, event_id)`.
    pub fn key(&self, customer_id: &str, event_id: &str) -> IdKey {
        let mut bytes = Vec::with_capacity(customer_id.len() + 1 + event_id.len());
        bytes.extend_from_slice(customer_id.as_bytes());
        // 0xff never occurs in UTF-8, so ("ab","c") and ("a","bc") cannot collide.
        bytes.push(0xff);
        bytes.extend_from_slice(event_id.as_bytes());
        let h = xxh3_128_with_seed(&bytes, self.seed);
        IdKey(h as u64, (h >> 64) as u64)
    }

    fn shard(&self, key: IdKey) -> &Mutex<Shard> {
        &self.shards[(key.0 as usize) % SHARDS]
    }

    /// Claims an id for a record about to be submitted.
    pub fn claim(&self, key: IdKey) -> Claim {
        let now = self.now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        match shard.ids.get(&key).copied() {
            Some(stamp) if stamp & PENDING != 0 => return Claim::InFlight,
            Some(stamp) if now.saturating_sub(stamp) < self.window_secs => return Claim::Duplicate,
            _ => {}
        }
        if shard.ids.len() >= self.capacity_per_shard {
            self.evict(&mut shard, now);
        }
        shard.ids.insert(key, now | PENDING);
        Claim::New(key)
    }

    /// Marks claimed ids as accepted: their records are durable.
    pub fn commit(&self, keys: &[IdKey]) {
        let now = self.now();
        for key in keys {
            let mut shard = self.shard(*key).lock().unwrap_or_else(|p| p.into_inner());
            shard.ids.insert(*key, now);
        }
    }

    /// Remembers an id accepted by an earlier process (replayed from the write-ahead log), as
    /// if it had just been accepted; a full shard makes room as [`Dedup::claim`] does.
    pub fn remember(&self, key: IdKey) {
        let now = self.now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if !shard.ids.contains_key(&key) && shard.ids.len() >= self.capacity_per_shard {
            self.evict(&mut shard, now);
        }
        shard.ids.insert(key, now);
    }

    /// Forgets claimed ids whose records were refused, so a retry is accepted.
    pub fn release(&self, keys: &[IdKey]) {
        for key in keys {
            let mut shard = self.shard(*key).lock().unwrap_or_else(|p| p.into_inner());
            if shard.ids.get(key).is_some_and(|stamp| stamp & PENDING != 0) {
                shard.ids.remove(key);
            }
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).ids.len())
            .sum()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired ids everywhere; run periodically.
    pub fn sweep(&self) {
        let now = self.now();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let window = self.window_secs;
            shard
                .ids
                .retain(|_, stamp| *stamp & PENDING != 0 || now.saturating_sub(*stamp) < window);
        }
        metrics::gauge!(names::DEDUP_IDS).set(self.len() as f64);
    }

    /// Makes room in a full shard: expired ids first, then the oldest accepted ones, by
    /// halving the age kept until a quarter of the shard is free.
    fn evict(&self, shard: &mut Shard, now: u32) {
        let before = shard.ids.len();
        let target = self.capacity_per_shard - self.capacity_per_shard / 4;
        let mut keep_age = self.window_secs;
        loop {
            shard
                .ids
                .retain(|_, stamp| *stamp & PENDING != 0 || now.saturating_sub(*stamp) < keep_age);
            if shard.ids.len() <= target || keep_age == 0 {
                break;
            }
            keep_age /= 2;
        }
        let evicted = before - shard.ids.len();
        metrics::counter!(names::DEDUP_EVICTIONS_TOTAL).increment(evicted as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_new_then_in_flight_then_duplicate() {
        let dedup = Dedup::new(Duration::from_secs(3600), 1000);
        let key = dedup.key("cus_a", "e1");
        assert!(matches!(dedup.claim(key), Claim::New(_)));
        assert_eq!(dedup.claim(key), Claim::InFlight);
        dedup.commit(&[key]);
        assert_eq!(dedup.claim(key), Claim::Duplicate);
        // Another customer's identical id is independent.
        assert!(matches!(
            dedup.claim(dedup.key("cus_b", "e1")),
            Claim::New(_)
        ));
    }

    #[test]
    fn released_ids_can_be_claimed_again_but_committed_ones_stay() {
        let dedup = Dedup::new(Duration::from_secs(3600), 1000);
        let key = dedup.key("cus_a", "e1");
        assert!(matches!(dedup.claim(key), Claim::New(_)));
        dedup.release(&[key]);
        assert!(matches!(dedup.claim(key), Claim::New(_)));
        dedup.commit(&[key]);
        dedup.release(&[key]);
        assert_eq!(dedup.claim(key), Claim::Duplicate);
    }

    #[test]
    fn keys_do_not_collide_across_the_separator() {
        let dedup = Dedup::new(Duration::from_secs(60), 10);
        assert_ne!(dedup.key("ab", "c"), dedup.key("a", "bc"));
    }

    #[test]
    fn memory_stays_bounded_and_pending_ids_survive_eviction() {
        let capacity = 64 * 10;
        let dedup = Dedup::new(Duration::from_secs(3600), capacity);
        let pending = dedup.key("cus", "pending");
        assert!(matches!(dedup.claim(pending), Claim::New(_)));
        for i in 0..10 * capacity {
            let key = dedup.key("cus", &i.to_string());
            if let Claim::New(k) = dedup.claim(key) {
                dedup.commit(&[k]);
            }
        }
        assert!(dedup.len() <= capacity + SHARDS, "{} ids kept", dedup.len());
        assert_eq!(dedup.claim(pending), Claim::InFlight);
    }

    #[test]
    fn remembered_ids_are_duplicates_and_stay_bounded() {
        let capacity = 64 * 4;
        let dedup = Dedup::new(Duration::from_secs(3600), capacity);
        dedup.remember(dedup.key("cus", "logged"));
        assert_eq!(dedup.claim(dedup.key("cus", "logged")), Claim::Duplicate);
        for i in 0..10 * capacity {
            dedup.remember(dedup.key("cus", &i.to_string()));
        }
        assert!(dedup.len() <= capacity + SHARDS, "{} ids kept", dedup.len());
    }

    #[test]
    fn expired_ids_are_new_again() {
        let dedup = Dedup::new(Duration::ZERO, 100);
        let key = dedup.key("cus", "e");
        assert!(matches!(dedup.claim(key), Claim::New(_)));
        dedup.commit(&[key]);
        assert!(matches!(dedup.claim(key), Claim::New(_)));
    }
}
