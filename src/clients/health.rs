//! What a local process reports of its engines' health (the `health`
//! message): queue depths, the workers it hosts with their details, and
//! broker facts. The registry keeps each connection's latest report with
//! its entry, so a report goes when its connection goes.

use std::collections::BTreeMap;
use std::time::Instant;

use time::OffsetDateTime;

use crate::protocol::Value;

/// One connection's latest health report.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// When it arrived (monotonic: for expiry).
    pub received: Instant,
    /// When it arrived (wall clock: the freshest depth of a queue wins).
    pub at: OffsetDateTime,
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
