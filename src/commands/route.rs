//! Which local connections may run a command, decided from its target.
//!
//! [`candidates`] is the one place a command's target is read for
//! routing: each kind of target has its own rule, and a command no local
//! connection can take is refused here with the reason (the caller adds
//! the host and answers the brain at once). The router then picks among
//! the candidates (fewest commands in progress, then longest connected).

use super::Command;
use crate::clients::{ClientRegistry, Reachable};
use crate::protocol::Value;

/// The brain's activation of a scheduler's stream; it is sent only right
/// after a `hello`, so one that finds no process is held for a while
/// (see the router).
pub(super) const SCHEDULE_ACTIVATE: &str = "schedule.external.activate";

/// The connections that may run `cmd`, or why none may. An empty list is
/// not a refusal: the router words that case itself (nobody declared the
/// action).
pub(super) fn candidates(
    clients: &ClientRegistry,
    cmd: &Command,
) -> Result<Vec<Reachable>, String> {
    match schedule_route(cmd) {
        Some(ScheduleRoute::Engine) => schedule_fire(clients, cmd),
        Some(ScheduleRoute::AnyScheduler) => any_scheduler(clients, cmd),
        Some(ScheduleRoute::Scheduler(name)) => scheduler(clients, cmd, &name),
        Some(ScheduleRoute::Unnamed) => Err(format!(
            "command {:?} names no scheduler (target.scheduler, parameters.scheduler, or target.id with target.type \"scheduler\"), so it cannot be handed to the process that runs it",
            cmd.action
        )),
        None => Ok(clients.able(cmd.engine(), &cmd.action)),
    }
}

/// How a `schedule.*` command is routed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScheduleRoute {
    /// `schedule.fire`: the brain's own cadence runs a task, so an engine
    /// process that declared the action for the command's engine.
    Engine,
    /// `schedule.resync`: the project, not one scheduler.
    AnyScheduler,
    /// Every other `schedule.*` action: the process that declared this
    /// scheduler.
    Scheduler(String),
    /// A scheduler action that names no scheduler.
    Unnamed,
}

/// The rule for a `schedule.*` command (`None`: not one).
pub(super) fn schedule_route(cmd: &Command) -> Option<ScheduleRoute> {
    match cmd.action.as_str() {
        "schedule.fire" => Some(ScheduleRoute::Engine),
        "schedule.resync" => Some(ScheduleRoute::AnyScheduler),
        a if a.starts_with("schedule.") => Some(
            scheduler_name(cmd)
                .map(ScheduleRoute::Scheduler)
                .unwrap_or(ScheduleRoute::Unnamed),
        ),
        _ => None,
    }
}

/// The scheduler a command is for: `target.scheduler`, else
/// `parameters.scheduler`, else `target.id` when `target.type` is
/// `"scheduler"`.
pub(super) fn scheduler_name(cmd: &Command) -> Option<String> {
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    text(cmd.target.get("scheduler"))
        .or_else(|| text(cmd.parameters.get("scheduler")))
        .or_else(|| {
            (cmd.target.get("type").and_then(Value::as_str) == Some("scheduler"))
                .then(|| text(cmd.target.get("id")))
                .flatten()
        })
}

/// `schedule.fire`: a process that declared the action for the engine.
fn schedule_fire(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    match cmd.engine() {
        Some(engine) => Ok(clients.able(Some(engine), &cmd.action)),
        None => Err(format!(
            "command {:?} names no engine (target.engine or parameters.engine), so no engine process can be chosen to run the task",
            cmd.action
        )),
    }
}

/// `schedule.resync`: a process that declared a scheduler. The action
/// need not be in its capabilities: z4j's schedulers answer it without
/// declaring it.
fn any_scheduler(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    let found = clients.scheduler_processes();
    if found.is_empty() {
        return Err(format!(
            "no connected local process declared a scheduler (hello `schedulers`), so none can run {:?}; start the scheduler process",
            cmd.action
        ));
    }
    Ok(found)
}

/// The process that declared scheduler `name`. The action need not be in
/// its capabilities: the brain checked those before sending, and some
/// (`schedule.external.activate`) are never capability names.
fn scheduler(
    clients: &ClientRegistry,
    cmd: &Command,
    name: &str,
) -> Result<Vec<Reachable>, String> {
    match clients.scheduler_holder(name) {
        Some(holder) => Ok(vec![holder]),
        None => Err(format!(
            "no connected local process declared scheduler {:?} (hello `schedulers`), so {:?} cannot run; start that scheduler's process",
            name, cmd.action
        )),
    }
}
