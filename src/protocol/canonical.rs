//! Canonical JSON: byte-exact Python
//! `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`.
//!
//! This is what both sides HMAC (`docs/brain-protocol.md`, "Signing" and
//! "Canonical JSON"), so a single differing byte means a rejected frame.
//! Why our own: serde_json's compact writer matches Python for strings,
//! integers, booleans and null, but not for floats (`1e-5` and `1e16` where
//! Python writes `1e-05` and `1e+16`), it does not sort a map it was given
//! in order, and it would write a duplicated key twice. Invariants:
//! * map keys sorted by code point (= UTF-8 byte order) at every depth; for a
//!   duplicated key only the last occurrence is written (Python's dict would
//!   have kept only that one);
//! * strings escape only `"`, `\` and U+0000..U+001F (lowercase `\u00xx`
//!   except the five short forms); everything else is raw UTF-8;
//! * floats are Python `repr(float)`; NaN and infinities are refused, never
//!   written as something the brain would not sign;
//! * no whitespace.
//!
//! Writers append to a caller-owned `Vec<u8>` and allocate nothing per value
//! except for sorting maps with more than `SMALL_MAP` entries.

use std::fmt::Write as _;

use super::value::Value;

/// Why a value cannot be rendered canonically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// A float was NaN or ±infinity, which Python's `allow_nan=False` refuses.
    #[error(
        "NaN and infinity cannot be signed (Python json allow_nan=False); send null or a string"
    )]
    NonFinite,
    /// The rendering would pass the length given to [`write_value_within`].
    #[error("the value is longer than allowed once encoded")]
    TooLong,
}

/// How a value is written: whether non-finite floats become `null`, and
/// the length `out` may reach.
#[derive(Clone, Copy)]
struct Mode {
    lossy: bool,
    max_len: usize,
}

impl Mode {
    const STRICT: Mode = Mode {
        lossy: false,
        max_len: usize::MAX,
    };

    fn check(self, out: &[u8]) -> Result<(), CanonicalError> {
        if out.len() > self.max_len {
            Err(CanonicalError::TooLong)
        } else {
            Ok(())
        }
    }
}

/// Maps up to this size are sorted in a stack buffer (no allocation).
const SMALL_MAP: usize = 32;

/// Renders `v` canonically and returns the bytes.
pub fn to_vec(v: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(128);
    write_value(v, &mut out)?;
    Ok(out)
}

/// Appends the canonical rendering of `v` to `out`.
///
/// On error `out` holds a partial rendering; callers discard it.
pub fn write_value(v: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    write_any(v, out, Mode::STRICT)
}

/// Like [`write_value`], but stops with [`CanonicalError::TooLong`] as soon
/// as `out` would grow past `max_len` bytes: a value far over a limit is
/// refused without being copied out in full first (a string longer than
/// the room left is refused before it is written).
pub fn write_value_within(
    v: &Value,
    out: &mut Vec<u8>,
    max_len: usize,
) -> Result<(), CanonicalError> {
    let mode = Mode {
        lossy: false,
        max_len,
    };
    write_any(v, out, mode)?;
    mode.check(out)
}

/// Like [`write_value`] but writes non-finite floats as `null` instead of
/// failing. Only for values built in code (decoded values are always
/// finite), where the sender would rather send `null` than nothing; the wire
/// then carries the same `null` that was signed, so the frame stays valid.
pub(crate) fn write_value_lossy(v: &Value, out: &mut Vec<u8>) {
    // Cannot fail in lossy mode without a length limit.
    let _ = write_any(
        v,
        out,
        Mode {
            lossy: true,
            max_len: usize::MAX,
        },
    );
}

fn write_any(v: &Value, out: &mut Vec<u8>, mode: Mode) -> Result<(), CanonicalError> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(i) => write_i64(*i, out),
        Value::UInt(u) => write_u64(*u, out),
        Value::Float(f) => match write_f64(*f, out) {
            Err(_) if mode.lossy => out.extend_from_slice(b"null"),
            r => r?,
        },
        Value::Str(s) => {
            // Escapes only make it longer.
            if out.len().saturating_add(s.len()) > mode.max_len {
                return Err(CanonicalError::TooLong);
            }
            write_str(s, out)
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_any(item, out, mode)?;
                mode.check(out)?;
            }
            out.push(b']');
        }
        Value::Map(entries) => write_map(entries, out, mode)?,
    }
    Ok(())
}

fn write_map(
    entries: &[(String, Value)],
    out: &mut Vec<u8>,
    mode: Mode,
) -> Result<(), CanonicalError> {
    let n = entries.len();
    if n <= SMALL_MAP {
        let mut idx = [0u32; SMALL_MAP];
        for (i, slot) in idx.iter_mut().enumerate().take(n) {
            *slot = i as u32;
        }
        let idx = &mut idx[..n];
        // Insertion sort: stable (keeps duplicate keys in insertion order so
        // the last one is last) and linear on already-sorted input, which is
        // the common case for values we built ourselves.
        for i in 1..n {
            let mut j = i;
            while j > 0 && entries[idx[j - 1] as usize].0 > entries[idx[j] as usize].0 {
                idx.swap(j - 1, j);
                j -= 1;
            }
        }
        write_sorted_entries(entries, idx, out, mode)
    } else {
        let mut idx: Vec<u32> = (0..n as u32).collect();
        // `sort_by` is stable, which the duplicate rule relies on.
        idx.sort_by(|&a, &b| entries[a as usize].0.cmp(&entries[b as usize].0));
        write_sorted_entries(entries, &idx, out, mode)
    }
}

fn write_sorted_entries(
    entries: &[(String, Value)],
    idx: &[u32],
    out: &mut Vec<u8>,
    mode: Mode,
) -> Result<(), CanonicalError> {
    out.push(b'{');
    let mut first = true;
    for (pos, &i) in idx.iter().enumerate() {
        let (key, value) = &entries[i as usize];
        if let Some(&next) = idx.get(pos + 1) {
            if entries[next as usize].0 == *key {
                continue; // a later duplicate overrides this one
            }
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(key, out);
        out.push(b':');
        write_any(value, out, mode)?;
        mode.check(out)?;
    }
    out.push(b'}');
    Ok(())
}

/// 0 = copy as is; `u` = `\u00xx`; anything else = backslash + that byte.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a canonical JSON string literal (with the quotes).
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // Bytes >= 0x80 never need escaping, so scanning bytes instead of
        // chars is safe and lets runs be copied verbatim.
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        if start < i {
            out.extend_from_slice(&bytes[start..i]);
        }
        if esc == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX_LOWER[(b >> 4) as usize],
                HEX_LOWER[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends a signed integer in plain decimal.
pub fn write_i64(i: i64, out: &mut Vec<u8>) {
    if i < 0 {
        out.push(b'-');
    }
    write_u64(i.unsigned_abs(), out);
}

/// Appends an unsigned integer in plain decimal.
pub fn write_u64(mut u: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut pos = buf.len();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[pos..]);
}

/// A fixed-size `fmt::Write` sink so float formatting does not allocate.
struct StackBuf {
    buf: [u8; 40],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Appends `f` as Python `repr(float)` would write it.
///
/// Digits are the shortest that round-trip, and among those the closest to
/// the exact value, ties to even (David Gay's `dtoa` mode 0, which Python
/// uses). Rust's `{:e}` gives the same digits except that it breaks exact
/// ties upwards, which `round_half_even` corrects. The layout follows
/// Python: positional with at least one fractional digit when the decimal
/// exponent is in `-4..16`, otherwise `d[.ddd]e±XX`.
pub fn write_f64(f: f64, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    if !f.is_finite() {
        return Err(CanonicalError::NonFinite);
    }
    let d = Digits::of(f);
    let mut digit_buf = [0u8; 20];
    let digits = d.ascii(&mut digit_buf);
    if f.is_sign_negative() {
        out.push(b'-');
    }
    if (-4..16).contains(&d.exp) {
        write_positional(digits, d.exp, out);
    } else {
        write_scientific(digits, d.exp, out);
    }
    Ok(())
}

/// The shortest round-tripping decimal digits of a float's magnitude, as
/// Python picks them: `value` holds `n` digits, the first at 10^`exp`.
struct Digits {
    value: u64,
    n: u32,
    exp: i32,
}

impl Digits {
    /// Rust's `{:e}` digits of `f` (finite), with exact ties moved to even.
    fn of(f: f64) -> Digits {
        let mut sci = StackBuf {
            buf: [0; 40],
            len: 0,
        };
        // Longest possible output is "-2.2250738585072014e-308" (24 bytes).
        write!(sci, "{:e}", f.abs()).expect("f64 {:e} fits in 40 bytes");
        let sci = &sci.buf[..sci.len];
        let e_pos = sci
            .iter()
            .position(|&b| b == b'e')
            .expect("{:e} output has an exponent");
        // Mantissa is "d" or "d.ddd": at most 17 significant digits.
        let mut value: u64 = 0;
        let mut n: u32 = 0;
        for &b in &sci[..e_pos] {
            if b != b'.' {
                value = value * 10 + u64::from(b - b'0');
                n += 1;
            }
        }
        let exp_text = &sci[e_pos + 1..];
        let (exp_negative, exp_digits) = match exp_text.split_first() {
            Some((b'-', d)) => (true, d),
            _ => (false, exp_text),
        };
        let mut exp: i32 = 0;
        for &b in exp_digits {
            exp = exp * 10 + i32::from(b - b'0');
        }
        if exp_negative {
            exp = -exp;
        }
        let (value, n, exp) = round_half_even(f.abs(), value, n, exp);
        Digits { value, n, exp }
    }

    /// The digits as ASCII, in `buf`.
    fn ascii<'b>(&self, buf: &'b mut [u8; 20]) -> &'b [u8] {
        let mut v = self.value;
        let mut pos = self.n as usize;
        while pos > 0 {
            pos -= 1;
            buf[pos] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        &buf[..self.n as usize]
    }
}

/// `123.45`, `100.0`, `0.00012`: Python's layout for exponents in `-4..16`,
/// always with a fractional digit.
fn write_positional(digits: &[u8], exp: i32, out: &mut Vec<u8>) {
    let n = digits.len();
    if exp < 0 {
        out.extend_from_slice(b"0.");
        out.resize(out.len() + (-exp - 1) as usize, b'0');
        out.extend_from_slice(digits);
        return;
    }
    let int_len = exp as usize + 1;
    if n <= int_len {
        out.extend_from_slice(digits);
        out.resize(out.len() + (int_len - n), b'0');
        out.extend_from_slice(b".0");
    } else {
        out.extend_from_slice(&digits[..int_len]);
        out.push(b'.');
        out.extend_from_slice(&digits[int_len..]);
    }
}

/// `1e+16`, `2.5e-05`: Python's layout elsewhere, the exponent signed and
/// at least two digits.
fn write_scientific(digits: &[u8], exp: i32, out: &mut Vec<u8>) {
    out.push(digits[0]);
    if digits.len() > 1 {
        out.push(b'.');
        out.extend_from_slice(&digits[1..]);
    }
    out.push(b'e');
    out.push(if exp < 0 { b'-' } else { b'+' });
    let abs = exp.unsigned_abs();
    if abs < 10 {
        out.push(b'0');
    }
    write_u64(u64::from(abs), out);
}

/// Rust's shortest formatting resolves an exact tie between two shortest
/// candidates upwards; Python's resolves it to the even last digit. Given
/// Rust's digits (`value`, `n` digits, first digit at 10^`exp`) for `abs`,
/// returns Python's.
fn round_half_even(abs: f64, value: u64, n: u32, exp: i32) -> (u64, u32, i32) {
    // Decimal exponent of the last digit.
    let k = exp - (n as i32 - 1);
    let lower = if value >= 2 && is_exact_midpoint(abs, value - 1, k) {
        value - 1
    } else if is_exact_midpoint(abs, value, k) {
        value
    } else {
        return (value, n, exp);
    };
    let mut chosen = if lower % 2 == 0 { lower } else { lower + 1 };
    // Next to a power of two the gap below is half the gap above, so the
    // even candidate can fall outside what reads back as `abs` (2^-24: the
    // tie ...062e-08 / ...063e-08 is exact, but only ...063 reads back).
    // Python returns only digits that read back; so do Rust's.
    if chosen != value && !reads_back(abs, chosen, k) {
        return (value, n, exp);
    }
    let (mut n, mut exp) = (n, exp);
    // A carry (…9 -> 10…) or a trailing zero would make a shorter string,
    // which shortest formatting would already have produced; normalise
    // anyway so the output is well formed whatever happens.
    if chosen == 10u64.pow(n) {
        chosen /= 10;
        exp += 1;
        // `n` stays: the digit count of `chosen` is unchanged.
    }
    while n > 1 && chosen % 10 == 0 {
        chosen /= 10;
        n -= 1;
    }
    (chosen, n, exp)
}

/// `true` if `digits * 10^k` parses to exactly `abs`.
fn reads_back(abs: f64, digits: u64, k: i32) -> bool {
    let mut text = StackBuf {
        buf: [0; 40],
        len: 0,
    };
    // At most 20 digits, `e` and a 5-character exponent.
    write!(text, "{digits}e{k}").expect("fits in 40 bytes");
    std::str::from_utf8(&text.buf[..text.len])
        .ok()
        .and_then(|t| t.parse::<f64>().ok())
        == Some(abs)
}

/// `true` if `abs` is exactly `(lower + 1/2) * 10^k`.
fn is_exact_midpoint(abs: f64, lower: u64, k: i32) -> bool {
    // abs = m * 2^g with m odd.
    let bits = abs.to_bits();
    let biased = (bits >> 52) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    let (mut m, mut g) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), biased - 1075)
    };
    if m == 0 {
        return false;
    }
    let tz = m.trailing_zeros();
    m >>= tz;
    g += tz as i32;

    // Midpoint = (2*lower + 1) * 5^k * 2^(k-1), with 2*lower + 1 odd.
    let odd = u128::from(lower) * 2 + 1;
    let pow5 = |e: u32| 5u128.checked_pow(e);
    if k >= 0 {
        // Equal iff the powers of two match and m == odd * 5^k.
        g == k - 1
            && pow5(k as u32)
                .and_then(|p| p.checked_mul(odd))
                .is_some_and(|rhs| rhs == u128::from(m))
    } else {
        // m * 2^g == odd / (5^-k * 2^(1-k))  <=>  g == k - 1 and m * 5^-k == odd.
        g == k - 1
            && pow5(k.unsigned_abs())
                .and_then(|p| p.checked_mul(u128::from(m)))
                .is_some_and(|lhs| lhs == odd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_limit_stops_the_writer_exactly_past_it() {
        let v: Value = serde_json::from_str(
            r#"{"b":[1,2.5,"x\u0001y",null,{"z":true,"a":"\u00e9"}],"a":"aaaa","a":"short"}"#,
        )
        .unwrap();
        let whole = to_vec(&v).unwrap();
        let within = |max: usize| {
            let mut out = Vec::new();
            write_value_within(&v, &mut out, max).map(|()| out)
        };
        assert_eq!(within(whole.len()).unwrap(), whole);
        for max in 0..whole.len() {
            assert_eq!(within(max), Err(CanonicalError::TooLong), "{max}");
        }
        // An overridden duplicate is not written, so it does not count.
        let dup: Value =
            serde_json::from_str(&format!(r#"{{"a":"{}","a":1}}"#, "x".repeat(10_000))).unwrap();
        let mut out = Vec::new();
        write_value_within(&dup, &mut out, 16).unwrap();
        assert_eq!(out, b"{\"a\":1}");
        // A long string is refused before it is copied.
        let long = Value::Str("y".repeat(1 << 20));
        let mut out = Vec::new();
        assert_eq!(
            write_value_within(&long, &mut out, 1000),
            Err(CanonicalError::TooLong)
        );
        assert!(out.capacity() < 1000, "{}", out.capacity());
    }

    fn f(x: f64) -> String {
        let mut out = Vec::new();
        write_f64(x, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn s(x: &str) -> String {
        let mut out = Vec::new();
        write_str(x, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn canon_json(json: &str) -> String {
        let v: Value = serde_json::from_str(json).unwrap();
        String::from_utf8(to_vec(&v).unwrap()).unwrap()
    }

    #[test]
    fn floats_like_python_repr() {
        // Expected strings produced by Python 3.11 repr(float).
        let cases: &[(f64, &str)] = &[
            (1e-05, "1e-05"),
            (1e16, "1e+16"),
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (1e-07, "1e-07"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (2.5, "2.5"),
            (100.0, "100.0"),
            (-1.5e300, "-1.5e+300"),
            (1.5e300, "1.5e+300"),
            (0.00012345, "0.00012345"),
            (1.2345e-05, "1.2345e-05"),
            (9999999999999998.0, "9999999999999998.0"),
            (1e15, "1000000000000000.0"),
            (1.7e-10, "1.7e-10"),
            (1e100, "1e+100"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
            (1763854200.123456, "1763854200.123456"),
            (0.3, "0.3"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-123.456, "-123.456"),
            // Exact ties between two shortest candidates: Python picks the
            // even digit (Rust's `{:e}` alone would give ...63, ...3, ...13).
            (f64::from_bits(0xc2ea97257f2320b4), "-233891771783429.62"),
            (f64::from_bits(0x431d2f16d00751c1), "2053637337633904.2"),
            // 2^47 + k/8: exactly representable, so each is a true tie.
            (2f64.powi(47) + 0.125, "140737488355328.12"),
            (2f64.powi(47) + 0.375, "140737488355328.38"),
            (2f64.powi(47) + 0.625, "140737488355328.62"),
            (2f64.powi(47) + 0.875, "140737488355328.88"),
        ];
        for &(x, want) in cases {
            assert_eq!(f(x), want, "repr of {x:e}");
        }
    }

    #[test]
    fn non_finite_refused() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                write_f64(x, &mut Vec::new()),
                Err(CanonicalError::NonFinite)
            );
            let v = Value::Array(vec![Value::Float(x)]);
            assert_eq!(to_vec(&v), Err(CanonicalError::NonFinite));
            let mut out = Vec::new();
            write_value_lossy(&v, &mut out);
            assert_eq!(out, b"[null]");
        }
    }

    #[test]
    fn string_escapes_like_python() {
        // json.dumps(x, ensure_ascii=False) for each input.
        assert_eq!(s("plain"), r#""plain""#);
        assert_eq!(s(""), r#""""#);
        assert_eq!(s("é"), "\"é\"");
        assert_eq!(s("🎉 ok"), "\"🎉 ok\"");
        assert_eq!(s("a\u{2028}b\u{2029}"), "\"a\u{2028}b\u{2029}\"");
        assert_eq!(s("\u{7f}"), "\"\u{7f}\"");
        assert_eq!(s("\u{1f}"), r#""\u001f""#);
        assert_eq!(s("\u{0}\u{1}\u{b}\u{1a}"), r#""\u0000\u0001\u000b\u001a""#);
        assert_eq!(s("\u{8}\u{c}\n\r\t"), r#""\b\f\n\r\t""#);
        assert_eq!(s(r#"say "hi" \ bye"#), r#""say \"hi\" \\ bye""#);
        assert_eq!(s("a/b</script>"), r#""a/b</script>""#);
        assert_eq!(s("x\"é\n🎉\\"), "\"x\\\"é\\n🎉\\\\\"");
    }

    #[test]
    fn nested_keys_sorted_at_every_depth() {
        // python3 -c 'import json;print(json.dumps(json.loads(S), sort_keys=True,
        //   separators=(",",":"), ensure_ascii=False))'
        assert_eq!(
            canon_json(
                r#"{"b":{"z":1,"a":[{"y":null,"x":true}],"é":2,"Z":3,"e":4},"a":false,"":0}"#
            ),
            r#"{"":0,"a":false,"b":{"Z":3,"a":[{"x":true,"y":null}],"e":4,"z":1,"é":2}}"#
        );
        // Code point order == UTF-8 byte order, including astral vs BMP.
        assert_eq!(
            canon_json(r#"{"😀":1,"\uffff":2,"é":3,"~":4}"#),
            "{\"~\":4,\"é\":3,\"\u{ffff}\":2,\"😀\":1}"
        );
    }

    #[test]
    fn scalars_and_integers() {
        assert_eq!(
            canon_json(
                r#"[null,true,false,0,-1,9223372036854775807,-9223372036854775808,18446744073709551615,1.5,"x",[],{}]"#
            ),
            r#"[null,true,false,0,-1,9223372036854775807,-9223372036854775808,18446744073709551615,1.5,"x",[],{}]"#
        );
        // Python json.loads("1E2") is the float 100.0.
        assert_eq!(canon_json("1E2"), "100.0");
    }

    #[test]
    fn duplicate_keys_last_wins() {
        // Python: json.loads('{"b":1,"a":1,"b":2}') == {"b":2,"a":1}
        assert_eq!(canon_json(r#"{"b":1,"a":1,"b":2}"#), r#"{"a":1,"b":2}"#);
    }

    #[test]
    fn large_map_sorted() {
        let v: Value = (0..100)
            .rev()
            .map(|i| (format!("k{i:03}"), Value::from(i as i64)))
            .collect();
        let text = String::from_utf8(to_vec(&v).unwrap()).unwrap();
        assert!(text.starts_with(r#"{"k000":0,"k001":1,"#));
        assert!(text.ends_with(r#""k099":99}"#));
        let mut dup = v.clone();
        if let Value::Map(m) = &mut dup {
            m.push(("k050".into(), Value::from("last")));
        }
        let text = String::from_utf8(to_vec(&dup).unwrap()).unwrap();
        assert!(text.contains(r#""k049":49,"k050":"last","k051":51"#));
    }
}
