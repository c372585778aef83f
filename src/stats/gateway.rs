//! The gateway's counters: connections of local z4j agents, and why the
//! gateway closed the ones it closed (by the close code the agent got).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Counters of the gateway (all zero, and no address, when it is off).
#[derive(Debug, Default)]
pub struct GatewayCounters {
    /// Where it listens (`None`: off).
    addr: Mutex<Option<String>>,
    /// Sessions open now (past `hello_ack`).
    open: AtomicU64,
    /// Sessions established since start.
    sessions: AtomicU64,
    /// Frames received from local agents, verified or not.
    frames: AtomicU64,
    /// `event_batch` frames among them that passed verification.
    event_batches: AtomicU64,
    /// Connections the gateway closed, by the close code sent.
    closed: Mutex<BTreeMap<u16, u64>>,
}

/// The gateway as `stats` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayReport {
    /// The address it listens on.
    pub addr: String,
    /// Agent sessions open now.
    pub connections: u64,
    /// Agent sessions established since start.
    pub sessions: u64,
    /// Frames received from local agents.
    pub frames_received: u64,
    /// Verified `event_batch` frames among them (compare with the frames
    /// the daemon sends the brain: `z4j_agentd_brain_ack_latency_seconds_count`).
    pub event_batches_received: u64,
    /// Connections the gateway closed, by close code (e.g. `"4401"`).
    pub closed_by_code: BTreeMap<String, u64>,
}

impl GatewayCounters {
    /// The gateway listens on `addr`.
    pub fn listening(&self, addr: String) {
        *self.addr.lock().unwrap() = Some(addr);
    }

    /// A session began (`hello_ack` sent).
    pub fn session_opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A session ended.
    pub fn session_closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// A frame arrived.
    pub fn frame(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// A verified `event_batch` arrived.
    pub fn event_batch(&self) {
        self.event_batches.fetch_add(1, Ordering::Relaxed);
    }

    /// The gateway closed a connection with `code`.
    pub fn closed(&self, code: u16) {
        *self.closed.lock().unwrap().entry(code).or_default() += 1;
    }

    /// The report, `None` when the gateway is off.
    pub fn report(&self) -> Option<GatewayReport> {
        let addr = self.addr.lock().unwrap().clone()?;
        Some(GatewayReport {
            addr,
            connections: self.open.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            frames_received: self.frames.load(Ordering::Relaxed),
            event_batches_received: self.event_batches.load(Ordering::Relaxed),
            closed_by_code: self
                .closed
                .lock()
                .unwrap()
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
        })
    }
}
