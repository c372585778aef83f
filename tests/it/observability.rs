//! `/metrics`, `/healthz`, `/readyz` and the `stats` reply of a whole
//! daemon in-process, against the fake brain or no brain at all.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain};
use support::{event, num, options, wait_for, wait_stats, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use z4j_agentd::client::Event;
use z4j_agentd::config::Options;
use z4j_agentd::protocol::Value;

/// A minimal HTTP/1.1 GET: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// Samples of an OpenMetrics text page: `name{labels}` -> value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse().expect("numeric value"))
        })
        .collect()
}

async fn scrape(d: &TestDaemon) -> BTreeMap<String, f64> {
    let (code, body) = get(d.metrics.expect("metrics enabled"), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics page ends with # EOF"
    );
    samples(&body)
}

fn with_metrics(mut o: Options) -> Options {
    o.metrics_addr = Some("127.0.0.1:0".into());
    o
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).expect("JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_events_acks_and_refusals() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(with_metrics(options(&brain.url))).await;
    let stats = d.stats.clone();
    wait_for(10, "connected", || {
        stats.uplink().state == z4j_agentd::stats::UplinkState::Connected
    })
    .await;
    let before = scrape(&d).await;
    assert_eq!(before["z4j_agentd_events_received_total"], 0.0);
    assert_eq!(before["z4j_agentd_brain_connected"], 1.0);
    assert_eq!(
        before["z4j_agentd_brain_connection_state{state=\"connected\"}"],
        1.0
    );

    let mut c = d.client().await;
    let events: Vec<Event> = (0..40)
        .map(|i| event(&format!("t{i}"), "task.received"))
        .collect();
    assert_eq!(c.send_durable(&events).await.unwrap(), 40);
    let mut c2 = d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c2.stats().await.unwrap();
        if s.get("acked").and_then(Value::as_u64) == Some(40) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acked in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One invalid event: refused and counted by reason.
    let bad = Event {
        engine: String::new(),
        ..event("bad", "task.received")
    };
    assert!(c.send_durable(&[bad]).await.is_err());

    let after = scrape(&d).await;
    assert_eq!(after["z4j_agentd_events_received_total"], 41.0);
    assert_eq!(after["z4j_agentd_events_stored_total"], 40.0);
    assert_eq!(after["z4j_agentd_events_acked_total"], 40.0);
    assert_eq!(after["z4j_agentd_events_forwarded_total"], 40.0);
    assert_eq!(
        after["z4j_agentd_refused_total{reason=\"invalid_event\"}"],
        1.0
    );
    assert_eq!(after["z4j_agentd_spool_depth_events"], 0.0);
    assert_eq!(after["z4j_agentd_spool_oldest_age_seconds"], 0.0);
    assert!(after["z4j_agentd_brain_ack_latency_seconds_count"] >= 1.0);
    assert_eq!(
        after["z4j_agentd_brain_ack_latency_seconds_bucket{le=\"+Inf\"}"],
        after["z4j_agentd_brain_ack_latency_seconds_count"]
    );
    assert_eq!(after["z4j_agentd_brain_connects_total"], 1.0);
    assert!(after["z4j_agentd_clients_connected"] >= 2.0);
    assert!(after.contains_key("z4j_agentd_build_info{version=\"0.1.0\"}"));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_and_connection_failures_show_while_the_brain_is_away() {
    // Nothing listens on this port: the uplink fails by connection class.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut o = with_metrics(options(&url));
    o.buffer_max_events = Some("1000".into());
    // Nothing can be drained: do not wait for it at shutdown.
    o.shutdown_grace_seconds = Some("0".into());
    let d = TestDaemon::start(o).await;
    let mut c = d.client().await;
    let events: Vec<Event> = (0..1500)
        .map(|i| event(&format!("t{i}"), "task.received"))
        .collect();
    for chunk in events.chunks(100) {
        c.send_durable(chunk).await.unwrap();
    }
    let stats = d.stats.clone();
    wait_for(10, "a failed connection attempt", || {
        stats.failures().get("connection").copied().unwrap_or(0) >= 1
    })
    .await;
    let m = scrape(&d).await;
    assert_eq!(
        m["z4j_agentd_events_dropped_total{reason=\"oldest_evicted\"}"],
        500.0
    );
    assert_eq!(
        m["z4j_agentd_events_dropped_total{reason=\"spool_full\"}"],
        0.0
    );
    assert_eq!(m["z4j_agentd_spool_depth_events"], 1000.0);
    assert!(m["z4j_agentd_spool_bytes"] > 0.0);
    assert!(m["z4j_agentd_brain_reconnects_total{class=\"connection\"}"] >= 1.0);
    assert_eq!(m["z4j_agentd_brain_connected"], 0.0);

    let s = c.stats().await.unwrap();
    let by_reason = s.get("dropped_by_reason").unwrap();
    assert_eq!(
        by_reason.get("oldest_evicted").and_then(Value::as_u64),
        Some(500)
    );
    assert!(matches!(
        s.get("spool_oldest_age_seconds"),
        Some(Value::Float(_) | Value::Int(_))
    ));
    assert!(s.get("last_error").and_then(Value::as_str).is_some());

    // Ready without the brain: applications can still write.
    let (code, body) = get(d.metrics.unwrap(), "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["ready"], true);
    assert_eq!(r["checks"]["brain"]["connected"], false);
    assert_eq!(r["checks"]["brain"]["required"], false);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_socket_is_gone_and_healthz_stays_up() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(with_metrics(options(&brain.url))).await;
    let addr = d.metrics.unwrap();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["checks"]["spool"]["ok"], true);
    assert_eq!(r["checks"]["socket"]["ok"], true);

    // Someone removed the socket file: applications can no longer connect.
    std::fs::remove_file(&d.socket).unwrap();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let r = json(&body);
    assert_eq!(r["ready"], false);
    assert_eq!(r["checks"]["socket"]["ok"], false);
    assert!(r["checks"]["socket"]["message"]
        .as_str()
        .unwrap()
        .contains("does not answer"));
    assert_eq!(r["checks"]["spool"]["ok"], true);

    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200);
    assert_eq!(json(&body)["status"], "alive");
    let (code, _) = get(addr, "/nope").await;
    assert_eq!(code, 404);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_fails_the_start_with_the_variable_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut o = options("http://127.0.0.1:9");
    o.metrics_addr = Some(taken.local_addr().unwrap().to_string());
    let dir = tempfile::tempdir().unwrap();
    o.socket_path = Some(dir.path().join("agent.sock"));
    o.buffer_path = Some(dir.path().join("home/.z4j/spool.sqlite"));
    let host = z4j_agentd::host::HostEnv {
        home: Some(dir.path().join("home")),
        tmpdir: dir.path().join("tmp"),
        uid: z4j_agentd::host::current_uid(),
        hostname: "testhost".into(),
        ..Default::default()
    };
    std::fs::create_dir_all(&host.tmpdir).unwrap();
    let config = o.resolve(host).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(config.uplink.clone());
    let err = z4j_agentd::daemon::run(config, rx, tokio_util::sync::CancellationToken::new(), None)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Z4J_METRICS_ADDR"), "{text}");
    assert_eq!(err.exit_code(), 1);
    // Nothing left behind: the socket was removed and the spool closed,
    // its lock released before the error came back.
    assert!(!dir.path().join("agent.sock").exists());
    let again = z4j_agentd::spool::Spool::open(z4j_agentd::spool::SpoolConfig {
        path: dir.path().join("home/.z4j/spool.sqlite"),
        max_events: 10,
        max_bytes: 1 << 20,
        overflow: z4j_agentd::spool::Overflow::DropOldest,
        synchronous: z4j_agentd::spool::Synchronous::Normal,
    })
    .expect("the failed start released the spool");
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_carry_what_status_prints() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut o = options(&brain.url);
    o.engines = Some("rq".into());
    let d = TestDaemon::start(o).await;
    let stats = d.stats.clone();
    wait_for(10, "connected", || {
        stats.uplink().state == z4j_agentd::stats::UplinkState::Connected
    })
    .await;
    let mut worker = d.client().await;
    worker.hello("celery-worker", &["celery"]).await.unwrap();
    // `hello` has no reply: a ping on the same connection returns once the
    // daemon has read it.
    worker.ping().await.unwrap();
    let mut c = d.client().await;
    let s = c.stats().await.unwrap();
    assert_eq!(
        s.get("brain_url").and_then(Value::as_str),
        Some(brain.url.as_str())
    );
    assert_eq!(
        s.get("worker_id").and_then(Value::as_str),
        Some("agentd-test")
    );
    assert_eq!(
        s.get("pid").and_then(Value::as_u64),
        Some(std::process::id() as u64)
    );
    assert!(s
        .get("session_age_seconds")
        .is_some_and(|v| !matches!(v, Value::Null)));
    let Some(Value::Array(engines)) = s.get("engines") else {
        panic!("engines list")
    };
    let engines: Vec<&str> = engines.iter().filter_map(Value::as_str).collect();
    assert_eq!(engines, ["celery", "rq"]);
    let Some(Value::Array(clients)) = s.get("client_list") else {
        panic!("client_list")
    };
    assert!(clients
        .iter()
        .any(|c| c.get("process").and_then(Value::as_str) == Some("celery-worker")));
    let text = z4j_agentd::admin::render(&s).expect("a stats reply of this daemon renders");
    assert!(text.contains("celery-worker"), "{text}");
    assert!(text.contains("uplink:   connected"), "{text}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_own_user_is_allowed_whatever_the_allow_list_says() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut o = with_metrics(options(&brain.url));
    // An allow-list for application users that does not name the daemon's own.
    o.allowed_uids = Some("54321".into());
    let d = TestDaemon::start(o).await;
    let mut c = d.client().await;
    let s = c.stats().await.unwrap();
    assert_eq!(s.get("refused").and_then(Value::as_u64), Some(0), "{s:?}");
    let (code, body) = get(d.metrics.unwrap(), "/readyz").await;
    assert_eq!(code, 200, "{body}");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_brain_does_not_store_are_counted_and_duplicates_of_a_resend_are_not_losses() {
    let brain = FakeBrain::start(Behavior {
        reject_task_ids_containing: Some("refused-by-brain".into()),
        ..Behavior::default()
    })
    .await;
    let mut opts = with_metrics(options(&brain.url));
    opts.ack_timeout_seconds = Some("1".into());
    let d = TestDaemon::start(opts).await;
    let mut c = d.client().await;
    let mut events: Vec<_> = (0..7)
        .map(|i| event(&format!("ok-{i}"), "task.received"))
        .collect();
    events.extend((0..3).map(|i| event(&format!("refused-by-brain-{i}"), "task.received")));
    assert_eq!(c.send_durable(&events).await.unwrap(), 10);
    let s = wait_stats(&d, 15, "the frame acked", |s| {
        num(s, "acked") == 10 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(num(&s, "brain_rejected"), 3, "{s:?}");
    assert_eq!(num(&s, "brain_duplicates"), 0, "{s:?}");
    assert_eq!(num(&s, "dropped"), 0, "the daemon lost nothing: {s:?}");

    // A frame whose ack the brain withholds after storing it goes again:
    // the brain's `rejected` for that copy are duplicates, not losses.
    brain.set_behavior(Behavior {
        withhold_acks: 1,
        ..Behavior::default()
    });
    let again: Vec<_> = (0..5)
        .map(|i| event(&format!("again-{i}"), "task.received"))
        .collect();
    c.send_durable(&again).await.unwrap();
    let s = wait_stats(&d, 15, "the re-sent frame acked", |s| {
        num(s, "acked") == 15 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(num(&s, "brain_duplicates"), 5, "{s:?}");
    assert_eq!(num(&s, "brain_rejected"), 3, "not counted again: {s:?}");
    assert_eq!(brain.seen.stored_event_ids.lock().unwrap().len(), 12);
    let m = scrape(&d).await;
    assert_eq!(
        m.get("z4j_agentd_events_brain_rejected_total"),
        Some(&3.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("z4j_agentd_events_brain_duplicates_total"),
        Some(&5.0),
        "{m:?}"
    );
    d.stop().await.unwrap();
}
