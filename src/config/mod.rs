//! Configuration: command-line flags > `Z4J_*` environment > optional TOML
//! config file > defaults.
//!
//! Every setting is written once, in the table of [`keys`]: its name (the
//! config file key), variable, flag, help, default and range. The other
//! files read it: [`read`] (where a value comes from, and the readers that
//! apply defaults and ranges), [`file`] (the config file), [`secrets`]
//! (token and HMAC secret), [`endpoints`] (brain URL, CA file, metrics
//! address), [`capabilities`]; this file puts the validated [`Config`]
//! together, in the order the checks are reported.
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
//!   (systemd `LoadCredential=`); they are re-read on SIGHUP;
//! * nothing here reads the process environment except
//!   [`Environment::from_process`] (when clap builds [`Options`]) and
//!   [`HostEnv::from_process`]: tests pass both in.

pub mod capabilities;
pub mod endpoints;
pub mod file;
pub mod gateway_tokens;
pub mod keys;
pub mod read;
pub mod secrets;
pub mod small_file;
pub mod socket_path;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::host::HostEnv;
pub use capabilities::Capabilities;
pub use endpoints::{parse_brain_url, BrainEndpoint};
pub use keys::{Environment, Options};
pub use secrets::Secret;
pub use small_file::{read_small_file, MAX_CA_FILE_BYTES};
pub use socket_path::{client_socket_path, default_socket, default_socket_path, SocketDir};

use crate::protocol::SigningKey;
use crate::spool::{Overflow, Synchronous};
use keys::*;
use read::Sources;

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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (for journald/log shippers).
    Json,
    /// Human-readable text.
    Text,
}

/// The gateway for unmodified z4j agents (`Z4J_GATEWAY_ADDR`).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The loopback address it listens on.
    pub addr: std::net::SocketAddr,
    /// Further agent tokens accepted besides `Z4J_TOKEN`, one per line;
    /// read again at each handshake, so a change needs no restart.
    pub tokens_file: Option<PathBuf>,
    /// Most agent connections at once.
    pub max_connections: usize,
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
    pub static_capabilities: Capabilities,
    /// Extra CA file for TLS.
    pub ca_file: Option<PathBuf>,
    /// Most events per frame.
    pub batch_max_events: usize,
    /// Frames in flight.
    pub inflight_frames: usize,
    /// Re-send a frame after this long without its ack.
    pub ack_timeout: Duration,
    /// WebSocket, long-poll, or WebSocket with long-poll when refused.
    pub transport: Transport,
    /// Largest request body sent over long-poll.
    pub longpoll_max_body: usize,
    /// How often `auto` tries the WebSocket again while on long-poll.
    pub ws_retry: Duration,
}

/// How the daemon reaches the brain (`Z4J_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The WebSocket; HTTPS long-poll while the path to the brain refuses
    /// the upgrade, trying the WebSocket again every `ws_retry`.
    Auto,
    /// The WebSocket only.
    WebSocket,
    /// HTTPS long-poll only.
    LongPoll,
}

impl Transport {
    /// The setting's value, as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::WebSocket => "ws",
            Transport::LongPoll => "longpoll",
        }
    }
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
    /// Explicit spool path (`Z4J_BUFFER_PATH`), if any (resolution and the clamp happen in `spool::path`).
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
    /// How long what was advertised before a restart stays advertised
    /// while its processes reconnect (`Z4J_RESTART_GRACE_SECONDS`).
    pub restart_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Where to serve metrics and health, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The gateway for z4j agents, when `Z4J_GATEWAY_ADDR` is set.
    pub gateway: Option<GatewaySettings>,
    /// The environment this was resolved against.
    pub host: HostEnv,
    /// The listening socket systemd passed (socket activation), if any;
    /// set by `run`, never read from the configuration.
    pub activated: Option<crate::systemd::Activated>,
    /// systemd's watchdog timeout (`WATCHDOG_USEC`), if enabled; set by `run`.
    pub watchdog: Option<Duration>,
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
        let file = self
            .config_file_path()
            .and_then(|p| file::load(&p).ok())
            .unwrap_or_default();
        let sources = Sources {
            options: self,
            file,
        };
        let text = |s: &Setting<read::Text>| sources.get(s).ok().flatten();
        let path = |s: &Setting<read::PathValue>| sources.get(s).ok().flatten();
        Peek {
            brain_url: text(&BRAIN_URL),
            project_id: text(&PROJECT_ID),
            agent_name: text(&AGENT_NAME),
            buffer_path: path(&SPOOL_PATH),
            socket_path: path(&SOCKET_PATH),
        }
    }

    /// `Z4J_SOCKET_PATH` as `run` reads it (flags > environment > the
    /// config file), without validating the other settings: what
    /// `z4j-agentd status` connects to. `None` when nothing names it (the
    /// caller picks the default). A config file `run` would refuse is
    /// refused here too, with the same error.
    pub fn socket_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        let file = match self.config_file_path() {
            Some(p) => file::load(&p)?,
            None => file::FileValues::default(),
        };
        let sources = Sources {
            options: self,
            file,
        };
        sources.get(&SOCKET_PATH)
    }

    /// `Z4J_CONFIG` from the flag or the environment (the file cannot name itself).
    fn config_file_path(&self) -> Option<PathBuf> {
        let sources = Sources {
            options: self,
            file: file::FileValues::default(),
        };
        sources.get(&CONFIG).ok().flatten()
    }

    /// Validates everything `run` needs, in the order the errors are
    /// reported: the config file, the brain, the secrets, the identity,
    /// the spool, the socket, the uplink, logging and metrics.
    pub fn resolve(&self, host: HostEnv) -> Result<Config, ConfigError> {
        let file = match self.config_file_path() {
            Some(p) => file::load(&p)?,
            None => file::FileValues::default(),
        };
        let s = Sources {
            options: self,
            file,
        };
        let dev_mode = s.get(&DEV_MODE)?;
        let brain_url = s.get(&BRAIN_URL)?.ok_or_else(|| {
            ConfigError::new(
                BRAIN_URL.key.env,
                "is required; set it to the brain's base URL, e.g. https://z4j.example.com",
            )
        })?;
        let endpoint = parse_brain_url(&brain_url, dev_mode)?;
        let (token, key) = secrets::read(&s, &host)?;
        let identity = Identity::read(&s, &host)?;
        let spool = SpoolSettings::read(&s)?;
        let socket_mode = s.get(&SOCKET_MODE)?;
        let allowed_uids = s.get(&ALLOWED_UIDS)?;
        let allowed_gids = s.get(&ALLOWED_GIDS)?;
        let max_clients = s.get(&MAX_CLIENTS)?;
        let batch_max_events = s.get(&BATCH_MAX_EVENTS)?;
        let inflight_frames = s.get(&INFLIGHT_FRAMES)?;
        let ack_timeout = Duration::from_secs(s.get(&ACK_TIMEOUT_SECONDS)?);
        let shutdown_grace = Duration::from_secs(s.get(&SHUTDOWN_GRACE_SECONDS)?);
        let restart_grace = Duration::from_secs(s.get(&RESTART_GRACE_SECONDS)?);
        let log_format = s.get(&LOG_FORMAT)?;
        let log_level = s.get(&LOG_LEVEL)?;
        let socket_path = s.get(&SOCKET_PATH)?;
        check_socket_path(socket_path.as_deref(), &host)?;
        let metrics_addr = metrics_addr(&s)?;
        let gateway = gateway_settings(&s)?;
        Ok(Config {
            uplink: UplinkSettings {
                endpoint,
                token,
                key,
                worker_id: identity.worker_id,
                agent_name: identity.agent_name,
                static_engines: identity.engines,
                static_capabilities: identity.capabilities,
                ca_file: identity.ca_file,
                batch_max_events,
                inflight_frames,
                ack_timeout,
                transport: s.get(&TRANSPORT)?,
                longpoll_max_body: s.get(&LONGPOLL_MAX_BODY_BYTES)?,
                ws_retry: Duration::from_secs(s.get(&WS_RETRY_SECONDS)?),
            },
            project_id: identity.project_id,
            environment: s.get(&ENVIRONMENT)?,
            dev_mode,
            buffer_path: spool.path,
            buffer_max_events: spool.max_events,
            buffer_max_bytes: spool.max_bytes,
            buffer_overflow: spool.overflow,
            buffer_synchronous: spool.synchronous,
            socket_path,
            socket_mode,
            allowed_uids,
            allowed_gids,
            max_clients,
            shutdown_grace,
            restart_grace,
            log_format,
            log_level,
            metrics_addr,
            gateway,
            host,
            activated: None,
            watchdog: None,
        })
    }
}

/// Who this daemon is to the brain, and what it advertises before any
/// client connects.
struct Identity {
    project_id: Option<String>,
    agent_name: String,
    worker_id: String,
    engines: Vec<String>,
    capabilities: Capabilities,
    ca_file: Option<PathBuf>,
}

impl Identity {
    /// Reads and checks these settings; the names default from the host name.
    fn read(s: &Sources, host: &HostEnv) -> Result<Identity, ConfigError> {
        let project_id = s.get(&PROJECT_ID)?;
        if let Some(p) = &project_id {
            if p.len() > 63 {
                return Err(ConfigError::new(
                    PROJECT_ID.key.env,
                    format!("must be at most 63 characters, got {}", p.len()),
                ));
            }
        }
        let agent_name = s.get(&AGENT_NAME)?.unwrap_or_else(|| host.hostname.clone());
        if agent_name.chars().count() > 64 {
            return Err(ConfigError::new(
                AGENT_NAME.key.env,
                "must be at most 64 characters",
            ));
        }
        let worker_id = s
            .get(&WORKER_ID)?
            .unwrap_or_else(|| format!("agentd-{}", host.hostname));
        if worker_id.len() > 128 {
            return Err(ConfigError::new(
                WORKER_ID.key.env,
                "must be at most 128 bytes",
            ));
        }
        let engines = s.get(&ENGINES)?;
        let capabilities = capabilities::parse(s.get(&CAPABILITIES)?)?;
        let ca_file = s.get(&CA_FILE)?;
        if let Some(ca) = &ca_file {
            endpoints::check_ca_file(ca)?;
        }
        Ok(Identity {
            project_id,
            agent_name,
            worker_id,
            engines,
            capabilities,
            ca_file,
        })
    }
}

/// The spool settings (`Z4J_BUFFER_*`).
struct SpoolSettings {
    path: Option<PathBuf>,
    max_events: u64,
    max_bytes: u64,
    overflow: Overflow,
    synchronous: Synchronous,
}

impl SpoolSettings {
    fn read(s: &Sources) -> Result<SpoolSettings, ConfigError> {
        Ok(SpoolSettings {
            path: s.get(&SPOOL_PATH)?,
            max_events: s.get(&SPOOL_MAX_EVENTS)?,
            max_bytes: s.get(&SPOOL_MAX_BYTES)?,
            overflow: s.get(&SPOOL_OVERFLOW)?,
            synchronous: s.get(&SPOOL_SYNCHRONOUS)?,
        })
    }
}

/// Where to serve metrics, if anywhere: loopback unless allowed beyond.
/// The gateway's settings; its tokens file is read now, so a file that
/// cannot be used stops the start with an error that says why.
fn gateway_settings(s: &Sources) -> Result<Option<GatewaySettings>, ConfigError> {
    let tokens_file = s.get(&GATEWAY_TOKENS_FILE)?;
    let max_connections = s.get(&GATEWAY_MAX_CONNECTIONS)?;
    let Some(addr) = s.get(&GATEWAY_ADDR)? else {
        return Ok(None);
    };
    let addr = endpoints::parse_gateway_addr(addr.trim())?;
    if let Some(path) = &tokens_file {
        gateway_tokens::read(path).map_err(|e| ConfigError::new(GATEWAY_TOKENS_FILE.key.env, e))?;
    }
    Ok(Some(GatewaySettings {
        addr,
        tokens_file,
        max_connections,
    }))
}

fn metrics_addr(s: &Sources) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let allow_remote = s.get(&METRICS_ALLOW_REMOTE)?;
    match s.get(&METRICS_ADDR)? {
        None => Ok(None),
        Some(v) => endpoints::parse_metrics_addr(v.trim(), allow_remote).map(Some),
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
            let (p, dir) = socket_path::default_socket(host);
            if p.is_absolute() {
                return Ok(());
            }
            let from = dir.variable();
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
