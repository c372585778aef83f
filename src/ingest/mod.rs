//! The local socket: applications write task events here.
//!
//! Owns binding (replacing a stale socket file, refusing when a live daemon
//! answers), the accept loop, one task per connection, peer credentials and
//! the uid/gid allow-list, and turning client messages into spool appends.
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

pub mod budget;
pub mod framing;
pub mod validate;

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::protocol::Value;
use crate::spool::{AppendOutcome, Overflow, SpoolError, SpoolHandle};
use crate::stats::{ClientInfo, Stats};
use budget::{MessageBudget, Reservation};
use framing::{Decoded, Decoder, Framing};
use validate::{excerpt, normalize_event_noting, Notes, Refusal};

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

/// Binding problems.
#[derive(Debug, Error)]
pub enum IngestError {
    /// Another daemon answers on the socket.
    #[error("another z4j-agentd is already listening on {0}; stop it first, or set Z4J_SOCKET_PATH to a different path")]
    AlreadyRunning(String),
    /// Something that is not a socket is in the way.
    #[error(
        "{0} exists and is not a socket; remove it or set Z4J_SOCKET_PATH to a different path"
    )]
    NotASocket(String),
    /// An I/O failure while binding.
    #[error("cannot bind the local socket {path}: {source}; check that the directory exists and this user may write to it")]
    Bind {
        /// The socket path.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// The socket of the host-wide daemon that the packages install
/// (`z4j-agentd.socket`).
pub const SYSTEM_SOCKET_PATH: &str = "/run/z4j-agentd/agent.sock";

/// Where a client (`status`, the doctor) looks for the daemon when no path
/// is given: the host-wide socket when it exists, else what `run` would
/// bind with the same environment.
pub fn client_socket_path(host: &crate::config::HostEnv) -> PathBuf {
    client_socket_path_with(host, Path::new(SYSTEM_SOCKET_PATH))
}

fn client_socket_path_with(host: &crate::config::HostEnv, system: &Path) -> PathBuf {
    if host.runtime_directory.is_none() && system.exists() {
        return system.to_path_buf();
    }
    default_socket_path(host)
}

/// Resolves the default socket path (see the architecture brief).
pub fn default_socket_path(host: &crate::config::HostEnv) -> PathBuf {
    if let Some(r) = &host.runtime_directory {
        r.join("agent.sock")
    } else if let Some(x) = &host.xdg_runtime_dir {
        x.join("z4j").join("agent.sock")
    } else {
        host.tmp_private_dir().join("agent.sock")
    }
}

/// Binds the socket: replaces a stale file, refuses when a daemon answers.
/// The socket is bound under a temporary name, given its mode, then renamed
/// into place, so it never exists with the wrong mode.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, IngestError> {
    let text = path.display().to_string();
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| IngestError::Bind {
                    path: text.clone(),
                    source,
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(IngestError::NotASocket(text));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(IngestError::AlreadyRunning(text)),
                Err(_) => {
                    tracing::info!(socket = %text, "replacing the stale socket of a daemon that is gone");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(IngestError::Bind { path: text, source }),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let std_listener =
        std::os::unix::net::UnixListener::bind(&tmp).map_err(|source| IngestError::Bind {
            path: text.clone(),
            source,
        })?;
    let finish = || -> std::io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        std_listener.set_nonblocking(true)
    };
    if let Err(source) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(IngestError::Bind { path: text, source });
    }
    UnixListener::from_std(std_listener).map_err(|source| IngestError::Bind { path: text, source })
}

/// Everything a connection task needs.
pub struct Ingest {
    config: IngestConfig,
    spool: SpoolHandle,
    status: Arc<Stats>,
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
}

/// Records handed to the spool and not yet committed, over all connections
/// (KiB). A connection that would exceed it first settles its own earlier
/// messages, then waits: it stops reading, and its producer feels it.
const IN_FLIGHT_KIB: usize = 8 * 1024;

/// One connection's share of [`IN_FLIGHT_KIB`]: past it, the connection
/// settles its own earlier messages before it hands the spool another (a
/// single larger message still goes, alone). The spool commits in arrival
/// order, so this bounds how much of one producer's backlog another
/// producer's message waits behind: a client flooding the socket keeps about
/// 1 MiB queued, not the whole budget.
const CONNECTION_IN_FLIGHT_KIB: usize = 1024;

/// Connections beyond `max_clients` being told `too_many_clients` at once;
/// past these, a connection beyond the limit is closed without a word.
const REFUSALS_IN_FLIGHT: usize = 32;

/// Descriptors the daemon needs besides one per client connection: the
/// spool (database, WAL, shared memory, lock), the listener, the runtime,
/// the uplink, the metrics listener, and the refusals in flight.
pub const FD_MARGIN: u64 = 64;

/// How long accepting pauses after the first failed `accept`; it doubles
/// while accepting keeps failing, up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_millis(250);
/// At most one warning about failed `accept` calls per this interval.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// How long a connection the daemon closes for an error keeps being read
/// (and what arrives discarded) after its error reply, and how much of it.
/// Closing a Unix socket with unread input resets the peer: its next write
/// fails, and a client that checks its writes before reading never sees
/// the error that says what to fix.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Replies queued per connection before they are dropped.
pub const REPLY_QUEUE: usize = 256;
/// The most an `ack_id` may take, as JSON: a counter or a UUID fits many
/// times over. Every reply to a message echoes its `ack_id`, so this keeps
/// replies small; a message with a longer one is refused (`bad_message`).
pub const MAX_ACK_ID_BYTES: usize = 256;
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
/// Longest `process`, `framework` and `worker_role` kept from a `hello`
/// (they are shown by `stats` and name the process in errors to the brain).
pub const MAX_LABEL_CHARS: usize = 256;
/// Appends of one connection waiting for their commit before it stops reading.
const MAX_PENDING_APPENDS: usize = 64;
/// On shutdown, how long a connection may keep delivering what it already sent.
const DRAIN_READ_TIMEOUT: Duration = Duration::from_millis(200);

impl Ingest {
    /// Creates the ingest side.
    pub fn new(
        config: IngestConfig,
        spool: SpoolHandle,
        status: Arc<Stats>,
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
            config,
            spool,
            status,
            next_id: AtomicU64::new(1),
            own_uid: crate::config::current_uid(),
            router,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_KIB)),
        })
    }

    /// Accepts connections until `shutdown`, then lets open connections
    /// finish what they sent and returns once all of them are done. The
    /// accept loop answers the watchdog through `beat`.
    ///
    /// A failed `accept` (out of file descriptors, mostly) pauses accepting
    /// for 10 ms, doubling up to 250 ms while it keeps failing: the waiting
    /// connections stay in the socket's backlog and are served once a
    /// descriptor frees up. Each failure is counted (`accept_failures`), and
    /// logged at most once every 10 s.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: CancellationToken,
        mut beat: crate::watchdog::Beat,
    ) {
        let slots = Arc::new(Semaphore::new(self.config.max_clients));
        let refusing = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().release_memory_after_bursts(shutdown.clone()));
        let mut failures = AcceptFailures::default();
        let pause = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(pause);
        let mut paused = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = beat.asked() => {}
                () = &mut pause, if paused => paused = false,
                accepted = listener.accept(), if !paused => match accepted {
                    Ok((stream, _)) => {
                        failures.recovered();
                        // Checked before a slot is taken, so connections
                        // from users who may not write cannot crowd out
                        // the ones who may.
                        let peer = Peer::of(&stream);
                        let refusal = self.not_allowed(peer).map(|m| ("not_allowed", m));
                        let permit = match refusal {
                            Some(_) => None,
                            None => slots.clone().try_acquire_owned().ok(),
                        };
                        let Some(permit) = permit else {
                            let (code, message) = refusal.unwrap_or_else(|| {
                                self.status.refuse("too_many_clients", 1);
                                ("too_many_clients", format!(
                                    "the daemon already serves {} connections (Z4J_MAX_CLIENTS); reuse one connection per process",
                                    self.config.max_clients
                                ))
                            });
                            // Each refusal holds a descriptor for up to 3 s:
                            // past a few dozen at once, close at once.
                            if let Ok(r) = refusing.clone().try_acquire_owned() {
                                tasks.spawn(async move {
                                    refuse_connection(stream, code, &message).await;
                                    drop(r);
                                });
                            }
                            continue;
                        };
                        let me = self.clone();
                        let token = shutdown.clone();
                        tasks.spawn(async move {
                            me.connection(stream, peer, token).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        self.status.accept_failures.fetch_add(1, Ordering::Relaxed);
                        let open = self.config.max_clients - slots.available_permits();
                        let metrics = self.status.metrics_connections.load(Ordering::Relaxed);
                        let wait = failures.failed(&e, self.config.max_clients, open, metrics);
                        pause.as_mut().reset(tokio::time::Instant::now() + wait);
                        paused = true;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        if self.config.remove_socket_on_exit {
            let _ = std::fs::remove_file(&self.config.socket_path);
        }
        while tasks.join_next().await.is_some() {}
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

    async fn connection(
        self: Arc<Self>,
        stream: UnixStream,
        peer: Peer,
        shutdown: CancellationToken,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Peer { uid, gid, pid } = peer;
        let (mut rd, wr) = stream.into_split();

        // The first byte decides the framing. A connection accepted just as
        // the daemon stops still gets what it sends within the drain window:
        // closing it unread would reset a client that has already written.
        let mut first = [0u8; 1];
        let n = tokio::select! {
            biased;
            r = rd.read(&mut first) => match r { Ok(n) => n, Err(_) => return },
            _ = shutdown.cancelled() => {
                match tokio::time::timeout(DRAIN_READ_TIMEOUT, rd.read(&mut first)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                }
            }
        };
        if n == 0 {
            return;
        }
        let framing = Framing::detect(first[0]);
        let (reply_tx, reply_rx) = ReplyQueue::new();
        let writer = tokio::spawn(write_replies(wr, reply_rx, reply_tx.queued.clone()));
        let replies = Replies {
            tx: reply_tx,
            framing,
            status: self.status.clone(),
        };

        self.status.client_connected(
            id,
            ClientInfo {
                pid,
                uid,
                gid,
                framing: framing.as_str(),
                ..ClientInfo::default()
            },
        );
        tracing::debug!(
            client = id,
            pid,
            uid,
            framing = framing.as_str(),
            "client connected"
        );

        let mut session = Session {
            ingest: &self,
            id,
            pid,
            replies,
            pending: VecDeque::new(),
        };
        let mut decoder = Decoder::new(framing, self.config.max_message_bytes);
        decoder.feed(&first);
        // This connection's share of the message budget: what its buffer
        // holds beyond FREE_BUFFER_BYTES, kept until those messages are handled.
        let mut held = Reservation::new(self.messages.clone());
        let mut draining = false;
        // Closed by the daemon for an error (the reply says which).
        let mut refused = false;
        'conn: loop {
            // Handle everything already buffered.
            loop {
                match decoder.next_item() {
                    Ok(Some(Decoded::Message(v))) => session.message(v).await,
                    Ok(Some(Decoded::Invalid(e))) => {
                        self.status.refuse(e.code, 1);
                        session.replies.error(e.code, &e.message, None, None);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.status.refuse(e.code, 1);
                        session.replies.error(e.code, &e.message, None, None);
                        refused = true;
                        break 'conn;
                    }
                }
                if session.pending.len() >= MAX_PENDING_APPENDS {
                    session.settle_front().await;
                }
            }
            // The messages just handled are gone: give their memory and
            // their share of the budget back, and see what the next read needs.
            let capacity = decoder.shrink(FREE_BUFFER_BYTES);
            let wanted = decoder.wanted_capacity(FREE_BUFFER_BYTES, READ_BYTES);
            let need = wanted.max(capacity).saturating_sub(FREE_BUFFER_BYTES);
            let had = held.bytes();
            held.shrink(need);
            if had > 0 && held.bytes() == 0 {
                self.budget_released();
            }
            let room = held.try_grow(need);
            if room {
                decoder.prepare_read(wanted);
            } else {
                self.status
                    .message_budget_waits
                    .fetch_add(1, Ordering::Relaxed);
            }
            if draining {
                if !room
                    && tokio::time::timeout(DRAIN_READ_TIMEOUT, held.grow(need))
                        .await
                        .is_err()
                {
                    break;
                }
                decoder.prepare_read(wanted);
                match tokio::time::timeout(DRAIN_READ_TIMEOUT, rd.read_buf(decoder.buffer_mut()))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break,
                }
                continue;
            }
            let pending_bytes = decoder.pending_bytes();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !draining => { draining = true; }
                settled = async { (&mut session.pending.front_mut().expect("guarded").rx).await }, if !session.pending.is_empty() => {
                    let p = session.pending.pop_front().expect("guarded");
                    session.settled(p, settled.unwrap_or(Err(SpoolError::Closed))).await;
                }
                // Over the budget: this connection is not read until its
                // share comes; its client's writes wait (back-pressure).
                () = held.grow(need), if !room => {}
                r = rd.read_buf(decoder.buffer_mut()), if room => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                // Restarted by every read: it fires only when part of a
                // message sat here with no progress for the whole timeout
                // while the daemon was reading (not while it waited for
                // the budget).
                _ = tokio::time::sleep(self.config.partial_message_timeout), if room && pending_bytes > 0 => {
                    self.status.refuse("incomplete_message", 1);
                    tracing::warn!(client = id, pid, pending_bytes, "closed a local client that stopped in the middle of a message");
                    session.replies.error(
                        "incomplete_message",
                        &format!(
                            "{pending_bytes} bytes of a message arrived, then nothing for {} s; send whole messages (a 4-byte big-endian length and that many bytes of MessagePack, or one JSON object ending in a newline)",
                            self.config.partial_message_timeout.as_secs_f64()
                        ),
                        None,
                        None,
                    );
                    refused = true;
                    break 'conn;
                }
            }
        }
        let had = held.bytes();
        drop(decoder);
        drop(held);
        if had > 0 {
            self.budget_released();
        }
        while !session.pending.is_empty() {
            session.settle_front().await;
        }
        self.router.disconnected(id);
        self.status.client_disconnected(id);
        drop(session);
        let _ = writer.await;
        if refused {
            linger(&mut rd).await;
        }
        tracing::debug!(client = id, "client disconnected");
    }
}

/// The accept loop's state while `accept` fails: the next pause, and the
/// rate limit of its warnings.
#[derive(Default)]
struct AcceptFailures {
    /// Failures in a row.
    streak: u64,
    /// Failures since the last warning.
    unreported: u64,
    last_warning: Option<std::time::Instant>,
}

impl AcceptFailures {
    /// Records a failure; returns how long to pause accepting. `open` and
    /// `metrics` are the local and metrics connections open now: the
    /// warning says who holds the descriptors.
    fn failed(
        &mut self,
        e: &std::io::Error,
        max_clients: usize,
        open: usize,
        metrics: u64,
    ) -> Duration {
        self.streak += 1;
        self.unreported += 1;
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY)
        {
            let errno = rustix::io::Errno::from_io_error(e);
            let hint = if errno == Some(rustix::io::Errno::MFILE) {
                let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
                format!(
                    "this process is out of file descriptors (RLIMIT_NOFILE {}, Z4J_MAX_CLIENTS {max_clients}) with {open} local and {metrics} metrics connections open; raise LimitNOFILE= in the systemd unit (ulimit -n elsewhere) or lower Z4J_MAX_CLIENTS",
                    limit.map_or("unlimited".to_string(), |l| l.to_string())
                )
            } else if errno == Some(rustix::io::Errno::NFILE) {
                "the system is out of file descriptors (fs.file-max); find the process that holds them".to_string()
            } else {
                "retrying".to_string()
            };
            tracing::warn!(
                error = %e,
                failures = self.unreported,
                "cannot accept a local connection: {hint}; new connections wait in the socket's backlog until a descriptor frees up"
            );
            self.last_warning = Some(std::time::Instant::now());
            self.unreported = 0;
        }
        let doublings = (self.streak - 1).min(8) as u32;
        (ACCEPT_PAUSE_MIN * 2u32.pow(doublings)).min(ACCEPT_PAUSE_MAX)
    }

    /// An `accept` succeeded: says so once after failures.
    fn recovered(&mut self) {
        if self.streak > 0 {
            tracing::info!(failures = self.streak, "accepting local connections again");
            self.streak = 0;
        }
    }
}

/// Raises this process's soft limit on open files (RLIMIT_NOFILE) to its
/// hard limit, as Go and many daemons do: each client connection takes a
/// descriptor, and the soft default (1,024 under systemd) is below what
/// `max_clients` connections need. Logs the result at debug, and one
/// warning when the limit stays below `max_clients` plus
/// `metrics_connections` (what the metrics listener may hold; 0 when it is
/// off) plus [`FD_MARGIN`]. Returns the soft limit now in force (`None`:
/// unlimited).
pub fn raise_fd_limit(max_clients: usize, metrics_connections: usize) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let mut limit = before.current;
    if before.current.is_some() && before.current != before.maximum {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        ) {
            Ok(()) => limit = getrlimit(Resource::Nofile).current,
            Err(e) => tracing::debug!(error = %e, "cannot raise the soft limit on open files"),
        }
    }
    let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
    tracing::debug!(
        soft_before = %show(before.current),
        soft = %show(limit),
        hard = %show(before.maximum),
        "limit on open files (RLIMIT_NOFILE)"
    );
    if let Some(needed) = fd_shortfall(limit, max_clients, metrics_connections) {
        let metrics = match metrics_connections {
            0 => String::new(),
            n => format!(" + {n} for the metrics listener (Z4J_METRICS_ADDR)"),
        };
        tracing::warn!(
            limit = %show(limit),
            max_clients,
            metrics_connections,
            needed,
            "the limit on open files (RLIMIT_NOFILE) is {}, below the {needed} that Z4J_MAX_CLIENTS={max_clients} connections need ({max_clients}{metrics} + {FD_MARGIN} for the daemon itself): connections beyond it wait unanswered until a descriptor frees up; raise LimitNOFILE= in the systemd unit (ulimit -n elsewhere) to at least {needed}, or lower Z4J_MAX_CLIENTS",
            show(limit)
        );
    }
    limit
}

/// The descriptors `max_clients` local and `metrics` metrics connections
/// need, when `limit` is short of it.
fn fd_shortfall(limit: Option<u64>, max_clients: usize, metrics: usize) -> Option<u64> {
    let needed = max_clients as u64 + metrics as u64 + FD_MARGIN;
    limit.filter(|l| *l < needed).map(|_| needed)
}

/// Who is at the other end of a connection (`SO_PEERCRED`, read once at
/// accept); `u32::MAX` when the kernel does not say.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        let cred = stream.peer_cred().ok();
        Peer {
            uid: cred.map_or(u32::MAX, |c| c.uid()),
            gid: cred.map_or(u32::MAX, |c| c.gid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

impl Ingest {
    /// The `not_allowed` message for a peer whose uid/gid may not write
    /// (counted and logged), or `None`. The daemon's own user and root are
    /// always allowed: they own the spool anyway, and `status`, `doctor`
    /// and `/readyz` connect as them.
    fn not_allowed(&self, peer: Peer) -> Option<String> {
        let Peer { uid, gid, pid } = peer;
        let allowed = uid == self.own_uid
            || uid == 0
            || ((self.config.allowed_uids.is_empty() || self.config.allowed_uids.contains(&uid))
                && (self.config.allowed_gids.is_empty()
                    || self.config.allowed_gids.contains(&gid)));
        if allowed {
            return None;
        }
        self.status.refuse("not_allowed", 1);
        tracing::warn!(
            uid,
            gid,
            pid,
            "refused a local client whose uid/gid is not allowed"
        );
        Some(format!("uid {uid} / gid {gid} may not write to this daemon; add it to Z4J_ALLOWED_UIDS or Z4J_ALLOWED_GIDS"))
    }
}

/// Answers a connection the daemon will not serve with one `error`, in the
/// client's framing (from its first byte, if one comes within 1 s), then
/// closes it without resetting it.
async fn refuse_connection(stream: UnixStream, code: &str, message: &str) {
    let (mut rd, mut wr) = stream.into_split();
    let mut first = [0u8; 1];
    let framing = match tokio::time::timeout(Duration::from_secs(1), rd.read(&mut first)).await {
        Ok(Ok(1)) => Framing::detect(first[0]),
        _ => Framing::JsonLines,
    };
    let m = error_reply(code, message, None, None);
    let wrote = tokio::time::timeout(Duration::from_secs(1), async {
        wr.write_all(&framing.encode(&m)).await?;
        wr.shutdown().await
    })
    .await;
    if matches!(wrote, Ok(Ok(()))) {
        linger(&mut rd).await;
    }
}

/// An `error` reply: what the client sent wrong (`code`, `message`), and
/// which message (`ack_id`) and event (`index`) when known.
pub(crate) fn error_reply(
    code: &str,
    message: &str,
    ack_id: Option<&Value>,
    index: Option<usize>,
) -> Value {
    let mut m = Value::empty_map();
    m.insert("type", "error");
    m.insert("code", code);
    m.insert("message", message);
    if let Some(a) = ack_id {
        m.insert("ack_id", a.clone());
    }
    if let Some(i) = index {
        m.insert("index", i as u64);
    }
    m
}

/// After an error reply and the end of the daemon's side of the stream:
/// reads and discards what the client still sends, until it closes its
/// side, for at most [`LINGER`] and [`LINGER_BYTES`].
async fn linger(rd: &mut tokio::net::unix::OwnedReadHalf) {
    let mut buf = [0u8; 8192];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn write_replies(
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
    queued: Arc<QueuedBytes>,
}

/// Bytes of one connection's queued replies, ordinary and larger apart.
#[derive(Default)]
struct QueuedBytes {
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
    fn taken(&self, len: usize) {
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

/// The reply side of one connection.
struct Replies {
    tx: ReplyQueue,
    framing: Framing,
    status: Arc<Stats>,
}

impl Replies {
    fn send(&self, v: &Value) {
        if self.tx.try_send(self.framing.encode(v)).is_err() {
            self.status.replies_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn error(&self, code: &str, message: &str, ack_id: Option<&Value>, index: Option<usize>) {
        self.send(&error_reply(code, message, ack_id, index));
    }
}

/// One append waiting for its commit, in arrival order.
struct Pending {
    rx: oneshot::Receiver<Result<AppendOutcome, SpoolError>>,
    /// Events in this append (0 for an ack-only entry).
    events: usize,
    ack_id: Option<Value>,
    /// Kept only under the `block` policy, to retry what did not fit.
    retry: Option<Vec<Vec<u8>>>,
    /// Events stored by earlier attempts of this message (`block`).
    stored_before: usize,
    /// This message's share of [`IN_FLIGHT_KIB`], returned when it settles.
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

struct Session<'a> {
    ingest: &'a Ingest,
    id: u64,
    pid: Option<i32>,
    replies: Replies,
    pending: VecDeque<Pending>,
}

impl Session<'_> {
    async fn message(&mut self, msg: Value) {
        let status = &self.ingest.status;
        if let Some(size) = msg
            .get("ack_id")
            .and_then(|a| json_len_over(a, MAX_ACK_ID_BYTES))
        {
            // Every reply would echo it: refuse the message, and echo nothing.
            let events = match msg.get("type").and_then(Value::as_str) {
                Some("event") => 1,
                Some("events") => msg
                    .get("events")
                    .and_then(Value::as_array)
                    .map_or(0, <[Value]>::len),
                _ => 0,
            };
            status
                .events_received
                .fetch_add(events as u64, Ordering::Relaxed);
            status.refuse("bad_message", events.max(1) as u64);
            self.replies.error(
                "bad_message",
                &format!(
                    "the ack_id takes {size} bytes or more as JSON; it may take at most {MAX_ACK_ID_BYTES} (send a counter or a UUID). This message was not handled{}",
                    if events > 0 { ": none of its events was stored" } else { "" }
                ),
                None,
                None,
            );
            return;
        }
        let ack_id = msg.get("ack_id").cloned();
        let Some(kind) = msg.get("type").and_then(Value::as_str).map(str::to_owned) else {
            status.refuse("bad_message", 1);
            let what = if matches!(msg, Value::Map(_)) {
                "a message needs a string \"type\" (event, events, hello, ping, stats)".to_string()
            } else {
                format!("a message must be a map, got {}", msg.type_name())
            };
            self.replies
                .error("bad_message", &what, ack_id.as_ref(), None);
            return;
        };
        match kind.as_str() {
            "event" => {
                let now = OffsetDateTime::now_utc();
                status.events_received.fetch_add(1, Ordering::Relaxed);
                let (records, _) = self.validate(vec![msg], now, ack_id.as_ref(), false);
                self.store(records, ack_id).await;
            }
            "events" => {
                let now = OffsetDateTime::now_utc();
                let mut msg = msg;
                let events = match msg.remove("events") {
                    Some(Value::Array(items)) => items,
                    other => {
                        status.refuse("bad_message", 1);
                        self.replies.error(
                            "bad_message",
                            &format!(
                                "\"events\" must be a list of events, got {}",
                                other.map(|v| v.type_name()).unwrap_or("nothing")
                            ),
                            ack_id.as_ref(),
                            None,
                        );
                        return;
                    }
                };
                // Nothing of the decoded message is kept while the records
                // wait for the spool: only the records themselves.
                drop(msg);
                status
                    .events_received
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                let (records, _) = self.validate(events, now, ack_id.as_ref(), true);
                self.store(records, ack_id).await;
            }
            "hello" => {
                self.hello(&msg, ack_id.as_ref());
                if let Some(a) = ack_id {
                    let mut m = Value::empty_map();
                    m.insert("type", "hello_ack");
                    m.insert("ack_id", a);
                    m.insert("version", env!("CARGO_PKG_VERSION"));
                    m.insert("max_event_bytes", self.ingest.config.max_event_bytes as u64);
                    m.insert(
                        "max_message_bytes",
                        self.ingest.config.max_message_bytes as u64,
                    );
                    self.replies.send(&m);
                }
            }
            "ping" => {
                let mut m = Value::empty_map();
                m.insert("type", "pong");
                if let Some(a) = ack_id {
                    m.insert("ack_id", a);
                }
                self.replies.send(&m);
            }
            "command_result" => match self.ingest.router.on_result(self.id, &msg) {
                Ok(()) => {
                    if let Some(a) = ack_id {
                        let mut m = Value::empty_map();
                        m.insert("type", "ack");
                        m.insert("ack_id", a);
                        self.replies.send(&m);
                    }
                }
                Err(r) => {
                    status.refuse(r.code, 1);
                    self.replies
                        .error(r.code, &r.message, ack_id.as_ref(), None);
                }
            },
            "stats" => {
                let mut m = status.report(self.ingest.spool.stats());
                if let Some(a) = ack_id {
                    m.insert("ack_id", a);
                }
                self.replies.send(&m);
            }
            other => {
                status.refuse("unknown_type", 1);
                self.replies.error(
                    "unknown_type",
                    &format!(
                        "unknown message type {}; this daemon accepts event, events, hello, ping, stats and command_result",
                        excerpt(other)
                    ),
                    ack_id.as_ref(),
                    None,
                );
            }
        }
    }

    fn validate(
        &self,
        events: Vec<Value>,
        now: OffsetDateTime,
        ack_id: Option<&Value>,
        indexed: bool,
    ) -> (Vec<Vec<u8>>, usize) {
        let mut records = Vec::with_capacity(events.len());
        let mut refused = 0;
        let mut notes = Notes::default();
        for (i, e) in events.into_iter().enumerate() {
            match normalize_event_noting(e, now, self.ingest.config.max_event_bytes, &mut notes) {
                Ok(r) => records.push(r),
                Err(Refusal { code, message }) => {
                    refused += 1;
                    self.ingest.status.refuse(code, 1);
                    self.replies
                        .error(code, &message, ack_id, indexed.then_some(i));
                }
            }
        }
        if notes.time_corrected > 0 {
            self.ingest.status.time_corrected(notes.time_corrected);
        }
        let n = records.len() as u64;
        self.ingest
            .status
            .update_client(self.id, |c| c.events_received += n);
        (records, refused)
    }

    async fn store(&mut self, records: Vec<Vec<u8>>, ack_id: Option<Value>) {
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
                    stored_before: 0,
                    _budget: None,
                });
            }
            return;
        }
        let budget = self.reserve(&records).await;
        let retry = (self.ingest.spool.overflow() == Overflow::Block).then(|| records.clone());
        let events = records.len();
        match self.ingest.spool.append(records).await {
            Ok(rx) => self.pending.push_back(Pending {
                rx,
                events,
                ack_id,
                retry,
                stored_before: 0,
                _budget: budget,
            }),
            Err(e) => {
                self.ingest.status.refuse(e.code(), events as u64);
                self.replies
                    .error(e.code(), &e.to_string(), ack_id.as_ref(), None);
            }
        }
    }

    /// Takes `records`' share of the in-flight budget. Past this
    /// connection's share ([`CONNECTION_IN_FLIGHT_KIB`]), or while the
    /// budget is short, settle this connection's own earlier messages first
    /// (they hold part of it), and only wait for the others' once none is
    /// left: whoever waits holds nothing, so the budget always drains.
    async fn reserve(&mut self, records: &[Vec<u8>]) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let bytes: usize = records.iter().map(Vec::len).sum();
        let kib = (bytes / 1024 + 1).min(IN_FLIGHT_KIB) as u32;
        while !self.pending.is_empty() && self.held_kib() + kib as usize > CONNECTION_IN_FLIGHT_KIB
        {
            self.settle_front().await;
        }
        loop {
            match self.ingest.in_flight.clone().try_acquire_many_owned(kib) {
                Ok(p) => return Some(p),
                Err(tokio::sync::TryAcquireError::Closed) => return None,
                Err(tokio::sync::TryAcquireError::NoPermits) => {}
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
            .filter_map(|p| p._budget.as_ref())
            .map(|b| b.num_permits())
            .sum()
    }

    async fn settle_front(&mut self) {
        if let Some(mut p) = self.pending.pop_front() {
            let r = (&mut p.rx).await.unwrap_or(Err(SpoolError::Closed));
            self.settled(p, r).await;
        }
    }

    async fn settled(&mut self, mut p: Pending, r: Result<AppendOutcome, SpoolError>) {
        match r {
            Ok(o) if o.refused_full > 0 && p.retry.is_some() => {
                // `block`: wait for room, then retry what did not fit. This
                // connection reads nothing meanwhile, which is the back-pressure.
                let mut rest = p.retry.take().unwrap_or_default();
                rest.drain(..o.stored.min(rest.len()));
                let events = rest.len();
                let stored_before = p.stored_before + o.stored;
                let spool = &self.ingest.spool;
                self.ingest
                    .status
                    .producer_waits
                    .fetch_add(1, Ordering::Relaxed);
                let _ = tokio::time::timeout(
                    Duration::from_millis(250),
                    spool.space_freed().notified(),
                )
                .await;
                match spool.append(rest.clone()).await {
                    Ok(rx) => {
                        self.pending.push_front(Pending {
                            rx,
                            events,
                            ack_id: p.ack_id,
                            retry: Some(rest),
                            stored_before,
                            _budget: p._budget,
                        });
                        // Settle it before anything later, to keep acks in order.
                        Box::pin(self.settle_front()).await;
                    }
                    Err(e) => {
                        self.ingest.status.refuse(e.code(), events as u64);
                        self.replies
                            .error(e.code(), &e.to_string(), p.ack_id.as_ref(), None)
                    }
                }
            }
            Ok(o) => {
                if o.refused_full > 0 {
                    self.replies.error(
                        "spool_full",
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
            Err(e) => {
                self.ingest.status.refuse(e.code(), p.events as u64);
                self.replies
                    .error(e.code(), &e.to_string(), p.ack_id.as_ref(), None);
            }
        }
    }

    fn hello(&self, msg: &Value, ack_id: Option<&Value>) {
        let str_field = |k: &str| {
            msg.get(k)
                .and_then(Value::as_str)
                .map(|s| truncate_chars(s, MAX_LABEL_CHARS))
        };
        let names = |v: Option<&Value>, max_len: usize| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s.len() <= max_len)
                        .take(64)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut engines: Vec<String> = names(msg.get("engines"), usize::MAX)
            .into_iter()
            .filter(|e| crate::protocol::limits::engine_name_fits(e))
            .collect();
        let mut capabilities: BTreeMap<String, Vec<String>> = BTreeMap::new();
        match msg.get("capabilities") {
            None | Some(Value::Null) => {}
            Some(Value::Map(entries)) => {
                for (engine, actions) in entries.iter().take(64) {
                    let engine = engine.trim();
                    if !crate::protocol::limits::engine_name_fits(engine)
                        || !matches!(actions, Value::Array(_))
                    {
                        self.ingest.status.refuse("bad_message", 1);
                        self.replies.error(
                            "bad_message",
                            &format!("hello: capabilities must map engine names (1-40 characters) to lists of action names; {} was ignored", excerpt(engine)),
                            ack_id,
                            None,
                        );
                        continue;
                    }
                    let mut list = names(Some(actions), 80);
                    list.sort();
                    list.dedup();
                    capabilities.insert(engine.to_string(), list);
                }
            }
            Some(other) => {
                self.ingest.status.refuse("bad_message", 1);
                self.replies.error(
                    "bad_message",
                    &format!(
                        "hello: capabilities must be a map of engine -> list of actions, got {}",
                        other.type_name()
                    ),
                    ack_id,
                    None,
                )
            }
        }
        engines.extend(capabilities.keys().cloned());
        engines.sort();
        engines.dedup();
        let runtime_features = names(msg.get("runtime_features"), 64);
        let process = str_field("process");
        let framework = str_field("framework");
        let worker_role = str_field("worker_role");
        tracing::info!(
            client = self.id,
            process = process.as_deref().unwrap_or("-"),
            engines = ?engines,
            capabilities = ?capabilities,
            "client registered"
        );
        self.ingest.router.register(
            self.id,
            crate::commands::ClientHandle {
                tx: self.replies.tx.clone(),
                framing: self.replies.framing,
                capabilities: capabilities.clone(),
                pid: self.pid,
                process: process.clone(),
            },
        );
        let mut changed = false;
        self.ingest.status.update_client(self.id, |c| {
            c.process = process;
            c.framework = framework;
            c.worker_role = worker_role;
            changed = c.engines != engines
                || c.capabilities != capabilities
                || c.runtime_features != runtime_features;
            c.engines = engines;
            c.capabilities = capabilities;
            c.runtime_features = runtime_features;
        });
        if changed {
            self.ingest.status.clients_changed.notify_one();
        }
    }
}

/// `Some(n)` when `v` written as JSON takes more than `limit` bytes (`n`
/// is where counting stopped, past the limit); `None` when it fits. Counts
/// without writing, and stops as soon as the limit is passed. Integers
/// count their digits, floats 24 (the longest), strings their bytes plus
/// quotes (escapes not included).
fn json_len_over(v: &Value, limit: usize) -> Option<usize> {
    fn digits(u: u64) -> usize {
        u.checked_ilog10().map_or(1, |l| l as usize + 1)
    }
    fn walk(v: &Value, total: &mut usize, limit: usize) -> bool {
        *total += match v {
            Value::Null | Value::Bool(_) => 5,
            Value::Int(i) => usize::from(*i < 0) + digits(i.unsigned_abs()),
            Value::UInt(u) => digits(*u),
            Value::Float(_) => 24,
            Value::Str(s) => s.len() + 2,
            Value::Array(items) => {
                *total += 2 + items.len();
                for i in items {
                    if !walk(i, total, limit) {
                        return false;
                    }
                }
                0
            }
            Value::Map(entries) => {
                *total += 2 + entries.len();
                for (k, i) in entries {
                    *total += k.len() + 3;
                    if *total > limit || !walk(i, total, limit) {
                        return false;
                    }
                }
                0
            }
        };
        *total <= limit
    }
    let mut total = 0;
    (!walk(v, &mut total, limit)).then_some(total)
}

/// The first `max` characters of `s`.
fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostEnv;
    use crate::spool::{Spool, SpoolConfig, Synchronous};

    /// A served ingest on a temp socket, with a short partial-message timeout.
    async fn served(
        dir: &std::path::Path,
        timeout: Duration,
    ) -> (PathBuf, Arc<Stats>, Spool, CancellationToken) {
        served_with(dir, timeout, DEFAULT_MAX_MESSAGE_BYTES).await
    }

    /// [`served`] with another message limit (and so another message
    /// budget), and room in the spool for a few megabytes.
    async fn served_with(
        dir: &std::path::Path,
        timeout: Duration,
        max_message_bytes: usize,
    ) -> (PathBuf, Arc<Stats>, Spool, CancellationToken) {
        let spool = Spool::open(SpoolConfig {
            path: dir.join("spool.sqlite"),
            max_events: 100_000,
            max_bytes: 64 << 20,
            overflow: Overflow::DropOldest,
            synchronous: Synchronous::Normal,
        })
        .unwrap();
        let socket = dir.join("agent.sock");
        let status = Arc::new(Stats::new());
        let (router, _results) = crate::commands::Router::new(status.clone());
        let ingest = Ingest::new(
            IngestConfig {
                socket_path: socket.clone(),
                allowed_uids: vec![],
                allowed_gids: vec![],
                max_clients: 8,
                max_message_bytes,
                max_event_bytes: 64 * 1024,
                partial_message_timeout: timeout,
                remove_socket_on_exit: true,
            },
            spool.handle(),
            status.clone(),
            router,
        );
        let listener = bind(&socket, 0o600).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(ingest.serve(listener, stop.clone(), crate::watchdog::Beat::unwatched()));
        (socket, status, spool, stop)
    }

    async fn read_one(s: &mut UnixStream) -> Value {
        use tokio::io::AsyncReadExt;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        rmp_serde::from_slice(&body).unwrap()
    }

    fn framed(msg: &serde_json::Value) -> Vec<u8> {
        let body = rmp_serde::to_vec_named(msg).unwrap();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[tokio::test]
    async fn a_4_gib_length_prefix_is_refused_at_once_without_allocating() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let mut s = UnixStream::connect(&socket).await.unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("message_too_large")
        );
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the connection is closed")
            .unwrap();
        assert_eq!(status.refused().get("message_too_large"), Some(&1));
        stop.cancel();
        spool.close().await;
    }

    /// Writes `first`, waits until the daemon has answered and closed its
    /// side, writes `more` (which must still go through), then reads the
    /// error and the end of the stream.
    async fn refused_while_writing(s: &mut UnixStream, first: &[u8], more: &[u8]) -> Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(more)
            .await
            .expect("a refused client's writes are not reset before it can read why");
        let reply = read_one(s).await;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the connection is closed")
            .expect("closed cleanly, not reset");
        reply
    }

    #[tokio::test]
    async fn a_client_closed_for_an_error_that_keeps_writing_still_reads_why() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, _status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        // A 4 GiB length prefix, and more of that message afterwards.
        let mut s = UnixStream::connect(&socket).await.unwrap();
        let mut first = u32::MAX.to_be_bytes().to_vec();
        first.extend_from_slice(&[0x80; 4096]);
        let reply = refused_while_writing(&mut s, &first, &[0x80; 4096]).await;
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("message_too_large")
        );
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn a_client_refused_at_the_door_that_keeps_writing_still_reads_why() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, _status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let ping = framed(&serde_json::json!({"type": "ping"}));
        // More connections than the limit (8).
        let mut kept = Vec::new();
        for _ in 0..8 {
            let mut c = crate::client::Client::connect(&socket).await.unwrap();
            c.ping().await.unwrap();
            kept.push(c);
        }
        let mut s = UnixStream::connect(&socket).await.unwrap();
        let reply = refused_while_writing(&mut s, &ping, &ping).await;
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("too_many_clients")
        );
        stop.cancel();
        spool.close().await;
    }

    /// One `events` message of `n` events of about 1 KB, with `ack_id`.
    fn batch(tag: &str, n: usize, ack_id: u64) -> serde_json::Value {
        let events: Vec<_> = (0..n)
            .map(|i| {
                serde_json::json!({"engine": "celery", "kind": "task.received",
                    "task_id": format!("{tag}-{i}"), "data": {"pad": "p".repeat(1000)}})
            })
            .collect();
        serde_json::json!({"type": "events", "events": events, "ack_id": ack_id})
    }

    #[tokio::test]
    async fn an_ack_id_over_the_limit_is_refused_not_echoed_and_the_connection_goes_on() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let mut s = UnixStream::connect(&socket).await.unwrap();
        // Every reply echoes the ack_id: 250 pings with a 4 MiB one held
        // about 1 GB of replies for a client that did not read them.
        let huge = "a".repeat(4 << 20);
        s.write_all(&framed(
            &serde_json::json!({"type": "ping", "ack_id": huge}),
        ))
        .await
        .unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("bad_message")
        );
        assert!(reply.get("ack_id").is_none(), "not echoed");
        let msg = reply.get("message").and_then(Value::as_str).unwrap();
        assert!(msg.contains("ack_id") && msg.contains("256"), "{msg}");
        assert!(framed(&serde_json::json!(reply.clone())).len() < 1024);

        // An events message with one: none of its events is stored, each is counted.
        let mut events = batch("big-ack", 3, 0);
        events["ack_id"] = serde_json::json!({"k": "b".repeat(300)});
        s.write_all(&framed(&events)).await.unwrap();
        let reply = read_one(&mut s).await;
        let msg = reply.get("message").and_then(Value::as_str).unwrap();
        assert!(msg.contains("none of its events was stored"), "{msg}");
        assert_eq!(status.refused().get("bad_message"), Some(&4));

        // At the limit, it is echoed as sent.
        let longest = "c".repeat(MAX_ACK_ID_BYTES - 2);
        s.write_all(&framed(
            &serde_json::json!({"type": "ping", "ack_id": longest}),
        ))
        .await
        .unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(reply.get("type").and_then(Value::as_str), Some("pong"));
        assert_eq!(
            reply.get("ack_id").and_then(Value::as_str),
            Some(longest.as_str())
        );
        s.write_all(&framed(&batch("ok", 2, 7))).await.unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(reply.get("stored").and_then(Value::as_u64), Some(2));
        assert_eq!(spool.handle().stats().depth.load(Ordering::Relaxed), 2);
        stop.cancel();
        spool.close().await;
    }

    #[test]
    fn the_ack_id_size_is_counted_without_writing_it_and_stops_early() {
        let small: Value = serde_json::from_str(r#"{"n":[1,2.5,null,"x"]}"#).unwrap();
        assert_eq!(json_len_over(&small, 64), None);
        assert!(json_len_over(&small, 30).is_some());
        assert_eq!(json_len_over(&Value::from(12345u64), 5), None);
        assert_eq!(json_len_over(&Value::from(-12345i64), 5), Some(6));
        assert!(json_len_over(&Value::from("x".repeat(300)), 256).is_some());
        // A wide value: counting stops once past the limit (here at once:
        // the separators alone are over it).
        let wide = Value::Array(vec![Value::Null; 1_000_000]);
        assert_eq!(json_len_over(&wide, 256), Some(2 + 1_000_000 + 5));
        // Never under the real length for what clients send as ack ids.
        for v in [
            Value::from(u64::MAX),
            Value::from(-1i64),
            Value::from("0193a1b2-8c44-7d1e-9f00-123456789abc"),
        ] {
            let real = serde_json::to_vec(&v).unwrap().len();
            assert!(json_len_over(&v, real - 1).is_some(), "{v:?}");
        }
    }

    #[tokio::test]
    async fn a_reply_queue_holds_at_most_its_bytes_and_small_replies_pass_a_large_one() {
        let (q, rx) = ReplyQueue::new();
        let small = vec![b'x'; MAX_ACK_ID_BYTES];
        for _ in 0..REPLY_QUEUE {
            q.try_send(small.clone()).unwrap();
        }
        assert_eq!(q.queued_bytes(), REPLY_QUEUE_BYTES);
        assert!(
            q.try_send(vec![b'y'; 1]).is_err(),
            "full in bytes and in count"
        );
        // The writer takes them: the bytes come back.
        let queued = q.queued.clone();
        let (mut ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (_rd, wr) = theirs.into_split();
        let writer = tokio::spawn(write_replies(wr, rx, queued));
        let mut got = vec![0u8; REPLY_QUEUE_BYTES];
        ours.read_exact(&mut got).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while q.queued_bytes() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        drop(q);
        writer.await.unwrap();
        // One larger reply (a stats report) goes even beyond the byte bound,
        // and a second waits its turn: it is dropped. Ordinary replies have
        // their own room: a pong behind a large stats report still goes.
        let (q, rx) = ReplyQueue::new();
        q.try_send(vec![b'z'; 3 * REPLY_QUEUE_BYTES]).unwrap();
        assert!(q.try_send(vec![b'z'; ORDINARY_REPLY_BYTES + 1]).is_err());
        q.try_send(small.clone()).unwrap();
        assert_eq!(q.queued_bytes(), 3 * REPLY_QUEUE_BYTES + MAX_ACK_ID_BYTES);
        // Larger replies that fit together go together.
        let (q2, _rx2) = ReplyQueue::new();
        for _ in 0..REPLY_QUEUE_BYTES / 2048 {
            q2.try_send(vec![b'w'; 2048]).unwrap();
        }
        assert!(q2.try_send(vec![b'w'; 2048]).is_err());
        drop((q, rx, ours));
    }

    #[tokio::test]
    async fn a_large_stats_report_does_not_crowd_out_the_replies_behind_it() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        // A client declaring many actions makes the stats report large
        // (as 1,000 connected clients do): over 64 KiB.
        let mut big = crate::client::Client::connect(&socket).await.unwrap();
        let actions: Vec<String> = (0..60)
            .map(|i| format!("action_{i:03}_{}", "a".repeat(60)))
            .collect();
        let caps: BTreeMap<String, Vec<String>> = (0..30)
            .map(|e| (format!("engine{e}"), actions.clone()))
            .collect();
        big.write_raw(
            &serde_json::from_value(
                serde_json::json!({"type": "hello", "capabilities": caps, "ack_id": 1}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(
            big.read_reply()
                .await
                .unwrap()
                .get("type")
                .and_then(Value::as_str),
            Some("hello_ack")
        );
        // Stats, then pings, sent at once and read afterwards: every reply
        // comes, in order.
        let mut s = UnixStream::connect(&socket).await.unwrap();
        let mut burst = framed(&serde_json::json!({"type": "stats"}));
        for i in 0..10 {
            burst.extend(framed(&serde_json::json!({"type": "ping", "ack_id": i})));
        }
        for _ in 0..20 {
            s.write_all(&burst).await.unwrap();
            let stats = read_one(&mut s).await;
            assert!(framed(&serde_json::json!(stats)).len() > REPLY_QUEUE_BYTES);
            for i in 0..10u64 {
                let pong = tokio::time::timeout(Duration::from_secs(5), read_one(&mut s))
                    .await
                    .expect("the pong behind the stats report came");
                assert_eq!(pong.get("ack_id").and_then(Value::as_u64), Some(i));
            }
        }
        assert_eq!(status.replies_dropped.load(Ordering::Relaxed), 0);
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn a_client_that_never_reads_gets_its_replies_dropped_and_counted_not_queued() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let mut deaf = UnixStream::connect(&socket).await.unwrap();
        // `stats` replies are a few KB each: 256 of them held about 1 MB.
        let ask = framed(&serde_json::json!({"type": "stats", "ack_id": "s".repeat(200)}));
        for _ in 0..2_000 {
            deaf.write_all(&ask).await.unwrap();
        }
        let mut other = crate::client::Client::connect(&socket).await.unwrap();
        // Once all 2,000 are handled (the count stops moving), what was not
        // dropped sits in the kernel's socket buffer or in the queue.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (mut last, mut still) = (u64::MAX, 0);
        let (dropped, reply_len) = loop {
            let stats = tokio::time::timeout(Duration::from_secs(2), other.stats())
                .await
                .expect("another client is served at once")
                .unwrap();
            let dropped = stats
                .get("replies_dropped")
                .and_then(Value::as_u64)
                .unwrap();
            still = if dropped == last { still + 1 } else { 0 };
            last = dropped;
            if dropped > 0 && still == 10 {
                break (dropped, framed(&serde_json::json!(stats)).len() as u64);
            }
            assert!(tokio::time::Instant::now() < deadline, "{dropped} dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let kernel: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(212_992);
        let held = (2_000 - dropped) * reply_len;
        eprintln!("{dropped} of 2,000 replies of {reply_len} bytes dropped; {held} bytes held");
        // 256 replies of this size (the old count-only bound) would be 300 KB.
        assert!(
            held <= REPLY_QUEUE_BYTES as u64 + kernel + 2 * reply_len,
            "{held} bytes of replies held for a client that does not read"
        );
        assert!(status.replies_dropped.load(Ordering::Relaxed) > 1_000);
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_messages_over_the_message_budget_wait_and_all_get_through() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        // Messages up to 256 KiB: a pool of 256 KiB and one slot, beyond
        // each connection's free 64 KiB.
        let (socket, status, spool, stop) =
            served_with(dir.path(), Duration::from_secs(30), 256 << 10).await;
        let mut tasks = Vec::new();
        // Eight clients, half MessagePack and half JSON lines, each sending
        // three messages of about 200 KB in 4 KiB writes, all at once:
        // about 2.4 MB of messages for a budget of 512 KiB.
        for c in 0..8u64 {
            let mut s = UnixStream::connect(&socket).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let json = c % 2 == 1;
                for m in 0..3u64 {
                    let msg = batch(&format!("c{c}-m{m}"), 190, m);
                    let bytes = if json {
                        let mut b = serde_json::to_vec(&msg).unwrap();
                        b.push(b'\n');
                        b
                    } else {
                        framed(&msg)
                    };
                    assert!(bytes.len() > 190_000 && bytes.len() < 256 << 10);
                    for piece in bytes.chunks(4096) {
                        s.write_all(piece).await.unwrap();
                    }
                }
                let (rd, _wr) = s.into_split();
                let mut lines = tokio::io::BufReader::new(rd);
                let mut stored = 0;
                for _ in 0..3 {
                    let reply: serde_json::Value = if json {
                        use tokio::io::AsyncBufReadExt;
                        let mut line = String::new();
                        lines.read_line(&mut line).await.unwrap();
                        serde_json::from_str(&line).unwrap()
                    } else {
                        let mut len = [0u8; 4];
                        lines.read_exact(&mut len).await.unwrap();
                        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                        lines.read_exact(&mut body).await.unwrap();
                        rmp_serde::from_slice(&body).unwrap()
                    };
                    assert_eq!(reply["type"], "ack", "{reply}");
                    stored += reply["stored"].as_u64().unwrap();
                }
                stored
            }));
        }
        let mut stored = 0;
        for t in tasks {
            stored += tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("no client waits for ever")
                .unwrap();
        }
        assert_eq!(stored, 8 * 3 * 190);
        assert_eq!(
            spool.handle().stats().depth.load(Ordering::Relaxed),
            8 * 3 * 190
        );
        assert!(
            status.message_budget_waits.load(Ordering::Relaxed) > 0,
            "the budget was short: some connection waited"
        );
        assert_eq!(status.refused_total(), 0);
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_the_budget_is_not_silence_and_clients_that_stall_holding_it_are_timed_out()
    {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) =
            served_with(dir.path(), Duration::from_millis(600), 256 << 10).await;
        // Two clients take the whole budget: each announces a message of
        // 250 KiB, sends 200 KiB of it, then one byte every 300 ms for 1.5 s
        // (each resets its timeout), then stops.
        let mut hogs = Vec::new();
        for _ in 0..2 {
            let mut s = UnixStream::connect(&socket).await.unwrap();
            let mut part = (250u32 << 10).to_be_bytes().to_vec();
            part.extend(std::iter::repeat_n(0xc0, 200 << 10));
            s.write_all(&part).await.unwrap();
            hogs.push(tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    s.write_all(&[0xc0]).await.unwrap();
                }
                read_one(&mut s).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Four more, each with one large message: they wait, unread, for
        // more than twice the partial-message timeout, and are not timed
        // out for it.
        let started = std::time::Instant::now();
        let mut waiting = Vec::new();
        for c in 0..4 {
            let mut s = UnixStream::connect(&socket).await.unwrap();
            let msg = framed(&batch(&format!("w{c}"), 150, 1));
            waiting.push(tokio::spawn(async move {
                s.write_all(&msg).await.unwrap();
                read_one(&mut s).await
            }));
        }
        for h in hogs {
            let reply = tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                reply.get("code").and_then(Value::as_str),
                Some("incomplete_message")
            );
        }
        for w in waiting {
            let reply = tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                reply.get("type").and_then(Value::as_str),
                Some("ack"),
                "{reply:?}"
            );
            assert_eq!(reply.get("stored").and_then(Value::as_u64), Some(150));
        }
        assert!(started.elapsed() >= Duration::from_millis(1_500));
        assert_eq!(status.refused().get("incomplete_message"), Some(&2));
        assert!(status.message_budget_waits.load(Ordering::Relaxed) >= 4);
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn malformed_messagepack_gets_an_error_and_the_connection_goes_on() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let mut s = UnixStream::connect(&socket).await.unwrap();
        // A well-framed body that is not MessagePack (0xc1 is never used).
        s.write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await.unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("bad_message")
        );
        s.write_all(&framed(&serde_json::json!({"type": "ping"})))
            .await
            .unwrap();
        let reply = read_one(&mut s).await;
        assert_eq!(reply.get("type").and_then(Value::as_str), Some("pong"));
        assert_eq!(status.refused().get("bad_message"), Some(&1));
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_told_why_and_the_others_are_served() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        // The limit here is 8; open 40 at once.
        let mut conns = Vec::new();
        for _ in 0..40 {
            let mut s = UnixStream::connect(&socket).await.unwrap();
            s.write_all(&framed(&serde_json::json!({"type": "ping"})))
                .await
                .unwrap();
            conns.push(s);
        }
        let (mut served_n, mut refused_n) = (0, 0);
        for s in conns.iter_mut() {
            let reply = tokio::time::timeout(Duration::from_secs(5), read_one(s))
                .await
                .expect("every connection gets an answer");
            match reply.get("type").and_then(Value::as_str) {
                Some("pong") => served_n += 1,
                Some("error") => {
                    assert_eq!(
                        reply.get("code").and_then(Value::as_str),
                        Some("too_many_clients")
                    );
                    refused_n += 1;
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
        assert_eq!((served_n, refused_n), (8, 32));
        assert_eq!(status.refused().get("too_many_clients"), Some(&32));
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn half_a_message_then_silence_gets_an_error_and_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_millis(300)).await;
        // A length prefix announcing 100 bytes, then 10 of them.
        let mut half = UnixStream::connect(&socket).await.unwrap();
        half.write_all(&100u32.to_be_bytes()).await.unwrap();
        half.write_all(&[0x80; 10]).await.unwrap();
        // An idle connection between messages is left alone.
        let mut idle = crate::client::Client::connect(&socket).await.unwrap();
        idle.ping().await.unwrap();

        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut reply))
            .await
            .expect("closed after the timeout")
            .unwrap();
        let body: Value = rmp_serde::from_slice(&reply[4..]).unwrap();
        assert_eq!(
            body.get("code").and_then(Value::as_str),
            Some("incomplete_message")
        );
        let msg = body.get("message").and_then(Value::as_str).unwrap();
        assert!(msg.contains("14 bytes") && msg.contains("length"), "{msg}");
        assert_eq!(status.refused().get("incomplete_message"), Some(&1));

        tokio::time::sleep(Duration::from_millis(500)).await;
        idle.ping()
            .await
            .expect("the idle connection is still served");
        stop.cancel();
        spool.close().await;
    }

    #[tokio::test]
    async fn past_a_few_dozen_refusals_at_once_the_extra_connections_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let (socket, status, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        // The limit here is 8: fill it.
        let mut kept = Vec::new();
        for _ in 0..8 {
            let mut c = crate::client::Client::connect(&socket).await.unwrap();
            c.ping().await.unwrap();
            kept.push(c);
        }
        // 40 more that send nothing: each refusal waits up to 1 s for a
        // first byte (to answer in the client's framing), holding its socket.
        let mut extra = Vec::new();
        for _ in 0..40 {
            extra.push(UnixStream::connect(&socket).await.unwrap());
        }
        let (mut told, mut closed) = (0, 0);
        for s in extra.iter_mut() {
            let mut reply = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
                .await
                .expect("every extra connection is closed")
                .unwrap();
            if reply.is_empty() {
                closed += 1;
            } else {
                let text = String::from_utf8_lossy(&reply);
                assert!(text.contains("too_many_clients"), "{text}");
                told += 1;
            }
        }
        assert_eq!(
            (told, closed),
            (REFUSALS_IN_FLIGHT, 40 - REFUSALS_IN_FLIGHT)
        );
        assert_eq!(status.refused().get("too_many_clients"), Some(&40));
        for c in kept.iter_mut() {
            c.ping().await.expect("the served connections go on");
        }
        stop.cancel();
        spool.close().await;
    }

    #[test]
    fn a_descriptor_limit_below_the_clients_plus_a_margin_is_reported() {
        assert_eq!(fd_shortfall(Some(1024), 1024, 0), Some(1024 + FD_MARGIN));
        assert_eq!(
            fd_shortfall(Some(1024 + FD_MARGIN - 1), 1024, 0),
            Some(1088)
        );
        assert_eq!(fd_shortfall(Some(1024 + FD_MARGIN), 1024, 0), None);
        assert_eq!(fd_shortfall(Some(1024 + FD_MARGIN), 1024, 17), Some(1105));
        assert_eq!(fd_shortfall(Some(524_288), 1024, 17), None);
        assert_eq!(fd_shortfall(None, 65_536, 17), None);
        assert_eq!(fd_shortfall(Some(256), 100, 0), None);
    }

    #[test]
    fn failed_accepts_back_off_up_to_a_quarter_second_and_reset() {
        let e = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let mut f = AcceptFailures::default();
        let pauses: Vec<u64> = (0..8)
            .map(|_| f.failed(&e, 1024, 0, 0).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 250, 250, 250]);
        // One warning for the whole streak (the next one is 10 s away).
        assert_eq!(f.unreported, 7);
        f.recovered();
        assert_eq!(f.failed(&e, 1024, 0, 0), ACCEPT_PAUSE_MIN);
    }

    #[test]
    fn clients_prefer_the_host_wide_socket_when_it_exists() {
        let t = tempfile::tempdir().unwrap();
        let system = t.path().join("system.sock");
        let host = HostEnv {
            tmpdir: t.path().to_path_buf(),
            uid: 1000,
            xdg_runtime_dir: Some(PathBuf::from("/run/user/1000")),
            ..HostEnv::default()
        };
        assert_eq!(
            client_socket_path_with(&host, &system),
            PathBuf::from("/run/user/1000/z4j/agent.sock")
        );
        std::fs::write(&system, b"").unwrap();
        assert_eq!(client_socket_path_with(&host, &system), system);
        // The daemon's own service environment means: use what run binds.
        let service = HostEnv {
            runtime_directory: Some(PathBuf::from("/run/z4j-agentd")),
            ..host
        };
        assert_eq!(
            client_socket_path_with(&service, &system),
            PathBuf::from("/run/z4j-agentd/agent.sock")
        );
    }
}
