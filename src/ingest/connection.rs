//! One client connection: reads its messages, has [`handle`] decide about
//! each, and applies the decision (counters, registration, replies, the
//! command router, spool appends).
//!
//! Invariants:
//! * the first byte picks the framing, for the life of the connection;
//! * what the connection buffers beyond [`FREE_BUFFER_BYTES`] is its share
//!   of the daemon-wide message budget: it is not read until it has it,
//!   and gives it back as soon as the messages are handled;
//! * a connection with part of a message and no progress for the partial
//!   message timeout (while it is read) gets `incomplete_message` and is
//!   closed; an idle one between messages is never timed out;
//! * on shutdown, what the client already sent is still handled within
//!   [`DRAIN_READ_TIMEOUT`]; every append is settled (and acked) before the
//!   connection is gone;
//! * everything logged while a connection is served is inside its `client`
//!   span (connection id, pid, uid), so each line says who it is about.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use super::admission::{linger, Peer};
use super::appends::Pending;
use super::budget::Reservation;
use super::fast;
use super::framing::{Decoded, Decoder, Framing};
use super::handler::handle;
use super::replies::{write_replies, Replies, ReplyQueue};
use super::{Ingest, DRAIN_READ_TIMEOUT, FREE_BUFFER_BYTES, MAX_PENDING_APPENDS, READ_BYTES};
use crate::clients::ClientInfo;
use crate::refusal::RefusalCode;
use crate::spool::SpoolError;

/// One served client connection: who it is, where its replies go, and
/// its appends waiting for their commit.
pub(super) struct Connection<'a> {
    pub(super) ingest: &'a Ingest,
    pub(super) id: u64,
    pub(super) pid: Option<i32>,
    pub(super) replies: Replies,
    pub(super) pending: VecDeque<Pending>,
}

/// A connection's input: its decoder (whose buffer is the only input
/// buffer) and its share of the message budget.
struct Input {
    decoder: Decoder,
    held: Reservation,
}

/// What the next read needs, once the buffered messages are handled.
#[derive(Clone, Copy)]
struct Room {
    /// Buffer capacity wanted for the next read.
    wanted: usize,
    /// Share of the message budget that capacity takes.
    need: usize,
    /// Whether the share is held: otherwise the connection is not read.
    held: bool,
}

/// How one wait of the read loop ended.
enum Step {
    /// Read more, or settled an append: go on.
    Go,
    /// The daemon is stopping: deliver what was already sent.
    Drain,
    /// The client closed, or reading failed.
    Closed,
    /// The daemon closed the connection for an error (the reply says which).
    Refused,
}

impl Ingest {
    /// Serves one accepted connection until the client or the daemon ends
    /// it, inside a `client` span (connection id, pid, uid) so every log
    /// line about it says who it is.
    pub(super) async fn connection(
        self: Arc<Self>,
        stream: UnixStream,
        peer: Peer,
        shutdown: CancellationToken,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "client",
            client = id,
            pid = tracing::field::Empty,
            uid = peer.uid
        );
        if let Some(pid) = peer.pid {
            span.record("pid", pid);
        }
        self.serve_client(id, stream, peer, shutdown)
            .instrument(span)
            .await
    }

    async fn serve_client(
        self: Arc<Self>,
        id: u64,
        stream: UnixStream,
        peer: Peer,
        shutdown: CancellationToken,
    ) {
        let (mut rd, wr) = stream.into_split();
        let Some(first) = first_byte(&mut rd, &shutdown).await else {
            return;
        };
        let framing = Framing::detect(first);
        let (reply_tx, reply_rx) = ReplyQueue::new();
        let writer = tokio::spawn(
            write_replies(wr, reply_rx, reply_tx.queued.clone()).instrument(Span::current()),
        );
        self.client_connected(id, peer, framing);
        let mut conn = Connection {
            ingest: &self,
            id,
            pid: peer.pid,
            replies: Replies {
                tx: reply_tx,
                framing,
                stats: self.stats.clone(),
            },
            pending: VecDeque::new(),
        };
        let mut input = Input {
            decoder: Decoder::new(framing, self.config.max_message_bytes),
            held: Reservation::new(self.messages.clone()),
        };
        input.decoder.feed(&[first]);
        let refused = conn.serve(&mut rd, &mut input, &shutdown).await;
        let had = input.held.bytes();
        drop(input);
        if had > 0 {
            self.budget_released();
        }
        conn.finish().await;
        let _ = writer.await;
        if refused {
            linger(&mut rd).await;
        }
        tracing::debug!("client disconnected");
    }

    fn client_connected(&self, id: u64, peer: Peer, framing: Framing) {
        let Peer { uid, gid, pid } = peer;
        self.stats.clients.connected(
            id,
            ClientInfo {
                pid,
                uid,
                gid,
                framing: framing.as_str(),
                ..ClientInfo::default()
            },
        );
        tracing::debug!(gid, framing = framing.as_str(), "client connected");
    }
}

/// The byte that decides the framing, or `None` when the client closed
/// first. A connection accepted just as the daemon stops still gets what it
/// sends within the drain window: closing it unread would reset a client
/// that has already written.
async fn first_byte(rd: &mut OwnedReadHalf, shutdown: &CancellationToken) -> Option<u8> {
    let mut first = [0u8; 1];
    let n = tokio::select! {
        biased;
        r = rd.read(&mut first) => r.ok()?,
        _ = shutdown.cancelled() => {
            tokio::time::timeout(DRAIN_READ_TIMEOUT, rd.read(&mut first)).await.ok()?.ok()?
        }
    };
    (n > 0).then_some(first[0])
}

impl Input {
    /// Gives back the memory and the budget of the messages just handled,
    /// and takes what the next read needs, if it can.
    fn make_room(&mut self, ingest: &Ingest) -> Room {
        let capacity = self.decoder.shrink(FREE_BUFFER_BYTES);
        let wanted = self.decoder.wanted_capacity(FREE_BUFFER_BYTES, READ_BYTES);
        let need = wanted.max(capacity).saturating_sub(FREE_BUFFER_BYTES);
        let had = self.held.bytes();
        self.held.shrink(need);
        if had > 0 && self.held.bytes() == 0 {
            ingest.budget_released();
        }
        let held = self.held.try_grow(need);
        if held {
            self.decoder.prepare_read(wanted);
        } else {
            ingest
                .stats
                .message_budget_waits
                .fetch_add(1, Ordering::Relaxed);
        }
        Room { wanted, need, held }
    }

    /// While draining: one more read, within [`DRAIN_READ_TIMEOUT`] (the
    /// budget included). False once there is nothing more to read.
    async fn read_while_draining(&mut self, rd: &mut OwnedReadHalf, room: Room) -> bool {
        if !room.held
            && tokio::time::timeout(DRAIN_READ_TIMEOUT, self.held.grow(room.need))
                .await
                .is_err()
        {
            return false;
        }
        self.decoder.prepare_read(room.wanted);
        matches!(
            tokio::time::timeout(DRAIN_READ_TIMEOUT, rd.read_buf(self.decoder.buffer_mut())).await,
            Ok(Ok(n)) if n > 0
        )
    }
}

impl Connection<'_> {
    /// The connection is over: every append is settled (and answered, if
    /// the client is still there), then it leaves the registry, so the
    /// router picks it no more, then the commands it was running fail.
    /// Its reply queue closes with it.
    pub(super) async fn finish(mut self) {
        while !self.pending.is_empty() {
            self.settle_front().await;
        }
        self.ingest.stats.clients.disconnected(self.id);
        self.ingest.router.disconnected(self.id);
    }

    /// Reads and handles messages until the client closes, the drain after
    /// shutdown ends, or the daemon closes the connection for an error
    /// (then true).
    async fn serve(
        &mut self,
        rd: &mut OwnedReadHalf,
        input: &mut Input,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut draining = false;
        loop {
            if !self.handle_buffered(&mut input.decoder).await {
                return true;
            }
            let room = input.make_room(self.ingest);
            if draining {
                if !input.read_while_draining(rd, room).await {
                    return false;
                }
                continue;
            }
            match self.wait(rd, input, room, shutdown).await {
                Step::Go => {}
                Step::Drain => draining = true,
                Step::Closed => return false,
                Step::Refused => return true,
            }
        }
    }

    /// Handles every complete message in the decoder's buffer. False when
    /// the stream cannot go on (the error is sent, and counted).
    async fn handle_buffered(&mut self, decoder: &mut Decoder) -> bool {
        loop {
            let limits = self.ingest.limits();
            let fast = |body: &[u8]| fast::handle_msgpack(body, &limits, OffsetDateTime::now_utc());
            match decoder.next_item_with(fast) {
                Ok(Some(Decoded::Message(v))) => {
                    let handled = handle(v, &limits, OffsetDateTime::now_utc());
                    self.apply(handled).await;
                }
                Ok(Some(Decoded::Handled(handled))) => self.apply(*handled).await,
                Ok(Some(Decoded::Invalid(e))) => {
                    self.ingest.stats.refuse(e.code, 1);
                    self.replies.error(e.code, &e.message, None, None);
                }
                Ok(None) => return true,
                Err(e) => {
                    self.ingest.stats.refuse(e.code, 1);
                    self.replies.error(e.code, &e.message, None, None);
                    return false;
                }
            }
            if self.pending.len() >= MAX_PENDING_APPENDS {
                self.settle_front().await;
            }
        }
    }

    /// Waits for whichever comes first: shutdown, the oldest append's
    /// commit, the budget this connection waits for, more input, or the
    /// end of the partial-message timeout.
    async fn wait(
        &mut self,
        rd: &mut OwnedReadHalf,
        input: &mut Input,
        room: Room,
        shutdown: &CancellationToken,
    ) -> Step {
        let pending_bytes = input.decoder.pending_bytes();
        let timeout = self.ingest.config.partial_message_timeout;
        let Input { decoder, held } = input;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Step::Drain,
            settled = async { (&mut self.pending.front_mut().expect("guarded").rx).await }, if !self.pending.is_empty() => {
                let p = self.pending.pop_front().expect("guarded");
                self.settled(p, settled.unwrap_or(Err(SpoolError::Closed))).await;
                Step::Go
            }
            // Over the budget: this connection is not read until its
            // share comes; its client's writes wait (back-pressure).
            () = held.grow(room.need), if !room.held => Step::Go,
            r = rd.read_buf(decoder.buffer_mut()), if room.held => match r {
                Ok(0) | Err(_) => Step::Closed,
                Ok(_) => Step::Go,
            },
            // Restarted by every read: it fires only when part of a
            // message sat here with no progress for the whole timeout
            // while the daemon was reading (not while it waited for the
            // budget).
            _ = tokio::time::sleep(timeout), if room.held && pending_bytes > 0 => {
                self.incomplete_message(pending_bytes);
                Step::Refused
            }
        }
    }

    /// Part of a message, then silence: says so, counted.
    fn incomplete_message(&self, pending_bytes: usize) {
        let code = RefusalCode::IncompleteMessage;
        self.ingest.stats.refuse(code, 1);
        tracing::warn!(
            client = self.id,
            pid = self.pid,
            pending_bytes,
            "closed a local client that stopped in the middle of a message"
        );
        self.replies.error(
            code,
            &format!(
                "{pending_bytes} bytes of a message arrived, then nothing for {} s; send whole messages (a 4-byte big-endian length and that many bytes of MessagePack, or one JSON object ending in a newline)",
                self.ingest.config.partial_message_timeout.as_secs_f64()
            ),
            None,
            None,
        );
    }
}
