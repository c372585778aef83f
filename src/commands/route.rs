//! Which local connections may run a command, decided from its target.
//!
//! [`candidates`] is the one place a command's target is read for
//! routing: each kind of target has its own rule, and a command no local
//! connection can take is refused here with the reason (the caller adds
//! the host and answers the brain at once). The router then picks among
//! the candidates (fewest commands in progress, then longest connected).

use super::Command;
use crate::clients::{ClientRegistry, Reachable};

/// The connections that may run `cmd`, or why none may. An empty list is
/// not a refusal: the router words that case itself (nobody declared the
/// action).
pub(super) fn candidates(
    clients: &ClientRegistry,
    cmd: &Command,
) -> Result<Vec<Reachable>, String> {
    Ok(clients.able(cmd.engine(), &cmd.action))
}
