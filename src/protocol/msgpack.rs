//! MessagePack read in place, and written straight out as canonical JSON.
//!
//! The ingest fast path (`ingest::fast`) reads the events of a message
//! with this instead of decoding the message into [`Value`](super::Value)s
//! first: no tree, no owned strings, one pass to check a value and one to
//! write it. It accepts exactly what the value decoder accepts, or less:
//! anything else ([`Unusual`]) sends the whole message back to the value
//! decoder, which decides and words the refusal. What it writes is
//! byte-for-byte what [`canonical`] writes for the decoded value (tests in
//! `ingest::fast` and the `ingest_msgpack` fuzz target compare the two).

use rmp::Marker;

use super::canonical;

/// An input this reader leaves to the value decoder: a binary or extension
/// value, a non-string key, a non-finite float, invalid UTF-8, nesting
/// past [`MAX_DEPTH`], truncated input, or output past its length limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unusual;

/// Deepest nesting read here, counted from the message (the message is
/// depth 1). The value decoder's own limit is deeper, so whatever is
/// deeper than this is left to it.
pub const MAX_DEPTH: usize = 64;

/// One MessagePack item: a scalar, or the header of a container whose
/// items follow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Token<'a> {
    /// `nil`.
    Nil,
    /// `true` or `false`.
    Bool(bool),
    /// A negative integer (or a signed encoding of any integer).
    Int(i64),
    /// A non-negative integer in an unsigned encoding.
    UInt(u64),
    /// A float (a 32-bit one widened, as the value decoder does); finite.
    Float(f64),
    /// A string, valid UTF-8.
    Str(&'a str),
    /// An array of this many items.
    Array(u32),
    /// A map of this many key-value pairs.
    Map(u32),
}

/// Maps up to this size are sorted on the stack.
const SMALL_MAP: usize = 32;

/// A position in a MessagePack buffer.
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Whether every byte was read.
    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Unusual> {
        let end = self.pos.checked_add(n).ok_or(Unusual)?;
        let s = self.buf.get(self.pos..end).ok_or(Unusual)?;
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, Unusual> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn str_of(&mut self, len: u64) -> Result<Token<'a>, Unusual> {
        let bytes = self.take(usize::try_from(len).map_err(|_| Unusual)?)?;
        std::str::from_utf8(bytes)
            .map(Token::Str)
            .map_err(|_| Unusual)
    }

    /// The next item.
    pub fn token(&mut self) -> Result<Token<'a>, Unusual> {
        let marker = Marker::from_u8(self.take(1)?[0]);
        Ok(match marker {
            Marker::Null => Token::Nil,
            Marker::True => Token::Bool(true),
            Marker::False => Token::Bool(false),
            Marker::FixPos(n) => Token::UInt(u64::from(n)),
            Marker::FixNeg(n) => Token::Int(i64::from(n)),
            Marker::U8 => Token::UInt(self.be(1)?),
            Marker::U16 => Token::UInt(self.be(2)?),
            Marker::U32 => Token::UInt(self.be(4)?),
            Marker::U64 => Token::UInt(self.be(8)?),
            Marker::I8 => Token::Int(i64::from(self.be(1)? as u8 as i8)),
            Marker::I16 => Token::Int(i64::from(self.be(2)? as u16 as i16)),
            Marker::I32 => Token::Int(i64::from(self.be(4)? as u32 as i32)),
            Marker::I64 => Token::Int(self.be(8)? as i64),
            Marker::F32 => finite(f64::from(f32::from_bits(self.be(4)? as u32)))?,
            Marker::F64 => finite(f64::from_bits(self.be(8)?))?,
            Marker::FixStr(n) => self.str_of(u64::from(n))?,
            Marker::Str8 => {
                let n = self.be(1)?;
                self.str_of(n)?
            }
            Marker::Str16 => {
                let n = self.be(2)?;
                self.str_of(n)?
            }
            Marker::Str32 => {
                let n = self.be(4)?;
                self.str_of(n)?
            }
            Marker::FixArray(n) => Token::Array(u32::from(n)),
            Marker::Array16 => Token::Array(self.be(2)? as u32),
            Marker::Array32 => Token::Array(self.be(4)? as u32),
            Marker::FixMap(n) => Token::Map(u32::from(n)),
            Marker::Map16 => Token::Map(self.be(2)? as u32),
            Marker::Map32 => Token::Map(self.be(4)? as u32),
            _ => return Err(Unusual),
        })
    }

    /// The next item, which must be a string (a map key, or a value that
    /// must be one).
    pub fn string(&mut self) -> Result<&'a str, Unusual> {
        match self.token()? {
            Token::Str(s) => Ok(s),
            _ => Err(Unusual),
        }
    }

    /// Reads past one value at nesting `depth`, checking it is one the
    /// value decoder accepts.
    pub fn skip(&mut self, depth: usize) -> Result<(), Unusual> {
        if depth > MAX_DEPTH {
            return Err(Unusual);
        }
        match self.token()? {
            Token::Array(n) => {
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
            }
            Token::Map(n) => {
                for _ in 0..n {
                    self.string()?;
                    self.skip(depth + 1)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Appends the canonical JSON of the value at nesting `depth` and reads
    /// past it; `Unusual` once `out` would pass `max_len` bytes.
    pub fn write_canonical(
        &mut self,
        out: &mut Vec<u8>,
        max_len: usize,
        depth: usize,
    ) -> Result<(), Unusual> {
        if depth > MAX_DEPTH {
            return Err(Unusual);
        }
        match self.token()? {
            Token::Nil => out.extend_from_slice(b"null"),
            Token::Bool(true) => out.extend_from_slice(b"true"),
            Token::Bool(false) => out.extend_from_slice(b"false"),
            Token::Int(i) => canonical::write_i64(i, out),
            Token::UInt(u) => canonical::write_u64(u, out),
            Token::Float(f) => canonical::write_f64(f, out).map_err(|_| Unusual)?,
            Token::Str(s) => {
                // Escapes only make it longer.
                if out.len().saturating_add(s.len()) > max_len {
                    return Err(Unusual);
                }
                canonical::write_str(s, out);
            }
            Token::Array(n) => {
                out.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.write_canonical(out, max_len, depth + 1)?;
                }
                out.push(b']');
            }
            Token::Map(n) => self.write_map(n, out, max_len, depth, &[])?,
        }
        within(out, max_len)
    }

    /// Appends the canonical JSON of the map at nesting `depth`, which must
    /// not have any of the keys `refused`, and reads past it.
    pub fn write_map_without(
        &mut self,
        out: &mut Vec<u8>,
        max_len: usize,
        depth: usize,
        refused: &[&str],
    ) -> Result<(), Unusual> {
        if depth > MAX_DEPTH {
            return Err(Unusual);
        }
        match self.token()? {
            Token::Map(n) => self.write_map(n, out, max_len, depth, refused)?,
            _ => return Err(Unusual),
        }
        within(out, max_len)
    }

    /// A map's entries in key order, the last of a duplicated key only (as
    /// the decoded value is written), in one pass: each `"key":value` is
    /// written in the order read, and only a map that was not in order
    /// already is put in order afterwards, from a copy of what was written.
    fn write_map(
        &mut self,
        n: u32,
        out: &mut Vec<u8>,
        max_len: usize,
        depth: usize,
        refused: &[&str],
    ) -> Result<(), Unusual> {
        let mut small = [("", 0usize, 0usize); SMALL_MAP];
        let mut large = Vec::new();
        let mut count = 0usize;
        let mut in_order = true;
        let mut previous: Option<&str> = None;
        out.push(b'{');
        let base = out.len();
        for i in 0..n as usize {
            let key = self.string()?;
            if refused.contains(&key) {
                return Err(Unusual);
            }
            if i > 0 {
                out.push(b',');
            }
            let start = out.len();
            canonical::write_str(key, out);
            out.push(b':');
            self.write_canonical(out, max_len, depth + 1)?;
            let entry = (key, start, out.len());
            in_order &= previous.is_none_or(|p| p < key);
            previous = Some(key);
            if count < SMALL_MAP {
                small[count] = entry;
            } else {
                large.push(entry);
            }
            count += 1;
        }
        if !in_order {
            let written = out[base..].to_vec();
            out.truncate(base);
            let mut entries: Vec<(&str, usize, usize)> = small[..count.min(SMALL_MAP)]
                .iter()
                .chain(large.iter())
                .map(|&(k, s, e)| (k, s - base, e - base))
                .collect();
            // Stable: of a duplicated key, the last stays last.
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let mut first = true;
            for (i, &(key, s, e)) in entries.iter().enumerate() {
                if entries.get(i + 1).is_some_and(|next| next.0 == key) {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&written[s..e]);
            }
        }
        out.push(b'}');
        Ok(())
    }
}

fn finite(f: f64) -> Result<Token<'static>, Unusual> {
    if f.is_finite() {
        Ok(Token::Float(f))
    } else {
        Err(Unusual)
    }
}

fn within(out: &[u8], max_len: usize) -> Result<(), Unusual> {
    if out.len() > max_len {
        Err(Unusual)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Value;

    fn msgpack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    fn transcoded(bytes: &[u8]) -> Result<Vec<u8>, Unusual> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        r.write_canonical(&mut out, usize::MAX, 1)?;
        assert!(r.at_end());
        Ok(out)
    }

    fn through_values(bytes: &[u8]) -> Vec<u8> {
        let v: Value = rmp_serde::from_slice(bytes).unwrap();
        canonical::to_vec(&v).unwrap()
    }

    #[test]
    fn writes_what_the_value_path_writes() {
        let v = serde_json::json!({
            "z": [1, -1, 0, 127, 128, -33, 65536, -2147483649i64, u64::MAX, i64::MIN],
            "a": {"é": "\u{0}\n\"\\ ünï", "b": null, "A": true, "": false},
            "f": [12.5, 1e-5, 1e16, -0.0, 129.95, 1.0],
            "m": "x",
        });
        let bytes = msgpack(&v);
        assert_eq!(transcoded(&bytes).unwrap(), through_values(&bytes));
    }

    #[test]
    fn f32_widens_like_the_value_decoder() {
        let bytes = rmp_serde::to_vec(&1.1f32).unwrap();
        assert_eq!(transcoded(&bytes).unwrap(), through_values(&bytes));
        assert_eq!(transcoded(&bytes).unwrap(), b"1.100000023841858");
    }

    #[test]
    fn duplicate_keys_keep_the_last_and_large_maps_sort() {
        // {"b": 1, "a": 2, "b": 3} by hand: serde_json cannot hold duplicates.
        let mut bytes = vec![0x83];
        for (k, v) in [("b", 1u8), ("a", 2), ("b", 3)] {
            bytes.push(0xa1);
            bytes.extend_from_slice(k.as_bytes());
            bytes.push(v);
        }
        assert_eq!(transcoded(&bytes).unwrap(), br#"{"a":2,"b":3}"#);
        assert_eq!(transcoded(&bytes).unwrap(), through_values(&bytes));
        let big: serde_json::Map<String, serde_json::Value> = (0..100)
            .rev()
            .map(|i| (format!("k{i}"), i.into()))
            .collect();
        let bytes = msgpack(&serde_json::Value::Object(big));
        assert_eq!(transcoded(&bytes).unwrap(), through_values(&bytes));
    }

    #[test]
    fn leaves_to_the_value_decoder_what_it_would_refuse_or_not_reach() {
        let nan = rmp_serde::to_vec(&f64::NAN).unwrap();
        let inf32 = rmp_serde::to_vec(&f32::INFINITY).unwrap();
        let bin = [0xc4, 0x01, 0x00];
        let ext = [0xd4, 0x01, 0x00];
        let int_key = [0x81, 0x01, 0x02];
        let bad_utf8 = [0xa1, 0xff];
        let truncated = [0x92, 0x01];
        let reserved = [0xc1];
        for input in [
            &nan[..],
            &inf32,
            &bin,
            &ext,
            &int_key,
            &bad_utf8,
            &truncated,
            &reserved,
        ] {
            assert_eq!(transcoded(input), Err(Unusual), "{input:?}");
            assert_eq!(Reader::new(input).skip(1), Err(Unusual), "{input:?}");
        }
        let mut deep = vec![0x91; MAX_DEPTH];
        deep.push(0xc0);
        assert_eq!(transcoded(&deep), Err(Unusual));
        let fits = &deep[1..];
        assert_eq!(transcoded(fits).unwrap(), through_values(fits));
    }

    #[test]
    fn stops_at_the_length_limit() {
        let bytes = msgpack(&serde_json::json!({"a": "x".repeat(100), "b": [1, 2, 3]}));
        let full = through_values(&bytes);
        let mut out = Vec::new();
        assert_eq!(
            Reader::new(&bytes).write_canonical(&mut out, full.len() - 1, 1),
            Err(Unusual)
        );
        let mut out = Vec::new();
        Reader::new(&bytes)
            .write_canonical(&mut out, full.len(), 1)
            .unwrap();
        assert_eq!(out, full);
    }
}
