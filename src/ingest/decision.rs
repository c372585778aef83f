//! What [`super::handler::handle`] decides about one message: the value
//! the connection loop (or any other way in) applies.
//!
//! Invariants: a decision holds no handle to live state (no socket, queue,
//! spool or counter), only values; what needs live state is named, for the
//! caller to complete ([`Reply::Stats`], [`Relay::CommandResult`]).

use super::handler::error_reply;
use super::validate::Refusal;
use crate::protocol::Value;
use crate::refusal::RefusalCode;

/// The limits a message is handled under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single event, canonical bytes.
    pub max_event_bytes: usize,
    /// Largest message; only announced in `hello_ack` (the decoder enforces it).
    pub max_message_bytes: usize,
}

/// What to do about one message.
#[derive(Debug, Default, PartialEq)]
pub struct Handled {
    /// Counters to add, before anything is sent.
    pub counts: Counts,
    /// What a `hello` registers for this connection.
    pub register: Option<Registration>,
    /// Replies to send now, in order.
    pub replies: Vec<Reply>,
    /// A command result for the router; its reply follows the router's answer.
    pub relay: Option<Relay>,
    /// Records for the spool (`event` and `events`), acknowledged once committed.
    pub store: Option<Store>,
    /// Workers the accepted `worker.*` events say this connection hosts
    /// (or, `worker.offline`, no longer hosts), in order.
    pub workers: Vec<WorkerSeen>,
    /// What a `health` message reports (its valid parts), replacing this
    /// connection's earlier report.
    pub health: Option<HealthUpdate>,
}

/// A `worker.*` event's `data.worker`, for the client registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSeen {
    /// The event's engine.
    pub engine: String,
    /// `data.worker`.
    pub worker: String,
    /// `false` for `worker.offline`.
    pub online: bool,
}

/// Counters one message adds.
#[derive(Debug, Default, PartialEq)]
pub struct Counts {
    /// Events decoded (valid or not).
    pub events_received: u64,
    /// Refused events or messages, by code.
    pub refused: Vec<(RefusalCode, u64)>,
    /// Events whose `occurred_at` was replaced by the receive time.
    pub time_corrected: u64,
    /// `health` messages received (valid or not).
    pub health_received: u64,
    /// `health` messages refused whole (nothing of them kept).
    pub health_refused: u64,
}

/// One reply to the client.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// A reply complete as it is (`pong`, `hello_ack`).
    Message(Value),
    /// An `error` reply.
    Error {
        /// The code and the message saying what to change.
        refusal: Refusal,
        /// The message's `ack_id`, echoed.
        ack_id: Option<Value>,
        /// Which event of an `events` message.
        index: Option<usize>,
    },
    /// A `stats` report: the loop renders the live counters, then adds the `ack_id`.
    Stats {
        /// The message's `ack_id`, echoed.
        ack_id: Option<Value>,
    },
}

impl Reply {
    /// The reply as sent, or `None` for a [`Reply::Stats`] (live counters).
    pub fn to_value(&self) -> Option<Value> {
        match self {
            Reply::Message(v) => Some(v.clone()),
            Reply::Error {
                refusal,
                ack_id,
                index,
            } => Some(error_reply(
                refusal.code,
                &refusal.message,
                ack_id.as_ref(),
                *index,
            )),
            Reply::Stats { .. } => None,
        }
    }
}

/// What a `hello` declares: the client registry's own type, so the
/// handler's decision is what the registry stores.
pub use crate::clients::Registration;

/// What a `health` message reports: the client registry's own type.
pub use crate::clients::HealthUpdate;

/// A message the daemon passes on rather than answers itself.
#[derive(Debug, PartialEq)]
pub enum Relay {
    /// A `command_result`: the router matches it to a running command.
    /// On success the client gets an `ack` (when it sent an `ack_id`),
    /// otherwise an `error` with the router's code, counted.
    CommandResult {
        /// The whole message.
        message: Value,
        /// Its `ack_id`.
        ack_id: Option<Value>,
    },
}

/// Canonical records to append to the spool.
#[derive(Debug, PartialEq)]
pub struct Store {
    /// One canonical record per accepted event, in order (may be empty).
    pub records: Vec<Vec<u8>>,
    /// Each record's `engine`, in order, as runs of (engine, count): what a
    /// `drop_newest` refusal of the tail is counted under.
    pub engines: EngineRuns,
    /// Acknowledged with the count stored once committed (even when none was).
    pub ack_id: Option<Value>,
}

/// The engines of a list of records, in order, as runs of (engine, count).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EngineRuns(Vec<(String, usize)>);

impl EngineRuns {
    /// Whether one more record of `engine` continues the last run (then
    /// [`EngineRuns::record`] needs no copy of the name).
    pub fn continues(&self, engine: &str) -> bool {
        self.0.last().is_some_and(|(e, _)| e == engine)
    }

    /// One more record: of the last run's engine (`None`, when
    /// [`EngineRuns::continues`] said so), or of a new run's.
    pub fn record(&mut self, new_run: Option<String>) {
        match (new_run, self.0.last_mut()) {
            (None, Some((_, n))) => *n += 1,
            (Some(e), _) => self.0.push((e, 1)),
            (None, None) => self.0.push((String::new(), 1)),
        }
    }

    /// The engines of the last `n` records, with how many of each, in
    /// order; records this does not cover are left out.
    pub fn last(&self, mut n: usize) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        for (e, k) in self.0.iter().rev() {
            if n == 0 {
                break;
            }
            let take = (*k).min(n);
            out.push((e.as_str(), take));
            n -= take;
        }
        out.reverse();
        out
    }
}
