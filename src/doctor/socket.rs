//! The `socket` probe: is a daemon answering on the local socket, and if not,
//! could applications and `run` use that path?
//!
//! A daemon that answers `stats` is reported with its pid, spool depth and
//! brain state, and its answer says what its `hello` advertises, which the
//! `websocket` probe then advertises too (every `hello` overwrites the
//! agent's engines and capabilities at the brain). No daemon running is a
//! warning, not a failure: the doctor is meant to run before the first
//! start. A path that `run` could not bind, or that applications could not
//! reach, fails with the permission or path to change.
//!
//! Every outcome carries the socket file's facts (path, mode, owner) as
//! details, read once before connecting.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use super::runner::Plan;
use super::Finding;
use crate::client::{Client, ClientError};
use crate::clients::Advertisement;
use crate::config::Config;
use crate::protocol::Value;

/// Time allowed for the running daemon to answer `stats`.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(3);

/// The advice when no daemon listens.
const START: &str = "start the daemon (systemctl start z4j-agentd, or z4j-agentd run)";

/// What the running daemon told us over its socket.
#[derive(Debug, Clone, Default)]
pub(super) struct DaemonView {
    /// What its `hello` advertises to the brain.
    pub(super) advertised: Option<Advertisement>,
}

/// Reads the socket file, then asks whoever listens there for `stats`,
/// within [`DAEMON_TIMEOUT`].
pub(super) fn plan<'a>(
    c: &'a Config,
    path: &'a Path,
) -> Plan<impl Future<Output = (Finding, DaemonView)> + 'a> {
    let file = SocketFile::inspect(path, c.host.uid);
    let timed_out = file.finding(Finding::fail(
        format!(
            "a process accepts connections on {} but did not answer within {}s",
            file.text,
            DAEMON_TIMEOUT.as_secs()
        ),
        "the daemon may be stuck: check its log (journalctl -u z4j-agentd) and restart it",
    ));
    Plan::new(async move { file.ask(c).await }).within(DAEMON_TIMEOUT, timed_out)
}

/// The socket path and what `lstat` said about it.
struct SocketFile<'a> {
    path: &'a Path,
    text: String,
    uid: u32,
    meta: Option<fs::Metadata>,
    /// `path`, and `mode`, `owner_uid`, `owner_gid` when the file exists.
    details: Value,
}

impl<'a> SocketFile<'a> {
    fn inspect(path: &'a Path, uid: u32) -> Self {
        let text = path.display().to_string();
        let meta = fs::symlink_metadata(path).ok();
        let mut details = Value::empty_map();
        details.insert("path", text.as_str());
        if let Some(m) = &meta {
            details.insert("mode", format!("{:04o}", m.mode() & 0o7777));
            details.insert("owner_uid", m.uid() as u64);
            details.insert("owner_gid", m.gid() as u64);
        }
        SocketFile {
            path,
            text,
            uid,
            meta,
            details,
        }
    }

    /// `f` with the socket file's details.
    fn finding(&self, f: Finding) -> Finding {
        f.with_details(self.details.clone())
    }

    async fn ask(&self, c: &Config) -> (Finding, DaemonView) {
        let answer = async {
            let mut client = Client::connect(self.path).await?;
            client.stats().await
        };
        match answer.await {
            Ok(stats) => self.answered(c, &stats),
            Err(ClientError::Io(e)) => (self.finding(self.unreachable(e)), DaemonView::default()),
            Err(e) => (
                self.finding(Finding::fail(
                    format!("something answers on {}, but not as z4j-agentd: {e}", self.text),
                    "another program owns that path: stop it, or give z4j-agentd its own Z4J_SOCKET_PATH (and tell the applications)",
                )),
                DaemonView::default(),
            ),
        }
    }

    /// A daemon answered: report it, and warn when it is not the daemon
    /// this configuration describes (the doctor then checks the wrong one).
    fn answered(&self, c: &Config, stats: &Value) -> (Finding, DaemonView) {
        let s = |k: &str| {
            stats
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
        // The doctor's own connection is one of the clients.
        let others = n("clients").saturating_sub(1);
        let mut details = self.details.clone();
        details.insert("daemon_version", s("version"));
        details.insert("daemon_pid", n("pid"));
        details.insert("spool_depth", n("spool_depth"));
        details.insert("uplink_state", s("uplink_state"));
        details.insert("other_clients", others);
        let mode = self
            .meta
            .as_ref()
            .map(|m| format!(" (mode {:04o})", m.mode() & 0o7777))
            .unwrap_or_default();
        let summary = format!(
            "z4j-agentd {} (pid {}) answers on {}{mode}: spool {} events, brain {}, {others} other client(s)",
            s("version"),
            n("pid"),
            self.text,
            n("spool_depth"),
            s("uplink_state"),
        );
        let (brain, worker) = (&c.uplink.endpoint.base_url, &c.uplink.worker_id);
        let finding = if s("brain_url") != *brain || s("worker_id") != *worker {
            Finding::warn(
                format!(
                    "{summary}; but it uses brain {} as worker_id {}, while this configuration says {brain} as {worker}",
                    s("brain_url"),
                    s("worker_id"),
                ),
                "run the doctor as the service's user with the service's environment, config file and credentials (see \"Run the doctor first\" in docs/troubleshooting.md), so it checks what the daemon uses",
            )
        } else {
            Finding::ok(summary)
        };
        (finding.with_details(details), daemon_view(stats))
    }

    /// Connecting failed: why, from the error and the file's type and mode.
    fn unreachable(&self, e: io::Error) -> Finding {
        let (text, uid) = (&self.text, self.uid);
        match (e.kind(), &self.meta) {
            (io::ErrorKind::PermissionDenied, None) => Finding::fail(
                format!("uid {uid} cannot reach {text}: a directory on the way is not searchable ({e})"),
                "run the doctor as the daemon's user or a member of its group; applications need the same access to the socket's directory",
            ),
            (io::ErrorKind::PermissionDenied, Some(m)) => Finding::fail(
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
            (io::ErrorKind::ConnectionRefused, Some(m)) if m.file_type().is_socket() => Finding::warn(
                format!("no daemon listens on {text} (a socket file from an earlier run is left; `run` replaces it)"),
                START,
            ),
            (_, Some(m)) if !m.file_type().is_socket() => Finding::fail(
                format!("{text} exists and is not a socket; `run` would refuse to replace it"),
                format!("remove {text} or set Z4J_SOCKET_PATH to another path"),
            ),
            (io::ErrorKind::NotFound, None) => self.absent(),
            _ => Finding::fail(format!("cannot connect to {text}: {e}"), START),
        }
    }

    /// Nothing is at the path: fine if `run` can create it. `run` creates
    /// missing directories, so the nearest existing one must be writable.
    fn absent(&self) -> Finding {
        let (text, uid) = (&self.text, self.uid);
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let dir_text = dir.display().to_string();
        let existing = dir
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let probe = existing.join(format!(".z4j-agentd-doctor-{}", std::process::id()));
        let creatable = fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| format!("{}: {e}", existing.display()));
        match creatable {
            Ok(()) => Finding::warn(
                format!("no daemon is running: nothing listens on {text} (the path is usable, so `run` can bind it)"),
                START,
            ),
            Err(why) => Finding::fail(
                format!("`run` could not create {text}: directory {dir_text} is not usable by uid {uid} ({why})"),
                format!(
                    "create {dir_text} for uid {uid} (RuntimeDirectory=z4j-agentd under systemd gives /run/z4j-agentd), or set Z4J_SOCKET_PATH to a path in a directory this user can write"
                ),
            ),
        }
    }
}

/// What the daemon advertises once its hello catches up with its clients:
/// the doctor's hello must not take anything away.
fn daemon_view(stats: &Value) -> DaemonView {
    let mut capabilities = BTreeMap::new();
    if let Some(Value::Map(m)) = stats.get("capabilities") {
        for (engine, actions) in m {
            capabilities.insert(engine.clone(), strings(Some(actions)));
        }
    }
    DaemonView {
        advertised: Some(Advertisement {
            engines: strings(stats.get("engines")),
            capabilities,
            runtime_features: strings(stats.get("runtime_features")),
            schedulers: strings(stats.get("schedulers")),
        }),
    }
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
