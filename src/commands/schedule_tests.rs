//! Routing of `schedule.*` commands, held activations and the claim token
//! of re-deliveries.

use super::test_support::{self, disconnect, json, received, stats, Rx};
use super::*;
use crate::clients::fixture::{beat_hello, worker_hello};
use crate::clients::Registration;

/// A connection (pid `id * 10`) whose `hello` is `hello`; returns what it
/// receives.
fn connect(router: &Router, id: u64, hello: Registration) -> Rx {
    test_support::connect(router, id, id as i32 * 10, hello)
}

/// A command as the brain sends it (`target` and `parameters` as JSON),
/// with its claim.
fn command(id: &str, action: &str, target: &str, parameters: &str, claim: &str) -> Command {
    Command {
        claim: Value::from(claim),
        ..test_support::command(id, action, target, parameters)
    }
}

/// `schedule.external.activate` for `scheduler`, as the brain sends it.
fn activation(id: &str, scheduler: &str, claim: &str) -> Command {
    command(
        id,
        "schedule.external.activate",
        &format!(r#"{{"type":"scheduler","id":"{scheduler}","scheduler":"{scheduler}"}}"#),
        &format!(r#"{{"scheduler":"{scheduler}","owner":"{scheduler}","epoch_number":1}}"#),
        claim,
    )
}

/// The connection holding `scheduler`.
fn holder(router: &Router, scheduler: &str) -> u64 {
    router
        .stats
        .clients
        .scheduler_holder(scheduler)
        .expect("a connection holds the scheduler")
        .id
}

fn success(id: &str) -> Value {
    json(&format!(
        r#"{{"type":"command_result","id":"{id}","status":"success","result":{{"ok":true}}}}"#
    ))
}

#[tokio::test]
async fn schedule_commands_go_to_the_process_that_declared_the_scheduler() {
    let (router, mut results) = Router::new(stats());
    let mut celery = connect(
        &router,
        1,
        worker_hello("celery", &["cancel_task", "schedule.fire"]),
    );
    let mut beat_rx = connect(&router, 2, beat_hello("celery-beat"));
    let mut other = connect(&router, 3, beat_hello("rq-scheduler"));
    // The scheduler named by target.scheduler, parameters.scheduler, or
    // target.id of a "scheduler" target; the action is not a capability.
    let cases = [
        command(
            "s-1",
            "schedule.external.activate",
            r#"{"type":"scheduler","id":"celery-beat","scheduler":"celery-beat"}"#,
            "{}",
            "k1",
        ),
        command(
            "s-2",
            "schedule.external.mutate",
            r#"{"type":"scheduler","id":"x"}"#,
            r#"{"scheduler":"celery-beat","operation":"trigger"}"#,
            "k2",
        ),
        command(
            "s-3",
            "schedule.trigger_now",
            r#"{"type":"scheduler","id":"celery-beat"}"#,
            "{}",
            "k3",
        ),
        command(
            "s-4",
            "schedule.external.control",
            r#"{"type":"schedule","id":"0b6f3c8e-2c4d-4b7a-9a51-1d2e3f405162","scheduler":"celery-beat"}"#,
            "{}",
            "k4",
        ),
    ];
    for c in &cases {
        let d = router.dispatch(c, "web-1");
        assert_eq!(
            d,
            Dispatch::Started {
                who: "pid 20 (celery-beat-process)".into()
            },
            "{}",
            c.id
        );
        let m = received(&mut beat_rx).expect("the scheduler's process got it");
        assert_eq!(m["id"], c.id.as_str());
        assert_eq!(m["action"], c.action.as_str());
        router.on_result(2, &success(&c.id)).unwrap();
        let r = results.try_recv().unwrap();
        assert!(r.success);
        assert_eq!(r.claim, c.claim, "the claim token is echoed");
    }
    assert!(received(&mut celery).is_none());
    assert!(received(&mut other).is_none());

    // schedule.fire runs a task: it goes by engine to an engine process.
    let fire = command(
        "s-5",
        "schedule.fire",
        r#"{"type":"schedule","id":"u1","engine":"celery"}"#,
        r#"{"task_name":"t"}"#,
        "k5",
    );
    assert!(matches!(
        router.dispatch(&fire, "web-1"),
        Dispatch::Started { .. }
    ));
    assert_eq!(received(&mut celery).unwrap()["action"], "schedule.fire");
    assert!(received(&mut beat_rx).is_none());
}

#[tokio::test]
async fn schedule_refusals_name_the_host_and_the_missing_scheduler() {
    let (router, _results) = Router::new(stats());
    let _celery = connect(&router, 1, worker_hello("celery", &["cancel_task"]));
    let _beat = connect(&router, 2, beat_hello("celery-beat"));
    let cases = [
        (
            command(
                "r-1",
                "schedule.external.mutate",
                r#"{"type":"scheduler","id":"rq-scheduler","scheduler":"rq-scheduler"}"#,
                "{}",
                "k",
            ),
            "no connected local process declared scheduler \"rq-scheduler\"",
        ),
        (
            command(
                "r-2",
                "schedule.trigger_now",
                r#"{"type":"schedule","id":"u1"}"#,
                "{}",
                "k",
            ),
            "names no scheduler",
        ),
        (
            command(
                "r-3",
                "schedule.fire",
                r#"{"type":"schedule","id":"u1"}"#,
                "{}",
                "k",
            ),
            "names no engine",
        ),
        (
            command(
                "r-4",
                "schedule.fire",
                r#"{"type":"schedule","id":"u1","engine":"rq"}"#,
                "{}",
                "k",
            ),
            "no connected local process runs action \"schedule.fire\" for engine \"rq\"",
        ),
    ];
    for (c, hint) in cases {
        let Dispatch::Failed(r) = router.dispatch(&c, "web-1 (worker_id w)") else {
            panic!("{} should fail at once", c.id)
        };
        let e = r.error.unwrap();
        assert!(e.starts_with("z4j-agentd on web-1 (worker_id w): "), "{e}");
        assert!(e.contains(hint), "{}: {e}", c.id);
        assert_eq!(r.claim, Value::from("k"));
    }
}

#[tokio::test]
async fn resync_goes_to_one_scheduler_process_and_fails_without_any() {
    let (router, _results) = Router::new(stats());
    let resync = |id: &str| {
        command(
            id,
            "schedule.resync",
            r#"{"type":"project","id":"p"}"#,
            "{}",
            "k",
        )
    };
    let _celery = connect(&router, 1, worker_hello("celery", &["cancel_task"]));
    let Dispatch::Failed(r) = router.dispatch(&resync("y-1"), "h") else {
        panic!("no scheduler process")
    };
    assert!(r.error.unwrap().contains("declared a scheduler"));
    let mut a = connect(&router, 2, beat_hello("celery-beat"));
    let mut b = connect(&router, 3, beat_hello("rq-scheduler"));
    assert!(matches!(
        router.dispatch(&resync("y-2"), "h"),
        Dispatch::Started { .. }
    ));
    let got = [received(&mut a), received(&mut b)];
    assert_eq!(got.iter().flatten().count(), 1, "one of them: {got:?}");
}

#[tokio::test]
async fn a_redelivered_command_echoes_the_new_claim_token() {
    let (router, mut results) = Router::new(stats());
    let mut beat_rx = connect(&router, 1, beat_hello("celery-beat"));
    // Running when delivered again: the answer carries the latest token.
    router.dispatch(&activation("a-1", "celery-beat", "first"), "h");
    assert!(received(&mut beat_rx).is_some());
    assert_eq!(
        router.dispatch(&activation("a-1", "celery-beat", "second"), "h"),
        Dispatch::DuplicateRunning
    );
    assert!(received(&mut beat_rx).is_none(), "not run twice");
    router.on_result(1, &success("a-1")).unwrap();
    let r = results.try_recv().unwrap();
    assert_eq!(r.claim, Value::from("second"));
    // Answered when delivered again: the cached answer, with the new token.
    let Dispatch::DuplicateDone(again) =
        router.dispatch(&activation("a-1", "celery-beat", "third"), "h")
    else {
        panic!("answered before")
    };
    assert_eq!(again.claim, Value::from("third"));
    assert_eq!(
        again.payload().get("delivery_claim_token"),
        Some(&Value::from("third"))
    );
    assert_eq!((again.success, &again.result), (r.success, &r.result));
    // A null token is echoed as null.
    let mut c = activation("a-2", "celery-beat", "x");
    c.claim = Value::Null;
    router.dispatch(&c, "h");
    router.on_result(1, &success("a-2")).unwrap();
    assert_eq!(results.try_recv().unwrap().claim, Value::Null);
}

#[tokio::test]
async fn an_activation_before_its_scheduler_is_declared_is_held_and_handed_over() {
    let (router, mut results) = Router::new(stats());
    let _celery = connect(&router, 1, worker_hello("celery", &["cancel_task"]));
    let d = router.dispatch(&activation("h-1", "celery-beat", "k1"), "web-1");
    assert_eq!(
        d,
        Dispatch::Held {
            scheduler: "celery-beat".into()
        }
    );
    assert!(results.try_recv().is_err(), "not answered yet");
    assert!(router.activation_reaches("celery-beat", 7));
    assert_eq!(
        router.dispatch(&activation("h-1", "celery-beat", "k2"), "web-1"),
        Dispatch::DuplicateRunning,
        "a re-delivery while held"
    );
    // Another process's hello hands nothing over.
    router.hand_over_held();
    // The scheduler's process arrives.
    let mut beat_rx = connect(&router, 7, beat_hello("celery-beat"));
    router.hand_over_held();
    let m = received(&mut beat_rx).expect("handed over");
    assert_eq!(m["id"], "h-1");
    assert_eq!(m["action"], "schedule.external.activate");
    assert_eq!(m["parameters"]["epoch_number"], 1);
    assert!(m["timeout_seconds"].as_f64().unwrap() <= 54.0);
    assert!(router.activation_reaches("celery-beat", 7));
    assert!(!router.activation_reaches("celery-beat", 8));
    router.on_result(7, &success("h-1")).unwrap();
    let r = results.try_recv().unwrap();
    assert!(r.success);
    assert_eq!(r.claim, Value::from("k2"), "the latest delivery's token");
}

#[tokio::test(start_paused = true)]
async fn a_held_activation_fails_with_the_reason_when_its_budget_runs_out() {
    let (router, mut results) = Router::new(stats());
    router.dispatch(&activation("h-2", "celery-beat", "k"), "web-1");
    // A newer activation replaces it, and it is answered at once.
    router.dispatch(&activation("h-3", "celery-beat", "k3"), "web-1");
    let r = results.try_recv().unwrap();
    assert_eq!(r.id, "h-2");
    assert!(r.error.unwrap().contains("newer activation"));
    tokio::time::sleep(Duration::from_secs(53)).await;
    assert!(results.try_recv().is_err(), "kept within the budget");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = results.try_recv().expect("failed when the budget ran out");
    assert_eq!(r.id, "h-3");
    assert!(!r.success);
    let e = r.error.unwrap();
    assert!(
        e.contains("web-1") && e.contains("\"celery-beat\"") && e.contains("within 54 s"),
        "{e}"
    );
    assert_eq!(r.claim, Value::from("k3"));
    assert!(!router.activation_reaches("celery-beat", 1));
    // A process declaring it later gets nothing (the daemon says hello again).
    let mut beat_rx = connect(&router, 1, beat_hello("celery-beat"));
    router.hand_over_held();
    assert!(received(&mut beat_rx).is_none());
}

#[tokio::test]
async fn a_held_activation_is_answered_when_the_daemon_shuts_down() {
    let (router, mut results) = Router::new(stats());
    router.dispatch(&activation("h-4", "celery-beat", "k4"), "web-1");
    assert!(results.try_recv().is_err(), "held, not answered yet");
    router.shutting_down("web-1");
    let r = results.try_recv().expect("answered at shutdown");
    assert_eq!((r.id.as_str(), r.success), ("h-4", false));
    assert_eq!(r.claim, Value::from("k4"));
    let e = r.error.clone().unwrap();
    assert!(
        e.contains("web-1 is shutting down") && e.contains("\"celery-beat\""),
        "{e}"
    );
    assert!(!router.activation_reaches("celery-beat", 1));
    assert_eq!(
        router.dispatch(&activation("h-4", "celery-beat", "k5"), "web-1"),
        Dispatch::DuplicateDone(CommandResult {
            claim: Value::from("k5"),
            ..r.clone()
        }),
        "a re-delivery after shutdown gets the same answer"
    );
}

#[tokio::test]
async fn a_restarted_process_takes_the_scheduler_over_and_needs_a_new_activation() {
    let (router, mut results) = Router::new(stats());
    let mut old = connect(&router, 1, beat_hello("celery-beat"));
    router.dispatch(&activation("t-1", "celery-beat", "k1"), "h");
    assert_eq!(received(&mut old).unwrap()["id"], "t-1");
    router.on_result(1, &success("t-1")).unwrap();
    assert!(results.try_recv().unwrap().success);
    assert!(router.activation_reaches("celery-beat", 1));
    // Its successor says hello before the old connection's end is seen:
    // it waits for the scheduler, and takes it over when that end comes.
    let mut new = connect(&router, 2, beat_hello("celery-beat"));
    assert_eq!(holder(&router, "celery-beat"), 1);
    disconnect(&router, 1);
    assert_eq!(holder(&router, "celery-beat"), 2);
    // It has no activation of its own (the uplink says hello again for
    // it); the next one goes to it.
    assert!(!router.activation_reaches("celery-beat", 2));
    assert!(matches!(
        router.dispatch(&activation("t-2", "celery-beat", "k2"), "h"),
        Dispatch::Started { .. }
    ));
    assert_eq!(received(&mut new).unwrap()["id"], "t-2");
    assert!(router.activation_reaches("celery-beat", 2));
}
