//! Shared test harness: a whole daemon in-process on a temp dir, against a
//! brain URL of the test's choosing ([`TestDaemon`]); the real binary as a
//! child process ([`RunningDaemon`], in `binary.rs`); the fake brain
//! (`fake_brain.rs`) and its HTTPS long-poll counterpart
//! (`longpoll_brain.rs`).
//!
//! With `Z4J_TEST_LOG_DIR` set (tests/run-all.sh sets it), everything the
//! daemon code of a test binary logs, at TRACE, goes to
//! `$Z4J_TEST_LOG_DIR/rust/<binary>-<pid>.log`, the output of the binary
//! tests' processes is kept beside it ([`keep_log`], [`keep_stderr`]), and
//! the credentials the tests hand out are listed in
//! `$Z4J_TEST_LOG_DIR/rust.secrets` ([`keep_secret`]), for
//! tests/check_secrets.py to search every log for.

#![allow(dead_code)]

pub mod binary;
pub mod fake_brain;
pub mod longpoll_brain;

pub use binary::{run_to_exit, RunningDaemon};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use z4j_agentd::client::{Client, Event};
use z4j_agentd::config::Options;
use z4j_agentd::daemon::{self, DaemonError};
use z4j_agentd::host::HostEnv;
use z4j_agentd::protocol::Value;
use z4j_agentd::stats::Stats;

/// A daemon running in this process.
pub struct TestDaemon {
    pub dir: DaemonDir,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub stats: Arc<Stats>,
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the gateway for z4j agents listens, when enabled.
    pub gateway: Option<std::net::SocketAddr>,
    pub host: HostEnv,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), DaemonError>>,
}

/// Options pointing at `brain_url` with the fake's credentials.
pub fn options(brain_url: &str) -> Options {
    capture_logs();
    Options {
        brain_url: Some(brain_url.to_string()),
        token: Some(fake_brain::TOKEN.to_string()),
        hmac_secret: Some(fake_brain::SECRET.to_string()),
        worker_id: Some("agentd-test".to_string()),
        ..Options::default()
    }
}

/// Where a test daemon's home, socket and temporary files are: a fresh
/// temporary directory, removed with the daemon, or one the test keeps
/// across daemons.
pub enum DaemonDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl DaemonDir {
    pub fn path(&self) -> &Path {
        match self {
            DaemonDir::Temp(t) => t.path(),
            DaemonDir::Kept(p) => p,
        }
    }
}

/// Starts a daemon with `opts`, its home (given to `prepare` first),
/// socket and temporary files under `dir`; returns once it is ready.
async fn launch(mut opts: Options, dir: DaemonDir, prepare: impl FnOnce(&Path)) -> TestDaemon {
    capture_logs();
    let root = dir.path();
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    prepare(&home);
    let socket = root.join("agent.sock");
    opts.socket_path = Some(socket.clone());
    let host = HostEnv {
        home: Some(home),
        tmpdir: root.join("tmp"),
        uid: z4j_agentd::host::current_uid(),
        hostname: "testhost".into(),
        ..HostEnv::default()
    };
    std::fs::create_dir_all(&host.tmpdir).unwrap();
    let config = opts.resolve(host.clone()).expect("valid test config");
    let (_tx, rx) = watch::channel(config.uplink.clone());
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let _keep_settings_sender = _tx;
        daemon::run(config, rx, token, Some(ready_tx)).await
    });
    let ready = match tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("daemon ready in time")
    {
        Ok(ready) => ready,
        Err(_) => panic!("the daemon did not start: {:?}", task.await),
    };
    TestDaemon {
        dir,
        socket: ready.socket_path,
        spool: ready.spool_path,
        stats: ready.stats,
        metrics: ready.metrics_addr,
        gateway: ready.gateway_addr,
        host,
        shutdown,
        task,
    }
}

impl TestDaemon {
    /// Starts a daemon with `options` in a fresh temp dir.
    pub async fn start(opts: Options) -> TestDaemon {
        Self::start_prepared(opts, |_| {}).await
    }

    /// Like [`TestDaemon::start`], with `prepare` called on the daemon's
    /// home directory first (to mount something on its `.z4j`, say).
    pub async fn start_prepared(opts: Options, prepare: impl FnOnce(&Path)) -> TestDaemon {
        let dir = DaemonDir::Temp(tempfile::tempdir().unwrap());
        launch(opts, dir, prepare).await
    }

    /// Like [`TestDaemon::start`], on `dir`, which outlives the daemon (its
    /// spool and what it remembers carry over to the next one started there).
    pub async fn start_in(opts: Options, dir: &Path) -> TestDaemon {
        launch(opts, DaemonDir::Kept(dir.to_path_buf()), |_| {}).await
    }

    /// Starts a daemon for `brain` with the default test options and waits
    /// until its uplink is connected.
    pub async fn connected_to(brain: &fake_brain::FakeBrain) -> TestDaemon {
        let d = TestDaemon::start(options(&brain.url)).await;
        wait_uplink_connected(&d.stats).await;
        d
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    pub async fn stop(self) -> Result<(), DaemonError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stops in time")
            .unwrap()
    }
}

/// A task lifecycle event for tests.
pub fn event(task: &str, kind: &str) -> Event {
    Event {
        engine: "celery".into(),
        kind: kind.into(),
        task_id: task.into(),
        occurred_at: None,
        data: serde_json::json!({"task_name": "app.tasks.add", "queue": "default"}),
    }
}

/// Polls `cond` every 20 ms until it holds or `secs` pass.
pub async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the daemon's `stats` until `cond` holds.
pub async fn wait_stats(
    d: &TestDaemon,
    secs: u64,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut c = d.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = c.stats().await.unwrap();
        if cond(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}; last stats: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (10 s at most) until the daemon's uplink is connected.
pub async fn wait_uplink_connected(stats: &Stats) {
    wait_for(10, "connected", || {
        stats.uplink().state == z4j_agentd::stats::UplinkState::Connected
    })
    .await;
}

/// A command payload as the brain sends it (`claim` is its
/// `delivery_claim_token`).
pub fn brain_command(action: &str, target: Value, parameters: Value, claim: Value) -> Value {
    let mut p = Value::empty_map();
    p.insert("action", action);
    p.insert("target", target);
    p.insert("parameters", parameters);
    p.insert("timeout_seconds", 60u64);
    p.insert("issued_by", Value::Null);
    p.insert("delivery_claim_token", claim);
    p
}

/// The strings of the array at `k` in `v` (none when absent).
pub fn strings_at(v: &Value, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A number in `stats` (`u64::MAX` when absent, so no bound is met by chance).
pub fn num(s: &Value, k: &str) -> u64 {
    s.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// A string in `stats` (`""` when absent or null).
pub fn text<'a>(s: &'a Value, k: &str) -> &'a str {
    s.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A loopback TCP port nobody listens on (for a brain that is down).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ------------------------------------------------- logs for the secrets check

/// `$Z4J_TEST_LOG_DIR`, with `rust/` created and the fake brain's
/// credentials added to `rust.secrets` on first use; `None` when unset.
fn log_root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = PathBuf::from(std::env::var_os("Z4J_TEST_LOG_DIR").filter(|d| !d.is_empty())?);
        std::fs::create_dir_all(root.join("rust")).expect("create $Z4J_TEST_LOG_DIR/rust");
        use base64::Engine as _;
        let key = base64::engine::general_purpose::URL_SAFE
            .decode(fake_brain::SECRET)
            .expect("the fake brain's secret is base64url");
        for (label, value) in [
            ("fake brain token", fake_brain::TOKEN.to_string()),
            ("fake brain HMAC secret", fake_brain::SECRET.to_string()),
            (
                "fake brain HMAC secret (unpadded)",
                fake_brain::SECRET.trim_end_matches('=').to_string(),
            ),
            ("fake brain signing key (hex)", hex::encode(&key)),
            (
                "fake brain signing key (std base64)",
                base64::engine::general_purpose::STANDARD.encode(&key),
            ),
        ] {
            append_secret(&root, label, &value);
        }
        Some(root)
    })
    .as_deref()
}

/// Appends `label<TAB>value` to `root/rust.secrets`.
fn append_secret(root: &Path, label: &str, value: &str) {
    assert!(
        !label.contains(['\t', '\n']) && !value.contains(['\t', '\n']),
        "one line per secret"
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("rust.secrets"))
        .expect("open rust.secrets");
    // One write per line: tests running at once append to the same file.
    f.write_all(format!("{label}\t{value}\n").as_bytes())
        .expect("write rust.secrets");
}

/// The test binary's name without cargo's hash suffix (`it`).
fn binary_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe.file_stem().unwrap_or_default().to_string_lossy();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem.into_owned(),
    }
}

/// Adds a credential a test hands to the daemon to `rust.secrets`, so
/// the secrets check looks for it in every log of the suite. Does nothing
/// without `Z4J_TEST_LOG_DIR`.
pub fn keep_secret(label: &str, value: &str) {
    if let Some(root) = log_root() {
        append_secret(root, label, value);
    }
}

/// Sends what the daemon code of this test binary logs, at TRACE, to
/// `$Z4J_TEST_LOG_DIR/rust/<binary>-<pid>.log` (once per binary; a test's
/// own `with_default`/`set_default` subscriber still takes precedence).
pub fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Some(root) = log_root() else { return };
        let path = root
            .join("rust")
            .join(format!("{}-{}.log", binary_name(), std::process::id()));
        let file = std::fs::File::create(&path).expect("create the test log file");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("z4j_agentd=trace"))
            .with_writer(Mutex::new(file))
            .with_ansi(false)
            .with_thread_names(true)
            .try_init();
    });
}

/// Keeps `text` (what a process printed) as
/// `$Z4J_TEST_LOG_DIR/rust/<binary>-<pid>-<n>-<name>.log`.
pub fn keep_log(name: &str, text: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let Some(root) = log_root() else { return };
    let n = N.fetch_add(1, Ordering::Relaxed) + 1;
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = root.join("rust").join(format!(
        "{}-{}-{n}-{name}.log",
        binary_name(),
        std::process::id()
    ));
    std::fs::write(&path, text).expect("write the kept log");
}

/// Keeps a finished command's stdout and stderr (see [`keep_log`]).
pub fn keep_output(name: &str, out: &std::process::Output) {
    keep_log(
        name,
        &format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
}

/// Reads the rest of an exited child's piped stderr, keeps it (see
/// [`keep_log`]) and returns it; empty if stderr was not piped or was
/// already taken.
pub fn keep_stderr(name: &str, child: &mut std::process::Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let mut bytes = Vec::new();
        err.read_to_end(&mut bytes)
            .expect("read the child's stderr");
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    keep_log(name, &text);
    text
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit, after
/// checking that the hard limit allows `needed` descriptors (`why` says
/// what the test opens, for the failure message).
pub fn raise_own_fd_limit(needed: u64, why: &str) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= needed,
        "{why}; the hard RLIMIT_NOFILE is {hard}, raise it to at least {needed} (ulimit -Hn)"
    );
    if lim.current.is_some_and(|soft| soft < hard) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .expect("raise the soft RLIMIT_NOFILE to the hard limit");
    }
}
