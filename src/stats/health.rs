//! Counting health reports (the local `health` message) and what the
//! heartbeat's `adapter_health` had to leave out, and reading the fresh
//! reports for the heartbeat and the `stats` reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Stats;
use crate::clients::merge::Cuts;
use crate::clients::HealthReport;
use crate::protocol::{format_ts, Value};

/// The live counters.
#[derive(Debug, Default)]
pub struct HealthCounters {
    received: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    cut_registered: AtomicU64,
    cut_details: AtomicU64,
    cut_workers: AtomicU64,
    cut_queues: AtomicU64,
    cut_facts: AtomicU64,
    /// When the last "cut" warning was logged.
    cut_warned: Mutex<Option<Instant>>,
}

/// At most one warning about cuts this often.
const CUT_WARN_EVERY: Duration = Duration::from_secs(600);

/// Health reports by outcome, and what heartbeats left out (`stats` key
/// `health`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCounts {
    /// `health` messages received (valid or not).
    pub received: u64,
    /// Refused whole (no map of engines); their parts refused alone are in
    /// `refused_by_reason.invalid_health`.
    pub refused: u64,
    /// Reports dropped because their process stopped reporting.
    pub expired: u64,
    /// What heartbeats left out to keep within the brain's limits, by kind,
    /// counted once per heartbeat.
    pub cut: Cuts,
}

impl HealthCounters {
    /// Counts `received` messages, `refused` of them whole.
    pub fn reports(&self, received: u64, refused: u64) {
        self.received.fetch_add(received, Ordering::Relaxed);
        self.refused.fetch_add(refused, Ordering::Relaxed);
    }

    /// Counts what one heartbeat left out.
    pub fn cut(&self, c: &Cuts) {
        for (a, n) in [
            (&self.cut_registered, c.registered),
            (&self.cut_details, c.details),
            (&self.cut_workers, c.workers),
            (&self.cut_queues, c.queues),
            (&self.cut_facts, c.facts),
        ] {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        if !c.any() {
            return;
        }
        let mut warned = self.cut_warned.lock().unwrap();
        if warned.is_none_or(|at| at.elapsed() >= CUT_WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                registered = c.registered,
                details = c.details,
                workers = c.workers,
                queues = c.queues,
                facts = c.facts,
                "the heartbeat's adapter_health did not fit the brain's limits (256 keys, 1024 queues per engine, its frame size); what is counted here was left out of this heartbeat (health.cut in stats); report fewer queues or smaller worker details"
            );
        }
    }

    /// The counts now.
    pub fn counts(&self) -> HealthCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HealthCounts {
            received: l(&self.received),
            refused: l(&self.refused),
            expired: l(&self.expired),
            cut: Cuts {
                registered: l(&self.cut_registered),
                details: l(&self.cut_details),
                workers: l(&self.cut_workers),
                queues: l(&self.cut_queues),
                facts: l(&self.cut_facts),
            },
        }
    }

    #[cfg(test)]
    pub(crate) fn set(&self, c: HealthCounts) {
        let s = |a: &AtomicU64, n| a.store(n, Ordering::Relaxed);
        s(&self.received, c.received);
        s(&self.refused, c.refused);
        s(&self.expired, c.expired);
        s(&self.cut_registered, c.cut.registered);
        s(&self.cut_details, c.cut.details);
        s(&self.cut_workers, c.cut.workers);
        s(&self.cut_queues, c.cut.queues);
        s(&self.cut_facts, c.cut.facts);
    }
}

impl Stats {
    /// Drops (and counts) the reports of processes that stopped reporting.
    pub fn expire_health(&self) {
        let n = self.clients.expire_health(Instant::now());
        if n > 0 {
            self.health.expired.fetch_add(n, Ordering::Relaxed);
            tracing::info!(
                reports = n,
                "dropped the health report of a process that stopped reporting; its workers and queues leave the heartbeat"
            );
        }
    }

    /// The connected processes' fresh health reports, by connection id
    /// (the stale ones dropped and counted first).
    pub fn fresh_health(&self) -> Vec<(u64, HealthReport)> {
        self.expire_health();
        self.clients.fresh_health(Instant::now())
    }
}

/// What one process last reported, as the `stats` reply's `client_list`
/// shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientHealth {
    /// When the report arrived.
    pub reported_at: String,
    /// How long after that it is used, unless a newer one replaces it.
    pub fresh_for_seconds: u64,
    /// Engine -> what it reported for it.
    pub engines: BTreeMap<String, EngineReport>,
}

/// One engine's part of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineReport {
    /// The workers it hosts.
    pub workers: Vec<WorkerReport>,
    /// Queue -> messages waiting.
    pub queue_depths: BTreeMap<String, u64>,
    /// Other facts (`broker_type`, ...).
    pub facts: BTreeMap<String, String>,
}

/// One reported worker, in brief.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerReport {
    /// Its name (as its events carry it).
    pub name: String,
    /// `stats.pid`.
    pub pid: Option<i64>,
    /// `stats.pool.max-concurrency`.
    pub concurrency: Option<i64>,
    /// The names of its `active_queues`.
    pub queues: Vec<String>,
    /// Tasks in `active`.
    pub active: Option<u64>,
    /// Tasks in `registered`.
    pub registered: Option<u64>,
}

impl From<&HealthReport> for ClientHealth {
    fn from(r: &HealthReport) -> Self {
        let engines = r
            .engines
            .iter()
            .map(|(name, e)| {
                let workers = e
                    .workers
                    .iter()
                    .map(|(w, d)| {
                        let stats = d.get("stats");
                        let int = |v: Option<&Value>| v.and_then(Value::as_i64);
                        let len =
                            |k: &str| d.get(k).and_then(Value::as_array).map(|a| a.len() as u64);
                        WorkerReport {
                            name: w.clone(),
                            pid: int(stats.and_then(|s| s.get("pid"))),
                            concurrency: int(stats
                                .and_then(|s| s.get("pool"))
                                .and_then(|p| p.get("max-concurrency"))),
                            queues: d
                                .get("active_queues")
                                .and_then(Value::as_array)
                                .unwrap_or_default()
                                .iter()
                                .filter_map(|q| q.get("name").and_then(Value::as_str))
                                .map(str::to_string)
                                .collect(),
                            active: len("active"),
                            registered: len("registered"),
                        }
                    })
                    .collect();
                let report = EngineReport {
                    workers,
                    queue_depths: e.queue_depths.clone(),
                    facts: e.facts.clone(),
                };
                (name.clone(), report)
            })
            .collect();
        ClientHealth {
            reported_at: format_ts(r.at),
            fresh_for_seconds: r.fresh_for.as_secs(),
            engines,
        }
    }
}
