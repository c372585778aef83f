//! The binary as an operator runs it: flags, exit codes, the socket and
//! spool guards, signals, and what reaches the log.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::fake_brain::{SECRET, TOKEN};
use support::free_port;

use crate::support::binary::BIN;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        Env { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// `run` with a clean environment: only what the test sets.
    fn cmd(&self, brain_port: u16) -> Command {
        self.sub(brain_port, "run")
    }

    /// A subcommand with a clean environment: only what the test sets.
    fn sub(&self, brain_port: u16, sub: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("Z4J_BRAIN_URL", format!("http://127.0.0.1:{brain_port}"))
            .env("Z4J_TOKEN", TOKEN)
            .env("Z4J_HMAC_SECRET", SECRET)
            .env("Z4J_SOCKET_PATH", self.socket())
            .env("Z4J_LOG_FORMAT", "json")
            .env("Z4J_SHUTDOWN_GRACE_SECONDS", "1")
            .arg(sub);
        c
    }
}

/// Runs `c` to completion; its output is kept for the secrets check.
fn output(mut c: Command) -> Output {
    let out = c.stdin(Stdio::null()).output().unwrap();
    let sub = c.get_args().next().unwrap_or_default().to_string_lossy();
    support::keep_output(&sub, &out);
    out
}

fn wait_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("daemon exited early ({status}): {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("socket {} never accepted", path.display());
}

fn jsonl_request(path: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn version_and_help_document_every_option() {
    let out = output({
        let mut c = Command::new(BIN);
        c.arg("--version");
        c
    });
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let out = output({
        let mut c = Command::new(BIN);
        c.args(["run", "--help"]);
        c
    });
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "Z4J_BRAIN_URL",
        "Z4J_TOKEN",
        "Z4J_TOKEN_FILE",
        "Z4J_HMAC_SECRET",
        "Z4J_HMAC_SECRET_FILE",
        "Z4J_PROJECT_ID",
        "Z4J_AGENT_NAME",
        "Z4J_ENVIRONMENT",
        "Z4J_DEV_MODE",
        "Z4J_BUFFER_PATH",
        "Z4J_SOCKET_PATH",
        "Z4J_LOG_FORMAT",
        "Z4J_LOG_LEVEL",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let env = Env::new();
    let cases: [(&str, &str, &str); 4] = [
        (
            "Z4J_BRAIN_URL",
            "http://brain.example.com:7711",
            "Z4J_DEV_MODE",
        ),
        ("Z4J_HMAC_SECRET", "dG9vLXNob3J0", "32"),
        ("Z4J_BRAIN_URL", "ftp://x", "scheme"),
        ("Z4J_LOG_FORMAT", "xml", "json"),
    ];
    for (key, value, hint) in cases {
        let mut c = env.cmd(free_port());
        c.env(key, value);
        let out = output(c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}={value}: {err}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains(hint), "{key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains(SECRET) && !err.contains(TOKEN));
    }
    let mut c = env.cmd(free_port());
    c.env_remove("Z4J_TOKEN");
    let out = output(c);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Z4J_TOKEN"));
    // Unknown flags are usage errors too.
    let mut c = env.cmd(free_port());
    c.arg("--no-such-flag");
    assert_eq!(output(c).status.code(), Some(64));
}

#[test]
fn dev_mode_allows_plain_ws_to_another_host() {
    let env = Env::new();
    let mut c = env.cmd(free_port());
    c.env("Z4J_BRAIN_URL", "http://brain.invalid:7711")
        .env("Z4J_DEV_MODE", "true");
    let child = support::RunningDaemon::start("dev_mode", c, &env.socket());
    child.stop();
}

#[test]
fn socket_is_0660_stale_file_replaced_and_live_daemon_refused() {
    let env = Env::new();
    // A stale socket file left by a dead daemon.
    drop(std::os::unix::net::UnixListener::bind(env.socket()).unwrap());
    assert!(env.socket().exists());

    let first = support::RunningDaemon::start("first", env.cmd(free_port()), &env.socket());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);

    // A second daemon on the same socket (own spool) exits naming the path.
    let mut second = env.cmd(free_port());
    second.env(
        "Z4J_BUFFER_PATH",
        env.dir
            .path()
            .join("tmp")
            .join(format!("z4j-{}", z4j_agentd::host::current_uid()))
            .join("other.sqlite"),
    );
    let out = output(second);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&env.socket().display().to_string()), "{err}");
    assert!(err.contains("already listening"), "{err}");

    // Still serving.
    assert_eq!(
        jsonl_request(&env.socket(), r#"{"type":"ping"}"#)["type"],
        "pong"
    );
    first.stop();
    assert!(!env.socket().exists(), "socket removed on a clean stop");
}

#[test]
fn second_daemon_on_the_same_spool_names_the_pid() {
    let env = Env::new();
    let first = support::RunningDaemon::start("first", env.cmd(free_port()), &env.socket());
    let mut second = env.cmd(free_port());
    second.env("Z4J_SOCKET_PATH", env.dir.path().join("second.sock"));
    let out = output(second);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    first.stop();
}

#[test]
fn deleting_the_lock_file_does_not_let_a_second_daemon_in() {
    let env = Env::new();
    let first =
        support::RunningDaemon::start("first_after_rm_lock", env.cmd(free_port()), &env.socket());
    let note = env.dir.path().join("home/.z4j/agentd.sqlite.lock");
    std::fs::remove_file(&note).unwrap();
    let mut second = env.cmd(free_port());
    second.env("Z4J_SOCKET_PATH", env.dir.path().join("second.sock"));
    let (status, err) = support::run_to_exit("second_after_rm_lock", second, 10);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("in use by another z4j-agentd")
            && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );
    assert!(!env.dir.path().join("second.sock").exists());
    first.stop();

    // A symlink planted at the lock path: refused, and what it points to is
    // left as it was (it was truncated and overwritten with the pid).
    let precious = env.dir.path().join("home/precious.txt");
    std::fs::write(&precious, "keep me\n").unwrap();
    let _ = std::fs::remove_file(&note);
    std::os::unix::fs::symlink(&precious, &note).unwrap();
    let (status, err) = support::run_to_exit("symlinked_lock", env.cmd(free_port()), 10);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&note.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me\n");
    assert!(!env.socket().exists(), "never ready");
}

#[test]
fn a_read_only_spool_is_refused_at_start_naming_the_path_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if z4j_agentd::host::current_uid() != 0 {
        eprintln!(
            "skipped: a read-only mount and running as another uid need root (CI runs this test as root)"
        );
        return;
    }
    // A read-only filesystem under the spool: a tmpfs, remounted ro after
    // the first start made the spool.
    let env = Env::new();
    let z4j = env.dir.path().join("home/.z4j");
    std::fs::create_dir_all(&z4j).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&z4j)
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mount a tmpfs on {}", z4j.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(z4j.clone());
    let child = support::RunningDaemon::start("before_ro", env.cmd(free_port()), &env.socket());
    child.stop();
    let ro = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&z4j)
        .status()
        .unwrap()
        .success();
    assert!(ro, "remount ro");
    // An explicit path: the default one would fall back to $TMPDIR instead
    // (with a warning), which is the documented behaviour for a default
    // directory that cannot be written.
    let mut c = env.cmd(free_port());
    c.env("Z4J_BUFFER_PATH", z4j.join("agentd.sqlite"));
    let (status, err) = support::run_to_exit("ro_mount", c, 10);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&z4j.display().to_string())
            && err.contains("read-only filesystem")
            && err.contains("remount it read-write"),
        "{err}"
    );
    assert!(!env.socket().exists(), "never ready");

    // As uid 65534: a directory it owns but may not write (0500), then a
    // spool file it may only read (0400).
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = env.dir.path().join("home");
    let z4j = home.join(".z4j");
    std::fs::create_dir_all(&z4j).unwrap();
    let chown = |p: &Path| {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    };
    chown(&home);
    chown(&z4j);
    let as_nobody = |env: &Env| {
        let mut c = env.cmd(free_port());
        c.uid(65534)
            .gid(65534)
            .env("Z4J_BUFFER_PATH", z4j.join("agentd.sqlite"))
            .env("Z4J_SOCKET_PATH", home.join("agent.sock"));
        c
    };
    let socket = home.join("agent.sock");
    std::fs::set_permissions(&z4j, std::fs::Permissions::from_mode(0o500)).unwrap();
    let (status, err) = support::run_to_exit("ro_dir", as_nobody(&env), 10);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} is not writable by uid 65534", z4j.display()))
            && err.contains("chmod u+rwx"),
        "{err}"
    );
    assert!(!socket.exists(), "never ready");

    std::fs::set_permissions(&z4j, std::fs::Permissions::from_mode(0o700)).unwrap();
    let spool = z4j.join("agentd.sqlite");
    let child = support::RunningDaemon::start("nobody_first", as_nobody(&env), &socket);
    child.stop();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o400)).unwrap();
    let (status, err) = support::run_to_exit("ro_file", as_nobody(&env), 10);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} is not writable by uid 65534", spool.display()))
            && err.contains("chmod u+rw"),
        "{err}"
    );
    assert!(!socket.exists(), "never ready");
}

#[test]
fn sigterm_exits_0_and_keeps_undelivered_events_for_the_next_start() {
    let env = Env::new();
    let mut c = env.cmd(free_port());
    c.env("Z4J_SHUTDOWN_GRACE_SECONDS", "1");
    let child = support::RunningDaemon::start("sigterm", c, &env.socket());
    let ack = jsonl_request(
        &env.socket(),
        r#"{"type":"event","engine":"celery","kind":"task.sent","task_id":"t-1","ack_id":"a1"}"#,
    );
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["ack_id"], "a1");
    assert_eq!(ack["stored"], 1);
    child.stop();

    let child = support::RunningDaemon::start("sigint", env.cmd(free_port()), &env.socket());
    let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
    assert_eq!(stats["spool_depth"], 1, "{stats}");
    child.stop_expecting_success("INT", 20);
}

#[test]
fn sigterm_with_a_producer_blocked_on_a_full_spool_ends_within_the_grace_period() {
    // The brain is away (nothing listens on its port), the spool is full
    // and Z4J_BUFFER_OVERFLOW=block holds a producer back. SIGTERM used to
    // wait for room that never came, for ever; only a second signal ended it.
    let env = Env::new();
    let mut c = env.cmd(free_port());
    c.env("Z4J_BUFFER_OVERFLOW", "block")
        .env("Z4J_BUFFER_MAX_EVENTS", "1000")
        .env("Z4J_SHUTDOWN_GRACE_SECONDS", "3");
    let mut child = support::RunningDaemon::start("block_sigterm", c, &env.socket());
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let events = |n: usize, tag: &str| -> String {
        (0..n)
            .map(|i| format!(r#"{{"engine":"rq","kind":"task.received","task_id":"{tag}{i}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    };
    writeln!(
        s,
        r#"{{"type":"events","ack_id":1,"events":[{}]}}"#,
        events(1000, "a")
    )
    .unwrap();
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    assert!(line.contains(r#""stored":1000"#), "{line}");
    // The spool is full: this one waits for room.
    writeln!(
        s,
        r#"{{"type":"events","ack_id":2,"events":[{}]}}"#,
        events(5, "b")
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
        if stats["producer_waits"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the producer never waited: {stats}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = Instant::now();
    child.signal("TERM");
    // Told, not left hanging: nothing of that message was stored.
    line.clear();
    rd.read_line(&mut line).unwrap();
    let told = stopped.elapsed();
    let e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["ack_id"].as_u64()),
        (Some("error"), Some("daemon_stopping"), Some(2)),
        "{e}"
    );
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("stopping") && msg.contains("5 events of this message were not stored"),
        "{msg}"
    );
    // Within the grace period (3 s) plus the margin to close the brain
    // connection (3 s): a bound against hanging, not a speed target.
    let status = child.wait_exit(6 + 2);
    let took = stopped.elapsed();
    assert!(status.success(), "{status}");
    let log = child.output();
    assert!(took < Duration::from_secs(6), "stopped after {took:?}");
    assert!(
        told >= Duration::from_millis(1400),
        "held for half the grace period first, told after {told:?}"
    );
    let last = log
        .lines()
        .find(|l| l.contains(r#""message":"stopped""#))
        .unwrap_or_else(|| panic!("no stopped line: {log}"));
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["refused_while_stopping"], 5, "counted: {last}");
    assert_eq!(last["undelivered_events_kept"], 1000, "{last}");
    eprintln!("producer told after {told:?}; daemon exited 0 after {took:?}");

    // Everything committed is kept for the next start.
    let child =
        support::RunningDaemon::start("block_sigterm_restart", env.cmd(free_port()), &env.socket());
    let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
    assert_eq!(stats["spool_depth"], 1000, "{stats}");
    child.stop();
}

#[test]
fn acked_events_survive_sigkill() {
    let env = Env::new();
    let child = support::RunningDaemon::start("killed", env.cmd(free_port()), &env.socket());
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    for i in 0..50 {
        writeln!(
            s,
            r#"{{"type":"events","ack_id":{i},"events":[{{"engine":"rq","kind":"task.received","task_id":"k{i}"}},{{"engine":"rq","kind":"task.started","task_id":"k{i}"}}]}}"#
        )
        .unwrap();
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["stored"], 2, "{line}");
    }
    child.kill();

    let child = support::RunningDaemon::start("restarted", env.cmd(free_port()), &env.socket());
    let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
    assert_eq!(stats["spool_depth"], 100, "{stats}");
    child.kill();
}

/// The state letter of the daemon's `z4j-checkpoint` thread (`R`
/// running, `D` in I/O, `S` waiting for its next pass), if it has one.
fn checkpoint_thread_state(pid: u32) -> Option<char> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == "z4j-checkpoint" {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // "tid (comm) S ...": the state follows the closing parenthesis.
            return stat.rsplit_once(')')?.1.trim_start().chars().next();
        }
    }
    None
}

#[test]
fn acked_events_survive_sigkill_during_a_checkpoint() {
    let env = Env::new();
    let blob = "x".repeat(4000);
    let mut acked: Vec<String> = Vec::new();
    let mut killed_mid_pass = 0;
    for round in 0..3 {
        let child = support::RunningDaemon::start(
            &format!("checkpoint_kill_{round}"),
            env.cmd(free_port()),
            &env.socket(),
        );
        let pid = child.pid();
        let socket = env.socket();
        let blob = blob.clone();
        // Durable messages of 20 events of 4 KB, back to back, until the
        // daemon is gone: the log grows fast and every pass copies MBs.
        let sender = std::thread::spawn(move || {
            let mut got = Vec::new();
            let Ok(mut s) = UnixStream::connect(&socket) else {
                return got;
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rd = BufReader::new(s.try_clone().unwrap());
            for m in 0.. {
                let ids: Vec<String> = (0..20).map(|e| format!("r{round}-m{m}-e{e}")).collect();
                let events: Vec<String> = ids
                    .iter()
                    .map(|id| {
                        format!(r#"{{"engine":"rq","kind":"task.received","task_id":"{id}","data":{{"blob":"{blob}"}}}}"#)
                    })
                    .collect();
                let line = format!(
                    r#"{{"type":"events","ack_id":{m},"events":[{}]}}"#,
                    events.join(",")
                );
                if writeln!(s, "{line}").is_err() {
                    return got;
                }
                let mut reply = String::new();
                match rd.read_line(&mut reply) {
                    Ok(n) if n > 0 => {}
                    _ => return got,
                }
                let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
                assert_eq!(v["stored"], 20, "{reply}");
                got.extend(ids);
            }
            got
        });
        // Kill while the checkpoint thread is seen busy twice in a row.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut busy_before = false;
        loop {
            let busy = matches!(checkpoint_thread_state(pid), Some('R') | Some('D'));
            if busy && busy_before {
                killed_mid_pass += 1;
                break;
            }
            busy_before = busy;
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill();
        acked.extend(sender.join().unwrap());
    }
    assert!(
        killed_mid_pass >= 2,
        "only {killed_mid_pass} of 3 kills came while a checkpoint ran"
    );
    // The restarted daemon recovers the spool; then it is read directly.
    let child =
        support::RunningDaemon::start("checkpoint_kill_after", env.cmd(free_port()), &env.socket());
    let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
    let path = stats["spool_path"].as_str().unwrap().to_string();
    assert!(
        stats["spool_depth"].as_u64().unwrap() >= acked.len() as u64,
        "{} acknowledged, {stats}",
        acked.len()
    );
    child.stop();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn.prepare("SELECT body FROM events").unwrap();
    let stored: std::collections::HashSet<String> = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_slice(&b.unwrap()).unwrap();
            v["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    // The depth the restarted daemon found (from its tally and the rows
    // appended since) is the spool's exact row count.
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stats["spool_depth"].as_i64().unwrap(), rows, "{stats}");
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "{} acknowledged events kept over 3 SIGKILLs, {killed_mid_pass} of them during a checkpoint",
        acked.len()
    );
}

#[test]
fn refused_events_get_clear_errors_and_the_connection_goes_on() {
    let env = Env::new();
    let child =
        support::RunningDaemon::start("refused_events", env.cmd(free_port()), &env.socket());
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut read = || -> serde_json::Value {
        let mut reply = String::new();
        rd.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let mut ask = |line: &str, read: &mut dyn FnMut() -> serde_json::Value| {
        writeln!(s, "{line}").unwrap();
        read()
    };
    // A refused event asking for an ack: the error, then the ack saying 0 stored.
    let e = ask(
        r#"{"type":"event","engine":"celery","kind":"schedule.created","ack_id":1}"#,
        &mut read,
    );
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("legacy_kind"))
    );
    assert_eq!(e["ack_id"], 1);
    assert!(e["message"].as_str().unwrap().contains("legacy"), "{e}");
    let a = read();
    assert_eq!(
        (a["type"].as_str(), a["stored"].as_u64()),
        (Some("ack"), Some(0)),
        "{a}"
    );
    let e = ask(
        r#"{"type":"event","engine":"celery","kind":"task.bogus","task_id":"x"}"#,
        &mut read,
    );
    assert_eq!(e["code"], "unknown_kind");
    let e = ask(
        r#"{"type":"event","engine":"celery","kind":"task.sent","task_id":"x","data":{"v":NaN}}"#,
        &mut read,
    );
    assert_eq!(e["code"], "bad_message");
    let e = ask("not json at all {", &mut read);
    assert_eq!(e["code"], "bad_message");
    let ok = ask(
        r#"{"type":"event","engine":"celery","kind":"task.sent","task_id":"x","ack_id":"z"}"#,
        &mut read,
    );
    assert_eq!(
        (ok["type"].as_str(), ok["stored"].as_u64()),
        (Some("ack"), Some(1))
    );
    let stats = ask(r#"{"type":"stats"}"#, &mut read);
    assert_eq!(stats["refused_by_reason"]["legacy_kind"], 1, "{stats}");
    assert_eq!(stats["refused_by_reason"]["unknown_kind"], 1, "{stats}");
    assert!(
        stats["refused_by_reason"]["bad_message"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    child.stop();
}

#[test]
fn an_integer_beyond_64_bits_is_refused_naming_the_field_not_rounded() {
    let env = Env::new();
    let child = support::RunningDaemon::start("big_integer", env.cmd(free_port()), &env.socket());
    let mut s = UnixStream::connect(env.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut ask = |line: &str| -> serde_json::Value {
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        rd.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    // serde_json alone read this as 1.2345678901234568e29 and stored it.
    let e = ask(
        r#"{"type":"events","ack_id":1,"events":[{"engine":"celery","kind":"task.sent","task_id":"a"},{"engine":"celery","kind":"task.sent","task_id":"b","data":{"n":123456789012345678901234567890}}]}"#,
    );
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_message")),
        "{e}"
    );
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("events[1].data.n")
            && msg.contains("123456789012345678901234567890")
            && msg.contains("send it as a string"),
        "{msg}"
    );
    // The same number as a string is kept exactly.
    let ok = ask(
        r#"{"type":"event","ack_id":2,"engine":"celery","kind":"task.sent","task_id":"b","data":{"n":"123456789012345678901234567890","m":18446744073709551615}}"#,
    );
    assert_eq!(
        (ok["type"].as_str(), ok["stored"].as_u64()),
        (Some("ack"), Some(1)),
        "{ok}"
    );
    let stats = ask(r#"{"type":"stats"}"#);
    assert_eq!(stats["refused_by_reason"]["bad_message"], 1, "{stats}");
    assert_eq!(
        stats["spool_depth"], 1,
        "nothing of the refused message was stored: {stats}"
    );
    child.stop();
    let conn = rusqlite::Connection::open(env.dir.path().join("home/.z4j/agentd.sqlite")).unwrap();
    let body: Vec<u8> = conn
        .query_row("SELECT body FROM events", [], |r| r.get(0))
        .unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains(r#""m":18446744073709551615"#)
            && body.contains(r#""n":"123456789012345678901234567890""#),
        "{body}"
    );
}

#[test]
fn the_log_never_contains_the_token_or_the_secret() {
    let env = Env::new();
    let mut c = env.cmd(free_port());
    c.env("Z4J_LOG_LEVEL", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_socket(&env.socket(), &mut child);
    jsonl_request(
        &env.socket(),
        r#"{"type":"event","engine":"celery","kind":"task.sent","task_id":"t","ack_id":1}"#,
    );
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, "TERM");
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    support::keep_log("trace_level", &log);
    assert!(log.contains("ready"), "{log}");
    assert!(!log.contains(TOKEN), "token leaked into the log");
    assert!(!log.contains(SECRET), "secret leaked into the log");
    assert!(
        !log.contains(SECRET.trim_end_matches('=')),
        "secret leaked into the log"
    );
}

#[test]
fn unwritable_home_falls_back_to_tmp_with_exactly_one_warning() {
    let env = Env::new();
    // A HOME under which ~/.z4j cannot be created.
    let fake_home = env.dir.path().join("home-is-a-file");
    std::fs::write(&fake_home, b"").unwrap();
    let mut c = env.cmd(free_port());
    c.env("HOME", &fake_home);
    let child = support::RunningDaemon::start("unwritable_home", c, &env.socket());
    let log = child.stop();
    // The brain is not running in this test; its connection warning aside,
    // the fallback is the one WARNING.
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"WARN\"") && !l.contains("brain connection failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    let tmp_spool = env
        .dir
        .path()
        .join("tmp")
        .join(format!("z4j-{}", z4j_agentd::host::current_uid()))
        .join("agentd.sqlite");
    assert!(
        warnings[0].contains(&tmp_spool.display().to_string()),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].contains(&fake_home.join(".z4j/agentd.sqlite").display().to_string()),
        "{}",
        warnings[0]
    );
    assert!(tmp_spool.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_token_file_and_reconnects() {
    use support::fake_brain::{Behavior, FakeBrain};
    let brain = FakeBrain::start(Behavior::default()).await;
    let env = Env::new();
    let (first, second) = ("first-token-sighup-0123", "second-token-sighup-4567");
    support::keep_secret("cli: token before SIGHUP", first);
    support::keep_secret("cli: token after SIGHUP", second);
    let token_file = env.dir.path().join("token");
    std::fs::write(&token_file, first).unwrap();
    let mut c = env.cmd(0);
    c.env("Z4J_BRAIN_URL", &brain.url)
        .env_remove("Z4J_TOKEN")
        .env("Z4J_TOKEN_FILE", &token_file);
    let child = support::RunningDaemon::start("sighup", c, &env.socket());
    let seen = brain.seen.clone();
    support::wait_for(10, "first connection", || {
        seen.auth_headers.lock().unwrap().len() == 1
    })
    .await;
    std::fs::write(&token_file, second).unwrap();
    child.signal("HUP");
    support::wait_for(10, "a reconnect with the new token", || {
        seen.auth_headers.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        brain.seen.auth_headers.lock().unwrap().as_slice(),
        &[format!("Bearer {first}"), format!("Bearer {second}")]
    );
    assert!(
        brain
            .seen
            .client_close_codes
            .lock()
            .unwrap()
            .contains(&1000),
        "old session closed cleanly"
    );
    child.stop();
}

#[test]
fn status_without_a_daemon_exits_1_and_says_so() {
    let env = Env::new();
    let out = output(env.sub(free_port(), "status"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no z4j-agentd answers on"), "{err}");
    assert!(err.contains(&env.socket().display().to_string()), "{err}");
}

#[test]
fn status_reads_a_running_daemon_as_text_and_json() {
    let env = Env::new();
    let child = support::RunningDaemon::start("status_target", env.cmd(free_port()), &env.socket());
    let pid = child.pid();
    let text = output(env.sub(free_port(), "status"));
    let json = {
        let mut c = env.sub(free_port(), "status");
        c.arg("--json");
        output(c)
    };
    child.stop_with("TERM", 20);
    assert_eq!(text.status.code(), Some(0));
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(t.contains(&format!("(pid {pid})")), "{t}");
    assert!(t.contains("spool:    0 events"), "{t}");
    assert!(t.contains("<- this status command"), "{t}");
    assert_eq!(json.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["type"], "stats");
    assert_eq!(v["pid"], pid);
    assert_eq!(v["spool_depth"], 0);
}

#[test]
fn doctor_exit_codes_follow_the_outcome() {
    let env = Env::new();
    // Usage error: 64.
    let mut c = env.sub(free_port(), "doctor");
    c.arg("--no-such-flag");
    assert_eq!(output(c).status.code(), Some(64));
    // A brain that is not there: 1, as JSON naming the tcp probe.
    let mut c = env.sub(free_port(), "doctor");
    c.arg("--json");
    let out = output(c);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let tcp = v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tcp")
        .unwrap();
    assert_eq!(tcp["status"], "fail");
    // Text for the same run names the failed probe and prints a fix line.
    let out = output(env.sub(free_port(), "doctor"));
    assert_eq!(out.status.code(), Some(1));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("[FAIL] tcp"), "{t}");
    assert!(t.contains("fix: is the brain running"), "{t}");
    assert!(!t.contains(TOKEN) && !t.contains(SECRET));
}

/// Stands in for systemd's notify socket: collects every state line sent.
struct NotifySocket {
    path: PathBuf,
    sock: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    fn new(env: &Env) -> NotifySocket {
        let path = env.dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        NotifySocket { path, sock }
    }

    /// `run` reporting to this socket with a watchdog of `watchdog_usec`.
    /// Not waited for: the test reads its readiness from this socket.
    fn daemon(&self, name: &str, env: &Env, watchdog_usec: &str) -> support::RunningDaemon {
        let mut c = env.cmd(free_port());
        c.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", watchdog_usec);
        support::RunningDaemon::start_until(name, c, Duration::ZERO, || true)
    }

    /// The state lines received within `window`, in order.
    fn lines_for(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                out.extend(text.lines().map(str::to_owned));
            }
        }
        out
    }

    /// Reads until a line starting with `prefix` arrives; returns all lines.
    fn until(&self, prefix: &str, secs: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let got = self.lines_for(Duration::from_millis(50));
            let done = got.iter().any(|l| l.starts_with(prefix));
            out.extend(got);
            if done {
                return out;
            }
        }
        panic!("no {prefix} within {secs}s; got {out:?}");
    }
}

fn first(lines: &[String], prefix: &str) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {lines:?}"))
}

#[test]
fn sd_notify_sends_ready_status_watchdog_and_stopping_in_order() {
    let env = Env::new();
    let notify = NotifySocket::new(&env);
    let mut child = notify.daemon("sd_notify", &env, "400000");
    let mut lines = notify.until("READY=1", 10);
    lines.extend(notify.lines_for(Duration::from_millis(1500)));
    // READY=1 waits for the spool and the socket, never for the brain
    // (nothing listens on its port here).
    assert!(UnixStream::connect(env.socket()).is_ok());
    child.signal("TERM");
    lines.extend(notify.until("STOPPING=1", 10));
    assert!(child.wait_exit(20).success());
    child.output();

    let ready = first(&lines, "READY=1");
    let status = first(&lines, "STATUS=");
    let watchdog = first(&lines, "WATCHDOG=1");
    let stopping = first(&lines, "STOPPING=1");
    assert!(
        ready < status && status < watchdog && watchdog < stopping,
        "{lines:?}"
    );
    let status_line = &lines[status];
    assert!(
        status_line.contains("spool 0 events") && status_line.contains("brain "),
        "{status_line}"
    );
    // Every 200 ms (half of 400 ms) for 1.5 s: at least 5 pings before the stop.
    let pings = lines[..stopping]
        .iter()
        .filter(|l| *l == "WATCHDOG=1")
        .count();
    assert!(pings >= 5, "{pings} pings: {lines:?}");
    assert!(
        !lines[stopping..].iter().any(|l| l == "WATCHDOG=1"),
        "no ping after STOPPING=1: {lines:?}"
    );
}

#[test]
fn watchdog_pings_stop_while_the_spool_writer_is_wedged_and_resume_after() {
    let env = Env::new();
    let notify = NotifySocket::new(&env);
    let child = notify.daemon("watchdog", &env, "1000000");
    notify.until("WATCHDOG=1", 10);

    // Another process takes the spool's write lock: the writer's next
    // commit waits (up to its 5 s busy timeout) and answers nothing meanwhile.
    let spool = env.dir.path().join("home/.z4j/agentd.sqlite");
    let lock = rusqlite::Connection::open(&spool).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut s = UnixStream::connect(env.socket()).unwrap();
    writeln!(
        s,
        r#"{{"type":"event","engine":"celery","kind":"task.sent","task_id":"w-1"}}"#
    )
    .unwrap();
    // A ping already on its way may still arrive; after one period, none.
    notify.lines_for(Duration::from_millis(700));
    let wedged = notify.lines_for(Duration::from_millis(3000));
    assert!(
        !wedged.iter().any(|l| l == "WATCHDOG=1"),
        "pinged while the spool writer was wedged: {wedged:?}"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    notify.until("WATCHDOG=1", 5);

    let out = child.stop();
    let stalled: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("stopped answering"))
        .collect();
    assert_eq!(stalled.len(), 1, "{out}");
    assert!(
        stalled[0].contains("spool") && !stalled[0].contains("ingest"),
        "{}",
        stalled[0]
    );
    assert!(out.contains("every part answers again"), "{out}");
}

/// `status` run as uid 65534 against a daemon with `Z4J_ALLOWED_UIDS`.
/// The socket is opened to everyone so only the allow-list decides.
fn status_as_nobody(allowed_uids: &str) -> (Output, serde_json::Value, String) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = env.cmd(free_port());
    c.env("Z4J_ALLOWED_UIDS", allowed_uids);
    let child = support::RunningDaemon::start("allowed_uids", c, &env.socket());
    std::fs::set_permissions(env.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut c = env.sub(free_port(), "status");
    c.uid(65534).gid(65534).env("HOME", "/nonexistent");
    let out = output(c);
    let stats = jsonl_request(&env.socket(), r#"{"type":"stats"}"#);
    let (_, log) = child.stop_with("TERM", 10);
    (out, stats, log)
}

#[test]
fn a_uid_outside_the_allow_list_is_refused_told_why_and_counted() {
    if z4j_agentd::host::current_uid() != 0 {
        eprintln!(
            "skipped: running a client as another uid needs root (CI runs this test as root)"
        );
        return;
    }
    let (out, stats, log) = status_as_nobody("1000,1001");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "refused: {err}");
    assert!(
        err.contains("not_allowed")
            && err.contains("uid 65534")
            && err.contains("Z4J_ALLOWED_UIDS"),
        "the client is told which setting to change: {err}"
    );
    assert_eq!(stats["refused_by_reason"]["not_allowed"], 1, "{stats}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("refused a local client whose uid/gid is not allowed"))
            .count(),
        1,
        "{log}"
    );

    // The same client once its uid is on the list: served.
    let (out, stats, _) = status_as_nobody("1000,65534");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("<- this status command"));
    assert!(
        stats["refused_by_reason"].get("not_allowed").is_none(),
        "{stats}"
    );
}

#[test]
fn connections_from_a_uid_outside_the_allow_list_take_no_slot() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const PYTHON: &str = "/usr/bin/python3";
    if z4j_agentd::host::current_uid() != 0 || !Path::new(PYTHON).exists() {
        eprintln!("skipped: needs root and {PYTHON} to hold connections as uid 65534");
        return;
    }
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = env.cmd(free_port());
    c.env("Z4J_ALLOWED_UIDS", "1000")
        .env("Z4J_MAX_CLIENTS", "2");
    let daemon = support::RunningDaemon::start("allowed_uids_slots", c, &env.socket());
    std::fs::set_permissions(env.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // Five connections as uid 65534 that send nothing and stay open.
    let mut holder = Command::new(PYTHON)
        .args([
            "-c",
            "import socket, sys, time\n\
             held = []\n\
             for _ in range(5):\n\
             \x20   s = socket.socket(socket.AF_UNIX)\n\
             \x20   s.connect(sys.argv[1])\n\
             \x20   held.append(s)\n\
             print('held', flush=True)\n\
             time.sleep(5)\n",
        ])
        .arg(env.socket())
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");
    // Both slots are still free for allowed clients, at once.
    let mut conns: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(env.socket()).unwrap())
        .collect();
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"{\"type\":\"ping\"}\n").unwrap();
    }
    let mut readers: Vec<BufReader<UnixStream>> = conns
        .iter()
        .map(|c| BufReader::new(c.try_clone().unwrap()))
        .collect();
    for r in readers.iter_mut() {
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        assert!(reply.contains("\"pong\""), "{reply}");
    }
    // The counters, on a connection already held (a new one would need a
    // third slot).
    conns[0].write_all(b"{\"type\":\"stats\"}\n").unwrap();
    let mut reply = String::new();
    readers[0].read_line(&mut reply).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&reply).unwrap();
    drop(readers);
    drop(conns);
    let _ = holder.kill();
    let _ = holder.wait();
    daemon.stop_with("TERM", 10);
    assert_eq!(stats["refused_by_reason"]["not_allowed"], 5, "{stats}");
    assert!(
        stats["refused_by_reason"].get("too_many_clients").is_none(),
        "{stats}"
    );
}
