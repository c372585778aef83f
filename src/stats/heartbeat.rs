//! What the brain is told of the counters: the payloads of the `heartbeat`
//! and `agent_status` frames, rendered from the same [`Snapshot`] as every
//! other report (so `dropped_events` is the `dropped` of `stats`).
//!
//! The session supplies what only it knows (when it last flushed, what its
//! `hello` advertised, how old it is, the brain's frame size); signing and
//! sending stay with it. [`add_adapter_health`] fills `adapter_health` with
//! the merge of the processes' health reports.

use std::time::Duration;

use time::OffsetDateTime;

use super::{FailureStreaks, Snapshot, TelemetryLoss, AGENT_STATUS_SCHEDULERS_MAX};
use crate::clients::merge::{self, Cuts};
use crate::clients::HealthReport;
use crate::protocol::{self, canonical, Value};

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

/// Fills a `heartbeat` payload's `adapter_health` with the merge of the
/// fresh `reports` ([`merge::merge`]), cut so that the signed frame stays
/// within `max_frame_bytes`: the room is what the frame's envelope (its
/// upper bound) and the rest of the payload leave. Returns what was cut.
///
/// When a report carries workers, `last_flush_at` becomes `now`: the brain
/// takes each worker's `last_heartbeat` from it and never moves it back,
/// so the time of the last event batch, minutes old on a quiet host, would
/// show the workers as not heard from.
pub fn add_adapter_health(
    hb: &mut Value,
    reports: &[(u64, HealthReport)],
    max_frame_bytes: usize,
    now: OffsetDateTime,
) -> Cuts {
    let any_workers = reports
        .iter()
        .any(|(_, r)| r.engines.values().any(|e| !e.workers.is_empty()));
    if any_workers {
        hb.insert("last_flush_at", protocol::format_ts(now));
    }
    hb.insert("adapter_health", Value::empty_map());
    let mut rendered = Vec::with_capacity(256);
    canonical::write_value_lossy(hb, &mut rendered);
    // The empty object's two bytes are part of the room.
    let room =
        max_frame_bytes.saturating_sub(protocol::frame_overhead_bytes() + rendered.len()) + 2;
    let health = merge::merge(reports, room);
    hb.insert("adapter_health", health.to_value());
    health.cuts
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use time::macros::datetime;

    use super::*;
    use crate::clients::EngineHealth;
    use crate::protocol::{SessionBinding, Signer, SigningKey};

    /// `n` processes, each with one worker carrying a long `registered`
    /// list full of quotes, and a queue.
    fn reports(n: u64) -> Vec<(u64, HealthReport)> {
        let t0 = Instant::now();
        (0..n)
            .map(|i| {
                let tasks: Vec<String> = (0..50).map(|t| format!("\"app.\\\"t{t}\\\"\"")).collect();
                let w: Value = serde_json::from_str(&format!(
                    r#"{{"stats":{{"pid":{i},"pool":{{"max-concurrency":2}}}},"registered":[{}],"conf":{{"task_acks_late":true}}}}"#,
                    tasks.join(",")
                ))
                .unwrap();
                let h = EngineHealth {
                    queue_depths: BTreeMap::from([(format!("q{i}"), i)]),
                    workers: BTreeMap::from([(format!("celery@w{i}"), w)]),
                    facts: BTreeMap::new(),
                };
                let r = HealthReport {
                    received: t0 - Duration::from_millis(i),
                    at: OffsetDateTime::UNIX_EPOCH,
                    fresh_for: Duration::from_secs(90),
                    engines: BTreeMap::from([("celery".to_string(), h)]),
                };
                (i, r)
            })
            .collect()
    }

    fn signed(hb: &Value) -> Vec<u8> {
        let key = SigningKey::from_base64("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY").unwrap();
        let mut signer = Signer::new(key, SessionBinding::new("agent", "project", "session"));
        signer.sign_value(
            "heartbeat",
            &protocol::new_frame_id("hb_"),
            hb,
            datetime!(2026-12-06 10:00:00 UTC),
            &protocol::new_nonce(),
        )
    }

    #[test]
    fn the_signed_heartbeat_fits_the_brains_frame_size() {
        let reports = reports(40);
        for max in [4 * 1024, 8 * 1024, 20 * 1024, 1 << 20] {
            let mut hb = Snapshot::default().heartbeat_payload(None);
            let cuts =
                add_adapter_health(&mut hb, &reports, max, datetime!(2026-12-06 10:00:00 UTC));
            let frame = signed(&hb);
            assert!(frame.len() <= max, "{} > {max}", frame.len());
            let health = hb.get("adapter_health").unwrap().as_map().unwrap();
            if max == 1 << 20 {
                assert_eq!(cuts, Cuts::default());
                assert_eq!(health.len(), 2);
            } else {
                assert!(cuts.registered > 0, "{max}: {cuts:?}");
                assert!(!health.is_empty(), "{max}: something still fits");
            }
            // Worker details carried: last_flush_at is this heartbeat's time.
            assert_eq!(
                hb.get("last_flush_at").and_then(Value::as_str),
                Some("2026-12-06T10:00:00.000000Z")
            );
        }
    }

    #[test]
    fn without_workers_last_flush_at_stays_as_the_session_had_it() {
        let mut hb = Snapshot::default().heartbeat_payload(None);
        let mut r = reports(1);
        r[0].1.engines.get_mut("celery").unwrap().workers.clear();
        add_adapter_health(&mut hb, &r, 1 << 20, datetime!(2026-12-06 10:00:00 UTC));
        assert_eq!(hb.get("last_flush_at"), Some(&Value::Null));
        let health = hb.get("adapter_health").unwrap();
        assert_eq!(
            health.get("celery.queue_depths").and_then(Value::as_str),
            Some(r#"{"q0":0}"#)
        );
    }
}
