//! The handler's decisions, without a socket: what each message type
//! replies, registers, relays, stores and counts.

use super::*;

const LIMITS: Limits = Limits {
    max_event_bytes: 64 * 1024,
    max_message_bytes: 1 << 20,
};

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(1_795_390_199_500_000_000).unwrap()
}

fn msg(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

fn decide(s: &str) -> Handled {
    handle(msg(s), &LIMITS, now())
}

fn codes(h: &Handled) -> Vec<(&'static str, u64)> {
    h.counts
        .refused
        .iter()
        .map(|(c, n)| (c.as_str(), *n))
        .collect()
}

#[test]
fn ping_stats_and_command_results_are_decisions_the_loop_completes() {
    let h = decide(r#"{"type":"ping","ack_id":3}"#);
    assert_eq!(
        h.replies,
        [Reply::Message(msg(r#"{"type":"pong","ack_id":3}"#))]
    );
    let h = decide(r#"{"type":"stats","ack_id":"s"}"#);
    assert_eq!(
        h.replies,
        [Reply::Stats {
            ack_id: Some(Value::from("s"))
        }]
    );
    let h = decide(r#"{"type":"command_result","id":"c","status":"success","ack_id":1}"#);
    assert!(h.replies.is_empty() && h.store.is_none());
    assert!(matches!(
        h.relay,
        Some(Relay::CommandResult {
            ack_id: Some(Value::UInt(1) | Value::Int(1)),
            ..
        })
    ));
}

#[test]
fn events_store_the_accepted_ones_and_answer_each_refused_one_by_index() {
    let h = decide(
        r#"{"type":"events","ack_id":9,"events":[
            {"engine":"rq","kind":"task.started","task_id":"a"},
            {"engine":"rq","kind":"task.exploded","task_id":"a"},
            "not a map",
            {"engine":"rq","kind":"task.succeeded","task_id":"a","occurred_at":"2001-01-01T00:00:00Z"}
        ]}"#,
    );
    assert_eq!(h.counts.events_received, 4);
    assert_eq!(h.counts.time_corrected, 1);
    assert_eq!(codes(&h), [("unknown_kind", 1), ("invalid_event", 1)]);
    let indexes: Vec<_> = h
        .replies
        .iter()
        .map(|r| match r {
            Reply::Error { index, ack_id, .. } => {
                assert_eq!(ack_id.as_ref().and_then(Value::as_u64), Some(9));
                *index
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(indexes, [Some(1), Some(2)]);
    let store = h.store.expect("stored");
    assert_eq!(store.records.len(), 2);
    assert_eq!(store.ack_id.as_ref().and_then(Value::as_u64), Some(9));
}

#[test]
fn a_message_refused_whole_counts_each_of_its_events_and_stores_nothing() {
    let long = "x".repeat(MAX_ACK_ID_BYTES);
    let h = decide(&format!(
        r#"{{"type":"events","ack_id":"{long}","events":[{{}},{{}},{{}}]}}"#
    ));
    assert_eq!(codes(&h), [("bad_message", 3)]);
    assert_eq!(h.counts.events_received, 3);
    assert!(h.store.is_none());
    let v = h.replies[0].to_value().unwrap();
    assert!(v.get("ack_id").is_none());

    let h = decide(r#"{"type":"events","events":{"a":1},"ack_id":2}"#);
    assert_eq!(codes(&h), [("bad_message", 1)]);
    assert!(h.store.is_none());
    let h = decide(r#"[1,2]"#);
    let v = h.replies[0].to_value().unwrap();
    assert_eq!(
        v.get("message").and_then(Value::as_str),
        Some("a message must be a map, got array")
    );
    let h = decide(r#"{"type":"nope","ack_id":1}"#);
    assert_eq!(codes(&h), [("unknown_type", 1)]);
}

#[test]
fn hello_registers_what_it_declares_and_reports_each_ignored_entry() {
    let h = decide(
        r#"{"type":"hello","ack_id":1,"process":"celery worker","engines":["rq"," celery "],
            "capabilities":{"celery":["revoke_task","retry_task","retry_task"],"":["x"],"rq":"no"},
            "runtime_features":["a",""]}"#,
    );
    let r = h.register.as_ref().expect("registered");
    assert_eq!(r.process.as_deref(), Some("celery worker"));
    assert_eq!(r.engines, ["celery", "rq"]);
    assert_eq!(
        r.capabilities.get("celery").unwrap(),
        &["retry_task", "revoke_task"]
    );
    assert_eq!(r.capabilities.len(), 1);
    assert_eq!(r.runtime_features, ["a"]);
    assert_eq!(codes(&h), [("bad_message", 2)]);
    // Two errors, then the hello_ack with the limits.
    assert_eq!(h.replies.len(), 3);
    let ack = h.replies[2].to_value().unwrap();
    assert_eq!(ack.get("type").and_then(Value::as_str), Some("hello_ack"));
    assert_eq!(
        ack.get("max_event_bytes").and_then(Value::as_u64),
        Some(LIMITS.max_event_bytes as u64)
    );
    // Without an ack_id: registered, nothing to reply.
    let h = decide(r#"{"type":"hello","process":"p"}"#);
    assert!(h.register.is_some() && h.replies.is_empty());
}

#[test]
fn stored_events_keep_their_engines_so_a_refused_tail_is_counted_per_engine() {
    let h = decide(
        r#"{"type":"events","events":[
            {"engine":"celery","kind":"task.started","task_id":"a"},
            {"engine":" rq ","kind":"task.started","task_id":"b"},
            {"engine":"rq","kind":"task.exploded","task_id":"c"},
            {"engine":"rq","kind":"task.started","task_id":"d"},
            {"engine":"celery","kind":"task.started","task_id":"e"}
        ]}"#,
    );
    let store = h.store.expect("stored");
    assert_eq!(store.records.len(), 4);
    // Refused events are not in the runs; the tail is read back in order.
    assert_eq!(
        store.engines.last(4),
        [("celery", 1), ("rq", 2), ("celery", 1)]
    );
    assert_eq!(store.engines.last(2), [("rq", 1), ("celery", 1)]);
    assert_eq!(store.engines.last(0), []);
    assert_eq!(
        store.engines.last(9).iter().map(|(_, n)| n).sum::<usize>(),
        4
    );
}

#[test]
fn a_hello_list_past_the_limit_is_cut_with_an_error_saying_what_to_change() {
    let list = |p: &str, n: usize| -> String {
        let v: Vec<String> = (0..n).map(|i| format!("\"{p}{i:03}\"")).collect();
        format!("[{}]", v.join(","))
    };
    let caps: Vec<String> = (0..70).map(|i| format!("\"c{i:03}\":[]")).collect();
    let h = decide(&format!(
        r#"{{"type":"hello","ack_id":3,"engines":{},"schedulers":{},"runtime_features":{},
            "workers":{},"capabilities":{{"celery":{},{}}}}}"#,
        list("e", 65),
        list("s", 64),
        list("f", 100),
        list("w", 66),
        list("a", 65),
        caps.join(",")
    ));
    let r = h.register.as_ref().expect("registered");
    assert_eq!(r.schedulers.len(), MAX_HELLO_NAMES, "64 is within it");
    assert_eq!(r.runtime_features.len(), MAX_HELLO_NAMES);
    assert_eq!(r.workers.len(), MAX_HELLO_NAMES);
    assert_eq!(r.capabilities.len(), MAX_HELLO_NAMES);
    assert_eq!(r.capabilities["celery"].len(), MAX_HELLO_NAMES);
    assert!(r.engines.contains(&"e063".to_string()));
    assert!(!r.engines.contains(&"e064".to_string()));
    let messages: Vec<String> = h
        .replies
        .iter()
        .filter_map(|r| r.to_value())
        .filter(|v| v.get("type").and_then(Value::as_str) == Some("error"))
        .map(|v| {
            v.get("message")
                .and_then(Value::as_str)
                .unwrap()
                .to_string()
        })
        .collect();
    // capabilities (70 entries), its celery list, engines, features, workers.
    assert_eq!(codes(&h), [("bad_message", 5)], "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with(
        "hello: engines lists 65 names; a process may declare at most 64 (the brain's limit for the host's whole hello): 1 were ignored, from \"e064\" on"
    )), "{messages:?}");
    assert!(messages
        .iter()
        .any(|m| m.contains("runtime_features lists 100 names") && m.contains("36 were ignored")));
    assert!(
        messages
            .iter()
            .any(|m| m.contains("capabilities[\"celery\"] lists 65 names")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("hello: capabilities has 71 entries")),
        "{messages:?}"
    );
    assert!(
        messages.iter().all(|m| m.contains("declare only")),
        "{messages:?}"
    );
}
