//! z4j protocol v2: values, canonical JSON, HMAC signing and verification,
//! the replay guard, and frame constants. What the brain expects is stated
//! in `docs/brain-protocol.md` (envelope, signing, canonical JSON, replay
//! rules, hello/hello_ack, event_batch and its ack, close codes, limits).
//!
//! # Design
//!
//! * **Pure.** No I/O, no async, no clock: callers pass `now` in, so every
//!   rule (clock skew, nonce window) is testable deterministically.
//! * **What is signed.** Every frame after the handshake carries
//!   `hmac = HMAC-SHA256(key, canonical(frame - hmac + {agent_id, project_id,
//!   session_id}))`, where *canonical* is Python's
//!   `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
//!   allow_nan=False)`. The binding keys come from `hello_ack` and are not on
//!   the wire; `ts`, `nonce` and `seq` are, and are signed too, so a frame is
//!   re-signed whenever it is re-sent.
//! * **Events are rendered canonically once, at ingest.** A canonical JSON
//!   object embedded in a canonical object stays canonical, so an
//!   `event_batch` payload is built by concatenating stored event bytes
//!   ([`frames::event_batch_payload`]) and the [`Signer`] frames it by
//!   concatenation too, feeding the HMAC from the wire buffer. The hot path
//!   (thousands of events per frame) therefore never parses, sorts or
//!   escapes an event again.
//! * **Verifying re-renders.** Inbound frames are parsed into [`Value`] and
//!   rendered canonically before the MAC check, because the brain signs
//!   Python's float rendering but sends another writer's.
//! * **Why the JSON pieces are our own.** The MAC covers Python's
//!   `json.loads` then `json.dumps` of the values, byte for byte, so what
//!   the daemon reads and writes must match Python, not merely be valid
//!   JSON:
//!   * [`canonical`] writes floats as Python's `repr(float)` (`1e-05`,
//!     `1e+16`, ties to even), sorted keys with the last duplicate winning,
//!     and Python's string escapes; serde_json writes `1e-5` and `1e16` and
//!     keeps every duplicate.
//!   * [`json`] reads as `json.loads` does: `-0` is the integer 0, an
//!     integer beyond 64 bits is refused with where it is (a float reader
//!     would keep it with digits gone), and NaN/Infinity literals are
//!     refused, never turned into a value the writer would then refuse.
//!     serde_json is built with `float_roundtrip`, so its floats are exact
//!     too; precision is not the reason for this reader, those three rules
//!     are. The one reader serves both the brain's frames and the local
//!     socket's JSON lines, so both read a document the same way.
//!   * [`value`] holds integers exactly (`Int` or `UInt`, one
//!     representation each), keeps map order and duplicates, and is the one
//!     type both local framings (JSON lines, MessagePack) decode into.
//! * **One value type for both local wire formats.** [`Value`]'s
//!   `Deserialize` (used for MessagePack) refuses exactly what canonical
//!   JSON cannot represent (non-string keys, NaN/infinity, bytes).

pub mod canonical;
pub mod frames;
pub mod json;
pub mod limits;
pub mod msgpack;
pub mod replay;
pub mod sign;
pub mod value;
pub mod verify;

pub use canonical::CanonicalError;
pub use frames::{
    event_batch_payload, frame_overhead_bytes, hello_frame, new_frame_id, DEFAULT_MAX_FRAME_BYTES,
    KNOWN_KINDS, LEGACY_SCHEDULE_KINDS, MAX_EVENTS_PER_FRAME, PROTOCOL_VERSION,
};
pub use replay::{parse_iso8601, parse_iso8601_assume_utc, ReplayError, ReplayGuard};
pub use sign::{format_ts, mac_hex, new_nonce, KeyError, SessionBinding, Signer, SigningKey};
pub use value::Value;
pub use verify::{parse_unsigned, InboundFrame, Verifier, VerifyError};
