//! The in-flight window: which ranges of spooled events are on the wire
//! and not yet acknowledged, when each is late, and how the brain's answers
//! settle them. No I/O and no clock: the session passes the time in, so
//! every rule here is tested without a brain.
//!
//! Invariants:
//! * ranges are kept in the order they were first sent; the brain works
//!   through one connection's frames in that order, so only the front range
//!   can be late by timeout (the ones behind it wait their turn);
//! * a range settles on the first ack for any copy it went out under
//!   (at most [`MAX_COPIES`] remembered), late copies included;
//! * a range the brain passed over (it acked a copy of another range sent
//!   after this one's newest copy) goes again after [`SKIPPED_GRACE`];
//! * the wait for the front range is the ack timeout doubled per re-send
//!   (at most [`MAX_RESEND_BACKOFF`] times), and never less than
//!   [`SERVICE_TIMES_BEFORE_LATE`] times the brain's smoothed frame time,
//!   counted from the later of its last send and the brain's last ack.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most frame ids remembered for one range; older copies' acks are then
/// not recognised (the range is settled by a newer copy's ack instead).
pub(crate) const MAX_COPIES: usize = 16;
/// The wait for an ack doubles with each re-send of a range, up to this
/// many times the ack timeout.
pub(crate) const MAX_RESEND_BACKOFF: u32 = 16;
/// A range is late only after this many of the brain's recent frame times
/// without an ack (and never before the ack timeout): a brain that takes
/// longer than the ack timeout per frame is slow, not stuck, and copies
/// would only slow it further.
pub(crate) const SERVICE_TIMES_BEFORE_LATE: u32 = 3;
/// How soon a range the brain skipped goes again: acks can arrive a little
/// out of order, so not at once.
pub(crate) const SKIPPED_GRACE: Duration = Duration::from_secs(2);
/// Weight of the newest frame time in the smoothed one.
const SERVICE_TIME_WEIGHT: f64 = 0.3;

/// One range of spooled events in flight: sent, not yet acknowledged.
#[derive(Debug)]
struct Range {
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

impl Range {
    fn first_sent_at(&self) -> Instant {
        self.copies[0].1
    }

    fn last_sent_at(&self) -> Instant {
        self.copies[self.copies.len() - 1].1
    }
}

/// A range the brain acknowledged: delete it from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settled {
    pub first_id: i64,
    pub last_id: i64,
    pub events: usize,
    /// From the range's first copy to the ack.
    pub latency: Duration,
    /// Whether the acked copy is the range's first delivery to the brain.
    pub first_delivery: bool,
}

/// What a `rejected` count in an ack stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Nothing rejected.
    None,
    /// Events the brain did not store on their first delivery
    /// (deduplicated by content or not ingested): counted and warned of.
    Refused(u64),
    /// Duplicates a re-send is meant to make: the brain stores each once.
    Duplicates(u64),
}

impl Settled {
    /// Classifies the ack's `rejected` count (capped at the range's size).
    pub(crate) fn rejected(&self, rejected: u64) -> Rejected {
        let rejected = rejected.min(self.events as u64);
        match (rejected, self.first_delivery) {
            (0, _) => Rejected::None,
            (n, true) => Rejected::Refused(n),
            (n, false) => Rejected::Duplicates(n),
        }
    }
}

/// A range to send again now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resend {
    /// Position in the window, for [`Window::resent`] / [`Window::evicted`].
    pub index: usize,
    pub first_id: i64,
    pub last_id: i64,
    /// The id of the newest copy, for the log.
    pub last_frame_id: String,
    /// The brain passed over it (rather than it timing out).
    pub skipped: bool,
    /// Re-sends so far, before this one.
    pub resends: u32,
}

/// The ranges in flight in one session, and what the brain's pace says.
#[derive(Debug)]
pub(crate) struct Window {
    ranges: VecDeque<Range>,
    ack_timeout: Duration,
    /// When the brain last acknowledged a frame in this session (or the
    /// session began): a brain that acks is slow, not stuck, so the ack
    /// timeout of the range it works on counts from here.
    last_progress: Instant,
    /// How long the brain takes over one frame, smoothed: from when it
    /// could start on it (its arrival or the previous ack) to its ack.
    service_time: Option<Duration>,
}

impl Window {
    /// An empty window for a session that began at `now`.
    pub(crate) fn new(ack_timeout: Duration, now: Instant) -> Self {
        Window {
            ranges: VecDeque::new(),
            ack_timeout,
            last_progress: now,
            service_time: None,
        }
    }

    /// Ranges in flight.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing is in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The brain's smoothed time per frame, once it acked one.
    pub(crate) fn service_time(&self) -> Option<Duration> {
        self.service_time
    }

    /// Records a range sent for the first time in this session as `frame_id`.
    pub(crate) fn sent(
        &mut self,
        frame_id: String,
        (first_id, last_id): (i64, i64),
        events: usize,
        first_delivery: bool,
        now: Instant,
    ) {
        self.ranges.push_back(Range {
            copies: vec![(frame_id, now)],
            first_id,
            last_id,
            events,
            resends: 0,
            skipped_at: None,
            first_delivery,
        });
    }

    /// The brain acknowledged `acked_id` at `now`: settles the range that
    /// went out under it (any copy), marks the ranges it passed over, and
    /// updates the brain's frame time. `None` for an id not in flight (a
    /// copy of a range already settled).
    pub(crate) fn ack(&mut self, acked_id: &str, now: Instant) -> Option<Settled> {
        let (i, copy, copy_sent_at) = self.ranges.iter().enumerate().find_map(|(i, f)| {
            f.copies
                .iter()
                .position(|(id, _)| id == acked_id)
                .map(|c| (i, c, f.copies[c].1))
        })?;
        let took = now.saturating_duration_since(copy_sent_at.max(self.last_progress));
        self.service_time = Some(match self.service_time {
            None => took,
            Some(t) => t.mul_f64(1.0 - SERVICE_TIME_WEIGHT) + took.mul_f64(SERVICE_TIME_WEIGHT),
        });
        self.last_progress = now;
        let f = self.ranges.remove(i).expect("position is valid");
        // Ranges whose newest copy went out before the acked one were
        // passed over by the brain.
        for other in self.ranges.iter_mut() {
            if other.last_sent_at() < copy_sent_at && other.skipped_at.is_none() {
                other.skipped_at = Some(now);
            }
        }
        Some(Settled {
            first_id: f.first_id,
            last_id: f.last_id,
            events: f.events,
            latency: now.saturating_duration_since(f.first_sent_at()),
            first_delivery: f.first_delivery && copy == 0,
        })
    }

    /// How long the brain may take to ack a range that has gone `resends`
    /// times already.
    pub(crate) fn ack_wait(&self, resends: u32) -> Duration {
        self.ack_timeout * 2u32.saturating_pow(resends).min(MAX_RESEND_BACKOFF)
    }

    /// The range to send again at `now`, if any: one the brain skipped,
    /// after a short grace, or else the front range once its wait is over.
    pub(crate) fn overdue(&self, now: Instant) -> Option<Resend> {
        let skipped = self
            .ranges
            .iter()
            .position(|f| f.skipped_at.is_some_and(|at| now >= at + SKIPPED_GRACE));
        let index = match skipped {
            Some(i) => i,
            None => {
                let f = self.ranges.front()?;
                let waiting_since = f.last_sent_at().max(self.last_progress);
                (now >= waiting_since + self.front_wait(f.resends)).then_some(0)?
            }
        };
        let f = &self.ranges[index];
        Some(Resend {
            index,
            first_id: f.first_id,
            last_id: f.last_id,
            last_frame_id: f.copies[f.copies.len() - 1].0.clone(),
            skipped: f.skipped_at.is_some(),
            resends: f.resends,
        })
    }

    /// The wait of the front range: the ack timeout's backoff, or a few of
    /// the brain's frame times if it is slower than that.
    fn front_wait(&self, resends: u32) -> Duration {
        let slow_brain = self
            .service_time
            .map(|t| (t * SERVICE_TIMES_BEFORE_LATE).min(self.ack_timeout * MAX_RESEND_BACKOFF))
            .unwrap_or_default();
        self.ack_wait(resends).max(slow_brain)
    }

    /// Records that the range of `resend` went again as `frame_id`, now
    /// holding `events` events (some may have been evicted meanwhile).
    pub(crate) fn resent(
        &mut self,
        resend: &Resend,
        frame_id: String,
        events: usize,
        now: Instant,
    ) {
        let f = &mut self.ranges[resend.index];
        if f.copies.len() == MAX_COPIES {
            // The first copy is forgotten: its ack can no longer be told
            // from a re-sent copy's.
            f.copies.remove(0);
            f.first_delivery = false;
        }
        f.copies.push((frame_id, now));
        f.resends = resend.resends + 1;
        f.skipped_at = None;
        f.events = events;
    }

    /// The range of `resend` is gone from the spool (evicted by overflow):
    /// nothing is left to deliver.
    pub(crate) fn evicted(&mut self, resend: &Resend) {
        self.ranges.remove(resend.index);
    }
}

/// Tells first sends of events from re-sends, across sessions: the highest
/// spool id ever put on the wire.
#[derive(Debug, Default)]
pub(crate) struct Forwarded {
    max_id: i64,
}

/// How the events of one range just sent count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendCount {
    /// Events on the wire for the first time (`events_forwarded`).
    pub first_sends: u64,
    /// Events sent before, by this or an earlier session (`events_resent`).
    pub resends: u64,
    /// Whether no event of the range can have reached the brain before: not
    /// sent by this process, and above every id the spool held at open
    /// (an earlier process may have sent those).
    pub first_delivery: bool,
}

impl Forwarded {
    /// Records the ascending spool `ids` of a range just sent;
    /// `max_id_at_open` is the highest id the spool held when this process
    /// opened it.
    pub(crate) fn record(
        &mut self,
        ids: impl IntoIterator<Item = i64>,
        max_id_at_open: i64,
    ) -> SendCount {
        let sent_before = self.max_id.max(max_id_at_open);
        let (mut total, mut first_sends, mut first, mut last) = (0u64, 0u64, None, self.max_id);
        for id in ids {
            total += 1;
            if id > self.max_id {
                first_sends += 1;
            }
            first.get_or_insert(id);
            last = last.max(id);
        }
        self.max_id = last;
        SendCount {
            first_sends,
            resends: total - first_sends,
            first_delivery: first.is_some_and(|first| first > sent_before),
        }
    }
}

#[cfg(test)]
mod tests;
