//! What an operator can see of a running daemon: counters, the uplink's
//! state, and the connected local clients.
//!
//! One [`Status`] is created by the daemon and shared (`Arc`) by ingest and
//! the uplink; nothing here is global. Every refused or dropped event is
//! counted here (or in the spool's own counters, which [`Status::report`]
//! merges), so the `stats` reply, the heartbeat and the logs agree.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

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
    /// Brain clock minus ours at the last handshake, in seconds.
    pub clock_skew_seconds: Option<f64>,
    /// Current session id.
    pub session_id: Option<String>,
    /// When the last `event_batch_ack` arrived.
    pub last_ack_at: Option<OffsetDateTime>,
}

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
    /// Worker role from `hello`.
    pub worker_role: Option<String>,
    /// Framing: "msgpack" or "jsonl".
    pub framing: &'static str,
    /// Events received from this client.
    pub events_received: u64,
}

/// Shared daemon status.
pub struct Status {
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
    /// Replies not written because a client did not read them.
    pub replies_dropped: AtomicU64,
    /// Connections to the brain established.
    pub connects: AtomicU64,
    /// Times a producer was held back because the spool was full (`block`).
    pub producer_waits: AtomicU64,
    /// Signalled when the set of connected clients or their engines changes.
    pub clients_changed: tokio::sync::Notify,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    uplink: Mutex<UplinkStatus>,
    clients: Mutex<BTreeMap<u64, ClientInfo>>,
}

impl Default for Status {
    fn default() -> Self {
        Status::new()
    }
}

impl Status {
    /// A fresh status.
    pub fn new() -> Self {
        Status {
            started: Instant::now(),
            events_received: AtomicU64::new(0),
            events_forwarded: AtomicU64::new(0),
            events_resent: AtomicU64::new(0),
            events_undeliverable: AtomicU64::new(0),
            replies_dropped: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            producer_waits: AtomicU64::new(0),
            clients_changed: tokio::sync::Notify::new(),
            refused: Mutex::new(BTreeMap::new()),
            uplink: Mutex::new(UplinkStatus {
                state: UplinkState::Connecting,
                since: OffsetDateTime::now_utc(),
                last_error: None,
                last_failure_class: None,
                clock_skew_seconds: None,
                session_id: None,
                last_ack_at: None,
            }),
            clients: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts `n` refused events (or messages) under `reason`.
    pub fn refuse(&self, reason: &'static str, n: u64) {
        *self.refused.lock().unwrap().entry(reason).or_default() += n;
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
            u.state = state;
            u.since = OffsetDateTime::now_utc();
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
        let had_engines = self
            .clients
            .lock()
            .unwrap()
            .remove(&id)
            .is_some_and(|c| !c.engines.is_empty());
        if had_engines {
            self.clients_changed.notify_one();
        }
    }

    /// Connected clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.clients.lock().unwrap().values().cloned().collect()
    }

    /// The sorted union of engines registered by connected clients plus `extra`.
    pub fn engines_union(&self, extra: &[String]) -> Vec<String> {
        let mut all: Vec<String> = self
            .clients
            .lock()
            .unwrap()
            .values()
            .flat_map(|c| c.engines.iter().cloned())
            .chain(extra.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The `stats` reply: one flat map an operator or a test can read.
    pub fn report(&self, spool: &SpoolStats) -> Value {
        let u = self.uplink();
        let dropped = spool.dropped_oldest_total.load(Ordering::Relaxed)
            + spool.refused_full_total.load(Ordering::Relaxed)
            + self.events_undeliverable.load(Ordering::Relaxed);
        let mut m = Value::empty_map();
        m.insert("type", "stats");
        m.insert("version", env!("CARGO_PKG_VERSION"));
        m.insert("uptime_seconds", self.started.elapsed().as_secs());
        m.insert("spool_depth", spool.depth.load(Ordering::Relaxed));
        m.insert("spool_bytes", spool.bytes.load(Ordering::Relaxed));
        m.insert("received", self.events_received.load(Ordering::Relaxed));
        m.insert("stored", spool.stored_total.load(Ordering::Relaxed));
        m.insert("forwarded", self.events_forwarded.load(Ordering::Relaxed));
        m.insert("resent", self.events_resent.load(Ordering::Relaxed));
        m.insert("acked", spool.acked_total.load(Ordering::Relaxed));
        m.insert("dropped", dropped);
        m.insert(
            "dropped_oldest",
            spool.dropped_oldest_total.load(Ordering::Relaxed),
        );
        m.insert("refused", self.refused_total());
        let mut by_reason = Value::empty_map();
        for (k, v) in self.refused() {
            by_reason.insert(k, v);
        }
        m.insert("refused_by_reason", by_reason);
        m.insert("uplink_state", u.state.as_str());
        m.insert("uplink_since", crate::protocol::format_ts(u.since));
        m.insert(
            "last_error",
            u.last_error.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert(
            "last_failure_class",
            u.last_failure_class.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert(
            "clock_skew_seconds",
            u.clock_skew_seconds.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("connects", self.connects.load(Ordering::Relaxed));
        m.insert(
            "producer_waits",
            self.producer_waits.load(Ordering::Relaxed),
        );
        m.insert("clients", self.clients.lock().unwrap().len() as u64);
        m
    }
}
