//! Replay guard for signed frames (`docs/brain-protocol.md`, "Replay
//! rules") and the ISO-8601 parser it needs.
//!
//! Invariants:
//! * One guard per connection and direction; it is consulted only **after**
//!   the HMAC check, so everything it sees was signed by the peer.
//! * [`ReplayGuard::check`] changes no state unless every rule passes (the
//!   only exception is dropping nonces that have aged out of the window, which
//!   changes no outcome).
//! * Time is a parameter: nothing here reads the clock.

use std::collections::{HashSet, VecDeque};

use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Largest accepted `|receiver_now - ts|`.
pub const MAX_CLOCK_SKEW: Duration = Duration::seconds(super::limits::MAX_CLOCK_SKEW_SECONDS);
/// How long a nonce is remembered.
pub const NONCE_WINDOW: Duration = Duration::seconds(180);
/// At most this many nonces are remembered; the oldest is evicted first.
pub const MAX_REMEMBERED_NONCES: usize = 4096;
/// The longest nonce accepted (z4j's are 22 characters; the brain's too).
pub const MAX_NONCE_CHARS: usize = 64;

/// Why a correctly signed frame was refused as a possible replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// `ts` is not ISO-8601 or has no UTC offset.
    #[error(
        "frame ts {ts:?} is not an ISO-8601 timestamp with a UTC offset \
         (expected e.g. 2026-11-22T23:27:04.648641Z)"
    )]
    BadTimestamp {
        /// The offending value, cut to 64 characters.
        ts: String,
    },
    /// `ts` is more than 60 s away from our clock.
    #[error(
        "frame ts is {:.1} s {} this host's clock (limit 60 s): synchronise this host's clock \
         with the brain's (NTP)",
        skew.as_seconds_f64().abs(),
        if skew.is_negative() { "ahead of" } else { "behind" }
    )]
    ClockSkew {
        /// `receiver_now - ts`: positive when the frame's ts is in our past.
        skew: Duration,
    },
    /// `seq` is not an integer >= 1.
    #[error("frame seq must be an integer >= 1")]
    InvalidSeq,
    /// `seq` did not increase.
    #[error(
        "frame seq {seq} is not greater than the last accepted seq {last} \
         (replayed or reordered frame)"
    )]
    SeqNotIncreasing {
        /// The refused sequence number.
        seq: u64,
        /// The last accepted sequence number on this connection.
        last: u64,
    },
    /// `nonce` is empty.
    #[error("frame nonce is empty")]
    EmptyNonce,
    /// `nonce` is longer than [`MAX_NONCE_CHARS`]: every nonce is kept for
    /// the window, so a long one would hold memory for nothing.
    #[error("frame nonce is longer than 64 characters (z4j sends 22)")]
    LongNonce,
    /// `nonce` was already accepted within the window.
    #[error("frame nonce was already used in the last 180 s (replayed frame)")]
    NonceReused,
}

/// Per-connection, per-direction replay state.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    last_seq: u64,
    /// Accepted nonces in acceptance order, with the receiver time.
    order: VecDeque<(String, OffsetDateTime)>,
    /// Same nonces, for O(1) lookup.
    seen: HashSet<String>,
}

impl ReplayGuard {
    /// A fresh guard, as at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last accepted `seq` (0 before the first frame).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Applies the replay rules to a frame whose signature already checked out
    /// and records it if, and only if, all of them pass.
    pub fn check(
        &mut self,
        ts: &str,
        seq: u64,
        nonce: &str,
        now: OffsetDateTime,
    ) -> Result<(), ReplayError> {
        let Some(frame_time) = parse_iso8601(ts) else {
            return Err(ReplayError::BadTimestamp {
                ts: ts.chars().take(64).collect(),
            });
        };
        let skew = now - frame_time;
        if skew.abs() > MAX_CLOCK_SKEW {
            return Err(ReplayError::ClockSkew { skew });
        }
        if seq == 0 {
            return Err(ReplayError::InvalidSeq);
        }
        if seq <= self.last_seq {
            return Err(ReplayError::SeqNotIncreasing {
                seq,
                last: self.last_seq,
            });
        }
        if nonce.is_empty() {
            return Err(ReplayError::EmptyNonce);
        }
        if nonce.len() > MAX_NONCE_CHARS && nonce.chars().count() > MAX_NONCE_CHARS {
            return Err(ReplayError::LongNonce);
        }
        self.expire(now);
        if self.seen.contains(nonce) {
            return Err(ReplayError::NonceReused);
        }

        self.last_seq = seq;
        self.seen.insert(nonce.to_owned());
        self.order.push_back((nonce.to_owned(), now));
        if self.order.len() > MAX_REMEMBERED_NONCES {
            self.pop_oldest();
        }
        Ok(())
    }

    fn expire(&mut self, now: OffsetDateTime) {
        while let Some((_, at)) = self.order.front() {
            if now - *at > NONCE_WINDOW {
                self.pop_oldest();
            } else {
                break;
            }
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((nonce, _)) = self.order.pop_front() {
            self.seen.remove(&nonce);
        }
    }
}

/// Parses an ISO-8601 timestamp that carries a UTC offset; `None` when it is
/// malformed or naive.
///
/// Accepts the forms z4j and pydantic produce, a subset of what Python 3.11
/// `datetime.fromisoformat` accepts after `Z` -> `+00:00`:
/// `YYYY-MM-DD`, a `T`, `t` or space, `HH[:MM[:SS[(.|,)fraction]]]`, then
/// `Z` or `±HH[[:]MM[:SS]]`. Fractions of any length are accepted and kept to
/// nanoseconds. Week dates and the basic (no `-`/`:`) date form are not.
pub fn parse_iso8601(s: &str) -> Option<OffsetDateTime> {
    let (local, offset) = parse_parts(s)?;
    Some(local.assume_offset(offset?))
}

/// Like [`parse_iso8601`] but a naive timestamp (no offset; also a bare
/// date) is taken as UTC, the brain's rule for event `occurred_at`.
pub fn parse_iso8601_assume_utc(s: &str) -> Option<OffsetDateTime> {
    let (local, offset) = parse_parts(s)?;
    Some(local.assume_offset(offset.unwrap_or(UtcOffset::UTC)))
}

/// Byte cursor over an ASCII timestamp.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Exactly `n` decimal digits.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let end = self.pos.checked_add(n)?;
        let chunk = self.b.get(self.pos..end)?;
        let mut v = 0u32;
        for &c in chunk {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        self.pos = end;
        Some(v)
    }

    fn at_end(&self) -> bool {
        self.pos == self.b.len()
    }
}

/// An ISO-8601 date, optionally with a time and an offset, as Python's
/// `datetime.fromisoformat` reads them: the local date-time and the offset
/// when one is given.
fn parse_parts(s: &str) -> Option<(PrimitiveDateTime, Option<UtcOffset>)> {
    let mut c = Cursor {
        b: s.as_bytes(),
        pos: 0,
    };
    let date = c.date()?;
    if c.at_end() {
        return Some((date.midnight(), None));
    }
    if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
        return None;
    }
    let local = PrimitiveDateTime::new(date, c.time()?);
    if c.at_end() {
        return Some((local, None));
    }
    let offset = c.offset()?;
    c.at_end().then_some((local, Some(offset)))
}

impl Cursor<'_> {
    /// `YYYY-MM-DD`, a real calendar date from year 1.
    fn date(&mut self) -> Option<Date> {
        let year = self.digits(4)?;
        if year == 0 || !self.eat(b'-') {
            return None;
        }
        let month = self.digits(2)?;
        if !self.eat(b'-') {
            return None;
        }
        let day = self.digits(2)?;
        Date::from_calendar_date(
            i32::try_from(year).ok()?,
            Month::try_from(u8::try_from(month).ok()?).ok()?,
            u8::try_from(day).ok()?,
        )
        .ok()
    }

    /// `HH[:MM[:SS[.fff...]]]`, the fraction `.` or `,` and cut at
    /// nanoseconds.
    fn time(&mut self) -> Option<Time> {
        let hour = self.digits(2)?;
        let (mut minute, mut second, mut nanos) = (0, 0, 0);
        if self.eat(b':') {
            minute = self.digits(2)?;
            if self.eat(b':') {
                second = self.digits(2)?;
                if self.eat(b'.') || self.eat(b',') {
                    nanos = self.fraction()?;
                }
            }
        }
        Time::from_hms_nano(
            u8::try_from(hour).ok()?,
            u8::try_from(minute).ok()?,
            u8::try_from(second).ok()?,
            nanos,
        )
        .ok()
    }

    /// At least one digit of a fraction of a second, as nanoseconds (the
    /// digits past the ninth are read and dropped).
    fn fraction(&mut self) -> Option<u32> {
        let start = self.pos;
        let mut nanos = 0;
        let mut scale = 100_000_000u32;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            nanos += u32::from(d - b'0') * scale;
            scale /= 10;
            self.pos += 1;
        }
        (self.pos > start).then_some(nanos)
    }

    /// `Z`, or `±HH[[:]MM[:SS]]` strictly inside ±24 h, as Python requires.
    fn offset(&mut self) -> Option<UtcOffset> {
        if self.eat(b'Z') {
            return Some(UtcOffset::UTC);
        }
        let sign: i8 = if self.eat(b'+') {
            1
        } else if self.eat(b'-') {
            -1
        } else {
            return None;
        };
        let oh = self.digits(2)?;
        let (mut om, mut os) = (0, 0);
        if self.eat(b':') {
            om = self.digits(2)?;
            if self.eat(b':') {
                os = self.digits(2)?;
            }
        } else if !self.at_end() {
            om = self.digits(2)?;
        }
        if oh > 23 || om > 59 || os > 59 {
            return None;
        }
        UtcOffset::from_hms(sign * oh as i8, sign * om as i8, sign * os as i8).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 23:30:00 UTC);

    fn ts(t: OffsetDateTime) -> String {
        crate::protocol::sign::format_ts(t)
    }

    #[test]
    fn parses_the_forms_in_use() {
        let cases: &[(&str, OffsetDateTime)] = &[
            (
                "2026-11-22T23:27:04.648641Z",
                datetime!(2026-11-22 23:27:04.648641 UTC),
            ),
            (
                "2026-11-22T23:27:04.648641+00:00",
                datetime!(2026-11-22 23:27:04.648641 UTC),
            ),
            (
                "2026-11-22T23:30:10+00:00",
                datetime!(2026-11-22 23:30:10 UTC),
            ),
            (
                "2026-11-22T23:30:10.5Z",
                datetime!(2026-11-22 23:30:10.5 UTC),
            ),
            (
                "2026-11-22T23:30:10.123456789Z",
                datetime!(2026-11-22 23:30:10.123456789 UTC),
            ),
            (
                "2026-11-22T23:30:10,25+0000",
                datetime!(2026-11-22 23:30:10.25 UTC),
            ),
            ("2026-11-22 23:30Z", datetime!(2026-11-22 23:30 UTC)),
            ("2026-11-22T23+01", datetime!(2026-11-22 23:00 +1)),
            (
                "2026-11-22T23:27:04-05:30",
                datetime!(2026-11-22 23:27:04 -05:30),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_iso8601(text), Some(*want), "{text}");
        }
    }

    #[test]
    fn naive_and_malformed_rejected() {
        for bad in [
            "2026-11-22T23:27:04",
            "2026-11-22",
            "2026-11-22T23:27:04z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T23:27:04+24:00",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-22T23:27:04.Z",
            "2026-11-22T23:27:04Z ",
            "20261122T232704Z",
            "",
            "yesterday",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
    }

    #[test]
    fn assume_utc_for_naive() {
        assert_eq!(
            parse_iso8601_assume_utc("2026-11-22T23:27:04.5"),
            Some(datetime!(2026-11-22 23:27:04.5 UTC))
        );
        assert_eq!(
            parse_iso8601_assume_utc("2026-11-22"),
            Some(datetime!(2026-11-22 0:00 UTC))
        );
        assert_eq!(
            parse_iso8601_assume_utc("2026-11-22T23:27:04+02:00"),
            Some(datetime!(2026-11-22 21:27:04 UTC))
        );
        assert_eq!(parse_iso8601_assume_utc("nope"), None);
    }

    #[test]
    fn seq_must_increase_gaps_allowed() {
        let mut g = ReplayGuard::new();
        g.check(&ts(NOW), 1, "n1", NOW).unwrap();
        g.check(&ts(NOW), 100, "n2", NOW).unwrap();
        assert_eq!(
            g.check(&ts(NOW), 100, "n3", NOW),
            Err(ReplayError::SeqNotIncreasing {
                seq: 100,
                last: 100
            })
        );
        assert_eq!(
            g.check(&ts(NOW), 50, "n3", NOW),
            Err(ReplayError::SeqNotIncreasing { seq: 50, last: 100 })
        );
        assert_eq!(
            g.check(&ts(NOW), 0, "n3", NOW),
            Err(ReplayError::InvalidSeq)
        );
        // The refused frames recorded nothing: n3 is still fresh.
        g.check(&ts(NOW), 101, "n3", NOW).unwrap();
        assert_eq!(g.last_seq(), 101);
    }

    #[test]
    fn duplicate_and_empty_nonce_refused() {
        let mut g = ReplayGuard::new();
        g.check(&ts(NOW), 1, "same", NOW).unwrap();
        assert_eq!(
            g.check(&ts(NOW), 2, "same", NOW),
            Err(ReplayError::NonceReused)
        );
        assert_eq!(g.check(&ts(NOW), 2, "", NOW), Err(ReplayError::EmptyNonce));
        assert_eq!(
            g.check(&ts(NOW), 2, &"n".repeat(65), NOW),
            Err(ReplayError::LongNonce)
        );
        g.check(&ts(NOW), 2, &"é".repeat(64), NOW).unwrap();
        // The refused frames did not advance seq.
        g.check(&ts(NOW), 3, "other", NOW).unwrap();
    }

    #[test]
    fn clock_skew_window() {
        let mut g = ReplayGuard::new();
        let old61 = ts(NOW - Duration::seconds(61));
        let err = g.check(&old61, 1, "a", NOW).unwrap_err();
        assert!(matches!(err, ReplayError::ClockSkew { .. }));
        assert!(err.to_string().contains("61.0 s behind"), "{err}");
        let err = g
            .check(&ts(NOW + Duration::seconds(61)), 1, "a", NOW)
            .unwrap_err();
        assert!(err.to_string().contains("ahead of"), "{err}");
        g.check(&ts(NOW - Duration::seconds(59)), 1, "a", NOW)
            .unwrap();
        g.check(&ts(NOW + Duration::seconds(59)), 2, "b", NOW)
            .unwrap();
        g.check(&ts(NOW - Duration::seconds(60)), 3, "c", NOW)
            .unwrap();
        assert_eq!(g.last_seq(), 3);
    }

    #[test]
    fn naive_ts_refused() {
        let mut g = ReplayGuard::new();
        assert_eq!(
            g.check("2026-11-22T23:30:00", 1, "a", NOW),
            Err(ReplayError::BadTimestamp {
                ts: "2026-11-22T23:30:00".into()
            })
        );
        assert_eq!(g.last_seq(), 0);
    }

    #[test]
    fn nonce_forgotten_after_window() {
        let mut g = ReplayGuard::new();
        g.check(&ts(NOW), 1, "n", NOW).unwrap();
        let t180 = NOW + Duration::seconds(180);
        assert_eq!(
            g.check(&ts(t180), 2, "n", t180),
            Err(ReplayError::NonceReused)
        );
        let t181 = NOW + Duration::seconds(181);
        g.check(&ts(t181), 2, "n", t181).unwrap();
    }

    #[test]
    fn nonce_capacity_evicts_oldest() {
        let mut g = ReplayGuard::new();
        for i in 0..=MAX_REMEMBERED_NONCES as u64 {
            g.check(&ts(NOW), i + 1, &format!("n{i}"), NOW).unwrap();
        }
        assert_eq!(g.seen.len(), MAX_REMEMBERED_NONCES);
        let next = MAX_REMEMBERED_NONCES as u64 + 2;
        // n0 was evicted, n1 is still remembered.
        assert_eq!(
            g.check(&ts(NOW), next, "n1", NOW),
            Err(ReplayError::NonceReused)
        );
        g.check(&ts(NOW), next, "n0", NOW).unwrap();
    }
}
