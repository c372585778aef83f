//! Delivering spooled events: fill the in-flight window from the spool,
//! settle ranges on the brain's acks (deleting them from the spool), and
//! send late or skipped ranges again. Which range is late is the
//! [`Window`](super::Window)'s decision; this file does the I/O and the
//! counting (`events_forwarded`, `events_resent`, `events_undeliverable`,
//! brain rejections and duplicates).

use std::sync::atomic::Ordering;
use std::time::Instant;

use time::OffsetDateTime;

use super::{failed, BrainSession, SessionEnd};
use crate::protocol;
use crate::spool::StoredEvent;
use crate::uplink::error::UplinkError;
use crate::uplink::window::{Rejected, Settled};

impl BrainSession<'_> {
    /// Room for events in one frame, after the signed envelope.
    fn event_budget(&self) -> usize {
        self.ack
            .max_frame_bytes
            .saturating_sub(protocol::frame_overhead_bytes() + 64)
    }

    /// Sends new ranges from the spool while the window has room.
    pub(super) async fn fill_window(&mut self) -> Result<(), SessionEnd> {
        while self.window.len() < self.inflight_frames {
            let budget = self.event_budget();
            let events = self
                .up
                .spool
                .read_after(self.cursor, self.batch_max_events, budget)
                .await
                .map_err(|e| failed(UplinkError::SpoolRead(e)))?;
            let (Some(first), Some(last)) = (events.first(), events.last()) else {
                return Ok(());
            };
            let (first, last) = (first.id, last.id);
            self.cursor = last;
            if events.len() == 1 && events[0].body.len() + 2 > budget {
                self.drop_undeliverable(&events[0]).await;
                continue;
            }
            let frame_id = self.send_batch(&events).await?;
            let max_id_at_open = self.up.spool.stats().max_id_at_open.load(Ordering::Relaxed);
            let count = self
                .up
                .forwarded
                .record(events.iter().map(|e| e.id), max_id_at_open);
            let stats = &self.up.stats;
            stats
                .events_forwarded
                .fetch_add(count.first_sends, Ordering::Relaxed);
            stats
                .events_resent
                .fetch_add(count.resends, Ordering::Relaxed);
            self.window.sent(
                frame_id,
                (first, last),
                events.len(),
                count.first_delivery,
                Instant::now(),
            );
        }
        Ok(())
    }

    /// An event accepted at ingest under a larger limit than this brain's
    /// frame size can never be delivered: dropped and counted.
    async fn drop_undeliverable(&mut self, event: &StoredEvent) {
        tracing::warn!(
            event_bytes = event.body.len(),
            max_frame_bytes = self.ack.max_frame_bytes,
            "dropped an event larger than the brain's frame limit"
        );
        self.up.discard_undeliverable(event).await;
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

    /// Sends the range the window says is late or skipped, if any.
    pub(super) async fn resend_overdue(&mut self) -> Result<(), SessionEnd> {
        let Some(r) = self.window.overdue(Instant::now()) else {
            return Ok(());
        };
        let events = self
            .up
            .spool
            .read_range(r.first_id, r.last_id)
            .await
            .map_err(|e| failed(UplinkError::SpoolRead(e)))?;
        if events.is_empty() {
            // Evicted meanwhile (spool overflow): nothing left to deliver.
            self.window.evicted(&r);
            return Ok(());
        }
        if r.skipped {
            tracing::warn!(
                frame_id = %r.last_frame_id,
                events = events.len(),
                "the brain acknowledged a later frame but not this one (it withholds the ack after a transient error of its own); re-sending the frame (re-signed)"
            );
        } else {
            tracing::warn!(
                frame_id = %r.last_frame_id,
                events = events.len(),
                waited_s = self.window.ack_wait(r.resends).as_secs(),
                next_wait_s = self.window.ack_wait(r.resends + 1).as_secs(),
                brain_frame_ms = self.window.service_time().map(|t| t.as_millis() as u64),
                "no ack from the brain in time; re-sending the frame (re-signed); an ack for either copy settles it"
            );
        }
        let new_id = self.send_batch(&events).await?;
        self.up
            .stats
            .events_resent
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.window.resent(&r, new_id, events.len(), Instant::now());
        Ok(())
    }

    /// The brain acknowledged a frame: settle its range and delete it from
    /// the spool.
    pub(super) async fn on_ack(
        &mut self,
        acked_id: Option<String>,
        accepted: Option<u64>,
        rejected: u64,
    ) -> Result<(), SessionEnd> {
        let Some(acked) = acked_id else {
            return Ok(());
        };
        let Some(settled) = self.window.ack(&acked, Instant::now()) else {
            tracing::debug!(
                acked_id = acked,
                "ack for a frame no longer in flight (a copy of a range already acked)"
            );
            return Ok(());
        };
        self.up
            .stats
            .ack_latency
            .observe(settled.latency.as_secs_f64());
        self.up
            .spool
            .ack(settled.first_id, settled.last_id)
            .await
            .map_err(|e| failed(UplinkError::spool_delete(e)))?;
        self.up
            .stats
            .update_uplink(|u| u.last_ack_at = Some(OffsetDateTime::now_utc()));
        self.count_rejected(&settled, &acked, rejected);
        tracing::debug!(
            frame_id = acked,
            events = settled.events,
            accepted,
            rejected,
            latency_ms = settled.latency.as_millis() as u64,
            "batch acknowledged"
        );
        Ok(())
    }

    /// Counts the events the brain acknowledged without storing. On a
    /// range's first delivery they are events it deduplicated by content or
    /// could not ingest (the ack says no more): counted, with a warning. On
    /// a re-sent copy they are the duplicates a re-send is meant to make.
    fn count_rejected(&self, settled: &Settled, acked: &str, rejected: u64) {
        match settled.rejected(rejected) {
            Rejected::None => {}
            Rejected::Refused(n) => self.up.stats.brain_rejected(n, acked, settled.events),
            Rejected::Duplicates(n) => {
                self.up
                    .stats
                    .events_duplicate_at_brain
                    .fetch_add(n, Ordering::Relaxed);
                tracing::debug!(
                    frame_id = acked,
                    events = settled.events,
                    rejected = n,
                    "the brain already had events of a re-sent frame (expected: it stores each once)"
                );
            }
        }
    }
}
