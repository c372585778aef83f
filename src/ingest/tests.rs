//! The local socket end to end (served on a temp socket), and the pieces
//! of admission, socket setup and back-pressure that need no socket.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::admission::{AcceptFailures, ACCEPT_PAUSE_MIN, REFUSALS_IN_FLIGHT};
use super::handler::json_len_over;
use super::replies::write_replies;
use super::socket::fd_shortfall;
use super::*;
use crate::protocol::Value;
use crate::spool::{Overflow, Spool, SpoolConfig, Synchronous};

/// A served ingest on a temp socket, with a short partial-message timeout.
async fn served(
    dir: &std::path::Path,
    timeout: Duration,
) -> (PathBuf, Arc<Stats>, Spool, CancellationToken) {
    served_with(dir, timeout, DEFAULT_MAX_MESSAGE_BYTES).await
}

/// [`served`] with another message limit (and so another message
/// budget), and room in the spool for a few megabytes.
async fn served_with(
    dir: &std::path::Path,
    timeout: Duration,
    max_message_bytes: usize,
) -> (PathBuf, Arc<Stats>, Spool, CancellationToken) {
    let spool = Spool::open(SpoolConfig {
        path: dir.join("spool.sqlite"),
        max_events: 100_000,
        max_bytes: 64 << 20,
        overflow: Overflow::DropOldest,
        synchronous: Synchronous::Normal,
    })
    .unwrap();
    let socket = dir.join("agent.sock");
    let stats = Arc::new(Stats::new());
    let (router, _results) = crate::commands::Router::new(stats.clone());
    let ingest = Ingest::new(
        IngestConfig {
            socket_path: socket.clone(),
            allowed_uids: vec![],
            allowed_gids: vec![],
            max_clients: 8,
            max_message_bytes,
            max_event_bytes: 64 * 1024,
            partial_message_timeout: timeout,
            remove_socket_on_exit: true,
        },
        spool.handle(),
        stats.clone(),
        router,
    );
    let listener = bind(&socket, 0o600).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(ingest.serve(listener, stop.clone(), crate::watchdog::Beat::unwatched()));
    (socket, stats, spool, stop)
}

async fn read_one(s: &mut UnixStream) -> Value {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    rmp_serde::from_slice(&body).unwrap()
}

fn framed(msg: &serde_json::Value) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(msg).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn a_4_gib_length_prefix_is_refused_at_once_without_allocating() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    let mut s = UnixStream::connect(&socket).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(
        reply.get("code").and_then(Value::as_str),
        Some("message_too_large")
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the connection is closed")
        .unwrap();
    assert_eq!(stats.refused().get("message_too_large"), Some(&1));
    stop.cancel();
    spool.close().await;
}

/// Writes `first`, waits until the daemon has answered and closed its
/// side, writes `more` (which must still go through), then reads the
/// error and the end of the stream.
async fn refused_while_writing(s: &mut UnixStream, first: &[u8], more: &[u8]) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(more)
        .await
        .expect("a refused client's writes are not reset before it can read why");
    let reply = read_one(s).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the connection is closed")
        .expect("closed cleanly, not reset");
    reply
}

#[tokio::test]
async fn a_client_closed_for_an_error_that_keeps_writing_still_reads_why() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, _stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    // A 4 GiB length prefix, and more of that message afterwards.
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let mut first = u32::MAX.to_be_bytes().to_vec();
    first.extend_from_slice(&[0x80; 4096]);
    let reply = refused_while_writing(&mut s, &first, &[0x80; 4096]).await;
    assert_eq!(
        reply.get("code").and_then(Value::as_str),
        Some("message_too_large")
    );
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn a_client_refused_at_the_door_that_keeps_writing_still_reads_why() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, _stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    let ping = framed(&serde_json::json!({"type": "ping"}));
    // More connections than the limit (8).
    let mut kept = Vec::new();
    for _ in 0..8 {
        let mut c = crate::client::Client::connect(&socket).await.unwrap();
        c.ping().await.unwrap();
        kept.push(c);
    }
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let reply = refused_while_writing(&mut s, &ping, &ping).await;
    assert_eq!(
        reply.get("code").and_then(Value::as_str),
        Some("too_many_clients")
    );
    stop.cancel();
    spool.close().await;
}

/// One `events` message of `n` events of about 1 KB, with `ack_id`.
fn batch(tag: &str, n: usize, ack_id: u64) -> serde_json::Value {
    let events: Vec<_> = (0..n)
        .map(|i| {
            serde_json::json!({"engine": "celery", "kind": "task.received",
                "task_id": format!("{tag}-{i}"), "data": {"pad": "p".repeat(1000)}})
        })
        .collect();
    serde_json::json!({"type": "events", "events": events, "ack_id": ack_id})
}

#[tokio::test]
async fn an_ack_id_over_the_limit_is_refused_not_echoed_and_the_connection_goes_on() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    let mut s = UnixStream::connect(&socket).await.unwrap();
    // Every reply echoes the ack_id: 250 pings with a 4 MiB one held
    // about 1 GB of replies for a client that did not read them.
    let huge = "a".repeat(4 << 20);
    s.write_all(&framed(
        &serde_json::json!({"type": "ping", "ack_id": huge}),
    ))
    .await
    .unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(
        reply.get("code").and_then(Value::as_str),
        Some("bad_message")
    );
    assert!(reply.get("ack_id").is_none(), "not echoed");
    let msg = reply.get("message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("ack_id") && msg.contains("256"), "{msg}");
    assert!(framed(&serde_json::json!(reply.clone())).len() < 1024);

    // An events message with one: none of its events is stored, each is counted.
    let mut events = batch("big-ack", 3, 0);
    events["ack_id"] = serde_json::json!({"k": "b".repeat(300)});
    s.write_all(&framed(&events)).await.unwrap();
    let reply = read_one(&mut s).await;
    let msg = reply.get("message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("none of its events was stored"), "{msg}");
    assert_eq!(stats.refused().get("bad_message"), Some(&4));

    // At the limit, it is echoed as sent.
    let longest = "c".repeat(MAX_ACK_ID_BYTES - 2);
    s.write_all(&framed(
        &serde_json::json!({"type": "ping", "ack_id": longest}),
    ))
    .await
    .unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(reply.get("type").and_then(Value::as_str), Some("pong"));
    assert_eq!(
        reply.get("ack_id").and_then(Value::as_str),
        Some(longest.as_str())
    );
    s.write_all(&framed(&batch("ok", 2, 7))).await.unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(reply.get("stored").and_then(Value::as_u64), Some(2));
    assert_eq!(spool.handle().stats().depth.load(Ordering::Relaxed), 2);
    stop.cancel();
    spool.close().await;
}

#[test]
fn the_ack_id_size_is_counted_without_writing_it_and_stops_early() {
    let small: Value = serde_json::from_str(r#"{"n":[1,2.5,null,"x"]}"#).unwrap();
    assert_eq!(json_len_over(&small, 64), None);
    assert!(json_len_over(&small, 30).is_some());
    assert_eq!(json_len_over(&Value::from(12345u64), 5), None);
    assert_eq!(json_len_over(&Value::from(-12345i64), 5), Some(6));
    assert!(json_len_over(&Value::from("x".repeat(300)), 256).is_some());
    // A wide value: counting stops once past the limit (here at once:
    // the separators alone are over it).
    let wide = Value::Array(vec![Value::Null; 1_000_000]);
    assert_eq!(json_len_over(&wide, 256), Some(2 + 1_000_000 + 5));
    // Never under the real length for what clients send as ack ids.
    for v in [
        Value::from(u64::MAX),
        Value::from(-1i64),
        Value::from("0193a1b2-8c44-7d1e-9f00-123456789abc"),
    ] {
        let real = serde_json::to_vec(&v).unwrap().len();
        assert!(json_len_over(&v, real - 1).is_some(), "{v:?}");
    }
}

#[tokio::test]
async fn a_reply_queue_holds_at_most_its_bytes_and_small_replies_pass_a_large_one() {
    let (q, rx) = ReplyQueue::new();
    let small = vec![b'x'; MAX_ACK_ID_BYTES];
    for _ in 0..REPLY_QUEUE {
        q.try_send(small.clone()).unwrap();
    }
    assert_eq!(q.queued_bytes(), REPLY_QUEUE_BYTES);
    assert!(
        q.try_send(vec![b'y'; 1]).is_err(),
        "full in bytes and in count"
    );
    // The writer takes them: the bytes come back.
    let queued = q.queued.clone();
    let (mut ours, theirs) = tokio::net::UnixStream::pair().unwrap();
    let (_rd, wr) = theirs.into_split();
    let writer = tokio::spawn(write_replies(wr, rx, queued));
    let mut got = vec![0u8; REPLY_QUEUE_BYTES];
    ours.read_exact(&mut got).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while q.queued_bytes() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    drop(q);
    writer.await.unwrap();
    // One larger reply (a stats report) goes even beyond the byte bound,
    // and a second waits its turn: it is dropped. Ordinary replies have
    // their own room: a pong behind a large stats report still goes.
    let (q, rx) = ReplyQueue::new();
    q.try_send(vec![b'z'; 3 * REPLY_QUEUE_BYTES]).unwrap();
    assert!(q.try_send(vec![b'z'; ORDINARY_REPLY_BYTES + 1]).is_err());
    q.try_send(small.clone()).unwrap();
    assert_eq!(q.queued_bytes(), 3 * REPLY_QUEUE_BYTES + MAX_ACK_ID_BYTES);
    // Larger replies that fit together go together.
    let (q2, _rx2) = ReplyQueue::new();
    for _ in 0..REPLY_QUEUE_BYTES / 2048 {
        q2.try_send(vec![b'w'; 2048]).unwrap();
    }
    assert!(q2.try_send(vec![b'w'; 2048]).is_err());
    drop((q, rx, ours));
}

#[tokio::test]
async fn a_large_stats_report_does_not_crowd_out_the_replies_behind_it() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    // A client declaring many actions makes the stats report large
    // (as 1,000 connected clients do): over 64 KiB.
    let mut big = crate::client::Client::connect(&socket).await.unwrap();
    let actions: Vec<String> = (0..60)
        .map(|i| format!("action_{i:03}_{}", "a".repeat(60)))
        .collect();
    let caps: BTreeMap<String, Vec<String>> = (0..30)
        .map(|e| (format!("engine{e}"), actions.clone()))
        .collect();
    big.write_raw(
        &serde_json::from_value(
            serde_json::json!({"type": "hello", "capabilities": caps, "ack_id": 1}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        big.read_reply()
            .await
            .unwrap()
            .get("type")
            .and_then(Value::as_str),
        Some("hello_ack")
    );
    // Stats, then pings, sent at once and read afterwards: every reply
    // comes, in order.
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let mut burst = framed(&serde_json::json!({"type": "stats"}));
    for i in 0..10 {
        burst.extend(framed(&serde_json::json!({"type": "ping", "ack_id": i})));
    }
    for _ in 0..20 {
        s.write_all(&burst).await.unwrap();
        let stats = read_one(&mut s).await;
        assert!(framed(&serde_json::json!(stats)).len() > REPLY_QUEUE_BYTES);
        for i in 0..10u64 {
            let pong = tokio::time::timeout(Duration::from_secs(5), read_one(&mut s))
                .await
                .expect("the pong behind the stats report came");
            assert_eq!(pong.get("ack_id").and_then(Value::as_u64), Some(i));
        }
    }
    assert_eq!(stats.replies_dropped.load(Ordering::Relaxed), 0);
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn a_client_that_never_reads_gets_its_replies_dropped_and_counted_not_queued() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    let mut deaf = UnixStream::connect(&socket).await.unwrap();
    // `stats` replies are a few KB each: 256 of them held about 1 MB.
    let ask = framed(&serde_json::json!({"type": "stats", "ack_id": "s".repeat(200)}));
    for _ in 0..2_000 {
        deaf.write_all(&ask).await.unwrap();
    }
    let mut other = crate::client::Client::connect(&socket).await.unwrap();
    // Once all 2,000 are handled (the count stops moving), what was not
    // dropped sits in the kernel's socket buffer or in the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut last, mut still) = (u64::MAX, 0);
    let (dropped, reply_len) = loop {
        let stats = tokio::time::timeout(Duration::from_secs(2), other.stats())
            .await
            .expect("another client is served at once")
            .unwrap();
        let dropped = stats
            .get("replies_dropped")
            .and_then(Value::as_u64)
            .unwrap();
        still = if dropped == last { still + 1 } else { 0 };
        last = dropped;
        if dropped > 0 && still == 10 {
            break (dropped, framed(&serde_json::json!(stats)).len() as u64);
        }
        assert!(tokio::time::Instant::now() < deadline, "{dropped} dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kernel: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(212_992);
    let held = (2_000 - dropped) * reply_len;
    eprintln!("{dropped} of 2,000 replies of {reply_len} bytes dropped; {held} bytes held");
    // 256 replies of this size (the old count-only bound) would be 300 KB.
    assert!(
        held <= REPLY_QUEUE_BYTES as u64 + kernel + 2 * reply_len,
        "{held} bytes of replies held for a client that does not read"
    );
    assert!(stats.replies_dropped.load(Ordering::Relaxed) > 1_000);
    stop.cancel();
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_over_the_message_budget_wait_and_all_get_through() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    // Messages up to 256 KiB: a pool of 256 KiB and one slot, beyond
    // each connection's free 64 KiB.
    let (socket, stats, spool, stop) =
        served_with(dir.path(), Duration::from_secs(30), 256 << 10).await;
    let mut tasks = Vec::new();
    // Eight clients, half MessagePack and half JSON lines, each sending
    // three messages of about 200 KB in 4 KiB writes, all at once:
    // about 2.4 MB of messages for a budget of 512 KiB.
    for c in 0..8u64 {
        let mut s = UnixStream::connect(&socket).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let json = c % 2 == 1;
            for m in 0..3u64 {
                let msg = batch(&format!("c{c}-m{m}"), 190, m);
                let bytes = if json {
                    let mut b = serde_json::to_vec(&msg).unwrap();
                    b.push(b'\n');
                    b
                } else {
                    framed(&msg)
                };
                assert!(bytes.len() > 190_000 && bytes.len() < 256 << 10);
                for piece in bytes.chunks(4096) {
                    s.write_all(piece).await.unwrap();
                }
            }
            let (rd, _wr) = s.into_split();
            let mut lines = tokio::io::BufReader::new(rd);
            let mut stored = 0;
            for _ in 0..3 {
                let reply: serde_json::Value = if json {
                    use tokio::io::AsyncBufReadExt;
                    let mut line = String::new();
                    lines.read_line(&mut line).await.unwrap();
                    serde_json::from_str(&line).unwrap()
                } else {
                    let mut len = [0u8; 4];
                    lines.read_exact(&mut len).await.unwrap();
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    lines.read_exact(&mut body).await.unwrap();
                    rmp_serde::from_slice(&body).unwrap()
                };
                assert_eq!(reply["type"], "ack", "{reply}");
                stored += reply["stored"].as_u64().unwrap();
            }
            stored
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no client waits for ever")
            .unwrap();
    }
    assert_eq!(stored, 8 * 3 * 190);
    assert_eq!(
        spool.handle().stats().depth.load(Ordering::Relaxed),
        8 * 3 * 190
    );
    assert!(
        stats.message_budget_waits.load(Ordering::Relaxed) > 0,
        "the budget was short: some connection waited"
    );
    assert_eq!(stats.refused().values().sum::<u64>(), 0);
    stop.cancel();
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_budget_is_not_silence_and_clients_that_stall_holding_it_are_timed_out() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) =
        served_with(dir.path(), Duration::from_millis(600), 256 << 10).await;
    // Two clients take the whole budget: each announces a message of
    // 250 KiB, sends 200 KiB of it, then one byte every 300 ms for 1.5 s
    // (each resets its timeout), then stops.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut s = UnixStream::connect(&socket).await.unwrap();
        let mut part = (250u32 << 10).to_be_bytes().to_vec();
        part.extend(std::iter::repeat_n(0xc0, 200 << 10));
        s.write_all(&part).await.unwrap();
        hogs.push(tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.write_all(&[0xc0]).await.unwrap();
            }
            read_one(&mut s).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Four more, each with one large message: they wait, unread, for
    // more than twice the partial-message timeout, and are not timed
    // out for it.
    let started = std::time::Instant::now();
    let mut waiting = Vec::new();
    for c in 0..4 {
        let mut s = UnixStream::connect(&socket).await.unwrap();
        let msg = framed(&batch(&format!("w{c}"), 150, 1));
        waiting.push(tokio::spawn(async move {
            s.write_all(&msg).await.unwrap();
            read_one(&mut s).await
        }));
    }
    for h in hogs {
        let reply = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.get("code").and_then(Value::as_str),
            Some("incomplete_message")
        );
    }
    for w in waiting {
        let reply = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            reply.get("type").and_then(Value::as_str),
            Some("ack"),
            "{reply:?}"
        );
        assert_eq!(reply.get("stored").and_then(Value::as_u64), Some(150));
    }
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    assert_eq!(stats.refused().get("incomplete_message"), Some(&2));
    assert!(stats.message_budget_waits.load(Ordering::Relaxed) >= 4);
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn malformed_messagepack_gets_an_error_and_the_connection_goes_on() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    let mut s = UnixStream::connect(&socket).await.unwrap();
    // A well-framed body that is not MessagePack (0xc1 is never used).
    s.write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await.unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(
        reply.get("code").and_then(Value::as_str),
        Some("bad_message")
    );
    s.write_all(&framed(&serde_json::json!({"type": "ping"})))
        .await
        .unwrap();
    let reply = read_one(&mut s).await;
    assert_eq!(reply.get("type").and_then(Value::as_str), Some("pong"));
    assert_eq!(stats.refused().get("bad_message"), Some(&1));
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_told_why_and_the_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    // The limit here is 8; open 40 at once.
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut s = UnixStream::connect(&socket).await.unwrap();
        s.write_all(&framed(&serde_json::json!({"type": "ping"})))
            .await
            .unwrap();
        conns.push(s);
    }
    let (mut served_n, mut refused_n) = (0, 0);
    for s in conns.iter_mut() {
        let reply = tokio::time::timeout(Duration::from_secs(5), read_one(s))
            .await
            .expect("every connection gets an answer");
        match reply.get("type").and_then(Value::as_str) {
            Some("pong") => served_n += 1,
            Some("error") => {
                assert_eq!(
                    reply.get("code").and_then(Value::as_str),
                    Some("too_many_clients")
                );
                refused_n += 1;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!((served_n, refused_n), (8, 32));
    assert_eq!(stats.refused().get("too_many_clients"), Some(&32));
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn half_a_message_then_silence_gets_an_error_and_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_millis(300)).await;
    // A length prefix announcing 100 bytes, then 10 of them.
    let mut half = UnixStream::connect(&socket).await.unwrap();
    half.write_all(&100u32.to_be_bytes()).await.unwrap();
    half.write_all(&[0x80; 10]).await.unwrap();
    // An idle connection between messages is left alone.
    let mut idle = crate::client::Client::connect(&socket).await.unwrap();
    idle.ping().await.unwrap();

    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut reply))
        .await
        .expect("closed after the timeout")
        .unwrap();
    let body: Value = rmp_serde::from_slice(&reply[4..]).unwrap();
    assert_eq!(
        body.get("code").and_then(Value::as_str),
        Some("incomplete_message")
    );
    let msg = body.get("message").and_then(Value::as_str).unwrap();
    assert!(msg.contains("14 bytes") && msg.contains("length"), "{msg}");
    assert_eq!(stats.refused().get("incomplete_message"), Some(&1));

    tokio::time::sleep(Duration::from_millis(500)).await;
    idle.ping()
        .await
        .expect("the idle connection is still served");
    stop.cancel();
    spool.close().await;
}

#[tokio::test]
async fn past_a_few_dozen_refusals_at_once_the_extra_connections_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (socket, stats, spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
    // The limit here is 8: fill it.
    let mut kept = Vec::new();
    for _ in 0..8 {
        let mut c = crate::client::Client::connect(&socket).await.unwrap();
        c.ping().await.unwrap();
        kept.push(c);
    }
    // 40 more that send nothing: each refusal waits up to 1 s for a
    // first byte (to answer in the client's framing), holding its socket.
    let mut extra = Vec::new();
    for _ in 0..40 {
        extra.push(UnixStream::connect(&socket).await.unwrap());
    }
    let (mut told, mut closed) = (0, 0);
    for s in extra.iter_mut() {
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
            .await
            .expect("every extra connection is closed")
            .unwrap();
        if reply.is_empty() {
            closed += 1;
        } else {
            let text = String::from_utf8_lossy(&reply);
            assert!(text.contains("too_many_clients"), "{text}");
            told += 1;
        }
    }
    assert_eq!(
        (told, closed),
        (REFUSALS_IN_FLIGHT, 40 - REFUSALS_IN_FLIGHT)
    );
    assert_eq!(stats.refused().get("too_many_clients"), Some(&40));
    for c in kept.iter_mut() {
        c.ping().await.expect("the served connections go on");
    }
    stop.cancel();
    spool.close().await;
}

#[test]
fn a_descriptor_limit_below_the_clients_plus_a_margin_is_reported() {
    assert_eq!(fd_shortfall(Some(1024), 1024, 0), Some(1024 + FD_MARGIN));
    assert_eq!(
        fd_shortfall(Some(1024 + FD_MARGIN - 1), 1024, 0),
        Some(1088)
    );
    assert_eq!(fd_shortfall(Some(1024 + FD_MARGIN), 1024, 0), None);
    assert_eq!(fd_shortfall(Some(1024 + FD_MARGIN), 1024, 17), Some(1105));
    assert_eq!(fd_shortfall(Some(524_288), 1024, 17), None);
    assert_eq!(fd_shortfall(None, 65_536, 17), None);
    assert_eq!(fd_shortfall(Some(256), 100, 0), None);
}

#[test]
fn failed_accepts_back_off_up_to_a_quarter_second_and_reset() {
    let e = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
    let mut f = AcceptFailures::default();
    let pauses: Vec<u64> = (0..8)
        .map(|_| f.failed(&e, 1024, 0, 0).as_millis() as u64)
        .collect();
    assert_eq!(pauses, [10, 20, 40, 80, 160, 250, 250, 250]);
    // One warning for the whole streak (the next one is 10 s away).
    assert_eq!(f.unreported, 7);
    f.recovered();
    assert_eq!(f.failed(&e, 1024, 0, 0), ACCEPT_PAUSE_MIN);
}

/// Log output kept in memory, for the span test.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every line logged while a connection is served is inside its `client`
/// span, so it says which connection, pid and uid it is about (the line a
/// `hello` logs carried only the connection id before).
#[test]
fn log_lines_about_a_client_name_its_connection_pid_and_uid() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread, so the connection's tasks log to this test's subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (socket, _stats, _spool, stop) = served(dir.path(), Duration::from_secs(30)).await;
        let mut c = crate::client::Client::connect(&socket).await.unwrap();
        let hello = serde_json::json!({"type": "hello", "process": "span-check", "ack_id": 1});
        c.write_raw(&serde_json::from_value(hello).unwrap())
            .await
            .unwrap();
        c.read_reply().await.unwrap();
        stop.cancel();
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("client registered"))
        .unwrap_or_else(|| panic!("no registration line in:\n{text}"));
    let span = line.split_once("}:").map_or("", |(s, _)| s);
    assert!(span.contains("client{client="), "{line}");
    for who in [
        format!("pid={}", std::process::id()),
        format!("uid={}", crate::host::current_uid()),
    ] {
        assert!(span.contains(&who), "{line} lacks {who}");
    }
    assert!(line.contains("span-check"), "{line}");
}
