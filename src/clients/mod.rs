//! The registry of connected local clients: who each one is (peer
//! credentials, what its `hello` declared), how to reach it, and what the
//! daemon's `hello` advertises because of them.
//!
//! One [`ClientRegistry`] (held by [`crate::stats::Stats`] as `clients`)
//! is what every reader of clients reads: the command router picks a
//! client that declared an action from it, and the `stats` reply, the
//! heartbeat, `agent_status` and the uplink's `hello` read the same
//! entries, so routing and reports cannot disagree about who is connected.
//!
//! Invariants: ingest adds an entry when a connection is accepted and
//! removes it once when the connection ends; a client is reachable for
//! commands only after its `hello` (which hands over its [`Outbox`]);
//! [`ClientRegistry::changed`] fires whenever what the daemon advertises
//! may have changed (a `hello` that changes engines, schedulers,
//! capabilities or runtime features, or a client that declared some going
//! away), which is what makes the uplink re-handshake. One connection holds
//! each scheduler; another that declares it waits and takes it over when
//! the holder lets it go.
//!
//! What was advertised before a restart is remembered (`remembered.rs`)
//! and stays in the advertisement until the processes declare it again or
//! the restart grace is over.
//!
//! Depends on [`crate::protocol`] (and on [`crate::config`] only to read
//! the remembered file): ingest implements [`Outbox`] for its reply queue,
//! so the router reaches clients without knowing the socket or its framing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::Value;

pub mod health;
pub mod merge;
pub use health::{fresh_for, EngineHealth, HealthReport, HealthUpdate};
mod hosting;
pub use hosting::{ReportedDepth, MAX_WORKERS_SEEN};
mod advertise;
mod remembered;
pub use advertise::{Advertisement, LeftOut, EXTERNAL_SCHEDULE_FEATURE, MAX_HELLO_LIST};
pub use remembered::{file_beside, AdvertisementFile, BrainIdentity, Identity, RememberedReport};

/// One connected local client, as the reports show it.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// Peer pid from SO_PEERCRED.
    pub pid: Option<i32>,
    /// Peer uid from SO_PEERCRED.
    pub uid: u32,
    /// Peer gid from SO_PEERCRED.
    pub gid: u32,
    /// Process name from `hello`.
    pub process: Option<String>,
    /// Framework from `hello`.
    pub framework: Option<String>,
    /// Engines from `hello`.
    pub engines: Vec<String>,
    /// Engine -> actions from `hello` (`capabilities`).
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// `runtime_features` from `hello`.
    pub runtime_features: Vec<String>,
    /// Worker role from `hello`.
    pub worker_role: Option<String>,
    /// Schedulers from `hello` (their capabilities are in `capabilities`,
    /// keyed by scheduler name).
    pub schedulers: Vec<String>,
    /// Worker names this process hosts: from `hello` and `worker.*` events.
    pub workers: Vec<String>,
    /// Engine -> worker names learnt from its `worker.*` events
    /// (`data.worker`; a `worker.offline` takes the name out again).
    /// [`ClientInfo::hosts`] reads these, `workers` and the health report.
    pub workers_seen: BTreeMap<String, BTreeSet<String>>,
    /// Its latest health report, if it sent one that is still fresh.
    pub health: Option<HealthReport>,
    /// Framing: "msgpack" or "jsonl".
    pub framing: &'static str,
    /// Events received from this client.
    pub events_received: u64,
}

impl ClientInfo {
    /// Whether it declared `action`, for `engine` or (without one) for any.
    pub fn runs(&self, engine: Option<&str>, action: &str) -> bool {
        match engine {
            Some(e) => self
                .capabilities
                .get(e)
                .is_some_and(|a| a.iter().any(|x| x == action)),
            None => self
                .capabilities
                .values()
                .any(|a| a.iter().any(|x| x == action)),
        }
    }

    /// Who it is, for messages: pid and process name as far as known.
    pub fn describe(&self) -> String {
        match (&self.pid, &self.process) {
            (Some(p), Some(n)) => format!("pid {p} ({n})"),
            (Some(p), None) => format!("pid {p}"),
            (None, Some(n)) => format!("process {n}"),
            (None, None) => "the local process".to_string(),
        }
    }

    /// Whether it makes the daemon advertise anything.
    fn advertises(&self) -> bool {
        !self.engines.is_empty()
            || !self.schedulers.is_empty()
            || !self.capabilities.is_empty()
            || !self.runtime_features.is_empty()
    }
}

/// What a `hello` declares about the connection's process (labels already
/// bounded and lists sorted by the ingest handler).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registration {
    /// Process name.
    pub process: Option<String>,
    /// Framework name.
    pub framework: Option<String>,
    /// Worker role.
    pub worker_role: Option<String>,
    /// Engines it sends events for (those of `capabilities` included), sorted.
    pub engines: Vec<String>,
    /// Engine (or scheduler) -> actions it runs, each list sorted and
    /// without duplicates.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Feature names of its runtime.
    pub runtime_features: Vec<String>,
    /// Schedulers it runs, sorted.
    pub schedulers: Vec<String>,
    /// Worker names it hosts, sorted.
    pub workers: Vec<String>,
}

/// How a message reaches a client: ingest's reply queue, in the client's
/// framing.
pub trait Outbox: Send + Sync {
    /// Queues `msg` without waiting; `false` when the client's queue is
    /// full (it is not reading its connection).
    fn offer(&self, msg: &Value) -> bool;
}

/// A client that declared an action, as the router sees it.
#[derive(Clone)]
pub struct Reachable {
    /// The connection id.
    pub id: u64,
    /// When its first `hello` arrived (longest connected wins a tie).
    pub since: Instant,
    /// Who it is, for messages.
    pub who: String,
    /// Where its commands go.
    pub outbox: Arc<dyn Outbox>,
}

struct Entry {
    info: ClientInfo,
    /// Set by the first `hello`: how to reach it, and since when.
    reach: Option<(Instant, Arc<dyn Outbox>)>,
    /// Schedulers its `hello` declared that another connection holds, with
    /// their capabilities: it takes each over when that connection ends.
    waiting: Vec<(String, Vec<String>)>,
}

/// A scheduler a `hello` declared that another connection already runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerTaken {
    /// The scheduler's name.
    pub scheduler: String,
    /// Who runs it (pid and process name).
    pub holder: String,
}

/// Schedulers no connection holds any more go to the connections waiting
/// for them, the earliest connection first.
fn pass_on(clients: &mut BTreeMap<u64, Entry>, released: &[String]) {
    for name in released {
        let next = clients
            .values_mut()
            .find(|e| e.waiting.iter().any(|(s, _)| s == name));
        if let Some(e) = next {
            let at = e.waiting.iter().position(|(s, _)| s == name).unwrap();
            let (scheduler, caps) = e.waiting.remove(at);
            e.info.capabilities.insert(scheduler.clone(), caps);
            e.info.schedulers.push(scheduler);
            e.info.schedulers.sort();
        }
    }
}

/// How the router reaches entry `id`, once it said `hello`.
fn reachable(id: u64, e: &Entry) -> Option<Reachable> {
    let (since, outbox) = e.reach.as_ref()?;
    Some(Reachable {
        id,
        since: *since,
        who: e.info.describe(),
        outbox: Arc::clone(outbox),
    })
}

/// The connected local clients, by connection id.
#[derive(Default)]
pub struct ClientRegistry {
    clients: Mutex<BTreeMap<u64, Entry>>,
    changed: tokio::sync::Notify,
    /// The advertisement remembered across a restart; locked after
    /// `clients`, never before, and never held across file I/O.
    memory: Mutex<remembered::Memory>,
    /// Whether `memory` may still advertise something: lets `declared`
    /// skip its lock once the restart grace is over (or there was nothing
    /// to remember).
    remembering: AtomicBool,
    /// The daemon is stopping: what processes declare no longer changes
    /// what the brain is told (see [`ClientRegistry::stopping`]).
    stopping: AtomicBool,
    /// What was advertised when the stop began; still advertised until
    /// the daemon ends. Locked alone.
    at_stop: Mutex<Option<Advertisement>>,
    /// What the latest advertisement left out; locked last.
    left_out: Mutex<LeftOut>,
}

impl ClientRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        ClientRegistry::default()
    }

    /// A connection was accepted: it is listed, not yet reachable.
    pub fn connected(&self, id: u64, info: ClientInfo) {
        self.clients.lock().unwrap().insert(
            id,
            Entry {
                info,
                reach: None,
                waiting: Vec::new(),
            },
        );
    }

    /// What its `hello` declared (a later `hello` replaces it), and how to
    /// send it commands. Signals [`ClientRegistry::changed`] when what it
    /// advertises changed.
    ///
    /// A scheduler is run by one connection: a scheduler another connection
    /// already declared is left out of this one's registration (with the
    /// capabilities keyed by it), and returned with who holds it, so the
    /// client can be told. It waits there: when the holder's connection
    /// ends (or its next `hello` leaves the scheduler out), this one takes
    /// the scheduler over (a restarted process whose predecessor's end was
    /// not yet seen gets it a moment later).
    pub fn declared(
        &self,
        id: u64,
        mut r: Registration,
        outbox: Arc<dyn Outbox>,
    ) -> Vec<SchedulerTaken> {
        let mut taken = Vec::new();
        let changed = {
            let mut clients = self.clients.lock().unwrap();
            r.schedulers.retain(|name| {
                let holder = clients
                    .iter()
                    .find(|(other, e)| **other != id && e.info.schedulers.contains(name));
                match holder {
                    Some((_, e)) => {
                        taken.push(SchedulerTaken {
                            scheduler: name.clone(),
                            holder: e.info.describe(),
                        });
                        false
                    }
                    None => true,
                }
            });
            let waiting: Vec<(String, Vec<String>)> = taken
                .iter()
                .map(|t| {
                    let caps = r.capabilities.remove(&t.scheduler).unwrap_or_default();
                    (t.scheduler.clone(), caps)
                })
                .collect();
            let Some(e) = clients.get_mut(&id) else {
                return taken;
            };
            e.waiting = waiting;
            if self.remembering.load(Ordering::Acquire) {
                let mut memory = self.memory.lock().unwrap();
                memory.declared(&r);
                if memory.pending(Instant::now()).is_none() {
                    self.remembering.store(false, Ordering::Release);
                }
            }
            let c = &mut e.info;
            let changed = c.engines != r.engines
                || c.capabilities != r.capabilities
                || c.runtime_features != r.runtime_features
                || c.schedulers != r.schedulers;
            let dropped: Vec<String> = c
                .schedulers
                .iter()
                .filter(|s| !r.schedulers.contains(s))
                .cloned()
                .collect();
            c.process = r.process;
            c.framework = r.framework;
            c.worker_role = r.worker_role;
            c.engines = r.engines;
            c.capabilities = r.capabilities;
            c.runtime_features = r.runtime_features;
            c.schedulers = r.schedulers;
            c.workers = r.workers;
            // The names its worker.* events taught stay hosted.
            c.workers.extend(c.workers_seen.values().flatten().cloned());
            c.workers.sort();
            c.workers.dedup();
            let since = e.reach.as_ref().map_or_else(Instant::now, |(s, _)| *s);
            e.reach = Some((since, outbox));
            pass_on(&mut clients, &dropped);
            changed
        };
        if changed {
            self.changed.notify_one();
        }
        taken
    }

    /// Counts `n` events accepted from it.
    pub fn received(&self, id: u64, n: u64) {
        if let Some(e) = self.clients.lock().unwrap().get_mut(&id) {
            e.info.events_received += n;
        }
    }

    /// The engines client `id` declared (none when it is gone or declared none).
    pub fn engines_of(&self, id: u64) -> Vec<String> {
        self.clients
            .lock()
            .unwrap()
            .get(&id)
            .map(|e| e.info.engines.clone())
            .unwrap_or_default()
    }

    /// The connection ended: forgotten, and [`ClientRegistry::changed`]
    /// signalled if it made the daemon advertise anything. The schedulers
    /// it held go to the connections waiting for them (the earliest first).
    pub fn disconnected(&self, id: u64) {
        let advertised = {
            let mut clients = self.clients.lock().unwrap();
            let gone = clients.remove(&id);
            if let Some(e) = &gone {
                pass_on(&mut clients, &e.info.schedulers);
            }
            gone.is_some_and(|e| e.info.advertises())
        };
        if advertised {
            self.changed.notify_one();
        }
    }

    /// Resolves when what the daemon advertises may have changed since the
    /// last wait (one pending signal is kept).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Connected clients, by connection id.
    pub fn list(&self) -> Vec<ClientInfo> {
        let clients = self.clients.lock().unwrap();
        clients.values().map(|e| e.info.clone()).collect()
    }

    /// How many clients are connected.
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The clients that said `hello` and declared `action` (for `engine`,
    /// or for any engine without one), by connection id.
    pub fn able(&self, engine: Option<&str>, action: &str) -> Vec<Reachable> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter(|(_, e)| e.info.runs(engine, action))
            .filter_map(|(id, e)| reachable(*id, e))
            .collect()
    }

    /// The connection that declared scheduler `name`, if one did.
    pub fn scheduler_holder(&self, name: &str) -> Option<Reachable> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter(|(_, e)| e.info.schedulers.iter().any(|s| s == name))
            .find_map(|(id, e)| reachable(*id, e))
    }

    /// The connections that declared at least one scheduler.
    pub fn scheduler_processes(&self) -> Vec<Reachable> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .filter(|(_, e)| !e.info.schedulers.is_empty())
            .filter_map(|(id, e)| reachable(*id, e))
            .collect()
    }

    /// Scheduler name -> the connection that declared it.
    pub fn scheduler_holders(&self) -> BTreeMap<String, u64> {
        let clients = self.clients.lock().unwrap();
        clients
            .iter()
            .flat_map(|(id, e)| e.info.schedulers.iter().map(move |s| (s.clone(), *id)))
            .collect()
    }

    /// At start: opens the file where the acknowledged advertisement is
    /// remembered (written for `identity`) and, unless `grace` is zero,
    /// advertises what it holds (less what `configured` advertises anyway)
    /// until processes declare it again or `grace` is over. A file that
    /// cannot be used is ignored with a warning. Returns when the
    /// remembered entries expire, if any were taken.
    pub fn remember_from(
        &self,
        path: PathBuf,
        identity: Identity,
        grace: Duration,
        configured: &Advertisement,
    ) -> Option<Instant> {
        let (file, read) = AdvertisementFile::open(path, identity);
        let mut memory = self.memory.lock().unwrap();
        let taken = match read {
            Err(why) => {
                tracing::warn!(
                    file = %file.path().display(),
                    "ignoring the advertisement remembered from the last run: {why}; the brain may show this host without engines until its processes reconnect"
                );
                None
            }
            Ok(None) => None,
            Ok(Some(_)) if grace.is_zero() => None,
            Ok(Some(adv)) => {
                memory.remember(adv, configured, grace);
                let now = Instant::now();
                let report = memory.report(now);
                self.remembering.store(report.is_some(), Ordering::Release);
                report.map(|r| {
                    tracing::info!(
                        engines = ?r.engines,
                        schedulers = ?r.schedulers,
                        capabilities = ?r.capabilities,
                        until = %r.until,
                        "advertising what was advertised before the restart until its processes declare it again or the restart grace is over"
                    );
                    now + memory.left(now)
                })
            }
        };
        memory.file = Some(file);
        taken
    }

    /// The restart grace is over: what is still only remembered is no
    /// longer advertised ([`ClientRegistry::changed`] is signalled when
    /// something was).
    pub fn forget_remembered(&self) {
        let had = self.memory.lock().unwrap().forget();
        self.remembering.store(false, Ordering::Release);
        if had {
            tracing::info!(
                "restart grace over: what was advertised before the restart and not declared again is no longer advertised"
            );
            self.changed.notify_one();
        }
    }

    /// Whether `action` for `key` (an engine or scheduler; any of them when
    /// `None`) is only remembered: then which key, and how long it stays
    /// advertised.
    pub fn only_remembered(&self, key: Option<&str>, action: &str) -> Option<(String, Duration)> {
        let memory = self.memory.lock().unwrap();
        let now = Instant::now();
        let pending = memory.pending(now)?;
        let found = pending
            .capabilities
            .iter()
            .find(|(k, actions)| {
                key.is_none_or(|want| want == k.as_str()) && actions.iter().any(|a| a == action)
            })
            .map(|(k, _)| k.clone())?;
        Some((found, memory.left(now)))
    }

    /// Remembers `adv` until these instants, as if read at start (tests).
    #[cfg(test)]
    pub(crate) fn remember_until(
        &self,
        adv: Advertisement,
        until: Instant,
        wall: time::OffsetDateTime,
    ) {
        self.memory.lock().unwrap().remember_until(adv, until, wall);
        self.remembering.store(true, Ordering::Release);
    }

    /// The brain's identity from the last `hello_ack` remembered in the
    /// file (from this run, or read at start from the last one).
    pub fn remembered_brain(&self) -> Option<BrainIdentity> {
        let memory = self.memory.lock().unwrap();
        memory.file.as_ref()?.brain().cloned()
    }

    /// The remembered entries, for `stats` and `status`.
    pub fn remembered_report(&self) -> Option<RememberedReport> {
        self.memory.lock().unwrap().report(Instant::now())
    }

    /// The brain acknowledged a `hello` advertising `adv` for `identity`:
    /// remembered for the next start (the file is written only when it
    /// changed). Were the remembered
    /// entries meant for another brain or agent (the settings were
    /// reloaded), they are forgotten.
    ///
    /// What to write is decided under the memory's lock; the write and its
    /// fsync happen after it is released, so a slow disk holds up only the
    /// caller (the uplink runs this on a blocking thread), never a `hello`,
    /// the router or `stats`.
    pub fn acknowledged(&self, adv: &Advertisement, identity: &Identity, brain: &BrainIdentity) {
        let (job, forgot) = {
            let mut memory = self.memory.lock().unwrap();
            let Some(file) = memory.file.as_mut() else {
                return;
            };
            let moved = file.identity() != identity;
            let job = file.to_write(adv, identity, Some(brain));
            let forgot = moved && memory.forget();
            if moved {
                self.remembering.store(false, Ordering::Release);
            }
            (job, forgot)
        };
        if forgot {
            self.changed.notify_one();
        }
        let Some(job) = job else {
            return;
        };
        if !job.run() {
            if let Some(file) = self.memory.lock().unwrap().file.as_mut() {
                file.not_written(&job);
            }
        }
    }

    /// The daemon began to stop. From now on what is advertised is at
    /// least what was advertised then: connections closing because of the
    /// stop change neither what the brain is told (a `hello` said during
    /// the stop, after a reconnect, still carries them) nor what is
    /// remembered for the next start. An idle process whose connection
    /// the stop closes first must not vanish while a busy one is still
    /// finishing. The uplink also arms no re-handshake from now on.
    pub fn stopping(&self) {
        let now = self.advertisement(&[], &BTreeMap::new());
        *self.at_stop.lock().unwrap() = Some(now);
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether [`ClientRegistry::stopping`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

#[cfg(test)]
pub(crate) mod fixture;
#[cfg(test)]
mod tests;
