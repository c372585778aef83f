//! The one connection to the brain.
//!
//! State machine ([`UplinkState`]): `Connecting` -> `Handshaking` ->
//! `Connected` -> (`Backoff` -> `Connecting`)..., `Stopped` at shutdown.
//!
//! Invariants:
//! * exactly one WebSocket at a time, always with the configured
//!   `worker_id`, so a restart replaces its own slot and never a sibling's;
//! * every frame after `hello` is signed for the current session; frames are
//!   built from the spool at send time, so a re-send (ack timeout or a new
//!   session) is always re-signed with a fresh `ts`, `nonce` and `seq`;
//! * events are deleted from the spool only when the brain's
//!   `event_batch_ack` names the frame that carried them;
//! * every inbound frame is verified (HMAC + replay guard) before it is
//!   acted on; a failure ends the session;
//! * at most `inflight_frames` un-acked `event_batch` frames, so heartbeats
//!   are not queued behind minutes of brain work.
//!
//! Pieces: `connect` dials and says `hello`; `session` runs one brain
//! session (its loop, delivery, inbound handling); `window` decides what is
//! in flight and when it is late, with no I/O; [`reader`] is the one reader
//! of brain messages; [`close`] the one table of close codes; [`error`] the
//! typed failures, each with the [`backoff`] class it waits by. Each brain
//! session runs in a `brain_session` tracing span (attempt, session id).

pub mod backoff;
pub mod close;
pub(crate) mod connect;
pub mod contract;
pub mod error;
pub(crate) mod longpoll;
pub mod reader;
mod session;
mod status;
mod window;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::commands::{CommandResult, Results, Router};
use crate::config::UplinkSettings;
use crate::spool::SpoolHandle;
use crate::stats::{Stats, UplinkState};
use backoff::Backoff;
use error::UplinkError;
use window::Forwarded;

/// A session up at least this long counts as working: its failure resets
/// the backoff. Shorter ones (refused right after the handshake) do not.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Re-handshakes allowed in any [`REHANDSHAKE_WINDOW`]; past that, a change
/// of the local engines waits for the window (one connection, one brain
/// session per change at most, never one per `hello`).
const REHANDSHAKE_BURST: usize = 3;
/// See [`REHANDSHAKE_BURST`].
const REHANDSHAKE_WINDOW: Duration = Duration::from_secs(60);

/// When the uplink last re-handshook, to rate-limit it.
#[derive(Debug, Default)]
pub(crate) struct RehandshakeLimit {
    recent: VecDeque<std::time::Instant>,
}

impl RehandshakeLimit {
    /// The earliest moment, not before `earliest`, a re-handshake may happen.
    pub(crate) fn next_allowed(&self, earliest: std::time::Instant) -> std::time::Instant {
        if self.recent.len() < REHANDSHAKE_BURST {
            return earliest;
        }
        let oldest = self.recent[self.recent.len() - REHANDSHAKE_BURST];
        earliest.max(oldest + REHANDSHAKE_WINDOW)
    }

    /// Records a re-handshake.
    pub(crate) fn record(&mut self, at: std::time::Instant) {
        self.recent.push_back(at);
        while self.recent.len() > REHANDSHAKE_BURST {
            self.recent.pop_front();
        }
    }
}

/// How a session or connection attempt ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown finished (drained or the grace period ran out).
    Shutdown,
    /// The settings changed (SIGHUP): reconnect now.
    Reload,
    /// The engines registered by local clients changed: reconnect now so the
    /// brain learns them from a new `hello` (the protocol has no other way).
    Rehandshake,
    /// A failure: back off by its class.
    Failed {
        /// What happened, free of secrets.
        error: UplinkError,
        /// Whether the session had been up long enough to count as working
        /// ([`STABLE_SESSION`]); only that resets the backoff, so a session
        /// refused right after its handshake (wrong secret, 4002) backs off.
        stable: bool,
    },
}

/// The uplink task.
pub struct Uplink {
    settings: watch::Receiver<UplinkSettings>,
    spool: SpoolHandle,
    stats: Arc<Stats>,
    /// Set when the daemon starts shutting down: deliver what is left, then stop.
    drain: CancellationToken,
    /// Set when the grace period is over: close now.
    stop: CancellationToken,
    /// Tells first sends of events from re-sends, across sessions.
    forwarded: Forwarded,
    /// Connection attempts so far, named in each brain session's span.
    attempts: u64,
    /// Routes the brain's commands to local processes.
    router: Arc<Router>,
    /// Answers from local processes, to send as `command_result`.
    results: Results,
    /// Answers whose send failed with the session; sent first on the next one.
    unsent: VecDeque<CommandResult>,
    /// Commands the brain sent into a session closed for a re-hello
    /// (id, payload): acknowledged and routed on the next session.
    carried: Vec<(String, crate::protocol::Value)>,
    /// Answers the watchdog from every wait of the uplink.
    beat: crate::watchdog::Beat,
    /// Rate limit of re-handshakes for changed local engines.
    rehandshakes: RehandshakeLimit,
    /// Failures in a row since the last session, by the brain's classes.
    streaks: crate::stats::FailureStreaks,
    /// Whether `Z4J_TRANSPORT=auto` runs on long-poll, and the upload budget.
    fallback: longpoll::Fallback,
}

/// How the daemon steers the uplink's lifetime.
pub struct Control {
    /// Set when the daemon starts shutting down: deliver what is left, then stop.
    pub drain: CancellationToken,
    /// Set when the grace period is over: close now.
    pub stop: CancellationToken,
    /// Answers the watchdog from every wait of the uplink.
    pub beat: crate::watchdog::Beat,
}

impl Uplink {
    /// Creates the uplink; call [`Uplink::run`] to start it.
    pub fn new(
        settings: watch::Receiver<UplinkSettings>,
        spool: SpoolHandle,
        stats: Arc<Stats>,
        control: Control,
        router: Arc<Router>,
        results: Results,
    ) -> Self {
        let Control { drain, stop, beat } = control;
        Uplink {
            settings,
            spool,
            stats,
            drain,
            stop,
            forwarded: Forwarded::default(),
            attempts: 0,
            router,
            results,
            unsent: VecDeque::new(),
            carried: Vec::new(),
            beat,
            rehandshakes: RehandshakeLimit::default(),
            streaks: crate::stats::FailureStreaks::default(),
            fallback: longpoll::Fallback::default(),
        }
    }

    /// Connects, forwards, reconnects with backoff, until shut down.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            if self.stop.is_cancelled() || (self.drain.is_cancelled() && self.spool_is_empty()) {
                break;
            }
            self.settings.mark_unchanged();
            self.attempts += 1;
            let span = tracing::info_span!(
                "brain_session",
                attempt = self.attempts,
                session_id = tracing::field::Empty
            );
            let end = self.connect_and_serve().instrument(span).await;
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Reload => {
                    self.stats.update_uplink(|u| u.connected_at = None);
                    // A new Z4J_LONGPOLL_MAX_BODY_BYTES is tried as given.
                    self.fallback.body_cut = None;
                    tracing::info!("configuration reloaded; reconnecting to the brain");
                    backoff.reset();
                    continue;
                }
                SessionEnd::Rehandshake => {
                    self.stats.update_uplink(|u| u.connected_at = None);
                    continue;
                }
                SessionEnd::Failed { error, stable } => {
                    if stable {
                        backoff.reset();
                    }
                    let delay = self.record_failure(&mut backoff, &error);
                    if !self.wait_backoff(delay).await {
                        break;
                    }
                }
            }
        }
        self.stats.update_uplink(|u| u.connected_at = None);
        self.stats.set_uplink_state(UplinkState::Stopped);
    }

    /// Counts, shows and logs a failure; returns how long to back off.
    fn record_failure(&mut self, backoff: &mut Backoff, error: &UplinkError) -> Duration {
        let class = error.class();
        self.streaks.record(class.as_str());
        let delay = backoff.next_delay(class, &mut rand::rng());
        let streak = backoff.streak(class);
        self.stats.record_failure(class.as_str());
        self.stats.set_uplink_state(UplinkState::Backoff);
        self.stats.update_uplink(|u| {
            u.last_error = Some(error.to_string());
            u.last_failure_class = Some(class.as_str());
            u.failure_streak = streak;
            u.connected_at = None;
        });
        if streak == 1 || streak.is_multiple_of(10) {
            tracing::warn!(
                class = class.as_str(),
                failures = streak,
                retry_in_ms = delay.as_millis() as u64,
                error = %error,
                "brain connection failed"
            );
        } else {
            tracing::debug!(class = class.as_str(), failures = streak, error = %error, "brain connection failed again");
        }
        delay
    }

    fn spool_is_empty(&self) -> bool {
        self.spool
            .stats()
            .depth
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    }

    /// Sleeps out a backoff delay; returns false when the uplink must stop.
    async fn wait_backoff(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let draining_already = self.drain.is_cancelled();
        loop {
            tokio::select! {
                _ = self.beat.asked() => continue,
                _ = &mut sleep => return true,
                _ = self.stop.cancelled() => return false,
                changed = self.settings.changed() => {
                    if changed.is_ok() {
                        tracing::info!("configuration reloaded; reconnecting to the brain now");
                    }
                    return changed.is_ok();
                }
                // On shutdown, one more attempt at once if there is something to deliver.
                _ = self.drain.cancelled(), if !draining_already => return !self.spool_is_empty(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn rehandshakes_are_limited_to_a_burst_per_window() {
        let t0 = Instant::now();
        let mut limit = RehandshakeLimit::default();
        for k in 0..REHANDSHAKE_BURST {
            let at = t0 + Duration::from_secs(k as u64);
            assert_eq!(limit.next_allowed(at), at, "within the burst");
            limit.record(at);
        }
        let asked = t0 + Duration::from_secs(5);
        assert_eq!(limit.next_allowed(asked), t0 + REHANDSHAKE_WINDOW);
        limit.record(t0 + REHANDSHAKE_WINDOW);
        assert_eq!(
            limit.next_allowed(asked),
            t0 + Duration::from_secs(1) + REHANDSHAKE_WINDOW
        );
    }
}
