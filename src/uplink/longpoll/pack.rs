//! The body of one long-poll upload, `{"frames": ["<signed frame>", ...]}`,
//! kept within a byte budget (the brain refuses a larger request with 413)
//! and the brain's 500 frames. Each frame travels as a JSON string, so its
//! size in the body is its escaped size.

/// Most frames in one upload (the brain takes 1 to 500).
pub(crate) const MAX_FRAMES: usize = 500;

const OPEN: &[u8] = br#"{"frames":["#;
const CLOSE: &[u8] = b"]}";

/// A signed frame as the JSON string it travels as.
pub(crate) fn escape(frame: &[u8]) -> String {
    // Frames are built by this daemon from UTF-8 text.
    let text = String::from_utf8_lossy(frame);
    serde_json::to_string(&text).expect("a string serializes")
}

/// An upload body being filled.
#[derive(Debug)]
pub(crate) struct Body {
    budget: usize,
    bytes: Vec<u8>,
    frames: usize,
}

impl Body {
    /// An empty body that may grow to `budget` bytes.
    pub(crate) fn new(budget: usize) -> Body {
        let mut bytes = Vec::with_capacity(budget.min(1 << 20));
        bytes.extend_from_slice(OPEN);
        Body {
            budget,
            bytes,
            frames: 0,
        }
    }

    /// Frames in the body.
    pub(crate) fn frames(&self) -> usize {
        self.frames
    }

    /// Whether no frame is in it yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Whether it has room for another frame at all.
    pub(crate) fn open(&self) -> bool {
        self.frames < MAX_FRAMES
    }

    /// Bytes still free for one more escaped frame.
    pub(crate) fn room(&self) -> usize {
        let separator = usize::from(self.frames > 0);
        self.budget
            .saturating_sub(self.bytes.len() + CLOSE.len() + separator)
    }

    /// Whether `escaped` fits.
    pub(crate) fn fits(&self, escaped: &str) -> bool {
        self.open() && escaped.len() <= self.room()
    }

    /// Adds a frame that [`Body::fits`].
    pub(crate) fn push(&mut self, escaped: &str) {
        debug_assert!(self.fits(escaped));
        if self.frames > 0 {
            self.bytes.push(b',');
        }
        self.bytes.extend_from_slice(escaped.as_bytes());
        self.frames += 1;
    }

    /// The request body.
    pub(crate) fn into_bytes(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(CLOSE);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_the_frames_as_json_strings_within_its_budget() {
        let a = escape(br#"{"type":"heartbeat","payload":{"x":"a\"b"}}"#);
        let b = escape(br#"{"type":"agent_status"}"#);
        let exact = OPEN.len() + a.len() + 1 + b.len() + CLOSE.len();
        let mut body = Body::new(exact);
        assert!(body.fits(&a));
        body.push(&a);
        assert!(body.fits(&b), "room {} for {}", body.room(), b.len());
        body.push(&b);
        assert_eq!(body.room(), 0);
        assert!(!body.fits("\"\""));
        let bytes = body.into_bytes();
        assert_eq!(bytes.len(), exact);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let frames = v["frames"].as_array().unwrap();
        assert_eq!(frames.len(), 2);
        let first: serde_json::Value = serde_json::from_str(frames[0].as_str().unwrap()).unwrap();
        assert_eq!(first["payload"]["x"], "a\"b");

        let mut small = Body::new(exact - 1);
        small.push(&a);
        assert!(!small.fits(&b), "one byte short");
    }

    #[test]
    fn a_body_holds_at_most_the_brains_500_frames() {
        let f = escape(b"{}");
        let mut body = Body::new(1 << 20);
        for _ in 0..MAX_FRAMES {
            assert!(body.fits(&f));
            body.push(&f);
        }
        assert!(!body.open());
        assert!(!body.fits(&f));
        assert_eq!(body.frames(), MAX_FRAMES);
    }
}
