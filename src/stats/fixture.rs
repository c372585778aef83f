//! Fixed counters and states for the golden tests of every reader of the
//! counters: the `stats` reply, `z4j-agentd status` and `/metrics` must stay
//! byte for byte what they were for the same counters.

use super::*;
use crate::clients::merge::Cuts;
use crate::clients::ClientInfo;
use crate::protocol::Value;
use time::macros::datetime;

/// A daemon with every counter, map and list non-empty (and distinct).
pub(crate) fn stats() -> Stats {
    let s = Stats::new();
    let t0 = Instant::now();
    s.sample_at(t0, 0);
    s.gateway.listening("127.0.0.1:7700".into());
    s.gateway.session_opened();
    s.gateway.session_opened();
    s.gateway.session_closed();
    s.gateway.frame();
    s.gateway.frame();
    s.gateway.event_batch();
    s.gateway.closed(4401);
    s.gateway.closed(4403);
    s.gateway.closed(4401);
    let counters: [(&AtomicU64, u64); 22] = [
        (&s.events_received, 1001),
        (&s.events_forwarded, 902),
        (&s.events_resent, 13),
        (&s.events_undeliverable, 2),
        (&s.events_rejected_by_brain, 5),
        (&s.events_duplicate_at_brain, 7),
        (&s.events_time_corrected, 3),
        (&s.replies_dropped, 4),
        (&s.connects, 6),
        (&s.contract_rehellos, 18),
        (&s.transport_fallbacks, 19),
        (&s.producer_waits, 8),
        (&s.message_budget_waits, 9),
        (&s.accept_failures, 10),
        (&s.metrics_connections, 1),
        (&s.metrics_refused_limit, 11),
        (&s.metrics_refused_timeout, 12),
        (&s.metrics_refused_too_large, 14),
        (&s.commands_received, 15),
        (&s.commands_succeeded, 16),
        (&s.commands_failed, 17),
        (&s.purges_forced, 27),
    ];
    for (a, n) in counters {
        a.store(n, Ordering::Relaxed);
    }
    s.refuse(crate::refusal::RefusalCode::InvalidEvent, 3);
    s.refuse(crate::refusal::RefusalCode::EventTooLarge, 1);
    s.record_failure("auth");
    s.record_failure("auth");
    s.record_failure("connection");
    s.ack_latency.observe(0.003);
    s.ack_latency.observe(0.7);
    s.sample_at(t0 + Duration::from_secs(10), 40);
    uplink(&s);
    clients(&s);
    s
}

/// A daemon in backoff after a session, with every detail set.
fn uplink(s: &Stats) {
    s.set_uplink_state(UplinkState::Backoff);
    s.update_uplink(|u| {
        u.since = datetime!(2026-12-01 10:00:00.5 UTC);
        u.disconnected_since = Some(datetime!(2026-12-01 09:59:00 UTC));
        u.last_error = Some("cannot reach ws://brain.example:7700: refused".into());
        u.last_failure_class = Some("connection");
        u.failure_streak = 3;
        u.clock_skew_seconds = Some(-1.25);
        u.session_id = Some("sess_1".into());
        u.agent_id = Some("agent-1".into());
        u.project_id = Some("proj-1".into());
        u.brain_version = Some("1.4.0".into());
        u.contract_line = Some("1.9.1".into());
        u.transport = Some("longpoll");
        u.longpoll_reason = Some(
            "ws://brain.example:7700/ws/agent answered HTTP 400 instead of a WebSocket upgrade"
                .into(),
        );
        u.advertised = Advertisement {
            engines: vec!["celery".into()],
            capabilities: BTreeMap::from([("celery".into(), vec!["retry_task".into()])]),
            runtime_features: vec!["beat".into()],
            schedulers: Vec::new(),
        };
    });
}

/// Where the daemon runs and two clients: one that said `hello`, one
/// that did not.
fn clients(s: &Stats) {
    s.set_info(DaemonInfo {
        brain_url: "ws://brain.example:7700".into(),
        worker_id: "host-a".into(),
        agent_name: "host-a.example".into(),
        static_engines: vec!["rq".into()],
        static_capabilities: BTreeMap::new(),
        spool_path: "/var/lib/z4j-agentd/spool.sqlite".into(),
        socket_path: "/run/z4j-agentd/agent.sock".into(),
        transport_setting: "auto",
    });
    s.clients.connected(
        7,
        ClientInfo {
            pid: Some(4242),
            uid: 33,
            gid: 34,
            process: Some("celery-worker".into()),
            framework: Some("celery".into()),
            engines: vec!["celery".into()],
            capabilities: BTreeMap::from([("celery".into(), vec!["cancel_task".into()])]),
            runtime_features: vec!["beat".into(), "external_schedule_protocol_v1".into()],
            worker_role: Some("worker".into()),
            framing: "msgpack",
            events_received: 12,
            schedulers: vec!["celerybeat".into()],
            health: Some(health_report()),
            ..ClientInfo::default()
        },
    );
    s.health.set(HealthCounts {
        received: 18,
        refused: 19,
        expired: 21,
        cut: Cuts {
            registered: 22,
            details: 23,
            workers: 24,
            queues: 25,
            facts: 26,
        },
    });
    s.clients.remember_until(
        Advertisement {
            engines: vec!["huey".into()],
            capabilities: BTreeMap::from([
                ("huey".into(), vec!["cancel_task".into()]),
                ("celery-beat".into(), vec!["schedule.trigger_now".into()]),
            ]),
            runtime_features: Vec::new(),
            schedulers: vec!["celery-beat".into()],
        },
        Instant::now() + Duration::from_secs(3600),
        datetime!(2026-12-01 10:01:00 UTC),
    );
    s.clients.connected(
        9,
        ClientInfo {
            uid: 1000,
            gid: 1000,
            framing: "jsonl",
            ..Default::default()
        },
    );
}

/// One worker, two queues and a fact, as a `health` message reports them.
fn health_report() -> crate::clients::HealthReport {
    let worker: Value = serde_json::from_str(
        r#"{"stats":{"pid":111,"pool":{"max-concurrency":4}},"active":[{"id":"t1"}],"active_queues":[{"name":"default"},{"name":"high"}],"registered":["proj.add","proj.mul"],"conf":{"task_acks_late":false}}"#,
    )
    .unwrap();
    let celery = crate::clients::EngineHealth {
        queue_depths: BTreeMap::from([("default".into(), 3), ("high".into(), 0)]),
        workers: BTreeMap::from([("celery@host-a".into(), worker)]),
        facts: BTreeMap::from([("broker_type".into(), "redis".into())]),
    };
    crate::clients::HealthReport {
        received: Instant::now(),
        at: datetime!(2026-12-01 09:59:30 UTC),
        fresh_for: Duration::from_secs(30),
        engines: BTreeMap::from([("celery".into(), celery)]),
    }
}

/// The spool's side of [`stats`], written into `sp`.
pub(crate) fn spool(sp: &SpoolStats) {
    sp.depth.store(42, Ordering::Relaxed);
    sp.bytes.store(123_456, Ordering::Relaxed);
    sp.stored_total.store(1000, Ordering::Relaxed);
    sp.acked_total.store(880, Ordering::Relaxed);
    sp.dropped_oldest_total.store(20, Ordering::Relaxed);
    sp.refused_full_total.store(30, Ordering::Relaxed);
    sp.commits_total.store(77, Ordering::Relaxed);
    sp.oldest_stored_ms.store(0, Ordering::Relaxed);
    sp.write_failing.store(true, Ordering::Relaxed);
    sp.wal_bytes.store(4_194_304, Ordering::Relaxed);
    sp.checkpoints_total.store(12, Ordering::Relaxed);
    sp.checkpoint_last_us.store(3_250, Ordering::Relaxed);
    sp.writer_checkpoints_total.store(2, Ordering::Relaxed);
    sp.checkpoint_failures_total.store(1, Ordering::Relaxed);
    sp.checkpoint_on_commit.store(true, Ordering::Relaxed);
    *sp.checkpoint_error.lock().unwrap() = Some("checkpoint failed: disk I/O error".into());
}

/// Compares `actual` with the file `tests/golden/<name>`; with
/// `Z4J_BLESS_GOLDEN=1` in the environment, writes it instead.
pub(crate) fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("Z4J_BLESS_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        want == actual,
        "{name} changed; want:\n{want}\ngot:\n{actual}"
    );
}

/// `v` with the entries that differ from run to run or release to
/// release (`pid`, `uptime_seconds`, `version`) replaced in place.
pub(crate) fn steady(mut v: Value) -> Value {
    if let Value::Map(entries) = &mut v {
        for (k, val) in entries.iter_mut() {
            match k.as_str() {
                "pid" | "uptime_seconds" => *val = Value::from(0u64),
                "version" => *val = Value::from("VERSION"),
                "remembered" => {
                    if let Some(left) = val.get_mut("seconds_left") {
                        *left = Value::from(0.0);
                    }
                }
                _ => {}
            }
        }
    }
    v
}
