//! A local agent's handshake, as the brain does it: the WebSocket upgrade
//! at `/ws/agent` with the bearer token, then the unsigned `hello` and
//! `hello_ack`. Refusals are close codes the agent's own backoff knows:
//! 4401 (token), 4400 (not a `hello`), 4426 (protocol version), 4403 (its
//! frames failed the signature check lately), 4429 (too many
//! connections), and 1013 with a reason while the daemon has never
//! learnt from the brain who this agent is.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::{digest, Gateway, TokenDigest, MAX_FRAME_BYTES};
use crate::protocol::{self, SessionBinding, Value};
use crate::stats::Stats;

/// An agent's connection.
pub(super) type AgentWs = WebSocketStream<TcpStream>;

/// Time allowed for the upgrade, and then for the `hello`.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The path z4j agents connect to.
pub const PATH: &str = "/ws/agent";

/// An agent whose `hello` was accepted.
pub(super) struct Established {
    pub(super) ws: AgentWs,
    pub(super) token: TokenDigest,
    /// The `hello` payload.
    pub(super) hello: Value,
    /// `hello.worker_id` (empty without one).
    pub(super) worker_id: String,
    /// The session as both sides sign it.
    pub(super) binding: SessionBinding,
    /// The `hello_ack` to send, once the agent is registered: commands
    /// for it may follow at once.
    pub(super) hello_ack: Vec<u8>,
}

fn ws_config() -> WebSocketConfig {
    // One byte over the brain's frame limit reaches the session, which
    // closes with 4400 as the brain does; anything longer is not buffered.
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES + 1))
        .max_frame_size(Some(MAX_FRAME_BYTES + 1))
}

/// The upgrade: only at [`PATH`]; returns the `Authorization` header.
async fn upgrade(stream: TcpStream) -> Option<(AgentWs, Option<String>)> {
    let mut auth = None;
    // The callback's type is tungstenite's; its error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != PATH {
            let mut e = ErrorResponse::new(Some(format!(
                "z4j-agentd's gateway serves z4j agents at {PATH}; set Z4J_BRAIN_URL to http://<this address> without a path\n"
            )));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(resp)
    };
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())),
    )
    .await;
    match accepted {
        Ok(Ok(ws)) => Some((ws, auth)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "gateway: WebSocket upgrade failed");
            None
        }
        Err(_) => None,
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Closes `ws` with `code` and `reason` (at most 123 bytes), counted, and
/// waits briefly for the agent's side of the close.
pub(super) async fn close(ws: &mut AgentWs, stats: &Stats, code: u16, reason: &str) {
    stats.gateway.closed(code);
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: close_reason(reason).into(),
    };
    if ws.close(Some(frame)).await.is_ok() {
        linger(ws).await;
    }
}

/// After the daemon's close frame: reads (and drops) what the agent still
/// sends until its own close frame or for at most a second, so the socket
/// is not reset under the close frame while the agent writes.
pub(super) async fn linger<S>(frames: &mut S)
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = frames.next().await {}
    })
    .await;
}

/// `reason` cut to what a close frame holds (123 bytes), on a character
/// boundary.
pub(super) fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// A connection over the cap: the brain's 4429.
pub(super) async fn refuse_full(stream: TcpStream, stats: &Stats, max: usize) {
    if let Some((mut ws, _)) = upgrade(stream).await {
        tracing::warn!(
            max,
            "gateway: refused a z4j agent connection: Z4J_GATEWAY_MAX_CONNECTIONS are open"
        );
        close(
            &mut ws,
            stats,
            4429,
            &format!("z4j-agentd gateway holds {max} connections (Z4J_GATEWAY_MAX_CONNECTIONS)"),
        )
        .await;
    }
}

/// Why a `hello` is refused: the close code and the reason.
type Refused = (u16, String);

/// Checks the first message as the brain does: a `hello` with an object
/// payload and the required strings (4400), protocol version 2 (4426).
/// Returns the payload.
pub(super) fn check_hello(msg: &[u8]) -> Result<Value, Refused> {
    let bad = |why: &str| (4400, format!("first message must be a hello: {why}"));
    let mut frame = protocol::parse_unsigned(msg).map_err(|_| bad("not a JSON object"))?;
    if frame.get("type").and_then(Value::as_str) != Some("hello") {
        return Err(bad("its type is not \"hello\""));
    }
    let payload = match frame.remove("payload") {
        Some(p @ Value::Map(_)) => p,
        _ => return Err(bad("no payload object")),
    };
    let short = |k: &str, max: usize| {
        payload
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| s.chars().count() <= max)
    };
    for (key, max) in [
        ("protocol_version", 40),
        ("agent_version", 40),
        ("framework", 40),
    ] {
        if !short(key, max) {
            return Err(bad(&format!(
                "payload.{key} must be a string of at most {max}"
            )));
        }
    }
    for (key, max) in [("worker_id", 128), ("worker_role", 32)] {
        match payload.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Str(v)) if v.chars().count() <= max => {}
            Some(_) => {
                return Err(bad(&format!(
                    "payload.{key} must be a string of at most {max} or null"
                )))
            }
        }
    }
    for key in ["engines", "schedulers", "runtime_features"] {
        match payload.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items))
                if items.len() <= 64 && items.iter().all(|i| i.as_str().is_some()) => {}
            Some(_) => {
                return Err(bad(&format!(
                    "payload.{key} must be a list of at most 64 strings"
                )))
            }
        }
    }
    if payload.get("protocol_version").and_then(Value::as_str) != Some("2") {
        return Err((
            4426,
            "z4j-agentd speaks protocol version 2; upgrade the z4j agent".into(),
        ));
    }
    Ok(payload)
}

/// The next text or binary message, within the handshake timeout.
async fn first_message(ws: &mut AgentWs) -> Option<Vec<u8>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match ws.next().await? {
                Ok(Message::Text(t)) => return Some(t.as_bytes().to_vec()),
                Ok(Message::Binary(b)) => return Some(b.to_vec()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The `hello_ack` the brain would send, for this session.
fn hello_ack(binding: &SessionBinding, brain_version: &str) -> Vec<u8> {
    let mut p = Value::empty_map();
    p.insert("protocol_version", "2");
    p.insert("brain_version", brain_version);
    p.insert("agent_id", binding.agent_id.as_str());
    p.insert("project_id", binding.project_id.as_str());
    p.insert("session_id", binding.session_id.as_str());
    p.insert(
        "heartbeat_interval_seconds",
        super::translate::HEARTBEAT_INTERVAL_SECONDS,
    );
    p.insert("max_frame_size_bytes", MAX_FRAME_BYTES as u64);
    let mut f = Value::empty_map();
    f.insert("v", 2u64);
    f.insert("type", "hello_ack");
    f.insert("id", protocol::new_frame_id("hack_"));
    f.insert("ts", protocol::format_ts(OffsetDateTime::now_utc()));
    f.insert("payload", p);
    let mut out = Vec::with_capacity(512);
    protocol::canonical::write_value_lossy(&f, &mut out);
    out
}

/// The handshake of one connection: its agent, whose `hello` is accepted
/// (the session sends the `hello_ack`), or `None` (closed with the code
/// that says why).
pub(super) async fn establish(
    stream: TcpStream,
    peer: SocketAddr,
    gateway: &Gateway,
    stats: &Stats,
) -> Option<Established> {
    let (mut ws, auth) = upgrade(stream).await?;
    let Some(token) = bearer(auth.as_deref()) else {
        tracing::warn!(%peer, "gateway: refused a z4j agent without a bearer token (4401)");
        close(&mut ws, stats, 4401, "no bearer token: set Z4J_TOKEN").await;
        return None;
    };
    match gateway.accepts(token) {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%peer, "gateway: refused a z4j agent whose token is neither Z4J_TOKEN nor in Z4J_GATEWAY_TOKENS_FILE (4401)");
            close(
                &mut ws,
                stats,
                4401,
                "unknown agent token: use the daemon's token or add it to Z4J_GATEWAY_TOKENS_FILE",
            )
            .await;
            return None;
        }
        Err(why) => {
            // The daemon's fault, not the agent's: retry later, not the
            // long backoff of a bad token.
            tracing::warn!(%peer, "gateway: asked a z4j agent to retry later: Z4J_GATEWAY_TOKENS_FILE cannot be used: {why} (1013)");
            close(
                &mut ws,
                stats,
                1013,
                "z4j-agentd cannot read its gateway tokens file; see its log",
            )
            .await;
            return None;
        }
    }
    let token = digest(token);
    let Some(first) = first_message(&mut ws).await else {
        close(&mut ws, stats, 4400, "no hello within 10 s").await;
        return None;
    };
    let hello = match check_hello(&first) {
        Ok(h) => h,
        Err((code, reason)) => {
            tracing::warn!(%peer, code, "gateway: refused a z4j agent's hello: {reason}");
            close(&mut ws, stats, code, &reason).await;
            return None;
        }
    };
    let worker_id = hello
        .get("worker_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if gateway.is_suspect(&token, &worker_id) {
        tracing::warn!(%peer, worker_id, "gateway: refused a z4j agent whose frames failed the signature check lately: its HMAC secret is not this project's (4403)");
        close(&mut ws, stats, 4403, "frame signatures failed: set Z4J_HMAC_SECRET to the project's hmac_secret and restart the agent").await;
        return None;
    }
    let u = stats.uplink();
    // Over long-poll the brain names the agent and project but not its
    // version (there is no hello_ack): agents are served all the same.
    let brain_version = u.brain_version.unwrap_or_else(|| "unknown".to_string());
    let (Some(agent_id), Some(project_id)) = (u.agent_id, u.project_id) else {
        tracing::info!(%peer, worker_id, "gateway: asked a z4j agent to retry later: z4j-agentd has not reached the brain yet, so it does not know the agent's identity (1013)");
        close(
            &mut ws,
            stats,
            1013,
            "z4j-agentd has not reached the brain yet; retry later",
        )
        .await;
        return None;
    };
    let binding = SessionBinding::new(agent_id, project_id, uuid::Uuid::new_v4().to_string());
    let hello_ack = hello_ack(&binding, &brain_version);
    Some(Established {
        ws,
        token,
        hello,
        worker_id,
        binding,
        hello_ack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_fits_a_close_frame_on_a_character_boundary() {
        assert_eq!(close_reason("short"), "short");
        let r = close_reason(&"é".repeat(100));
        assert!(r.len() <= 123 && r.len() >= 122, "{}", r.len());
        assert!(r.chars().all(|c| c == 'é'));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("  bearer   abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn a_hello_is_checked_as_the_brain_checks_it() {
        let ok = br#"{"v":2,"type":"hello","id":"h","payload":{"protocol_version":"2","agent_version":"1.13.0","framework":"celery","engines":["celery"]}}"#;
        assert!(check_hello(ok).is_ok());
        let code = |m: &[u8]| check_hello(m).unwrap_err().0;
        assert_eq!(code(b"[1]"), 4400);
        assert_eq!(code(br#"{"type":"heartbeat","payload":{}}"#), 4400);
        assert_eq!(
            code(br#"{"type":"hello","payload":{"protocol_version":"2","framework":"x"}}"#),
            4400
        );
        let many: Vec<String> = (0..65).map(|i| format!("\"e{i}\"")).collect();
        let too_many = format!(
            r#"{{"type":"hello","payload":{{"protocol_version":"2","agent_version":"1","framework":"x","engines":[{}]}}}}"#,
            many.join(",")
        );
        assert_eq!(code(too_many.as_bytes()), 4400);
        let long_worker = format!(
            r#"{{"type":"hello","payload":{{"protocol_version":"2","agent_version":"1","framework":"x","worker_id":"{}"}}}}"#,
            "w".repeat(129)
        );
        assert_eq!(code(long_worker.as_bytes()), 4400);
        assert_eq!(
            code(br#"{"type":"hello","payload":{"protocol_version":"3","agent_version":"1","framework":"x"}}"#),
            4426
        );
    }

    #[test]
    fn the_hello_ack_carries_the_brains_identity_and_limits() {
        let b = SessionBinding::new("a-1", "p-1", "s-1");
        let ack = protocol::parse_unsigned(&hello_ack(&b, "1.13.0")).unwrap();
        let p = ack.get("payload").unwrap();
        assert_eq!(ack.get("type").and_then(Value::as_str), Some("hello_ack"));
        for (k, v) in [
            ("agent_id", "a-1"),
            ("project_id", "p-1"),
            ("session_id", "s-1"),
            ("brain_version", "1.13.0"),
            ("protocol_version", "2"),
        ] {
            assert_eq!(p.get(k).and_then(Value::as_str), Some(v), "{k}");
        }
        assert_eq!(
            p.get("max_frame_size_bytes").and_then(Value::as_u64),
            Some(1_048_576)
        );
        assert_eq!(
            p.get("heartbeat_interval_seconds").and_then(Value::as_u64),
            Some(10)
        );
    }
}
