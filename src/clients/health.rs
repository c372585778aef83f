//! What a local process reports of its engines' health (the `health`
//! message): queue depths, the workers it hosts with their details, and
//! broker facts. The registry keeps each connection's latest report with
//! its entry, so a report goes when its connection goes, and a report
//! older than its [`HealthReport::fresh_for`] is dropped when next read
//! ([`ClientRegistry::fresh_health`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::ClientRegistry;
use crate::protocol::Value;

/// How often a process reports when its message does not say
/// (`interval_seconds` absent).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// The longest `interval_seconds` taken; a longer one is read as this.
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(300);
/// A report stays fresh for this many intervals: two reports may be late
/// before the process's workers and queues leave the heartbeat.
pub const INTERVALS_FRESH: u32 = 3;
/// A report stays fresh at least this long, whatever its interval.
pub const MIN_FRESH: Duration = Duration::from_secs(15);

/// How long a report sent every `interval` stays fresh: `3 x interval`,
/// at least 15 s; the interval is taken between 1 s and 300 s.
pub fn fresh_for(interval: Option<Duration>) -> Duration {
    let interval = interval
        .unwrap_or(DEFAULT_REPORT_INTERVAL)
        .clamp(Duration::from_secs(1), MAX_REPORT_INTERVAL);
    (interval * INTERVALS_FRESH).max(MIN_FRESH)
}

/// One connection's latest health report.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// When it arrived (monotonic: for expiry).
    pub received: Instant,
    /// When it arrived (wall clock: the freshest depth of a queue wins).
    pub at: OffsetDateTime,
    /// How long after `received` it is still used ([`fresh_for`]).
    pub fresh_for: Duration,
    /// Engine -> what it reported for that engine.
    pub engines: BTreeMap<String, EngineHealth>,
}

/// What one report says about one engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineHealth {
    /// Queue name -> messages waiting.
    pub queue_depths: BTreeMap<String, u64>,
    /// Worker name -> its details (`stats`, `active`, `active_queues`,
    /// `registered`, `conf`), as the brain reads them.
    pub workers: BTreeMap<String, Value>,
    /// Other facts, as the brain's `<engine>.<key>` strings
    /// (`broker_type`, `broker_connected`, ...).
    pub facts: BTreeMap<String, String>,
}

/// A `health` message as the ingest handler validated it: a
/// [`HealthReport`] but for the monotonic arrival time, which the
/// connection adds ([`HealthUpdate::received_at`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthUpdate {
    /// When it arrived (wall clock).
    pub at: Option<OffsetDateTime>,
    /// How long it stays fresh ([`fresh_for`]).
    pub fresh_for: Duration,
    /// Engine -> what it reported for that engine.
    pub engines: BTreeMap<String, EngineHealth>,
}

impl HealthUpdate {
    /// The report, received at `now`.
    pub fn received_at(self, now: Instant) -> HealthReport {
        HealthReport {
            received: now,
            at: self.at.unwrap_or_else(OffsetDateTime::now_utc),
            fresh_for: self.fresh_for,
            engines: self.engines,
        }
    }
}

impl HealthReport {
    /// Whether it is still used at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.received) <= self.fresh_for
    }

    /// The names of the workers it reports, across engines.
    pub fn worker_names(&self) -> impl Iterator<Item = &String> {
        self.engines.values().flat_map(|e| e.workers.keys())
    }
}

impl ClientRegistry {
    /// Stores connection `id`'s latest health report (replacing the one
    /// before). The workers it reports count as hosted by that connection
    /// while the report is fresh (`hosting`).
    pub fn reported(&self, id: u64, report: HealthReport) {
        if let Some(e) = self.clients.lock().unwrap().get_mut(&id) {
            e.info.health = Some(report);
        }
    }

    /// Drops every report no longer fresh at `now`; returns how many.
    pub fn expire_health(&self, now: Instant) -> u64 {
        let mut expired = 0;
        for e in self.clients.lock().unwrap().values_mut() {
            if e.info.health.as_ref().is_some_and(|h| !h.is_fresh(now)) {
                e.info.health = None;
                expired += 1;
            }
        }
        expired
    }

    /// The fresh reports by connection id (call [`ClientRegistry::expire_health`]
    /// first to drop the stale ones).
    pub fn fresh_health(&self, now: Instant) -> Vec<(u64, HealthReport)> {
        self.clients
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, e)| {
                let h = e.info.health.as_ref()?;
                h.is_fresh(now).then(|| (*id, h.clone()))
            })
            .collect()
    }
}
