//! The one JSON reader into [`Value`]: the brain's frames ([`parse`]) and
//! the local socket's JSON lines ([`parse_line`]) both go through it.
//!
//! Why our own: a frame's MAC covers what Python's `json.loads` makes of
//! it, re-written by `json.dumps`, so the reader must agree with
//! `json.loads` value for value, and anything it cannot carry that way must
//! be refused with a reason rather than changed. serde_json (built here
//! with `float_roundtrip`, so its floats are exact) differs from
//! `json.loads` where it matters: it reads an integer beyond 64 bits as a
//! float with its last digits gone, and `-0` as the float `-0.0` where
//! Python reads the integer 0. Floats are read with Rust's correctly
//! rounded `str::parse::<f64>`, as Python's `float()` reads them.
//!
//! Invariants:
//! * Accepts RFC 8259 JSON only (no NaN/Infinity literals, no raw control
//!   characters in strings, no trailing commas), like `json.loads` with
//!   `parse_constant` refusing NaN; a NaN or Infinity literal is refused
//!   with the fix (send null or a string).
//! * Refuses, rather than silently changes, what [`Value`] cannot hold the
//!   way Python would: integers outside `i64::MIN..=u64::MAX`, floats that
//!   overflow to infinity, lone UTF-16 surrogates.
//! * Nesting is capped at [`MAX_DEPTH`] so hostile input cannot exhaust the
//!   stack.
//! * An error names where it was found: the byte offset and the path of
//!   keys and indexes leading to it (`events[2].data.n`).

use super::value::Value;

/// Maximum nesting of arrays and objects.
pub const MAX_DEPTH: usize = 128;

/// Why the input is not acceptable JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// What is wrong.
    pub reason: &'static str,
    /// Byte offset into the input where it was noticed (for an integer out
    /// of range: where the integer starts).
    pub offset: usize,
    /// The keys and indexes leading to the value at fault, e.g.
    /// `events[2].data.n`; empty at the top level.
    pub path: String,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} at byte {}", self.reason, self.offset)
        } else {
            write!(f, "{} at {} (byte {})", self.reason, self.path, self.offset)
        }
    }
}

impl std::error::Error for JsonError {}

/// [`JsonError::reason`] for `NaN`, `Infinity` and `-Infinity`.
pub const NOT_FINITE: &str = "NaN and infinity are not JSON; send null or a string";

/// [`JsonError::reason`] for an integer no [`Value`] can hold.
pub const INTEGER_OUT_OF_RANGE: &str = "integer outside -2^63..2^64-1";

impl JsonError {
    /// Puts `key` (of the object that held the value at fault) in front of the path.
    fn under_key(mut self, key: &str) -> JsonError {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
        let head = if plain {
            key.to_string()
        } else {
            format!("[{}]", serde_json::to_string(key).unwrap_or_default())
        };
        self.path = match (self.path.is_empty(), self.path.starts_with('[')) {
            (true, _) => head,
            (false, true) => head + &self.path,
            (false, false) => format!("{head}.{}", self.path),
        };
        self
    }

    /// Puts `[index]` (of the array that held the value at fault) in front of the path.
    fn under_index(mut self, index: usize) -> JsonError {
        self.path = match (self.path.is_empty(), self.path.starts_with('[')) {
            (true, _) => format!("[{index}]"),
            (false, true) => format!("[{index}]{}", self.path),
            (false, false) => format!("[{index}].{}", self.path),
        };
        self
    }
}

/// Parses one JSON document (surrounding whitespace allowed).
pub fn parse(input: &[u8]) -> Result<Value, JsonError> {
    let text = std::str::from_utf8(input).map_err(|e| JsonError {
        reason: "invalid UTF-8",
        offset: e.valid_up_to(),
        path: String::new(),
    })?;
    let mut p = Parser {
        text,
        bytes: input,
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    let v = p.value()?;
    p.skip_ws();
    if p.pos != p.bytes.len() {
        return Err(p.err("trailing characters after the JSON value"));
    }
    Ok(v)
}

/// Parses one JSON line from a local client: the message, or the whole
/// error text for the client (`bad_message`).
///
/// Same reader as the brain's frames ([`parse`]), so both sides of the
/// daemon read a document the same way, and the way Python's `json.loads`
/// does: `-0` is the integer 0, and an integer no [`Value`] can hold is
/// refused, naming where it is and the fix (send it as a string), where a
/// float reader would keep it with its last digits gone. MessagePack cannot
/// carry such an integer at all, so both framings accept the same integers.
pub fn parse_line(line: &[u8]) -> Result<Value, String> {
    parse(line).map_err(|e| line_error(line, e))
}

/// The client's error text for a JSON line [`parse`] refused.
fn line_error(line: &[u8], e: JsonError) -> String {
    if e.reason != INTEGER_OUT_OF_RANGE {
        return format!("not a valid JSON object: {e}");
    }
    let digits: String = line[e.offset..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'-')
        .map(|&b| b as char)
        .collect();
    let shown = if digits.len() > 40 {
        format!("{}...", &digits[..40])
    } else {
        digits
    };
    let at = if e.path.is_empty() {
        "the top level".to_string()
    } else {
        e.path
    };
    format!(
        "the integer {shown} at {at} is outside -2^63..2^64-1, the integers z4j-agentd carries (as MessagePack does), and as a float it would lose digits; send it as a string (\"{shown}\")"
    )
}

struct Parser<'a> {
    /// Same bytes as `bytes`, already validated as UTF-8, so runs between
    /// ASCII delimiters can be sliced as `&str` without re-validation.
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> JsonError {
        JsonError {
            reason,
            offset: self.pos,
            path: String::new(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect_literal(&mut self, lit: &[u8], v: Value) -> Result<Value, JsonError> {
        if self.bytes[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            Ok(v)
        } else {
            Err(self.err("unexpected character"))
        }
    }

    fn value(&mut self) -> Result<Value, JsonError> {
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.expect_literal(b"true", Value::Bool(true)),
            Some(b'f') => self.expect_literal(b"false", Value::Bool(false)),
            Some(b'n') => self.expect_literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            // What Python's json.dumps writes for float('nan') / ('inf')
            // unless told not to; JSON has no such values.
            Some(b'N' | b'I') => Err(self.err(NOT_FINITE)),
            Some(_) => Err(self.err("unexpected character")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting deeper than 128 levels"));
        }
        self.pos += 1; // the opening bracket
        Ok(())
    }

    fn object(&mut self) -> Result<Value, JsonError> {
        self.enter()?;
        let mut entries = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Value::Map(entries));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected ':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let v = self.value().map_err(|e| e.under_key(&key))?;
            entries.push((key, v));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Value::Map(entries));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, JsonError> {
        self.enter()?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let index = items.len();
            items.push(self.value().map_err(|e| e.under_index(index))?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        let mut run = self.pos;
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            match b {
                b'"' => {
                    out.push_str(&self.text[run..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    out.push_str(&self.text[run..self.pos]);
                    self.pos += 1;
                    self.escape(&mut out)?;
                    run = self.pos;
                }
                0x00..=0x1f => return Err(self.err("control character in string")),
                _ => self.pos += 1,
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), JsonError> {
        let Some(b) = self.peek() else {
            return Err(self.err("unterminated string"));
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                if (0xD800..0xDC00).contains(&hi) {
                    if !self.bytes[self.pos..].starts_with(b"\\u") {
                        return Err(self.err("lone UTF-16 surrogate in string"));
                    }
                    self.pos += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(self.err("lone UTF-16 surrogate in string"));
                    }
                    let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    char::from_u32(cp).ok_or_else(|| self.err("invalid \\u escape"))?
                } else {
                    char::from_u32(hi).ok_or_else(|| self.err("lone UTF-16 surrogate in string"))?
                }
            }
            _ => {
                self.pos -= 1;
                return Err(self.err("invalid escape"));
            }
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let Some(digits) = self.bytes.get(self.pos..self.pos + 4) else {
            return Err(self.err("truncated \\u escape"));
        };
        let mut v = 0u32;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            v = (v << 4) | u32::from(n);
        }
        self.pos += 4;
        Ok(v)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            Some(b'I') => return Err(self.err(NOT_FINITE)),
            _ => return Err(self.err("invalid number")),
        }
        let mut is_float = false;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            is_float = true;
        }
        let text = &self.text[start..self.pos];
        if is_float {
            // Correctly rounded, like Python's float().
            let f: f64 = text.parse().map_err(|_| self.err("invalid number"))?;
            if !f.is_finite() {
                return Err(self.err("number too large for a float"));
            }
            Ok(Value::Float(f))
        } else if let Ok(i) = text.parse::<i64>() {
            Ok(Value::Int(i))
        } else if let (false, Ok(u)) = (negative, text.parse::<u64>()) {
            Ok(Value::UInt(u))
        } else {
            Err(JsonError {
                reason: INTEGER_OUT_OF_RANGE,
                offset: start,
                path: String::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::canonical;

    fn canon(json: &str) -> String {
        String::from_utf8(canonical::to_vec(&parse(json.as_bytes()).unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn floats_parse_exactly() {
        // serde_json's default parser gives ...0135 for the first one.
        // Expected: json.dumps(json.loads(x)) in Python 3.11.
        assert_eq!(canon("958010263072.0137"), "958010263072.0137");
        assert_eq!(
            canon("[0.00001, 10000000000000000.0, 1E2, -0.0, -0]"),
            "[1e-05,1e+16,100.0,-0.0,0]"
        );
        assert_eq!(canon("1763854200.123456"), "1763854200.123456");
        assert_eq!(canon("2.2250738585072011e-308"), "2.225073858507201e-308");
    }

    #[test]
    fn same_values_as_serde_for_ordinary_documents() {
        let doc = r#" {"a": [1, -2, 18446744073709551615, -9223372036854775808, true, false, null],
                       "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00\u2028", "o": {"k": {}} , "e": []} "#;
        let ours = parse(doc.as_bytes()).unwrap();
        let theirs: Value = serde_json::from_str(doc).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(
            canon(doc),
            "{\"a\":[1,-2,18446744073709551615,-9223372036854775808,true,false,null],\
             \"e\":[],\"o\":{\"k\":{}},\"s\":\"x\\\"\\\\/\\b\\f\\n\\r\\té😀\u{2028}\"}"
        );
    }

    #[test]
    fn refuses_what_python_would_not_produce_or_we_cannot_hold() {
        for bad in [
            "",
            " ",
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "18446744073709551616",
            "-9223372036854775809",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "[1,]",
            "{\"a\":1,}",
            "{a:1}",
            "\"\u{1}\"",
            "\"\\ud800\"",
            "\"\\ud800\\u0041\"",
            "\"\\udc00\"",
            "\"\\x\"",
            "\"abc",
            "[1] 2",
            "tru",
            "{\"a\" 1}",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse(b"\"\xff\"").is_err());
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err().reason,
            "nesting deeper than 128 levels"
        );
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn duplicate_keys_kept_last_wins() {
        let v = parse(br#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Int(2)));
        assert_eq!(canon(r#"{"a":1,"a":2}"#), r#"{"a":2}"#);
    }

    #[test]
    fn error_position() {
        let e = parse(br#"{"a": tru}"#).unwrap_err();
        assert_eq!(e.offset, 6);
        assert_eq!(e.to_string(), "unexpected character at a (byte 6)");
        let e = parse(br#"tru"#).unwrap_err();
        assert_eq!(e.to_string(), "unexpected character at byte 0");
    }

    #[test]
    fn errors_name_the_path_to_the_value() {
        let e = parse(br#"{"events":[{"a":1},{"data":{"n":123456789012345678901234567890}}]}"#)
            .unwrap_err();
        assert_eq!(e.reason, INTEGER_OUT_OF_RANGE);
        assert_eq!(e.path, "events[1].data.n");
        assert_eq!(e.offset, 32, "where the integer starts");
        let e = parse(br#"[[1, {"odd key.": [-99999999999999999999]}]]"#).unwrap_err();
        assert_eq!(e.path, r#"[0][1]["odd key."][0]"#);
    }

    #[test]
    fn a_line_with_an_integer_beyond_64_bits_is_refused_naming_the_field() {
        // serde_json alone reads it as 1.2345678901234568e29: digits lost.
        let line = br#"{"type":"event","data":{"n":123456789012345678901234567890}}"#;
        let v: Value = serde_json::from_slice(line).unwrap();
        assert!(matches!(
            v.get("data").and_then(|d| d.get("n")),
            Some(Value::Float(_))
        ));
        let msg = parse_line(line).unwrap_err();
        assert!(
            msg.contains("123456789012345678901234567890")
                && msg.contains("data.n")
                && msg.contains("send it as a string"),
            "{msg}"
        );
        for big in [
            "18446744073709551616",
            "-9223372036854775809",
            &"9".repeat(400),
        ] {
            let line = format!(r#"{{"type":"events","events":[{{}},{{"data":{{"x":[{big}]}}}}]}}"#);
            let msg = parse_line(line.as_bytes()).unwrap_err();
            assert!(msg.contains("events[1].data.x[0]"), "{big}: {msg}");
            assert!(msg.len() < 400, "the literal is shortened: {msg}");
        }
        // At the edges of the range, exact integers.
        let v = parse_line(br#"{"a":18446744073709551615,"b":-9223372036854775808}"#).unwrap();
        assert_eq!(v.get("a"), Some(&Value::UInt(u64::MAX)));
        assert_eq!(v.get("b"), Some(&Value::Int(i64::MIN)));
    }

    #[test]
    fn a_line_keeps_large_floats_and_reads_minus_zero_like_python() {
        let v =
            parse_line(br#"{"f":1e30,"g":-1.5e300,"h":12345678901234567890123.0,"z":-0,"y":-0.0}"#)
                .unwrap();
        assert_eq!(v.get("f"), Some(&Value::Float(1e30)));
        assert_eq!(v.get("g"), Some(&Value::Float(-1.5e300)));
        assert_eq!(v.get("h"), Some(&Value::Float(1.2345678901234568e22)));
        assert_eq!(v.get("z"), Some(&Value::Int(0)), "json.loads('-0') == 0");
        assert!(matches!(v.get("y"), Some(Value::Float(f)) if f.to_bits() == (-0.0f64).to_bits()));
        // A refused line says what is wrong and where.
        assert_eq!(
            parse_line(b"{\"a\":NaN}").unwrap_err(),
            "not a valid JSON object: NaN and infinity are not JSON; send null or a string at a (byte 5)"
        );
        assert_eq!(
            parse_line(b"{\"a\":[1,-Infinity]}").unwrap_err(),
            "not a valid JSON object: NaN and infinity are not JSON; send null or a string at a[1] (byte 9)"
        );
        assert_eq!(
            parse_line(b"{\"a\":1,}").unwrap_err(),
            "not a valid JSON object: expected a string key at byte 7"
        );
    }
}
