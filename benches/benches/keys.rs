//! Benchmarks of the per-request API key work at the edge: the shape check that refuses
//! garbage without a lookup, and the SHA-256 that keys the cache.

use apex_billing::keys::{generate_key, has_key_shape, hash_key};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn key_work(c: &mut Criterion) {
    let key = generate_key();
    let key = key.expose();
    c.bench_function("key_shape_check", |b| {
        b.iter(|| has_key_shape(black_box(key)))
    });
    c.bench_function("key_sha256", |b| b.iter(|| hash_key(black_box(key))));
}

criterion_group!(benches, key_work);
criterion_main!(benches);
