//! The z4j contract line the daemon names in `hello.agent_version`.
//!
//! The brain reads `agent_version` as the version of the z4j agent contract
//! (z4j-core) an agent speaks: it compares it with the z4j-core release it
//! knows (`version_status`: a different major is `incompatible`) and warns
//! when the agent is not on its own minor or the one before ("agent outside
//! the supported version skew"). The daemon is not a z4j-core release, so it
//! names the contract line it implements for the brain it talks to, chosen
//! from the brain's `hello_ack.brain_version` ([`line_for`]), and keeps its
//! own version in `hello.host.agentd_version`, `status` and `stats`.
//!
//! The brain's version is known only after the handshake. The last one seen
//! is kept in the spool's `meta` table; with none (first contact) the daemon
//! says `0.0.0`, the brain's "not determined" value, which it neither logs
//! about nor stores. When the `hello_ack` shows that the line sent is not
//! the brain's ([`after_hello_ack`]), the daemon waits until the brain has
//! handed that session the commands waiting for the agent (see
//! `connect::settle`), closes it normally and says `hello` again at once
//! with the right line, at most once per connection attempt. Commands
//! handed to the first session are acknowledged and run on the second.

/// `agent_version` when the brain's version is not known yet: the brain
/// leaves the agent's stored version alone and logs nothing.
pub const UNKNOWN_LINE: &str = "0.0.0";

/// The contract line per z4j minor of major 1, as verified against those
/// brains (the newest z4j-core release of each minor). Extend it when a new
/// z4j minor is verified.
pub const LINES: [(u64, &str); 5] = [
    (9, "1.9.1"),
    (10, "1.10.0"),
    (11, "1.11.0"),
    (12, "1.12.0"),
    (13, "1.13.0"),
];

/// The newest line this daemon speaks.
pub const NEWEST_LINE: &str = LINES[LINES.len() - 1].1;
/// The oldest line this daemon speaks.
pub const OLDEST_LINE: &str = LINES[0].1;

/// The leading `major.minor` of a brain's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrainLine {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
}

/// Minors at or past this are stored as this (they all map alike).
const MINOR_CAP: u64 = 999;

impl BrainLine {
    /// Reads the leading `major.minor` of `version` (`1.13.0`, `1.13`,
    /// `1.13.0rc1`); `None` when it does not start with two numbers.
    pub fn parse(version: &str) -> Option<BrainLine> {
        let mut parts = version.trim().splitn(3, '.');
        let major = parts.next()?;
        let minor = parts.next()?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = minor.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        Some(BrainLine {
            major: major.parse().ok()?,
            minor: minor[..digits].parse::<u64>().unwrap_or(u64::MAX),
        })
    }

    /// The value kept in the spool's `meta` table (an integer).
    pub fn code(self) -> i64 {
        let major = self.major.min((i64::MAX / 1000 - 1) as u64) as i64;
        major * 1000 + self.minor.min(MINOR_CAP) as i64
    }

    /// Reads back [`BrainLine::code`]; `None` for a value it cannot have
    /// written.
    pub fn from_code(code: i64) -> Option<BrainLine> {
        if code < 0 {
            return None;
        }
        Some(BrainLine {
            major: (code / 1000) as u64,
            minor: (code % 1000) as u64,
        })
    }
}

/// The contract line to name to a brain of `line`:
/// * major 1 and a minor in the table: that entry;
/// * major 1 and a newer minor: the newest line (the truth: the daemon
///   speaks nothing newer);
/// * major 1 and an older minor: the oldest line (that brain is older than
///   any contract the daemon speaks, and says so);
/// * another major: the newest line (the brain shows `incompatible`, which
///   is true).
pub fn line_for(line: BrainLine) -> &'static str {
    if line.major != 1 {
        return NEWEST_LINE;
    }
    if let Some((_, l)) = LINES.iter().find(|(minor, _)| *minor == line.minor) {
        return l;
    }
    if line.minor > LINES[LINES.len() - 1].0 {
        NEWEST_LINE
    } else {
        OLDEST_LINE
    }
}

/// The line for the first `hello` of a connection: from the brain last
/// seen, or [`UNKNOWN_LINE`] without one.
pub fn first_line(last_seen: Option<BrainLine>) -> &'static str {
    last_seen.map(line_for).unwrap_or(UNKNOWN_LINE)
}

/// What to do once the `hello_ack` has named the brain's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAck {
    /// Keep this session.
    Stay,
    /// Close it normally and say `hello` again with this line.
    Rehello(&'static str),
}

/// Decides on the session that answered `hello` (which named `sent`) with
/// `brain_version`. An unreadable brain version, a line already right, or a
/// connection attempt that already said `hello` twice keep the session.
pub fn after_hello_ack(sent: &str, brain_version: &str, rehello_used: bool) -> AfterAck {
    let Some(line) = BrainLine::parse(brain_version) else {
        return AfterAck::Stay;
    };
    let want = line_for(line);
    if want == sent || rehello_used {
        AfterAck::Stay
    } else {
        AfterAck::Rehello(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: &str) -> &'static str {
        line_for(BrainLine::parse(v).expect(v))
    }

    #[test]
    fn each_verified_brain_gets_its_own_line() {
        assert_eq!(line("1.9.1"), "1.9.1");
        assert_eq!(line("1.9.0"), "1.9.1");
        assert_eq!(line("1.10.0"), "1.10.0");
        assert_eq!(line("1.11.0"), "1.11.0");
        assert_eq!(line("1.12.0"), "1.12.0");
        // 1.12.1 bundles z4j-core 1.12.0: naming 1.12.1 would be "newer than known".
        assert_eq!(line("1.12.1"), "1.12.0");
        assert_eq!(line("1.13.0"), "1.13.0");
    }

    #[test]
    fn brains_outside_the_table_get_the_nearest_true_line() {
        assert_eq!(line("1.14.0"), "1.13.0");
        assert_eq!(line("1.15.2"), "1.13.0");
        assert_eq!(line("1.8.0"), "1.9.1");
        assert_eq!(line("1.0"), "1.9.1");
        assert_eq!(line("2.0.0"), "1.13.0");
        assert_eq!(line("0.9.0"), "1.13.0");
        assert_eq!(line("1.13.0rc1"), "1.13.0");
        assert_eq!(line("1.14"), "1.13.0");
        assert_eq!(line("1.99999999999999999999999"), "1.13.0");
    }

    #[test]
    fn versions_without_two_leading_numbers_are_not_read() {
        for v in [
            "fake", "", "1", "1.", ".13", "v1.13.0", "1.x", "unknown", "a.13",
        ] {
            assert_eq!(BrainLine::parse(v), None, "{v:?}");
        }
    }

    #[test]
    fn the_stored_code_reads_back() {
        for v in ["1.9.1", "1.13.0", "2.0", "1.1500"] {
            let l = BrainLine::parse(v).unwrap();
            let back = BrainLine::from_code(l.code()).unwrap();
            assert_eq!(line_for(back), line_for(l), "{v}");
        }
        assert_eq!(BrainLine::from_code(-1), None);
    }

    #[test]
    fn first_contact_says_the_unknown_sentinel() {
        assert_eq!(first_line(None), "0.0.0");
        assert_eq!(first_line(BrainLine::parse("1.12.0")), "1.12.0");
    }

    #[test]
    fn a_wrong_line_is_said_again_once_and_an_unreadable_brain_never() {
        assert_eq!(
            after_hello_ack("0.0.0", "1.13.0", false),
            AfterAck::Rehello("1.13.0")
        );
        assert_eq!(after_hello_ack("1.13.0", "1.13.0", false), AfterAck::Stay);
        // A brain upgraded since the last contact.
        assert_eq!(
            after_hello_ack("1.12.0", "1.13.0", false),
            AfterAck::Rehello("1.13.0")
        );
        // A balancer flapping between two brains: no second re-hello.
        assert_eq!(after_hello_ack("1.13.0", "1.12.0", true), AfterAck::Stay);
        assert_eq!(after_hello_ack("0.0.0", "fake", false), AfterAck::Stay);
        assert_eq!(after_hello_ack("0.0.0", "", false), AfterAck::Stay);
    }
}
