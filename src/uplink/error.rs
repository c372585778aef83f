//! Why a connection attempt or a session with the brain failed, typed, with
//! the backoff class each failure waits by ([`UplinkError::class`]) and the
//! sentence the operator reads (its `Display`, shown in the log and as
//! `last_error`). No variant holds a secret: the token and the HMAC secret
//! never reach an error.

use tokio_tungstenite::tungstenite::Error as WsError;

use super::backoff::FailureClass;
use super::close::close_meaning;
use crate::protocol::{VerifyError, PROTOCOL_VERSION};
use crate::spool::SpoolError;

/// A failed attempt or session.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    // --------------------------------------------------------- dialling
    /// The brain URL is not one a WebSocket request can be built from.
    #[error("bad brain URL: {0}")]
    BadUrl(WsError),
    /// The token cannot travel in an HTTP header.
    #[error("the token contains characters that cannot be sent in a header")]
    TokenNotHeaderSafe,
    /// The TLS client configuration (trust store, CA file) could not be built.
    #[error("{0}")]
    TlsConfig(String),
    /// TCP, TLS and the upgrade took too long.
    #[error("no answer from {url} within {secs}s")]
    ConnectTimeout { url: String, secs: u64 },
    /// The TCP connection opened but the upgrade was never answered.
    #[error("{url} took the connection but did not answer the WebSocket upgrade within {secs}s; a proxy in front of the brain may hold WebSocket upgrades")]
    UpgradeUnanswered { url: String, secs: u64 },
    /// Something answered plain HTTP instead of upgrading.
    #[error("{url} answered HTTP {status} instead of a WebSocket upgrade; {}", http_hint(*.status))]
    HttpAnswer { url: String, status: u16 },
    /// The TLS handshake failed; the text says what to change.
    #[error("{0}")]
    Tls(String),
    /// The brain's address could not be reached.
    #[error("cannot reach {url}: {error}")]
    Unreachable { url: String, error: std::io::Error },
    /// Any other WebSocket failure while dialling.
    #[error("WebSocket to {url} failed: {error}")]
    Dial { url: String, error: WsError },

    // -------------------------------------------------------- handshake
    #[error("sending hello failed: {0}")]
    SendHello(WsError),
    #[error("the brain closed the connection during the handshake")]
    HandshakeEnded,
    #[error("handshake failed: {0}")]
    HandshakeLost(WsError),
    /// The brain closed during the handshake with a code.
    #[error("the brain closed the handshake with {code}: {}", close_meaning(*.code).meaning)]
    HandshakeClosed { code: u16 },
    #[error("no hello_ack within {secs}s")]
    HelloTimeout { secs: u64 },
    #[error("bad hello_ack: {0}")]
    BadHelloAck(VerifyError),
    #[error("expected hello_ack, got {0:?}")]
    NotHelloAck(String),
    /// A field the daemon needs is missing from `hello_ack`.
    #[error("hello_ack without {0}")]
    HelloAckWithout(&'static str),
    #[error("the brain answered protocol version {0:?}; this daemon speaks {PROTOCOL_VERSION:?}")]
    ProtocolVersion(String),

    // ---------------------------------------------------------- session
    #[error("the brain closed the connection")]
    Ended,
    #[error("connection to the brain lost: {0}")]
    Lost(WsError),
    /// The brain closed the session with a code.
    #[error("the brain closed the connection with {code}: {}", close_meaning(*.code).meaning)]
    Closed { code: u16 },
    #[error("a frame from the brain failed verification ({0}); reconnecting")]
    Unverified(VerifyError),
    /// The brain sent an `error` frame marked fatal.
    #[error("the brain reported a fatal error {code}: {message}")]
    Fatal { code: String, message: String },
    #[error("sending to the brain failed: {0}")]
    SendFailed(WsError),
    /// The brain stopped reading: a send did not complete in time.
    #[error("the brain took no data for {secs} s; reconnecting")]
    NotReading { secs: u64 },
    /// The brain answered nothing, not even a ping, in time.
    #[error("the brain answered nothing, not even a WebSocket ping, for {secs} s; reconnecting")]
    Silent { secs: u64 },
    #[error("reading the spool failed: {0}")]
    SpoolRead(SpoolError),
    /// Deleting acknowledged events needs disk space (the WAL) too.
    #[error("the spool's disk is full, so events the brain acknowledged cannot be deleted; free space on the spool's filesystem (until then they stay in the spool and go again, and the brain stores them once)")]
    SpoolDiskFull,
    #[error("deleting acked events failed: {0}")]
    SpoolDelete(SpoolError),

    // -------------------------------------------------------- long-poll
    /// A long-poll request got no answer (network, TLS, timeout).
    #[error("long-poll {what} to {url} failed: {error}")]
    LongPollRequest {
        what: &'static str,
        url: String,
        error: String,
    },
    /// The brain, or something in front of it, answered a long-poll request
    /// with an HTTP error; `code` is the `error` of the brain's JSON body.
    #[error("long-poll {what} to {url} answered HTTP {status}: {}", longpoll_hint(*.status, code.as_deref()))]
    LongPollStatus {
        what: &'static str,
        url: String,
        status: u16,
        code: Option<String>,
        /// The answer's `Retry-After`, at most 60 s.
        retry_after: Option<std::time::Duration>,
    },
    /// `Z4J_TRANSPORT=auto`: the WebSocket upgrade was refused and
    /// long-poll failed too; both are said.
    #[error("{websocket}; HTTPS long-poll did not work either: {longpoll}")]
    NoTransport {
        websocket: Box<UplinkError>,
        longpoll: Box<UplinkError>,
    },
    /// A long-poll answer the daemon cannot read.
    #[error("long-poll {what}: {why}")]
    LongPollAnswer { what: &'static str, why: String },
}

/// What a long-poll HTTP error means and what to change.
fn longpoll_hint(status: u16, code: Option<&str>) -> &'static str {
    match (status, code) {
        (401, _) => "the brain refused the token; mint a new agent token and update Z4J_TOKEN_FILE",
        (403, Some("project_inactive")) => "the agent's project is archived in the brain; restore the project",
        (403, Some("ip_denied")) => "this host's address is not in the brain's agent IP allowlist",
        (403, _) => "a proxy or firewall in front of the brain refused the request",
        (404 | 405, _) => "this address has no long-poll endpoints: Z4J_BRAIN_URL is the brain's base URL, and a proxy must pass /api/v1/agent/",
        (409, _) => "the brain ended this long-poll session after a frame failed its checks (if it repeats, Z4J_HMAC_SECRET is not the project's hmac_secret or this host's clock is more than 60 s off)",
        (413, _) => "the request was larger than the brain takes; lower Z4J_LONGPOLL_MAX_BODY_BYTES or raise the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES",
        (422, _) => "the brain refused the request's form (the connect probe needs brain 1.7.1 or later)",
        (429, _) => "the brain's rate limit for agent connections (600 a minute per address) was reached",
        (503, _) => "the brain has no room for another long-poll session, or is unavailable; retrying later",
        _ => "check Z4J_BRAIN_URL and any proxy in front of the brain",
    }
}

/// Fatal `error` codes that mean the two sides cannot work together until
/// one is upgraded.
const INCOMPATIBLE_ERRORS: &[&str] = &[
    "scheduler_upgrade_required",
    "agent_incompatible",
    "protocol_incompatible",
];

impl UplinkError {
    /// How long to back off before trying again.
    pub fn class(&self) -> FailureClass {
        use UplinkError as E;
        match self {
            E::BadUrl(_) | E::ProtocolVersion(_) => FailureClass::Incompatible,
            E::TokenNotHeaderSafe => FailureClass::Auth,
            E::HttpAnswer { status: 401, .. } => FailureClass::Auth,
            E::HandshakeClosed { code } | E::Closed { code } => close_meaning(*code).class,
            E::BadHelloAck(_) | E::NotHelloAck(_) | E::HelloAckWithout(_) | E::Unverified(_) => {
                FailureClass::Protocol
            }
            E::Fatal { code, .. } if INCOMPATIBLE_ERRORS.contains(&code.as_str()) => {
                FailureClass::Incompatible
            }
            E::Fatal { .. } => FailureClass::Protocol,
            E::NoTransport { longpoll, .. } => longpoll.class(),
            E::LongPollStatus { status: 401, .. } => FailureClass::Auth,
            E::LongPollStatus {
                status: 403,
                code: Some(code),
                ..
            } if matches!(code.as_str(), "project_inactive" | "ip_denied") => FailureClass::Auth,
            E::LongPollStatus { status: 409, .. } | E::LongPollAnswer { .. } => {
                FailureClass::Protocol
            }
            _ => FailureClass::Connection,
        }
    }

    /// Whether the path to the brain answered the WebSocket upgrade in a
    /// way that says it cannot carry WebSockets (an HTTP answer other than
    /// 101, or none at all), so `Z4J_TRANSPORT=auto` tries long-poll. An
    /// answer asking for credentials (401, 407) or saying slow down (429)
    /// is not one: long-poll would get the same.
    pub fn refuses_upgrade(&self) -> bool {
        match self {
            UplinkError::HttpAnswer { status, .. } => !matches!(status, 401 | 407 | 429),
            UplinkError::UpgradeUnanswered { .. } => true,
            _ => false,
        }
    }

    /// Whether the WebSocket upgraded but the handshake then got nowhere:
    /// no `hello_ack`, the connection dropped or ended without a close code
    /// from the brain (a middlebox that passes the upgrade but not frames).
    pub fn lost_in_handshake(&self) -> bool {
        matches!(
            self,
            UplinkError::HelloTimeout { .. }
                | UplinkError::HandshakeEnded
                | UplinkError::HandshakeLost(_)
                | UplinkError::SendHello(_)
        )
    }

    /// The brain's close code, when it closed the connection.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            UplinkError::HandshakeClosed { code } | UplinkError::Closed { code } => Some(*code),
            _ => None,
        }
    }

    /// A failure to delete acknowledged events.
    pub(crate) fn spool_delete(e: SpoolError) -> Self {
        match e {
            SpoolError::DiskFull => UplinkError::SpoolDiskFull,
            e => UplinkError::SpoolDelete(e),
        }
    }
}

/// What to check when the brain's address answers plain HTTP.
fn http_hint(status: u16) -> &'static str {
    // The brain upgrades every request for its agent path and refuses a
    // bad token afterwards, with close 4401: an HTTP answer comes from a
    // wrong path or from something in front of the brain, never from a bad
    // token.
    match status {
        401 => "a proxy in front of the brain asks for credentials of its own",
        403..=405 => "the brain upgrades every request at its agent path, so the path is wrong or a proxy refused it: Z4J_BRAIN_URL is the brain's base URL (e.g. https://z4j.example.com, without /ws/agent), and a proxy must pass WebSocket upgrades (Upgrade and Connection headers)",
        _ => "check Z4J_BRAIN_URL and any proxy in front of the brain (it must pass WebSocket upgrades)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_classify_through_the_table() {
        assert_eq!(
            UplinkError::Closed { code: 4401 }.class(),
            FailureClass::Auth
        );
        assert_eq!(
            UplinkError::HandshakeClosed { code: 4426 }.class(),
            FailureClass::Incompatible
        );
        assert_eq!(
            UplinkError::Closed { code: 4002 }.class(),
            FailureClass::Connection
        );
        assert_eq!(UplinkError::Closed { code: 4002 }.close_code(), Some(4002));
        assert_eq!(UplinkError::Ended.close_code(), None);
    }

    #[test]
    fn operator_wording_is_kept() {
        assert_eq!(
            UplinkError::Closed { code: 4401 }.to_string(),
            "the brain closed the connection with 4401: the brain refused the token; mint a new agent token and update Z4J_TOKEN_FILE"
        );
        assert_eq!(
            UplinkError::HandshakeClosed { code: 4403 }.to_string(),
            "the brain closed the handshake with 4403: the brain refused a signature (wrong HMAC secret for this project, or a clock more than 60 s off) or this host's IP"
        );
        assert_eq!(
            UplinkError::ProtocolVersion("3".into()).to_string(),
            "the brain answered protocol version \"3\"; this daemon speaks \"2\""
        );
        assert_eq!(
            UplinkError::Silent { secs: 5 }.to_string(),
            "the brain answered nothing, not even a WebSocket ping, for 5 s; reconnecting"
        );
        let http = UplinkError::HttpAnswer {
            url: "ws://b/ws/agent".into(),
            status: 403,
        };
        assert!(http.to_string().starts_with(
            "ws://b/ws/agent answered HTTP 403 instead of a WebSocket upgrade; the brain upgrades"
        ));
        assert_eq!(http.class(), FailureClass::Connection);
    }

    #[test]
    fn fatal_errors_are_incompatible_only_for_version_codes() {
        let fatal = |code: &str| UplinkError::Fatal {
            code: code.into(),
            message: "m".into(),
        };
        assert_eq!(
            fatal("agent_incompatible").class(),
            FailureClass::Incompatible
        );
        assert_eq!(
            fatal("protocol_incompatible").class(),
            FailureClass::Incompatible
        );
        assert_eq!(fatal("internal").class(), FailureClass::Protocol);
        assert_eq!(
            fatal("x").to_string(),
            "the brain reported a fatal error x: m"
        );
    }
}
