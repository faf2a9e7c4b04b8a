//! Criterion benchmarks of the hot path live in `benches/`; this library is empty and exists
//! so the package has a target besides its benches.
