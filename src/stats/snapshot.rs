//! One reading of every counter: the [`Snapshot`] that the `stats` reply,
//! `z4j-agentd status`, `/metrics`, the heartbeat and the systemd status line
//! all render.
//!
//! Invariants:
//! * [`Stats::snapshot`] is the only place counters are read for a report,
//!   and values derived from others (`dropped`, `refused`, the advertisement)
//!   are computed there once, so no two readers can disagree.
//! * The `stats` reply is the serde form of the snapshot: field order is key
//!   order, names are the keys documented in `docs/local-protocol.md`, and
//!   rounding (three decimals for ages and rates, whole seconds for the
//!   uptime) happens only on the way out, so `/metrics` and the heartbeat
//!   still see the exact values.
//! * `z4j-agentd status` reads a reply back into the same type. Every field
//!   has a default and unknown keys are ignored, so a daemon of another
//!   version, which leaves keys out or adds some, still renders; what is
//!   optional for that reason (`rates`, `commands`) is an `Option`.
//! * Fields marked `serde(skip)` are read by `/metrics` only and are not
//!   part of the `stats` reply.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use super::{ClientHealth, HealthCounts, Rates, Stats, UplinkState, UplinkStatus};
use crate::clients::{ClientInfo, RememberedReport};
use crate::protocol::{format_ts, Value};
use crate::spool::SpoolStats;

/// The counters, the uplink's state and the connected clients, read once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// Always `"stats"` (the reply's `type`).
    #[serde(rename = "type")]
    pub tag: StatsTag,
    /// The daemon's version.
    pub version: String,
    /// The daemon's pid.
    pub pid: u64,
    /// Time since the daemon started (whole seconds in the reply).
    #[serde(
        rename = "uptime_seconds",
        serialize_with = "whole_seconds",
        deserialize_with = "seconds"
    )]
    pub uptime: Duration,
    /// The brain's base URL.
    pub brain_url: String,
    /// This daemon's worker slot at the brain.
    pub worker_id: String,
    /// The host label shown in the brain.
    pub agent_name: String,
    /// The spool file.
    pub spool_path: String,
    /// The local socket.
    pub socket_path: String,
    /// Events waiting in the spool.
    pub spool_depth: u64,
    /// Their bytes.
    pub spool_bytes: u64,
    /// Age of the oldest waiting event, if any.
    #[serde(serialize_with = "round3_opt")]
    pub spool_oldest_age_seconds: Option<f64>,
    /// Events decoded from clients.
    pub received: u64,
    /// Events committed to the spool.
    pub stored: u64,
    /// Events put on the wire for the first time.
    pub forwarded: u64,
    /// Events re-sent.
    pub resent: u64,
    /// Events the brain did not store on their first delivery.
    pub brain_rejected: u64,
    /// Events the brain did not store again in re-sent frames.
    pub brain_duplicates: u64,
    /// Events whose `occurred_at` was replaced at ingest.
    pub time_corrected: u64,
    /// Events the brain acknowledged.
    pub acked: u64,
    /// Every event lost after it was accepted: [`Dropped::total`].
    pub dropped: u64,
    /// Same as `dropped_by_reason.oldest_evicted` (an older key).
    pub dropped_oldest: u64,
    /// Lost events by reason.
    pub dropped_by_reason: Dropped,
    /// Refused events or messages, all codes together.
    pub refused: u64,
    /// Refusals by the error code the client received.
    pub refused_by_reason: BTreeMap<String, u64>,
    /// Replies not written because a client did not read them.
    pub replies_dropped: u64,
    /// Events per second (`None` only from a daemon that did not send them).
    pub rates: Option<Rates>,
    /// The uplink's state.
    pub uplink_state: UplinkState,
    /// When it entered that state.
    pub uplink_since: String,
    /// Start of the current outage (none while connected).
    pub disconnected_since: Option<String>,
    /// Current session id.
    pub session_id: Option<String>,
    /// When the current session was established.
    pub session_started_at: Option<String>,
    /// Its age.
    #[serde(serialize_with = "round3_opt")]
    pub session_age_seconds: Option<f64>,
    /// When the last `event_batch_ack` arrived.
    pub last_ack_at: Option<String>,
    /// How long ago.
    #[serde(serialize_with = "round3_opt")]
    pub last_ack_age_seconds: Option<f64>,
    /// `agent_id` from the last `hello_ack`.
    pub agent_id: Option<String>,
    /// `project_id` from the last `hello_ack`.
    pub project_id: Option<String>,
    /// `brain_version` from the last `hello_ack`.
    pub brain_version: Option<String>,
    /// The z4j contract line the last `hello` named as its `agent_version`
    /// (chosen from the brain's version; the daemon's own is `version`).
    pub contract_line: Option<String>,
    /// `Z4J_TRANSPORT`: `auto`, `ws` or `longpoll`.
    pub transport_setting: Option<String>,
    /// How the daemon reaches the brain now: `websocket` or `longpoll`.
    pub transport: Option<String>,
    /// Why `auto` runs on long-poll: what the WebSocket upgrade got.
    pub longpoll_reason: Option<String>,
    /// Times `auto` switched to long-poll.
    pub transport_fallbacks: u64,
    /// The last uplink error, free of secrets.
    pub last_error: Option<String>,
    /// Its backoff class.
    pub last_failure_class: Option<String>,
    /// Failed attempts and sessions by backoff class.
    pub failures_by_class: BTreeMap<String, u64>,
    /// Failures of the last class in a row.
    pub failure_streak: u64,
    /// Brain clock minus ours at the last handshake (not rounded).
    #[serde(serialize_with = "finite_opt")]
    pub clock_skew_seconds: Option<f64>,
    /// Sessions established with the brain.
    pub connects: u64,
    /// Handshakes said again at once with another contract line (not in
    /// `connects`).
    pub contract_rehellos: u64,
    /// Times a producer was held back for a full spool.
    pub producer_waits: u64,
    /// Connections open on the metrics listener.
    pub metrics_connections: u64,
    /// Metrics listener connections it closed itself, by reason.
    pub metrics_refused_by_reason: MetricsRefused,
    /// Times a connection waited for the daemon-wide message budget.
    pub message_budget_waits: u64,
    /// Commands from the brain by outcome (`None` only from a daemon that
    /// did not send them).
    pub commands: Option<Commands>,
    /// `purge_queue` commands passed on with `force`, without the
    /// confirm-token check.
    pub purges_forced: u64,
    /// Health reports by outcome and what heartbeats cut (`None` only from
    /// a daemon that did not send them).
    pub health: Option<HealthCounts>,
    /// The gateway for local z4j agents (`None` when it is off).
    pub gateway: Option<super::GatewayReport>,
    /// Local clients connected.
    pub clients: u64,
    /// Each of them.
    pub client_list: Vec<ClientReport>,
    /// Engines the `hello` advertises once it catches up with the clients.
    pub engines: Vec<String>,
    /// Actions per engine, likewise.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Runtime features, likewise.
    pub runtime_features: Vec<String>,
    /// Engines the last `hello` advertised.
    pub advertised_engines: Vec<String>,
    /// Actions per engine the last `hello` advertised.
    pub advertised_capabilities: BTreeMap<String, Vec<String>>,
    /// Runtime features the last `hello` advertised.
    pub advertised_runtime_features: Vec<String>,
    /// What is advertised only because it was advertised before the
    /// restart, and until when (none when nothing is).
    pub remembered: Option<RememberedReport>,
    /// What the `hello` leaves out to stay within the brain's limits (64
    /// engines, schedulers, runtime features, actions per engine); `None`
    /// when nothing is.
    pub advertisement_left_out: Option<crate::clients::LeftOut>,
    /// Failed `accept` calls on the local socket (`/metrics` only).
    #[serde(skip)]
    pub accept_failures: u64,
    /// The spool's WAL and its checkpoints.
    pub spool_checkpoint: CheckpointReport,
    /// Spool write transactions committed (`/metrics` only).
    #[serde(skip)]
    pub spool_commits: u64,
    /// Whether the spool's last write failed (`/metrics`, systemd status).
    #[serde(skip)]
    pub spool_write_failing: bool,
}

/// The spool's write-ahead log and who copies it into the database
/// (`stats.spool_checkpoint`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointReport {
    /// Bytes of log the last checkpoint found (0 once emptied).
    pub wal_bytes: u64,
    /// Passes of the checkpointer thread, off the commit path.
    pub passes: u64,
    /// How long the last of them took, in milliseconds.
    pub last_pass_ms: f64,
    /// Checkpoints the writer did between two transactions (a log that
    /// outgrew its bound under steady writes, or the checkpointer failing).
    pub by_writer: u64,
    /// Failures of the checkpointer since start.
    pub failures: u64,
    /// Whether commits checkpoint themselves now (the checkpointer fails).
    pub on_commit: bool,
    /// Why the checkpointer fails now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `type` of the `stats` reply: written as `"stats"`, any value read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsTag;

impl Serialize for StatsTag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("stats")
    }
}

impl<'de> Deserialize<'de> for StatsTag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| StatsTag)
    }
}

/// Events lost after they were accepted, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dropped {
    /// Evicted by `drop_oldest` to make room.
    pub oldest_evicted: u64,
    /// Refused by `drop_newest` for a full spool.
    pub spool_full: u64,
    /// Larger than the brain's frame limit.
    pub undeliverable: u64,
}

impl Dropped {
    /// All reasons together: what `dropped`, the heartbeat's
    /// `dropped_events` and the systemd status line report.
    pub fn total(&self) -> u64 {
        self.oldest_evicted + self.spool_full + self.undeliverable
    }

    /// `(reason, count)` in label order.
    pub fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("oldest_evicted", self.oldest_evicted),
            ("spool_full", self.spool_full),
            ("undeliverable", self.undeliverable),
        ]
    }
}

/// Metrics listener connections the listener closed itself, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsRefused {
    /// [`crate::metrics::MAX_CONNECTIONS`] were open.
    pub limit: u64,
    /// No whole request head in time.
    pub timeout: u64,
    /// A request head over the bound.
    pub too_large: u64,
}

impl MetricsRefused {
    /// `(reason, count)` in label order.
    pub fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("limit", self.limit),
            ("timeout", self.timeout),
            ("too_large", self.too_large),
        ]
    }
}

/// Commands from the brain by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Commands {
    /// Received (re-deliveries not counted).
    pub received: u64,
    /// Answered `success`.
    pub succeeded: u64,
    /// Answered `failed`, by a process or by the daemon.
    pub failed: u64,
}

/// One connected local client, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientReport {
    /// Peer pid, when the kernel told it.
    pub pid: Option<i64>,
    /// Peer uid.
    pub uid: u64,
    /// Peer gid.
    pub gid: u64,
    /// Process name from `hello`.
    pub process: Option<String>,
    /// Framework from `hello`.
    pub framework: Option<String>,
    /// Engines from `hello`.
    pub engines: Vec<String>,
    /// Actions per engine from `hello`.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Worker role from `hello`.
    pub worker_role: Option<String>,
    /// "msgpack" or "jsonl".
    pub framing: String,
    /// Events received from it.
    pub events_received: u64,
    /// Schedulers from `hello`.
    pub schedulers: Vec<String>,
    /// Its latest health report while fresh: its workers, queues and facts.
    pub health: Option<ClientHealth>,
}

impl From<&ClientInfo> for ClientReport {
    fn from(c: &ClientInfo) -> Self {
        ClientReport {
            pid: c.pid.map(i64::from),
            uid: u64::from(c.uid),
            gid: u64::from(c.gid),
            process: c.process.clone(),
            framework: c.framework.clone(),
            engines: c.engines.clone(),
            capabilities: c.capabilities.clone(),
            worker_role: c.worker_role.clone(),
            framing: c.framing.to_string(),
            events_received: c.events_received,
            schedulers: c.schedulers.clone(),
            health: c.health.as_ref().map(ClientHealth::from),
        }
    }
}

impl Stats {
    /// Reads every counter once, with the spool's, into one [`Snapshot`]:
    /// what `/metrics`, the heartbeat and the systemd status line render.
    /// The connected clients are only counted; [`Stats::report`] adds who
    /// they are, where the daemon runs and what it advertises, which only
    /// the `stats` reply shows (a copy of every client's details, under the
    /// registry's lock, is not worth making every second).
    pub fn snapshot(&self, spool: &SpoolStats) -> Snapshot {
        let now = OffsetDateTime::now_utc();
        let mut s = Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: u64::from(std::process::id()),
            uptime: self.started.elapsed(),
            ..Snapshot::default()
        };
        s.read_spool(spool);
        s.read_events(self);
        s.read_uplink(&self.uplink(), now);
        s.failures_by_class = owned(self.failures());
        s.read_local(self);
        s.clients = self.clients.len() as u64;
        s
    }

    /// [`Stats::snapshot`] with the clients, the daemon's whereabouts and
    /// its advertisement filled in: everything the `stats` reply shows.
    pub fn full_snapshot(&self, spool: &SpoolStats) -> Snapshot {
        let mut s = self.snapshot(spool);
        s.read_clients(self);
        s
    }

    /// The `stats` reply (see [`Snapshot`]).
    pub fn report(&self, spool: &SpoolStats) -> Value {
        self.full_snapshot(spool).to_value()
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn owned(m: BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn ts(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(format_ts)
}

fn age(t: Option<OffsetDateTime>, now: OffsetDateTime) -> Option<f64> {
    t.map(|t| (now - t).as_seconds_f64().max(0.0))
}

impl Snapshot {
    /// What the spool counts itself: depth, totals, losses for room.
    fn read_spool(&mut self, sp: &SpoolStats) {
        self.spool_depth = load(&sp.depth);
        self.spool_bytes = load(&sp.bytes);
        self.spool_oldest_age_seconds = sp.oldest_age_seconds();
        self.stored = load(&sp.stored_total);
        self.acked = load(&sp.acked_total);
        self.spool_commits = load(&sp.commits_total);
        self.spool_checkpoint = CheckpointReport {
            wal_bytes: load(&sp.wal_bytes),
            passes: load(&sp.checkpoints_total),
            last_pass_ms: load(&sp.checkpoint_last_us) as f64 / 1000.0,
            by_writer: load(&sp.writer_checkpoints_total),
            failures: load(&sp.checkpoint_failures_total),
            on_commit: sp.checkpoint_on_commit.load(Ordering::Relaxed),
            error: sp.checkpoint_error.lock().unwrap().clone(),
        };
        self.spool_write_failing = sp.write_failing.load(Ordering::Relaxed);
        self.dropped_by_reason.oldest_evicted = load(&sp.dropped_oldest_total);
        self.dropped_by_reason.spool_full = load(&sp.refused_full_total);
    }

    /// The events' way through ingest and the uplink; `dropped` and
    /// `refused` are summed here and nowhere else.
    fn read_events(&mut self, st: &Stats) {
        self.received = load(&st.events_received);
        self.forwarded = load(&st.events_forwarded);
        self.resent = load(&st.events_resent);
        self.brain_rejected = load(&st.events_rejected_by_brain);
        self.brain_duplicates = load(&st.events_duplicate_at_brain);
        self.time_corrected = load(&st.events_time_corrected);
        self.dropped_by_reason.undeliverable = load(&st.events_undeliverable);
        self.dropped = self.dropped_by_reason.total();
        self.dropped_oldest = self.dropped_by_reason.oldest_evicted;
        self.refused_by_reason = owned(st.refused());
        self.refused = self.refused_by_reason.values().sum();
        self.replies_dropped = load(&st.replies_dropped);
        self.rates = Some(st.rates());
    }

    /// The uplink's state and its last session, ages taken at `now`.
    fn read_uplink(&mut self, u: &UplinkStatus, now: OffsetDateTime) {
        self.uplink_state = u.state;
        self.uplink_since = format_ts(u.since);
        self.disconnected_since = ts(u.disconnected_since);
        self.session_id = u.session_id.clone();
        self.session_started_at = ts(u.connected_at);
        self.session_age_seconds = age(u.connected_at, now);
        self.last_ack_at = ts(u.last_ack_at);
        self.last_ack_age_seconds = age(u.last_ack_at, now);
        self.agent_id = u.agent_id.clone();
        self.project_id = u.project_id.clone();
        self.brain_version = u.brain_version.clone();
        self.contract_line = u.contract_line.clone();
        self.transport = u.transport.map(str::to_string);
        self.longpoll_reason = u.longpoll_reason.clone();
        self.last_error = u.last_error.clone();
        self.last_failure_class = u.last_failure_class.map(str::to_string);
        self.failure_streak = u64::from(u.failure_streak);
        self.clock_skew_seconds = u.clock_skew_seconds;
        self.advertised_engines = u.advertised.engines.clone();
        self.advertised_capabilities = u.advertised.capabilities.clone();
        self.advertised_runtime_features = u.advertised.runtime_features.clone();
    }

    /// The daemon's own waits, listeners and commands.
    fn read_local(&mut self, st: &Stats) {
        self.connects = load(&st.connects);
        self.contract_rehellos = load(&st.contract_rehellos);
        self.transport_fallbacks = load(&st.transport_fallbacks);
        self.producer_waits = load(&st.producer_waits);
        self.metrics_connections = load(&st.metrics_connections);
        self.gateway = st.gateway.report();
        self.metrics_refused_by_reason = MetricsRefused {
            limit: load(&st.metrics_refused_limit),
            timeout: load(&st.metrics_refused_timeout),
            too_large: load(&st.metrics_refused_too_large),
        };
        self.message_budget_waits = load(&st.message_budget_waits);
        self.accept_failures = load(&st.accept_failures);
        self.commands = Some(Commands {
            received: load(&st.commands_received),
            succeeded: load(&st.commands_succeeded),
            failed: load(&st.commands_failed),
        });
        self.purges_forced = load(&st.purges_forced);
        self.health = Some(st.health.counts());
    }

    /// Where the daemon runs, its clients, and what the `hello` advertises
    /// once it catches up with them (the re-handshake is debounced).
    fn read_clients(&mut self, st: &Stats) {
        let info = st.info();
        self.brain_url = info.brain_url;
        self.worker_id = info.worker_id;
        self.agent_name = info.agent_name;
        self.spool_path = info.spool_path;
        self.socket_path = info.socket_path;
        self.transport_setting =
            (!info.transport_setting.is_empty()).then(|| info.transport_setting.to_string());
        st.expire_health();
        self.health = Some(st.health.counts());
        let clients = st.clients.list();
        self.clients = clients.len() as u64;
        self.client_list = clients.iter().map(ClientReport::from).collect();
        let now = st
            .clients
            .advertisement(&info.static_engines, &info.static_capabilities);
        self.engines = now.engines;
        self.capabilities = now.capabilities;
        self.runtime_features = now.runtime_features;
        self.remembered = st.clients.remembered_report();
        let left = st.clients.left_out();
        self.advertisement_left_out = (left.count() > 0).then_some(left);
    }

    /// The `stats` reply as a [`Value`], keys in field order.
    ///
    /// Goes through MessagePack, which keeps the key order and tells
    /// integers from floats exactly as the reply's writers do; the only
    /// failure possible is a non-finite float, which the serializers of the
    /// float fields already turn into null.
    pub fn to_value(&self) -> Value {
        rmp_serde::to_vec_named(self)
            .map_err(|e| e.to_string())
            .and_then(|b| rmp_serde::from_slice(&b).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot render the stats reply");
                let mut m = Value::empty_map();
                m.insert("type", "stats");
                m.insert("error", format!("cannot render the stats reply: {e}"));
                m
            })
    }

    /// Reads a `stats` reply (of this daemon or of another version).
    ///
    /// Through serde_json, whose errors say what was found and what was
    /// expected (`invalid type: string "x", expected u64`).
    pub fn from_value(v: &Value) -> Result<Snapshot, String> {
        serde_json::to_value(v)
            .and_then(serde_json::from_value)
            .map_err(|e| e.to_string())
    }
}

/// Rounds to three decimals, as every age and rate in the reply is.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A float rounded to three decimals; null when not finite.
pub(crate) fn round3_f64<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    if x.is_finite() {
        s.serialize_f64(round3(*x))
    } else {
        s.serialize_none()
    }
}

fn round3_opt<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => round3_f64(x, s),
        None => s.serialize_none(),
    }
}

fn finite_opt<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) if x.is_finite() => s.serialize_f64(*x),
        _ => s.serialize_none(),
    }
}

fn whole_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs.max(0.0)).map_err(serde::de::Error::custom)
}
