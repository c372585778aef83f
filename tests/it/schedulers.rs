//! Schedulers through a whole daemon and a fake brain: a process that
//! declares a scheduler is advertised with its capabilities and the
//! external schedule feature, the brain's activation reaches it with its
//! claim token echoed, a restart of that process makes the daemon say
//! hello again (the brain activates a stream only after a hello), and a
//! second process declaring the same scheduler is refused until the first
//! leaves.

use crate::support;

use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::{brain_command, strings_at, TestDaemon};
use z4j_agentd::client::Client;
use z4j_agentd::protocol::Value;

const SCHEDULER: &str = "celery-beat";

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(*s)).collect())
}

/// z4j-celerybeat's `hello`; returns the replies up to its `hello_ack`.
async fn beat_hello(c: &mut Client, ack_id: u64) -> Vec<Value> {
    let mut caps = Value::empty_map();
    caps.insert(
        SCHEDULER,
        strings(&[
            "external_schedule_stable_snapshot_v1",
            "list",
            "trigger_now",
        ]),
    );
    let mut m = Value::empty_map();
    m.insert("type", "hello");
    m.insert("process", "celery-beat");
    m.insert("schedulers", strings(&[SCHEDULER]));
    m.insert("capabilities", caps);
    m.insert(
        "runtime_features",
        strings(&["external_schedule_protocol_v1"]),
    );
    m.insert("ack_id", ack_id);
    c.write_raw(&m).await.unwrap();
    let mut replies = Vec::new();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_reply())
            .await
            .expect("a reply to hello")
            .unwrap();
        let done = r.get("type").and_then(Value::as_str) == Some("hello_ack");
        replies.push(r);
        if done {
            return replies;
        }
    }
}

fn activation(claim: &str) -> Value {
    let mut target = Value::empty_map();
    target.insert("type", "scheduler");
    target.insert("id", SCHEDULER);
    target.insert("scheduler", SCHEDULER);
    let mut params = Value::empty_map();
    params.insert("scheduler", SCHEDULER);
    params.insert("owner", SCHEDULER);
    params.insert("epoch_number", 1u64);
    brain_command("schedule.external.activate", target, params, claim.into())
}

/// Until the brain has seen more than `after` hellos, the last of which
/// lists the scheduler; returns how many it has seen.
async fn hello_with_scheduler(brain: &FakeBrain, after: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let h = brain.hellos();
        if h.len() > after && strings_at(h.last().unwrap(), "schedulers") == [SCHEDULER] {
            return h.len();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hello listing the scheduler after {after}: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_is_advertised_activated_and_activated_again_after_its_process_restarts() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut beat = d.client().await;
    beat_hello(&mut beat, 1).await;
    let n = hello_with_scheduler(&brain, 0).await;
    let h = brain.hellos().last().cloned().unwrap();
    assert!(
        strings_at(&h, "engines").is_empty(),
        "a scheduler is not an engine: {h:?}"
    );
    assert_eq!(
        strings_at(h.get("capabilities").unwrap(), SCHEDULER),
        [
            "external_schedule_stable_snapshot_v1",
            "list",
            "trigger_now"
        ]
    );
    assert_eq!(
        strings_at(&h, "runtime_features"),
        ["external_schedule_protocol_v1"]
    );

    // The activation reaches the scheduler's process; ack and result carry
    // its claim token.
    let id = "44444444-2222-4333-8444-555555555555";
    brain.send_command(id, activation("claim-a"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), beat.next_command())
        .await
        .expect("the scheduler's process gets the activation")
        .unwrap();
    assert_eq!(
        cmd.get("action").and_then(Value::as_str),
        Some("schedule.external.activate")
    );
    beat.command_result(id, true, Some(Value::empty_map()), None)
        .await
        .unwrap();
    let f = brain.wait_command_frames(id, 2).await;
    for (kind, payload) in &f {
        assert_eq!(
            payload.get("delivery_claim_token").and_then(Value::as_str),
            Some("claim-a"),
            "{kind}"
        );
    }

    // The process restarts: same hello, so the same advertisement, but the
    // new process has no activation. The daemon says hello again, once,
    // still listing the scheduler.
    drop(beat);
    let mut again = d.client().await;
    beat_hello(&mut again, 1).await;
    let m = hello_with_scheduler(&brain, n).await;
    assert_eq!(m, n + 1, "one new hello: {:?}", brain.hellos());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(brain.hellos().len(), n + 1, "and no more once it was sent");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_declaring_the_same_scheduler_is_refused_with_the_reason() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut first = d.client().await;
    let replies = beat_hello(&mut first, 1).await;
    assert_eq!(replies.len(), 1, "accepted whole: {replies:?}");
    let mut second = d.client().await;
    let replies = beat_hello(&mut second, 7).await;
    let error = replies
        .iter()
        .find(|r| r.get("type").and_then(Value::as_str) == Some("error"))
        .unwrap_or_else(|| panic!("an error before the hello_ack: {replies:?}"));
    assert_eq!(
        error.get("code").and_then(Value::as_str),
        Some("bad_message")
    );
    assert_eq!(error.get("ack_id").and_then(Value::as_u64), Some(7));
    let message = error.get("message").and_then(Value::as_str).unwrap();
    assert!(
        message.contains("\"celery-beat\" is already declared by pid"),
        "{message}"
    );
    // Commands for the scheduler still go to the first.
    let id = "55555555-2222-4333-8444-555555555555";
    brain.send_command(id, activation("claim-b"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), first.next_command())
        .await
        .expect("the first process gets it")
        .unwrap();
    assert_eq!(cmd.get("id").and_then(Value::as_str), Some(id));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.next_command())
            .await
            .is_err()
    );
    // When the first leaves, the second takes the scheduler over.
    drop(first);
    let id = "66666666-2222-4333-8444-555555555555";
    let stats = d.stats.clone();
    support::wait_for(10, "the first connection's end seen", || {
        stats.clients.len() == 1
    })
    .await;
    brain.send_command(id, activation("claim-c"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), second.next_command())
        .await
        .expect("the second process gets it now")
        .unwrap();
    assert_eq!(cmd.get("id").and_then(Value::as_str), Some(id));
    d.stop().await.unwrap();
}
