//! What the router's tests share: local processes as ingest registers
//! them, commands as the brain sends them, and what a process receives.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Command, Router};
use crate::clients::{ClientInfo, Registration};
use crate::ingest::framing::Framing;
use crate::ingest::replies::ReplyOutbox;
use crate::ingest::ReplyQueue;
use crate::protocol::Value;
use crate::stats::Stats;

/// What a connection receives.
pub(super) type Rx = mpsc::Receiver<Vec<u8>>;

pub(super) fn stats() -> Arc<Stats> {
    Arc::new(Stats::new())
}

pub(super) fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// What ingest does for connection `id` (process `pid`) and its `hello`:
/// the client registry, which the router reads, gets it; its replies go to
/// `tx`.
pub(super) fn register_with(
    router: &Router,
    id: u64,
    pid: i32,
    hello: Registration,
    tx: ReplyQueue,
) {
    let clients = &router.stats.clients;
    let info = ClientInfo {
        pid: Some(pid),
        framing: "jsonl",
        ..ClientInfo::default()
    };
    clients.connected(id, info);
    let outbox = Arc::new(ReplyOutbox::new(tx, Framing::JsonLines));
    clients.declared(id, hello, outbox);
}

/// [`register_with`] a reply queue of its own; returns what it receives.
pub(super) fn connect(router: &Router, id: u64, pid: i32, hello: Registration) -> Rx {
    let (tx, rx) = ReplyQueue::new();
    register_with(router, id, pid, hello, tx);
    rx
}

/// What ingest does when a connection ends: out of the registry, then its
/// commands fail.
pub(super) fn disconnect(router: &Router, id: u64) {
    router.stats.clients.disconnected(id);
    router.disconnected(id);
}

/// A command as the brain sends it (`target` and `parameters` as JSON),
/// without a claim.
pub(super) fn command(id: &str, action: &str, target: &str, parameters: &str) -> Command {
    Command {
        id: id.to_string(),
        action: action.to_string(),
        target: json(target),
        parameters: json(parameters),
        timeout_seconds: 60,
        claim: Value::Null,
    }
}

/// The next JSON line the connection received, if any.
pub(super) fn received(rx: &mut Rx) -> Option<serde_json::Value> {
    rx.try_recv()
        .ok()
        .map(|b| serde_json::from_slice(&b).expect("one JSON line"))
}
