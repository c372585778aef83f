//! What the daemon tells the brain it is: the z4j contract line chosen from
//! the brain's version (one quick second `hello` on first contact, none
//! once the version is known), its own version in `hello.host`, and the
//! loss counters of its spool (`telemetry_loss`).

use crate::support;

use support::fake_brain::{Behavior, FakeBrain};
use support::{num, options, text, wait_for, wait_stats, TestDaemon};
use z4j_agentd::protocol::Value;

fn agent_versions(brain: &FakeBrain) -> Vec<String> {
    brain
        .seen
        .hellos
        .lock()
        .unwrap()
        .iter()
        .map(|h| {
            h.get("agent_version")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// The latest `agent_status` payload the brain received.
fn last_status(brain: &FakeBrain) -> Option<Value> {
    brain
        .seen
        .status_frames
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(t, _)| t == "agent_status")
        .map(|(_, p)| p.clone())
}

/// Waits until the daemon's `stats` say its uplink is connected; returns
/// them.
async fn stats_once_connected(d: &TestDaemon, secs: u64, what: &str) -> Value {
    wait_stats(d, secs, what, |s| text(s, "uplink_state") == "connected").await
}

/// Waits until the brain received an `agent_status`.
async fn agent_status_sent(brain: &FakeBrain) {
    wait_for(10, "an agent_status", || last_status(brain).is_some()).await;
}

fn loss_ids(status: &Value) -> (String, String) {
    let tl = status.get("telemetry_loss").expect("telemetry_loss");
    let id = |k: &str| tl.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    (id("buffer_id"), id("runtime_id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_contact_says_hello_again_once_with_the_brains_line_and_a_restart_does_not() {
    let brain = FakeBrain::start(Behavior {
        brain_version: Some("1.12.0".into()),
        ..Behavior::default()
    })
    .await;
    let opts = options(&brain.url);
    let d = TestDaemon::start(opts.clone()).await;
    let s = stats_once_connected(&d, 15, "connected").await;
    agent_status_sent(&brain).await;
    // 0.0.0 first (the brain's silent "not determined"), then its line, once.
    assert_eq!(agent_versions(&brain), ["0.0.0", "1.12.0"]);
    assert_eq!(
        brain.seen.client_close_codes.lock().unwrap().as_slice(),
        &[1000],
        "the first session is closed normally before the second hello"
    );
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(num(&s, "contract_rehellos"), 1, "{s:?}");
    assert_eq!(text(&s, "contract_line"), "1.12.0");
    assert!(s
        .get("failures_by_class")
        .is_none_or(|f| f == &Value::empty_map()));
    let hello = brain.seen.hellos.lock().unwrap()[1].clone();
    let host = hello.get("host").expect("host");
    assert_eq!(
        host.get("agentd_version").and_then(Value::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        host.get("agent").and_then(Value::as_str),
        Some("z4j-agentd")
    );
    assert_eq!(
        host.get("z4j_contract").and_then(Value::as_str),
        Some("1.12.0")
    );
    assert_eq!(
        hello.get("framework").and_then(Value::as_str),
        Some("z4j-agentd")
    );
    let status = last_status(&brain).expect("agent_status");
    assert_eq!(
        status.get("agent_version").and_then(Value::as_str),
        Some("1.12.0")
    );
    for k in [
        "auth_failure_streak",
        "protocol_failure_streak",
        "connection_failure_streak",
    ] {
        assert_eq!(status.get(k).and_then(Value::as_u64), Some(0), "{k}");
    }
    assert!(matches!(status.get("schedulers"), Some(Value::Array(_))));
    let (buffer_id, runtime_id) = loss_ids(&status);
    assert_eq!(buffer_id.len(), 32, "{status:?}");
    let hb = brain
        .seen
        .status_frames
        .lock()
        .unwrap()
        .iter()
        .find(|(t, _)| t == "heartbeat")
        .map(|(_, p)| p.clone())
        .expect("heartbeat");
    assert_eq!(loss_ids(&hb), (buffer_id.clone(), runtime_id.clone()));
    // Stopped, its home kept: the spool file moves to the next daemon's home.
    let home = d.dir.path().join("home");
    let spool_in_home = d.spool.strip_prefix(&home).unwrap().to_path_buf();
    d.shutdown.cancel();
    let keep = d.dir;
    d.task.await.unwrap().unwrap();
    let old_spool = keep.path().join("home").join(&spool_in_home);

    // Same spool file: the brain's version is known, one hello only.
    brain.seen.status_frames.lock().unwrap().clear();
    let d = TestDaemon::start_prepared(opts, |new_home| {
        let to = new_home.join(&spool_in_home);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&old_spool, &to).unwrap();
    })
    .await;
    let s = stats_once_connected(&d, 15, "connected again").await;
    agent_status_sent(&brain).await;
    assert_eq!(agent_versions(&brain), ["0.0.0", "1.12.0", "1.12.0"]);
    assert_eq!(num(&s, "contract_rehellos"), 0, "{s:?}");
    let (buffer_id2, runtime_id2) = loss_ids(&last_status(&brain).unwrap());
    assert_eq!(buffer_id2, buffer_id, "one spool file, one buffer id");
    assert_ne!(runtime_id2, runtime_id, "a new run, a new runtime id");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brain_version_that_names_no_line_keeps_the_first_hello() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let s = stats_once_connected(&d, 15, "connected").await;
    agent_status_sent(&brain).await;
    assert_eq!(agent_versions(&brain), ["0.0.0"]);
    assert_eq!(num(&s, "contract_rehellos"), 0, "{s:?}");
    assert_eq!(
        last_status(&brain)
            .unwrap()
            .get("agent_version")
            .and_then(Value::as_str),
        Some("0.0.0")
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refused_for_a_full_spool_reach_the_brain_per_engine() {
    // Acks never come, so the spool stays full; heartbeats every second.
    let brain = FakeBrain::start(Behavior {
        withhold_acks: usize::MAX,
        heartbeat_interval_seconds: Some(1),
        brain_version: Some("1.13.0".into()),
        ..Behavior::default()
    })
    .await;
    let mut opts = options(&brain.url);
    opts.buffer_max_events = Some("1000".into());
    opts.buffer_overflow = Some("drop_newest".into());
    let d = TestDaemon::start(opts).await;
    let mut c = d.client().await;
    // Two engines declared; only celery's events are refused.
    c.hello("full-spool", &["celery", "rq"]).await.unwrap();
    let fill: Vec<_> = (0..1000)
        .map(|i| support::event(&format!("t{i}"), "task.received"))
        .collect();
    assert_eq!(c.send_durable(&fill).await.unwrap(), 1000);
    let more: Vec<_> = (0..5)
        .map(|i| support::event(&format!("late{i}"), "task.received"))
        .collect();
    c.send(&more).await.unwrap();
    let s = wait_stats(&d, 10, "5 events refused for a full spool", |s| {
        s.get("dropped_by_reason")
            .and_then(|r| r.get("spool_full"))
            .and_then(Value::as_u64)
            == Some(5)
    })
    .await;
    assert_eq!(num(&s, "dropped"), 5, "{s:?}");
    let seen = brain.seen.clone();
    let celery_drops = |p: &Value| {
        p.get("telemetry_loss")
            .and_then(|t| t.get("adapter_events"))
            .and_then(|a| a.get("celery"))
            .and_then(Value::as_u64)
    };
    wait_for(10, "an agent_status counting the 5 celery events", || {
        seen.status_frames
            .lock()
            .unwrap()
            .iter()
            .any(|(t, p)| t == "agent_status" && celery_drops(p) == Some(5))
    })
    .await;
    // The heartbeat carries the same value; dropped_events stays the total.
    let hb = seen
        .status_frames
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(t, _)| t == "heartbeat")
        .map(|(_, p)| p.clone())
        .unwrap();
    assert_eq!(celery_drops(&hb), Some(5), "{hb:?}");
    // Counted under the refused events' own engine, not every declared one.
    let rq_drops = hb
        .get("telemetry_loss")
        .and_then(|t| t.get("adapter_events"))
        .and_then(|a| a.get("rq"))
        .and_then(Value::as_u64);
    assert_eq!(rq_drops.unwrap_or(0), 0, "{hb:?}");
    assert_eq!(hb.get("dropped_events").and_then(Value::as_u64), Some(5));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_reports_the_failures_before_the_session() {
    // Every handshake refused (connection class) until the brain is fixed.
    let brain = FakeBrain::start(Behavior {
        close_handshake_with: Some(1011),
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let s = wait_stats(&d, 20, "two failed attempts", |s| {
        s.get("failures_by_class")
            .and_then(|f| f.get("connection"))
            .and_then(Value::as_u64)
            >= Some(2)
    })
    .await;
    assert_eq!(num(&s, "connects"), 0, "{s:?}");
    brain.set_behavior(Behavior::default());
    let s = stats_once_connected(&d, 40, "connected").await;
    let failures = s
        .get("failures_by_class")
        .and_then(|f| f.get("connection"))
        .and_then(Value::as_u64)
        .unwrap();
    agent_status_sent(&brain).await;
    let st = last_status(&brain).unwrap();
    assert_eq!(
        st.get("connection_failure_streak").and_then(Value::as_u64),
        Some(failures),
        "{st:?}"
    );
    assert_eq!(
        st.get("auth_failure_streak").and_then(Value::as_u64),
        Some(0)
    );
    assert!(st
        .get("last_successful_connect_at")
        .and_then(Value::as_str)
        .is_some());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_pushed_into_the_session_closed_for_the_second_hello_is_answered() {
    // The brain pushes a pending command right after the first hello_ack;
    // the daemon closes that session for its contract line's hello.
    let mut params = Value::empty_map();
    params.insert("engine", "celery");
    params.insert("worker_name", "celery@nowhere");
    let mut target = Value::empty_map();
    target.insert("type", "worker");
    target.insert("id", "celery@nowhere");
    let mut p = Value::empty_map();
    p.insert("action", "restart_worker");
    p.insert("target", target);
    p.insert("parameters", params);
    p.insert("timeout_seconds", 60u64);
    p.insert("delivery_claim_token", "claim-first-session");
    let id = "5b0e8a4e-0d7c-4f0e-9a43-3f1c2b7d9e10";
    // An activation is bound to the session it was sent into: left alone
    // (the brain sends a new one after every hello).
    let mut activate = Value::empty_map();
    activate.insert("action", "schedule.external.activate");
    let mut target = Value::empty_map();
    target.insert("type", "scheduler");
    target.insert("id", "celery-beat");
    activate.insert("target", target);
    activate.insert("parameters", Value::empty_map());
    activate.insert("delivery_claim_token", "claim-activation");
    let activation = "7c1d9f2a-3b4e-4c5d-8e6f-0a1b2c3d4e5f";
    let brain = FakeBrain::start(Behavior {
        brain_version: Some("1.12.0".into()),
        commands_after_hello: vec![(activation.to_string(), activate), (id.to_string(), p)],
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    wait_for(10, "the command's ack and result", || {
        brain.command_frames(id).len() >= 2
    })
    .await;
    assert_eq!(agent_versions(&brain), ["0.0.0", "1.12.0"]);
    let frames = brain.command_frames(id);
    assert_eq!(frames[0].0, "command_ack", "{frames:?}");
    assert_eq!(
        frames[0]
            .1
            .get("delivery_claim_token")
            .and_then(Value::as_str),
        Some("claim-first-session")
    );
    // No local process runs it: answered failed, with the reason.
    assert_eq!(frames[1].0, "command_result", "{frames:?}");
    assert_eq!(
        frames[1].1.get("status").and_then(Value::as_str),
        Some("failed"),
        "{frames:?}"
    );
    assert!(
        frames[1]
            .1
            .get("error")
            .and_then(Value::as_str)
            .is_some_and(|e| !e.is_empty()),
        "{frames:?}"
    );
    assert!(brain.command_frames(activation).is_empty());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_brain_hands_over_late_is_not_lost_to_the_second_hello() {
    // The brain pushes pending commands into a new session only some time
    // after its hello_ack (its own database work first); a close arriving
    // before that makes the push fail. The daemon waits for the hand-over
    // (the ack of an empty batch the brain reads after it) before closing
    // the first session.
    let mut params = Value::empty_map();
    params.insert("engine", "celery");
    params.insert("task_id", "late-hand-over");
    let mut target = Value::empty_map();
    target.insert("type", "task");
    target.insert("id", "celery:late-hand-over");
    let mut p = Value::empty_map();
    p.insert("action", "cancel_task");
    p.insert("target", target);
    p.insert("parameters", params);
    p.insert("timeout_seconds", 60u64);
    let id = "0c9a7e1d-2b3f-4a5e-8c6d-7e8f9a0b1c2d";
    let brain = FakeBrain::start(Behavior {
        brain_version: Some("1.13.0".into()),
        commands_after_hello: vec![(id.to_string(), p)],
        hand_over_after: Some(std::time::Duration::from_millis(400)),
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    wait_for(15, "the command's ack and result", || {
        brain.command_frames(id).len() >= 2
    })
    .await;
    assert!(
        brain.seen.commands_not_pushed.lock().unwrap().is_empty(),
        "the first session was closed before the brain handed it the command"
    );
    assert_eq!(agent_versions(&brain), ["0.0.0", "1.13.0"]);
    let frames = brain.command_frames(id);
    assert_eq!(frames[0].0, "command_ack", "{frames:?}");
    assert_eq!(frames[1].0, "command_result", "{frames:?}");
    // The only batch of the first session is the empty one that waited
    // for the hand-over.
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    assert_eq!(batches.first(), Some(&Vec::new()), "{batches:?}");
    let s = stats_once_connected(&d, 10, "connected").await;
    assert_eq!(num(&s, "contract_rehellos"), 1, "{s:?}");
    d.stop().await.unwrap();
}
