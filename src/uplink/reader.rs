//! The one reader of what the brain sends: a socket item is first sorted
//! ([`Received`]: a frame, a close with its code, the end, a failure, or a
//! control frame), then a frame is parsed — unsigned for `hello_ack`
//! ([`parse_hello_ack`]), signed and verified for everything after
//! ([`read_signed`]) — into what the daemon acts on ([`BrainMessage`]).
//! The handshake, the session and the doctor all read through here.
//!
//! Invariant: nothing from the brain is acted on before it is verified
//! (HMAC and replay guard), except `hello_ack`, which the protocol leaves
//! unsigned because it carries the session the signatures bind.

use std::time::Duration;

use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::connect::Ws;
use super::error::UplinkError;
use crate::protocol::frames::{TYPE_COMMAND, TYPE_ERROR, TYPE_EVENT_BATCH_ACK, TYPE_HELLO_ACK};
use crate::protocol::{self, Value, Verifier, VerifyError};

/// Close code reported when the brain's close frame carried none.
pub const NO_CLOSE_CODE: u16 = 1005;

/// One item read from the brain's socket, before any parsing.
#[derive(Debug)]
pub enum Received {
    /// A text or binary message: a frame to parse.
    Frame(Vec<u8>),
    /// The brain closed, with this code ([`NO_CLOSE_CODE`] when it gave none).
    Closed(u16),
    /// The stream ended without a close frame.
    Ended,
    /// The connection failed.
    Lost(WsError),
    /// A ping, pong or raw frame: the brain is alive; nothing to read.
    Control,
}

impl Received {
    /// Sorts one item of the socket's stream.
    pub fn from_ws(item: Option<Result<Message, WsError>>) -> Self {
        match item {
            None => Received::Ended,
            Some(Err(e)) => Received::Lost(e),
            Some(Ok(Message::Binary(b))) => Received::Frame(b.to_vec()),
            Some(Ok(Message::Text(t))) => Received::Frame(t.as_bytes().to_vec()),
            Some(Ok(Message::Close(frame))) => Received::Closed(
                frame
                    .as_ref()
                    .map(|f| u16::from(f.code))
                    .unwrap_or(NO_CLOSE_CODE),
            ),
            Some(Ok(_)) => Received::Control,
        }
    }
}

/// The next item from the brain that is not a control frame.
pub async fn next_received(ws: &mut Ws) -> Received {
    loop {
        match Received::from_ws(ws.next().await) {
            Received::Control => continue,
            other => return other,
        }
    }
}

/// A verified frame from the brain, by what the daemon does with it.
#[derive(Debug, Clone, PartialEq)]
pub enum BrainMessage {
    /// `event_batch_ack`: the frame `acked_id` was processed.
    Ack {
        /// The acknowledged frame's id (`None` if the brain left it out).
        acked_id: Option<String>,
        /// Events stored, when the brain says.
        accepted: Option<u64>,
        /// Events not stored (duplicates or refused).
        rejected: u64,
    },
    /// `command`: run something locally (`id` is the command's id).
    Command { id: String, payload: Value },
    /// `error`: a problem the brain reports; `fatal` ends the session.
    Error {
        code: String,
        message: String,
        fatal: bool,
    },
    /// A type this daemon does not use.
    Other { frame_type: String },
}

impl BrainMessage {
    /// Classifies a verified frame.
    pub fn from_frame(frame: protocol::InboundFrame) -> Self {
        let text = |k: &str| {
            frame
                .payload
                .get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        match frame.frame_type.as_str() {
            TYPE_EVENT_BATCH_ACK => BrainMessage::Ack {
                acked_id: text("acked_id"),
                accepted: frame.payload.get("accepted").and_then(Value::as_u64),
                rejected: frame
                    .payload
                    .get("rejected")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            },
            TYPE_ERROR => BrainMessage::Error {
                code: text("code").unwrap_or_default(),
                message: text("message").unwrap_or_default(),
                fatal: frame
                    .payload
                    .get("fatal")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            TYPE_COMMAND => BrainMessage::Command {
                id: frame.id,
                payload: frame.payload,
            },
            _ => BrainMessage::Other {
                frame_type: frame.frame_type,
            },
        }
    }
}

/// Verifies a signed frame from the brain (received at `now`) and
/// classifies it.
pub fn read_signed(
    verifier: &mut Verifier,
    bytes: &[u8],
    now: OffsetDateTime,
) -> Result<BrainMessage, VerifyError> {
    verifier.verify(bytes, now).map(BrainMessage::from_frame)
}

/// What the brain told us in `hello_ack`.
#[derive(Debug, Clone)]
pub struct HelloAck {
    pub agent_id: String,
    pub project_id: String,
    pub session_id: String,
    pub heartbeat_interval: Duration,
    pub max_frame_bytes: usize,
    pub brain_version: String,
    /// Brain clock minus ours, seconds.
    pub clock_skew_seconds: Option<f64>,
}

/// Heartbeat interval assumed when the brain announces none (or a
/// nonsensical one).
const DEFAULT_HEARTBEAT_SECONDS: u64 = 10;
/// Smallest frame limit believed: below it, the brain's value is ignored.
const MIN_MAX_FRAME_BYTES: usize = 16 * 1024;

/// Parses the brain's answer to `hello`, received at `received_at`.
pub fn parse_hello_ack(bytes: &[u8], received_at: OffsetDateTime) -> Result<HelloAck, UplinkError> {
    let ack = protocol::parse_unsigned(bytes).map_err(UplinkError::BadHelloAck)?;
    let frame_type = ack.get("type").and_then(Value::as_str);
    if frame_type != Some(TYPE_HELLO_ACK) {
        return Err(UplinkError::NotHelloAck(
            frame_type.unwrap_or("?").to_string(),
        ));
    }
    let p = ack
        .get("payload")
        .ok_or(UplinkError::HelloAckWithout("payload"))?;
    let field = |k: &'static str| -> Result<String, UplinkError> {
        p.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(UplinkError::HelloAckWithout(k))
    };
    if let Some(v) = p.get("protocol_version").and_then(Value::as_str) {
        if v != protocol::PROTOCOL_VERSION {
            return Err(UplinkError::ProtocolVersion(v.to_string()));
        }
    }
    let clock_skew_seconds = ack
        .get("ts")
        .and_then(Value::as_str)
        .and_then(protocol::parse_iso8601)
        .map(|brain| (brain - received_at).as_seconds_f64());
    Ok(HelloAck {
        agent_id: field("agent_id")?,
        project_id: field("project_id")?,
        session_id: field("session_id")?,
        heartbeat_interval: Duration::from_secs(
            p.get("heartbeat_interval_seconds")
                .and_then(Value::as_u64)
                .filter(|s| (1..=3600).contains(s))
                .unwrap_or(DEFAULT_HEARTBEAT_SECONDS),
        ),
        max_frame_bytes: p
            .get("max_frame_size_bytes")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .filter(|n| *n >= MIN_MAX_FRAME_BYTES)
            .unwrap_or(protocol::DEFAULT_MAX_FRAME_BYTES),
        brain_version: p
            .get("brain_version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        clock_skew_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    #[test]
    fn socket_items_are_sorted() {
        let close = |code: Option<u16>| {
            Received::from_ws(Some(Ok(Message::Close(code.map(|c| CloseFrame {
                code: CloseCode::from(c),
                reason: "".into(),
            })))))
        };
        assert!(matches!(close(Some(4401)), Received::Closed(4401)));
        assert!(matches!(close(None), Received::Closed(NO_CLOSE_CODE)));
        assert!(matches!(Received::from_ws(None), Received::Ended));
        assert!(matches!(
            Received::from_ws(Some(Ok(Message::Ping(Vec::new().into())))),
            Received::Control
        ));
        assert!(
            matches!(Received::from_ws(Some(Ok(Message::text("{}")))), Received::Frame(b) if b == b"{}")
        );
        assert!(matches!(
            Received::from_ws(Some(Err(WsError::ConnectionClosed))),
            Received::Lost(_)
        ));
    }

    fn frame(frame_type: &str, payload: Value) -> protocol::InboundFrame {
        protocol::InboundFrame {
            frame_type: frame_type.into(),
            id: "f1".into(),
            seq: 1,
            ts: "2026-01-01T00:00:00Z".into(),
            payload,
        }
    }

    #[test]
    fn verified_frames_are_classified() {
        let mut p = Value::empty_map();
        p.insert("acked_id", "ev_1");
        p.insert("rejected", 2i64);
        assert_eq!(
            BrainMessage::from_frame(frame("event_batch_ack", p)),
            BrainMessage::Ack {
                acked_id: Some("ev_1".into()),
                accepted: None,
                rejected: 2
            }
        );
        let mut p = Value::empty_map();
        p.insert("code", "protocol_incompatible");
        p.insert("fatal", true);
        assert_eq!(
            BrainMessage::from_frame(frame("error", p)),
            BrainMessage::Error {
                code: "protocol_incompatible".into(),
                message: String::new(),
                fatal: true
            }
        );
        assert!(matches!(
            BrainMessage::from_frame(frame("command", Value::empty_map())),
            BrainMessage::Command { id, .. } if id == "f1"
        ));
        assert!(matches!(
            BrainMessage::from_frame(frame("registry_delta", Value::empty_map())),
            BrainMessage::Other { frame_type } if frame_type == "registry_delta"
        ));
    }

    #[test]
    fn hello_ack_is_parsed_and_checked() {
        let now = OffsetDateTime::now_utc();
        let ok = br#"{"v":2,"id":"h","ts":"2026-11-22T23:26:42Z","type":"hello_ack","payload":{"protocol_version":"2","agent_id":"a","project_id":"p","session_id":"s","heartbeat_interval_seconds":0,"max_frame_size_bytes":100}}"#;
        let ack = parse_hello_ack(ok, now).unwrap();
        assert_eq!(ack.session_id, "s");
        assert_eq!(
            ack.heartbeat_interval,
            Duration::from_secs(10),
            "0 is ignored"
        );
        assert_eq!(ack.max_frame_bytes, protocol::DEFAULT_MAX_FRAME_BYTES);
        assert!(ack.clock_skew_seconds.is_some());
        let v3 = br#"{"type":"hello_ack","payload":{"protocol_version":"3"}}"#;
        assert!(
            matches!(parse_hello_ack(v3, now), Err(UplinkError::ProtocolVersion(v)) if v == "3")
        );
        let no_session = br#"{"type":"hello_ack","payload":{"agent_id":"a","project_id":"p"}}"#;
        assert_eq!(
            parse_hello_ack(no_session, now).unwrap_err().to_string(),
            "hello_ack without session_id"
        );
        let other = br#"{"type":"error","payload":{}}"#;
        assert_eq!(
            parse_hello_ack(other, now).unwrap_err().to_string(),
            "expected hello_ack, got \"error\""
        );
    }
}
