//! The dedup table's real memory, read from the kernel (`VmRSS`), in a test binary of its own
//! so that no other test allocates meanwhile: the table is resident in full as soon as it is
//! made (pre-faulted), within its budget, and stays flat while it fills and turns over.

#![cfg(target_os = "linux")]

use std::time::Duration;

use apex_ingest::dedup::{Claim, Dedup};

const MIB: usize = 1 << 20;

/// The process's resident memory, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

#[test]
fn the_table_is_resident_from_the_start_and_stays_flat() {
    // Generations of about 250 KiB: each its own mapping from the allocator, so their pages
    // are only backed once written.
    let budget = 64 * MIB;
    let before = rss();
    let dedup = Dedup::new(Duration::from_secs(3600), budget, 8_000_000);
    let made = rss();
    let grown = made.saturating_sub(before);
    let allocated = dedup.allocated_bytes();
    assert!(allocated <= budget, "{allocated} bytes allocated");
    // Pre-faulted: all of it is resident now, not as it fills, and no more than the budget.
    assert!(
        grown >= allocated / 100 * 97 && grown <= budget + MIB,
        "RSS grew {grown} bytes for {allocated} allocated"
    );
    let customers: Vec<_> = (0..20)
        .map(|c| dedup.customer(&format!("cus_loadtest_{c:02}")))
        .collect();
    // About 1.6 M harness ids fit: 2 M fills every generation and turns some over.
    let mut id = String::new();
    let mut highest = made;
    for n in 0..2_000_000u64 {
        use std::fmt::Write as _;
        id.clear();
        write!(id, "lt-{n:016x}-12-345").expect("a String takes writes");
        if let Claim::New(ticket) = dedup.claim(customers[(n % 20) as usize], &id) {
            dedup.commit(&[ticket]);
        }
        if n % 100_000 == 0 {
            highest = highest.max(rss());
        }
    }
    highest = highest.max(rss());
    assert!(dedup.evictions() > 0, "the table never filled");
    // Flat: a few pages of customers and test bookkeeping, not the table filling in.
    let climb = highest - made;
    assert!(
        climb <= 2 * MIB,
        "RSS climbed {climb} bytes while the table filled"
    );
    let after = dedup.allocated_bytes();
    assert!(after <= budget, "{after} bytes allocated after filling");
}
