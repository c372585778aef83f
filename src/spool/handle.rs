//! The handle producers and the uplink hold: every request becomes an
//! [`Op`] on the writer's one bounded channel, so a slow disk is felt as
//! back-pressure by whoever sends, and each reply comes after the commit
//! that served it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{AppendOutcome, Overflow, Snapshot, SpoolError, SpoolStats, StoredEvent};

/// One request to the writer thread.
pub(super) enum Op {
    Append {
        events: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<AppendOutcome, SpoolError>>,
    },
    ReadAfter {
        after_id: i64,
        max_events: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<StoredEvent>, SpoolError>>,
    },
    ReadRange {
        first: i64,
        last: i64,
        reply: oneshot::Sender<Result<Vec<StoredEvent>, SpoolError>>,
    },
    Ack {
        first: i64,
        last: i64,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
    /// Deletes events the brain can never take, counting them in the file.
    Discard {
        first: i64,
        last: i64,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
    /// Keeps the brain version last seen in the file.
    RememberBrain {
        code: i64,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Snapshot {
        reply: oneshot::Sender<Result<Snapshot, SpoolError>>,
    },
    Probe {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Answered by the writer thread without I/O, after the requests queued
    /// before it: proves the writer is not wedged (the watchdog).
    Ping {
        reply: oneshot::Sender<()>,
    },
    Close,
}

/// A cheap, cloneable handle to the spool's writer.
#[derive(Clone)]
pub struct SpoolHandle {
    pub(super) tx: mpsc::Sender<Op>,
    pub(super) stats: Arc<SpoolStats>,
    pub(super) new_events: Arc<Notify>,
    pub(super) space_freed: Arc<Notify>,
    pub(super) overflow: Overflow,
    /// Set by [`SpoolHandle::stop_holding_producers`].
    pub(super) release: Arc<AtomicBool>,
}

/// Requests waiting in the channel before callers feel back-pressure.
pub(super) const QUEUE_DEPTH: usize = 1024;

impl SpoolHandle {
    /// Queues events for the next group commit. Await the returned receiver
    /// for the outcome; it resolves only after the commit.
    pub async fn append(
        &self,
        events: Vec<Vec<u8>>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome, SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { events, reply })
            .await
            .map_err(|_| SpoolError::Closed)?;
        Ok(rx)
    }

    /// Appends and waits for the commit.
    pub async fn append_durable(&self, events: Vec<Vec<u8>>) -> Result<AppendOutcome, SpoolError> {
        self.append(events)
            .await?
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Op,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// The oldest events with id greater than `after_id`, up to `max_events`
    /// and about `max_bytes` (at least one event when any exists).
    pub async fn read_after(
        &self,
        after_id: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, SpoolError> {
        self.call(|reply| Op::ReadAfter {
            after_id,
            max_events,
            max_bytes,
            reply,
        })
        .await
    }

    /// The events still stored with ids in `first..=last`.
    pub async fn read_range(&self, first: i64, last: i64) -> Result<Vec<StoredEvent>, SpoolError> {
        self.call(|reply| Op::ReadRange { first, last, reply })
            .await
    }

    /// Deletes the events with ids in `first..=last` (the brain acked them).
    /// Returns how many were still there.
    pub async fn ack(&self, first: i64, last: i64) -> Result<u64, SpoolError> {
        self.call(|reply| Op::Ack { first, last, reply }).await
    }

    /// Deletes the events with ids in `first..=last` because the brain can
    /// never take them; they are counted in the file's lifetime
    /// [`SpoolStats::undeliverable_total`] in the same transaction. Returns
    /// how many were still there.
    pub async fn discard_undeliverable(&self, first: i64, last: i64) -> Result<u64, SpoolError> {
        self.call(|reply| Op::Discard { first, last, reply }).await
    }

    /// Keeps the brain version last seen (a
    /// [`crate::uplink::contract::BrainLine`] code) in the file.
    pub async fn remember_brain(&self, code: i64) -> Result<(), SpoolError> {
        self.call(|reply| Op::RememberBrain { code, reply }).await
    }

    /// Depth, bytes and the age of the oldest event.
    pub async fn snapshot(&self) -> Result<Snapshot, SpoolError> {
        self.call(|reply| Op::Snapshot { reply }).await
    }

    /// Proves the spool can still commit: one small write transaction
    /// (a timestamp in the `meta` table), grouped with pending appends.
    pub async fn probe(&self) -> Result<(), SpoolError> {
        self.call(|reply| Op::Probe { reply }).await
    }

    /// Completes once the writer thread has served everything queued before
    /// it; no I/O of its own. Waits forever on a wedged writer (that is the
    /// point: the watchdog stops pinging).
    pub async fn ping(&self) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Ping { reply })
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)
    }

    /// Live counters.
    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// Signalled after a commit that stored new events.
    pub fn new_events(&self) -> &Notify {
        &self.new_events
    }

    /// Signalled after events were deleted (for the `block` policy).
    pub fn space_freed(&self) -> &Notify {
        &self.space_freed
    }

    /// The configured overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// On shutdown, under `block`: from now on an append that does not fit
    /// whole is refused with [`SpoolError::Stopping`] (nothing of it
    /// stored) rather than answered "wait for room", and producers waiting
    /// on [`SpoolHandle::space_freed`] are woken to retry and hear it. No
    /// effect under the other policies, which never wait.
    pub fn stop_holding_producers(&self) {
        self.release.store(true, Ordering::SeqCst);
        self.space_freed.notify_waiters();
    }
}
