//! The gateway (`Z4J_GATEWAY_ADDR`): a z4j agent speaks protocol v2 to the
//! daemon as it would to the brain. The agent here is a small one built on
//! the crate's own signer and verifier, framing as z4j-bare does
//! (`event_batch` with id `ev_<hex>`, `heartbeat` with `adapter_health`,
//! `command_ack` and `command_result`); the daemon forwards to the fake
//! brain over its one connection.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use support::fake_brain::{self, Behavior, FakeBrain};
use support::{brain_command, num, options, text, wait_for, wait_stats, TestDaemon};
use z4j_agentd::config::Options;
use z4j_agentd::protocol::{
    self, InboundFrame, SessionBinding, Signer, SigningKey, Value, Verifier,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The longest any one wait of these tests may take.
const WAIT: Duration = Duration::from_secs(10);
/// The gateway's frame limit (the brain's default).
const MAX_FRAME: usize = 1_048_576;

/// The test options with the gateway on a free loopback port.
fn gateway_options(brain_url: &str) -> Options {
    Options {
        gateway_addr: Some("127.0.0.1:0".into()),
        ..options(brain_url)
    }
}

/// A daemon with the gateway, started with `opts` and connected to its
/// brain; and the gateway's address.
async fn daemon_for(opts: Options) -> (TestDaemon, SocketAddr) {
    let d = TestDaemon::start(opts).await;
    support::wait_uplink_connected(&d.stats).await;
    let addr = d.gateway.expect("the gateway is on");
    (d, addr)
}

/// `serde_json` text as a protocol value.
fn v(j: serde_json::Value) -> Value {
    serde_json::from_value(j).unwrap()
}

/// The project's key, as the agent has it (`Z4J_HMAC_SECRET`).
fn key() -> SigningKey {
    SigningKey::from_base64(fake_brain::SECRET).unwrap()
}

/// A `hello` payload as z4j-bare sends it, for one engine and its actions.
fn hello_payload(worker_id: &str, engine: &str, actions: &[&str]) -> Value {
    v(serde_json::json!({
        "protocol_version": "2",
        "agent_version": "1.13.0",
        "framework": "bare",
        "engines": [engine],
        "schedulers": [],
        "capabilities": {engine: actions},
        "host": {"name": "testhost"},
        "worker_id": worker_id,
        "worker_role": "worker",
        "worker_pid": std::process::id(),
        "runtime_features": ["retry_by_reference"],
    }))
}

/// A task event as z4j-bare's Celery adapter sends it (its own UUIDv4 id).
fn task_event(task_id: &str) -> Value {
    v(serde_json::json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "engine": "celery",
        "kind": "task.received",
        "task_id": task_id,
        "occurred_at": protocol::format_ts(OffsetDateTime::now_utc()),
        "data": {"task_name": "app.tasks.add", "queue": "default", "worker": "celery@testhost"},
    }))
}

/// What the next message of a connection was.
enum Next {
    Data(Vec<u8>),
    Closed(u16, String),
}

/// The next text or binary message, or the close (code 1005 without one,
/// 1006 when the connection ended without a close frame).
async fn next_message(ws: &mut Ws) -> Next {
    next_message_within(ws, WAIT).await
}

/// [`next_message`], which must come within `within`.
async fn next_message_within(ws: &mut Ws, within: Duration) -> Next {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("the gateway answers within {within:?}"));
        match msg {
            Some(Ok(Message::Binary(b))) => return Next::Data(b.to_vec()),
            Some(Ok(Message::Text(t))) => return Next::Data(t.as_bytes().to_vec()),
            Some(Ok(Message::Close(f))) => {
                return match f {
                    Some(f) => Next::Closed(u16::from(f.code), f.reason.to_string()),
                    None => Next::Closed(1005, String::new()),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Next::Closed(1006, e.to_string()),
            None => return Next::Closed(1006, "the connection ended".into()),
        }
    }
}

/// Opens a WebSocket to the gateway with `Authorization: Bearer <token>`
/// (no header when `token` is `None`).
async fn open(addr: SocketAddr, token: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/ws/agent")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade in time")
        .expect("the gateway upgrades the connection");
    ws
}

/// What the gateway answered a `hello` with.
enum Answer {
    Ack(Box<Agent>),
    Closed(u16, String),
}

impl Answer {
    fn agent(self) -> Agent {
        match self {
            Answer::Ack(a) => *a,
            Answer::Closed(code, reason) => {
                panic!("expected hello_ack, the gateway closed with {code}: {reason}")
            }
        }
    }

    fn closed(self) -> (u16, String) {
        match self {
            Answer::Ack(a) => panic!("expected a close, got hello_ack {:?}", a.ack),
            Answer::Closed(code, reason) => (code, reason),
        }
    }
}

/// Connects with `token`, sends `first` as the first message (binary, as
/// z4j-bare does) and reads the answer.
async fn handshake_with(addr: SocketAddr, token: Option<&str>, first: Vec<u8>) -> Answer {
    say_hello(open(addr, token).await, first).await
}

/// Sends `first` on an upgraded connection and reads the answer.
async fn say_hello(mut ws: Ws, first: Vec<u8>) -> Answer {
    // A refused token is closed before the hello is read: the send may
    // already find the connection closing, which the answer then says.
    let _ = ws.send(Message::binary(first)).await;
    match next_message(&mut ws).await {
        Next::Closed(code, reason) => Answer::Closed(code, reason),
        Next::Data(bytes) => {
            let ack = protocol::parse_unsigned(&bytes).expect("hello_ack is a JSON object");
            assert_eq!(text(&ack, "type"), "hello_ack", "{ack:?}");
            let p = ack.get("payload").cloned().expect("hello_ack payload");
            let binding = SessionBinding::new(
                text(&p, "agent_id"),
                text(&p, "project_id"),
                text(&p, "session_id"),
            );
            Answer::Ack(Box::new(Agent {
                ws,
                signer: Signer::new(key(), binding.clone()),
                verifier: Verifier::new(key(), binding),
                ack: p,
            }))
        }
    }
}

/// The unsigned `hello` frame for `payload`.
fn hello_frame(payload: &Value) -> Vec<u8> {
    protocol::hello_frame(
        &protocol::new_frame_id("hello_"),
        &protocol::format_ts(OffsetDateTime::now_utc()),
        payload,
    )
}

/// Says `hello` for one celery worker with `token`.
async fn handshake(addr: SocketAddr, token: &str, worker_id: &str) -> Answer {
    let hello = hello_payload(worker_id, "celery", &["cancel_task"]);
    handshake_with(addr, Some(token), hello_frame(&hello)).await
}

/// A z4j agent past its `hello_ack`.
struct Agent {
    ws: Ws,
    signer: Signer,
    verifier: Verifier,
    /// The `hello_ack` payload.
    ack: Value,
}

impl Agent {
    fn binding(&self) -> SessionBinding {
        self.signer.binding().clone()
    }

    /// Sends a frame signed for this session.
    async fn send(&mut self, frame_type: &str, id: &str, payload: &Value) {
        let f = self.signer.sign_value(
            frame_type,
            id,
            payload,
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        self.send_raw(f).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::binary(bytes))
            .await
            .expect("the gateway takes the frame");
    }

    /// Sends an `event_batch` (id `ev_<hex>`); returns its frame id.
    async fn event_batch(&mut self, events: Vec<Value>) -> String {
        let id = protocol::new_frame_id("ev_");
        let mut p = Value::empty_map();
        p.insert("events", Value::Array(events));
        self.send("event_batch", &id, &p).await;
        id
    }

    /// The next frame, verified as the agent verifies the brain's.
    async fn frame(&mut self) -> InboundFrame {
        match next_message(&mut self.ws).await {
            Next::Data(bytes) => self
                .verifier
                .verify(&bytes, OffsetDateTime::now_utc())
                .expect("the gateway's frames verify under the session"),
            Next::Closed(code, reason) => panic!("closed with {code}: {reason}"),
        }
    }

    /// The next frame, which must be the `event_batch_ack` of `id`;
    /// returns its payload.
    async fn batch_ack(&mut self, id: &str) -> Value {
        let f = self.frame().await;
        assert_eq!(f.frame_type, "event_batch_ack", "{f:?}");
        assert_eq!(text(&f.payload, "acked_id"), id, "{f:?}");
        f.payload
    }

    /// How the gateway closes the session, skipping frames before the close.
    async fn closed(&mut self) -> (u16, String) {
        loop {
            if let Next::Closed(code, reason) = next_message(&mut self.ws).await {
                return (code, reason);
            }
        }
    }
}

/// Rows of the spool whose task id starts with `prefix` (read while the
/// daemon runs: SQLite readers do not block its writer).
fn spooled(spool: &Path, prefix: &str) -> i64 {
    let db =
        rusqlite::Connection::open_with_flags(spool, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    db.query_row(
        "SELECT count(*) FROM events WHERE CAST(body AS TEXT) LIKE ?1",
        [format!("%\"task_id\":\"{prefix}%")],
        |r| r.get(0),
    )
    .unwrap()
}

/// The event ids of `events`.
fn ids(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| text(e, "id").to_string()).collect()
}

/// The `closed_by_code` count of `code` in the daemon's `stats`.
fn closed_count(s: &Value, code: &str) -> u64 {
    s.get("gateway")
        .and_then(|g| g.get("closed_by_code"))
        .and_then(|c| c.get(code))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_acked_once_spooled_and_two_agents_reach_the_brain_in_one_frame() {
    // A slow brain with one frame in flight: while it works on the first
    // frame, what the agents send waits in the spool, and goes out together.
    let brain = FakeBrain::start(Behavior {
        ack_delay: Some(Duration::from_secs(3)),
        ..Behavior::default()
    })
    .await;
    let opts = Options {
        inflight_frames: Some("1".into()),
        ..gateway_options(&brain.url)
    };
    let (d, addr) = daemon_for(opts).await;
    let mut a = handshake(addr, fake_brain::TOKEN, "celery-a").await.agent();
    let mut b = handshake(addr, fake_brain::TOKEN, "celery-b").await.agent();

    // The agents' engine joins the daemon's advertisement: it says hello
    // to the brain again. Its frames are counted from then on.
    wait_for(10, "the daemon's hello with the agents' engine", || {
        brain
            .hellos()
            .last()
            .is_some_and(|h| support::strings_at(h, "engines") == ["celery"])
    })
    .await;
    support::wait_uplink_connected(&d.stats).await;
    let sessions = brain.seen.connections.load(Ordering::SeqCst);

    let prime = a.event_batch(vec![task_event("gw-prime-1")]).await;
    let ack = a.batch_ack(&prime).await;
    assert_eq!((num(&ack, "received"), num(&ack, "accepted")), (1, 1));
    wait_for(10, "the first frame at the brain", || {
        brain.seen.batches.load(Ordering::SeqCst) == 1
    })
    .await;

    let a_events: Vec<Value> = (0..3).map(|i| task_event(&format!("gw-a-{i}"))).collect();
    // One event the daemon refuses (no engine): received, not accepted.
    let mut invalid = task_event("gw-a-invalid");
    invalid.remove("engine");
    let mut a_sent = a_events.clone();
    a_sent.push(invalid);
    let b_events: Vec<Value> = (0..2).map(|i| task_event(&format!("gw-b-{i}"))).collect();
    let fa = a.event_batch(a_sent).await;
    let fb = b.event_batch(b_events.clone()).await;

    let ack = a.batch_ack(&fa).await;
    assert_eq!(
        (
            num(&ack, "received"),
            num(&ack, "accepted"),
            num(&ack, "rejected")
        ),
        (4, 3, 1),
        "{ack:?}"
    );
    assert_eq!(spooled(&d.spool, "gw-a-"), 3, "acked once in the spool");
    let ack = b.batch_ack(&fb).await;
    assert_eq!(
        (
            num(&ack, "received"),
            num(&ack, "accepted"),
            num(&ack, "rejected")
        ),
        (2, 2, 0),
        "{ack:?}"
    );
    assert_eq!(spooled(&d.spool, "gw-b-"), 2, "acked once in the spool");
    {
        let at_brain = brain.seen.task_ids.lock().unwrap();
        assert!(
            !at_brain
                .iter()
                .any(|t| t.starts_with("gw-a-") || t.starts_with("gw-b-")),
            "the acks are the daemon's, before the brain had the events: {at_brain:?}"
        );
    }

    let mut wanted = ids(&a_events);
    wanted.extend(ids(&b_events));
    wait_for(15, "both agents' events at the brain", || {
        let at_brain = brain.seen.event_ids.lock().unwrap();
        wanted.iter().all(|id| at_brain.contains(id))
    })
    .await;
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    let holding: Vec<&Vec<String>> = batches
        .iter()
        .filter(|b| b.iter().any(|id| wanted.contains(id)))
        .collect();
    assert_eq!(
        holding.len(),
        1,
        "two agent frames, one brain frame: {batches:?}"
    );
    let mut got = holding[0].clone();
    got.sort();
    wanted.sort();
    assert_eq!(got, wanted, "exactly the accepted events: {batches:?}");
    assert_eq!(
        brain.seen.connections.load(Ordering::SeqCst),
        sessions,
        "one brain session throughout"
    );
    assert!(
        brain.seen.verify_failures.lock().unwrap().is_empty(),
        "{:?}",
        brain.seen.verify_failures
    );
    drop((a, b));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_is_closed_with_4401_and_one_of_the_tokens_file_is_accepted() {
    use std::os::unix::fs::PermissionsExt;
    const LISTED: &str = "z4j-gateway-listed-token-8c1f";
    const UNKNOWN: &str = "z4j-gateway-unknown-token-5e2a";
    support::keep_secret("gateway listed token", LISTED);
    support::keep_secret("gateway unknown token", UNKNOWN);
    let brain = FakeBrain::start(Behavior::default()).await;
    let files = tempfile::tempdir().unwrap();
    let tokens = files.path().join("gateway-tokens");
    std::fs::write(&tokens, format!("# web hosts\n{LISTED}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let opts = Options {
        gateway_tokens_file: Some(tokens.clone()),
        ..gateway_options(&brain.url)
    };
    let (d, addr) = daemon_for(opts).await;

    let (code, reason) = handshake(addr, UNKNOWN, "celery-1").await.closed();
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.contains("Z4J_GATEWAY_TOKENS_FILE"), "{reason}");
    assert!(!reason.contains(UNKNOWN), "{reason}");
    let hello = hello_frame(&hello_payload("celery-1", "celery", &[]));
    let (code, reason) = handshake_with(addr, None, hello).await.closed();
    assert_eq!(code, 4401, "no bearer token: {reason}");

    let listed = handshake(addr, LISTED, "celery-1").await.agent();
    assert_eq!(text(&listed.ack, "agent_id"), fake_brain::AGENT_ID);
    assert_eq!(text(&listed.ack, "project_id"), fake_brain::PROJECT_ID);
    let own = handshake(addr, fake_brain::TOKEN, "celery-2").await.agent();
    assert_ne!(
        text(&own.ack, "session_id"),
        text(&listed.ack, "session_id"),
        "a session each"
    );
    let s = wait_stats(&d, 10, "two agents connected", |s| {
        s.get("gateway").map(|g| num(g, "connections")) == Some(2)
    })
    .await;
    assert_eq!(closed_count(&s, "4401"), 2, "{s:?}");
    drop((listed, own));
    d.stop().await.unwrap();
}

#[test]
fn a_tokens_file_others_may_read_refuses_the_start_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    const LISTED: &str = "z4j-gateway-world-readable-token-77d0";
    support::keep_secret("gateway world-readable token", LISTED);
    let dir = tempfile::tempdir().unwrap();
    for d in ["home", "tmp"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let tokens = dir.path().join("gateway-tokens");
    std::fs::write(&tokens, format!("{LISTED}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut c = Command::new(support::binary::BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir.path().join("home"))
        .env("TMPDIR", dir.path().join("tmp"))
        .env(
            "Z4J_BRAIN_URL",
            format!("http://127.0.0.1:{}", support::free_port()),
        )
        .env("Z4J_TOKEN", fake_brain::TOKEN)
        .env("Z4J_HMAC_SECRET", fake_brain::SECRET)
        .env("Z4J_SOCKET_PATH", &socket)
        .env("Z4J_GATEWAY_ADDR", "127.0.0.1:0")
        .env("Z4J_GATEWAY_TOKENS_FILE", &tokens)
        .arg("run");
    let (status, err) = support::run_to_exit("gateway-tokens-file-mode", c, 10);
    assert_eq!(status.code(), Some(64), "a configuration error: {err}");
    assert!(
        err.contains("Z4J_GATEWAY_TOKENS_FILE")
            && err.contains("mode 0644")
            && err.contains("chmod 0600"),
        "{err}"
    );
    assert!(!err.contains(LISTED), "{err}");
    assert!(!socket.exists(), "the daemon did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_signed_with_another_key_is_closed_with_4403_and_its_agent_refused_until_it_restarts(
) {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-42-1")
        .await
        .agent();
    let mut other_key = Signer::new(SigningKey::from_bytes(&[9u8; 32]).unwrap(), agent.binding());
    let mut p = Value::empty_map();
    p.insert("events", Value::Array(vec![task_event("gw-forged-1")]));
    let forged = other_key.sign_value(
        "event_batch",
        &protocol::new_frame_id("ev_"),
        &p,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    agent.send_raw(forged).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("Z4J_HMAC_SECRET"), "{reason}");

    // The same process reconnecting is refused at its handshake.
    let (code, reason) = handshake(addr, fake_brain::TOKEN, "celery-42-1")
        .await
        .closed();
    assert_eq!(code, 4403, "refused before hello_ack: {reason}");
    // Another process (a new worker_id) with the project's key is heard.
    let mut fresh = handshake(addr, fake_brain::TOKEN, "celery-43-1")
        .await
        .agent();
    let id = fresh.event_batch(vec![task_event("gw-honest-1")]).await;
    let ack = fresh.batch_ack(&id).await;
    assert_eq!(num(&ack, "accepted"), 1);
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(num(&s, "stored"), 1, "nothing of the forged frame: {s:?}");
    assert_eq!(closed_count(&s, "4403"), 2, "{s:?}");
    wait_for(10, "the honest event at the brain", || {
        brain.seen.task_ids.lock().unwrap().contains("gw-honest-1")
    })
    .await;
    assert!(!brain.seen.task_ids.lock().unwrap().contains("gw-forged-1"));
    drop(fresh);
    d.stop().await.unwrap();
}

/// An agent whose frames are still in flight when one of them is refused
/// reads the close code and its reason, as a z4j agent logs them, rather
/// than a reset connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_still_sending_when_its_frame_is_refused_reads_the_4403_and_why() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-44-1")
        .await
        .agent();
    let mut other_key = Signer::new(SigningKey::from_bytes(&[9u8; 32]).unwrap(), agent.binding());
    let forged = other_key.sign_value(
        "heartbeat",
        &protocol::new_frame_id("hb_"),
        &Value::empty_map(),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    agent.send_raw(forged).await;
    // More frames behind it, as a busy agent writes, none of them read by
    // the gateway before it closes.
    for i in 0..200 {
        let id = protocol::new_frame_id("ev_");
        let mut p = Value::empty_map();
        p.insert(
            "events",
            Value::Array(vec![task_event(&format!("gw-behind-{i}"))]),
        );
        let f = agent.signer.sign_value(
            "event_batch",
            &id,
            &p,
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        if agent.ws.feed(Message::binary(f)).await.is_err() {
            break;
        }
    }
    let _ = agent.ws.flush().await;
    // Time for the gateway to close; a write now must not meet a reset
    // (z4j-bare would log "connection closed during send" and lose why).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = agent.signer.sign_value(
        "heartbeat",
        &protocol::new_frame_id("hb_"),
        &Value::empty_map(),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let sent = agent.ws.send(Message::binary(late)).await;
    assert!(sent.is_ok(), "a write after the close frame: {sent:?}");
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("Z4J_HMAC_SECRET"), "{reason}");
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(
        num(&s, "stored"),
        0,
        "nothing behind the forged frame: {s:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_the_brain_would_refuse_get_the_brains_close_codes() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;

    // Protocol version 3: 4426.
    let mut hello = hello_payload("celery-1", "celery", &[]);
    hello.insert("protocol_version", "3");
    let (code, reason) = handshake_with(addr, Some(fake_brain::TOKEN), hello_frame(&hello))
        .await
        .closed();
    assert_eq!(code, 4426, "{reason}");

    // A first message that is not a hello: 4400.
    let mut early = Signer::new(key(), SessionBinding::new("a", "p", "s"));
    let heartbeat = early.sign_value(
        "heartbeat",
        &protocol::new_frame_id("hb_"),
        &Value::empty_map(),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let (code, reason) = handshake_with(addr, Some(fake_brain::TOKEN), heartbeat)
        .await
        .closed();
    assert_eq!(code, 4400, "{reason}");
    assert!(reason.contains("hello"), "{reason}");

    // One byte over the frame limit: 4400.
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-2").await.agent();
    let mut over = vec![b' '; MAX_FRAME + 1];
    over[0] = b'{';
    over[MAX_FRAME] = b'}';
    agent.send_raw(over).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4400, "{reason}");
    assert!(reason.contains("1048577 bytes"), "{reason}");

    // A signed event_batch well over the limit: 4400 too.
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-3").await.agent();
    let mut big = task_event("gw-big-1");
    big.insert(
        "data",
        v(serde_json::json!({"args": ["x".repeat(MAX_FRAME + 64 * 1024)]})),
    );
    agent.event_batch(vec![big]).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4400, "{reason}");

    // A correctly signed frame of a type the brain does not know: 1011.
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-4").await.agent();
    agent
        .send(
            "task_snapshot",
            &protocol::new_frame_id("ts_"),
            &Value::empty_map(),
        )
        .await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("unknown frame type"), "{reason}");

    // A frame whose envelope is not version 2: 1011, in the agent's terms.
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-5").await.agent();
    let mut frame: serde_json::Value = serde_json::from_slice(&agent.signer.sign_value(
        "heartbeat",
        "hb_1",
        &Value::empty_map(),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    ))
    .unwrap();
    frame["v"] = serde_json::json!(3);
    agent.send_raw(serde_json::to_vec(&frame).unwrap()).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("`v` is 3, expected 2"), "{reason}");
    assert!(!reason.contains("brain"), "{reason}");

    let s = d.client().await.stats().await.unwrap();
    assert_eq!(closed_count(&s, "4426"), 1, "{s:?}");
    assert_eq!(closed_count(&s, "4400"), 3, "{s:?}");
    assert_eq!(closed_count(&s, "1011"), 2, "{s:?}");
    assert_eq!(num(&s, "stored"), 0, "{s:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_brains_identity_agents_are_asked_to_retry_with_1013() {
    let url = format!("http://127.0.0.1:{}", support::free_port());
    let d = TestDaemon::start(gateway_options(&url)).await;
    let addr = d.gateway.expect("the gateway is on");
    assert!(!z4j_agentd::clients::file_beside(&d.spool).exists());
    let (code, reason) = handshake(addr, fake_brain::TOKEN, "celery-1")
        .await
        .closed();
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("not reached the brain"), "{reason}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brains_identity_is_remembered_so_agents_are_served_while_it_is_down() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let opts = gateway_options(&brain.url);
    let first = TestDaemon::start_in(opts.clone(), dir.path()).await;
    support::wait_uplink_connected(&first.stats).await;
    let remembered = z4j_agentd::clients::file_beside(&first.spool);
    wait_for(10, "the brain's identity written beside the spool", || {
        std::fs::read_to_string(&remembered).is_ok_and(|t| t.contains(fake_brain::AGENT_ID))
    })
    .await;
    first.stop().await.unwrap();
    brain.stop().await;

    let second = TestDaemon::start_in(opts, dir.path()).await;
    let addr = second.gateway.expect("the gateway is on");
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-1").await.agent();
    assert_eq!(text(&agent.ack, "agent_id"), fake_brain::AGENT_ID);
    assert_eq!(text(&agent.ack, "project_id"), fake_brain::PROJECT_ID);
    assert_eq!(text(&agent.ack, "brain_version"), "fake");
    assert_eq!(text(&agent.ack, "protocol_version"), "2");
    assert_ne!(
        second.stats.uplink().state,
        z4j_agentd::stats::UplinkState::Connected,
        "the brain is down"
    );
    // Its events are kept for the brain.
    let id = agent.event_batch(vec![task_event("gw-offline-1")]).await;
    let ack = agent.batch_ack(&id).await;
    assert_eq!(num(&ack, "accepted"), 1);
    assert_eq!(spooled(&second.spool, "gw-offline-"), 1);
    drop(agent);
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_the_agents_engine_reaches_it_signed_and_its_result_the_brain() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let hello = hello_payload("rq-7-1", "rq", &["cancel_task"]);
    let mut agent = handshake_with(addr, Some(fake_brain::TOKEN), hello_frame(&hello))
        .await
        .agent();
    wait_stats(&d, 10, "the agent registered for rq", |s| {
        s.get("client_list")
            .and_then(Value::as_array)
            .is_some_and(|l| {
                l.iter().any(|c| {
                    text(c, "framing") == "gateway" && support::strings_at(c, "engines") == ["rq"]
                })
            })
    })
    .await;

    let id = "44444444-2222-4333-8444-555555555555";
    let target = v(serde_json::json!({"type": "task", "id": "rq:t-9", "engine": "rq"}));
    let params = v(serde_json::json!({"engine": "rq", "task_id": "t-9"}));
    brain.send_command(
        id,
        brain_command("cancel_task", target, params, "claim-gw".into()),
    );
    let cmd = agent.frame().await;
    assert_eq!(cmd.frame_type, "command", "{cmd:?}");
    assert_eq!(cmd.id, id);
    assert_eq!(text(&cmd.payload, "action"), "cancel_task");
    assert_eq!(
        cmd.payload.get("parameters").map(|p| text(p, "task_id")),
        Some("t-9")
    );
    assert_eq!(
        cmd.payload.get("target").map(|t| text(t, "engine")),
        Some("rq")
    );
    assert!(num(&cmd.payload, "timeout_seconds") <= 60, "{cmd:?}");

    let mut ack = Value::empty_map();
    ack.insert("delivery_claim_token", Value::Null);
    agent.send("command_ack", id, &ack).await;
    let result = v(serde_json::json!({
        "status": "success",
        "result": {"revoked": true},
        "error": null,
        "delivery_claim_token": null,
    }));
    agent.send("command_result", id, &result).await;

    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(f.len(), 2, "one ack, one result: {f:?}");
    assert_eq!(f[0].0, "command_ack", "{f:?}");
    assert_eq!(f[1].0, "command_result", "{f:?}");
    assert_eq!(text(&f[1].1, "status"), "success");
    assert_eq!(
        f[1].1.get("result").and_then(|r| r.get("revoked")),
        Some(&Value::Bool(true))
    );
    assert_eq!(text(&f[1].1, "delivery_claim_token"), "claim-gw");
    let s = d.client().await.stats().await.unwrap();
    let cmds = s.get("commands").expect("commands");
    assert_eq!(num(cmds, "succeeded"), 1, "{s:?}");
    drop(agent);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_the_gateway_and_its_agents() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let (code, _) = handshake(addr, "not-the-token", "celery-0").await.closed();
    assert_eq!(code, 4401);
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-9-1")
        .await
        .agent();
    let health = v(serde_json::json!({
        "buffer_size": 0,
        "adapter_health": {
            "celery.queue_depths": "{\"default\": 7}",
            "celery.broker_type": "redis",
        },
    }));
    agent
        .send("heartbeat", &protocol::new_frame_id("hb_"), &health)
        .await;
    let gateway_client = |s: &Value| -> Option<Value> {
        s.get("client_list")?
            .as_array()?
            .iter()
            .find(|c| text(c, "framing") == "gateway")
            .cloned()
    };
    let s = wait_stats(&d, 10, "the agent's health in stats", |s| {
        gateway_client(s).is_some_and(|c| c.get("health").is_some_and(|h| !h.is_null()))
    })
    .await;
    let g = s.get("gateway").expect("a gateway section");
    assert_eq!(text(g, "addr"), addr.to_string());
    assert_eq!(num(g, "connections"), 1, "{g:?}");
    assert_eq!(num(g, "sessions"), 1, "{g:?}");
    assert_eq!(num(g, "frames_received"), 1, "{g:?}");
    assert_eq!(closed_count(&s, "4401"), 1, "{g:?}");
    let c = gateway_client(&s).unwrap();
    assert_eq!(
        text(&c, "process"),
        "z4j agent bare 1.13.0 (worker_id celery-9-1)"
    );
    assert_eq!(text(&c, "framework"), "bare");
    assert_eq!(support::strings_at(&c, "engines"), ["celery"]);
    assert_eq!(
        c.get("pid").and_then(Value::as_u64),
        Some(u64::from(std::process::id()))
    );
    assert_eq!(
        c.get("uid").and_then(Value::as_u64),
        Some(u64::from(z4j_agentd::host::current_uid()))
    );
    let celery = c
        .get("health")
        .and_then(|h| h.get("engines"))
        .and_then(|e| e.get("celery"))
        .unwrap_or_else(|| panic!("{c:?}"));
    assert_eq!(
        celery
            .get("queue_depths")
            .and_then(|q| q.get("default"))
            .and_then(Value::as_u64),
        Some(7),
        "{c:?}"
    );
    assert_eq!(
        celery.get("facts").map(|f| text(f, "broker_type")),
        Some("redis"),
        "{c:?}"
    );

    agent.ws.close(None).await.unwrap();
    let s = wait_stats(&d, 10, "the agent gone", |s| {
        s.get("gateway").map(|g| num(g, "connections")) == Some(0)
    })
    .await;
    assert!(gateway_client(&s).is_none(), "{s:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_nothing_to_store_is_acked_all_rejected_so_the_agent_drops_it() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-1").await.agent();
    let mut invalid = task_event("gw-invalid-1");
    invalid.remove("kind");
    let id = agent.event_batch(vec![invalid]).await;
    let ack = agent.batch_ack(&id).await;
    assert_eq!(
        (
            num(&ack, "received"),
            num(&ack, "accepted"),
            num(&ack, "rejected")
        ),
        (1, 0, 1),
        "{ack:?}"
    );
    let id = agent.event_batch(vec![]).await;
    let ack = agent.batch_ack(&id).await;
    assert_eq!(
        (
            num(&ack, "received"),
            num(&ack, "accepted"),
            num(&ack, "rejected")
        ),
        (0, 0, 0),
        "{ack:?}"
    );
    // The session goes on.
    let id = agent.event_batch(vec![task_event("gw-valid-1")]).await;
    assert_eq!(num(&agent.batch_ack(&id).await, "accepted"), 1);
    drop(agent);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_4429_and_agents_get_1012_when_the_daemon_stops() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let opts = Options {
        gateway_max_connections: Some("1".into()),
        ..gateway_options(&brain.url)
    };
    let (d, addr) = daemon_for(opts).await;
    let mut agent = handshake(addr, fake_brain::TOKEN, "celery-1").await.agent();
    let (code, reason) = handshake(addr, fake_brain::TOKEN, "celery-2")
        .await
        .closed();
    assert_eq!(code, 4429, "{reason}");
    assert!(reason.contains("Z4J_GATEWAY_MAX_CONNECTIONS"), "{reason}");
    let stopping = tokio::spawn(d.stop());
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 1012, "{reason}");
    stopping.await.unwrap().unwrap();
}

/// An `event_batch` payload of `events`.
fn batch_payload(events: Vec<Value>) -> Value {
    let mut p = Value::empty_map();
    p.insert("events", Value::Array(events));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_frames_are_closed_with_4403_and_their_agent_is_heard_again_at_once() {
    const WORKER: &str = "celery-77-1";
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let replayed = |task: &str| batch_payload(vec![task_event(task)]);

    // A `seq` not greater than the last accepted one: a second signer of
    // the same session starts at 1 again.
    let mut agent = handshake(addr, fake_brain::TOKEN, WORKER).await.agent();
    let id = agent.event_batch(vec![task_event("gw-heard-1")]).await;
    assert_eq!(num(&agent.batch_ack(&id).await, "accepted"), 1);
    let mut rewound = Signer::new(key(), agent.binding());
    let f = rewound.sign_value(
        "event_batch",
        &protocol::new_frame_id("ev_"),
        &replayed("gw-replayed-seq"),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    agent.send_raw(f).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(
        reason.contains("seq 1 is not greater than the last accepted seq 1"),
        "{reason}"
    );

    // A replay is not a wrong secret: the same token and worker_id are
    // heard at once. A nonce used twice in the session: 4403.
    let mut agent = handshake(addr, fake_brain::TOKEN, WORKER).await.agent();
    let nonce = protocol::new_nonce();
    let id = protocol::new_frame_id("ev_");
    let f = agent.signer.sign_value(
        "event_batch",
        &id,
        &replayed("gw-heard-2"),
        OffsetDateTime::now_utc(),
        &nonce,
    );
    agent.send_raw(f).await;
    assert_eq!(num(&agent.batch_ack(&id).await, "accepted"), 1);
    let f = agent.signer.sign_value(
        "event_batch",
        &protocol::new_frame_id("ev_"),
        &replayed("gw-replayed-nonce"),
        OffsetDateTime::now_utc(),
        &nonce,
    );
    agent.send_raw(f).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("nonce was already used"), "{reason}");

    // A `ts` 300 s old: 4403.
    let mut agent = handshake(addr, fake_brain::TOKEN, WORKER).await.agent();
    let f = agent.signer.sign_value(
        "event_batch",
        &protocol::new_frame_id("ev_"),
        &replayed("gw-replayed-ts"),
        OffsetDateTime::now_utc() - Duration::from_secs(300),
        &protocol::new_nonce(),
    );
    agent.send_raw(f).await;
    let (code, reason) = agent.closed().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(
        reason.contains("ts is 300.") && reason.contains("behind this host's clock"),
        "{reason}"
    );

    // And heard again after that.
    let mut agent = handshake(addr, fake_brain::TOKEN, WORKER).await.agent();
    let id = agent.event_batch(vec![task_event("gw-heard-3")]).await;
    assert_eq!(num(&agent.batch_ack(&id).await, "accepted"), 1);

    let s = d.client().await.stats().await.unwrap();
    assert_eq!(closed_count(&s, "4403"), 3, "{s:?}");
    assert_eq!(num(&s, "stored"), 3, "only the heard frames' events: {s:?}");
    assert_eq!(spooled(&d.spool, "gw-replayed-"), 0);
    wait_for(10, "the heard events at the brain", || {
        let at_brain = brain.seen.task_ids.lock().unwrap();
        ["gw-heard-1", "gw-heard-2", "gw-heard-3"]
            .iter()
            .all(|t| at_brain.contains(*t))
    })
    .await;
    assert!(
        !brain
            .seen
            .task_ids
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.starts_with("gw-replayed-")),
        "{:?}",
        brain.seen.task_ids
    );
    drop(agent);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_at_another_path_gets_http_404_naming_ws_agent() {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    for path in ["/", "/ws", "/ws/agent/extra", "/api/ws/agent"] {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", fake_brain::TOKEN).parse().unwrap(),
        );
        let refused = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("an answer in time");
        let resp = match refused {
            Err(WsError::Http(resp)) => resp,
            Err(e) => panic!("{path}: expected an HTTP refusal, got {e}"),
            Ok(_) => panic!("{path}: the gateway upgraded the connection"),
        };
        assert_eq!(resp.status().as_u16(), 404, "{path}: {resp:?}");
        let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
        assert!(body.contains("/ws/agent"), "{path}: {body:?}");
    }
    // The gateway goes on serving agents at its path.
    let agent = handshake(addr, fake_brain::TOKEN, "celery-1").await.agent();
    let s = d.client().await.stats().await.unwrap();
    let g = s.get("gateway").expect("a gateway section");
    assert_eq!(num(g, "sessions"), 1, "{g:?}");
    drop(agent);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_hello_for_10_s_is_closed_with_4400() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let mut ws = open(addr, Some(fake_brain::TOKEN)).await;
    let upgraded = std::time::Instant::now();
    let Next::Closed(code, reason) = next_message_within(&mut ws, Duration::from_secs(20)).await
    else {
        panic!("the gateway sent a message before any hello");
    };
    let waited = upgraded.elapsed();
    assert_eq!(code, 4400, "{reason}");
    assert!(reason.contains("no hello within 10 s"), "{reason}");
    // The daemon's 10 s started when it sent the upgrade, a moment before
    // the upgrade returned here.
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(15),
        "closed after {waited:?}"
    );
    eprintln!("closed with 4400 after {waited:?} without a hello");
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(closed_count(&s, "4400"), 1, "{s:?}");
    let g = s.get("gateway").expect("a gateway section");
    assert_eq!(num(g, "sessions"), 0, "{g:?}");
    d.stop().await.unwrap();
}

/// Opens a WebSocket to the gateway, as [`open`], over a TCP connection
/// whose receive buffer is as small as the kernel allows: an agent that
/// does not read fills it at once.
async fn open_small_window(addr: SocketAddr) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}/ws/agent")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", fake_brain::TOKEN).parse().unwrap(),
    );
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("upgrade in time")
    .expect("the gateway upgrades the connection");
    ws
}

/// A client's binary WebSocket frame of `payload` (masked, as a client's
/// must be), written by hand so that it can be sent in parts.
fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x81];
    let mut f = vec![0x82];
    let n = payload.len();
    assert!(n <= usize::from(u16::MAX));
    f.push(0x80 | 126);
    f.extend_from_slice(&(n as u16).to_be_bytes());
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The daemon's `replies_dropped` count.
fn replies_dropped(s: &Value) -> u64 {
    num(s, "replies_dropped")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_read_or_stops_mid_frame_does_not_stall_the_others() {
    use tokio::io::AsyncWriteExt;
    /// Batches the agent that does not read sends at most (its acks are
    /// dropped after a few thousand on Linux's default buffers).
    const FLOOD_MAX: usize = 100_000;
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;

    // One agent stops in the middle of a frame: half of it is sent.
    let mut halfway = handshake(addr, fake_brain::TOKEN, "celery-half-1")
        .await
        .agent();
    let half_id = protocol::new_frame_id("ev_");
    let signed = halfway.signer.sign_value(
        "event_batch",
        &half_id,
        &batch_payload(vec![task_event("gw-half-1")]),
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let wire = masked_frame(&signed);
    let (first_half, second_half) = wire.split_at(wire.len() / 2);
    let MaybeTlsStream::Plain(raw) = halfway.ws.get_mut() else {
        unreachable!("a plain TCP connection");
    };
    raw.write_all(first_half).await.unwrap();
    raw.flush().await.unwrap();

    // Another sends batch after batch and never reads its acks.
    let hello = hello_payload("celery-deaf-1", "celery", &["cancel_task"]);
    let mut deaf = say_hello(open_small_window(addr).await, hello_frame(&hello))
        .await
        .agent();
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = tokio::spawn({
        let flooding = flooding.clone();
        async move {
            let mut ids = Vec::new();
            while flooding.load(Ordering::SeqCst) && ids.len() < FLOOD_MAX {
                let task = format!("gw-deaf-{}", ids.len());
                ids.push(deaf.event_batch(vec![task_event(&task)]).await);
            }
            (deaf, ids)
        }
    });
    let s = wait_stats(
        &d,
        60,
        "acks of the agent that does not read dropped",
        |s| replies_dropped(s) > 0,
    )
    .await;
    assert_eq!(
        s.get("gateway").map(|g| num(g, "connections")),
        Some(2),
        "{s:?}"
    );

    // Meanwhile, as it goes on, a third agent is served promptly.
    let mut prompt = handshake(addr, fake_brain::TOKEN, "celery-prompt-1")
        .await
        .agent();
    let sent = std::time::Instant::now();
    let id = prompt.event_batch(vec![task_event("gw-prompt-1")]).await;
    let ack = prompt.batch_ack(&id).await;
    let took = sent.elapsed();
    eprintln!("the prompt agent's ack came after {took:?}");
    assert_eq!(num(&ack, "accepted"), 1, "{ack:?}");
    assert!(took < Duration::from_secs(3), "acked after {took:?}");
    assert!(!flood.is_finished(), "the flood went on meanwhile");
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(
        s.get("gateway").map(|g| num(g, "connections")),
        Some(3),
        "the others still connected: {s:?}"
    );
    wait_for(10, "the prompt agent's event at the brain", || {
        brain.seen.task_ids.lock().unwrap().contains("gw-prompt-1")
    })
    .await;

    // The frame sent in half is taken once it is whole.
    let MaybeTlsStream::Plain(raw) = halfway.ws.get_mut() else {
        unreachable!("a plain TCP connection");
    };
    raw.write_all(second_half).await.unwrap();
    raw.flush().await.unwrap();
    assert_eq!(num(&halfway.batch_ack(&half_id).await, "accepted"), 1);

    // Every batch of the agent that does not read is stored; its acks
    // that found its reply queue full were dropped and counted.
    flooding.store(false, Ordering::SeqCst);
    let (mut deaf, ids) = flood.await.unwrap();
    let flood = ids.len();
    assert!(flood < FLOOD_MAX, "still flooding: {flood} batches sent");
    // (The spool forgets what the brain acked: `stored` counts them all.)
    wait_stats(&d, 60, "all the flood stored", |s| {
        num(s, "stored") == flood as u64 + 2
    })
    .await;
    let mut c = d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut dropped, mut same) = (u64::MAX, 0);
    while same < 10 {
        let now = replies_dropped(&c.stats().await.unwrap());
        same = if now == dropped { same + 1 } else { 0 };
        dropped = now;
        assert!(tokio::time::Instant::now() < deadline, "{dropped} dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = flood - usize::try_from(dropped).unwrap();
    eprintln!("{dropped} of {flood} acks dropped, {held} held for the agent");
    assert!(dropped > 0);
    // The reply queue's 256 and the one its writer is blocked on, at least;
    // the rest waits in the kernel's buffers.
    assert!(
        held > z4j_agentd::ingest::replies::REPLY_QUEUE,
        "{held} held"
    );

    // Read now, it gets exactly the acks not dropped, in order, then the
    // ack of its next batch.
    let mut next = 0;
    for n in 0..held {
        let f = deaf.frame().await;
        assert_eq!(f.frame_type, "event_batch_ack", "{f:?}");
        let acked = text(&f.payload, "acked_id");
        let at = ids[next..]
            .iter()
            .position(|i| i == acked)
            .unwrap_or_else(|| panic!("ack {n} of {acked}: not a later batch"));
        next += at + 1;
    }
    let last = deaf.event_batch(vec![task_event("gw-deaf-last")]).await;
    let ack = deaf.batch_ack(&last).await;
    assert_eq!(num(&ack, "accepted"), 1, "{ack:?}");
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(replies_dropped(&s), dropped, "{s:?}");
    wait_for(30, "the whole flood at the brain", || {
        let at_brain = brain.seen.task_ids.lock().unwrap();
        at_brain
            .iter()
            .filter(|t| t.starts_with("gw-deaf-"))
            .count()
            == flood + 1
    })
    .await;
    drop((deaf, halfway, prompt));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_reads_nothing_for_10_s_loses_its_session_and_its_slot() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let (d, addr) = daemon_for(gateway_options(&brain.url)).await;
    let hello = hello_payload("celery-asleep-1", "celery", &["cancel_task"]);
    let mut asleep = say_hello(open_small_window(addr).await, hello_frame(&hello))
        .await
        .agent();
    // Batches until its acks fill every buffer on the way: the gateway's
    // writer then waits on a socket nobody reads, and an ack queued after
    // a pause is dropped too (a queue that still drained would take it).
    let mut sent = 0usize;
    loop {
        for _ in 0..200 {
            asleep
                .event_batch(vec![task_event(&format!("gw-asleep-{sent}"))])
                .await;
            sent += 1;
        }
        let stored = sent as u64;
        wait_stats(&d, 30, "the burst stored", |s| num(s, "stored") == stored).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = replies_dropped(&d.client().await.stats().await.unwrap());
        asleep
            .event_batch(vec![task_event(&format!("gw-asleep-{sent}"))])
            .await;
        sent += 1;
        let stored = sent as u64;
        let s = wait_stats(&d, 30, "the probe stored", |s| num(s, "stored") == stored).await;
        if replies_dropped(&s) > before {
            break;
        }
        assert!(sent < 200_000, "the agent's socket never filled: {s:?}");
    }
    let stopped = std::time::Instant::now();
    let s = wait_stats(
        &d,
        30,
        "the agent that reads nothing to lose its session",
        |s| s.get("gateway").map(|g| num(g, "connections")) == Some(0),
    )
    .await;
    let took = stopped.elapsed();
    eprintln!("session ended {took:?} after the agent stopped sending ({sent} batches)");
    assert_eq!(
        num(&s, "clients"),
        1,
        "only the stats connection is left: {s:?}"
    );
    assert_eq!(
        num(&s, "stored"),
        sent as u64,
        "everything it sent was stored"
    );
}
