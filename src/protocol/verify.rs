//! Verification of inbound (brain -> agent) frames: HMAC (`docs/brain-protocol.md`, "Signing"), then
//! the replay guard ("Replay rules"); plus parsing of the unsigned `hello_ack`.
//!
//! Invariants:
//! * The MAC is recomputed from the parsed **values**, re-rendered
//!   canonically (never from the wire text), because the brain signs
//!   Python's rendering but sends pydantic's (floats differ). Parsing uses
//!   [`super::json`], whose floats are exact like Python's.
//! * Extra top-level keys are covered by the MAC, as on the brain.
//! * The replay guard sees a frame only after its MAC checked out, so a
//!   forged frame cannot advance `seq` or burn a nonce.

use hmac::Mac;
use time::OffsetDateTime;

use super::canonical;
use super::frames::ENVELOPE_VERSION;
use super::json;
use super::replay::{ReplayError, ReplayGuard};
use super::sign::{SessionBinding, SigningKey};
use super::value::Value;

/// Why an inbound frame was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    /// Not JSON, not an object, or an envelope field of the wrong type.
    #[error("malformed frame from the brain: {0}")]
    Malformed(String),
    /// `v` missing or not 2.
    #[error(
        "frame envelope version `v` is {found}, expected 2: the brain speaks another \
         protocol version; run matching versions of z4j-agentd and the brain"
    )]
    BadVersion {
        /// What `v` was (`missing`, or the JSON value).
        found: String,
    },
    /// No `hmac` string on a frame that must be signed.
    #[error("frame has no `hmac` string: the brain sent an unsigned frame where a signed one is required")]
    MissingSignature,
    /// The MAC does not match (or is not 64 lowercase hex digits).
    #[error(
        "frame signature (hmac) does not match: check that the configured HMAC secret is \
         the current `hmac_secret` of this agent's project (re-mint it if the brain's \
         Z4J_SECRET was rotated)"
    )]
    BadSignature,
    /// Correctly signed but refused by the replay guard.
    #[error("frame refused as a possible replay: {0}")]
    Replay(#[from] ReplayError),
}

impl VerifyError {
    /// `true` for a missing or wrong MAC (as opposed to replay, version or
    /// shape problems). Like the brain's 4403, a caller usually treats this
    /// as an authentication failure.
    pub fn is_signature_failure(&self) -> bool {
        matches!(
            self,
            VerifyError::MissingSignature | VerifyError::BadSignature
        )
    }
}

/// A verified inbound frame.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundFrame {
    /// `type`, e.g. `event_batch_ack`, `command`, `error`.
    pub frame_type: String,
    /// `id` (for `command`, the command UUID).
    pub id: String,
    /// `seq`, already checked to be increasing.
    pub seq: u64,
    /// `ts` as sent.
    pub ts: String,
    /// `payload`, always a [`Value::Map`].
    pub payload: Value,
}

/// Verifies the brain's frames for one connection.
#[derive(Debug)]
pub struct Verifier {
    key: SigningKey,
    binding: SessionBinding,
    guard: ReplayGuard,
}

impl Verifier {
    /// A verifier for a new session (fresh replay state).
    pub fn new(key: SigningKey, binding: SessionBinding) -> Self {
        Verifier {
            key,
            binding,
            guard: ReplayGuard::new(),
        }
    }

    /// The session this verifier binds.
    pub fn binding(&self) -> &SessionBinding {
        &self.binding
    }

    /// The last accepted inbound `seq` (0 before the first frame).
    pub fn last_seq(&self) -> u64 {
        self.guard.last_seq()
    }

    /// Checks one signed frame (JSON text or binary message body) and
    /// returns its envelope and payload.
    pub fn verify(
        &mut self,
        wire: &[u8],
        now: OffsetDateTime,
    ) -> Result<InboundFrame, VerifyError> {
        let mut frame = parse_object(wire)?;
        check_version(&frame)?;

        let tag = match frame.remove("hmac") {
            Some(Value::Str(hex)) => decode_tag(&hex).ok_or(VerifyError::BadSignature)?,
            _ => return Err(VerifyError::MissingSignature),
        };
        frame.insert("agent_id", self.binding.agent_id.as_str());
        frame.insert("project_id", self.binding.project_id.as_str());
        frame.insert("session_id", self.binding.session_id.as_str());
        let canon = canonical::to_vec(&frame).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        let mut mac = self.key.mac();
        mac.update(&canon);
        mac.verify_slice(&tag)
            .map_err(|_| VerifyError::BadSignature)?;

        let frame_type = take_string(&mut frame, "type")?;
        let id = take_string(&mut frame, "id")?;
        let ts = take_string(&mut frame, "ts")?;
        let nonce = take_string(&mut frame, "nonce")?;
        // Anything but a positive integer is left to the guard to refuse
        // (as 0), after its timestamp rule, matching the brain's order.
        let seq = match frame.get("seq") {
            Some(Value::Int(i)) => u64::try_from(*i).unwrap_or(0),
            Some(Value::UInt(u)) => *u,
            _ => 0,
        };
        let payload = match frame.remove("payload") {
            Some(p @ Value::Map(_)) => p,
            Some(other) => {
                return Err(VerifyError::Malformed(format!(
                    "`payload` must be a JSON object, got {}",
                    other.type_name()
                )))
            }
            None => return Err(VerifyError::Malformed("`payload` is missing".into())),
        };

        self.guard.check(&ts, seq, &nonce, now)?;
        Ok(InboundFrame {
            frame_type,
            id,
            seq,
            ts,
            payload,
        })
    }
}

/// Parses an unsigned frame (`hello_ack`): a JSON object whose `v`, if
/// present, is 2. Returns the whole frame.
pub fn parse_unsigned(wire: &[u8]) -> Result<Value, VerifyError> {
    let frame = parse_object(wire)?;
    if frame.get("v").is_some() {
        check_version(&frame)?;
    }
    Ok(frame)
}

fn parse_object(wire: &[u8]) -> Result<Value, VerifyError> {
    // Our parser, not serde_json: floats must parse exactly as in Python.
    let frame =
        json::parse(wire).map_err(|e| VerifyError::Malformed(format!("not valid JSON: {e}")))?;
    if !matches!(frame, Value::Map(_)) {
        return Err(VerifyError::Malformed(format!(
            "expected a JSON object, got {}",
            frame.type_name()
        )));
    }
    Ok(frame)
}

fn check_version(frame: &Value) -> Result<(), VerifyError> {
    match frame.get("v") {
        Some(Value::Int(ENVELOPE_VERSION)) => Ok(()),
        Some(other) => Err(VerifyError::BadVersion {
            found: String::from_utf8_lossy(&canonical_or_type(other)).into_owned(),
        }),
        None => Err(VerifyError::BadVersion {
            found: "missing".into(),
        }),
    }
}

/// Short rendering of an unexpected value for an error message.
fn canonical_or_type(v: &Value) -> Vec<u8> {
    match v {
        Value::Array(_) | Value::Map(_) => v.type_name().as_bytes().to_vec(),
        Value::Str(s) if s.len() > 40 => b"a long string".to_vec(),
        _ => canonical::to_vec(v).unwrap_or_else(|_| v.type_name().as_bytes().to_vec()),
    }
}

fn take_string(frame: &mut Value, key: &str) -> Result<String, VerifyError> {
    match frame.remove(key) {
        Some(Value::Str(s)) => Ok(s),
        Some(other) => Err(VerifyError::Malformed(format!(
            "`{key}` must be a string, got {}",
            other.type_name()
        ))),
        None => Err(VerifyError::Malformed(format!("`{key}` is missing"))),
    }
}

/// Decodes exactly 64 lowercase hex digits (the brain compares hex strings,
/// so uppercase would not match there either).
fn decode_tag(hex: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut tag = [0u8; 32];
    for (out, pair) in tag.iter_mut().zip(bytes.chunks_exact(2)) {
        *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sign::{mac_hex, Signer};
    use time::macros::datetime;

    const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";
    const V3_HMAC: &str = "08c732f657a799dc2451bcb497c03ae13c621dde2e20114d9b07a9a134fe6697";
    const V3_NOW: OffsetDateTime = datetime!(2026-11-22 23:30:00.5 UTC);

    fn key() -> SigningKey {
        SigningKey::from_base64(SECRET).unwrap()
    }

    fn binding() -> SessionBinding {
        SessionBinding::new(
            "ea12aefd-04ac-43d0-af34-08b77434f37a",
            "817e2571-38a5-4109-92c2-612c66108836",
            "0b9d6a2e-6f7c-4c36-9a53-2f7d3c1e8a11",
        )
    }

    /// V3 as the brain puts it on the wire: pydantic key order, spaces.
    fn v3_wire(hmac: &str) -> String {
        format!(
            r#"{{"v": 2, "id": "eba_ev_00000000000000000000000000000001", "ts": "2026-11-22T23:30:00.200000Z",
                "type": "event_batch_ack", "nonce": "CCCCCCCCCCCCCCCCCCCCCC", "seq": 1, "hmac": "{hmac}",
                "payload": {{"acked_id": "ev_00000000000000000000000000000001", "received": 1,
                             "accepted": 1, "rejected": 0}}}}"#
        )
    }

    #[test]
    fn vector_v3_brain_ack() {
        let mut verifier = Verifier::new(key(), binding());
        let frame = verifier
            .verify(v3_wire(V3_HMAC).as_bytes(), V3_NOW)
            .unwrap();
        assert_eq!(frame.frame_type, "event_batch_ack");
        assert_eq!(frame.id, "eba_ev_00000000000000000000000000000001");
        assert_eq!(frame.seq, 1);
        assert_eq!(frame.ts, "2026-11-22T23:30:00.200000Z");
        assert_eq!(
            frame.payload.get("acked_id").and_then(Value::as_str),
            Some("ev_00000000000000000000000000000001")
        );
        assert_eq!(
            frame.payload.get("accepted").and_then(Value::as_i64),
            Some(1)
        );
        assert_eq!(verifier.last_seq(), 1);

        // The same frame again is a replay.
        assert!(matches!(
            verifier.verify(v3_wire(V3_HMAC).as_bytes(), V3_NOW),
            Err(VerifyError::Replay(ReplayError::SeqNotIncreasing {
                seq: 1,
                last: 1
            }))
        ));
    }

    #[test]
    fn vector_v2_and_v4_through_the_verifier() {
        // V2 has a ts without fraction (the signer cannot produce it), so
        // build the wire by hand and check it through the verifier path.
        let wire = |hmac: &str| {
            format!(
                r#"{{"v":2,"type":"heartbeat","id":"hb_0123456789abcdef","ts":"2026-11-22T23:30:10+00:00",
                    "nonce":"BBBBBBBBBBBBBBBBBBBBBB","seq":2,"hmac":"{hmac}",
                    "payload":{{"buffer_size":0,"last_flush_at":null,"dropped_events":0,"adapter_health":{{}}}}}}"#
            )
        };
        let now = datetime!(2026-11-22 23:30:10 UTC);
        let mut v = Verifier::new(key(), binding());
        v.verify(
            wire("74fd4b8c9d29d0026bd34db6ee13173b600463d2fb5bdfdb550bfb4c1756f359").as_bytes(),
            now,
        )
        .unwrap();
        let mut v4 = Verifier::new(
            key(),
            SessionBinding {
                session_id: String::new(),
                ..binding()
            },
        );
        v4.verify(
            wire("8b4dc41ad81e6292627f6df4e10d33b15c0030b0d4eeb35bc8ced24bb8b0a7c1").as_bytes(),
            now,
        )
        .unwrap();
    }

    #[test]
    fn refuses_tampered_payload() {
        let tampered = v3_wire(V3_HMAC).replace(r#""accepted": 1"#, r#""accepted": 2"#);
        let mut verifier = Verifier::new(key(), binding());
        let err = verifier.verify(tampered.as_bytes(), V3_NOW).unwrap_err();
        assert_eq!(err, VerifyError::BadSignature);
        assert!(err.is_signature_failure());
        // A forged frame does not advance the replay state.
        assert_eq!(verifier.last_seq(), 0);
        verifier
            .verify(v3_wire(V3_HMAC).as_bytes(), V3_NOW)
            .unwrap();
    }

    #[test]
    fn refuses_wrong_session_binding() {
        let mut verifier = Verifier::new(
            key(),
            SessionBinding {
                session_id: "another-session".into(),
                ..binding()
            },
        );
        assert_eq!(
            verifier.verify(v3_wire(V3_HMAC).as_bytes(), V3_NOW),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn refuses_bad_hmac_shapes() {
        let mut verifier = Verifier::new(key(), binding());
        for hmac in [
            &V3_HMAC[..63],
            &format!("{V3_HMAC}0"),
            "",
            &V3_HMAC.to_uppercase(),
            &format!("{}g", &V3_HMAC[..63]),
        ] {
            assert_eq!(
                verifier.verify(v3_wire(hmac).as_bytes(), V3_NOW),
                Err(VerifyError::BadSignature),
                "{hmac}"
            );
        }
        let unsigned = v3_wire(V3_HMAC).replace(&format!(r#""hmac": "{V3_HMAC}","#), "");
        let err = verifier.verify(unsigned.as_bytes(), V3_NOW).unwrap_err();
        assert_eq!(err, VerifyError::MissingSignature);
        assert!(err.is_signature_failure());
    }

    #[test]
    fn refuses_bad_version() {
        let mut verifier = Verifier::new(key(), binding());
        for (from, found) in [(r#""v": 2,"#, "3"), (r#""v": 2,"#, r#""2""#)] {
            let wire = v3_wire(V3_HMAC).replace(from, &format!(r#""v": {found},"#));
            let err = verifier.verify(wire.as_bytes(), V3_NOW).unwrap_err();
            assert_eq!(
                err,
                VerifyError::BadVersion {
                    found: found.into()
                }
            );
            assert!(!err.is_signature_failure());
        }
        let wire = v3_wire(V3_HMAC).replace(r#""v": 2,"#, "");
        assert_eq!(
            verifier.verify(wire.as_bytes(), V3_NOW),
            Err(VerifyError::BadVersion {
                found: "missing".into()
            })
        );
    }

    #[test]
    fn refuses_malformed() {
        let mut verifier = Verifier::new(key(), binding());
        for wire in ["not json", "[1,2]", r#""x""#] {
            assert!(matches!(
                verifier.verify(wire.as_bytes(), V3_NOW),
                Err(VerifyError::Malformed(_))
            ));
        }
    }

    #[test]
    fn replay_rules_apply_after_signature() {
        let mut verifier = Verifier::new(key(), binding());
        let late = V3_NOW + time::Duration::seconds(61);
        let err = verifier
            .verify(v3_wire(V3_HMAC).as_bytes(), late)
            .unwrap_err();
        assert!(matches!(
            err,
            VerifyError::Replay(ReplayError::ClockSkew { .. })
        ));
        assert!(err.to_string().contains("synchronise"), "{err}");
    }

    #[test]
    fn round_trip_with_signer_including_floats() {
        // A brain-like frame signed by our signer verifies, even when the
        // floats are written differently on the wire (pydantic style).
        let mut signer = Signer::new(key(), binding());
        let payload: Value = serde_json::from_str(
            r#"{"action":"retry_task","parameters":{"eta":1763854200.5,"tiny":1e-05,"big":1e16}}"#,
        )
        .unwrap();
        let wire = signer.sign_value(
            "command",
            "702dab12-7228-46ba-bd76-4f47731d9b3b",
            &payload,
            V3_NOW,
            "n1",
        );
        let text = String::from_utf8(wire).unwrap();
        assert!(text.contains(r#""tiny":1e-05"#));
        let pydantic = text
            .replace("1e-05", "0.00001")
            .replace("1e+16", "10000000000000000.0");
        let mut verifier = Verifier::new(key(), binding());
        let frame = verifier.verify(pydantic.as_bytes(), V3_NOW).unwrap();
        assert_eq!(
            canonical::to_vec(&frame.payload).unwrap(),
            canonical::to_vec(&payload).unwrap()
        );
        assert_eq!(frame.frame_type, "command");

        // Extra top-level keys are covered by the MAC.
        let mut extra: Value = serde_json::from_str(&text).unwrap();
        extra.remove("hmac");
        extra.insert("extra", true);
        let mut canon_input = extra.clone();
        let b = binding();
        canon_input.insert("agent_id", b.agent_id);
        canon_input.insert("project_id", b.project_id);
        canon_input.insert("session_id", b.session_id);
        canon_input.insert("seq", 2i64);
        extra.insert("seq", 2i64);
        extra.insert("nonce", "n2");
        canon_input.insert("nonce", "n2");
        let mac = mac_hex(&key(), &canonical::to_vec(&canon_input).unwrap());
        extra.insert("hmac", mac);
        verifier
            .verify(&serde_json::to_vec(&extra).unwrap(), V3_NOW)
            .unwrap();
    }

    #[test]
    fn unsigned_hello_ack() {
        let wire = br#"{"v":2,"id":"hack_4b602a5276dd","ts":"2026-11-22T23:26:42.129977Z","type":"hello_ack",
            "payload":{"protocol_version":"2","session_id":"4b602a52-76dd-4606-aa84-406cdff8d4f9","max_frame_size_bytes":1048576}}"#;
        let v = parse_unsigned(wire).unwrap();
        assert_eq!(v.get("type").and_then(Value::as_str), Some("hello_ack"));
        assert_eq!(
            v.get("payload")
                .and_then(|p| p.get("max_frame_size_bytes"))
                .and_then(Value::as_i64),
            Some(1_048_576)
        );
        assert!(matches!(
            parse_unsigned(b"[]"),
            Err(VerifyError::Malformed(_))
        ));
        assert!(matches!(
            parse_unsigned(br#"{"v":1}"#),
            Err(VerifyError::BadVersion { .. })
        ));
        assert!(parse_unsigned(br#"{"type":"hello_ack"}"#).is_ok());
    }
}
