//! Configuration: command-line flags > `Z4J_*` environment > optional TOML
//! config file > defaults.
//!
//! Invariants:
//! * every problem is reported as one [`ConfigError`] that names the key
//!   (the environment variable, which is also what the flag and the file
//!   key are derived from) and says what to change; the binary exits 64;
//! * secrets (the token and the HMAC secret) live only in [`Secret`] and
//!   [`SigningKey`], whose `Debug` output is redacted, and are never put into
//!   an error message;
//! * secrets may come from the variable itself, from `*_FILE` paths, or from
//!   `$CREDENTIALS_DIRECTORY/token` and `$CREDENTIALS_DIRECTORY/hmac_secret`
//!   (systemd `LoadCredential=`); they are re-read on SIGHUP.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

pub use crate::host::{current_uid, HostEnv};
use crate::protocol::SigningKey;
use crate::spool::{Overflow, Synchronous};

/// A bad configuration value: names the key and says what is wrong.
#[derive(Debug, Error)]
#[error("config error: {key}: {message}")]
pub struct ConfigError {
    /// The environment variable name of the offending key (`Z4J_BRAIN_URL`).
    pub key: &'static str,
    /// What is wrong and what to change. Never contains a secret.
    pub message: String,
}

impl ConfigError {
    fn new(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            key,
            message: message.into(),
        }
    }
}

/// A secret string (the agent token). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (for journald/log shippers).
    Json,
    /// Human-readable text.
    Text,
}

/// Options shared by every subcommand that reads the daemon's configuration.
/// Each flag also reads the environment variable named in its help, and
/// falls back to the same key (lowercase, without `Z4J_`) in the config file.
// No `Debug`: the struct holds the raw token and secret.
#[derive(Clone, Default, Args)]
pub struct Options {
    /// TOML config file; keys are the lowercase names of the variables
    /// without the `Z4J_` prefix (e.g. `brain_url = "https://..."`).
    #[arg(long, env = "Z4J_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Base URL of the z4j brain (http://, https://, ws:// or wss://).
    #[arg(long, env = "Z4J_BRAIN_URL", value_name = "URL")]
    pub brain_url: Option<String>,

    /// Agent bearer token minted by the brain. Prefer --token-file.
    #[arg(long, env = "Z4J_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,

    /// File holding the agent token.
    #[arg(long, env = "Z4J_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Per-project HMAC secret (URL-safe base64 of at least 32 bytes). Prefer --hmac-secret-file.
    #[arg(
        long,
        env = "Z4J_HMAC_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub hmac_secret: Option<String>,

    /// File holding the HMAC secret.
    #[arg(long, env = "Z4J_HMAC_SECRET_FILE", value_name = "PATH")]
    pub hmac_secret_file: Option<PathBuf>,

    /// Project slug (informational: the brain derives the project from the token).
    #[arg(long, env = "Z4J_PROJECT_ID", value_name = "SLUG")]
    pub project_id: Option<String>,

    /// Name shown as the agent's host label in the brain (default: the host name).
    #[arg(long, env = "Z4J_AGENT_NAME", value_name = "NAME")]
    pub agent_name: Option<String>,

    /// Deployment environment label (informational).
    #[arg(long, env = "Z4J_ENVIRONMENT", value_name = "NAME")]
    pub environment: Option<String>,

    /// Allow plain ws:// to a host that is not loopback (never use in production).
    #[arg(long, env = "Z4J_DEV_MODE", value_name = "BOOL")]
    pub dev_mode: Option<String>,

    /// Worker slot of this daemon's connection (default: agentd-<host name>).
    /// Stable across restarts so a restart replaces its own slot.
    #[arg(long, env = "Z4J_WORKER_ID", value_name = "ID")]
    pub worker_id: Option<String>,

    /// Engines advertised even when no local client registered them (comma-separated).
    #[arg(long, env = "Z4J_ENGINES", value_name = "LIST")]
    pub engines: Option<String>,

    /// Actions advertised per engine before any client declares them, e.g.
    /// `celery:cancel_task,retry_task;rq:cancel_task`.
    #[arg(long, env = "Z4J_CAPABILITIES", value_name = "ENGINE:ACTIONS;...")]
    pub capabilities: Option<String>,

    /// Extra CA certificate (PEM) trusted for wss://, in addition to the system store.
    #[arg(long, env = "Z4J_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// The spool file (default: $STATE_DIRECTORY/buffer.sqlite, else ~/.z4j/agentd.sqlite).
    #[arg(long, env = "Z4J_BUFFER_PATH", value_name = "PATH")]
    pub buffer_path: Option<PathBuf>,

    /// Spool bound in events (default 1000000).
    #[arg(long, env = "Z4J_BUFFER_MAX_EVENTS", value_name = "N")]
    pub buffer_max_events: Option<String>,

    /// Spool bound in bytes of event data (default 536870912 = 512 MiB).
    #[arg(long, env = "Z4J_BUFFER_MAX_BYTES", value_name = "N")]
    pub buffer_max_bytes: Option<String>,

    /// What to do when the spool is full: drop_oldest (default), drop_newest or block.
    #[arg(long, env = "Z4J_BUFFER_OVERFLOW", value_name = "POLICY")]
    pub buffer_overflow: Option<String>,

    /// SQLite synchronous mode of the spool: normal (default) or full.
    #[arg(long, env = "Z4J_BUFFER_SYNCHRONOUS", value_name = "MODE")]
    pub buffer_synchronous: Option<String>,

    /// Local socket (default: $RUNTIME_DIRECTORY/agent.sock, else
    /// $XDG_RUNTIME_DIR/z4j/agent.sock, else $TMPDIR/z4j-<uid>/agent.sock).
    #[arg(long, env = "Z4J_SOCKET_PATH", value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Mode of the local socket, octal (default 0660).
    #[arg(long, env = "Z4J_SOCKET_MODE", value_name = "OCTAL")]
    pub socket_mode: Option<String>,

    /// Only these uids may write to the socket (comma-separated; default: anyone who can open it).
    #[arg(long, env = "Z4J_ALLOWED_UIDS", value_name = "LIST")]
    pub allowed_uids: Option<String>,

    /// Only these gids may write to the socket (comma-separated).
    #[arg(long, env = "Z4J_ALLOWED_GIDS", value_name = "LIST")]
    pub allowed_gids: Option<String>,

    /// Most local connections at once (default 1024).
    #[arg(long, env = "Z4J_MAX_CLIENTS", value_name = "N")]
    pub max_clients: Option<String>,

    /// Most events per event_batch frame (default 250, at most 5000).
    #[arg(long, env = "Z4J_BATCH_MAX_EVENTS", value_name = "N")]
    pub batch_max_events: Option<String>,

    /// Un-acknowledged event_batch frames in flight (default 2).
    #[arg(long, env = "Z4J_INFLIGHT_FRAMES", value_name = "N")]
    pub inflight_frames: Option<String>,

    /// Seconds to wait for an event_batch_ack before re-sending the frame (default 60).
    #[arg(long, env = "Z4J_ACK_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub ack_timeout_seconds: Option<String>,

    /// Seconds to drain the spool to the brain on SIGTERM before exiting (default 10).
    #[arg(long, env = "Z4J_SHUTDOWN_GRACE_SECONDS", value_name = "SECONDS")]
    pub shutdown_grace_seconds: Option<String>,

    /// Log format: text (default) or json.
    #[arg(long, env = "Z4J_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Log level or tracing filter (default info).
    #[arg(long, env = "Z4J_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Serve /metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9464). Off when unset.
    #[arg(long, env = "Z4J_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,

    /// Allow Z4J_METRICS_ADDR on a non-loopback address (e.g. a pod IP scraped by Prometheus).
    #[arg(long, env = "Z4J_METRICS_ALLOW_REMOTE", value_name = "BOOL")]
    pub metrics_allow_remote: Option<String>,
}

/// The config file: the same keys as [`Options`], all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOptions {
    brain_url: Option<String>,
    token_file: Option<PathBuf>,
    hmac_secret_file: Option<PathBuf>,
    project_id: Option<String>,
    agent_name: Option<String>,
    environment: Option<String>,
    dev_mode: Option<toml::Value>,
    worker_id: Option<String>,
    engines: Option<toml::Value>,
    capabilities: Option<toml::Value>,
    ca_file: Option<PathBuf>,
    buffer_path: Option<PathBuf>,
    buffer_max_events: Option<toml::Value>,
    buffer_max_bytes: Option<toml::Value>,
    buffer_overflow: Option<String>,
    buffer_synchronous: Option<String>,
    socket_path: Option<PathBuf>,
    socket_mode: Option<toml::Value>,
    allowed_uids: Option<toml::Value>,
    allowed_gids: Option<toml::Value>,
    max_clients: Option<toml::Value>,
    batch_max_events: Option<toml::Value>,
    inflight_frames: Option<toml::Value>,
    ack_timeout_seconds: Option<toml::Value>,
    shutdown_grace_seconds: Option<toml::Value>,
    log_format: Option<String>,
    log_level: Option<String>,
    metrics_addr: Option<String>,
    metrics_allow_remote: Option<toml::Value>,
}

/// Where to connect: the brain's agent WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrainEndpoint {
    /// The base URL as configured, without a trailing `/`.
    pub base_url: String,
    /// The WebSocket URL (`ws[s]://host:port/ws/agent`).
    pub ws_url: String,
    /// Host part, for logs and TLS.
    pub host: String,
    /// Whether the connection uses TLS.
    pub tls: bool,
}

/// Settings of the uplink that SIGHUP may change.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// The brain.
    pub endpoint: BrainEndpoint,
    /// Bearer token.
    pub token: Secret,
    /// HMAC signing key.
    pub key: SigningKey,
    /// Worker slot of our one connection.
    pub worker_id: String,
    /// Host label sent in `hello.host.name`.
    pub agent_name: String,
    /// Engines advertised even without local clients.
    pub static_engines: Vec<String>,
    /// Actions per engine advertised even without local clients.
    pub static_capabilities: std::collections::BTreeMap<String, Vec<String>>,
    /// Extra CA file for TLS.
    pub ca_file: Option<PathBuf>,
    /// Most events per frame.
    pub batch_max_events: usize,
    /// Frames in flight.
    pub inflight_frames: usize,
    /// Re-send a frame after this long without its ack.
    pub ack_timeout: Duration,
}

/// The whole validated configuration of `z4j-agentd run`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Uplink settings.
    pub uplink: UplinkSettings,
    /// Project slug, informational.
    pub project_id: Option<String>,
    /// Environment label, informational.
    pub environment: Option<String>,
    /// Whether dev mode was set.
    pub dev_mode: bool,
    /// Explicit spool path, if any (resolution and the clamp happen in `spool::path`).
    pub buffer_path: Option<PathBuf>,
    /// Spool bound in events.
    pub buffer_max_events: u64,
    /// Spool bound in bytes.
    pub buffer_max_bytes: u64,
    /// Overflow policy.
    pub buffer_overflow: Overflow,
    /// SQLite synchronous mode.
    pub buffer_synchronous: Synchronous,
    /// Explicit socket path, if any.
    pub socket_path: Option<PathBuf>,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Allowed peer uids (empty = any).
    pub allowed_uids: Vec<u32>,
    /// Allowed peer gids (empty = any).
    pub allowed_gids: Vec<u32>,
    /// Most local connections.
    pub max_clients: usize,
    /// Drain grace on shutdown.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Where to serve metrics and health, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The environment this was resolved against.
    pub host: HostEnv,
    /// The listening socket systemd passed (socket activation), if any;
    /// set by `run`, never read from the configuration.
    pub activated: Option<crate::systemd::Activated>,
    /// systemd's watchdog timeout (`WATCHDOG_USEC`), if enabled; set by `run`.
    pub watchdog: Option<Duration>,
}

/// Where one value came from, in precedence order.
fn pick<T>(flag_or_env: Option<T>, file: Option<T>) -> Option<T> {
    flag_or_env.or(file)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
}

fn non_empty_path(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|v| !v.as_os_str().is_empty())
}

/// A TOML scalar given where we expect a string-like value.
fn toml_scalar(v: Option<toml::Value>) -> Option<String> {
    v.map(|v| match v {
        toml::Value::String(s) => s,
        toml::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                toml::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    })
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            key,
            format!("expected true or false, got {v:?}"),
        )),
    }
}

fn parse_num<T>(
    key: &'static str,
    v: Option<String>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(v) = v else { return Ok(default) };
    let n: T = v
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|_| ConfigError::new(key, format!("expected a whole number, got {v:?}")))?;
    if n < min || n > max {
        return Err(ConfigError::new(
            key,
            format!("must be between {min} and {max}, got {n}"),
        ));
    }
    Ok(n)
}

fn parse_id_list(key: &'static str, v: Option<String>) -> Result<Vec<u32>, ConfigError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                ConfigError::new(
                    key,
                    format!("expected numeric ids separated by commas, got {s:?}"),
                )
            })
        })
        .collect()
}

/// Whether `name` is the loopback name `localhost`, in any case, with or
/// without the trailing dot of its absolute form (`localhost.`).
pub fn is_localhost_name(name: &str) -> bool {
    name.strip_suffix('.')
        .unwrap_or(name)
        .eq_ignore_ascii_case("localhost")
}

/// Whether `ip` is a loopback address: 127.0.0.0/8, `::1`, or 127.0.0.0/8
/// written as an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`).
pub fn ip_is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Parses and checks the brain URL, applying the `ws://` loopback rule.
pub fn parse_brain_url(raw: &str, dev_mode: bool) -> Result<BrainEndpoint, ConfigError> {
    const KEY: &str = "Z4J_BRAIN_URL";
    let trimmed = raw.trim().trim_end_matches('/');
    let url = url::Url::parse(trimmed).map_err(|e| {
        ConfigError::new(
            KEY,
            format!("not a valid URL ({e}); expected e.g. https://z4j.example.com"),
        )
    })?;
    let (tls, ws_scheme) = match url.scheme() {
        "https" | "wss" => (true, "wss"),
        "http" | "ws" => (false, "ws"),
        other => {
            return Err(ConfigError::new(
                KEY,
                format!("scheme {other:?} is not supported; use https:// (or http:// for a brain on this host)"),
            ))
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| ConfigError::new(KEY, "the URL has no host"))?
        .to_string();
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            KEY,
            "credentials in the URL are not allowed; use Z4J_TOKEN_FILE",
        ));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => is_localhost_name(name),
        Some(url::Host::Ipv4(ip)) => ip_is_loopback(ip.into()),
        Some(url::Host::Ipv6(ip)) => ip_is_loopback(ip.into()),
        None => false,
    };
    if !tls && !loopback && !dev_mode {
        return Err(ConfigError::new(
            KEY,
            format!(
                "plain ws:// to {host} would send the token unencrypted; use https:// \
                 (only loopback hosts, localhost, 127.0.0.0/8 and ::1, may use http://), or set Z4J_DEV_MODE=true for a test setup"
            ),
        ));
    }
    // `localhost.` (the absolute form) is `localhost`; not every resolver
    // reads /etc/hosts for the dotted form, so connect to the plain name.
    let host = match url.host() {
        Some(url::Host::Domain(name)) if is_localhost_name(name) => "localhost".to_string(),
        _ => host,
    };
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let path = url.path().trim_end_matches('/');
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let host_for_url = if bare_host.contains(':') {
        format!("[{bare_host}]")
    } else {
        bare_host.to_string()
    };
    let base_scheme = if tls { "https" } else { "http" };
    Ok(BrainEndpoint {
        base_url: format!("{base_scheme}://{host_for_url}{port}{path}"),
        ws_url: format!("{ws_scheme}://{host_for_url}{port}{path}/ws/agent"),
        host: bare_host.to_string(),
        tls,
    })
}

/// Largest token or HMAC secret file read: a token is 43 characters and a
/// secret about as long, so anything near this is the wrong file.
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;
/// Largest `Z4J_CA_FILE` read (a bundle of a few hundred certificates).
pub const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest config file read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Why [`read_small_file`] refused a file.
#[derive(Debug, Error)]
pub enum SmallFileError {
    /// It could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It is not a regular file (a FIFO, a device, a directory, a socket):
    /// reading it could wait forever or never end.
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// It holds more than the limit (the limit in bytes).
    #[error("it is larger than {0} bytes")]
    TooLarge(u64),
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a small file the daemon is pointed at (a secret, the CA file, the
/// config file): only a regular file (symlinks followed), at most `limit`
/// bytes. A FIFO, a device or a directory is refused without reading, so a
/// path pointing at one cannot make the reader wait for a writer that
/// never comes, nor read `/dev/zero` until memory runs out. Blocking: call
/// it off the async runtime.
pub fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>, SmallFileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Checked before opening: opening some devices has effects of its own.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(SmallFileError::NotRegular(file_kind(meta.file_type())));
    }
    // O_NONBLOCK: should the path turn into a FIFO between the check and
    // the open, the open does not wait for a writer (the second check below
    // refuses it). O_NOCTTY: a terminal never becomes ours.
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(SmallFileError::NotRegular(file_kind(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(SmallFileError::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew since the check.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(SmallFileError::TooLarge(limit));
    }
    Ok(bytes)
}

/// A token or secret as given, without what editors and copies add around
/// it: a leading UTF-8 byte order mark (Windows Notepad writes one) and
/// surrounding whitespace (the final newline).
fn clean_secret(raw: &str) -> &str {
    let t = raw.trim();
    t.strip_prefix('\u{feff}').unwrap_or(t).trim()
}

/// Reads a secret file. `key` is reported; `setting` is what to change
/// (`Z4J_TOKEN_FILE`, or the systemd credential); `what` names the secret.
fn read_secret_file(
    key: &'static str,
    path: &Path,
    setting: &str,
    what: &str,
) -> Result<String, ConfigError> {
    let bytes = read_small_file(path, MAX_SECRET_FILE_BYTES).map_err(|e| {
        let p = path.display();
        ConfigError::new(
            key,
            match e {
                SmallFileError::Io(e) => format!(
                    "cannot read {p}: {e}; check the path and that this user may read it"
                ),
                SmallFileError::NotRegular(_) => format!(
                    "{p}: {e}; put the {what} in a regular file and point {setting} at it"
                ),
                SmallFileError::TooLarge(_) => format!(
                    "{p}: {e}, far more than the {what} it should hold; point {setting} at a file holding only the {what}"
                ),
            },
        )
    })?;
    let raw = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "{} is not UTF-8 text; it should hold only the {what}",
                path.display()
            ),
        )
    })?;
    let v = clean_secret(&raw).to_string();
    if v.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(v)
}

/// Resolves one secret: the value itself, else its `*_FILE`, else the systemd credential.
fn resolve_secret(
    value: Option<String>,
    value_key: &'static str,
    file: Option<PathBuf>,
    file_key: &'static str,
    credential_name: &str,
    host: &HostEnv,
) -> Result<Option<String>, ConfigError> {
    let what = match credential_name {
        "token" => "agent token",
        _ => "HMAC secret",
    };
    if let Some(v) = value {
        return Ok(Some(clean_secret(&v).to_string()));
    }
    if let Some(path) = file {
        return read_secret_file(file_key, &path, file_key, what).map(Some);
    }
    if let Some(dir) = &host.credentials_directory {
        let path = dir.join(credential_name);
        if path.exists() {
            let setting = format!("the credential {credential_name} (LoadCredential=)");
            return read_secret_file(value_key, &path, &setting, what).map(Some);
        }
    }
    Ok(None)
}

fn load_file(path: &Path) -> Result<FileOptions, ConfigError> {
    let bytes = read_small_file(path, MAX_CONFIG_FILE_BYTES).map_err(|e| {
        let p = path.display();
        ConfigError::new(
            "Z4J_CONFIG",
            match e {
                SmallFileError::Io(e) => format!("cannot read {p}: {e}"),
                _ => format!("{p}: {e}; point Z4J_CONFIG at the TOML config file"),
            },
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            "Z4J_CONFIG",
            format!(
                "{} is not UTF-8 text; it should be a TOML file",
                path.display()
            ),
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        ConfigError::new(
            "Z4J_CONFIG",
            format!("{} is not valid: {}", path.display(), e.message()),
        )
    })
}

/// Checks `Z4J_CA_FILE` the way the uplink reads it (a regular file of at
/// most [`MAX_CA_FILE_BYTES`]); the certificates are parsed at connect.
fn check_ca_file(ca: &Path) -> Result<(), ConfigError> {
    const KEY: &str = "Z4J_CA_FILE";
    let p = ca.display();
    match read_small_file(ca, MAX_CA_FILE_BYTES) {
        Ok(_) => Ok(()),
        Err(SmallFileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(
            ConfigError::new(KEY, format!("{p} does not exist or is not a file")),
        ),
        Err(SmallFileError::Io(e)) => Err(ConfigError::new(
            KEY,
            format!("cannot read {p}: {e}; check that this user may read it"),
        )),
        Err(e @ SmallFileError::NotRegular(_)) => Err(ConfigError::new(
            KEY,
            format!("{p}: {e}; point Z4J_CA_FILE at the PEM file of the CA that signed the brain's certificate"),
        )),
        Err(e @ SmallFileError::TooLarge(_)) => Err(ConfigError::new(
            KEY,
            format!("{p}: {e}; point Z4J_CA_FILE at the PEM file of the CA that signed the brain's certificate, not a larger bundle"),
        )),
    }
}

/// A best-effort view of a few settings, for the doctor's header when the
/// configuration does not resolve. Never holds secrets.
#[derive(Debug, Clone, Default)]
pub struct Peek {
    /// `Z4J_BRAIN_URL` as given.
    pub brain_url: Option<String>,
    /// `Z4J_PROJECT_ID` as given.
    pub project_id: Option<String>,
    /// `Z4J_AGENT_NAME` as given.
    pub agent_name: Option<String>,
    /// `Z4J_BUFFER_PATH` as given.
    pub buffer_path: Option<PathBuf>,
    /// `Z4J_SOCKET_PATH` as given.
    pub socket_path: Option<PathBuf>,
}

impl Options {
    /// What flags, environment and (if readable) the config file say about
    /// a few display settings, without validating anything.
    pub fn peek(&self) -> Peek {
        let file = non_empty_path(self.config.clone())
            .and_then(|p| load_file(&p).ok())
            .unwrap_or_default();
        Peek {
            brain_url: pick(non_empty(self.brain_url.clone()), file.brain_url),
            project_id: pick(non_empty(self.project_id.clone()), file.project_id),
            agent_name: pick(non_empty(self.agent_name.clone()), file.agent_name),
            buffer_path: pick(non_empty_path(self.buffer_path.clone()), file.buffer_path),
            socket_path: pick(non_empty_path(self.socket_path.clone()), file.socket_path),
        }
    }

    /// Validates everything `run` needs. `require_brain` is false for
    /// commands that can work without a brain (e.g. `doctor` reporting it).
    pub fn resolve(&self, host: HostEnv) -> Result<Config, ConfigError> {
        let file = match non_empty_path(self.config.clone()) {
            Some(p) => load_file(&p)?,
            None => FileOptions::default(),
        };

        let dev_mode = match pick(non_empty(self.dev_mode.clone()), toml_scalar(file.dev_mode)) {
            Some(v) => parse_bool("Z4J_DEV_MODE", &v)?,
            None => false,
        };

        let brain_url =
            pick(non_empty(self.brain_url.clone()), file.brain_url).ok_or_else(|| {
                ConfigError::new(
                    "Z4J_BRAIN_URL",
                    "is required; set it to the brain's base URL, e.g. https://z4j.example.com",
                )
            })?;
        let endpoint = parse_brain_url(&brain_url, dev_mode)?;

        let token = resolve_secret(
            non_empty(self.token.clone()),
            "Z4J_TOKEN",
            pick(non_empty_path(self.token_file.clone()), file.token_file),
            "Z4J_TOKEN_FILE",
            "token",
            &host,
        )?
        .ok_or_else(|| {
            ConfigError::new(
                "Z4J_TOKEN",
                "is required; set Z4J_TOKEN_FILE to a file holding the agent token minted in the brain",
            )
        })?;
        if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ConfigError::new(
                "Z4J_TOKEN",
                "contains whitespace or control characters; paste the token exactly as minted",
            ));
        }
        // Tokens are URL-safe base64; anything else (a typographic quote or
        // an invisible character from a copy) would only be refused by the
        // brain, which then blames the token itself.
        if let Some(i) = token.chars().position(|c| !c.is_ascii_graphic()) {
            return Err(ConfigError::new(
                "Z4J_TOKEN",
                format!(
                    "character {} is not printable ASCII (an invisible character or a typographic quote from a copy?); paste the token exactly as minted",
                    i + 1
                ),
            ));
        }

        let secret = resolve_secret(
            non_empty(self.hmac_secret.clone()),
            "Z4J_HMAC_SECRET",
            pick(
                non_empty_path(self.hmac_secret_file.clone()),
                file.hmac_secret_file,
            ),
            "Z4J_HMAC_SECRET_FILE",
            "hmac_secret",
            &host,
        )?
        .ok_or_else(|| {
            ConfigError::new(
                "Z4J_HMAC_SECRET",
                "is required; set Z4J_HMAC_SECRET_FILE to a file holding the project's hmac_secret",
            )
        })?;
        let key = SigningKey::from_base64(&secret)
            .map_err(|e| ConfigError::new("Z4J_HMAC_SECRET", e.to_string()))?;

        let project_id = pick(non_empty(self.project_id.clone()), file.project_id);
        if let Some(p) = &project_id {
            if p.len() > 63 {
                return Err(ConfigError::new(
                    "Z4J_PROJECT_ID",
                    format!("must be at most 63 characters, got {}", p.len()),
                ));
            }
        }
        let agent_name = pick(non_empty(self.agent_name.clone()), file.agent_name)
            .unwrap_or_else(|| host.hostname.clone());
        if agent_name.chars().count() > 64 {
            return Err(ConfigError::new(
                "Z4J_AGENT_NAME",
                "must be at most 64 characters",
            ));
        }
        let worker_id = pick(non_empty(self.worker_id.clone()), file.worker_id)
            .unwrap_or_else(|| format!("agentd-{}", host.hostname));
        if worker_id.len() > 128 {
            return Err(ConfigError::new(
                "Z4J_WORKER_ID",
                "must be at most 128 bytes",
            ));
        }
        let static_engines: Vec<String> =
            pick(non_empty(self.engines.clone()), toml_scalar(file.engines))
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
        if let Some(bad) = static_engines
            .iter()
            .find(|e| !crate::protocol::limits::engine_name_fits(e))
        {
            return Err(ConfigError::new(
                "Z4J_ENGINES",
                format!(
                    "engine name {bad:?} is longer than {} characters",
                    crate::protocol::limits::MAX_ENGINE_CHARS
                ),
            ));
        }
        let static_capabilities =
            parse_capabilities(non_empty(self.capabilities.clone()), file.capabilities)?;
        let ca_file = pick(non_empty_path(self.ca_file.clone()), file.ca_file);
        if let Some(ca) = &ca_file {
            check_ca_file(ca)?;
        }

        let buffer_max_events = parse_num(
            "Z4J_BUFFER_MAX_EVENTS",
            pick(
                non_empty(self.buffer_max_events.clone()),
                toml_scalar(file.buffer_max_events),
            ),
            1_000_000u64,
            1_000,
            1_000_000_000,
        )?;
        let buffer_max_bytes = parse_num(
            "Z4J_BUFFER_MAX_BYTES",
            pick(
                non_empty(self.buffer_max_bytes.clone()),
                toml_scalar(file.buffer_max_bytes),
            ),
            512 * 1024 * 1024u64,
            1024 * 1024,
            1 << 40,
        )?;
        let buffer_overflow = match pick(
            non_empty(self.buffer_overflow.clone()),
            file.buffer_overflow,
        )
        .as_deref()
        .map(str::trim)
        {
            None | Some("drop_oldest") => Overflow::DropOldest,
            Some("drop_newest") => Overflow::DropNewest,
            Some("block") => Overflow::Block,
            Some(other) => {
                return Err(ConfigError::new(
                    "Z4J_BUFFER_OVERFLOW",
                    format!("expected drop_oldest, drop_newest or block, got {other:?}"),
                ))
            }
        };
        let buffer_synchronous = match pick(
            non_empty(self.buffer_synchronous.clone()),
            file.buffer_synchronous,
        )
        .map(|s| s.trim().to_ascii_lowercase())
        .as_deref()
        {
            None | Some("normal") => Synchronous::Normal,
            Some("full") => Synchronous::Full,
            Some(other) => {
                return Err(ConfigError::new(
                    "Z4J_BUFFER_SYNCHRONOUS",
                    format!("expected normal or full, got {other:?}"),
                ))
            }
        };
        let socket_mode = match pick(
            non_empty(self.socket_mode.clone()),
            toml_scalar(file.socket_mode),
        ) {
            None => 0o660,
            Some(v) => {
                let m =
                    u32::from_str_radix(v.trim().trim_start_matches("0o"), 8).map_err(|_| {
                        ConfigError::new(
                            "Z4J_SOCKET_MODE",
                            format!("expected an octal mode such as 0660, got {v:?}"),
                        )
                    })?;
                if m & !0o777 != 0 || m & 0o600 != 0o600 {
                    return Err(ConfigError::new(
                        "Z4J_SOCKET_MODE",
                        format!(
                            "{v} must be a permission mode that keeps owner read/write, e.g. 0660"
                        ),
                    ));
                }
                m
            }
        };
        let allowed_uids = parse_id_list(
            "Z4J_ALLOWED_UIDS",
            pick(
                non_empty(self.allowed_uids.clone()),
                toml_scalar(file.allowed_uids),
            ),
        )?;
        let allowed_gids = parse_id_list(
            "Z4J_ALLOWED_GIDS",
            pick(
                non_empty(self.allowed_gids.clone()),
                toml_scalar(file.allowed_gids),
            ),
        )?;
        let max_clients = parse_num(
            "Z4J_MAX_CLIENTS",
            pick(
                non_empty(self.max_clients.clone()),
                toml_scalar(file.max_clients),
            ),
            1024usize,
            1,
            65_536,
        )?;
        let batch_max_events = parse_num(
            "Z4J_BATCH_MAX_EVENTS",
            pick(
                non_empty(self.batch_max_events.clone()),
                toml_scalar(file.batch_max_events),
            ),
            250usize,
            1,
            crate::protocol::MAX_EVENTS_PER_FRAME,
        )?;
        let inflight_frames = parse_num(
            "Z4J_INFLIGHT_FRAMES",
            pick(
                non_empty(self.inflight_frames.clone()),
                toml_scalar(file.inflight_frames),
            ),
            2usize,
            1,
            16,
        )?;
        let ack_timeout_seconds = parse_num(
            "Z4J_ACK_TIMEOUT_SECONDS",
            pick(
                non_empty(self.ack_timeout_seconds.clone()),
                toml_scalar(file.ack_timeout_seconds),
            ),
            60u64,
            1,
            3600,
        )?;
        let shutdown_grace_seconds = parse_num(
            "Z4J_SHUTDOWN_GRACE_SECONDS",
            pick(
                non_empty(self.shutdown_grace_seconds.clone()),
                toml_scalar(file.shutdown_grace_seconds),
            ),
            10u64,
            0,
            3600,
        )?;
        let log_format = match pick(non_empty(self.log_format.clone()), file.log_format)
            .map(|s| s.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "Z4J_LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                ))
            }
        };
        let log_level = pick(non_empty(self.log_level.clone()), file.log_level)
            .unwrap_or_else(|| "info".to_string())
            .trim()
            .to_ascii_lowercase();
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "Z4J_LOG_LEVEL",
                format!("expected error, warn, info, debug or trace, got {log_level:?}"),
            ));
        }
        let socket_path = pick(non_empty_path(self.socket_path.clone()), file.socket_path);
        check_socket_path(socket_path.as_deref(), &host)?;
        let metrics_allow_remote = match pick(
            non_empty(self.metrics_allow_remote.clone()),
            toml_scalar(file.metrics_allow_remote),
        ) {
            Some(v) => parse_bool("Z4J_METRICS_ALLOW_REMOTE", &v)?,
            None => false,
        };
        let metrics_addr = match pick(non_empty(self.metrics_addr.clone()), file.metrics_addr) {
            None => None,
            Some(v) => Some(parse_metrics_addr(v.trim(), metrics_allow_remote)?),
        };

        Ok(Config {
            uplink: UplinkSettings {
                endpoint,
                token: Secret::new(token),
                key,
                worker_id,
                agent_name,
                static_engines,
                static_capabilities,
                ca_file,
                batch_max_events,
                inflight_frames,
                ack_timeout: Duration::from_secs(ack_timeout_seconds),
            },
            project_id,
            environment: pick(non_empty(self.environment.clone()), file.environment),
            dev_mode,
            buffer_path: pick(non_empty_path(self.buffer_path.clone()), file.buffer_path),
            buffer_max_events,
            buffer_max_bytes,
            buffer_overflow,
            buffer_synchronous,
            socket_path,
            socket_mode,
            allowed_uids,
            allowed_gids,
            max_clients,
            shutdown_grace: Duration::from_secs(shutdown_grace_seconds),
            log_format,
            log_level,
            metrics_addr,
            host,
            activated: None,
            watchdog: None,
        })
    }
}

/// The socket path must be absolute: applications resolve a relative one
/// from their own working directory, not the daemon's, and never find it.
/// Checks the explicit `Z4J_SOCKET_PATH`, else the default built from the
/// environment (a relative `$TMPDIR`, say).
fn check_socket_path(explicit: Option<&Path>, host: &HostEnv) -> Result<(), ConfigError> {
    const KEY: &str = "Z4J_SOCKET_PATH";
    match explicit {
        Some(p) if !p.is_absolute() => Err(ConfigError::new(
            KEY,
            format!(
                "{} is a relative path, which each application would resolve from its own working directory; use an absolute path such as /run/z4j-agentd/agent.sock",
                p.display()
            ),
        )),
        Some(_) => Ok(()),
        None => {
            let p = crate::ingest::default_socket_path(host);
            if p.is_absolute() {
                return Ok(());
            }
            let from = if host.runtime_directory.is_some() {
                "$RUNTIME_DIRECTORY"
            } else if host.xdg_runtime_dir.is_some() {
                "$XDG_RUNTIME_DIR"
            } else {
                "$TMPDIR"
            };
            Err(ConfigError::new(
                KEY,
                format!(
                    "the default socket path {} is relative because {from} is; set {from} to an absolute directory, or set Z4J_SOCKET_PATH to an absolute path",
                    p.display()
                ),
            ))
        }
    }
}

/// `Z4J_CAPABILITIES` (`engine:action,action;engine:action`) or the config
/// file's `[capabilities]` table (`engine = ["action", ...]`).
fn parse_capabilities(
    env: Option<String>,
    file: Option<toml::Value>,
) -> Result<std::collections::BTreeMap<String, Vec<String>>, ConfigError> {
    const KEY: &str = "Z4J_CAPABILITIES";
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut add = |engine: &str, action: &str| -> Result<(), ConfigError> {
        let (engine, action) = (engine.trim(), action.trim());
        if !crate::protocol::limits::engine_name_fits(engine) {
            return Err(ConfigError::new(
                KEY,
                format!(
                    "engine name {engine:?} must be 1 to {} characters",
                    crate::protocol::limits::MAX_ENGINE_CHARS
                ),
            ));
        }
        if action.is_empty() {
            return Ok(());
        }
        if action == "retry_by_reference_v1" {
            return Err(ConfigError::new(
                KEY,
                "retry_by_reference_v1 is advertised only when a connected client declares it (it can retry by reference); remove it here",
            ));
        }
        out.entry(engine.to_string())
            .or_default()
            .push(action.to_string());
        Ok(())
    };
    match (env, file) {
        (Some(text), _) | (None, Some(toml::Value::String(text))) => {
            for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let (engine, actions) = part.split_once(':').ok_or_else(|| {
                    ConfigError::new(
                        KEY,
                        format!("expected engine:action,action (e.g. celery:cancel_task,retry_task), got {part:?}"),
                    )
                })?;
                for action in actions.split(',') {
                    add(engine, action)?;
                }
            }
        }
        (None, Some(toml::Value::Table(t))) => {
            for (engine, actions) in t {
                let list = actions.as_array().ok_or_else(|| {
                    ConfigError::new(
                        KEY,
                        format!("[capabilities] {engine} must be a list of action names"),
                    )
                })?;
                for a in list {
                    let a = a.as_str().ok_or_else(|| {
                        ConfigError::new(
                            KEY,
                            format!("[capabilities] {engine} must list action names as strings"),
                        )
                    })?;
                    add(&engine, a)?;
                }
            }
        }
        (None, Some(other)) => {
            return Err(ConfigError::new(
                KEY,
                format!(
                    "capabilities must be a table or a string, got {}",
                    other.type_str()
                ),
            ))
        }
        (None, None) => {}
    }
    for actions in out.values_mut() {
        actions.sort();
        actions.dedup();
    }
    Ok(out)
}

/// `HOST:PORT` for the metrics listener; loopback only unless allowed.
fn parse_metrics_addr(v: &str, allow_remote: bool) -> Result<std::net::SocketAddr, ConfigError> {
    let addr: std::net::SocketAddr = match v.rsplit_once(':') {
        Some((name, port)) if is_localhost_name(name) => format!("127.0.0.1:{port}").parse(),
        _ => v.parse(),
    }
    .map_err(|_| {
        ConfigError::new(
            "Z4J_METRICS_ADDR",
            format!("expected an IP address and port such as 127.0.0.1:9464, got {v:?}"),
        )
    })?;
    if !ip_is_loopback(addr.ip()) && !allow_remote {
        return Err(ConfigError::new(
            "Z4J_METRICS_ADDR",
            format!(
                "{addr} is not a loopback address; use 127.0.0.1:<port>, or set Z4J_METRICS_ALLOW_REMOTE=true to serve metrics beyond this host"
            ),
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";

    fn base() -> Options {
        Options {
            brain_url: Some("http://127.0.0.1:7711".into()),
            token: Some("tok-abc".into()),
            hmac_secret: Some(SECRET.into()),
            ..Options::default()
        }
    }

    fn host() -> HostEnv {
        HostEnv {
            home: Some("/home/u".into()),
            tmpdir: "/tmp".into(),
            uid: 1000,
            hostname: "web-1".into(),
            ..HostEnv::default()
        }
    }

    #[test]
    fn defaults_resolve() {
        let c = base().resolve(host()).unwrap();
        assert_eq!(c.uplink.endpoint.ws_url, "ws://127.0.0.1:7711/ws/agent");
        assert_eq!(c.uplink.worker_id, "agentd-web-1");
        assert_eq!(c.uplink.agent_name, "web-1");
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.buffer_overflow, Overflow::DropOldest);
        assert_eq!(c.uplink.batch_max_events, 250);
    }

    #[test]
    fn https_becomes_wss_and_keeps_path() {
        let e = parse_brain_url("https://z4j.example.com/base/", false).unwrap();
        assert_eq!(e.ws_url, "wss://z4j.example.com/base/ws/agent");
        assert!(e.tls);
    }

    #[test]
    fn plain_ws_to_remote_host_refused_without_dev_mode() {
        let err = parse_brain_url("http://brain.internal:7711", false).unwrap_err();
        assert_eq!(err.key, "Z4J_BRAIN_URL");
        assert!(err.message.contains("Z4J_DEV_MODE"), "{}", err.message);
        assert!(parse_brain_url("http://brain.internal:7711", true).is_ok());
        for ok in ["http://localhost:1", "http://127.0.0.1:1", "http://[::1]:1"] {
            assert!(parse_brain_url(ok, false).is_ok(), "{ok}");
        }
    }

    #[test]
    fn short_secret_refused_without_echoing_it() {
        let mut o = base();
        o.hmac_secret = Some("c2hvcnQtc2VjcmV0".into()); // "short-secret"
        let err = o.resolve(host()).unwrap_err();
        assert_eq!(err.key, "Z4J_HMAC_SECRET");
        assert!(!err.to_string().contains("c2hvcnQtc2VjcmV0"));
    }

    #[test]
    fn missing_token_names_the_key() {
        let mut o = base();
        o.token = None;
        let err = o.resolve(host()).unwrap_err();
        assert_eq!(err.key, "Z4J_TOKEN");
    }

    #[test]
    fn secrets_from_files_and_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "from-cred\n").unwrap();
        std::fs::write(dir.path().join("hmac_secret"), format!("{SECRET}\n")).unwrap();
        let mut o = base();
        o.token = None;
        o.hmac_secret = None;
        let mut h = host();
        h.credentials_directory = Some(dir.path().to_path_buf());
        let c = o.resolve(h.clone()).unwrap();
        assert_eq!(c.uplink.token.expose(), "from-cred");

        let tf = dir.path().join("tok2");
        std::fs::write(&tf, "from-file").unwrap();
        o.token_file = Some(tf);
        let c = o.resolve(h).unwrap();
        assert_eq!(c.uplink.token.expose(), "from-file");
    }

    #[test]
    fn flags_beat_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.toml");
        std::fs::write(
            &path,
            "agent_name = \"from-file\"\nbatch_max_events = 100\nengines = [\"celery\", \"rq\"]\n",
        )
        .unwrap();
        let mut o = base();
        o.config = Some(path);
        o.agent_name = Some("from-flag".into());
        let c = o.resolve(host()).unwrap();
        assert_eq!(c.uplink.agent_name, "from-flag");
        assert_eq!(c.uplink.batch_max_events, 100);
        assert_eq!(c.uplink.static_engines, vec!["celery", "rq"]);
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.toml");
        std::fs::write(&path, "brain_ulr = \"x\"\n").unwrap();
        let mut o = base();
        o.config = Some(path);
        let err = o.resolve(host()).unwrap_err();
        assert_eq!(err.key, "Z4J_CONFIG");
        assert!(err.message.contains("brain_ulr"), "{}", err.message);
    }

    #[test]
    fn bad_numbers_and_enums_name_their_key() {
        let mut o = base();
        o.batch_max_events = Some("9000".into());
        assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_BATCH_MAX_EVENTS");
        let mut o = base();
        o.buffer_overflow = Some("drop_everything".into());
        assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_BUFFER_OVERFLOW");
        let mut o = base();
        o.socket_mode = Some("0999".into());
        assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_SOCKET_MODE");
        let mut o = base();
        o.log_format = Some("xml".into());
        assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_LOG_FORMAT");
    }

    #[test]
    fn debug_output_has_no_secret() {
        let c = base().resolve(host()).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("tok-abc"));
        assert!(!dbg.contains(SECRET));
    }

    #[test]
    fn metrics_listener_is_off_by_default_and_loopback_only() {
        assert_eq!(base().resolve(host()).unwrap().metrics_addr, None);
        let o = Options {
            metrics_addr: Some("127.0.0.1:9464".into()),
            ..base()
        };
        assert_eq!(
            o.resolve(host()).unwrap().metrics_addr,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let o = Options {
            metrics_addr: Some("localhost:9464".into()),
            ..base()
        };
        assert!(o.resolve(host()).unwrap().metrics_addr.is_some());
        let o = Options {
            metrics_addr: Some("0.0.0.0:9464".into()),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert_eq!(e.key, "Z4J_METRICS_ADDR");
        assert!(
            e.message.contains("Z4J_METRICS_ALLOW_REMOTE"),
            "{}",
            e.message
        );
        let o = Options {
            metrics_addr: Some("0.0.0.0:9464".into()),
            metrics_allow_remote: Some("true".into()),
            ..base()
        };
        assert!(o.resolve(host()).unwrap().metrics_addr.is_some());
        let o = Options {
            metrics_addr: Some("9464".into()),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert!(e.message.contains("127.0.0.1:9464"), "{}", e.message);
    }

    #[test]
    fn static_capabilities_from_the_environment_or_the_file() {
        let o = Options {
            capabilities: Some("celery:cancel_task, retry_task; rq:cancel_task".into()),
            ..base()
        };
        let c = o.resolve(host()).unwrap().uplink.static_capabilities;
        assert_eq!(c["celery"], ["cancel_task", "retry_task"]);
        assert_eq!(c["rq"], ["cancel_task"]);

        let e = Options {
            capabilities: Some("celery".into()),
            ..base()
        }
        .resolve(host())
        .unwrap_err();
        assert_eq!(e.key, "Z4J_CAPABILITIES");
        assert!(e.message.contains("celery:cancel_task"), "{}", e.message);

        let e = Options {
            capabilities: Some("celery:retry_by_reference_v1".into()),
            ..base()
        }
        .resolve(host())
        .unwrap_err();
        assert!(e.message.contains("connected client"), "{}", e.message);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "[capabilities]\ncelery = [\"cancel_task\"]\n").unwrap();
        let o = Options {
            config: Some(f),
            ..base()
        };
        let c = o.resolve(host()).unwrap().uplink.static_capabilities;
        assert_eq!(c["celery"], ["cancel_task"]);
    }

    /// Resolves `o` on another thread and fails the test, instead of
    /// hanging it, when that takes more than 5 s (a FIFO read would).
    fn resolve_bounded(o: Options) -> Result<Config, ConfigError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(o.resolve(host()));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("resolve returned within 5 s")
    }

    /// Paths that are not regular files, or too large, each with the
    /// words the error must contain.
    fn hostile_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        let huge = dir.join("huge");
        // Sparse: 1 GiB that takes no disk space.
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let zero_link = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero_link).unwrap();
        vec![
            (fifo, "is a FIFO (named pipe), not a regular file"),
            (
                "/dev/zero".into(),
                "is a character device, not a regular file",
            ),
            (zero_link, "is a character device, not a regular file"),
            (dir.to_path_buf(), "is a directory, not a regular file"),
            (huge, "is larger than"),
        ]
    }

    #[test]
    fn secret_files_that_are_not_small_regular_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let just_over = dir.path().join("just-over");
        std::fs::write(&just_over, "a".repeat(MAX_SECRET_FILE_BYTES as usize + 1)).unwrap();
        let mut cases = hostile_files(dir.path());
        cases.push((just_over, "is larger than 4096 bytes"));
        for (path, words) in cases {
            let o = Options {
                token: None,
                token_file: Some(path.clone()),
                ..base()
            };
            let e = resolve_bounded(o).unwrap_err();
            assert_eq!(e.key, "Z4J_TOKEN_FILE", "{e}");
            assert!(e.message.contains(words), "{path:?}: {e}");
            assert!(e.message.contains("point Z4J_TOKEN_FILE at"), "{e}");
            assert!(e.message.contains(&path.display().to_string()), "{e}");

            let o = Options {
                hmac_secret: None,
                hmac_secret_file: Some(path.clone()),
                ..base()
            };
            let e = resolve_bounded(o).unwrap_err();
            assert_eq!(e.key, "Z4J_HMAC_SECRET_FILE", "{e}");
            assert!(e.message.contains(words), "{path:?}: {e}");
            assert!(e.message.contains("HMAC secret"), "{e}");
        }
        // The systemd credential too, naming where it comes from.
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::os::unix::fs::symlink("/dev/zero", creds.join("token")).unwrap();
        let o = Options {
            token: None,
            ..base()
        };
        let mut h = host();
        h.credentials_directory = Some(creds);
        let e = o.resolve(h).unwrap_err();
        assert_eq!(e.key, "Z4J_TOKEN");
        assert!(e.message.contains("character device"), "{e}");
        assert!(e.message.contains("LoadCredential="), "{e}");
    }

    #[test]
    fn a_ca_file_or_config_file_that_is_not_a_small_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for (path, words) in hostile_files(dir.path()) {
            // The 1 GiB file is over both limits.
            let o = Options {
                ca_file: Some(path.clone()),
                ..base()
            };
            let e = resolve_bounded(o).unwrap_err();
            assert_eq!(e.key, "Z4J_CA_FILE", "{e}");
            assert!(e.message.contains(words), "{path:?}: {e}");
            assert!(e.message.contains("PEM file of the CA"), "{e}");

            let o = Options {
                config: Some(path.clone()),
                ..base()
            };
            let e = resolve_bounded(o).unwrap_err();
            assert_eq!(e.key, "Z4J_CONFIG", "{e}");
            assert!(e.message.contains(words), "{path:?}: {e}");
        }
        let o = Options {
            ca_file: Some(dir.path().join("missing.pem")),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert!(e.message.contains("does not exist"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_and_whitespace_around_a_secret_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "\u{feff}tok-from-notepad\r\n").unwrap();
        let sf = dir.path().join("secret");
        std::fs::write(&sf, format!("\u{feff} {SECRET}\r\n")).unwrap();
        let o = Options {
            token: None,
            token_file: Some(tf),
            hmac_secret: None,
            hmac_secret_file: Some(sf),
            ..base()
        };
        let c = o.resolve(host()).unwrap();
        assert_eq!(c.uplink.token.expose(), "tok-from-notepad");
        let expected = SigningKey::from_base64(SECRET).unwrap();
        assert_eq!(format!("{:?}", c.uplink.key), format!("{expected:?}"));
        // The same in the variable itself.
        let o = Options {
            token: Some("\u{feff}tok-abc".into()),
            ..base()
        };
        assert_eq!(o.resolve(host()).unwrap().uplink.token.expose(), "tok-abc");
    }

    #[test]
    fn a_token_with_a_character_the_brain_never_mints_is_refused_without_echoing_it() {
        for bad in ["zq9\u{2019}abc", "zq9\u{200b}abc", "zq9\u{feff}abc", "zq9é"] {
            let o = Options {
                token: Some(bad.into()),
                ..base()
            };
            let e = o.resolve(host()).unwrap_err();
            assert_eq!(e.key, "Z4J_TOKEN");
            assert!(e.message.contains("printable ASCII"), "{e}");
            assert!(e.message.contains("character 4"), "{e}");
            assert!(!e.to_string().contains("zq9"), "{e}");
        }
    }

    #[test]
    fn a_relative_socket_path_is_refused_naming_the_setting() {
        for rel in [
            "agent.sock",
            "run/agent.sock",
            "./agent.sock",
            "../agent.sock",
        ] {
            let o = Options {
                socket_path: Some(rel.into()),
                ..base()
            };
            let e = o.resolve(host()).unwrap_err();
            assert_eq!(e.key, "Z4J_SOCKET_PATH", "{e}");
            assert!(e.message.contains(rel), "{e}");
            assert!(e.message.contains("absolute path"), "{e}");
        }
        // The config file's socket_path too.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "socket_path = \"agent.sock\"\n").unwrap();
        let o = Options {
            config: Some(f),
            ..base()
        };
        assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_SOCKET_PATH");
        // A default built from a relative $TMPDIR names where it came from.
        let mut h = host();
        h.tmpdir = "tmp".into();
        let e = base().resolve(h).unwrap_err();
        assert_eq!(e.key, "Z4J_SOCKET_PATH");
        assert!(e.message.contains("$TMPDIR"), "{e}");
        // Absolute paths are fine.
        let o = Options {
            socket_path: Some("/run/z4j/agent.sock".into()),
            ..base()
        };
        assert!(o.resolve(host()).is_ok());
    }

    #[test]
    fn localhost_in_any_case_with_or_without_its_trailing_dot_is_loopback() {
        for ok in [
            "http://localhost.:7711",
            "http://LOCALHOST:7711",
            "http://LocalHost.:7711",
            "ws://localhost./base",
            "http://127.0.0.2:7711",
            "http://[::ffff:127.0.0.1]:7711",
        ] {
            let e = parse_brain_url(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(!e.tls);
        }
        // The dotted form connects to the plain name.
        let e = parse_brain_url("http://LocalHost.:7711/base", false).unwrap();
        assert_eq!(e.ws_url, "ws://localhost:7711/base/ws/agent");
        assert_eq!(e.host, "localhost");
        for remote in [
            "http://localhost.evil.example:7711",
            "http://localhostx:7711",
            "http://my.localhost:7711",
            "http://127.0.0.1.nip.io:7711",
            "http://[::ffff:10.0.0.1]:7711",
            "http://localhost..:7711",
        ] {
            match parse_brain_url(remote, false) {
                Err(e) => assert!(e.message.contains("Z4J_DEV_MODE"), "{remote}: {e}"),
                Ok(e) => panic!("{remote} taken as loopback: {e:?}"),
            }
        }
        // The metrics address follows the same rule.
        for ok in [
            "localhost.:9464",
            "LOCALHOST:9464",
            "[::ffff:127.0.0.1]:9464",
        ] {
            let a = parse_metrics_addr(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(a.port(), 9464);
        }
    }
}
