//! Admission: the accept loop, who may connect, and refusal at the door.
//!
//! Owns accepting (with a backed-off pause while `accept` fails, mostly
//! for want of file descriptors), the peer's credentials and the uid/gid
//! allow-list, the `max_clients` slots, and the one `error` a connection
//! refused at the door gets before it is closed.
//!
//! Invariants: the accept loop never waits on a client (each connection
//! and each refusal runs in its own task); an uid/gid that may not write is
//! refused before it takes a slot, so it cannot crowd out the ones who may;
//! every refusal is counted under its code, also those past
//! [`REFUSALS_IN_FLIGHT`] that are closed without a word.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::framing::Framing;
use super::handler::error_reply;
use super::Ingest;
use crate::refusal::RefusalCode;

/// Connections beyond `max_clients` being told `too_many_clients` at once;
/// past these, a connection beyond the limit is closed without a word.
pub(super) const REFUSALS_IN_FLIGHT: usize = 32;

/// How long accepting pauses after the first failed `accept`; it doubles
/// while accepting keeps failing, up to [`ACCEPT_PAUSE_MAX`].
pub(super) const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
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

impl Ingest {
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
        let door = Door {
            slots: Arc::new(Semaphore::new(self.config.max_clients)),
            refusing: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().release_memory_after_bursts(shutdown.clone()));
        let gateway = self.gateway.lock().unwrap().take();
        if let Some((listener, gateway)) = gateway {
            tasks.spawn(
                self.clone()
                    .serve_gateway(listener, gateway, shutdown.clone()),
            );
        }
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
                        self.admit(stream, &door, &mut tasks, &shutdown);
                    }
                    Err(e) => {
                        self.stats.accept_failures.fetch_add(1, Ordering::Relaxed);
                        let open = self.config.max_clients - door.slots.available_permits();
                        let metrics = self.stats.metrics_connections.load(Ordering::Relaxed);
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

    /// Serves an accepted connection in a task of its own, or refuses it:
    /// an uid/gid that may not write (checked before a slot is taken, so
    /// such connections cannot crowd out the ones who may), or no slot left.
    fn admit(
        self: &Arc<Self>,
        stream: UnixStream,
        door: &Door,
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        let peer = Peer::of(&stream);
        let permit = match self.not_allowed(peer) {
            Some(message) => Err((RefusalCode::NotAllowed, message)),
            None => door.slots.clone().try_acquire_owned().map_err(|_| {
                self.stats.refuse(RefusalCode::TooManyClients, 1);
                (RefusalCode::TooManyClients, format!(
                    "the daemon already serves {} connections (Z4J_MAX_CLIENTS); reuse one connection per process",
                    self.config.max_clients
                ))
            }),
        };
        match permit {
            Ok(permit) => {
                let me = self.clone();
                let token = shutdown.clone();
                tasks.spawn(async move {
                    me.connection(stream, peer, token).await;
                    drop(permit);
                });
            }
            // Each refusal holds a descriptor for up to 3 s: past a few
            // dozen at once, close at once.
            Err((code, message)) => {
                if let Ok(r) = door.refusing.clone().try_acquire_owned() {
                    tasks.spawn(refuse_connection(stream, code, message, r));
                }
            }
        }
    }
}

/// The accept loop's limits: connections served, refusals being told.
struct Door {
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
}

/// The accept loop's state while `accept` fails: the next pause, and the
/// rate limit of its warnings.
#[derive(Default)]
pub(super) struct AcceptFailures {
    /// Failures in a row.
    pub(super) streak: u64,
    /// Failures since the last warning.
    pub(super) unreported: u64,
    last_warning: Option<std::time::Instant>,
}

impl AcceptFailures {
    /// Records a failure; returns how long to pause accepting. `open` and
    /// `metrics` are the local and metrics connections open now: the
    /// warning says who holds the descriptors.
    pub(super) fn failed(
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
    pub(super) fn recovered(&mut self) {
        if self.streak > 0 {
            tracing::info!(failures = self.streak, "accepting local connections again");
            self.streak = 0;
        }
    }
}

/// Who is at the other end of a connection (`SO_PEERCRED`, read once at
/// accept); `u32::MAX` when the kernel does not say.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) pid: Option<i32>,
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
        self.stats.refuse(RefusalCode::NotAllowed, 1);
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
/// closes it without resetting it. `_slot` is its place among the
/// [`REFUSALS_IN_FLIGHT`], held until it is done.
async fn refuse_connection(
    stream: UnixStream,
    code: RefusalCode,
    message: String,
    _slot: OwnedSemaphorePermit,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut first = [0u8; 1];
    let framing = match tokio::time::timeout(Duration::from_secs(1), rd.read(&mut first)).await {
        Ok(Ok(1)) => Framing::detect(first[0]),
        _ => Framing::JsonLines,
    };
    let m = error_reply(code, &message, None, None);
    let wrote = tokio::time::timeout(Duration::from_secs(1), async {
        wr.write_all(&framing.encode(&m)).await?;
        wr.shutdown().await
    })
    .await;
    if matches!(wrote, Ok(Ok(()))) {
        linger(&mut rd).await;
    }
}

/// After an error reply and the end of the daemon's side of the stream:
/// reads and discards what the client still sends, until it closes its
/// side, for at most [`LINGER`] and [`LINGER_BYTES`].
pub(super) async fn linger(rd: &mut tokio::net::unix::OwnedReadHalf) {
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
