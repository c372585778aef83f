//! The daemon's counters and states: what an operator can see of a running
//! daemon (the uplink's state, the connected local clients, every count).
//!
//! One [`Stats`] is created by the daemon and shared (`Arc`) by ingest and
//! the uplink; nothing here is global. Every refused or dropped event is
//! counted here or in the spool's own counters. Reports never read these
//! counters one by one: [`Stats::snapshot`] reads them all, with the
//! spool's, into one [`Snapshot`] (see `snapshot.rs`), which the `stats`
//! reply, `z4j-agentd status`, `/metrics`, the heartbeat and the systemd
//! status line render, so they agree.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;

use serde::{Deserialize, Serialize};

use crate::clients::{Advertisement, ClientRegistry};
use crate::spool::SpoolStats;

mod gateway;
mod health;
mod heartbeat;
mod snapshot;
mod telemetry;

pub use gateway::{GatewayCounters, GatewayReport};
pub use health::{ClientHealth, EngineReport, HealthCounters, HealthCounts, WorkerReport};
pub use heartbeat::{
    add_adapter_health, add_agent_identity, add_telemetry_loss, AGENT_STATUS_ENGINES_MAX,
    HEARTBEAT_COUNT_MAX,
};
pub use snapshot::{ClientReport, Commands, Dropped, MetricsRefused, Snapshot, StatsTag};
pub use telemetry::{
    FailureStreaks, LossCounts, Telemetry, TelemetryLoss, AGENT_STATUS_SCHEDULERS_MAX,
};

/// The uplink's connection state, as shown to operators (serde: the
/// [`UplinkState::as_str`] label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkState {
    /// Dialling the brain (where a daemon starts).
    #[default]
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
    /// The z4j contract line the last `hello` named in `agent_version`
    /// (see `uplink::contract`).
    pub contract_line: Option<String>,
    /// Failures in a row by the brain's classes before the current session
    /// (what `agent_status` reports; the count restarts at each session).
    pub streaks_before_session: FailureStreaks,
    /// How the daemon reaches (or tries to reach) the brain now:
    /// `websocket` or `longpoll`.
    pub transport: Option<&'static str>,
    /// Why `Z4J_TRANSPORT=auto` runs on long-poll: what the WebSocket
    /// upgrade got (None on the WebSocket).
    pub longpoll_reason: Option<String>,
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
    /// `Z4J_TRANSPORT`: `auto`, `ws` or `longpoll`.
    pub transport_setting: &'static str,
}

/// Events per second over the sampling window (rounded to three decimals
/// in the `stats` reply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rates {
    /// Seconds the rates cover (up to [`RATE_WINDOW`]).
    #[serde(serialize_with = "snapshot::round3_f64")]
    pub window_seconds: f64,
    /// Events received from local clients.
    #[serde(rename = "ingest_per_second", serialize_with = "snapshot::round3_f64")]
    pub ingest: f64,
    /// Events put on the wire for the first time.
    #[serde(rename = "forward_per_second", serialize_with = "snapshot::round3_f64")]
    pub forward: f64,
    /// Events the brain acknowledged.
    #[serde(rename = "acked_per_second", serialize_with = "snapshot::round3_f64")]
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

/// The daemon's counters, shared by ingest, the uplink and the reports.
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
    /// Handshakes said again at once because the brain's version called for
    /// another contract line (not counted in `connects`).
    /// Times `Z4J_TRANSPORT=auto` switched to long-poll because the path
    /// to the brain refused the WebSocket upgrade.
    pub transport_fallbacks: AtomicU64,
    pub contract_rehellos: AtomicU64,
    /// This run's id and per-engine losses, for the brain's `telemetry_loss`.
    pub telemetry: Telemetry,
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
    /// `purge_queue` commands passed on with `force`, without a token check.
    pub purges_forced: AtomicU64,
    /// Seconds from sending an `event_batch` to its `event_batch_ack`.
    pub ack_latency: Histogram,
    /// The connected local clients: what the router routes by and the
    /// reports list (one registry for both).
    pub clients: ClientRegistry,
    /// Health reports received, refused and expired, and what heartbeats cut.
    pub health: HealthCounters,
    /// The gateway's connections of local z4j agents.
    pub gateway: GatewayCounters,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    uplink: Mutex<UplinkStatus>,
    info: Mutex<DaemonInfo>,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    /// Fresh counters, the uplink connecting.
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
            contract_rehellos: AtomicU64::new(0),
            transport_fallbacks: AtomicU64::new(0),
            telemetry: Telemetry::default(),
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
            purges_forced: AtomicU64::new(0),
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
                contract_line: None,
                streaks_before_session: FailureStreaks::default(),
                transport: None,
                longpoll_reason: None,
            }),
            clients: ClientRegistry::new(),
            health: HealthCounters::default(),
            gateway: GatewayCounters::default(),
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

    /// Counts a `purge_queue` passed on with `force` (no token check).
    pub fn purge_forced(&self) {
        self.purges_forced.fetch_add(1, Ordering::Relaxed);
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
}

#[cfg(test)]
pub(crate) mod fixture;
#[cfg(test)]
mod tests;
