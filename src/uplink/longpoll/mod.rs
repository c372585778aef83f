//! The brain over HTTPS long-poll (protocol §10), for a path to the brain
//! that does not carry WebSockets (`Z4J_TRANSPORT=longpoll`, or `auto`
//! after the upgrade was refused).
//!
//! One session is one `X-Z4J-Session-Nonce`: the connect probe learns the
//! agent and project the brain signs for; then uploads (`POST
//! /api/v1/agent/events`) and command polls (`GET
//! /api/v1/agent/commands?wait=10`) run side by side until a failure, a
//! reload or the end.
//!
//! Invariants:
//! * one upload at a time, its frames signed in order as it is built, so
//!   the brain sees this session's `seq` only grow;
//! * events are deleted from the spool only when the brain's HTTP 200 says
//!   it took every frame of the upload that carried them; anything less and
//!   the whole upload goes again, re-signed (the brain stores each event
//!   once);
//! * commands are verified (HMAC and replay guard) before they are acted
//!   on; each is acknowledged in the next upload, then routed as over the
//!   WebSocket;
//! * answers (`command_result`) outlive the session: one that did not
//!   reach the brain goes on the next session, on either transport.

pub(crate) mod http;
pub(crate) mod pack;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::time::{Interval, MissedTickBehavior};

use self::http::{BrainIds, LongPollClient, Upload};
use self::pack::Body;
use super::error::UplinkError;
use super::reader::{self, BrainMessage};
use super::status::SessionFacts;
use super::{SessionEnd, Uplink, STABLE_SESSION};
use crate::clients::Advertisement;
use crate::commands::{Command, CommandResult};
use crate::config::{Transport, UplinkSettings};
use crate::protocol::{self, SessionBinding, Signer, Value, Verifier};
use crate::spool::StoredEvent;
use crate::stats::{FailureStreaks, UplinkState};

/// How long one command poll waits at the brain (it allows 60 s). The
/// brain goes on serving a poll whose client left until its wait ends, and
/// hands it any command issued meanwhile, so the wait is kept short: it
/// bounds what a daemon that stops can miss (6 requests a minute when
/// idle, against the brain's 600 per address).
const POLL_WAIT: Duration = Duration::from_secs(10);
/// The brain's limit on one frame (`FrameUploadBody`), whatever the body
/// budget.
const MAX_FRAME_BYTES: usize = protocol::DEFAULT_MAX_FRAME_BYTES;
/// Most commands one poll claims.
const POLL_MAX_FRAMES: usize = 50;
/// The heartbeat cadence: the brain shows an agent offline after 30 s
/// without one, and forgets an idle long-poll session after 5 minutes.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// The first wait before an upload the brain took only part of goes again;
/// it doubles up to [`RESEND_MAX`] while the brain keeps doing so.
const RESEND_FIRST: Duration = Duration::from_secs(1);
/// See [`RESEND_FIRST`].
const RESEND_MAX: Duration = Duration::from_secs(30);
/// The least time between the starts of two uploads: every long-poll
/// request counts against the brain's limit of 600 agent requests a minute
/// per address, so uploads stay at 5 a second (events wait and go
/// together).
const MIN_UPLOAD_INTERVAL: Duration = Duration::from_millis(200);
/// About the bytes of a signed frame's envelope (the events aside), to
/// decide how many events to read for the room left.
const ENVELOPE_BYTES: usize = 320;
/// The smallest upload budget a 413 can bring the daemon down to.
pub(crate) const MIN_BODY_BYTES: usize = 1024;
/// The contract line named in `agent_status` over long-poll, which has no
/// `hello` to name one in.
const NO_HELLO: &str = "-";

/// A frame that is not an event batch, queued for the next upload and
/// signed when that upload is built.
#[derive(Debug, Clone)]
enum Outgoing {
    /// `command_ack`. One that did not reach the brain is carried to the
    /// next session with its command, which is acknowledged there again
    /// (the router does not run a command twice).
    Ack {
        id: String,
        claim: Value,
        payload: Value,
    },
    /// `command_result`: kept across sessions until the brain takes it.
    Result(CommandResult),
    /// `heartbeat` or `agent_status`: replaced by the next, never re-sent.
    Status {
        frame_type: &'static str,
        payload: Value,
    },
}

/// What the upload on the wire carries.
#[derive(Debug, Default)]
struct InFlight {
    /// Spooled events, as one range of ids: `(first, last, count)`.
    events: Option<(i64, i64, usize)>,
    /// The other frames, to queue again if the brain does not take them.
    outgoing: Vec<Outgoing>,
    /// Frames in the body.
    frames: usize,
    sent_at: Option<Instant>,
}

type Pending<T> = Pin<Box<dyn Future<Output = Result<T, UplinkError>> + Send>>;

/// How a settled upload leaves the session.
enum Settled {
    /// Carry on.
    Next,
    /// The brain took part of it: everything goes again after a wait.
    Later,
    /// The brain asked to slow down (429, 503): everything goes again after
    /// this long.
    Wait(Duration),
}

/// Why `auto` runs on long-poll, and when it tries the WebSocket again.
#[derive(Debug, Default)]
pub(crate) struct Fallback {
    /// What the WebSocket upgrade got when the daemon switched; `None`
    /// while on the WebSocket.
    reason: Option<String>,
    /// When to try the WebSocket again.
    next_ws_try: Option<Instant>,
    /// A 413 brought the upload budget below the setting (kept until the
    /// settings change).
    pub(crate) body_cut: Option<usize>,
}

impl Fallback {
    /// Whether this attempt goes over long-poll without trying the
    /// WebSocket first.
    pub(crate) fn longpoll_now(&self, settings: &UplinkSettings) -> bool {
        match settings.transport {
            Transport::LongPoll => true,
            Transport::WebSocket => false,
            Transport::Auto => {
                self.reason.is_some() && self.next_ws_try.is_some_and(|t| Instant::now() < t)
            }
        }
    }

    /// Whether `auto` came from long-poll: a WebSocket that upgrades but
    /// then carries nothing (no `hello_ack`) sends it back there.
    pub(crate) fn on_longpoll(&self) -> bool {
        self.reason.is_some()
    }

    /// A WebSocket session began: `auto` is back on it.
    pub(crate) fn on_websocket(&mut self, stats: &crate::stats::Stats) {
        if let Some(reason) = self.reason.take() {
            tracing::info!(
                was = %reason,
                "the WebSocket upgrade works again; back on the WebSocket from long-poll"
            );
        }
        self.next_ws_try = None;
        stats.update_uplink(|u| {
            u.transport = Some("websocket");
            u.longpoll_reason = None;
        });
    }

    /// `auto` reached the brain over long-poll after the upgrade was
    /// refused: said once when it switches, quietly on each later refusal.
    fn engaged(&mut self, reason: String, retry: Duration, stats: &crate::stats::Stats) {
        if self.reason.is_none() {
            tracing::warn!(
                refused = %reason,
                retry_websocket_s = retry.as_secs(),
                "the path to the brain refuses WebSockets; switched to HTTPS long-poll (Z4J_TRANSPORT=auto). Commands arrive by polling; pass WebSocket upgrades in the proxy to go back"
            );
            stats.transport_fallbacks.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::debug!(refused = %reason, "the WebSocket upgrade is still refused; staying on long-poll");
        }
        stats.update_uplink(|u| u.longpoll_reason = Some(reason.clone()));
        self.reason = Some(reason);
        self.next_ws_try = Some(Instant::now() + retry);
    }

    /// When `auto` on long-poll tries the WebSocket next, if it does.
    fn ws_try_at(&self, settings: &UplinkSettings) -> Option<Instant> {
        match settings.transport {
            Transport::Auto if self.reason.is_some() => self.next_ws_try,
            _ => None,
        }
    }

    /// The upload budget now.
    fn body_budget(&self, settings: &UplinkSettings) -> usize {
        self.body_cut.map_or(settings.longpoll_max_body, |cut| {
            cut.min(settings.longpoll_max_body)
        })
    }
}

/// One long-poll session.
struct LongPollSession<'a> {
    up: &'a mut Uplink,
    settings: UplinkSettings,
    client: Arc<LongPollClient>,
    signer: Signer,
    verifier: Verifier,
    /// Highest spool id sent in this session.
    cursor: i64,
    outbox: VecDeque<Outgoing>,
    advertised: Advertisement,
    host_label: String,
    connected_at: Instant,
    connected_at_wall: OffsetDateTime,
    last_flush_at: Option<OffsetDateTime>,
    streaks: FailureStreaks,
    /// The wait before an upload the brain took part of goes again.
    resend_wait: Duration,
    /// Most events in one frame: lowered when the brain refused a frame of
    /// several events as too large at the smallest budget.
    event_cap: usize,
    /// One frame per upload, after the brain refused several at the
    /// smallest budget.
    one_frame: bool,
}

impl Uplink {
    /// One long-poll session: the connect probe, then uploads and polls
    /// until it ends. `refused` is what the WebSocket upgrade got, when
    /// `auto` comes here because of it; if the probe fails too, both are
    /// the error.
    pub(crate) async fn serve_longpoll(
        &mut self,
        settings: &UplinkSettings,
        refused: Option<UplinkError>,
    ) -> SessionEnd {
        self.stats.update_uplink(|u| u.transport = Some("longpoll"));
        let nonce = protocol::new_nonce();
        let advertised = self
            .stats
            .clients
            .advertisement(&settings.static_engines, &settings.static_capabilities);
        let features = advertised.runtime_features.join(",");
        let stop = self.stop.clone();
        let opened = self
            .beat
            .answering_while(async {
                tokio::select! {
                    r = open(settings, &nonce, &features) => Some(r),
                    _ = stop.cancelled() => None,
                }
            })
            .await;
        let (client, ids) = match opened {
            None => return SessionEnd::Shutdown,
            Some(Err(error)) => {
                let error = match refused {
                    Some(websocket) => UplinkError::NoTransport {
                        websocket: Box::new(websocket),
                        longpoll: Box::new(error),
                    },
                    None => error,
                };
                return failed(error);
            }
            Some(Ok(opened)) => opened,
        };
        if let Some(refused) = refused {
            self.fallback
                .engaged(refused.to_string(), settings.ws_retry, &self.stats);
        }
        let session_label = format!("lp_{}", &protocol::new_frame_id("")[..12]);
        tracing::Span::current().record("session_id", session_label.as_str());
        let streaks = std::mem::take(&mut self.streaks);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.update_uplink(|u| {
            u.session_id = Some(session_label.clone());
            u.last_error = None;
            u.last_failure_class = None;
            u.connected_at = Some(OffsetDateTime::now_utc());
            u.agent_id = Some(ids.agent_id.clone());
            u.project_id = Some(ids.project_id.clone());
            u.advertised = advertised.clone();
            u.streaks_before_session = streaks;
        });
        self.stats.set_uplink_state(UplinkState::Connected);
        tracing::info!(
            brain = %settings.endpoint.base_url,
            agent_id = %ids.agent_id,
            session_id = %session_label,
            worker_id = %settings.worker_id,
            max_body_bytes = self.fallback.body_budget(settings),
            "connected to the brain over HTTPS long-poll"
        );
        let binding = SessionBinding::new(ids.agent_id, ids.project_id, nonce);
        let now = Instant::now();
        let mut session = LongPollSession {
            signer: Signer::new(settings.key.clone(), binding.clone()),
            verifier: Verifier::new(settings.key.clone(), binding),
            client: Arc::new(client),
            cursor: 0,
            outbox: VecDeque::new(),
            advertised,
            host_label: format!("{} (worker_id {})", settings.agent_name, settings.worker_id),
            connected_at: now,
            connected_at_wall: OffsetDateTime::now_utc(),
            last_flush_at: None,
            streaks,
            resend_wait: RESEND_FIRST,
            event_cap: settings.batch_max_events,
            one_frame: false,
            settings: settings.clone(),
            up: self,
        };
        match session.serve().await {
            SessionEnd::Failed { error, .. } => SessionEnd::Failed {
                error,
                stable: now.elapsed() >= STABLE_SESSION,
            },
            other => other,
        }
    }
}

/// The session's client and the probe's answer.
async fn open(
    settings: &UplinkSettings,
    nonce: &str,
    features: &str,
) -> Result<(LongPollClient, BrainIds), UplinkError> {
    let client = LongPollClient::new(settings, nonce, features).await?;
    let ids = client.probe().await?;
    Ok((client, ids))
}

/// An interval whose first tick is one `period` away.
fn ticker(period: Duration) -> Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t.reset();
    t
}

impl LongPollSession<'_> {
    async fn serve(&mut self) -> SessionEnd {
        self.queue_status();
        // Answers that did not reach the brain before, and commands an
        // ended session was handed after it ended.
        while let Some(r) = self.up.unsent.pop_front() {
            self.outbox.push_back(Outgoing::Result(r));
        }
        for (id, payload) in std::mem::take(&mut self.up.carried) {
            tracing::info!(command_id = %id, "command handed to the previous session after it ended; handled now");
            self.take_command(&id, &payload);
        }
        let mut upload: Option<(Pending<Upload>, InFlight)> = None;
        let mut poll: Option<Pending<Vec<String>>> = Some(self.start_poll(None));
        let mut heartbeat = ticker(HEARTBEAT_INTERVAL);
        // No upload starts before this: a re-send's wait, or the spacing
        // between uploads.
        let mut not_before: Option<tokio::time::Instant> = None;
        let mut last_start: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365);
        let ws_try = self.up.fallback.ws_try_at(&self.settings);
        let ws_timer = tokio::time::sleep_until(ws_try.map_or(far, tokio::time::Instant::from_std));
        tokio::pin!(ws_timer);
        let mut ws_probe: Option<Pending<()>> = None;
        // Set when the session is to end (back to the WebSocket, a reload):
        // no new poll starts, and it ends once the last poll returned and
        // what it brought is acknowledged (the brain would hand a command to
        // a poll left behind).
        let mut leaving: Option<SessionEnd> = None;
        let mut draining = self.up.drain.is_cancelled();
        loop {
            if leaving.is_some() && upload.is_none() && poll.is_none() && self.outbox_settled() {
                if matches!(leaving, Some(SessionEnd::Rehandshake)) {
                    tracing::info!("the WebSocket upgrade works again; leaving long-poll");
                    self.up.fallback.next_ws_try = Some(Instant::now());
                }
                self.keep_answers(None);
                return leaving.take().expect("checked");
            }
            if upload.is_none() && not_before.is_none() {
                let spaced = last_start.map(|t| t + MIN_UPLOAD_INTERVAL);
                match spaced.filter(|t| *t > tokio::time::Instant::now()) {
                    Some(t) => not_before = Some(t),
                    None => match self.next_upload().await {
                        Ok(next) => {
                            if next.is_some() {
                                last_start = Some(tokio::time::Instant::now());
                            }
                            upload = next;
                        }
                        Err(error) => return self.end_failed(error, None, poll.take()).await,
                    },
                }
            }
            if draining && upload.is_none() && self.outbox_settled() && self.spool_depth() == 0 {
                tracing::info!("spool drained to the brain");
                return SessionEnd::Shutdown;
            }
            tokio::select! {
                _ = self.up.beat.asked() => {}
                _ = self.up.stop.cancelled() => return self.grace_over(upload.take()).await,
                _ = self.up.drain.cancelled(), if !draining => draining = true,
                _ = self.up.settings.changed(), if leaving.is_none() => {
                    leaving = Some(SessionEnd::Reload);
                }
                done = async { (&mut upload.as_mut().expect("guarded").0).await }, if upload.is_some() => {
                    let (_, flight) = upload.take().expect("guarded");
                    match self.settle(flight, done).await {
                        Ok(Settled::Next) => {}
                        Ok(Settled::Later) => {
                            not_before = Some(tokio::time::Instant::now() + self.resend_wait);
                            self.resend_wait = (self.resend_wait * 2).min(RESEND_MAX);
                        }
                        Ok(Settled::Wait(wait)) => {
                            not_before = Some(tokio::time::Instant::now() + wait);
                        }
                        Err(error) => return self.end_failed(error, None, poll.take()).await,
                    }
                }
                polled = async { poll.as_mut().expect("guarded").await }, if poll.is_some() => {
                    poll = None;
                    let mut slow_down = None;
                    match polled {
                        Ok(frames) => {
                            if let Err(error) = self.on_commands(&frames) {
                                return self.end_failed(error, upload.take().map(|(_, f)| f), None).await;
                            }
                        }
                        Err(error) => match slow_down_for(&error) {
                            Some(wait) => slow_down = Some(wait),
                            None => return self.end_failed(error, upload.take().map(|(_, f)| f), None).await,
                        },
                    }
                    if leaving.is_none() && !draining {
                        poll = Some(self.start_poll(slow_down));
                    }
                }
                _ = heartbeat.tick() => self.queue_status(),
                _ = self.up.spool.new_events().notified(), if upload.is_none() => {}
                Some(r) = self.up.results.recv() => self.outbox.push_back(Outgoing::Result(r)),
                _ = async { tokio::time::sleep_until(not_before.expect("guarded")).await }, if not_before.is_some() => {
                    not_before = None;
                }
                _ = &mut ws_timer, if ws_try.is_some() && ws_probe.is_none() && leaving.is_none() => {
                    let settings = self.settings.clone();
                    ws_probe = Some(Box::pin(async move { probe_websocket(&settings).await }));
                }
                tried = async { ws_probe.as_mut().expect("guarded").await }, if ws_probe.is_some() => {
                    ws_probe = None;
                    match tried {
                        Ok(()) if leaving.is_none() => leaving = Some(SessionEnd::Rehandshake),
                        Ok(()) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "the WebSocket is still refused; staying on long-poll");
                            let next = Instant::now() + self.settings.ws_retry;
                            self.up.fallback.next_ws_try = Some(next);
                            ws_timer.as_mut().reset(tokio::time::Instant::from_std(next));
                        }
                    }
                }
            }
        }
    }

    /// Ends the session with `error`, keeping its answers; a poll still
    /// out is waited for (the brain would hand it commands with nobody to
    /// read them), and the commands it brings are handled by the next
    /// session.
    async fn end_failed(
        &mut self,
        error: UplinkError,
        flight: Option<InFlight>,
        poll: Option<Pending<Vec<String>>>,
    ) -> SessionEnd {
        if let Some(poll) = poll {
            let stop = self.up.stop.clone();
            let last = tokio::select! {
                r = tokio::time::timeout(POLL_WAIT + Duration::from_secs(5), poll) => r.ok(),
                _ = stop.cancelled() => None,
            };
            if let Some(Ok(frames)) = last {
                self.carry_commands(&frames);
            }
        }
        self.fail(error, flight)
    }

    /// Commands a poll brought after its session failed: verified, and
    /// kept for the next session, which acknowledges and routes them.
    fn carry_commands(&mut self, frames: &[String]) {
        for raw in frames {
            match reader::read_signed(
                &mut self.verifier,
                raw.as_bytes(),
                OffsetDateTime::now_utc(),
            ) {
                Ok(BrainMessage::Command { id, payload }) => self.up.carried.push((id, payload)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "a command the brain handed to the ending session failed verification; ignored")
                }
            }
        }
    }

    fn spool_depth(&self) -> u64 {
        self.up.spool.stats().depth.load(Ordering::Relaxed)
    }

    /// Whether nothing the brain waits on is queued (statuses aside).
    fn outbox_settled(&self) -> bool {
        self.outbox
            .iter()
            .all(|o| matches!(o, Outgoing::Status { .. }))
    }

    /// Queues this moment's `heartbeat` and `agent_status`, in place of any
    /// not sent yet.
    fn queue_status(&mut self) {
        self.outbox
            .retain(|o| !matches!(o, Outgoing::Status { .. }));
        let budget = self.up.fallback.body_budget(&self.settings);
        let facts = SessionFacts {
            advertised: &self.advertised,
            last_flush_at: self.last_flush_at,
            // Escaping in the body adds about a quarter.
            max_frame_bytes: (budget.saturating_sub(protocol::frame_overhead_bytes() + 64) * 3 / 4)
                .min(MAX_FRAME_BYTES - 4096),
            up_for: self.connected_at.elapsed(),
            connected_at_wall: self.connected_at_wall,
            contract_line: NO_HELLO,
            streaks: self.streaks,
        };
        let (hb, status) = self.up.status_payloads(&facts, OffsetDateTime::now_utc());
        self.outbox.push_back(Outgoing::Status {
            frame_type: "heartbeat",
            payload: hb,
        });
        self.outbox.push_back(Outgoing::Status {
            frame_type: "agent_status",
            payload: status,
        });
    }

    /// A command poll, on its own, after `after` when the brain asked to
    /// slow down.
    fn start_poll(&self, after: Option<Duration>) -> Pending<Vec<String>> {
        let client = self.client.clone();
        let contracts = retry_contracts(&self.up.stats.clients.advertisement(
            &self.settings.static_engines,
            &self.settings.static_capabilities,
        ));
        Box::pin(async move {
            if let Some(wait) = after {
                tokio::time::sleep(wait).await;
            }
            client.poll(POLL_WAIT, POLL_MAX_FRAMES, &contracts).await
        })
    }

    /// Verifies the polled commands in order, queues each one's ack, and
    /// routes it.
    fn on_commands(&mut self, frames: &[String]) -> Result<(), UplinkError> {
        for raw in frames {
            let message = reader::read_signed(
                &mut self.verifier,
                raw.as_bytes(),
                OffsetDateTime::now_utc(),
            )
            .map_err(UplinkError::Unverified)?;
            match message {
                BrainMessage::Command { id, payload } => self.take_command(&id, &payload),
                BrainMessage::Error {
                    code,
                    message,
                    fatal: true,
                } => return Err(UplinkError::Fatal { code, message }),
                other => tracing::debug!(?other, "ignoring a polled frame that is not a command"),
            }
        }
        Ok(())
    }

    /// Queues a command's ack, then routes it.
    fn take_command(&mut self, id: &str, payload: &Value) {
        let cmd = Command::from_payload(id, payload);
        self.outbox.push_back(Outgoing::Ack {
            id: id.to_string(),
            claim: cmd.claim.clone(),
            payload: payload.clone(),
        });
        if let Some(r) = self.up.route_command(&cmd, &self.host_label) {
            self.outbox.push_back(Outgoing::Result(r));
        }
    }

    /// Signs a queued frame for this session.
    fn sign_outgoing(&mut self, o: &Outgoing, now: OffsetDateTime) -> Vec<u8> {
        let nonce = protocol::new_nonce();
        match o {
            Outgoing::Ack { id, claim, .. } => {
                let mut p = Value::empty_map();
                p.insert("delivery_claim_token", claim.clone());
                self.signer.sign_value("command_ack", id, &p, now, &nonce)
            }
            Outgoing::Result(r) => {
                self.signer
                    .sign_value("command_result", &r.id, &r.payload(), now, &nonce)
            }
            Outgoing::Status {
                frame_type,
                payload,
            } => {
                let prefix = if *frame_type == "heartbeat" {
                    "hb_"
                } else {
                    "as_"
                };
                self.signer.sign_value(
                    frame_type,
                    &protocol::new_frame_id(prefix),
                    payload,
                    now,
                    &nonce,
                )
            }
        }
    }

    /// Signs an `event_batch` of stored events.
    fn sign_events(&mut self, events: &[StoredEvent], now: OffsetDateTime) -> Vec<u8> {
        let mut payload = Vec::new();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
        protocol::event_batch_payload(&bodies, &mut payload);
        self.signer.sign(
            "event_batch",
            &protocol::new_frame_id("ev_"),
            &payload,
            now,
            &protocol::new_nonce(),
        )
    }

    /// Builds the next upload from what is queued (answers and acks first,
    /// then events), within the body budget; `None` when there is nothing
    /// to send.
    async fn next_upload(&mut self) -> Result<Option<(Pending<Upload>, InFlight)>, UplinkError> {
        let budget = self.up.fallback.body_budget(&self.settings);
        let mut body = Body::new(budget);
        let mut flight = InFlight::default();
        let now = OffsetDateTime::now_utc();
        while let Some(o) = self.outbox.pop_front() {
            if self.one_frame && !body.is_empty() {
                self.outbox.push_front(o);
                break;
            }
            let frame = self.sign_outgoing(&o, now);
            let escaped = pack::escape(&frame);
            if frame.len() > MAX_FRAME_BYTES || (body.is_empty() && !body.fits(&escaped)) {
                self.too_large_alone(o, budget.min(MAX_FRAME_BYTES));
            } else if body.fits(&escaped) {
                body.push(&escaped);
                flight.outgoing.push(o);
            } else {
                self.outbox.push_front(o);
                break;
            }
        }
        if !self.one_frame || body.is_empty() {
            if let Err(e) = self.pack_events(&mut body, &mut flight, now).await {
                // What was taken from the queue goes back, for the next
                // session to send.
                self.requeue(flight);
                return Err(e);
            }
        }
        if body.is_empty() {
            return Ok(None);
        }
        flight.frames = body.frames();
        flight.sent_at = Some(Instant::now());
        let bytes = body.into_bytes();
        tracing::debug!(
            frames = flight.frames,
            events = flight.events.map_or(0, |(_, _, n)| n),
            other_frames = flight.outgoing.len(),
            bytes = bytes.len(),
            "long-poll upload"
        );
        let client = self.client.clone();
        let timeout = self.settings.ack_timeout;
        Ok(Some((
            Box::pin(async move { client.upload(bytes, timeout).await }),
            flight,
        )))
    }

    /// Adds event frames from the spool while they fit.
    async fn pack_events(
        &mut self,
        body: &mut Body,
        flight: &mut InFlight,
        now: OffsetDateTime,
    ) -> Result<(), UplinkError> {
        // As many event frames as the WebSocket keeps in flight, each as
        // full as the room allows: the brain stores each frame in a
        // transaction of its own.
        let mut frames = 0;
        let max_events = self.settings.batch_max_events.min(self.event_cap);
        while body.open() && frames < self.settings.inflight_frames {
            if self.one_frame && !body.is_empty() {
                return Ok(());
            }
            // Read about what fits unescaped; the frame is cut to what fits
            // once signed and escaped, and to the brain's 1 MiB a frame.
            let limit = body.room().min(MAX_FRAME_BYTES);
            let room = limit.saturating_sub(ENVELOPE_BYTES);
            if room == 0 && !body.is_empty() {
                return Ok(());
            }
            let mut events = self
                .up
                .spool
                .read_after(self.cursor, max_events, room.max(1))
                .await
                .map_err(UplinkError::SpoolRead)?;
            if events.is_empty() {
                return Ok(());
            }
            let mut cut = false;
            loop {
                let frame = self.sign_events(&events, now);
                let escaped = pack::escape(&frame);
                if frame.len() <= MAX_FRAME_BYTES && body.fits(&escaped) {
                    body.push(&escaped);
                    frames += 1;
                    let (first, last) = (events[0].id, events[events.len() - 1].id);
                    let (from, count) = match flight.events {
                        Some((from, _, count)) => (from, count),
                        None => (first, 0),
                    };
                    flight.events = Some((from, last, count + events.len()));
                    self.cursor = last;
                    self.count_sent(events.iter().map(|e| e.id));
                    if cut {
                        // Full: a frame of the few events that would still
                        // fit would cost the brain a transaction of its own.
                        return Ok(());
                    }
                    break;
                }
                if events.len() > 1 {
                    events.truncate(fitting_share(events.len(), limit, escaped.len()));
                    cut = true;
                    continue;
                }
                if body.is_empty() {
                    let budget = self.up.fallback.body_budget(&self.settings);
                    self.drop_undeliverable(&events[0], budget.min(MAX_FRAME_BYTES))
                        .await;
                    self.cursor = events[0].id;
                    break;
                }
                // Goes first in the next upload.
                return Ok(());
            }
        }
        Ok(())
    }

    /// A queued frame larger than an upload can be: an answer becomes a
    /// failure that says why (the brain would otherwise wait for it until
    /// the command times out); a status is left out.
    fn too_large_alone(&mut self, o: Outgoing, budget: usize) {
        match o {
            Outgoing::Result(r) => {
                tracing::warn!(
                    command_id = %r.id,
                    max_body_bytes = budget,
                    "a command's answer is larger than a long-poll upload may be; answering the command failed instead"
                );
                let failed = CommandResult {
                    id: r.id.clone(),
                    success: false,
                    result: Value::Null,
                    error: Some(format!(
                        "the answer is larger than the {budget} bytes a long-poll upload may carry; raise the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES and Z4J_LONGPOLL_MAX_BODY_BYTES with it"
                    )),
                    claim: r.claim.clone(),
                };
                self.outbox.push_front(Outgoing::Result(failed));
            }
            Outgoing::Ack { id, .. } => {
                tracing::warn!(command_id = %id, "a command's ack does not fit a long-poll upload; left out");
            }
            Outgoing::Status { frame_type, .. } => {
                tracing::warn!(
                    frame_type,
                    max_body_bytes = budget,
                    "this report does not fit a long-poll upload; left out (raise Z4J_LONGPOLL_MAX_BODY_BYTES with the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES)"
                );
            }
        }
    }

    /// An event that no upload within the budget can carry: dropped and
    /// counted, as one larger than the brain's frame limit is.
    async fn drop_undeliverable(&mut self, event: &StoredEvent, budget: usize) {
        tracing::warn!(
            event_bytes = event.body.len(),
            max_body_bytes = budget,
            "dropped an event larger than a long-poll upload may be; raise the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES and Z4J_LONGPOLL_MAX_BODY_BYTES with it"
        );
        self.up.discard_undeliverable(event).await;
    }

    /// Counts events put in an upload as first sends or re-sends.
    fn count_sent(&mut self, ids: impl IntoIterator<Item = i64>) {
        let max_id_at_open = self.up.spool.stats().max_id_at_open.load(Ordering::Relaxed);
        let count = self.up.forwarded.record(ids, max_id_at_open);
        self.up
            .stats
            .events_forwarded
            .fetch_add(count.first_sends, Ordering::Relaxed);
        self.up
            .stats
            .events_resent
            .fetch_add(count.resends, Ordering::Relaxed);
        self.last_flush_at = Some(OffsetDateTime::now_utc());
    }

    /// Acts on the brain's answer to an upload.
    async fn settle(
        &mut self,
        flight: InFlight,
        done: Result<Upload, UplinkError>,
    ) -> Result<Settled, UplinkError> {
        let (accepted, rejected, error_code, errors) = match done {
            Err(error) => {
                self.requeue(flight);
                return match slow_down_for(&error) {
                    Some(wait) => {
                        tracing::warn!(error = %error, wait_s = wait.as_secs(), "the brain asked to slow down; the upload goes again after the wait");
                        Ok(Settled::Wait(wait))
                    }
                    None => Err(error),
                };
            }
            Ok(Upload::Refused { status }) => {
                self.refused(flight, status).await;
                return Ok(Settled::Next);
            }
            Ok(Upload::Answered {
                accepted,
                rejected,
                error_code,
                errors,
            }) => (accepted, rejected, error_code, errors),
        };
        if error_code.as_deref() == Some("scheduler_upgrade_required") {
            self.requeue(flight);
            return Err(UplinkError::Fatal {
                code: "scheduler_upgrade_required".into(),
                message: "the brain asks for a newer scheduler adapter".into(),
            });
        }
        if accepted == flight.frames as u64 && rejected == 0 {
            if let Some((first, last, _)) = flight.events {
                self.up
                    .spool
                    .ack(first, last)
                    .await
                    .map_err(UplinkError::spool_delete)?;
                if let Some(at) = flight.sent_at {
                    self.up
                        .stats
                        .ack_latency
                        .observe(at.elapsed().as_secs_f64());
                }
                self.up
                    .stats
                    .update_uplink(|u| u.last_ack_at = Some(OffsetDateTime::now_utc()));
            }
            self.resend_wait = RESEND_FIRST;
            return Ok(Settled::Next);
        }
        tracing::warn!(
            frames = flight.frames,
            accepted,
            rejected,
            errors = ?errors,
            retry_in_s = self.resend_wait.as_secs(),
            "the brain did not take every frame of an upload (a transient failure on its side); sending them all again, re-signed"
        );
        self.requeue(flight);
        Ok(Settled::Later)
    }

    /// HTTP 413 or 422: the upload cannot go as it was. A 413 above the
    /// smallest budget halves the budget for the uploads that follow.
    /// Otherwise (a 422, or a 413 at the smallest budget), what it carried
    /// is split: an event alone is dropped and counted, a frame of several
    /// events goes as smaller frames, an answer alone becomes a failure that
    /// says why, several frames go one an upload.
    async fn refused(&mut self, flight: InFlight, status: u16) {
        let budget = self.up.fallback.body_budget(&self.settings);
        if status == 413 && budget > MIN_BODY_BYTES {
            let cut = (budget / 2).max(MIN_BODY_BYTES);
            tracing::warn!(
                max_body_bytes = budget,
                now = cut,
                "the brain (or a proxy) refused a long-poll upload as too large (HTTP 413); sending smaller ones. Set Z4J_LONGPOLL_MAX_BODY_BYTES to the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES"
            );
            self.up.fallback.body_cut = Some(cut);
            self.requeue(flight);
            return;
        }
        if flight.frames > 1 {
            if !self.one_frame {
                tracing::warn!(
                    status,
                    "the brain (or a proxy) refused a long-poll upload of several frames; sending one frame an upload"
                );
                self.one_frame = true;
            }
            self.requeue(flight);
            return;
        }
        match flight.events {
            Some((first, _, 1)) => {
                if let Ok(events) = self.up.spool.read_range(first, first).await {
                    if let Some(e) = events.first() {
                        self.drop_undeliverable(e, budget).await;
                    }
                }
            }
            Some((_, _, n)) => {
                self.event_cap = (n / 2).max(1);
                tracing::warn!(
                    status,
                    events = n,
                    now = self.event_cap,
                    "the brain (or a proxy) refused a long-poll upload of one event frame; sending fewer events a frame"
                );
                self.requeue(flight);
            }
            None => {
                for o in flight.outgoing {
                    self.too_large_alone(o, budget);
                }
            }
        }
    }

    /// Queues what an upload carried to go again: its events from the
    /// spool, its acks and answers first in line; statuses are replaced by
    /// the next ones.
    fn requeue(&mut self, flight: InFlight) {
        if let Some((first, _, _)) = flight.events {
            self.cursor = self.cursor.min(first - 1);
        }
        for o in flight.outgoing.into_iter().rev() {
            if !matches!(o, Outgoing::Status { .. }) {
                self.outbox.push_front(o);
            }
        }
    }

    /// Keeps what is not known to have reached the brain for the next
    /// session, in order: answers, and the commands whose ack did not go.
    fn keep_answers(&mut self, flight: Option<InFlight>) {
        let carried = flight.into_iter().flat_map(|f| f.outgoing);
        let queued = std::mem::take(&mut self.outbox);
        let mut answers = Vec::new();
        for o in carried.chain(queued) {
            match o {
                Outgoing::Result(r) => answers.push(r),
                Outgoing::Ack { id, payload, .. } => self.up.carried.push((id, payload)),
                Outgoing::Status { .. } => {}
            }
        }
        while let Some(r) = answers.pop() {
            self.up.unsent.push_front(r);
        }
    }

    /// Ends the session with `error`, keeping its answers.
    fn fail(&mut self, error: UplinkError, flight: Option<InFlight>) -> SessionEnd {
        self.keep_answers(flight);
        failed(error)
    }

    /// The shutdown grace period is over: the upload on the wire may
    /// finish (up to a few seconds), answers wait for the next start's
    /// session in memory only as over the WebSocket, events stay spooled.
    async fn grace_over(&mut self, upload: Option<(Pending<Upload>, InFlight)>) -> SessionEnd {
        if let Some((pending, flight)) = upload {
            if let Ok(done) = tokio::time::timeout(Duration::from_secs(2), pending).await {
                let _ = self.settle(flight, done).await;
            }
        }
        if self.spool_depth() > 0 {
            tracing::warn!(
                spool_depth = self.spool_depth(),
                "shutdown grace period over; undelivered events stay in the spool for the next start"
            );
        }
        SessionEnd::Shutdown
    }
}

/// Of `n` events whose frame takes `size` bytes, how many to keep for a
/// frame that must fit in `room`: their share of it, a little under, and at
/// least one fewer than now.
fn fitting_share(n: usize, room: usize, size: usize) -> usize {
    let share = (n as u128 * room as u128 / size.max(1) as u128) as usize;
    (share * 19 / 20).clamp(1, n - 1)
}

/// How long to wait when the brain asked to slow down (HTTP 429 or 503):
/// its `Retry-After`, at least a second.
fn slow_down_for(error: &UplinkError) -> Option<Duration> {
    match error {
        UplinkError::LongPollStatus {
            status: 429 | 503,
            retry_after,
            ..
        } => Some(retry_after.unwrap_or(RESEND_FIRST).max(RESEND_FIRST)),
        _ => None,
    }
}

/// A session that ended by a failure.
fn failed(error: UplinkError) -> SessionEnd {
    SessionEnd::Failed {
        error,
        stable: false,
    }
}

/// `X-Z4J-Retry-Contracts`: the engines whose retries run by reference
/// (`engine=1,...`), which the brain checks on each poll that claims a
/// retry.
fn retry_contracts(advertised: &Advertisement) -> String {
    advertised
        .capabilities
        .iter()
        .filter(|(_, actions)| actions.iter().any(|a| a == "retry_by_reference"))
        .map(|(engine, _)| format!("{engine}=1"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Opens the WebSocket and closes it again at once: whether the upgrade
/// passes now.
async fn probe_websocket(settings: &UplinkSettings) -> Result<(), UplinkError> {
    let mut ws = super::connect::dial(settings).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_too_large_keeps_the_share_of_events_that_fits() {
        // 100 events in 20,000 bytes for 8,000 of room: 38 (40, a little under).
        assert_eq!(fitting_share(100, 8_000, 20_000), 38);
        // Always at least one fewer, and never none.
        assert_eq!(fitting_share(10, 9_999, 10_000), 8);
        assert_eq!(fitting_share(10, 10, 10_000), 1);
        assert_eq!(fitting_share(2, 0, 10_000), 1);
    }

    #[test]
    fn retry_contracts_name_the_engines_that_retry_by_reference() {
        let mut a = Advertisement::default();
        a.capabilities.insert(
            "celery".into(),
            vec!["retry_task".into(), "retry_by_reference".into()],
        );
        a.capabilities
            .insert("rq".into(), vec!["cancel_task".into()]);
        a.capabilities
            .insert("arq".into(), vec!["retry_by_reference".into()]);
        assert_eq!(retry_contracts(&a), "arq=1,celery=1");
        assert_eq!(retry_contracts(&Advertisement::default()), "");
    }
}
