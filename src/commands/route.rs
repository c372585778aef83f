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

/// The connections that may run `cmd`, or why none may. An empty list is
/// not a refusal: the router words that case itself (nobody declared the
/// action).
pub(super) fn candidates(
    clients: &ClientRegistry,
    cmd: &Command,
) -> Result<Vec<Reachable>, String> {
    let able = clients.able(cmd.engine(), &cmd.action);
    if able.is_empty() {
        if let Some(why) = not_back_yet(clients, cmd) {
            return Err(why);
        }
    }
    Ok(able)
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
