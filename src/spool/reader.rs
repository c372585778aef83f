//! The writer thread's reads: the uplink's "everything after id X" and
//! re-reads of an in-flight range, and the snapshot for `status`. They are
//! served after the writes of the same group, so they see that commit.

use rusqlite::{params, OptionalExtension};

use super::handle::Op;
use super::writer::Writer;
use super::{Snapshot, SpoolError, StoredEvent};

impl Writer {
    pub(super) fn read(&mut self, op: Op) {
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
            Op::Append { .. }
            | Op::Ack { .. }
            | Op::Probe { .. }
            | Op::Discard { .. }
            | Op::RememberBrain { .. }
            | Op::Close => {}
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
