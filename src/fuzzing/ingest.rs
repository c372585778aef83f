//! Bodies of the `ingest_msgpack` and `ingest_json_lines` fuzz targets: the
//! local socket's framing and decoding, then each message through
//! [`handle`], the same decision the connection loop applies, then the
//! reply encoder.
//!
//! Only the application of the decision is left out (the spool append, the
//! reply queue, registration): what `handle` returns is checked instead.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use super::{fixed_now, normalized, strict_eq};
use crate::ingest::fast;
use crate::ingest::framing::{Decoded, Decoder, FrameError, Framing};
use crate::ingest::handler::{error_reply, handle, Handled, Limits, Relay, Reply};
use crate::ingest::DEFAULT_MAX_MESSAGE_BYTES;
use crate::protocol::{canonical, json, parse_iso8601, Value, KNOWN_KINDS, LEGACY_SCHEDULE_KINDS};
use crate::refusal::RefusalCode;

/// Target `ingest_msgpack`: the first byte picks limits, read sizes and
/// whether the rest is a raw client stream (length prefixes included) or
/// one MessagePack body that the target frames itself.
pub fn ingest_msgpack(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let limits = limits_from_control(control);
    if control & 0x80 == 0 {
        connection(Framing::MsgPack, rest, limits, control);
    } else {
        let mut stream = Vec::with_capacity(rest.len() + 4);
        stream.extend_from_slice(&(rest.len() as u32).to_be_bytes());
        stream.extend_from_slice(rest);
        connection(Framing::MsgPack, &stream, limits, control);
    }
}

/// Target `ingest_json_lines`: the first byte picks limits and read sizes;
/// the rest is what a JSON-lines client sends.
pub fn ingest_json_lines(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    // The daemon picks JSON lines when the first byte is `{`.
    if let Some(&first) = rest.first() {
        if first == b'{' {
            assert_eq!(Framing::detect(first), Framing::JsonLines);
        }
    }
    connection(
        Framing::JsonLines,
        rest,
        limits_from_control(control),
        control,
    );
}
/// The limits the first input byte picks.
fn limits_from_control(c: u8) -> Limits {
    let max_message_bytes = match c & 0b11 {
        0 => DEFAULT_MAX_MESSAGE_BYTES,
        1 => 64,
        2 => 300,
        _ => 4096,
    };
    let max_event_bytes = match (c >> 2) & 0b11 {
        // What the daemon uses: one brain frame less the envelope.
        0 => crate::protocol::DEFAULT_MAX_FRAME_BYTES - crate::ingest::FRAME_ENVELOPE_RESERVE,
        1 => 200,
        2 => 400,
        _ => 1 << 20,
    };
    Limits {
        max_message_bytes,
        max_event_bytes,
    }
}

/// One decoded item, comparable.
#[derive(Debug, PartialEq)]
enum Item {
    Message(Value),
    Invalid(FrameError),
}

/// What a connection decoded, in order, and the fatal error that ended it.
#[derive(Debug, PartialEq)]
struct Decoding {
    items: Vec<Item>,
    fatal: Option<FrameError>,
}

/// Read sizes: the first read is one byte (the daemon reads the byte that
/// picks the framing on its own), then sizes from a small PRNG.
struct Reads(u64);

impl Reads {
    fn next(&mut self) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        match self.0 % 4 {
            0 => 1,
            1 => 1 + (self.0 >> 8) as usize % 7,
            2 => 1 + (self.0 >> 8) as usize % 64,
            _ => 1 + (self.0 >> 8) as usize % 1024,
        }
    }
}

/// Feeds `stream` to a [`Decoder`] the way the connection handler does and
/// collects everything it yields. `reads` of `None` feeds it all at once.
fn decode(framing: Framing, stream: &[u8], max: usize, reads: Option<&mut Reads>) -> Decoding {
    let mut d = Decoder::new(framing, max);
    let mut items = Vec::new();
    let mut at = 0;
    let mut reads = reads;
    let mut first = true;
    while at < stream.len() {
        let n = match reads.as_deref_mut() {
            None => stream.len(),
            Some(_) if first => 1,
            Some(r) => r.next(),
        };
        first = false;
        let end = (at + n).min(stream.len());
        d.feed(&stream[at..end]);
        at = end;
        loop {
            match d.next_item() {
                Ok(Some(Decoded::Message(v))) => items.push(Item::Message(v)),
                Ok(Some(Decoded::Handled(_))) => unreachable!("next_item has no fast path"),
                Ok(Some(Decoded::Invalid(e))) => {
                    assert!(!e.fatal, "a skipped message is not fatal: {e:?}");
                    items.push(Item::Invalid(e));
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.fatal, "an error that ends the stream is fatal: {e:?}");
                    return Decoding {
                        items,
                        fatal: Some(e),
                    };
                }
            }
        }
        // Memory per connection stays bounded by one message.
        assert!(
            d.pending_bytes() <= max + 4,
            "{} bytes held with a limit of {max}",
            d.pending_bytes()
        );
    }
    Decoding { items, fatal: None }
}

/// One client connection: framing, then each message through the same
/// dispatch and validation as the connection handler.
fn connection(framing: Framing, stream: &[u8], limits: Limits, control: u8) {
    let seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(control) ^ ((stream.len() as u64) << 8);
    let chunked = decode(
        framing,
        stream,
        limits.max_message_bytes,
        Some(&mut Reads(seed)),
    );
    // How the bytes were split into reads never changes what is decoded.
    let whole = decode(framing, stream, limits.max_message_bytes, None);
    assert_eq!(chunked, whole, "decoding depends on read sizes");
    if framing == Framing::MsgPack {
        // What the fast path handles, it handles as the value path does.
        let mut d = Decoder::new(framing, limits.max_message_bytes);
        d.feed(stream);
        let check = |body: &[u8]| {
            fast::assert_same_as_value_path(body, &limits, fixed_now());
            None
        };
        while let Ok(Some(_)) = d.next_item_with(check) {}
    }

    for item in chunked.items {
        match item {
            Item::Message(v) => {
                check_decoded_value(framing, &v);
                check_message(framing, v, &limits);
            }
            Item::Invalid(e) => check_reply(framing, &error_reply(e.code, &e.message, None, None)),
        }
    }
    if let Some(e) = chunked.fatal {
        check_reply(framing, &error_reply(e.code, &e.message, None, None));
    }
}

/// A decoded value holds only what canonical JSON can write, and survives
/// its own wire format unchanged.
fn check_decoded_value(framing: Framing, v: &Value) {
    let canon = canonical::to_vec(v).expect("a decoded value is always renderable");
    let back = json::parse(&canon).expect("canonical output parses");
    assert!(
        strict_eq(&back, &normalized(v)),
        "{v:?} rendered as {} reads back as {back:?}",
        String::from_utf8_lossy(&canon)
    );
    if framing == Framing::MsgPack {
        let bytes = rmp_serde::to_vec_named(v).expect("encodes");
        let again: Value = rmp_serde::from_slice(&bytes).expect("decodes its own encoding");
        assert!(strict_eq(&again, v), "{v:?} != {again:?}");
    }
}

/// The daemon's answer to one message, without the socket and the spool:
/// The events a message submits, as `(data, has an id)`: the message
/// itself for `event`, its list for `events`, none otherwise.
fn submitted(msg: &Value) -> Vec<(Option<Value>, bool)> {
    let one = |e: &Value| {
        (
            e.get("data").cloned(),
            e.get("id").is_some_and(|v| !v.is_null()),
        )
    };
    match msg.get("type").and_then(Value::as_str) {
        Some("event") => vec![one(msg)],
        Some("events") => match msg.get("events") {
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The handler's decision for one message, checked: every reply encodes,
/// every error is counted, a relayed result is refused by a router with
/// nothing running, and the records stored are the accepted events.
fn check_message(framing: Framing, msg: Value, limits: &Limits) {
    let events = submitted(&msg);
    let again = events.iter().any(|(_, id)| *id).then(|| msg.clone());
    let h = handle(msg, limits, fixed_now());
    check_replies(framing, &h);
    if let Some(Relay::CommandResult { message, ack_id }) = &h.relay {
        // No command is running here, so every result is refused, and
        // parsing it must not panic.
        let r = router().on_result(1, message).unwrap_err();
        assert!(
            matches!(
                r.code,
                RefusalCode::BadCommandResult | RefusalCode::UnknownCommand
            ),
            "{r:?}"
        );
        check_reply(
            framing,
            &error_reply(r.code, &r.message, ack_id.as_ref(), None),
        );
    }
    let Some(store) = &h.store else {
        return;
    };
    assert_eq!(h.counts.events_received, events.len() as u64);
    // The events refused: by index in an `events` message, the one of an `event`.
    let refused: BTreeSet<usize> = h
        .replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error { index, .. } => Some(index.unwrap_or(0)),
            _ => None,
        })
        .collect();
    let accepted: Vec<_> = (0..events.len()).filter(|i| !refused.contains(i)).collect();
    assert_eq!(
        store.records.len(),
        accepted.len(),
        "one record per accepted event"
    );
    for (record, &i) in store.records.iter().zip(&accepted) {
        check_record(record, events[i].0.as_ref(), limits.max_event_bytes);
    }
    if let Some(m) = again {
        let second = handle(m, limits, fixed_now()).store.expect("stored again");
        for ((a, b), &i) in second.records.iter().zip(&store.records).zip(&accepted) {
            if events[i].1 {
                assert_eq!(a, b, "normalisation is deterministic");
            }
        }
    }
}

/// Each reply encodes to itself, and each error is counted under its code.
fn check_replies(framing: Framing, h: &Handled) {
    for reply in &h.replies {
        match reply {
            Reply::Stats { .. } => assert!(h.store.is_none() && h.relay.is_none()),
            Reply::Error { refusal, .. } => {
                assert!(!refusal.message.is_empty());
                assert!(
                    h.counts
                        .refused
                        .iter()
                        .any(|(c, n)| *c == refusal.code && *n > 0),
                    "{refusal:?} not counted"
                );
            }
            Reply::Message(_) => {}
        }
        if let Some(v) = reply.to_value() {
            check_reply(framing, &v);
        }
    }
}

fn router() -> &'static crate::commands::Router {
    static ROUTER: OnceLock<Arc<crate::commands::Router>> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let (router, _results) = crate::commands::Router::new(Arc::new(crate::stats::Stats::new()));
        router
    })
}

/// An accepted event is the canonical JSON object the brain expects.
fn check_record(record: &[u8], data: Option<&Value>, max_event_bytes: usize) {
    assert!(record.len() <= max_event_bytes);
    let v = json::parse(record).expect("a stored record is JSON");
    assert_eq!(
        canonical::to_vec(&v).expect("renderable"),
        record,
        "a stored record is canonical"
    );
    let keys: Vec<&str> = v
        .as_map()
        .expect("a record is an object")
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        keys,
        ["data", "engine", "id", "kind", "occurred_at", "task_id"]
    );
    let s = |k: &str| v.get(k).and_then(Value::as_str).expect("a string field");
    let engine = s("engine");
    assert!(!engine.is_empty() && engine.trim() == engine && engine.chars().count() <= 40);
    let kind = s("kind");
    assert!(KNOWN_KINDS.contains(&kind));
    // A schedule projection kind passes only with exactly one form of the
    // external schedule protocol; no other kind carries either.
    let external = ["external_projection", "external_snapshot_frame"]
        .iter()
        .filter(|k| v.get("data").and_then(|d| d.get(k)).is_some())
        .count();
    if LEGACY_SCHEDULE_KINDS.contains(&kind) {
        assert_eq!(external, 1, "{kind} with {external} protocol forms");
    } else {
        assert_eq!(external, 0, "{kind} with a schedule protocol form");
    }
    let task_id = s("task_id");
    assert!(task_id.chars().count() <= 200);
    if kind.starts_with("task.") {
        assert!(!task_id.trim().is_empty());
    }
    let id = uuid::Uuid::parse_str(s("id")).expect("a UUID");
    assert_eq!(id.hyphenated().to_string(), s("id"));
    assert!(!id.is_nil() && !id.is_max());
    assert!(parse_iso8601(s("occurred_at")).is_some());
    let stored_data = v.get("data").expect("data");
    assert!(matches!(stored_data, Value::Map(_)));
    match data {
        Some(d @ Value::Map(_)) => assert!(strict_eq(stored_data, &normalized(d))),
        _ => assert_eq!(stored_data, &Value::empty_map()),
    }
}

/// A reply encodes to one well-formed message that decodes to itself.
fn check_reply(framing: Framing, reply: &Value) {
    let wire = framing.encode(reply);
    let back: Value = match framing {
        Framing::MsgPack => {
            assert!(wire.len() > 4);
            let len = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
            assert_eq!(len, wire.len() - 4, "the length prefix matches");
            rmp_serde::from_slice(&wire[4..]).expect("a reply decodes")
        }
        Framing::JsonLines => {
            assert_eq!(wire.last(), Some(&b'\n'));
            let line = &wire[..wire.len() - 1];
            assert!(!line.contains(&b'\n'), "a reply is one line");
            json::parse(line).expect("a reply is JSON")
        }
    };
    assert!(strict_eq(&back, reply), "{reply:?} came back as {back:?}");
}
