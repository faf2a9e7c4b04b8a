//! Crash points for the crash tests: `APEX_FAILPOINT=name:n` makes the process abort (as
//! abruptly as `kill -9`: no destructor, no flush) the n-th time it reaches the named point.
//! Unset, a point costs one relaxed atomic load, so the hooks stay in production builds and
//! the tests crash the very binary that ships.
//!
//! Points: `wal_before_fsync` (blocks written, not yet fsynced, requests unanswered),
//! `wal_after_fsync` (durable, requests not yet answered), `pg_after_commit` (a batch in
//! Postgres, not yet in ClickHouse), `ch_after_started`, `ch_mid_insert` and `ch_after_data`
//! (a ClickHouse batch begun, its rows half streamed, or its rows written, its completion
//! marker not yet), `email_after_send` (the email provider accepted, nothing recorded yet).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The variable naming the point to crash at.
pub const VARIABLE: &str = "APEX_FAILPOINT";

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(VARIABLE).ok()?;
            let (name, at) = value.split_once(':').unwrap_or((value.as_str(), "1"));
            Some(Armed {
                name: name.to_owned(),
                at: at.parse().ok().filter(|&n| n > 0)?,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process if `name` is the armed point and this is its n-th hit.
pub fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name == name && armed.hits.fetch_add(1, Ordering::Relaxed) + 1 == armed.at {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
