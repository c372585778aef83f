//! What an operator can see of a running daemon: counters, the uplink's
//! state, and the connected local clients.
//!
//! One [`Stats`] is created by the daemon and shared (`Arc`) by ingest and
//! the uplink; nothing here is global. Every refused or dropped event is
//! counted here (or in the spool's own counters, which [`Stats::report`]
//! merges), so the `stats` reply, the heartbeat and the logs agree.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;

use crate::protocol::Value;
use crate::spool::SpoolStats;

/// The uplink's connection state, as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkState {
    /// Dialling the brain.
    Connecting,
    /// `hello` sent, waiting for `hello_ack`.
    Handshaking,
    /// Session established; events flow.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
    /// Shutting down.
    Stopped,
}

impl UplinkState {
    /// Lowercase label.
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkState::Connecting => "connecting",
            UplinkState::Handshaking => "handshaking",
            UplinkState::Connected => "connected",
            UplinkState::Backoff => "backoff",
            UplinkState::Stopped => "stopped",
        }
    }
}

/// Details of the uplink for `stats`/`status`.
#[derive(Debug, Clone)]
pub struct UplinkStatus {
    /// Current state.
    pub state: UplinkState,
    /// When it entered that state.
    pub since: OffsetDateTime,
    /// The last error, already free of secrets.
    pub last_error: Option<String>,
    /// Backoff class of the last failure (`connection`, `protocol`, `auth`, `incompatible`).
    pub last_failure_class: Option<&'static str>,
    /// Failures of that class in a row, without a stable session between
    /// them (the backoff grows with it).
    pub failure_streak: u32,
    /// Brain clock minus ours at the last handshake, in seconds.
    pub clock_skew_seconds: Option<f64>,
    /// Current session id.
    pub session_id: Option<String>,
    /// When the last `event_batch_ack` arrived.
    pub last_ack_at: Option<OffsetDateTime>,
    /// When the current session was established (None when not connected).
    pub connected_at: Option<OffsetDateTime>,
    /// Since when there has been no session (None while connected): the
    /// start of the outage, unlike `since`, which moves on every retry.
    pub disconnected_since: Option<OffsetDateTime>,
    /// `agent_id` from the last `hello_ack`.
    pub agent_id: Option<String>,
    /// `project_id` from the last `hello_ack`.
    pub project_id: Option<String>,
    /// `brain_version` from the last `hello_ack`.
    pub brain_version: Option<String>,
    /// What the last `hello` advertised.
    pub advertised: Advertisement,
}

/// What the daemon's `hello` tells the brain: the union of what connected
/// clients declared, plus what is configured statically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Engines, sorted.
    pub engines: Vec<String>,
    /// Engine -> actions, sorted.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Runtime features, sorted.
    pub runtime_features: Vec<String>,
}

/// Never advertised: it asks the brain for the external scheduler protocol,
/// which this daemon does not implement.
pub const NEVER_ADVERTISED_FEATURES: &[&str] = &["external_schedule_protocol_v1"];

impl Advertisement {
    /// The `hello` payload fields.
    pub fn engines_value(&self) -> Value {
        Value::Array(
            self.engines
                .iter()
                .map(|e| Value::from(e.as_str()))
                .collect(),
        )
    }

    /// `capabilities` as a map of lists.
    pub fn capabilities_value(&self) -> Value {
        let mut m = Value::empty_map();
        for (engine, actions) in &self.capabilities {
            m.insert(
                engine,
                Value::Array(actions.iter().map(|a| Value::from(a.as_str())).collect()),
            );
        }
        m
    }

    /// `runtime_features` as a list.
    pub fn runtime_features_value(&self) -> Value {
        Value::Array(
            self.runtime_features
                .iter()
                .map(|e| Value::from(e.as_str()))
                .collect(),
        )
    }
}

/// Where this daemon runs and what it talks to; fixed at start, the brain
/// settings refreshed on reload.
#[derive(Debug, Clone, Default)]
pub struct DaemonInfo {
    /// The brain's base URL.
    pub brain_url: String,
    /// This daemon's worker slot at the brain.
    pub worker_id: String,
    /// The host label shown in the brain.
    pub agent_name: String,
    /// Engines configured statically (`Z4J_ENGINES`).
    pub static_engines: Vec<String>,
    /// Actions per engine configured statically (`Z4J_CAPABILITIES`).
    pub static_capabilities: BTreeMap<String, Vec<String>>,
    /// The spool file.
    pub spool_path: String,
    /// The local socket.
    pub socket_path: String,
}

/// Events per second over the sampling window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Seconds the rates cover (up to [`RATE_WINDOW`]).
    pub window_seconds: f64,
    /// Events received from local clients.
    pub ingest: f64,
    /// Events put on the wire for the first time.
    pub forward: f64,
    /// Events the brain acknowledged.
    pub acked: f64,
}

/// The window over which `status` reports rates.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    received: u64,
    forwarded: u64,
    acked: u64,
}

/// Upper bounds (seconds) of the ack latency histogram: from a local
/// brain's milliseconds to a loaded SQLite brain's tens of seconds.
pub const ACK_LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// One connected local client.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// Peer pid from SO_PEERCRED.
    pub pid: Option<i32>,
    /// Peer uid from SO_PEERCRED.
    pub uid: u32,
    /// Peer gid from SO_PEERCRED.
    pub gid: u32,
    /// Process name from `hello`.
    pub process: Option<String>,
    /// Framework from `hello`.
    pub framework: Option<String>,
    /// Engines from `hello`.
    pub engines: Vec<String>,
    /// Engine -> actions from `hello` (`capabilities`).
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// `runtime_features` from `hello`.
    pub runtime_features: Vec<String>,
    /// Worker role from `hello`.
    pub worker_role: Option<String>,
    /// Framing: "msgpack" or "jsonl".
    pub framing: &'static str,
    /// Events received from this client.
    pub events_received: u64,
}

/// Shared daemon status.
pub struct Stats {
    /// Process start.
    pub started: Instant,
    /// Events decoded from clients (valid or not).
    pub events_received: AtomicU64,
    /// Events put into frames for the first time.
    pub events_forwarded: AtomicU64,
    /// Events re-sent (ack timeout or reconnect).
    pub events_resent: AtomicU64,
    /// Events the brain can never take (larger than its frame size).
    pub events_undeliverable: AtomicU64,
    /// Events the brain acknowledged but did not store, in frames whose
    /// events all went to it for the first time: the same task, kind and
    /// second as an event it has (its deduplication), or events it could
    /// not ingest (its log says which).
    pub events_rejected_by_brain: AtomicU64,
    /// When the last "the brain did not store" warning was logged.
    brain_rejected_warned: Mutex<Option<Instant>>,
    /// Events the brain did not store again in re-sent frames: expected
    /// duplicates of events it stored from an earlier copy.
    pub events_duplicate_at_brain: AtomicU64,
    /// Events whose `occurred_at` was outside the brain's window and was
    /// replaced by the receive time at ingest.
    pub events_time_corrected: AtomicU64,
    /// When the last "time corrected" warning was logged.
    time_corrected_warned: Mutex<Option<Instant>>,
    /// Replies not written because a client did not read them.
    pub replies_dropped: AtomicU64,
    /// Connections to the brain established.
    pub connects: AtomicU64,
    /// Times a producer was held back because the spool was full (`block`).
    pub producer_waits: AtomicU64,
    /// Times a connection was not read because the daemon-wide budget of
    /// buffered message bytes was taken (see `ingest::budget`).
    pub message_budget_waits: AtomicU64,
    /// Failed `accept` calls on the local socket (mostly: out of file
    /// descriptors); each is retried after a short pause.
    pub accept_failures: AtomicU64,
    /// HTTP connections open on the metrics listener now.
    pub metrics_connections: AtomicU64,
    /// Metrics listener connections closed at accept because
    /// [`crate::metrics::MAX_CONNECTIONS`] were open.
    pub metrics_refused_limit: AtomicU64,
    /// Metrics listener connections closed for sending no complete request
    /// head in time, or for outliving their lifetime in the middle of one.
    pub metrics_refused_timeout: AtomicU64,
    /// Metrics listener requests refused for a request head over the bound.
    pub metrics_refused_too_large: AtomicU64,
    /// Commands received from the brain (re-deliveries not counted).
    pub commands_received: AtomicU64,
    /// Commands answered `success` by a local process.
    pub commands_succeeded: AtomicU64,
    /// Commands answered `failed` (by a process, or by the daemon when none could run it).
    pub commands_failed: AtomicU64,
    /// Signalled when the set of connected clients or their engines changes.
    pub clients_changed: tokio::sync::Notify,
    /// Seconds from sending an `event_batch` to its `event_batch_ack`.
    pub ack_latency: Histogram,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    uplink: Mutex<UplinkStatus>,
    clients: Mutex<BTreeMap<u64, ClientInfo>>,
    info: Mutex<DaemonInfo>,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    /// A fresh status.
    pub fn new() -> Self {
        Stats {
            started: Instant::now(),
            events_received: AtomicU64::new(0),
            events_forwarded: AtomicU64::new(0),
            events_resent: AtomicU64::new(0),
            events_undeliverable: AtomicU64::new(0),
            events_rejected_by_brain: AtomicU64::new(0),
            brain_rejected_warned: Mutex::new(None),
            events_duplicate_at_brain: AtomicU64::new(0),
            events_time_corrected: AtomicU64::new(0),
            time_corrected_warned: Mutex::new(None),
            replies_dropped: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            producer_waits: AtomicU64::new(0),
            message_budget_waits: AtomicU64::new(0),
            accept_failures: AtomicU64::new(0),
            metrics_connections: AtomicU64::new(0),
            metrics_refused_limit: AtomicU64::new(0),
            metrics_refused_timeout: AtomicU64::new(0),
            metrics_refused_too_large: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_succeeded: AtomicU64::new(0),
            commands_failed: AtomicU64::new(0),
            clients_changed: tokio::sync::Notify::new(),
            ack_latency: Histogram::new(ACK_LATENCY_BUCKETS),
            refused: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            uplink: Mutex::new(UplinkStatus {
                state: UplinkState::Connecting,
                since: OffsetDateTime::now_utc(),
                last_error: None,
                last_failure_class: None,
                failure_streak: 0,
                clock_skew_seconds: None,
                session_id: None,
                last_ack_at: None,
                connected_at: None,
                disconnected_since: Some(OffsetDateTime::now_utc()),
                agent_id: None,
                project_id: None,
                brain_version: None,
                advertised: Advertisement::default(),
            }),
            clients: Mutex::new(BTreeMap::new()),
            info: Mutex::new(DaemonInfo::default()),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Sets what this daemon is and talks to.
    pub fn set_info(&self, info: DaemonInfo) {
        *self.info.lock().unwrap() = info;
    }

    /// Updates what this daemon is and talks to.
    pub fn update_info(&self, f: impl FnOnce(&mut DaemonInfo)) {
        f(&mut self.info.lock().unwrap());
    }

    /// A copy of what this daemon is and talks to.
    pub fn info(&self) -> DaemonInfo {
        self.info.lock().unwrap().clone()
    }

    /// Metrics listener connections the daemon closed itself, by reason:
    /// `limit`, `timeout`, `too_large` (always all three).
    pub fn metrics_refused(&self) -> [(&'static str, u64); 3] {
        [
            ("limit", self.metrics_refused_limit.load(Ordering::Relaxed)),
            (
                "timeout",
                self.metrics_refused_timeout.load(Ordering::Relaxed),
            ),
            (
                "too_large",
                self.metrics_refused_too_large.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Counts a command from the brain.
    pub fn command_received(&self) {
        self.commands_received.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a command's answer.
    pub fn command_finished(&self, success: bool) {
        if success {
            self.commands_succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            self.commands_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed connection attempt or session under its backoff class.
    pub fn record_failure(&self, class: &'static str) {
        *self.failures.lock().unwrap().entry(class).or_default() += 1;
    }

    /// Counts `n` events the brain acknowledged without storing them on
    /// their first delivery, with a warning at most once a minute.
    pub fn brain_rejected(&self, n: u64, frame_id: &str, events: usize) {
        let total = self
            .events_rejected_by_brain
            .fetch_add(n, Ordering::Relaxed)
            + n;
        let mut warned = self.brain_rejected_warned.lock().unwrap();
        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                frame_id,
                events,
                rejected = n,
                total,
                "the brain acknowledged a frame but did not store some of its events, sent to it for the first time: it keeps one event per task, kind and second (a process that reports the same step twice), and drops events it cannot ingest (its log says \"per-event ingest failed\"); counted in brain_rejected"
            );
        }
    }

    /// Counts `n` events whose `occurred_at` was replaced at ingest, with a
    /// warning at most once a minute.
    pub fn time_corrected(&self, n: u64) {
        let total = self.events_time_corrected.fetch_add(n, Ordering::Relaxed) + n;
        let mut warned = self.time_corrected_warned.lock().unwrap();
        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                events = n,
                total,
                "events carried an occurred_at more than 30 s ahead of this host's clock or more than 365 days behind it; they are stored at the time the daemon received them, with the client's time in data.occurred_at_original (the brain would otherwise put its own clock there at each delivery and store a re-sent event twice); check the clock of the process that sent them"
            );
        }
    }

    /// Every event lost after it was accepted: evicted or refused for room,
    /// larger than the brain's frame limit, or dropped by the brain.
    pub fn dropped_total(&self, spool: &SpoolStats) -> u64 {
        spool.dropped_oldest_total.load(Ordering::Relaxed)
            + spool.refused_full_total.load(Ordering::Relaxed)
            + self.events_undeliverable.load(Ordering::Relaxed)
    }

    /// Failed connection attempts and sessions by backoff class.
    pub fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.failures.lock().unwrap().clone()
    }

    /// Records the counters now, for [`Stats::rates`]; call about once a second.
    pub fn sample(&self, spool: &SpoolStats) {
        self.sample_at(Instant::now(), spool.acked_total.load(Ordering::Relaxed));
    }

    fn sample_at(&self, at: Instant, acked: u64) {
        let s = Sample {
            at,
            received: self.events_received.load(Ordering::Relaxed),
            forwarded: self.events_forwarded.load(Ordering::Relaxed),
            acked,
        };
        let mut q = self.samples.lock().unwrap();
        q.push_back(s);
        while q.len() > 2
            && q.front()
                .is_some_and(|f| at.duration_since(f.at) > RATE_WINDOW)
        {
            q.pop_front();
        }
    }

    /// Events per second over the last [`RATE_WINDOW`] (or since start).
    pub fn rates(&self) -> Rates {
        let q = self.samples.lock().unwrap();
        let (Some(first), Some(last)) = (q.front(), q.back()) else {
            return Rates::default();
        };
        let secs = last.at.duration_since(first.at).as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        Rates {
            window_seconds: secs,
            ingest: per(first.received, last.received),
            forward: per(first.forwarded, last.forwarded),
            acked: per(first.acked, last.acked),
        }
    }

    /// Counts `n` refused events (or messages) under `reason`.
    pub fn refuse(&self, reason: crate::refusal::RefusalCode, n: u64) {
        *self
            .refused
            .lock()
            .unwrap()
            .entry(reason.as_str())
            .or_default() += n;
    }

    /// Refusals by reason.
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().unwrap().clone()
    }

    /// Total refusals.
    pub fn refused_total(&self) -> u64 {
        self.refused.lock().unwrap().values().sum()
    }

    /// Sets the uplink state (and when it changed).
    pub fn set_uplink_state(&self, state: UplinkState) {
        let mut u = self.uplink.lock().unwrap();
        if u.state != state {
            let now = OffsetDateTime::now_utc();
            u.state = state;
            u.since = now;
            if state == UplinkState::Connected {
                u.disconnected_since = None;
            } else if u.disconnected_since.is_none() {
                u.disconnected_since = Some(now);
            }
        }
    }

    /// Updates the uplink details.
    pub fn update_uplink(&self, f: impl FnOnce(&mut UplinkStatus)) {
        f(&mut self.uplink.lock().unwrap());
    }

    /// A copy of the uplink details.
    pub fn uplink(&self) -> UplinkStatus {
        self.uplink.lock().unwrap().clone()
    }

    /// Registers a new local connection.
    pub fn client_connected(&self, id: u64, info: ClientInfo) {
        self.clients.lock().unwrap().insert(id, info);
    }

    /// Updates a local connection's details.
    pub fn update_client(&self, id: u64, f: impl FnOnce(&mut ClientInfo)) {
        if let Some(c) = self.clients.lock().unwrap().get_mut(&id) {
            f(c);
        }
    }

    /// Forgets a local connection.
    pub fn client_disconnected(&self, id: u64) {
        let had_engines = self.clients.lock().unwrap().remove(&id).is_some_and(|c| {
            !c.engines.is_empty() || !c.capabilities.is_empty() || !c.runtime_features.is_empty()
        });
        if had_engines {
            self.clients_changed.notify_one();
        }
    }

    /// Connected clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.clients.lock().unwrap().values().cloned().collect()
    }

    /// What the `hello` must advertise now: the union over connected clients
    /// plus the static configuration.
    pub fn advertisement(
        &self,
        static_engines: &[String],
        static_capabilities: &BTreeMap<String, Vec<String>>,
    ) -> Advertisement {
        let clients = self.clients.lock().unwrap();
        let mut engines: Vec<String> = static_engines.to_vec();
        let mut caps: BTreeMap<String, Vec<String>> = static_capabilities.clone();
        let mut features: Vec<String> = Vec::new();
        for c in clients.values() {
            engines.extend(c.engines.iter().cloned());
            for (engine, actions) in &c.capabilities {
                caps.entry(engine.clone())
                    .or_default()
                    .extend(actions.iter().cloned());
            }
            features.extend(c.runtime_features.iter().cloned());
        }
        engines.extend(caps.keys().cloned());
        engines.sort();
        engines.dedup();
        for actions in caps.values_mut() {
            actions.sort();
            actions.dedup();
        }
        features.retain(|f| !NEVER_ADVERTISED_FEATURES.contains(&f.as_str()));
        features.sort();
        features.dedup();
        Advertisement {
            engines,
            capabilities: caps,
            runtime_features: features,
        }
    }

    /// The `stats` reply: one map an operator, `z4j-agentd status` or a test
    /// can read. Keys are documented in `docs/local-protocol.md`.
    pub fn report(&self, spool: &SpoolStats) -> Value {
        let u = self.uplink();
        let info = self.info();
        let now = OffsetDateTime::now_utc();
        let opt_str = |v: Option<String>| v.map(Value::from).unwrap_or(Value::Null);
        let opt_ts = |v: Option<OffsetDateTime>| {
            v.map(|t| Value::from(crate::protocol::format_ts(t)))
                .unwrap_or(Value::Null)
        };
        let opt_age = |v: Option<OffsetDateTime>| {
            v.map(|t| Value::from(round3((now - t).as_seconds_f64().max(0.0))))
                .unwrap_or(Value::Null)
        };
        let counts = |m: BTreeMap<&'static str, u64>| {
            let mut out = Value::empty_map();
            for (k, v) in m {
                out.insert(k, v);
            }
            out
        };
        let dropped_oldest = spool.dropped_oldest_total.load(Ordering::Relaxed);
        let refused_full = spool.refused_full_total.load(Ordering::Relaxed);
        let undeliverable = self.events_undeliverable.load(Ordering::Relaxed);
        let mut m = Value::empty_map();
        m.insert("type", "stats");
        m.insert("version", env!("CARGO_PKG_VERSION"));
        m.insert("pid", std::process::id() as u64);
        m.insert("uptime_seconds", self.started.elapsed().as_secs());
        m.insert("brain_url", info.brain_url.as_str());
        m.insert("worker_id", info.worker_id.as_str());
        m.insert("agent_name", info.agent_name.as_str());
        m.insert("spool_path", info.spool_path.as_str());
        m.insert("socket_path", info.socket_path.as_str());
        m.insert("spool_depth", spool.depth.load(Ordering::Relaxed));
        m.insert("spool_bytes", spool.bytes.load(Ordering::Relaxed));
        m.insert(
            "spool_oldest_age_seconds",
            spool
                .oldest_age_seconds()
                .map(|a| Value::from(round3(a)))
                .unwrap_or(Value::Null),
        );
        m.insert("received", self.events_received.load(Ordering::Relaxed));
        m.insert("stored", spool.stored_total.load(Ordering::Relaxed));
        m.insert("forwarded", self.events_forwarded.load(Ordering::Relaxed));
        m.insert("resent", self.events_resent.load(Ordering::Relaxed));
        m.insert(
            "brain_rejected",
            self.events_rejected_by_brain.load(Ordering::Relaxed),
        );
        m.insert(
            "brain_duplicates",
            self.events_duplicate_at_brain.load(Ordering::Relaxed),
        );
        m.insert(
            "time_corrected",
            self.events_time_corrected.load(Ordering::Relaxed),
        );
        m.insert("acked", spool.acked_total.load(Ordering::Relaxed));
        m.insert("dropped", self.dropped_total(spool));
        m.insert("dropped_oldest", dropped_oldest);
        let mut dropped_by_reason = Value::empty_map();
        dropped_by_reason.insert("oldest_evicted", dropped_oldest);
        dropped_by_reason.insert("spool_full", refused_full);
        dropped_by_reason.insert("undeliverable", undeliverable);
        m.insert("dropped_by_reason", dropped_by_reason);
        m.insert("refused", self.refused_total());
        m.insert("refused_by_reason", counts(self.refused()));
        m.insert(
            "replies_dropped",
            self.replies_dropped.load(Ordering::Relaxed),
        );
        let rates = self.rates();
        let mut r = Value::empty_map();
        r.insert("window_seconds", round3(rates.window_seconds));
        r.insert("ingest_per_second", round3(rates.ingest));
        r.insert("forward_per_second", round3(rates.forward));
        r.insert("acked_per_second", round3(rates.acked));
        m.insert("rates", r);
        m.insert("uplink_state", u.state.as_str());
        m.insert("uplink_since", crate::protocol::format_ts(u.since));
        m.insert("disconnected_since", opt_ts(u.disconnected_since));
        m.insert("session_id", opt_str(u.session_id));
        m.insert("session_started_at", opt_ts(u.connected_at));
        m.insert("session_age_seconds", opt_age(u.connected_at));
        m.insert("last_ack_at", opt_ts(u.last_ack_at));
        m.insert("last_ack_age_seconds", opt_age(u.last_ack_at));
        m.insert("agent_id", opt_str(u.agent_id));
        m.insert("project_id", opt_str(u.project_id));
        m.insert("brain_version", opt_str(u.brain_version));
        m.insert("last_error", opt_str(u.last_error));
        m.insert(
            "last_failure_class",
            u.last_failure_class.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("failures_by_class", counts(self.failures()));
        m.insert("failure_streak", u.failure_streak as u64);
        m.insert(
            "clock_skew_seconds",
            u.clock_skew_seconds.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("connects", self.connects.load(Ordering::Relaxed));
        m.insert(
            "producer_waits",
            self.producer_waits.load(Ordering::Relaxed),
        );
        m.insert(
            "metrics_connections",
            self.metrics_connections.load(Ordering::Relaxed),
        );
        let mut metrics_refused = Value::empty_map();
        for (reason, n) in self.metrics_refused() {
            metrics_refused.insert(reason, n);
        }
        m.insert("metrics_refused_by_reason", metrics_refused);
        m.insert(
            "message_budget_waits",
            self.message_budget_waits.load(Ordering::Relaxed),
        );
        let mut cmds = Value::empty_map();
        cmds.insert("received", self.commands_received.load(Ordering::Relaxed));
        cmds.insert("succeeded", self.commands_succeeded.load(Ordering::Relaxed));
        cmds.insert("failed", self.commands_failed.load(Ordering::Relaxed));
        m.insert("commands", cmds);
        let clients = self.clients();
        m.insert("clients", clients.len() as u64);
        m.insert(
            "client_list",
            Value::Array(clients.iter().map(client_value).collect()),
        );
        // What the hello advertises once it catches up with the clients
        // (the re-handshake is debounced), and what it advertised last.
        let now = self.advertisement(&info.static_engines, &info.static_capabilities);
        m.insert("engines", now.engines_value());
        m.insert("capabilities", now.capabilities_value());
        m.insert("runtime_features", now.runtime_features_value());
        m.insert("advertised_engines", u.advertised.engines_value());
        m.insert("advertised_capabilities", u.advertised.capabilities_value());
        m.insert(
            "advertised_runtime_features",
            u.advertised.runtime_features_value(),
        );
        m
    }
}

fn client_value(c: &ClientInfo) -> Value {
    let mut v = Value::empty_map();
    v.insert(
        "pid",
        c.pid.map(|p| Value::from(p as i64)).unwrap_or(Value::Null),
    );
    v.insert("uid", c.uid as u64);
    v.insert("gid", c.gid as u64);
    v.insert(
        "process",
        c.process.clone().map(Value::from).unwrap_or(Value::Null),
    );
    v.insert(
        "framework",
        c.framework.clone().map(Value::from).unwrap_or(Value::Null),
    );
    v.insert(
        "engines",
        Value::Array(c.engines.iter().map(|e| Value::from(e.as_str())).collect()),
    );
    let mut caps = Value::empty_map();
    for (engine, actions) in &c.capabilities {
        caps.insert(
            engine,
            Value::Array(actions.iter().map(|a| Value::from(a.as_str())).collect()),
        );
    }
    v.insert("capabilities", caps);
    v.insert(
        "worker_role",
        c.worker_role
            .clone()
            .map(Value::from)
            .unwrap_or(Value::Null),
    );
    v.insert("framing", c.framing);
    v.insert("events_received", c.events_received);
    v
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_window_and_forget_older_samples() {
        let s = Stats::new();
        let t0 = Instant::now();
        s.sample_at(t0, 0);
        s.events_received.store(100, Ordering::Relaxed);
        s.events_forwarded.store(50, Ordering::Relaxed);
        s.sample_at(t0 + Duration::from_secs(10), 40);
        let r = s.rates();
        assert_eq!(r.window_seconds, 10.0);
        assert_eq!((r.ingest, r.forward, r.acked), (10.0, 5.0, 4.0));
        // 70 s later the first sample is out of the window.
        s.events_received.store(700, Ordering::Relaxed);
        s.sample_at(t0 + Duration::from_secs(70), 40);
        let r = s.rates();
        assert_eq!(r.window_seconds, 60.0);
        assert_eq!(r.ingest, 10.0);
        assert_eq!(r.acked, 0.0);
    }

    #[test]
    fn no_rates_before_two_samples() {
        let s = Stats::new();
        assert_eq!(s.rates(), Rates::default());
        s.sample_at(Instant::now(), 0);
        assert_eq!(s.rates(), Rates::default());
    }

    #[test]
    fn report_lists_clients_and_failures() {
        let s = Stats::new();
        s.client_connected(
            1,
            ClientInfo {
                pid: Some(42),
                uid: 1000,
                engines: vec!["celery".into()],
                framing: "jsonl",
                ..Default::default()
            },
        );
        s.record_failure("auth");
        s.record_failure("auth");
        s.update_info(|i| i.static_engines = vec!["rq".into()]);
        let r = s.report(&SpoolStats::default());
        assert_eq!(r.get("clients").and_then(Value::as_u64), Some(1));
        let list = r.get("client_list").unwrap();
        let Value::Array(items) = list else {
            panic!("client_list is a list")
        };
        assert_eq!(items[0].get("pid").and_then(Value::as_i64), Some(42));
        assert_eq!(
            r.get("failures_by_class")
                .and_then(|m| m.get("auth"))
                .and_then(Value::as_u64),
            Some(2)
        );
        let Some(Value::Array(engines)) = r.get("engines") else {
            panic!("engines is a list")
        };
        let engines: Vec<&str> = engines.iter().filter_map(Value::as_str).collect();
        assert_eq!(engines, ["celery", "rq"]);
        assert_eq!(r.get("spool_oldest_age_seconds"), Some(&Value::Null));
    }
}
