//! The writer thread: it owns the only connection, takes every request
//! that queued up while the last transaction ran, and applies the writes in
//! one transaction (group commit). Appends are answered only after that
//! commit; the overflow policy (evict the oldest, refuse the newest, or hold
//! the producer) is applied here, and every event it drops is counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, Notify};

use super::checkpoint::{Checkpointer, Database};
use super::handle::Op;
use super::lock::SpoolLock;
use super::schema::{
    set_meta, write_tally, META_BRAIN_LINE, META_UNDELIVERABLE_TOTAL, WAL_AUTOCHECKPOINT_PAGES,
};
use super::{unix_ms_now, AppendOutcome, Overflow, SpoolConfig, SpoolError, SpoolStats};

/// Most events applied in one transaction (bounds commit latency).
const MAX_EVENTS_PER_COMMIT: usize = 32_768;
/// The longest pause after a commit while the checkpointer catches up
/// (see [`pause`]).
const MAX_PAUSE: Duration = Duration::from_millis(5);
/// An append of at most this many events ends a pause (see [`pause`]).
const SMALL_APPEND: usize = 64;
/// How often a pause looks for requests.
const PAUSE_POLL: Duration = Duration::from_micros(250);
/// At most one eviction WARNING per this interval.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);
/// Appends rewrite the tally (`schema::META_TALLY_DEPTH`) once this long
/// has passed since it was last written, or once this many events were
/// appended since: a start after a crash counts about that many rows at
/// most (plus those of the commit that crossed the mark).
const TALLY_EVERY: Duration = Duration::from_secs(1);
/// See [`TALLY_EVERY`].
const TALLY_EVERY_EVENTS: u64 = 65_536;

/// When the tally was last written, and the events appended since.
#[derive(Clone, Copy)]
pub(super) struct Tally {
    written_at: Instant,
    appended_since: u64,
}

impl Tally {
    pub(super) fn new() -> Tally {
        Tally {
            written_at: Instant::now(),
            appended_since: 0,
        }
    }

    fn due(&self) -> bool {
        self.appended_since >= TALLY_EVERY_EVENTS
            || (self.appended_since > 0 && self.written_at.elapsed() >= TALLY_EVERY)
    }
}

/// State owned by the writer thread.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) config: SpoolConfig,
    pub(super) stats: Arc<SpoolStats>,
    pub(super) depth: u64,
    pub(super) bytes: u64,
    /// The highest id given (the next append's is one more): ids only
    /// grow, also after the spool empties and across restarts.
    pub(super) last_id: i64,
    /// See [`Tally`].
    pub(super) tally: Tally,
    pub(super) dropped_oldest: u64,
    /// Lifetime count of events discarded as undeliverable (kept in `meta`).
    pub(super) undeliverable: u64,
    pub(super) last_eviction_warn: Option<Instant>,
    pub(super) evicted_since_warn: u64,
    /// Whether the current transaction deleted anything (wakes `block` waiters).
    pub(super) freed: bool,
    /// Set when producers are no longer held back (`block`, on shutdown).
    pub(super) release: Arc<AtomicBool>,
    /// `block` with `release` set, read once per transaction: an append
    /// that does not fit whole stores nothing and is answered `Stopping`.
    pub(super) refusing: bool,
    /// Copies the WAL into the database off the commit path (started with
    /// the writer, stopped by it before its last checkpoint).
    pub(super) checkpointer: Option<Checkpointer>,
    /// Whether SQLite's automatic checkpoint is on for this connection
    /// (only while the checkpointer fails).
    pub(super) auto_checkpoint: bool,
    /// The pause the run loop takes before the next transaction (see
    /// [`pause`]).
    pub(super) pause: Option<Duration>,
    /// The database file for the checkpointer's syncs. Declared after
    /// `conn`, so it is closed only after the connection is (see
    /// [`Database`]).
    pub(super) database: Option<Database>,
    /// The spool's lock. Declared last, so it is released only after the
    /// connection above is closed.
    pub(super) lock: Option<SpoolLock>,
}

impl Writer {
    pub(super) fn run(
        mut self,
        mut rx: mpsc::Receiver<Op>,
        new_events: Arc<Notify>,
        space_freed: Arc<Notify>,
    ) {
        let mut ops = Vec::new();
        loop {
            // Requests received during a pause are already in `ops`.
            if ops.is_empty() {
                match rx.blocking_recv() {
                    Some(first) => ops.push(first),
                    None => break,
                }
            }
            let mut events_in_batch = ops_event_count(&ops);
            while receive(&mut rx, &mut ops, &mut events_in_batch).is_ok() {}
            let closing = ops.iter().any(|o| matches!(o, Op::Close));
            let (stored_any, freed_any) = self.apply(&mut ops);
            if stored_any {
                new_events.notify_one();
            }
            if freed_any {
                space_freed.notify_waiters();
            }
            if closing {
                break;
            }
            if let Some(d) = self.pause.take() {
                pause(&mut rx, &mut ops, d);
            }
        }
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        if let Err(e) = self.record_tally() {
            tracing::warn!(error = %e, "could not record the spool's counts at stop; the next start counts the events appended since they were last recorded");
        }
        // Fold the WAL back so the next start opens quickly; failure is harmless.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// Writes the tally in a transaction of its own, at stop, so the next
    /// start counts no row.
    fn record_tally(&mut self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match write_tally(&self.conn, self.depth, self.bytes, self.last_id)
            .and_then(|()| self.conn.execute_batch("COMMIT"))
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Applies one group of requests: writes in one transaction, publishes
    /// the counters, then replies, then serves reads (which therefore see
    /// this commit). Returns whether anything was stored and whether
    /// anything was deleted.
    fn apply(&mut self, ops: &mut Vec<Op>) -> (bool, bool) {
        let before = (self.depth, self.bytes, self.dropped_oldest, self.last_id);
        let undeliverable_before = self.undeliverable;
        self.freed = false;
        let mut outcomes: Vec<AppendOutcome> = Vec::new();
        let mut ack_counts: Vec<u64> = Vec::new();
        let started = Instant::now();
        let result = self.write_all(ops, &mut outcomes, &mut ack_counts);
        let took = started.elapsed();
        let wrote = ops.iter().any(is_write);
        if result.is_err() {
            // Nothing of this transaction is on disk.
            (self.depth, self.bytes, self.dropped_oldest, self.last_id) = before;
            self.undeliverable = undeliverable_before;
            self.freed = false;
            outcomes.clear();
            ack_counts.clear();
            self.stats.write_failing.store(true, Ordering::Relaxed);
        } else if wrote {
            self.stats.commits_total.fetch_add(1, Ordering::Relaxed);
            self.stats.write_failing.store(false, Ordering::Relaxed);
            self.refresh_oldest();
        }
        // Discarded events share the deletes' replies but were never acked.
        let discarded = self.undeliverable - undeliverable_before;
        let stored = self.publish(&outcomes, &ack_counts, discarded);
        let committed = wrote && result.is_ok();
        match result {
            Ok(()) => self.reply_committed(ops, outcomes, ack_counts),
            Err(e) => self.reply_failed(ops, SpoolError::from_sqlite(e)),
        }
        if committed {
            self.after_commit(took);
        }
        (stored > 0, self.freed)
    }

    /// The writer's part in keeping the WAL bounded, after the replies of
    /// a commit went out (see `checkpoint`): the pause the run loop takes
    /// next, as long as the commit (at most [`MAX_PAUSE`], see [`pause`]),
    /// while the checkpointer catches up with a log that outgrew its bound;
    /// the last frames of that log; or SQLite's automatic checkpoint while
    /// the checkpointer cannot work.
    fn after_commit(&mut self, took: Duration) {
        let Some(shared) = self.checkpointer.as_ref().map(Checkpointer::shared) else {
            return;
        };
        let fallback = shared.writer_must_checkpoint();
        if fallback != self.auto_checkpoint {
            let pages = if fallback {
                WAL_AUTOCHECKPOINT_PAGES
            } else {
                0
            };
            if self
                .conn
                .execute_batch(&format!("PRAGMA wal_autocheckpoint={pages};"))
                .is_ok()
            {
                self.auto_checkpoint = fallback;
                self.stats
                    .checkpoint_on_commit
                    .store(fallback, Ordering::Relaxed);
            }
        }
        shared.restarted();
        if shared.catching_up() && !fallback {
            self.pause = Some(took.min(MAX_PAUSE));
        }
        if shared.finish_asked() {
            // Busy (a pass still under way): tried again after the next commit.
            let busy = self
                .conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
                .map(|b| b != 0);
            match busy {
                Ok(false) => {
                    shared.finished();
                    self.stats
                        .writer_checkpoints_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(true) => {}
                Err(e) => {
                    shared.finish_failed();
                    tracing::warn!(error = %e, "the spool's writer could not finish a checkpoint; the checkpointer tries again");
                }
            }
        }
    }

    /// Publishes the counters after a transaction (or its rollback);
    /// returns how many events it stored.
    fn publish(&self, outcomes: &[AppendOutcome], ack_counts: &[u64], discarded: u64) -> u64 {
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
        self.stats.acked_total.fetch_add(
            ack_counts.iter().sum::<u64>().saturating_sub(discarded),
            Ordering::Relaxed,
        );
        self.stats.depth.store(self.depth, Ordering::Relaxed);
        self.stats.bytes.store(self.bytes, Ordering::Relaxed);
        self.stats
            .dropped_oldest_total
            .store(self.dropped_oldest, Ordering::Relaxed);
        self.stats
            .undeliverable_total
            .store(self.undeliverable, Ordering::Relaxed);
        stored
    }

    /// Answers each write of a committed transaction with its outcome, in
    /// order, and serves the reads.
    fn reply_committed(
        &mut self,
        ops: &mut Vec<Op>,
        outcomes: Vec<AppendOutcome>,
        ack_counts: Vec<u64>,
    ) {
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
                Op::Ack { reply, .. } | Op::Discard { reply, .. } => {
                    let _ = reply.send(Ok(acks.next().unwrap_or(0)));
                }
                Op::Probe { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Op::RememberBrain { code, reply } => {
                    *self.stats.brain_line.lock().unwrap() = Some(code);
                    let _ = reply.send(Ok(()));
                }
                other => self.read(other),
            }
        }
    }

    /// Answers each write of a rolled-back transaction with `kind` (nothing
    /// of it is stored), and serves the reads.
    fn reply_failed(&mut self, ops: &mut Vec<Op>, kind: SpoolError) {
        tracing::error!(error = %kind, "spool write failed; the batch was not stored");
        for op in ops.drain(..) {
            match op {
                // The producer counts these (refused_by_reason).
                Op::Append { reply, .. } => {
                    let _ = reply.send(Err(kind.clone()));
                }
                Op::Ack { reply, .. } | Op::Discard { reply, .. } => {
                    let _ = reply.send(Err(kind.clone()));
                }
                Op::Probe { reply } | Op::RememberBrain { reply, .. } => {
                    let _ = reply.send(Err(kind.clone()));
                }
                other => self.read(other),
            }
        }
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
        let undeliverable_before = self.undeliverable;
        self.refusing =
            self.config.overflow == Overflow::Block && self.release.load(Ordering::SeqCst);
        let last_id_before = self.last_id;
        let mut tally = self.tally;
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
                    Op::Discard { first, last, .. } => {
                        let n = self.delete_range(*first, *last)?;
                        self.undeliverable += n;
                        ack_counts.push(n);
                    }
                    Op::RememberBrain { code, .. } => {
                        set_meta(&self.conn, META_BRAIN_LINE, *code)?;
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
            if self.undeliverable != undeliverable_before {
                set_meta(
                    &self.conn,
                    META_UNDELIVERABLE_TOTAL,
                    self.undeliverable.min(i64::MAX as u64) as i64,
                )?;
            }
            // Rows at or below the tally's last id changed only if some
            // were deleted: then the tally must change in the same commit.
            tally.appended_since += (self.last_id - last_id_before) as u64;
            let write = self.freed || tally.due();
            if write {
                write_tally(&self.conn, self.depth, self.bytes, self.last_id)?;
                tally = Tally::new();
            }
            Ok(())
        })();
        if let Err(e) = r.and_then(|()| self.conn.execute_batch("COMMIT")) {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        if let Some(c) = &self.checkpointer {
            c.shared().committed();
        }
        self.tally = tally;
        let evicted = self.dropped_oldest - dropped_before;
        if evicted > 0 {
            self.warn_eviction(evicted);
        }
        Ok(())
    }

    /// Keeps [`SpoolStats::oldest_stored_ms`] current after a commit: a
    /// lookup by primary key, only when the head of the queue may have moved.
    ///
    /// An empty table with a depth left over means the counts came from a
    /// tally some run did not keep (a build from before the tally changed
    /// the events): the depth is set right (published with the commit's
    /// counters), and the next deletion's tally with it.
    fn refresh_oldest(&mut self) {
        if self.depth == 0 {
            self.stats.oldest_stored_ms.store(0, Ordering::Relaxed);
            return;
        }
        if !self.freed && self.stats.oldest_stored_ms.load(Ordering::Relaxed) != 0 {
            return;
        }
        match self
            .conn
            .query_row(
                "SELECT stored_ms FROM events ORDER BY id LIMIT 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        {
            Ok(Some(ms)) => self.stats.oldest_stored_ms.store(ms, Ordering::Relaxed),
            Ok(None) => {
                tracing::warn!(
                    counted = self.depth,
                    "the spool is empty but its counts said events were left; they are set to 0 (a run that did not keep the spool's tally changed it)"
                );
                (self.depth, self.bytes) = (0, 0);
                self.stats.oldest_stored_ms.store(0, Ordering::Relaxed);
            }
            Err(_) => {}
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
            .prepare_cached("INSERT INTO events(id, stored_ms, body) VALUES (?1, ?2, ?3)")?;
        for body in accept {
            stmt.execute(params![self.last_id + 1, now, body])?;
            self.last_id += 1;
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

    /// Deletes the events with ids `first..=last`; returns how many there
    /// were. They are counted (and their bytes summed, from the record
    /// headers) first, so the delete itself needs no `RETURNING`, which
    /// would make SQLite collect the ids and look each row up again.
    fn delete_range(&mut self, first: i64, last: i64) -> Result<u64, rusqlite::Error> {
        let (n, b) = self
            .conn
            .prepare_cached(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM events
                 WHERE id BETWEEN ?1 AND ?2",
            )?
            .query_row(params![first, last], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?;
        if n == 0 {
            return Ok(0);
        }
        self.conn
            .prepare_cached("DELETE FROM events WHERE id BETWEEN ?1 AND ?2")?
            .execute(params![first, last])?;
        self.depth -= n.min(self.depth);
        self.bytes -= b.min(self.bytes);
        self.freed = true;
        Ok(n)
    }
}

/// Waits up to `d` before the next transaction, so that the checkpointer
/// catches up with a flood, keeping the requests that come meanwhile in
/// `ops` (no more than [`MAX_EVENTS_PER_COMMIT`] events: the rest wait in
/// the channel). Only large appends wait it out: any other request (a
/// small append, an acknowledgement, a read, the stop) ends it within a
/// poll, so a client sending a few events at a time beside a flood does
/// not pay for it.
pub(super) fn pause(rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>, d: Duration) {
    let until = Instant::now() + d;
    let mut events = ops_event_count(ops);
    loop {
        match receive(rx, ops, &mut events) {
            Ok(()) => {
                let large = matches!(
                    ops.last(),
                    Some(Op::Append { events, .. }) if events.len() > SMALL_APPEND
                );
                if !large {
                    return;
                }
            }
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= until {
                    return;
                }
                std::thread::sleep((until - now).min(PAUSE_POLL));
            }
        }
    }
}

/// Moves the next queued request into `ops` while they hold fewer than
/// [`MAX_EVENTS_PER_COMMIT`] events (counted in `events`); at that many,
/// the rest wait in the channel (`Empty`).
fn receive(
    rx: &mut mpsc::Receiver<Op>,
    ops: &mut Vec<Op>,
    events: &mut usize,
) -> Result<(), TryRecvError> {
    if *events >= MAX_EVENTS_PER_COMMIT {
        return Err(TryRecvError::Empty);
    }
    let op = rx.try_recv()?;
    *events += op_event_count(&op);
    ops.push(op);
    Ok(())
}

fn is_write(op: &Op) -> bool {
    matches!(
        op,
        Op::Append { .. }
            | Op::Ack { .. }
            | Op::Probe { .. }
            | Op::Discard { .. }
            | Op::RememberBrain { .. }
    )
}

fn ops_event_count(ops: &[Op]) -> usize {
    ops.iter().map(op_event_count).sum()
}

fn op_event_count(op: &Op) -> usize {
    match op {
        Op::Append { events, .. } => events.len(),
        _ => 1,
    }
}
