//! Applying the handler's decision to the live state of one connection:
//! the counters, the client registry (which the router and `stats` read), the replies (a
//! `stats` report rendered from the counters now), the relayed command
//! result, and the spool append.
//!
//! Invariant: the order is fixed (counters, registration, health report,
//! replies, relay, the workers its events named, append), so a client that
//! reads a reply finds the counters, the registration and the report it
//! implies already in place.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::connection::Connection;
use super::handler::{Handled, Registration, Relay, Reply};
use super::replies::ReplyOutbox;
use crate::protocol::Value;

impl Connection<'_> {
    /// Applies what the handler decided, in this order: counters,
    /// registration, health report, replies, the relayed command result,
    /// the workers its events named, the append.
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
        let registered = h.register.is_some();
        if let Some(r) = h.register {
            // The hello's `ack_id`, which its replies echo.
            let ack_id = h.replies.iter().find_map(|r| match r {
                Reply::Message(m) if m.get("type").and_then(Value::as_str) == Some("hello_ack") => {
                    m.get("ack_id").cloned()
                }
                _ => None,
            });
            self.register(r, ack_id.as_ref());
        }
        if let Some(update) = h.health {
            stats
                .clients
                .reported(self.id, update.received_at(std::time::Instant::now()));
        }
        for reply in h.replies {
            self.reply(reply);
        }
        if registered {
            // After the hello's own replies: a held activation for a
            // scheduler it declared comes after its `hello_ack`.
            self.ingest.router.hand_over_held();
        }
        if let Some(Relay::CommandResult { message, ack_id }) = h.relay {
            self.relay_command_result(&message, ack_id);
        }
        for w in &h.workers {
            if !stats
                .clients
                .worker_seen(self.id, &w.engine, &w.worker, w.online)
            {
                tracing::debug!(
                    engine = %w.engine,
                    "a worker.* event named a worker that is not learnt for routing: this connection already taught {} worker names",
                    crate::clients::MAX_WORKERS_SEEN
                );
            }
        }
        if let Some(store) = h.store {
            let accepted = store.records.len() as u64;
            stats.clients.received(self.id, accepted);
            self.store(store.records, store.engines, store.ack_id).await;
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
    /// A scheduler another connection already runs is refused (counted,
    /// with an error that names who runs it); the rest is registered.
    fn register(&self, r: Registration, ack_id: Option<&Value>) {
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
        for t in self.ingest.stats.clients.declared(self.id, r, outbox) {
            let code = crate::refusal::RefusalCode::BadMessage;
            self.ingest.stats.refuse(code, 1);
            self.replies.error(
                code,
                &format!(
                    "hello: scheduler {} is already declared by {} on this daemon, and one process runs each scheduler; it is left out of this connection's hello (with its capabilities) until that process disconnects, and then this connection takes it over. Stop the other process if this one should run it",
                    crate::refusal::excerpt(&t.scheduler),
                    t.holder
                ),
                ack_id,
                None,
            );
        }
    }
}
