//! The reply side of a connection: a queue bounded in replies and bytes,
//! and the task that writes it to the socket.
//!
//! Invariants: a client that does not read its socket holds at most
//! [`REPLY_QUEUE`] replies and [`REPLY_QUEUE_BYTES`] bytes of ordinary
//! replies (as much again of larger ones, and the one reply its writer is
//! blocked on); a reply that does not fit is dropped and counted
//! (`replies_dropped`), never waited for, so handling a client's messages
//! never blocks on the client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::framing::Framing;
use super::handler::{error_reply, MAX_ACK_ID_BYTES};
use crate::clients::Outbox;
use crate::protocol::Value;
use crate::refusal::RefusalCode;
use crate::stats::Stats;

/// Replies queued per connection before they are dropped.
pub const REPLY_QUEUE: usize = 256;
/// Bytes of replies queued per connection before they are dropped:
/// [`REPLY_QUEUE`] replies of [`MAX_ACK_ID_BYTES`] each. Ordinary replies
/// (up to [`ORDINARY_REPLY_BYTES`]) and larger ones (`stats` reports,
/// commands) each have this much, so that a large reply waiting to be
/// written never crowds out the small ones behind it; one larger reply of
/// any size is queued when no other larger one is.
pub const REPLY_QUEUE_BYTES: usize = REPLY_QUEUE * MAX_ACK_ID_BYTES;
/// The size up to which a reply counts as ordinary: every `ack`, `pong`,
/// `hello_ack` and `error` (their `ack_id` and quoted values are bounded).
pub const ORDINARY_REPLY_BYTES: usize = 1024;

/// Writes the queued replies to the socket until every sender is gone.
pub(super) async fn write_replies(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<QueuedBytes>,
) {
    while let Some(bytes) = rx.recv().await {
        // Out of the queue once taken: a client that has read a reply
        // whole may send its next request before this task runs again
        // after the write, and the answer must not find the queue full.
        queued.taken(bytes.len());
        if wr.write_all(&bytes).await.is_err() {
            // The client went away; keep draining so senders never block.
            while let Some(bytes) = rx.recv().await {
                queued.taken(bytes.len());
            }
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// The queue of encoded replies (and commands) to one connection, bounded
/// by [`REPLY_QUEUE`] replies and [`REPLY_QUEUE_BYTES`] bytes: a client that
/// does not read its socket holds no more than that, and the one reply its
/// writer is blocked on.
#[derive(Clone)]
pub struct ReplyQueue {
    tx: mpsc::Sender<Vec<u8>>,
    /// Bytes queued and not yet taken by the writer.
    pub(super) queued: Arc<QueuedBytes>,
}

/// Bytes of one connection's queued replies, ordinary and larger apart.
#[derive(Default)]
pub(super) struct QueuedBytes {
    ordinary: AtomicUsize,
    larger: AtomicUsize,
}

impl QueuedBytes {
    fn class(&self, len: usize) -> &AtomicUsize {
        if len <= ORDINARY_REPLY_BYTES {
            &self.ordinary
        } else {
            &self.larger
        }
    }

    /// Counts `len` more bytes, if they fit.
    fn add(&self, len: usize) -> bool {
        let ordinary = len <= ORDINARY_REPLY_BYTES;
        self.class(len)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + len <= REPLY_QUEUE_BYTES || (!ordinary && q == 0)).then_some(q + len)
            })
            .is_ok()
    }

    /// The writer took a reply of `len` bytes.
    pub(super) fn taken(&self, len: usize) {
        self.class(len).fetch_sub(len, Ordering::AcqRel);
    }

    fn total(&self) -> usize {
        self.ordinary.load(Ordering::Acquire) + self.larger.load(Ordering::Acquire)
    }
}

/// A reply that did not fit in its connection's queue.
#[derive(Debug)]
pub struct QueueFull;

impl ReplyQueue {
    /// A queue and the receiving end its writer reads.
    pub fn new() -> (ReplyQueue, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        (
            ReplyQueue {
                tx,
                queued: Arc::new(QueuedBytes::default()),
            },
            rx,
        )
    }

    /// Queues `bytes` unless the queue is full: [`REPLY_QUEUE`] replies, or
    /// [`REPLY_QUEUE_BYTES`] of ordinary replies, or as much of larger ones
    /// (one larger reply of any size goes when no other is queued).
    pub fn try_send(&self, bytes: Vec<u8>) -> Result<(), QueueFull> {
        let len = bytes.len();
        if !self.queued.add(len) {
            return Err(QueueFull);
        }
        self.tx.try_send(bytes).map_err(|_| {
            self.queued.taken(len);
            QueueFull
        })
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.queued.total()
    }
}

/// The reply side of one connection: its queue, its framing, and where a
/// dropped reply is counted.
pub(super) struct Replies {
    pub(super) tx: ReplyQueue,
    pub(super) framing: Framing,
    pub(super) stats: Arc<Stats>,
}

impl Replies {
    /// Queues `v`, or counts it dropped.
    pub(super) fn send(&self, v: &Value) {
        if self.tx.try_send(self.framing.encode(v)).is_err() {
            self.stats.replies_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues an `error` reply.
    pub(super) fn error(
        &self,
        code: RefusalCode,
        message: &str,
        ack_id: Option<&Value>,
        index: Option<usize>,
    ) {
        self.send(&error_reply(code, message, ack_id, index));
    }
}

/// How the command router reaches a connection: its reply queue, in its
/// framing. A full queue is the router's to report (the process is not
/// reading), so it is not counted as a dropped reply.
pub(crate) struct ReplyOutbox {
    tx: ReplyQueue,
    framing: Framing,
}

impl ReplyOutbox {
    /// The way to `tx`, encoding in `framing`.
    pub(crate) fn new(tx: ReplyQueue, framing: Framing) -> Self {
        ReplyOutbox { tx, framing }
    }
}

impl Outbox for ReplyOutbox {
    fn offer(&self, msg: &Value) -> bool {
        self.tx.try_send(self.framing.encode(msg)).is_ok()
    }
}
