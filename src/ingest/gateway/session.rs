//! One local agent's session, past its `hello_ack`: the reader verifies
//! each frame as the brain would (HMAC, timestamp, sequence, nonce) and
//! hands what it means to the same handler, counters, router and spool
//! appends as a socket client's messages; the writer turns the replies
//! queued for the connection into frames signed for this session.
//!
//! Invariants:
//! * the connection's replies go through the bounded reply queue of every
//!   local connection: an agent that does not read cannot hold the daemon;
//! * a frame that fails its signature closes the session with 4403 and
//!   marks the agent (token and `worker_id`) so that its next handshakes
//!   are refused with 4403 too, where its auth backoff applies;
//! * appends are settled (and acknowledged, while the agent is there)
//!   before the session is gone.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use super::handshake::{self, AgentWs, Established};
use super::translate::{self, Inbound};
use super::{peer, Gateway, TokenDigest, MAX_FRAME_BYTES};
use crate::clients::ClientInfo;
use crate::ingest::connection::Connection;
use crate::ingest::framing::Framing;
use crate::ingest::handler::handle;
use crate::ingest::replies::{QueuedBytes, Replies, ReplyQueue};
use crate::ingest::{Ingest, MAX_PENDING_APPENDS};
use crate::protocol::{new_nonce, Signer, SigningKey, Value, Verifier, VerifyError};
use crate::spool::SpoolError;
use crate::stats::Stats;

/// Without a message from the agent for this long, the session ends with
/// 4408, as at the brain (its heartbeats come every 10 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one frame to an agent may take to write: an agent that reads
/// nothing for this long is given up on (its session ends).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a session ends, for the writer.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// Still going.
    Open,
    /// The agent went away: nothing to send.
    Gone,
    /// Close with this code once what is queued is written.
    After(u16, String),
    /// Close with this code now.
    Now(u16, String),
}

impl Ingest {
    /// Serves one accepted gateway connection: the handshake, then the
    /// session, inside a `gateway` span (connection id, the agent's
    /// `worker_id`).
    pub(super) async fn gateway_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) {
        let local = stream.local_addr().ok();
        let Some(est) = handshake::establish(stream, peer, &gateway, &self.stats).await else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("gateway", client = id, worker_id = %est.worker_id);
        self.gateway_session(id, est, peer, local, gateway, shutdown)
            .instrument(span)
            .await
    }

    async fn gateway_session(
        self: Arc<Self>,
        id: u64,
        est: Established,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) {
        let Established {
            ws,
            token,
            hello,
            worker_id,
            binding,
            hello_ack,
        } = est;
        let key = gateway.uplink.borrow().key.clone();
        let (sink, mut frames) = ws.split();
        let (reply_tx, reply_rx) = ReplyQueue::new();
        let queued = reply_tx.queued.clone();
        let (end_tx, end_rx) = watch::channel(Ending::Open);
        let pid = hello
            .get("worker_pid")
            .and_then(Value::as_i64)
            .and_then(|p| i32::try_from(p).ok());
        let (uid, gid) = local.map_or((peer::UNKNOWN_ID, peer::UNKNOWN_ID), |l| {
            peer::credentials(peer, l, pid)
        });
        self.stats.clients.connected(
            id,
            ClientInfo {
                pid,
                uid,
                gid,
                framing: "gateway",
                ..ClientInfo::default()
            },
        );
        self.stats.gateway.session_opened();
        let framework = hello
            .get("framework")
            .and_then(Value::as_str)
            .unwrap_or("-");
        tracing::info!(
            %peer,
            pid,
            uid,
            framework,
            "gateway: z4j agent connected"
        );
        let mut conn = Connection {
            ingest: &self,
            id,
            pid,
            replies: Replies {
                tx: reply_tx,
                framing: Framing::MsgPack,
                stats: self.stats.clone(),
            },
            pending: VecDeque::new(),
        };
        let registered = handle(
            local_hello(&hello, &worker_id),
            &self.limits(),
            OffsetDateTime::now_utc(),
        );
        conn.apply(registered).await;
        // The agent hears its `hello_ack` only now that it is registered:
        // a command for it can come at once.
        let replaced = gateway.take_slot(token, &worker_id, id);
        let writer_gone = CancellationToken::new();
        let writer = Writer {
            gone: writer_gone.clone(),
            sink,
            rx: reply_rx,
            queued,
            signer: Signer::new(key.clone(), binding.clone()),
            key: key.clone(),
            end: end_rx,
            stats: self.stats.clone(),
        };
        let writer = tokio::spawn(writer.run(hello_ack).instrument(Span::current()));
        let mut reader = Reader {
            verifier: Verifier::new(key, binding),
            gateway: &gateway,
            token,
            worker_id: &worker_id,
            replaced,
            writer_gone,
        };
        let ending = conn.serve_frames(&mut frames, &mut reader, &shutdown).await;
        if matches!(ending, Ending::Now(..)) {
            let _ = end_tx.send(ending.clone());
        }
        conn.finish().await;
        let closing = ending != Ending::Gone;
        let _ = end_tx.send(ending);
        let _ = writer.await;
        if closing {
            // Read on until the agent answers the close frame: dropping a
            // socket with unread bytes resets it, and an agent still sending
            // would lose the close code and its reason with the reset.
            handshake::linger(&mut frames).await;
        }
        gateway.leave_slot(token, &worker_id, id);
        self.stats.gateway.session_closed();
        tracing::info!("gateway: z4j agent disconnected");
    }
}

/// The reader's side of a session: what verifies and judges its frames.
struct Reader<'a> {
    verifier: Verifier,
    gateway: &'a Gateway,
    token: TokenDigest,
    worker_id: &'a str,
    /// Cancelled when a newer connection takes this agent's slot.
    replaced: CancellationToken,
    /// Cancelled when the writer gave up on the agent.
    writer_gone: CancellationToken,
}

/// The local `hello` for an agent's `hello` payload: what it runs, named
/// after its framework and `worker_id` in `stats` and in errors to the
/// brain.
fn local_hello(hello: &Value, worker_id: &str) -> Value {
    let text = |k: &str| hello.get(k).and_then(Value::as_str).unwrap_or("");
    let mut m = Value::empty_map();
    m.insert("type", "hello");
    m.insert(
        "process",
        format!(
            "z4j agent {} {} (worker_id {})",
            text("framework"),
            text("agent_version"),
            if worker_id.is_empty() { "-" } else { worker_id }
        ),
    );
    m.insert("framework", text("framework"));
    for key in [
        "engines",
        "schedulers",
        "capabilities",
        "runtime_features",
        "worker_role",
    ] {
        if let Some(v) = hello.get(key) {
            m.insert(key, v.clone());
        }
    }
    m
}

impl Connection<'_> {
    /// Reads the agent's frames until it leaves, the daemon stops, or a
    /// frame ends the session; returns how the writer should end it.
    async fn serve_frames(
        &mut self,
        frames: &mut SplitStream<AgentWs>,
        reader: &mut Reader<'_>,
        shutdown: &CancellationToken,
    ) -> Ending {
        let mut deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            let msg = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return Ending::After(1012, "z4j-agentd is stopping; reconnect shortly".into());
                }
                _ = reader.replaced.cancelled() => {
                    tracing::info!("gateway: a newer connection of this z4j agent (same token and worker_id) replaced this one (4002)");
                    return Ending::Now(4002, "replaced by a newer connection with the same worker_id".into());
                }
                _ = reader.writer_gone.cancelled() => return Ending::Gone,
                settled = async { (&mut self.pending.front_mut().expect("guarded").rx).await }, if !self.pending.is_empty() => {
                    let p = self.pending.pop_front().expect("guarded");
                    self.settled(p, settled.unwrap_or(Err(SpoolError::Closed))).await;
                    continue;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("gateway: closed a z4j agent that sent nothing for 90 s (4408)");
                    return Ending::Now(4408, "no message for 90 s".into());
                }
                msg = frames.next() => msg,
            };
            let bytes = match msg {
                None | Some(Ok(Message::Close(_))) => return Ending::Gone,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                    tracing::warn!(
                        size,
                        "gateway: closed a z4j agent that sent a frame over the 1 MiB limit (4400)"
                    );
                    return Ending::Now(
                        4400,
                        format!("frame of {size} bytes is over the limit of {MAX_FRAME_BYTES}"),
                    );
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "gateway: reading from a z4j agent failed");
                    return Ending::Gone;
                }
                Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                Some(Ok(Message::Binary(b))) => b.to_vec(),
                // WebSocket pings and pongs keep TCP alive; only messages
                // count against the idle timeout, as at the brain.
                Some(Ok(_)) => continue,
            };
            deadline = Instant::now() + IDLE_TIMEOUT;
            if let Some(ending) = self.frame(&bytes, reader).await {
                return ending;
            }
            if self.pending.len() >= MAX_PENDING_APPENDS {
                self.settle_front().await;
            }
        }
    }

    /// One frame from the agent; `Some` when it ends the session.
    async fn frame(&mut self, bytes: &[u8], reader: &mut Reader<'_>) -> Option<Ending> {
        let stats = &self.ingest.stats;
        stats.gateway.frame();
        if bytes.len() > MAX_FRAME_BYTES {
            tracing::warn!(
                size = bytes.len(),
                "gateway: closed a z4j agent that sent a frame over the 1 MiB limit (4400)"
            );
            return Some(Ending::Now(
                4400,
                format!(
                    "frame of {} bytes is over the limit of {MAX_FRAME_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let frame = match reader.verifier.verify(bytes, now) {
            Ok(f) => f,
            Err(e) if e.is_signature_failure() => {
                reader.gateway.suspect(reader.token, reader.worker_id);
                tracing::warn!("gateway: closed a z4j agent whose frame signature did not match: its Z4J_HMAC_SECRET is not this project's hmac_secret; its next connections are refused with 4403 until it restarts (4403)");
                return Some(Ending::Now(
                    4403,
                    "frame signature failed: set Z4J_HMAC_SECRET to the project's hmac_secret"
                        .into(),
                ));
            }
            Err(VerifyError::Replay(r)) => {
                tracing::warn!(error = %r, "gateway: closed a z4j agent whose frame failed the replay checks (4403)");
                return Some(Ending::Now(4403, format!("frame refused: {r}")));
            }
            Err(e) => {
                // The verifier's words are written for the brain's frames.
                let why = match e {
                    VerifyError::Malformed(m) => format!("malformed frame: {m}"),
                    VerifyError::BadVersion { found } => {
                        format!("frame envelope version `v` is {found}, expected 2")
                    }
                    other => other.to_string(),
                };
                tracing::warn!("gateway: closed a z4j agent over a malformed frame (1011): {why}");
                return Some(Ending::Now(1011, why));
            }
        };
        if frame.frame_type == "event_batch" {
            stats.gateway.event_batch();
        }
        let limits = self.ingest.limits();
        match translate::inbound(frame) {
            Inbound::Local(v) => self.apply(handle(v, &limits, now)).await,
            Inbound::Loss(loss, v) => {
                let engines = stats.clients.engines_of(self.id);
                for (engines, n) in reader.gateway.loss_delta(&loss, &engines) {
                    tracing::warn!(n, engines = ?engines, "gateway: a z4j agent reports events its own buffer lost before they reached z4j-agentd");
                    stats.telemetry.engine_dropped(&engines, n);
                }
                if let Some(v) = v {
                    self.apply(handle(v, &limits, now)).await;
                }
            }
            Inbound::Taken => {}
            Inbound::Close(code, why) => {
                tracing::warn!(
                    code,
                    "gateway: closed a z4j agent over a frame the brain would refuse: {why}"
                );
                return Some(Ending::Now(code, why));
            }
        }
        None
    }
}

/// The writing side of a session.
struct Writer {
    /// Cancelled when it gives up on the agent (the session then ends).
    gone: CancellationToken,
    sink: SplitSink<AgentWs, Message>,
    /// The connection's reply queue.
    rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<QueuedBytes>,
    /// Signs for this session.
    signer: Signer,
    /// The project's key (purge confirmations).
    key: SigningKey,
    /// How the session ends.
    end: watch::Receiver<Ending>,
    stats: Arc<Stats>,
}

impl Writer {
    /// Writes `hello_ack`, then the connection's queued replies as signed
    /// frames until the session ends, then the close frame, if any.
    async fn run(self, hello_ack: Vec<u8>) {
        let Writer {
            gone,
            mut sink,
            mut rx,
            queued,
            mut signer,
            key,
            mut end,
            stats,
        } = self;
        // Before anything the registration queued (a command held for one of
        // its engines).
        let mut failed = !sent(&mut sink, hello_ack, &mut end).await;
        if failed {
            gone.cancel();
        }
        loop {
            tokio::select! {
                biased;
                changed = end.changed() => {
                    if changed.is_err() || matches!(*end.borrow(), Ending::Now(..)) {
                        break;
                    }
                }
                bytes = rx.recv() => match bytes {
                    None => break,
                    Some(b) => {
                        queued.taken(b.len());
                        if failed {
                            continue;
                        }
                        if let Some(frame) = signed_frame(&b, &mut signer, &key) {
                            failed = !sent(&mut sink, frame, &mut end).await;
                            if failed {
                                gone.cancel();
                            }
                        }
                    }
                },
            }
        }
        let ending = loop {
            let e = end.borrow_and_update().clone();
            if e != Ending::Open {
                break e;
            }
            if end.changed().await.is_err() {
                break Ending::Gone;
            }
        };
        if failed {
            // Nothing more can be written: the connection is dropped.
            return;
        }
        if let Ending::Now(code, reason) | Ending::After(code, reason) = ending {
            stats.gateway.closed(code);
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: handshake::close_reason(&reason).into(),
            };
            let close = sink.send(Message::Close(Some(frame)));
            let _ = tokio::time::timeout(WRITE_TIMEOUT, close).await;
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
    }
}

/// Writes one frame; false when it could not be written: the agent went
/// away, read nothing for [`WRITE_TIMEOUT`], or the session must close now.
/// An agent that stops reading never holds its session (and its slot).
async fn sent(
    sink: &mut SplitSink<AgentWs, Message>,
    frame: Vec<u8>,
    end: &mut watch::Receiver<Ending>,
) -> bool {
    let now = async {
        while end.changed().await.is_ok() {
            if matches!(*end.borrow(), Ending::Now(..)) {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let write = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Binary(frame.into())));
    tokio::select! {
        r = write => match r {
            Ok(r) => r.is_ok(),
            Err(_) => {
                tracing::warn!(
                    "gateway: a z4j agent read nothing for {} s; what is queued for it is dropped and its session ends",
                    WRITE_TIMEOUT.as_secs()
                );
                false
            }
        },
        () = now => false,
    }
}

/// A queued reply (length-prefixed MessagePack) as the signed frame the
/// brain would send, if it has one; `error` replies are logged instead
/// (they are counted where they were decided).
fn signed_frame(queued: &[u8], signer: &mut Signer, key: &SigningKey) -> Option<Vec<u8>> {
    let reply: Value = rmp_serde::from_slice(queued.get(4..)?).ok()?;
    if reply.get("type").and_then(Value::as_str) == Some("error") {
        let code = reply.get("code").and_then(Value::as_str).unwrap_or("-");
        let message = reply.get("message").and_then(Value::as_str).unwrap_or("");
        tracing::debug!(
            code,
            "gateway: refused part of a z4j agent's frame: {message}"
        );
        return None;
    }
    let out = translate::outbound(&reply, key)?;
    Some(signer.sign_value(
        out.frame_type,
        &out.id,
        &out.payload,
        OffsetDateTime::now_utc(),
        &new_nonce(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_hello_names_the_agent_and_keeps_what_it_runs() {
        let hello = crate::protocol::json::parse(
            br#"{"protocol_version":"2","agent_version":"1.13.0","framework":"celery","engines":["celery"],
                "capabilities":{"celery":["cancel_task"]},"runtime_features":["retry_by_reference"],
                "worker_role":"worker","host":{"name":"h"}}"#,
        )
        .unwrap();
        let m = local_hello(&hello, "celery-42-1");
        assert_eq!(
            m.get("process").and_then(Value::as_str),
            Some("z4j agent celery 1.13.0 (worker_id celery-42-1)")
        );
        assert_eq!(m.get("engines"), hello.get("engines"));
        assert_eq!(m.get("capabilities"), hello.get("capabilities"));
        assert_eq!(m.get("host"), None);
        let h = handle(
            m,
            &crate::ingest::Limits {
                max_event_bytes: 1 << 20,
                max_message_bytes: 16 << 20,
            },
            OffsetDateTime::now_utc(),
        );
        let r = h.register.expect("a hello registers");
        assert_eq!(r.engines, ["celery"]);
        assert!(h.replies.is_empty(), "no errors: {:?}", h.replies);
    }
}
