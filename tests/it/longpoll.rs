//! The uplink over HTTPS long-poll (`Z4J_TRANSPORT=longpoll`, or `auto`
//! after the WebSocket upgrade was refused) against the fake long-poll
//! brain: signed uploads, the HTTP 200 as the ack, commands by polling,
//! and each HTTP fault the brain or a proxy can answer. Each test runs a
//! whole daemon in-process.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::longpoll_brain::{
    identity, str_at, Delivery, Fault, LongPollBrain, Route, Target, AGENT_ID, PROJECT_ID, TOKEN,
};
use support::{
    brain_command, event, num, options, text, wait_stats, wait_uplink_connected, TestDaemon,
};
use z4j_agentd::client::Event;
use z4j_agentd::config::Options;
use z4j_agentd::protocol::Value;

/// The test options for `url`, on long-poll.
fn longpoll_options(url: &str) -> Options {
    Options {
        transport: Some("longpoll".into()),
        ..options(url)
    }
}

/// A daemon started with `opts`, once its uplink is connected.
async fn connected(opts: Options) -> TestDaemon {
    let d = TestDaemon::start(opts).await;
    wait_uplink_connected(&d.stats).await;
    d
}

/// `task.received` for tasks `<prefix>0..<prefix>n`.
fn received(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), "task.received"))
        .collect()
}

/// Sends `task.received` for `<prefix>0..<prefix>n` and waits up to
/// `secs` until the brain acknowledged all and the spool is empty; returns
/// the stats then.
async fn deliver(d: &TestDaemon, prefix: &str, n: usize, secs: u64) -> Value {
    let mut c = d.client().await;
    c.send_durable(&received(prefix, n)).await.unwrap();
    wait_stats(d, secs, "every event acked", |s| {
        num(s, "acked") == n as u64 && num(s, "spool_depth") == 0
    })
    .await
}

/// The task ids `<prefix>0..<prefix>n`.
fn task_ids(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A count in a map of `stats` (0 when absent).
fn count_in(s: &Value, map: &str, k: &str) -> u64 {
    s.get(map)
        .and_then(|m| m.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The events of `deliveries`, ordered by their id.
fn by_id(deliveries: &[Delivery]) -> Vec<Value> {
    let mut events: Vec<Value> = deliveries.iter().map(|d| d.event.clone()).collect();
    events.sort_by(|a, b| str_at(a, "id").cmp(str_at(b, "id")));
    events
}

/// `cancel_task` for `task` of `engine`, as the brain sends it.
fn cancel(engine: &str, task: &str) -> Value {
    let mut target = Value::empty_map();
    target.insert("type", "task");
    target.insert("id", format!("{engine}:{task}"));
    target.insert("engine", engine);
    let mut params = Value::empty_map();
    params.insert("engine", engine);
    params.insert("task_id", task);
    brain_command("cancel_task", target, params, "claim-lp".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_up_in_signed_uploads_and_leave_the_spool_once_the_brain_takes_them() {
    let brain = LongPollBrain::start().await;
    let d = connected(longpoll_options(&brain.url)).await;
    let mut c = d.client().await;
    let sent: Vec<Event> = (0..5)
        .flat_map(|i| {
            let task = format!("t{i}");
            [event(&task, "task.received"), event(&task, "task.started")]
        })
        .collect();
    assert_eq!(c.send_durable(&sent).await.unwrap(), 10);
    let s = wait_stats(&d, 10, "every event acked", |s| {
        num(s, "acked") == 10 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(text(&s, "transport"), "longpoll", "{s:?}");
    assert_eq!(text(&s, "transport_setting"), "longpoll", "{s:?}");
    assert_eq!(num(&s, "forwarded"), 10, "{s:?}");
    assert_eq!(num(&s, "resent"), 0, "{s:?}");
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(num(&s, "transport_fallbacks"), 0, "{s:?}");
    // The ids the probe's headers named.
    assert_eq!(text(&s, "agent_id"), AGENT_ID, "{s:?}");
    assert_eq!(text(&s, "project_id"), PROJECT_ID, "{s:?}");

    // Every frame passed the brain's checks, and each event arrived once.
    assert_eq!(brain.verify_failures(), Vec::<String>::new());
    let deliveries = brain.deliveries();
    assert_eq!(deliveries.len(), 10, "nothing sent twice: {deliveries:?}");
    let stored: BTreeSet<(String, String)> = brain
        .stored()
        .iter()
        .map(|e| (str_at(e, "task_id").into(), str_at(e, "kind").into()))
        .collect();
    let expected: BTreeSet<(String, String)> = (0..5)
        .flat_map(|i| {
            [
                (format!("t{i}"), "task.received".to_string()),
                (format!("t{i}"), "task.started".to_string()),
            ]
        })
        .collect();
    assert_eq!(stored, expected);
    let frames = brain.frames();
    assert!(
        deliveries
            .iter()
            .all(|d| frames[d.frame].frame_type == "event_batch"),
        "events travel in event_batch frames"
    );
    let types = brain.frame_types();
    for t in ["heartbeat", "agent_status", "event_batch"] {
        assert!(types.iter().any(|x| x == t), "no {t} frame: {types:?}");
    }
    let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "one session's seq only grows: {seqs:?}"
    );

    // One session: the probe first, then every request with its nonce and
    // the token; no WebSocket was tried.
    let sessions = brain.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let requests = brain.requests();
    assert_eq!(requests[0].route, Route::Probe, "{requests:?}");
    assert!(
        requests[0].query.contains("wait=0") && requests[0].query.contains("max_frames=0"),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.session.as_ref() == Some(&sessions[0])),
        "{requests:?}"
    );
    assert!(requests.iter().all(|r| r.route != Route::WebSocket));
    assert!(
        requests
            .iter()
            .filter(|r| r.route == Route::Upload)
            .all(|r| r.status.is_none_or(|s| s == 200)),
        "every upload answered 200: {requests:?}"
    );
    let auth = brain.auth_headers();
    assert!(
        !auth.is_empty() && auth.iter().all(|h| *h == format!("Bearer {TOKEN}")),
        "{auth:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_command_is_acked_routed_to_its_client_and_answered() {
    let brain = LongPollBrain::start().await;
    let d = connected(longpoll_options(&brain.url)).await;
    let mut celery = d.client().await;
    celery
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let mut rq = d.client().await;
    rq.hello_with_capabilities("rq-worker", &[("rq", &["cancel_task"])])
        .await
        .unwrap();

    let id = "77777777-2222-4333-8444-555555555555";
    brain.push_command(id, cancel("celery", "t-9"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), celery.next_command())
        .await
        .expect("the celery client gets the command")
        .unwrap();
    assert_eq!(text(&cmd, "id"), id);
    assert_eq!(text(&cmd, "action"), "cancel_task");
    assert_eq!(
        cmd.get("parameters").map(|p| text(p, "task_id")),
        Some("t-9")
    );
    let mut result = Value::empty_map();
    result.insert("revoked", true);
    celery
        .command_result(id, true, Some(result), None)
        .await
        .unwrap();

    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].0, "command_ack", "acked first: {f:?}");
    assert_eq!(text(&f[0].1, "delivery_claim_token"), "claim-lp");
    assert_eq!(f[1].0, "command_result", "{f:?}");
    assert_eq!(text(&f[1].1, "status"), "success");
    assert_eq!(
        f[1].1.get("result").and_then(|r| r.get("revoked")),
        Some(&Value::Bool(true))
    );
    assert_eq!(text(&f[1].1, "delivery_claim_token"), "claim-lp");
    // The rq client got nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rq.next_command())
            .await
            .is_err()
    );
    // The command came on a poll that claims commands, and the daemon
    // accepted its signature: the session was never restarted.
    let polls = brain.requests_to(Route::Poll);
    assert!(
        polls
            .iter()
            .any(|p| p.query.contains("max_frames=50") && p.status == Some(200)),
        "{polls:?}"
    );
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(count_in(&s, "commands", "received"), 1, "{s:?}");
    assert_eq!(count_in(&s, "commands", "succeeded"), 1, "{s:?}");
    assert_eq!(brain.verify_failures(), Vec::<String>::new());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_starts_a_new_session_with_a_new_nonce_and_loses_nothing() {
    let brain = LongPollBrain::start().await;
    brain.script(Target::EventUpload, [Fault::Status(409)]);
    let d = connected(longpoll_options(&brain.url)).await;
    let mut c = d.client().await;
    c.send_durable(&received("t", 6)).await.unwrap();
    let s = wait_stats(&d, 15, "every event acked after the 409", |s| {
        num(s, "acked") == 6 && num(s, "spool_depth") == 0
    })
    .await;

    let requests = brain.requests();
    let sessions = brain.sessions();
    assert_eq!(sessions.len(), 2, "one new session: {requests:?}");
    let refused = requests
        .iter()
        .find(|r| r.status == Some(409))
        .expect("an upload answered 409");
    assert_eq!(refused.session.as_ref(), Some(&sessions[0]));
    assert!(!refused.event_ids.is_empty(), "{refused:?}");
    // The new session opens with a connect probe under its own nonce, and
    // nothing after it uses the old one.
    let opened = requests
        .iter()
        .position(|r| r.session.as_ref() == Some(&sessions[1]))
        .unwrap();
    assert_eq!(requests[opened].route, Route::Probe, "{requests:?}");
    assert!(requests[opened].query.contains("max_frames=0"));
    assert!(
        requests[opened..]
            .iter()
            .all(|r| r.session.as_ref() == Some(&sessions[1])),
        "{requests:?}"
    );

    // Every event stored once, all of them delivered in the new session.
    assert_eq!(brain.stored_task_ids(), task_ids("t", 6));
    assert_eq!(brain.stored().len(), 6);
    let frames = brain.frames();
    let deliveries = brain.deliveries();
    assert!(
        deliveries
            .iter()
            .all(|d| frames[d.frame].session == sessions[1]),
        "{deliveries:?}"
    );
    let delivered: BTreeSet<&str> = deliveries.iter().map(|d| str_at(&d.event, "id")).collect();
    for id in &refused.event_ids {
        assert!(delivered.contains(id.as_str()), "{id} went again");
    }
    assert_eq!(brain.verify_failures(), Vec::<String>::new());
    assert_eq!(num(&s, "connects"), 2, "{s:?}");
    assert_eq!(count_in(&s, "failures_by_class", "protocol"), 1, "{s:?}");
    assert_eq!(num(&s, "forwarded"), 6, "{s:?}");
    assert_eq!(num(&s, "resent"), refused.event_ids.len() as u64, "{s:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_an_auth_failure_and_long_poll_asks_nothing_else() {
    let brain = LongPollBrain::start().await;
    brain.script(Target::Probe, std::iter::repeat_n(Fault::Status(401), 50));
    let d = TestDaemon::start(longpoll_options(&brain.url)).await;
    let s = wait_stats(&d, 10, "an auth failure", |s| {
        text(s, "last_failure_class") == "auth" && text(s, "uplink_state") == "backoff"
    })
    .await;
    let error = text(&s, "last_error");
    assert!(
        error.contains("connect probe")
            && error.contains("HTTP 401")
            && error.contains("mint a new agent token"),
        "{error}"
    );
    assert!(!error.contains(TOKEN), "no secret in errors: {error}");
    assert!(count_in(&s, "failures_by_class", "auth") >= 1, "{s:?}");
    assert_eq!(count_in(&s, "failures_by_class", "connection"), 0, "{s:?}");
    assert_eq!(num(&s, "connects"), 0, "{s:?}");
    // Refused at the probe: no poll, no upload.
    let requests = brain.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.route == Route::Probe && r.status == Some(401)),
        "{requests:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_never_falls_back_to_long_poll_when_the_upgrade_is_refused_for_credentials() {
    let brain = LongPollBrain::start().await;
    brain.answer_websocket_with(401);
    let d = TestDaemon::start(Options {
        transport: Some("auto".into()),
        ..options(&brain.url)
    })
    .await;
    let s = wait_stats(&d, 10, "an auth failure", |s| {
        text(s, "last_failure_class") == "auth" && text(s, "uplink_state") == "backoff"
    })
    .await;
    assert!(text(&s, "last_error").contains("HTTP 401"), "{s:?}");
    assert_eq!(num(&s, "transport_fallbacks"), 0, "{s:?}");
    assert_eq!(text(&s, "longpoll_reason"), "", "{s:?}");
    assert_eq!(text(&s, "transport"), "websocket", "{s:?}");
    assert_eq!(text(&s, "transport_setting"), "auto", "{s:?}");
    // A fallback would have probed before the failure was recorded.
    let requests = brain.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.route == Route::WebSocket),
        "no long-poll request at all: {requests:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_on_the_probe_is_a_connection_failure_tried_again_later() {
    let brain = LongPollBrain::start().await;
    // The second probe is held so the failure can be read before it passes.
    brain.script(Target::Probe, [Fault::Status(503), Fault::Hold]);
    let d = TestDaemon::start(longpoll_options(&brain.url)).await;
    brain.wait_held(1).await;
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(text(&s, "last_failure_class"), "connection", "{s:?}");
    let error = text(&s, "last_error");
    assert!(
        error.contains("connect probe") && error.contains("HTTP 503"),
        "{error}"
    );
    assert_eq!(count_in(&s, "failures_by_class", "connection"), 1, "{s:?}");
    assert_eq!(num(&s, "connects"), 0, "{s:?}");

    brain.release();
    wait_uplink_connected(&d.stats).await;
    let s = deliver(&d, "t", 3, 10).await;
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(s.get("last_failure_class"), Some(&Value::Null), "{s:?}");
    assert_eq!(brain.stored_task_ids(), task_ids("t", 3));
    let probes = brain.requests_to(Route::Probe);
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert_eq!(probes[0].status, Some(503));
    assert_eq!(probes[1].status, Some(200));
    assert_ne!(probes[0].session, probes[1].session, "a new nonce");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_answer_is_lost_goes_again_re_signed_and_is_stored_once() {
    let brain = LongPollBrain::start().await;
    brain.script(Target::EventUpload, [Fault::DropAnswer]);
    let d = connected(longpoll_options(&brain.url)).await;
    let mut c = d.client().await;
    c.send_durable(&received("t", 6)).await.unwrap();
    let s = wait_stats(&d, 15, "every event acked after the lost answer", |s| {
        num(s, "acked") == 6 && num(s, "spool_depth") == 0
    })
    .await;

    let requests = brain.requests();
    let lost: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.route == Route::Upload && r.status.is_none())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(lost.len(), 1, "{requests:?}");
    let lost = lost[0];
    let lost_ids: BTreeSet<&str> = requests[lost]
        .event_ids
        .iter()
        .map(String::as_str)
        .collect();
    assert!(!lost_ids.is_empty());

    let frames = brain.frames();
    let deliveries = brain.deliveries();
    let (first, again): (Vec<Delivery>, Vec<Delivery>) = deliveries
        .iter()
        .filter(|d| lost_ids.contains(str_at(&d.event, "id")))
        .cloned()
        .partition(|d| frames[d.frame].request == lost);
    // The brain had taken them; the re-sent events are exactly the same.
    assert_eq!(first.len(), lost_ids.len(), "{first:?}");
    assert_eq!(by_id(&again), by_id(&first));
    // ...in new frames, signed for a new session.
    let frame_ids = |ds: &[Delivery]| -> BTreeSet<(String, String, String)> {
        ds.iter()
            .map(|d| {
                let f = &frames[d.frame];
                (f.session.clone(), f.id.clone(), f.nonce.clone())
            })
            .collect()
    };
    let (old, new) = (frame_ids(&first), frame_ids(&again));
    for (session, id, nonce) in &new {
        assert!(
            old.iter()
                .all(|(s, i, n)| s != session && i != id && n != nonce),
            "{new:?} re-uses part of {old:?}"
        );
    }
    assert_eq!(brain.verify_failures(), Vec::<String>::new());
    // Each event stored once although some arrived twice.
    assert_eq!(brain.stored().len(), 6);
    assert_eq!(brain.stored_task_ids(), task_ids("t", 6));
    assert_eq!(deliveries.len(), 6 + lost_ids.len());
    let identities: BTreeSet<String> = deliveries.iter().map(|d| identity(&d.event)).collect();
    assert_eq!(identities.len(), 6);
    assert_eq!(num(&s, "resent"), lost_ids.len() as u64, "{s:?}");
    assert_eq!(num(&s, "forwarded"), 6, "{s:?}");
    assert_eq!(count_in(&s, "failures_by_class", "connection"), 1, "{s:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_413_uploads_are_smaller_and_everything_is_delivered() {
    let brain = LongPollBrain::start().await;
    // Half the daemon's default budget (8192).
    brain.limit_body(4096);
    let d = connected(longpoll_options(&brain.url)).await;
    let mut c = d.client().await;
    let events: Vec<Event> = (0..60)
        .map(|i| Event {
            data: serde_json::json!({
                "task_name": "app.tasks.add",
                "queue": "default",
                "note": "x".repeat(100),
            }),
            ..event(&format!("t{i}"), "task.received")
        })
        .collect();
    c.send_durable(&events).await.unwrap();
    let s = wait_stats(&d, 20, "every event acked", |s| {
        num(s, "acked") == 60 && num(s, "spool_depth") == 0
    })
    .await;

    let uploads = brain.requests_to(Route::Upload);
    let refused = uploads
        .iter()
        .position(|r| r.status == Some(413))
        .unwrap_or_else(|| panic!("an upload refused as too large: {uploads:?}"));
    assert!(uploads[refused].body_bytes > 4096, "{uploads:?}");
    assert!(
        uploads[refused + 1..]
            .iter()
            .all(|r| r.body_bytes <= 4096 && r.status == Some(200)),
        "every later upload fits: {uploads:?}"
    );
    assert_eq!(brain.stored_task_ids(), task_ids("t", 60));
    assert_eq!(brain.stored().len(), 60);
    assert_eq!(
        count_in(&s, "dropped_by_reason", "undeliverable"),
        0,
        "{s:?}"
    );
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    d.stop().await.unwrap();
}

/// A daemon with a 1024-byte upload budget (and a brain refusing more)
/// given three events, the middle one larger than any upload; returns
/// once the spool is empty and the other two are stored, with the stats.
async fn one_event_too_large() -> (LongPollBrain, TestDaemon, Value) {
    let brain = LongPollBrain::start().await;
    brain.limit_body(1024);
    let d = connected(Options {
        longpoll_max_body_bytes: Some("1024".into()),
        ..longpoll_options(&brain.url)
    })
    .await;
    let mut c = d.client().await;
    let huge = Event {
        data: serde_json::json!({"task_name": "app.tasks.add", "note": "x".repeat(3000)}),
        ..event("huge", "task.received")
    };
    c.send_durable(&[
        event("before", "task.received"),
        huge,
        event("after", "task.received"),
    ])
    .await
    .unwrap();
    let s = wait_stats(&d, 15, "the spool emptied, one event dropped", |s| {
        num(s, "spool_depth") == 0
            && count_in(s, "dropped_by_reason", "undeliverable") == 1
            && brain.stored().len() == 2
    })
    .await;
    (brain, d, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_any_upload_is_counted_undeliverable_and_the_others_go() {
    let (brain, d, s) = one_event_too_large().await;
    assert_eq!(num(&s, "dropped"), 1, "{s:?}");
    assert_eq!(num(&s, "forwarded"), 2, "{s:?}");
    assert_eq!(
        brain.stored_task_ids(),
        BTreeSet::from(["after".to_string(), "before".to_string()])
    );
    assert!(
        brain
            .deliveries()
            .iter()
            .all(|d| str_at(&d.event, "task_id") != "huge"),
        "the large event never went"
    );
    let uploads = brain.requests_to(Route::Upload);
    assert!(
        uploads
            .iter()
            .all(|r| r.body_bytes <= 1024 && r.status == Some(200)),
        "{uploads:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_event_is_counted_dropped_not_acked() {
    let (_brain, d, s) = one_event_too_large().await;
    // `acked` is what the brain acknowledged (docs/local-protocol.md): the
    // two it stored, not the one dropped before it could go.
    assert_eq!(num(&s, "acked"), 2, "{s:?}");
    assert_eq!(num(&s, "dropped"), 1, "{s:?}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_brain_took_only_part_of_goes_again_whole() {
    let brain = LongPollBrain::start().await;
    // The re-send is held, so what the spool keeps meanwhile can be read.
    brain.script(Target::EventUpload, [Fault::RejectEvents, Fault::Hold]);
    let d = connected(longpoll_options(&brain.url)).await;
    let mut c = d.client().await;
    c.send_durable(&received("t", 5)).await.unwrap();
    brain.wait_held(1).await;

    // A 200 with rejected > 0 deleted nothing.
    let s = d.client().await.stats().await.unwrap();
    assert_eq!(num(&s, "acked"), 0, "{s:?}");
    assert_eq!(num(&s, "spool_depth"), 5, "{s:?}");
    let uploads = brain.requests_to(Route::Upload);
    let partial = uploads
        .iter()
        .find(|r| r.status == Some(200) && !r.event_ids.is_empty())
        .expect("the partly taken upload");
    let resent = uploads
        .iter()
        .find(|r| r.status.is_none())
        .expect("the held re-send");
    let partial_ids: BTreeSet<&String> = partial.event_ids.iter().collect();
    let resent_ids: BTreeSet<&String> = resent.event_ids.iter().collect();
    assert!(
        partial_ids.is_subset(&resent_ids),
        "every event of it goes again: {partial_ids:?} in {resent_ids:?}"
    );
    assert!(brain.stored().is_empty(), "the fake refused them");

    brain.release();
    let s = wait_stats(&d, 10, "every event acked", |s| {
        num(s, "acked") == 5 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(brain.stored_task_ids(), task_ids("t", 5));
    assert_eq!(num(&s, "resent"), partial.event_ids.len() as u64, "{s:?}");
    assert_eq!(num(&s, "connects"), 1, "the same session: {s:?}");
    assert_eq!(brain.verify_failures(), Vec::<String>::new());
    // Re-signed in the same session: later seq, fresh nonces.
    let frames = brain.frames();
    let refused: Vec<_> = frames.iter().filter(|f| !f.taken).collect();
    let again: Vec<_> = frames
        .iter()
        .filter(|f| f.taken && f.frame_type == "event_batch")
        .collect();
    assert!(!refused.is_empty() && !again.is_empty(), "{frames:?}");
    for f in &again {
        assert!(
            refused
                .iter()
                .all(|r| f.seq > r.seq && f.nonce != r.nonce && f.session == r.session),
            "{f:?} against {refused:?}"
        );
    }
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_switches_to_long_poll_when_the_upgrade_gets_http_400() {
    let brain = LongPollBrain::start().await;
    brain.answer_websocket_with(400);
    let d = connected(Options {
        transport: Some("auto".into()),
        ..options(&brain.url)
    })
    .await;
    let s = deliver(&d, "t", 4, 10).await;
    assert_eq!(text(&s, "transport"), "longpoll", "{s:?}");
    assert_eq!(text(&s, "transport_setting"), "auto", "{s:?}");
    assert_eq!(num(&s, "transport_fallbacks"), 1, "{s:?}");
    assert!(text(&s, "longpoll_reason").contains("HTTP 400"), "{s:?}");
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(brain.stored_task_ids(), task_ids("t", 4));
    let requests = brain.requests();
    assert_eq!(requests[0].route, Route::WebSocket, "{requests:?}");
    assert_eq!(requests[0].status, Some(400));
    assert_eq!(requests[1].route, Route::Probe, "{requests:?}");
    assert_eq!(brain.requests_to(Route::WebSocket).len(), 1);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_goes_back_to_the_websocket_once_the_upgrade_passes() {
    let brain = LongPollBrain::start().await;
    // The daemon leaves long-poll once its last poll has returned (the brain
    // may hand it a command until then): polls come back within a second.
    brain.hold_polls_for(Duration::from_secs(1));
    let ws_brain = FakeBrain::start(Behavior::default()).await;
    let d = connected(Options {
        transport: Some("auto".into()),
        ws_retry_seconds: Some("5".into()),
        ..options(&brain.url)
    })
    .await;
    let mut c = d.client().await;
    c.send_durable(&received("lp", 3)).await.unwrap();
    wait_stats(&d, 10, "delivered over long-poll", |s| {
        num(s, "acked") == 3 && text(s, "transport") == "longpoll"
    })
    .await;

    // The proxy now carries upgrades: the next try of the WebSocket passes.
    brain.pass_websocket_to(&ws_brain.url);
    let s = wait_stats(&d, 15, "back on the WebSocket", |s| {
        text(s, "transport") == "websocket" && text(s, "uplink_state") == "connected"
    })
    .await;
    assert_eq!(num(&s, "transport_fallbacks"), 1, "{s:?}");
    assert_eq!(text(&s, "longpoll_reason"), "", "{s:?}");
    assert_eq!(num(&s, "connects"), 2, "{s:?}");
    c.send_durable(&received("ws", 3)).await.unwrap();
    wait_stats(&d, 10, "delivered over the WebSocket", |s| {
        num(s, "acked") == 6 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(brain.stored_task_ids(), task_ids("lp", 3));
    assert_eq!(
        *ws_brain.seen.task_ids.lock().unwrap(),
        task_ids("ws", 3),
        "only what came after the switch went over the WebSocket"
    );
    let ws_tries = brain.requests_to(Route::WebSocket);
    assert_eq!(ws_tries[0].status, Some(400), "{ws_tries:?}");
    assert!(
        ws_tries.iter().skip(1).all(|r| r.status == Some(101)),
        "{ws_tries:?}"
    );
    d.stop().await.unwrap();
}

/// An HTTP 429 to an upload (the brain's 600 agent requests a minute per
/// address, shared with every agent behind one address): the session
/// stays, the upload goes again after the wait, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_to_an_upload_keeps_the_session_and_sends_again_after_the_wait() {
    let brain = LongPollBrain::start().await;
    brain.script(Target::EventUpload, [Fault::Status(429)]);
    let d = connected(longpoll_options(&brain.url)).await;
    let s = deliver(&d, "t", 5, 15).await;
    assert_eq!(brain.stored_task_ids(), task_ids("t", 5));
    assert_eq!(
        brain.sessions().len(),
        1,
        "the same session: {:?}",
        brain.requests()
    );
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(s.get("last_failure_class"), Some(&Value::Null), "{s:?}");
    let with_events: Vec<_> = brain
        .requests_to(Route::Upload)
        .into_iter()
        .filter(|r| !r.event_ids.is_empty())
        .collect();
    assert_eq!(with_events[0].status, Some(429), "{with_events:?}");
    assert_eq!(with_events[1].status, Some(200), "{with_events:?}");
    assert_eq!(with_events[0].event_ids, with_events[1].event_ids);
    d.stop().await.unwrap();
}

/// The brain (or a proxy) refusing uploads smaller than the daemon's
/// smallest budget: frames of several events are split, not dropped, and
/// every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_smallest_budget_a_refused_frame_of_several_events_is_split_not_dropped() {
    let brain = LongPollBrain::start().await;
    brain.limit_body(900);
    let d = connected(Options {
        longpoll_max_body_bytes: Some("1024".into()),
        ..longpoll_options(&brain.url)
    })
    .await;
    let s = deliver(&d, "t", 8, 20).await;
    assert_eq!(brain.stored_task_ids(), task_ids("t", 8));
    assert_eq!(
        count_in(&s, "dropped_by_reason", "undeliverable"),
        0,
        "{s:?}"
    );
    assert!(
        brain
            .requests_to(Route::Upload)
            .iter()
            .any(|r| r.status == Some(413) && r.event_ids.len() > 1),
        "a frame of several events was refused first: {:?}",
        brain.requests()
    );
    d.stop().await.unwrap();
}

/// A command that came in a session whose upload then failed, its ack
/// unsent: the next session acknowledges it, and its process gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_of_a_session_that_failed_is_acknowledged_by_the_next_and_run_once() {
    let brain = LongPollBrain::start().await;
    brain.hold_polls_for(Duration::from_secs(2));
    let d = connected(longpoll_options(&brain.url)).await;
    let mut celery = d.client().await;
    celery
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    // The upload that would carry the ack (with the event) fails.
    brain.script(Target::EventUpload, [Fault::Status(502)]);
    // The event is spooled first, so any upload after the command carries
    // it too.
    let mut c = d.client().await;
    c.send_durable(&received("t", 1)).await.unwrap();
    let id = "77777777-2222-4333-8444-666666666666";
    brain.push_command(id, cancel("celery", "t-0"));
    let cmd = tokio::time::timeout(Duration::from_secs(20), celery.next_command())
        .await
        .expect("the celery client gets the command")
        .unwrap();
    assert_eq!(text(&cmd, "id"), id);
    let f = brain.wait_command_frames(id, 1).await;
    assert_eq!(f[0].0, "command_ack", "{f:?}");
    wait_stats(&d, 15, "the event acked", |s| num(s, "acked") == 1).await;
    assert!(brain.sessions().len() >= 2, "{:?}", brain.requests());
    let acked_in = brain
        .frames()
        .into_iter()
        .find(|f| f.id == id)
        .map(|f| f.session)
        .unwrap();
    assert_ne!(
        acked_in,
        brain.sessions()[0],
        "acknowledged by the next session"
    );
    // Routed once: a second delivery to the process would be a second run.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), celery.next_command())
            .await
            .is_err(),
        "the process got the command once"
    );
    d.stop().await.unwrap();
}
