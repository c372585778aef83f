//! What the brain is told of the counters: the payloads of the `heartbeat`
//! and `agent_status` frames, rendered from the same [`Snapshot`] as every
//! other report (so `dropped_events` is the `dropped` of `stats`).
//!
//! The session supplies what only it knows (when it last flushed, what its
//! `hello` advertised, how old it is); signing and sending stay with it.

use std::time::Duration;

use time::OffsetDateTime;

use super::{FailureStreaks, Snapshot, TelemetryLoss, AGENT_STATUS_SCHEDULERS_MAX};
use crate::protocol::{self, Value};

/// The brain's bound on `buffer_size` and `dropped_events` (an int in
/// 0..10^7); larger counts are sent as the bound.
pub const HEARTBEAT_COUNT_MAX: u64 = 10_000_000;

/// Most engines listed in `agent_status`.
pub const AGENT_STATUS_ENGINES_MAX: usize = 32;

impl Snapshot {
    /// The `heartbeat` payload.
    pub fn heartbeat_payload(&self, last_flush_at: Option<OffsetDateTime>) -> Value {
        let mut hb = Value::empty_map();
        hb.insert("buffer_size", self.spool_depth.min(HEARTBEAT_COUNT_MAX));
        hb.insert(
            "last_flush_at",
            last_flush_at
                .map(|t| Value::from(protocol::format_ts(t)))
                .unwrap_or(Value::Null),
        );
        hb.insert("dropped_events", self.dropped.min(HEARTBEAT_COUNT_MAX));
        hb.insert("adapter_health", Value::empty_map());
        hb
    }

    /// The `agent_status` payload: `engines` as the session's `hello`
    /// advertised them, its age and when it was established.
    pub fn agent_status_payload(
        &self,
        engines: &[String],
        session_age: Duration,
        connected_at: OffsetDateTime,
    ) -> Value {
        let mut st = Value::empty_map();
        st.insert("buffer_depth", self.spool_depth.min(HEARTBEAT_COUNT_MAX));
        st.insert(
            "buffer_oldest_age_seconds",
            self.spool_oldest_age_seconds
                .map(Value::Float)
                .unwrap_or(Value::Null),
        );
        st.insert("protocol_version", protocol::PROTOCOL_VERSION);
        st.insert(
            "engines",
            Value::Array(
                engines
                    .iter()
                    .take(AGENT_STATUS_ENGINES_MAX)
                    .map(|e| Value::from(e.as_str()))
                    .collect(),
            ),
        );
        st.insert(
            "current_session_age_seconds",
            Value::Float(session_age.as_secs_f64()),
        );
        st.insert(
            "last_successful_connect_at",
            protocol::format_ts(connected_at),
        );
        st
    }
}

/// Adds `telemetry_loss` to a `heartbeat` or `agent_status` payload: the
/// map when it is within the brain's limits, else null (see
/// [`TelemetryLoss::to_value_checked`]).
pub fn add_telemetry_loss(payload: &mut Value, loss: &TelemetryLoss) {
    payload.insert("telemetry_loss", loss.to_value_checked());
}

/// Adds to an `agent_status` payload who is speaking: the contract line the
/// session's `hello` named (`agent_version`), the schedulers it advertised
/// (at most [`AGENT_STATUS_SCHEDULERS_MAX`]) and the failures in a row
/// before it.
pub fn add_agent_identity(
    st: &mut Value,
    contract_line: &str,
    schedulers: &[String],
    streaks: FailureStreaks,
) {
    st.insert("agent_version", contract_line);
    st.insert(
        "schedulers",
        Value::Array(
            schedulers
                .iter()
                .take(AGENT_STATUS_SCHEDULERS_MAX)
                .map(|e| Value::from(e.as_str()))
                .collect(),
        ),
    );
    streaks.insert_into(st);
}
