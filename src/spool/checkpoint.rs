//! The WAL checkpointer: copies the write-ahead log into the database on
//! its own thread and connection, so that no commit waits for it.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses the
//! mark: every append queued behind that commit waited for the copy and its
//! fsyncs (tens of milliseconds at the old 40 MB mark). The writer's
//! connection now has `wal_autocheckpoint=0`, and this thread does the work:
//!
//! * **While writes come**, a `PASSIVE` checkpoint every [`PASS_INTERVAL`],
//!   or sooner after [`PASS_LOG_BYTES`] of commits: it copies what the log holds
//!   without taking the write lock, so the writer goes on committing
//!   meanwhile.
//! * **The copy is synced here.** SQLite syncs the database file after a
//!   pass only when no commit came during it, which steady writes never
//!   allow: everything copied would then wait for the writer's `RESTART`
//!   below, which that sync made take up to 455 ms on the 2-core VM beside
//!   a flood. So after a pass that commits overlapped, this thread syncs the
//!   database file itself, through a descriptor of its own ([`Database`]).
//! * **Bounding the log under steady writes.** SQLite starts the log over
//!   from its beginning only when a write transaction starts with every
//!   frame already copied, which a pass running beside steady commits never
//!   achieves. When a pass leaves the log past [`FINISH_BYTES`], a second
//!   few passes catch up with what came in during the first (each shorter
//!   than the one before) while the writer pauses after each commit for as
//!   long as the commit took (so the copy gains on a flood; any request
//!   but a large append ends the pause, see `writer::pause`), and the
//!   writer is asked
//!   to copy the last milliseconds' frames itself between two
//!   transactions ([`Shared::finish_asked`]; no pass starts meanwhile), with
//!   a `RESTART` checkpoint: its next transaction writes the log from the
//!   file's start again. The file keeps its size while writes go on (cutting
//!   a few hundred MB off it cost that transaction 76-145 ms); the idle
//!   `TRUNCATE` below empties it.
//! * **When writes stop** for [`IDLE_TRUNCATE`], a `TRUNCATE` checkpoint
//!   empties the log file.
//!
//! A checkpoint never touches durability: a committed transaction is in
//! the log (to the `synchronous` level) before any checkpoint reads it, and
//! SQLite's copy is crash-safe at every point (a SIGKILL mid-copy leaves
//! the log, which the next open reads again).
//!
//! A pass that fails, a connection that cannot be opened, a thread that
//! ends, or no pass finished for [`STALL_AFTER`] while writes come: the
//! failure is logged and counted, `stats`/`status`/metrics show it, and
//! the writer turns SQLite's own automatic checkpoint back on until passes
//! succeed again, so the log stays bounded and ingest goes on.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::SpoolStats;

/// Between two passes while writes come.
pub(super) const PASS_INTERVAL: Duration = Duration::from_millis(200);
/// Log that brings the next pass forward, counted as a page per commit:
/// each commit writes at least a page (4 KiB, or 16 in a spool made by an
/// earlier version), so a fast stream of small commits does not grow the
/// log by much more than this between passes (4,096 commits of 4 KiB).
pub(super) const PASS_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// Without a write for this long, the log file is emptied.
pub(super) const IDLE_TRUNCATE: Duration = Duration::from_secs(1);
/// Log size past which the checkpointer catches up and the writer is asked
/// to finish a pass. The commits behind its `RESTART` wait for it (2-7 ms
/// on the 2-core VM beside a flood, BENCHMARKS.md); what comes in while the
/// checkpointer catches up takes the log past this mark (the file reached
/// 357-485 MB beside that flood).
pub(super) const FINISH_BYTES: u64 = 128 * 1024 * 1024;
/// Passes at most, one after another, to catch up with the writer before
/// it is asked to copy the rest.
const CATCH_UP_PASSES: usize = 8;
/// A pass this short has caught up: what is left for the writer is about
/// this much of its commits.
const CAUGHT_UP: Duration = Duration::from_millis(2);
/// Writes waiting this long for a pass that never finishes: the writer
/// checkpoints on its own.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(10);

/// [`Shared::finish`]: passes as usual.
const IDLE: u8 = 0;
/// The writer is to checkpoint between two transactions.
const ASKED: u8 = 1;
/// The writer did; its next commit starts the log over.
const RESTARTED: u8 = 2;

/// What the writer and the checkpointer share.
pub(super) struct Shared {
    stop: Mutex<bool>,
    cond: Condvar,
    /// Write transactions committed (the writer adds one per commit).
    commits: AtomicU64,
    /// `commits` when the last pass began.
    passed_at: AtomicU64,
    /// Whether the writer has woken the checkpointer since that pass.
    nudged: AtomicBool,
    /// Commits that bring the next pass forward: [`PASS_LOG_BYTES`] in
    /// pages of the spool's size (set once the checkpointer knows it).
    pass_commits: AtomicU64,
    /// The writer's turn to bound the log: [`ASKED`] by the checkpointer,
    /// [`RESTARTED`] once the writer's checkpoint is done (the next commit
    /// starts the log over), or [`IDLE`]. No pass starts meanwhile: a pass
    /// beside that commit would keep the log from starting over.
    finish: AtomicU8,
    /// Set while the checkpointer catches up with a log past
    /// [`FINISH_BYTES`]: the writer pauses after each commit.
    catching_up: AtomicBool,
    /// Set while the checkpointer cannot do its work (see the module
    /// documentation): the writer's automatic checkpoint is on.
    failing: AtomicBool,
    /// Milliseconds since `start` when the checkpointer last looked for
    /// work or finished a pass: a pass stuck longer is a stall.
    beat_ms: AtomicU64,
    start: Instant,
    /// Passes to fail on purpose (tests of the failure path).
    #[cfg(test)]
    pub(super) fail_passes: std::sync::atomic::AtomicU32,
    /// Ends the thread with a panic at its next wake-up (tests).
    #[cfg(test)]
    pub(super) panic_next: AtomicBool,
    /// Syncs of the database file after a pass (tests).
    #[cfg(test)]
    pub(super) database_syncs: AtomicU64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            stop: Mutex::new(false),
            cond: Condvar::new(),
            commits: AtomicU64::new(0),
            passed_at: AtomicU64::new(0),
            nudged: AtomicBool::new(false),
            pass_commits: AtomicU64::new(PASS_LOG_BYTES / 4096),
            finish: AtomicU8::new(IDLE),
            catching_up: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            beat_ms: AtomicU64::new(0),
            start: Instant::now(),
            #[cfg(test)]
            fail_passes: Default::default(),
            #[cfg(test)]
            panic_next: AtomicBool::new(false),
            #[cfg(test)]
            database_syncs: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        self.beat_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Called by the writer right after each committed write transaction
    /// (before its replies, so a pass that overlapped it sees it): wakes
    /// the checkpointer early once `pass_commits` came since its last pass.
    pub(super) fn committed(&self) {
        let n = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.saturating_sub(self.passed_at.load(Ordering::Relaxed))
            >= self.pass_commits.load(Ordering::Relaxed)
            && !self.nudged.swap(true, Ordering::AcqRel)
        {
            self.cond.notify_one();
        }
    }

    /// Whether the checkpointer is catching up with a log past its bound.
    pub(super) fn catching_up(&self) -> bool {
        self.catching_up.load(Ordering::Acquire)
    }

    /// Whether the checkpointer asked the writer to finish a pass.
    pub(super) fn finish_asked(&self) -> bool {
        self.finish.load(Ordering::Acquire) == ASKED
    }

    /// The writer's checkpoint is done: the log starts over at the next
    /// commit.
    pub(super) fn finished(&self) {
        self.finish.store(RESTARTED, Ordering::Release);
    }

    /// The writer's checkpoint failed: passes go on as before.
    pub(super) fn finish_failed(&self) {
        self.finish.store(IDLE, Ordering::Release);
    }

    /// Called by the writer after a commit that followed its checkpoint
    /// (that commit started the log over): passes may start again.
    pub(super) fn restarted(&self) {
        let _ = self
            .finish
            .compare_exchange(RESTARTED, IDLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether the writer must checkpoint on its own now: the checkpointer
    /// failed, ended, or has been stuck for [`STALL_AFTER`].
    pub(super) fn writer_must_checkpoint(&self) -> bool {
        if self.failing.load(Ordering::Acquire) {
            return true;
        }
        let beat = self.beat_ms.load(Ordering::Acquire);
        let now = self.start.elapsed().as_millis() as u64;
        now.saturating_sub(beat) >= STALL_AFTER.as_millis() as u64
    }

    fn ask_stop(&self) {
        *self.stop.lock().unwrap() = true;
        self.cond.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.lock().map(|s| *s).unwrap_or(true)
    }

    /// Sleeps up to `d` (not at all when the writer's commits already
    /// asked for a pass while one ran); true when asked to stop.
    fn sleep(&self, d: Duration) -> bool {
        let guard = self.stop.lock().unwrap();
        if *guard || self.nudged.load(Ordering::Acquire) {
            return *guard;
        }
        let (guard, _) = self.cond.wait_timeout(guard, d).unwrap();
        *guard
    }
}

/// A descriptor of the spool's database file (a clone of the lock's, so
/// never one opened through a symlink), with which the checkpointer syncs
/// what its passes copied (SQLite lends no descriptor of its own).
///
/// Closing any descriptor of a file releases every POSIX lock the process
/// holds on it, SQLite's included. So this one is closed only after the
/// connections: the writer keeps it in a field dropped after its
/// connection, and the checkpointer's clone ends with its thread, after the
/// thread's connection.
pub(super) type Database = Arc<File>;

/// The running checkpointer; [`Checkpointer::stop`] ends it.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on its own connection to `path`, syncing the
    /// copies through `database` (without it, the writer's finishing
    /// checkpoints sync them). A failure to start is reported like a
    /// failing pass: the writer keeps the log bounded on its own.
    pub(super) fn start(
        path: PathBuf,
        database: Option<Database>,
        stats: Arc<SpoolStats>,
    ) -> Checkpointer {
        let shared = Arc::new(Shared::new());
        let s = shared.clone();
        let st = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("z4j-checkpoint".into())
            .spawn(move || {
                let guard = Ended {
                    shared: s.clone(),
                    stats: st.clone(),
                };
                run(&path, database.as_deref(), &s, &st);
                drop(guard);
                // Only now, after `run` closed its connection (see `Database`).
                drop(database);
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                report_failure(&shared, &stats, &format!("cannot start its thread: {e}"));
                None
            }
        };
        Checkpointer { shared, thread }
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Ends the thread (a pass under way finishes first).
    pub(super) fn stop(mut self) {
        self.shared.ask_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpointer {
    /// A writer that ends without [`Checkpointer::stop`] (its thread
    /// panicked, or never started) still ends this thread: no connection
    /// outlives the spool's lock.
    fn drop(&mut self) {
        self.shared.ask_stop();
    }
}

/// Marks the checkpointer gone when its thread ends for any reason other
/// than [`Checkpointer::stop`] (a panic included).
struct Ended {
    shared: Arc<Shared>,
    stats: Arc<SpoolStats>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        // A catch-up cut short (a panic) does not leave the writer pausing.
        self.shared.catching_up.store(false, Ordering::Release);
        if !self.shared.stopping() && !self.shared.failing.load(Ordering::Acquire) {
            report_failure(&self.shared, &self.stats, "its thread ended");
        }
    }
}

fn report_failure(shared: &Shared, stats: &SpoolStats, why: &str) {
    stats
        .checkpoint_failures_total
        .fetch_add(1, Ordering::Relaxed);
    *stats.checkpoint_error.lock().unwrap() = Some(why.to_string());
    if !shared.failing.swap(true, Ordering::AcqRel) {
        tracing::error!(
            error = why,
            "the spool's WAL checkpointer failed; commits now do the checkpoint themselves (slower tails, the WAL stays bounded) until it works again"
        );
    }
}

fn report_success(shared: &Shared, stats: &SpoolStats) {
    if shared.failing.swap(false, Ordering::AcqRel) {
        *stats.checkpoint_error.lock().unwrap() = None;
        tracing::info!(
            "the spool's WAL checkpointer works again; checkpoints are off the commit path"
        );
    }
}

/// What one checkpoint said: whether it could not finish, frames in the log.
struct Pass {
    busy: bool,
    log: i64,
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("checkpoint failed: {0}")]
    Checkpoint(#[from] rusqlite::Error),
    #[error("cannot sync the spool's database file: {0}")]
    Sync(std::io::Error),
}

fn checkpoint(conn: &Connection, mode: &str, shared: &Shared) -> rusqlite::Result<Pass> {
    #[cfg(test)]
    if shared
        .fail_passes
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some("a failure the test asked for".into()),
        ));
    }
    #[cfg(not(test))]
    let _ = shared;
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(Pass {
            busy: r.get::<_, i64>(0)? != 0,
            log: r.get(1)?,
        })
    })
}

fn open(path: &PathBuf) -> rusqlite::Result<(Connection, u64)> {
    let conn = Connection::open(path)?;
    // A TRUNCATE that finds the writer busy gives up at once and is tried
    // at the next idle moment.
    conn.busy_timeout(Duration::ZERO)?;
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((conn, page.max(512) as u64))
}

fn run(path: &PathBuf, database: Option<&File>, shared: &Shared, stats: &SpoolStats) {
    // Below the writer and the runtime (nice 10, this thread only): on a
    // busy host the copy waits for a core, the commits do not.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "the checkpointer keeps the daemon's priority");
    }
    let (conn, page) = match open(path) {
        Ok(c) => c,
        Err(e) => {
            report_failure(shared, stats, &format!("cannot open the spool: {e}"));
            return;
        }
    };
    shared
        .pass_commits
        .store(PASS_LOG_BYTES / page, Ordering::Relaxed);
    let mut seen = shared.commits.load(Ordering::Relaxed);
    let mut last_write = Instant::now();
    // Whether the log file may hold anything (emptied by TRUNCATE).
    let mut dirty = true;
    loop {
        shared.beat();
        if shared.sleep(PASS_INTERVAL) {
            return;
        }
        #[cfg(test)]
        if shared.panic_next.load(Ordering::Acquire) {
            panic!("the checkpointer ends, as a test asked");
        }
        let commits = shared.commits.load(Ordering::Relaxed);
        if commits != seen {
            seen = commits;
            last_write = Instant::now();
            dirty = true;
            if shared.finish.load(Ordering::Acquire) != IDLE {
                // The writer's turn (see `Shared::finish`); once writes
                // stop, the idle TRUNCATE below ends it.
                continue;
            }
            shared.passed_at.store(commits, Ordering::Relaxed);
            shared.nudged.store(false, Ordering::Release);
            let started = Instant::now();
            match pass(&conn, database, shared, stats, page) {
                Ok(()) => {
                    report_success(shared, stats);
                    stats.checkpoints_total.fetch_add(1, Ordering::Relaxed);
                    stats
                        .checkpoint_last_us
                        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Err(e) => report_failure(shared, stats, &e.to_string()),
            }
        } else if dirty && last_write.elapsed() >= IDLE_TRUNCATE {
            match checkpoint(&conn, "TRUNCATE", shared) {
                Ok(p) if !p.busy => {
                    dirty = false;
                    shared.finish.store(IDLE, Ordering::Release);
                    report_success(shared, stats);
                    stats.wal_bytes.store(0, Ordering::Relaxed);
                }
                // The writer came back meanwhile: the next idle moment.
                Ok(_) => {}
                Err(e) => report_failure(shared, stats, &format!("checkpoint failed: {e}")),
            }
        }
    }
}

/// One `PASSIVE` pass; past [`FINISH_BYTES`], a few more and the request
/// to the writer.
fn pass(
    conn: &Connection,
    database: Option<&File>,
    shared: &Shared,
    stats: &SpoolStats,
    page: u64,
) -> Result<(), PassError> {
    let (mut p, overlapped) = copy(conn, shared)?;
    let bytes = |p: &Pass| p.log.max(0) as u64 * page;
    if bytes(&p) > FINISH_BYTES {
        // A pass copies the log as it was when it began; the commits made
        // meanwhile are what keeps it from starting over. Each further pass
        // copies what came in during the one before, so they get shorter:
        // the writer is asked once one was short, and copies only the
        // frames of that moment. The writer pauses from here on, this
        // pass's sync (the longest) included.
        shared.catching_up.store(true, Ordering::Release);
        let caught_up = catch_up(conn, database, shared, overlapped);
        shared.catching_up.store(false, Ordering::Release);
        p = caught_up?;
        shared.finish.store(ASKED, Ordering::Release);
    } else if overlapped {
        sync(database, shared)?;
    }
    stats.wal_bytes.store(bytes(&p), Ordering::Relaxed);
    Ok(())
}

/// The passes after one that left the log past [`FINISH_BYTES`] (see
/// `pass`; `overlapped` is whether commits came during that one), while
/// the writer pauses after each commit; returns the last. Each copy is
/// synced but that of the short pass (or the last one allowed): syncing it
/// would let more frames in for the writer to copy, and the writer's
/// checkpoint syncs it.
fn catch_up(
    conn: &Connection,
    database: Option<&File>,
    shared: &Shared,
    mut overlapped: bool,
) -> Result<Pass, PassError> {
    let mut passes = 0;
    loop {
        if overlapped {
            sync(database, shared)?;
        }
        let started = Instant::now();
        let p;
        (p, overlapped) = copy(conn, shared)?;
        passes += 1;
        if started.elapsed() < CAUGHT_UP || passes >= CATCH_UP_PASSES {
            return Ok(p);
        }
    }
}

/// A `PASSIVE` checkpoint, and whether commits came during it: SQLite then
/// left the database file unsynced (see the module documentation).
fn copy(conn: &Connection, shared: &Shared) -> Result<(Pass, bool), PassError> {
    let commits = shared.commits.load(Ordering::Relaxed);
    let p = checkpoint(conn, "PASSIVE", shared)?;
    Ok((p, shared.commits.load(Ordering::Relaxed) != commits))
}

/// Syncs the database file (nothing without one: the writer's finishing
/// checkpoint syncs it then).
fn sync(database: Option<&File>, shared: &Shared) -> Result<(), PassError> {
    if let Some(file) = database {
        file.sync_data().map_err(PassError::Sync)?;
        #[cfg(test)]
        shared.database_syncs.fetch_add(1, Ordering::Relaxed);
    }
    #[cfg(not(test))]
    let _ = shared;
    Ok(())
}
