//! Criterion benches of the three per-event hot paths of the daemon:
//!
//! 1. `ingest`: one client message of 100 Celery lifecycle events, as it
//!    arrives on the socket (length-prefixed MessagePack, or one JSON line),
//!    decoded by the connection's [`Decoder`] and turned into stored records
//!    by [`handle`], the decision the connection loop applies.
//! 2. `uplink_sign`: the signed `event_batch` frame for 500 stored events,
//!    built the way `Session::send_batch` does (frame id, payload by
//!    concatenation, nonce, [`Signer::sign`]), without the WebSocket send.
//! 3. `spool_append_durable`: one [`SpoolHandle::append_durable`] of a batch
//!    into a real SQLite spool file, at `synchronous=NORMAL` and `FULL`.
//!
//! `cargo bench --bench hot_paths` (add `-- --quick` for a fast look).
//! Like the daemon binary, this uses mimalloc as the global allocator.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use time::OffsetDateTime;

use z4j_agentd::ingest::fast::handle_msgpack;
use z4j_agentd::ingest::framing::{Decoded, Decoder, Framing};
use z4j_agentd::ingest::{handle, Limits, DEFAULT_MAX_MESSAGE_BYTES, FRAME_ENVELOPE_RESERVE};
use z4j_agentd::protocol::{
    self, SessionBinding, Signer, SigningKey, Value, DEFAULT_MAX_FRAME_BYTES,
};
use z4j_agentd::spool::{Overflow, Spool, SpoolConfig, StoredEvent, Synchronous};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The limits the daemon handles messages under (see `daemon.rs`).
const LIMITS: Limits = Limits {
    max_event_bytes: DEFAULT_MAX_FRAME_BYTES - FRAME_ENVELOPE_RESERVE,
    max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
};

/// One Celery lifecycle event as the Python client sends it: the `data` of
/// `examples/loadgen.rs` (less the keys the Celery hooks do not send), plus
/// the `occurred_at` and `id` that `z4j_agentd.Client.emit` always fills in
/// (~460 bytes of JSON).
fn event(i: usize) -> serde_json::Value {
    let task = i / 3;
    let kind = ["task.received", "task.started", "task.succeeded"][i % 3];
    let mut random = [0u8; 16];
    random[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    random[8..].copy_from_slice(&0x5eed_u64.to_le_bytes());
    let id = uuid::Builder::from_random_bytes(random).into_uuid();
    serde_json::json!({
        "engine": "celery",
        "kind": kind,
        "task_id": format!("load-{task:010}"),
        "occurred_at": format!("2026-11-22T23:29:{:02}.{:06}+00:00", i % 60, (i * 7919) % 1_000_000),
        "id": id.hyphenated().to_string(),
        "data": {
            "task_name": "app.tasks.process_order",
            "queue": "default",
            "worker": "celery@web-1",
            "args": [task, "order", 12.5],
            "kwargs": {"customer_id": 4211, "priority": "normal", "note": "ünïcode ok"},
            "result": {"status": "ok", "items": 3, "total": 129.95},
            "runtime_ms": 37,
            "parent_task_id": null,
            "root_task_id": format!("load-{task:010}"),
        }
    })
}

/// An `events` message of `n` events, with a durable `ack_id`.
fn events_message(n: usize) -> serde_json::Value {
    serde_json::json!({
        "type": "events",
        "ack_id": 17,
        "events": (0..n).map(event).collect::<Vec<_>>(),
    })
}

/// The message as a client writes it on the socket in `framing`.
fn wire(framing: Framing, msg: &serde_json::Value) -> Vec<u8> {
    match framing {
        Framing::MsgPack => {
            let body = rmp_serde::to_vec_named(msg).unwrap();
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        }
        Framing::JsonLines => {
            let mut out = serde_json::to_vec(msg).unwrap();
            out.push(b'\n');
            out
        }
    }
}

/// What the ingest path does with the bytes of one `events` message before
/// it hands the records to the spool: `Decoder::next_item_with` the fast
/// path (`fast`), as the connection loop calls it, or `Decoder::next_item`
/// and [`handle`] (the value path). Applying the decision (the counters,
/// the reply queue, the append) is left out.
fn ingest_one(decoder: &mut Decoder, bytes: &[u8], fast: bool) -> (Vec<Vec<u8>>, Option<Value>) {
    decoder.feed(bytes);
    let now = OffsetDateTime::now_utc();
    let item = if fast {
        decoder.next_item_with(|body| handle_msgpack(body, &LIMITS, now))
    } else {
        decoder.next_item()
    };
    let handled = match item.expect("framing") {
        Some(Decoded::Message(msg)) => handle(msg, &LIMITS, now),
        Some(Decoded::Handled(h)) => *h,
        _ => panic!("the message did not decode"),
    };
    assert!(handled.replies.is_empty(), "{:?}", handled.replies);
    let store = handled.store.expect("events are stored");
    (store.records, store.ack_id)
}

/// Stored records of `n` events, as ingest renders them.
fn records(n: usize) -> Vec<Vec<u8>> {
    let bytes = wire(Framing::MsgPack, &events_message(n));
    let mut decoder = Decoder::new(Framing::MsgPack, DEFAULT_MAX_MESSAGE_BYTES);
    ingest_one(&mut decoder, &bytes, true).0
}

fn bench_ingest(c: &mut Criterion) {
    const N: usize = 100;
    let msg = events_message(N);
    let one = serde_json::to_vec(&event(0)).unwrap().len();
    let stored = records(1)[0].len();
    eprintln!("ingest: one event is {one} bytes of JSON, {stored} bytes stored");

    let mut group = c.benchmark_group("ingest");
    group
        .throughput(Throughput::Elements(N as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    for (name, framing, fast) in [
        ("msgpack", Framing::MsgPack, true),
        ("msgpack-values", Framing::MsgPack, false),
        ("jsonl", Framing::JsonLines, true),
    ] {
        let bytes = wire(framing, &msg);
        eprintln!(
            "ingest/{name}: message of {N} events is {} bytes",
            bytes.len()
        );
        // One decoder for the whole run, like one connection; it reuses its
        // buffer once a message is consumed.
        let mut decoder = Decoder::new(framing, DEFAULT_MAX_MESSAGE_BYTES);
        let (r, _) = ingest_one(&mut decoder, &bytes, fast);
        assert_eq!(r.len(), N);
        group.bench_function(BenchmarkId::new(name, N), |b| {
            b.iter(|| ingest_one(&mut decoder, black_box(&bytes), fast))
        });
    }
    group.finish();
}

fn bench_sign(c: &mut Criterion) {
    const N: usize = 500;
    let events: Vec<StoredEvent> = records(N)
        .into_iter()
        .enumerate()
        .map(|(i, body)| StoredEvent {
            id: i as i64 + 1,
            body,
        })
        .collect();
    let key = SigningKey::from_base64("mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=").unwrap();
    let mut signer = Signer::new(
        key,
        SessionBinding::new(
            "ea12aefd-04ac-43d0-af34-08b77434f37a",
            "817e2571-38a5-4109-92c2-612c66108836",
            "0b9d6a2e-6f7c-4c36-9a53-2f7d3c1e8a11",
        ),
    );
    // `Session::payload_buf`: kept across frames.
    let mut payload_buf = Vec::new();
    // The body of `Session::send_batch` up to `self.send(frame)`.
    let mut send_batch = |events: &[StoredEvent]| -> (String, Vec<u8>) {
        let frame_id = protocol::new_frame_id("ev_");
        payload_buf.clear();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
        protocol::event_batch_payload(&bodies, &mut payload_buf);
        let frame = signer.sign(
            "event_batch",
            &frame_id,
            &payload_buf,
            OffsetDateTime::now_utc(),
            &protocol::new_nonce(),
        );
        (frame_id, frame)
    };
    let (_, frame) = send_batch(&events);
    eprintln!("uplink_sign: frame of {N} events is {} bytes", frame.len());

    let mut group = c.benchmark_group("uplink_sign");
    group
        .throughput(Throughput::Elements(N as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    group.bench_function(BenchmarkId::new("event_batch", N), |b| {
        b.iter(|| send_batch(black_box(&events)))
    });
    group.finish();
}

fn bench_spool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("spool_append_durable");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (name, synchronous) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        for batch in [100usize, 1000] {
            let dir = tempfile::tempdir().unwrap();
            // Bounds never reached: every commit is a plain insert, no
            // eviction. The spool is emptied by an untimed ack instead.
            let spool = Spool::open(SpoolConfig {
                path: dir.path().join("spool.sqlite"),
                max_events: 10_000_000,
                max_bytes: 1 << 40,
                overflow: Overflow::DropOldest,
                synchronous,
            })
            .unwrap();
            let h = spool.handle();
            let recs = records(batch);
            // Ack (delete) everything after this many appends, so the spool
            // stays under 10,000 events.
            let ack_every = (10_000 / batch) as u64;
            let mut appended = 0u64;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let events = recs.clone();
                            let t = Instant::now();
                            let o = h.append_durable(events).await.unwrap();
                            total += t.elapsed();
                            assert_eq!(o.stored, batch);
                            appended += 1;
                            if appended.is_multiple_of(ack_every) {
                                h.ack(0, i64::MAX).await.unwrap();
                            }
                        }
                        total
                    })
                })
            });
            rt.block_on(spool.close());
        }
    }
    group.finish();
}

criterion_group!(benches, bench_ingest, bench_sign, bench_spool);
criterion_main!(benches);
