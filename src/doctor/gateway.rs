//! The `gateway` probe: when `Z4J_GATEWAY_ADDR` is set, does the running
//! daemon's gateway answer a z4j agent's handshake with the daemon's own
//! token, as a local z4j agent would see it?
//!
//! * `hello_ack`: ok, with the agent and project ids it hands out;
//! * close 1013: a warning, the daemon has not reached the brain yet (local
//!   agents are told to retry later);
//! * any other close: a failure naming the code and the reason;
//! * nothing listening: a failure when a daemon answered on the socket (it
//!   runs without the gateway, or with another address), else a warning,
//!   with whether the address is free for `run` to bind.
//!
//! The probe's `hello` declares nothing (no engine, no capability), so the
//! daemon's advertisement to the brain does not change, and it leaves at
//! once after the `hello_ack`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::socket::DaemonView;
use super::Finding;
use crate::config::Config;
use crate::protocol::Value;

/// Time allowed for the whole handshake.
pub(super) const TIMEOUT: Duration = Duration::from_secs(5);

/// What the gateway answered.
enum Answer {
    Ack(Value),
    Closed(u16, String),
    Refused(std::io::Error),
    Other(String),
}

/// Runs the probe against `addr`.
pub(super) async fn check(c: &Config, addr: SocketAddr, daemon: &DaemonView) -> Finding {
    let url = format!("ws://{addr}{}", crate::ingest::gateway::PATH);
    let answer = handshake(&url, c.uplink.token.expose()).await;
    let f = match answer {
        Answer::Ack(payload) => {
            let s = |k: &str| payload.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            Finding::ok(format!(
                "the gateway on {addr} answers z4j agents: hello_ack for agent {} of project {} (brain {}); local agents use Z4J_BRAIN_URL=http://{addr}",
                s("agent_id"),
                s("project_id"),
                s("brain_version")
            ))
            .detail("agent_id", s("agent_id"))
            .detail("project_id", s("project_id"))
        }
        Answer::Closed(1013, reason) => Finding::warn(
            format!("the gateway on {addr} tells local z4j agents to retry later (1013: {reason})"),
            "the daemon has not reached the brain since its spool was created; check the websocket probe below and the daemon's log",
        ),
        Answer::Closed(code, reason) => Finding::fail(
            format!("the gateway on {addr} closed the doctor's handshake with {code}: {reason}"),
            "see docs/gateway.md for what each close code means",
        )
        .detail("close_code", code as u64),
        Answer::Refused(e) if daemon.advertised.is_some() => Finding::fail(
            format!("nothing answers on {addr} ({e}), though z4j-agentd answers on its socket"),
            "the running daemon was started without this Z4J_GATEWAY_ADDR: set the same value for it and restart it",
        ),
        Answer::Refused(e) => match std::net::TcpListener::bind(addr) {
            Ok(_) => Finding::warn(
                format!("nothing answers on {addr} yet ({e}); the address is free for the daemon"),
                "start the daemon (systemctl start z4j-agentd, or z4j-agentd run)",
            ),
            Err(b) => Finding::fail(
                format!("nothing answers z4j agents on {addr}, and the daemon could not bind it: {b}"),
                "another program holds the address: choose another Z4J_GATEWAY_ADDR",
            ),
        },
        Answer::Other(why) => Finding::fail(
            format!("the gateway on {addr} did not answer as z4j-agentd: {why}"),
            "another program may listen there: choose another Z4J_GATEWAY_ADDR",
        ),
    };
    f.detail("addr", addr.to_string())
}

async fn handshake(url: &str, token: &str) -> Answer {
    let mut req = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return Answer::Other(e.to_string()),
    };
    match HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(v) => {
            req.headers_mut().insert("authorization", v);
        }
        Err(_) => return Answer::Other("the token cannot be sent in a header".into()),
    }
    let mut ws = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) => return Answer::Refused(e),
        Err(e) => return Answer::Other(e.to_string()),
    };
    let hello = format!(
        r#"{{"v":2,"type":"hello","id":"doctor","payload":{{"protocol_version":"2","agent_version":"{}","framework":"z4j-agentd-doctor","engines":[],"worker_id":"z4j-agentd-doctor-{}"}}}}"#,
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    if let Err(e) = ws.send(Message::Text(hello.into())).await {
        return Answer::Other(e.to_string());
    }
    let answer = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => break parsed(&b),
            Some(Ok(Message::Text(t))) => break parsed(t.as_bytes()),
            Some(Ok(Message::Close(Some(f)))) => {
                break Answer::Closed(u16::from(f.code), f.reason.to_string())
            }
            Some(Ok(Message::Close(None))) | None => {
                break Answer::Other("the connection closed without a close code".into())
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => break Answer::Other(e.to_string()),
        }
    };
    let _ = ws.close(None).await;
    answer
}

fn parsed(bytes: &[u8]) -> Answer {
    match crate::protocol::parse_unsigned(bytes) {
        Ok(f) if f.get("type").and_then(Value::as_str) == Some("hello_ack") => {
            Answer::Ack(f.get("payload").cloned().unwrap_or(Value::Null))
        }
        _ => Answer::Other("the first frame was not a hello_ack".into()),
    }
}
