//! `purge_queue`'s confirmation, checked before the command is routed
//! (`docs/local-protocol.md`, "The purge confirmation").
//!
//! The brain confirms a purge with `confirm_token` = lowercase hex
//! HMAC-SHA256 under the project key (the key that signs frames) of
//! `purge|{queue}|{depth}`, the depth being the one the operator saw. The
//! daemon alone holds the key, so it checks the token against the
//! freshest depth a local process reported for that queue (health
//! reports), and hands the process the verified depth as
//! `parameters.expected_depth`, never the token or the key. The process
//! measures the queue again and refuses when the depth differs.
//!
//! The queue's engine (the command names none) is the one whose health
//! reports name the queue; unknown or claimed by several engines, the
//! purge is refused. `force` (an admin's explicit choice in the brain) is
//! honoured without a token, logged at error level and counted.

use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;

use super::Command;
use crate::clients::ClientRegistry;
use crate::protocol::{mac_hex, SigningKey, Value};

/// A purge that may be routed: the command as the process gets it.
pub(super) struct Confirmed {
    /// With the queue's engine in `target.engine` and `parameters.engine`,
    /// the verified `parameters.expected_depth` (absent when forced), and
    /// no `confirm_token`.
    pub command: Command,
    /// Passed on because of `force`, without a token check.
    pub forced: bool,
}

/// The queue a purge names: `parameters.queue`, else `target.queue`,
/// else the target's `id`.
fn queue(cmd: &Command) -> Option<&str> {
    [
        cmd.parameters.get("queue"),
        cmd.target.get("queue"),
        cmd.target.get("id"),
    ]
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .find(|q| !q.is_empty())
}

/// The token for `queue` at `depth` under `key`.
pub fn token(key: &SigningKey, queue: &str, depth: u64) -> String {
    mac_hex(key, format!("purge|{queue}|{depth}").as_bytes())
}

/// Checks a `purge_queue` command; the reason it may not run otherwise.
pub(super) fn confirm(
    clients: &ClientRegistry,
    cmd: &Command,
    key: Option<&SigningKey>,
) -> Result<Confirmed, String> {
    let Some(q) = queue(cmd) else {
        return Err(
            "purge_queue names no queue (parameters.queue or the target's id is required)".into(),
        );
    };
    let force = cmd.parameters.get("force").and_then(Value::as_bool) == Some(true);
    let given = match cmd.parameters.get("confirm_token") {
        None | Some(Value::Null) => None,
        Some(Value::Str(t)) => Some(t.as_str()),
        Some(other) => {
            return Err(format!(
                "purge_queue for queue {q:?}: confirm_token must be a string, got {}",
                other.type_name()
            ))
        }
    };
    if given.is_none() && !force {
        return Err(format!(
            "purge_queue for queue {q:?}: no confirm_token, so the purge is not confirmed; purge with the queue's observed depth (the brain then computes the token), or with an explicit confirm_token"
        ));
    }
    let engines = clients.queue_engines(q);
    let engine = match engines.len() {
        0 => {
            return Err(format!(
                "purge_queue for queue {q:?}: no connected local process reports this queue (in a health report's queue_depths or a worker's active_queues), so the daemon knows neither its engine nor its depth; a process that can purge it must report the queue's depth in a health message"
            ))
        }
        1 => engines.into_iter().next().expect("one engine"),
        _ => {
            let names: Vec<&str> = engines.iter().map(String::as_str).collect();
            return Err(format!(
                "purge_queue for queue {q:?}: the queue is reported for engines {}; the brain's purge names no engine, so the daemon cannot tell which engine's queue to purge",
                names.join(", ")
            ));
        }
    };
    if force {
        return Ok(Confirmed {
            command: rewritten(cmd, q, &engine, None),
            forced: true,
        });
    }
    let Some(reported) = clients.queue_depth(&engine, q) else {
        return Err(format!(
            "purge_queue for queue {q:?} (engine {engine:?}): no process has reported this queue's depth; a process must report it (health queue_depths) before a purge can be confirmed"
        ));
    };
    let Some(key) = key else {
        return Err(format!(
            "purge_queue for queue {q:?}: this daemon holds no project key to check the confirm_token"
        ));
    };
    let expected = token(key, q, reported.depth);
    let given = given.unwrap_or("");
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        let age = (OffsetDateTime::now_utc() - reported.at)
            .whole_seconds()
            .max(0);
        return Err(format!(
            "purge_queue for queue {q:?}: confirm_token does not match the last reported depth {d} of queue {q:?} (engine {engine:?}, reported by {who} {age} s ago); the depth changed since the brain computed the token, or the token was not issued by this project's brain. Re-issue the purge with the current depth",
            d = reported.depth,
            who = reported.who,
        ));
    }
    Ok(Confirmed {
        command: rewritten(cmd, q, &engine, Some(reported.depth)),
        forced: false,
    })
}

/// `cmd` as the process gets it: the queue and engine set, the verified
/// depth added, the token gone.
fn rewritten(cmd: &Command, queue: &str, engine: &str, depth: Option<u64>) -> Command {
    let mut c = cmd.clone();
    if !matches!(c.target, Value::Map(_)) {
        c.target = Value::empty_map();
    }
    c.target.insert("engine", engine);
    if !matches!(c.parameters, Value::Map(_)) {
        c.parameters = Value::empty_map();
    }
    c.parameters.remove("confirm_token");
    c.parameters.remove("expected_depth");
    c.parameters.insert("queue", queue);
    c.parameters.insert("engine", engine);
    if let Some(d) = depth {
        c.parameters.insert("expected_depth", d);
    }
    c
}
