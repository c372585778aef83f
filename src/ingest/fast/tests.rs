use serde_json::json;
use time::OffsetDateTime;

use super::{assert_same_as_value_path, handle_msgpack};
use crate::ingest::decision::Limits;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_795_390_200).unwrap()
}

fn limits() -> Limits {
    Limits {
        max_event_bytes: 1_044_480,
        max_message_bytes: 16 << 20,
    }
}

fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

fn celery_event(i: u64) -> serde_json::Value {
    json!({
        "engine": "celery",
        "kind": "task.succeeded",
        "task_id": format!("load-{i:010}"),
        "occurred_at": "2026-11-22T23:29:59.500000+00:00",
        "data": {
            "task_name": "app.tasks.process_order",
            "queue": "default",
            "args": [i, "order", 12.5],
            "kwargs": {"customer_id": 4211, "note": "ünïcode ok\n\"q\""},
            "result": {"status": "ok", "total": 129.95},
            "runtime_ms": 37,
            "parent_task_id": null,
        }
    })
}

#[test]
fn an_events_message_takes_the_fast_path_and_stores_what_the_value_path_stores() {
    let body = msgpack(&json!({
        "type": "events",
        "ack_id": 7,
        "events": [celery_event(1), celery_event(2), {"engine": " rq ", "kind": "task.received", "task_id": "x"}],
    }));
    assert!(assert_same_as_value_path(&body, &limits(), now()));
    let h = handle_msgpack(&body, &limits(), now()).unwrap();
    let store = h.store.unwrap();
    assert_eq!(store.records.len(), 3);
    assert_eq!(h.counts.events_received, 3);
    assert_eq!(store.engines.last(3), vec![("celery", 2), ("rq", 1)]);
}

#[test]
fn an_event_message_and_an_empty_list_take_it_too() {
    let mut one = celery_event(3);
    one["type"] = json!("event");
    one["ack_id"] = json!("a-7");
    one["id"] = json!("0190d9e2-6f7e-7c3a-9b1e-3c2d4e5f6a7b");
    assert!(assert_same_as_value_path(&msgpack(&one), &limits(), now()));
    let empty = msgpack(&json!({"type": "events", "events": []}));
    assert!(assert_same_as_value_path(&empty, &limits(), now()));
}

#[test]
fn what_needs_the_value_path_is_left_to_it() {
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut e = celery_event(1);
        f(&mut e);
        msgpack(&json!({"type": "events", "events": [celery_event(0), e]}))
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown kind",
            with(&|e| e["kind"] = json!("task.exploded")),
        ),
        (
            "worker event",
            with(&|e| e["kind"] = json!("worker.online")),
        ),
        ("no engine", with(&|e| e["engine"] = json!(null))),
        ("old occurred_at", with(&|e| e["occurred_at"] = json!(1.0))),
        (
            "future occurred_at",
            with(&|e| e["occurred_at"] = json!(2.0e9)),
        ),
        ("bad id", with(&|e| e["id"] = json!("nope"))),
        ("data not a map", with(&|e| e["data"] = json!([1]))),
        (
            "external key",
            with(&|e| e["data"]["external_projection"] = json!({})),
        ),
        (
            "too large",
            with(&|e| e["data"]["blob"] = json!("x".repeat(1_100_000))),
        ),
        (
            "hello",
            msgpack(&json!({"type": "hello", "engines": ["celery"]})),
        ),
        (
            "events not a list",
            msgpack(&json!({"type": "events", "events": {}})),
        ),
        (
            "long ack_id",
            msgpack(&json!({"type": "events", "events": [], "ack_id": "x".repeat(41)})),
        ),
    ];
    for (what, body) in cases {
        assert!(handle_msgpack(&body, &limits(), now()).is_none(), "{what}");
    }
    // A NaN, a binary value, a duplicated field, trailing bytes: by hand,
    // since serde_json holds none of them.
    let mut nan = msgpack(
        &json!({"type": "events", "events": [{"engine": "celery", "kind": "task.received", "task_id": "t", "data": {"x": 0.5}}]}),
    );
    let at = nan.windows(9).position(|w| w[0] == 0xcb).unwrap();
    nan[at + 1..at + 9].copy_from_slice(&f64::NAN.to_bits().to_be_bytes());
    let mut bin = msgpack(
        &json!({"type": "events", "events": [{"engine": "celery", "kind": "task.received", "task_id": "t", "data": {"x": "ab"}}]}),
    );
    let at = bin
        .windows(3)
        .position(|w| w == [0xa2, b'a', b'b'])
        .unwrap();
    bin[at] = 0xc4;
    bin.insert(at + 1, 2);
    let mut dup = vec![0x82, 0xa4];
    dup.extend_from_slice(b"type");
    dup.push(0xa5);
    dup.extend_from_slice(b"event");
    dup.push(0xa4);
    dup.extend_from_slice(b"type");
    dup.push(0xc0);
    let mut trailing = msgpack(&json!({"type": "events", "events": []}));
    trailing.push(0xc0);
    for (what, body) in [
        ("nan", nan),
        ("bin", bin),
        ("dup", dup),
        ("trailing", trailing),
    ] {
        assert!(handle_msgpack(&body, &limits(), now()).is_none(), "{what}");
    }
}

/// A small deterministic generator (xorshift), so a failure replays. It
/// writes MessagePack itself, for what serde_json cannot hold: keys out of
/// order and duplicated, 32-bit floats, integers in wider encodings.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn string(&mut self) -> String {
        const PIECES: [&str; 10] = [
            "a",
            "Z",
            "é",
            "\u{1F600}",
            "\n",
            "\"",
            "\\",
            "\u{1}",
            " ",
            "key",
        ];
        (0..self.below(6))
            .map(|_| PIECES[self.below(10) as usize])
            .collect()
    }

    fn scalar(&mut self, out: &mut Vec<u8>) {
        use rmp::encode;
        match self.below(11) {
            0 => encode::write_nil(out).unwrap(),
            1 => encode::write_bool(out, self.below(2) == 0).unwrap(),
            2 => drop(encode::write_sint(out, self.next() as i64)),
            3 => drop(encode::write_uint(out, self.next())),
            4 => drop(encode::write_i64(out, self.below(300) as i64 - 150)),
            5 => drop(encode::write_u32(out, self.below(1000) as u32)),
            6 => {
                let sign = if self.below(2) == 0 { 1.0 } else { -1.0 };
                encode::write_f64(out, f64::from_bits(self.next() >> 2) * sign).unwrap()
            }
            7 => encode::write_f64(out, self.below(100_000) as f64 / 100.0).unwrap(),
            8 => encode::write_f32(out, self.below(1_000) as f32 / 7.0).unwrap(),
            _ => encode::write_str(out, &self.string()).unwrap(),
        }
    }

    fn value(&mut self, depth: u32, out: &mut Vec<u8>) {
        match if depth > 3 { 0 } else { self.below(4) } {
            0 | 1 => self.scalar(out),
            2 => {
                let n = self.below(5) as u32;
                rmp::encode::write_array_len(out, n).unwrap();
                for _ in 0..n {
                    self.value(depth + 1, out);
                }
            }
            _ => self.map(depth, out),
        }
    }

    /// A map with keys in any order, some of them twice.
    fn map(&mut self, depth: u32, out: &mut Vec<u8>) {
        let most = if self.below(8) == 0 { 40 } else { 8 };
        let n = self.below(most) as u32;
        rmp::encode::write_map_len(out, n).unwrap();
        for _ in 0..n {
            rmp::encode::write_str(out, &self.string()).unwrap();
            self.value(depth + 1, out);
        }
    }

    fn event(&mut self, out: &mut Vec<u8>) {
        use rmp::encode::{write_map_len, write_str};
        let engine = ["celery", " rq", "dramatiq"][self.below(3) as usize];
        let kind = [
            "task.received",
            "task.succeeded",
            "task.failed",
            "queue.depth_report",
        ][self.below(4) as usize];
        let task_id = format!("t-{}", self.below(1000));
        let mut fields: Vec<u8> = vec![0, 1, 2];
        for (field, one_in) in [(3u8, 2), (4, 4), (5, 4), (6, 8)] {
            if self.below(one_in) == 0 {
                fields.push(field);
            }
        }
        for i in (1..fields.len()).rev() {
            fields.swap(i, self.below(i as u64 + 1) as usize);
        }
        write_map_len(out, fields.len() as u32).unwrap();
        for f in fields {
            match f {
                0 => write_str(out, "engine")
                    .and_then(|()| write_str(out, engine))
                    .unwrap(),
                1 => write_str(out, "kind")
                    .and_then(|()| write_str(out, kind))
                    .unwrap(),
                2 => write_str(out, "task_id")
                    .and_then(|()| write_str(out, &task_id))
                    .unwrap(),
                3 => {
                    write_str(out, "data").unwrap();
                    if self.below(8) == 0 {
                        self.value(4, out);
                    } else {
                        self.map(4, out);
                    }
                }
                4 => {
                    write_str(out, "occurred_at").unwrap();
                    rmp::encode::write_f64(out, 1_795_390_100.0 + self.below(100) as f64 / 7.0)
                        .unwrap();
                }
                5 => {
                    write_str(out, "id").unwrap();
                    let id = uuid::Uuid::from_u128(u128::from(self.next()) << 20 | 1);
                    write_str(out, &id.to_string()).unwrap();
                }
                _ => {
                    write_str(out, &self.string()).unwrap();
                    self.value(3, out);
                }
            }
        }
    }

    fn message(&mut self) -> Vec<u8> {
        use rmp::encode::{write_array_len, write_map_len, write_str};
        let mut out = Vec::new();
        let with_ack = self.below(2) == 0;
        let ack_first = self.below(2) == 0;
        write_map_len(&mut out, 2 + u32::from(with_ack)).unwrap();
        let ack = |g: &mut Gen, out: &mut Vec<u8>| {
            if with_ack {
                write_str(out, "ack_id").unwrap();
                g.scalar(out);
            }
        };
        if ack_first {
            ack(self, &mut out);
        }
        write_str(&mut out, "events").unwrap();
        let n = self.below(4) as u32;
        write_array_len(&mut out, n).unwrap();
        for _ in 0..n {
            self.event(&mut out);
        }
        write_str(&mut out, "type").unwrap();
        write_str(&mut out, "events").unwrap();
        if !ack_first {
            ack(self, &mut out);
        }
        out
    }
}

#[test]
fn generated_messages_are_handled_as_the_value_path_handles_them() {
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    let mut fast = 0;
    let total = 4_000;
    for _ in 0..total {
        let body = g.message();
        let small = Limits {
            max_event_bytes: 300 + g.below(3_000) as usize,
            max_message_bytes: 16 << 20,
        };
        if assert_same_as_value_path(&body, &small, now()) {
            fast += 1;
        }
    }
    // Most take it; the others (an ack_id it leaves alone, `data` that is
    // not a map, events too large for the small limits) fall back, and
    // what the value path does with them is its own tests' concern.
    assert!(
        fast > total / 3,
        "only {fast} of {total} took the fast path"
    );
}
