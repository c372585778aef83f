//! The uplink against a fake brain that misbehaves on purpose: withheld
//! acks, bad signatures, close codes. Each test runs a whole daemon
//! in-process.

use crate::support;

use std::time::Duration;

use support::fake_brain::{Behavior, FakeBrain, TOKEN};
use support::{event, num, options, text, wait_for, wait_stats, TestDaemon};
use z4j_agentd::protocol::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_and_leave_the_spool_only_on_ack() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let mut c = d.client().await;
    let stored = c
        .send_durable(&[event("t1", "task.received"), event("t1", "task.started")])
        .await
        .unwrap();
    assert_eq!(stored, 2);
    wait_stats(&d, 10, "both events acked", |s| {
        num(s, "acked") == 2 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), 2);
    assert_eq!(
        brain.seen.auth_headers.lock().unwrap().as_slice(),
        &[format!("Bearer {TOKEN}")]
    );
    let hello = brain.seen.hellos.lock().unwrap()[0].clone();
    assert_eq!(
        hello.get("worker_id").and_then(Value::as_str),
        Some("agentd-test")
    );
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    let types = brain.seen.frame_types.lock().unwrap().clone();
    assert!(types.contains(&"heartbeat".to_string()), "{types:?}");
    assert!(types.contains(&"agent_status".to_string()), "{types:?}");
    d.stop().await.unwrap();
    let seen = brain.seen.clone();
    wait_for(5, "close 1000 from the daemon", || {
        seen.client_close_codes.lock().unwrap().contains(&1000)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_ack_makes_the_frame_go_again() {
    let brain = FakeBrain::start(Behavior {
        withhold_acks: 1,
        ..Behavior::default()
    })
    .await;
    let mut opts = options(&brain.url);
    opts.ack_timeout_seconds = Some("1".into());
    let d = TestDaemon::start(opts).await;
    let mut c = d.client().await;
    c.send_durable(&[event("t1", "task.received"), event("t1", "task.started")])
        .await
        .unwrap();
    let s = wait_stats(&d, 15, "the re-sent frame acked", |s| {
        num(s, "acked") == 2 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(num(&s, "resent"), 2, "{s:?}");
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    assert_eq!(
        batches.len(),
        2,
        "sent once, withheld, sent again: {batches:?}"
    );
    assert_eq!(batches[0], batches[1], "the same events go again");
    assert_eq!(
        brain
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "re-sent on the same session"
    );
    assert!(
        brain.seen.verify_failures.lock().unwrap().is_empty(),
        "re-sent frames are re-signed"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badly_signed_brain_frame_ends_the_session_and_nothing_is_lost() {
    let brain = FakeBrain::start(Behavior {
        bad_signature_acks: 1,
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let mut c = d.client().await;
    c.send_durable(&[event("t1", "task.received")])
        .await
        .unwrap();
    let s = wait_stats(&d, 15, "delivery after reconnecting", |s| {
        num(s, "acked") == 1 && num(s, "spool_depth") == 0
    })
    .await;
    assert!(num(&s, "connects") >= 2, "{s:?}");
    // Counted under its class (the last error is cleared once reconnected).
    assert_eq!(protocol_failures(&s), Some(1), "{s:?}");
    assert_eq!(s.get("last_failure_class"), Some(&Value::Null), "{s:?}");
    assert!(
        brain
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "the daemon reconnected"
    );
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    assert_eq!(
        batches.len(),
        2,
        "the unconfirmed event went again on the new session"
    );
    let codes = brain.seen.client_close_codes.lock().unwrap().clone();
    assert_eq!(
        codes.first(),
        Some(&1002),
        "the daemon said why it left instead of dropping TCP: {codes:?}"
    );
    d.stop().await.unwrap();
}

async fn close_code_class(code: u16) -> String {
    let brain = FakeBrain::start(Behavior {
        close_handshake_with: Some(code),
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let s = wait_stats(&d, 10, "a classified failure", |s| {
        !text(s, "last_failure_class").is_empty() && text(s, "uplink_state") == "backoff"
    })
    .await;
    let class = text(&s, "last_failure_class").to_string();
    let error = text(&s, "last_error").to_string();
    assert!(error.contains(&code.to_string()), "{error}");
    assert!(!error.contains(TOKEN), "no secret in errors");
    d.stop().await.unwrap();
    class
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_close_code_gets_its_backoff_class() {
    for (code, class) in [
        (4401, "auth"),
        (4403, "auth"),
        (4003, "auth"),
        (4426, "incompatible"),
        (4427, "incompatible"),
        (4400, "connection"),
        (4002, "connection"),
        (4429, "connection"),
        (4408, "connection"),
        (1011, "connection"),
    ] {
        assert_eq!(close_code_class(code).await, class, "close code {code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_what_clients_sent_to_the_brain() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let mut c = d.client().await;
    let events: Vec<_> = (0..300)
        .map(|i| event(&format!("t{i}"), "task.received"))
        .collect();
    c.send(&events).await.unwrap();
    c.ping().await.unwrap();
    d.stop().await.unwrap();
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), 300);
    assert!(brain
        .seen
        .client_close_codes
        .lock()
        .unwrap()
        .contains(&1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_as_the_daemon_stops_still_gets_its_durable_ack() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(options(&brain.url)).await;
    // Accepted (the daemon counts it) but nothing written yet: the shape of
    // a client that connected an instant before SIGTERM.
    let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    // The accept loop takes it at once; give the connection task time to
    // start waiting for the first byte.
    tokio::time::sleep(Duration::from_millis(100)).await;
    d.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(30)).await;
    s.write_all(
        br#"{"type":"event","engine":"celery","kind":"task.sent","task_id":"late-1","ack_id":"late"}"#,
    )
    .await
    .unwrap();
    s.write_all(b"\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(&mut s).read_line(&mut line),
    )
    .await
    .expect("a reply in time")
    .expect("no reset");
    let reply: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(reply["type"], "ack", "{line}");
    assert_eq!(reply["stored"], 1, "{line}");
    tokio::time::timeout(Duration::from_secs(30), d.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // ...and it was delivered by the drain before the daemon exited.
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brain_down_does_not_delay_readiness_and_events_wait_in_the_spool() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = options(&format!("http://127.0.0.1:{port}"));
    opts.shutdown_grace_seconds = Some("0".into());
    let d = TestDaemon::start(opts).await;
    let mut c = d.client().await;
    assert_eq!(
        c.send_durable(&[event("t1", "task.sent")]).await.unwrap(),
        1
    );
    let s = wait_stats(&d, 10, "a connection failure", |s| {
        text(s, "last_failure_class") == "connection"
    })
    .await;
    assert_eq!(num(&s, "spool_depth"), 1);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_holds_producers_back_and_loses_nothing() {
    let brain = FakeBrain::start(Behavior {
        // Hold the first frames back until the ack timeout, so the spool fills.
        withhold_acks: 2,
        ..Behavior::default()
    })
    .await;
    let mut opts = options(&brain.url);
    opts.buffer_max_events = Some("1000".into());
    opts.buffer_overflow = Some("block".into());
    opts.ack_timeout_seconds = Some("1".into());
    let d = TestDaemon::start(opts).await;
    let mut c = d.client().await;
    let mut total = 0;
    for b in 0..30 {
        let events: Vec<_> = (0..100)
            .map(|i| event(&format!("b{b}-{i}"), "task.received"))
            .collect();
        total += c.send_durable(&events).await.unwrap();
    }
    assert_eq!(total, 3000, "every event stored, none refused");
    let s = wait_stats(&d, 30, "everything delivered", |s| {
        num(s, "acked") == 3000 && num(s, "spool_depth") == 0
    })
    .await;
    assert!(
        num(&s, "producer_waits") > 0,
        "the producer was held back: {s:?}"
    );
    assert_eq!(num(&s, "dropped"), 0, "{s:?}");
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), 3000);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_registered_by_clients_reach_the_brain_in_a_new_hello() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut opts = options(&brain.url);
    opts.engines = Some("huey".into());
    let d = TestDaemon::start(opts).await;
    wait_stats(&d, 10, "connected", |s| {
        text(s, "uplink_state") == "connected"
    })
    .await;
    let mut c = d.client().await;
    c.hello("worker-1", &["celery", "rq"]).await.unwrap();
    c.ping().await.unwrap();
    let seen = brain.seen.clone();
    wait_for(10, "a second hello", || {
        seen.hellos.lock().unwrap().len() >= 2
    })
    .await;
    let engines = |h: &Value| -> Vec<String> {
        h.get("engines")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    };
    let hellos = brain.seen.hellos.lock().unwrap().clone();
    assert_eq!(engines(&hellos[0]), vec!["huey"]);
    assert_eq!(engines(&hellos[1]), vec!["celery", "huey", "rq"]);
    assert_eq!(
        hellos[1].get("worker_id"),
        hellos[0].get("worker_id"),
        "same slot"
    );
    assert!(brain
        .seen
        .client_close_codes
        .lock()
        .unwrap()
        .contains(&1000));
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_refused_right_after_the_handshake_back_off_instead_of_resetting() {
    // As when another process holds the slot (4002) or the secret is wrong:
    // the handshake works, the session does not. The backoff must grow.
    let brain = FakeBrain::start(Behavior {
        close_after_hello_with: Some(4002),
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(options(&brain.url)).await;
    let s = wait_stats(&d, 15, "a second failure in a row", |s| {
        num(s, "failure_streak") >= 2 && text(s, "last_failure_class") == "connection"
    })
    .await;
    assert!(num(&s, "connects") >= 2, "{s:?}");
    d.stop().await.unwrap();
}

/// Sends `n` events from one client, durably, in messages of 50.
async fn send_events(d: &TestDaemon, prefix: &str, n: usize) {
    let mut c = d.client().await;
    let events: Vec<_> = (0..n)
        .map(|i| event(&format!("{prefix}{i}"), "task.received"))
        .collect();
    for chunk in events.chunks(50) {
        c.send_durable(chunk).await.unwrap();
    }
}

fn small_frames(url: &str) -> z4j_agentd::config::Options {
    z4j_agentd::config::Options {
        batch_max_events: Some("20".into()),
        ..options(url)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_acks_are_harmless_and_nothing_is_lost() {
    let brain = FakeBrain::start(Behavior {
        duplicate_acks: 5,
        reorder_acks: true,
        ..Behavior::default()
    })
    .await;
    let d = TestDaemon::start(small_frames(&brain.url)).await;
    send_events(&d, "dr", 400).await;
    let s = wait_stats(&d, 20, "every event acked", |s| {
        num(s, "acked") == 400 && num(s, "spool_depth") == 0
    })
    .await;
    // One session throughout: neither a duplicate nor a late ack is an error.
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(num(&s, "resent"), 0, "{s:?}");
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), 400);
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    d.stop().await.unwrap();
}

/// Runs a fake brain that sends one ack the daemon must refuse (`fault`),
/// sends `n` events, and returns the stats once every event was acked after
/// the daemon reconnected, and what the brain received.
async fn refused_ack_then_delivered(fault: Behavior, prefix: &str, n: usize, why: &str) -> Value {
    let brain = FakeBrain::start(fault).await;
    let d = TestDaemon::start(small_frames(&brain.url)).await;
    send_events(&d, prefix, n).await;
    let s = wait_stats(&d, 30, "every event acked after reconnecting", |s| {
        num(s, "acked") == n as u64 && num(s, "spool_depth") == 0
    })
    .await;
    assert!(num(&s, "connects") >= 2, "{why} ended the session: {s:?}");
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), n);
    d.stop().await.unwrap();
    s
}

fn failures(s: &Value, class: &str) -> Option<u64> {
    s.get("failures_by_class")
        .and_then(|m| m.get(class))
        .and_then(Value::as_u64)
}

fn protocol_failures(s: &Value) -> Option<u64> {
    failures(s, "protocol")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_ack_ends_the_session_and_nothing_is_lost() {
    let fault = Behavior {
        replay_ack_after: Some(3),
        ..Behavior::default()
    };
    let s = refused_ack_then_delivered(fault, "rp", 200, "the replay").await;
    assert_eq!(protocol_failures(&s), Some(1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_outside_the_clock_window_ends_the_session_and_nothing_is_lost() {
    let fault = Behavior {
        stale_acks: 1,
        stale_by_seconds: 600,
        ..Behavior::default()
    };
    refused_ack_then_delivered(fault, "st", 100, "the stale ack").await;
}

/// A brain whose first session freezes after its handshake (the TCP
/// connection stays up) and that announces `heartbeat_seconds`: the daemon
/// must leave it after the 2 s ack timeout, by its own ping, and deliver
/// every event on the next session.
async fn frozen_first_session_is_left(heartbeat_seconds: u64, prefix: &str, n: usize) {
    let brain = FakeBrain::start(Behavior {
        freeze_sessions: 1,
        heartbeat_interval_seconds: Some(heartbeat_seconds),
        ..Behavior::default()
    })
    .await;
    let mut opts = small_frames(&brain.url);
    opts.ack_timeout_seconds = Some("2".into());
    let d = TestDaemon::start(opts).await;
    send_events(&d, prefix, n).await;
    let s = wait_stats(
        &d,
        20,
        "every event acked after leaving the frozen session",
        |s| num(s, "acked") == n as u64 && num(s, "spool_depth") == 0,
    )
    .await;
    assert_eq!(num(&s, "connects"), 2, "{s:?}");
    assert_eq!(failures(&s, "connection"), Some(1), "{s:?}");
    assert_eq!(
        brain
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(brain.seen.stored_event_ids.lock().unwrap().len(), n);
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brain_that_answers_nothing_is_left_after_the_ack_timeout_and_nothing_is_lost() {
    // Only the daemon's own ping can tell the frozen brain is gone.
    frozen_first_session_is_left(1, "fz", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brain_announcing_an_hour_long_heartbeat_is_still_left_when_it_freezes() {
    // The ping that tells a frozen brain from a quiet one must not follow
    // the heartbeat interval the brain announces (accepted up to 3,600 s).
    frozen_first_session_is_left(3600, "hb", 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_brain_that_acks_after_the_ack_timeout_still_drains_the_spool() {
    // Each frame takes the brain 2.5 s, one after another, longer than the
    // 1 s ack timeout: the first range goes again before its ack arrives,
    // and the brain's late ack of the first copy must settle it. Before, a
    // late ack was discarded, every range went round for ever and the
    // spool never emptied. Once the brain has acked a frame, the daemon
    // knows how long it takes and waits that long for the others.
    let brain = FakeBrain::start(Behavior {
        ack_delay: Some(Duration::from_millis(2500)),
        ..Behavior::default()
    })
    .await;
    let mut opts = small_frames(&brain.url);
    opts.ack_timeout_seconds = Some("1".into());
    opts.inflight_frames = Some("4".into());
    let d = TestDaemon::start(opts).await;
    // One message, one commit: the uplink sees all 100 at once, as 5
    // ranges of 20.
    let events: Vec<_> = (0..100)
        .map(|i| event(&format!("slow{i}"), "task.received"))
        .collect();
    d.client().await.send_durable(&events).await.unwrap();
    let s = wait_stats(&d, 60, "every event acked by the slow brain", |s| {
        num(s, "acked") == 100 && num(s, "spool_depth") == 0
    })
    .await;
    assert!(
        num(&s, "resent") > 0,
        "the brain was slower than the ack timeout, so ranges went again: {s:?}"
    );
    assert_eq!(num(&s, "connects"), 1, "slow is not dead: {s:?}");
    assert_eq!(num(&s, "dropped"), 0, "{s:?}");
    assert_eq!(brain.seen.stored_event_ids.lock().unwrap().len(), 100);
    // The slow brain is not buried under copies: only the range it works
    // on can be late (the 3 behind it in flight wait their turn), and once
    // it has acked a frame the others wait for its pace. One copy of the
    // first range, no other.
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    let ranges: std::collections::BTreeSet<_> = batches.iter().collect();
    assert!(
        batches.len() - ranges.len() <= 1,
        "{} ranges went out {} times",
        ranges.len(),
        batches.len()
    );
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changing_hellos_neither_postpones_the_rehandshake_nor_reconnects_per_hello() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let d = TestDaemon::start(options(&brain.url)).await;
    wait_stats(&d, 10, "connected", |s| {
        text(s, "uplink_state") == "connected"
    })
    .await;
    let mut c = d.client().await;
    // Engines toggled every 10 ms for 7 s.
    let flood_until = std::time::Instant::now() + Duration::from_secs(7);
    let mut k = 0u64;
    while std::time::Instant::now() < flood_until {
        let engines: &[&str] = if k.is_multiple_of(2) {
            &["celery"]
        } else {
            &["rq"]
        };
        c.hello("flooder", engines).await.unwrap();
        k += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hellos = brain.seen.hellos.lock().unwrap().len();
    assert!(
        hellos >= 2,
        "the brain learned the changed engines during the flood ({k} hellos sent, {hellos} handshakes)"
    );
    assert!(
        hellos <= 4,
        "at most 3 re-handshakes a minute, not one per change ({k} hellos sent, {hellos} handshakes)"
    );
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_403_to_the_upgrade_is_a_wrong_url_not_a_bad_token() {
    // What the brain's web server answers a WebSocket upgrade on a path it
    // does not serve. A bad token is refused after the upgrade (4401).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wrong/path", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    });
    let d = TestDaemon::start(options(&url)).await;
    let s = wait_stats(&d, 10, "the refused upgrade", |s| {
        !text(s, "last_error").is_empty()
    })
    .await;
    assert_eq!(text(&s, "last_failure_class"), "connection", "{s:?}");
    let error = text(&s, "last_error");
    assert!(error.contains("HTTP 403"), "{error}");
    assert!(error.contains("Z4J_BRAIN_URL"), "{error}");
    assert!(!error.contains("token"), "not blamed on the token: {error}");
    d.stop().await.unwrap();
}
