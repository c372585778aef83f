//! The `longpoll` probe: the brain's HTTPS long-poll endpoints, which the
//! daemon uses when the path to the brain refuses WebSockets
//! (`Z4J_TRANSPORT=auto`) or when told to (`longpoll`).
//!
//! Steps: the connect probe with the token and a fresh session nonce (it
//! names the agent and project frames are signed for), then one signed,
//! empty `event_batch` uploaded within the daemon's body budget, which the
//! brain must verify and take. Passing proves the token and the HMAC
//! secret over long-poll. The brain's `Date` header gives the clock to the
//! second when no `hello_ack` did.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::Finding;
use crate::config::Config;
use crate::protocol::{self, SessionBinding, Signer};
use crate::uplink::error::UplinkError;
use crate::uplink::longpoll::http::{LongPollClient, Upload};
use crate::uplink::longpoll::pack::{self, Body};

/// Time allowed for the signed upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// What the probe found and the brain's clock minus ours, when read.
pub(super) async fn check(c: &Config) -> (Finding, Option<f64>) {
    let settings = &c.uplink;
    let nonce = protocol::new_nonce();
    let started = Instant::now();
    let client = match LongPollClient::new(settings, &nonce, "").await {
        Ok(client) => client,
        Err(e) => return (failure(&e), None),
    };
    let ids = match client.probe().await {
        Ok(ids) => ids,
        Err(e) => return (failure(&e), None),
    };
    let skew = ids
        .date
        .map(|d| (d - OffsetDateTime::now_utc()).as_seconds_f64());
    let probe_ms = started.elapsed().as_secs_f64() * 1000.0;
    let binding = SessionBinding::new(ids.agent_id.clone(), ids.project_id.clone(), nonce);
    let mut signer = Signer::new(settings.key.clone(), binding);
    let mut payload = Vec::new();
    protocol::event_batch_payload::<&[u8]>(&[], &mut payload);
    let frame = signer.sign(
        protocol::frames::TYPE_EVENT_BATCH,
        &protocol::new_frame_id("ev_"),
        &payload,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let mut body = Body::new(settings.longpoll_max_body);
    body.push(&pack::escape(&frame));
    let sent = Instant::now();
    let answer = client.upload(body.into_bytes(), UPLOAD_TIMEOUT).await;
    let upload_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let finding = match answer {
        Ok(Upload::Answered {
            accepted: 1,
            rejected: 0,
            ..
        }) => Finding::ok(format!(
            "token accepted and a signed upload taken over HTTPS long-poll in {upload_ms:.0} ms"
        )),
        Ok(Upload::Answered {
            accepted, rejected, errors, ..
        }) => Finding::fail(
            format!(
                "the brain took {accepted} of 1 signed frame over long-poll (rejected {rejected}: {})",
                errors.join("; ")
            ),
            "a transient failure on the brain's side: check its log and run the doctor again",
        ),
        Ok(Upload::Refused { status }) => Finding::fail(
            format!("the brain (or a proxy) refused even an empty upload (HTTP {status})"),
            "raise the request body limit of the proxy in front of the brain",
        ),
        Err(e) => failure(&e),
    };
    let finding = finding
        .detail("agent_id", ids.agent_id.as_str())
        .detail("project_id", ids.project_id.as_str())
        .detail("probe_ms", (probe_ms * 10.0).round() / 10.0)
        .detail("upload_ms", (upload_ms * 10.0).round() / 10.0)
        .detail("max_body_bytes", settings.longpoll_max_body as u64);
    (finding, skew)
}

/// A failed step, with what to change.
fn failure(e: &UplinkError) -> Finding {
    let fix = match e {
        UplinkError::LongPollStatus { status: 409, .. } => {
            "the brain refused the frame's signature: set Z4J_HMAC_SECRET to the project's hmac_secret, and check this host's clock"
        }
        UplinkError::LongPollStatus { status: 401, .. } => {
            "mint a new agent token in the brain and update Z4J_TOKEN_FILE"
        }
        _ => "check that Z4J_BRAIN_URL is the brain's base URL and that any proxy passes /api/v1/agent/ to it",
    };
    Finding::fail(e.to_string(), fix)
}
