//! Worker commands through a whole daemon: a local process that sent a
//! `worker.online` event for a worker gets that worker's commands, and a
//! worker nobody here hosts is refused at once, naming the host.

use crate::support;

use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::{brain_command, TestDaemon};
use z4j_agentd::client::Client;
use z4j_agentd::protocol::Value;

fn restart(worker: &str) -> Value {
    let mut target = Value::empty_map();
    target.insert("type", "worker");
    target.insert("id", worker);
    target.insert("engine", "celery");
    let mut params = Value::empty_map();
    params.insert("worker_name", worker);
    params.insert("engine", "celery");
    brain_command("restart_worker", target, params, Value::Null)
}

/// A client of `d` that runs `restart_worker` for celery and has announced
/// `worker` with a `worker.online` event (acknowledged).
async fn hosting(d: &TestDaemon, worker: &str) -> Client {
    let mut c = d.client().await;
    c.hello_with_capabilities("celery-worker", &[("celery", &["restart_worker"])])
        .await
        .unwrap();
    let event: Value = serde_json::from_str(&format!(
        r#"{{"type":"event","ack_id":"online","kind":"worker.online","engine":"celery","data":{{"worker":"{worker}"}}}}"#
    ))
    .unwrap();
    c.write_raw(&event).await.unwrap();
    loop {
        let r = c.read_reply().await.unwrap();
        match r.get("type").and_then(Value::as_str) {
            Some("ack") => return c,
            Some("error") => panic!("worker.online refused: {r:?}"),
            _ => continue,
        }
    }
}

async fn result_of(brain: &FakeBrain, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, p)) = brain
            .command_frames(id)
            .into_iter()
            .find(|(t, _)| t == "command_result")
        {
            return p;
        }
        assert!(tokio::time::Instant::now() < deadline, "no result for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_reaches_only_the_process_that_announced_the_worker() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::connected_to(&brain).await;
    let mut a = hosting(&d, "wA@host").await;
    let mut b = hosting(&d, "wB@host").await;

    let id = "33333333-2222-4333-8444-555555555555";
    brain.send_command(id, restart("wB@host"));
    let cmd = tokio::time::timeout(Duration::from_secs(10), b.next_command())
        .await
        .expect("the host of wB@host gets it")
        .unwrap();
    assert_eq!(cmd.get("id").and_then(Value::as_str), Some(id));
    b.command_result(id, true, None, None).await.unwrap();
    let r = result_of(&brain, id).await;
    assert_eq!(r.get("status").and_then(Value::as_str), Some("success"));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.next_command())
            .await
            .is_err(),
        "the other process got nothing"
    );

    let id = "44444444-2222-4333-8444-555555555555";
    brain.send_command(id, restart("wZ@elsewhere"));
    let r = result_of(&brain, id).await;
    assert_eq!(r.get("status").and_then(Value::as_str), Some("failed"));
    let e = r.get("error").and_then(Value::as_str).unwrap_or("");
    assert!(
        e.starts_with("z4j-agentd on testhost")
            && e.contains(
                "no connected local process hosts worker \"wZ@elsewhere\" for engine \"celery\""
            ),
        "{e}"
    );
    d.stop().await.unwrap();
}
