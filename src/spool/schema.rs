//! The spool file's schema and settings, applied at open: pragmas (page
//! size, WAL, synchronous, checkpoint window), the schema version, the two
//! tables, and the counters recovered from what a previous run left.
//!
//! The schema version is SQLite's `user_version`. A spool this build
//! creates, or opens with an earlier version, is stamped [`SCHEMA_VERSION`]
//! by the write probe at open. A spool stamped with a later version was
//! written by a newer daemon whose rows this one may not understand: it is
//! refused, untouched, with [`PrepareError::Newer`].
//!
//! Version 2 gives the events' ids from the writer (no `AUTOINCREMENT`, so
//! a commit writes no `sqlite_sequence` page) and keeps the tally (see
//! [`META_TALLY_DEPTH`]). A version 0 or 1 file's table is rebuilt at open
//! while it holds at most [`REBUILD_MAX_EVENTS`] events; a larger one keeps
//! its table, which the writer uses the same way, until a later start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use super::writable::diagnose_not_writable;
use super::writer::{Tally, Writer};
use super::{unix_ms_now, SpoolConfig, SpoolError, SpoolStats, Synchronous};

/// The spool schema this build reads and writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 2;

/// Why a spool file could not be prepared.
#[derive(Debug, Error)]
pub(super) enum PrepareError {
    /// SQLite refused a step.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The file carries a schema version later than [`SCHEMA_VERSION`].
    #[error("it was written by a newer z4j-agentd (spool schema version {found}; this version knows {SCHEMA_VERSION} at most)")]
    Newer {
        /// The file's `user_version`.
        found: i64,
    },
}

/// The [`SpoolError`] for a spool that could not be prepared: what cannot
/// be written, a newer spool, or SQLite's reason with the way out.
pub(super) fn prepare_failed(path: &Path, e: PrepareError) -> SpoolError {
    let p = path.display();
    match e {
        PrepareError::Newer { .. } => SpoolError::Open {
            path: p.to_string(),
            message: format!(
                "{e}; run that version or a later one, or move the file aside (e.g. `mv {p} {p}.newer`) to start with an empty spool"
            ),
        },
        PrepareError::Sqlite(e) => diagnose_not_writable(path).unwrap_or_else(|| SpoolError::Open {
            path: p.to_string(),
            message: format!(
                "{e}; if the file is damaged, move it aside (e.g. `mv {p} {p}.broken`) and start again"
            ),
        }),
    }
}

/// Counters recovered from the file at open.
struct Recovered {
    depth: u64,
    bytes: u64,
    last_id: i64,
    dropped_oldest: u64,
    undeliverable: u64,
}

/// `meta` keys (every value is an INTEGER; a new key needs no new schema
/// version: an older daemon ignores it).
/// The two halves of the spool's identity for the brain (`buffer_id`),
/// chosen at random when the file is first opened and never changed.
pub(super) const META_BUFFER_ID_HIGH: &str = "buffer_id_high";
/// See [`META_BUFFER_ID_HIGH`].
pub(super) const META_BUFFER_ID_LOW: &str = "buffer_id_low";
/// The brain version last seen (a `BrainLine` code): the contract line the
/// next start names first.
pub(super) const META_BRAIN_LINE: &str = "brain_line";
/// Events discarded as undeliverable over the file's lifetime.
pub(super) const META_UNDELIVERABLE_TOTAL: &str = "undeliverable_total";

/// The tally: the depth and bytes of the events whose id is at most
/// [`META_TALLY_LAST_ID`], so a start counts only the rows after it instead
/// of the whole spool. Only a deletion changes those rows, and every
/// transaction that deletes events rewrites the tally; appends rewrite it
/// now and then (see `writer::TALLY_EVERY`), and the last transaction of a
/// clean stop. `tally_last_id` is also the highest id ever given, so ids
/// keep growing after the spool empties, across restarts too.
pub(super) const META_TALLY_DEPTH: &str = "tally_depth";
/// See [`META_TALLY_DEPTH`].
pub(super) const META_TALLY_BYTES: &str = "tally_bytes";
/// See [`META_TALLY_DEPTH`].
pub(super) const META_TALLY_LAST_ID: &str = "tally_last_id";
/// The `opened_ms` of the run that keeps the tally. Every daemon's write
/// probe rewrites `opened_ms` at open, including versions that do not know
/// the tally (and would not keep it): a tally from before another run is
/// not trusted, and the start counts every row.
pub(super) const META_TALLY_OPENED_MS: &str = "tally_opened_ms";
/// Keys a version 1 daemon kept; removed at open.
const META_V1_LEFTOVERS: [&str; 5] = [
    "clean_close_depth",
    "clean_close_bytes",
    "clean_close_seq",
    "clean_close_first_id",
    "clean_close_opened_ms",
];
/// When this run opened the file (written by every version's write probe).
pub(super) const META_OPENED_MS: &str = "opened_ms";

/// The `AUTOINCREMENT` high-water mark of a version 0 or 1 `events` table
/// (0 when there is none).
fn events_seq(conn: &Connection) -> Result<i64, rusqlite::Error> {
    let has_sequence = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !has_sequence {
        return Ok(0);
    }
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// The highest id the events hold (0 when empty).
fn max_id(conn: &Connection) -> Result<i64, rusqlite::Error> {
    Ok(conn
        .query_row("SELECT max(id) FROM events", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .unwrap_or(0))
}

/// Writes the tally (inside the caller's transaction).
pub(super) fn write_tally(
    conn: &Connection,
    depth: u64,
    bytes: u64,
    last_id: i64,
) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2), (?3, ?4), (?5, ?6)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![
        META_TALLY_DEPTH,
        depth.min(i64::MAX as u64) as i64,
        META_TALLY_BYTES,
        bytes.min(i64::MAX as u64) as i64,
        META_TALLY_LAST_ID,
        last_id
    ])
    .map(|_| ())
}

/// Sets a `meta` value (inside the caller's transaction).
pub(super) fn set_meta(conn: &Connection, key: &str, value: i64) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
}

pub(super) fn get_meta(conn: &Connection, key: &str) -> Result<Option<i64>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// The spool's identity: the two stored halves as 32 hex digits.
fn buffer_id(high: i64, low: i64) -> String {
    format!("{:016x}{:016x}", high as u64, low as u64)
}

/// Most events, and bytes, an older spool's table may hold to be rebuilt
/// at start (a copy of at most this much, once).
const REBUILD_MAX_EVENTS: u64 = 10_000;
/// See [`REBUILD_MAX_EVENTS`].
const REBUILD_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Page size of a newly created spool file.
const PAGE_SIZE: u32 = 4 * 1024;
/// WAL pages between SQLite's automatic checkpoints, used only while the
/// checkpointer thread cannot work (see `checkpoint`): about 10 MB at
/// 4 KiB pages (40 MB in a spool created with 16 KiB pages).
pub(super) const WAL_AUTOCHECKPOINT_PAGES: u32 = 2_500;

impl Writer {
    /// Checks the schema version, applies the settings, creates the tables
    /// if needed and recovers the counters of what the file holds.
    pub(super) fn prepare(conn: Connection, config: &SpoolConfig) -> Result<Writer, PrepareError> {
        conn.busy_timeout(Duration::from_secs(5))?;
        check_version(&conn)?;
        apply_settings(&conn, config)?;
        create_tables(&conn)?;
        let stats = Arc::new(SpoolStats::default());
        let recovered = recover(&conn, &stats)?;
        Ok(Writer {
            conn,
            config: config.clone(),
            stats,
            depth: recovered.depth,
            bytes: recovered.bytes,
            last_id: recovered.last_id,
            tally: Tally::new(),
            dropped_oldest: recovered.dropped_oldest,
            undeliverable: recovered.undeliverable,
            last_eviction_warn: None,
            evicted_since_warn: 0,
            freed: false,
            release: Arc::new(AtomicBool::new(false)),
            refusing: false,
            checkpointer: None,
            auto_checkpoint: false,
            pause: None,
            database: None,
            lock: None,
        })
    }

    /// One small write transaction, at open; it also stamps the schema
    /// version on a new (or older) spool, rebuilds an older spool's table
    /// while it is small, gives a new spool its identity
    /// ([`SpoolStats::buffer_id`], kept from then on) and writes the tally
    /// this run keeps.
    pub(super) fn write_probe(&mut self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let opened = unix_ms_now();
        let r = set_meta(&self.conn, META_OPENED_MS, opened)
            .and_then(|()| {
                for key in META_V1_LEFTOVERS {
                    self.conn
                        .execute("DELETE FROM meta WHERE key = ?1", [key])?;
                }
                self.rebuild_older_table()?;
                stamp_version(&self.conn)?;
                write_tally(&self.conn, self.depth, self.bytes, self.last_id)?;
                set_meta(&self.conn, META_TALLY_OPENED_MS, opened)
            })
            .and_then(|()| ensure_buffer_id(&self.conn));
        let id = match r.and_then(|id| self.conn.execute_batch("COMMIT").map(|()| id)) {
            Ok(id) => id,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        let _ = self.stats.buffer_id.set(id);
        Ok(())
    }

    /// Rebuilds a version 0 or 1 `events` table (`AUTOINCREMENT`) without
    /// it, keeping every row and id, when it holds at most
    /// [`REBUILD_MAX_EVENTS`] events and [`REBUILD_MAX_BYTES`]: a larger one
    /// is kept (ids come from the writer either way) until a later start
    /// finds it small. A rebuild that fails is undone and logged; the start
    /// goes on with the table as it was, unless SQLite rolled back the
    /// whole transaction (an I/O error): then the start fails with it.
    fn rebuild_older_table(&mut self) -> Result<(), rusqlite::Error> {
        let autoincrement = self
            .conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map(|sql| sql.to_ascii_uppercase().contains("AUTOINCREMENT"));
        if !matches!(autoincrement, Ok(true)) {
            return Ok(());
        }
        if self.depth > REBUILD_MAX_EVENTS || self.bytes > REBUILD_MAX_BYTES {
            tracing::info!(
                events = self.depth,
                bytes = self.bytes,
                "the spool's table is from an earlier version and too large to rebuild at start; it is kept and rebuilt at a start that finds it holding at most {REBUILD_MAX_EVENTS} events and {REBUILD_MAX_BYTES} bytes"
            );
            return Ok(());
        }
        let rebuilt = self.conn.execute_batch(&format!(
            "SAVEPOINT rebuild;
             CREATE TABLE events_v2 {EVENTS_COLUMNS};
             INSERT INTO events_v2(id, stored_ms, body) SELECT id, stored_ms, body FROM events;
             DROP TABLE events;
             ALTER TABLE events_v2 RENAME TO events;
             RELEASE rebuild;"
        ));
        if let Err(e) = rebuilt {
            if self.conn.is_autocommit() {
                // SQLite undid the whole transaction itself.
                return Err(e);
            }
            self.conn
                .execute_batch("ROLLBACK TO rebuild; RELEASE rebuild;")?;
            tracing::warn!(error = %e, "could not rebuild the spool's table from an earlier version; it is kept as it is (its events are safe) and the rebuild is tried at the next start");
        }
        Ok(())
    }
}

/// Refuses a file stamped by a newer build, before anything is written.
fn check_version(conn: &Connection) -> Result<(), PrepareError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(PrepareError::Newer { found });
    }
    Ok(())
}

/// Stamps [`SCHEMA_VERSION`] where it is missing (inside the caller's
/// transaction).
fn stamp_version(conn: &Connection) -> Result<(), rusqlite::Error> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found < SCHEMA_VERSION {
        conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION};"))?;
    }
    Ok(())
}

/// The spool's identity, chosen now if the file has none (inside the
/// caller's transaction).
fn ensure_buffer_id(conn: &Connection) -> Result<String, rusqlite::Error> {
    for key in [META_BUFFER_ID_HIGH, META_BUFFER_ID_LOW] {
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES (?1, ?2)",
            params![key, rand::random::<i64>()],
        )?;
    }
    let high = get_meta(conn, META_BUFFER_ID_HIGH)?.unwrap_or(0);
    let low = get_meta(conn, META_BUFFER_ID_LOW)?.unwrap_or(0);
    Ok(buffer_id(high, low))
}

/// Page size, WAL, `synchronous` and the checkpoint window.
fn apply_settings(conn: &Connection, config: &SpoolConfig) -> Result<(), rusqlite::Error> {
    // 4 KiB pages for a new spool (an existing file keeps its size, 16 KiB
    // for one created by an earlier version): a commit writes at least the
    // page its last event went to, so a commit of one small event writes
    // 4 KiB of log instead of 16. The durable ack's p99 at a steady 20,000
    // events/s went from about 0.5 to 0.45 ms; batched ingest lost up to 11%
    // (BENCHMARKS.md).
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
    // No checkpoint inside a commit: the checkpointer thread does them
    // (see `checkpoint`). The log file is not cut when the log starts over
    // (that commit would wait for the cut); it is emptied once writes stop.
    conn.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=-1;")?;
    conn.execute_batch("PRAGMA temp_store=MEMORY;")
}

/// The `events` table's columns since version 2 (a new spool's, and an
/// older one's once rebuilt).
const EVENTS_COLUMNS: &str =
    "(id INTEGER PRIMARY KEY, stored_ms INTEGER NOT NULL, body BLOB NOT NULL)";

/// The events (ids given by the writer, which only grow) and the
/// lifetime counters.
fn create_tables(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS events {EVENTS_COLUMNS};
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    ))
}

/// Reads what a previous run left into `stats` and the writer's counters.
fn recover(conn: &Connection, stats: &SpoolStats) -> Result<Recovered, rusqlite::Error> {
    let tally_last_id = get_meta(conn, META_TALLY_LAST_ID)?.unwrap_or(0);
    // Only the rows after the tally's last id are counted, or all of them
    // when the tally is not this file's.
    let (base_depth, base_bytes, count_after) = trusted_tally(conn)?.unwrap_or((0, 0, i64::MIN));
    let (after_depth, after_bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM events WHERE id > ?1",
        [count_after],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (mut depth, mut bytes) = (base_depth + after_depth, base_bytes + after_bytes);
    let max_id = max_id(conn)?;
    if depth > 0 && max_id == 0 {
        // A tally that says events are left in an empty table was not kept
        // by every run since (see `writer::Writer::refresh_oldest`).
        (depth, bytes) = (0, 0);
    }
    let last_id = max_id.max(tally_last_id).max(events_seq(conn)?);
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
    stats.max_id_at_open.store(max_id, Ordering::Relaxed);
    stats
        .oldest_stored_ms
        .store(oldest.unwrap_or(0), Ordering::Relaxed);
    stats.depth.store(depth as u64, Ordering::Relaxed);
    stats.bytes.store(bytes as u64, Ordering::Relaxed);
    stats
        .dropped_oldest_total
        .store(dropped_oldest as u64, Ordering::Relaxed);
    let undeliverable = get_meta(conn, META_UNDELIVERABLE_TOTAL)?
        .unwrap_or(0)
        .max(0) as u64;
    stats
        .undeliverable_total
        .store(undeliverable, Ordering::Relaxed);
    *stats.brain_line.lock().unwrap() = get_meta(conn, META_BRAIN_LINE)?;
    Ok(Recovered {
        depth: depth as u64,
        bytes: bytes as u64,
        last_id,
        dropped_oldest: dropped_oldest as u64,
        undeliverable,
    })
}

/// The tally's depth, bytes and last id, if the run that last opened the
/// file kept it (see [`META_TALLY_DEPTH`]).
fn trusted_tally(conn: &Connection) -> Result<Option<(i64, i64, i64)>, rusqlite::Error> {
    let (Some(depth), Some(bytes), Some(last_id), Some(opened)) = (
        get_meta(conn, META_TALLY_DEPTH)?,
        get_meta(conn, META_TALLY_BYTES)?,
        get_meta(conn, META_TALLY_LAST_ID)?,
        get_meta(conn, META_TALLY_OPENED_MS)?,
    ) else {
        return Ok(None);
    };
    if depth < 0 || bytes < 0 || get_meta(conn, META_OPENED_MS)? != Some(opened) {
        return Ok(None);
    }
    Ok(Some((depth, bytes, last_id)))
}
