//! Benchmarks of the ingest hot path: parse and validate one track body, parse and validate a
//! 1,000-record batch, key cache lookups (hit and remembered miss), and the push of a
//! submission through the bounded pipeline channel.

use std::hint::black_box;
use std::sync::Arc;

use apex_billing::keys::generate_key;
use apex_billing::status::CustomerStatus;
use apex_core::model::{Metric, UsageRecord};
use apex_ingest::keycache::{KeyCache, KeyVerdict};
use apex_ingest::records::{WireBatch, WireRecord, parse_track, validate};
use apex_pipeline::sink::Submission;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const NOW_MS: i64 = 1_764_000_000_000;

fn track_body() -> String {
    format!(
        r#"{{"api_key":"{}","metric_type":"impressions","quantity":1000,"event_id":"3f1c2a9e-7b7d-4d6b-9a51-0c2f6f1e8b11","metadata":{{"platform":"iOS","sdk_version":"1.0.0","app_id":"com.example.game"}}}}"#,
        generate_key().expose()
    )
}

fn batch_body(records: usize) -> String {
    let record = r#"{"metric_type":"impressions","quantity":25,"event_id":"evt-000000000000","timestamp":1764000000,"metadata":{"platform":"Android","sdk_version":"1.0.0"}}"#;
    format!(
        r#"{{"api_key":"{}","records":[{}]}}"#,
        generate_key().expose(),
        vec![record; records].join(",")
    )
}

fn parsing(c: &mut Criterion) {
    let body = track_body();
    c.bench_function("track_parse_validate", |b| {
        b.iter(|| {
            let wire = parse_track(black_box(body.as_bytes())).unwrap();
            validate(&wire, NOW_MS).unwrap()
        })
    });

    let batch = batch_body(1_000);
    let mut group = c.benchmark_group("batch_1000");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("parse_validate", |b| {
        b.iter(|| {
            let envelope: WireBatch<'_> =
                serde_json::from_slice(black_box(batch.as_bytes())).unwrap();
            envelope
                .records
                .iter()
                .map(|raw| {
                    let wire: WireRecord<'_> = serde_json::from_str(raw.get()).unwrap();
                    validate(&wire, NOW_MS).unwrap().quantity
                })
                .sum::<u64>()
        })
    });
    group.finish();
}

fn key_cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A pool that never connects: hits and remembered misses do not touch Postgres.
    let pool = {
        let _context = runtime.enter();
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://127.0.0.1:1/none")
            .unwrap()
    };
    let cache = KeyCache::new(pool);
    let keys: Vec<String> = (0..10_000)
        .map(|_| generate_key().expose().to_owned())
        .collect();
    for (i, key) in keys.iter().enumerate() {
        cache.insert_key(key, &format!("cus_{i}"), CustomerStatus::Active);
    }
    let unknown = generate_key().expose().to_owned();
    cache.insert_unknown(&unknown);
    let hit = keys[4_321].clone();
    c.bench_function("key_lookup_hit", |b| {
        b.iter(|| {
            let verdict = runtime.block_on(cache.check(black_box(&hit)));
            assert!(matches!(verdict, KeyVerdict::Active(_)));
        })
    });
    c.bench_function("key_lookup_miss_remembered", |b| {
        b.iter(|| {
            let verdict = runtime.block_on(cache.check(black_box(&unknown)));
            assert_eq!(verdict, KeyVerdict::Unknown);
        })
    });
    c.bench_function("key_lookup_malformed", |b| {
        b.iter(|| runtime.block_on(cache.check(black_box("rsk_short"))))
    });
}

fn channel_push(c: &mut Criterion) {
    let (sender, receiver) = crossbeam_channel::bounded::<Submission>(4_096);
    let customer: Arc<str> = Arc::from("cus_bench");
    c.bench_function("channel_push_pop_one_record", |b| {
        b.iter(|| {
            let (ack, _acked) = tokio::sync::oneshot::channel();
            let record = UsageRecord {
                customer_id: customer.clone(),
                metric: Metric::Impressions,
                quantity: 1,
                event_id: None,
                timestamp_ms: NOW_MS,
                received_ms: NOW_MS,
                metadata: None,
            };
            sender
                .try_send(Submission {
                    records: vec![record],
                    ack,
                })
                .unwrap();
            black_box(receiver.try_recv().unwrap())
        })
    });
}

criterion_group!(benches, parsing, key_cache, channel_push);
criterion_main!(benches);
