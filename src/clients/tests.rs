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

/// z4j-core's `HelloPayload`: `engines`, `schedulers` and
/// `runtime_features` at most 64 each; over it the brain closes with 4400.
const BRAIN_HELLO_LIST: usize = 64;

fn len(v: &Value) -> usize {
    v.as_array().map_or(usize::MAX, <[Value]>::len)
}

#[test]
fn the_union_of_many_clients_stays_within_the_brains_hello_limits() {
    let r = ClientRegistry::new();
    // 5 processes of 40 engines, 40 schedulers, 40 features each, every
    // engine with 40 actions: 200 of each over the host (each process
    // within its own limit).
    for p in 0..5u64 {
        r.connected(p, peer(p as i32 + 100));
        let names = |kind: &str| -> Vec<String> {
            (0..40).map(|i| format!("{kind}{p:02}-{i:02}")).collect()
        };
        let engines = names("e");
        let schedulers = names("s");
        let mut capabilities = BTreeMap::new();
        for key in engines.iter().chain(&schedulers) {
            let actions: Vec<String> = (0..40).map(|a| format!("a{p}-{a:02}")).collect();
            capabilities.insert(key.clone(), actions);
        }
        // One engine all of them declare, with 40 actions each (200).
        capabilities.insert(
            "shared".to_string(),
            (0..40).map(|a| format!("act{p}-{a:02}")).collect(),
        );
        let reg = Registration {
            engines: engines.into_iter().chain(["shared".to_string()]).collect(),
            schedulers,
            capabilities,
            runtime_features: names("f"),
            ..Registration::default()
        };
        r.declared(p, reg, Counting::new(1));
    }
    let statics = vec!["configured".to_string()];
    let ad = r.advertisement(&statics, &BTreeMap::new());
    assert!(
        len(&ad.engines_value()) <= BRAIN_HELLO_LIST,
        "{}",
        ad.engines.len()
    );
    assert!(len(&ad.schedulers_value()) <= BRAIN_HELLO_LIST);
    assert!(len(&ad.runtime_features_value()) <= BRAIN_HELLO_LIST);
    assert_eq!(ad.engines.len(), BRAIN_HELLO_LIST, "filled up to the limit");
    assert_eq!(ad.schedulers.len(), BRAIN_HELLO_LIST);
    assert_eq!(ad.runtime_features.len(), BRAIN_HELLO_LIST);
    // Every capabilities key is an advertised engine or scheduler, every
    // list within the limit too.
    for (key, actions) in &ad.capabilities {
        assert!(
            ad.engines.binary_search(key).is_ok() || ad.schedulers.binary_search(key).is_ok(),
            "{key}"
        );
        assert!(
            actions.len() <= BRAIN_HELLO_LIST,
            "{key}: {}",
            actions.len()
        );
    }
    assert_eq!(ad.capabilities["shared"].len(), BRAIN_HELLO_LIST);
    // Deterministic: the configuration first, then the earliest
    // connections; a later one cannot push them out.
    assert!(ad.engines.contains(&"configured".to_string()));
    assert!(ad.engines.contains(&"shared".to_string()));
    assert!(ad.engines.contains(&"e00-39".to_string()));
    assert!(!ad.engines.iter().any(|e| e.starts_with("e02-")));
    assert!(ad.schedulers.contains(&"s01-23".to_string()));
    assert!(!ad.schedulers.iter().any(|s| s.starts_with("s02-")));
    assert_eq!(r.advertisement(&statics, &BTreeMap::new()), ad);
    // What is left out is reported, named.
    let left = r.left_out();
    assert_eq!(left.engines.len(), 1 + 200 + 1 - BRAIN_HELLO_LIST);
    assert_eq!(left.schedulers.len(), 200 - BRAIN_HELLO_LIST);
    assert_eq!(left.runtime_features.len(), 200 - BRAIN_HELLO_LIST);
    assert!(left.engines.contains(&"e04-00".to_string()));
    assert!(left.actions.contains(&"shared.act4-00".to_string()));
    assert!(left.count() > 0);
    // Once the extra processes go, nothing is left out.
    for p in 1..5 {
        r.disconnected(p);
    }
    let ad = r.advertisement(&statics, &BTreeMap::new());
    assert_eq!(ad.engines.len(), 1 + 41);
    assert_eq!(r.left_out(), LeftOut::default());
}
