//! The `health` message's decisions: what is kept, what is refused and
//! counted, and what the client is told.

use std::time::Duration;

use super::super::decision::Limits;
use super::super::handler::handle;
use super::*;

const LIMITS: Limits = Limits {
    max_event_bytes: 64 * 1024,
    max_message_bytes: 1 << 20,
};

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_795_390_199).unwrap()
}

fn decide(s: &str) -> Handled {
    handle(serde_json::from_str(s).unwrap(), &LIMITS, now())
}

fn errors(h: &Handled) -> Vec<String> {
    h.replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error {
                refusal, ack_id, ..
            } => {
                assert_eq!(refusal.code, RefusalCode::InvalidHealth);
                assert_eq!(ack_id, &Some(Value::from(7u64)), "errors echo the ack_id");
                Some(refusal.message.clone())
            }
            _ => None,
        })
        .collect()
}

fn refused(h: &Handled) -> u64 {
    h.counts
        .refused
        .iter()
        .filter(|(c, _)| *c == RefusalCode::InvalidHealth)
        .map(|(_, n)| n)
        .sum()
}

fn ack(h: &Handled) -> Value {
    h.replies
        .iter()
        .find_map(|r| match r {
            Reply::Message(m) if m.get("type").and_then(Value::as_str) == Some("ack") => {
                Some(m.clone())
            }
            _ => None,
        })
        .expect("an ack")
}

const GOOD: &str = r#"{"type": "health", "ack_id": 7, "interval_seconds": 10,
 "engines": {"celery": {
    "queue_depths": {"default": 3, "high": 0},
    "workers": {"celery@hostA": {"stats": {"pid": 111, "pool": {"max-concurrency": 4}},
                                  "active": [], "active_queues": [{"name": "default"}],
                                  "registered": ["proj.add"], "conf": {"task_acks_late": false},
                                  "other": 1}},
    "broker_type": "redis", "broker_connected": true}}}"#;

#[test]
fn a_valid_report_is_kept_whole_and_acknowledged() {
    let h = decide(GOOD);
    assert_eq!(errors(&h), Vec::<String>::new());
    assert_eq!(h.counts.health_received, 1);
    assert_eq!(h.counts.health_refused, 0);
    let u = h.health.clone().expect("an update");
    assert_eq!(u.fresh_for, Duration::from_secs(30));
    assert_eq!(u.at, Some(now()));
    let c = &u.engines["celery"];
    assert_eq!(c.queue_depths["default"], 3);
    assert_eq!(c.queue_depths["high"], 0);
    let w = &c.workers["celery@hostA"];
    assert_eq!(
        w.get("stats").and_then(|s| s.get("pid")),
        Some(&Value::Int(111))
    );
    assert!(
        w.get("other").is_none(),
        "keys the brain does not read are dropped"
    );
    assert!(w.get("registered").is_some() && w.get("conf").is_some());
    assert_eq!(c.facts["broker_type"], "redis");
    assert_eq!(c.facts["broker_connected"], "True");
    let a = ack(&h);
    assert_eq!(a.get("ack_id"), Some(&Value::Int(7)));
    assert_eq!(a.get("workers"), Some(&Value::Int(1)));
    assert_eq!(a.get("queues"), Some(&Value::Int(2)));
}

#[test]
fn bad_parts_are_refused_counted_and_explained_the_rest_kept() {
    let long = "w".repeat(201);
    let h = decide(&format!(
        r#"{{"type": "health", "ack_id": 7, "interval_seconds": "often",
 "engines": {{
   "celery.beat": {{"queue_depths": {{"a": 1}}}},
   "{e41}": {{"queue_depths": {{"a": 1}}}},
   "rq": [1],
   "celery": {{
    "queue_depths": {{"ok": 5, "big": 99999999999, "neg": -1, "text": "3", "float": 1.5, "nul": null}},
    "workers": {{
       "celery@good": {{"stats": {{"pid": 1, "pool": {{"max-concurrency": 2, "processes": [3, 4]}}}}}},
       "celery@pool-list": {{"stats": {{"pid": 1, "pool": {{"processes": [3, 4]}}}}}},
       "celery@conc-text": {{"stats": {{"pool": {{"max-concurrency": "4"}}}}}},
       "celery@pid-big": {{"stats": {{"pid": 4294967296}}}},
       "celery@queues-text": {{"active_queues": "default"}},
       "celery@registered-map": {{"registered": {{}}}},
       "{long}": {{}},
       "celery@not-a-map": 3}},
    "broker_type": "redis", "nested": {{"a": 1}}, "x.queue_depths": "1", "nothing": null,
    "worker_details": "{{}}"}}}}}}"#,
        e41 = "e".repeat(41)
    ));
    let errs = errors(&h);
    let all = errs.join("\n");
    // Every refused part counted once; one error per engine and kind.
    assert_eq!(refused(&h), 1 + 3 + 4 + 7 + 4, "{all}");
    assert_eq!(errs.len(), 5, "{all}");
    assert!(all.contains("interval_seconds must be a number of seconds > 0, got the string \"often\"; the default of 30 s was used"), "{all}");
    assert!(all.contains("health: engines: 3 refused, the first \"celery.beat\": an engine name must be 1-40 characters without \".\""), "{all}");
    assert!(all.contains("health: celery.queue_depths: 4 refused, the first \"neg\": the depth must be an int >= 0"), "{all}");
    assert!(all.contains("health: celery.workers: 7 refused"), "{all}");
    assert!(all.contains("health: celery facts: 4 refused"), "{all}");
    assert!(all.contains("the rest of the report was kept"), "{all}");

    let u = h.health.expect("the good parts are kept");
    assert_eq!(u.fresh_for, Duration::from_secs(90), "the default interval");
    assert_eq!(u.engines.keys().collect::<Vec<_>>(), ["celery"]);
    let c = &u.engines["celery"];
    assert_eq!(c.queue_depths.len(), 2);
    assert_eq!(c.queue_depths["ok"], 5);
    assert_eq!(
        c.queue_depths["big"],
        (1 << 31) - 1,
        "clamped to the brain's int"
    );
    assert_eq!(c.workers.keys().collect::<Vec<_>>(), ["celery@good"]);
    assert_eq!(c.facts.keys().collect::<Vec<_>>(), ["broker_type"]);
    assert_eq!(h.counts.health_refused, 0);
}

#[test]
fn each_worker_refusal_says_what_to_change() {
    for (details, want) in [
        (
            r#"{"stats": {"pool": {"processes": [3, 4]}}}"#,
            "stats.pool needs max-concurrency as an int",
        ),
        (
            r#"{"stats": {"pool": {"max-concurrency": "4"}}}"#,
            "stats.pool.max-concurrency must be an int from 0 to 2147483647, got the string \"4\"",
        ),
        (
            r#"{"stats": {"pid": -1}}"#,
            "stats.pid must be an int from 0 to 2147483647, got -1",
        ),
        (
            r#"{"stats": "pid=1"}"#,
            "stats must be an object, got string",
        ),
        (r#"{"active": {}}"#, "active must be a list, got map"),
        (
            r#"{"active_queues": [{"routing_key": "x"}]}"#,
            "each of active_queues must be an object with a \"name\"",
        ),
        (r#"{"conf": []}"#, "conf must be an object, got array"),
    ] {
        let h = decide(&format!(
            r#"{{"type":"health","ack_id":7,"engines":{{"celery":{{"workers":{{"celery@a":{details}}}}}}}}}"#
        ));
        let errs = errors(&h);
        assert_eq!(errs.len(), 1, "{details}");
        assert!(errs[0].contains(want), "{details}: {}", errs[0]);
        assert!(h.health.unwrap().engines["celery"].workers.is_empty());
    }
}

#[test]
fn a_report_without_engines_is_refused_whole() {
    for body in [r#""engines": []"#, r#""workers": {}"#] {
        let h = decide(&format!(r#"{{"type":"health","ack_id":7,{body}}}"#));
        assert!(h.health.is_none(), "the earlier report stays");
        assert_eq!(h.counts.health_received, 1);
        assert_eq!(h.counts.health_refused, 1);
        assert_eq!(refused(&h), 1);
        let errs = errors(&h);
        assert!(
            errs[0].contains("\"engines\" must be a map of engine name"),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("nothing of this report was kept"));
    }
    // An empty map is a valid report of nothing: it replaces the last one.
    let h = decide(r#"{"type":"health","engines":{}}"#);
    assert!(h.health.unwrap().engines.is_empty());
    assert!(h.replies.is_empty(), "no ack_id, no ack");
}

#[test]
fn at_most_32_engines_per_report() {
    let engines: Vec<String> = (0..34)
        .map(|i| format!(r#""e{i:02}": {{"queue_depths": {{"q": 1}}}}"#))
        .collect();
    let h = decide(&format!(
        r#"{{"type":"health","ack_id":7,"engines":{{{}}}}}"#,
        engines.join(",")
    ));
    assert_eq!(h.health.clone().unwrap().engines.len(), MAX_HEALTH_ENGINES);
    assert_eq!(refused(&h), 2);
    assert!(errors(&h)[0].contains("a report carries at most 32 engines"));
}

#[test]
fn the_unknown_type_error_lists_health() {
    let h = decide(r#"{"type":"healthz"}"#);
    match &h.replies[0] {
        Reply::Error { refusal, .. } => assert!(
            refusal.message.contains("hello, health, ping"),
            "{}",
            refusal.message
        ),
        other => panic!("{other:?}"),
    }
}
