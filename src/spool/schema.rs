//! The spool file's schema and settings, applied at open: pragmas (page
//! size, WAL, synchronous, checkpoint window), the schema version, the two
//! tables, and the counters recovered from what a previous run left.
//!
//! The schema version is SQLite's `user_version`. A spool this build
//! creates, or opens with version 0 (made before the version was kept, the
//! same tables), is stamped [`SCHEMA_VERSION`] by the write probe at open.
//! A spool stamped with a later version was written by a newer daemon whose
//! rows this one may not understand: it is refused, untouched, with
//! [`PrepareError::Newer`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use super::writable::diagnose_not_writable;
use super::writer::Writer;
use super::{unix_ms_now, SpoolConfig, SpoolError, SpoolStats, Synchronous};

/// The spool schema this build reads and writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 1;

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

/// What the spool held when its last daemon stopped cleanly, so the next
/// start does not count a large spool row by row: depth, bytes, and the
/// two ids that tell whether anything changed since (the `AUTOINCREMENT`
/// high-water mark, which any append moves, and the first id, which any
/// acknowledgement or eviction moves). Written by the writer's last
/// transaction, deleted by the write probe at open: a run that ends
/// without writing it leaves none, and the next start counts.
pub(super) const META_CLEAN_DEPTH: &str = "clean_close_depth";
/// See [`META_CLEAN_DEPTH`].
pub(super) const META_CLEAN_BYTES: &str = "clean_close_bytes";
/// See [`META_CLEAN_DEPTH`].
pub(super) const META_CLEAN_SEQ: &str = "clean_close_seq";
/// See [`META_CLEAN_DEPTH`].
pub(super) const META_CLEAN_FIRST_ID: &str = "clean_close_first_id";
/// The `opened_ms` of the run that wrote the record. Every daemon's write
/// probe rewrites `opened_ms` at open, including versions that do not know
/// the record (and would not delete it): a record from before another run
/// is not trusted.
pub(super) const META_CLEAN_OPENED_MS: &str = "clean_close_opened_ms";
/// When this run opened the file (written by every version's write probe).
pub(super) const META_OPENED_MS: &str = "opened_ms";

/// The `AUTOINCREMENT` high-water mark of `events` (0 for a new table).
pub(super) fn events_seq(conn: &Connection) -> Result<i64, rusqlite::Error> {
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// The id of the oldest event kept (0 when empty).
pub(super) fn first_id(conn: &Connection) -> Result<i64, rusqlite::Error> {
    Ok(conn
        .query_row("SELECT min(id) FROM events", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .unwrap_or(0))
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

/// Page size of a newly created spool file.
const PAGE_SIZE: u32 = 16 * 1024;
/// WAL pages between SQLite's automatic checkpoints, used only while the
/// checkpointer thread cannot work (see `checkpoint`): about 40 MB at
/// 16 KiB pages (10 MB in a spool created with 4 KiB pages).
pub(super) const WAL_AUTOCHECKPOINT_PAGES: u32 = 2_500;
/// Size the WAL file is truncated to after a checkpoint.
pub(super) const WAL_SIZE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

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
            dropped_oldest: recovered.dropped_oldest,
            undeliverable: recovered.undeliverable,
            last_eviction_warn: None,
            evicted_since_warn: 0,
            freed: false,
            release: Arc::new(AtomicBool::new(false)),
            refusing: false,
            checkpointer: None,
            auto_checkpoint: false,
            lock: None,
        })
    }

    /// One small write transaction, at open; it also stamps the schema
    /// version on a new (or not yet versioned) spool and gives a new one
    /// its identity ([`SpoolStats::buffer_id`]), kept from then on.
    pub(super) fn write_probe(&mut self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = self
            .conn
            .execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![META_OPENED_MS, unix_ms_now()],
            )
            .and_then(|_| {
                // From now on this run may change the events: the counts a
                // clean stop left no longer hold after a crash.
                self.conn.execute(
                    "DELETE FROM meta WHERE key IN (?1, ?2, ?3, ?4, ?5)",
                    params![
                        META_CLEAN_DEPTH,
                        META_CLEAN_BYTES,
                        META_CLEAN_SEQ,
                        META_CLEAN_FIRST_ID,
                        META_CLEAN_OPENED_MS
                    ],
                )
            })
            .and_then(|_| stamp_version(&self.conn))
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
    // No checkpoint inside a commit: the checkpointer thread does them
    // (see `checkpoint`). The file is cut back to 64 MB when the log
    // starts over.
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES};"
    ))?;
    conn.execute_batch("PRAGMA temp_store=MEMORY;")
}

/// The events (ids only grow: `AUTOINCREMENT`) and the lifetime counters.
fn create_tables(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             stored_ms INTEGER NOT NULL,
             body BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )
}

/// Reads what a previous run left into `stats` and the writer's counters.
fn recover(conn: &Connection, stats: &SpoolStats) -> Result<Recovered, rusqlite::Error> {
    let (depth, bytes): (i64, i64) = match clean_close(conn)? {
        Some(counted) => counted,
        None => conn.query_row(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
    };
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
        dropped_oldest: dropped_oldest as u64,
        undeliverable,
    })
}

/// Depth and bytes as the last clean stop left them, if it left them and
/// the events are still the ones it counted (see [`META_CLEAN_DEPTH`]).
fn clean_close(conn: &Connection) -> Result<Option<(i64, i64)>, rusqlite::Error> {
    let (Some(depth), Some(bytes), Some(seq), Some(first), Some(opened)) = (
        get_meta(conn, META_CLEAN_DEPTH)?,
        get_meta(conn, META_CLEAN_BYTES)?,
        get_meta(conn, META_CLEAN_SEQ)?,
        get_meta(conn, META_CLEAN_FIRST_ID)?,
        get_meta(conn, META_CLEAN_OPENED_MS)?,
    ) else {
        return Ok(None);
    };
    if depth < 0
        || bytes < 0
        || get_meta(conn, META_OPENED_MS)? != Some(opened)
        || events_seq(conn)? != seq
        || first_id(conn)? != first
    {
        return Ok(None);
    }
    Ok(Some((depth, bytes)))
}
