//! Routing by target: worker commands to the connection hosting the
//! worker, rate limits, purges confirmed against the reported depth,
//! reconcile and bulk retry by engine.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::test_support::{command, connect, json, received, Rx};
use super::*;
use crate::clients::{EngineHealth, HealthReport, Registration};

/// The project secret of these tests (32 bytes 0..31, base64url).
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// HMAC-SHA256(key = the 32 bytes of SECRET, "purge|default|3"), computed
/// with Python's hmac and z4j_core.purge_token.compute_purge_confirm_token.
const TOKEN_DEFAULT_3: &str = "798a7ebdf599053af517115ac25a392f2b0beefe7aa844393daf95899d0fb62b";
/// The same for "purge|q1|7".
const TOKEN_Q1_7: &str = "c8803081199615dbfa758faf93b9b3953ea7e63b5bd99d34ea0872ff88093958";

fn key() -> SigningKey {
    SigningKey::from_base64(SECRET).unwrap()
}

fn router() -> (Arc<Router>, Results) {
    Router::with_key(Arc::new(Stats::new()), key)
}

/// Connection `id` (pid `10 * id`) says `hello` with `caps` and the
/// worker names `workers`; returns what it receives.
fn join(router: &Router, id: u64, caps: &[(&str, &[&str])], workers: &[&str]) -> Rx {
    let capabilities: BTreeMap<String, Vec<String>> = caps
        .iter()
        .map(|(e, a)| (e.to_string(), a.iter().map(|s| s.to_string()).collect()))
        .collect();
    let hello = Registration {
        process: Some(format!("worker-{id}")),
        engines: capabilities.keys().cloned().collect(),
        capabilities,
        workers: workers.iter().map(|w| w.to_string()).collect(),
        ..Registration::default()
    };
    connect(router, id, 10 * id as i32, hello)
}

/// Connection `id` reports, for `engine`, `depths` and the workers
/// `workers` (each with `details`), `age_s` seconds ago.
fn report(
    router: &Router,
    id: u64,
    engine: &str,
    depths: &[(&str, u64)],
    workers: &[(&str, &str)],
    age_s: i64,
) {
    let eh = EngineHealth {
        queue_depths: depths.iter().map(|(q, d)| (q.to_string(), *d)).collect(),
        workers: workers
            .iter()
            .map(|(w, details)| (w.to_string(), json(details)))
            .collect(),
        facts: BTreeMap::new(),
    };
    router.stats.clients.reported(
        id,
        HealthReport {
            received: Instant::now(),
            at: OffsetDateTime::now_utc() - time::Duration::seconds(age_s),
            fresh_for: std::time::Duration::from_secs(60),
            engines: BTreeMap::from([(engine.to_string(), eh)]),
        },
    );
}

fn restart(id: &str, worker: &str) -> Command {
    command(
        id,
        "restart_worker",
        &format!(r#"{{"type":"worker","id":"{worker}","engine":"celery"}}"#),
        &format!(r#"{{"worker_name":"{worker}","engine":"celery"}}"#),
    )
}

/// `purges_forced` as the stats count it.
fn forced(router: &Router) -> u64 {
    router
        .stats
        .purges_forced
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn refused(d: Dispatch) -> String {
    match d {
        Dispatch::Failed(r) => r.error.expect("a reason"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const WORKER_CAPS: &[(&str, &[&str])] = &[(
    "celery",
    &["restart_worker", "pool_grow", "rate_limit", "purge_queue"],
)];

#[tokio::test]
async fn a_worker_command_goes_to_the_connection_hosting_the_worker() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &["wA@h"]);
    let mut b = join(&router, 2, WORKER_CAPS, &["wB@h"]);
    // Connection 1 is older and idle: without routing by worker it would win.
    let d = router.dispatch(&restart("r-1", "wB@h"), "web-1");
    assert_eq!(
        d,
        Dispatch::Started {
            who: "pid 20 (worker-2)".into()
        }
    );
    assert!(received(&mut a).is_none());
    let m = received(&mut b).expect("the host of wB@h got it");
    assert_eq!(m["action"], "restart_worker");
    assert_eq!(m["parameters"]["worker_name"], "wB@h");
    assert!(matches!(
        router.dispatch(&restart("r-2", "wA@h"), "web-1"),
        Dispatch::Started { .. }
    ));
    assert!(received(&mut a).is_some());
    assert!(received(&mut b).is_none());
}

#[tokio::test]
async fn a_worker_named_by_a_worker_event_or_a_health_report_is_hosted_there() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &[]);
    let mut b = join(&router, 2, WORKER_CAPS, &[]);
    assert!(router.stats.clients.worker_seen(2, "celery", "wE@h", true));
    report(&router, 1, "celery", &[], &[("wH@h", "{}")], 0);
    router.dispatch(&restart("r-3", "wE@h"), "h");
    assert!(received(&mut b).is_some(), "learnt from worker.online");
    assert!(received(&mut a).is_none());
    router.dispatch(&restart("r-4", "wH@h"), "h");
    assert!(received(&mut a).is_some(), "learnt from the health report");
    assert!(received(&mut b).is_none());

    // Events tie a name to their engine only; worker.offline takes it back.
    let mut pool = restart("r-5", "wE@h");
    pool.target.insert("engine", "rq");
    pool.parameters.insert("engine", "rq");
    let e = refused(router.dispatch(&pool, "h"));
    assert!(e.contains("hosts worker \"wE@h\" for engine \"rq\""), "{e}");
    router.stats.clients.worker_seen(2, "celery", "wE@h", false);
    let e = refused(router.dispatch(&restart("r-6", "wE@h"), "h"));
    assert!(
        e.starts_with("z4j-agentd on h: no connected local process hosts worker \"wE@h\" for engine \"celery\""),
        "{e}"
    );
}

#[test]
fn a_worker_event_is_a_decision_the_registry_learns_from() {
    let h = crate::ingest::handler::handle(
        json(
            r#"{"type":"events","events":[
                {"kind":"worker.online","engine":" celery ","data":{"worker":"wA@h"}},
                {"kind":"worker.offline","engine":"celery","data":{"worker":"wB@h"}},
                {"kind":"task.started","engine":"celery","task_id":"t","data":{"worker":"wC@h"}},
                {"kind":"worker.online","data":{"worker":"refused: no engine"}}]}"#,
        ),
        &crate::ingest::handler::Limits {
            max_event_bytes: 64 * 1024,
            max_message_bytes: 1 << 20,
        },
        OffsetDateTime::now_utc(),
    );
    assert_eq!(
        h.workers,
        [
            crate::ingest::decision::WorkerSeen {
                engine: "celery".into(),
                worker: "wA@h".into(),
                online: true
            },
            crate::ingest::decision::WorkerSeen {
                engine: "celery".into(),
                worker: "wB@h".into(),
                online: false
            },
        ]
    );
}

#[tokio::test]
async fn a_worker_command_is_refused_naming_what_is_missing() {
    let (router, _results) = router();
    let _a = join(&router, 1, &[("celery", &["cancel_task"])], &["wA@h"]);
    let e = refused(router.dispatch(&restart("r-7", "wA@h"), "web-1"));
    assert!(e.starts_with("z4j-agentd on web-1: worker \"wA@h\" (engine \"celery\") is hosted by pid 10 (worker-1), which did not declare action \"restart_worker\""), "{e}");
    let e = refused(router.dispatch(&restart("r-8", "wZ@h"), "web-1"));
    assert!(
        e.contains("no connected local process hosts worker \"wZ@h\" for engine \"celery\"")
            && e.contains("give each host its own agent token"),
        "{e}"
    );
    let nameless = command(
        "r-9",
        "pool_shrink",
        r#"{"type":"worker","id":null,"engine":"celery"}"#,
        r#"{"engine":"celery","delta":1}"#,
    );
    let e = refused(router.dispatch(&nameless, "web-1"));
    assert!(e.contains("\"pool_shrink\" names no worker"), "{e}");
}

fn rate_limit(id: &str, worker: Option<&str>) -> Command {
    let w = worker.map_or("null".to_string(), |w| format!("{w:?}"));
    command(
        id,
        "rate_limit",
        r#"{"type":"task","id":"proj.add"}"#,
        &format!(r#"{{"task_name":"proj.add","rate":"10/m","worker_name":{w}}}"#),
    )
}

#[tokio::test]
async fn rate_limit_goes_to_the_worker_host_or_to_the_one_engine_that_declared_it() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &["wA@h"]);
    let mut b = join(&router, 2, WORKER_CAPS, &["wB@h"]);
    router.dispatch(&rate_limit("l-1", Some("wB@h")), "h");
    assert!(received(&mut b).is_some());
    assert!(received(&mut a).is_none());
    assert!(matches!(
        router.dispatch(&rate_limit("l-2", None), "h"),
        Dispatch::Started { .. }
    ));
    assert!(
        received(&mut a).is_some(),
        "no worker: any process of the engine"
    );
    let e = refused(router.dispatch(&rate_limit("l-3", Some("wZ@h")), "h"));
    assert!(e.contains("hosts worker \"wZ@h\" for any engine"), "{e}");

    // A second engine declares rate_limit: without a worker it is ambiguous,
    // unless one engine's health report registers the task.
    let mut c = join(&router, 3, &[("dramatiq", &["rate_limit"])], &[]);
    let e = refused(router.dispatch(&rate_limit("l-4", None), "h"));
    assert!(
        e.contains("names no worker and no engine")
            && e.contains("celery, dramatiq")
            && e.contains("none of which"),
        "{e}"
    );
    report(
        &router,
        3,
        "dramatiq",
        &[],
        &[("d1", r#"{"registered":["proj.add"]}"#)],
        0,
    );
    router.dispatch(&rate_limit("l-5", None), "h");
    assert!(received(&mut c).is_some());
}

fn purge(id: &str, queue: &str, params: &str) -> Command {
    let mut c = command(
        id,
        "purge_queue",
        &format!(r#"{{"type":"queue","id":"{queue}"}}"#),
        params,
    );
    c.parameters.insert("queue", queue);
    c
}

#[test]
fn the_purge_token_is_the_brains_hmac_of_queue_and_depth() {
    assert_eq!(purge::token(&key(), "default", 3), TOKEN_DEFAULT_3);
    assert_eq!(purge::token(&key(), "q1", 7), TOKEN_Q1_7);
}

#[tokio::test]
async fn a_purge_with_the_token_of_the_reported_depth_reaches_the_process_without_it() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &["wA@h"]);
    report(&router, 1, "celery", &[("default", 9)], &[], 30);
    // A fresher report from another process wins.
    let _b = join(&router, 2, &[("celery", &["cancel_task"])], &[]);
    report(&router, 2, "celery", &[("default", 3)], &[], 1);
    let c = purge(
        "p-1",
        "default",
        &format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}","force":false}}"#),
    );
    assert!(matches!(router.dispatch(&c, "h"), Dispatch::Started { .. }));
    let m = received(&mut a).expect("the process that declared purge_queue");
    assert_eq!(m["parameters"]["expected_depth"], 3);
    assert_eq!(m["parameters"]["queue"], "default");
    assert_eq!(m["parameters"]["engine"], "celery");
    assert_eq!(m["target"]["engine"], "celery");
    assert!(m["parameters"].get("confirm_token").is_none());
    let line = serde_json::to_string(&m).unwrap();
    assert!(!line.contains(TOKEN_DEFAULT_3) && !line.contains(SECRET));
}

#[tokio::test]
async fn a_purge_is_refused_with_the_reason() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &[]);
    let forged = format!(r#"{{"confirm_token":"{}","force":false}}"#, "ab".repeat(32));

    // Nobody reports the queue.
    let e = refused(router.dispatch(&purge("p-2", "default", &forged), "web-1"));
    assert!(e.starts_with("z4j-agentd on web-1: purge_queue for queue \"default\": no connected local process reports this queue"), "{e}");

    // Known from a worker's active queues only: no depth.
    report(
        &router,
        1,
        "celery",
        &[],
        &[("wA@h", r#"{"active_queues":[{"name":"default"}]}"#)],
        0,
    );
    let e = refused(router.dispatch(&purge("p-3", "default", &forged), "web-1"));
    assert!(
        e.contains("(engine \"celery\"): no process has reported this queue's depth"),
        "{e}"
    );

    // A forged token, and the right token of another depth.
    report(&router, 1, "celery", &[("default", 4)], &[], 0);
    for (id, params) in [
        ("p-4", forged.clone()),
        ("p-5", format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}"}}"#)),
    ] {
        let e = refused(router.dispatch(&purge(id, "default", &params), "web-1"));
        assert!(
            e.contains(
                "confirm_token does not match the last reported depth 4 of queue \"default\""
            ) && e.contains("Re-issue the purge"),
            "{e}"
        );
        assert!(!e.contains(&purge::token(&key(), "default", 4)), "{e}");
        assert!(!e.contains(SECRET), "{e}");
    }

    // No token, no force.
    let e = refused(router.dispatch(
        &purge("p-6", "default", r#"{"confirm_token":null,"force":false}"#),
        "web-1",
    ));
    assert!(e.contains("no confirm_token"), "{e}");

    // Two engines report the queue.
    let _b = join(&router, 2, &[("rq", &["purge_queue"])], &[]);
    report(&router, 2, "rq", &[("default", 4)], &[], 0);
    let e = refused(router.dispatch(&purge("p-7", "default", &forged), "web-1"));
    assert!(e.contains("reported for engines celery, rq"), "{e}");
    assert!(
        received(&mut a).is_none(),
        "no refused purge reached a process"
    );
    assert_eq!(forced(&router), 0);
}

#[tokio::test]
async fn a_forced_purge_is_passed_on_and_counted() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &[]);
    report(&router, 1, "celery", &[("default", 4)], &[], 0);
    let c = purge("p-8", "default", r#"{"confirm_token":null,"force":true}"#);
    assert!(matches!(router.dispatch(&c, "h"), Dispatch::Started { .. }));
    let m = received(&mut a).unwrap();
    assert_eq!(m["parameters"]["force"], true);
    assert!(m["parameters"].get("expected_depth").is_none());
    assert_eq!(forced(&router), 1);
}

#[tokio::test]
async fn a_forced_purge_nobody_can_run_is_refused_and_not_counted_as_passed_on() {
    let (router, _results) = router();
    let mut a = join(&router, 1, &[("celery", &["restart_worker"])], &[]);
    report(&router, 1, "celery", &[("default", 4)], &[], 0);
    let c = purge("p-8b", "default", r#"{"confirm_token":null,"force":true}"#);
    let e = refused(router.dispatch(&c, "h"));
    assert!(
        e.contains("no connected local process runs action \"purge_queue\""),
        "{e}"
    );
    assert!(received(&mut a).is_none());
    assert_eq!(
        forced(&router),
        0,
        "a forced purge that reached no process is not counted as passed on"
    );
}

#[tokio::test]
async fn a_purge_goes_to_the_process_that_reports_the_queue() {
    let (router, _results) = router();
    // Two apps on one host, each with its own broker: only the second
    // knows queue "default". The first is older and idle: routing by engine
    // alone would hand it the purge, which it cannot run.
    let mut a = join(&router, 1, WORKER_CAPS, &["wA@h"]);
    let mut b = join(&router, 2, WORKER_CAPS, &["wB@h"]);
    report(&router, 1, "celery", &[("other", 2)], &[], 0);
    report(&router, 2, "celery", &[("default", 3)], &[], 0);
    let c = purge(
        "p-10",
        "default",
        &format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}"}}"#),
    );
    assert!(matches!(router.dispatch(&c, "h"), Dispatch::Started { .. }));
    assert!(received(&mut a).is_none());
    assert_eq!(received(&mut b).unwrap()["parameters"]["expected_depth"], 3);

    // Both report the queue: the one whose depth the token was checked
    // against gets it, even when it is not the longest connected.
    report(&router, 1, "celery", &[("default", 9)], &[], 30);
    let c = purge(
        "p-11",
        "default",
        &format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}"}}"#),
    );
    assert!(matches!(router.dispatch(&c, "h"), Dispatch::Started { .. }));
    assert!(received(&mut a).is_none());
    assert!(received(&mut b).is_some());
}

#[tokio::test]
async fn a_purge_is_refused_when_the_process_that_may_run_it_does_not_report_the_queue() {
    let (router, _results) = router();
    let mut a = join(&router, 1, WORKER_CAPS, &[]);
    let _reporter = join(&router, 2, &[("celery", &["cancel_task"])], &[]);
    report(&router, 2, "celery", &[("default", 3)], &[], 0);
    let c = purge(
        "p-12",
        "default",
        &format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}"}}"#),
    );
    let e = refused(router.dispatch(&c, "web-1"));
    assert!(
        e.contains("the local processes that declared purge_queue (pid 10 (worker-1)) do not report this queue"),
        "{e}"
    );
    assert!(received(&mut a).is_none());
}

#[tokio::test]
async fn a_router_without_the_key_refuses_every_confirmed_purge() {
    let (router, _results) = Router::new(Arc::new(Stats::new()));
    let _a = join(&router, 1, WORKER_CAPS, &[]);
    report(&router, 1, "celery", &[("default", 3)], &[], 0);
    let c = purge(
        "p-9",
        "default",
        &format!(r#"{{"confirm_token":"{TOKEN_DEFAULT_3}"}}"#),
    );
    assert!(refused(router.dispatch(&c, "h")).contains("holds no project key"));
}

#[tokio::test]
async fn reconcile_and_bulk_retry_route_by_engine() {
    let (router, _results) = router();
    let mut celery = join(
        &router,
        1,
        &[("celery", &["bulk_retry", "cancel_task"])],
        &[],
    );
    let mut rq = join(
        &router,
        2,
        &[("rq", &["bulk_retry", "reconcile_task"])],
        &[],
    );
    let reconcile = |id: &str, engine: &str| {
        command(
            id,
            "reconcile_task",
            &format!(r#"{{"type":"task","id":"t-1","engine":"{engine}"}}"#),
            &format!(r#"{{"task_id":"t-1","engine":"{engine}"}}"#),
        )
    };
    router.dispatch(&reconcile("x-1", "rq"), "h");
    assert!(received(&mut rq).is_some());
    let e = refused(router.dispatch(&reconcile("x-2", "celery"), "web-1"));
    assert!(
        e.starts_with("z4j-agentd on web-1: no connected local process declared action \"reconcile_task\" for engine \"celery\"")
            && e.contains("declares \"reconcile_task\" in its hello capabilities"),
        "{e}"
    );
    let bulk = command(
        "x-3",
        "bulk_retry",
        r#"{"type":"bulk","id":null,"engine":"celery"}"#,
        r#"{"filter":{"engine":"celery","task_ids":["a"]},"max":10}"#,
    );
    router.dispatch(&bulk, "h");
    assert!(received(&mut celery).is_some());
    assert!(received(&mut rq).is_none());
}

#[tokio::test]
async fn a_worker_named_only_by_the_hello_is_hosted_for_the_engines_declared_until_tied_to_one() {
    let (router, _results) = router();
    let _a = join(
        &router,
        1,
        &[("celery", &["restart_worker"]), ("rq", &["restart_worker"])],
        &["w@h"],
    );
    let clients = &router.stats.clients;
    assert_eq!(clients.hosting(Some("rq"), "w@h").len(), 1);
    assert_eq!(clients.hosting(Some("celery"), "w@h").len(), 1);
    report(&router, 1, "celery", &[], &[("w@h", "{}")], 0);
    assert_eq!(clients.hosting(Some("celery"), "w@h").len(), 1);
    assert!(
        clients.hosting(Some("rq"), "w@h").is_empty(),
        "the health report ties it to celery"
    );
}

#[tokio::test]
async fn a_cancel_or_reconcile_goes_to_the_process_whose_report_shows_the_task_running() {
    let (router, _results) = router();
    // Two worker processes of one engine (TaskIQ's `--workers 2`): the
    // first is the older and idle one, which routing by engine alone picks.
    const CAPS: &[(&str, &[&str])] = &[("taskiq", &["cancel_task", "reconcile_task"])];
    let mut a = join(&router, 1, CAPS, &["taskiq@h:10"]);
    let mut b = join(&router, 2, CAPS, &["taskiq@h:20"]);
    let task_cmd = |id: &str, action: &str, task: &str| {
        command(
            id,
            action,
            &format!(r#"{{"type":"task","id":"{task}","engine":"taskiq"}}"#),
            &format!(r#"{{"task_id":"{task}","engine":"taskiq"}}"#),
        )
    };
    // Before any report lists it: by engine, as before.
    assert!(matches!(
        router.dispatch(&task_cmd("c-1", "cancel_task", "t-9"), "h"),
        Dispatch::Started { .. }
    ));
    assert!(received(&mut a).is_some() && received(&mut b).is_none());
    // The second process reports t-9 running: both actions go there.
    report(
        &router,
        1,
        "taskiq",
        &[],
        &[("taskiq@h:10", r#"{"active":[{"id":"t-1"}]}"#)],
        0,
    );
    report(
        &router,
        2,
        "taskiq",
        &[],
        &[("taskiq@h:20", r#"{"active":[{"id":"t-9","name":"slow"}]}"#)],
        0,
    );
    for (id, action) in [("c-2", "cancel_task"), ("c-3", "reconcile_task")] {
        assert!(matches!(
            router.dispatch(&task_cmd(id, action, "t-9"), "h"),
            Dispatch::Started { .. }
        ));
        assert!(received(&mut a).is_none(), "{action}");
        assert_eq!(received(&mut b).unwrap()["action"], action);
    }
    // A task nobody reports running: by engine again.
    router.dispatch(&task_cmd("c-4", "cancel_task", "t-0"), "h");
    assert!(received(&mut a).is_some() && received(&mut b).is_none());
}
