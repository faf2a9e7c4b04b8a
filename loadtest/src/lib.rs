//! The load-test harness as a library: the arrival schedule, the HTTP load runner, the
//! telemetry workload, statistics, reports, the store verifier and the null server. The
//! `apex-loadtest` binary is its command line.

pub mod customers;
pub mod null_server;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod stats;
pub mod verify;
pub mod workload;
