//! Activations held for a scheduler whose process has not declared it yet.
//!
//! The brain sends `schedule.external.activate` only right after the
//! daemon's `hello`, which may list a scheduler whose process is still
//! reconnecting (after a daemon restart, or while it restarts). Such an
//! activation is held, not refused: it goes to the first connection that
//! declares the scheduler within the command's local budget, else it is
//! answered `failed` with the reason. A newer activation for the same
//! scheduler replaces an older one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

impl Router {
    /// Keeps an activation for `scheduler` until a process declares it or
    /// its local budget runs out. A newer activation for the same
    /// scheduler replaces an older one (the brain issued a new epoch), which
    /// is answered `failed`.
    pub(super) fn hold(
        self: &Arc<Self>,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        cmd: &Command,
        scheduler: String,
        host: &str,
        now: Instant,
    ) -> Dispatch {
        let budget = cmd.local_budget();
        let mut superseded = Vec::new();
        inner.held.retain(|h| {
            if h.scheduler != scheduler {
                return true;
            }
            superseded.push(CommandResult::failed(
                &h.cmd.id,
                &h.cmd.claim,
                format!(
                    "z4j-agentd on {}: a newer activation for scheduler {:?} replaced this one before a process declared the scheduler",
                    h.host, h.scheduler
                ),
            ));
            false
        });
        for r in &superseded {
            inner.remember(&r.id, Seen::Done(r.clone()), now);
        }
        inner.held.push(Held {
            cmd: cmd.clone(),
            scheduler: scheduler.clone(),
            host: host.to_string(),
            until: now + budget,
        });
        inner.remember(&cmd.id, Seen::Running, now);
        drop(inner);
        for r in superseded {
            self.finish(r);
        }
        let router = Arc::clone(self);
        let id = cmd.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(budget).await;
            router.expire_held(&id, budget);
        });
        Dispatch::Held { scheduler }
    }

    /// A held activation's budget ran out before its scheduler's process
    /// declared it.
    fn expire_held(&self, id: &str, budget: Duration) {
        let r = {
            let mut inner = self.inner.lock().unwrap();
            let Some(at) = inner.held.iter().position(|h| h.cmd.id == id) else {
                return;
            };
            let h = inner.held.remove(at);
            let r = CommandResult::failed(
                id,
                &h.cmd.claim,
                format!(
                    "z4j-agentd on {}: no local process declared scheduler {:?} (hello `schedulers`) within {:.0} s of the brain's activation, which was kept for it until now. Start the scheduler's process: when it declares the scheduler the daemon says hello again and the brain sends a new activation",
                    h.host,
                    h.scheduler,
                    budget.as_secs_f64()
                ),
            );
            inner.remember(id, Seen::Done(r.clone()), Instant::now());
            r
        };
        tracing::warn!(command_id = %id, "activation failed: its scheduler's process did not connect in time");
        self.finish(r);
    }

    /// Fails every held activation now, each with `why(its scheduler)`.
    pub(super) fn fail_held(&self, why: impl Fn(&str) -> String) {
        let failed: Vec<CommandResult> = {
            let mut inner = self.inner.lock().unwrap();
            let held = std::mem::take(&mut inner.held);
            held.into_iter()
                .map(|h| {
                    let r = CommandResult::failed(&h.cmd.id, &h.cmd.claim, why(&h.scheduler));
                    inner.remember(&h.cmd.id, Seen::Done(r.clone()), Instant::now());
                    r
                })
                .collect()
        };
        for r in failed {
            tracing::warn!(command_id = %r.id, "activation failed: the daemon is shutting down");
            self.finish(r);
        }
    }

    /// A connection said `hello`: each held activation whose scheduler a
    /// connection now holds is handed to it, with what is left of its
    /// budget. (An activation is held only while no connection holds its
    /// scheduler, so none waits for it either: a hello is the only way one
    /// becomes deliverable.)
    pub fn hand_over_held(self: &Arc<Self>) {
        let holders = self.stats.clients.scheduler_holders();
        let now = Instant::now();
        let mut failed = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.held.is_empty() {
                return;
            }
            let (ready, waiting): (Vec<Held>, Vec<Held>) = std::mem::take(&mut inner.held)
                .into_iter()
                .partition(|h| holders.contains_key(&h.scheduler));
            inner.held = waiting;
            for h in ready {
                let budget = h.until.saturating_duration_since(now);
                let handed = self
                    .stats
                    .clients
                    .scheduler_holder(&h.scheduler)
                    .ok_or_else(|| "the local process".to_string())
                    .and_then(|c| {
                        let msg = local_command(&h.cmd, budget);
                        self.start(&mut inner, &h.cmd, c, &msg, budget, now)
                    });
                match handed {
                    Ok(who) => tracing::info!(
                        command_id = %h.cmd.id,
                        scheduler = %h.scheduler,
                        to = %who,
                        "held activation handed to the process that declared its scheduler"
                    ),
                    Err(who) => {
                        let r = CommandResult::failed(
                            &h.cmd.id,
                            &h.cmd.claim,
                            format!(
                                "z4j-agentd on {}: {who} declared scheduler {:?} but is not reading its connection, so the activation kept for it could not be handed over",
                                h.host, h.scheduler
                            ),
                        );
                        inner.remember(&r.id, Seen::Done(r.clone()), now);
                        failed.push(r);
                    }
                }
            }
        }
        for r in failed {
            self.finish(r);
        }
    }

    /// Whether scheduler `name`'s process `conn` has, or will get, an
    /// activation without a new `hello`: one is held for the scheduler, or
    /// the latest one was handed to `conn`.
    pub fn activation_reaches(&self, name: &str, conn: u64) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.held.iter().any(|h| h.scheduler == name) || inner.activated.get(name) == Some(&conn)
    }
}
