//! One established brain session: the loop that fills the in-flight window
//! from the spool, reads the brain, heartbeats, pings, answers commands,
//! re-handshakes when local engines change, and drains on shutdown. What is
//! in flight and when it is late is decided by [`Window`]; what the brain
//! sent, by [`super::reader`]; this file owns the socket and the timers.
//!
//! Invariant: every way out of a session is a [`SessionEnd`]; a failure
//! carries a typed [`UplinkError`] whose class decides the backoff.

mod delivery;
mod inbound;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::backoff::FailureClass;
use super::connect::{self, Hello, HelloAck, Ws};
use super::contract::{self, AfterAck, BrainLine};
use super::error::UplinkError;
use super::status::SessionFacts;
use super::window::Window;
use super::{SessionEnd, Uplink, STABLE_SESSION};
use crate::clients::Advertisement;
use crate::config::{Transport, UplinkSettings};
use crate::protocol::limits::{MAX_CLOCK_SKEW_SECONDS, WARN_CLOCK_SKEW_SECONDS};
use crate::protocol::{self, SessionBinding, Signer, Verifier};
use crate::stats::{FailureStreaks, UplinkState};

/// The longest heartbeat cadence used, whatever the brain announces: the
/// brain marks an agent offline after 30 s without one.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
/// The longest pause between liveness pings.
const MAX_PING_INTERVAL: Duration = Duration::from_secs(10);
/// How often the in-flight window is checked for late ranges.
const ACK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long the engines registered by clients must stay changed before the
/// daemon re-handshakes (gunicorn restarting its workers should not cause a
/// reconnect per worker).
const REHANDSHAKE_DEBOUNCE: Duration = Duration::from_secs(2);
/// The scheduler capability with which the brain activates a scheduler's
/// stream after each `hello`.
const STABLE_SNAPSHOT_CAPABILITY: &str = "external_schedule_stable_snapshot_v1";

/// One session with the brain, from `hello_ack` to its end.
struct BrainSession<'a> {
    up: &'a mut Uplink,
    ws: Ws,
    signer: Signer,
    verifier: Verifier,
    ack: HelloAck,
    window: Window,
    /// Highest spool id sent in this session.
    cursor: i64,
    connected_at: Instant,
    connected_at_wall: OffsetDateTime,
    last_flush_at: Option<OffsetDateTime>,
    payload_buf: Vec<u8>,
    batch_max_events: usize,
    inflight_frames: usize,
    ack_timeout: Duration,
    host_label: String,
    advertised: Advertisement,
    /// Scheduler -> the connection that held it when the `hello` went out.
    scheduler_holders: BTreeMap<String, u64>,
    static_engines: Vec<String>,
    static_capabilities: BTreeMap<String, Vec<String>>,
    /// When the oldest WebSocket ping still waiting for any answer from the
    /// brain was sent. Anything the brain sends clears it.
    unanswered_ping_since: Option<Instant>,
    /// The contract line this session's `hello` named.
    contract_line: &'static str,
    /// Failures in a row before this session (reported in `agent_status`).
    streaks: FailureStreaks,
}

/// A session that ended by a failure.
fn failed(error: UplinkError) -> SessionEnd {
    SessionEnd::Failed {
        error,
        stable: false,
    }
}

/// A socket the brain said `hello_ack` on, and what the `hello` said.
struct Handshake {
    ws: Ws,
    ack: HelloAck,
    advertised: Advertisement,
    /// Which connection held each scheduler when the `hello` went out.
    holders: BTreeMap<String, u64>,
    /// The z4j contract line the `hello` named.
    line: &'static str,
}

impl Uplink {
    /// One connection attempt and, when it succeeds, the whole session.
    pub(crate) async fn connect_and_serve(&mut self) -> SessionEnd {
        let settings = self.settings.borrow().clone();
        self.publish_settings(&settings);
        if self.fallback.longpoll_now(&settings) {
            return self.serve_longpoll(&settings, None).await;
        }
        self.stats
            .update_uplink(|u| u.transport = Some("websocket"));
        let Handshake {
            ws,
            ack,
            advertised,
            holders,
            line,
        } = match self.handshake(&settings).await {
            Ok(connected) => connected,
            Err(SessionEnd::Failed { error, .. })
                if settings.transport == Transport::Auto
                    && (error.refuses_upgrade()
                        || (self.fallback.on_longpoll() && error.lost_in_handshake())) =>
            {
                return self.serve_longpoll(&settings, Some(error)).await;
            }
            Err(end) => return end,
        };
        self.fallback.on_websocket(&self.stats);
        tracing::Span::current().record("session_id", ack.session_id.as_str());
        let streaks = self.record_connected(&settings, &ack, &advertised, line);
        self.remember_acknowledged(&advertised, &settings, &ack)
            .await;
        warn_clock_skew(ack.clock_skew_seconds);
        let mut session = BrainSession::new(self, &settings, ws, ack, advertised);
        session.scheduler_holders = holders;
        session.contract_line = line;
        session.streaks = streaks;
        let up_since = Instant::now();
        match session.run().await {
            SessionEnd::Failed { error, .. } => SessionEnd::Failed {
                error,
                stable: up_since.elapsed() >= STABLE_SESSION,
            },
            other => other,
        }
    }

    /// Shows the settings this attempt uses (`status`, `stats`).
    fn publish_settings(&self, settings: &UplinkSettings) {
        self.stats.update_info(|i| {
            i.brain_url = settings.endpoint.base_url.clone();
            i.worker_id = settings.worker_id.clone();
            i.agent_name = settings.agent_name.clone();
            i.static_engines = settings.static_engines.clone();
            i.static_capabilities = settings.static_capabilities.clone();
            i.transport_setting = settings.transport.as_str();
        });
        self.stats.set_uplink_state(UplinkState::Connecting);
    }

    /// Opens the socket and says `hello` with the contract line of the brain
    /// last seen; when the `hello_ack` shows another line is right, closes
    /// that session normally and says `hello` again at once, with no
    /// backoff and no failure counted, at most once per attempt (see
    /// [`contract`]). Returns the session and the line it named.
    async fn handshake(&mut self, settings: &UplinkSettings) -> Result<Handshake, SessionEnd> {
        let last_seen = self.spool.stats().brain_line();
        let mut line = contract::first_line(last_seen.and_then(BrainLine::from_code));
        let mut rehello_used = false;
        loop {
            let mut done = self.dial_and_hello(settings, line).await?;
            let brain_version = done.ack.brain_version.clone();
            self.remember_brain(&brain_version).await;
            match contract::after_hello_ack(line, &brain_version, rehello_used) {
                AfterAck::Stay => return Ok(done),
                AfterAck::Rehello(next) => {
                    tracing::info!(
                        brain_version = %brain_version,
                        sent = line,
                        contract_line = next,
                        "the brain's version calls for another z4j contract line; saying hello again with it"
                    );
                    let binding = SessionBinding::new(
                        done.ack.agent_id.clone(),
                        done.ack.project_id.clone(),
                        done.ack.session_id.clone(),
                    );
                    let mut verifier = Verifier::new(settings.key.clone(), binding.clone());
                    let mut signer = Signer::new(settings.key.clone(), binding);
                    let mut pushed =
                        connect::settle(&mut done.ws, &mut signer, &mut verifier).await;
                    pushed.extend(
                        connect::close_normally(
                            &mut done.ws,
                            "z4j-agentd: hello again",
                            &mut verifier,
                        )
                        .await,
                    );
                    // Acknowledged and routed on the next session.
                    self.carried.extend(pushed);
                    self.stats.contract_rehellos.fetch_add(1, Ordering::Relaxed);
                    line = next;
                    rehello_used = true;
                }
            }
        }
    }

    /// Remembers what the brain acknowledged for the next start. The file
    /// is fsynced: done on a blocking thread so a slow disk does not hold
    /// up this runtime's other tasks (awaited, so two writes never race).
    async fn remember_acknowledged(
        &self,
        advertised: &Advertisement,
        settings: &UplinkSettings,
        ack: &HelloAck,
    ) {
        let stats = self.stats.clone();
        let advertised = advertised.clone();
        let identity = advertised_to(settings);
        let brain = crate::clients::BrainIdentity {
            agent_id: ack.agent_id.clone(),
            project_id: ack.project_id.clone(),
            brain_version: ack.brain_version.clone(),
        };
        let done = tokio::task::spawn_blocking(move || {
            stats.clients.acknowledged(&advertised, &identity, &brain);
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "remembering the advertisement for the next start failed");
        }
    }

    /// Keeps the brain's version in the spool when it is readable and new,
    /// so the next start names the right line at once.
    async fn remember_brain(&self, brain_version: &str) {
        let Some(code) = BrainLine::parse(brain_version).map(BrainLine::code) else {
            return;
        };
        if self.spool.stats().brain_line() == Some(code) {
            return;
        }
        if let Err(e) = self.spool.remember_brain(code).await {
            tracing::warn!(error = %e, "could not keep the brain's version in the spool; the next start says hello twice");
        }
    }

    /// Opens the socket and says `hello`; a shutdown while dialling ends it.
    async fn dial_and_hello(
        &mut self,
        settings: &UplinkSettings,
        agent_version: &'static str,
    ) -> Result<Handshake, SessionEnd> {
        let stop = self.stop.clone();
        let opened = self
            .beat
            .answering_while(async {
                tokio::select! {
                    r = connect::dial(settings) => Some(r),
                    _ = stop.cancelled() => None,
                }
            })
            .await;
        let mut ws = match opened {
            Some(ws) => ws.map_err(failed)?,
            None => return Err(SessionEnd::Shutdown),
        };
        self.stats.set_uplink_state(UplinkState::Handshaking);
        let advertised = self
            .stats
            .clients
            .advertisement(&settings.static_engines, &settings.static_capabilities);
        let holders = self.stats.clients.scheduler_holders();
        let hello = Hello {
            settings,
            worker_id: &settings.worker_id,
            advertised: &advertised,
            started_at: OffsetDateTime::now_utc() - self.stats.started.elapsed(),
            agent_version,
        };
        let ack = self
            .beat
            .answering_while(connect::exchange_hello(&mut ws, &hello))
            .await
            .map_err(failed)?;
        Ok(Handshake {
            ws,
            ack,
            advertised,
            holders,
            line: agent_version,
        })
    }

    /// Counts and shows a session that began; returns the failures in a row
    /// that preceded it, and starts counting them again.
    fn record_connected(
        &mut self,
        settings: &UplinkSettings,
        ack: &HelloAck,
        advertised: &Advertisement,
        line: &'static str,
    ) -> FailureStreaks {
        let streaks = std::mem::take(&mut self.streaks);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.update_uplink(|u| {
            u.session_id = Some(ack.session_id.clone());
            u.clock_skew_seconds = ack.clock_skew_seconds;
            u.last_error = None;
            u.last_failure_class = None;
            u.connected_at = Some(OffsetDateTime::now_utc());
            u.agent_id = Some(ack.agent_id.clone());
            u.project_id = Some(ack.project_id.clone());
            u.brain_version = Some(ack.brain_version.clone());
            u.advertised = advertised.clone();
            u.contract_line = Some(line.to_string());
            u.streaks_before_session = streaks;
        });
        self.stats.set_uplink_state(UplinkState::Connected);
        tracing::info!(
            brain = %settings.endpoint.base_url,
            brain_version = %ack.brain_version,
            contract_line = line,
            agent_id = %ack.agent_id,
            session_id = %ack.session_id,
            worker_id = %settings.worker_id,
            engines = ?advertised.engines,
            capabilities = ?advertised.capabilities,
            max_frame_bytes = ack.max_frame_bytes,
            "connected to the brain"
        );
        streaks
    }
}

/// Whom the advertisement is made to (the brain, the worker slot, the
/// agent token), so what is remembered for the next start is used only
/// there.
fn advertised_to(settings: &UplinkSettings) -> crate::clients::Identity {
    crate::clients::Identity::new(
        &settings.endpoint.base_url,
        &settings.worker_id,
        settings.token.expose(),
    )
}

/// Warns when this host's clock is far from the brain's: past the limit,
/// the brain refuses every signed frame.
fn warn_clock_skew(skew: Option<f64>) {
    let Some(skew) = skew else { return };
    if skew.abs() > MAX_CLOCK_SKEW_SECONDS as f64 {
        tracing::error!(
            clock_skew_seconds = skew,
            "this host's clock is more than {MAX_CLOCK_SKEW_SECONDS} s away from the brain's: the brain will refuse every signed frame (close 4403); fix time sync (chrony/systemd-timesyncd) on this host or the brain"
        );
    } else if skew.abs() > WARN_CLOCK_SKEW_SECONDS as f64 {
        tracing::warn!(
            clock_skew_seconds = skew,
            "this host's clock is more than {WARN_CLOCK_SKEW_SECONDS} s away from the brain's; past {MAX_CLOCK_SKEW_SECONDS} s every signed frame is refused"
        );
    }
}

/// The session loop's timers and modes.
struct Timers {
    heartbeat: Interval,
    ping: Interval,
    ack_check: Interval,
    /// Armed by the first change of the local engines; see
    /// [`BrainSession::arm_rehandshake`].
    rehandshake: Pin<Box<Sleep>>,
    rehandshake_armed: bool,
    /// Shutdown began: deliver what is left, then close.
    draining: bool,
}

/// An interval whose first tick is one `period` away.
fn ticker(period: Duration) -> Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t.reset();
    t
}

impl<'a> BrainSession<'a> {
    fn new(
        up: &'a mut Uplink,
        settings: &UplinkSettings,
        ws: Ws,
        ack: HelloAck,
        advertised: Advertisement,
    ) -> Self {
        let binding = SessionBinding::new(
            ack.agent_id.clone(),
            ack.project_id.clone(),
            ack.session_id.clone(),
        );
        let now = Instant::now();
        BrainSession {
            signer: Signer::new(settings.key.clone(), binding.clone()),
            verifier: Verifier::new(settings.key.clone(), binding),
            ws,
            ack,
            window: Window::new(settings.ack_timeout, now),
            cursor: 0,
            connected_at: now,
            connected_at_wall: OffsetDateTime::now_utc(),
            last_flush_at: None,
            payload_buf: Vec::new(),
            batch_max_events: settings.batch_max_events,
            inflight_frames: settings.inflight_frames,
            ack_timeout: settings.ack_timeout,
            host_label: format!("{} (worker_id {})", settings.agent_name, settings.worker_id),
            advertised,
            scheduler_holders: BTreeMap::new(),
            static_engines: settings.static_engines.clone(),
            static_capabilities: settings.static_capabilities.clone(),
            unanswered_ping_since: None,
            contract_line: contract::UNKNOWN_LINE,
            streaks: FailureStreaks::default(),
            up,
        }
    }

    async fn run(mut self) -> SessionEnd {
        let end = self.serve().await;
        if let SessionEnd::Failed { error, .. } = &end {
            if matches!(
                error.class(),
                FailureClass::Protocol | FailureClass::Incompatible
            ) {
                self.close_with_reason(&error.to_string()).await;
            }
        }
        end
    }

    /// Says why before dropping the connection, so the brain's log shows a
    /// protocol error rather than a vanished peer.
    async fn close_with_reason(&mut self, error: &str) {
        // A close reason holds at most 123 bytes.
        let mut cut = error.len().min(120);
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = error[..cut].to_string();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.ws.close(Some(CloseFrame {
                code: CloseCode::Protocol,
                reason: reason.into(),
            })),
        )
        .await;
    }

    async fn serve(&mut self) -> SessionEnd {
        if let Err(end) = self.send_heartbeat().await {
            return end;
        }
        if let Err(end) = self.answer_carried().await {
            return end;
        }
        if let Err(end) = self.flush_results().await {
            return end;
        }
        let mut timers = Timers {
            heartbeat: ticker(self.heartbeat_interval()),
            ping: ticker(self.ping_interval()),
            ack_check: tokio::time::interval(ACK_CHECK_INTERVAL),
            rehandshake: Box::pin(tokio::time::sleep(Duration::from_secs(3600 * 24 * 365))),
            rehandshake_armed: false,
            draining: self.up.drain.is_cancelled(),
        };
        timers
            .ack_check
            .set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if let Err(end) = self.step(&mut timers).await {
                return end;
            }
        }
    }

    /// Fills the window, then waits for and handles one event. `Err` ends
    /// the session (a failure, or a clean end such as shutdown).
    async fn step(&mut self, t: &mut Timers) -> Result<(), SessionEnd> {
        self.fill_window().await?;
        if t.draining && self.window.is_empty() && self.spool_depth() == 0 {
            // Answers still owed to the brain go out before the close.
            self.flush_results().await?;
            tracing::info!("spool drained to the brain");
            return Err(self.close_clean().await);
        }
        let window_open = self.window.len() < self.inflight_frames;
        tokio::select! {
            _ = self.up.beat.asked() => Ok(()),
            _ = self.up.stop.cancelled() => Err(self.grace_over().await),
            _ = self.up.drain.cancelled(), if !t.draining => {
                t.draining = true;
                Ok(())
            }
            _ = self.up.settings.changed() => {
                let _ = self.close_clean().await;
                Err(SessionEnd::Reload)
            }
            msg = self.ws.next() => self.inbound(msg).await,
            _ = t.heartbeat.tick() => self.send_heartbeat().await,
            _ = t.ping.tick() => self.send_ping().await,
            _ = t.ack_check.tick() => {
                self.check_brain_alive().await?;
                self.resend_overdue().await
            }
            _ = self.up.spool.new_events().notified(), if window_open => Ok(()),
            Some(r) = self.up.results.recv() => self.send_result_or_keep(r).await,
            _ = self.up.stats.clients.changed(), if !t.rehandshake_armed => {
                self.arm_rehandshake(t);
                Ok(())
            }
            _ = &mut t.rehandshake, if t.rehandshake_armed => self.rehandshake_due(t).await,
        }
    }

    /// The shutdown grace period is over: answers go out, events stay.
    async fn grace_over(&mut self) -> SessionEnd {
        if let Err(end) = self.flush_results().await {
            return end;
        }
        if self.spool_depth() > 0 {
            tracing::warn!(
                spool_depth = self.spool_depth(),
                "shutdown grace period over; undelivered events stay in the spool for the next start"
            );
        }
        self.close_clean().await
    }

    /// The local clients' engines or capabilities changed. The first change
    /// arms the timer and later ones do not push it back, so a stream of
    /// changes (a flood of `hello`s, a worker restarting in a loop) cannot
    /// postpone the re-handshake for ever; the rate limit keeps it from
    /// reconnecting on every change.
    ///
    /// Once the daemon is stopping, nothing is armed: the processes whose
    /// connections the stop closes are still what this host runs.
    fn arm_rehandshake(&mut self, t: &mut Timers) {
        if self.up.stats.clients.is_stopping() {
            return;
        }
        if self.advertisement_now() != self.advertised || self.scheduler_needs_hello().is_some() {
            t.rehandshake_armed = true;
            let at = self
                .up
                .rehandshakes
                .next_allowed(Instant::now() + REHANDSHAKE_DEBOUNCE);
            t.rehandshake
                .as_mut()
                .reset(tokio::time::Instant::from_std(at));
        }
    }

    /// The debounce is over: reconnect if the change is still there.
    async fn rehandshake_due(&mut self, t: &mut Timers) -> Result<(), SessionEnd> {
        let now = self.advertisement_now();
        t.rehandshake_armed = false;
        if t.draining || self.up.stats.clients.is_stopping() {
            return Ok(());
        }
        if now != self.advertised {
            tracing::info!(
                advertised = ?self.advertised,
                registered = ?now,
                "local clients changed their engines or capabilities; reconnecting so the brain learns them"
            );
        } else if let Some(scheduler) = self.scheduler_needs_hello() {
            tracing::info!(
                scheduler = %scheduler,
                "a new process runs this scheduler and has no activation of its stream; reconnecting so the brain sends one"
            );
        } else {
            return Ok(());
        }
        self.up.rehandshakes.record(Instant::now());
        let _ = self.close_clean().await;
        Err(SessionEnd::Rehandshake)
    }

    /// A scheduler whose process has no activation of its stream and gets
    /// none without a new `hello`, because the brain sends activations only
    /// right after one: a scheduler advertised with the stable snapshot
    /// capability and the external schedule feature, now held by a
    /// connection that did not hold it at the `hello` (its process
    /// restarted while this session stayed up, or it came after a `hello`
    /// that listed it from memory), unless an activation for it is held or
    /// was handed to that connection.
    fn scheduler_needs_hello(&self) -> Option<String> {
        if !self
            .advertised
            .runtime_features
            .iter()
            .any(|f| f == crate::clients::EXTERNAL_SCHEDULE_FEATURE)
        {
            return None;
        }
        let activated = |s: &String| {
            self.advertised
                .capabilities
                .get(s)
                .is_some_and(|c| c.iter().any(|a| a == STABLE_SNAPSHOT_CAPABILITY))
        };
        self.up
            .stats
            .clients
            .scheduler_holders()
            .into_iter()
            .filter(|(s, _)| self.advertised.schedulers.contains(s) && activated(s))
            .find(|(s, conn)| {
                self.scheduler_holders.get(s) != Some(conn)
                    && !self.up.router.activation_reaches(s, *conn)
            })
            .map(|(s, _)| s)
    }

    fn advertisement_now(&self) -> Advertisement {
        self.up
            .stats
            .clients
            .advertisement(&self.static_engines, &self.static_capabilities)
    }

    /// The heartbeat cadence: the brain's, but never so slow that the brain
    /// marks the agent offline between two heartbeats.
    fn heartbeat_interval(&self) -> Duration {
        self.ack.heartbeat_interval.min(MAX_HEARTBEAT_INTERVAL)
    }

    /// How often a liveness ping goes out: often enough that a brain that
    /// answers nothing is noticed within about the ack timeout, whatever
    /// heartbeat interval it announces.
    fn ping_interval(&self) -> Duration {
        self.heartbeat_interval()
            .min(self.ack_timeout / 2)
            .min(MAX_PING_INTERVAL)
            .max(Duration::from_millis(500))
    }

    fn spool_depth(&self) -> u64 {
        self.up.spool.stats().depth.load(Ordering::Relaxed)
    }

    async fn close_clean(&mut self) -> SessionEnd {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "z4j-agentd stopping".into(),
            })),
        )
        .await;
        // Read until the brain's close arrives so the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        SessionEnd::Shutdown
    }

    /// Sends one frame. A brain that stops reading (its socket buffer full)
    /// ends the session after `ack_timeout`, like a missing ack would.
    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), SessionEnd> {
        self.send_message(Message::binary(bytes)).await
    }

    async fn send_message(&mut self, message: Message) -> Result<(), SessionEnd> {
        let limit = self.ack_timeout;
        let sent = self
            .up
            .beat
            .answering_while(tokio::time::timeout(limit, self.ws.send(message)))
            .await;
        match sent {
            Ok(r) => r.map_err(|e| failed(UplinkError::SendFailed(e))),
            Err(_) => Err(failed(UplinkError::NotReading {
                secs: limit.as_secs(),
            })),
        }
    }

    async fn send_heartbeat(&mut self) -> Result<(), SessionEnd> {
        let now = OffsetDateTime::now_utc();
        let facts = SessionFacts {
            advertised: &self.advertised,
            last_flush_at: self.last_flush_at,
            max_frame_bytes: self.ack.max_frame_bytes,
            up_for: self.connected_at.elapsed(),
            connected_at_wall: self.connected_at_wall,
            contract_line: self.contract_line,
            streaks: self.streaks,
        };
        let (hb, status) = self.up.status_payloads(&facts, now);
        let frame = self.signer.sign_value(
            "heartbeat",
            &protocol::new_frame_id("hb_"),
            &hb,
            now,
            &protocol::new_nonce(),
        );
        self.send(frame).await?;
        let frame = self.signer.sign_value(
            "agent_status",
            &protocol::new_frame_id("as_"),
            &status,
            now,
            &protocol::new_nonce(),
        );
        self.send(frame).await
    }
}
