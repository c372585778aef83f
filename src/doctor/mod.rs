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
//! Layout: this file holds the report (what each probe found, the text and
//! `--json` renderings) and [`run`], which names the probes in order.
//! [`runner`] applies the time limits and the skip rule, once for all
//! probes. Each probe lives in its own file and only finds: it returns a
//! [`Finding`] (status, message, fix, details) and what the probes after it
//! need; it never decides whether the run goes on. The `websocket` probe
//! dials and says `hello` with the uplink's own code, and turns the
//! brain's reply into a finding in [`brain_reply`], which reads it with
//! the uplink's reader and explains closes with the uplink's close-code
//! table.
//!
//! The JSON schema of `--json` is documented in `docs/doctor.md`; the probe
//! names, messages and fixes are part of that contract.

mod brain_reply;
mod clock;
mod config;
mod dns;
mod gateway;
mod longpoll;
mod runner;
mod socket;
mod spool;
mod tcp;
mod tls;
mod transports;
mod websocket;

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::{Config, Options, Transport};
use crate::host::HostEnv;
use crate::protocol::Value;
use runner::{Plan, Runner};

/// Time allowed for DNS, TCP and TLS each.
const NET_TIMEOUT: Duration = Duration::from_secs(5);

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

/// What a probe found, before the runner gives it the probe's name.
#[derive(Debug, Clone)]
struct Finding {
    status: ProbeStatus,
    message: String,
    fix: Option<String>,
    details: Value,
}

impl Finding {
    fn new(status: ProbeStatus, message: impl Into<String>) -> Self {
        Finding {
            status,
            message: message.into(),
            fix: None,
            details: Value::empty_map(),
        }
    }

    fn ok(message: impl Into<String>) -> Self {
        Finding::new(ProbeStatus::Ok, message)
    }

    fn warn(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding::new(ProbeStatus::Warn, message).with_fix(fix)
    }

    fn fail(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding::new(ProbeStatus::Fail, message).with_fix(fix)
    }

    fn skip(message: impl Into<String>) -> Self {
        Finding::new(ProbeStatus::Skip, message)
    }

    fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    fn detail(mut self, key: &str, v: impl Into<Value>) -> Self {
        self.details.insert(key, v);
        self
    }

    /// Replaces the details with `details` (a map built up by the probe).
    fn with_details(self, details: Value) -> Self {
        Finding { details, ..self }
    }

    fn named(self, name: &'static str) -> Probe {
        Probe {
            name,
            status: self.status,
            message: self.message,
            fix: self.fix,
            details: self.details,
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
pub const PROBES: [&str; 10] = [
    "config",
    "buffer_path",
    "socket",
    "gateway",
    "dns",
    "tcp",
    "tls",
    "websocket",
    "longpoll",
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

impl Header {
    /// The fields in report order, as `(key, value)`.
    fn fields(&self) -> [(&'static str, &Option<String>); 7] {
        [
            ("brain_url", &self.brain_url),
            ("project_id", &self.project_id),
            ("agent_name", &self.agent_name),
            ("worker_id", &self.worker_id),
            ("buffer_path", &self.buffer_path),
            ("socket_path", &self.socket_path),
            ("transport", &self.transport),
        ]
    }

    /// What the settings say before they are validated: the header of a
    /// run whose `config` probe fails.
    fn peeked(options: &Options) -> Self {
        let peek = options.peek();
        Header {
            brain_url: peek.brain_url,
            project_id: peek.project_id,
            agent_name: peek.agent_name,
            buffer_path: peek.buffer_path.map(|p| p.display().to_string()),
            socket_path: peek.socket_path.map(|p| p.display().to_string()),
            ..Header::default()
        }
    }

    /// What the validated configuration says.
    fn resolved(&mut self, config: &Config, socket_path: &std::path::Path) {
        self.brain_url = Some(config.uplink.endpoint.base_url.clone());
        self.project_id = config.project_id.clone();
        self.agent_name = Some(config.uplink.agent_name.clone());
        self.worker_id = Some(config.uplink.worker_id.clone());
        let endpoint = &config.uplink.endpoint;
        let longpoll = format!("longpoll {}/api/v1/agent/", endpoint.base_url);
        self.transport = Some(match config.uplink.transport {
            Transport::WebSocket => format!("websocket {}", endpoint.ws_url),
            Transport::LongPoll => longpoll,
            Transport::Auto => format!(
                "websocket {} (auto: {longpoll} when the upgrade is refused)",
                endpoint.ws_url
            ),
        });
        self.socket_path = Some(socket_path.display().to_string());
    }
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
        let mut config = Value::empty_map();
        for (k, v) in self.header.fields() {
            config.insert(k, v.clone().map(Value::from).unwrap_or(Value::Null));
        }
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
        for (k, v) in self.header.fields() {
            let v = v.as_deref().unwrap_or("(unknown)");
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
        let _ = writeln!(out, "{}", self.verdict());
        out
    }

    /// The last line of the text report.
    fn verdict(&self) -> String {
        let count = |s: ProbeStatus| self.probes.iter().filter(|p| p.status == s).count();
        let failed: Vec<&str> = self
            .probes
            .iter()
            .filter(|p| p.status == ProbeStatus::Fail)
            .map(|p| p.name)
            .collect();
        if !failed.is_empty() {
            return format!("failed: {}", failed.join(", "));
        }
        match count(ProbeStatus::Warn) {
            0 => "all checks passed".to_string(),
            warns => format!("all checks passed ({warns} warning(s) above)"),
        }
    }
}

/// Runs every probe, in the order of [`PROBES`]. `websocket = false` is
/// `--no-websocket`.
pub async fn run(options: &Options, host: HostEnv, websocket: bool) -> Report {
    let mut header = Header::peeked(options);
    let mut runner = Runner::default();
    let config = runner
        .probe("config", || Plan::now(config::check(options, host)))
        .await
        .flatten();
    let Some(config) = config else {
        return runner.report(header);
    };
    let socket_path = config
        .socket_path
        .clone()
        .unwrap_or_else(|| crate::config::client_socket_path(&config.host));
    header.resolved(&config, &socket_path);
    let spool = runner
        .probe("buffer_path", || Plan::now(spool::check(&config)))
        .await;
    if let Some(Some(path)) = spool {
        header.buffer_path = Some(path);
    }
    let daemon = runner
        .probe("socket", || socket::plan(&config, &socket_path))
        .await
        .unwrap_or_default();
    match config.gateway.as_ref().map(|g| g.addr) {
        Some(addr) => {
            let timed_out = Finding::fail(
                format!(
                    "the gateway on {addr} did not finish the handshake within {}s",
                    gateway::TIMEOUT.as_secs()
                ),
                "the daemon may be stuck: check its log and restart it",
            );
            runner
                .probe("gateway", || {
                    Plan::new(async { (gateway::check(&config, addr, &daemon).await, ()) })
                        .within(gateway::TIMEOUT, timed_out)
                })
                .await;
        }
        None => runner.skip("gateway", "skipped: Z4J_GATEWAY_ADDR is not set"),
    }
    let target = Target::of(&config);
    let addrs = runner
        .probe("dns", || dns::plan(&target))
        .await
        .unwrap_or_default();
    let reached = runner
        .probe("tcp", || Plan::new(tcp::check(&target, &addrs)))
        .await
        .flatten();
    runner
        .probe("tls", || Plan::new(tls::check(&config, &target, reached)))
        .await;
    if !websocket {
        runner.skip(
            "websocket",
            "skipped (--no-websocket): the token and the HMAC secret were not checked",
        );
        runner.skip(
            "longpoll",
            "skipped (--no-websocket): the token and the HMAC secret were not checked",
        );
        runner.skip(
            "clock",
            "skipped (--no-websocket): the brain's clock is read from its hello_ack",
        );
        return runner.report(header);
    }
    let found = runner
        .probe("websocket", || {
            Plan::new(ways_to_the_brain(&config, &daemon))
        })
        .await;
    let (ack, longpoll, lp_skew) = found.unwrap_or_default();
    if let Some(lp) = longpoll {
        runner.probe("longpoll", || Plan::now((lp, ()))).await;
    }
    if let Some(a) = &ack {
        header.project_id = Some(a.project_id.clone());
    }
    let skew = ack.as_ref().and_then(|a| a.clock_skew_seconds).or(lp_skew);
    runner
        .probe("clock", || Plan::now(clock::check(skew)))
        .await;
    runner.report(header)
}

/// The `websocket` probe's finding, and what it hands on: the `hello_ack`,
/// the `longpoll` probe's finding (judged with the websocket one under
/// `Z4J_TRANSPORT`), and the brain's clock as long-poll read it.
async fn ways_to_the_brain(
    config: &Config,
    daemon: &socket::DaemonView,
) -> (
    Finding,
    (
        Option<crate::uplink::connect::HelloAck>,
        Option<Finding>,
        Option<f64>,
    ),
) {
    let transport = config.uplink.transport;
    let (ws, outcome) = match transport {
        Transport::LongPoll => (
            Finding::skip("skipped: Z4J_TRANSPORT=longpoll, the WebSocket is not used"),
            websocket::Outcome::default(),
        ),
        _ => websocket::check(config, daemon).await,
    };
    let (lp, lp_skew) = match transports::longpoll_runs(transport, &ws, outcome.upgrade_refused) {
        true => {
            let (f, skew) = longpoll::check(config).await;
            (Some(f), skew)
        }
        false => (None, None),
    };
    let (ws, lp) = transports::judge(transport, ws, outcome.upgrade_refused, lp);
    (ws, (outcome.ack, Some(lp), lp_skew))
}

/// Where the brain listens, as the network probes (dns, tcp, tls) need it.
struct Target {
    /// The host name or address, without the brackets of an IPv6 literal.
    host: String,
    /// The port of the WebSocket URL (or the scheme's default).
    port: u16,
}

impl Target {
    fn of(c: &Config) -> Self {
        let endpoint = &c.uplink.endpoint;
        let port = url::Url::parse(&endpoint.ws_url)
            .ok()
            .and_then(|u| u.port_or_known_default())
            .unwrap_or(if endpoint.tls { 443 } else { 80 });
        let host = endpoint
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Target { host, port }
    }
}

#[cfg(test)]
mod tests;
