//! Benchmarks of the pipeline hot path: appending a request's block to the write-ahead log
//! (to the page cache, and with its fsync), encoding 1,000 records as a log block and as
//! ClickHouse RowBinary rows, and the hourly rollup aggregation of 100,000 records.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use apex_core::model::{Metric, UsageRecord};
use apex_pipeline::clickhouse_sink::encode_row;
use apex_pipeline::postgres_sink::aggregate_hourly;
use apex_pipeline::store::Batch;
use apex_pipeline::wal::{self, WalWriter};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const NOW_MS: i64 = 1_764_000_000_000;

fn records(n: usize, customers: usize) -> Vec<UsageRecord> {
    let ids: Vec<Arc<str>> = (0..customers)
        .map(|i| Arc::from(format!("cus_{i:016}")))
        .collect();
    (0..n)
        .map(|i| UsageRecord {
            customer_id: ids[i % customers].clone(),
            metric: Metric::ALL[i % 3],
            quantity: 1 + (i as u64 % 1000),
            event_id: Some(format!("3f1c2a9e-7b7d-4d6b-9a51-{i:012}").into()),
            // Spread over a day, so the rollup has many hours per customer.
            timestamp_ms: NOW_MS - (i as i64 % 86_400) * 1_000,
            received_ms: NOW_MS,
            metadata: Some(r#"{"platform":"iOS","sdk_version":"1.0.0"}"#.into()),
        })
        .collect()
}

fn temp_log(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apex_bench_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn log_append(c: &mut Criterion) {
    let one = records(1, 1);
    let dir = temp_log("append");
    let (mut log, _) = WalWriter::open(&dir, 64 << 20).unwrap();
    c.bench_function("wal_append_track_block", |b| {
        b.iter(|| {
            let block = wal::encode_records(black_box(&one));
            log.append(&[block]).unwrap();
        })
    });
    let dir_sync = temp_log("append_fsync");
    let (mut synced, _) = WalWriter::open(&dir_sync, 64 << 20).unwrap();
    let mut group = c.benchmark_group("wal");
    group.sample_size(20);
    group.bench_function("append_track_block_fsync", |b| {
        b.iter(|| {
            synced
                .append(&[wal::encode_records(black_box(&one))])
                .unwrap();
            synced.sync().unwrap();
        })
    });
    group.finish();
    drop((log, synced));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir_sync);
}

fn encoding(c: &mut Criterion) {
    let batch_records = records(1_000, 10);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("wal_block_1000", |b| {
        b.iter(|| wal::encode_records(black_box(&batch_records)))
    });
    let batch = Batch {
        log_id: "log_0123456789abcdef",
        start: 4096,
        end: 8192,
        records: &batch_records,
    };
    let mut out = Vec::with_capacity(256 * 1_000);
    group.bench_function("rowbinary_1000", |b| {
        b.iter(|| {
            out.clear();
            for (seq, record) in batch.records.iter().enumerate() {
                encode_row(&mut out, black_box(&batch), seq as u32, record);
            }
            out.len()
        })
    });
    group.finish();
}

fn rollup(c: &mut Criterion) {
    let many = records(100_000, 100);
    let mut group = c.benchmark_group("rollup");
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("aggregate_hourly_100k", |b| {
        b.iter(|| aggregate_hourly(black_box(&many)).len())
    });
    group.finish();
}

criterion_group!(benches, log_append, encoding, rollup);
criterion_main!(benches);
