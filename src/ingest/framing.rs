//! The two framings of the local socket, decided by a connection's first byte.
//!
//! * Native: a 4-byte big-endian length, then one MessagePack map.
//! * JSON lines: a connection whose first byte is `{` sends one JSON object
//!   per line (`\n`, optionally `\r\n`), so shell tools and stdlib-only
//!   Python can talk to the daemon.
//!
//! Invariants:
//! * the buffer holds at most one message not yet whole (`max_message_bytes`,
//!   plus one read for JSON lines); a longer message is refused before it
//!   is buffered, and the rest of a JSON line too long is dropped as it
//!   arrives;
//! * finding where a message ends costs time linear in the bytes received,
//!   however they are split into reads.

use super::decision::Handled;
use crate::protocol::Value;
use crate::refusal::RefusalCode;

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
    pub code: RefusalCode,
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
    /// A message the fast path given to [`Decoder::next_item_with`]
    /// handled without decoding it into a value.
    Handled(Box<Handled>),
}

/// Incremental decoder over a connection's byte stream.
///
/// Its buffer is the connection's only input buffer: the connection reads
/// straight into it ([`Decoder::prepare_read`], [`Decoder::buffer_mut`]),
/// after [`Decoder::wanted_capacity`] says how large it must be, so what a
/// connection holds is exactly [`Decoder::capacity`].
pub struct Decoder {
    framing: Framing,
    buf: Vec<u8>,
    start: usize,
    /// JSON lines: bytes from `start` on already searched for a newline
    /// (none there), so the search resumes after them instead of rescanning
    /// the line from its start on every read.
    scanned: usize,
    /// Bytes searched for a newline since the decoder was made.
    scanned_total: u64,
    max_message_bytes: usize,
    /// JSON lines only: skipping the rest of an over-long line.
    skipping_line: bool,
}

impl Decoder {
    /// A decoder for one connection.
    pub fn new(framing: Framing, max_message_bytes: usize) -> Self {
        Decoder {
            framing,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            scanned_total: 0,
            max_message_bytes,
            skipping_line: false,
        }
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Drops the bytes of the messages already decoded. Each byte is moved
    /// at most once: only the start of a message not yet whole is moved,
    /// and it stays at the front until that message is decoded.
    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else if self.start > 0 {
            self.buf.drain(..self.start);
        }
        self.start = 0;
    }

    /// Bytes received but not yet decoded.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes of memory the buffer holds (its capacity).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes searched for a newline so far (JSON lines): linear in the
    /// bytes received, however a line is split into reads.
    pub fn scanned_bytes(&self) -> u64 {
        self.scanned_total
    }

    /// The capacity the buffer needs before the next read, given that up
    /// to `free` bytes cost nothing extra and that a read takes up to
    /// `read_size` bytes (when more is needed than `free`). Call it once
    /// [`Decoder::next_item`] has returned `Ok(None)`.
    ///
    /// * A message that fits in `free` bytes never needs more than `free`.
    /// * MessagePack: a longer message needs exactly its announced length
    ///   (already checked against the limit).
    /// * JSON lines: a line that fills `free` bytes without a newline
    ///   doubles the buffer each time it is nearly full (less than a
    ///   quarter of a read left), up to the limit plus one read (past the
    ///   limit, the line is skipped and the buffer emptied). Doubling keeps
    ///   the copies linear in the line's length.
    pub fn wanted_capacity(&self, free: usize, read_size: usize) -> usize {
        let pending = self.pending_bytes();
        // Room once the decoded bytes before `start` are dropped.
        let capacity = self.buf.capacity();
        let wanted = match self.framing {
            Framing::MsgPack => match self.announced_len() {
                Some(len) => 4 + len.min(self.max_message_bytes),
                None => 0,
            },
            Framing::JsonLines if pending < free => 0,
            Framing::JsonLines if capacity - pending >= read_size / 4 => capacity,
            Framing::JsonLines => (capacity * 2)
                .max(pending + read_size)
                .min(self.max_message_bytes + read_size),
        };
        wanted.max(free)
    }

    /// Drops the decoded bytes and grows the buffer to `capacity` (exactly),
    /// ready for a read into its spare room.
    pub fn prepare_read(&mut self, capacity: usize) {
        self.compact();
        if capacity > self.buf.capacity() {
            self.buf.reserve_exact(capacity - self.buf.len());
        }
    }

    /// The buffer to read into: only its spare capacity is written.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// After a message larger than `keep` bytes: drops the decoded bytes
    /// and gives the buffer's memory back, down to `keep` bytes of
    /// capacity, unless more than that is still pending. Returns the
    /// capacity now held.
    pub fn shrink(&mut self, keep: usize) -> usize {
        if self.buf.capacity() > keep && self.pending_bytes() <= keep {
            self.compact();
            self.buf.shrink_to(keep);
        }
        self.buf.capacity()
    }

    /// MessagePack: the body length the buffered length prefix announces.
    fn announced_len(&self) -> Option<usize> {
        let avail = self.buf.get(self.start..self.start + 4)?;
        Some(u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize)
    }

    /// The next complete item, `Ok(None)` when more bytes are needed, or a
    /// fatal error.
    pub fn next_item(&mut self) -> Result<Option<Decoded>, FrameError> {
        self.next_item_with(|_| None)
    }

    /// [`Decoder::next_item`], but a MessagePack body goes to `fast` first:
    /// what it handles comes back as [`Decoded::Handled`], and a body it
    /// returns `None` for is decoded as usual.
    pub fn next_item_with(
        &mut self,
        fast: impl FnOnce(&[u8]) -> Option<Handled>,
    ) -> Result<Option<Decoded>, FrameError> {
        match self.framing {
            Framing::MsgPack => self.next_msgpack(fast),
            Framing::JsonLines => Ok(self.next_json()),
        }
    }

    fn next_msgpack(
        &mut self,
        fast: impl FnOnce(&[u8]) -> Option<Handled>,
    ) -> Result<Option<Decoded>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max_message_bytes {
            return Err(FrameError {
                code: RefusalCode::MessageTooLarge,
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
        if let Some(h) = fast(body) {
            self.start += 4 + len;
            return Ok(Some(Decoded::Handled(Box::new(h))));
        }
        let mut de = rmp_serde::Deserializer::from_read_ref(body);
        de.set_max_depth(MAX_MSGPACK_DEPTH);
        let item = match <Value as serde::Deserialize>::deserialize(&mut de) {
            Ok(v) => Decoded::Message(v),
            Err(e) => Decoded::Invalid(FrameError {
                code: RefusalCode::BadMessage,
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
            // Resume where the last search stopped: the bytes before it hold
            // no newline. Rescanning the line from its start on every read
            // made a long line split into small reads cost quadratic time.
            let from = self.scanned.min(avail.len());
            let found = avail[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| from + i);
            self.scanned_total += (found.map_or(avail.len(), |nl| nl + 1) - from) as u64;
            let Some(nl) = found else {
                self.scanned = avail.len();
                if self.skipping_line || avail.len() > self.max_message_bytes {
                    // Drop what we have and ignore the rest of this line as
                    // it arrives: a skipped line holds no memory.
                    let was_skipping = self.skipping_line;
                    self.start = self.buf.len();
                    self.scanned = 0;
                    self.skipping_line = true;
                    if !was_skipping {
                        return Some(Decoded::Invalid(self.too_long()));
                    }
                }
                return None;
            };
            let line = &avail[..nl];
            self.start += nl + 1;
            self.scanned = 0;
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
                    code: RefusalCode::BadMessage,
                    message,
                    fatal: false,
                }),
            });
        }
    }

    fn too_long(&self) -> FrameError {
        FrameError {
            code: RefusalCode::MessageTooLarge,
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
    fn a_long_json_line_in_small_reads_is_searched_once_not_from_its_start_each_time() {
        // 15 MiB in 4 KiB reads: searching each read from the line's start
        // scanned about 28 GB (2.2 s of CPU in a release build).
        let mut line = br#"{"type":"ping","pad":""#.to_vec();
        line.resize(15 << 20, b'x');
        line.extend_from_slice(b"\"}\n");
        let mut d = Decoder::new(Framing::JsonLines, 16 << 20);
        for piece in line.chunks(4096) {
            d.feed(piece);
            if let Some(item) = d.next_item().unwrap() {
                assert!(matches!(item, Decoded::Message(_)), "{item:?}");
                assert_eq!(d.pending_bytes(), 0);
            }
        }
        assert_eq!(d.scanned_bytes(), line.len() as u64, "each byte once");
    }

    #[test]
    fn lines_split_anywhere_decode_the_same_and_each_byte_is_searched_once() {
        let stream = b"{\"type\":\"ping\"}\r\n\n{\"type\":\"stats\",\"x\":\"\\u00e9\"}\n{oops}\n{\"type\":\"ping\"}\n";
        let whole = {
            let mut d = Decoder::new(Framing::JsonLines, 1024);
            d.feed(stream);
            messages(&mut d).len()
        };
        for size in 1..stream.len() {
            let mut d = Decoder::new(Framing::JsonLines, 1024);
            let mut got = 0;
            for piece in stream.chunks(size) {
                d.feed(piece);
                got += messages(&mut d).len();
            }
            assert_eq!(got, whole, "reads of {size}");
            assert_eq!(d.scanned_bytes(), stream.len() as u64, "reads of {size}");
        }
    }

    #[test]
    fn the_buffer_grows_for_a_long_message_and_shrinks_back_after_it() {
        let free = 1024;
        // MessagePack: exactly the announced length, at once.
        let mut d = Decoder::new(Framing::MsgPack, 1 << 20);
        d.feed(&(100_000u32).to_be_bytes());
        assert!(d.next_item().unwrap().is_none());
        assert_eq!(d.wanted_capacity(free, 512), 100_004);
        // A short message needs no more than the free share.
        let mut small = Decoder::new(Framing::MsgPack, 1 << 20);
        small.feed(&(10u32).to_be_bytes());
        assert_eq!(small.wanted_capacity(free, 512), free);

        // JSON lines: doubling while the buffer is nearly full, not per read.
        let mut d = Decoder::new(Framing::JsonLines, 1 << 20);
        let mut grown = Vec::new();
        d.feed(b"{\"type\":\"ping\",\"pad\":\"");
        loop {
            assert!(d.next_item().unwrap().is_none());
            let want = d.wanted_capacity(free, 512);
            if want > d.capacity() {
                grown.push(want);
            }
            d.prepare_read(want);
            let room = d.capacity() - d.pending_bytes();
            if d.pending_bytes() > 200_000 {
                break;
            }
            d.buffer_mut()
                .extend(std::iter::repeat_n(b'x', room.min(300)));
        }
        assert!(grown.len() < 12, "{grown:?}");
        assert!(
            grown.windows(2).all(|w| w[1] >= 2 * w[0] - 512),
            "{grown:?}"
        );
        d.feed(b"\"}\n");
        assert!(matches!(d.next_item().unwrap(), Some(Decoded::Message(_))));
        assert!(d.capacity() > 200_000);
        assert_eq!(d.shrink(free), free);
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
