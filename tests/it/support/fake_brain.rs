//! An in-process fake brain for faults the real one cannot produce on
//! demand: withheld acks, bad signatures, chosen close codes.
//!
//! It speaks protocol v2 with the crate's own signer and verifier (the
//! roles reversed), and records what it received.

#![allow(dead_code)]
// The handshake callback must return tungstenite's own (large) error type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use z4j_agentd::protocol::{self, SessionBinding, Signer, SigningKey, Value, Verifier};

/// The HMAC secret of the test vectors in `docs/brain-protocol.md`.
pub const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";
/// The token the fake accepts.
pub const TOKEN: &str = "fake-token-0123456789";
/// The agent id its `hello_ack` gives.
pub const AGENT_ID: &str = "ea12aefd-04ac-43d0-af34-08b77434f37a";
/// The project id its `hello_ack` gives.
pub const PROJECT_ID: &str = "817e2571-38a5-4109-92c2-612c66108836";

/// What the fake does wrong, and when.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Do not ack the first N `event_batch` frames (over all connections).
    pub withhold_acks: usize,
    /// Sign the first N acks with the wrong key.
    pub bad_signature_acks: usize,
    /// Close every handshake with this code instead of `hello_ack`.
    pub close_handshake_with: Option<u16>,
    /// Send `hello_ack`, then close at once with this code (as the brain
    /// does on 4002, or 4403 after a badly signed first frame).
    pub close_after_hello_with: Option<u16>,
    /// Send each of the first N acks twice (the second freshly signed).
    pub duplicate_acks: usize,
    /// Hold each odd-numbered ack back and send it after the next one.
    pub reorder_acks: bool,
    /// After this many acks, send the previous ack's exact bytes again (a
    /// replayed `seq` and nonce), once.
    pub replay_ack_after: Option<usize>,
    /// Sign the first N acks with a `ts` this many seconds in the past.
    pub stale_acks: usize,
    /// How far in the past, for `stale_acks`.
    pub stale_by_seconds: i64,
    /// The first N sessions freeze right after `hello_ack`: the connection
    /// stays open but nothing is read or answered, not even a ping (a
    /// brain process stopped with SIGSTOP).
    pub freeze_sessions: usize,
    /// `heartbeat_interval_seconds` in `hello_ack` (default 10, the brain's).
    pub heartbeat_interval_seconds: Option<u64>,
    /// A slow brain: each `event_batch` takes this long, one after another
    /// in arrival order (as the real brain works through one connection's
    /// frames), before its ack goes out. Reading goes on meanwhile, so
    /// pings are answered.
    pub ack_delay: Option<std::time::Duration>,
    /// Events whose `task_id` contains this are not stored, as the brain
    /// drops an event it cannot ingest: counted in the ack's `rejected`.
    pub reject_task_ids_containing: Option<String>,
    /// `brain_version` in `hello_ack` (default "fake", which names no
    /// z4j line, so the daemon keeps its first `hello`).
    pub brain_version: Option<String>,
    /// `command` frames (id, payload) sent right after the first
    /// `hello_ack`, before anything is read: the brain pushes the agent's
    /// pending commands into a session as soon as it is registered.
    pub commands_after_hello: Vec<(String, Value)>,
    /// How long the brain takes, after `hello_ack`, to push
    /// `commands_after_hello`. Frames that arrive meanwhile wait (the
    /// brain reads them only afterwards), except a close, which the
    /// brain's WebSocket answers at once: the push then fails and those
    /// commands stay with the brain (`seen.commands_not_pushed`).
    pub hand_over_after: Option<std::time::Duration>,
}

/// What the fake saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// `event_batch` frames received (including re-sends).
    pub batches: AtomicUsize,
    /// Acks sent (good or bad).
    pub acks_sent: AtomicUsize,
    /// Event ids received per batch, in order.
    pub batch_event_ids: Mutex<Vec<Vec<String>>>,
    /// Distinct event ids received.
    pub event_ids: Mutex<BTreeSet<String>>,
    /// Distinct task ids of the events received.
    pub task_ids: Mutex<BTreeSet<String>>,
    /// Frame types received after the handshake.
    pub frame_types: Mutex<Vec<String>>,
    /// Authorization headers seen.
    pub auth_headers: Mutex<Vec<String>>,
    /// `hello` payloads seen.
    pub hellos: Mutex<Vec<Value>>,
    /// Close codes the daemon sent us.
    pub client_close_codes: Mutex<Vec<u16>>,
    /// Verification failures of the daemon's frames (must stay empty).
    pub verify_failures: Mutex<Vec<String>>,
    /// `command_ack` and `command_result` frames: (type, id, payload).
    pub command_frames: Mutex<Vec<(String, String, Value)>>,
    /// Events stored: distinct ids, not refused by
    /// `reject_task_ids_containing`.
    pub stored_event_ids: Mutex<BTreeSet<String>>,
    /// `heartbeat` and `agent_status` payloads, in arrival order.
    pub status_frames: Mutex<Vec<(String, Value)>>,
    /// Ids of `commands_after_hello` whose push failed because the daemon
    /// closed the session first (see `Behavior::hand_over_after`).
    pub commands_not_pushed: Mutex<Vec<String>>,
}

/// A running fake brain.
pub struct FakeBrain {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// What it saw.
    pub seen: Arc<Seen>,
    commands: tokio::sync::broadcast::Sender<(String, Value)>,
    behavior: Arc<Mutex<Behavior>>,
    /// The accepting task: aborted by [`FakeBrain::stop`].
    accepting: tokio::task::AbortHandle,
}

impl FakeBrain {
    /// Starts the fake on a free loopback port.
    pub async fn start(behavior: Behavior) -> FakeBrain {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let key = SigningKey::from_base64(SECRET).unwrap();
        let behavior = Arc::new(Mutex::new(behavior));
        let shared = behavior.clone();
        let s = seen.clone();
        let (commands, _) = tokio::sync::broadcast::channel(64);
        let cmds = commands.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(
                    tcp,
                    n,
                    key.clone(),
                    behavior.clone(),
                    s.clone(),
                    cmds.subscribe(),
                ));
            }
        })
        .abort_handle();
        FakeBrain {
            url,
            seen,
            commands,
            behavior: shared,
            accepting,
        }
    }

    /// Stops listening: from now on its port refuses connections (a brain
    /// that is down). Sessions already open are not closed.
    pub async fn stop(&self) {
        self.accepting.abort();
        let addr = self.url.trim_start_matches("http://").to_string();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fake brain still accepts on {addr}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Changes how the fake behaves from the next connection on.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self.behavior.lock().unwrap() = behavior;
    }

    /// Sends a signed `command` frame with this id and payload on every
    /// open session.
    pub fn send_command(&self, id: &str, payload: Value) {
        let _ = self.commands.send((id.to_string(), payload));
    }

    /// The `command_ack` / `command_result` frames received for `id`.
    pub fn command_frames(&self, id: &str) -> Vec<(String, Value)> {
        self.seen
            .command_frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, i, _)| i == id)
            .map(|(t, _, p)| (t.clone(), p.clone()))
            .collect()
    }

    /// Waits (10 s at most) until `n` frames were received for `id`;
    /// returns them.
    pub async fn wait_command_frames(&self, id: &str, n: usize) -> Vec<(String, Value)> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let f = self.command_frames(id);
            if f.len() >= n {
                return f;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {n} frames for {id}; got {f:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The `hello`s received so far.
    pub fn hellos(&self) -> Vec<Value> {
        self.seen.hellos.lock().unwrap().clone()
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    conn_no: usize,
    key: SigningKey,
    behavior: Arc<Mutex<Behavior>>,
    seen: Arc<Seen>,
    mut commands: tokio::sync::broadcast::Receiver<(String, Value)>,
) {
    let seen_hdr = seen.clone();
    let callback = move |req: &Request, resp: Response| {
        if let Some(v) = req.headers().get("authorization") {
            seen_hdr
                .auth_headers
                .lock()
                .unwrap()
                .push(v.to_str().unwrap_or("").to_string());
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    // hello
    let Some(Ok(first)) = ws.next().await else {
        return;
    };
    // A daemon that only checks the upgrade passes closes without a hello.
    let Ok(hello) = serde_json::from_slice::<Value>(&first.into_data()) else {
        return;
    };
    seen.hellos
        .lock()
        .unwrap()
        .push(hello.get("payload").cloned().unwrap_or(Value::Null));
    let close_with = behavior.lock().unwrap().close_handshake_with;
    if let Some(code) = close_with {
        close(&mut ws, code).await;
        return;
    }
    let binding = SessionBinding::new(
        AGENT_ID,
        PROJECT_ID,
        format!("00000000-0000-4000-8000-{conn_no:012}"),
    );
    let mut ack = Value::empty_map();
    ack.insert("v", 2i64);
    ack.insert("type", "hello_ack");
    ack.insert("id", "hack_fake");
    ack.insert("ts", protocol::format_ts(OffsetDateTime::now_utc()));
    let mut p = Value::empty_map();
    p.insert("protocol_version", "2");
    let brain_version = behavior.lock().unwrap().brain_version.clone();
    p.insert("brain_version", brain_version.as_deref().unwrap_or("fake"));
    p.insert("agent_id", binding.agent_id.as_str());
    p.insert("project_id", binding.project_id.as_str());
    p.insert("session_id", binding.session_id.as_str());
    let heartbeat = behavior.lock().unwrap().heartbeat_interval_seconds;
    p.insert("heartbeat_interval_seconds", heartbeat.unwrap_or(10));
    p.insert("max_frame_size_bytes", 1_048_576u64);
    ack.insert("payload", p);
    if ws
        .send(Message::binary(serde_json::to_vec(&ack).unwrap()))
        .await
        .is_err()
    {
        return;
    }
    let close_after = behavior.lock().unwrap().close_after_hello_with;
    if let Some(code) = close_after {
        close(&mut ws, code).await;
        return;
    }
    let freeze = {
        let mut b = behavior.lock().unwrap();
        let freeze = b.freeze_sessions > 0;
        b.freeze_sessions = b.freeze_sessions.saturating_sub(1);
        freeze
    };
    if freeze {
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        drop(ws);
        return;
    }
    let mut verifier = Verifier::new(key.clone(), binding.clone());
    let mut signer = Signer::new(key, binding.clone());
    let wrong = SigningKey::from_bytes(&[7u8; 32]).unwrap();
    let mut wrong_signer = Signer::new(wrong, binding);
    let (pushed, hand_over_after) = {
        let mut b = behavior.lock().unwrap();
        (
            std::mem::take(&mut b.commands_after_hello),
            b.hand_over_after,
        )
    };
    // Frames read while the hand-over was under way, handled after it.
    let mut early: std::collections::VecDeque<Message> = Default::default();
    if let Some(after) = hand_over_after.filter(|_| !pushed.is_empty()) {
        let deadline = tokio::time::Instant::now() + after;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                m = ws.next() => match m {
                    Some(Ok(Message::Close(f))) => {
                        seen.client_close_codes
                            .lock()
                            .unwrap()
                            .push(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                        seen.commands_not_pushed
                            .lock()
                            .unwrap()
                            .extend(pushed.into_iter().map(|(id, _)| id));
                        return;
                    }
                    Some(Ok(m)) => early.push_back(m),
                    _ => return,
                },
            }
        }
    }
    for (id, payload) in pushed {
        let frame = command_frame(&mut signer, &id, &payload);
        if ws.send(Message::binary(frame)).await.is_err() {
            return;
        }
    }
    let mut last_ack: Option<Vec<u8>> = None;
    let mut held: Option<Vec<Ack>> = None;
    // Acks of a slow brain, with when each is due.
    let mut slow: std::collections::VecDeque<(tokio::time::Instant, Ack)> = Default::default();
    loop {
        let next_slow = slow.front().map(|(at, _)| *at);
        let msg = if let Some(m) = early.pop_front() {
            Ok(m)
        } else {
            tokio::select! {
            m = ws.next() => match m {
                Some(m) => m,
                None => return,
            },
            _ = tokio::time::sleep_until(next_slow.unwrap_or_else(tokio::time::Instant::now)), if next_slow.is_some() => {
                let (_, ack) = slow.pop_front().expect("checked");
                seen.acks_sent.fetch_add(1, Ordering::SeqCst);
                let out = ack.sign(&mut signer, &mut wrong_signer);
                if ws.send(Message::binary(out)).await.is_err() {
                    return;
                }
                continue;
            }
            // A held ack goes out anyway if no other ack follows soon.
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)), if held.is_some() => {
                for ack in held.take().into_iter().flatten() {
                    let out = ack.sign(&mut signer, &mut wrong_signer);
                    last_ack = Some(out.clone());
                    if ws.send(Message::binary(out)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            c = commands.recv() => {
                let Ok((id, payload)) = c else { continue };
                let frame = command_frame(&mut signer, &id, &payload);
                if ws.send(Message::binary(frame)).await.is_err() {
                    return;
                }
                continue;
            }
            }
        };
        let bytes = match msg {
            Ok(Message::Binary(b)) => b.to_vec(),
            Ok(Message::Text(t)) => t.as_bytes().to_vec(),
            Ok(Message::Close(f)) => {
                seen.client_close_codes
                    .lock()
                    .unwrap()
                    .push(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                return;
            }
            Ok(_) => continue,
            Err(_) => return,
        };
        let frame = match verifier.verify(&bytes, OffsetDateTime::now_utc()) {
            Ok(f) => f,
            Err(e) => {
                seen.verify_failures.lock().unwrap().push(e.to_string());
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::from(4403),
                        reason: "bad signature".into(),
                    })))
                    .await;
                return;
            }
        };
        seen.frame_types
            .lock()
            .unwrap()
            .push(frame.frame_type.clone());
        if frame.frame_type.starts_with("command_") {
            seen.command_frames.lock().unwrap().push((
                frame.frame_type.clone(),
                frame.id.clone(),
                frame.payload.clone(),
            ));
        }
        if frame.frame_type == "heartbeat" || frame.frame_type == "agent_status" {
            seen.status_frames
                .lock()
                .unwrap()
                .push((frame.frame_type.clone(), frame.payload.clone()));
        }
        if frame.frame_type != "event_batch" {
            continue;
        }
        seen.batches.fetch_add(1, Ordering::SeqCst);
        let ids: Vec<String> = frame
            .payload
            .get("events")
            .and_then(Value::as_array)
            .unwrap_or(&[])
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let (reject_marker, ack_delay) = {
            let b = behavior.lock().unwrap();
            (b.reject_task_ids_containing.clone(), b.ack_delay)
        };
        let mut accepted = 0u64;
        {
            let mut stored = seen.stored_event_ids.lock().unwrap();
            for e in frame
                .payload
                .get("events")
                .and_then(Value::as_array)
                .unwrap_or(&[])
            {
                let task = e.get("task_id").and_then(Value::as_str).unwrap_or("");
                if reject_marker.as_deref().is_some_and(|m| task.contains(m)) {
                    continue;
                }
                if let Some(id) = e.get("id").and_then(Value::as_str) {
                    if stored.insert(id.to_string()) {
                        accepted += 1;
                    }
                }
            }
        }
        seen.event_ids.lock().unwrap().extend(ids.iter().cloned());
        seen.task_ids.lock().unwrap().extend(
            frame
                .payload
                .get("events")
                .and_then(Value::as_array)
                .unwrap_or(&[])
                .iter()
                .filter_map(|e| e.get("task_id").and_then(Value::as_str).map(str::to_owned)),
        );
        seen.batch_event_ids.lock().unwrap().push(ids.clone());
        let (withhold, bad) = {
            let mut b = behavior.lock().unwrap();
            if b.withhold_acks > 0 {
                b.withhold_acks -= 1;
                (true, false)
            } else if b.bad_signature_acks > 0 {
                b.bad_signature_acks -= 1;
                (false, true)
            } else {
                (false, false)
            }
        };
        if withhold {
            continue;
        }
        let mut payload = Value::empty_map();
        payload.insert("acked_id", frame.id.as_str());
        payload.insert("received", ids.len() as u64);
        payload.insert("accepted", accepted);
        payload.insert("rejected", ids.len() as u64 - accepted);
        if let Some(delay) = ack_delay {
            let start = slow
                .back()
                .map(|(at, _)| *at)
                .unwrap_or_else(tokio::time::Instant::now)
                .max(tokio::time::Instant::now());
            slow.push_back((
                start + delay,
                Ack {
                    id: format!("eba_{}", frame.id),
                    payload,
                    stale_by: None,
                    bad: false,
                },
            ));
            continue;
        }
        let (duplicate, reorder, replay, stale_by) = {
            let mut b = behavior.lock().unwrap();
            let duplicate = b.duplicate_acks > 0;
            b.duplicate_acks = b.duplicate_acks.saturating_sub(1);
            let sent = seen.acks_sent.load(Ordering::SeqCst);
            let replay = b.replay_ack_after == Some(sent) && last_ack.is_some();
            if replay {
                b.replay_ack_after = None;
            }
            let stale = (b.stale_acks > 0).then_some(b.stale_by_seconds);
            b.stale_acks = b.stale_acks.saturating_sub(1);
            (duplicate, b.reorder_acks, replay, stale)
        };
        if replay {
            // The exact bytes again: same seq, same nonce.
            let again = last_ack.clone().expect("checked");
            if ws.send(Message::binary(again)).await.is_err() {
                return;
            }
        }
        let n = seen.acks_sent.fetch_add(1, Ordering::SeqCst);
        let mut acks = vec![Ack {
            id: format!("eba_{}", frame.id),
            payload: payload.clone(),
            stale_by,
            bad,
        }];
        if duplicate {
            acks.push(Ack {
                id: format!("eba_{}_again", frame.id),
                payload,
                stale_by: None,
                bad: false,
            });
        }
        if reorder && n.is_multiple_of(2) {
            // Hold this one until the next ack has gone out. Acks are
            // signed when sent, so `seq` still grows on the wire.
            held = Some(acks);
            continue;
        }
        for ack in acks.into_iter().chain(held.take().into_iter().flatten()) {
            let out = ack.sign(&mut signer, &mut wrong_signer);
            last_ack = Some(out.clone());
            if ws.send(Message::binary(out)).await.is_err() {
                return;
            }
        }
    }
}

/// An `event_batch_ack` waiting to be signed and sent.
struct Ack {
    id: String,
    payload: Value,
    /// Sign with a `ts` this many seconds in the past.
    stale_by: Option<i64>,
    /// Sign with the wrong key.
    bad: bool,
}

impl Ack {
    fn sign(self, signer: &mut Signer, wrong: &mut Signer) -> Vec<u8> {
        let s = if self.bad { wrong } else { signer };
        let ts = OffsetDateTime::now_utc() - time::Duration::seconds(self.stale_by.unwrap_or(0));
        s.sign_value(
            "event_batch_ack",
            &self.id,
            &self.payload,
            ts,
            &protocol::new_nonce(),
        )
    }
}

/// Closes the connection with `code`.
/// A `command` frame for this session, signed now.
fn command_frame(signer: &mut Signer, id: &str, payload: &Value) -> Vec<u8> {
    signer.sign_value(
        "command",
        id,
        payload,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    )
}

async fn close<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, code: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "fake".into(),
        })))
        .await;
}
