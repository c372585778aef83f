//! What the brain answers to the doctor's session, explained: its reply to
//! the signed frame (the acknowledgement we wait for, a close, or a frame
//! that fails verification) and what each close code means for the
//! operator, with the fix.
//!
//! This is the only place in the doctor that reads brain messages or knows
//! close codes; the daemon's own reading and its log wording live in
//! `uplink`. A 4403 is told apart by when it came (before the `hello`: this
//! host's IP; after: the signature, or the clock when the skew from
//! `hello_ack` is past the brain's limit).

use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::Message;

use super::clock::FAIL_SKEW_SECONDS;
use crate::protocol::{Value, Verifier};
use crate::uplink::backoff::describe_close;
use crate::uplink::connect::Ws;

/// Why the session failed, for the operator.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) message: String,
    pub(super) fix: String,
    /// The brain's close code, when it closed the connection.
    pub(super) close_code: Option<u16>,
}

impl Failure {
    pub(super) fn new(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            fix: fix.into(),
            close_code: None,
        }
    }

    /// The brain closed with `code`; `after_hello` and `skew` (brain clock
    /// minus ours, from `hello_ack`) tell the 4403s apart.
    pub(super) fn closed(code: u16, skew: Option<f64>, after_hello: bool) -> Self {
        let (message, fix) = close_advice(code, skew, after_hello);
        Failure {
            message,
            fix,
            close_code: Some(code),
        }
    }
}

/// What the close `code` means and what to change.
fn close_advice(code: u16, skew: Option<f64>, after_hello: bool) -> (String, String) {
    match code {
        4401 => (
            "the brain refused the token (close 4401): it is wrong, revoked, or from another brain or project".into(),
            "mint a new agent token in the brain (dashboard, or POST /api/v1/projects/<slug>/agents) and put it in Z4J_TOKEN_FILE (or Z4J_TOKEN); tokens cannot be recovered".into(),
        ),
        4403 if !after_hello => (
            "the brain refused this host's IP address (close 4403 before the hello)".into(),
            "add this host's address to the brain's Z4J_AGENT_IP_ALLOWLIST".into(),
        ),
        4403 => match skew {
            Some(s) if s.abs() > FAIL_SKEW_SECONDS => (
                format!("the brain refused the signed frame (close 4403): this host's clock is {s:.0} s away from the brain's, beyond the 60 s the brain allows"),
                "fix time synchronisation on this host or the brain (timedatectl set-ntp true, chrony)".into(),
            ),
            _ => (
                "the brain refused the signed frame (close 4403): the HMAC secret does not match this project".into(),
                "copy the project's hmac_secret (returned when the agent was minted; every agent of a project shares it) into Z4J_HMAC_SECRET_FILE (or Z4J_HMAC_SECRET); if the brain's Z4J_SECRET changed, mint a new token and secret".into(),
            ),
        },
        4003 => (
            "the brain closed the session (4003): the agent was revoked or its project archived".into(),
            "mint a new agent in an active project and update Z4J_TOKEN_FILE and Z4J_HMAC_SECRET_FILE".into(),
        ),
        4426 | 4427 => (
            format!("the brain refused the protocol version (close {code})"),
            "upgrade z4j-agentd or the brain so both speak protocol 2".into(),
        ),
        4429 => (
            "the brain rate-limited the connection or the agent has 64 worker slots in use (close 4429)".into(),
            "wait a minute and try again; if it persists, check how many processes share this agent token".into(),
        ),
        4002 => (
            "another doctor took the doctor's slot while it ran (close 4002)".into(),
            "run one doctor at a time".into(),
        ),
        _ => (
            format!("the brain closed the connection with {code}: {}", describe_close(code)),
            "check the brain's log around this time for the reason".into(),
        ),
    }
}

/// Reads the brain's frames until it acknowledges `frame_id` with a frame
/// that verifies. Returns how many commands the brain pushed meanwhile:
/// pending commands go to every new connection, and the doctor leaves them
/// for the daemon and the brain's timeout.
pub(super) async fn await_ack(
    ws: &mut Ws,
    verifier: &mut Verifier,
    frame_id: &str,
    skew: Option<f64>,
) -> Result<u64, Failure> {
    let mut pushed_commands = 0u64;
    loop {
        let bytes =
            match ws.next().await {
                None => return Err(Failure::new(
                    "the brain closed the connection after the signed frame without a close code",
                    "check the brain's log",
                )),
                Some(Err(e)) => {
                    return Err(Failure::new(
                        format!("the connection failed after the signed frame: {e}"),
                        "check the brain's log and any proxy in between",
                    ))
                }
                Some(Ok(Message::Close(f))) => {
                    let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Err(Failure::closed(code, skew, true));
                }
                Some(Ok(Message::Binary(b))) => b.to_vec(),
                Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                Some(Ok(_)) => continue,
            };
        let inbound = verifier
            .verify(&bytes, OffsetDateTime::now_utc())
            .map_err(|e| {
                Failure::new(
                    format!("a frame from the brain failed verification: {e}"),
                    "the brain signs with the project's secret: check Z4J_HMAC_SECRET_FILE holds this project's hmac_secret, and this host's clock",
                )
            })?;
        match inbound.frame_type.as_str() {
            "event_batch_ack"
                if inbound.payload.get("acked_id").and_then(Value::as_str) == Some(frame_id) =>
            {
                return Ok(pushed_commands)
            }
            "command" => pushed_commands += 1,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_name_the_cause() {
        assert!(close_advice(4401, None, false).0.contains("token"));
        assert!(close_advice(4403, None, true).0.contains("HMAC secret"));
        assert!(close_advice(4403, Some(90.0), true).0.contains("clock"));
        assert!(close_advice(4403, None, false).0.contains("IP"));
        assert!(close_advice(4426, None, false).1.contains("upgrade"));
    }

    #[test]
    fn a_close_keeps_its_code() {
        let f = Failure::closed(4401, None, false);
        assert_eq!(f.close_code, Some(4401));
        assert!(f.fix.contains("Z4J_TOKEN_FILE"));
        assert_eq!(Failure::new("m", "f").close_code, None);
    }
}
