//! Validation and normalisation of one event, done once, at ingest.
//!
//! The result is the canonical JSON (sorted keys, Python float rendering)
//! of exactly the object the brain will receive:
//! `{"data":{..},"engine":..,"id":..,"kind":..,"occurred_at":..,"task_id":..}`.
//! It is stored as-is in the spool and concatenated into frames later, so a
//! replay after a reconnect is byte-identical and the brain's dedup holds
//! (`occurred_at` is stamped here when absent, the id is assigned here).

use time::OffsetDateTime;

use crate::protocol::{canonical, replay, Value, KNOWN_KINDS, LEGACY_SCHEDULE_KINDS};
use crate::refusal::RefusalCode;

/// Why one event was refused: a stable code and a message saying what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable machine-readable reason (also the metric label).
    pub code: RefusalCode,
    /// What is wrong and what to change.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

// Client values quoted in refusal messages: the rule lives with the
// refusal codes, which the command router quotes too.
pub use crate::refusal::{excerpt, MAX_EXCERPT_CHARS};

use crate::protocol::limits::{MAX_ENGINE_CHARS, MAX_TASK_ID_CHARS};

/// How far ahead of the daemon's clock an `occurred_at` may be. The brain
/// replaces a time more than 60 s ahead of its own clock with its "now" at
/// delivery, which differs for every delivery of the same event and so
/// defeats its deduplication; this leaves 30 s for the brain's clock to
/// lag this host's.
pub const MAX_FUTURE_SECONDS: i64 = 30;
/// How far behind the daemon's clock an `occurred_at` may be. The brain
/// replaces a time more than 400 days old the same way; this leaves 35 days
/// for an event to wait in the spool.
pub const MAX_PAST_DAYS: i64 = 365;
/// The key of `data` that keeps an `occurred_at` the daemon replaced.
pub const ORIGINAL_OCCURRED_AT_KEY: &str = "occurred_at_original";

/// What normalising an event changed that an operator should hear about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Notes {
    /// Events whose `occurred_at` was outside the brain's window and was
    /// replaced by the receive time (the original kept in `data`).
    pub time_corrected: u64,
}

/// Formats a UTC timestamp the way z4j's Python agent does
/// (`2026-11-22T23:29:59.500000+00:00`).
pub fn format_occurred_at(t: OffsetDateTime) -> String {
    let mut out = Vec::with_capacity(32);
    write_occurred_at(t, &mut out);
    String::from_utf8(out).expect("digits and punctuation")
}

/// Appends [`format_occurred_at`]'s text to `out`, without allocating
/// (digits by hand: this runs for every event).
fn write_occurred_at(t: OffsetDateTime, out: &mut Vec<u8>) {
    let t = t.to_offset(time::UtcOffset::UTC);
    // Years before 1 or after 9999 cannot reach here: `occurred_at` is
    // within a year of the daemon's clock, or the receive time itself.
    let year = t.year().clamp(0, 9999) as u32;
    let mut text = *b"0000-00-00T00:00:00.000000+00:00";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u32::from(u8::from(t.month())));
    put(8, 2, u32::from(t.day()));
    put(11, 2, u32::from(t.hour()));
    put(14, 2, u32::from(t.minute()));
    put(17, 2, u32::from(t.second()));
    put(20, 6, t.microsecond());
    out.extend_from_slice(&text);
}

fn string_field(value: Option<Value>, key: &str) -> Result<Option<String>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(other) => Err(Refusal::new(
            RefusalCode::InvalidEvent,
            format!("`{key}` must be a string, got {}", other.type_name()),
        )),
    }
}

/// `s` without surrounding whitespace, reusing its allocation when it has none.
fn trimmed(s: String) -> String {
    if s.trim().len() == s.len() {
        s
    } else {
        s.trim().to_owned()
    }
}

/// The fields of an event, taken from its map in one pass (for a key that
/// appears twice, the last one counts). Other keys are ignored.
#[derive(Default)]
struct Fields {
    engine: Option<Value>,
    kind: Option<Value>,
    task_id: Option<Value>,
    occurred_at: Option<Value>,
    id: Option<Value>,
    data: Option<Value>,
}

impl Fields {
    fn take(entries: Vec<(String, Value)>) -> Fields {
        let mut f = Fields::default();
        for (k, v) in entries {
            let slot = match k.as_str() {
                "engine" => &mut f.engine,
                "kind" => &mut f.kind,
                "task_id" => &mut f.task_id,
                "occurred_at" => &mut f.occurred_at,
                "id" => &mut f.id,
                "data" => &mut f.data,
                _ => continue,
            };
            *slot = Some(v);
        }
        f
    }
}

/// A UUIDv7 from the receive time and the thread-local RNG (the `uuid`
/// crate's own `now_v7` asks the kernel for entropy on every call).
fn new_event_id(at: OffsetDateTime) -> uuid::Uuid {
    let ms = (at.unix_timestamp_nanos() / 1_000_000) as u64;
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

/// Normalises one event (a map, already decoded; the message-level keys
/// `type` and `ack_id` are ignored) into its canonical bytes.
pub fn normalize_event(
    event: Value,
    received_at: OffsetDateTime,
    max_event_bytes: usize,
) -> Result<Vec<u8>, Refusal> {
    normalize_event_noting(event, received_at, max_event_bytes, &mut Notes::default())
}

/// [`normalize_event`], adding to `notes` what it corrected.
///
/// An `occurred_at` more than [`MAX_FUTURE_SECONDS`] ahead of `received_at`
/// or more than [`MAX_PAST_DAYS`] behind it becomes `received_at`, and the
/// value the client sent is kept, as sent, in `data.occurred_at_original`
/// (unless the client set that key itself). The brain would otherwise replace it with
/// its own clock at each delivery, and store a re-sent event twice.
pub fn normalize_event_noting(
    event: Value,
    received_at: OffsetDateTime,
    max_event_bytes: usize,
    notes: &mut Notes,
) -> Result<Vec<u8>, Refusal> {
    let mut fields = match event {
        Value::Map(entries) => Fields::take(entries),
        other => {
            return Err(Refusal::new(
                RefusalCode::InvalidEvent,
                format!("an event must be a map, got {}", other.type_name()),
            ))
        }
    };
    let engine = engine(fields.engine.take())?;
    let kind = kind(fields.kind.take())?;
    legacy_schedule(&kind, fields.data.as_ref())?;
    let task_id = task_id(fields.task_id.take(), &kind)?;
    let sent_at = occurred_at(fields.occurred_at.as_ref(), received_at)?;
    let id = event_id(fields.id.take(), received_at)?;
    let mut data = data(fields.data.take(), &kind)?;
    let external = schedule_protocol(&kind, &engine, &data)?;
    let occurred_at = if in_brain_window(sent_at, received_at) {
        sent_at
    } else {
        // The external schedule protocol's `data` goes to the brain as
        // sent: nothing is added to it.
        if !external && data.get(ORIGINAL_OCCURRED_AT_KEY).is_none() {
            let original = fields.occurred_at.take().unwrap_or(Value::Null);
            data.insert(ORIGINAL_OCCURRED_AT_KEY, original);
        }
        notes.time_corrected += 1;
        received_at
    };
    let record = Record {
        data: Data::Value(&data),
        engine: &engine,
        id,
        kind: &kind,
        occurred_at,
        task_id: &task_id,
    };
    record.render(max_event_bytes)
}

/// `engine`: a string, trimmed, not empty, at most [`MAX_ENGINE_CHARS`].
pub(super) fn engine(v: Option<Value>) -> Result<String, Refusal> {
    let engine = string_field(v, "engine")?
        .map(trimmed)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                RefusalCode::InvalidEvent,
                "`engine` is required: the task engine's name, e.g. \"celery\"",
            )
        })?;
    if engine.chars().count() > MAX_ENGINE_CHARS {
        return Err(Refusal::new(
            RefusalCode::InvalidEvent,
            format!("`engine` must be at most {MAX_ENGINE_CHARS} characters"),
        ));
    }
    Ok(engine)
}

/// `kind`: one the brain knows (whether a schedule kind is a legacy event
/// depends on its `data`: [`legacy_schedule`]).
pub(super) fn kind(v: Option<Value>) -> Result<String, Refusal> {
    let kind = string_field(v, "kind")?
        .map(trimmed)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                RefusalCode::InvalidEvent,
                "`kind` is required, e.g. \"task.received\"",
            )
        })?;
    if !KNOWN_KINDS.contains(&kind.as_str()) {
        return Err(Refusal::new(
            RefusalCode::UnknownKind,
            format!(
                "kind {} is not one the brain knows; use one of: {}",
                excerpt(&kind),
                KNOWN_KINDS
                    .iter()
                    .filter(|k| !crate::protocol::frames::is_legacy_schedule_kind(k))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(kind)
}

/// `task_id`: required for `task.*` kinds, at most [`MAX_TASK_ID_CHARS`].
pub(super) fn task_id(v: Option<Value>, kind: &str) -> Result<String, Refusal> {
    let task_id = string_field(v, "task_id")?.unwrap_or_default();
    if kind.starts_with("task.") && task_id.trim().is_empty() {
        return Err(Refusal::new(
            RefusalCode::InvalidEvent,
            format!("`task_id` is required for {kind} events"),
        ));
    }
    if task_id.chars().count() > MAX_TASK_ID_CHARS {
        return Err(Refusal::new(
            RefusalCode::InvalidEvent,
            format!("`task_id` must be at most {MAX_TASK_ID_CHARS} characters"),
        ));
    }
    Ok(task_id)
}

/// `occurred_at` as sent: an ISO-8601 string (UTC when naive), a unix time
/// in seconds, or `received_at` when absent.
pub(super) fn occurred_at(
    v: Option<&Value>,
    received_at: OffsetDateTime,
) -> Result<OffsetDateTime, Refusal> {
    match v {
        None | Some(Value::Null) => Ok(received_at),
        Some(Value::Str(s)) => replay::parse_iso8601_assume_utc(s.trim()).ok_or_else(|| {
            Refusal::new(
                RefusalCode::InvalidEvent,
                format!(
                    "`occurred_at` {} is not an ISO-8601 timestamp; send e.g. \"2026-11-22T23:29:59.500000+00:00\", a unix time in seconds, or omit it",
                    excerpt(s)
                ),
            )
        }),
        Some(v @ (Value::Int(_) | Value::UInt(_) | Value::Float(_))) => {
            let secs = v.as_f64().unwrap_or(f64::NAN);
            let nanos = (secs * 1e9).round();
            match OffsetDateTime::from_unix_timestamp_nanos(nanos as i128) {
                Ok(t) if secs.is_finite() && secs >= 0.0 => Ok(t),
                _ => Err(Refusal::new(
                    RefusalCode::InvalidEvent,
                    format!("`occurred_at` {secs} is not a valid unix time in seconds"),
                )),
            }
        }
        Some(other) => Err(Refusal::new(
            RefusalCode::InvalidEvent,
            format!(
                "`occurred_at` must be an ISO-8601 string or a unix time, got {}",
                other.type_name()
            ),
        )),
    }
}

/// `id`: a UUID (not nil, not max), or a new UUIDv7 when absent.
pub(super) fn event_id(
    v: Option<Value>,
    received_at: OffsetDateTime,
) -> Result<uuid::Uuid, Refusal> {
    match string_field(v, "id")? {
        None => Ok(new_event_id(received_at)),
        Some(s) => match uuid::Uuid::parse_str(s.trim()) {
            Ok(u) if !u.is_nil() && !u.is_max() => Ok(u),
            _ => Err(Refusal::new(
                RefusalCode::InvalidEvent,
                format!(
                    "`id` {} is not a UUID; omit it and the daemon assigns one",
                    excerpt(&s)
                ),
            )),
        },
    }
}

/// `data`: a map (empty when absent), without the keys of the brain's
/// external schedule protocol.
fn data(v: Option<Value>, kind: &str) -> Result<Value, Refusal> {
    let data = match v {
        None | Some(Value::Null) => Value::empty_map(),
        Some(m @ Value::Map(_)) => m,
        Some(other) => {
            return Err(Refusal::new(
                RefusalCode::InvalidEvent,
                format!("`data` must be a map, got {}", other.type_name()),
            ))
        }
    };
    // The brain reads these keys as its external schedule protocol, which
    // it accepts on the four schedule projection kinds only; on any other
    // event it drops the whole event after acking it.
    if !LEGACY_SCHEDULE_KINDS.contains(&kind) {
        for key in [EXTERNAL_PROJECTION, EXTERNAL_SNAPSHOT_FRAME] {
            if data.get(key).is_some() {
                return Err(Refusal::new(
                    RefusalCode::InvalidEvent,
                    format!(
                        "`data.{key}` belongs to the brain's external schedule protocol, which the brain accepts only on schedule.snapshot, schedule.created, schedule.updated and schedule.deleted events; on a {kind} event it drops the whole event. Rename or remove the key"
                    ),
                ));
            }
        }
    }
    Ok(data)
}

/// `data` key of the external schedule protocol's projections (with
/// `payload_digest`), on `schedule.snapshot|created|updated|deleted`.
pub const EXTERNAL_PROJECTION: &str = "external_projection";
/// `data` key of the external schedule protocol's stable snapshot frames
/// (with `frame_digest`), on `schedule.snapshot` only.
pub const EXTERNAL_SNAPSHOT_FRAME: &str = "external_snapshot_frame";

/// Whether `data` (as sent, a map or not) carries `key`.
fn carries(data: Option<&Value>, key: &str) -> bool {
    data.is_some_and(|d| d.get(key).is_some())
}

/// A schedule projection kind without the external protocol's data is a
/// legacy event: the brain (1.13+) answers it with a fatal error and stops
/// acknowledging the whole batch.
fn legacy_schedule(kind: &str, data: Option<&Value>) -> Result<(), Refusal> {
    if LEGACY_SCHEDULE_KINDS.contains(&kind)
        && !carries(data, EXTERNAL_PROJECTION)
        && !carries(data, EXTERNAL_SNAPSHOT_FRAME)
    {
        return Err(Refusal::new(
            RefusalCode::LegacyKind,
            format!(
                "kind {} is a legacy schedule event that z4j brains 1.13+ refuse (they stop acknowledging the whole batch); do not send it",
                excerpt(kind)
            ),
        ));
    }
    Ok(())
}

/// Checks an event of the external schedule protocol the way the brain
/// does before it reads it, so one the brain would drop (after
/// acknowledging it) is refused here with the reason instead. `Ok(true)`:
/// it is one, and its `data` must reach the brain unchanged (the brain
/// recomputes `frame_digest` / `payload_digest` from the values).
fn schedule_protocol(kind: &str, engine: &str, data: &Value) -> Result<bool, Refusal> {
    let projection = data.get(EXTERNAL_PROJECTION);
    let frame = data.get(EXTERNAL_SNAPSHOT_FRAME);
    let refuse = |why: String| Err(Refusal::new(RefusalCode::InvalidEvent, why));
    let (key, body, digest_key) = match (projection, frame) {
        (None, None) => return Ok(false),
        (Some(_), Some(_)) => {
            return refuse(format!(
                "a {kind} event carries both `data.{EXTERNAL_PROJECTION}` and `data.{EXTERNAL_SNAPSHOT_FRAME}`; the brain drops such an event. Send one form per event"
            ))
        }
        (None, Some(_)) if kind != "schedule.snapshot" => {
            return refuse(format!(
                "`data.{EXTERNAL_SNAPSHOT_FRAME}` is accepted by the brain on schedule.snapshot events only; on a {kind} event it drops the whole event. Send the frame as kind \"schedule.snapshot\""
            ))
        }
        (None, Some(f)) => (EXTERNAL_SNAPSHOT_FRAME, f, "frame_digest"),
        (Some(p), None) => (EXTERNAL_PROJECTION, p, "payload_digest"),
    };
    if !matches!(body, Value::Map(_)) {
        return refuse(format!(
            "`data.{key}` must be a map, got {}; the brain drops the event",
            body.type_name()
        ));
    }
    match data.get(digest_key) {
        Some(Value::Str(_)) => {}
        other => {
            return refuse(format!(
                "`data.{digest_key}` must be a string (the SHA-256 of `data.{key}`) next to `data.{key}`, got {}; the brain drops the event",
                other.map_or("nothing", Value::type_name)
            ))
        }
    }
    match body.get("owner") {
        Some(Value::Str(owner)) if owner == engine => Ok(true),
        Some(Value::Str(owner)) => refuse(format!(
            "`data.{key}.owner` is {} but the event's `engine` is {}; they must be the same scheduler name (the brain drops the event)",
            excerpt(owner),
            excerpt(engine)
        )),
        other => refuse(format!(
            "`data.{key}.owner` must be the scheduler's name, equal to the event's `engine` {}, got {}; the brain drops the event",
            excerpt(engine),
            other.map_or("nothing", Value::type_name)
        )),
    }
}

/// Whether the brain keeps `t` as sent: at most [`MAX_FUTURE_SECONDS`]
/// ahead of `received_at` and [`MAX_PAST_DAYS`] behind it.
pub(super) fn in_brain_window(t: OffsetDateTime, received_at: OffsetDateTime) -> bool {
    let window = (received_at - time::Duration::days(MAX_PAST_DAYS))
        ..=(received_at + time::Duration::seconds(MAX_FUTURE_SECONDS));
    window.contains(&t)
}

/// Where a record's `data` comes from.
pub(super) enum Data<'a> {
    /// A decoded value.
    Value(&'a Value),
    /// The record's start, `{"data":` and the data, already written (the
    /// fast path: `ingest::fast`).
    Written(Vec<u8>),
}

/// A normalised event, ready to be written as its canonical record.
pub(super) struct Record<'a> {
    pub(super) data: Data<'a>,
    pub(super) engine: &'a str,
    pub(super) id: uuid::Uuid,
    pub(super) kind: &'a str,
    pub(super) occurred_at: OffsetDateTime,
    pub(super) task_id: &'a str,
}

/// The start of a record, `{"data":`, in a buffer with room for a typical
/// Celery event (about 460 bytes) without regrowing.
pub(super) fn record_start() -> Vec<u8> {
    let mut out = Vec::with_capacity(640);
    out.extend_from_slice(b"{\"data\":");
    out
}

impl Record<'_> {
    /// The canonical JSON, keys in sorted order, or `event_too_large`.
    pub(super) fn render(self, max_event_bytes: usize) -> Result<Vec<u8>, Refusal> {
        let mut out = match self.data {
            Data::Written(out) => out,
            Data::Value(data) => {
                let mut out = record_start();
                // Stops as soon as the event cannot fit: a 12 MB `data` is
                // refused without being copied out first.
                match canonical::write_value_within(data, &mut out, max_event_bytes) {
                    Ok(()) => {}
                    Err(canonical::CanonicalError::TooLong) => {
                        return Err(too_large(
                            &format!("more than {max_event_bytes}"),
                            max_event_bytes,
                        ));
                    }
                    Err(e) => {
                        return Err(Refusal::new(
                            RefusalCode::InvalidEvent,
                            format!("`data`: {e}"),
                        ))
                    }
                }
                out
            }
        };
        out.extend_from_slice(b",\"engine\":");
        canonical::write_str(self.engine, &mut out);
        out.extend_from_slice(b",\"id\":\"");
        out.extend_from_slice(
            self.id
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        out.push(b'"');
        out.extend_from_slice(b",\"kind\":");
        canonical::write_str(self.kind, &mut out);
        out.extend_from_slice(b",\"occurred_at\":\"");
        write_occurred_at(self.occurred_at, &mut out);
        out.push(b'"');
        out.extend_from_slice(b",\"task_id\":");
        canonical::write_str(self.task_id, &mut out);
        out.push(b'}');
        if out.len() > max_event_bytes {
            return Err(too_large(&out.len().to_string(), max_event_bytes));
        }
        Ok(out)
    }
}

/// `event_too_large`; `size` is "1234567" or "more than 1044480".
fn too_large(size: &str, max_event_bytes: usize) -> Refusal {
    Refusal::new(
        RefusalCode::EventTooLarge,
        format!(
            "the event is {size} bytes once encoded, but one brain frame holds at most {max_event_bytes} bytes of events; trim `data` (large args, results or tracebacks)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_795_390_199_500_000_000).unwrap()
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn norm(s: &str) -> Result<String, Refusal> {
        normalize_event(json(s), now(), 1 << 20).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn occurred_at_is_written_like_the_python_agent_writes_it() {
        let mut nanos: i128 = 1_795_390_199_500_000_000;
        for _ in 0..2_000 {
            // Steps of about two years (an odd number of nanoseconds),
            // wrapping around within the 63 years after 1970.
            nanos += 63_113_904_000_000_007;
            nanos %= 2_000_000_000_000_000_000;
            let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.microsecond()
            );
            assert_eq!(format_occurred_at(t), expected);
        }
        let offset = now().to_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap());
        assert_eq!(format_occurred_at(offset), format_occurred_at(now()));
    }

    #[test]
    fn full_event_is_rendered_canonically() {
        let out = norm(
            r#"{"type":"event","ack_id":7,"engine":" celery ","kind":"task.received","task_id":"t-1",
                "occurred_at":"2026-11-22T23:29:59.5Z","id":"7D9C2B1E-4F3A-4C2D-8E1F-0A1B2C3D4E5F",
                "data":{"z":"é","a":null,"args":[1.5,1e-05,100.0]}}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"data":{"a":null,"args":[1.5,1e-05,100.0],"z":"é"},"engine":"celery","id":"7d9c2b1e-4f3a-4c2d-8e1f-0a1b2c3d4e5f","kind":"task.received","occurred_at":"2026-11-22T23:29:59.500000+00:00","task_id":"t-1"}"#
        );
    }

    #[test]
    fn missing_occurred_at_and_id_are_assigned_once() {
        let out = norm(r#"{"engine":"rq","kind":"task.started","task_id":"x"}"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["occurred_at"], format_occurred_at(now()));
        let id = uuid::Uuid::parse_str(v["id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(v["data"], serde_json::json!({}));
    }

    #[test]
    fn naive_and_offset_times_become_utc() {
        let a = norm(r#"{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"2026-11-22T10:00:00"}"#).unwrap();
        assert!(
            a.contains("\"occurred_at\":\"2026-11-22T10:00:00.000000+00:00\""),
            "{a}"
        );
        let b = norm(r#"{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"2026-11-22T12:00:00.25+02:00"}"#).unwrap();
        assert!(
            b.contains("\"occurred_at\":\"2026-11-22T10:00:00.250000+00:00\""),
            "{b}"
        );
        let c =
            norm(r#"{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":1795390199.5}"#)
                .unwrap();
        assert!(
            c.contains("\"occurred_at\":\"2026-11-22T23:29:59.500000+00:00\""),
            "{c}"
        );
    }

    #[test]
    fn refusals_say_what_to_change() {
        let cases = [
            (
                r#"{"kind":"task.sent","task_id":"x"}"#,
                "invalid_event",
                "engine",
            ),
            (
                r#"{"engine":"  ","kind":"task.sent","task_id":"x"}"#,
                "invalid_event",
                "engine",
            ),
            (r#"{"engine":"e","task_id":"x"}"#, "invalid_event", "kind"),
            (
                r#"{"engine":"e","kind":"task.exploded","task_id":"x"}"#,
                "unknown_kind",
                "task.received",
            ),
            (
                r#"{"engine":"e","kind":"schedule.snapshot"}"#,
                "legacy_kind",
                "legacy",
            ),
            (
                r#"{"engine":"e","kind":"task.sent"}"#,
                "invalid_event",
                "task_id",
            ),
            (
                r#"{"engine":"e","kind":"task.sent","task_id":5}"#,
                "invalid_event",
                "string",
            ),
            (
                r#"{"engine":"e","kind":"task.sent","task_id":"x","data":[1]}"#,
                "invalid_event",
                "map",
            ),
            (
                r#"{"engine":"e","kind":"task.sent","task_id":"x","id":"nope"}"#,
                "invalid_event",
                "UUID",
            ),
            (
                r#"{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"yesterday"}"#,
                "invalid_event",
                "ISO-8601",
            ),
            (
                r#"{"engine":"e","kind":"task.sent","task_id":"x","data":{"external_projection":{}}}"#,
                "invalid_event",
                "external schedule protocol",
            ),
            (
                r#"{"engine":"e","kind":"worker.online","data":{"external_snapshot_frame":"x"}}"#,
                "invalid_event",
                "drops the whole event",
            ),
        ];
        for (input, code, hint) in cases {
            let r = norm(input).unwrap_err();
            assert_eq!(r.code, code, "{input}: {}", r.message);
            assert!(r.message.contains(hint), "{input}: {}", r.message);
        }
    }

    /// A stable snapshot frame as z4j's schedulers send it (values kept
    /// exactly: the brain recomputes both digests from them).
    const FRAME: &str = r#"{"protocol_version":1,"stream_id":"0b6f3c8e-2c4d-4b7a-9a51-1d2e3f405162","epoch_uuid":"5a1e2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b","epoch_number":3,"sequence":1,"owner":"celery-beat","source_scope":"{\"kind\":\"scheduler-owner\",\"owner\":\"celery-beat\",\"version\":1}","adapter_instance_id":"a1","snapshot_id":"6c7d8e9f-0a1b-4c2d-8e3f-405162738495","frame_kind":"rows","frame_index":0,"frame_count":1,"row_count":1,"snapshot_digest":"ab","stable_source":true,"schedules":[{"source_key":"static:tick","priority":null,"args":[1,2.5,1e-05,18446744073709551615],"kwargs":{"z":"é","a":-3},"total_runs":0,"is_enabled":true}]}"#;

    fn schedule_event(kind: &str, engine: &str, data: &str) -> String {
        format!(
            r#"{{"engine":"{engine}","kind":"{kind}","task_id":"t-1","occurred_at":"2026-11-22T23:29:59Z","data":{data}}}"#
        )
    }

    /// Every row of the brain's rule for schedule events: the current
    /// protocol's forms are forwarded, the legacy ones refused as today,
    /// and each form the brain would drop is refused with the reason.
    #[test]
    fn schedule_events_legacy_and_current() {
        let frame = format!(
            r#"{{"external_snapshot_frame":{FRAME},"frame_digest":"d1","reason":"activation"}}"#
        );
        let projection = FRAME.replace("\"snapshot_id\"", "\"kind\":\"updated\",\"x_snapshot_id\"");
        let proj = format!(r#"{{"external_projection":{projection},"payload_digest":"d2"}}"#);
        let accepted = [
            ("schedule.snapshot", frame.clone()),
            ("schedule.snapshot", proj.clone()),
            ("schedule.created", proj.clone()),
            ("schedule.updated", proj.clone()),
            ("schedule.deleted", proj.clone()),
            ("schedule.run_started", "{}".to_string()),
            (
                "schedule.run_completed",
                r#"{"schedule":"tick"}"#.to_string(),
            ),
        ];
        for (kind, data) in &accepted {
            let out = norm(&schedule_event(kind, "celery-beat", data))
                .unwrap_or_else(|r| panic!("{kind} {data}: {r:?}"));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let sent: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["data"], sent, "{kind}: data forwarded unchanged");
            assert_eq!(v["kind"], *kind);
        }
        let both = format!(
            r#"{{"external_snapshot_frame":{FRAME},"frame_digest":"d1","external_projection":{projection},"payload_digest":"d2"}}"#
        );
        let refused = [
            ("schedule.snapshot", both.clone(), "invalid_event", "both"),
            (
                "schedule.updated",
                frame.clone(),
                "invalid_event",
                "schedule.snapshot events only",
            ),
            (
                "schedule.deleted",
                frame.clone(),
                "invalid_event",
                "schedule.snapshot events only",
            ),
            (
                "schedule.run_started",
                frame.clone(),
                "invalid_event",
                "drops the whole event",
            ),
            (
                "schedule.run_completed",
                proj.clone(),
                "invalid_event",
                "drops the whole event",
            ),
            (
                "task.sent",
                proj.clone(),
                "invalid_event",
                "external schedule protocol",
            ),
            (
                "worker.online",
                frame.clone(),
                "invalid_event",
                "external schedule protocol",
            ),
            (
                "schedule.snapshot",
                r#"{"external_snapshot_frame":"x","frame_digest":"d"}"#.into(),
                "invalid_event",
                "must be a map, got string",
            ),
            (
                "schedule.updated",
                r#"{"external_projection":[1],"payload_digest":"d"}"#.into(),
                "invalid_event",
                "must be a map, got array",
            ),
            (
                "schedule.snapshot",
                frame.replace(r#""frame_digest":"d1","#, ""),
                "invalid_event",
                "`data.frame_digest` must be a string",
            ),
            (
                "schedule.created",
                proj.replace(r#""payload_digest":"d2""#, r#""payload_digest":7"#),
                "invalid_event",
                "`data.payload_digest` must be a string",
            ),
            (
                "schedule.snapshot",
                frame.replace("\"owner\":\"celery-beat\"", "\"owner\":\"rq-scheduler\""),
                "invalid_event",
                "\"rq-scheduler\" but the event's `engine` is \"celery-beat\"",
            ),
            (
                "schedule.snapshot",
                frame.replace("\"owner\":\"celery-beat\"", "\"owner\":5"),
                "invalid_event",
                "got int",
            ),
        ];
        for (kind, data, code, hint) in &refused {
            let r = norm(&schedule_event(kind, "celery-beat", data)).unwrap_err();
            assert_eq!(r.code, *code, "{kind} {data}: {}", r.message);
            assert!(r.message.contains(hint), "{kind} {data}: {}", r.message);
        }
        // The legacy forms keep today's refusal and message, whatever else
        // `data` holds.
        for kind in LEGACY_SCHEDULE_KINDS {
            for data in ["{}", r#"{"schedules":[]}"#, r#"{"external":{}}"#, "null"] {
                let r = norm(&schedule_event(kind, "celery-beat", data)).unwrap_err();
                assert_eq!(r.code, "legacy_kind", "{kind} {data}");
                assert_eq!(
                    r.message,
                    format!("kind \"{kind}\" is a legacy schedule event that z4j brains 1.13+ refuse (they stop acknowledging the whole batch); do not send it")
                );
            }
        }
    }

    /// The canonical record keeps the frame's values as sent: integers stay
    /// integers (even past i64), floats keep their digits, nothing is cut,
    /// and an out-of-window time adds nothing to `data`.
    #[test]
    fn schedule_frames_reach_the_brain_unchanged() {
        let data = format!(
            r#"{{"external_snapshot_frame":{FRAME},"frame_digest":"d1","reason":"activation"}}"#
        );
        let event = format!(
            r#"{{"engine":"celery-beat","kind":"schedule.snapshot","occurred_at":"2001-01-01T00:00:00Z","data":{data}}}"#
        );
        let mut notes = Notes::default();
        let out = normalize_event_noting(json(&event), now(), 1 << 20, &mut notes).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#""args":[1,2.5,1e-05,18446744073709551615]"#),
            "{text}"
        );
        assert!(text.contains(r#""epoch_number":3"#), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sent: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["data"], sent);
        assert!(v["data"].get(ORIGINAL_OCCURRED_AT_KEY).is_none(), "{text}");
        assert_eq!(v["occurred_at"], format_occurred_at(now()));
        assert_eq!(notes.time_corrected, 1);
    }

    #[test]
    fn json_floats_keep_every_digit() {
        // Read with the default (fast) float parser this becomes ...0135.
        let out = norm(
            r#"{"engine":"e","kind":"task.sent","task_id":"x","data":{"f":958010263072.0137}}"#,
        )
        .unwrap();
        assert!(out.contains("\"f\":958010263072.0137"), "{out}");
    }

    #[test]
    fn times_outside_the_brains_window_become_the_receive_time_and_the_original_is_kept() {
        let received = format_occurred_at(now());
        let cases = [
            ("2026-11-22T23:31:59.500000+00:00", "120 s ahead"),
            ("2026-11-23T23:29:59+00:00", "a day ahead"),
            ("2024-01-01T00:00:00+00:00", "nearly three years back"),
            ("0001-01-01T00:00:00+00:00", "year 1"),
            ("9999-12-31T00:00:00+00:00", "year 9999"),
        ];
        for (stamp, why) in cases {
            let mut notes = Notes::default();
            let input = format!(
                r#"{{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"{stamp}","data":{{"a":1}}}}"#
            );
            let out = normalize_event_noting(json(&input), now(), 1 << 20, &mut notes).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["occurred_at"], received.as_str(), "{why}");
            assert_eq!(v["data"]["occurred_at_original"], stamp, "{why}");
            assert_eq!(v["data"]["a"], 1, "{why}");
            assert_eq!(notes.time_corrected, 1, "{why}");
        }
        // Inside the window (30 s ahead, 365 days back) nothing changes.
        for stamp in [
            "2026-11-22T23:30:29.000000+00:00",
            "2025-11-23T00:00:00.000000+00:00",
        ] {
            let mut notes = Notes::default();
            let input = format!(
                r#"{{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"{stamp}"}}"#
            );
            let out = normalize_event_noting(json(&input), now(), 1 << 20, &mut notes).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["occurred_at"], stamp);
            assert!(v["data"].get("occurred_at_original").is_none());
            assert_eq!(notes.time_corrected, 0);
        }
        // A client's own `occurred_at_original` is not overwritten.
        let out = norm(
            r#"{"engine":"e","kind":"task.sent","task_id":"x","occurred_at":"2024-01-01T00:00:00Z","data":{"occurred_at_original":"mine"}}"#,
        )
        .unwrap();
        assert!(out.contains(r#""occurred_at_original":"mine""#), "{out}");
    }

    #[test]
    fn worker_events_need_no_task_id() {
        let out =
            norm(r#"{"engine":"celery","kind":"worker.online","data":{"worker":"w1"}}"#).unwrap();
        assert!(out.ends_with("\"task_id\":\"\"}"), "{out}");
    }

    #[test]
    fn too_large_is_refused_with_sizes() {
        let big = format!(
            r#"{{"engine":"e","kind":"task.sent","task_id":"x","data":{{"blob":"{}"}}}}"#,
            "a".repeat(2000)
        );
        let r = normalize_event(json(&big), now(), 1000).unwrap_err();
        assert_eq!(r.code, "event_too_large");
        assert!(r.message.contains("1000"), "{}", r.message);
    }
}
