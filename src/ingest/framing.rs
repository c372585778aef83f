//! The two framings of the local socket, decided by a connection's first byte.
//!
//! * Native: a 4-byte big-endian length, then one MessagePack map.
//! * JSON lines: a connection whose first byte is `{` sends one JSON object
//!   per line (`\n`, optionally `\r\n`), so shell tools and stdlib-only
//!   Python can talk to the daemon.
//!
//! Invariant: memory per connection is bounded by `max_message_bytes` plus
//! one read buffer; a longer message is refused before it is buffered.

use crate::protocol::Value;

/// `rmp_serde`'s depth budget that allows [`crate::protocol::json::MAX_DEPTH`]
/// nested arrays and maps, like the protocol's JSON parser (its counter
/// refuses the level at which it reaches zero). Its default allows 1023: such
/// an event was stored and forwarded, and Python's `json.loads` on the brain
/// gives up at about 1,000 levels.
const MAX_MSGPACK_DEPTH: usize = crate::protocol::json::MAX_DEPTH + 1;

/// Which framing a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Length-prefixed MessagePack.
    MsgPack,
    /// One JSON object per line.
    JsonLines,
}

impl Framing {
    /// Decides from the first byte a client sent.
    pub fn detect(first: u8) -> Framing {
        if first == b'{' {
            Framing::JsonLines
        } else {
            Framing::MsgPack
        }
    }

    /// Label for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::MsgPack => "msgpack",
            Framing::JsonLines => "jsonl",
        }
    }

    /// Encodes one reply in this framing.
    pub fn encode(self, v: &Value) -> Vec<u8> {
        match self {
            Framing::MsgPack => {
                let body = rmp_serde::to_vec_named(v).unwrap_or_default();
                let mut out = Vec::with_capacity(body.len() + 4);
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(&body);
                out
            }
            Framing::JsonLines => {
                let mut out = serde_json::to_vec(v).unwrap_or_default();
                out.push(b'\n');
                out
            }
        }
    }
}

/// A framing-level problem. `fatal` ones end the connection because the
/// stream cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Stable code.
    pub code: &'static str,
    /// What to change.
    pub message: String,
    /// Whether the connection must close.
    pub fatal: bool,
}

/// One decoded item from the stream.
#[derive(Debug)]
pub enum Decoded {
    /// A message that decoded into a value.
    Message(Value),
    /// A complete message that could not be decoded; the stream goes on.
    Invalid(FrameError),
}

/// Incremental decoder over a connection's byte stream.
pub struct Decoder {
    framing: Framing,
    buf: Vec<u8>,
    start: usize,
    max_message_bytes: usize,
    /// JSON lines only: skipping the rest of an over-long line.
    skipping_line: bool,
}

impl Decoder {
    /// A decoder for one connection.
    pub fn new(framing: Framing, max_message_bytes: usize) -> Self {
        Decoder {
            framing,
            buf: Vec::with_capacity(16 * 1024),
            start: 0,
            max_message_bytes,
            skipping_line: false,
        }
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet decoded.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete item, `Ok(None)` when more bytes are needed, or a
    /// fatal error.
    pub fn next_item(&mut self) -> Result<Option<Decoded>, FrameError> {
        match self.framing {
            Framing::MsgPack => self.next_msgpack(),
            Framing::JsonLines => Ok(self.next_json()),
        }
    }

    fn next_msgpack(&mut self) -> Result<Option<Decoded>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max_message_bytes {
            return Err(FrameError {
                code: "message_too_large",
                message: format!(
                    "a message of {len} bytes was announced; the limit is {} bytes. Send events in smaller batches (the connection is closed because the stream cannot be resynchronised)",
                    self.max_message_bytes
                ),
                fatal: true,
            });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = &avail[4..4 + len];
        let mut de = rmp_serde::Deserializer::from_read_ref(body);
        de.set_max_depth(MAX_MSGPACK_DEPTH);
        let item = match <Value as serde::Deserialize>::deserialize(&mut de) {
            Ok(v) => Decoded::Message(v),
            Err(e) => Decoded::Invalid(FrameError {
                code: "bad_message",
                message: format!("not a valid MessagePack message: {e}"),
                fatal: false,
            }),
        };
        self.start += 4 + len;
        Ok(Some(item))
    }

    fn next_json(&mut self) -> Option<Decoded> {
        loop {
            let avail = &self.buf[self.start..];
            let Some(nl) = avail.iter().position(|&b| b == b'\n') else {
                if avail.len() > self.max_message_bytes {
                    // Drop what we have and ignore the rest of this line.
                    let was_skipping = self.skipping_line;
                    self.start = self.buf.len();
                    self.skipping_line = true;
                    if !was_skipping {
                        return Some(Decoded::Invalid(self.too_long()));
                    }
                }
                return None;
            };
            let line = &avail[..nl];
            self.start += nl + 1;
            if self.skipping_line {
                self.skipping_line = false;
                continue;
            }
            if line.len() > self.max_message_bytes {
                return Some(Decoded::Invalid(self.too_long()));
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(match crate::protocol::json::parse_line(line) {
                Ok(v) => Decoded::Message(v),
                Err(message) => Decoded::Invalid(FrameError {
                    code: "bad_message",
                    message,
                    fatal: false,
                }),
            });
        }
    }

    fn too_long(&self) -> FrameError {
        FrameError {
            code: "message_too_large",
            message: format!(
                "a line longer than {} bytes was skipped; send events in smaller batches",
                self.max_message_bytes
            ),
            fatal: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgpack_frame(v: &serde_json::Value) -> Vec<u8> {
        let body = rmp_serde::to_vec_named(v).unwrap();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    fn messages(d: &mut Decoder) -> Vec<Decoded> {
        let mut out = Vec::new();
        while let Some(x) = d.next_item().unwrap() {
            out.push(x);
        }
        out
    }

    #[test]
    fn detects_framing_from_first_byte() {
        assert_eq!(Framing::detect(b'{'), Framing::JsonLines);
        assert_eq!(Framing::detect(0), Framing::MsgPack);
    }

    #[test]
    fn msgpack_split_across_reads() {
        let frame = msgpack_frame(&serde_json::json!({"type":"ping"}));
        let mut d = Decoder::new(Framing::MsgPack, 1024);
        for b in &frame[..frame.len() - 1] {
            d.feed(std::slice::from_ref(b));
            assert!(d.next_item().unwrap().is_none());
        }
        d.feed(&frame[frame.len() - 1..]);
        match d.next_item().unwrap() {
            Some(Decoded::Message(v)) => assert_eq!(v.get("type").unwrap().as_str(), Some("ping")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn huge_length_prefix_is_fatal_before_buffering() {
        let mut d = Decoder::new(Framing::MsgPack, 1024);
        d.feed(&[0xff, 0xff, 0xff, 0xff]);
        let e = d.next_item().unwrap_err();
        assert!(e.fatal);
        assert_eq!(e.code, "message_too_large");
    }

    #[test]
    fn bad_msgpack_body_is_skipped_and_stream_goes_on() {
        let mut d = Decoder::new(Framing::MsgPack, 1024);
        d.feed(&[0, 0, 0, 1, 0xc1]); // 0xc1 is never valid MessagePack
        d.feed(&msgpack_frame(&serde_json::json!({"type":"ping"})));
        let got = messages(&mut d);
        assert!(matches!(&got[0], Decoded::Invalid(e) if e.code == "bad_message"));
        assert!(matches!(&got[1], Decoded::Message(_)));
    }

    #[test]
    fn msgpack_nan_and_int_keys_are_refused() {
        let mut d = Decoder::new(Framing::MsgPack, 1024);
        let nan =
            rmp_serde::to_vec(&(std::collections::BTreeMap::from([("x", f64::NAN)]))).unwrap();
        let mut f = (nan.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&nan);
        d.feed(&f);
        let int_key = rmp_serde::to_vec(&std::collections::BTreeMap::from([(1u8, "x")])).unwrap();
        let mut f = (int_key.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&int_key);
        d.feed(&f);
        let got = messages(&mut d);
        assert_eq!(got.len(), 2);
        for g in got {
            assert!(
                matches!(g, Decoded::Invalid(ref e) if e.code == "bad_message"),
                "{g:?}"
            );
        }
    }

    #[test]
    fn json_lines_with_crlf_blank_lines_and_garbage() {
        let mut d = Decoder::new(Framing::JsonLines, 1024);
        d.feed(b"{\"type\":\"ping\"}\r\n\n{oops}\n{\"type\":\"stats\"}\n{\"type\":");
        let got = messages(&mut d);
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Decoded::Message(_)));
        assert!(matches!(&got[1], Decoded::Invalid(_)));
        assert!(matches!(&got[2], Decoded::Message(_)));
        d.feed(b"\"ping\"}\n");
        assert!(matches!(d.next_item().unwrap(), Some(Decoded::Message(_))));
    }

    #[test]
    fn over_long_json_line_is_skipped_once_and_memory_stays_bounded() {
        let mut d = Decoder::new(Framing::JsonLines, 100);
        d.feed(&[b'a'; 150]);
        assert!(
            matches!(d.next_item().unwrap(), Some(Decoded::Invalid(ref e)) if e.code == "message_too_large")
        );
        assert_eq!(d.pending_bytes(), 0);
        d.feed(&[b'a'; 150]);
        assert!(
            d.next_item().unwrap().is_none(),
            "only one error per long line"
        );
        d.feed(b"aaa\n{\"type\":\"ping\"}\n");
        assert!(matches!(d.next_item().unwrap(), Some(Decoded::Message(_))));
    }
}
