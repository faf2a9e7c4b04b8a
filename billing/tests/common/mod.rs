//! Support shared by the billing integration tests.

pub(crate) mod stripe_standin;
