//! `z4j-agentd doctor`: checks, in order, everything between this host and
//! a working session with the brain, and says for each failure what caused
//! it and how to fix it.
//!
//! Probes: `config`, `buffer_path`, `socket`, `dns`, `tcp`, `tls`,
//! `websocket`, `clock`. The first failure stops the run; the probes after
//! it are listed as skipped. `warn` never stops the run and never fails it.
//!
//! The `websocket` probe is a real session: the upgrade with the token, the
//! `hello`, then a signed, empty `event_batch` that the brain must verify
//! and acknowledge with a frame we verify in turn. That proves the token
//! (4401 otherwise) and the HMAC secret (4403 otherwise) both ways. It uses
//! its own `worker_id` (`<daemon worker_id>-doctor`) so it never takes the
//! running daemon's slot, and it advertises the engines the daemon
//! advertises (the brain overwrites an agent's engines on every `hello`).
//!
//! The JSON schema of `--json` is documented in `docs/doctor.md`.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::Message;

use crate::admin::human_bytes;
use crate::config::{Config, ConfigError, HostEnv, Options};
use crate::protocol::{self, SessionBinding, Signer, Value, Verifier};
use crate::spool::path::{self as spool_path, PathError};
use crate::stats::Advertisement;
use crate::uplink::backoff::describe_close;
use crate::uplink::connect;

/// Time allowed for DNS, TCP and TLS each.
const NET_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the signed round trip after `hello_ack`.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for the running daemon to answer `stats`.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(3);
/// Below this much free space the spool cannot work.
const MIN_FREE_BYTES: u64 = 16 << 20;
/// Clock skew that earns a warning, and the brain's hard limit.
const WARN_SKEW_SECONDS: f64 = 30.0;
const FAIL_SKEW_SECONDS: f64 = crate::protocol::limits::MAX_CLOCK_SKEW_SECONDS as f64;
/// Certificates expiring sooner than this earn a warning.
const CERT_WARN_DAYS: i64 = 14;

/// A probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStatus {
    /// Passed.
    Ok,
    /// Passed, with something the operator should know.
    Warn,
    /// Failed: the daemon would not work as configured.
    Fail,
    /// Not run (an earlier probe failed, or not applicable).
    Skip,
}

impl ProbeStatus {
    /// Lowercase label used in `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeStatus::Ok => "ok",
            ProbeStatus::Warn => "warn",
            ProbeStatus::Fail => "fail",
            ProbeStatus::Skip => "skip",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            ProbeStatus::Ok => "[OK]  ",
            ProbeStatus::Warn => "[WARN]",
            ProbeStatus::Fail => "[FAIL]",
            ProbeStatus::Skip => "[SKIP]",
        }
    }
}

/// One probe's result.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Probe name (`config`, `buffer_path`, ...).
    pub name: &'static str,
    /// Outcome.
    pub status: ProbeStatus,
    /// What was found, specific to this host.
    pub message: String,
    /// What to do about it (failures and warnings).
    pub fix: Option<String>,
    /// Machine-readable facts.
    pub details: Value,
}

impl Probe {
    fn new(name: &'static str, status: ProbeStatus, message: impl Into<String>) -> Self {
        Probe {
            name,
            status,
            message: message.into(),
            fix: None,
            details: Value::empty_map(),
        }
    }

    fn ok(name: &'static str, message: impl Into<String>) -> Self {
        Probe::new(name, ProbeStatus::Ok, message)
    }

    fn warn(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Probe::new(name, ProbeStatus::Warn, message).with_fix(fix)
    }

    fn fail(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Probe::new(name, ProbeStatus::Fail, message).with_fix(fix)
    }

    fn skip(name: &'static str, message: impl Into<String>) -> Self {
        Probe::new(name, ProbeStatus::Skip, message)
    }

    fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    fn detail(mut self, key: &str, v: impl Into<Value>) -> Self {
        self.details.insert(key, v);
        self
    }

    fn to_value(&self) -> Value {
        let mut v = Value::empty_map();
        v.insert("name", self.name);
        v.insert("status", self.status.as_str());
        v.insert("message", self.message.as_str());
        v.insert(
            "fix",
            self.fix.clone().map(Value::from).unwrap_or(Value::Null),
        );
        v.insert("details", self.details.clone());
        v
    }
}

/// The probe names, in order.
pub const PROBES: [&str; 8] = [
    "config",
    "buffer_path",
    "socket",
    "dns",
    "tcp",
    "tls",
    "websocket",
    "clock",
];

/// The header: what the doctor checked.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Brain base URL.
    pub brain_url: Option<String>,
    /// The project: its id from `hello_ack` when the websocket probe ran,
    /// else the configured slug.
    pub project_id: Option<String>,
    /// Host label in the brain.
    pub agent_name: Option<String>,
    /// The daemon's worker slot.
    pub worker_id: Option<String>,
    /// The spool file.
    pub buffer_path: Option<String>,
    /// The local socket.
    pub socket_path: Option<String>,
    /// `websocket <url>`.
    pub transport: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was checked.
    pub header: Header,
    /// Every probe, in order, run or skipped.
    pub probes: Vec<Probe>,
}

impl Report {
    /// True when no probe failed.
    pub fn ok(&self) -> bool {
        self.probes.iter().all(|p| p.status != ProbeStatus::Fail)
    }

    /// The `--json` object.
    pub fn to_value(&self) -> Value {
        let opt = |v: &Option<String>| v.clone().map(Value::from).unwrap_or(Value::Null);
        let mut config = Value::empty_map();
        config.insert("brain_url", opt(&self.header.brain_url));
        config.insert("project_id", opt(&self.header.project_id));
        config.insert("agent_name", opt(&self.header.agent_name));
        config.insert("worker_id", opt(&self.header.worker_id));
        config.insert("buffer_path", opt(&self.header.buffer_path));
        config.insert("socket_path", opt(&self.header.socket_path));
        config.insert("transport", opt(&self.header.transport));
        let mut v = Value::empty_map();
        v.insert("ok", self.ok());
        v.insert("version", env!("CARGO_PKG_VERSION"));
        v.insert("config", config);
        v.insert(
            "probes",
            Value::Array(self.probes.iter().map(Probe::to_value).collect()),
        );
        v
    }

    /// The text report, in the shape of the z4j doctor.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let title = format!("z4j-agentd doctor {}", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(out, "{title}\n{}", "=".repeat(title.len()));
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unknown)".into());
        let h = &self.header;
        for (k, v) in [
            ("brain_url", show(&h.brain_url)),
            ("project_id", show(&h.project_id)),
            ("agent_name", show(&h.agent_name)),
            ("worker_id", show(&h.worker_id)),
            ("buffer_path", show(&h.buffer_path)),
            ("socket_path", show(&h.socket_path)),
            ("transport", show(&h.transport)),
        ] {
            let _ = writeln!(out, "  {:<13}{v}", format!("{k}:"));
        }
        out.push('\n');
        for p in &self.probes {
            let _ = writeln!(out, "  {} {:<12} {}", p.status.tag(), p.name, p.message);
            if let Some(fix) = &p.fix {
                let _ = writeln!(out, "  {:<6} {:<12} fix: {fix}", "", "");
            }
        }
        out.push('\n');
        let failed: Vec<&str> = self
            .probes
            .iter()
            .filter(|p| p.status == ProbeStatus::Fail)
            .map(|p| p.name)
            .collect();
        if failed.is_empty() {
            let warns = self
                .probes
                .iter()
                .filter(|p| p.status == ProbeStatus::Warn)
                .count();
            let _ = writeln!(
                out,
                "all checks passed{}",
                if warns > 0 {
                    format!(" ({warns} warning(s) above)")
                } else {
                    String::new()
                }
            );
        } else {
            let _ = writeln!(out, "failed: {}", failed.join(", "));
        }
        out
    }
}

/// What the running daemon told us over its socket.
#[derive(Debug, Clone, Default)]
struct DaemonView {
    /// What its `hello` advertises to the brain.
    advertised: Option<Advertisement>,
}

/// Runs every probe. `websocket = false` is `--no-websocket`.
pub async fn run(options: &Options, host: HostEnv, websocket: bool) -> Report {
    let peek = options.peek();
    let mut header = Header {
        brain_url: peek.brain_url.clone(),
        project_id: peek.project_id.clone(),
        agent_name: peek.agent_name.clone(),
        buffer_path: peek.buffer_path.as_ref().map(|p| p.display().to_string()),
        socket_path: peek.socket_path.as_ref().map(|p| p.display().to_string()),
        ..Header::default()
    };
    let mut probes = Vec::new();
    let config = match options.resolve(host.clone()) {
        Ok(c) => c,
        Err(e) => {
            probes.push(config_failure(&e));
            return finish(header, probes);
        }
    };
    header.brain_url = Some(config.uplink.endpoint.base_url.clone());
    header.project_id = config.project_id.clone();
    header.agent_name = Some(config.uplink.agent_name.clone());
    header.worker_id = Some(config.uplink.worker_id.clone());
    header.transport = Some(format!("websocket {}", config.uplink.endpoint.ws_url));
    let socket_path = config
        .socket_path
        .clone()
        .unwrap_or_else(|| crate::ingest::client_socket_path(&config.host));
    header.socket_path = Some(socket_path.display().to_string());
    probes.push(config_ok(&config));

    let buffer = probe_buffer(&config);
    header.buffer_path = buffer.1.clone().or(header.buffer_path);
    if !push(&mut probes, buffer.0) {
        return finish(header, probes);
    }
    let (socket, daemon) = probe_socket(&config, &socket_path).await;
    if !push(&mut probes, socket) {
        return finish(header, probes);
    }
    let (dns, addrs) = probe_dns(&config).await;
    if !push(&mut probes, dns) {
        return finish(header, probes);
    }
    let (tcp, reached) = probe_tcp(&config, &addrs).await;
    if !push(&mut probes, tcp) {
        return finish(header, probes);
    }
    if !push(&mut probes, probe_tls(&config, reached).await) {
        return finish(header, probes);
    }
    if !websocket {
        probes.push(Probe::skip(
            "websocket",
            "skipped (--no-websocket): the token and the HMAC secret were not checked",
        ));
        probes.push(Probe::skip(
            "clock",
            "skipped (--no-websocket): the brain's clock is read from its hello_ack",
        ));
        return finish(header, probes);
    }
    let (ws, ack) = probe_websocket(&config, &daemon).await;
    if let Some(a) = &ack {
        header.project_id = Some(a.project_id.clone());
    }
    if !push(&mut probes, ws) {
        return finish(header, probes);
    }
    probes.push(probe_clock(ack.as_ref().and_then(|a| a.clock_skew_seconds)));
    finish(header, probes)
}

/// Adds `p`; false when it failed (the run stops).
fn push(probes: &mut Vec<Probe>, p: Probe) -> bool {
    let go_on = p.status != ProbeStatus::Fail;
    probes.push(p);
    go_on
}

fn finish(header: Header, mut probes: Vec<Probe>) -> Report {
    let failed = probes
        .iter()
        .find(|p| p.status == ProbeStatus::Fail)
        .map(|p| p.name);
    for name in PROBES {
        if !probes.iter().any(|p| p.name == name) {
            let why = match failed {
                Some(f) => format!("skipped: `{f}` failed"),
                None => "skipped".to_string(),
            };
            probes.push(Probe::skip(name, why));
        }
    }
    Report { header, probes }
}

// ------------------------------------------------------------------ config

fn config_failure(e: &ConfigError) -> Probe {
    Probe::fail(
        "config",
        format!("{}: {}", e.key, e.message),
        format!(
            "set {} correctly (as a flag, in the environment, or in the Z4J_CONFIG file) and run the doctor again with the service's environment",
            e.key
        ),
    )
    .detail("key", e.key)
}

fn config_ok(c: &Config) -> Probe {
    Probe::ok(
        "config",
        format!(
            "configuration is valid (brain {}, worker_id {}, token and HMAC secret present)",
            c.uplink.endpoint.base_url, c.uplink.worker_id
        ),
    )
    .detail("brain_url", c.uplink.endpoint.base_url.as_str())
    .detail("worker_id", c.uplink.worker_id.as_str())
    .detail("dev_mode", c.dev_mode)
}

// ------------------------------------------------------------ buffer_path

fn path_fix(e: &PathError, uid: u32) -> String {
    match e {
        PathError::Relative(..) | PathError::OutsideRoots { .. } => {
            "set Z4J_BUFFER_PATH to an absolute path under one of the allowed roots, or unset it to use the default".into()
        }
        PathError::GroupWritable { dir, .. } => format!("chmod 700 {dir}"),
        PathError::OtherOwner { dir, .. } => format!(
            "chown {uid} {dir} (the user the daemon runs as), or set Z4J_BUFFER_PATH to a file in a directory that user owns"
        ),
        PathError::NotADirectory(_) => {
            "point Z4J_BUFFER_PATH at a file inside a real directory (no symlinks on the way)".into()
        }
        PathError::Unusable { dir, .. } => format!(
            "create {dir} as the daemon's user (install -d -m 0700 -o {uid} {dir}), or set Z4J_BUFFER_PATH (StateDirectory= under systemd)"
        ),
    }
}

/// Returns the probe and the spool path it resolved.
fn probe_buffer(c: &Config) -> (Probe, Option<String>) {
    const NAME: &str = "buffer_path";
    let uid = c.host.uid;
    let loc = match spool_path::resolve(c.buffer_path.as_deref(), &c.host) {
        Ok(l) => l,
        Err(e) => {
            let fix = path_fix(&e, uid);
            return (
                Probe::fail(NAME, e.to_string(), fix).detail("uid", uid as u64),
                None,
            );
        }
    };
    let path_text = loc.path.display().to_string();
    let dir = loc.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let dir_text = dir.display().to_string();
    let done = |p: Probe| (p, Some(path_text.clone()));

    // Writable: the same probe the spool's first commit would need.
    let probe_file = dir.join(format!(".z4j-agentd-doctor-{}", std::process::id()));
    if let Err(e) = fs::write(&probe_file, b"").and_then(|()| fs::remove_file(&probe_file)) {
        return done(
            Probe::fail(
                NAME,
                format!("buffer dir {dir_text} is not writable by uid {uid}: {e}"),
                format!(
                    "chown {uid} {dir_text} && chmod 700 {dir_text}, or set Z4J_BUFFER_PATH to a file in a directory uid {uid} owns"
                ),
            )
            .detail("path", path_text.as_str())
            .detail("uid", uid as u64),
        );
    }

    let mut details = Value::empty_map();
    details.insert("path", path_text.as_str());
    details.insert("uid", uid as u64);
    // The spool file itself, when it exists, must be ours and writable.
    let mut spool_bytes = 0u64;
    match fs::metadata(&loc.path) {
        Ok(m) => {
            spool_bytes = m.len();
            details.insert("spool_exists", true);
            details.insert("spool_mode", format!("{:04o}", m.mode() & 0o7777));
            if m.uid() != uid {
                return done(Probe {
                    details,
                    ..Probe::fail(
                        NAME,
                        format!(
                            "spool {path_text} belongs to uid {}, not to uid {uid} that runs this check",
                            m.uid()
                        ),
                        format!(
                            "run the doctor as the daemon's user, or chown {uid} {path_text} {path_text}-wal {path_text}-shm"
                        ),
                    )
                });
            }
            if let Err(e) = fs::OpenOptions::new().append(true).open(&loc.path) {
                return done(Probe {
                    details,
                    ..Probe::fail(
                        NAME,
                        format!("spool {path_text} cannot be opened for writing: {e}"),
                        format!("chmod 600 {path_text}"),
                    )
                });
            }
        }
        Err(_) => {
            details.insert("spool_exists", false);
        }
    }
    let lock_holder = read_lock_holder(&loc.path);
    if let Some(pid) = lock_holder {
        details.insert("locked_by_pid", pid as u64);
    }
    let free = match rustix::fs::statvfs(&dir) {
        Ok(st) => Some(st.f_bavail.saturating_mul(st.f_frsize)),
        Err(_) => None,
    };
    if let Some(f) = free {
        details.insert("free_bytes", f);
    }
    let in_use = lock_holder
        .map(|pid| format!("; in use by the running daemon (pid {pid})"))
        .unwrap_or_default();
    if let Some(f) = free {
        if f < MIN_FREE_BYTES {
            return done(Probe {
                details,
                ..Probe::fail(
                    NAME,
                    format!(
                        "only {} free on the filesystem of {dir_text}; the spool cannot store events",
                        human_bytes(f)
                    ),
                    "free space on that filesystem, or move the spool (Z4J_BUFFER_PATH) to one with room",
                )
            });
        }
    }
    if let Some(from) = &loc.fell_back_from {
        let from_dir = from
            .parent()
            .unwrap_or(Path::new("/"))
            .display()
            .to_string();
        details.insert("fell_back_from", from.display().to_string());
        return done(Probe {
            details,
            ..Probe::warn(
                NAME,
                format!(
                    "buffer dir {from_dir} is not writable by uid {uid}; the daemon would use {path_text} instead, which may not survive a reboot{in_use}"
                ),
                format!(
                    "create {from_dir} owned by uid {uid} (install -d -m 0700 -o {uid} {from_dir}), or set Z4J_HOME / Z4J_BUFFER_PATH (StateDirectory= under systemd)"
                ),
            )
        });
    }
    let headroom = c.buffer_max_bytes.saturating_sub(spool_bytes);
    if let Some(f) = free {
        if f < headroom {
            return done(Probe {
                details,
                ..Probe::warn(
                    NAME,
                    format!(
                        "buffer dir {dir_text} is writable, but only {} is free while the spool may grow by {} (Z4J_BUFFER_MAX_BYTES){in_use}",
                        human_bytes(f),
                        human_bytes(headroom)
                    ),
                    "free space there, or lower Z4J_BUFFER_MAX_BYTES below the free space",
                )
            });
        }
    }
    let free_text = free
        .map(|f| format!(" ({} free)", human_bytes(f)))
        .unwrap_or_default();
    done(Probe {
        details,
        ..Probe::ok(
            NAME,
            format!("buffer dir {dir_text} is writable{free_text}{in_use}"),
        )
    })
}

/// The pid in `<spool>.lock` when that process is alive.
fn read_lock_holder(spool: &Path) -> Option<u32> {
    let mut lock = spool.as_os_str().to_owned();
    lock.push(".lock");
    let text = fs::read_to_string(PathBuf::from(lock)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

// ------------------------------------------------------------------ socket

async fn ask_daemon(path: &Path) -> Result<Value, crate::client::ClientError> {
    let mut c = crate::client::Client::connect(path).await?;
    c.stats().await
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

async fn probe_socket(c: &Config, path: &Path) -> (Probe, DaemonView) {
    const NAME: &str = "socket";
    let text = path.display().to_string();
    let uid = c.host.uid;
    let meta = fs::symlink_metadata(path).ok();
    let mut base = Value::empty_map();
    base.insert("path", text.as_str());
    if let Some(m) = &meta {
        base.insert("mode", format!("{:04o}", m.mode() & 0o7777));
        base.insert("owner_uid", m.uid() as u64);
        base.insert("owner_gid", m.gid() as u64);
    }
    let with = |p: Probe, extra: Value| -> Probe {
        let mut details = base.clone();
        if let Value::Map(m) = extra {
            for (k, v) in m {
                details.insert(&k, v);
            }
        }
        Probe { details, ..p }
    };
    match tokio::time::timeout(DAEMON_TIMEOUT, ask_daemon(path)).await {
        Ok(Ok(stats)) => {
            let s = |k: &str| stats.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
            let mut extra = Value::empty_map();
            extra.insert("daemon_version", s("version"));
            extra.insert("daemon_pid", n("pid"));
            extra.insert("spool_depth", n("spool_depth"));
            extra.insert("uplink_state", s("uplink_state"));
            extra.insert("other_clients", n("clients").saturating_sub(1));
            // What the daemon advertises once its hello catches up with its
            // clients: the doctor's hello must not take anything away.
            let mut capabilities = std::collections::BTreeMap::new();
            if let Some(Value::Map(m)) = stats.get("capabilities") {
                for (engine, actions) in m {
                    capabilities.insert(engine.clone(), strings(Some(actions)));
                }
            }
            let view = DaemonView {
                advertised: Some(Advertisement {
                    engines: strings(stats.get("engines")),
                    capabilities,
                    runtime_features: strings(stats.get("runtime_features")),
                }),
            };
            // The doctor's own connection is one of the clients.
            let others = n("clients").saturating_sub(1);
            let mode = meta
                .as_ref()
                .map(|m| format!(" (mode {:04o})", m.mode() & 0o7777))
                .unwrap_or_default();
            let summary = format!(
                "z4j-agentd {} (pid {}) answers on {text}{mode}: spool {} events, brain {}, {others} other client(s)",
                s("version"),
                n("pid"),
                n("spool_depth"),
                s("uplink_state"),
            );
            let theirs = s("brain_url");
            if theirs != c.uplink.endpoint.base_url || s("worker_id") != c.uplink.worker_id {
                return (
                    with(
                        Probe::warn(
                            NAME,
                            format!(
                                "{summary}; but it uses brain {theirs} as worker_id {}, while this configuration says {} as {}",
                                s("worker_id"),
                                c.uplink.endpoint.base_url,
                                c.uplink.worker_id
                            ),
                            "run the doctor as the service's user with the service's environment, config file and credentials (see \"Run the doctor first\" in docs/troubleshooting.md), so it checks what the daemon uses",
                        ),
                        extra,
                    ),
                    view,
                );
            }
            (with(Probe::ok(NAME, summary), extra), view)
        }
        Ok(Err(crate::client::ClientError::Io(e))) => {
            (socket_io_failure(path, &text, meta, uid, e, &with), DaemonView::default())
        }
        Ok(Err(e)) => (
            with(
                Probe::fail(
                    NAME,
                    format!("something answers on {text}, but not as z4j-agentd: {e}"),
                    "another program owns that path: stop it, or give z4j-agentd its own Z4J_SOCKET_PATH (and tell the applications)",
                ),
                Value::empty_map(),
            ),
            DaemonView::default(),
        ),
        Err(_) => (
            with(
                Probe::fail(
                    NAME,
                    format!(
                        "a process accepts connections on {text} but did not answer within {}s",
                        DAEMON_TIMEOUT.as_secs()
                    ),
                    "the daemon may be stuck: check its log (journalctl -u z4j-agentd) and restart it",
                ),
                Value::empty_map(),
            ),
            DaemonView::default(),
        ),
    }
}

fn socket_io_failure(
    path: &Path,
    text: &str,
    meta: Option<fs::Metadata>,
    uid: u32,
    e: io::Error,
    with: &dyn Fn(Probe, Value) -> Probe,
) -> Probe {
    const NAME: &str = "socket";
    let start = "start the daemon (systemctl start z4j-agentd, or z4j-agentd run)";
    match (e.kind(), &meta) {
        (io::ErrorKind::PermissionDenied, None) => with(
            Probe::fail(
                NAME,
                format!("uid {uid} cannot reach {text}: a directory on the way is not searchable ({e})"),
                "run the doctor as the daemon's user or a member of its group; applications need the same access to the socket's directory",
            ),
            Value::empty_map(),
        ),
        (io::ErrorKind::PermissionDenied, Some(m)) => with(
            Probe::fail(
                NAME,
                format!(
                    "{text} exists (mode {:04o}, owner {}:{}) but uid {uid} may not connect to it: {e}",
                    m.mode() & 0o777,
                    m.uid(),
                    m.gid()
                ),
                format!(
                    "add this user to the socket's group (usermod -aG <group of gid {}> <user>, then log in again), or run the doctor as the daemon's user; applications need the same access",
                    m.gid()
                ),
            ),
            Value::empty_map(),
        ),
        (io::ErrorKind::ConnectionRefused, Some(m)) if m.file_type().is_socket() => with(
            Probe::warn(
                NAME,
                format!("no daemon listens on {text} (a socket file from an earlier run is left; `run` replaces it)"),
                start,
            ),
            Value::empty_map(),
        ),
        (_, Some(m)) if !m.file_type().is_socket() => with(
            Probe::fail(
                NAME,
                format!("{text} exists and is not a socket; `run` would refuse to replace it"),
                format!("remove {text} or set Z4J_SOCKET_PATH to another path"),
            ),
            Value::empty_map(),
        ),
        (io::ErrorKind::NotFound, None) => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            let dir_text = dir.display().to_string();
            // `run` creates missing directories: the nearest existing one must be writable.
            let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
            let probe = existing.join(format!(".z4j-agentd-doctor-{}", std::process::id()));
            let creatable = fs::write(&probe, b"")
                .and_then(|()| fs::remove_file(&probe))
                .map_err(|e| format!("{}: {e}", existing.display()));
            match creatable {
                Ok(()) => with(
                    Probe::warn(
                        NAME,
                        format!("no daemon is running: nothing listens on {text} (the path is usable, so `run` can bind it)"),
                        start,
                    ),
                    Value::empty_map(),
                ),
                Err(why) => with(
                    Probe::fail(
                        NAME,
                        format!("`run` could not create {text}: directory {dir_text} is not usable by uid {uid} ({why})"),
                        format!(
                            "create {dir_text} for uid {uid} (RuntimeDirectory=z4j-agentd under systemd gives /run/z4j-agentd), or set Z4J_SOCKET_PATH to a path in a directory this user can write"
                        ),
                    ),
                    Value::empty_map(),
                ),
            }
        }
        _ => with(
            Probe::fail(
                NAME,
                format!("cannot connect to {text}: {e}"),
                start,
            ),
            Value::empty_map(),
        ),
    }
}

// --------------------------------------------------------------- dns / tcp

fn brain_port(c: &Config) -> u16 {
    url::Url::parse(&c.uplink.endpoint.ws_url)
        .ok()
        .and_then(|u| u.port_or_known_default())
        .unwrap_or(if c.uplink.endpoint.tls { 443 } else { 80 })
}

fn bare_host(c: &Config) -> String {
    c.uplink
        .endpoint
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

async fn probe_dns(c: &Config) -> (Probe, Vec<SocketAddr>) {
    const NAME: &str = "dns";
    let host = bare_host(c);
    let port = brain_port(c);
    let lookup =
        tokio::time::timeout(NET_TIMEOUT, tokio::net::lookup_host((host.clone(), port))).await;
    match lookup {
        Ok(Ok(addrs)) => {
            let mut addrs: Vec<SocketAddr> = addrs.collect();
            addrs.dedup();
            let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            if addrs.is_empty() {
                return (
                    Probe::fail(
                        NAME,
                        format!("{host} resolves to no address"),
                        "check the host name in Z4J_BRAIN_URL and the DNS records",
                    ),
                    addrs,
                );
            }
            let p = Probe::ok(NAME, format!("{host} -> {}", ips.join(", ")))
                .detail("host", host.as_str())
                .detail(
                    "addresses",
                    Value::Array(ips.iter().map(|i| Value::from(i.as_str())).collect()),
                );
            (p, addrs)
        }
        Ok(Err(e)) => (
            Probe::fail(
                NAME,
                format!("DNS lookup for {host:?} failed: {e}"),
                "check the host name in Z4J_BRAIN_URL and this host's resolver (/etc/resolv.conf, /etc/hosts)",
            )
            .detail("host", host.as_str()),
            Vec::new(),
        ),
        Err(_) => (
            Probe::fail(
                NAME,
                format!(
                    "DNS lookup for {host:?} did not finish within {}s",
                    NET_TIMEOUT.as_secs()
                ),
                "check this host's resolver (/etc/resolv.conf) and that the DNS servers are reachable",
            )
            .detail("host", host.as_str()),
            Vec::new(),
        ),
    }
}

/// Returns the probe and the address that answered.
async fn probe_tcp(c: &Config, addrs: &[SocketAddr]) -> (Probe, Option<SocketAddr>) {
    const NAME: &str = "tcp";
    let host = bare_host(c);
    let port = brain_port(c);
    let mut errors = Vec::new();
    for addr in addrs {
        let started = Instant::now();
        match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let p = Probe::ok(
                    NAME,
                    format!("TCP connect to {host}:{port} ({}) in {ms:.1} ms", addr.ip()),
                )
                .detail("host", host.as_str())
                .detail("port", port as u64)
                .detail("address", addr.to_string())
                .detail("connect_ms", (ms * 10.0).round() / 10.0);
                return (p, Some(*addr));
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!(
                "{addr}: timed out after {}s",
                NET_TIMEOUT.as_secs()
            )),
        }
    }
    let p = Probe::fail(
        NAME,
        format!("TCP connect to {host}:{port} failed: {}", errors.join("; ")),
        format!(
            "is the brain running and listening on port {port}? Check Z4J_BRAIN_URL, and firewalls or proxies between this host and the brain"
        ),
    )
    .detail("host", host.as_str())
    .detail("port", port as u64);
    (p, None)
}

// --------------------------------------------------------------------- tls

async fn probe_tls(c: &Config, reached: Option<SocketAddr>) -> Probe {
    const NAME: &str = "tls";
    if !c.uplink.endpoint.tls {
        return Probe::skip(
            NAME,
            format!(
                "{} is plain ws:// (allowed for loopback or dev mode): no TLS to check",
                c.uplink.endpoint.base_url
            ),
        );
    }
    let host = bare_host(c);
    let port = brain_port(c);
    let ca_file = c.uplink.ca_file.clone();
    let Some(addr) = reached else {
        return Probe::fail(NAME, "no address to connect to", "see the tcp probe");
    };
    let h = host.clone();
    let result = tokio::task::spawn_blocking(move || tls_handshake(addr, &h, ca_file.as_deref()))
        .await
        .unwrap_or_else(|e| Err(TlsFailure::Other(format!("the TLS check stopped: {e}"))));
    match result {
        Ok(info) => {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let days = (info.not_after - now).div_euclid(86_400);
            let until = OffsetDateTime::from_unix_timestamp(info.not_after)
                .map(protocol::format_ts)
                .unwrap_or_default();
            let msg = format!(
                "{} to {host}:{port}: certificate for {} issued by {}, valid until {until} ({days} days), trusted",
                info.version, info.subject, info.issuer
            );
            let p = if days < CERT_WARN_DAYS {
                Probe::warn(
                    NAME,
                    msg,
                    "renew the brain's certificate before it expires; after that every connection fails",
                )
            } else {
                Probe::ok(NAME, msg)
            };
            p.detail("version", info.version.as_str())
                .detail("subject", info.subject.as_str())
                .detail("issuer", info.issuer.as_str())
                .detail("not_after", until)
                .detail("days_left", days)
        }
        Err(TlsFailure::Certificate(e)) => {
            use rustls::CertificateError as C;
            let (what, fix) = match &e {
                C::UnknownIssuer | C::BadSignature => (
                    "is not signed by a CA this host trusts".to_string(),
                    "if the brain uses a private CA, set Z4J_CA_FILE to its PEM certificate; otherwise install the CA in the system trust store (update-ca-certificates)".to_string(),
                ),
                C::Expired | C::ExpiredContext { .. } => (
                    "has expired".to_string(),
                    "renew the brain's certificate (and check this host's clock)".to_string(),
                ),
                C::NotValidYet | C::NotValidYetContext { .. } => (
                    "is not valid yet".to_string(),
                    "check this host's clock (timedatectl), or the certificate's start date".to_string(),
                ),
                C::NotValidForName | C::NotValidForNameContext { .. } => (
                    format!("is not valid for the name {host}"),
                    format!("use the host name the certificate was issued for in Z4J_BRAIN_URL, or reissue the certificate with {host} in its subjectAltName"),
                ),
                C::Revoked => (
                    "was revoked".to_string(),
                    "install a new certificate on the brain".to_string(),
                ),
                _ => (
                    format!("was refused ({e:?})"),
                    "check the brain's certificate chain, or set Z4J_CA_FILE for a private CA".to_string(),
                ),
            };
            Probe::fail(
                NAME,
                format!("the certificate of {host}:{port} {what}"),
                fix,
            )
            .detail("error", format!("{e:?}"))
        }
        Err(TlsFailure::Other(e)) => Probe::fail(
            NAME,
            format!("TLS handshake with {host}:{port} failed: {e}"),
            format!(
                "check that port {port} serves TLS (an http:// brain needs Z4J_BRAIN_URL=http://...), and any proxy in between"
            ),
        ),
    }
}

enum TlsFailure {
    Certificate(rustls::CertificateError),
    Other(String),
}

struct TlsInfo {
    version: String,
    subject: String,
    issuer: String,
    not_after: i64,
}

fn tls_handshake(
    addr: SocketAddr,
    host: &str,
    ca_file: Option<&Path>,
) -> Result<TlsInfo, TlsFailure> {
    let config = connect::tls_config(ca_file).map_err(TlsFailure::Other)?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| TlsFailure::Other(format!("{host:?} is not a valid TLS name: {e}")))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, NET_TIMEOUT)
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    let _ = sock.set_read_timeout(Some(NET_TIMEOUT));
    let _ = sock.set_write_timeout(Some(NET_TIMEOUT));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            let inner = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .cloned();
            return Err(match inner {
                Some(rustls::Error::InvalidCertificate(c)) => TlsFailure::Certificate(c),
                Some(other) => TlsFailure::Other(other.to_string()),
                None => TlsFailure::Other(e.to_string()),
            });
        }
    }
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    };
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| TlsFailure::Other("the brain sent no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsFailure::Other(format!("cannot read the brain's certificate: {e}")))?;
    let cn = |n: &x509_parser::x509::X509Name| {
        n.iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(|s| format!("CN={s}"))
            .unwrap_or_else(|| n.to_string())
    };
    Ok(TlsInfo {
        version,
        subject: cn(cert.subject()),
        issuer: cn(cert.issuer()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

// --------------------------------------------------------------- websocket

fn doctor_worker_id(worker_id: &str) -> String {
    const SUFFIX: &str = "-doctor";
    let mut base = worker_id.to_string();
    while base.len() + SUFFIX.len() > 128 {
        base.pop();
    }
    base + SUFFIX
}

fn close_failure(code: u16, skew: Option<f64>, after_hello: bool) -> (String, String) {
    match code {
        4401 => (
            "the brain refused the token (close 4401): it is wrong, revoked, or from another brain or project".into(),
            "mint a new agent token in the brain (dashboard, or POST /api/v1/projects/<slug>/agents) and put it in Z4J_TOKEN_FILE (or Z4J_TOKEN); tokens cannot be recovered".into(),
        ),
        4403 if !after_hello => (
            "the brain refused this host's IP address (close 4403 before the hello)".into(),
            "add this host's address to the brain's Z4J_AGENT_IP_ALLOWLIST".into(),
        ),
        4403 => match skew {
            Some(s) if s.abs() > FAIL_SKEW_SECONDS => (
                format!("the brain refused the signed frame (close 4403): this host's clock is {s:.0} s away from the brain's, beyond the 60 s the brain allows"),
                "fix time synchronisation on this host or the brain (timedatectl set-ntp true, chrony)".into(),
            ),
            _ => (
                "the brain refused the signed frame (close 4403): the HMAC secret does not match this project".into(),
                "copy the project's hmac_secret (returned when the agent was minted; every agent of a project shares it) into Z4J_HMAC_SECRET_FILE (or Z4J_HMAC_SECRET); if the brain's Z4J_SECRET changed, mint a new token and secret".into(),
            ),
        },
        4003 => (
            "the brain closed the session (4003): the agent was revoked or its project archived".into(),
            "mint a new agent in an active project and update Z4J_TOKEN_FILE and Z4J_HMAC_SECRET_FILE".into(),
        ),
        4426 | 4427 => (
            format!("the brain refused the protocol version (close {code})"),
            "upgrade z4j-agentd or the brain so both speak protocol 2".into(),
        ),
        4429 => (
            "the brain rate-limited the connection or the agent has 64 worker slots in use (close 4429)".into(),
            "wait a minute and try again; if it persists, check how many processes share this agent token".into(),
        ),
        4002 => (
            "another doctor took the doctor's slot while it ran (close 4002)".into(),
            "run one doctor at a time".into(),
        ),
        _ => (
            format!("the brain closed the connection with {code}: {}", describe_close(code)),
            "check the brain's log around this time for the reason".into(),
        ),
    }
}

async fn probe_websocket(c: &Config, daemon: &DaemonView) -> (Probe, Option<connect::HelloAck>) {
    const NAME: &str = "websocket";
    let settings = &c.uplink;
    let worker_id = doctor_worker_id(&settings.worker_id);
    // Advertise what the daemon advertises: every hello overwrites the
    // agent's engines and capabilities at the brain.
    let advertised = daemon.advertised.clone().unwrap_or_else(|| {
        crate::stats::Stats::new()
            .advertisement(&settings.static_engines, &settings.static_capabilities)
    });
    let started = Instant::now();
    let mut ws = match connect::open(settings).await {
        Ok(ws) => ws,
        Err(f) => {
            return (
                Probe::fail(
                    NAME,
                    f.error,
                    "check that Z4J_BRAIN_URL is the brain's base URL and that any proxy passes WebSocket upgrades (Upgrade and Connection headers)",
                ),
                None,
            )
        }
    };
    let ack = match connect::handshake(
        &mut ws,
        settings,
        &worker_id,
        &advertised,
        OffsetDateTime::now_utc(),
    )
    .await
    {
        Ok(a) => a,
        Err(f) => {
            let (msg, fix) = match f.close_code {
                Some(code) => close_failure(code, None, false),
                None => (
                    f.error,
                    "check the brain's log; the URL must point at a z4j brain (the path /ws/agent is added)".into(),
                ),
            };
            let mut p = Probe::fail(NAME, msg, fix).detail("worker_id", worker_id.as_str());
            if let Some(code) = f.close_code {
                p = p.detail("close_code", code as u64);
            }
            return (p, None);
        }
    };
    let handshake_ms = started.elapsed().as_secs_f64() * 1000.0;
    let binding = SessionBinding::new(
        ack.agent_id.clone(),
        ack.project_id.clone(),
        ack.session_id.clone(),
    );
    let mut signer = Signer::new(settings.key.clone(), binding.clone());
    let mut verifier = Verifier::new(settings.key.clone(), binding);
    let frame_id = protocol::new_frame_id("ev_");
    let mut payload = Vec::new();
    protocol::event_batch_payload::<&[u8]>(&[], &mut payload);
    let frame = signer.sign(
        protocol::frames::TYPE_EVENT_BATCH,
        &frame_id,
        &payload,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let sent = Instant::now();
    let details = |p: Probe| {
        p.detail("worker_id", worker_id.as_str())
            .detail("agent_id", ack.agent_id.as_str())
            .detail("project_id", ack.project_id.as_str())
            .detail("session_id", ack.session_id.as_str())
            .detail("brain_version", ack.brain_version.as_str())
            .detail("engines", advertised.engines_value())
            .detail("capabilities", advertised.capabilities_value())
            .detail("handshake_ms", (handshake_ms * 10.0).round() / 10.0)
    };
    if let Err(e) = ws.send(Message::binary(frame)).await {
        return (
            details(Probe::fail(
                NAME,
                format!("sending the signed frame failed: {e}"),
                "check the brain's log and any proxy in between",
            )),
            Some(ack),
        );
    }
    let skew = ack.clock_skew_seconds;
    let mut pushed_commands = 0u64;
    let outcome: Result<(), (String, String, Option<u16>)> =
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, async {
            loop {
                let bytes = match ws.next().await {
                    None => {
                        return Err((
                            "the brain closed the connection after the signed frame without a close code".to_string(),
                            "check the brain's log".to_string(),
                            None,
                        ))
                    }
                    Some(Err(e)) => {
                        return Err((
                            format!("the connection failed after the signed frame: {e}"),
                            "check the brain's log and any proxy in between".to_string(),
                            None,
                        ))
                    }
                    Some(Ok(Message::Close(f))) => {
                        let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                        let (m, fix) = close_failure(code, skew, true);
                        return Err((m, fix, Some(code)));
                    }
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(_)) => continue,
                };
                let inbound = verifier
                    .verify(&bytes, OffsetDateTime::now_utc())
                    .map_err(|e| {
                        (
                            format!("a frame from the brain failed verification: {e}"),
                            "the brain signs with the project's secret: check Z4J_HMAC_SECRET_FILE holds this project's hmac_secret, and this host's clock".to_string(),
                            None,
                        )
                    })?;
                match inbound.frame_type.as_str() {
                    "event_batch_ack"
                        if inbound.payload.get("acked_id").and_then(Value::as_str)
                            == Some(frame_id.as_str()) =>
                    {
                        return Ok(())
                    }
                    // Pending commands are pushed to every new connection; the
                    // doctor leaves them for the daemon and the brain's timeout.
                    "command" => pushed_commands += 1,
                    _ => {}
                }
            }
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err((
                format!(
                    "the brain accepted the handshake but did not acknowledge a signed frame within {}s",
                    ROUND_TRIP_TIMEOUT.as_secs()
                ),
                "the brain may be overloaded or its database locked: check its log and CPU".to_string(),
                None,
            )),
        };
    let round_trip_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let _ = ws.close(None).await;
    match outcome {
        Ok(()) => (
            details(Probe::ok(
                NAME,
                format!(
                    "token accepted and HMAC secret verified both ways: signed round trip with brain {} in {round_trip_ms:.0} ms (own slot worker_id {worker_id}; the daemon's slot is untouched)",
                    ack.brain_version
                ),
            ))
            .detail("round_trip_ms", (round_trip_ms * 10.0).round() / 10.0)
            .detail("commands_left_for_the_daemon", pushed_commands),
            Some(ack),
        ),
        Err((msg, fix, code)) => {
            let mut p = details(Probe::fail(NAME, msg, fix));
            if let Some(code) = code {
                p = p.detail("close_code", code as u64);
            }
            (p, Some(ack))
        }
    }
}

// ------------------------------------------------------------------- clock

fn probe_clock(skew: Option<f64>) -> Probe {
    const NAME: &str = "clock";
    let Some(s) = skew else {
        return Probe::warn(
            NAME,
            "the brain's hello_ack carried no readable time; the clock was not checked",
            "check time synchronisation on this host (timedatectl)",
        );
    };
    let side = if s >= 0.0 { "behind" } else { "ahead of" };
    let text = format!("this host's clock is {:.1} s {side} the brain's", s.abs());
    let p = if s.abs() > FAIL_SKEW_SECONDS {
        Probe::fail(
            NAME,
            format!("{text}; beyond 60 s the brain refuses every signed frame"),
            "fix time synchronisation on this host or the brain (timedatectl set-ntp true, chrony)",
        )
    } else if s.abs() > WARN_SKEW_SECONDS {
        Probe::warn(
            NAME,
            format!("{text}; past 60 s the brain refuses every signed frame"),
            "fix time synchronisation on this host or the brain (timedatectl set-ntp true, chrony)",
        )
    } else {
        Probe::ok(NAME, format!("{text} (limit 60 s)"))
    };
    p.detail("skew_seconds", (s * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_skips_every_later_probe() {
        let r = finish(
            Header::default(),
            vec![
                Probe::ok("config", "fine"),
                Probe::fail("buffer_path", "no", "do this"),
            ],
        );
        let names: Vec<&str> = r.probes.iter().map(|p| p.name).collect();
        assert_eq!(names, PROBES);
        assert!(!r.ok());
        assert!(r.probes[2..]
            .iter()
            .all(|p| p.status == ProbeStatus::Skip && p.message.contains("`buffer_path` failed")));
    }

    #[test]
    fn warnings_do_not_fail_the_run() {
        let r = finish(
            Header::default(),
            PROBES
                .iter()
                .map(|n| Probe::warn(n, "hmm", "maybe"))
                .collect(),
        );
        assert!(r.ok());
        assert!(r
            .to_text()
            .contains("all checks passed (8 warning(s) above)"));
    }

    #[test]
    fn json_follows_the_schema() {
        let r = finish(
            Header {
                brain_url: Some("http://127.0.0.1:7700".into()),
                ..Header::default()
            },
            vec![Probe::fail("config", "Z4J_TOKEN: is required", "set it")
                .detail("key", "Z4J_TOKEN")],
        );
        let v = r.to_value();
        assert_eq!(v.get("ok"), Some(&Value::Bool(false)));
        let Some(Value::Array(probes)) = v.get("probes") else {
            panic!("probes is a list")
        };
        assert_eq!(probes.len(), PROBES.len());
        for p in probes {
            for key in ["name", "status", "message", "fix", "details"] {
                assert!(p.get(key).is_some(), "{key} missing");
            }
        }
        assert_eq!(
            probes[0].get("status").and_then(Value::as_str),
            Some("fail")
        );
        assert_eq!(
            v.get("config")
                .and_then(|c| c.get("brain_url"))
                .and_then(Value::as_str),
            Some("http://127.0.0.1:7700")
        );
    }

    #[test]
    fn close_codes_name_the_cause() {
        assert!(close_failure(4401, None, false).0.contains("token"));
        assert!(close_failure(4403, None, true).0.contains("HMAC secret"));
        assert!(close_failure(4403, Some(90.0), true).0.contains("clock"));
        assert!(close_failure(4403, None, false).0.contains("IP"));
        assert!(close_failure(4426, None, false).1.contains("upgrade"));
    }

    #[test]
    fn clock_thresholds() {
        assert_eq!(probe_clock(Some(1.0)).status, ProbeStatus::Ok);
        assert_eq!(probe_clock(Some(-45.0)).status, ProbeStatus::Warn);
        assert_eq!(probe_clock(Some(61.0)).status, ProbeStatus::Fail);
        assert!(probe_clock(Some(-45.0)).message.contains("ahead of"));
    }

    #[test]
    fn doctor_worker_id_fits_the_brain_limit() {
        assert_eq!(doctor_worker_id("agentd-web-1"), "agentd-web-1-doctor");
        let long = "x".repeat(128);
        assert_eq!(doctor_worker_id(&long).len(), 128);
    }
}
