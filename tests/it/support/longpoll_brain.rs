//! An in-process fake brain for the HTTPS long-poll transport (protocol
//! §10): the connect probe, uploads and command polls answered as a 1.13.0
//! brain answers them, or with a fault the test scripts per request.
//!
//! Every uploaded frame is verified with the crate's own [`Verifier`],
//! bound to the agent and project the probe names and to the request's
//! `X-Z4J-Session-Nonce`; a frame that fails invalidates its session (HTTP
//! 409 from then on), as the brain does. Command frames are signed with
//! the crate's own [`Signer`] for the session that polls. Events are
//! stored once per identity, as the brain deduplicates them (§6.6), and
//! everything received is recorded. `GET /ws/agent` gets plain HTTP (a
//! path that does not carry WebSockets) until the test has WebSocket
//! connections passed to the WebSocket fake brain.
//!
//! Served with hyper directly rather than axum: a service error is how a
//! test makes the fake close a connection without answering.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Method, Response};
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use z4j_agentd::protocol::{self, SessionBinding, Signer, SigningKey, Value, Verifier};

pub use super::fake_brain::{AGENT_ID, PROJECT_ID, SECRET, TOKEN};

/// The session header (its value is the `session_id` of every signature).
const SESSION_HEADER: &str = "x-z4j-session-nonce";
/// The longest a command poll is held, whatever it asks for.
const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// How long the `wait_*` helpers wait.
const WAIT: Duration = Duration::from_secs(10);

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /api/v1/agent/commands` with `max_frames=0`.
    Probe,
    /// `GET /api/v1/agent/commands` claiming commands.
    Poll,
    /// `POST /api/v1/agent/events`.
    Upload,
    /// `GET /ws/agent`: a WebSocket upgrade attempt.
    WebSocket,
}

/// Which requests a scripted fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Probe,
    Poll,
    /// Any upload (after [`Target::EventUpload`]'s script, for one that
    /// carries events).
    Upload,
    /// An upload carrying at least one `event_batch` frame.
    EventUpload,
    WebSocket,
}

/// How the fake answers one request instead of normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status with the brain's error body (`{"error": ...}`).
    /// 409 also invalidates the session, as the brain does after a frame
    /// fails its checks.
    Status(u16),
    /// Handle the request (an upload's frames are verified, recorded and
    /// stored), then close the connection without an answer: the answer
    /// lost on the way back.
    DropAnswer,
    /// Upload: take every frame but the `event_batch` ones, and answer 200
    /// with those counted as `rejected` (a transient failure on the
    /// brain's side); their events are recorded but not stored.
    RejectEvents,
    /// Hold the request until [`LongPollBrain::release`], then answer it
    /// normally.
    Hold,
}

/// One request the fake got.
#[derive(Debug, Clone)]
pub struct Request {
    pub route: Route,
    /// `X-Z4J-Session-Nonce`.
    pub session: Option<String>,
    pub query: String,
    pub body_bytes: usize,
    /// Ids of the events in an upload's `event_batch` frames, read before
    /// any check.
    pub event_ids: Vec<String>,
    /// The status answered; `None` while held or waiting, or when the
    /// connection was closed without an answer.
    pub status: Option<u16>,
}

/// One verified frame of an upload.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The session nonce it was verified for.
    pub session: String,
    /// Index of the upload in [`LongPollBrain::requests`].
    pub request: usize,
    pub frame_type: String,
    pub id: String,
    pub seq: u64,
    /// The frame's own `nonce`.
    pub nonce: String,
    pub payload: Value,
    /// Whether the fake took it (not refused by [`Fault::RejectEvents`]).
    pub taken: bool,
}

/// One event in a verified `event_batch` frame.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Index of its frame in [`LongPollBrain::frames`].
    pub frame: usize,
    pub event: Value,
}

#[derive(Debug, Default)]
struct Script {
    probe: VecDeque<Fault>,
    poll: VecDeque<Fault>,
    upload: VecDeque<Fault>,
    event_upload: VecDeque<Fault>,
    websocket: VecDeque<Fault>,
}

impl Script {
    fn queue(&mut self, target: Target) -> &mut VecDeque<Fault> {
        match target {
            Target::Probe => &mut self.probe,
            Target::Poll => &mut self.poll,
            Target::Upload => &mut self.upload,
            Target::EventUpload => &mut self.event_upload,
            Target::WebSocket => &mut self.websocket,
        }
    }
}

/// One long-poll session, named by its nonce.
struct Session {
    verifier: Verifier,
    signer: Signer,
    invalidated: bool,
}

#[derive(Default)]
struct Record {
    requests: Vec<Request>,
    frames: Vec<Frame>,
    deliveries: Vec<Delivery>,
    /// Event identity (§6.6) -> the event, first delivery.
    stored: BTreeMap<String, Value>,
    verify_failures: Vec<String>,
    auth_headers: Vec<String>,
}

struct State {
    key: SigningKey,
    record: Mutex<Record>,
    sessions: Mutex<HashMap<String, Session>>,
    /// The session of the last successful probe: only its polls claim
    /// commands (a poll the daemon gave up on must not swallow one).
    latest: Mutex<Option<String>>,
    script: Mutex<Script>,
    websocket_status: Mutex<u16>,
    /// Where WebSocket connections go once the path carries them.
    websocket_to: Mutex<Option<String>>,
    max_body: Mutex<Option<usize>>,
    commands: Mutex<VecDeque<(String, Value)>>,
    command_queued: Notify,
    /// The longest a poll is held with nothing to claim, when shorter than
    /// the agent's `wait` (as a brain answers early).
    poll_hold: Mutex<Option<Duration>>,
    held: AtomicUsize,
    release: Semaphore,
}

/// A running fake long-poll brain.
pub struct LongPollBrain {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<State>,
    accepting: tokio::task::AbortHandle,
}

impl Drop for LongPollBrain {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// The closed connection of [`Fault::DropAnswer`] (a service error makes
/// hyper close the connection without a response).
#[derive(Debug)]
struct DroppedOnPurpose;

impl std::fmt::Display for DroppedOnPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake brain closed the connection without an answer")
    }
}

impl std::error::Error for DroppedOnPurpose {}

impl LongPollBrain {
    /// Starts the fake on a free loopback port. The WebSocket upgrade is
    /// answered HTTP 400 until [`LongPollBrain::answer_websocket_with`].
    pub async fn start() -> LongPollBrain {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            key: SigningKey::from_base64(SECRET).unwrap(),
            record: Mutex::default(),
            sessions: Mutex::default(),
            latest: Mutex::default(),
            script: Mutex::default(),
            websocket_status: Mutex::new(400),
            websocket_to: Mutex::default(),
            max_body: Mutex::default(),
            commands: Mutex::default(),
            command_queued: Notify::new(),
            poll_hold: Mutex::default(),
            held: AtomicUsize::new(0),
            release: Semaphore::new(0),
        });
        let shared = state.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let pass_to = state.websocket_to.lock().unwrap().clone();
                    if let Some(addr) = pass_to {
                        if is_websocket_request(&tcp).await {
                            pass_websocket(&state, tcp, &addr).await;
                            return;
                        }
                    }
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        })
        .abort_handle();
        LongPollBrain {
            url,
            state,
            accepting,
        }
    }

    /// Answers the next requests of `target`, one each, with `faults`
    /// (after any already scripted).
    pub fn script(&self, target: Target, faults: impl IntoIterator<Item = Fault>) {
        self.state
            .script
            .lock()
            .unwrap()
            .queue(target)
            .extend(faults);
    }

    /// The status every WebSocket upgrade attempt gets when none is
    /// scripted.
    pub fn answer_websocket_with(&self, status: u16) {
        *self.state.websocket_status.lock().unwrap() = status;
    }

    /// From the next connection on, passes WebSocket connections to the
    /// WebSocket brain at `ws_brain_url` (`http://host:port`), as a proxy
    /// that was set to carry upgrades does; they are recorded with status
    /// 101.
    pub fn pass_websocket_to(&self, ws_brain_url: &str) {
        let addr = ws_brain_url.trim_start_matches("http://").to_string();
        *self.state.websocket_to.lock().unwrap() = Some(addr);
    }

    /// Refuses an upload body larger than `bytes` with HTTP 413, as the
    /// brain does past its `Z4J_MAX_PAYLOAD_SIZE_BYTES`.
    pub fn limit_body(&self, bytes: usize) {
        *self.state.max_body.lock().unwrap() = Some(bytes);
    }

    /// Queues a command for the next poll of the current session to claim.
    pub fn push_command(&self, id: &str, payload: Value) {
        self.state
            .commands
            .lock()
            .unwrap()
            .push_back((id.to_string(), payload));
        self.state.command_queued.notify_waiters();
    }

    /// Answers polls with nothing to claim after `hold` at most, rather
    /// than the agent's whole `wait`.
    pub fn hold_polls_for(&self, hold: Duration) {
        *self.state.poll_hold.lock().unwrap() = Some(hold);
    }

    /// Lets one held request go on.
    pub fn release(&self) {
        self.state.release.add_permits(1);
    }

    /// Waits until `n` requests have been held so far.
    pub async fn wait_held(&self, n: usize) {
        self.wait_until(&format!("{n} held requests"), || {
            self.state.held.load(Ordering::SeqCst) >= n
        })
        .await;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.record.lock().unwrap().requests.clone()
    }

    /// The requests of `route` so far.
    pub fn requests_to(&self, route: Route) -> Vec<Request> {
        let mut r = self.requests();
        r.retain(|r| r.route == route);
        r
    }

    /// Every verified frame so far, in arrival order.
    pub fn frames(&self) -> Vec<Frame> {
        self.state.record.lock().unwrap().frames.clone()
    }

    /// The types of the verified frames, in arrival order.
    pub fn frame_types(&self) -> Vec<String> {
        self.frames().into_iter().map(|f| f.frame_type).collect()
    }

    /// Every event of every verified `event_batch` frame, re-sends included.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.record.lock().unwrap().deliveries.clone()
    }

    /// The events stored, one per identity.
    pub fn stored(&self) -> Vec<Value> {
        self.state
            .record
            .lock()
            .unwrap()
            .stored
            .values()
            .cloned()
            .collect()
    }

    /// The task ids of the events stored.
    pub fn stored_task_ids(&self) -> BTreeSet<String> {
        self.stored()
            .iter()
            .map(|e| str_at(e, "task_id").to_string())
            .collect()
    }

    /// The session nonces, in the order they first appeared.
    pub fn sessions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.requests() {
            if let Some(s) = r.session {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// Why frames failed verification (empty when every one passed).
    pub fn verify_failures(&self) -> Vec<String> {
        self.state.record.lock().unwrap().verify_failures.clone()
    }

    /// The `Authorization` headers seen.
    pub fn auth_headers(&self) -> Vec<String> {
        self.state.record.lock().unwrap().auth_headers.clone()
    }

    /// The `command_ack` and `command_result` frames for command `id`:
    /// (type, payload), in arrival order.
    pub fn command_frames(&self, id: &str) -> Vec<(String, Value)> {
        self.frames()
            .into_iter()
            .filter(|f| f.id == id && f.frame_type.starts_with("command_"))
            .map(|f| (f.frame_type, f.payload))
            .collect()
    }

    /// Waits until `n` frames were received for command `id`; returns them.
    pub async fn wait_command_frames(&self, id: &str, n: usize) -> Vec<(String, Value)> {
        self.wait_until(&format!("{n} frames for command {id}"), || {
            self.command_frames(id).len() >= n
        })
        .await;
        self.command_frames(id)
    }

    async fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {what}; requests: {:?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A string at `k` of a map (`""` when absent).
pub fn str_at<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// What the brain deduplicates an event by (§6.6): engine, task id, kind
/// and the second it occurred for a task event, its id otherwise.
pub fn identity(e: &Value) -> String {
    let task = str_at(e, "task_id");
    if task.is_empty() {
        return format!("id:{}", str_at(e, "id"));
    }
    let second = protocol::parse_iso8601(str_at(e, "occurred_at"))
        .map(|t| t.unix_timestamp())
        .unwrap_or_default();
    format!(
        "{}:{task}:{}:{second}",
        str_at(e, "engine"),
        str_at(e, "kind")
    )
}

/// Whether the connection's first request is for `/ws/agent` (read
/// without taking it off the connection).
async fn is_websocket_request(tcp: &tokio::net::TcpStream) -> bool {
    const START: &[u8] = b"GET /ws/agent";
    let mut buf = [0u8; START.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) if n == buf.len() => return buf == START,
            Ok(Ok(n)) if n > 0 && buf[..n] == START[..n] => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return false,
        }
    }
}

/// Splices a WebSocket connection to the WebSocket brain at `addr`.
async fn pass_websocket(state: &State, mut tcp: tokio::net::TcpStream, addr: &str) {
    state.record.lock().unwrap().requests.push(Request {
        route: Route::WebSocket,
        session: None,
        query: String::new(),
        body_bytes: 0,
        event_ids: Vec::new(),
        status: Some(101),
    });
    let Ok(mut upstream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
}

type Answer = Result<Response<Body>, DroppedOnPurpose>;

fn json(status: u16, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The brain's answer for a refusal, `{"error": <code>}`.
fn refusal(status: u16) -> Response<Body> {
    let code = match status {
        400 => "bad_request",
        401 => "invalid_token",
        403 => "forbidden",
        409 => "session_invalidated",
        413 => "payload_too_large",
        429 => "rate_limited",
        503 => "session_table_full",
        _ => "error",
    };
    json(status, serde_json::json!({ "error": code }))
}

/// A command answer with the headers naming the agent and project.
fn with_ids(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert("x-z4j-agent-id", AGENT_ID.parse().unwrap());
    h.insert("x-z4j-project-id", PROJECT_ID.parse().unwrap());
    r
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// What an upload body carries, read without checking anything.
#[derive(Default)]
struct Carried {
    frames: Vec<String>,
    /// Whether any frame is an `event_batch`.
    events: bool,
    /// The ids of the events in its `event_batch` frames.
    event_ids: Vec<String>,
}

fn frames_of(body: &[u8]) -> Option<Carried> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let frames: Vec<String> = v
        .get("frames")?
        .as_array()?
        .iter()
        .map(|f| f.as_str().map(str::to_string))
        .collect::<Option<_>>()?;
    let mut carried = Carried::default();
    for f in &frames {
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(f) else {
            continue;
        };
        if frame["type"] == "event_batch" {
            carried.events = true;
            if let Some(events) = frame["payload"]["events"].as_array() {
                carried.event_ids.extend(
                    events
                        .iter()
                        .map(|e| e["id"].as_str().unwrap_or("").to_string()),
                );
            }
        }
    }
    carried.frames = frames;
    Some(carried)
}

async fn handle(state: Arc<State>, req: hyper::Request<Incoming>) -> Answer {
    let query = req.uri().query().unwrap_or("").to_string();
    let route = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws/agent") => Route::WebSocket,
        (&Method::GET, "/api/v1/agent/commands") if param(&query, "max_frames") == Some("0") => {
            Route::Probe
        }
        (&Method::GET, "/api/v1/agent/commands") => Route::Poll,
        (&Method::POST, "/api/v1/agent/events") => Route::Upload,
        _ => return Ok(refusal(404)),
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let session = header(SESSION_HEADER);
    let auth = header("authorization");
    let body = axum::body::to_bytes(Body::new(req.into_body()), 64 << 20)
        .await
        .unwrap_or_default();
    let carried = if route == Route::Upload {
        frames_of(&body).unwrap_or_default()
    } else {
        Carried::default()
    };
    let index = {
        let mut rec = state.record.lock().unwrap();
        if let Some(a) = &auth {
            rec.auth_headers.push(a.clone());
        }
        rec.requests.push(Request {
            route,
            session: session.clone(),
            query: query.clone(),
            body_bytes: body.len(),
            event_ids: carried.event_ids.clone(),
            status: None,
        });
        rec.requests.len() - 1
    };
    let asked = Asked {
        route,
        session: session.unwrap_or_default(),
        auth,
        query,
        body_bytes: body.len(),
        carried,
        index,
    };
    let answer = answer(&state, &asked).await;
    if let Ok(r) = &answer {
        state.record.lock().unwrap().requests[index].status = Some(r.status().as_u16());
    }
    answer
}

/// One request, read.
struct Asked {
    route: Route,
    /// `X-Z4J-Session-Nonce` (`""` without one, as the brain binds it).
    session: String,
    auth: Option<String>,
    query: String,
    body_bytes: usize,
    carried: Carried,
    /// Its index in the record.
    index: usize,
}

async fn answer(state: &State, asked: &Asked) -> Answer {
    let Asked {
        route,
        session,
        auth,
        query,
        body_bytes,
        carried,
        index,
    } = asked;
    let (route, index) = (*route, *index);
    let fault = {
        let mut script = state.script.lock().unwrap();
        match route {
            Route::Probe => script.probe.pop_front(),
            Route::Poll => script.poll.pop_front(),
            Route::WebSocket => script.websocket.pop_front(),
            Route::Upload if carried.events && !script.event_upload.is_empty() => {
                script.event_upload.pop_front()
            }
            Route::Upload => script.upload.pop_front(),
        }
    };
    if route == Route::WebSocket {
        return match fault {
            Some(Fault::DropAnswer) => Err(DroppedOnPurpose),
            Some(Fault::Status(s)) => Ok(refusal(s)),
            _ => Ok(refusal(*state.websocket_status.lock().unwrap())),
        };
    }
    if auth.as_deref() != Some(format!("Bearer {TOKEN}").as_str()) {
        return Ok(refusal(401));
    }
    if route == Route::Upload {
        let limit = *state.max_body.lock().unwrap();
        if limit.is_some_and(|max| *body_bytes > max) {
            return Ok(refusal(413));
        }
    }
    match fault {
        Some(Fault::Status(s)) => {
            if s == 409 {
                if let Some(sess) = state.sessions.lock().unwrap().get_mut(session) {
                    sess.invalidated = true;
                }
            }
            return Ok(refusal(s));
        }
        Some(Fault::Hold) => {
            state.held.fetch_add(1, Ordering::SeqCst);
            state.release.acquire().await.unwrap().forget();
        }
        _ => {}
    }
    let invalidated = {
        let mut sessions = state.sessions.lock().unwrap();
        let s = sessions.entry(session.clone()).or_insert_with(|| {
            let binding = SessionBinding::new(AGENT_ID, PROJECT_ID, session.clone());
            Session {
                verifier: Verifier::new(state.key.clone(), binding.clone()),
                signer: Signer::new(state.key.clone(), binding),
                invalidated: false,
            }
        });
        s.invalidated
    };
    if invalidated {
        return Ok(refusal(409));
    }
    let answered = match route {
        Route::Probe => {
            *state.latest.lock().unwrap() = Some(session.clone());
            with_ids(json(200, serde_json::json!({ "frames": [] })))
        }
        Route::Poll => {
            let wait = param(query, "wait")
                .and_then(|w| w.parse().ok())
                .map_or(MAX_POLL_WAIT, Duration::from_secs)
                .min(MAX_POLL_WAIT);
            let wait = state
                .poll_hold
                .lock()
                .unwrap()
                .map_or(wait, |hold| hold.min(wait));
            let max = param(query, "max_frames")
                .and_then(|m| m.parse().ok())
                .unwrap_or(50);
            let frames = poll(state, session, wait, max).await;
            with_ids(json(200, serde_json::json!({ "frames": frames })))
        }
        Route::Upload => {
            let reject_events = fault == Some(Fault::RejectEvents);
            match take_upload(state, session, &carried.frames, index, reject_events) {
                Some((accepted, rejected)) => json(
                    200,
                    serde_json::json!({
                        "accepted": accepted,
                        "rejected": rejected,
                        "errors": [],
                        "error_code": null,
                    }),
                ),
                None => refusal(409),
            }
        }
        Route::WebSocket => unreachable!("answered above"),
    };
    if fault == Some(Fault::DropAnswer) {
        return Err(DroppedOnPurpose);
    }
    Ok(answered)
}

/// Verifies and records an upload's frames and stores their events;
/// `(accepted, rejected)` frames, or `None` when a frame failed its checks
/// (the session is invalidated then, as the brain does).
fn take_upload(
    state: &State,
    session: &str,
    frames: &[String],
    request: usize,
    reject_events: bool,
) -> Option<(u64, u64)> {
    let mut sessions = state.sessions.lock().unwrap();
    let sess = sessions.get_mut(session).expect("created above");
    let mut rec = state.record.lock().unwrap();
    let now = OffsetDateTime::now_utc();
    let (mut accepted, mut rejected) = (0u64, 0u64);
    for raw in frames {
        let frame = match sess.verifier.verify(raw.as_bytes(), now) {
            Ok(f) => f,
            Err(e) => {
                rec.verify_failures.push(format!("session {session}: {e}"));
                sess.invalidated = true;
                return None;
            }
        };
        let nonce = serde_json::from_str::<serde_json::Value>(raw)
            .ok()
            .and_then(|v| v["nonce"].as_str().map(str::to_string))
            .unwrap_or_default();
        let is_events = frame.frame_type == "event_batch";
        let taken = !(reject_events && is_events);
        if taken {
            accepted += 1;
        } else {
            rejected += 1;
        }
        rec.frames.push(Frame {
            session: session.to_string(),
            request,
            frame_type: frame.frame_type.clone(),
            id: frame.id.clone(),
            seq: frame.seq,
            nonce,
            payload: frame.payload.clone(),
            taken,
        });
        if !is_events {
            continue;
        }
        let at = rec.frames.len() - 1;
        for e in frame
            .payload
            .get("events")
            .and_then(Value::as_array)
            .unwrap_or(&[])
        {
            rec.deliveries.push(Delivery {
                frame: at,
                event: e.clone(),
            });
            if taken {
                rec.stored.entry(identity(e)).or_insert_with(|| e.clone());
            }
        }
    }
    Some((accepted, rejected))
}

/// Waits up to `wait` for commands and claims up to `max` of them, signed
/// for `session`; only the session of the last probe claims any.
async fn poll(state: &State, session: &str, wait: Duration, max: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let queued = state.command_queued.notified();
        tokio::pin!(queued);
        queued.as_mut().enable();
        if state.latest.lock().unwrap().as_deref() == Some(session) {
            let claimed: Vec<(String, Value)> = {
                let mut q = state.commands.lock().unwrap();
                let n = q.len().min(max);
                q.drain(..n).collect()
            };
            if !claimed.is_empty() {
                let mut sessions = state.sessions.lock().unwrap();
                let signer = &mut sessions.get_mut(session).expect("created above").signer;
                return claimed
                    .iter()
                    .map(|(id, payload)| {
                        let frame = signer.sign_value(
                            "command",
                            id,
                            payload,
                            OffsetDateTime::now_utc(),
                            &protocol::new_nonce(),
                        );
                        String::from_utf8(frame).expect("a signed frame is UTF-8")
                    })
                    .collect();
            }
        }
        tokio::select! {
            _ = &mut queued => {}
            _ = tokio::time::sleep_until(deadline) => return Vec::new(),
        }
    }
}
