//! z4j-agentd: one daemon per host between Python task processes and a z4j brain.
//!
//! Data flow (each step is a module):
//!
//! ```text
//! app processes --unix socket--> ingest --> spool (SQLite WAL, group commit)
//!                                              | oldest first
//!                                              v
//! z4j brain <====== protocol v2, HMAC ====== uplink (one WebSocket)
//! ```
//!
//! * [`config`]: flags > environment > config file, secrets from files, validation;
//!   [`host`]: the host's directories, uid and name, read once and passed in.
//! * [`protocol`]: z4j protocol v2 frames, canonical JSON, HMAC signer/verifier,
//!   replay guard, the brain's limits. Pure: no I/O. What the brain expects
//!   is written down in `docs/brain-protocol.md`.
//! * [`ingest`]: the local socket, framing, validation and normalisation of events;
//!   [`refusal`]: the error codes it sends, which are also the refusal counters' labels.
//! * [`spool`]: the durable queue in SQLite.
//! * [`uplink`]: the one connection to the brain.
//! * [`clients`]: the registry of connected local clients (who each is,
//!   what its `hello` declared, how to reach it), which the router routes
//!   by and the reports and the `hello` advertisement read.
//! * [`commands`]: commands from the brain, routed to the local process that
//!   declared it can run them, and their results relayed back.
//! * [`stats`]: counters, connection state and clients an operator can see;
//!   [`metrics`]: the optional `/metrics`, `/healthz`, `/readyz` listener;
//!   [`admin`]: `z4j-agentd status`, which asks a running daemon for its
//!   `stats` and renders them.
//! * [`doctor`]: `z4j-agentd doctor`, every probe from config to a signed
//!   round trip with the brain.
//! * [`daemon`]: start, running and shutdown (startup order, readiness,
//!   the grace period); [`cli`]: flags, subcommands and signals;
//!   [`systemd`]: notify, the watchdog timeout and socket activation;
//!   [`watchdog`]: `WATCHDOG=1` only while ingest, spool and uplink answer.
//! * [`client`]: a small client for the local socket, used by Rust producers,
//!   the examples and the tests.
//! * [`memory`]: memory given back to the system after a burst of large
//!   messages (the binary installs the allocator's hook).
//! * `fuzzing` (tests and the `fuzzing` feature only): the bodies of the
//!   fuzz targets, replayed by `cargo test` (`docs/fuzzing.md`).
//!
//! Dependencies between these modules go one way (no cycles); each uses
//! only modules listed on its left or on an earlier line:
//!
//! ```text
//! protocol, host, memory, watchdog
//! clients, spool                    (protocol; host)
//! refusal, stats, systemd           (each the ones before it; spool, clients)
//! config, client                    (host, spool, systemd; protocol)
//! commands                          (stats and its client registry, refusal)
//! ingest, uplink, metrics, admin    (the above; ingest implements the
//!                                    registry's outbox, so commands need not
//!                                    know the socket)
//! daemon, doctor, cli               (everything)
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod clients;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod host;
// The fuzz targets' bodies: built for the tests (which replay the seeds
// and regressions) and for fuzz/ (feature `fuzzing`), not for the daemon.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod protocol;
pub mod refusal;
pub mod spool;
pub mod stats;
pub mod systemd;
pub mod uplink;
pub mod watchdog;
