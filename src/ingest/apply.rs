//! Applying the handler's decision to the live state of one connection:
//! the counters, the client registry (which the router and `stats` read), the replies (a
//! `stats` report rendered from the counters now), the relayed command
//! result, and the spool append.
//!
//! Invariant: the order is fixed (counters, registration, health report,
//! replies, relay, append), so a client that reads a reply finds the
//! counters, the registration and the report it implies already in place.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::connection::Connection;
use super::handler::{Handled, Registration, Relay, Reply};
use super::replies::ReplyOutbox;
use crate::protocol::Value;

impl Connection<'_> {
    /// Applies what the handler decided, in this order: counters,
    /// registration, health report, replies, the relayed command result,
    /// the append.
    pub(super) async fn apply(&mut self, h: Handled) {
        let stats = &self.ingest.stats;
        if h.counts.events_received > 0 {
            stats
                .events_received
                .fetch_add(h.counts.events_received, Ordering::Relaxed);
        }
        for (code, n) in &h.counts.refused {
            stats.refuse(*code, *n);
        }
        if h.counts.time_corrected > 0 {
            stats.time_corrected(h.counts.time_corrected);
        }
        if h.counts.health_received > 0 {
            stats
                .health
                .reports(h.counts.health_received, h.counts.health_refused);
        }
        if let Some(r) = h.register {
            self.register(r);
        }
        if let Some(update) = h.health {
            stats
                .clients
                .reported(self.id, update.received_at(std::time::Instant::now()));
        }
        for reply in h.replies {
            self.reply(reply);
        }
        if let Some(Relay::CommandResult { message, ack_id }) = h.relay {
            self.relay_command_result(&message, ack_id);
        }
        if let Some(store) = h.store {
            let accepted = store.records.len() as u64;
            stats.clients.received(self.id, accepted);
            self.store(store.records, store.ack_id).await;
        }
    }

    fn reply(&self, reply: Reply) {
        match reply {
            Reply::Stats { ack_id } => {
                let mut m = self.ingest.stats.report(self.ingest.spool.stats());
                if let Some(a) = ack_id {
                    m.insert("ack_id", a);
                }
                self.replies.send(&m);
            }
            Reply::Message(v) => self.replies.send(&v),
            Reply::Error {
                refusal,
                ack_id,
                index,
            } => self
                .replies
                .error(refusal.code, &refusal.message, ack_id.as_ref(), index),
        }
    }

    /// Passes a `command_result` to the router; an `ack` when it took it,
    /// else the router's error, counted.
    fn relay_command_result(&self, message: &Value, ack_id: Option<Value>) {
        match self.ingest.router.on_result(self.id, message) {
            Ok(()) => {
                if let Some(a) = ack_id {
                    let mut m = Value::empty_map();
                    m.insert("type", "ack");
                    m.insert("ack_id", a);
                    self.replies.send(&m);
                }
            }
            Err(r) => {
                self.ingest.stats.refuse(r.code, 1);
                self.replies
                    .error(r.code, &r.message, ack_id.as_ref(), None);
            }
        }
    }

    /// What a `hello` declared goes into the client registry, with this
    /// connection's reply queue as the way the router reaches it.
    fn register(&self, r: Registration) {
        tracing::info!(
            process = r.process.as_deref().unwrap_or("-"),
            engines = ?r.engines,
            capabilities = ?r.capabilities,
            "client registered"
        );
        let outbox = Arc::new(ReplyOutbox::new(
            self.replies.tx.clone(),
            self.replies.framing,
        ));
        self.ingest.stats.clients.declared(self.id, r, outbox);
    }
}
