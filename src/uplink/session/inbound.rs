//! What the brain says in a session, and whether it still says anything:
//! each socket item goes through the one [`reader`](crate::uplink::reader)
//! and is acted on (acks, commands, errors, closes); WebSocket pings show
//! that a brain with nothing to say is still there. Also the answers to
//! commands, which go back on the same socket.

use std::time::Instant;

use futures_util::FutureExt;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{failed, BrainSession, SessionEnd};
use crate::commands::{Command, CommandResult};
use crate::protocol::{self, Value};
use crate::uplink::error::UplinkError;
use crate::uplink::reader::{self, BrainMessage, Received};

/// The close code with which the brain hands this worker slot to another
/// process with the same `worker_id`.
const CLOSE_SLOT_TAKEN: u16 = 4002;

impl BrainSession<'_> {
    /// Handles one item of the brain's socket.
    pub(super) async fn inbound(
        &mut self,
        item: Option<Result<Message, WsError>>,
    ) -> Result<(), SessionEnd> {
        if matches!(item, Some(Ok(_))) {
            self.unanswered_ping_since = None;
        }
        let bytes = match Received::from_ws(item) {
            Received::Frame(bytes) => bytes,
            Received::Control => return Ok(()),
            Received::Ended => return Err(failed(UplinkError::Ended)),
            Received::Lost(e) => return Err(failed(UplinkError::Lost(e))),
            Received::Closed(code) => {
                if code == CLOSE_SLOT_TAKEN {
                    tracing::error!(
                        worker_id = %self.up.settings.borrow().worker_id,
                        "another process connected to the brain with this daemon's worker_id and took over its slot (close 4002); give each daemon its own Z4J_WORKER_ID"
                    );
                }
                return Err(failed(UplinkError::Closed { code }));
            }
        };
        let message = reader::read_signed(&mut self.verifier, &bytes, OffsetDateTime::now_utc())
            .map_err(|e| failed(UplinkError::Unverified(e)))?;
        match message {
            BrainMessage::Ack {
                acked_id,
                accepted,
                rejected,
            } => self.on_ack(acked_id, accepted, rejected).await,
            BrainMessage::Command { id, payload } => self.on_command(&id, &payload).await,
            BrainMessage::Error {
                code,
                message,
                fatal: true,
            } => Err(failed(UplinkError::Fatal { code, message })),
            BrainMessage::Error { code, message, .. } => {
                tracing::warn!(
                    code = code.as_str(),
                    message = message.as_str(),
                    "the brain reported an error"
                );
                Ok(())
            }
            BrainMessage::Other { frame_type } => {
                tracing::debug!(
                    frame_type = frame_type.as_str(),
                    "ignoring a frame type this daemon does not use"
                );
                Ok(())
            }
        }
    }

    /// A WebSocket ping with each heartbeat, unless one is still unanswered.
    /// Heartbeats get no reply in the protocol, and acks only come while
    /// events flow, so the ping is what shows that the brain still answers.
    pub(super) async fn send_ping(&mut self) -> Result<(), SessionEnd> {
        if self.unanswered_ping_since.is_some() {
            return Ok(());
        }
        self.send_message(Message::Ping(Vec::new().into())).await?;
        // From when the ping left: time it waited behind our own frames is
        // not the brain's.
        self.unanswered_ping_since = Some(Instant::now());
        Ok(())
    }

    /// A brain that answers nothing, not even a ping, for `ack_timeout` is
    /// gone even if its TCP connection is not (a frozen process, a host cut
    /// off without a reset): the session ends and the daemon reconnects.
    pub(super) async fn check_brain_alive(&mut self) -> Result<(), SessionEnd> {
        let overdue = |s: &Self| {
            s.unanswered_ping_since
                .is_some_and(|since| since.elapsed() >= s.ack_timeout)
        };
        // The loop may have been busy sending while answers arrived: read
        // what is already there before calling the brain silent.
        while overdue(self) {
            match self.ws.next().now_or_never() {
                Some(msg) => self.inbound(msg).await?,
                None => break,
            }
        }
        if overdue(self) {
            return Err(failed(UplinkError::Silent {
                secs: self.ack_timeout.as_secs(),
            }));
        }
        Ok(())
    }

    /// Acknowledges the command at once, then routes it to a local process
    /// (its answer arrives later on the results channel) or answers it now
    /// when no process can run it or it was answered before.
    async fn on_command(&mut self, id: &str, payload: &Value) -> Result<(), SessionEnd> {
        let cmd = Command::from_payload(id, payload);
        let mut ack = Value::empty_map();
        ack.insert("delivery_claim_token", cmd.claim.clone());
        let frame = self.signer.sign_value(
            "command_ack",
            id,
            &ack,
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        self.send(frame).await?;
        match self.up.route_command(&cmd, &self.host_label) {
            Some(r) => self.send_result(&r).await,
            None => Ok(()),
        }
    }

    /// Commands the brain pushed into a session closed for a re-hello:
    /// acknowledged and routed now, as if they had come on this session
    /// (the router answers one delivered again without running it twice).
    /// The external schedule protocol's commands are not: the brain binds
    /// each to the session it was sent into (its ack and result count only
    /// there) and activates the schedulers again on every `hello`.
    pub(super) async fn answer_carried(&mut self) -> Result<(), SessionEnd> {
        while !self.up.carried.is_empty() {
            let (id, payload) = self.up.carried.remove(0);
            let action = payload.get("action").and_then(Value::as_str).unwrap_or("");
            if action.starts_with("schedule.external.") {
                tracing::info!(
                    command_id = %id,
                    action,
                    "not handling the command sent into the session closed for the second hello: the brain binds it to that session and sends a new one on this session"
                );
                continue;
            }
            tracing::info!(
                command_id = %id,
                "command the brain sent into the session closed for the second hello; handled now"
            );
            if let Err(end) = self.on_command(&id, &payload).await {
                // Not acknowledged yet if the ack did not go: the brain
                // delivers it again, or it waits for the next session.
                self.up.carried.insert(0, (id, payload));
                return Err(end);
            }
        }
        Ok(())
    }

    /// Sends every answer waiting (from an earlier session or queued now).
    pub(super) async fn flush_results(&mut self) -> Result<(), SessionEnd> {
        while let Some(r) = self
            .up
            .unsent
            .pop_front()
            .or_else(|| self.up.results.try_recv().ok())
        {
            self.send_result_or_keep(r).await?;
        }
        Ok(())
    }

    /// Sends an answer; if the session fails first, it waits for the next.
    pub(super) async fn send_result_or_keep(&mut self, r: CommandResult) -> Result<(), SessionEnd> {
        if let Err(end) = self.send_result(&r).await {
            self.up.unsent.push_front(r);
            return Err(end);
        }
        Ok(())
    }

    async fn send_result(&mut self, r: &CommandResult) -> Result<(), SessionEnd> {
        let frame = self.signer.sign_value(
            "command_result",
            &r.id,
            &r.payload(),
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        self.send(frame).await
    }
}
