//! The `websocket` probe: a real session with the brain, on a slot of the
//! doctor's own.
//!
//! Steps: the upgrade with the token (the uplink's own `dial`), `hello` /
//! `hello_ack` (the uplink's own `exchange_hello`), then one signed, empty
//! `event_batch` that the brain must verify and acknowledge with a frame we
//! verify in turn, within [`ROUND_TRIP_TIMEOUT`]. Passing proves the token
//! and the HMAC secret both ways.
//!
//! The slot is `<daemon worker_id>-doctor`, so a running daemon is never
//! displaced, and the `hello` advertises what the daemon advertises (from
//! the `socket` probe, else the static configuration): every `hello`
//! overwrites the agent's engines and capabilities at the brain. Hands the
//! `hello_ack` on: its project id goes into the report's header and its
//! clock reading to the `clock` probe.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::Message;

use super::brain_reply::{self, Failure};
use super::socket::DaemonView;
use super::Finding;
use crate::clients::Advertisement;
use crate::config::{Config, UplinkSettings};
use crate::protocol::{self, SessionBinding, Signer, Verifier};
use crate::uplink::connect::{self, Hello, HelloAck, Ws};

/// Time allowed for the signed round trip after `hello_ack`.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the probe hands on: the `hello_ack`, and whether the path refused
/// the upgrade itself (so long-poll may still work).
#[derive(Default)]
pub(super) struct Outcome {
    pub ack: Option<HelloAck>,
    pub upgrade_refused: bool,
}

/// Opens a session on the doctor's slot and proves both secrets.
pub(super) async fn check(c: &Config, daemon: &DaemonView) -> (Finding, Outcome) {
    let settings = &c.uplink;
    let worker_id = doctor_worker_id(&settings.worker_id);
    // Advertise what the daemon advertises: every hello overwrites the
    // agent's engines and capabilities at the brain.
    let advertised = daemon.advertised.clone().unwrap_or_else(|| {
        Advertisement::configured(&settings.static_engines, &settings.static_capabilities)
    });
    let started = Instant::now();
    let (mut ws, ack) = match open_session(settings, &worker_id, &advertised).await {
        Ok(session) => session,
        Err((refused, upgrade_refused)) => {
            return (
                refused,
                Outcome {
                    ack: None,
                    upgrade_refused,
                },
            )
        }
    };
    let handshake_ms = started.elapsed().as_secs_f64() * 1000.0;
    let trip = round_trip(&mut ws, settings, &ack).await;
    let finding = match &trip {
        Ok(trip) => Finding::ok(format!(
            "token accepted and HMAC secret verified both ways: signed round trip with brain {} in {:.0} ms (own slot worker_id {worker_id}; the daemon's slot is untouched)",
            ack.brain_version, trip.round_trip_ms
        )),
        Err(f) => Finding::fail(f.message.clone(), f.fix.clone()),
    };
    let finding = finding
        .detail("worker_id", worker_id.as_str())
        .detail("agent_id", ack.agent_id.as_str())
        .detail("project_id", ack.project_id.as_str())
        .detail("session_id", ack.session_id.as_str())
        .detail("brain_version", ack.brain_version.as_str())
        .detail("engines", advertised.engines_value())
        .detail("capabilities", advertised.capabilities_value())
        .detail("handshake_ms", (handshake_ms * 10.0).round() / 10.0);
    let finding = match trip {
        Ok(trip) => finding
            .detail("round_trip_ms", (trip.round_trip_ms * 10.0).round() / 10.0)
            .detail("commands_left_for_the_daemon", trip.pushed_commands),
        Err(f) => with_close_code(finding, &f),
    };
    (
        finding,
        Outcome {
            ack: Some(ack),
            upgrade_refused: false,
        },
    )
}

/// The doctor's slot at the brain: the daemon's `worker_id` plus
/// `-doctor`, cut to the brain's 128 bytes.
fn doctor_worker_id(worker_id: &str) -> String {
    const SUFFIX: &str = "-doctor";
    let mut base = worker_id.to_string();
    while base.len() + SUFFIX.len() > 128 {
        base.pop();
    }
    base + SUFFIX
}

fn with_close_code(finding: Finding, f: &Failure) -> Finding {
    match f.close_code {
        Some(code) => finding.detail("close_code", code as u64),
        None => finding,
    }
}

/// The upgrade and the handshake (the uplink's own `dial` and
/// `exchange_hello`); a refusal is the probe's failure, with whether it was
/// the upgrade itself that was refused.
async fn open_session(
    settings: &UplinkSettings,
    worker_id: &str,
    advertised: &Advertisement,
) -> Result<(Ws, HelloAck), (Finding, bool)> {
    let mut ws = connect::dial(settings).await.map_err(|e| {
        let finding = Finding::fail(
            e.to_string(),
            "check that Z4J_BRAIN_URL is the brain's base URL and that any proxy passes WebSocket upgrades (Upgrade and Connection headers)",
        );
        (finding, e.refuses_upgrade())
    })?;
    let hello = Hello {
        settings,
        worker_id,
        advertised,
        started_at: OffsetDateTime::now_utc(),
        // The brain leaves the agent's stored version alone and logs nothing.
        agent_version: crate::uplink::contract::UNKNOWN_LINE,
    };
    match connect::exchange_hello(&mut ws, &hello).await {
        Ok(ack) => Ok((ws, ack)),
        Err(e) => {
            let failure = Failure::handshake(&e);
            let finding = Finding::fail(failure.message.clone(), failure.fix.clone())
                .detail("worker_id", worker_id);
            Err((with_close_code(finding, &failure), false))
        }
    }
}

/// A signed round trip that the brain acknowledged.
struct Trip {
    round_trip_ms: f64,
    pushed_commands: u64,
}

/// Sends one signed, empty `event_batch` and waits for its verified ack,
/// then closes the session.
async fn round_trip(
    ws: &mut Ws,
    settings: &UplinkSettings,
    ack: &HelloAck,
) -> Result<Trip, Failure> {
    let binding = SessionBinding::new(
        ack.agent_id.clone(),
        ack.project_id.clone(),
        ack.session_id.clone(),
    );
    let mut signer = Signer::new(settings.key.clone(), binding.clone());
    let mut verifier = Verifier::new(settings.key.clone(), binding);
    let frame_id = protocol::new_frame_id("ev_");
    let mut payload = Vec::new();
    protocol::event_batch_payload::<&[u8]>(&[], &mut payload);
    let frame = signer.sign(
        protocol::frames::TYPE_EVENT_BATCH,
        &frame_id,
        &payload,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let sent = Instant::now();
    if let Err(e) = ws.send(Message::binary(frame)).await {
        return Err(Failure::new(
            format!("sending the signed frame failed: {e}"),
            "check the brain's log and any proxy in between",
        ));
    }
    let reply = brain_reply::await_ack(ws, &mut verifier, &frame_id, ack.clock_skew_seconds);
    let outcome = match tokio::time::timeout(ROUND_TRIP_TIMEOUT, reply).await {
        Ok(acked) => acked,
        Err(_) => Err(Failure::new(
            format!(
                "the brain accepted the handshake but did not acknowledge a signed frame within {}s",
                ROUND_TRIP_TIMEOUT.as_secs()
            ),
            "the brain may be overloaded or its database locked: check its log and CPU",
        )),
    };
    let round_trip_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let _ = ws.close(None).await;
    outcome.map(|pushed_commands| Trip {
        round_trip_ms,
        pushed_commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_worker_id_fits_the_brain_limit() {
        assert_eq!(doctor_worker_id("agentd-web-1"), "agentd-web-1-doctor");
        let long = "x".repeat(128);
        assert_eq!(doctor_worker_id(&long).len(), 128);
    }
}
