//! Load generator for z4j-agentd's local socket.
//!
//! N client connections send M events in total, of realistic size, at full
//! speed or at a fixed rate, with or without durable acks, in either
//! framing; it reports events/s, ack latency percentiles, and the daemon's
//! CPU time per event and RSS read from `/proc/<pid>` (with every
//! connection still open).
//!
//! With `--probe K`, one more connection (the probe) sends K events one at a
//! time, each awaiting its durable ack, and reports the round trips'
//! percentiles; the N clients then repeat their messages until the probe is
//! done, so the probe measures its latency under their load (`--clients 0`:
//! without load).
//!
//! ```text
//! cargo run --release --example loadgen -- --socket /run/z4j-agentd/agent.sock \
//!     --daemon-pid $(pidof z4j-agentd) --clients 8 --events 400000 --durable
//! cargo run --release --example loadgen -- --socket /run/z4j-agentd/agent.sock \
//!     --clients 1 --events 100000 --batch 1000 --probe 2000
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for the z4j-agentd local socket")]
struct Args {
    /// The daemon's socket.
    #[arg(long, env = "Z4J_SOCKET_PATH")]
    socket: PathBuf,
    /// Client connections.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Events in total (split over the clients).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Bytes of filler in each event's `data` (0 gives ~500 B events; 4200 gives ~4.7 KB).
    #[arg(long, default_value_t = 0)]
    blob: usize,
    /// Events per message (1 = one `event` message per event).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Ask for durable acks.
    #[arg(long)]
    durable: bool,
    /// Messages in flight per client awaiting their ack (with --durable).
    #[arg(long, default_value_t = 4)]
    pipeline: usize,
    /// Total events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Framing: msgpack or jsonl.
    #[arg(long, default_value = "msgpack")]
    framing: String,
    /// pid of the daemon, to report its CPU time and RSS.
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Round trips of the probe: one event per message, each awaiting its
    /// durable ack, while the clients repeat their messages (0 = no probe).
    #[arg(long, default_value_t = 0)]
    probe: usize,
    /// Pause between two probe round trips (ms).
    #[arg(long, default_value_t = 10)]
    probe_gap_ms: u64,
    /// How long the clients run before the probe starts (ms).
    #[arg(long, default_value_t = 500)]
    probe_warmup_ms: u64,
}

fn event(task: usize, kind: &str, blob: &str) -> serde_json::Value {
    serde_json::json!({
        "engine": "celery",
        "kind": kind,
        "task_id": format!("load-{task:010}"),
        "data": {
            "task_name": "app.tasks.process_order",
            "queue": "default",
            "worker": "celery@web-1",
            "args": [task, "order", 12.5],
            "kwargs": {"customer_id": 4211, "priority": "normal", "note": "ünïcode ok", "blob": blob},
            "result": {"status": "ok", "items": 3, "total": 129.95},
            "runtime_ms": 37,
            "retries": 0,
            "routing_key": "default",
            "hostname": "web-1.example.internal",
            "parent_task_id": null,
            "root_task_id": format!("load-{task:010}"),
        }
    })
}

fn encode(framing: &str, msg: &serde_json::Value) -> Vec<u8> {
    if framing == "jsonl" {
        let mut v = serde_json::to_vec(msg).unwrap();
        v.push(b'\n');
        v
    } else {
        let body = rmp_serde::to_vec_named(msg).unwrap();
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        v
    }
}

struct Replies {
    framing: String,
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    line: String,
}

impl Replies {
    async fn next(&mut self) -> serde_json::Value {
        if self.framing == "jsonl" {
            self.line.clear();
            self.rd.read_line(&mut self.line).await.unwrap();
            serde_json::from_str(&self.line).unwrap()
        } else {
            let mut len = [0u8; 4];
            self.rd.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            self.rd.read_exact(&mut body).await.unwrap();
            rmp_serde::from_slice(&body).unwrap()
        }
    }
}

/// Encodes one client's messages up front, so the measurement is the
/// daemon's work and not the generator's JSON building.
fn prepare(args: &Args, index: usize, count: usize) -> Vec<(usize, Vec<u8>)> {
    let blob = "x".repeat(args.blob);
    let kinds = ["task.received", "task.started", "task.succeeded"];
    let mut out = Vec::new();
    let mut sent = 0usize;
    let mut ack_id = 0u64;
    while sent < count {
        let n = args.batch.min(count - sent);
        let events: Vec<_> = (sent..sent + n)
            .map(|i| {
                let global = index * count + i;
                event(global / 3, kinds[global % 3], &blob)
            })
            .collect();
        let mut msg = if n == 1 {
            let mut e = events.into_iter().next().unwrap();
            e["type"] = "event".into();
            e
        } else {
            serde_json::json!({"type": "events", "events": events})
        };
        if args.durable {
            ack_id += 1;
            msg["ack_id"] = ack_id.into();
        }
        out.push((n, encode(&args.framing, &msg)));
        sent += n;
    }
    out
}

/// What one connection did; the connection is kept open until the daemon's
/// RSS has been read.
struct ClientRun {
    latencies: Vec<Duration>,
    events: usize,
    stream: UnixStream,
}

/// One connection. With `--durable`, a reader task takes the acks as they
/// come, so each latency is exactly write -> ack even at a fixed rate; the
/// writer keeps at most `--pipeline` messages awaiting their ack. With
/// `until`, the messages are sent again and again until it is set.
async fn client(
    args: Arc<Args>,
    messages: Vec<(usize, Vec<u8>)>,
    until: Option<Arc<AtomicBool>>,
) -> ClientRun {
    let stream = UnixStream::connect(&args.socket).await.expect("connect");
    let (rd, mut wr) = stream.into_split();
    let mut replies = Some(Replies {
        framing: args.framing.clone(),
        rd: BufReader::new(rd),
        line: String::new(),
    });
    let per_client_rate = if args.rate > 0 {
        Some(args.rate as f64 / args.clients as f64)
    } else {
        None
    };
    let window = Arc::new(tokio::sync::Semaphore::new(args.pipeline.max(1)));
    let (sent_at_tx, mut sent_at_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = if args.durable {
        let window = window.clone();
        let mut replies = replies.take().expect("not taken yet");
        Some(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Some(at) = sent_at_rx.recv().await {
                let reply = replies.next().await;
                assert_eq!(reply["type"], "ack", "unexpected reply: {reply}");
                assert!(
                    reply["stored"].as_u64().unwrap_or(0) > 0,
                    "nothing stored: {reply}"
                );
                latencies.push(at.elapsed());
                window.add_permits(1);
            }
            (latencies, replies.rd.into_inner())
        }))
    } else {
        None
    };
    let started = Instant::now();
    let mut sent = 0usize;
    'send: loop {
        for (n, bytes) in &messages {
            if until.as_ref().is_some_and(|u| u.load(Ordering::Relaxed)) {
                break 'send;
            }
            if let Some(rate) = per_client_rate {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            if args.durable {
                window.acquire().await.expect("open").forget();
                sent_at_tx.send(Instant::now()).expect("reader alive");
            }
            wr.write_all(bytes).await.unwrap();
            sent += n;
        }
        if until.is_none() {
            break;
        }
    }
    drop(sent_at_tx);
    let (latencies, rd) = match reader {
        Some(r) => r.await.expect("reader"),
        None => {
            let mut replies = replies.take().expect("kept for fire-and-forget");
            // Make sure everything was read by the daemon before we stop the clock.
            wr.write_all(&encode(&args.framing, &serde_json::json!({"type": "ping"})))
                .await
                .unwrap();
            while replies.next().await["type"] != "pong" {}
            (Vec::new(), replies.rd.into_inner())
        }
    };
    ClientRun {
        latencies,
        events: sent,
        stream: rd.reunite(wr).expect("the same stream"),
    }
}

/// The probe: one event per message, each awaiting its durable ack, with a
/// pause between them; sets `done` when finished.
async fn probe(args: Arc<Args>, done: Arc<AtomicBool>) -> Vec<Duration> {
    tokio::time::sleep(Duration::from_millis(args.probe_warmup_ms)).await;
    let mut c = z4j_agentd::client::Client::connect(&args.socket)
        .await
        .expect("connect the probe");
    let mut latencies = Vec::with_capacity(args.probe);
    for i in 0..args.probe {
        let e = z4j_agentd::client::Event {
            engine: "celery".into(),
            kind: "task.received".into(),
            task_id: format!("probe-{i:08}"),
            occurred_at: None,
            data: serde_json::json!({"task_name": "app.tasks.probe", "queue": "default"}),
        };
        let t = Instant::now();
        let stored = c.send_durable(&[e]).await.expect("probe acked");
        latencies.push(t.elapsed());
        assert_eq!(stored, 1, "probe event not stored");
        tokio::time::sleep(Duration::from_millis(args.probe_gap_ms)).await;
    }
    done.store(true, Ordering::Relaxed);
    latencies
}

/// Raises the soft limit on open files to the hard limit: one descriptor
/// per connection.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
}

/// (utime + stime) in seconds and (VmRSS, VmHWM) in kB, of `pid`.
fn proc_usage(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some((ticks / 100.0, kb("VmRSS:"), kb("VmHWM:")))
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    raise_fd_limit();
    let args = Arc::new(Args::parse());
    assert!(
        args.clients > 0 || args.probe > 0,
        "--clients 0 needs --probe"
    );
    let per_client = args.events / args.clients.max(1);
    let prepared: Vec<_> = (0..args.clients)
        .map(|i| prepare(&args, i, per_client))
        .collect();
    let probe_done = Arc::new(AtomicBool::new(false));
    let until = (args.probe > 0).then(|| probe_done.clone());
    let before = args.daemon_pid.and_then(proc_usage);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for messages in prepared {
        tasks.push(tokio::spawn(client(args.clone(), messages, until.clone())));
    }
    let probe_task = (args.probe > 0).then(|| tokio::spawn(probe(args.clone(), probe_done)));
    let mut latencies = Vec::new();
    let mut total = 0;
    let mut open = Vec::new();
    for t in tasks {
        let run = t.await.unwrap();
        latencies.extend(run.latencies);
        total += run.events;
        open.push(run.stream);
    }
    let mut probe_latencies = match probe_task {
        Some(t) => t.await.unwrap(),
        None => Vec::new(),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let after = args.daemon_pid.and_then(proc_usage);
    drop(open);
    latencies.sort();
    probe_latencies.sort();
    let eps = total as f64 / elapsed;
    let (cpu_us_per_event, rss_kb, hwm_kb) = match (before, after) {
        (Some((c0, _, _)), Some((c1, rss, hwm))) => {
            ((c1 - c0) * 1e6 / total.max(1) as f64, rss, hwm)
        }
        _ => (0.0, 0, 0),
    };
    let sample = serde_json::to_vec(&event(1, "task.succeeded", &"x".repeat(args.blob))).unwrap();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clients": args.clients, "events": total, "event_bytes": sample.len(),
                "batch": args.batch, "durable": args.durable, "framing": args.framing,
                "rate": args.rate, "seconds": elapsed, "events_per_s": eps,
                "ack_p50_us": pct(&latencies, 0.50), "ack_p99_us": pct(&latencies, 0.99),
                "ack_p999_us": pct(&latencies, 0.999),
                "daemon_cpu_us_per_event": cpu_us_per_event,
                "daemon_rss_kb": rss_kb, "daemon_hwm_kb": hwm_kb,
                "probe": probe_latencies.len(), "probe_p50_us": pct(&probe_latencies, 0.5),
                "probe_p99_us": pct(&probe_latencies, 0.99),
                "probe_max_us": pct(&probe_latencies, 1.0),
            })
        );
    } else {
        println!(
            "{total} events (~{} B) from {} clients, batch {}, {}{}: {:.0} events/s in {:.2}s",
            sample.len(),
            args.clients,
            args.batch,
            if args.durable {
                "durable"
            } else {
                "fire-and-forget"
            },
            if args.rate > 0 {
                format!(", rate {}/s", args.rate)
            } else {
                String::new()
            },
            eps,
            elapsed
        );
        if args.durable {
            println!(
                "ack latency per message: p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us",
                pct(&latencies, 0.5),
                pct(&latencies, 0.99),
                pct(&latencies, 0.999)
            );
        }
        if !probe_latencies.is_empty() {
            println!(
                "probe, {} events one at a time: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                probe_latencies.len(),
                ms(pct(&probe_latencies, 0.5)),
                ms(pct(&probe_latencies, 0.99)),
                ms(pct(&probe_latencies, 1.0))
            );
        }
        if after.is_some() {
            println!(
                "daemon: {cpu_us_per_event:.2} us CPU per event, RSS {} kB (peak {} kB) with {} connections open",
                rss_kb, hwm_kb, args.clients
            );
        }
    }
}
