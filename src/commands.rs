//! Commands from the brain, routed to the local process that can run them.
//!
//! The brain sends every command for this agent to the daemon's one
//! connection; the [`Router`] hands each to one live local connection that
//! declared the command's engine and action in its `hello`, relays that
//! process's `command_result`, and guarantees an answer: when no process
//! can run it, when the process disconnects, or when it does not answer
//! within the command's `timeout_seconds` minus a margin, the brain gets a
//! `failed` result that says why, instead of waiting for its own timeout.
//!
//! Who is connected and what each declared is read from the client
//! registry ([`crate::clients`], held by [`Stats`]); the router keeps only
//! its own state: the commands in progress per connection and the ids seen.
//!
//! Routing policy: among the connections that declared the engine (the
//! command's `target.engine`, else `parameters.engine`) with the action,
//! the one with the fewest commands in progress; on a tie, the one
//! connected longest. A command without an engine goes to any connection
//! that declared the action. `schedule.*` commands follow the scheduler
//! rules of [`route`]; worker-, queue- and some task-targeted commands are
//! narrowed by their target first (`route`: the worker's host, the queue's
//! engine once `purge_queue`'s token is checked by `purge`). Delivery is
//! at most once per command id:
//! re-deliveries (same id within [`SEEN_FOR`]) are acknowledged again and
//! answered with the result already known, never run twice; every answer
//! echoes the `delivery_claim_token` of the latest delivery.
//!
//! A `schedule.external.activate` for a scheduler no connection declared
//! (yet) is held, not refused: the brain sends it only right after the
//! daemon's `hello`, which may list a scheduler whose process is still
//! reconnecting. It is handed to the first connection that declares that
//! scheduler ([`Router::hand_over_held`]) within the command's local
//! budget, else answered `failed` with the reason.
//!
//! The local contract is documented in `docs/local-protocol.md`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::clients::Reachable;
use crate::protocol::{SigningKey, Value};
use crate::refusal::excerpt;
use crate::stats::Stats;

/// How long a command id is remembered for de-duplication.
pub const SEEN_FOR: Duration = Duration::from_secs(300);
/// At most this many command ids are remembered (oldest forgotten first).
pub const SEEN_MAX: usize = 10_000;
/// The brain's limit on `command_result.error`.
pub const MAX_ERROR_CHARS: usize = 8192;
/// Largest `result` relayed (the whole frame must fit the brain's 1 MiB).
pub const MAX_RESULT_BYTES: usize = 512 * 1024;
/// Commands without `timeout_seconds` get the brain's default.
const DEFAULT_TIMEOUT_SECONDS: u64 = 60;

/// A command as the brain sent it.
#[derive(Debug, Clone)]
pub struct Command {
    /// The command's UUID (the frame id).
    pub id: String,
    /// `payload.action`.
    pub action: String,
    /// `payload.target`.
    pub target: Value,
    /// `payload.parameters`.
    pub parameters: Value,
    /// `payload.timeout_seconds`.
    pub timeout_seconds: u64,
    /// `payload.delivery_claim_token`, echoed back.
    pub claim: Value,
}

impl Command {
    /// Reads a verified `command` frame's payload.
    pub fn from_payload(id: &str, p: &Value) -> Command {
        Command {
            id: id.to_string(),
            action: p
                .get("action")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            target: p.get("target").cloned().unwrap_or(Value::Null),
            parameters: p.get("parameters").cloned().unwrap_or(Value::Null),
            timeout_seconds: p
                .get("timeout_seconds")
                .and_then(Value::as_u64)
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_TIMEOUT_SECONDS),
            claim: p
                .get("delivery_claim_token")
                .cloned()
                .unwrap_or(Value::Null),
        }
    }

    /// The engine the command is for, if it names one.
    pub fn engine(&self) -> Option<&str> {
        self.target
            .get("engine")
            .and_then(Value::as_str)
            .or_else(|| self.parameters.get("engine").and_then(Value::as_str))
            .or_else(|| {
                self.parameters
                    .get("filter")
                    .and_then(|f| f.get("engine"))
                    .and_then(Value::as_str)
            })
            .filter(|e| !e.is_empty())
    }

    /// How long the local process gets: the brain's timeout minus a margin
    /// (a tenth, between 2 and 10 s) so the `failed` answer arrives first.
    pub fn local_budget(&self) -> Duration {
        let total = Duration::from_secs(self.timeout_seconds);
        let margin = (total / 10).clamp(Duration::from_secs(2), Duration::from_secs(10));
        total.saturating_sub(margin).max(Duration::from_millis(500))
    }
}

/// The answer relayed to the brain as `command_result`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResult {
    /// The command id.
    pub id: String,
    /// `true` for `success`, `false` for `failed`.
    pub success: bool,
    /// An object or null.
    pub result: Value,
    /// Why it failed (at most [`MAX_ERROR_CHARS`]).
    pub error: Option<String>,
    /// The delivery claim token, echoed.
    pub claim: Value,
}

impl CommandResult {
    fn failed(cmd_id: &str, claim: &Value, error: String) -> CommandResult {
        CommandResult {
            id: cmd_id.to_string(),
            success: false,
            result: Value::Null,
            error: Some(truncate(error, MAX_ERROR_CHARS)),
            claim: claim.clone(),
        }
    }

    /// The `command_result` payload.
    pub fn payload(&self) -> Value {
        let mut p = Value::empty_map();
        p.insert("status", if self.success { "success" } else { "failed" });
        p.insert("result", self.result.clone());
        p.insert(
            "error",
            self.error.clone().map(Value::from).unwrap_or(Value::Null),
        );
        p.insert("delivery_claim_token", self.claim.clone());
        p
    }
}

fn truncate(mut s: String, max_chars: usize) -> String {
    let keep = crate::refusal::truncate_chars(&s, max_chars).len();
    s.truncate(keep);
    s
}

struct Running {
    conn: u64,
    claim: Value,
    who: String,
}

/// An activation waiting for its scheduler's process.
struct Held {
    cmd: Command,
    scheduler: String,
    host: String,
    /// When its local budget runs out.
    until: Instant,
}

enum Seen {
    Running,
    Done(CommandResult),
}

#[derive(Default)]
struct Inner {
    /// Connection id -> commands it is running (absent: none).
    in_progress: BTreeMap<u64, usize>,
    running: HashMap<String, Running>,
    /// Activations waiting for a process to declare their scheduler.
    held: Vec<Held>,
    /// Scheduler -> the connection its latest activation was handed to.
    activated: BTreeMap<String, u64>,
    /// Command id -> when it was last recorded, and its state.
    seen: HashMap<String, (Instant, Seen)>,
    /// Ids in the order they were recorded (an id may appear again later;
    /// only its latest entry counts).
    seen_order: VecDeque<(Instant, String)>,
}

impl Inner {
    fn remember(&mut self, id: &str, state: Seen, now: Instant) {
        self.seen.insert(id.to_string(), (now, state));
        self.seen_order.push_back((now, id.to_string()));
        while let Some((at, old)) = self.seen_order.front() {
            if now.duration_since(*at) <= SEEN_FOR && self.seen.len() <= SEEN_MAX {
                break;
            }
            let (at, old) = (*at, old.clone());
            self.seen_order.pop_front();
            // Forget only the latest record of a command that is neither
            // running nor held.
            let latest = self.seen.get(&old).is_some_and(|(t, _)| *t == at);
            let held = self.held.iter().any(|h| h.cmd.id == old);
            if latest && !self.running.contains_key(&old) && !held {
                self.seen.remove(&old);
            }
        }
    }

    /// Connection `conn` is running one command less.
    fn finished_one(&mut self, conn: u64) {
        if let Some(n) = self.in_progress.get_mut(&conn) {
            *n = n.saturating_sub(1);
        }
    }

    fn seen(&self, id: &str) -> Option<&Seen> {
        self.seen.get(id).map(|(_, s)| s)
    }
}

/// What [`Router::dispatch`] did with a command.
#[derive(Debug, PartialEq)]
pub enum Dispatch {
    /// Handed to a local process; its result will arrive on the results channel.
    Started {
        /// Who runs it.
        who: String,
    },
    /// Nobody can run it: answer at once with this.
    Failed(CommandResult),
    /// Seen before and still running: only re-acknowledge.
    DuplicateRunning,
    /// Seen before and answered: re-acknowledge and send this again.
    DuplicateDone(CommandResult),
    /// An activation for a scheduler no process declared yet: kept for
    /// the first one that does, within the command's local budget.
    Held {
        /// The scheduler waited for.
        scheduler: String,
    },
}

/// Where the router reads the project key (the one that signs frames) for
/// `purge_queue`'s confirmation: the daemon's current settings.
pub type KeySource = Box<dyn Fn() -> SigningKey + Send + Sync>;

/// Routes commands to local connections and results back to the uplink.
pub struct Router {
    inner: Mutex<Inner>,
    results: mpsc::UnboundedSender<CommandResult>,
    stats: Arc<Stats>,
    /// `None`: no key, every `purge_queue` is refused (tests only).
    key: Option<KeySource>,
}

/// Local answers on their way to the brain.
pub type Results = mpsc::UnboundedReceiver<CommandResult>;

/// What a client's `command_result` message was refused for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRefusal {
    /// Error code for the client.
    pub code: crate::refusal::RefusalCode,
    /// What to change.
    pub message: String,
}

impl Router {
    /// A router and the receiving end of its results, for the uplink.
    pub fn new(stats: Arc<Stats>) -> (Arc<Router>, Results) {
        Router::build(stats, None)
    }

    /// A router that checks `purge_queue`'s confirm token under the key
    /// `key` returns at the time of each purge.
    pub fn with_key(
        stats: Arc<Stats>,
        key: impl Fn() -> SigningKey + Send + Sync + 'static,
    ) -> (Arc<Router>, Results) {
        Router::build(stats, Some(Box::new(key)))
    }

    fn build(stats: Arc<Stats>, key: Option<KeySource>) -> (Arc<Router>, Results) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Router {
                inner: Mutex::new(Inner::default()),
                results: tx,
                stats,
                key,
            }),
            rx,
        )
    }

    /// The daemon is stopping: every command still running fails now (with
    /// that reason), so the uplink can answer the brain before it closes.
    pub fn shutting_down(&self, host: &str) {
        self.fail_running(
            |_| true,
            |who| format!("z4j-agentd on {host} is shutting down; {who} had not answered yet"),
            "command failed: the daemon is shutting down",
        );
        self.fail_held(|scheduler| {
            format!(
                "z4j-agentd on {host} is shutting down; no local process had declared scheduler {scheduler:?} (hello `schedulers`) to take the brain's activation"
            )
        });
    }

    /// The connection is gone: every command it was running fails now.
    pub fn disconnected(&self, conn: u64) {
        self.inner.lock().unwrap().in_progress.remove(&conn);
        self.fail_running(
            |r| r.conn == conn,
            |who| format!("{who} disconnected from z4j-agentd before answering the command"),
            "command failed: the process running it disconnected",
        );
    }

    /// Fails the running commands `which` selects, each with `why(who ran it)`.
    fn fail_running(
        &self,
        which: impl Fn(&Running) -> bool,
        why: impl Fn(&str) -> String,
        log: &str,
    ) {
        let failed: Vec<CommandResult> = {
            let mut inner = self.inner.lock().unwrap();
            let ids: Vec<String> = inner
                .running
                .iter()
                .filter(|(_, r)| which(r))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let r = inner.running.remove(&id)?;
                    let res = CommandResult::failed(&id, &r.claim, why(&r.who));
                    inner.remember(&id, Seen::Done(res.clone()), Instant::now());
                    Some(res)
                })
                .collect()
        };
        for r in failed {
            tracing::warn!(command_id = %r.id, "{log}");
            self.finish(r);
        }
    }

    fn finish(&self, r: CommandResult) {
        self.stats.command_finished(r.success);
        let _ = self.results.send(r);
    }

    /// Takes a command from the brain. `host` names this host in errors.
    pub fn dispatch(self: &Arc<Self>, cmd: &Command, host: &str) -> Dispatch {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        // A re-delivery carries its own claim token: the answer echoes the
        // latest one, not the one the command first came with.
        match inner.seen(&cmd.id) {
            Some(Seen::Running) => {
                if let Some(r) = inner.running.get_mut(&cmd.id) {
                    r.claim = cmd.claim.clone();
                }
                if let Some(h) = inner.held.iter_mut().find(|h| h.cmd.id == cmd.id) {
                    h.cmd.claim = cmd.claim.clone();
                }
                return Dispatch::DuplicateRunning;
            }
            Some(Seen::Done(r)) => {
                return Dispatch::DuplicateDone(CommandResult {
                    claim: cmd.claim.clone(),
                    ..r.clone()
                })
            }
            None => {}
        }
        self.stats.command_received();
        if cmd.action == route::SCHEDULE_ACTIVATE {
            if let Some(scheduler) = route::scheduler_name(cmd) {
                if self.stats.clients.scheduler_holder(&scheduler).is_none() {
                    return self.hold(inner, cmd, scheduler, host, now);
                }
            }
        }
        let key = self.key.as_ref().map(|k| k());
        let prepared = match route::prepare(&self.stats.clients, cmd, key.as_ref()) {
            Ok(p) => p,
            Err(why) => {
                return self.refuse(inner, cmd, format!("z4j-agentd on {host}: {why}"), now)
            }
        };
        drop(key);
        let forced = prepared.as_ref().is_some_and(|p| p.forced);
        let cmd = prepared.as_ref().map_or(cmd, |p| &p.command);
        let engine = cmd.engine();
        let mut candidates = match route::candidates(&self.stats.clients, cmd) {
            Ok(c) => c,
            Err(why) => {
                return self.refuse(inner, cmd, format!("z4j-agentd on {host}: {why}"), now)
            }
        };
        candidates.sort_by_key(|c| {
            let running = inner.in_progress.get(&c.id).copied().unwrap_or(0);
            (running, c.since, c.id)
        });
        let budget = cmd.local_budget();
        let msg = local_command(cmd, budget);
        let mut full = Vec::new();
        for c in candidates {
            match self.start(&mut inner, cmd, c, &msg, budget, now) {
                Ok(who) => {
                    if forced {
                        self.forced_purge_passed_on(cmd);
                    }
                    return Dispatch::Started { who };
                }
                Err(who) => full.push(who),
            }
        }
        let error = nobody_runs(cmd, engine, host, &full);
        self.refuse(inner, cmd, error, now)
    }

    /// A purge the brain's admin sent with `force` went to a process
    /// without the confirm-token check: logged loudly and counted.
    fn forced_purge_passed_on(&self, cmd: &Command) {
        self.stats.purge_forced();
        let queue = cmd
            .parameters
            .get("queue")
            .and_then(Value::as_str)
            .unwrap_or("?");
        tracing::error!(
            command_id = %cmd.id,
            queue,
            "purge_queue with force: passed on without a confirm_token check, as the brain's admin asked"
        );
    }

    /// Nobody may run `cmd`: it fails at once with `error`, remembered for
    /// re-deliveries.
    fn refuse(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        cmd: &Command,
        error: String,
        now: Instant,
    ) -> Dispatch {
        let r = CommandResult::failed(&cmd.id, &cmd.claim, error);
        inner.remember(&cmd.id, Seen::Done(r.clone()), now);
        drop(inner);
        self.stats.command_finished(false);
        Dispatch::Failed(r)
    }

    /// Hands `cmd` to `c` (`Err(who)` when its queue is full) and starts
    /// the clock of its local `budget`.
    fn start(
        self: &Arc<Self>,
        inner: &mut Inner,
        cmd: &Command,
        c: Reachable,
        msg: &Value,
        budget: Duration,
        now: Instant,
    ) -> Result<String, String> {
        if !c.outbox.offer(msg) {
            return Err(c.who);
        }
        *inner.in_progress.entry(c.id).or_default() += 1;
        inner.running.insert(
            cmd.id.clone(),
            Running {
                conn: c.id,
                claim: cmd.claim.clone(),
                who: c.who.clone(),
            },
        );
        inner.remember(&cmd.id, Seen::Running, now);
        if cmd.action == route::SCHEDULE_ACTIVATE {
            if let Some(scheduler) = route::scheduler_name(cmd) {
                inner.activated.insert(scheduler, c.id);
            }
        }
        let router = Arc::clone(self);
        let id = cmd.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(budget).await;
            router.expire(&id, budget);
        });
        Ok(c.who)
    }

    /// The local budget ran out.
    fn expire(&self, id: &str, budget: Duration) {
        let r = {
            let mut inner = self.inner.lock().unwrap();
            let Some(run) = inner.running.remove(id) else {
                return;
            };
            inner.finished_one(run.conn);
            let r = CommandResult::failed(
                id,
                &run.claim,
                format!(
                    "{} did not answer within {:.0} s (the command's timeout minus a margin)",
                    run.who,
                    budget.as_secs_f64()
                ),
            );
            inner.remember(id, Seen::Done(r.clone()), Instant::now());
            r
        };
        tracing::warn!(command_id = %id, "command failed: no answer in time");
        self.finish(r);
    }

    /// A `command_result` message from connection `conn`.
    pub fn on_result(&self, conn: u64, msg: &Value) -> Result<(), ResultRefusal> {
        let Some(id) = msg.get("id").and_then(Value::as_str) else {
            return Err(ResultRefusal {
                code: crate::refusal::RefusalCode::BadCommandResult,
                message: "a command_result needs the command's \"id\"".into(),
            });
        };
        let parsed = parse_answer(id, msg);
        let r = {
            let mut inner = self.inner.lock().unwrap();
            let Some(run) = inner.running.get(id) else {
                return Err(ResultRefusal {
                    code: crate::refusal::RefusalCode::UnknownCommand,
                    message: format!(
                        "no command {} is waiting for an answer (it was answered, timed out, or never sent here)",
                        excerpt(id)
                    ),
                });
            };
            if run.conn != conn {
                return Err(ResultRefusal {
                    code: crate::refusal::RefusalCode::UnknownCommand,
                    message: format!("command {} was sent to another connection", excerpt(id)),
                });
            }
            let run = inner.running.remove(id).expect("present");
            inner.finished_one(conn);
            let r = match &parsed {
                Ok((success, result, error)) => CommandResult {
                    id: id.to_string(),
                    success: *success,
                    result: result.clone(),
                    error: error.clone(),
                    claim: run.claim.clone(),
                },
                Err(why) => CommandResult::failed(
                    id,
                    &run.claim,
                    format!(
                        "{} answered with a malformed command_result: {why}",
                        run.who
                    ),
                ),
            };
            inner.remember(id, Seen::Done(r.clone()), Instant::now());
            r
        };
        self.finish(r);
        parsed.map(|_| ()).map_err(|why| ResultRefusal {
            code: crate::refusal::RefusalCode::BadCommandResult,
            message: format!("{why}; the brain was told the command failed"),
        })
    }
}

/// The `command` message a local process receives.
fn local_command(cmd: &Command, budget: Duration) -> Value {
    let mut msg = Value::empty_map();
    msg.insert("type", "command");
    msg.insert("id", cmd.id.as_str());
    msg.insert("action", cmd.action.as_str());
    msg.insert("target", cmd.target.clone());
    msg.insert("parameters", cmd.parameters.clone());
    msg.insert("timeout_seconds", budget.as_secs_f64());
    msg
}

/// Why no connected process took `cmd`: nobody declared it, or those who
/// did (`full`) are not reading their connection.
fn nobody_runs(cmd: &Command, engine: Option<&str>, host: &str, full: &[String]) -> String {
    let engine_text = engine
        .map(|e| format!("engine {e:?}"))
        .unwrap_or_else(|| "any engine".into());
    if full.is_empty() {
        format!(
            "z4j-agentd on {host}: no connected local process runs action {:?} for {engine_text}; start a worker that registers it (hello with capabilities). The brain hands each command to one connection of the agent: if several daemons share this agent's token, the worker may be behind another one; give each host its own agent token",
            cmd.action
        )
    } else {
        format!(
            "z4j-agentd on {host}: the local processes that run action {:?} for {engine_text} are not reading their connection ({})",
            cmd.action,
            full.join(", ")
        )
    }
}

/// Validates a client's answer: `(success, result, error)`.
fn parse_answer(_id: &str, msg: &Value) -> Result<(bool, Value, Option<String>), String> {
    let success = match msg.get("status").and_then(Value::as_str) {
        Some("success") => true,
        Some("failed") => false,
        Some(other) => {
            return Err(format!(
                "\"status\" must be \"success\" or \"failed\", got {}",
                excerpt(other)
            ))
        }
        None => return Err("\"status\" (\"success\" or \"failed\") is required".into()),
    };
    let result = match msg.get("result") {
        None | Some(Value::Null) => Value::Null,
        Some(v @ Value::Map(_)) => {
            let size = crate::protocol::canonical::to_vec(v)
                .map(|b| b.len())
                .unwrap_or(usize::MAX);
            if size > MAX_RESULT_BYTES {
                return Err(format!(
                    "\"result\" is {size} bytes; at most {MAX_RESULT_BYTES} fit in a frame to the brain"
                ));
            }
            v.clone()
        }
        Some(other) => {
            return Err(format!(
                "\"result\" must be a map or null, got {}",
                other.type_name()
            ))
        }
    };
    let error = match msg.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::Str(s)) => Some(truncate(s.clone(), MAX_ERROR_CHARS)),
        Some(other) => {
            return Err(format!(
                "\"error\" must be a string or null, got {}",
                other.type_name()
            ))
        }
    };
    Ok((success, result, error))
}

mod held;
pub mod purge;
mod route;

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod schedule_tests;

#[cfg(test)]
mod route_tests;
