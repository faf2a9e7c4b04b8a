//! Support shared by the billing integration tests.

// Also compiled into ingest's webhook tests, which use other parts of it.
#[allow(dead_code)]
pub(crate) mod stripe_standin;
