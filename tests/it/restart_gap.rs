//! A restart does not empty the agent at the brain: the first `hello` of a
//! restarted daemon carries what the processes declared before, a command
//! for what only that memory advertises is refused at once with why, and
//! once the restart grace is over without the process coming back, one
//! more `hello` leaves it out (and none is sent when it does come back).

use crate::support;

use std::path::Path;
use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::{brain_command, strings_at, TestDaemon};
use z4j_agentd::protocol::Value;

/// Starts a daemon for `brain` with this restart grace, its spool and
/// socket under `dir` (which outlives it), and waits until it is connected.
async fn start_run(brain: &FakeBrain, dir: &Path, grace_s: u64) -> TestDaemon {
    let mut opts = support::options(&brain.url);
    opts.restart_grace_seconds = Some(grace_s.to_string());
    let d = TestDaemon::start_in(opts, dir).await;
    support::wait_uplink_connected(&d.stats).await;
    d
}

/// The actions a `hello` advertises for `engine`.
fn actions(hello: &Value, engine: &str) -> Vec<String> {
    hello
        .get("capabilities")
        .map(|c| strings_at(c, engine))
        .unwrap_or_default()
}

fn engines(hello: &Value) -> Vec<String> {
    strings_at(hello, "engines")
}

/// Waits until the fake saw `n` hellos.
async fn hello_count(brain: &FakeBrain, n: usize, secs: u64, what: &str) -> Vec<Value> {
    support::wait_for(secs, what, || brain.hellos().len() >= n).await;
    brain.hellos()
}

/// A first run in which a Celery worker declared `cancel_task`, until the
/// brain acknowledged a `hello` that advertises it; then stopped.
async fn first_run_with_a_worker(brain: &FakeBrain, dir: &Path) {
    let run = start_run(brain, dir, 60).await;
    let mut worker = run.client().await;
    worker
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let stats = run.stats.clone();
    support::wait_for(15, "the re-handshake advertises celery", || {
        stats.uplink().advertised.engines == ["celery"]
    })
    .await;
    drop(worker);
    run.stop().await.unwrap();
}

fn cancel(engine: &str) -> Value {
    let mut target = Value::empty_map();
    target.insert("type", "task");
    target.insert("id", format!("{engine}:t-1"));
    target.insert("engine", engine);
    brain_command("cancel_task", target, Value::empty_map(), "claim-1".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_first_hello_carries_the_engines_until_the_grace_ends() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    first_run_with_a_worker(&brain, dir.path()).await;
    let before = brain.hellos().len();

    let run = start_run(&brain, dir.path(), 3).await;
    let seen = hello_count(&brain, before + 1, 10, "the restarted daemon's hello").await;
    let first = &seen[before];
    assert_eq!(engines(first), ["celery"], "{first:?}");
    assert_eq!(actions(first, "celery"), ["cancel_task"]);
    let mut c = run.client().await;
    let report = c.stats().await.unwrap();
    let remembered = report.get("remembered").expect("reported");
    assert_eq!(
        remembered.get("engines"),
        Some(&Value::Array(vec!["celery".into()]))
    );
    assert!(
        remembered
            .get("until")
            .and_then(Value::as_str)
            .is_some_and(|u| u.ends_with('Z')),
        "{remembered:?}"
    );
    drop(c);

    // A command for it fails at once, saying why.
    let id = "33333333-2222-4333-8444-555555555555";
    brain.send_command(id, cancel("celery"));
    support::wait_for(10, "the command's answer", || {
        brain.command_frames(id).len() >= 2
    })
    .await;
    let answer = &brain.command_frames(id)[1];
    assert_eq!(answer.0, "command_result");
    let error = answer.1.get("error").and_then(Value::as_str).unwrap_or("");
    assert!(
        error.contains("testhost")
            && error.contains("has not reconnected yet")
            && error.contains("\"celery\"")
            && error.contains("\"cancel_task\"")
            && error.contains(" s more"),
        "{error}"
    );

    // No worker comes back: after the grace (3 s) and the debounce, one
    // more hello without celery.
    let seen = hello_count(&brain, before + 2, 15, "the hello after the grace").await;
    let last = &seen[before + 1];
    assert!(engines(last).is_empty(), "{last:?}");
    assert!(actions(last, "celery").is_empty(), "{last:?}");
    let mut c = run.client().await;
    assert_eq!(
        c.stats().await.unwrap().get("remembered"),
        Some(&Value::Null)
    );
    drop(c);
    run.stop().await.unwrap();
    assert_eq!(brain.hellos().len(), before + 2, "exactly one more");

    // And the next start remembers no celery.
    let run = start_run(&brain, dir.path(), 3).await;
    let seen = hello_count(&brain, before + 3, 10, "the third run's hello").await;
    assert!(engines(&seen[before + 2]).is_empty());
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_comes_back_within_the_grace_causes_no_second_hello() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    first_run_with_a_worker(&brain, dir.path()).await;
    let before = brain.hellos().len();

    let run = start_run(&brain, dir.path(), 3).await;
    hello_count(&brain, before + 1, 10, "the restarted daemon's hello").await;
    let mut worker = run.client().await;
    worker
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    let mut c = run.client().await;
    let stats = c.stats().await.unwrap();
    assert_eq!(
        stats.get("remembered"),
        Some(&Value::Null),
        "declared again"
    );
    // Past the grace and the debounce: still the one hello.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(brain.hellos().len(), before + 1, "{:?}", brain.hellos());
    assert_eq!(
        brain
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    drop(c);
    drop(worker);
    run.stop().await.unwrap();
}
