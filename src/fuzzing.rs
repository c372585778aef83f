//! Bodies of the fuzz targets in `fuzz/fuzz_targets/` (see `docs/fuzzing.md`).
//!
//! Each `pub fn` takes the fuzzer's bytes, drives one part of the daemon
//! that reads untrusted input, and panics when a property does not hold. The
//! same functions replay the seed corpus and the saved regression inputs
//! under `cargo test` (the tests at the end of this file), so a bug found
//! once stays fixed without cargo-fuzz.
//!
//! Nothing here does I/O or reads the clock: every `now` is fixed, so a
//! failing input fails the same way every time.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use time::{Duration, OffsetDateTime};

use crate::protocol::{
    canonical, json, mac_hex, parse_iso8601, parse_unsigned, ReplayError, SessionBinding, Signer,
    SigningKey, Value, Verifier, VerifyError,
};

mod ingest;
pub use ingest::{ingest_json_lines, ingest_msgpack};

/// The receive time every target uses: 2026-11-22T23:30:00.5Z.
fn fixed_now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(1_795_390_200_500_000_000).expect("valid time")
}

// ---------------------------------------------------------------------------
// Canonical JSON.
// ---------------------------------------------------------------------------

/// Target `canonical_json`: the input as JSON text (through the protocol's
/// exact parser, and through serde_json as the ingest path reads it), and
/// the input as a recipe for a value (every float bit pattern, every key
/// order, duplicate keys), each rendered canonically and checked.
pub fn canonical_json(data: &[u8]) {
    if let Ok(v) = json::parse(data) {
        check_canonical(&v);
        // Both parsers give the same value for a document both accept, but
        // for one known difference: serde_json reads the integer `-0` as the
        // float -0.0 (Python's json.loads and json::parse give the integer 0).
        if let Ok(s) = serde_json::from_slice::<Value>(data) {
            assert!(
                eq_with(&v, &s, &|a, b| matches!(
                    (a, b),
                    (Value::Int(0), Value::Float(f)) if f.to_bits() == (-0.0f64).to_bits()
                )),
                "json::parse {v:?} != serde_json {s:?}"
            );
        }
    }
    let built = build_value(&mut Input::new(data), 0);
    check_canonical(&built);
}

/// The properties of the canonical writer for one value.
fn check_canonical(v: &Value) {
    let mut lossy = Vec::new();
    canonical::write_value_lossy(v, &mut lossy);
    // A float under a key that a later duplicate overrides is not written.
    if !is_finite(&normalized(v)) {
        assert_eq!(
            canonical::to_vec(v),
            Err(canonical::CanonicalError::NonFinite)
        );
        // Lossy mode writes null for each non-finite float, nothing else.
        assert_eq!(
            lossy,
            canonical::to_vec(&finite_or_null(v)).expect("finite")
        );
        return;
    }
    let out = canonical::to_vec(v).expect("a finite value renders");
    assert_eq!(lossy, out, "lossy mode changes nothing for finite values");
    let text = std::str::from_utf8(&out).expect("canonical output is UTF-8");
    let want = normalized(v);

    // Parses back, with our parser and with serde_json, to the same value:
    // keys sorted, the last of duplicate keys kept, floats bit for bit.
    let back = json::parse(&out).expect("canonical output is JSON");
    assert!(strict_eq(&back, &want), "{text} read back as {back:?}");
    let theirs: serde_json::Value = serde_json::from_slice(&out).expect("serde_json reads it");
    assert!(strict_eq(&from_serde(&theirs), &want), "{text}");

    // Rendering is a fixed point: render(parse(render(v))) == render(v).
    assert_eq!(canonical::to_vec(&back).expect("renders"), out);
    check_key_order(&back);
    check_floats(&want);
}

/// Keys strictly increasing by code point at every depth.
fn check_key_order(v: &Value) {
    match v {
        Value::Map(entries) => {
            for w in entries.windows(2) {
                assert!(w[0].0 < w[1].0, "{:?} before {:?}", w[0].0, w[1].0);
            }
            entries.iter().for_each(|(_, v)| check_key_order(v));
        }
        Value::Array(items) => items.iter().for_each(check_key_order),
        _ => {}
    }
}

/// Every float is written like Python's `repr`: the shortest digits that
/// read back to the same bits, positional for exponents -4..16 (with at
/// least one fractional digit), otherwise `d[.ddd]e±XX`.
fn check_floats(v: &Value) {
    match v {
        Value::Float(f) => check_float(*f),
        Value::Array(items) => items.iter().for_each(check_floats),
        Value::Map(entries) => entries.iter().for_each(|(_, v)| check_floats(v)),
        _ => {}
    }
}

fn check_float(f: f64) {
    let mut out = Vec::new();
    canonical::write_f64(f, &mut out).expect("finite");
    let text = std::str::from_utf8(&out).expect("ASCII");
    let back: f64 = text.parse().expect("a float Rust reads");
    assert_eq!(back.to_bits(), f.to_bits(), "{text} does not read back");

    // Rust's shortest scientific form has the same digit count and exponent.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent digits");
    let n_digits = mantissa.bytes().filter(u8::is_ascii_digit).count();
    let body = text.strip_prefix('-').unwrap_or(text);
    assert_eq!(text.starts_with('-'), f.is_sign_negative());
    if (-4..16).contains(&exp) {
        assert!(!body.contains('e') && body.contains('.'), "{text}");
        let (int, frac) = body.split_once('.').expect("a point");
        assert!(!frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit()));
        assert!(int == "0" || !int.starts_with('0'), "{text}");
        let significant = format!("{int}{frac}");
        let significant = significant.trim_start_matches('0').trim_end_matches('0');
        if f != 0.0 {
            assert_eq!(significant.len(), n_digits, "{text} vs {sci}");
        }
    } else {
        let (m, e) = body.split_once('e').expect("an exponent");
        assert!(e.starts_with('+') || e.starts_with('-'), "{text}");
        assert!(e.len() >= 3, "at least two exponent digits: {text}");
        assert_eq!(e.parse::<i32>().expect("exponent"), exp, "{text} vs {sci}");
        assert_eq!(m.bytes().filter(u8::is_ascii_digit).count(), n_digits);
        assert!(!m.ends_with('0') || m.len() == 1, "{text}");
    }
}

fn is_finite(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_finite(),
        Value::Array(items) => items.iter().all(is_finite),
        Value::Map(entries) => entries.iter().all(|(_, v)| is_finite(v)),
        _ => true,
    }
}

fn finite_or_null(v: &Value) -> Value {
    match v {
        Value::Float(f) if !f.is_finite() => Value::Null,
        Value::Array(items) => Value::Array(items.iter().map(finite_or_null).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), finite_or_null(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// What Python's `json.loads(json.dumps(v, sort_keys=True))` holds: maps
/// sorted by key with the last duplicate kept, at every depth.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Map(entries) => {
            let mut m = BTreeMap::new();
            for (k, v) in entries {
                m.insert(k.clone(), normalized(v));
            }
            Value::Map(m.into_iter().collect())
        }
        other => other.clone(),
    }
}

/// Equality that tells `0.0` from `-0.0` and an integer from a float.
fn strict_eq(a: &Value, b: &Value) -> bool {
    eq_with(a, b, &|_, _| false)
}

/// [`strict_eq`], except that scalars for which `also` holds count as equal.
fn eq_with(a: &Value, b: &Value, also: &dyn Fn(&Value, &Value) -> bool) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| eq_with(a, b, also))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && eq_with(va, vb, also))
        }
        _ => a == b || also(a, b),
    }
}

fn from_serde(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().expect("a number"))
            }
        }
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(from_serde).collect()),
        serde_json::Value::Object(m) => {
            Value::Map(m.iter().map(|(k, v)| (k.clone(), from_serde(v))).collect())
        }
    }
}

/// Reads fuzzer bytes as small numbers and strings; zeros once exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    /// Up to `max_chars` characters: ASCII bytes as themselves, a byte
    /// >= 0x80 starts a three-byte code point (any plane).
    fn string(&mut self, max_chars: usize) -> String {
        let n = usize::from(self.byte()) % (max_chars + 1);
        let mut s = String::new();
        for _ in 0..n {
            let b = self.byte();
            if b < 0x80 {
                s.push(char::from(b));
            } else {
                let cp = (u32::from(b & 0x7f) << 16 | u32::from(self.byte()) << 8)
                    | u32::from(self.byte());
                if let Some(c) = char::from_u32(cp % 0x11_0000) {
                    s.push(c);
                }
            }
        }
        s
    }

    fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// A value from fuzzer bytes: any scalar, any float bits, short keys (so
/// duplicates are common), nesting up to 6 levels.
fn build_value(inp: &mut Input<'_>, depth: usize) -> Value {
    let tag = inp.byte();
    let kinds = if depth >= 6 { 6 } else { 8 };
    match tag % kinds {
        0 => Value::Null,
        1 => Value::Bool(tag & 0x80 != 0),
        2 => Value::Int(inp.u64() as i64),
        3 => Value::UInt(inp.u64() | 1 << 63),
        4 => Value::Float(f64::from_bits(inp.u64())),
        5 => Value::Str(inp.string(24)),
        6 => {
            let n = inp.byte() % 6;
            Value::Array((0..n).map(|_| build_value(inp, depth + 1)).collect())
        }
        _ => build_map(inp, depth),
    }
}

fn build_map(inp: &mut Input<'_>, depth: usize) -> Value {
    let n = inp.byte() % 40; // above the 32 entries sorted on the stack
    Value::Map(
        (0..n)
            .map(|_| (inp.string(3), build_value(inp, depth + 1)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// Inbound frames from the brain.
// ---------------------------------------------------------------------------

const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";

fn key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_base64(SECRET).expect("a valid key"))
        .clone()
}

fn fixed_binding() -> SessionBinding {
    SessionBinding::new(
        "ea12aefd-04ac-43d0-af34-08b77434f37a",
        "817e2571-38a5-4109-92c2-612c66108836",
        "0b9d6a2e-6f7c-4c36-9a53-2f7d3c1e8a11",
    )
}

/// Target `inbound_frame`, three ways on every input:
/// * the bytes as a frame from the brain (never panics, a refused frame
///   leaves the replay state alone);
/// * the bytes as a recipe for an envelope signed the way the brain signs,
///   with fields of any type: the verifier's answer must match a model of
///   `docs/brain-protocol.md`, "Signing" and "Replay rules";
/// * the bytes as a recipe for a frame our signer signs, then edits to the
///   wire text: a frame that still verifies carries exactly what was signed.
pub fn inbound_frame(data: &[u8]) {
    raw_frame(data);
    brain_signed_envelope(data);
    signed_then_mutated(data);
}

fn raw_frame(data: &[u8]) {
    let mut verifier = Verifier::new(key(), fixed_binding());
    match verifier.verify(data, fixed_now()) {
        Ok(f) => {
            assert!(f.seq >= 1 && verifier.last_seq() == f.seq);
            assert!(matches!(f.payload, Value::Map(_)));
        }
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(verifier.last_seq(), 0, "a refused frame moved seq");
        }
    }
    if let Ok(v) = parse_unsigned(data) {
        assert!(matches!(v, Value::Map(_)));
    }
}

/// Which of the verifier's answers the model expects.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok,
    Malformed,
    BadVersion,
    MissingSignature,
    BadSignature,
    Replay(&'static str),
}

/// A brain-signed envelope from fuzzer bytes; the verifier must answer
/// what the model of `docs/brain-protocol.md` ("Signing", "Replay rules")
/// expects.
fn brain_signed_envelope(data: &[u8]) {
    let mut inp = Input::new(data);
    let now = fixed_now();
    let Some((frame, hmac_choice)) = build_envelope(&mut inp, now) else {
        return; // JSON has no NaN or infinity, not even under a duplicate key
    };
    let wire = serde_json::to_vec(&frame).expect("finite values serialise");
    let expect = expected_answer(&frame, hmac_choice, now);
    let mut verifier = Verifier::new(key(), fixed_binding());
    let got = verifier.verify(&wire, now);
    let seen = match &got {
        Ok(f) => {
            check_verified(f, &frame, &wire, &mut verifier, now);
            Expect::Ok
        }
        Err(e) => answer_of(e),
    };
    assert_eq!(seen, expect, "{frame:?} -> {got:?}");
    if got.is_err() {
        assert_eq!(verifier.last_seq(), 0, "a refused frame moved seq");
    }
}

/// The envelope: extra keys, then each envelope field well formed, absent
/// or of any type, signed like the brain signs unless `hmac_choice` < 2
/// (0: no `hmac`, 1: any value). `None` when it holds a non-finite float.
fn build_envelope(inp: &mut Input<'_>, now: OffsetDateTime) -> Option<(Value, u8)> {
    let skew = Duration::seconds(i64::from(inp.byte() % 141) - 70);
    let mut frame = Value::empty_map();
    // Extra keys first, so the envelope keys below override any of them.
    if let Value::Map(extra) = build_map(inp, 4) {
        for (k, v) in extra {
            frame.insert(k, v);
        }
    }
    let good: [(&str, Value); 7] = [
        ("v", Value::Int(2)),
        ("type", Value::from("command")),
        ("id", Value::from("702dab12-7228-46ba-bd76-4f47731d9b3b")),
        ("ts", Value::from(crate::protocol::format_ts(now + skew))),
        ("nonce", Value::from("bm9uY2U")),
        ("seq", Value::Int(1 + i64::from(inp.byte() % 3))),
        ("payload", Value::empty_map()),
    ];
    for (k, v) in good {
        match inp.byte() % 8 {
            0 => {
                frame.remove(k);
            }
            1 => {
                frame.insert(k, build_value(inp, 3));
            }
            _ => {
                frame.insert(k, v);
            }
        }
    }
    let hmac_choice = inp.byte() % 8;
    let mut canon_input = frame.clone();
    let b = fixed_binding();
    canon_input.insert("agent_id", b.agent_id.as_str());
    canon_input.insert("project_id", b.project_id.as_str());
    canon_input.insert("session_id", b.session_id.as_str());
    if !is_finite(&canon_input) {
        return None;
    }
    let canon = canonical::to_vec(&canon_input).expect("finite");
    match hmac_choice {
        0 => {}
        1 => {
            frame.insert("hmac", build_value(inp, 5));
        }
        _ => {
            frame.insert("hmac", mac_hex(&key(), &canon));
        }
    }
    Some((frame, hmac_choice))
}

/// The model: version, then signature, then envelope types, then the
/// replay rules (`docs/brain-protocol.md`, "Replay rules").
fn expected_answer(frame: &Value, hmac_choice: u8, now: OffsetDateTime) -> Expect {
    let get = |k: &str| frame.get(k);
    if get("v") != Some(&Value::Int(2)) {
        return Expect::BadVersion;
    }
    if !matches!(get("hmac"), Some(Value::Str(_))) {
        return Expect::MissingSignature;
    }
    if hmac_choice < 2 {
        // Any hmac string but the right one (a fuzzer does not guess it).
        return Expect::BadSignature;
    }
    if ["type", "id", "ts", "nonce"]
        .iter()
        .any(|k| !matches!(get(k), Some(Value::Str(_))))
        || !matches!(get("payload"), Some(Value::Map(_)))
    {
        return Expect::Malformed;
    }
    let ts = get("ts").and_then(Value::as_str).expect("checked");
    let seq = match get("seq") {
        Some(Value::Int(i)) => u64::try_from(*i).unwrap_or(0),
        Some(Value::UInt(u)) => *u,
        _ => 0,
    };
    match parse_iso8601(ts) {
        None => Expect::Replay("ts"),
        Some(t) if (now - t).abs() > Duration::seconds(60) => Expect::Replay("skew"),
        Some(_) if seq == 0 => Expect::Replay("seq"),
        Some(_) if get("nonce").and_then(Value::as_str) == Some("") => Expect::Replay("nonce"),
        Some(_) => Expect::Ok,
    }
}

/// An accepted frame carries exactly the signed fields, its command
/// payload reads without panicking, and the same frame again is a replay.
fn check_verified(
    f: &crate::protocol::InboundFrame,
    frame: &Value,
    wire: &[u8],
    verifier: &mut Verifier,
    now: OffsetDateTime,
) {
    let get = |k: &str| frame.get(k).and_then(Value::as_str);
    assert_eq!(Some(f.frame_type.as_str()), get("type"));
    assert_eq!(Some(f.id.as_str()), get("id"));
    assert_eq!(Some(f.ts.as_str()), get("ts"));
    let sent = frame.get("payload").expect("present");
    assert!(
        strict_eq(&f.payload, sent),
        "sent {sent:?}, verified {:?}, wire {}",
        f.payload,
        String::from_utf8_lossy(wire)
    );
    assert_eq!(verifier.last_seq(), f.seq);
    let cmd = crate::commands::Command::from_payload(&f.id, &f.payload);
    let _ = (cmd.engine(), cmd.local_budget());
    assert!(matches!(
        verifier.verify(wire, now),
        Err(VerifyError::Replay(ReplayError::SeqNotIncreasing { .. }))
    ));
}

/// The model's name for a refusal.
fn answer_of(e: &VerifyError) -> Expect {
    match e {
        VerifyError::Malformed(_) => Expect::Malformed,
        VerifyError::BadVersion { .. } => Expect::BadVersion,
        VerifyError::MissingSignature => Expect::MissingSignature,
        VerifyError::Replay(r) => Expect::Replay(match r {
            ReplayError::BadTimestamp { .. } => "ts",
            ReplayError::ClockSkew { .. } => "skew",
            ReplayError::InvalidSeq | ReplayError::SeqNotIncreasing { .. } => "seq",
            ReplayError::EmptyNonce | ReplayError::LongNonce | ReplayError::NonceReused => "nonce",
        }),
        VerifyError::BadSignature => Expect::BadSignature,
    }
}

fn signed_then_mutated(data: &[u8]) {
    let mut inp = Input::new(data);
    let binding = SessionBinding::new(inp.string(16), inp.string(16), inp.string(16));
    let frame_type = inp.string(32);
    let id = inp.string(64);
    let nonce = inp.string(32);
    let frames = 1 + u64::from(inp.byte() % 3);
    let skew = Duration::seconds(i64::from(inp.byte() % 141) - 70);
    let payload = build_map(&mut inp, 2);
    let now = fixed_now();

    let mut signer = Signer::new(key(), binding.clone());
    let mut wire = Vec::new();
    for _ in 0..frames {
        wire = signer.sign_value(&frame_type, &id, &payload, now, &nonce);
    }
    let mut signed_payload = Vec::new();
    canonical::write_value_lossy(&payload, &mut signed_payload);

    let same = |f: &crate::protocol::InboundFrame| {
        f.frame_type == frame_type
            && f.id == id
            && f.seq == frames
            && f.ts == crate::protocol::format_ts(now)
            && canonical::to_vec(&f.payload).expect("verified values are finite") == signed_payload
    };

    // What our signer signs, our verifier accepts (same session, in time).
    let mut verifier = Verifier::new(key(), binding.clone());
    let got = verifier.verify(&wire, now + skew);
    if skew.abs() > Duration::seconds(60) {
        assert!(matches!(
            got,
            Err(VerifyError::Replay(ReplayError::ClockSkew { .. }))
        ));
    } else if nonce.is_empty() {
        assert_eq!(got, Err(VerifyError::Replay(ReplayError::EmptyNonce)));
    } else {
        let f = got.unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&wire));
        });
        assert!(same(&f), "{f:?}");
        assert!(verifier.verify(&wire, now + skew).is_err(), "replayed");
    }

    // Edits to the wire text: whatever still verifies is what was signed.
    let mut mutated = wire.clone();
    let mut rest = Input::new(inp.rest());
    for _ in 0..8 {
        if rest.rest().len() < 4 {
            break;
        }
        let at = usize::from(u16::from_le_bytes([rest.byte(), rest.byte()])) % (mutated.len() + 1);
        let op = rest.byte();
        let b = rest.byte();
        match op % 3 {
            0 if at < mutated.len() => mutated[at] = b,
            1 => mutated.insert(at, b),
            _ if at < mutated.len() => {
                mutated.remove(at);
            }
            _ => {}
        }
    }
    let mut verifier = Verifier::new(key(), binding);
    if let Ok(f) = verifier.verify(&mutated, now) {
        assert!(
            same(&f),
            "an edited frame verified with other contents: {}",
            String::from_utf8_lossy(&mutated)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::framing::{Decoded, Decoder, FrameError, Framing};
    use crate::refusal::RefusalCode;
    use std::path::Path;

    type Target = fn(&[u8]);

    const TARGETS: [(&str, Target); 4] = [
        ("ingest_msgpack", ingest_msgpack),
        ("ingest_json_lines", ingest_json_lines),
        ("canonical_json", canonical_json),
        ("inbound_frame", inbound_frame),
    ];

    /// Runs every file under `fuzz/<kind>/<target>/` through its target.
    fn replay(kind: &str) -> usize {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind);
        let mut n = 0;
        for (name, target) in TARGETS {
            let Ok(dir) = std::fs::read_dir(root.join(name)) else {
                continue;
            };
            let mut files: Vec<_> = dir.map(|e| e.expect("readable").path()).collect();
            files.sort();
            for path in files {
                let data = std::fs::read(&path).expect("readable");
                let r = std::panic::catch_unwind(|| target(&data));
                assert!(r.is_ok(), "{name} fails on {}", path.display());
                n += 1;
            }
        }
        n
    }

    #[test]
    fn seed_corpus_passes_every_target() {
        assert!(replay("seeds") >= 4 * 3, "the seed corpus is missing");
    }

    #[test]
    fn saved_regression_inputs_pass() {
        replay("regressions");
    }

    /// `fuzz/regressions/ingest_msgpack/nesting-deeper-than-json`: MessagePack
    /// messages nested deeper than JSON allows (128 levels) were accepted,
    /// up to rmp_serde's default of 1023 levels.
    #[test]
    fn msgpack_nesting_is_limited_like_json() {
        let message = |depth: usize| {
            let mut body = vec![0x82, 0xa4];
            body.extend_from_slice(b"type");
            body.push(0xa4);
            body.extend_from_slice(b"ping");
            body.push(0xa1);
            body.push(b'x');
            body.extend(std::iter::repeat_n(0x91, depth - 1)); // [[[...
            body.push(0xc0);
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        };
        // The outer map is one level: 128 in all decode, 129 do not.
        let mut d = Decoder::new(Framing::MsgPack, 1 << 20);
        d.feed(&message(128));
        d.feed(&message(129));
        d.feed(&message(1000));
        let ok = |item| matches!(item, Ok(Some(Decoded::Message(_))));
        let refused = |item| {
            matches!(
                item,
                Ok(Some(Decoded::Invalid(FrameError {
                    code: RefusalCode::BadMessage,
                    fatal: false,
                    ..
                })))
            )
        };
        assert!(ok(d.next_item()));
        assert!(refused(d.next_item()));
        assert!(refused(d.next_item()), "and the stream goes on");
        assert!(matches!(d.next_item(), Ok(None)));
        // The same limit as the protocol's JSON parser.
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(json::parse(nested(128).as_bytes()).is_ok());
        assert!(json::parse(nested(129).as_bytes()).is_err());
        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/regressions/ingest_msgpack/nesting-deeper-than-json"),
        )
        .unwrap();
        ingest_msgpack(&data);
    }

    /// 2^k, exactly, for every k a float can hold.
    fn pow2(k: i32) -> f64 {
        if k >= -1022 {
            f64::from_bits(((k + 1023) as u64) << 52)
        } else {
            f64::from_bits(1 << (k + 1074))
        }
    }

    /// `fuzz/regressions/ingest_msgpack/float-tie-next-to-power-of-two`:
    /// ±2^-24 (also what a MessagePack float32 2^-24 decodes to) was written
    /// `5.960464477539062e-08`, which reads back as the float below it.
    /// Python writes `5.960464477539063e-08`, so a brain frame holding this
    /// value failed its MAC check here, and an event holding it reached the
    /// brain one ULP off. Of all floats, only ±2^-24 was affected.
    #[test]
    fn float_ties_next_to_a_power_of_two_read_back_like_python() {
        let f = pow2(-24);
        let mut out = Vec::new();
        canonical::write_f64(f, &mut out).unwrap();
        assert_eq!(out, b"5.960464477539063e-08");
        // Every power of two reads back, normal and subnormal.
        for k in -1074..=1023 {
            let f = pow2(k);
            let mut out = Vec::new();
            canonical::write_f64(f, &mut out).unwrap();
            let text = std::str::from_utf8(&out).unwrap();
            assert_eq!(text.parse::<f64>().unwrap(), f, "2^{k} written {text}");
        }

        // A brain frame with the value, signed over Python's rendering.
        let b = fixed_binding();
        let ts = crate::protocol::format_ts(fixed_now());
        let canon = format!(
            r#"{{"agent_id":"{}","id":"c1","nonce":"n1","payload":{{"f":5.960464477539063e-08}},"project_id":"{}","seq":1,"session_id":"{}","ts":"{ts}","type":"command","v":2}}"#,
            b.agent_id, b.project_id, b.session_id
        );
        let hmac = mac_hex(&key(), canon.as_bytes());
        let wire = format!(
            r#"{{"v":2,"type":"command","id":"c1","ts":"{ts}","nonce":"n1","seq":1,"hmac":"{hmac}","payload":{{"f":5.960464477539063e-08}}}}"#
        );
        let frame = Verifier::new(key(), b)
            .verify(wire.as_bytes(), fixed_now())
            .unwrap();
        assert_eq!(frame.payload.get("f"), Some(&Value::Float(f)));

        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/regressions/ingest_msgpack/float-tie-next-to-power-of-two"),
        )
        .unwrap();
        ingest_msgpack(&data);
    }

    #[test]
    fn targets_take_empty_and_tiny_inputs() {
        for (_, target) in TARGETS {
            for data in [&b""[..], b"\0", b"{", b"\xff\xff\xff\xff", b"{}\n"] {
                target(data);
            }
        }
    }

    /// Writes the seed corpus: `Z4J_WRITE_FUZZ_SEEDS=1 cargo test --lib
    /// fuzzing::tests::write_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/seeds; run by hand when the message formats change"]
    fn write_seed_corpus() {
        if std::env::var_os("Z4J_WRITE_FUZZ_SEEDS").is_none() {
            return;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let write = |target: &str, name: &str, data: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        };
        let frame = |v: serde_json::Value| {
            let body = rmp_serde::to_vec_named(&v).unwrap();
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        };
        let event = serde_json::json!({
            "type": "event", "ack_id": 1, "engine": "celery", "kind": "task.received",
            "task_id": "7d9c2b1e-4f3a-4c2d-8e1f-0a1b2c3d4e5f",
            "occurred_at": "2026-11-22T23:29:59.5Z",
            "data": {"name": "app.tasks.add", "args": [1, 2.5, 1e-05], "kwargs": {"é": null},
                     "queue": "default", "retries": 0}
        });
        let batch = serde_json::json!({
            "type": "events", "ack_id": "b-1", "events": [
                {"engine": "rq", "kind": "task.started", "task_id": "a", "occurred_at": 1795390199.25,
                 "id": "0196f0a4-8c1e-7a2b-9c3d-4e5f60718293"},
                {"engine": "rq", "kind": "task.succeeded", "task_id": "a", "data": {"result": "ok"}},
                {"engine": "rq", "kind": "task.exploded", "task_id": "a"},
                {"engine": "celery", "kind": "worker.online", "data": {"worker": "w1"}},
                {"engine": "celery", "kind": "schedule.snapshot"},
                "not a map"
            ]
        });
        let control = serde_json::json!([
            {"type": "hello", "ack_id": 1, "process": "celery worker", "engines": ["celery"],
             "capabilities": {"celery": ["retry_task", "revoke_task"]}, "runtime_features": ["x"]},
            {"type": "ping", "ack_id": 2},
            {"type": "stats"},
            {"type": "command_result", "id": "702dab12-7228-46ba-bd76-4f47731d9b3b",
             "status": "success", "result": {"ok": true}},
            {"type": "nope"},
            {"no_type": 1}
        ]);

        let mut s = vec![0x00];
        s.extend(frame(event.clone()));
        write("ingest_msgpack", "event", &s);
        let mut s = vec![0x00];
        s.extend(frame(batch.clone()));
        write("ingest_msgpack", "events_batch", &s);
        let mut s = vec![0x00];
        for m in control.as_array().unwrap() {
            s.extend(frame(m.clone()));
        }
        write("ingest_msgpack", "control_messages", &s);
        let mut s = vec![0x80];
        s.extend(rmp_serde::to_vec_named(&event).unwrap());
        write("ingest_msgpack", "body_only", &s);
        let mut s = vec![0x05];
        s.extend(frame(event.clone()));
        s.extend([0, 0, 0, 1, 0xc1]);
        s.extend(frame(serde_json::json!({"type": "ping"})));
        s.extend(u32::MAX.to_be_bytes());
        write("ingest_msgpack", "small_limits_and_garbage", &s);

        let line = |v: &serde_json::Value| format!("{}\n", serde_json::to_string(v).unwrap());
        write(
            "ingest_json_lines",
            "event",
            format!("\0{}", line(&event)).as_bytes(),
        );
        write(
            "ingest_json_lines",
            "events_batch",
            format!("\0{}", line(&batch)).as_bytes(),
        );
        let mut s = String::from("\0");
        for m in control.as_array().unwrap() {
            s.push_str(&line(m));
        }
        write("ingest_json_lines", "control_messages", s.as_bytes());
        let s = format!(
            "\x05{{\"type\":\"ping\"}}\r\n\n   \n{{oops}}\n{}\n{}{{\"type\":\"ping\"",
            "x".repeat(100),
            line(&event)
        );
        write(
            "ingest_json_lines",
            "small_limits_and_garbage",
            s.as_bytes(),
        );

        write(
            "canonical_json",
            "nested",
            r#"{"b":{"z":1,"a":[{"y":null,"x":true}],"é":2,"Z":3,"e":4},"a":false,"":0,"😀":1,"\uffff":2,"~":4,"b":"dup"}"#.as_bytes(),
        );
        write(
            "canonical_json",
            "numbers",
            b"[0,-0,-1,9223372036854775807,-9223372036854775808,18446744073709551615,1.5,0.1,1e-05,1e16,1E2,-0.0,5e-324,1.7976931348623157e308,958010263072.0137,140737488355328.125,0.30000000000000004,123456789012345678]",
        );
        write(
            "canonical_json",
            "strings",
            br#"["plain","","\u0000\u0001\u001f\b\f\n\r\t","say \"hi\" \\ bye","a/b<\/script>","\u00e9\ud83d\ude00\u2028\u2029\u007f"]"#,
        );

        let v3 = r#"{"v": 2, "id": "eba_ev_00000000000000000000000000000001", "ts": "2026-11-22T23:30:00.200000Z", "type": "event_batch_ack", "nonce": "CCCCCCCCCCCCCCCCCCCCCC", "seq": 1, "hmac": "08c732f657a799dc2451bcb497c03ae13c621dde2e20114d9b07a9a134fe6697", "payload": {"acked_id": "ev_00000000000000000000000000000001", "received": 1, "accepted": 1, "rejected": 0}}"#;
        write("inbound_frame", "brain_ack", v3.as_bytes());
        let mut signer = Signer::new(key(), fixed_binding());
        let payload: Value = serde_json::from_str(
            r#"{"action":"retry_task","target":{"engine":"celery"},"parameters":{"eta":1763854200.5,"tiny":1e-05,"big":1e16},"timeout_seconds":30,"delivery_claim_token":"c"}"#,
        )
        .unwrap();
        let wire = signer.sign_value(
            "command",
            "702dab12-7228-46ba-bd76-4f47731d9b3b",
            &payload,
            fixed_now(),
            "n1",
        );
        write("inbound_frame", "signed_command", &wire);
        write(
            "inbound_frame",
            "hello_ack",
            br#"{"v":2,"id":"hack_4b602a5276dd","ts":"2026-11-22T23:26:42.129977Z","type":"hello_ack","payload":{"protocol_version":"2","session_id":"4b602a52-76dd-4606-aa84-406cdff8d4f9","max_frame_size_bytes":1048576}}"#,
        );
        // As a recipe: every envelope field well formed, then a few edits.
        write(
            "inbound_frame",
            "recipe",
            &[
                70, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, b'a', b'b', b'c', 4, b't', b'y', b'p', b'e',
                1, b'i', 2, b'n', b'1', 1, 70, 7, 2, 1, b'k', 5, 2, b'h', b'i', 10, 0, 1, 32,
            ],
        );
    }

    #[test]
    fn seeds_reach_the_interesting_paths() {
        // A valid event through each framing is accepted and stored.
        let body = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "event", "engine": "celery", "kind": "task.received", "task_id": "t-1",
            "data": {"args": [1, 2.5], "z": "é"}
        }))
        .unwrap();
        let mut stream = vec![0u8];
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
        ingest_msgpack(&stream);
        ingest_json_lines(
            b"\0{\"type\":\"event\",\"engine\":\"rq\",\"kind\":\"task.started\",\"task_id\":\"x\"}\n",
        );
    }
}
