//! The fast path for the messages that carry nearly every event: an
//! `events` (or `event`) message in MessagePack whose events are all
//! accepted as they are.
//!
//! [`handle_msgpack`] reads the message in place ([`msgpack::Reader`]) and
//! writes each event's `data` straight out as canonical JSON, instead of
//! decoding the whole message into values and rendering them. It returns
//! `None` for anything it does not handle exactly as [`handle`] would:
//! another message type, a refused event, a `worker.*` or schedule event,
//! an `occurred_at` the daemon would correct, a value the decoder refuses,
//! duplicated fields. The connection then decodes the message as usual and
//! [`handle`] decides, so every refusal, count and correction keeps one
//! implementation.
//!
//! Invariant: when it returns `Some`, it is what [`handle`] returns for the
//! decoded message, apart from the ids the daemon draws for events without
//! one (tests below and the `ingest_msgpack` fuzz target compare the two).
//!
//! [`handle`]: super::handler::handle

use time::OffsetDateTime;

use super::decision::{EngineRuns, Handled, Limits, Store};
use super::validate::{
    self, in_brain_window, Data, Record, EXTERNAL_PROJECTION, EXTERNAL_SNAPSHOT_FRAME,
};
use crate::protocol::msgpack::{Reader, Token, Unusual};
use crate::protocol::{Value, LEGACY_SCHEDULE_KINDS};

/// Longest string `ack_id` taken here: its JSON form stays within
/// [`super::MAX_ACK_ID_BYTES`] even with every character escaped.
const MAX_FAST_ACK_ID_CHARS: usize = 40;

/// What [`handle`](super::handler::handle) returns for the MessagePack
/// message `body` received at `now`, when this path can tell; `None`
/// otherwise (see the module's documentation).
pub fn handle_msgpack(body: &[u8], limits: &Limits, now: OffsetDateTime) -> Option<Handled> {
    message(body, limits, now).ok()
}

/// The message in one pass: its own keys, the events of an `events` list
/// as they come, and the event fields of the message itself in case it
/// turns out to be an `event` (its `type` may come last).
fn message(body: &[u8], limits: &Limits, now: OffsetDateTime) -> Result<Handled, Unusual> {
    let mut r = Reader::new(body);
    let Token::Map(n) = r.token()? else {
        return Err(Unusual);
    };
    let mut kind = None;
    let mut ack_id = None;
    let mut events = None;
    let mut own = Fields::default();
    for _ in 0..n {
        match r.string()? {
            "type" => match r.string()? {
                // Other messages are the value path's: no more work here.
                t @ ("event" | "events") => once(&mut kind, t)?,
                _ => return Err(Unusual),
            },
            "ack_id" => once(&mut ack_id, ack(&mut r)?)?,
            "events" => once(&mut events, list(&mut r, limits, now)?)?,
            key => own.read(key, &mut r, limits, 1)?,
        }
    }
    if !r.at_end() {
        return Err(Unusual);
    }
    let (records, engines) = match (kind, events) {
        (Some("events"), Some(list)) => list,
        (Some("event"), _) => {
            let (record, engine) = own.record(limits, now)?;
            let mut engines = EngineRuns::default();
            engines.record(Some(engine.to_string()));
            (vec![record], engines)
        }
        _ => return Err(Unusual),
    };
    let mut h = Handled::default();
    h.counts.events_received = records.len() as u64;
    h.store = Some(Store {
        records,
        engines,
        ack_id,
    });
    Ok(h)
}

/// Sets `slot`, or `Unusual` when it was set (a duplicated key).
fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), Unusual> {
    match slot.replace(v) {
        None => Ok(()),
        Some(_) => Err(Unusual),
    }
}

/// An `events` list: every event's record and their engines.
fn list(
    r: &mut Reader<'_>,
    limits: &Limits,
    now: OffsetDateTime,
) -> Result<(Vec<Vec<u8>>, EngineRuns), Unusual> {
    let Token::Array(len) = r.token()? else {
        return Err(Unusual);
    };
    let mut records = Vec::with_capacity((len as usize).min(4096));
    let mut engines = EngineRuns::default();
    for _ in 0..len {
        let Token::Map(m) = r.token()? else {
            return Err(Unusual);
        };
        let mut fields = Fields::default();
        for _ in 0..m {
            let key = r.string()?;
            fields.read(key, r, limits, 3)?;
        }
        let (record, engine) = fields.record(limits, now)?;
        let new_run = (!engines.continues(engine)).then(|| engine.to_string());
        records.push(record);
        engines.record(new_run);
    }
    Ok((records, engines))
}

/// An `ack_id` this path echoes as the value decoder would have decoded it.
fn ack(r: &mut Reader<'_>) -> Result<Value, Unusual> {
    match scalar(r)? {
        v @ (Value::Null | Value::Int(_) | Value::UInt(_)) => Ok(v),
        Value::Str(s) if s.chars().count() <= MAX_FAST_ACK_ID_CHARS => Ok(Value::Str(s)),
        _ => Err(Unusual),
    }
}

/// A scalar field as the value decoder would have decoded it.
fn scalar(r: &mut Reader<'_>) -> Result<Value, Unusual> {
    Ok(match r.token()? {
        Token::Nil => Value::Null,
        Token::Bool(b) => Value::Bool(b),
        Token::Int(i) => Value::Int(i),
        Token::UInt(u) => Value::from(u),
        Token::Float(f) => Value::Float(f),
        Token::Str(s) => Value::Str(s.to_owned()),
        Token::Array(_) | Token::Map(_) => return Err(Unusual),
    })
}

/// Kinds the value path handles: a `worker.*` event updates the client
/// registry, and a schedule kind depends on its `data`.
fn leaves_the_fast_path(kind: &str) -> bool {
    kind.starts_with("worker.") || LEGACY_SCHEDULE_KINDS.contains(&kind)
}

/// The record's start for an event without `data` (or `data: nil`).
fn without_data() -> Vec<u8> {
    let mut out = validate::record_start();
    out.extend_from_slice(b"{}");
    out
}

/// The fields of one event as read so far.
#[derive(Default)]
struct Fields<'a> {
    engine: Option<&'a str>,
    kind: Option<&'a str>,
    task_id: Option<Value>,
    occurred_at: Option<Value>,
    id: Option<Value>,
    /// The record's start with `data` written ([`validate::record_start`]).
    written: Option<Vec<u8>>,
}

impl<'a> Fields<'a> {
    /// Reads the value of `key`, an entry of the event's map at nesting
    /// `depth`; the keys an event does not use are checked and passed over.
    fn read(
        &mut self,
        key: &str,
        r: &mut Reader<'a>,
        limits: &Limits,
        depth: usize,
    ) -> Result<(), Unusual> {
        match key {
            "engine" => once(&mut self.engine, r.string()?),
            "kind" => {
                let kind = r.string()?;
                // Known before `data` is written, when it comes first.
                if leaves_the_fast_path(kind.trim()) {
                    return Err(Unusual);
                }
                once(&mut self.kind, kind)
            }
            "task_id" => once(&mut self.task_id, scalar(r)?),
            "occurred_at" => once(&mut self.occurred_at, scalar(r)?),
            "id" => once(&mut self.id, scalar(r)?),
            "data" => {
                let out = if r.clone().token()? == Token::Nil {
                    r.token()?;
                    without_data()
                } else {
                    let mut out = validate::record_start();
                    // The brain's external schedule protocol is the value
                    // path's to check (or refuse).
                    r.write_map_without(
                        &mut out,
                        limits.max_event_bytes,
                        depth + 1,
                        &[EXTERNAL_PROJECTION, EXTERNAL_SNAPSHOT_FRAME],
                    )?;
                    out
                };
                once(&mut self.written, out)
            }
            _ => r.skip(depth + 1),
        }
    }

    /// The event's record and its trimmed engine, or `Unusual` when the
    /// value path must decide.
    fn record(self, limits: &Limits, now: OffsetDateTime) -> Result<(Vec<u8>, &'a str), Unusual> {
        let refused = |_| Unusual;
        let engine_name = self.engine.ok_or(Unusual)?;
        let engine = validate::engine(Some(Value::Str(engine_name.to_owned()))).map_err(refused)?;
        let kind = validate::kind(self.kind.map(|k| Value::Str(k.to_owned()))).map_err(refused)?;
        if leaves_the_fast_path(&kind) {
            return Err(Unusual);
        }
        let task_id = validate::task_id(self.task_id, &kind).map_err(refused)?;
        let sent_at = validate::occurred_at(self.occurred_at.as_ref(), now).map_err(refused)?;
        if !in_brain_window(sent_at, now) {
            return Err(Unusual);
        }
        let id = validate::event_id(self.id, now).map_err(refused)?;
        let record = Record {
            data: Data::Written(self.written.unwrap_or_else(without_data)),
            engine: &engine,
            id,
            kind: &kind,
            occurred_at: sent_at,
            task_id: &task_id,
        }
        .render(limits.max_event_bytes)
        .map_err(refused)?;
        Ok((record, engine_name.trim()))
    }
}

/// Asserts that what [`handle_msgpack`] returns for `body`, if anything,
/// is what the value path returns (the ids the daemon drew masked out);
/// returns whether it handled the body. For the tests and fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub fn assert_same_as_value_path(body: &[u8], limits: &Limits, now: OffsetDateTime) -> bool {
    use super::framing::{Decoded, Decoder, Framing};
    let Some(mut fast) = handle_msgpack(body, limits, now) else {
        return false;
    };
    let mut d = Decoder::new(Framing::MsgPack, body.len());
    d.feed(&(body.len() as u32).to_be_bytes());
    d.feed(body);
    let Ok(Some(Decoded::Message(v))) = d.next_item() else {
        panic!("the fast path took a message the decoder refuses: {body:?}");
    };
    let mut slow = super::handler::handle(v, limits, now);
    // An id the client sent is the same in both; one the daemon drew is not.
    if let (Some(f), Some(s)) = (fast.store.as_mut(), slow.store.as_mut()) {
        for (a, b) in f.records.iter_mut().zip(s.records.iter_mut()) {
            if a != b {
                mask_id(a);
                mask_id(b);
            }
        }
    }
    assert_eq!(fast, slow, "the fast path differs for {body:?}");
    true
}

/// Zeroes the record's own `id` (the last `,"id":"` outside a string:
/// `data` comes before it, and a quote inside a string is escaped).
#[cfg(any(test, feature = "fuzzing"))]
fn mask_id(record: &mut [u8]) {
    const AT: &[u8] = b",\"id\":\"";
    let at = record
        .windows(AT.len())
        .rposition(|w| w == AT)
        .expect("a record has an id");
    for b in &mut record[at + AT.len()..at + AT.len() + 36] {
        *b = b'0';
    }
}

#[cfg(test)]
mod tests;
