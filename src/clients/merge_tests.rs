//! Merging health reports: who wins, what leaves, what is cut and counted.

use std::time::Duration;

use super::*;
use crate::clients::{fresh_for, ClientInfo, ClientRegistry, EngineHealth};

fn v(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// A report received `ago` before `t0`.
fn report(t0: Instant, ago: u64, engine: &str, h: EngineHealth) -> HealthReport {
    HealthReport {
        received: t0 - Duration::from_secs(ago),
        at: time::OffsetDateTime::UNIX_EPOCH,
        fresh_for: Duration::from_secs(90),
        engines: BTreeMap::from([(engine.to_string(), h)]),
    }
}

fn worker(pid: u64, queues: &[&str]) -> Value {
    let q: Vec<String> = queues
        .iter()
        .map(|q| format!(r#"{{"name":"{q}"}}"#))
        .collect();
    v(&format!(
        r#"{{"stats":{{"pid":{pid},"pool":{{"max-concurrency":4}}}},"active":[],"active_queues":[{}],"registered":["proj.add"],"conf":{{"task_acks_late":false}}}}"#,
        q.join(",")
    ))
}

fn health(
    queues: &[(&str, u64)],
    workers: &[(&str, Value)],
    facts: &[(&str, &str)],
) -> EngineHealth {
    EngineHealth {
        queue_depths: queues.iter().map(|(q, d)| (q.to_string(), *d)).collect(),
        workers: workers
            .iter()
            .map(|(n, w)| (n.to_string(), w.clone()))
            .collect(),
        facts: facts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The merge, checked against what is really sent: its size is the
/// canonical size of the map, and it keeps within `max`.
fn merged(reports: &[(u64, HealthReport)], max: usize) -> AdapterHealth {
    let m = merge(reports, max);
    let bytes = canonical::to_vec(&m.to_value()).unwrap().len();
    assert_eq!(m.bytes, bytes, "the size model differs from the rendering");
    assert!(bytes <= max.max(2), "{bytes} > {max}");
    assert!(m.entries.len() <= MAX_KEYS);
    m
}

fn get<'a>(m: &'a AdapterHealth, key: &str) -> Option<&'a str> {
    m.entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn doc(m: &AdapterHealth, key: &str) -> serde_json::Value {
    serde_json::from_str(get(m, key).unwrap_or_else(|| panic!("no {key}"))).unwrap()
}

#[test]
fn several_processes_each_add_their_workers_and_queues() {
    let t0 = Instant::now();
    let a = report(
        t0,
        5,
        "celery",
        health(
            &[("default", 3)],
            &[("celery@a", worker(111, &["default"]))],
            &[("broker_type", "redis")],
        ),
    );
    let b = report(
        t0,
        1,
        "celery",
        health(&[("high", 0)], &[("celery@b", worker(222, &["high"]))], &[]),
    );
    let m = merged(&[(1, a), (2, b)], 1 << 20);
    assert_eq!(
        m.entries
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        [
            "celery.queue_depths",
            "celery.worker_details",
            "celery.broker_type"
        ]
    );
    assert_eq!(
        doc(&m, "celery.queue_depths"),
        serde_json::json!({"default": 3, "high": 0})
    );
    let w = doc(&m, "celery.worker_details");
    assert_eq!(w["celery@a"]["stats"]["pid"], 111);
    assert_eq!(w["celery@b"]["stats"]["pid"], 222);
    assert_eq!(w["celery@b"]["active_queues"][0]["name"], "high");
    assert_eq!(get(&m, "celery.broker_type"), Some("redis"));
    assert!(m.carries_workers());
    assert_eq!(m.cuts, Cuts::default());
}

#[test]
fn a_queue_reported_by_two_processes_carries_the_freshest_depth() {
    let t0 = Instant::now();
    let old = report(
        t0,
        20,
        "celery",
        health(&[("default", 7)], &[], &[("broker_connected", "False")]),
    );
    let new = report(
        t0,
        2,
        "celery",
        health(&[("default", 1)], &[], &[("broker_connected", "True")]),
    );
    // Whatever order the connections are listed in.
    for reports in [
        vec![(1, old.clone()), (2, new.clone())],
        vec![(1, new.clone()), (2, old.clone())],
    ] {
        let m = merged(&reports, 1 << 20);
        assert_eq!(
            doc(&m, "celery.queue_depths"),
            serde_json::json!({"default": 1})
        );
        assert_eq!(get(&m, "celery.broker_connected"), Some("True"));
    }
    // Reported at the same instant: the later connection wins.
    let same = report(t0, 2, "celery", health(&[("default", 9)], &[], &[]));
    let m = merged(&[(1, new.clone()), (2, same)], 1 << 20);
    assert_eq!(
        doc(&m, "celery.queue_depths"),
        serde_json::json!({"default": 9})
    );
}

#[test]
fn a_process_that_leaves_takes_its_workers_and_a_silent_one_expires() {
    let r = ClientRegistry::new();
    r.connected(1, ClientInfo::default());
    r.connected(2, ClientInfo::default());
    let t0 = Instant::now();
    let a = report(
        t0,
        0,
        "celery",
        health(&[("a", 1)], &[("celery@a", worker(1, &["a"]))], &[]),
    );
    let b = report(
        t0,
        0,
        "celery",
        health(&[("b", 2)], &[("celery@b", worker(2, &["b"]))], &[]),
    );
    r.reported(1, a);
    r.reported(2, b);
    assert_eq!(
        r.list()[0].hosted_workers().into_iter().collect::<Vec<_>>(),
        ["celery@a"],
        "reported workers are hosted workers"
    );
    let both = merged(&r.fresh_health(t0), 1 << 20);
    let w = doc(&both, "celery.worker_details");
    assert!(w.get("celery@a").is_some() && w.get("celery@b").is_some());

    r.disconnected(1);
    let one = merged(&r.fresh_health(t0), 1 << 20);
    let w = doc(&one, "celery.worker_details");
    assert!(w.get("celery@a").is_none() && w.get("celery@b").is_some());
    assert_eq!(
        doc(&one, "celery.queue_depths"),
        serde_json::json!({"b": 2})
    );

    // Not reported again within its freshness: gone, counted once.
    let later = t0 + Duration::from_secs(91);
    assert!(r.fresh_health(later).is_empty());
    assert_eq!(r.expire_health(later), 1);
    assert_eq!(r.expire_health(later), 0);
    assert!(r.list()[0].health.is_none());
    assert!(merged(&r.fresh_health(later), 1 << 20).entries.is_empty());
}

#[test]
fn freshness_follows_the_interval_within_bounds() {
    assert_eq!(fresh_for(None), Duration::from_secs(90));
    assert_eq!(
        fresh_for(Some(Duration::from_secs(10))),
        Duration::from_secs(30)
    );
    assert_eq!(
        fresh_for(Some(Duration::from_millis(10))),
        Duration::from_secs(15)
    );
    assert_eq!(
        fresh_for(Some(Duration::from_secs(86_400))),
        Duration::from_secs(900)
    );
}

#[test]
fn at_most_256_keys_with_depths_and_details_kept_first() {
    let t0 = Instant::now();
    let facts: Vec<(String, String)> = (0..300).map(|i| (format!("f{i:03}"), "x".into())).collect();
    let facts: Vec<(&str, &str)> = facts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // `a.*` facts sort before `celery.*` keys: the limit still keeps celery's.
    let a = report(t0, 0, "a", health(&[], &[], &facts));
    let c = report(
        t0,
        0,
        "celery",
        health(&[("q", 1)], &[("celery@a", worker(1, &["q"]))], &[]),
    );
    let m = merged(&[(1, a), (2, c)], 1 << 20);
    assert_eq!(m.entries.len(), MAX_KEYS);
    assert_eq!(&m.entries[0].0, "celery.queue_depths");
    assert_eq!(&m.entries[1].0, "celery.worker_details");
    assert_eq!(m.cuts.facts, 300 - 254);
    assert_eq!(m.cuts.queues + m.cuts.workers, 0);
}

#[test]
fn at_most_1024_queues_per_engine_the_freshest_reports_first() {
    let t0 = Instant::now();
    let names: Vec<String> = (0..1100).map(|i| format!("q{i:04}")).collect();
    // The older report's queues sort first by name.
    let old: Vec<(&str, u64)> = names[..600].iter().map(|n| (n.as_str(), 1)).collect();
    let new: Vec<(&str, u64)> = names[600..].iter().map(|n| (n.as_str(), 2)).collect();
    let m = merged(
        &[
            (1, report(t0, 30, "celery", health(&old, &[], &[]))),
            (2, report(t0, 1, "celery", health(&new, &[], &[]))),
        ],
        1 << 20,
    );
    let d = doc(&m, "celery.queue_depths");
    let d = d.as_object().unwrap();
    assert_eq!(d.len(), MAX_QUEUES_PER_ENGINE);
    assert_eq!(m.cuts.queues, 1100 - 1024);
    assert!(
        names[600..].iter().all(|n| d.contains_key(n)),
        "every fresh queue kept"
    );
    // Sent in name order, as the brain reads them.
    let keys: Vec<&String> = d.keys().collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
}

/// Two workers, one with a long `registered` list, one reported earlier;
/// and queues.
fn sized() -> Vec<(u64, HealthReport)> {
    let t0 = Instant::now();
    let tasks: Vec<String> = (0..200)
        .map(|i| format!("\"proj.tasks.task_{i:03}\""))
        .collect();
    let mut big = worker(1, &["default"]);
    big.insert("registered", v(&format!("[{}]", tasks.join(","))));
    big.insert(
        "active",
        v(r#"[{"id":"t1","name":"proj.add","args":"[1, 2]"}]"#),
    );
    let small = worker(2, &["high"]);
    vec![
        (
            1,
            report(
                t0,
                1,
                "celery",
                health(
                    &[("default", 3)],
                    &[("celery@big", big)],
                    &[("broker_type", "redis")],
                ),
            ),
        ),
        (
            2,
            report(
                t0,
                9,
                "celery",
                health(&[("high", 5)], &[("celery@old", small)], &[]),
            ),
        ),
    ]
}

#[test]
fn what_does_not_fit_is_cut_in_order_and_counted() {
    let reports = sized();
    let whole = merged(&reports, 1 << 20);
    assert_eq!(whole.cuts, Cuts::default());

    // A little short: only the big worker's `registered` goes.
    let m = merged(&reports, whole.bytes - 1);
    assert_eq!(
        m.cuts,
        Cuts {
            registered: 1,
            ..Cuts::default()
        }
    );
    let w = doc(&m, "celery.worker_details");
    assert!(w["celery@big"].get("registered").is_none());
    assert_eq!(w["celery@old"]["registered"][0], "proj.add");
    assert_eq!(w["celery@big"]["stats"]["pid"], 1);

    // Shorter: every `registered`, then `active`/`conf` of the largest.
    let no_lists = {
        let mut r = reports.clone();
        for (_, h) in &mut r {
            for w in h.engines.get_mut("celery").unwrap().workers.values_mut() {
                w.remove("registered");
            }
        }
        merged(&r, 1 << 20).bytes
    };
    let m = merged(&reports, no_lists - 1);
    assert_eq!(
        m.cuts,
        Cuts {
            registered: 2,
            details: 1,
            ..Cuts::default()
        }
    );
    let w = doc(&m, "celery.worker_details");
    assert!(w["celery@big"].get("active").is_none() && w["celery@big"].get("conf").is_none());
    assert_eq!(w["celery@big"]["active_queues"][0]["name"], "default");
    assert!(w["celery@old"].get("conf").is_some());

    // Room for one bare worker: the least recently reported one goes.
    let m = merged(&reports, 260);
    assert_eq!(m.cuts.workers, 1);
    assert_eq!(m.cuts.queues, 0);
    let w = doc(&m, "celery.worker_details");
    assert!(w.get("celery@old").is_none() && w.get("celery@big").is_some());

    // No room for workers: queues go next, least recently reported first.
    let m = merged(&reports, 80);
    assert_eq!(m.cuts.workers, 2);
    assert_eq!(m.cuts.queues, 1);
    assert_eq!(
        doc(&m, "celery.queue_depths"),
        serde_json::json!({"default": 3})
    );
    assert!(!m.carries_workers());

    // Nothing fits: an empty object, never a refused heartbeat.
    let m = merged(&reports, 2);
    assert!(m.entries.is_empty());
    assert_eq!(
        m.cuts,
        Cuts {
            registered: 2,
            details: 2,
            workers: 2,
            queues: 2,
            facts: 1
        }
    );
}

#[test]
fn the_size_counts_escaping_inside_the_strings() {
    let t0 = Instant::now();
    // Quotes and backslashes are escaped twice over; non-ASCII is raw.
    let w = v(r#"{"stats":{"pid":1,"pool":{"max-concurrency":1},"note":"a \"b\" \\ c é \n"}}"#);
    let r = report(
        t0,
        0,
        "celery",
        health(
            &[("q\"1", 1)],
            &[("celery@\"x\"", w)],
            &[("broker_error", "\"x\" \\")],
        ),
    );
    let m = merged(&[(1, r)], 1 << 20);
    assert_eq!(m.cuts, Cuts::default());
}
