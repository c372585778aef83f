//! Unit tests of the counters and of the snapshot every report reads.

use super::*;
use crate::clients::ClientInfo;
use crate::protocol::Value;

#[test]
fn rates_cover_the_window_and_forget_older_samples() {
    let s = Stats::new();
    let t0 = Instant::now();
    s.sample_at(t0, 0);
    s.events_received.store(100, Ordering::Relaxed);
    s.events_forwarded.store(50, Ordering::Relaxed);
    s.sample_at(t0 + Duration::from_secs(10), 40);
    let r = s.rates();
    assert_eq!(r.window_seconds, 10.0);
    assert_eq!((r.ingest, r.forward, r.acked), (10.0, 5.0, 4.0));
    // 70 s later the first sample is out of the window.
    s.events_received.store(700, Ordering::Relaxed);
    s.sample_at(t0 + Duration::from_secs(70), 40);
    let r = s.rates();
    assert_eq!(r.window_seconds, 60.0);
    assert_eq!(r.ingest, 10.0);
    assert_eq!(r.acked, 0.0);
}

#[test]
fn no_rates_before_two_samples() {
    let s = Stats::new();
    assert_eq!(s.rates(), Rates::default());
    s.sample_at(Instant::now(), 0);
    assert_eq!(s.rates(), Rates::default());
}

#[test]
fn report_lists_clients_and_failures() {
    let s = Stats::new();
    s.clients.connected(
        1,
        ClientInfo {
            pid: Some(42),
            uid: 1000,
            engines: vec!["celery".into()],
            framing: "jsonl",
            ..Default::default()
        },
    );
    s.record_failure("auth");
    s.record_failure("auth");
    s.update_info(|i| i.static_engines = vec!["rq".into()]);
    let r = s.report(&SpoolStats::default());
    assert_eq!(r.get("clients").and_then(Value::as_u64), Some(1));
    let list = r.get("client_list").unwrap();
    let Value::Array(items) = list else {
        panic!("client_list is a list")
    };
    assert_eq!(items[0].get("pid").and_then(Value::as_i64), Some(42));
    assert_eq!(
        r.get("failures_by_class")
            .and_then(|m| m.get("auth"))
            .and_then(Value::as_u64),
        Some(2)
    );
    let Some(Value::Array(engines)) = r.get("engines") else {
        panic!("engines is a list")
    };
    let engines: Vec<&str> = engines.iter().filter_map(Value::as_str).collect();
    assert_eq!(engines, ["celery", "rq"]);
    assert_eq!(r.get("spool_oldest_age_seconds"), Some(&Value::Null));
}

#[test]
fn the_stats_reply_is_unchanged_for_the_same_counters() {
    let s = fixture::stats();
    let sp = SpoolStats::default();
    fixture::spool(&sp);
    let reply = fixture::steady(s.report(&sp));
    fixture::golden(
        "stats_reply.json",
        &(serde_json::to_string_pretty(&reply).unwrap() + "\n"),
    );
}

/// The fixture's snapshot, with its spool.
fn fixture_snapshot() -> Snapshot {
    let sp = SpoolStats::default();
    fixture::spool(&sp);
    fixture::stats().full_snapshot(&sp)
}

#[test]
fn the_reply_reads_back_into_the_snapshot_it_was_rendered_from() {
    let snap = fixture_snapshot();
    let back = Snapshot::from_value(&snap.to_value()).unwrap();
    // The reply carries whole seconds of uptime and not the fields only
    // `/metrics` reads.
    let sent = Snapshot {
        uptime: Duration::from_secs(snap.uptime.as_secs()),
        accept_failures: 0,
        spool_commits: 0,
        spool_write_failing: false,
        ..snap
    };
    assert_eq!(back, sent);
}

#[test]
fn dropped_is_the_sum_of_its_reasons_in_every_report() {
    let snap = fixture_snapshot();
    assert_eq!(
        snap.dropped_by_reason.by_reason(),
        [
            ("oldest_evicted", 20),
            ("spool_full", 30),
            ("undeliverable", 2)
        ]
    );
    assert_eq!(snap.dropped, 52);
    assert_eq!(snap.dropped_oldest, 20);
    let hb = snap.heartbeat_payload(None);
    assert_eq!(hb.get("dropped_events").and_then(Value::as_u64), Some(52));
    assert!(crate::systemd::status_text(&snap).contains("dropped 52;"));
    assert_eq!(
        snap.to_value().get("dropped").and_then(Value::as_u64),
        Some(52)
    );
}

#[test]
fn ages_and_rates_are_rounded_in_the_reply_only() {
    let snap = Snapshot {
        spool_oldest_age_seconds: Some(1.23456),
        clock_skew_seconds: Some(0.123456),
        rates: Some(Rates {
            window_seconds: 9.99949,
            ingest: 1.0 / 3.0,
            forward: 0.0,
            acked: 2.0005,
        }),
        ..Snapshot::default()
    };
    let v = snap.to_value();
    assert_eq!(
        v.get("spool_oldest_age_seconds"),
        Some(&Value::Float(1.235))
    );
    // The skew is shown as measured.
    assert_eq!(v.get("clock_skew_seconds"), Some(&Value::Float(0.123456)));
    let r = v.get("rates").unwrap();
    assert_eq!(r.get("window_seconds"), Some(&Value::Float(9.999)));
    assert_eq!(r.get("ingest_per_second"), Some(&Value::Float(0.333)));
    assert_eq!(r.get("forward_per_second"), Some(&Value::Float(0.0)));
    // The heartbeat sends the spool's age unrounded.
    let st = snap.agent_status_payload(&[], Duration::ZERO, time::OffsetDateTime::UNIX_EPOCH);
    assert_eq!(
        st.get("buffer_oldest_age_seconds"),
        Some(&Value::Float(1.23456))
    );
}

#[test]
fn a_float_that_is_not_finite_is_sent_as_null() {
    let snap = Snapshot {
        clock_skew_seconds: Some(f64::NAN),
        spool_oldest_age_seconds: Some(f64::INFINITY),
        ..Snapshot::default()
    };
    let v = snap.to_value();
    assert_eq!(v.get("type").and_then(Value::as_str), Some("stats"));
    assert_eq!(v.get("clock_skew_seconds"), Some(&Value::Null));
    assert_eq!(v.get("spool_oldest_age_seconds"), Some(&Value::Null));
}

#[test]
fn a_reply_of_another_version_reads_with_defaults_and_a_bad_one_says_why() {
    let mut v = Value::empty_map();
    v.insert("type", "stats");
    v.insert("received", 7u64);
    v.insert("uptime_seconds", 12.5);
    v.insert("some_later_key", Value::empty_map());
    let s = Snapshot::from_value(&v).unwrap();
    assert_eq!(s.received, 7);
    assert_eq!(s.uptime, Duration::from_millis(12_500));
    assert_eq!(s.commands, None);
    assert_eq!(s.rates, None);
    v.insert("received", "seven");
    let e = Snapshot::from_value(&v).unwrap_err();
    assert!(e.contains("\"seven\", expected u64"), "{e}");
}

#[test]
fn the_heartbeat_payloads_keep_the_brains_bounds() {
    let snap = Snapshot {
        spool_depth: 20_000_000,
        dropped: 30_000_000,
        spool_oldest_age_seconds: None,
        ..fixture_snapshot()
    };
    let hb = snap.heartbeat_payload(None);
    let text =
        |v: &Value| String::from_utf8(crate::protocol::canonical::to_vec(v).unwrap()).unwrap();
    assert_eq!(
        text(&hb),
        r#"{"adapter_health":{},"buffer_size":10000000,"dropped_events":10000000,"last_flush_at":null}"#
    );
    let engines: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
    let at = time::macros::datetime!(2026-12-01 10:00:00 UTC);
    let st = snap.agent_status_payload(&engines, Duration::from_millis(1500), at);
    let Some(Value::Array(sent)) = st.get("engines") else {
        panic!("engines is a list")
    };
    assert_eq!(sent.len(), AGENT_STATUS_ENGINES_MAX);
    assert_eq!(
        st.get("buffer_depth").and_then(Value::as_u64),
        Some(10_000_000)
    );
    assert_eq!(st.get("buffer_oldest_age_seconds"), Some(&Value::Null));
    assert_eq!(
        st.get("current_session_age_seconds"),
        Some(&Value::Float(1.5))
    );
    assert_eq!(
        st.get("last_successful_connect_at").and_then(Value::as_str),
        Some(crate::protocol::format_ts(at).as_str())
    );
    assert_eq!(
        st.get("protocol_version").and_then(Value::as_str),
        Some(crate::protocol::PROTOCOL_VERSION)
    );
}

#[test]
fn agent_status_names_the_contract_line_the_schedulers_and_the_streaks() {
    let snap = fixture_snapshot();
    let at = time::macros::datetime!(2026-12-01 10:00:00 UTC);
    let mut st = snap.agent_status_payload(&["celery".into()], Duration::ZERO, at);
    let schedulers: Vec<String> = (0..40).map(|i| format!("beat{i}")).collect();
    let streaks = super::FailureStreaks {
        auth: 1,
        protocol: 2,
        connection: 3,
    };
    super::add_agent_identity(&mut st, "1.13.0", &schedulers, streaks);
    assert_eq!(
        st.get("agent_version").and_then(Value::as_str),
        Some("1.13.0")
    );
    let Some(Value::Array(sent)) = st.get("schedulers") else {
        panic!("schedulers is a list")
    };
    assert_eq!(sent.len(), super::AGENT_STATUS_SCHEDULERS_MAX);
    for (k, v) in [
        ("auth_failure_streak", 1),
        ("protocol_failure_streak", 2),
        ("connection_failure_streak", 3),
    ] {
        assert_eq!(st.get(k).and_then(Value::as_u64), Some(v), "{k}");
    }
}

#[test]
fn the_heartbeat_carries_a_telemetry_loss_within_the_brains_limits() {
    let stats = super::Stats::new();
    let spool = crate::spool::SpoolStats::default();
    let _ = spool.buffer_id.set("ab".repeat(16));
    spool
        .dropped_oldest_total
        .store(4, std::sync::atomic::Ordering::Relaxed);
    stats.telemetry.engine_dropped(&["celery".into()], 2);
    let loss = stats.telemetry_loss(&spool, &["celery".into(), "rq".into()]);
    let mut hb = fixture_snapshot().heartbeat_payload(None);
    super::add_telemetry_loss(&mut hb, &loss);
    let tl = hb.get("telemetry_loss").expect("telemetry_loss");
    assert_eq!(
        tl.get("buffer_id").and_then(Value::as_str),
        Some("abababababababababababababababab")
    );
    assert_eq!(
        tl.get("runtime_id").and_then(Value::as_str),
        Some(stats.telemetry.runtime_id.as_str())
    );
    assert_eq!(
        tl.get("capacity_evicted_frames").and_then(Value::as_u64),
        Some(4)
    );
    let adapters = tl.get("adapter_events").unwrap();
    assert_eq!(adapters.get("celery").and_then(Value::as_u64), Some(2));
    assert_eq!(adapters.get("rq").and_then(Value::as_u64), Some(0));
    // Before the spool has an identity, nothing invalid goes out: null.
    let unopened = crate::spool::SpoolStats::default();
    let mut hb = fixture_snapshot().heartbeat_payload(None);
    super::add_telemetry_loss(&mut hb, &stats.telemetry_loss(&unopened, &[]));
    assert_eq!(hb.get("telemetry_loss"), Some(&Value::Null));
}
