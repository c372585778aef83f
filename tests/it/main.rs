//! The integration tests, one binary: each module is one area of the
//! daemon, run against a whole daemon (in this process, or the real binary
//! as a child) and, where a brain is needed, the fake brain of `support`.
//! One binary instead of one per module: each test binary links the whole
//! crate and its dependencies, so eleven of them cost eleven links.
//!
//! Run one area with `cargo test --test it cli::`.

mod support;

mod agent_identity;
mod cli;
mod commands;
mod config_files;
mod doctor;
mod gateway;
mod ingest_crowd;
mod ingest_limits;
mod longpoll;
mod metrics_listener;
mod observability;
mod restart_gap;
mod schedulers;
mod spool_disk_full;
mod uplink_faults;
mod uplink_tls;
mod worker_commands;
