//! One established session: fill the in-flight window from the spool, match
//! acks, re-send on ack timeout, heartbeat, answer commands, and drain on
//! shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::backoff::{classify_close, describe_close, FailureClass};
use super::connect::{self, HelloAck, Ws};
use super::{SessionEnd, Uplink};
use crate::commands::{Command, CommandResult, Dispatch};
use crate::protocol::{self, SessionBinding, Signer, Value, Verifier};
use crate::spool::StoredEvent;
use crate::stats::{Advertisement, UplinkState};

/// One range of spooled events in flight: sent, not yet acknowledged.
struct InFlight {
    /// Every frame id the range went out under in this session, oldest
    /// first, with when that copy was sent. The brain acks each copy it
    /// processes, late ones included: the first ack for any of them
    /// settles the range.
    copies: Vec<(String, Instant)>,
    first_id: i64,
    last_id: i64,
    events: usize,
    /// Re-sends of this range in this session (each doubles the wait).
    resends: u32,
    /// Set when the brain acked a copy of another range sent after this
    /// range's newest copy: it processes one connection's frames in order,
    /// so it skipped this one (an ack withheld after a transient error).
    skipped_at: Option<Instant>,
    /// Whether no event of the range can have reached the brain before its
    /// first copy (`copies[0]`): then a `rejected` count in that copy's ack
    /// means events the brain dropped, not duplicates. Any other copy's ack
    /// counts its `rejected` as duplicates.
    first_delivery: bool,
}

impl InFlight {
    fn first_sent_at(&self) -> Instant {
        self.copies[0].1
    }

    fn last_sent_at(&self) -> Instant {
        self.copies[self.copies.len() - 1].1
    }
}

/// Most frame ids remembered for one range; older copies' acks are then
/// not recognised (the range is settled by a newer copy's ack instead).
const MAX_COPIES: usize = 16;
/// The wait for an ack doubles with each re-send of a range, up to this
/// many times the ack timeout.
const MAX_RESEND_BACKOFF: u32 = 16;
/// A range is late only after this many of the brain's recent frame times
/// without an ack (and never before the ack timeout): a brain that takes
/// longer than the ack timeout per frame is slow, not stuck, and copies
/// would only slow it further.
const SERVICE_TIMES_BEFORE_LATE: u32 = 3;
/// How soon a range the brain skipped goes again: acks can arrive a little
/// out of order, so not at once.
const SKIPPED_GRACE: Duration = Duration::from_secs(2);
/// The longest heartbeat cadence used, whatever the brain announces: the
/// brain marks an agent offline after 30 s without one.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
/// The longest pause between liveness pings.
const MAX_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Clock skew past which the brain refuses every signed frame.
const FATAL_SKEW_SECONDS: f64 = crate::protocol::limits::MAX_CLOCK_SKEW_SECONDS as f64;
/// Clock skew worth a warning.
const WARN_SKEW_SECONDS: f64 = 30.0;
/// How long the engines registered by clients must stay changed before the
/// daemon re-handshakes (gunicorn restarting its workers should not cause a
/// reconnect per worker).
const REHANDSHAKE_DEBOUNCE: Duration = Duration::from_secs(2);

struct Session<'a> {
    up: &'a mut Uplink,
    ws: Ws,
    signer: Signer,
    verifier: Verifier,
    ack: HelloAck,
    inflight: VecDeque<InFlight>,
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
    static_engines: Vec<String>,
    static_capabilities: BTreeMap<String, Vec<String>>,
    /// When the oldest WebSocket ping still waiting for any answer from the
    /// brain was sent. Anything the brain sends clears it.
    unanswered_ping_since: Option<Instant>,
    /// When the brain last acknowledged a frame in this session (or the
    /// session began): a brain that acks is slow, not stuck, so the ack
    /// timeout of the range it works on counts from here.
    last_progress: Instant,
    /// How long the brain takes over one frame, smoothed: from when it
    /// could start on it (its arrival or the previous ack) to its ack. A
    /// range is not late before a few times this, whatever the ack timeout.
    frame_service_time: Option<Duration>,
}

fn failed(class: FailureClass, error: impl Into<String>) -> SessionEnd {
    SessionEnd::Failed {
        class,
        error: error.into(),
        stable: false,
    }
}

impl Uplink {
    /// One connection attempt and, when it succeeds, the whole session.
    pub(crate) async fn connect_and_serve(&mut self) -> SessionEnd {
        let settings = self.settings.borrow().clone();
        self.status.update_info(|i| {
            i.brain_url = settings.endpoint.base_url.clone();
            i.worker_id = settings.worker_id.clone();
            i.agent_name = settings.agent_name.clone();
            i.static_engines = settings.static_engines.clone();
            i.static_capabilities = settings.static_capabilities.clone();
        });
        self.status.set_uplink_state(UplinkState::Connecting);
        let stop = self.stop.clone();
        let opened = self
            .beat
            .answering_while(async {
                tokio::select! {
                    r = connect::open(&settings) => Some(r),
                    _ = stop.cancelled() => None,
                }
            })
            .await;
        let mut ws = match opened {
            Some(Ok(ws)) => ws,
            Some(Err(f)) => {
                return SessionEnd::Failed {
                    class: f.class,
                    error: f.error,
                    stable: false,
                }
            }
            None => return SessionEnd::Shutdown,
        };
        self.status.set_uplink_state(UplinkState::Handshaking);
        let advertised = self
            .status
            .advertisement(&settings.static_engines, &settings.static_capabilities);
        let started_at = OffsetDateTime::now_utc() - self.status.started.elapsed();
        let ack = match self
            .beat
            .answering_while(connect::handshake(
                &mut ws,
                &settings,
                &settings.worker_id,
                &advertised,
                started_at,
            ))
            .await
        {
            Ok(a) => a,
            Err(f) => {
                return SessionEnd::Failed {
                    class: f.class,
                    error: f.error,
                    stable: false,
                }
            }
        };
        let binding = SessionBinding::new(
            ack.agent_id.clone(),
            ack.project_id.clone(),
            ack.session_id.clone(),
        );
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        self.status.update_uplink(|u| {
            u.session_id = Some(ack.session_id.clone());
            u.clock_skew_seconds = ack.clock_skew_seconds;
            u.last_error = None;
            u.last_failure_class = None;
            u.connected_at = Some(OffsetDateTime::now_utc());
            u.agent_id = Some(ack.agent_id.clone());
            u.project_id = Some(ack.project_id.clone());
            u.brain_version = Some(ack.brain_version.clone());
            u.advertised = advertised.clone();
        });
        self.status.set_uplink_state(UplinkState::Connected);
        tracing::info!(
            brain = %settings.endpoint.base_url,
            brain_version = %ack.brain_version,
            agent_id = %ack.agent_id,
            session_id = %ack.session_id,
            worker_id = %settings.worker_id,
            engines = ?advertised.engines,
            capabilities = ?advertised.capabilities,
            max_frame_bytes = ack.max_frame_bytes,
            "connected to the brain"
        );
        if let Some(skew) = ack.clock_skew_seconds {
            if skew.abs() > FATAL_SKEW_SECONDS {
                tracing::error!(
                    clock_skew_seconds = skew,
                    "this host's clock is more than 60 s away from the brain's: the brain will refuse every signed frame (close 4403); fix time sync (chrony/systemd-timesyncd) on this host or the brain"
                );
            } else if skew.abs() > WARN_SKEW_SECONDS {
                tracing::warn!(
                    clock_skew_seconds = skew,
                    "this host's clock is more than 30 s away from the brain's; past 60 s every signed frame is refused"
                );
            }
        }
        let session = Session {
            signer: Signer::new(settings.key.clone(), binding.clone()),
            verifier: Verifier::new(settings.key.clone(), binding),
            ws,
            ack,
            inflight: VecDeque::new(),
            cursor: 0,
            connected_at: Instant::now(),
            connected_at_wall: OffsetDateTime::now_utc(),
            last_flush_at: None,
            payload_buf: Vec::new(),
            batch_max_events: settings.batch_max_events,
            inflight_frames: settings.inflight_frames,
            ack_timeout: settings.ack_timeout,
            host_label: format!("{} (worker_id {})", settings.agent_name, settings.worker_id),
            advertised,
            static_engines: settings.static_engines.clone(),
            static_capabilities: settings.static_capabilities.clone(),
            unanswered_ping_since: None,
            last_progress: Instant::now(),
            frame_service_time: None,
            up: self,
        };
        let up_since = Instant::now();
        match session.run().await {
            SessionEnd::Failed { class, error, .. } => SessionEnd::Failed {
                class,
                error,
                stable: up_since.elapsed() >= super::STABLE_SESSION,
            },
            other => other,
        }
    }
}

impl Session<'_> {
    async fn run(mut self) -> SessionEnd {
        let end = self.serve().await;
        if let SessionEnd::Failed {
            class: FailureClass::Protocol | FailureClass::Incompatible,
            error,
            ..
        } = &end
        {
            // Say why before dropping the connection, so the brain's log
            // shows a protocol error rather than a vanished peer.
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
        end
    }

    async fn serve(&mut self) -> SessionEnd {
        if let Err(e) = self.send_heartbeat().await {
            return e;
        }
        if let Err(e) = self.flush_results().await {
            return e;
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        let mut ping = tokio::time::interval(self.ping_interval());
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        let mut ack_check = tokio::time::interval(Duration::from_secs(1));
        ack_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut draining = self.up.drain.is_cancelled();
        let rehandshake = tokio::time::sleep(Duration::from_secs(3600 * 24 * 365));
        tokio::pin!(rehandshake);
        let mut rehandshake_armed = false;
        loop {
            if let Err(e) = self.fill_window().await {
                return e;
            }
            if draining && self.inflight.is_empty() && self.spool_depth() == 0 {
                // Answers still owed to the brain go out before the close.
                if let Err(e) = self.flush_results().await {
                    return e;
                }
                tracing::info!("spool drained to the brain");
                return self.close_clean().await;
            }
            let window_open = self.inflight.len() < self.inflight_frames;
            tokio::select! {
                _ = self.up.beat.asked() => {}
                _ = self.up.stop.cancelled() => {
                    if let Err(e) = self.flush_results().await {
                        return e;
                    }
                    if self.spool_depth() > 0 {
                        tracing::warn!(
                            spool_depth = self.spool_depth(),
                            "shutdown grace period over; undelivered events stay in the spool for the next start"
                        );
                    }
                    return self.close_clean().await;
                }
                _ = self.up.drain.cancelled(), if !draining => { draining = true; }
                changed = self.up.settings.changed() => {
                    let _ = changed;
                    let _ = self.close_clean().await;
                    return SessionEnd::Reload;
                }
                msg = self.ws.next() => {
                    if let Err(e) = self.inbound(msg).await { return e; }
                }
                _ = heartbeat.tick() => {
                    if let Err(e) = self.send_heartbeat().await { return e; }
                }
                _ = ping.tick() => {
                    if let Err(e) = self.send_ping().await { return e; }
                }
                _ = ack_check.tick() => {
                    if let Err(e) = self.check_brain_alive().await { return e; }
                    if let Err(e) = self.resend_overdue().await { return e; }
                }
                _ = self.up.spool.new_events().notified(), if window_open => {}
                Some(r) = self.up.results.recv() => {
                    if let Err(e) = self.send_result(&r).await {
                        self.up.unsent.push_front(r);
                        return e;
                    }
                }
                // The first change arms the timer and later ones do not push
                // it back, so a stream of changes (a flood of `hello`s, a
                // worker restarting in a loop) cannot postpone the
                // re-handshake for ever; the rate limit keeps it from
                // reconnecting on every change.
                _ = self.up.status.clients_changed.notified(), if !rehandshake_armed => {
                    if self.advertisement_now() != self.advertised {
                        rehandshake_armed = true;
                        let at = self.up.rehandshakes.next_allowed(Instant::now() + REHANDSHAKE_DEBOUNCE);
                        rehandshake.as_mut().reset(tokio::time::Instant::from_std(at));
                    }
                }
                _ = &mut rehandshake, if rehandshake_armed => {
                    let now = self.advertisement_now();
                    rehandshake_armed = false;
                    if now != self.advertised && !draining {
                        tracing::info!(
                            advertised = ?self.advertised,
                            registered = ?now,
                            "local clients changed their engines or capabilities; reconnecting so the brain learns them"
                        );
                        self.up.rehandshakes.record(Instant::now());
                        let _ = self.close_clean().await;
                        return SessionEnd::Rehandshake;
                    }
                }
            }
        }
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
            Ok(r) => r.map_err(|e| {
                failed(
                    FailureClass::Connection,
                    format!("sending to the brain failed: {e}"),
                )
            }),
            Err(_) => Err(failed(
                FailureClass::Connection,
                format!(
                    "the brain took no data for {} s; reconnecting",
                    limit.as_secs()
                ),
            )),
        }
    }

    /// Room for events in one frame, after the signed envelope.
    fn event_budget(&self) -> usize {
        self.ack
            .max_frame_bytes
            .saturating_sub(protocol::frame_overhead_bytes() + 64)
    }

    async fn fill_window(&mut self) -> Result<(), SessionEnd> {
        while self.inflight.len() < self.inflight_frames {
            let budget = self.event_budget();
            let events = self
                .up
                .spool
                .read_after(self.cursor, self.batch_max_events, budget)
                .await
                .map_err(|e| {
                    failed(
                        FailureClass::Connection,
                        format!("reading the spool failed: {e}"),
                    )
                })?;
            if events.is_empty() {
                return Ok(());
            }
            let first = events[0].id;
            let last = events[events.len() - 1].id;
            self.cursor = last;
            if events.len() == 1 && events[0].body.len() + 2 > budget {
                // Accepted at ingest under a larger limit than this brain's
                // frame size: it can never be delivered. Drop and count it.
                self.up
                    .status
                    .events_undeliverable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event_bytes = events[0].body.len(),
                    max_frame_bytes = self.ack.max_frame_bytes,
                    "dropped an event larger than the brain's frame limit"
                );
                let _ = self.up.spool.ack(first, last).await;
                continue;
            }
            let n = events.len();
            let sent_before = self
                .up
                .max_forwarded_id
                .max(self.up.spool.stats().max_id_at_open.load(Ordering::Relaxed));
            let frame_id = self.send_batch(&events).await?;
            let first_time = last > self.up.max_forwarded_id;
            if first_time {
                let new = events
                    .iter()
                    .filter(|e| e.id > self.up.max_forwarded_id)
                    .count();
                self.up
                    .status
                    .events_forwarded
                    .fetch_add(new as u64, Ordering::Relaxed);
                self.up
                    .status
                    .events_resent
                    .fetch_add((n - new) as u64, Ordering::Relaxed);
                self.up.max_forwarded_id = last;
            } else {
                self.up
                    .status
                    .events_resent
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            self.inflight.push_back(InFlight {
                copies: vec![(frame_id, Instant::now())],
                first_id: first,
                last_id: last,
                events: n,
                resends: 0,
                skipped_at: None,
                first_delivery: first > sent_before,
            });
        }
        Ok(())
    }

    /// Signs and sends one `event_batch` of stored events; returns its id.
    async fn send_batch(&mut self, events: &[StoredEvent]) -> Result<String, SessionEnd> {
        let frame_id = protocol::new_frame_id("ev_");
        self.payload_buf.clear();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
        protocol::event_batch_payload(&bodies, &mut self.payload_buf);
        // The frame is handed to the socket, so it gets a fresh buffer each time.
        let frame = self.signer.sign(
            "event_batch",
            &frame_id,
            &self.payload_buf,
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        self.send(frame).await?;
        self.last_flush_at = Some(OffsetDateTime::now_utc());
        Ok(frame_id)
    }

    /// How long the brain may take to ack a range that has gone `resends`
    /// times already.
    fn ack_wait(&self, resends: u32) -> Duration {
        self.ack_timeout * 2u32.pow(resends.min(4)).min(MAX_RESEND_BACKOFF)
    }

    /// The range to send again now, if any. The brain works through one
    /// connection's frames in order, so only the oldest range in flight,
    /// the one it is on, can be late: the ones behind it wait their turn,
    /// however long ago they went out. A range it skipped goes again after
    /// a short grace.
    fn overdue(&self, now: Instant) -> Option<usize> {
        if let Some(i) = self
            .inflight
            .iter()
            .position(|f| f.skipped_at.is_some_and(|at| now >= at + SKIPPED_GRACE))
        {
            return Some(i);
        }
        let f = self.inflight.front()?;
        let waiting_since = f.last_sent_at().max(self.last_progress);
        let wait = self.ack_wait(f.resends).max(
            self.frame_service_time
                .map(|t| (t * SERVICE_TIMES_BEFORE_LATE).min(self.ack_timeout * MAX_RESEND_BACKOFF))
                .unwrap_or_default(),
        );
        (now >= waiting_since + wait).then_some(0)
    }

    async fn resend_overdue(&mut self) -> Result<(), SessionEnd> {
        let Some(i) = self.overdue(Instant::now()) else {
            return Ok(());
        };
        let (first, last, old_id, skipped) = {
            let f = &self.inflight[i];
            let (id, _) = &f.copies[f.copies.len() - 1];
            (f.first_id, f.last_id, id.clone(), f.skipped_at.is_some())
        };
        let events = self.up.spool.read_range(first, last).await.map_err(|e| {
            failed(
                FailureClass::Connection,
                format!("reading the spool failed: {e}"),
            )
        })?;
        if events.is_empty() {
            // Evicted meanwhile (spool overflow): nothing left to deliver.
            self.inflight.remove(i);
            return Ok(());
        }
        let resends = self.inflight[i].resends + 1;
        if skipped {
            tracing::warn!(
                frame_id = %old_id,
                events = events.len(),
                "the brain acknowledged a later frame but not this one (it withholds the ack after a transient error of its own); re-sending the frame (re-signed)"
            );
        } else {
            tracing::warn!(
                frame_id = %old_id,
                events = events.len(),
                waited_s = self.ack_wait(resends - 1).as_secs(),
                next_wait_s = self.ack_wait(resends).as_secs(),
                "no ack from the brain in time; re-sending the frame (re-signed); an ack for either copy settles it"
            );
        }
        let new_id = self.send_batch(&events).await?;
        self.up
            .status
            .events_resent
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let f = &mut self.inflight[i];
        if f.copies.len() == MAX_COPIES {
            f.copies.remove(0);
            f.first_delivery = false;
        }
        f.copies.push((new_id, Instant::now()));
        f.resends = resends;
        f.skipped_at = None;
        f.events = events.len();
        Ok(())
    }

    /// A WebSocket ping with each heartbeat, unless one is still unanswered.
    /// Heartbeats get no reply in the protocol, and acks only come while
    /// events flow, so the ping is what shows that the brain still answers.
    async fn send_ping(&mut self) -> Result<(), SessionEnd> {
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
    async fn check_brain_alive(&mut self) -> Result<(), SessionEnd> {
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
        match self.unanswered_ping_since {
            Some(since) if since.elapsed() >= self.ack_timeout => Err(failed(
                FailureClass::Connection,
                format!(
                    "the brain answered nothing, not even a WebSocket ping, for {} s; reconnecting",
                    self.ack_timeout.as_secs()
                ),
            )),
            _ => Ok(()),
        }
    }

    async fn inbound(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), SessionEnd> {
        if matches!(msg, Some(Ok(_))) {
            self.unanswered_ping_since = None;
        }
        let bytes = match msg {
            None => {
                return Err(failed(
                    FailureClass::Connection,
                    "the brain closed the connection",
                ))
            }
            Some(Err(e)) => {
                return Err(failed(
                    FailureClass::Connection,
                    format!("connection to the brain lost: {e}"),
                ))
            }
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                if code == 4002 {
                    tracing::error!(
                        worker_id = %self.up.settings.borrow().worker_id,
                        "another process connected to the brain with this daemon's worker_id and took over its slot (close 4002); give each daemon its own Z4J_WORKER_ID"
                    );
                }
                return Err(failed(
                    classify_close(code),
                    format!(
                        "the brain closed the connection with {code}: {}",
                        describe_close(code)
                    ),
                ));
            }
            Some(Ok(_)) => return Ok(()),
        };
        let frame = self
            .verifier
            .verify(&bytes, OffsetDateTime::now_utc())
            .map_err(|e| {
                failed(
                    FailureClass::Protocol,
                    format!("a frame from the brain failed verification ({e}); reconnecting"),
                )
            })?;
        match frame.frame_type.as_str() {
            "event_batch_ack" => self.on_ack(&frame.payload).await,
            "command" => self.on_command(&frame.id, &frame.payload).await,
            "error" => {
                let code = frame
                    .payload
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let message = frame
                    .payload
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let fatal = frame
                    .payload
                    .get("fatal")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if fatal {
                    let class = match code {
                        "scheduler_upgrade_required"
                        | "agent_incompatible"
                        | "protocol_incompatible" => FailureClass::Incompatible,
                        _ => FailureClass::Protocol,
                    };
                    Err(failed(
                        class,
                        format!("the brain reported a fatal error {code}: {message}"),
                    ))
                } else {
                    tracing::warn!(code, message, "the brain reported an error");
                    Ok(())
                }
            }
            other => {
                tracing::debug!(
                    frame_type = other,
                    "ignoring a frame type this daemon does not use"
                );
                Ok(())
            }
        }
    }

    async fn on_ack(&mut self, payload: &Value) -> Result<(), SessionEnd> {
        let Some(acked) = payload.get("acked_id").and_then(Value::as_str) else {
            return Ok(());
        };
        let now = Instant::now();
        let found = self.inflight.iter().enumerate().find_map(|(i, f)| {
            f.copies
                .iter()
                .position(|(id, _)| id == acked)
                .map(|c| (i, c, f.copies[c].1))
        });
        let Some((i, copy, copy_sent_at)) = found else {
            tracing::debug!(
                acked_id = acked,
                "ack for a frame no longer in flight (a copy of a range already acked)"
            );
            return Ok(());
        };
        let took = now.duration_since(copy_sent_at.max(self.last_progress));
        self.frame_service_time = Some(match self.frame_service_time {
            None => took,
            Some(t) => t.mul_f64(0.7) + took.mul_f64(0.3),
        });
        self.last_progress = now;
        let f = self.inflight.remove(i).expect("position is valid");
        // Ranges whose newest copy went out before the acked one were
        // passed over by the brain.
        for other in self.inflight.iter_mut() {
            if other.last_sent_at() < copy_sent_at && other.skipped_at.is_none() {
                other.skipped_at = Some(now);
            }
        }
        let latency = now.duration_since(f.first_sent_at());
        self.up.status.ack_latency.observe(latency.as_secs_f64());
        self.up
            .spool
            .ack(f.first_id, f.last_id)
            .await
            .map_err(|e| {
                failed(
                    FailureClass::Connection,
                    match e {
                        // Deleting writes to the WAL first, so it needs space too.
                        crate::spool::SpoolError::DiskFull => "the spool's disk is full, so events the brain acknowledged cannot be deleted; free space on the spool's filesystem (until then they stay in the spool and go again, and the brain stores them once)".to_string(),
                        e => format!("deleting acked events failed: {e}"),
                    },
                )
            })?;
        self.up
            .status
            .update_uplink(|u| u.last_ack_at = Some(OffsetDateTime::now_utc()));
        let accepted = payload.get("accepted").and_then(Value::as_u64);
        let rejected = payload.get("rejected").and_then(Value::as_u64).unwrap_or(0);
        self.count_rejected(&f, acked, rejected, f.first_delivery && copy == 0);
        tracing::debug!(
            frame_id = acked,
            events = f.events,
            accepted,
            rejected,
            latency_ms = latency.as_millis() as u64,
            "batch acknowledged"
        );
        Ok(())
    }

    /// Counts the events the brain acknowledged without storing. On a
    /// range's first delivery they are events it deduplicated by content or
    /// could not ingest (the ack says no more): counted, with a warning. On
    /// a re-sent copy they are the duplicates a re-send is meant to make.
    fn count_rejected(&self, f: &InFlight, acked: &str, rejected: u64, first_delivery: bool) {
        if rejected == 0 {
            return;
        }
        let rejected = rejected.min(f.events as u64);
        if first_delivery {
            self.up.status.brain_rejected(rejected, acked, f.events);
        } else {
            self.up
                .status
                .events_duplicate_at_brain
                .fetch_add(rejected, Ordering::Relaxed);
            tracing::debug!(
                frame_id = acked,
                events = f.events,
                rejected,
                "the brain already had events of a re-sent frame (expected: it stores each once)"
            );
        }
    }

    fn advertisement_now(&self) -> Advertisement {
        self.up
            .status
            .advertisement(&self.static_engines, &self.static_capabilities)
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
        match self.up.router.dispatch(&cmd, &self.host_label) {
            Dispatch::Started { who } => {
                tracing::info!(
                    command_id = id,
                    action = %cmd.action,
                    engine = cmd.engine().unwrap_or("-"),
                    to = %who,
                    "command routed to a local process"
                );
                Ok(())
            }
            Dispatch::Failed(r) => {
                tracing::warn!(
                    command_id = id,
                    action = %cmd.action,
                    engine = cmd.engine().unwrap_or("-"),
                    error = r.error.as_deref().unwrap_or(""),
                    "command failed at once"
                );
                self.send_result(&r).await
            }
            Dispatch::DuplicateRunning => {
                tracing::info!(
                    command_id = id,
                    "command delivered again while running; acknowledged, not run twice"
                );
                Ok(())
            }
            Dispatch::DuplicateDone(r) => {
                tracing::info!(command_id = id, "command delivered again after its answer; acknowledged and answered again, not run twice");
                self.send_result(&r).await
            }
        }
    }

    /// Sends every answer waiting (from an earlier session or queued now).
    async fn flush_results(&mut self) -> Result<(), SessionEnd> {
        while let Some(r) = self
            .up
            .unsent
            .pop_front()
            .or_else(|| self.up.results.try_recv().ok())
        {
            if let Err(e) = self.send_result(&r).await {
                self.up.unsent.push_front(r);
                return Err(e);
            }
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

    async fn send_heartbeat(&mut self) -> Result<(), SessionEnd> {
        let snapshot = self.up.status.snapshot(self.up.spool.stats());
        let now = OffsetDateTime::now_utc();
        let hb = snapshot.heartbeat_payload(self.last_flush_at);
        let frame = self.signer.sign_value(
            "heartbeat",
            &protocol::new_frame_id("hb_"),
            &hb,
            now,
            &protocol::new_nonce(),
        );
        self.send(frame).await?;

        let st_payload = snapshot.agent_status_payload(
            &self.advertised.engines,
            self.connected_at.elapsed(),
            self.connected_at_wall,
        );
        let frame = self.signer.sign_value(
            "agent_status",
            &protocol::new_frame_id("as_"),
            &st_payload,
            now,
            &protocol::new_nonce(),
        );
        self.send(frame).await
    }
}
