//! The `health` message: what a process reports of its engines (queue
//! depths, the workers it hosts, broker facts), validated against what the
//! brain can store, with no I/O.
//!
//! Invariants:
//! * a part the brain could not take (an engine, a queue depth, a worker, a
//!   fact) is refused with an `invalid_health` error saying what to
//!   change, and counted once per refused part; the other parts are kept;
//! * at most one error per engine and kind of part, so a report with
//!   thousands of bad entries gets a handful of replies;
//! * only a message without a map of engines is refused whole; then the
//!   connection's earlier report stays.
//!
//! The format is documented in `docs/local-protocol.md` ("`health`").

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::decision::{Handled, HealthUpdate, Reply};
use super::validate::{excerpt, Refusal};
use crate::clients::{fresh_for, EngineHealth};
use crate::protocol::limits::engine_name_fits;
use crate::protocol::{canonical, Value};
use crate::refusal::RefusalCode;

/// Most engines one report may carry (the brain lists at most 32).
pub const MAX_HEALTH_ENGINES: usize = 32;
/// Longest queue and worker name (the brain's columns hold 200 characters).
pub const MAX_HEALTH_NAME_CHARS: usize = 200;
/// The largest depth, pid or concurrency the brain stores (a 32-bit
/// column); a larger depth is sent as this, a larger pid or concurrency
/// refuses its worker.
pub const MAX_BRAIN_INT: u64 = i32::MAX as u64;
/// Longest fact key (the part after `<engine>.`).
pub const MAX_FACT_KEY_CHARS: usize = 64;
/// Longest fact value.
pub const MAX_FACT_CHARS: usize = 1024;
/// The worker details the brain reads; other keys of a worker are dropped.
pub const WORKER_DETAILS: [&str; 5] = ["stats", "active", "active_queues", "registered", "conf"];

/// The engine keys that are not facts.
const QUEUE_DEPTHS: &str = "queue_depths";
const WORKERS: &str = "workers";

/// Refused parts of one kind, for one error.
#[derive(Default)]
struct Refused {
    count: u64,
    first: Option<String>,
}

impl Refused {
    fn add(&mut self, name: &str, why: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("{}: {}", excerpt(name), why()));
        }
    }

    /// One error for them all, counted once per part.
    fn report(self, what: &str, h: &mut Handled, ack_id: Option<&Value>) {
        let Some(first) = self.first else {
            return;
        };
        let message = if self.count == 1 {
            format!("health: {what}: refused {first}; the rest of the report was kept")
        } else {
            format!(
                "health: {what}: {} refused, the first {first}; the rest of the report was kept",
                self.count
            )
        };
        refuse(h, self.count, message, ack_id);
    }
}

fn refuse(h: &mut Handled, n: u64, message: String, ack_id: Option<&Value>) {
    match h
        .counts
        .refused
        .iter_mut()
        .find(|(c, _)| *c == RefusalCode::InvalidHealth)
    {
        Some((_, total)) => *total += n,
        None => h.counts.refused.push((RefusalCode::InvalidHealth, n)),
    }
    h.replies.push(Reply::Error {
        refusal: Refusal::new(RefusalCode::InvalidHealth, message),
        ack_id: ack_id.cloned(),
        index: None,
    });
}

/// A `health` message received at `now`.
pub(super) fn health(msg: &Value, ack_id: Option<Value>, now: OffsetDateTime) -> Handled {
    let mut h = Handled::default();
    h.counts.health_received = 1;
    let ack = ack_id.as_ref();
    let engines = match msg.get("engines") {
        Some(Value::Map(entries)) => entries,
        other => {
            h.counts.health_refused = 1;
            let got = other.map_or("nothing", Value::type_name);
            refuse(
                &mut h,
                1,
                format!("health: \"engines\" must be a map of engine name -> its report (queue_depths, workers, facts), got {got}; nothing of this report was kept"),
                ack,
            );
            return h;
        }
    };
    let interval = interval(msg.get("interval_seconds"), &mut h, ack);
    let mut update = HealthUpdate {
        at: Some(now),
        fresh_for: fresh_for(interval),
        engines: BTreeMap::new(),
    };
    let mut names = Refused::default();
    let mut over = Refused::default();
    for (name, report) in engines {
        let name = name.trim();
        if !engine_name_fits(name) || name.contains('.') {
            names.add(name, || {
                "an engine name must be 1-40 characters without \".\" (the brain takes the engine from the text before a key's first \".\")".into()
            });
            continue;
        }
        if update.engines.len() >= MAX_HEALTH_ENGINES && !update.engines.contains_key(name) {
            over.add(name, || {
                format!("a report carries at most {MAX_HEALTH_ENGINES} engines; send the others from the process that runs them")
            });
            continue;
        }
        let Value::Map(parts) = report else {
            names.add(name, || {
                format!(
                    "an engine's report must be an object of queue_depths, workers and facts, got {}",
                    report.type_name()
                )
            });
            continue;
        };
        let e = engine(name, parts, &mut h, ack);
        update.engines.insert(name.to_string(), e);
    }
    names.report("engines", &mut h, ack);
    over.report("engines", &mut h, ack);
    if let Some(a) = ack_id {
        let mut m = Value::empty_map();
        m.insert("type", "ack");
        m.insert("ack_id", a);
        m.insert("engines", update.engines.len() as u64);
        let count = |f: fn(&EngineHealth) -> usize| -> u64 {
            update.engines.values().map(f).sum::<usize>() as u64
        };
        m.insert("queues", count(|e| e.queue_depths.len()));
        m.insert("workers", count(|e| e.workers.len()));
        m.insert("facts", count(|e| e.facts.len()));
        h.replies.push(Reply::Message(m));
    }
    h.health = Some(update);
    h
}

/// `interval_seconds`: a number of seconds > 0, or absent.
fn interval(v: Option<&Value>, h: &mut Handled, ack: Option<&Value>) -> Option<Duration> {
    let v = v.filter(|v| !v.is_null())?;
    match v.as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok()) {
        Some(d) if !d.is_zero() => Some(d),
        _ => {
            refuse(
                h,
                1,
                format!(
                    "health: interval_seconds must be a number of seconds > 0, got {}; the default of {} s was used",
                    short(v),
                    crate::clients::health::DEFAULT_REPORT_INTERVAL.as_secs()
                ),
                ack,
            );
            None
        }
    }
}

/// One engine's report: its queue depths, workers and facts, each checked.
fn engine(
    name: &str,
    parts: &[(String, Value)],
    h: &mut Handled,
    ack: Option<&Value>,
) -> EngineHealth {
    let mut e = EngineHealth::default();
    let mut queues = Refused::default();
    let mut workers = Refused::default();
    let mut facts = Refused::default();
    for (key, v) in parts {
        match key.as_str() {
            QUEUE_DEPTHS => match v {
                Value::Null => {}
                Value::Map(depths) => {
                    for (q, d) in depths {
                        match depth(q, d) {
                            Ok(d) => {
                                e.queue_depths.insert(q.clone(), d);
                            }
                            Err(why) => queues.add(q, || why),
                        }
                    }
                }
                other => queues.add(QUEUE_DEPTHS, || {
                    format!(
                        "must be a map of queue name -> depth (an int >= 0), got {}",
                        other.type_name()
                    )
                }),
            },
            WORKERS => match v {
                Value::Null => {}
                Value::Map(ws) => {
                    for (w, d) in ws {
                        match worker(w, d) {
                            Ok(d) => {
                                e.workers.insert(w.trim().to_string(), d);
                            }
                            Err(why) => workers.add(w, || why),
                        }
                    }
                }
                other => workers.add(WORKERS, || {
                    format!(
                        "must be a map of worker name -> its details, got {}",
                        other.type_name()
                    )
                }),
            },
            _ => match fact(key, v) {
                Ok(s) => {
                    e.facts.insert(key.clone(), s);
                }
                Err(why) => facts.add(key, || why),
            },
        }
    }
    queues.report(&format!("{name}.queue_depths"), h, ack);
    workers.report(&format!("{name}.workers"), h, ack);
    facts.report(&format!("{name} facts"), h, ack);
    e
}

/// The value, quoted short, for an error.
fn short(v: &Value) -> String {
    match v {
        Value::Str(s) => format!("the string {}", excerpt(s)),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        other => other.type_name().to_string(),
    }
}

fn name_fits(name: &str) -> bool {
    let n = name.trim().chars().count();
    n > 0 && n <= MAX_HEALTH_NAME_CHARS
}

/// A queue's depth: an int >= 0, clamped to the brain's 2^31-1.
fn depth(queue: &str, d: &Value) -> Result<u64, String> {
    if !name_fits(queue) {
        return Err(format!(
            "a queue name must be 1-{MAX_HEALTH_NAME_CHARS} characters"
        ));
    }
    match d {
        Value::Int(i) if *i >= 0 => Ok((*i as u64).min(MAX_BRAIN_INT)),
        Value::UInt(u) => Ok((*u).min(MAX_BRAIN_INT)),
        other => Err(format!(
            "the depth must be an int >= 0 (the brain drops the engine's other queues after a bad one), got {}",
            short(other)
        )),
    }
}

/// An int in 0..=2^31-1, or why not.
fn brain_int(v: &Value, what: &str) -> Result<(), String> {
    match v {
        Value::Int(i) if *i >= 0 && (*i as u64) <= MAX_BRAIN_INT => Ok(()),
        other => Err(format!(
            "{what} must be an int from 0 to {MAX_BRAIN_INT}, got {}",
            short(other)
        )),
    }
}

/// A worker's details: the keys the brain reads, each of the type it needs.
fn worker(name: &str, v: &Value) -> Result<Value, String> {
    if !name_fits(name) {
        return Err(format!(
            "a worker name must be 1-{MAX_HEALTH_NAME_CHARS} characters (the name its events carry in data.worker)"
        ));
    }
    let Value::Map(_) = v else {
        return Err(format!(
            "a worker's details must be an object (stats, active, active_queues, registered, conf), got {}",
            v.type_name()
        ));
    };
    let mut out = Value::empty_map();
    for key in WORKER_DETAILS {
        let Some(x) = v.get(key).filter(|x| !x.is_null()) else {
            continue;
        };
        match key {
            "stats" => stats(x)?,
            "conf" if !matches!(x, Value::Map(_)) => {
                return Err(format!("conf must be an object, got {}", x.type_name()))
            }
            "active" | "registered" if !matches!(x, Value::Array(_)) => {
                return Err(format!("{key} must be a list, got {}", x.type_name()))
            }
            "active_queues" => active_queues(x)?,
            _ => {}
        }
        out.insert(key, x.clone());
    }
    Ok(out)
}

/// `stats`: an object; `pid` and the pool's concurrency ints the brain
/// can store (a concurrency of another type loses the whole worker row).
fn stats(x: &Value) -> Result<(), String> {
    if !matches!(x, Value::Map(_)) {
        return Err(format!("stats must be an object, got {}", x.type_name()));
    }
    if let Some(pid) = x.get("pid").filter(|p| !p.is_null()) {
        brain_int(pid, "stats.pid")?;
    }
    let Some(pool) = x.get("pool").filter(|p| !p.is_null()) else {
        return Ok(());
    };
    if !matches!(pool, Value::Map(_)) {
        return Err(format!(
            "stats.pool must be an object, got {}",
            pool.type_name()
        ));
    }
    match (pool.get("max-concurrency"), pool.get("processes")) {
        (Some(c), _) => brain_int(c, "stats.pool.max-concurrency"),
        (None, Some(p)) if brain_int(p, "").is_err() => Err(format!(
            "stats.pool needs max-concurrency as an int: without it the brain reads the concurrency from processes, which is {} here",
            short(p)
        )),
        _ => Ok(()),
    }
}

/// `active_queues`: a list of objects, each with the queue's `name`.
fn active_queues(x: &Value) -> Result<(), String> {
    let Some(items) = x.as_array() else {
        return Err(format!(
            "active_queues must be a list, got {}",
            x.type_name()
        ));
    };
    for q in items {
        let ok = q.get("name").and_then(Value::as_str).is_some_and(name_fits);
        if !ok {
            return Err(format!(
                "each of active_queues must be an object with a \"name\" of 1-{MAX_HEALTH_NAME_CHARS} characters"
            ));
        }
    }
    Ok(())
}

/// A fact: a scalar, as the string the brain gets (`True`/`False` for
/// booleans, as Python agents write them).
fn fact(key: &str, v: &Value) -> Result<String, String> {
    let n = key.chars().count();
    if n == 0 || n > MAX_FACT_KEY_CHARS || key.contains('.') {
        return Err(format!(
            "a fact's key must be 1-{MAX_FACT_KEY_CHARS} characters without \".\""
        ));
    }
    if key == "worker_details" {
        // The daemon writes `<engine>.worker_details` from `workers`.
        return Err("worker details go in \"workers\" (worker name -> details)".into());
    }
    let s = match v {
        Value::Str(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => {
            let mut out = Vec::new();
            canonical::write_f64(*f, &mut out).map_err(|e| e.to_string())?;
            String::from_utf8(out).expect("a float is ASCII")
        }
        other => {
            return Err(format!(
                "a fact must be a string, number or boolean (only queue_depths and workers are objects), got {}",
                other.type_name()
            ))
        }
    };
    if s.chars().count() > MAX_FACT_CHARS {
        return Err(format!(
            "a fact may take at most {MAX_FACT_CHARS} characters"
        ));
    }
    Ok(s)
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
