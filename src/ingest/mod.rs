//! The local socket: applications write task events here.
//!
//! One concern per file:
//! * [`socket`]: where the socket lives, binding it, the limit on open files;
//! * [`admission`]: the accept loop, peer credentials, the uid/gid
//!   allow-list, `max_clients`, refusal at the door;
//! * [`connection`]: one client connection's loop: read, decode, have the
//!   handler decide; [`apply`]: applying the decision; [`appends`]: its
//!   spool appends, settled in order, with back-pressure;
//! * [`handler`]: the decision for one message, with no I/O ([`decision`]:
//!   what it returns);
//! * [`framing`], [`validate`]: decoding the byte stream, normalising events;
//!   [`fast`]: the same for the common `events` message, read in place;
//! * back-pressure: [`budget`] (the daemon-wide budget for large messages)
//!   and [`replies`] (each connection's bounded reply queue).
//!
//! Invariants:
//! * the accept loop never waits on a client: each connection runs in its
//!   own task, with bounded buffers, and replies go through a queue bounded
//!   in replies and bytes that drops (and counts) replies to a client that
//!   does not read;
//! * input is bounded per connection ([`FREE_BUFFER_BYTES`]) and over all
//!   connections ([`budget`]): a connection over the budget is not read
//!   until it has its share (back-pressure), and every echoed value is
//!   bounded ([`MAX_ACK_ID_BYTES`], [`validate::excerpt`]);
//! * a durable `ack` is written only after the spool committed the events;
//! * a refused event gets an `error` reply with a code and a message that
//!   says what to change, is counted, and the connection goes on.
//!
//! The message contract is documented in `docs/local-protocol.md`.

mod admission;
mod appends;
mod apply;
pub mod budget;
mod connection;
pub mod decision;
pub mod fast;
pub mod framing;
pub mod gateway;
pub mod handler;
mod health;
pub mod replies;
mod socket;
#[cfg(test)]
mod tests;
pub mod validate;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::spool::SpoolHandle;
use crate::stats::Stats;
use appends::IN_FLIGHT_KIB;
use budget::MessageBudget;

pub use handler::{handle, Handled, Limits, MAX_ACK_ID_BYTES, MAX_LABEL_CHARS};
pub use replies::{QueueFull, ReplyQueue, ORDINARY_REPLY_BYTES, REPLY_QUEUE, REPLY_QUEUE_BYTES};
pub use socket::{bind, raise_fd_limit, IngestError, FD_MARGIN};

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The socket path.
    pub socket_path: PathBuf,
    /// Allowed peer uids (empty = any).
    pub allowed_uids: Vec<u32>,
    /// Allowed peer gids (empty = any).
    pub allowed_gids: Vec<u32>,
    /// Most connections at once.
    pub max_clients: usize,
    /// Largest message a client may send (a batch of events).
    pub max_message_bytes: usize,
    /// Largest single event, canonical bytes (fits one brain frame).
    pub max_event_bytes: usize,
    /// How long a connection may hold part of a message without sending
    /// more before it gets `incomplete_message` and is closed. An idle
    /// connection between messages is never timed out.
    pub partial_message_timeout: Duration,
    /// Whether the socket file is ours to remove on exit. Not under socket
    /// activation: the file and the listener belong to systemd, which keeps
    /// queueing connections while the daemon restarts.
    pub remove_socket_on_exit: bool,
}

/// Default [`IngestConfig::partial_message_timeout`].
pub const PARTIAL_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bound of one client message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Room left in a brain frame for the signed envelope around the events.
pub const FRAME_ENVELOPE_RESERVE: usize = 4 * 1024;

/// Everything a connection task needs.
pub struct Ingest {
    config: IngestConfig,
    spool: SpoolHandle,
    stats: Arc<Stats>,
    next_id: AtomicU64,
    /// The daemon's effective uid (always allowed to connect).
    own_uid: u32,
    /// Where commands from the brain are routed to connections.
    router: Arc<crate::commands::Router>,
    /// KiB of decoded records, over all connections, handed to the spool
    /// and not yet settled: bounds the daemon's memory when producers
    /// outrun the disk.
    in_flight: Arc<Semaphore>,
    /// Bytes of client messages buffered beyond each connection's
    /// [`FREE_BUFFER_BYTES`], over all connections (see [`budget`]).
    messages: Arc<MessageBudget>,
    /// Signalled when a connection gave back its share of `messages`: the
    /// memory of a large message may go back to the system.
    released: tokio::sync::Notify,
    /// How many times that happened.
    releases: AtomicU64,
    /// The gateway's listener, served by [`Ingest::serve`] beside the
    /// socket once set ([`Ingest::add_gateway`]).
    gateway: std::sync::Mutex<Option<(tokio::net::TcpListener, Arc<gateway::Gateway>)>>,
}

/// Input a connection buffers on its own: every message up to this size,
/// and the next read. Beyond it, a connection holds a share of the
/// daemon-wide message budget ([`budget`]) until the message is handled.
pub const FREE_BUFFER_BYTES: usize = 64 * 1024;
/// How much more a connection reads at a time while a JSON line longer
/// than [`FREE_BUFFER_BYTES`] arrives.
const READ_BYTES: usize = 64 * 1024;
/// How long after the last large message was handled, with none being
/// received, the memory it used goes back to the system.
const RELEASE_DELAY: Duration = Duration::from_secs(1);
/// Appends of one connection waiting for their commit before it stops reading.
const MAX_PENDING_APPENDS: usize = 64;
/// On shutdown, how long a connection may keep delivering what it already sent.
const DRAIN_READ_TIMEOUT: Duration = Duration::from_millis(200);

impl Ingest {
    /// Creates the ingest side.
    pub fn new(
        config: IngestConfig,
        spool: SpoolHandle,
        stats: Arc<Stats>,
        router: Arc<crate::commands::Router>,
    ) -> Arc<Self> {
        // The pool takes one message at the limit (or many smaller ones);
        // the slot another, so the largest message always gets through.
        let messages = MessageBudget::new(
            config.max_message_bytes,
            (config.max_message_bytes + READ_BYTES).saturating_sub(FREE_BUFFER_BYTES),
        );
        Arc::new(Ingest {
            messages,
            released: tokio::sync::Notify::new(),
            releases: AtomicU64::new(0),
            gateway: std::sync::Mutex::new(None),
            config,
            spool,
            stats,
            next_id: AtomicU64::new(1),
            own_uid: crate::host::current_uid(),
            router,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_KIB)),
        })
    }

    /// Serves the gateway on `listener` too, from [`Ingest::serve`] on:
    /// its sessions then finish with the socket's connections at shutdown.
    pub fn add_gateway(&self, listener: tokio::net::TcpListener, gateway: Arc<gateway::Gateway>) {
        *self.gateway.lock().unwrap() = Some((listener, gateway));
    }

    /// The daemon's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The limits every message of this daemon is handled under.
    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.config.max_event_bytes,
            max_message_bytes: self.config.max_message_bytes,
        }
    }

    /// Gives memory back to the system ([`crate::memory`]) once large
    /// messages stop: [`RELEASE_DELAY`] after the last connection gave
    /// back its share of the message budget, when no connection holds any.
    /// A steady stream of large messages reuses the memory instead.
    async fn release_memory_after_bursts(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = self.released.notified() => {}
            }
            loop {
                let seen = self.releases.load(Ordering::Acquire);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RELEASE_DELAY) => {}
                }
                if self.releases.load(Ordering::Acquire) == seen {
                    break;
                }
            }
            // Still in use: the connection holding it notifies again when done.
            if self.messages.is_idle() {
                crate::memory::release_free_memory();
            }
        }
    }

    /// A connection gave back its share of the message budget.
    fn budget_released(&self) {
        self.releases.fetch_add(1, Ordering::AcqRel);
        self.released.notify_one();
    }
}
