//! Which local connections may run a command, decided from its target.
//!
//! [`candidates`] is the one place a command's target is read for
//! routing: each kind of target has its own rule, and a command no local
//! connection can take is refused here with the reason (the caller adds
//! the host and answers the brain at once). The router then picks among
//! the candidates (fewest commands in progress, then longest connected).

use std::collections::BTreeSet;

use super::Command;
use crate::clients::{ClientInfo, ClientRegistry, Reachable};
use crate::protocol::{SigningKey, Value};

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
        None => by_target(clients, cmd),
    }
}

/// The rules for commands that are not `schedule.*`.
fn by_target(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    match cmd.action.as_str() {
        a if WORKER_ACTIONS.contains(&a) => by_worker(clients, cmd),
        "rate_limit" => rate_limit(clients, cmd),
        "reconcile_task" => reconcile(clients, cmd),
        "cancel_task" => by_engine(clients, cmd).map(|able| running_first(clients, cmd, able)),
        // purge_queue reaches here confirmed, with the queue's engine in
        // its target (super::purge).
        "purge_queue" => purge_queue(clients, cmd),
        _ => by_engine(clients, cmd),
    }
}

/// By the command's engine (any engine without one): a connection that
/// declared the action; when none did but the action is still advertised
/// from before a restart, why it cannot run yet.
fn by_engine(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    let able = clients.able(cmd.engine(), &cmd.action);
    if able.is_empty() {
        if let Some(why) = not_back_yet(clients, cmd) {
            return Err(why);
        }
    }
    Ok(able)
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
        None => Err(not_back_yet(clients, cmd).unwrap_or_else(|| format!(
            "no connected local process declared scheduler {:?} (hello `schedulers`), so {:?} cannot run; start that scheduler's process",
            name, cmd.action
        ))),
    }
}

/// `purge_queue`, confirmed (its engine, queue and checked depth set): a
/// connection that declared it for the queue's engine AND whose health
/// report names the queue, the ones that reported the depth the token was
/// checked against first. A process that does not report the queue may not
/// reach its broker (two apps on one host, each with its own broker, may
/// both have a queue `default`), so it never gets the purge.
fn purge_queue(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    let able = by_engine(clients, cmd)?;
    let (Some(engine), Some(queue)) = (
        cmd.engine(),
        cmd.parameters.get("queue").and_then(Value::as_str),
    ) else {
        return Ok(able);
    };
    if able.is_empty() {
        return Ok(able); // the router's own refusal: nobody runs the action
    }
    let reporters = clients.queue_reporters(engine, queue);
    let expected = cmd.parameters.get("expected_depth").and_then(Value::as_u64);
    let pick = |exact: bool| -> Vec<Reachable> {
        able.iter()
            .filter(|r| {
                reporters.iter().any(|(id, depth)| {
                    *id == r.id && (!exact || (depth.is_some() && *depth == expected))
                })
            })
            .cloned()
            .collect()
    };
    let exact = pick(true);
    if !exact.is_empty() {
        return Ok(exact);
    }
    let reporting = pick(false);
    if !reporting.is_empty() {
        return Ok(reporting);
    }
    let who: Vec<&str> = able.iter().map(|r| r.who.as_str()).collect();
    Err(format!(
        "purge_queue for queue {queue:?} (engine {engine:?}): the local processes that declared purge_queue ({}) do not report this queue in their health reports, so they may not reach the broker that holds it; the process that reports the queue must declare purge_queue",
        who.join(", ")
    ))
}

/// What must hold before `cmd` is routed, and the command as the process
/// gets it when that differs from what the brain sent: `purge_queue` is
/// confirmed here ([`super::purge`]). `Ok(None)`: route `cmd` as it is.
pub(super) fn prepare(
    clients: &ClientRegistry,
    cmd: &Command,
    key: Option<&SigningKey>,
) -> Result<Option<super::purge::Confirmed>, String> {
    match cmd.action.as_str() {
        "purge_queue" => super::purge::confirm(clients, cmd, key).map(Some),
        _ => Ok(None),
    }
}

/// The worker-targeted actions: they go to the connection hosting the
/// worker they name.
pub(super) const WORKER_ACTIONS: &[&str] = &[
    "restart_worker",
    "pool_grow",
    "pool_shrink",
    "add_consumer",
    "cancel_consumer",
];

/// The worker a command names: `parameters.worker_name`, else the target's
/// `id` when the target is a worker.
fn worker_name(cmd: &Command) -> Option<&str> {
    let named = cmd
        .parameters
        .get("worker_name")
        .and_then(Value::as_str)
        .filter(|w| !w.is_empty());
    named.or_else(|| {
        (cmd.target.get("type").and_then(Value::as_str) == Some("worker"))
            .then(|| cmd.target.get("id").and_then(Value::as_str))
            .flatten()
            .filter(|w| !w.is_empty())
    })
}

fn engine_text(engine: Option<&str>) -> String {
    engine
        .map(|e| format!("engine {e:?}"))
        .unwrap_or_else(|| "any engine".into())
}

/// Nobody here hosts the worker.
fn no_host(worker: &str, engine: Option<&str>) -> String {
    format!(
        "no connected local process hosts worker {worker:?} for {}; a process names the workers it hosts in its hello (\"workers\"), in worker.* events (data.worker) or in its health report. The brain hands each command to one connection of the agent: if several daemons share this agent's token, the worker may be behind another one; give each host its own agent token",
        engine_text(engine)
    )
}

/// The worker's hosts did not declare the action.
fn host_lacks_action(
    hosts: &[ClientInfo],
    worker: &str,
    engine: Option<&str>,
    action: &str,
) -> String {
    let who: Vec<String> = hosts.iter().map(ClientInfo::describe).collect();
    format!(
        "worker {worker:?} ({}) is hosted by {}, which did not declare action {action:?} for it in its hello capabilities",
        engine_text(engine),
        who.join(", ")
    )
}

/// `restart_worker`, `pool_grow`, `pool_shrink`, `add_consumer`,
/// `cancel_consumer`: the connections hosting the named worker for the
/// command's engine that declared the action for that engine.
pub(super) fn by_worker(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    let action = cmd.action.as_str();
    let Some(worker) = worker_name(cmd) else {
        return Err(format!(
            "{action:?} names no worker: parameters.worker_name (or the id of a worker target) is required"
        ));
    };
    let engine = cmd.engine();
    let hosts: Vec<ClientInfo> = clients
        .list()
        .into_iter()
        .filter(|c| c.hosts(engine, worker))
        .collect();
    if hosts.is_empty() {
        return Err(no_host(worker, engine));
    }
    let able = clients.reachable_where(|c| {
        c.hosts(engine, worker)
            && match engine {
                Some(e) => c.runs(Some(e), action),
                None => c
                    .worker_engines(worker)
                    .iter()
                    .any(|e| c.runs(Some(e), action)),
            }
    });
    if able.is_empty() {
        return Err(host_lacks_action(&hosts, worker, engine, action));
    }
    Ok(able)
}

/// `rate_limit` (a task target, no engine): with `parameters.worker_name`,
/// the connections hosting that worker that declared `rate_limit` for an
/// engine they host it for; without one, the connections that declared
/// `rate_limit`, as long as they all run one engine. When they run
/// several, the engine whose health reports list the task among a worker's
/// `registered` tasks decides; if none or several do, the command is
/// refused (the brain names no engine, and applying a rate to the wrong
/// engine's task would be silent).
pub(super) fn rate_limit(
    clients: &ClientRegistry,
    cmd: &Command,
) -> Result<Vec<Reachable>, String> {
    const ACTION: &str = "rate_limit";
    let named = cmd
        .parameters
        .get("worker_name")
        .and_then(Value::as_str)
        .filter(|w| !w.is_empty());
    if let Some(worker) = named {
        let hosts: Vec<ClientInfo> = clients
            .list()
            .into_iter()
            .filter(|c| c.hosts(None, worker))
            .collect();
        if hosts.is_empty() {
            return Err(no_host(worker, None));
        }
        let able = clients.reachable_where(|c| {
            c.worker_engines(worker)
                .iter()
                .any(|e| c.runs(Some(e), ACTION))
        });
        if able.is_empty() {
            return Err(host_lacks_action(&hosts, worker, None, ACTION));
        }
        return Ok(able);
    }
    let all = clients.list();
    let engines: BTreeSet<&String> = all
        .iter()
        .flat_map(|c| {
            c.capabilities
                .iter()
                .filter(|(_, actions)| actions.iter().any(|a| a == ACTION))
                .map(|(e, _)| e)
        })
        .collect();
    if engines.len() <= 1 {
        return Ok(clients.able(None, ACTION));
    }
    let task = cmd
        .parameters
        .get("task_name")
        .and_then(Value::as_str)
        .or_else(|| cmd.target.get("id").and_then(Value::as_str))
        .unwrap_or("");
    let registering: BTreeSet<&String> = engines
        .iter()
        .copied()
        .filter(|e| all.iter().any(|c| registers(c, e, task)))
        .collect();
    if let [engine] = registering.iter().collect::<Vec<_>>()[..] {
        return Ok(clients.able(Some(engine), ACTION));
    }
    let names: Vec<&str> = engines.iter().map(|e| e.as_str()).collect();
    Err(format!(
        "rate_limit for task {task:?} names no worker and no engine, and the local processes that declared rate_limit run {} engines ({}), {} of which report the task among a worker's registered tasks; name the worker (worker_name) so the daemon can tell which process applies the rate",
        names.len(),
        names.join(", "),
        if registering.is_empty() { "none".to_string() } else { format!("{} ({})", registering.len(), registering.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", ")) }
    ))
}

/// Whether `c`'s health report lists `task` among the registered tasks of
/// one of its `engine` workers.
fn registers(c: &ClientInfo, engine: &str, task: &str) -> bool {
    c.fresh_report()
        .and_then(|h| h.engines.get(engine))
        .is_some_and(|eh| {
            eh.workers.values().any(|w| {
                w.get("registered")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.iter().any(|t| t.as_str() == Some(task)))
            })
        })
}

/// `reconcile_task`: like a task command, by engine, to a connection that
/// declared `reconcile_task` for it. The brain sends it without checking
/// capabilities, so the refusal says what a process must declare.
pub(super) fn reconcile(clients: &ClientRegistry, cmd: &Command) -> Result<Vec<Reachable>, String> {
    let engine = cmd.engine();
    let able = clients.able(engine, "reconcile_task");
    if !able.is_empty() {
        return Ok(running_first(clients, cmd, able));
    }
    Err(format!(
        "no connected local process declared action \"reconcile_task\" for {e}. The brain probes tasks it believes stuck with this action without checking what the agent advertises: a process of {e} that can look up a task's state declares \"reconcile_task\" in its hello capabilities; until one does, each probe fails with this reason",
        e = engine_text(engine)
    ))
}

/// The task a task command is for: `parameters.task_id`, else `target.id`
/// when `target.type` is `"task"`.
fn task_id(cmd: &Command) -> Option<&str> {
    cmd.parameters
        .get("task_id")
        .and_then(Value::as_str)
        .or_else(|| {
            (cmd.target.get("type").and_then(Value::as_str) == Some("task"))
                .then(|| cmd.target.get("id").and_then(Value::as_str))
                .flatten()
        })
        .filter(|t| !t.is_empty())
}

/// `cancel_task` and `reconcile_task`: only the processes of `able` whose
/// latest health report lists the task among a worker's running tasks
/// (`active`), when some do. Engines that stop a task only in the process
/// running it (TaskIQ's worker processes, Huey's thread workers) need the
/// command there; any other process could only answer that the task is
/// not running here. A task started since the last reports (every 10 s by
/// default) is in none: then `able` as it is.
fn running_first(clients: &ClientRegistry, cmd: &Command, able: Vec<Reachable>) -> Vec<Reachable> {
    let (Some(engine), Some(task)) = (cmd.engine(), task_id(cmd)) else {
        return able;
    };
    let runners = clients.task_runners(engine, task);
    if !able.iter().any(|r| runners.contains(&r.id)) {
        return able;
    }
    able.into_iter()
        .filter(|r| runners.contains(&r.id))
        .collect()
}

/// Why `cmd` cannot run yet when its action is advertised only because it
/// was advertised before the daemon restarted: the process that declared
/// it has not reconnected.
fn not_back_yet(clients: &ClientRegistry, cmd: &Command) -> Option<String> {
    let key = cmd.engine().or_else(|| {
        cmd.target
            .get("scheduler")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    });
    let (key, left) = clients.only_remembered(key, &cmd.action)?;
    Some(format!(
        "the process that declared action {:?} for {key:?} before z4j-agentd restarted has not reconnected yet; it stays advertised for {} s more (Z4J_RESTART_GRACE_SECONDS) while it may come back. Retry once it is connected, or check that it is running",
        cmd.action,
        left.as_secs().max(1)
    ))
}
