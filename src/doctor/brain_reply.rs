//! What the brain answers to the doctor's session, explained: a refused
//! handshake, its reply to the signed frame (the acknowledgement we wait
//! for, a close, or a frame that fails verification), each with the fix.
//!
//! The doctor reads brain messages only through the uplink's one reader
//! ([`next_received`], [`read_signed`]) and explains a close only through
//! the uplink's one close-code table ([`close::diagnose`], on the doctor's
//! slot); this file only turns their answers into what the report says.
//! A 4403 is told apart by when it came (before the `hello`: this host's
//! IP; after: the signature, or the clock when the skew from `hello_ack`
//! is past the brain's limit).

use time::OffsetDateTime;

use crate::protocol::Verifier;
use crate::uplink::close::{self, CloseContext};
use crate::uplink::connect::Ws;
use crate::uplink::error::UplinkError;
use crate::uplink::reader::{next_received, read_signed, BrainMessage, Received};

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
        let ctx = CloseContext {
            after_hello,
            skew,
            doctor_slot: true,
        };
        let d = close::diagnose(code, ctx);
        Failure {
            message: d.message,
            fix: d.fix,
            close_code: Some(code),
        }
    }

    /// The handshake failed: a close is explained by its code; anything
    /// else (no `hello_ack`, a malformed one, a lost connection) means the
    /// URL may not lead to a brain.
    pub(super) fn handshake(e: &UplinkError) -> Self {
        match e.close_code() {
            Some(code) => Failure::closed(code, None, false),
            None => Failure::new(
                e.to_string(),
                "check the brain's log; the URL must point at a z4j brain (the path /ws/agent is added)",
            ),
        }
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
            match next_received(ws).await {
                Received::Frame(bytes) => bytes,
                Received::Closed(code) => return Err(Failure::closed(code, skew, true)),
                // (`next_received` passes over control frames.)
                Received::Ended | Received::Control => return Err(Failure::new(
                    "the brain closed the connection after the signed frame without a close code",
                    "check the brain's log",
                )),
                Received::Lost(e) => {
                    return Err(Failure::new(
                        format!("the connection failed after the signed frame: {e}"),
                        "check the brain's log and any proxy in between",
                    ))
                }
            };
        match read_signed(verifier, &bytes, OffsetDateTime::now_utc()) {
            Err(e) => return Err(Failure::new(
                format!("a frame from the brain failed verification: {e}"),
                "the brain signs with the project's secret: check Z4J_HMAC_SECRET_FILE holds this project's hmac_secret, and this host's clock",
            )),
            Ok(BrainMessage::Ack { acked_id, .. }) if acked_id.as_deref() == Some(frame_id) => {
                return Ok(pushed_commands)
            }
            Ok(BrainMessage::Command { .. }) => pushed_commands += 1,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_explained_on_the_doctors_slot() {
        let f = Failure::closed(4401, None, false);
        assert_eq!(f.close_code, Some(4401));
        assert!(f.message.contains("token"), "{}", f.message);
        assert!(f.fix.contains("Z4J_TOKEN_FILE"));
        assert!(Failure::closed(4403, None, false).message.contains("IP"));
        assert!(Failure::closed(4403, None, true)
            .message
            .contains("HMAC secret"));
        assert!(Failure::closed(4403, Some(90.0), true)
            .message
            .contains("clock"));
        // A 4002 on the doctor's slot is another doctor, not the daemon.
        assert!(Failure::closed(4002, None, true)
            .message
            .contains("another doctor"));
        assert_eq!(Failure::new("m", "f").close_code, None);
    }

    #[test]
    fn a_refused_handshake_keeps_the_uplinks_words() {
        let closed = Failure::handshake(&UplinkError::HandshakeClosed { code: 4403 });
        assert_eq!(closed.close_code, Some(4403));
        assert!(closed.message.contains("IP address"), "{}", closed.message);
        let ended = Failure::handshake(&UplinkError::HandshakeEnded);
        assert_eq!(ended.close_code, None);
        assert_eq!(
            ended.message,
            "the brain closed the connection during the handshake"
        );
        assert!(ended.fix.contains("/ws/agent"));
    }
}
