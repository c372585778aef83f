use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use super::fixture::{beat_hello, worker_hello};
use super::*;

/// An outbox that counts what it was offered and accepts while `room` lasts.
struct Counting {
    room: AtomicUsize,
    offered: AtomicUsize,
}

impl Counting {
    fn new(room: usize) -> Arc<Counting> {
        Arc::new(Counting {
            room: AtomicUsize::new(room),
            offered: AtomicUsize::new(0),
        })
    }
}

impl Outbox for Counting {
    fn offer(&self, _msg: &Value) -> bool {
        self.offered.fetch_add(1, Ordering::Relaxed);
        self.room
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .is_ok()
    }
}

fn peer(pid: i32) -> ClientInfo {
    ClientInfo {
        pid: Some(pid),
        framing: "msgpack",
        ..ClientInfo::default()
    }
}

/// Whether a change signal is pending, without waiting.
fn signalled(r: &ClientRegistry) -> bool {
    let mut wait = std::pin::pin!(r.changed());
    let mut cx = Context::from_waker(Waker::noop());
    matches!(wait.as_mut().poll(&mut cx), Poll::Ready(()))
}

#[test]
fn a_client_is_reachable_for_commands_only_after_its_hello() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    assert_eq!(r.len(), 1, "listed from the connection on");
    assert!(r.able(Some("celery"), "cancel_task").is_empty());
    r.declared(
        1,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    let able = r.able(Some("celery"), "cancel_task");
    assert_eq!(able.len(), 1);
    assert_eq!(able[0].who, "pid 10 (celery-worker)");
    assert!(able[0].outbox.offer(&Value::Null));
    assert!(r.able(Some("rq"), "cancel_task").is_empty(), "other engine");
    assert!(
        r.able(Some("celery"), "retry_task").is_empty(),
        "other action"
    );
    assert_eq!(r.able(None, "cancel_task").len(), 1, "no engine: any");
}

#[test]
fn the_reports_and_the_router_read_the_same_entry() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    r.declared(
        1,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    r.received(1, 5);
    let listed = r.list();
    assert_eq!(listed[0].process.as_deref(), Some("celery-worker"));
    assert_eq!(listed[0].engines, vec!["celery".to_string()]);
    assert_eq!(listed[0].events_received, 5);
    assert_eq!(listed[0].framing, "msgpack", "peer facts kept");
    let ad = r.advertisement(&["rq".to_string()], &BTreeMap::new());
    assert_eq!(ad.engines, vec!["celery".to_string(), "rq".to_string()]);
    assert_eq!(ad.capabilities["celery"], vec!["cancel_task".to_string()]);
}

#[test]
fn a_later_hello_keeps_the_time_of_the_first_and_replaces_the_rest() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    r.declared(
        1,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    let since = r.able(None, "cancel_task")[0].since;
    std::thread::sleep(std::time::Duration::from_millis(2));
    r.declared(1, worker_hello("celery", &["retry_task"]), Counting::new(1));
    assert!(r.able(None, "cancel_task").is_empty());
    assert_eq!(r.able(None, "retry_task")[0].since, since);
}

#[test]
fn a_change_to_what_is_advertised_signals_once_and_the_same_hello_does_not() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    assert!(!signalled(&r), "a connection alone changes nothing");
    r.declared(
        1,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    assert!(signalled(&r));
    assert!(!signalled(&r), "one signal per change");
    r.declared(
        1,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    assert!(!signalled(&r), "the same declaration again");
    r.connected(2, peer(20));
    r.disconnected(2);
    assert!(!signalled(&r), "a client that declared nothing left");
    r.disconnected(1);
    assert!(signalled(&r), "a client that declared engines left");
    assert!(r.is_empty());
    assert!(r.able(None, "cancel_task").is_empty());
}

#[test]
fn an_unknown_connection_is_not_registered_by_a_late_hello() {
    let r = ClientRegistry::new();
    r.declared(
        3,
        worker_hello("celery", &["cancel_task"]),
        Counting::new(1),
    );
    assert!(r.is_empty());
    assert!(!signalled(&r));
}

#[test]
fn the_configured_advertisement_needs_no_client() {
    let caps = BTreeMap::from([("rq".to_string(), vec!["b".to_string(), "a".to_string()])]);
    let ad = Advertisement::configured(&["celery".to_string()], &caps);
    assert_eq!(ad.engines, vec!["celery".to_string(), "rq".to_string()]);
    assert_eq!(
        ad.capabilities["rq"],
        vec!["a".to_string(), "b".to_string()]
    );
    assert!(ad.runtime_features.is_empty());
}

/// A scheduler process's `hello`, as z4j-celerybeat declares one.
fn beat(name: &str) -> Registration {
    Registration {
        process: Some("beat".into()),
        runtime_features: vec![EXTERNAL_SCHEDULE_FEATURE.to_string()],
        ..beat_hello(name)
    }
}

#[test]
fn schedulers_their_capabilities_and_the_feature_are_advertised() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    assert!(r
        .declared(1, beat("celery-beat"), Counting::new(1))
        .is_empty());
    let ad = r.advertisement(&[], &BTreeMap::new());
    assert_eq!(ad.schedulers, vec!["celery-beat".to_string()]);
    assert!(ad.engines.is_empty(), "a scheduler is not an engine");
    assert_eq!(
        ad.capabilities["celery-beat"],
        [
            "external_schedule_stable_snapshot_v1",
            "list",
            "trigger_now"
        ]
    );
    assert_eq!(ad.runtime_features, [EXTERNAL_SCHEDULE_FEATURE]);
    assert_eq!(r.scheduler_holder("celery-beat").unwrap().id, 1);
    assert!(r.scheduler_holder("rq-scheduler").is_none());
    assert_eq!(r.scheduler_holders()["celery-beat"], 1);
}

#[test]
fn a_scheduler_declared_by_a_second_connection_is_refused_and_left_out() {
    let r = ClientRegistry::new();
    r.connected(1, peer(10));
    r.connected(2, peer(20));
    assert!(r
        .declared(1, beat("celery-beat"), Counting::new(1))
        .is_empty());
    let mut second = beat("celery-beat");
    second.schedulers.push("other-beat".into());
    second
        .capabilities
        .insert("other-beat".into(), vec!["list".into()]);
    let taken = r.declared(2, second, Counting::new(1));
    assert_eq!(
        taken,
        [SchedulerTaken {
            scheduler: "celery-beat".into(),
            holder: "pid 10 (beat)".into()
        }]
    );
    let listed = r.list();
    assert_eq!(listed[1].schedulers, ["other-beat"], "its own one is kept");
    assert!(
        !listed[1].capabilities.contains_key("celery-beat"),
        "nor the capabilities keyed by the refused scheduler"
    );
    assert_eq!(r.scheduler_holder("celery-beat").unwrap().id, 1);
    // The holder saying hello again keeps it; when it leaves, the second
    // takes it over, capabilities included, without a new hello.
    assert!(r
        .declared(1, beat("celery-beat"), Counting::new(1))
        .is_empty());
    let _ = signalled(&r);
    r.disconnected(1);
    assert!(signalled(&r));
    assert_eq!(r.scheduler_holder("celery-beat").unwrap().id, 2);
    let listed = r.list();
    assert_eq!(listed[0].schedulers, ["celery-beat", "other-beat"]);
    assert_eq!(
        listed[0].capabilities["celery-beat"],
        [
            "external_schedule_stable_snapshot_v1",
            "list",
            "trigger_now"
        ]
    );
    assert_eq!(r.scheduler_processes().len(), 1);
    let ad = r.advertisement(&[], &BTreeMap::new());
    assert_eq!(ad.schedulers, ["celery-beat", "other-beat"]);
    assert!(ad.engines.is_empty());
    // A holder whose next hello leaves the scheduler out passes it on too.
    r.connected(4, peer(40));
    assert_eq!(r.declared(4, beat("other-beat"), Counting::new(1)).len(), 1);
    assert!(r
        .declared(2, beat("celery-beat"), Counting::new(1))
        .is_empty());
    assert_eq!(r.scheduler_holder("other-beat").unwrap().id, 4);
    r.disconnected(4);
    // A later hello of its own replaces what a connection waits for.
    r.connected(3, peer(30));
    assert_eq!(
        r.declared(3, beat("celery-beat"), Counting::new(1)).len(),
        1
    );
    assert!(r
        .declared(3, beat("third-beat"), Counting::new(1))
        .is_empty());
    r.disconnected(2);
    assert!(r.scheduler_holder("celery-beat").is_none());
}
