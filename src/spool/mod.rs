//! The durable queue between ingest and the uplink: one SQLite file in WAL mode.
//!
//! Design:
//! * One writer thread owns the only connection. Every request (append,
//!   read, ack, snapshot) goes through one bounded channel, so there is no
//!   lock contention and callers get back-pressure when the disk is slow.
//! * Group commit: the writer takes everything that queued up while the
//!   last transaction ran and applies it in one transaction; appends are
//!   answered only after that commit, so "stored" always means "on disk"
//!   (to the `synchronous` level configured).
//! * Rows are the canonical JSON of one normalised event (rendered once at
//!   ingest), keyed by an `AUTOINCREMENT` id, so ids only grow: the uplink
//!   reads "everything after id X" and an in-flight frame always covers a
//!   contiguous id range.
//! * Events leave only on the brain's ack ([`SpoolHandle::ack`]) or by the
//!   overflow policy, and every such drop is counted (lifetime counter kept
//!   in the `meta` table, so restarts do not reset it).
//! * Crash safety is SQLite's: a committed transaction survives a kill of the
//!   process at any point; nothing is held only in memory once acknowledged.
//! * One daemon per spool: an `flock` on the database file itself, held by
//!   the writer while its connection is open (see [`SpoolLock`]);
//!   `<spool>.lock` records the holder's pid. Neither is opened through a
//!   symlink.
//! * A spool this process cannot write is refused at open (a test write),
//!   never reported ready.

pub mod path;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Notify};

/// What to do with new events when the spool is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Delete the oldest stored events to make room (default). Keeps the
    /// freshest picture of the fleet; the loss is counted and reported.
    DropOldest,
    /// Refuse the new events with a `spool_full` error. Keeps history;
    /// producers see the refusal and the count.
    DropNewest,
    /// Stop reading from the producer until space frees up. Nothing is
    /// lost, but producers that wait on the socket slow down. Once the
    /// daemon stops holding producers ([`SpoolHandle::stop_holding_producers`],
    /// on shutdown), a message that does not fit is refused whole with
    /// [`SpoolError::Stopping`] instead.
    Block,
}

/// SQLite `synchronous` level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process crash; an OS crash may lose the last commits.
    Normal,
    /// Also survives power loss, at the cost of an fsync per commit.
    Full,
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The SQLite file (already resolved and clamped by [`path`]).
    pub path: PathBuf,
    /// Bound in events.
    pub max_events: u64,
    /// Bound in bytes of event bodies.
    pub max_bytes: u64,
    /// Overflow policy.
    pub overflow: Overflow,
    /// SQLite synchronous mode.
    pub synchronous: Synchronous,
}

/// Spool failures.
#[derive(Debug, Clone, Error)]
pub enum SpoolError {
    /// Another daemon holds the spool.
    #[error("spool {path} is in use by another z4j-agentd (pid {pid}); stop it, or give this one its own Z4J_BUFFER_PATH")]
    Locked {
        /// The spool file.
        path: String,
        /// The holder, as recorded in the lock file.
        pid: String,
    },
    /// The file could not be opened or prepared.
    #[error("cannot open spool {path}: {message}")]
    Open {
        /// The spool file.
        path: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The spool's directory or one of its files cannot be written (a
    /// read-only mount, an immutable file, the mode): found at start, by
    /// writing, before the daemon reports ready.
    #[error("the spool {path} cannot be written: {message}")]
    NotWritable {
        /// The spool file.
        path: String,
        /// Which path cannot be written, why, and the fix.
        message: String,
    },
    /// A SQLite error while running (its message).
    #[error("spool error: {0}")]
    Sqlite(String),
    /// The disk is full; nothing of the failed transaction was stored.
    #[error("the spool's disk is full; free space on the spool's filesystem (nothing of this batch was stored)")]
    DiskFull,
    /// The writer thread is gone (shutdown).
    #[error("the spool is closed")]
    Closed,
    /// `block`: the daemon is stopping and these events did not fit; they
    /// were not stored, and nothing waits for room any more.
    #[error("z4j-agentd is stopping and its spool is full (Z4J_BUFFER_OVERFLOW=block): {not_stored} events of this message were not stored (its last {not_stored}; any before them were stored); send them again once the daemon is back")]
    Stopping {
        /// Events of the append that were not stored.
        not_stored: usize,
    },
}

impl SpoolError {
    /// A short stable label for metrics and error codes.
    pub fn code(&self) -> &'static str {
        match self {
            SpoolError::Locked { .. } => "spool_locked",
            SpoolError::Open { .. } => "spool_open",
            SpoolError::NotWritable { .. } => "spool_not_writable",
            SpoolError::Sqlite(_) => "spool_error",
            SpoolError::DiskFull => "spool_disk_full",
            SpoolError::Closed => "spool_closed",
            SpoolError::Stopping { .. } => "daemon_stopping",
        }
    }

    fn from_sqlite(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return SpoolError::DiskFull;
            }
        }
        SpoolError::Sqlite(e.to_string())
    }
}

/// The result of one append request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendOutcome {
    /// Events committed.
    pub stored: usize,
    /// Events refused because the spool was full (`drop_newest`/`block`).
    pub refused_full: usize,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its spool id (grows monotonically).
    pub id: i64,
    /// Canonical JSON of the normalised event.
    pub body: Vec<u8>,
}

/// A point-in-time view of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Events waiting for the brain's ack.
    pub depth: u64,
    /// Bytes of those events.
    pub bytes: u64,
    /// When the oldest of them was stored (unix ms).
    pub oldest_stored_ms: Option<i64>,
}

/// Live counters, readable without a round trip to the writer.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Events stored and not yet acknowledged by the brain.
    pub depth: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Events ever committed by this process.
    pub stored_total: AtomicU64,
    /// Events deleted on the brain's ack by this process.
    pub acked_total: AtomicU64,
    /// Oldest events evicted by `drop_oldest` (lifetime of the spool file).
    pub dropped_oldest_total: AtomicU64,
    /// New events refused because the spool was full.
    pub refused_full_total: AtomicU64,
    /// Transactions committed.
    pub commits_total: AtomicU64,
    /// When the oldest stored event was stored (unix ms; 0 when empty).
    pub oldest_stored_ms: AtomicI64,
    /// Whether the last write transaction failed (disk full, I/O error).
    pub write_failing: AtomicBool,
    /// Highest event id in the file when it was opened (0 if empty): events
    /// up to it may have reached the brain before this process started.
    pub max_id_at_open: AtomicI64,
}

impl SpoolStats {
    /// When the oldest stored event was stored (unix ms), if any.
    pub fn oldest_stored_ms(&self) -> Option<i64> {
        match self.oldest_stored_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// How long the oldest stored event has waited, in seconds, if any.
    pub fn oldest_age_seconds(&self) -> Option<f64> {
        self.oldest_stored_ms()
            .map(|ms| (unix_ms_now() - ms).max(0) as f64 / 1000.0)
    }
}

enum Op {
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
    tx: mpsc::Sender<Op>,
    stats: Arc<SpoolStats>,
    new_events: Arc<Notify>,
    space_freed: Arc<Notify>,
    overflow: Overflow,
    /// Set by [`SpoolHandle::stop_holding_producers`].
    release: Arc<AtomicBool>,
}

/// Requests waiting in the channel before callers feel back-pressure.
const QUEUE_DEPTH: usize = 1024;
/// Most events applied in one transaction (bounds commit latency).
const MAX_EVENTS_PER_COMMIT: usize = 32_768;
/// Page size of a newly created spool file.
const PAGE_SIZE: u32 = 16 * 1024;
/// WAL pages between automatic checkpoints: about 40 MB at 16 KiB pages
/// (10 MB in a spool created with 4 KiB pages).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 2_500;
/// Size the WAL file is truncated to after a checkpoint.
const WAL_SIZE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// At most one eviction WARNING per this interval.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);

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

/// The open spool: the handle plus the writer thread (which holds the lock).
pub struct Spool {
    handle: SpoolHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spool {
    /// Opens (creating if needed) and recovers the spool, then starts the
    /// writer thread. Blocking: call before the async work starts or from
    /// `spawn_blocking`.
    ///
    /// Refuses a spool another daemon holds ([`SpoolError::Locked`]) and one
    /// this process cannot write ([`SpoolError::NotWritable`]): the
    /// directory takes a new file, the file opens for writing, and one
    /// small transaction commits, so a spool that would fail every write is
    /// found here, before the daemon reports ready.
    pub fn open(config: SpoolConfig) -> Result<Spool, SpoolError> {
        let path_text = config.path.display().to_string();
        probe_directory(&config.path)?;
        let lock = SpoolLock::acquire(&config.path)?;
        let conn = Connection::open(&config.path).map_err(|e| {
            diagnose_not_writable(&config.path).unwrap_or_else(|| SpoolError::Open {
                path: path_text.clone(),
                message: e.to_string(),
            })
        })?;
        let mut state = Writer::prepare(conn, &config).map_err(|e| {
            diagnose_not_writable(&config.path).unwrap_or_else(|| SpoolError::Open {
                path: path_text.clone(),
                message: format!(
                    "{e}; if the file is damaged, move it aside (e.g. `mv {p} {p}.broken`) and start again",
                    p = path_text
                ),
            })
        })?;
        // SQLite opens a file it may not write read-only, without a word;
        // only a write tells.
        state.write_probe().map_err(|e| {
            diagnose_not_writable(&config.path).unwrap_or_else(|| match SpoolError::from_sqlite(e) {
                SpoolError::DiskFull => SpoolError::DiskFull,
                other => SpoolError::NotWritable {
                    path: path_text.clone(),
                    message: format!(
                        "a test write failed ({other}); check that this user may write the file and its directory, and that the filesystem is mounted read-write"
                    ),
                },
            })
        })?;
        lock.still_at(&config.path)?;
        state.lock = Some(lock);
        let stats = state.stats.clone();
        let release = state.release.clone();
        let new_events = Arc::new(Notify::new());
        let space_freed = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let handle = SpoolHandle {
            tx,
            stats,
            new_events: new_events.clone(),
            space_freed: space_freed.clone(),
            overflow: config.overflow,
            release,
        };
        let thread = std::thread::Builder::new()
            .name("z4j-spool".into())
            .spawn(move || state.run(rx, new_events, space_freed))
            .map_err(|e| SpoolError::Open {
                path: path_text,
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Spool {
            handle,
            thread: Some(thread),
        })
    }

    /// A handle for producers and the uplink.
    pub fn handle(&self) -> SpoolHandle {
        self.handle.clone()
    }

    /// Finishes queued requests, stops the writer and releases the lock.
    pub async fn close(mut self) {
        let _ = self.handle.tx.send(Op::Close).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// `<spool>.lock`: the holder's pid, for people and `doctor`.
fn note_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The exclusive hold on one spool, kept by the writer for as long as its
/// connection is open.
///
/// What keeps a second daemon out is an `flock` on the database file
/// itself: the lock belongs to the spool, so deleting or replacing any
/// other file cannot release it. SQLite's own locks on that file are POSIX
/// record locks, independent of `flock` on local filesystems (a spool in WAL
/// mode must be on one: WAL needs shared memory). This descriptor must stay
/// open until SQLite's connection is closed, since closing any descriptor of
/// a file drops the process's POSIX locks on it; the writer drops its
/// connection first.
///
/// `<spool>.lock` only records the holder's pid. It is locked too, so a
/// daemon of an earlier version, which locks only that file, is kept out as
/// well. Neither file is ever opened through a symlink.
struct SpoolLock {
    db: File,
    _note: File,
}

impl SpoolLock {
    fn acquire(path: &Path) -> Result<SpoolLock, SpoolError> {
        let db = open_no_follow(path, "spool", path, false)?;
        match db.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    path: path.display().to_string(),
                    pid: holder_pid(&db, path),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SpoolError::Open {
                    path: path.display().to_string(),
                    message: format!("cannot lock it: {e}"),
                })
            }
        }
        same_file(&db, path, path)?;
        let note_at = note_path(path);
        let mut note = open_no_follow(&note_at, "lock file", path, true)?;
        match note.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    path: path.display().to_string(),
                    pid: read_pid_note(&note_at).unwrap_or_else(|| "unknown".into()),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SpoolError::Open {
                    path: path.display().to_string(),
                    message: format!("cannot lock {}: {e}", note_at.display()),
                })
            }
        }
        same_file(&note, &note_at, path)?;
        let _ = note.set_len(0);
        let _ = note.rewind();
        let _ = writeln!(note, "{}", std::process::id());
        let _ = note.flush();
        Ok(SpoolLock { db, _note: note })
    }

    /// Checks that `path` still names the locked database file, after
    /// SQLite opened it by name.
    fn still_at(&self, path: &Path) -> Result<(), SpoolError> {
        same_file(&self.db, path, path)
    }
}

/// Opens `file` (the spool, or its lock file when `note`) read-write,
/// creating it 0600, never through a symlink and never truncating it.
fn open_no_follow(file: &Path, what: &str, spool: &Path, note: bool) -> Result<File, SpoolError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refuse = |message: String| SpoolError::Open {
        path: spool.display().to_string(),
        message,
    };
    let symlink = || {
        refuse(format!(
            "{what} {p} is a symbolic link; z4j-agentd never opens one there, since it would write to whatever it points to; remove the link (`rm {p}`){and}",
            p = file.display(),
            and = if note {
                " and start again"
            } else {
                ", or set Z4J_BUFFER_PATH to the real file"
            }
        ))
    };
    // Checked before opening too, so nothing (a FIFO, a device) is opened
    // that is not a plain file.
    match std::fs::symlink_metadata(file) {
        Ok(m) if m.file_type().is_symlink() => return Err(symlink()),
        Ok(m) if !m.file_type().is_file() => {
            return Err(refuse(format!(
            "{what} {p} is not a regular file; move it aside (`mv {p} {p}.aside`) and start again",
            p = file.display()
        )))
        }
        _ => {}
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(file)
        .map_err(|e| {
            if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::LOOP) {
                symlink()
            } else {
                not_writable(spool, file, &e).unwrap_or_else(|| {
                    refuse(format!(
                        "cannot open {what} {}: {e}; check the directory's owner and mode",
                        file.display()
                    ))
                })
            }
        })?;
    let meta = f.metadata().map_err(|e| refuse(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!(
            "{what} {p} is not a regular file; move it aside (`mv {p} {p}.aside`) and start again",
            p = file.display()
        )));
    }
    // The lock file is rewritten: a second name for it would be another
    // file written through this one.
    if note && meta.nlink() > 1 {
        return Err(refuse(format!(
            "lock file {p} has {n} hard links, so writing the pid to it would change another file; remove it (`rm {p}`) and start again",
            p = file.display(),
            n = meta.nlink()
        )));
    }
    // An existing spool keeps working, but is tightened to 0600.
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| refuse(format!("cannot chmod 600 {}: {e}", file.display())))?;
    }
    Ok(f)
}

/// Refuses when `path` no longer names the file `f` is open on (it was
/// replaced or removed in the meantime).
fn same_file(f: &File, path: &Path, spool: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::MetadataExt;
    let held = f.metadata().ok().map(|m| (m.dev(), m.ino()));
    let named = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if held.is_some() && held == named {
        return Ok(());
    }
    Err(SpoolError::Open {
        path: spool.display().to_string(),
        message: format!(
            "{} was replaced or removed while this daemon opened it; make sure nothing else manages that file, and start again",
            path.display()
        ),
    })
}

/// Who holds the `flock` on the spool: from `/proc/locks` (which lists it
/// even when the lock file is gone), else from the lock file, else "unknown".
fn holder_pid(db: &File, spool: &Path) -> String {
    flock_holder(db)
        .map(|pid| pid.to_string())
        .or_else(|| read_pid_note(&note_path(spool)))
        .unwrap_or_else(|| "unknown".into())
}

fn flock_holder(f: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = f.metadata().ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 4242 fd:01:5678 0 EOF"; a waiter has "->" after the number.
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == id)
            .then(|| f[4].parse::<u32>().ok().filter(|pid| *pid != 0))
            .flatten()
    })
}

/// The pid written in the lock file, read without following a symlink.
fn read_pid_note(note: &Path) -> Option<String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(
            rustix::fs::OFlags::NOFOLLOW.bits() as i32 | rustix::fs::OFlags::NONBLOCK.bits() as i32,
        )
        .open(note)
        .ok()?;
    let mut text = String::new();
    (&mut f).take(32).read_to_string(&mut text).ok()?;
    let pid = text.trim();
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.to_string())
}

/// Creates and removes a file in the spool's directory: the directory must
/// take new files (SQLite creates the `-wal` and `-shm` files there).
fn probe_directory(spool: &Path) -> Result<(), SpoolError> {
    let dir = spool.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".z4j-agentd-write-probe-{}", std::process::id()));
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&probe);
    match made {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(
            not_writable(spool, dir, &e).unwrap_or_else(|| SpoolError::Open {
                path: spool.display().to_string(),
                message: format!("cannot create a file in {}: {e}", dir.display()),
            }),
        ),
    }
}

/// The [`SpoolError::NotWritable`] for `e`, raised on `file` (the spool's
/// directory or one of its files), when `e` says it cannot be written.
fn not_writable(spool: &Path, file: &Path, e: &std::io::Error) -> Option<SpoolError> {
    use rustix::io::Errno;
    let p = file.display();
    let fix = match Errno::from_io_error(e)? {
        Errno::ROFS => format!(
            "{p} is on a read-only filesystem; remount it read-write, or set Z4J_BUFFER_PATH to a writable place"
        ),
        Errno::PERM => format!(
            "{p} may not be written (immutable or append-only: `lsattr -d {p}`); run `chattr -i -a {p}`, or set Z4J_BUFFER_PATH to a writable place"
        ),
        Errno::ACCESS => format!(
            "{p} is not writable by uid {uid}; make it so (`chown {uid} {p}` and `chmod u+rw{x} {p}`), or set Z4J_BUFFER_PATH to a writable place",
            uid = crate::host::current_uid(),
            x = if file.is_dir() { "x" } else { "" },
        ),
        _ => return None,
    };
    Some(SpoolError::NotWritable {
        path: spool.display().to_string(),
        message: format!("{fix} ({e})"),
    })
}

/// After SQLite could not write the spool: which of its directory and files
/// this process may not write, as a [`SpoolError::NotWritable`].
fn diagnose_not_writable(spool: &Path) -> Option<SpoolError> {
    use rustix::fs::{Access, AtFlags, CWD};
    let dir = spool.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut candidates = vec![dir, spool.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut s = spool.as_os_str().to_owned();
        s.push(suffix);
        candidates.push(PathBuf::from(s));
    }
    candidates.into_iter().find_map(|p| {
        if !p.exists() {
            return None;
        }
        match rustix::fs::accessat(CWD, &p, Access::WRITE_OK, AtFlags::EACCESS) {
            Ok(()) => None,
            Err(errno) => not_writable(spool, &p, &std::io::Error::from(errno)),
        }
    })
}

/// Wall-clock unix time in milliseconds: the clock of `stored_ms`.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// State owned by the writer thread.
struct Writer {
    conn: Connection,
    config: SpoolConfig,
    stats: Arc<SpoolStats>,
    depth: u64,
    bytes: u64,
    dropped_oldest: u64,
    last_eviction_warn: Option<Instant>,
    evicted_since_warn: u64,
    /// Whether the current transaction deleted anything (wakes `block` waiters).
    freed: bool,
    /// Set when producers are no longer held back (`block`, on shutdown).
    release: Arc<AtomicBool>,
    /// `block` with `release` set, read once per transaction: an append
    /// that does not fit whole stores nothing and is answered `Stopping`.
    refusing: bool,
    /// The spool's lock. Declared last, so it is released only after the
    /// connection above is closed.
    lock: Option<SpoolLock>,
}

impl Writer {
    fn prepare(conn: Connection, config: &SpoolConfig) -> Result<Writer, rusqlite::Error> {
        conn.busy_timeout(Duration::from_secs(5))?;
        // 16 KiB pages for a new spool (an existing file keeps its size):
        // about 35 events per page instead of 8, so fewer page splits, WAL
        // frames and checksums per event; ingest with 8 clients went from
        // about 280,000 to 470,000 events/s (BENCHMARKS.md).
        conn.execute_batch(&format!("PRAGMA page_size={PAGE_SIZE};"))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the filesystem does not support WAL mode (got {mode})"
            )));
        }
        conn.execute_batch(match config.synchronous {
            Synchronous::Normal => "PRAGMA synchronous=NORMAL;",
            Synchronous::Full => "PRAGMA synchronous=FULL;",
        })?;
        // Checkpoint every ~40 MB of WAL rather than SQLite's 4 MB: rows
        // stored and deleted (acked) within one window are copied to the
        // database once or not at all, and the checkpoint's fsync comes ten
        // times less often (benchmarked in BENCHMARKS.md). The file is cut
        // back to 64 MB after a checkpoint that emptied it.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}; PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES};"
        ))?;
        conn.execute_batch(
            "PRAGMA temp_store=MEMORY;
             CREATE TABLE IF NOT EXISTS events (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 stored_ms INTEGER NOT NULL,
                 body BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )?;
        let (depth, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let dropped_oldest: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'dropped_oldest_total'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let oldest: Option<i64> = conn
            .query_row(
                "SELECT stored_ms FROM events ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let max_id: Option<i64> = conn
            .query_row("SELECT max(id) FROM events", [], |r| r.get(0))
            .optional()?
            .flatten();
        let stats = Arc::new(SpoolStats::default());
        stats
            .max_id_at_open
            .store(max_id.unwrap_or(0), Ordering::Relaxed);
        stats
            .oldest_stored_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
        stats.depth.store(depth as u64, Ordering::Relaxed);
        stats.bytes.store(bytes as u64, Ordering::Relaxed);
        stats
            .dropped_oldest_total
            .store(dropped_oldest as u64, Ordering::Relaxed);
        Ok(Writer {
            conn,
            config: config.clone(),
            stats,
            depth: depth as u64,
            bytes: bytes as u64,
            dropped_oldest: dropped_oldest as u64,
            last_eviction_warn: None,
            evicted_since_warn: 0,
            freed: false,
            release: Arc::new(AtomicBool::new(false)),
            refusing: false,
            lock: None,
        })
    }

    /// One small write transaction, at open.
    fn write_probe(&mut self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('opened_ms', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![unix_ms_now()],
        );
        if let Err(e) = r.and_then(|_| self.conn.execute_batch("COMMIT")) {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        Ok(())
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Op>,
        new_events: Arc<Notify>,
        space_freed: Arc<Notify>,
    ) {
        let mut ops = Vec::new();
        'outer: while let Some(first) = rx.blocking_recv() {
            ops.push(first);
            let mut events_in_batch = ops_event_count(&ops);
            while events_in_batch < MAX_EVENTS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(op) => {
                        events_in_batch += ops_event_count(std::slice::from_ref(&op));
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let closing = ops.iter().any(|o| matches!(o, Op::Close));
            let (stored_any, freed_any) = self.apply(&mut ops);
            if stored_any {
                new_events.notify_one();
            }
            if freed_any {
                space_freed.notify_waiters();
            }
            if closing {
                break 'outer;
            }
        }
        // Fold the WAL back so the next start opens quickly; failure is harmless.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// Applies one group of requests: writes in one transaction, publishes
    /// the counters, then replies, then serves reads (which therefore see
    /// this commit).
    fn apply(&mut self, ops: &mut Vec<Op>) -> (bool, bool) {
        let before = (self.depth, self.bytes, self.dropped_oldest);
        self.freed = false;
        let mut outcomes: Vec<AppendOutcome> = Vec::new();
        let mut ack_counts: Vec<u64> = Vec::new();
        let result = self.write_all(ops, &mut outcomes, &mut ack_counts);
        let wrote = ops.iter().any(is_write);
        if result.is_err() {
            // Nothing of this transaction is on disk.
            (self.depth, self.bytes, self.dropped_oldest) = before;
            self.freed = false;
            outcomes.clear();
            ack_counts.clear();
            self.stats.write_failing.store(true, Ordering::Relaxed);
        } else if wrote {
            self.stats.commits_total.fetch_add(1, Ordering::Relaxed);
            self.stats.write_failing.store(false, Ordering::Relaxed);
            self.refresh_oldest();
        }
        let stored: u64 = outcomes.iter().map(|o| o.stored as u64).sum();
        // Under `block` the producer retries what did not fit: nothing is lost.
        let refused: u64 = if self.config.overflow == Overflow::Block {
            0
        } else {
            outcomes.iter().map(|o| o.refused_full as u64).sum()
        };
        self.stats.stored_total.fetch_add(stored, Ordering::Relaxed);
        self.stats
            .refused_full_total
            .fetch_add(refused, Ordering::Relaxed);
        self.stats
            .acked_total
            .fetch_add(ack_counts.iter().sum(), Ordering::Relaxed);
        self.stats.depth.store(self.depth, Ordering::Relaxed);
        self.stats.bytes.store(self.bytes, Ordering::Relaxed);
        self.stats
            .dropped_oldest_total
            .store(self.dropped_oldest, Ordering::Relaxed);

        match result {
            Ok(()) => {
                let mut outcomes = outcomes.into_iter();
                let mut acks = ack_counts.into_iter();
                for op in ops.drain(..) {
                    match op {
                        Op::Append { reply, .. } => {
                            let o = outcomes.next().unwrap_or_default();
                            let _ = reply.send(if self.refusing && o.refused_full > 0 {
                                Err(SpoolError::Stopping {
                                    not_stored: o.refused_full,
                                })
                            } else {
                                Ok(o)
                            });
                        }
                        Op::Ack { reply, .. } => {
                            let _ = reply.send(Ok(acks.next().unwrap_or(0)));
                        }
                        Op::Probe { reply } => {
                            let _ = reply.send(Ok(()));
                        }
                        other => self.read(other),
                    }
                }
            }
            Err(e) => {
                let kind = SpoolError::from_sqlite(e);
                tracing::error!(error = %kind, "spool write failed; the batch was not stored");
                for op in ops.drain(..) {
                    match op {
                        // The producer counts these (refused_by_reason).
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(kind.clone()));
                        }
                        Op::Ack { reply, .. } => {
                            let _ = reply.send(Err(kind.clone()));
                        }
                        Op::Probe { reply } => {
                            let _ = reply.send(Err(kind.clone()));
                        }
                        other => self.read(other),
                    }
                }
            }
        }
        (stored > 0, self.freed)
    }

    fn write_all(
        &mut self,
        ops: &[Op],
        outcomes: &mut Vec<AppendOutcome>,
        ack_counts: &mut Vec<u64>,
    ) -> Result<(), rusqlite::Error> {
        if !ops.iter().any(is_write) {
            return Ok(());
        }
        let dropped_before = self.dropped_oldest;
        self.refusing =
            self.config.overflow == Overflow::Block && self.release.load(Ordering::SeqCst);
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            let now = unix_ms_now();
            for op in ops {
                match op {
                    Op::Append { events, .. } => {
                        let o = self.append_one(events, now)?;
                        outcomes.push(o);
                    }
                    Op::Ack { first, last, .. } => {
                        let n = self.delete_range(*first, *last)?;
                        ack_counts.push(n);
                    }
                    Op::Probe { .. } => {
                        self.conn.execute(
                            "INSERT INTO meta(key, value) VALUES ('probed_ms', ?1)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            params![now],
                        )?;
                    }
                    _ => {}
                }
            }
            if self.dropped_oldest != dropped_before {
                self.conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('dropped_oldest_total', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![self.dropped_oldest as i64],
                )?;
            }
            Ok(())
        })();
        if let Err(e) = r.and_then(|()| self.conn.execute_batch("COMMIT")) {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        let evicted = self.dropped_oldest - dropped_before;
        if evicted > 0 {
            self.warn_eviction(evicted);
        }
        Ok(())
    }

    /// Keeps [`SpoolStats::oldest_stored_ms`] current after a commit: a
    /// lookup by primary key, only when the head of the queue may have moved.
    fn refresh_oldest(&mut self) {
        if self.depth == 0 {
            self.stats.oldest_stored_ms.store(0, Ordering::Relaxed);
            return;
        }
        if !self.freed && self.stats.oldest_stored_ms.load(Ordering::Relaxed) != 0 {
            return;
        }
        if let Ok(Some(ms)) = self
            .conn
            .query_row(
                "SELECT stored_ms FROM events ORDER BY id LIMIT 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        {
            self.stats.oldest_stored_ms.store(ms, Ordering::Relaxed);
        }
    }

    fn warn_eviction(&mut self, evicted: u64) {
        self.evicted_since_warn += evicted;
        let due = self
            .last_eviction_warn
            .is_none_or(|t| t.elapsed() >= EVICTION_WARN_EVERY);
        if due {
            tracing::warn!(
                evicted = self.evicted_since_warn,
                dropped_total = self.dropped_oldest,
                max_events = self.config.max_events,
                max_bytes = self.config.max_bytes,
                "spool full: dropped the oldest events to make room; the brain is not keeping up or is unreachable (raise Z4J_BUFFER_MAX_EVENTS / Z4J_BUFFER_MAX_BYTES to keep more)"
            );
            self.last_eviction_warn = Some(Instant::now());
            self.evicted_since_warn = 0;
        }
    }

    fn append_one(
        &mut self,
        events: &[Vec<u8>],
        now: i64,
    ) -> Result<AppendOutcome, rusqlite::Error> {
        let max_events = self.config.max_events;
        let max_bytes = self.config.max_bytes;
        let mut accept: &[Vec<u8>] = events;
        let mut refused = 0usize;
        let total_bytes: u64 = events.iter().map(|e| e.len() as u64).sum();
        match self.config.overflow {
            Overflow::DropOldest => {
                // A batch larger than the whole bound keeps its newest part.
                let mut skip = 0usize;
                let mut b = total_bytes;
                while skip < accept.len()
                    && ((accept.len() - skip) as u64 > max_events || b > max_bytes)
                {
                    b -= accept[skip].len() as u64;
                    skip += 1;
                }
                if skip > 0 {
                    self.dropped_oldest += skip as u64;
                    accept = &accept[skip..];
                }
                let need_events = (self.depth + accept.len() as u64).saturating_sub(max_events);
                let need_bytes = (self.bytes + b).saturating_sub(max_bytes);
                if need_events > 0 || need_bytes > 0 {
                    self.evict_oldest(need_events, need_bytes)?;
                }
            }
            Overflow::DropNewest | Overflow::Block => {
                let mut n = 0usize;
                let mut b = 0u64;
                for e in accept {
                    if self.depth + n as u64 + 1 > max_events
                        || self.bytes + b + e.len() as u64 > max_bytes
                    {
                        break;
                    }
                    n += 1;
                    b += e.len() as u64;
                }
                if self.refusing && n < accept.len() {
                    // Nothing waits for room any more: all or nothing, so
                    // the producer is told exactly what was not stored.
                    n = 0;
                }
                refused = accept.len() - n;
                accept = &accept[..n];
            }
        }
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO events(stored_ms, body) VALUES (?1, ?2)")?;
        for body in accept {
            stmt.execute(params![now, body])?;
            self.depth += 1;
            self.bytes += body.len() as u64;
        }
        Ok(AppendOutcome {
            stored: accept.len(),
            refused_full: refused,
        })
    }

    fn evict_oldest(&mut self, need_events: u64, need_bytes: u64) -> Result<(), rusqlite::Error> {
        let mut freed_events = 0u64;
        let mut freed_bytes = 0u64;
        let mut last_id: Option<i64> = None;
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, length(body) FROM events WHERE id > ?1 ORDER BY id LIMIT 1024",
            )?;
            while freed_events < need_events || freed_bytes < need_bytes {
                let mut rows = stmt.query(params![last_id.unwrap_or(0)])?;
                let mut any = false;
                while let Some(row) = rows.next()? {
                    any = true;
                    let id: i64 = row.get(0)?;
                    let len: i64 = row.get(1)?;
                    last_id = Some(id);
                    freed_events += 1;
                    freed_bytes += len as u64;
                    if freed_events >= need_events && freed_bytes >= need_bytes {
                        break;
                    }
                }
                if !any {
                    break;
                }
            }
        }
        if let Some(last) = last_id {
            self.conn
                .prepare_cached("DELETE FROM events WHERE id <= ?1")?
                .execute(params![last])?;
            self.depth -= freed_events.min(self.depth);
            self.bytes -= freed_bytes.min(self.bytes);
            self.dropped_oldest += freed_events;
            self.freed = true;
        }
        Ok(())
    }

    fn delete_range(&mut self, first: i64, last: i64) -> Result<u64, rusqlite::Error> {
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM events WHERE id BETWEEN ?1 AND ?2 RETURNING length(body)",
        )?;
        let mut rows = stmt.query(params![first, last])?;
        let mut n = 0u64;
        let mut b = 0u64;
        while let Some(row) = rows.next()? {
            let len: i64 = row.get(0)?;
            n += 1;
            b += len as u64;
        }
        self.depth -= n.min(self.depth);
        self.bytes -= b.min(self.bytes);
        self.freed |= n > 0;
        Ok(n)
    }

    fn read(&mut self, op: Op) {
        match op {
            Op::ReadAfter {
                after_id,
                max_events,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(
                    self.read_after(after_id, max_events, max_bytes)
                        .map_err(SpoolError::from_sqlite),
                );
            }
            Op::ReadRange { first, last, reply } => {
                let _ = reply.send(
                    self.read_range(first, last)
                        .map_err(SpoolError::from_sqlite),
                );
            }
            Op::Snapshot { reply } => {
                let oldest = self
                    .conn
                    .query_row(
                        "SELECT stored_ms FROM events ORDER BY id LIMIT 1",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .optional()
                    .map_err(SpoolError::from_sqlite);
                let _ = reply.send(oldest.map(|oldest_stored_ms| Snapshot {
                    depth: self.depth,
                    bytes: self.bytes,
                    oldest_stored_ms,
                }));
            }
            Op::Ping { reply } => {
                let _ = reply.send(());
            }
            Op::Append { .. } | Op::Ack { .. } | Op::Probe { .. } | Op::Close => {}
        }
    }

    fn read_after(
        &mut self,
        after_id: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, body FROM events WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let mut rows = stmt.query(params![after_id, max_events as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next()? {
            let body: Vec<u8> = row.get(1)?;
            if !out.is_empty() && bytes + body.len() + 1 > max_bytes {
                break;
            }
            bytes += body.len() + 1;
            out.push(StoredEvent {
                id: row.get(0)?,
                body,
            });
        }
        Ok(out)
    }

    fn read_range(&mut self, first: i64, last: i64) -> Result<Vec<StoredEvent>, rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, body FROM events WHERE id BETWEEN ?1 AND ?2 ORDER BY id")?;
        let rows = stmt.query_map(params![first, last], |row| {
            Ok(StoredEvent {
                id: row.get(0)?,
                body: row.get(1)?,
            })
        })?;
        rows.collect()
    }
}

fn is_write(op: &Op) -> bool {
    matches!(op, Op::Append { .. } | Op::Ack { .. } | Op::Probe { .. })
}

fn ops_event_count(ops: &[Op]) -> usize {
    ops.iter()
        .map(|o| match o {
            Op::Append { events, .. } => events.len(),
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests;
