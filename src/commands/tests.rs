use super::test_support::{disconnect, received, register_with, stats};
use super::*;
use crate::clients::Registration;
use crate::ingest::ReplyQueue;

/// A client as ingest registers it: its peer, what its `hello` declared,
/// and its reply queue.
struct TestClient {
    pid: i32,
    hello: Registration,
    tx: ReplyQueue,
}

/// A connection declaring `caps`; returns it and what it receives.
fn conn(caps: &[(&str, &[&str])], pid: i32) -> (TestClient, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = ReplyQueue::new();
    let capabilities = caps
        .iter()
        .map(|(e, a)| (e.to_string(), a.iter().map(|s| s.to_string()).collect()))
        .collect();
    let hello = Registration {
        process: Some(format!("worker-{pid}")),
        capabilities,
        ..Registration::default()
    };
    (TestClient { pid, hello, tx }, rx)
}

/// What ingest does for a connection and its `hello`: the client registry,
/// which the router reads, gets it.
fn register(router: &Router, id: u64, c: TestClient) {
    register_with(router, id, c.pid, c.hello, c.tx);
}

fn cmd(id: &str, action: &str, engine: Option<&str>, timeout: u64) -> Command {
    let mut target = Value::empty_map();
    target.insert("type", "task");
    if let Some(e) = engine {
        target.insert("engine", e);
    }
    let mut params = Value::empty_map();
    params.insert("task_id", "t-1");
    Command {
        id: id.to_string(),
        action: action.to_string(),
        target,
        parameters: params,
        timeout_seconds: timeout,
        claim: Value::from("claim-1"),
    }
}

fn answer(id: &str, status: &str) -> Value {
    let mut m = Value::empty_map();
    m.insert("type", "command_result");
    m.insert("id", id);
    m.insert("status", status);
    let mut r = Value::empty_map();
    r.insert("revoked", true);
    m.insert("result", r);
    m
}

#[tokio::test]
async fn a_command_goes_to_the_connection_that_declared_its_engine_and_action() {
    let (router, mut results) = Router::new(stats());
    let (celery, mut celery_rx) = conn(&[("celery", &["cancel_task"])], 10);
    let (rq, mut rq_rx) = conn(&[("rq", &["cancel_task"])], 20);
    register(&router, 1, celery);
    register(&router, 2, rq);

    let d = router.dispatch(&cmd("c-1", "cancel_task", Some("rq"), 60), "web-1");
    assert_eq!(
        d,
        Dispatch::Started {
            who: "pid 20 (worker-20)".into()
        }
    );
    assert!(received(&mut celery_rx).is_none());
    let m = received(&mut rq_rx).expect("rq worker got the command");
    assert_eq!(m["type"], "command");
    assert_eq!(m["id"], "c-1");
    assert_eq!(m["action"], "cancel_task");
    assert_eq!(m["target"]["engine"], "rq");
    assert_eq!(m["parameters"]["task_id"], "t-1");
    assert_eq!(m["timeout_seconds"], 54.0);

    router.on_result(2, &answer("c-1", "success")).unwrap();
    let r = results.try_recv().unwrap();
    assert!(r.success);
    assert_eq!(r.claim, Value::from("claim-1"));
    let p = r.payload();
    assert_eq!(p.get("status").and_then(Value::as_str), Some("success"));
    assert_eq!(
        p.get("result").and_then(|r| r.get("revoked")),
        Some(&Value::Bool(true))
    );
}

#[tokio::test]
async fn nobody_to_run_it_fails_at_once_naming_host_engine_and_action() {
    let (router, _results) = Router::new(stats());
    let (celery, _rx) = conn(&[("celery", &["retry_task"])], 10);
    register(&router, 1, celery);
    let Dispatch::Failed(r) =
        router.dispatch(&cmd("c-2", "cancel_task", Some("celery"), 60), "web-1")
    else {
        panic!("expected an immediate failure")
    };
    assert!(!r.success);
    let e = r.error.unwrap();
    assert!(
        e.contains("web-1") && e.contains("\"celery\"") && e.contains("\"cancel_task\""),
        "{e}"
    );
    assert_eq!(r.claim, Value::from("claim-1"));
}

#[tokio::test]
async fn a_redelivered_command_is_not_run_twice() {
    let (router, mut results) = Router::new(stats());
    let (celery, mut rx) = conn(&[("celery", &["cancel_task"])], 10);
    register(&router, 1, celery);
    let c = cmd("c-3", "cancel_task", Some("celery"), 60);
    assert!(matches!(router.dispatch(&c, "h"), Dispatch::Started { .. }));
    assert!(received(&mut rx).is_some());
    assert_eq!(router.dispatch(&c, "h"), Dispatch::DuplicateRunning);
    assert!(received(&mut rx).is_none(), "not sent to the process again");
    router.on_result(1, &answer("c-3", "success")).unwrap();
    let first = results.try_recv().unwrap();
    assert_eq!(router.dispatch(&c, "h"), Dispatch::DuplicateDone(first));
    assert!(received(&mut rx).is_none());
    // An immediate failure is remembered too.
    let f = cmd("c-4", "purge_queue", Some("celery"), 60);
    let Dispatch::Failed(r) = router.dispatch(&f, "h") else {
        panic!()
    };
    assert_eq!(router.dispatch(&f, "h"), Dispatch::DuplicateDone(r));
}

#[tokio::test]
async fn a_malformed_answer_is_refused_and_the_brain_gets_failed() {
    let (router, mut results) = Router::new(stats());
    let (celery, _rx) = conn(&[("celery", &["cancel_task"])], 10);
    register(&router, 1, celery);
    router.dispatch(&cmd("c-5", "cancel_task", Some("celery"), 60), "h");
    let e = router.on_result(1, &answer("c-5", "ok")).unwrap_err();
    assert_eq!(e.code, "bad_command_result");
    assert!(
        e.message.contains("\"success\" or \"failed\""),
        "{}",
        e.message
    );
    let r = results.try_recv().unwrap();
    assert!(!r.success);
    assert!(r.error.unwrap().contains("malformed"));

    // A result that is not a map.
    router.dispatch(&cmd("c-6", "cancel_task", Some("celery"), 60), "h");
    let mut m = answer("c-6", "success");
    m.insert("result", "done");
    assert_eq!(
        router.on_result(1, &m).unwrap_err().code,
        "bad_command_result"
    );
    assert!(!results.try_recv().unwrap().success);
}

#[tokio::test]
async fn answers_for_unknown_or_foreign_commands_are_refused() {
    let (router, mut results) = Router::new(stats());
    let (a, _rx_a) = conn(&[("celery", &["cancel_task"])], 10);
    let (b, _rx_b) = conn(&[("rq", &["cancel_task"])], 20);
    register(&router, 1, a);
    register(&router, 2, b);
    assert_eq!(
        router
            .on_result(1, &answer("nope", "success"))
            .unwrap_err()
            .code,
        "unknown_command"
    );
    router.dispatch(&cmd("c-7", "cancel_task", Some("celery"), 60), "h");
    assert_eq!(
        router
            .on_result(2, &answer("c-7", "success"))
            .unwrap_err()
            .code,
        "unknown_command"
    );
    assert!(results.try_recv().is_err(), "nothing relayed");
    router.on_result(1, &answer("c-7", "failed")).unwrap();
    assert!(!results.try_recv().unwrap().success);
}

#[tokio::test]
async fn a_process_that_disconnects_mid_command_fails_it() {
    let (router, mut results) = Router::new(stats());
    let (a, _rx) = conn(&[("celery", &["cancel_task"])], 10);
    register(&router, 1, a);
    router.dispatch(&cmd("c-8", "cancel_task", Some("celery"), 60), "h");
    disconnect(&router, 1);
    let r = results.try_recv().unwrap();
    assert_eq!(r.id, "c-8");
    assert!(r.error.unwrap().contains("pid 10 (worker-10) disconnected"));
    // Gone from routing too.
    assert!(matches!(
        router.dispatch(&cmd("c-9", "cancel_task", Some("celery"), 60), "h"),
        Dispatch::Failed(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn no_answer_within_the_budget_fails_before_the_brain_times_out() {
    let (router, mut results) = Router::new(stats());
    let (a, _rx) = conn(&[("celery", &["cancel_task"])], 10);
    register(&router, 1, a);
    router.dispatch(&cmd("c-10", "cancel_task", Some("celery"), 20), "h");
    tokio::time::sleep(Duration::from_secs(17)).await;
    assert!(results.try_recv().is_err(), "still within 18 s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = results.recv().await.unwrap();
    assert!(r.error.unwrap().contains("did not answer within 18 s"));
    // A late answer is refused, not relayed twice.
    assert_eq!(
        router
            .on_result(1, &answer("c-10", "success"))
            .unwrap_err()
            .code,
        "unknown_command"
    );
}

#[tokio::test]
async fn the_least_busy_connection_wins_then_the_oldest() {
    let (router, _results) = Router::new(stats());
    let (a, mut rx_a) = conn(&[("celery", &["cancel_task"])], 10);
    let (b, mut rx_b) = conn(&[("celery", &["cancel_task"])], 20);
    register(&router, 1, a);
    std::thread::sleep(Duration::from_millis(2));
    register(&router, 2, b);
    router.dispatch(&cmd("c-11", "cancel_task", Some("celery"), 60), "h");
    assert!(received(&mut rx_a).is_some(), "tie: the older connection");
    router.dispatch(&cmd("c-12", "cancel_task", Some("celery"), 60), "h");
    assert!(
        received(&mut rx_b).is_some(),
        "then the one with less in progress"
    );
}

#[tokio::test]
async fn a_connection_that_does_not_read_is_skipped() {
    let (router, _results) = Router::new(stats());
    let (tx, _rx_full) = ReplyQueue::new();
    while tx.try_send(b"filler".to_vec()).is_ok() {}
    let stuck = TestClient {
        pid: 30,
        hello: Registration {
            capabilities: [("celery".to_string(), vec!["cancel_task".to_string()])].into(),
            ..Registration::default()
        },
        tx,
    };
    register(&router, 1, stuck);
    let Dispatch::Failed(r) = router.dispatch(&cmd("c-13", "cancel_task", Some("celery"), 60), "h")
    else {
        panic!()
    };
    assert!(r.error.unwrap().contains("not reading"));
    let (ok, mut rx) = conn(&[("celery", &["cancel_task"])], 40);
    register(&router, 2, ok);
    assert!(matches!(
        router.dispatch(&cmd("c-14", "cancel_task", Some("celery"), 60), "h"),
        Dispatch::Started { .. }
    ));
    assert!(received(&mut rx).is_some());
}

#[test]
fn the_local_budget_leaves_a_margin() {
    let b = |t| cmd("x", "a", None, t).local_budget();
    assert_eq!(b(60), Duration::from_secs(54));
    assert_eq!(b(300), Duration::from_secs(290));
    assert_eq!(b(10), Duration::from_secs(8));
    assert_eq!(b(1), Duration::from_millis(500));
}

#[test]
fn the_engine_comes_from_the_target_or_the_parameters() {
    let mut c = cmd("x", "bulk_retry", None, 60);
    assert_eq!(c.engine(), None);
    let mut filter = Value::empty_map();
    filter.insert("engine", "rq");
    let mut p = Value::empty_map();
    p.insert("filter", filter);
    c.parameters = p;
    assert_eq!(c.engine(), Some("rq"));
}

#[tokio::test]
async fn old_command_ids_are_forgotten_after_the_window() {
    let (router, _results) = Router::new(stats());
    let first = cmd("old", "cancel_task", Some("celery"), 60);
    assert!(matches!(router.dispatch(&first, "h"), Dispatch::Failed(_)));
    for i in 0..SEEN_MAX {
        router.dispatch(
            &cmd(&format!("n-{i}"), "cancel_task", Some("celery"), 60),
            "h",
        );
    }
    // Over the cap: the oldest id is forgotten, the newest remembered.
    assert!(matches!(router.dispatch(&first, "h"), Dispatch::Failed(_)));
    let last = cmd(
        &format!("n-{}", SEEN_MAX - 1),
        "cancel_task",
        Some("celery"),
        60,
    );
    assert!(matches!(
        router.dispatch(&last, "h"),
        Dispatch::DuplicateDone(_)
    ));
}
