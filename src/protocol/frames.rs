//! Protocol constants (`docs/brain-protocol.md`: "Limits", "Frames the daemon sends and
//! reads") and small builders for frame pieces.
//!
//! Invariants:
//! * [`event_batch_payload`] only concatenates: its output is canonical
//!   exactly when every event it is given is canonical, which is why events
//!   are rendered canonically once, at ingest.
//! * [`frame_overhead_bytes`] is an upper bound, never an estimate: a frame
//!   whose payload fits in `max_frame_size_bytes - frame_overhead_bytes()`
//!   is never too large once signed.

use super::canonical::{self, write_str};
use super::value::Value;

/// `hello.payload.protocol_version`; the brain closes 4426 on anything else.
pub const PROTOCOL_VERSION: &str = "2";
/// The envelope's `v`.
pub const ENVELOPE_VERSION: i64 = 2;
/// The brain's schema cap on events per `event_batch` (it truncates beyond).
pub const MAX_EVENTS_PER_FRAME: usize = 5000;
/// The brain's default maximum inbound message (close 4400 above it);
/// `hello_ack.max_frame_size_bytes` gives the live value.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1_048_576;
pub use super::limits::MAX_FRAME_ID_CHARS;
/// Longest nonce we send (z4j's own are 22).
pub const MAX_NONCE_CHARS: usize = 32;
/// Longest frame `type` we send (the longest known one is 15).
pub const MAX_FRAME_TYPE_CHARS: usize = 32;

/// Frame type `hello` (agent -> brain, unsigned).
pub const TYPE_HELLO: &str = "hello";
/// Frame type `hello_ack` (brain -> agent, unsigned).
pub const TYPE_HELLO_ACK: &str = "hello_ack";
/// Frame type `event_batch` (agent -> brain).
pub const TYPE_EVENT_BATCH: &str = "event_batch";
/// Frame type `event_batch_ack` (brain -> agent).
pub const TYPE_EVENT_BATCH_ACK: &str = "event_batch_ack";
/// Frame type `heartbeat` (agent -> brain).
pub const TYPE_HEARTBEAT: &str = "heartbeat";
/// Frame type `agent_status` (agent -> brain).
pub const TYPE_AGENT_STATUS: &str = "agent_status";
/// Frame type `command` (brain -> agent).
pub const TYPE_COMMAND: &str = "command";
/// Frame type `command_ack` (agent -> brain).
pub const TYPE_COMMAND_ACK: &str = "command_ack";
/// Frame type `command_result` (agent -> brain).
pub const TYPE_COMMAND_RESULT: &str = "command_result";
/// Frame type `registry_delta` (agent -> brain).
pub const TYPE_REGISTRY_DELTA: &str = "registry_delta";
/// Frame type `error` (both directions).
pub const TYPE_ERROR: &str = "error";

/// Event kinds the brain knows ("event_batch and its ack" in `docs/brain-protocol.md`); others are stored as `unknown`.
pub const KNOWN_KINDS: &[&str] = &[
    "task.sent",
    "task.received",
    "task.started",
    "task.succeeded",
    "task.failed",
    "task.retried",
    "task.revoked",
    "task.rejected",
    "worker.online",
    "worker.offline",
    "worker.heartbeat",
    "queue.depth_report",
    "schedule.run_started",
    "schedule.run_completed",
    "schedule.created",
    "schedule.updated",
    "schedule.deleted",
    "schedule.snapshot",
    "unknown",
];

/// Schedule kinds a 1.13.0 brain refuses (with a fatal `error` frame and no
/// ack) unless `data` carries the scheduler markers ("event_batch and its ack" in
/// `docs/brain-protocol.md`).
pub const LEGACY_SCHEDULE_KINDS: &[&str] = &[
    "schedule.snapshot",
    "schedule.created",
    "schedule.updated",
    "schedule.deleted",
];

/// `true` if `kind` is in [`KNOWN_KINDS`].
pub fn is_known_kind(kind: &str) -> bool {
    KNOWN_KINDS.contains(&kind)
}

/// `true` if `kind` is in [`LEGACY_SCHEDULE_KINDS`].
pub fn is_legacy_schedule_kind(kind: &str) -> bool {
    LEGACY_SCHEDULE_KINDS.contains(&kind)
}

/// Appends `{"events":[e1,e2,...]}` to `out`, copying each pre-rendered
/// canonical event object verbatim.
///
/// Takes `&[&[u8]]` as well as `&[Vec<u8>]` or any other slice of byte
/// containers.
pub fn event_batch_payload<E: AsRef<[u8]>>(events: &[E], out: &mut Vec<u8>) {
    let body: usize = events.iter().map(|e| e.as_ref().len() + 1).sum();
    out.reserve(body + 13);
    out.extend_from_slice(b"{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let event = event.as_ref();
        debug_assert!(
            event.first() == Some(&b'{') && event.last() == Some(&b'}'),
            "events must be pre-rendered canonical JSON objects"
        );
        out.extend_from_slice(event);
    }
    out.extend_from_slice(b"]}");
}

/// Size of [`event_batch_payload`]'s output for events of these lengths,
/// without building it (for packing frames up to a byte budget).
pub fn event_batch_payload_len(event_lens: impl IntoIterator<Item = usize>) -> usize {
    let mut total = b"{\"events\":[]}".len();
    for (i, len) in event_lens.into_iter().enumerate() {
        total += len + usize::from(i > 0);
    }
    total
}

/// Upper bound of a signed frame's wire size minus its payload.
///
/// Assumes `id` <= [`MAX_FRAME_ID_CHARS`], `nonce` <= [`MAX_NONCE_CHARS`],
/// `type` <= [`MAX_FRAME_TYPE_CHARS`] characters (the signer debug-asserts
/// these), each at the worst-case escaped width of 6 bytes per character.
pub const fn frame_overhead_bytes() -> usize {
    const fn quoted(chars: usize) -> usize {
        2 + 6 * chars
    }
    let fixed = r#"{"hmac":"","id":,"nonce":,"payload":,"seq":,"ts":"","type":,"v":2}"#.len();
    fixed
        + 64 // hmac hex
        + quoted(MAX_FRAME_ID_CHARS)
        + quoted(MAX_NONCE_CHARS)
        + 20 // seq: u64::MAX digits
        + 32 // ts: 27 for years 0..=9999, slack for others
        + quoted(MAX_FRAME_TYPE_CHARS)
}

/// The unsigned `hello` frame:
/// `{"v":2,"type":"hello","id":…,"ts":…,"payload":{…}}`.
///
/// `payload` is rendered canonically (any float that is not finite becomes
/// `null`); the brain does not sign `hello`, so key order is cosmetic.
pub fn hello_frame(id: &str, ts: &str, payload: &Value) -> Vec<u8> {
    debug_assert!(id.chars().count() <= MAX_FRAME_ID_CHARS);
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"{\"v\":2,\"type\":\"hello\",\"id\":");
    write_str(id, &mut out);
    out.extend_from_slice(b",\"ts\":");
    write_str(ts, &mut out);
    out.extend_from_slice(b",\"payload\":");
    canonical::write_value_lossy(payload, &mut out);
    out.push(b'}');
    out
}

/// A fresh frame id: `prefix` followed by 32 lowercase hex digits of a
/// random UUID (e.g. `ev_3f2a…`). Keep `prefix` short: ids over
/// [`MAX_FRAME_ID_CHARS`] characters cannot be matched to their ack.
pub fn new_frame_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 32);
    id.push_str(prefix);
    id.push_str(
        uuid::Uuid::new_v4()
            .simple()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sign::{SessionBinding, Signer, SigningKey};
    use time::macros::datetime;

    #[test]
    fn batch_payload_concatenates() {
        let mut out = Vec::new();
        event_batch_payload::<&[u8]>(&[], &mut out);
        assert_eq!(out, br#"{"events":[]}"#);
        assert_eq!(event_batch_payload_len([]), out.len());

        let events: Vec<Vec<u8>> = vec![br#"{"a":1}"#.to_vec(), r#"{"b":"é"}"#.as_bytes().to_vec()];
        let mut out = Vec::new();
        event_batch_payload(&events, &mut out);
        assert_eq!(out, r#"{"events":[{"a":1},{"b":"é"}]}"#.as_bytes());
        assert_eq!(
            event_batch_payload_len(events.iter().map(Vec::len)),
            out.len()
        );

        let refs: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        let mut again = Vec::new();
        event_batch_payload(&refs, &mut again);
        assert_eq!(again, out);
    }

    #[test]
    fn overhead_is_an_upper_bound() {
        let key = SigningKey::from_bytes(&[7u8; 32]).unwrap();
        let mut signer = Signer::new(key, SessionBinding::new("a", "p", "s"));
        let payload = br#"{"events":[]}"#;
        // Worst case: every character needs a 6-byte escape.
        let id = "\u{1}".repeat(MAX_FRAME_ID_CHARS);
        let nonce = "\u{2}".repeat(MAX_NONCE_CHARS);
        let ty = "\u{3}".repeat(MAX_FRAME_TYPE_CHARS);
        for _ in 0..3 {
            let wire = signer.sign(
                &ty,
                &id,
                payload,
                datetime!(2026-11-22 23:30:00 UTC),
                &nonce,
            );
            assert!(wire.len() - payload.len() <= frame_overhead_bytes());
        }
        // And typical frames are far below it.
        let wire = signer.sign(
            TYPE_EVENT_BATCH,
            &new_frame_id("ev_"),
            payload,
            datetime!(2026-11-22 23:30:00 UTC),
            "AAAAAAAAAAAAAAAAAAAAAA",
        );
        assert!(wire.len() - payload.len() < 250, "{}", wire.len());
    }

    #[test]
    fn hello_shape() {
        let payload: Value = [
            ("protocol_version", Value::from(PROTOCOL_VERSION)),
            ("agent_version", Value::from("0.1.0")),
            ("framework", Value::from("bare")),
        ]
        .into_iter()
        .collect();
        let wire = hello_frame("hello_1", "2026-11-22T23:30:00.000000Z", &payload);
        assert_eq!(
            std::str::from_utf8(&wire).unwrap(),
            r#"{"v":2,"type":"hello","id":"hello_1","ts":"2026-11-22T23:30:00.000000Z","payload":{"agent_version":"0.1.0","framework":"bare","protocol_version":"2"}}"#
        );
    }

    #[test]
    fn frame_ids() {
        let a = new_frame_id("ev_");
        assert_eq!(a.len(), 35);
        assert!(a.starts_with("ev_"));
        assert!(a[3..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, new_frame_id("ev_"));
    }

    #[test]
    fn kinds() {
        assert_eq!(KNOWN_KINDS.len(), 19);
        assert!(is_known_kind("task.succeeded") && is_known_kind("unknown"));
        assert!(!is_known_kind("task.success"));
        assert!(LEGACY_SCHEDULE_KINDS.iter().all(|k| is_known_kind(k)));
        assert!(is_legacy_schedule_kind("schedule.snapshot"));
        assert!(!is_legacy_schedule_kind("schedule.run_started"));
    }
}
