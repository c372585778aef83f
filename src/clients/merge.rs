//! The heartbeat's `adapter_health`: the union of the connected processes'
//! fresh health reports, within the brain's limits.
//!
//! Per engine the brain reads one `<engine>.queue_depths` and one
//! `<engine>.worker_details`, each a JSON document inside a string; any
//! other `<engine>.<key>` is a fact it stores nowhere but counts toward
//! its limits. So the merge sends:
//! * per engine, one `queue_depths` with every reported queue: a queue
//!   reported by several processes carries the depth of the freshest
//!   report (the brain keeps one depth per queue, last writer wins);
//! * per engine, one `worker_details` with every reported worker (each
//!   process reports its own; a name reported by two carries the freshest);
//! * each fact as `<engine>.<key>`, the freshest report's value.
//!
//! Limits (the brain's): at most [`MAX_KEYS`] keys, `queue_depths` and
//! `worker_details` kept before facts; at most [`MAX_QUEUES_PER_ENGINE`]
//! queues per engine (the freshest reports' first); and the object must
//! take at most the bytes the caller gives (what is left of the brain's
//! frame size), counted exactly as signed: the canonical JSON of the
//! object, each document escaped inside its string. What does not fit is
//! cut in this order until it fits, and counted in [`Cuts`]:
//! 1. `registered` of the workers, largest worker first;
//! 2. `active` and `conf` of the workers, largest worker first;
//! 3. whole workers, least recently reported first;
//! 4. queues, least recently reported first;
//! 5. facts.
//!
//! The heartbeat is never refused: at worst it carries an empty object.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::HealthReport;
use crate::protocol::canonical;
use crate::protocol::Value;

/// Most keys the brain reads in `adapter_health` (it trims the rest, with
/// a warning per heartbeat).
pub const MAX_KEYS: usize = 256;
/// Most queues the brain reads in one `<engine>.queue_depths`.
pub const MAX_QUEUES_PER_ENGINE: usize = 1024;

/// What the merge cut to stay within the limits, by kind; summed over
/// heartbeats it is the `stats` key `health.cut`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cuts {
    /// Workers sent without their `registered` list.
    pub registered: u64,
    /// Workers sent without their `active` and `conf`.
    pub details: u64,
    /// Workers left out.
    pub workers: u64,
    /// Queues left out.
    pub queues: u64,
    /// Facts left out.
    pub facts: u64,
}

impl Cuts {
    /// `(kind, count)` in label order.
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        [
            ("registered", self.registered),
            ("details", self.details),
            ("workers", self.workers),
            ("queues", self.queues),
            ("facts", self.facts),
        ]
    }

    /// Whether anything was cut.
    pub fn any(&self) -> bool {
        self.by_kind().iter().any(|(_, n)| *n > 0)
    }

    /// The count of whole `kind`s left out.
    fn left_out(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Queues => &mut self.queues,
            Kind::Workers => &mut self.workers,
        }
    }
}

/// The merged `adapter_health`, ready to send.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterHealth {
    /// Key -> string value: every `*.queue_depths` and `*.worker_details`
    /// first, then the facts.
    pub entries: Vec<(String, String)>,
    /// What was cut.
    pub cuts: Cuts,
    /// Its canonical size in bytes (braces included).
    pub bytes: usize,
}

impl AdapterHealth {
    /// As the heartbeat payload's `adapter_health` map.
    pub fn to_value(&self) -> Value {
        Value::Map(
            self.entries
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        )
    }

    /// Whether it carries any worker's details.
    pub fn carries_workers(&self) -> bool {
        self.entries
            .iter()
            .any(|(k, _)| k.ends_with(".worker_details"))
    }
}

/// Who reported something, for "freshest wins" and "least recently
/// reported first": arrival, then connection id (a later connection wins a
/// tie).
type Freshness = (Instant, u64);

struct Worker {
    name: String,
    details: Vec<(String, Value)>,
    by: Freshness,
    /// Bytes of `"name":{details}` once escaped inside the string.
    cost: usize,
}

struct Queue {
    name: String,
    depth: u64,
    by: Freshness,
    cost: usize,
}

struct Fact {
    key: String,
    value: String,
    cost: usize,
}

#[derive(Default)]
struct Engine {
    /// Sorted by name.
    queues: Vec<Queue>,
    /// Sorted by name.
    workers: Vec<Worker>,
    /// Sums of their costs.
    queue_costs: usize,
    worker_costs: usize,
    /// Bytes of `"<engine>.queue_depths":` and `"<engine>.worker_details":`.
    queue_key: usize,
    worker_key: usize,
}

/// Bytes of `s` written as a JSON string inside a JSON string: the quotes
/// and the backslashes it contains are escaped once more. `s` is canonical
/// JSON, which has no raw control character.
fn escaped_len(s: &[u8]) -> usize {
    s.len() + s.iter().filter(|b| matches!(b, b'"' | b'\\')).count()
}

/// Bytes of `s` as a canonical JSON string, quotes included.
fn str_len(s: &str) -> usize {
    let mut out = Vec::with_capacity(s.len() + 2);
    canonical::write_str(s, &mut out);
    out.len()
}

/// `"name":<value>` canonically.
fn member(name: &str, value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    canonical::write_str(name, &mut out);
    out.push(b':');
    canonical::write_value_lossy(value, &mut out);
    out
}

impl Worker {
    fn value(&self) -> Value {
        Value::Map(self.details.clone())
    }

    fn measure(&mut self) {
        self.cost = escaped_len(&member(&self.name, &self.value()));
    }

    /// Removes the given detail keys; whether one was there.
    fn strip(&mut self, keys: &[&str]) -> bool {
        let before = self.details.len();
        self.details.retain(|(k, _)| !keys.contains(&k.as_str()));
        let cut = self.details.len() != before;
        if cut {
            self.measure();
        }
        cut
    }
}

/// Takes the item called `name` out of `list`, sorted by name.
fn take_named<T>(list: &mut Vec<T>, name: &str, name_of: impl Fn(&T) -> &String) -> Option<T> {
    let i = list
        .binary_search_by(|x| name_of(x).as_str().cmp(name))
        .ok()?;
    Some(list.remove(i))
}

/// Bytes of a JSON object of `n` members taking `sum` bytes: braces and
/// commas (escaping-neutral) around them; `None` when empty.
fn document(n: usize, sum: usize) -> Option<usize> {
    (n > 0).then(|| 2 + sum + (n - 1))
}

impl Engine {
    /// Bytes of its `queue_depths` entry (key, colon, quoted document).
    fn queues_bytes(&self) -> Option<usize> {
        document(self.queues.len(), self.queue_costs).map(|d| self.queue_key + 1 + 2 + d)
    }

    fn workers_bytes(&self) -> Option<usize> {
        document(self.workers.len(), self.worker_costs).map(|d| self.worker_key + 1 + 2 + d)
    }

    fn push_queue(&mut self, q: Queue) {
        self.queue_costs += q.cost;
        self.queues.push(q);
    }

    fn push_worker(&mut self, w: Worker) {
        self.worker_costs += w.cost;
        self.workers.push(w);
    }

    /// Whether it has any of `kind`.
    fn has(&self, kind: Kind) -> bool {
        match kind {
            Kind::Queues => !self.queues.is_empty(),
            Kind::Workers => !self.workers.is_empty(),
        }
    }

    /// Who reported each of its `kind`, by name.
    fn reported(&self, kind: Kind) -> Vec<(Freshness, String)> {
        match kind {
            Kind::Queues => self.queues.iter().map(|q| (q.by, q.name.clone())).collect(),
            Kind::Workers => self
                .workers
                .iter()
                .map(|w| (w.by, w.name.clone()))
                .collect(),
        }
    }

    /// Removes the `kind` called `name`; whether it was there.
    fn remove(&mut self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Queues => take_named(&mut self.queues, name, |q| &q.name)
                .map(|q| self.queue_costs -= q.cost)
                .is_some(),
            Kind::Workers => take_named(&mut self.workers, name, |w| &w.name)
                .map(|w| self.worker_costs -= w.cost)
                .is_some(),
        }
    }

    /// Removes all of its `kind`; how many there were.
    fn clear(&mut self, kind: Kind) -> u64 {
        let n = match kind {
            Kind::Queues => {
                self.queue_costs = 0;
                std::mem::take(&mut self.queues).len()
            }
            Kind::Workers => {
                self.worker_costs = 0;
                std::mem::take(&mut self.workers).len()
            }
        };
        n as u64
    }

    /// Removes the detail `keys` of worker `name`; whether one was there.
    fn strip_worker(&mut self, name: &str, keys: &[&str]) -> bool {
        let Ok(i) = self.workers.binary_search_by(|w| w.name.as_str().cmp(name)) else {
            return false;
        };
        let w = &mut self.workers[i];
        let before = w.cost;
        let cut = w.strip(keys);
        self.worker_costs = self.worker_costs - before + w.cost;
        cut
    }
}

struct Plan {
    engines: BTreeMap<String, Engine>,
    /// Sorted by key.
    facts: Vec<Fact>,
    fact_costs: usize,
    cuts: Cuts,
}

impl Plan {
    /// The canonical size of the object as it would be sent now.
    fn bytes(&self) -> usize {
        let (n, sum) = self
            .engines
            .values()
            .flat_map(|e| [e.queues_bytes(), e.workers_bytes()])
            .flatten()
            .fold((self.facts.len(), self.fact_costs), |(n, s), c| {
                (n + 1, s + c)
            });
        document(n, sum).unwrap_or(2)
    }

    /// The engine's entry, created empty.
    fn engine(&mut self, name: &str) -> &mut Engine {
        self.engines
            .entry(name.to_string())
            .or_insert_with(|| Engine {
                queue_key: str_len(&format!("{name}.queue_depths")),
                worker_key: str_len(&format!("{name}.worker_details")),
                ..Engine::default()
            })
    }

    fn keys(&self) -> usize {
        self.engines
            .values()
            .map(|e| usize::from(!e.queues.is_empty()) + usize::from(!e.workers.is_empty()))
            .sum::<usize>()
            + self.facts.len()
    }
}

/// Merges the fresh `reports` (by connection id) into one `adapter_health`
/// of at most `max_bytes` canonical bytes; see the module doc for what is
/// kept and what is cut first.
pub fn merge(reports: &[(u64, HealthReport)], max_bytes: usize) -> AdapterHealth {
    let mut plan = union(reports);
    keep_key_limit(&mut plan);
    fit(&mut plan, max_bytes);
    render(plan)
}

/// Every engine's queues, workers and facts, the freshest report winning
/// for a name reported twice; queues over the per-engine limit cut.
fn union(reports: &[(u64, HealthReport)]) -> Plan {
    let mut queues: BTreeMap<(&str, &str), (u64, Freshness)> = BTreeMap::new();
    let mut workers: BTreeMap<(&str, &str), (&Value, Freshness)> = BTreeMap::new();
    let mut facts: BTreeMap<(&str, &str), (&str, Freshness)> = BTreeMap::new();
    for (id, r) in reports {
        let by = (r.received, *id);
        for (engine, h) in &r.engines {
            for (q, d) in &h.queue_depths {
                let e = queues.entry((engine, q)).or_insert((*d, by));
                if by >= e.1 {
                    *e = (*d, by);
                }
            }
            for (w, d) in &h.workers {
                let e = workers.entry((engine, w)).or_insert((d, by));
                if by >= e.1 {
                    *e = (d, by);
                }
            }
            for (k, v) in &h.facts {
                let e = facts.entry((engine, k)).or_insert((v, by));
                if by >= e.1 {
                    *e = (v, by);
                }
            }
        }
    }
    let mut plan = Plan {
        engines: BTreeMap::new(),
        facts: Vec::new(),
        fact_costs: 0,
        cuts: Cuts::default(),
    };
    for ((e, q), (depth, by)) in queues {
        let cost = escaped_len(&member(q, &Value::from(depth)));
        plan.engine(e).push_queue(Queue {
            name: q.to_string(),
            depth,
            by,
            cost,
        });
    }
    for ((e, w), (details, by)) in workers {
        let mut worker = Worker {
            name: w.to_string(),
            details: details.as_map().map(<[_]>::to_vec).unwrap_or_default(),
            by,
            cost: 0,
        };
        worker.measure();
        plan.engine(e).push_worker(worker);
    }
    for ((e, k), (v, _)) in facts {
        let key = format!("{e}.{k}");
        let cost = str_len(&key) + 1 + str_len(v);
        plan.fact_costs += cost;
        plan.facts.push(Fact {
            key,
            value: v.to_string(),
            cost,
        });
    }
    for eng in plan.engines.values_mut() {
        if eng.queues.len() > MAX_QUEUES_PER_ENGINE {
            // The freshest reports' queues first, then by name.
            eng.queues
                .sort_by(|a, b| b.by.cmp(&a.by).then_with(|| a.name.cmp(&b.name)));
            plan.cuts.queues += (eng.queues.len() - MAX_QUEUES_PER_ENGINE) as u64;
            eng.queues.truncate(MAX_QUEUES_PER_ENGINE);
            eng.queues.sort_by(|a, b| a.name.cmp(&b.name));
            eng.queue_costs = eng.queues.iter().map(|q| q.cost).sum();
        }
    }
    plan
}

/// At most [`MAX_KEYS`] keys: every engine's `queue_depths` and
/// `worker_details` first (by engine name), then the facts (by key).
fn keep_key_limit(plan: &mut Plan) {
    let mut room = MAX_KEYS;
    for eng in plan.engines.values_mut() {
        for kind in [Kind::Queues, Kind::Workers] {
            if !eng.has(kind) {
                continue;
            }
            if room > 0 {
                room -= 1;
            } else {
                *plan.cuts.left_out(kind) += eng.clear(kind);
            }
        }
    }
    while plan.facts.len() > room {
        let f = plan.facts.pop().expect("more facts than room");
        plan.fact_costs -= f.cost;
        plan.cuts.facts += 1;
    }
    debug_assert!(plan.keys() <= MAX_KEYS);
}

/// The two documents of an engine whose members are cut by name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Queues,
    Workers,
}

/// Cuts, in the documented order, until the object takes at most `max`
/// bytes.
fn fit(plan: &mut Plan, max: usize) {
    if plan.bytes() <= max
        || strip_largest_workers(plan, max)
        || drop_least_recent(plan, max, Kind::Workers)
        || drop_least_recent(plan, max, Kind::Queues)
    {
        return;
    }
    // 5: facts, the last keys first.
    while plan.bytes() > max {
        let Some(f) = plan.facts.pop() else {
            return;
        };
        plan.fact_costs -= f.cost;
        plan.cuts.facts += 1;
    }
}

/// Steps 1 and 2: `registered`, then `active` and `conf`, of the largest
/// workers first. Whether the object fits now.
fn strip_largest_workers(plan: &mut Plan, max: usize) -> bool {
    for step in [&["registered"][..], &["active", "conf"][..]] {
        let mut order: Vec<(usize, String, String)> = plan
            .engines
            .iter()
            .flat_map(|(e, eng)| {
                eng.workers
                    .iter()
                    .map(move |w| (w.cost, e.clone(), w.name.clone()))
            })
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| (&a.1, &a.2).cmp(&(&b.1, &b.2))));
        for (_, e, name) in order {
            let Some(eng) = plan.engines.get_mut(&e) else {
                continue;
            };
            if !eng.strip_worker(&name, step) {
                continue;
            }
            if step.len() == 1 {
                plan.cuts.registered += 1;
            } else {
                plan.cuts.details += 1;
            }
            if plan.bytes() <= max {
                return true;
            }
        }
    }
    false
}

/// Steps 3 and 4: whole workers, then queues (`kind`), least recently
/// reported first. Whether the object fits now.
fn drop_least_recent(plan: &mut Plan, max: usize, kind: Kind) -> bool {
    let mut order: Vec<(Freshness, String, String)> = plan
        .engines
        .iter()
        .flat_map(|(e, eng)| {
            eng.reported(kind)
                .into_iter()
                .map(move |(by, name)| (by, e.clone(), name))
        })
        .collect();
    order.sort();
    for (_, e, name) in order {
        if plan
            .engines
            .get_mut(&e)
            .is_some_and(|eng| eng.remove(kind, &name))
        {
            *plan.cuts.left_out(kind) += 1;
            if plan.bytes() <= max {
                return true;
            }
        }
    }
    false
}

/// The entries as sent: per engine `queue_depths` then `worker_details`,
/// then the facts.
fn render(plan: Plan) -> AdapterHealth {
    let bytes = plan.bytes();
    let mut entries = Vec::with_capacity(plan.keys());
    for (name, eng) in &plan.engines {
        if !eng.queues.is_empty() {
            let doc = Value::Map(
                eng.queues
                    .iter()
                    .map(|q| (q.name.clone(), Value::from(q.depth)))
                    .collect(),
            );
            entries.push((format!("{name}.queue_depths"), json(&doc)));
        }
        if !eng.workers.is_empty() {
            let doc = Value::Map(
                eng.workers
                    .iter()
                    .map(|w| (w.name.clone(), w.value()))
                    .collect(),
            );
            entries.push((format!("{name}.worker_details"), json(&doc)));
        }
    }
    entries.extend(plan.facts.into_iter().map(|f| (f.key, f.value)));
    AdapterHealth {
        entries,
        cuts: plan.cuts,
        bytes,
    }
}

/// `v` as canonical JSON text.
fn json(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    canonical::write_value_lossy(v, &mut out);
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
