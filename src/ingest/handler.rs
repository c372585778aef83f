//! The decision for one client message, with no I/O.
//!
//! [`handle`] is a function of the decoded message, the [`Limits`] and the
//! receive time. It validates and normalises, and returns a [`Handled`]:
//! what to count, what to register, what to reply, which command result to
//! relay and which records to store. It touches no socket, spool, router,
//! counter or clock, so the connection loop, the fuzz targets, the hot-path
//! bench and any other way in for local messages all run the same code.
//!
//! Invariants:
//! * every refused message or event is in [`Counts::refused`] under the
//!   code of its error reply (one count per refused event: a message
//!   refused whole counts each of its events);
//! * replies are in the order the client gets them; the `ack` of stored
//!   events is not among them: the loop sends it once the spool committed;
//! * what needs live state comes back as a decision that the loop
//!   completes: a `stats` report ([`Reply::Stats`]) and a command result
//!   ([`Relay::CommandResult`]), whose reply depends on the router.

use std::collections::BTreeMap;

use time::OffsetDateTime;

pub use super::decision::{
    Counts, EngineRuns, Handled, Limits, Registration, Relay, Reply, Store, WorkerSeen,
};
use super::validate::{excerpt, normalize_event_noting, Notes, Refusal};
use crate::protocol::Value;
use crate::refusal::RefusalCode;

/// The most an `ack_id` may take, as JSON: a counter or a UUID fits many
/// times over. Every reply to a message echoes its `ack_id`, so this keeps
/// replies small; a message with a longer one is refused (`bad_message`).
pub const MAX_ACK_ID_BYTES: usize = 256;
/// Longest `process`, `framework` and `worker_role` kept from a `hello`
/// (they are shown by `stats` and name the process in errors to the brain).
pub const MAX_LABEL_CHARS: usize = 256;
/// Longest worker name kept from a `hello` (the brain's worker name column
/// holds 200 characters).
pub const MAX_WORKER_NAME_BYTES: usize = 200;

impl Handled {
    /// Counts `n` refusals under `code`.
    fn refuse(&mut self, code: RefusalCode, n: u64) {
        match self.counts.refused.iter_mut().find(|(c, _)| *c == code) {
            Some((_, total)) => *total += n,
            None => self.counts.refused.push((code, n)),
        }
    }

    /// Counts one refusal and replies with its error.
    fn reject(&mut self, refusal: Refusal, ack_id: Option<&Value>, index: Option<usize>) {
        self.refuse(refusal.code, 1);
        self.replies.push(Reply::Error {
            refusal,
            ack_id: ack_id.cloned(),
            index,
        });
    }

    fn reply(mut self, v: Value) -> Self {
        self.replies.push(Reply::Message(v));
        self
    }
}

/// Decides what to do about one decoded client message received at `now`.
pub fn handle(msg: Value, limits: &Limits, now: OffsetDateTime) -> Handled {
    if let Some(size) = msg
        .get("ack_id")
        .and_then(|a| json_len_over(a, MAX_ACK_ID_BYTES))
    {
        return ack_id_too_long(&msg, size);
    }
    let ack_id = msg.get("ack_id").cloned();
    let Some(kind) = msg.get("type").and_then(Value::as_str).map(str::to_owned) else {
        return without_type(&msg, ack_id);
    };
    match kind.as_str() {
        "event" => events(vec![msg], false, ack_id, limits, now),
        "events" => batch(msg, ack_id, limits, now),
        "hello" => hello(&msg, ack_id, limits),
        "ping" => Handled::default().reply(with_ack_id(Value::empty_map(), "pong", ack_id)),
        "command_result" => Handled {
            relay: Some(Relay::CommandResult {
                message: msg,
                ack_id,
            }),
            ..Handled::default()
        },
        "stats" => Handled {
            replies: vec![Reply::Stats { ack_id }],
            ..Handled::default()
        },
        "health" => super::health::health(&msg, ack_id, now),
        other => {
            let mut h = Handled::default();
            let refusal = Refusal::new(
                RefusalCode::UnknownType,
                format!(
                    "unknown message type {}; this daemon accepts event, events, hello, health, ping, stats and command_result",
                    excerpt(other)
                ),
            );
            h.reject(refusal, ack_id.as_ref(), None);
            h
        }
    }
}

/// `{"type": kind, "ack_id": ..}` on top of `m`, the `ack_id` when there is one.
fn with_ack_id(mut m: Value, kind: &str, ack_id: Option<Value>) -> Value {
    m.insert("type", kind);
    if let Some(a) = ack_id {
        m.insert("ack_id", a);
    }
    m
}

/// A message whose `ack_id` every reply would have to echo is refused
/// whole, and nothing is echoed; each of its events counts as refused.
fn ack_id_too_long(msg: &Value, size: usize) -> Handled {
    let events = match msg.get("type").and_then(Value::as_str) {
        Some("event") => 1,
        Some("events") => msg
            .get("events")
            .and_then(Value::as_array)
            .map_or(0, <[Value]>::len),
        _ => 0,
    };
    let mut h = Handled::default();
    h.counts.events_received = events as u64;
    h.refuse(RefusalCode::BadMessage, events.max(1) as u64);
    h.replies.push(Reply::Error {
        refusal: Refusal::new(
            RefusalCode::BadMessage,
            format!(
                "the ack_id takes {size} bytes or more as JSON; it may take at most {MAX_ACK_ID_BYTES} (send a counter or a UUID). This message was not handled{}",
                if events > 0 { ": none of its events was stored" } else { "" }
            ),
        ),
        ack_id: None,
        index: None,
    });
    h
}

/// A message that is not a map, or has no string `type`.
fn without_type(msg: &Value, ack_id: Option<Value>) -> Handled {
    let what = if matches!(msg, Value::Map(_)) {
        "a message needs a string \"type\" (event, events, hello, health, ping, stats)".to_string()
    } else {
        format!("a message must be a map, got {}", msg.type_name())
    };
    let mut h = Handled::default();
    h.reject(
        Refusal::new(RefusalCode::BadMessage, what),
        ack_id.as_ref(),
        None,
    );
    h
}

/// An `events` message: its list of events, each validated on its own.
fn batch(mut msg: Value, ack_id: Option<Value>, limits: &Limits, now: OffsetDateTime) -> Handled {
    match msg.remove("events") {
        Some(Value::Array(items)) => {
            // Nothing of the decoded message is kept while the records
            // wait for the spool: only the records themselves.
            drop(msg);
            events(items, true, ack_id, limits, now)
        }
        other => {
            let mut h = Handled::default();
            let refusal = Refusal::new(
                RefusalCode::BadMessage,
                format!(
                    "\"events\" must be a list of events, got {}",
                    other.map(|v| v.type_name()).unwrap_or("nothing")
                ),
            );
            h.reject(refusal, ack_id.as_ref(), None);
            h
        }
    }
}

/// Normalises each event; the accepted ones are stored together, each
/// refused one gets its own error (with its `index` when `indexed`).
fn events(
    items: Vec<Value>,
    indexed: bool,
    ack_id: Option<Value>,
    limits: &Limits,
    now: OffsetDateTime,
) -> Handled {
    let mut h = Handled::default();
    h.counts.events_received = items.len() as u64;
    let mut records = Vec::with_capacity(items.len());
    let mut engines = EngineRuns::default();
    let mut notes = Notes::default();
    for (i, e) in items.into_iter().enumerate() {
        let worker = worker_seen(&e);
        // An accepted event has a string engine, trimmed as stored; its
        // name is copied only when it starts a new run.
        let engine = e
            .get("engine")
            .and_then(Value::as_str)
            .map_or("", str::trim);
        let new_run = (!engines.continues(engine)).then(|| engine.to_string());
        match normalize_event_noting(e, now, limits.max_event_bytes, &mut notes) {
            Ok(r) => {
                records.push(r);
                engines.record(new_run);
                h.workers.extend(worker);
            }
            Err(refusal) => h.reject(refusal, ack_id.as_ref(), indexed.then_some(i)),
        }
    }
    h.counts.time_corrected = notes.time_corrected;
    h.store = Some(Store {
        records,
        engines,
        ack_id,
    });
    h
}

/// What a `worker.*` event says about the worker it names in
/// `data.worker` (trimmed like the event's engine; names longer than
/// [`MAX_WORKER_NAME_BYTES`] are not learnt).
fn worker_seen(event: &Value) -> Option<WorkerSeen> {
    let kind = event.get("kind")?.as_str()?.trim();
    if !kind.starts_with("worker.") {
        return None;
    }
    let engine = event.get("engine")?.as_str()?.trim();
    let worker = event.get("data")?.get("worker")?.as_str()?.trim();
    if engine.is_empty() || worker.is_empty() || worker.len() > MAX_WORKER_NAME_BYTES {
        return None;
    }
    Some(WorkerSeen {
        engine: engine.to_string(),
        worker: worker.to_string(),
        online: kind != "worker.offline",
    })
}

/// Names one `hello` list may hold (`engines`, `schedulers`,
/// `runtime_features`, `workers`, `capabilities` and each of its lists):
/// the brain's limit on each list of the host's whole `hello`.
pub const MAX_HELLO_NAMES: usize = crate::clients::MAX_HELLO_LIST;

/// A `hello`: what it registers, an error for each ignored `capabilities`
/// entry and each list longer than [`MAX_HELLO_NAMES`], and a `hello_ack`
/// with the limits when it has an `ack_id`.
fn hello(msg: &Value, ack_id: Option<Value>, limits: &Limits) -> Handled {
    let mut h = Handled::default();
    let a = ack_id.as_ref();
    let capabilities = capabilities(msg.get("capabilities"), &mut h, a);
    let engine_fits = |e: &str| crate::protocol::limits::engine_name_fits(e);
    let mut engines = hello_list(msg.get("engines"), "engines", engine_fits, &mut h, a);
    let schedulers = sorted(hello_list(
        msg.get("schedulers"),
        "schedulers",
        engine_fits,
        &mut h,
        a,
    ));
    let runtime_features = hello_list(
        msg.get("runtime_features"),
        "runtime_features",
        |f| f.len() <= 64,
        &mut h,
        a,
    );
    let workers = sorted(hello_list(
        msg.get("workers"),
        "workers",
        |w| w.len() <= MAX_WORKER_NAME_BYTES,
        &mut h,
        a,
    ));
    // Capabilities keyed by a scheduler are the scheduler's, not an engine's.
    engines.extend(
        capabilities
            .keys()
            .filter(|k| schedulers.binary_search(k).is_err())
            .cloned(),
    );
    engines.sort();
    engines.dedup();
    let label = |k: &str| {
        msg.get(k)
            .and_then(Value::as_str)
            .map(|s| crate::refusal::truncate_chars(s, MAX_LABEL_CHARS).to_string())
    };
    h.register = Some(Registration {
        process: label("process"),
        framework: label("framework"),
        worker_role: label("worker_role"),
        engines,
        capabilities,
        runtime_features,
        schedulers,
        workers,
    });
    if let Some(a) = ack_id {
        let mut m = Value::empty_map();
        m.insert("type", "hello_ack");
        m.insert("ack_id", a);
        m.insert("version", env!("CARGO_PKG_VERSION"));
        m.insert("max_event_bytes", limits.max_event_bytes as u64);
        m.insert("max_message_bytes", limits.max_message_bytes as u64);
        h = h.reply(m);
    }
    h
}

/// `v` sorted, without duplicates.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// A `hello`'s `capabilities`: engine -> sorted, distinct action names.
/// An entry that is not an engine name with a list is ignored, with an error.
fn capabilities(
    v: Option<&Value>,
    h: &mut Handled,
    ack_id: Option<&Value>,
) -> BTreeMap<String, Vec<String>> {
    let mut capabilities = BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Map(entries)) => {
            if entries.len() > MAX_HELLO_NAMES {
                let refusal = Refusal::new(
                    RefusalCode::BadMessage,
                    format!(
                        "hello: capabilities has {} entries; a process may declare at most {MAX_HELLO_NAMES} (the brain's limit for the host's whole hello): those after the first {MAX_HELLO_NAMES} were ignored; declare only the engines and schedulers this process runs",
                        entries.len()
                    ),
                );
                h.reject(refusal, ack_id, None);
            }
            for (engine, actions) in entries.iter().take(MAX_HELLO_NAMES) {
                let engine = engine.trim();
                if !crate::protocol::limits::engine_name_fits(engine)
                    || !matches!(actions, Value::Array(_))
                {
                    let refusal = Refusal::new(
                        RefusalCode::BadMessage,
                        format!("hello: capabilities must map engine names (1-40 characters) to lists of action names; {} was ignored", excerpt(engine)),
                    );
                    h.reject(refusal, ack_id, None);
                    continue;
                }
                let what = format!("capabilities[{}]", excerpt(engine));
                let mut list = hello_list(Some(actions), &what, |a| a.len() <= 80, h, ack_id);
                list.sort();
                list.dedup();
                capabilities.insert(engine.to_string(), list);
            }
        }
        Some(other) => {
            let refusal = Refusal::new(
                RefusalCode::BadMessage,
                format!(
                    "hello: capabilities must be a map of engine -> list of actions, got {}",
                    other.type_name()
                ),
            );
            h.reject(refusal, ack_id, None);
        }
    }
    capabilities
}

/// The strings of `hello` list `what`, trimmed, not empty, that `fits`,
/// the first [`MAX_HELLO_NAMES`] of them; when there are more, one error
/// says how many were ignored and what to change.
fn hello_list(
    v: Option<&Value>,
    what: &str,
    fits: impl Fn(&str) -> bool,
    h: &mut Handled,
    ack_id: Option<&Value>,
) -> Vec<String> {
    let mut kept = Vec::new();
    let mut ignored = 0usize;
    let mut first_ignored = None;
    let items = v.and_then(Value::as_array).unwrap_or_default();
    for s in items.iter().filter_map(Value::as_str).map(str::trim) {
        if s.is_empty() || !fits(s) {
            continue;
        }
        if kept.len() < MAX_HELLO_NAMES {
            kept.push(s.to_string());
        } else {
            ignored += 1;
            first_ignored.get_or_insert_with(|| excerpt(s));
        }
    }
    if let Some(first) = first_ignored {
        let refusal = Refusal::new(
            RefusalCode::BadMessage,
            format!(
                "hello: {what} lists {} names; a process may declare at most {MAX_HELLO_NAMES} (the brain's limit for the host's whole hello): {ignored} were ignored, from {first} on; declare only those this process runs",
                MAX_HELLO_NAMES + ignored
            ),
        );
        h.reject(refusal, ack_id, None);
    }
    kept
}

/// An `error` reply: what the client sent wrong (`code`, `message`), and
/// which message (`ack_id`) and event (`index`) when known.
pub fn error_reply(
    code: RefusalCode,
    message: &str,
    ack_id: Option<&Value>,
    index: Option<usize>,
) -> Value {
    let mut m = Value::empty_map();
    m.insert("type", "error");
    m.insert("code", code.as_str());
    m.insert("message", message);
    if let Some(a) = ack_id {
        m.insert("ack_id", a.clone());
    }
    if let Some(i) = index {
        m.insert("index", i as u64);
    }
    m
}

/// `Some(n)` when `v` written as JSON takes more than `limit` bytes (`n`
/// is where counting stopped, past the limit); `None` when it fits. Counts
/// without writing, and stops as soon as the limit is passed. Integers
/// count their digits, floats 24 (the longest), strings their bytes plus
/// quotes (escapes not included).
pub(super) fn json_len_over(v: &Value, limit: usize) -> Option<usize> {
    fn digits(u: u64) -> usize {
        u.checked_ilog10().map_or(1, |l| l as usize + 1)
    }
    fn walk(v: &Value, total: &mut usize, limit: usize) -> bool {
        *total += match v {
            Value::Null | Value::Bool(_) => 5,
            Value::Int(i) => usize::from(*i < 0) + digits(i.unsigned_abs()),
            Value::UInt(u) => digits(*u),
            Value::Float(_) => 24,
            Value::Str(s) => s.len() + 2,
            Value::Array(items) => {
                *total += 2 + items.len();
                for i in items {
                    if !walk(i, total, limit) {
                        return false;
                    }
                }
                0
            }
            Value::Map(entries) => {
                *total += 2 + entries.len();
                for (k, i) in entries {
                    *total += k.len() + 3;
                    if *total > limit || !walk(i, total, limit) {
                        return false;
                    }
                }
                0
            }
        };
        *total <= limit
    }
    let mut total = 0;
    (!walk(v, &mut total, limit)).then_some(total)
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
