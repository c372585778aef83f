//! What a brain session says about the daemon, whichever way it reaches
//! the brain: the `heartbeat` and `agent_status` payloads, and where a
//! command from the brain goes. Shared by the WebSocket session and the
//! long-poll one so both report and route alike.

use std::time::Duration;

use time::OffsetDateTime;

use super::Uplink;
use crate::clients::Advertisement;
use crate::commands::{Command, CommandResult, Dispatch};
use crate::protocol::Value;
use crate::stats::FailureStreaks;

/// What a session knows about itself that its reports carry.
pub(crate) struct SessionFacts<'a> {
    /// What the session advertised (its engines are reported on).
    pub advertised: &'a Advertisement,
    /// When events last went to the brain in this session.
    pub last_flush_at: Option<OffsetDateTime>,
    /// The largest frame the brain takes (health reports are cut to fit).
    pub max_frame_bytes: usize,
    /// How long the session has been up.
    pub up_for: Duration,
    /// When it began.
    pub connected_at_wall: OffsetDateTime,
    /// The z4j contract line named in the `hello`.
    pub contract_line: &'a str,
    /// Failures in a row before the session.
    pub streaks: FailureStreaks,
}

impl Uplink {
    /// The `heartbeat` and `agent_status` payloads for now. Health reports
    /// cut to fit are marked cut, so they are not reported twice.
    pub(crate) fn status_payloads(
        &self,
        f: &SessionFacts<'_>,
        now: OffsetDateTime,
    ) -> (Value, Value) {
        let snapshot = self.stats.snapshot(self.spool.stats());
        let mut hb = snapshot.heartbeat_payload(f.last_flush_at);
        let loss = self
            .stats
            .telemetry_loss(self.spool.stats(), &f.advertised.engines);
        crate::stats::add_telemetry_loss(&mut hb, &loss);
        let reports = self.stats.fresh_health();
        let cuts = crate::stats::add_adapter_health(&mut hb, &reports, f.max_frame_bytes, now);
        self.stats.health.cut(&cuts);
        let mut status =
            snapshot.agent_status_payload(&f.advertised.engines, f.up_for, f.connected_at_wall);
        crate::stats::add_telemetry_loss(&mut status, &loss);
        crate::stats::add_agent_identity(
            &mut status,
            f.contract_line,
            &f.advertised.schedulers,
            f.streaks,
        );
        (hb, status)
    }

    /// Deletes a stored event that can never reach the brain (larger than
    /// any frame or upload it takes) and counts it as undeliverable; the
    /// caller says why in the log.
    pub(crate) async fn discard_undeliverable(&self, event: &crate::spool::StoredEvent) {
        self.stats
            .events_undeliverable
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.spool.discard_undeliverable(event.id, event.id).await;
    }

    /// Hands a command from the brain to the local process that runs it;
    /// returns the answer to send now when there is one (no process can
    /// run it, or it was answered before).
    pub(crate) fn route_command(&self, cmd: &Command, host_label: &str) -> Option<CommandResult> {
        let id = cmd.id.as_str();
        match self.router.dispatch(cmd, host_label) {
            Dispatch::Started { who } => {
                tracing::info!(
                    command_id = id,
                    action = %cmd.action,
                    engine = cmd.engine().unwrap_or("-"),
                    to = %who,
                    "command routed to a local process"
                );
                None
            }
            Dispatch::Failed(r) => {
                tracing::warn!(
                    command_id = id,
                    action = %cmd.action,
                    engine = cmd.engine().unwrap_or("-"),
                    error = r.error.as_deref().unwrap_or(""),
                    "command failed at once"
                );
                Some(r)
            }
            Dispatch::DuplicateRunning => {
                tracing::info!(
                    command_id = id,
                    "command delivered again while running; acknowledged, not run twice"
                );
                None
            }
            Dispatch::Held { scheduler } => {
                tracing::info!(
                    command_id = id,
                    action = %cmd.action,
                    scheduler = %scheduler,
                    "activation kept until a local process declares its scheduler"
                );
                None
            }
            Dispatch::DuplicateDone(r) => {
                tracing::info!(command_id = id, "command delivered again after its answer; acknowledged and answered again, not run twice");
                Some(r)
            }
        }
    }
}
