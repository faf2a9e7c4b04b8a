//! Benchmarks of the edge's duplicate detection (`apex_ingest::dedup`) at its defaults
//! (24-hour window, 128 MiB, 8,000,000 ids), on a table already full: claiming and
//! committing a new event id (what every accepted record with an id costs, reuse of the
//! oldest generation included) and claiming one accepted before (what a retry costs).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use apex_ingest::dedup::{Claim, Customer, Dedup};
use criterion::{Criterion, criterion_group, criterion_main};

/// Customers of the load harness's default run.
const CUSTOMERS: u64 = 20;
/// Ids put through the table before measuring: more than twice what it holds at its
/// defaults (about 3.3 M of these ids), so every generation has been reused.
const WARM_IDS: u64 = 8_000_000;
/// Ids, most recent first, the duplicate bench cycles through (all still retained).
const RECENT: u64 = 100_000;

/// The load harness's id shape (`loadtest/src/workload.rs`): 26 bytes.
fn event_id(buf: &mut String, n: u64) -> &str {
    buf.clear();
    let _ = write!(buf, "lt-{n:016x}-12-345");
    buf
}

/// The edge looks the customer up once a request; so does each iteration here.
fn customer(dedup: &Dedup, customers: &[String], n: u64) -> Customer {
    dedup.customer(&customers[(n % CUSTOMERS) as usize])
}

fn claim_commit(dedup: &Dedup, customer: Customer, id: &str) {
    match dedup.claim(customer, id) {
        Claim::New(ticket) => dedup.commit(&[ticket]),
        other => panic!("a new id was {other:?}"),
    }
}

fn dedup(c: &mut Criterion) {
    let dedup = Dedup::new(Duration::from_secs(86_400), 128 << 20, 8_000_000);
    let customers: Vec<String> = (0..CUSTOMERS)
        .map(|c| format!("cus_loadtest_{c:02}"))
        .collect();
    let mut buf = String::new();
    for n in 0..WARM_IDS {
        let who = customer(&dedup, &customers, n);
        claim_commit(&dedup, who, event_id(&mut buf, n));
    }
    // The whole process's resident memory with the table full (Linux), for BENCHMARKS.md.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS:"))
    {
        eprintln!("dedup: {WARM_IDS} ids put through; {rss}");
    }
    let mut group = c.benchmark_group("dedup");
    let mut next = WARM_IDS;
    group.bench_function("claim_commit_new", |b| {
        b.iter(|| {
            let n = next;
            next += 1;
            let who = customer(&dedup, &customers, n);
            claim_commit(&dedup, who, event_id(&mut buf, n));
        })
    });
    let newest = next;
    let mut back = 0u64;
    group.bench_function("claim_duplicate", |b| {
        b.iter(|| {
            let n = newest - 1 - back;
            back = (back + 1) % RECENT;
            let who = customer(&dedup, &customers, n);
            let claim = dedup.claim(who, event_id(&mut buf, n));
            assert_eq!(black_box(claim), Claim::Duplicate);
        })
    });
    group.finish();
}

criterion_group!(benches, dedup);
criterion_main!(benches);
