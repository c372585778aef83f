//! A connection's spool appends: handed to the spool in arrival order,
//! settled (acked) in the same order, with back-pressure.
//!
//! Invariants:
//! * a durable `ack` is sent only once the spool committed the events, and
//!   acks keep the order of the messages (an ack-only entry waits its turn);
//! * records handed to the spool and not yet committed are bounded over all
//!   connections ([`IN_FLIGHT_KIB`]) and per connection
//!   ([`CONNECTION_IN_FLIGHT_KIB`]): past either, the connection settles
//!   its own earlier appends, then waits, and reads nothing meanwhile;
//! * under `block`, what did not fit is retried once there is room, ahead
//!   of anything later from the same connection;
//! * every event the spool refused is counted under its code and answered
//!   with an `error` (`spool_full` is counted by the spool, as a loss).

use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, TryAcquireError};

use super::connection::Connection;
use super::handler::EngineRuns;
use crate::protocol::Value;
use crate::refusal::RefusalCode;
use crate::spool::{AppendOutcome, Overflow, SpoolError};

/// Records handed to the spool and not yet committed, over all connections
/// (KiB). A connection that would exceed it first settles its own earlier
/// messages, then waits: it stops reading, and its producer feels it.
pub(super) const IN_FLIGHT_KIB: usize = 8 * 1024;

/// One connection's share of [`IN_FLIGHT_KIB`]: past it, the connection
/// settles its own earlier messages before it hands the spool another (a
/// single larger message still goes, alone). The spool commits in arrival
/// order, so this bounds how much of one producer's backlog another
/// producer's message waits behind: a client flooding the socket keeps about
/// 1 MiB queued, not the whole budget.
const CONNECTION_IN_FLIGHT_KIB: usize = 1024;

/// How long a `block` retry waits for the spool to free room before it
/// tries again.
const BLOCK_RETRY_WAIT: Duration = Duration::from_millis(250);

/// One append waiting for its commit, in arrival order.
pub(super) struct Pending {
    pub(super) rx: oneshot::Receiver<Result<AppendOutcome, SpoolError>>,
    /// Events in this append (0 for an ack-only entry).
    events: usize,
    ack_id: Option<Value>,
    /// Kept only under the `block` policy, to retry what did not fit.
    retry: Option<Vec<Vec<u8>>>,
    /// Each record's engine (kept under `drop_newest`): a refused tail is
    /// counted under the engines of the events refused.
    engines: EngineRuns,
    /// Events stored by earlier attempts of this message (`block`).
    stored_before: usize,
    /// This message's share of [`IN_FLIGHT_KIB`], returned when it settles.
    budget: Option<OwnedSemaphorePermit>,
}

impl Connection<'_> {
    /// Hands `records` to the spool; `ack_id` is acknowledged once they
    /// are committed (an `ack` of 0 stored, in order, when there are none).
    pub(super) async fn store(
        &mut self,
        records: Vec<Vec<u8>>,
        engines: EngineRuns,
        ack_id: Option<Value>,
    ) {
        if records.is_empty() {
            if ack_id.is_some() {
                // Keep acks in order behind earlier appends.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Ok(AppendOutcome::default()));
                self.pending.push_back(Pending {
                    rx,
                    events: 0,
                    ack_id,
                    retry: None,
                    engines: EngineRuns::default(),
                    stored_before: 0,
                    budget: None,
                });
            }
            return;
        }
        let budget = self.reserve(&records).await;
        let overflow = self.ingest.spool.overflow();
        let retry = (overflow == Overflow::Block).then(|| records.clone());
        let engines = if overflow == Overflow::DropNewest {
            engines
        } else {
            EngineRuns::default()
        };
        let events = records.len();
        match self.ingest.spool.append(records).await {
            Ok(rx) => self.pending.push_back(Pending {
                rx,
                events,
                ack_id,
                retry,
                engines,
                stored_before: 0,
                budget,
            }),
            Err(e) => self.spool_refused(&e, events, ack_id.as_ref()),
        }
    }

    /// Takes `records`' share of the in-flight budget. Past this
    /// connection's share ([`CONNECTION_IN_FLIGHT_KIB`]), or while the
    /// budget is short, settle this connection's own earlier messages first
    /// (they hold part of it), and only wait for the others' once none is
    /// left: whoever waits holds nothing, so the budget always drains.
    async fn reserve(&mut self, records: &[Vec<u8>]) -> Option<OwnedSemaphorePermit> {
        let bytes: usize = records.iter().map(Vec::len).sum();
        let kib = (bytes / 1024 + 1).min(IN_FLIGHT_KIB) as u32;
        while !self.pending.is_empty() && self.held_kib() + kib as usize > CONNECTION_IN_FLIGHT_KIB
        {
            self.settle_front().await;
        }
        loop {
            match self.ingest.in_flight.clone().try_acquire_many_owned(kib) {
                Ok(p) => return Some(p),
                Err(TryAcquireError::Closed) => return None,
                Err(TryAcquireError::NoPermits) => {}
            }
            if self.pending.is_empty() {
                return self
                    .ingest
                    .in_flight
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .ok();
            }
            self.settle_front().await;
        }
    }

    /// KiB of the in-flight budget this connection's pending messages hold.
    fn held_kib(&self) -> usize {
        self.pending
            .iter()
            .filter_map(|p| p.budget.as_ref())
            .map(|b| b.num_permits())
            .sum()
    }

    /// Waits for the oldest append's commit and answers it.
    pub(super) async fn settle_front(&mut self) {
        if let Some(mut p) = self.pending.pop_front() {
            let r = (&mut p.rx).await.unwrap_or(Err(SpoolError::Closed));
            self.settled(p, r).await;
        }
    }

    /// Answers an append the spool has settled.
    pub(super) async fn settled(&mut self, p: Pending, r: Result<AppendOutcome, SpoolError>) {
        match r {
            Ok(o) if o.refused_full > 0 && p.retry.is_some() => self.retry_when_room(p, o).await,
            Ok(o) => self.acknowledge(p, o),
            Err(e) => self.spool_refused(&e, p.events, p.ack_id.as_ref()),
        }
    }

    /// `block`: waits for room, then retries what did not fit. This
    /// connection reads nothing meanwhile, which is the back-pressure.
    async fn retry_when_room(&mut self, mut p: Pending, o: AppendOutcome) {
        let mut rest = p.retry.take().unwrap_or_default();
        rest.drain(..o.stored.min(rest.len()));
        let events = rest.len();
        let stored_before = p.stored_before + o.stored;
        let spool = &self.ingest.spool;
        self.ingest
            .stats
            .producer_waits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(BLOCK_RETRY_WAIT, spool.space_freed().notified()).await;
        match spool.append(rest.clone()).await {
            Ok(rx) => {
                self.pending.push_front(Pending {
                    rx,
                    events,
                    ack_id: p.ack_id,
                    retry: Some(rest),
                    engines: EngineRuns::default(),
                    stored_before,
                    budget: p.budget,
                });
                // Settle it before anything later, to keep acks in order.
                Box::pin(self.settle_front()).await;
            }
            Err(e) => self.spool_refused(&e, events, p.ack_id.as_ref()),
        }
    }

    /// The commit is done: `spool_full` for what did not fit
    /// (`drop_newest`), then the `ack` with the count stored.
    fn acknowledge(&self, p: Pending, o: AppendOutcome) {
        if o.refused_full > 0 {
            // Lost for good: the brain hears of it per engine (telemetry_loss),
            // each refused event (the newest: the tail) under its own engine.
            let telemetry = &self.ingest.stats.telemetry;
            let mut counted = 0;
            for (engine, n) in p.engines.last(o.refused_full) {
                telemetry.engine_dropped(&[engine.to_string()], n as u64);
                counted += n;
            }
            if counted < o.refused_full {
                // Not expected: records whose engine was not kept.
                let engines = self.ingest.stats.clients.engines_of(self.id);
                telemetry.engine_dropped(&engines, (o.refused_full - counted) as u64);
            }
            self.replies.error(
                RefusalCode::SpoolFull,
                &format!(
                    "the spool is full (Z4J_BUFFER_OVERFLOW=drop_newest): {} of {} events were not stored; the brain is not keeping up or is unreachable",
                    o.refused_full,
                    o.refused_full + o.stored
                ),
                p.ack_id.as_ref(),
                None,
            );
        }
        if let Some(a) = p.ack_id {
            let mut m = Value::empty_map();
            m.insert("type", "ack");
            m.insert("ack_id", a);
            m.insert("stored", (p.stored_before + o.stored) as u64);
            self.replies.send(&m);
        }
    }

    /// The spool refused `events` events: counted, and said.
    fn spool_refused(&self, e: &SpoolError, events: usize, ack_id: Option<&Value>) {
        let code = RefusalCode::from(e);
        self.ingest.stats.refuse(code, events as u64);
        self.replies.error(code, &e.to_string(), ack_id, None);
    }
}
