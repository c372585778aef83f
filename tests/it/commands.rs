//! Commands from a fake brain through a whole daemon to local clients:
//! acked at once, routed by engine and action, answered in every case, and
//! never run twice when the brain delivers the same command again.

use crate::support;

use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::{brain_command, options, text, TestDaemon};
use z4j_agentd::protocol::Value;

fn cancel(engine: &str, task: &str) -> Value {
    let mut target = Value::empty_map();
    target.insert("type", "task");
    target.insert("id", format!("{engine}:{task}"));
    target.insert("engine", engine);
    let mut params = Value::empty_map();
    params.insert("engine", engine);
    params.insert("task_id", task);
    brain_command("cancel_task", target, params, "claim-xyz".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_client_for_its_engine_and_its_answer_the_brain() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut celery = d.client().await;
    celery
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let mut rq = d.client().await;
    rq.hello_with_capabilities("rq-worker", &[("rq", &["cancel_task"])])
        .await
        .unwrap();

    let id = "11111111-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("rq", "t-9"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), rq.next_command())
        .await
        .expect("the rq client gets it")
        .unwrap();
    assert_eq!(text(&cmd, "id"), id);
    assert_eq!(text(&cmd, "action"), "cancel_task");
    assert_eq!(
        cmd.get("parameters").map(|p| text(p, "task_id")),
        Some("t-9")
    );
    let mut result = Value::empty_map();
    result.insert("revoked", true);
    rq.command_result(id, true, Some(result), None)
        .await
        .unwrap();

    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(f[0].0, "command_ack", "acked first: {f:?}");
    assert_eq!(text(&f[0].1, "delivery_claim_token"), "claim-xyz");
    assert_eq!(f[1].0, "command_result");
    assert_eq!(text(&f[1].1, "status"), "success");
    assert_eq!(
        f[1].1.get("result").and_then(|r| r.get("revoked")),
        Some(&Value::Bool(true))
    );
    assert_eq!(text(&f[1].1, "delivery_claim_token"), "claim-xyz");
    // The celery client got nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), celery.next_command())
            .await
            .is_err()
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_nobody_runs_fails_at_once_naming_the_host() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let id = "22222222-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("huey", "t-1"));
    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(f[1].0, "command_result");
    assert_eq!(text(&f[1].1, "status"), "failed");
    let e = text(&f[1].1, "error");
    assert!(
        e.contains("testhost") && e.contains("huey") && e.contains("cancel_task"),
        "{e}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_delivered_twice_runs_once_and_is_acked_twice() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut worker = d.client().await;
    worker
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let id = "33333333-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("celery", "t-1"));
    let first = worker.next_command().await.unwrap();
    assert_eq!(text(&first, "id"), id);
    // Delivered again while it runs: acked, not sent to the worker again.
    brain.send_command(id, cancel("celery", "t-1"));
    let f = brain.wait_command_frames(id, 2).await;
    assert!(f.iter().all(|(t, _)| t == "command_ack"), "{f:?}");
    worker.command_result(id, true, None, None).await.unwrap();
    brain.wait_command_frames(id, 3).await;
    // Delivered again after the answer: acked and answered again from memory.
    brain.send_command(id, cancel("celery", "t-1"));
    let f = brain.wait_command_frames(id, 5).await;
    let kinds: Vec<&str> = f.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "command_ack",
            "command_ack",
            "command_result",
            "command_ack",
            "command_result"
        ]
    );
    assert_eq!(f[2].1, f[4].1, "the same answer");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), worker.next_command())
            .await
            .is_err(),
        "the worker ran it once"
    );
    let s = d.client().await.stats().await.unwrap();
    let cmds = s.get("commands").unwrap();
    assert_eq!(cmds.get("received").and_then(Value::as_u64), Some(1));
    assert_eq!(cmds.get("succeeded").and_then(Value::as_u64), Some(1));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_command_makes_it_fail() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut worker = d.client().await;
    worker
        .hello_with_capabilities("doomed-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let id = "44444444-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("celery", "t-1"));
    worker.next_command().await.unwrap();
    drop(worker);
    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(text(&f[1].1, "status"), "failed");
    assert!(
        text(&f[1].1, "error").contains("(doomed-worker) disconnected"),
        "{f:?}"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_gets_an_error_and_the_brain_a_failure() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut worker = d.client().await;
    worker
        .hello_with_capabilities("sloppy-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let id = "55555555-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("celery", "t-1"));
    worker.next_command().await.unwrap();
    let mut not_a_map = Value::empty_map();
    not_a_map.insert("x", 1i64);
    let err = worker
        .command_result(id, true, Some(Value::Array(vec![not_a_map])), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad_command_result"), "{err}");
    let f = brain.wait_command_frames(id, 2).await;
    assert_eq!(text(&f[1].1, "status"), "failed");
    assert!(text(&f[1].1, "error").contains("malformed"));
    // The session with the brain is intact: no protocol violation.
    assert_eq!(
        d.stats.connects.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_runtime_features_reach_the_brain_in_a_new_hello() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut o = options(&brain.url);
    o.capabilities = Some("huey:cancel_task".into());
    let d = TestDaemon::start(o).await;
    let mut c = d.client().await;
    // A client declaring runtime features, the external schedule protocol's among them.
    let mut hello = Value::empty_map();
    hello.insert("type", "hello");
    hello.insert("process", "celery-worker");
    let mut caps = Value::empty_map();
    caps.insert(
        "celery",
        Value::Array(vec!["cancel_task".into(), "retry_by_reference_v1".into()]),
    );
    hello.insert("capabilities", caps);
    hello.insert(
        "runtime_features",
        Value::Array(vec![
            "retry_by_reference".into(),
            "external_schedule_protocol_v1".into(),
        ]),
    );
    hello.insert("ack_id", 1u64);
    c.write_raw(&hello).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let last = loop {
        let hellos = brain.seen.hellos.lock().unwrap().clone();
        let last = hellos.last().cloned();
        if let Some(h) = &last {
            if h.get("capabilities")
                .and_then(|c| c.get("celery"))
                .is_some()
            {
                break h.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "re-handshake in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let caps = last.get("capabilities").unwrap();
    let list = |e: &str| -> Vec<String> {
        caps.get(e)
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(list("celery"), ["cancel_task", "retry_by_reference_v1"]);
    assert_eq!(list("huey"), ["cancel_task"]);
    let Some(Value::Array(features)) = last.get("runtime_features") else {
        panic!("runtime_features list")
    };
    assert_eq!(
        features,
        &vec![
            Value::from("external_schedule_protocol_v1"),
            Value::from("retry_by_reference")
        ]
    );
    let Some(Value::Array(engines)) = last.get("engines") else {
        panic!("engines")
    };
    assert_eq!(engines, &vec![Value::from("celery"), Value::from("huey")]);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_still_running_at_shutdown_are_answered_before_the_close() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut worker = d.client().await;
    worker
        .hello_with_capabilities("slow-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let id = "66666666-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("celery", "t-1"));
    worker.next_command().await.unwrap();
    d.stop().await.unwrap();
    let f = brain.command_frames(id);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(text(&f[1].1, "status"), "failed");
    assert!(text(&f[1].1, "error").contains("is shutting down"), "{f:?}");
    // And the daemon closed the session cleanly after it.
    assert_eq!(*brain.seen.client_close_codes.lock().unwrap(), [1000]);
}
