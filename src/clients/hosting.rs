//! Which connection hosts which worker, and what the health reports say
//! about a queue: the registry queries that route worker- and
//! queue-targeted commands (`docs/local-protocol.md`, "Routing by target").
//!
//! A connection hosts a worker for an engine when one of these says so:
//! * a `worker.*` event it sent for that engine names the worker in
//!   `data.worker` (a `worker.offline` takes it back);
//! * its latest health report lists the worker under that engine;
//! * its `hello` names the worker in `workers` (which gives no engine): the
//!   worker is hosted for every engine the connection declared, unless its
//!   events or its health report tie the name to engines of their own.

use std::collections::BTreeSet;

use time::OffsetDateTime;

use super::{reachable, ClientInfo, ClientRegistry, Reachable};
use crate::protocol::Value;

/// At most this many (engine, worker) names are learnt from one
/// connection's `worker.*` events; later names are not learnt (the events
/// themselves are still stored and forwarded).
pub const MAX_WORKERS_SEEN: usize = 256;

/// The freshest depth some connection reported for a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedDepth {
    /// Messages waiting.
    pub depth: u64,
    /// When the report arrived (wall clock).
    pub at: OffsetDateTime,
    /// Who reported it, for messages.
    pub who: String,
}

impl ClientInfo {
    /// Its health report, unless it is no longer fresh (reports are
    /// dropped at each heartbeat; this covers the time in between).
    pub fn fresh_report(&self) -> Option<&super::HealthReport> {
        self.health
            .as_ref()
            .filter(|h| h.is_fresh(std::time::Instant::now()))
    }

    /// The engines it hosts worker `worker` for (see the module doc).
    pub fn worker_engines(&self, worker: &str) -> BTreeSet<String> {
        let mut engines: BTreeSet<String> = self
            .workers_seen
            .iter()
            .filter(|(_, names)| names.contains(worker))
            .map(|(e, _)| e.clone())
            .collect();
        if let Some(h) = self.fresh_report() {
            engines.extend(
                h.engines
                    .iter()
                    .filter(|(_, eh)| eh.workers.contains_key(worker))
                    .map(|(e, _)| e.clone()),
            );
        }
        // Only the hello named it: no engine of its own.
        if engines.is_empty() && self.workers.iter().any(|w| w == worker) {
            engines.extend(self.engines.iter().cloned());
        }
        engines
    }

    /// Whether it hosts `worker` for `engine` (for any engine without one).
    pub fn hosts(&self, engine: Option<&str>, worker: &str) -> bool {
        let engines = self.worker_engines(worker);
        match engine {
            Some(e) => engines.contains(e),
            None => !engines.is_empty(),
        }
    }

    /// Every worker name it hosts, from its `hello`, its events and its
    /// health report.
    pub fn hosted_workers(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.workers.iter().cloned().collect();
        names.extend(self.workers_seen.values().flatten().cloned());
        if let Some(h) = self.fresh_report() {
            names.extend(h.engines.values().flat_map(|eh| eh.workers.keys().cloned()));
        }
        names
    }

    /// The engines whose health report names `queue`, in `queue_depths` or
    /// in a worker's `active_queues`.
    fn queue_engines(&self, queue: &str) -> Vec<String> {
        let Some(h) = self.fresh_report() else {
            return Vec::new();
        };
        h.engines
            .iter()
            .filter(|(_, eh)| {
                eh.queue_depths.contains_key(queue)
                    || eh.workers.values().any(|w| consumes(w, queue))
            })
            .map(|(e, _)| e.clone())
            .collect()
    }
}

impl ClientInfo {
    /// Whether its fresh health report names `queue` for `engine`: `None`
    /// when not, else the depth it reported (`None` inside when it names the
    /// queue only among a worker's `active_queues`).
    fn reports_queue(&self, engine: &str, queue: &str) -> Option<Option<u64>> {
        let eh = self.fresh_report()?.engines.get(engine)?;
        if let Some(depth) = eh.queue_depths.get(queue) {
            return Some(Some(*depth));
        }
        eh.workers
            .values()
            .any(|w| consumes(w, queue))
            .then_some(None)
    }
}

/// Whether a worker's health details list `task` among its running tasks.
fn runs_task(worker: &Value, task: &str) -> bool {
    worker
        .get("active")
        .and_then(Value::as_array)
        .is_some_and(|active| {
            active.iter().any(|a| {
                ["id", "task_id"]
                    .iter()
                    .any(|k| a.get(k).and_then(Value::as_str) == Some(task))
            })
        })
}

/// Whether a worker's health details list `queue` in `active_queues`
/// (entries are maps with a `name`, or plain names).
fn consumes(worker: &Value, queue: &str) -> bool {
    worker
        .get("active_queues")
        .and_then(Value::as_array)
        .is_some_and(|qs| {
            qs.iter().any(|q| {
                q.as_str().or_else(|| q.get("name").and_then(Value::as_str)) == Some(queue)
            })
        })
}

impl ClientRegistry {
    /// Connection `id` sent a `worker.*` event naming `worker` for
    /// `engine`: it hosts it (`online`), or no longer does (`worker.offline`).
    /// Returns `false` when the name was not learnt because the connection
    /// already taught [`MAX_WORKERS_SEEN`] names.
    pub fn worker_seen(&self, id: u64, engine: &str, worker: &str, online: bool) -> bool {
        let mut clients = self.clients.lock().unwrap();
        let Some(e) = clients.get_mut(&id) else {
            return true;
        };
        let c = &mut e.info;
        if !online {
            if let Some(names) = c.workers_seen.get_mut(engine) {
                names.remove(worker);
                if names.is_empty() {
                    c.workers_seen.remove(engine);
                }
            }
            if !c.workers_seen.values().any(|n| n.contains(worker)) {
                c.workers.retain(|w| w != worker);
            }
            return true;
        }
        if c.workers_seen
            .get(engine)
            .is_some_and(|n| n.contains(worker))
        {
            return true;
        }
        if c.workers_seen.values().map(BTreeSet::len).sum::<usize>() >= MAX_WORKERS_SEEN {
            return false;
        }
        c.workers_seen
            .entry(engine.to_string())
            .or_default()
            .insert(worker.to_string());
        if let Err(at) = c.workers.binary_search_by(|w| w.as_str().cmp(worker)) {
            c.workers.insert(at, worker.to_string());
        }
        true
    }

    /// The clients that said `hello` and for which `pick` holds, by
    /// connection id.
    pub fn reachable_where(&self, pick: impl Fn(&ClientInfo) -> bool) -> Vec<Reachable> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter(|(_, e)| pick(&e.info))
            .filter_map(|(id, e)| reachable(*id, e))
            .collect()
    }

    /// Which connections host worker `worker` for `engine` (for any
    /// engine without one), among those that said `hello`.
    pub fn hosting(&self, engine: Option<&str>, worker: &str) -> Vec<Reachable> {
        self.reachable_where(|c| c.hosts(engine, worker))
    }

    /// The engines whose health reports name `queue` (in `queue_depths` or
    /// a worker's `active_queues`), over every connected client.
    pub fn queue_engines(&self, queue: &str) -> BTreeSet<String> {
        let clients = self.clients.lock().unwrap();
        clients
            .values()
            .flat_map(|e| e.info.queue_engines(queue))
            .collect()
    }

    /// The connections whose fresh health report names `queue` for
    /// `engine`, with the depth each reported (see
    /// [`ClientInfo::reports_queue`]), by connection id.
    pub fn queue_reporters(&self, engine: &str, queue: &str) -> Vec<(u64, Option<u64>)> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter_map(|(id, e)| Some((*id, e.info.reports_queue(engine, queue)?)))
            .collect()
    }

    /// The connections whose fresh health report lists task `task` of
    /// `engine` among a worker's running tasks (`active` entries with that
    /// `id` or `task_id`).
    pub fn task_runners(&self, engine: &str, task: &str) -> Vec<u64> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter(|(_, e)| {
                e.info
                    .fresh_report()
                    .and_then(|h| h.engines.get(engine))
                    .is_some_and(|eh| eh.workers.values().any(|w| runs_task(w, task)))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The freshest depth of `queue` for `engine` among the connected
    /// clients' health reports.
    pub fn queue_depth(&self, engine: &str, queue: &str) -> Option<ReportedDepth> {
        let clients = self.clients.lock().unwrap();
        clients
            .values()
            .filter_map(|e| {
                let h = e.info.fresh_report()?;
                let depth = *h.engines.get(engine)?.queue_depths.get(queue)?;
                Some(ReportedDepth {
                    depth,
                    at: h.at,
                    who: e.info.describe(),
                })
            })
            .max_by_key(|d| d.at)
    }
}
