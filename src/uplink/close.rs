//! The brain's close codes, in one table: for each, the backoff class the
//! uplink waits by, what it means (the daemon's log line) and what to
//! change (the doctor's advice). A code not listed is a connection
//! failure with a generic meaning, so a brain that adds codes is retried
//! at the fastest pace rather than refused.

use super::backoff::FailureClass;
use crate::protocol::limits::MAX_CLOCK_SKEW_SECONDS;

/// What one close code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseMeaning {
    /// The code the brain closed with.
    pub code: u16,
    /// How long to back off before reconnecting.
    pub class: FailureClass,
    /// What happened, as the daemon logs it after
    /// `the brain closed the connection with {code}: `.
    pub meaning: &'static str,
    /// What the operator changes.
    pub fix: &'static str,
}

const CHECK_LOG: &str = "check the brain's log around this time for the reason";
const NEW_TOKEN: &str = "mint a new agent token in the brain (dashboard, or POST /api/v1/projects/<slug>/agents) and put it in Z4J_TOKEN_FILE (or Z4J_TOKEN); tokens cannot be recovered";
const SECRET_FIX: &str = "copy the project's hmac_secret (returned when the agent was minted; every agent of a project shares it) into Z4J_HMAC_SECRET_FILE (or Z4J_HMAC_SECRET); if the brain's Z4J_SECRET changed, mint a new token and secret";
pub(crate) const CLOCK_FIX: &str =
    "fix time synchronisation on this host or the brain (timedatectl set-ntp true, chrony)";
const UPGRADE: &str = "upgrade z4j-agentd or the brain so both speak protocol 2";

/// Every close code the brain is known to send.
pub const CLOSE_CODES: &[CloseMeaning] = &[
    row(1000, FailureClass::Connection, "the brain closed the connection normally", CHECK_LOG),
    row(1011, FailureClass::Connection, "the brain hit an internal error or refused a frame it could not process", CHECK_LOG),
    row(4002, FailureClass::Connection, "another process connected with the same worker_id and took over this worker slot; give each daemon its own Z4J_WORKER_ID", "give each daemon its own Z4J_WORKER_ID"),
    row(4003, FailureClass::Auth, "the agent was revoked or its project archived", "mint a new agent in an active project and update Z4J_TOKEN_FILE and Z4J_HMAC_SECRET_FILE"),
    row(4400, FailureClass::Connection, "the brain refused a malformed or oversized frame", CHECK_LOG),
    row(4401, FailureClass::Auth, "the brain refused the token; mint a new agent token and update Z4J_TOKEN_FILE", NEW_TOKEN),
    row(4403, FailureClass::Auth, "the brain refused a signature (wrong HMAC secret for this project, or a clock more than 60 s off) or this host's IP", SECRET_FIX),
    row(4408, FailureClass::Connection, "the brain closed an idle connection", CHECK_LOG),
    row(4426, FailureClass::Incompatible, "the brain does not speak this protocol version; upgrade z4j-agentd or the brain", UPGRADE),
    row(4427, FailureClass::Incompatible, "the brain does not speak this protocol version; upgrade z4j-agentd or the brain", UPGRADE),
    row(4429, FailureClass::Connection, "rate limited, or the agent has too many worker slots connected", "wait a minute and try again; if it persists, check how many processes share this agent token"),
];

const fn row(
    code: u16,
    class: FailureClass,
    meaning: &'static str,
    fix: &'static str,
) -> CloseMeaning {
    CloseMeaning {
        code,
        class,
        meaning,
        fix,
    }
}

/// What `code` means; a code not in [`CLOSE_CODES`] is a connection failure.
pub fn close_meaning(code: u16) -> CloseMeaning {
    CLOSE_CODES
        .iter()
        .find(|m| m.code == code)
        .copied()
        .unwrap_or(row(
            code,
            FailureClass::Connection,
            "the brain closed the connection",
            CHECK_LOG,
        ))
}

/// Where a close came from, for a diagnosis more precise than the table.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CloseContext {
    /// Whether the brain had read our `hello` (a 4403 before it is about
    /// this host's address, after it about a signature).
    pub after_hello: bool,
    /// Brain clock minus ours, seconds, when known.
    pub skew: Option<f64>,
    /// Whether the slot is the doctor's own rather than the daemon's.
    pub doctor_slot: bool,
}

/// A close explained to the operator: what happened, what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub message: String,
    pub fix: String,
}

/// The close `code` explained for the doctor's report.
pub fn diagnose(code: u16, ctx: CloseContext) -> Diagnosis {
    let d = |message: String, fix: &str| Diagnosis {
        message,
        fix: fix.to_string(),
    };
    let m = close_meaning(code);
    match code {
        4401 => d("the brain refused the token (close 4401): it is wrong, revoked, or from another brain or project".into(), m.fix),
        4403 if !ctx.after_hello => d(
            "the brain refused this host's IP address (close 4403 before the hello)".into(),
            "add this host's address to the brain's Z4J_AGENT_IP_ALLOWLIST",
        ),
        4403 => match ctx.skew {
            Some(s) if s.abs() > MAX_CLOCK_SKEW_SECONDS as f64 => d(
                format!("the brain refused the signed frame (close 4403): this host's clock is {s:.0} s away from the brain's, beyond the {MAX_CLOCK_SKEW_SECONDS} s the brain allows"),
                CLOCK_FIX,
            ),
            _ => d("the brain refused the signed frame (close 4403): the HMAC secret does not match this project".into(), m.fix),
        },
        4003 => d("the brain closed the session (4003): the agent was revoked or its project archived".into(), m.fix),
        4426 | 4427 => d(format!("the brain refused the protocol version (close {code})"), m.fix),
        4429 => d("the brain rate-limited the connection or the agent has 64 worker slots in use (close 4429)".into(), m.fix),
        4002 if ctx.doctor_slot => d(
            "another doctor took the doctor's slot while it ran (close 4002)".into(),
            "run one doctor at a time",
        ),
        _ => d(format!("the brain closed the connection with {code}: {}", m.meaning), m.fix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_classes() {
        let class = |c| close_meaning(c).class;
        for c in [4401, 4403, 4003] {
            assert_eq!(class(c), FailureClass::Auth, "{c}");
        }
        for c in [4426, 4427] {
            assert_eq!(class(c), FailureClass::Incompatible, "{c}");
        }
        for c in [4002, 4400, 4408, 4429, 1011, 1000, 1006, 1005] {
            assert_eq!(class(c), FailureClass::Connection, "{c}");
        }
    }

    #[test]
    fn each_code_is_listed_once_with_a_fix() {
        for (i, m) in CLOSE_CODES.iter().enumerate() {
            assert!(
                CLOSE_CODES[i + 1..].iter().all(|o| o.code != m.code),
                "{} twice",
                m.code
            );
            assert!(!m.meaning.is_empty() && !m.fix.is_empty(), "{}", m.code);
        }
        assert_eq!(
            close_meaning(4999).meaning,
            "the brain closed the connection"
        );
    }

    #[test]
    fn the_log_names_the_fix_for_the_codes_an_operator_causes() {
        assert!(close_meaning(4002).meaning.contains("Z4J_WORKER_ID"));
        assert!(close_meaning(4401).meaning.contains("Z4J_TOKEN_FILE"));
        assert!(close_meaning(4403).meaning.contains("HMAC secret"));
        assert!(close_meaning(4426).meaning.contains("upgrade"));
        // The table is text; the limit it names is the one the verifier uses.
        let limit = format!("more than {MAX_CLOCK_SKEW_SECONDS} s off");
        assert!(close_meaning(4403).meaning.contains(&limit));
    }

    #[test]
    fn diagnoses_name_the_cause() {
        let before = CloseContext::default();
        let after = CloseContext {
            after_hello: true,
            ..before
        };
        assert!(diagnose(4401, before).message.contains("token"));
        assert!(diagnose(4401, before).fix.contains("Z4J_TOKEN_FILE"));
        assert!(diagnose(4403, after).message.contains("HMAC secret"));
        let skewed = CloseContext {
            skew: Some(90.0),
            ..after
        };
        assert!(diagnose(4403, skewed)
            .message
            .contains("clock is 90 s away"));
        assert!(diagnose(4403, before).message.contains("IP"));
        assert!(diagnose(4426, before).fix.contains("upgrade"));
        let doctor = CloseContext {
            doctor_slot: true,
            ..after
        };
        assert!(diagnose(4002, doctor).message.contains("another doctor"));
        assert!(diagnose(4002, after).fix.contains("Z4J_WORKER_ID"));
        assert_eq!(
            diagnose(1011, after).message,
            "the brain closed the connection with 1011: the brain hit an internal error or refused a frame it could not process"
        );
    }
}
