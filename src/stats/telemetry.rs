//! What the brain's agent health timeline reads: `telemetry_loss` (in the
//! `heartbeat` and `agent_status` frames), the failure streaks before the
//! session, and the runtime id of this daemon run.
//!
//! The brain checks `telemetry_loss` strictly: one value out of its bounds
//! makes it close the connection (1011) on every frame that carries it. So
//! [`TelemetryLoss::build`] clamps every count and keeps the names to the
//! bounds, and [`TelemetryLoss::check`] verifies the result against the
//! brain's limits before it is sent; a value that fails is not sent (and
//! the failure logged), never sent to be refused.
//!
//! Mapping of the daemon's own loss counters (the brain's model, z4j-core's
//! `TelemetryLossPayload`):
//! * `buffer_id`: the spool file's identity, kept in the file;
//! * `runtime_id`: new for each daemon run (`<uuid hex>:<pid>`);
//! * `capacity_evicted_frames`: events evicted by `drop_oldest` (one spool
//!   row is one event), over the spool file's life;
//! * `content_rejected_frames`: events dropped because the brain can never
//!   take them (larger than its frame limit), over the file's life;
//! * `event_records`: the events inside those rows (their sum: they
//!   overlap the two above, as the brain's model says);
//! * `command_results`, `other_frames`, `unclassified_frames`: 0; the daemon
//!   keeps a command's answer until a session takes it, and spools nothing
//!   but events;
//! * `adapter_events`: per engine, events of this run refused by
//!   `drop_newest` for a full spool (they never reached the spool), keyed by
//!   the engines the sending process declared.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::protocol::Value;

/// The brain's bound on every `telemetry_loss` count (2^53 - 1).
pub const LOSS_COUNT_MAX: u64 = (1 << 53) - 1;
/// The brain's bound on the ids' and the adapter names' length, in characters.
pub const LOSS_NAME_MAX_CHARS: usize = 64;
/// The brain's bound on `adapter_events` entries.
pub const LOSS_ADAPTERS_MAX: usize = 32;
/// The brain's bound on each failure streak.
pub const STREAK_MAX: u64 = 1_000_000;
/// Most schedulers listed in `agent_status`.
pub const AGENT_STATUS_SCHEDULERS_MAX: usize = 32;
/// The `adapter_events` entry that sums engines past
/// [`LOSS_ADAPTERS_MAX`] or with names the brain would refuse.
pub const OTHER_ADAPTERS: &str = "other_engines";

/// The daemon's loss counters, as the brain's `telemetry_loss` names them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TelemetryLoss {
    /// The spool file's identity.
    pub buffer_id: String,
    /// This daemon run.
    pub runtime_id: String,
    /// Events evicted for room.
    pub capacity_evicted_frames: u64,
    /// Events the brain could never take.
    pub content_rejected_frames: u64,
    /// Events inside the rows lost (overlaps the two above).
    pub event_records: u64,
    /// Command answers lost.
    pub command_results: u64,
    /// Other frames lost.
    pub other_frames: u64,
    /// Rows lost that could not be read.
    pub unclassified_frames: u64,
    /// Per engine, events of this run that never reached the spool.
    pub adapter_events: BTreeMap<String, u64>,
}

/// What [`TelemetryLoss::build`] is made from.
#[derive(Debug, Clone)]
pub struct LossCounts<'a> {
    /// The spool file's identity.
    pub buffer_id: &'a str,
    /// This daemon run.
    pub runtime_id: &'a str,
    /// Events evicted by `drop_oldest`, over the spool file's life.
    pub evicted: u64,
    /// Events discarded as undeliverable, over the spool file's life.
    pub undeliverable: u64,
    /// Per engine, events of this run refused for a full spool.
    pub engine_drops: &'a BTreeMap<String, u64>,
}

impl TelemetryLoss {
    /// Maps the daemon's counters onto the brain's fields, clamped to its
    /// bounds. Engines past [`LOSS_ADAPTERS_MAX`] - 1 or with a name the
    /// brain would refuse are summed under [`OTHER_ADAPTERS`], so no count
    /// is left out.
    pub fn build(c: &LossCounts<'_>) -> TelemetryLoss {
        let mut valid = Vec::new();
        let mut other = 0u64;
        let mut folded = false;
        for (engine, n) in c.engine_drops {
            if name_fits(engine) && engine != OTHER_ADAPTERS {
                valid.push((engine, *n));
            } else {
                other = other.saturating_add(*n);
                folded = true;
            }
        }
        let room = if folded || valid.len() > LOSS_ADAPTERS_MAX {
            LOSS_ADAPTERS_MAX - 1
        } else {
            LOSS_ADAPTERS_MAX
        };
        let mut adapter_events = BTreeMap::new();
        for (i, (engine, n)) in valid.into_iter().enumerate() {
            if i < room {
                adapter_events.insert(engine.clone(), clamp(n));
            } else {
                other = other.saturating_add(n);
                folded = true;
            }
        }
        if folded {
            adapter_events.insert(OTHER_ADAPTERS.to_string(), clamp(other));
        }
        TelemetryLoss {
            buffer_id: c.buffer_id.to_string(),
            runtime_id: c.runtime_id.to_string(),
            capacity_evicted_frames: clamp(c.evicted),
            content_rejected_frames: clamp(c.undeliverable),
            event_records: clamp(c.evicted.saturating_add(c.undeliverable)),
            command_results: 0,
            other_frames: 0,
            unclassified_frames: 0,
            adapter_events,
        }
    }

    /// Checks every field against the brain's limits; the error says which
    /// one is out and why.
    pub fn check(&self) -> Result<(), String> {
        for (field, v) in [
            ("buffer_id", &self.buffer_id),
            ("runtime_id", &self.runtime_id),
        ] {
            if !name_fits(v) {
                return Err(format!(
                    "{field} must be 1 to {LOSS_NAME_MAX_CHARS} characters, has {}",
                    v.chars().count()
                ));
            }
        }
        for (field, v) in self.counts() {
            if v > LOSS_COUNT_MAX {
                return Err(format!("{field} {v} is over {LOSS_COUNT_MAX}"));
            }
        }
        if self.adapter_events.len() > LOSS_ADAPTERS_MAX {
            return Err(format!(
                "adapter_events has {} entries, at most {LOSS_ADAPTERS_MAX}",
                self.adapter_events.len()
            ));
        }
        for (name, v) in &self.adapter_events {
            if !name_fits(name) {
                return Err(format!(
                    "adapter_events name {name:?} must be 1 to {LOSS_NAME_MAX_CHARS} characters"
                ));
            }
            if *v > LOSS_COUNT_MAX {
                return Err(format!(
                    "adapter_events[{name}] {v} is over {LOSS_COUNT_MAX}"
                ));
            }
        }
        Ok(())
    }

    fn counts(&self) -> [(&'static str, u64); 6] {
        [
            ("capacity_evicted_frames", self.capacity_evicted_frames),
            ("content_rejected_frames", self.content_rejected_frames),
            ("event_records", self.event_records),
            ("command_results", self.command_results),
            ("other_frames", self.other_frames),
            ("unclassified_frames", self.unclassified_frames),
        ]
    }

    /// The `telemetry_loss` value.
    pub fn to_value(&self) -> Value {
        let mut m = Value::empty_map();
        m.insert("buffer_id", self.buffer_id.as_str());
        m.insert("runtime_id", self.runtime_id.as_str());
        for (field, v) in self.counts() {
            m.insert(field, v);
        }
        let mut adapters = Value::empty_map();
        for (name, v) in &self.adapter_events {
            adapters.insert(name.as_str(), *v);
        }
        m.insert("adapter_events", adapters);
        m
    }

    /// The value to send: the map when it passes [`TelemetryLoss::check`],
    /// else null (the brain closes the connection on an invalid one, and
    /// accepts null), with the reason logged.
    pub fn to_value_checked(&self) -> Value {
        match self.check() {
            Ok(()) => self.to_value(),
            Err(why) => {
                tracing::error!(
                    reason = %why,
                    "telemetry_loss is outside the brain's limits and is not sent"
                );
                Value::Null
            }
        }
    }
}

fn clamp(n: u64) -> u64 {
    n.min(LOSS_COUNT_MAX)
}

fn name_fits(s: &str) -> bool {
    let n = s.chars().count();
    (1..=LOSS_NAME_MAX_CHARS).contains(&n)
}

/// A new runtime id: 32 hex digits of a random UUID, `:`, the pid.
pub fn new_runtime_id() -> String {
    format!("{}:{}", uuid::Uuid::new_v4().simple(), std::process::id())
}

/// Failures in a row by the brain's three classes (an `incompatible`
/// failure counts as `protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureStreaks {
    /// Token or signature refused.
    pub auth: u64,
    /// A frame or version the two sides could not agree on.
    pub protocol: u64,
    /// Network, TLS and the other failures.
    pub connection: u64,
}

impl FailureStreaks {
    /// Counts one failure of backoff class `class` (`auth`, `protocol`,
    /// `incompatible`, `connection`).
    pub fn record(&mut self, class: &str) {
        let n = match class {
            "auth" => &mut self.auth,
            "protocol" | "incompatible" => &mut self.protocol,
            _ => &mut self.connection,
        };
        *n = n.saturating_add(1);
    }

    /// Adds the streaks to an `agent_status` payload, clamped.
    pub fn insert_into(&self, st: &mut Value) {
        st.insert("auth_failure_streak", self.auth.min(STREAK_MAX));
        st.insert("protocol_failure_streak", self.protocol.min(STREAK_MAX));
        st.insert("connection_failure_streak", self.connection.min(STREAK_MAX));
    }
}

/// This run's telemetry state, shared by ingest (the drops) and the uplink.
#[derive(Debug)]
pub struct Telemetry {
    /// This daemon run's id.
    pub runtime_id: String,
    engine_drops: Mutex<BTreeMap<String, u64>>,
}

impl super::Stats {
    /// The brain's `telemetry_loss` now: the spool file's lifetime losses
    /// and this run's per-engine drops, every engine in `advertised` listed.
    pub fn telemetry_loss(
        &self,
        spool: &crate::spool::SpoolStats,
        advertised: &[String],
    ) -> TelemetryLoss {
        use std::sync::atomic::Ordering::Relaxed;
        let drops = self.telemetry.engine_drops(advertised);
        TelemetryLoss::build(&LossCounts {
            buffer_id: spool.buffer_id(),
            runtime_id: &self.telemetry.runtime_id,
            evicted: spool.dropped_oldest_total.load(Relaxed),
            undeliverable: spool.undeliverable_total.load(Relaxed),
            engine_drops: &drops,
        })
    }
}

/// Most distinct engine names kept in the drop counts (the rest are summed
/// under [`OTHER_ADAPTERS`] at once, so a client naming random engines
/// cannot grow the map).
const ENGINE_DROPS_KEPT: usize = 256;

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            runtime_id: new_runtime_id(),
            engine_drops: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Telemetry {
    /// Counts `n` events of a process declaring `engines` that never reached
    /// the spool; a process with no engine counts under [`OTHER_ADAPTERS`].
    pub fn engine_dropped(&self, engines: &[String], n: u64) {
        if n == 0 {
            return;
        }
        let mut m = self.engine_drops.lock().unwrap();
        let fallback = [OTHER_ADAPTERS.to_string()];
        let names = if engines.is_empty() {
            &fallback[..]
        } else {
            engines
        };
        for e in names {
            let key = if m.contains_key(e) || m.len() < ENGINE_DROPS_KEPT {
                e.clone()
            } else {
                OTHER_ADAPTERS.to_string()
            };
            let v = m.entry(key).or_default();
            *v = v.saturating_add(n);
        }
    }

    /// Per engine, events of this run that never reached the spool; every
    /// engine in `advertised` is listed, with 0 when it lost nothing.
    pub fn engine_drops(&self, advertised: &[String]) -> BTreeMap<String, u64> {
        let mut m = self.engine_drops.lock().unwrap().clone();
        for e in advertised {
            m.entry(e.clone()).or_default();
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts<'a>(drops: &'a BTreeMap<String, u64>) -> LossCounts<'a> {
        LossCounts {
            buffer_id: "0123456789abcdef0123456789abcdef",
            runtime_id: "f625420dfcfe42f8997b1cb9d728209f:7698",
            evicted: 5,
            undeliverable: 2,
            engine_drops: drops,
        }
    }

    #[test]
    fn the_counters_map_onto_the_brains_fields() {
        let drops: BTreeMap<String, u64> = [("celery".to_string(), 3), ("rq".to_string(), 0)]
            .into_iter()
            .collect();
        let loss = TelemetryLoss::build(&counts(&drops));
        assert_eq!(loss.check(), Ok(()));
        let text = String::from_utf8(crate::protocol::canonical::to_vec(&loss.to_value()).unwrap())
            .unwrap();
        assert_eq!(
            text,
            r#"{"adapter_events":{"celery":3,"rq":0},"buffer_id":"0123456789abcdef0123456789abcdef","capacity_evicted_frames":5,"command_results":0,"content_rejected_frames":2,"event_records":7,"other_frames":0,"runtime_id":"f625420dfcfe42f8997b1cb9d728209f:7698","unclassified_frames":0}"#
        );
    }

    #[test]
    fn every_count_is_clamped_to_the_brains_bound() {
        let drops: BTreeMap<String, u64> = [("celery".to_string(), u64::MAX)].into_iter().collect();
        let loss = TelemetryLoss::build(&LossCounts {
            evicted: u64::MAX,
            undeliverable: LOSS_COUNT_MAX,
            ..counts(&drops)
        });
        assert_eq!(loss.capacity_evicted_frames, LOSS_COUNT_MAX);
        assert_eq!(loss.content_rejected_frames, LOSS_COUNT_MAX);
        assert_eq!(loss.event_records, LOSS_COUNT_MAX);
        assert_eq!(loss.adapter_events["celery"], LOSS_COUNT_MAX);
        assert_eq!(loss.check(), Ok(()));
    }

    #[test]
    fn engines_past_the_bound_or_with_bad_names_are_summed_not_lost() {
        let mut drops: BTreeMap<String, u64> =
            (0..40).map(|i| (format!("engine{i:02}"), 1)).collect();
        drops.insert("x".repeat(65), 10);
        drops.insert(String::new(), 100);
        let loss = TelemetryLoss::build(&counts(&drops));
        assert_eq!(loss.check(), Ok(()));
        assert_eq!(loss.adapter_events.len(), LOSS_ADAPTERS_MAX);
        let total: u64 = loss.adapter_events.values().sum();
        assert_eq!(total, 40 + 10 + 100);
        assert_eq!(
            loss.adapter_events[OTHER_ADAPTERS],
            (40 - (LOSS_ADAPTERS_MAX as u64 - 1)) + 10 + 100
        );
        // Exactly 32 valid engines fit without folding.
        let drops: BTreeMap<String, u64> = (0..32).map(|i| (format!("e{i:02}"), 1)).collect();
        let loss = TelemetryLoss::build(&counts(&drops));
        assert_eq!(loss.adapter_events.len(), 32);
        assert!(!loss.adapter_events.contains_key(OTHER_ADAPTERS));
        // A 64-character name is the longest allowed; multibyte counts as one.
        let long = "é".repeat(64);
        let drops: BTreeMap<String, u64> = [(long.clone(), 1)].into_iter().collect();
        assert!(TelemetryLoss::build(&counts(&drops))
            .adapter_events
            .contains_key(&long));
    }

    #[test]
    fn the_check_names_what_the_brain_would_refuse() {
        let none = BTreeMap::new();
        let good = TelemetryLoss::build(&counts(&none));
        let bad = |f: fn(&mut TelemetryLoss)| {
            let mut l = good.clone();
            f(&mut l);
            l.check().unwrap_err()
        };
        assert!(bad(|l| l.buffer_id.clear()).contains("buffer_id"));
        assert!(bad(|l| l.runtime_id = "r".repeat(65)).contains("runtime_id"));
        assert!(bad(|l| l.event_records = LOSS_COUNT_MAX + 1).contains("event_records"));
        assert!(bad(|l| {
            l.adapter_events = (0..33).map(|i| (format!("e{i}"), 0)).collect();
        })
        .contains("33 entries"));
        assert!(bad(|l| {
            l.adapter_events.insert(String::new(), 0);
        })
        .contains("adapter_events name"));
        assert!(bad(|l| {
            l.adapter_events.insert("e".into(), LOSS_COUNT_MAX + 1);
        })
        .contains("adapter_events[e]"));
        let mut no_id = good.clone();
        no_id.buffer_id.clear();
        assert_eq!(no_id.to_value_checked(), Value::Null);
    }

    #[test]
    fn the_runtime_id_is_new_per_run_and_fits() {
        let a = new_runtime_id();
        let b = new_runtime_id();
        assert_ne!(a, b);
        assert!(name_fits(&a), "{a}");
        assert!(a.ends_with(&format!(":{}", std::process::id())));
        assert_eq!(a.split(':').next().unwrap().len(), 32);
    }

    #[test]
    fn drops_are_counted_per_declared_engine_and_bounded() {
        let t = Telemetry::default();
        t.engine_dropped(&["celery".into()], 3);
        t.engine_dropped(&["celery".into(), "rq".into()], 2);
        t.engine_dropped(&[], 1);
        t.engine_dropped(&["celery".into()], 0);
        let m = t.engine_drops(&["huey".into()]);
        assert_eq!(m["celery"], 5);
        assert_eq!(m["rq"], 2);
        assert_eq!(m[OTHER_ADAPTERS], 1);
        assert_eq!(m["huey"], 0);
        for i in 0..1000 {
            t.engine_dropped(&[format!("e{i}")], 1);
        }
        let m = t.engine_drops(&[]);
        assert_eq!(m.len(), ENGINE_DROPS_KEPT);
        assert_eq!(m.values().sum::<u64>(), 5 + 2 + 1 + 1000);
    }

    #[test]
    fn streaks_count_by_the_brains_classes_and_are_clamped() {
        let mut s = FailureStreaks::default();
        s.record("auth");
        s.record("incompatible");
        s.record("protocol");
        s.record("connection");
        s.record("connection");
        assert_eq!(
            s,
            FailureStreaks {
                auth: 1,
                protocol: 2,
                connection: 2
            }
        );
        s.connection = u64::MAX;
        let mut v = Value::empty_map();
        s.insert_into(&mut v);
        assert_eq!(
            v.get("connection_failure_streak").and_then(Value::as_u64),
            Some(STREAK_MAX)
        );
    }
}
