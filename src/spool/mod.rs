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
//!   ingest), keyed by an id the writer gives, one more than the highest
//!   ever given (kept across restarts in the tally, see `schema`), so ids
//!   only grow: the uplink reads "everything after id X" and an in-flight
//!   frame always covers a contiguous id range.
//! * Events leave only on the brain's ack ([`SpoolHandle::ack`]) or by the
//!   overflow policy, and every such drop is counted (lifetime counter kept
//!   in the `meta` table, so restarts do not reset it).
//! * Crash safety is SQLite's: a committed transaction survives a kill of the
//!   process at any point; nothing is held only in memory once acknowledged.
//! * One daemon per spool: an `flock` on the database file itself, held by
//!   the writer while its connection is open (see `lock`);
//!   `<spool>.lock` records the holder's pid. Neither is opened through a
//!   symlink.
//! * A spool this process cannot write is refused at open (a test write),
//!   never reported ready.
//! * The schema is versioned (`PRAGMA user_version`): a spool written by a
//!   newer daemon is refused untouched, never half-read.
//!
//! One concern per file:
//! * `handle`: [`SpoolHandle`], the requests and their replies;
//! * `writer`: the writer thread, group commit and the overflow policy;
//! * `reader`: the reads the writer serves after each commit;
//! * `schema`: pragmas, tables, the schema version, recovery at open;
//! * `lock`: one daemon per spool; `writable`: the write checks at open;
//! * [`path`]: where the spool lives and the checks on that path.

mod checkpoint;
mod handle;
mod lock;
pub mod path;
mod reader;
mod schema;
mod writable;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use thiserror::Error;
use tokio::sync::{mpsc, Notify};

use checkpoint::Checkpointer;
pub use handle::SpoolHandle;
use handle::{Op, QUEUE_DEPTH};
use lock::SpoolLock;
use schema::prepare_failed;
use writable::{diagnose_not_writable, probe_directory};
use writer::Writer;

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
    /// Events deleted because the brain could never take them (larger than
    /// its frame limit), over the lifetime of the spool file.
    pub undeliverable_total: AtomicU64,
    /// This spool file's identity for the brain's loss counters (32 hex
    /// digits, chosen once when the file is first opened and kept in it).
    pub buffer_id: std::sync::OnceLock<String>,
    /// The brain version last seen (its [`crate::uplink::contract::BrainLine`]
    /// code), kept in the file so the next start names the right contract.
    pub brain_line: std::sync::Mutex<Option<i64>>,
    /// Bytes of WAL the last checkpoint found (0 once it was emptied).
    pub wal_bytes: AtomicU64,
    /// Checkpoint passes the checkpointer thread finished.
    pub checkpoints_total: AtomicU64,
    /// How long the last of those took, in microseconds.
    pub checkpoint_last_us: AtomicU64,
    /// Checkpoints the writer did between two transactions: the last
    /// frames of a log that outgrew its bound under steady writes, or all
    /// of them while the checkpointer fails.
    pub writer_checkpoints_total: AtomicU64,
    /// Failures of the checkpointer (a pass, its connection, its thread).
    pub checkpoint_failures_total: AtomicU64,
    /// Why it fails now; `None` while it works.
    pub checkpoint_error: std::sync::Mutex<Option<String>>,
    /// Whether commits do the checkpoint themselves now (the checkpointer
    /// fails or is stuck).
    pub checkpoint_on_commit: AtomicBool,
}

impl SpoolStats {
    /// The spool file's identity ([`SpoolStats::buffer_id`]), empty before open.
    pub fn buffer_id(&self) -> &str {
        self.buffer_id.get().map(String::as_str).unwrap_or("")
    }

    /// The brain version last seen, as its stored code.
    pub fn brain_line(&self) -> Option<i64> {
        *self.brain_line.lock().unwrap()
    }

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

/// The open spool: the handle plus the writer thread (which holds the lock).
pub struct Spool {
    handle: SpoolHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The checkpointer's state, for the tests of its failures.
    #[cfg(test)]
    checkpoint: Arc<checkpoint::Shared>,
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
        let mut state =
            Writer::prepare(conn, &config).map_err(|e| prepare_failed(&config.path, e))?;
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
        state.database = match lock.database() {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(error = %e, path = %config.path.display(), "the checkpointer has no descriptor of the spool's database file to sync its copies; the writer's checkpoints under steady writes sync them and take longer");
                None
            }
        };
        state.lock = Some(lock);
        let checkpointer = Checkpointer::start(
            config.path.clone(),
            state.database.clone(),
            state.stats.clone(),
        );
        #[cfg(test)]
        let checkpoint = checkpointer.shared().clone();
        state.checkpointer = Some(checkpointer);
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
            #[cfg(test)]
            checkpoint,
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

    /// [`Spool::close`] where nothing can be awaited (a guard's `drop`):
    /// waits on this thread for the writer to finish the queued requests
    /// and release the lock, which needs no runtime. With the request queue
    /// full, it does not wait: the writer then stops once the last handle
    /// is dropped.
    pub fn close_blocking(mut self) {
        if self.handle.tx.try_send(Op::Close).is_err() {
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wall-clock unix time in milliseconds: the clock of `stored_ms`.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
