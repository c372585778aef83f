//! The systemd watchdog: `WATCHDOG=1` only while every part answers.
//!
//! Each round the watchdog asks every part (a new generation number on a
//! `watch` channel) and waits up to one period for all of them to answer.
//! A part answers from the loop that does its work ([`Beat::asked`] is an
//! arm of that loop's `select!`), so a part that is wedged (a deadlock, a
//! blocking call on the runtime, a spool commit that never returns) stops
//! answering, the pings stop, and systemd restarts the daemon once
//! `WatchdogSec` has passed. Waiting on the network or the disk within the
//! part's own timeouts is not a stall: those waits answer too.
//!
//! The period is half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
//! recommends. Without a watchdog the [`Watchdog`] is dropped and every
//! [`Beat`] waits forever, costing nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// One part's side: answer when asked.
pub struct Beat {
    asked: watch::Receiver<u64>,
    answered: Arc<AtomicU64>,
    wake: Arc<Notify>,
}

impl Beat {
    /// A beat nobody asks: [`Beat::asked`] never completes.
    pub fn unwatched() -> Beat {
        let (_tx, rx) = watch::channel(0);
        Beat {
            asked: rx,
            answered: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Completes when the watchdog asks, after answering. Cancel safe: use
    /// it as an arm of the part's `select!`.
    pub async fn asked(&mut self) {
        let generation = self.next_ask().await;
        self.answer(generation);
    }

    async fn next_ask(&mut self) -> u64 {
        if self.asked.changed().await.is_err() {
            // The watchdog is gone (disabled or shut down): never ask again.
            std::future::pending::<()>().await;
        }
        *self.asked.borrow_and_update()
    }

    fn answer(&self, generation: u64) {
        self.answered.store(generation, Ordering::Release);
        self.wake.notify_one();
    }

    /// For a part without an async loop of its own (the spool's writer
    /// thread): on every ask, run `check` and answer only when it returns
    /// true. A `check` that never returns means no answer, ever.
    pub async fn answer_with<F, Fut>(mut self, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        loop {
            let generation = self.next_ask().await;
            if check().await {
                self.answer(generation);
            }
        }
    }

    /// Awaits `fut` while answering the watchdog: for waits that are bounded
    /// by their own timeout (connecting, the handshake, a send to the brain).
    pub async fn answering_while<F: Future>(&mut self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                _ = self.asked() => {}
            }
        }
    }
}

/// The watchdog's side: asks the parts and pings systemd when all answered.
pub struct Watchdog {
    ask: watch::Sender<u64>,
    parts: Vec<(&'static str, Arc<AtomicU64>)>,
    wake: Arc<Notify>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self::new()
    }
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Every part answered: `WATCHDOG=1` was sent.
    Alive,
    /// These parts did not answer within the period: no ping.
    Stalled(Vec<&'static str>),
}

impl Watchdog {
    /// A watchdog with no parts yet.
    pub fn new() -> Watchdog {
        let (ask, _) = watch::channel(0);
        Watchdog {
            ask,
            parts: Vec::new(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Registers a part; it must answer through the returned [`Beat`].
    pub fn part(&mut self, name: &'static str) -> Beat {
        let answered = Arc::new(AtomicU64::new(0));
        self.parts.push((name, answered.clone()));
        Beat {
            asked: self.ask.subscribe(),
            answered,
            wake: self.wake.clone(),
        }
    }

    /// Asks every `period` until `stop`; calls `ping` after each round in
    /// which every part answered, and `report` with every round's outcome.
    pub async fn run(
        self,
        period: Duration,
        stop: CancellationToken,
        mut ping: impl FnMut(),
        mut report: impl FnMut(&Round),
    ) {
        let mut generation: u64 = 0;
        let mut stalled: Option<Vec<&'static str>> = None;
        loop {
            generation += 1;
            self.ask.send_replace(generation);
            let deadline = tokio::time::Instant::now() + period;
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout_at(deadline, self.all_answered(generation)) => r,
            };
            let round = match outcome {
                Ok(()) => {
                    ping();
                    if let Some(parts) = stalled.take() {
                        tracing::info!(parts = ?parts, "watchdog: every part answers again; pinging systemd");
                    }
                    Round::Alive
                }
                Err(_) => {
                    let late = self.late(generation);
                    if stalled.as_ref() != Some(&late) {
                        tracing::error!(
                            parts = ?late,
                            period_ms = period.as_millis() as u64,
                            "watchdog: part of the daemon stopped answering; not pinging systemd, which restarts the daemon once WatchdogSec has passed"
                        );
                    }
                    stalled = Some(late.clone());
                    Round::Stalled(late)
                }
            };
            report(&round);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn all_answered(&self, generation: u64) {
        loop {
            if self.late(generation).is_empty() {
                return;
            }
            self.wake.notified().await;
        }
    }

    fn late(&self, generation: u64) -> Vec<&'static str> {
        self.parts
            .iter()
            .filter(|(_, a)| a.load(Ordering::Acquire) < generation)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The ping period for `WATCHDOG_USEC`: half of it, at least 50 ms.
pub fn period(watchdog_usec: Duration) -> Duration {
    (watchdog_usec / 2).max(Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A part that answers from its loop until `stall` is cancelled.
    fn spawn_part(mut beat: Beat, stall: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = beat.asked() => {}
                    _ = stall.cancelled() => break,
                }
            }
            // Wedged: never polls the beat again.
            std::future::pending::<()>().await;
        });
    }

    /// A running watchdog with a 1 s period, and what it did.
    struct Observed {
        pings: Arc<AtomicU64>,
        rounds: Arc<Mutex<Vec<Round>>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Observed {
        fn start(wd: Watchdog) -> Observed {
            let pings = Arc::new(AtomicU64::new(0));
            let rounds = Arc::new(Mutex::new(Vec::new()));
            let stop = CancellationToken::new();
            let (p, r) = (pings.clone(), rounds.clone());
            let task = tokio::spawn(wd.run(
                Duration::from_secs(1),
                stop.clone(),
                move || {
                    p.fetch_add(1, Ordering::Relaxed);
                },
                move |round| r.lock().unwrap().push(round.clone()),
            ));
            Observed {
                pings,
                rounds,
                stop,
                task,
            }
        }

        fn pings(&self) -> u64 {
            self.pings.load(Ordering::Relaxed)
        }

        async fn finish(self) -> Vec<Round> {
            self.stop.cancel();
            self.task.await.unwrap();
            std::mem::take(&mut *self.rounds.lock().unwrap())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pings_while_every_part_answers_and_stops_when_one_stalls() {
        let mut wd = Watchdog::new();
        let spool_stall = CancellationToken::new();
        spawn_part(wd.part("ingest"), CancellationToken::new());
        spawn_part(wd.part("spool"), spool_stall.clone());
        spawn_part(wd.part("uplink"), CancellationToken::new());
        let seen = Observed::start(wd);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(seen.pings(), 4, "rounds at 0, 1, 2 and 3 s");
        spool_stall.cancel();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(seen.pings(), 4, "no ping once the spool stopped answering");
        let last = seen.finish().await.last().cloned().unwrap();
        assert_eq!(last, Round::Stalled(vec!["spool"]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_that_answers_late_misses_only_that_round() {
        let mut wd = Watchdog::new();
        let mut slow = wd.part("uplink");
        // Answers only every 2.5 s: some rounds of 1 s miss it.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                slow.asked().await;
            }
        });
        let seen = Observed::start(wd);
        tokio::time::sleep(Duration::from_millis(6200)).await;
        let rounds = seen.finish().await;
        assert!(rounds.contains(&Round::Alive), "{rounds:?}");
        assert!(
            rounds.contains(&Round::Stalled(vec!["uplink"])),
            "{rounds:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answering_while_a_bounded_wait_runs() {
        let mut wd = Watchdog::new();
        let mut beat = wd.part("uplink");
        let seen = Observed::start(wd);
        let out = beat
            .answering_while(async {
                tokio::time::sleep(Duration::from_millis(4500)).await;
                7
            })
            .await;
        assert_eq!(out, 7);
        assert_eq!(seen.pings(), 5, "one ping per round");
        seen.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn answer_with_answers_only_when_the_check_passes() {
        let mut wd = Watchdog::new();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        tokio::spawn(wd.part("spool").answer_with(move || {
            let ok = h.load(Ordering::Relaxed);
            async move { ok }
        }));
        let seen = Observed::start(wd);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(seen.pings(), 2);
        healthy.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(seen.pings(), 2);
        healthy.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(seen.pings(), 4, "pings resume");
        seen.finish().await;
    }

    #[tokio::test]
    async fn an_unwatched_beat_never_completes() {
        let mut beat = Beat::unwatched();
        let r = tokio::time::timeout(Duration::from_millis(50), beat.asked()).await;
        assert!(r.is_err());
    }

    #[test]
    fn period_is_half_the_watchdog_timeout() {
        assert_eq!(period(Duration::from_secs(30)), Duration::from_secs(15));
        assert_eq!(period(Duration::from_millis(20)), Duration::from_millis(50));
    }
}
