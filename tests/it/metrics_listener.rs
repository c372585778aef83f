//! The metrics listener (`Z4J_METRICS_ADDR`) against a hostile local user:
//! a loopback port is open to every user of the host, so hundreds of idle
//! connections, a request head sent a byte at a time, or an oversized head
//! must neither take the descriptors the local socket needs nor stay open.
//! The real binary, with a descriptor limit of 256 like the host where
//! 367 idle connections locked applications out.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::free_port;
use z4j_agentd::metrics::{MAX_CONNECTIONS, MAX_REQUEST_HEAD_BYTES, REQUEST_TIMEOUT};

use crate::support::binary::BIN;
const TOKEN: &str = "metrics-listener-test-token";
const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";
/// Idle connections the test opens: more than the daemon's 256 descriptors.
const IDLE: usize = 400;

/// `z4j-agentd run` under `ulimit -n 256` (soft and hard), metrics on.
struct Daemon {
    /// Declared before `_dir`, so it is killed (and its log kept) before
    /// the directory goes.
    process: support::RunningDaemon,
    /// Home, spool and log of the daemon, removed after it.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    metrics: SocketAddr,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        for d in ["home", "tmp"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let socket = dir.path().join("agent.sock");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        support::keep_secret("metrics listener test token", TOKEN);
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("ulimit -n 256 && exec \"$0\" run")
            .arg(BIN)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path().join("home"))
            .env("TMPDIR", dir.path().join("tmp"))
            .env("Z4J_BRAIN_URL", format!("http://127.0.0.1:{}", free_port()))
            .env("Z4J_TOKEN", TOKEN)
            .env("Z4J_HMAC_SECRET", SECRET)
            .env("Z4J_SOCKET_PATH", &socket)
            .env("Z4J_METRICS_ADDR", metrics.to_string())
            .env("Z4J_LOG_FORMAT", "json")
            .env("Z4J_SHUTDOWN_GRACE_SECONDS", "0");
        let process = support::RunningDaemon::start_logging_to(
            "metrics-listener-daemon",
            c,
            &dir.path().join("daemon.log"),
            Duration::from_secs(15),
            || UnixStream::connect(&socket).is_ok() && TcpStream::connect(metrics).is_ok(),
        );
        Daemon {
            process,
            _dir: dir,
            socket,
            metrics,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// One JSON-lines request on a fresh local connection; `Err` when no
    /// answer came within `within`.
    fn ask(&self, line: &str, within: Duration) -> Result<serde_json::Value, String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(within)).unwrap();
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = String::new();
        BufReader::new(s)
            .read_line(&mut reply)
            .map_err(|e| format!("no answer within {within:?}: {e}"))?;
        serde_json::from_str(&reply).map_err(|e| format!("{e}: {reply:?}"))
    }

    fn stats(&self) -> serde_json::Value {
        self.ask(r#"{"type":"stats"}"#, Duration::from_secs(5))
            .expect("stats")
    }

    /// The first `stats` for which `cond` holds, or the last after 10 s.
    fn stats_when(&self, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats();
            if cond(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn refused(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["metrics_refused_by_reason"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no metrics_refused_by_reason.{reason} in {stats}"))
}

/// Waits until the daemon closes `s` (EOF or reset); returns how long it took.
fn closed_within(s: &mut TcpStream, bound: Duration) -> Duration {
    let started = Instant::now();
    s.set_read_timeout(Some(bound)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the daemon left the connection open for {bound:?}")
            }
            Err(_) => return started.elapsed(),
        }
    }
}

/// Sends one GET and reads the whole response (the daemon closes after it).
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn hundreds_of_idle_metrics_connections_neither_lock_out_local_clients_nor_stay_open() {
    support::raise_own_fd_limit(1024, &format!("this test opens {IDLE} sockets"));
    let d = Daemon::start();

    // 400 connections that never send a byte: on the old listener each
    // held a descriptor until the client left, and the local socket could
    // no longer accept.
    // (The old listener stopped accepting at its limit, and connections
    // past its backlog could not even connect: those are skipped here so
    // the pings below show what the applications saw.)
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut not_connected = Vec::new();
    for i in 0..IDLE {
        match TcpStream::connect_timeout(&d.metrics, Duration::from_secs(5)) {
            Ok(c) => idle.push(c),
            Err(e) => not_connected.push(format!("{i}: {e}")),
        }
        if not_connected.len() >= 3 {
            break;
        }
    }

    // Local clients are served meanwhile, many at once.
    let pings = Instant::now();
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"{\"type\":\"ping\"}\n").unwrap();
        let mut reply = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut reply)
            .unwrap_or_else(|e| {
                panic!(
                    "local client {i} got no pong with {IDLE} metrics connections open: {e}\n{}",
                    d.log()
                )
            });
        assert!(reply.contains("pong"), "{reply}");
        held.push(s);
    }
    eprintln!(
        "100 local pings with {IDLE} metrics connections open: {:?}",
        pings.elapsed()
    );
    drop(held);
    assert!(
        not_connected.is_empty(),
        "connections to the metrics port failed: {not_connected:?}"
    );

    // At most MAX_CONNECTIONS were kept; every other one was closed at once
    // and counted.
    let s = d.stats_when(|s| refused(s, "limit") >= (IDLE - MAX_CONNECTIONS) as u64);
    assert_eq!(s["metrics_connections"], MAX_CONNECTIONS as u64, "{s}");
    assert_eq!(refused(&s, "limit"), (IDLE - MAX_CONNECTIONS) as u64, "{s}");
    let mut open: Vec<usize> = (0..IDLE).collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    while open.len() > MAX_CONNECTIONS && Instant::now() < deadline {
        open.retain(|&i| {
            let c = &mut idle[i];
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            let still_open = match c.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Ok(n) => {
                    // The 503 then the end, or just the end.
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(n == 0 || text.starts_with("HTTP/1.1 503"), "{text}");
                    false
                }
                Err(_) => false,
            };
            c.set_nonblocking(false).unwrap();
            still_open
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open.len(), MAX_CONNECTIONS, "connections left open");
    let mut idle: Vec<TcpStream> = idle
        .into_iter()
        .enumerate()
        .filter(|(i, _)| open.contains(i))
        .map(|(_, c)| c)
        .collect();

    // The ones kept are cut once the request timeout passes without a request.
    let started = Instant::now();
    let bound = REQUEST_TIMEOUT + Duration::from_secs(5);
    for c in idle.iter_mut() {
        closed_within(
            c,
            bound
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1)),
        );
    }
    eprintln!(
        "the {MAX_CONNECTIONS} kept idle connections were closed within {:?} of the first connect",
        opened.elapsed()
    );
    let s = d.stats_when(|s| s["metrics_connections"] == 0);
    assert_eq!(refused(&s, "timeout"), MAX_CONNECTIONS as u64, "{s}");

    // Then a scrape works and shows the same counts.
    let page = get(d.metrics, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for line in [
        format!(
            "z4j_agentd_metrics_connections_refused_total{{reason=\"limit\"}} {}",
            IDLE - MAX_CONNECTIONS
        ),
        format!(
            "z4j_agentd_metrics_connections_refused_total{{reason=\"timeout\"}} {MAX_CONNECTIONS}"
        ),
        "z4j_agentd_metrics_connections_refused_total{reason=\"too_large\"} 0".to_string(),
        "z4j_agentd_metrics_connections 1".to_string(),
    ] {
        assert!(page.contains(&line), "{line} not in {page}");
    }
    drop(idle);
}

#[test]
fn a_slow_request_an_idle_kept_alive_connection_and_an_oversized_head_are_cut() {
    let d = Daemon::start();

    // Slow loris: a request head one byte every 200 ms never completes in
    // time; the connection is closed after the request timeout even though
    // bytes keep coming.
    let mut loris = TcpStream::connect(d.metrics).unwrap();
    let writer = {
        let mut w = loris.try_clone().unwrap();
        std::thread::spawn(move || {
            let head = format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
                "a".repeat(200)
            );
            for b in head.bytes() {
                if w.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let took = closed_within(&mut loris, REQUEST_TIMEOUT + Duration::from_secs(5));
    assert!(
        took >= REQUEST_TIMEOUT - Duration::from_millis(500),
        "closed after {took:?}, before the request timeout"
    );
    writer.join().unwrap();

    // A kept-alive connection is served, then closed once idle for the
    // request timeout.
    let mut kept = TcpStream::connect(d.metrics).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = kept.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let took = closed_within(&mut kept, REQUEST_TIMEOUT + Duration::from_secs(5));
    eprintln!("an idle kept-alive connection was closed {took:?} after its response");
    // Closing an idle kept-alive connection is no refusal: only the slow
    // request counts.
    let s = d.stats_when(|s| s["metrics_connections"] == 0);
    assert_eq!(refused(&s, "timeout"), 1, "{s}");

    // A request head over the bound gets 431 and the connection closed.
    let mut big = TcpStream::connect(d.metrics).unwrap();
    let pad = "a".repeat(MAX_REQUEST_HEAD_BYTES + 1024);
    let _ = write!(
        big,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n"
    );
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // The client sees the end of the stream a moment before the daemon's
    // connection task has counted it.
    let s = d.stats_when(|s| s["metrics_connections"] == 0);
    assert_eq!(refused(&s, "timeout"), 1, "{s}");
    assert_eq!(refused(&s, "too_large"), 1, "{s}");
    assert_eq!(refused(&s, "limit"), 0, "{s}");
    assert_eq!(s["metrics_connections"], 0, "{s}");
}
