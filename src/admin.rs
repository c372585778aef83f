//! `z4j-agentd status`: asks the running daemon over its socket (`stats`)
//! and renders the answer for an operator.
//!
//! The reply is read back into the [`Snapshot`] the daemon rendered it
//! from, so the text and the reply cannot drift apart; a daemon of another
//! version that leaves keys out or adds some still renders.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{Client, ClientError};
use crate::config::Options;
use crate::host::HostEnv;
use crate::protocol::Value;
use crate::stats::Snapshot;

/// Time allowed for the daemon to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where `status` looks for the daemon: `socket_path` as `run` reads it
/// ([`Options::socket_path`]: `--socket-path`/`Z4J_SOCKET_PATH`, else the
/// `--config` file), else the host-wide socket (`/run/z4j-agentd/agent.sock`)
/// when it exists, else the default `run` uses. A config file that cannot
/// be read or that `run` would refuse is an error saying why.
pub fn socket_path(
    explicit: Option<PathBuf>,
    config_file: Option<PathBuf>,
    host: &HostEnv,
) -> Result<PathBuf, String> {
    let options = Options {
        socket_path: explicit,
        config: config_file,
        ..Options::default()
    };
    match options.socket_path() {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Ok(crate::config::client_socket_path(host)),
        Err(e) => Err(e.message),
    }
}

/// Asks the daemon on `path` for its `stats`.
pub async fn fetch(path: &Path) -> Result<Value, String> {
    let ask = async {
        let mut c = Client::connect(path).await?;
        c.stats().await
    };
    match tokio::time::timeout(TIMEOUT, ask).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(ClientError::Io(e))) => Err(match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no z4j-agentd answers on {} ({e}); is it running? (systemctl status z4j-agentd). If it uses another socket, pass --socket-path or set Z4J_SOCKET_PATH",
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "not allowed to connect to {} ({e}); run as the daemon's user or a member of the socket's group",
                path.display()
            ),
            _ => format!("cannot talk to the daemon on {}: {e}", path.display()),
        }),
        Ok(Err(e)) => Err(format!(
            "unexpected answer on {}: {e}",
            path.display()
        )),
        Err(_) => Err(format!(
            "the daemon on {} did not answer within {}s",
            path.display(),
            TIMEOUT.as_secs()
        )),
    }
}

/// `1h 2m 3s`.
pub fn human_duration(secs: f64) -> String {
    let total = secs.max(0.0);
    if total < 60.0 {
        return format!("{total:.1}s");
    }
    let t = total as u64;
    let (d, h, m, s) = (t / 86_400, t / 3600 % 24, t / 60 % 60, t % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

/// `512 B`, `3.0 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `a, b`, or `-` when empty.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(", ")
    }
}

/// `reason n, ...` for the reasons that counted something, or `none`.
fn by_reason<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let parts: Vec<String> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

fn by_key(m: &BTreeMap<String, u64>) -> String {
    by_reason(m.iter().map(|(k, n)| (k.as_str(), *n)))
}

/// The value, or `-` when the daemon has none.
fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// The text `status` prints for a `stats` reply, or why it cannot be read.
pub fn render(reply: &Value) -> Result<String, String> {
    let s = Snapshot::from_value(reply).map_err(|e| {
        format!("cannot read the daemon's stats reply ({e}); `z4j-agentd status --json` shows it as it was sent")
    })?;
    let mut o = String::new();
    render_daemon(&mut o, &s);
    render_uplink(&mut o, &s);
    render_counts(&mut o, &s);
    render_clients(&mut o, &s);
    Ok(o)
}

/// Which daemon, since when, talking to which brain as whom.
fn render_daemon(o: &mut String, s: &Snapshot) {
    let _ = writeln!(
        o,
        "z4j-agentd {} (pid {}), up {}",
        s.version,
        s.pid,
        human_duration(s.uptime.as_secs() as f64)
    );
    let _ = writeln!(
        o,
        "brain:    {} as worker_id {} (agent {}, host label {})",
        s.brain_url,
        s.worker_id,
        or_dash(&s.agent_id),
        s.agent_name
    );
    render_versions(o, s);
}

/// The brain's version and the z4j contract line named to it (`hello`'s
/// `agent_version`), next to the daemon's own version shown above.
fn render_versions(o: &mut String, s: &Snapshot) {
    if s.brain_version.is_none() && s.contract_line.is_none() {
        return;
    }
    let _ = writeln!(
        o,
        "versions: brain {}, z4j contract line named {} (agent_version; this daemon is z4j-agentd {})",
        or_dash(&s.brain_version),
        or_dash(&s.contract_line),
        s.version
    );
}

/// The uplink's state, its last error and its failures.
fn render_uplink(o: &mut String, s: &Snapshot) {
    let mut line = format!(
        "uplink:   {} since {}",
        s.uplink_state.as_str(),
        s.uplink_since
    );
    if let Some(t) = &s.disconnected_since {
        let _ = write!(line, ", no session since {t}");
    }
    if let Some(age) = s.session_age_seconds {
        let _ = write!(line, ", session {}", human_duration(age));
    }
    match s.last_ack_age_seconds {
        Some(a) => {
            let _ = write!(line, ", last ack {} ago", human_duration(a));
        }
        None => line.push_str(", no ack yet"),
    }
    if let Some(skew) = s.clock_skew_seconds {
        let _ = write!(line, ", clock skew {skew:+.1}s");
    }
    let _ = writeln!(o, "{line}");
    render_transport(o, s);
    if let Some(e) = &s.last_error {
        let _ = writeln!(
            o,
            "          last error ({}): {e}",
            or_dash(&s.last_failure_class)
        );
    }
    let _ = writeln!(
        o,
        "          failures by class: {}; in a row: {}; sessions established: {}",
        by_key(&s.failures_by_class),
        s.failure_streak,
        s.connects
    );
}

/// How the daemon reaches the brain, when it is not the plain WebSocket.
fn render_transport(o: &mut String, s: &Snapshot) {
    match (s.transport.as_deref(), s.transport_setting.as_deref()) {
        (Some("longpoll"), Some("longpoll")) => {
            let _ = writeln!(
                o,
                "          transport: HTTPS long-poll (Z4J_TRANSPORT=longpoll)"
            );
        }
        (Some("longpoll"), _) => {
            let _ = writeln!(
                o,
                "          transport: HTTPS long-poll, because the WebSocket upgrade was refused ({}); the WebSocket is tried again now and then (Z4J_TRANSPORT=auto)",
                or_dash(&s.longpoll_reason)
            );
        }
        _ if s.transport_fallbacks > 0 => {
            let _ = writeln!(
                o,
                "          transport: WebSocket (on long-poll {} time(s) since start)",
                s.transport_fallbacks
            );
        }
        _ => {}
    }
}

/// The spool, the rates and every event count.
fn render_counts(o: &mut String, s: &Snapshot) {
    let oldest = s
        .spool_oldest_age_seconds
        .map(|a| format!(", oldest {}", human_duration(a)))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "spool:    {} events, {}{oldest} ({})",
        s.spool_depth,
        human_bytes(s.spool_bytes),
        s.spool_path
    );
    let c = &s.spool_checkpoint;
    if c.on_commit || c.error.is_some() {
        let _ = writeln!(
            o,
            "wal:      {}; the checkpointer fails ({}): commits checkpoint themselves",
            human_bytes(c.wal_bytes),
            c.error.as_deref().unwrap_or("stuck")
        );
    }
    if let Some(r) = &s.rates {
        let _ = writeln!(
            o,
            "rates:    ingest {:.1}/s, forward {:.1}/s, acked {:.1}/s (last {:.0}s)",
            r.ingest, r.forward, r.acked, r.window_seconds
        );
    }
    let _ = writeln!(
        o,
        "totals:   received {}, stored {}, forwarded {}, acked {}, resent {}",
        s.received, s.stored, s.forwarded, s.acked, s.resent
    );
    let _ = writeln!(
        o,
        "dropped:  {} ({})",
        s.dropped,
        by_reason(s.dropped_by_reason.by_reason())
    );
    let _ = writeln!(
        o,
        "refused:  {} ({})",
        s.refused,
        by_key(&s.refused_by_reason)
    );
    if let Some(c) = &s.commands {
        let _ = writeln!(
            o,
            "commands: received {}, succeeded {}, failed {}",
            c.received, c.succeeded, c.failed
        );
    }
    if let Some(h) = &s.health {
        let _ = writeln!(
            o,
            "health:   reports received {}, refused {}, expired {}; cut from heartbeats: {}",
            h.received,
            h.refused,
            h.expired,
            by_reason(h.cut.by_kind())
        );
    }
}

/// The connected clients (marking the one asking) and the engines.
fn render_clients(o: &mut String, s: &Snapshot) {
    if let Some(g) = &s.gateway {
        let closed: Vec<String> = g
            .closed_by_code
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        let _ = writeln!(
            o,
            "gateway:  {}: z4j agent sessions open {}, since start {}; frames received {}; closed by code: {}",
            g.addr,
            g.connections,
            g.sessions,
            g.frames_received,
            if closed.is_empty() { "none".to_string() } else { closed.join(", ") }
        );
    }
    let _ = writeln!(o, "clients:  {} connected on {}", s.clients, s.socket_path);
    let me = i64::from(std::process::id());
    for c in &s.client_list {
        let this = if c.pid == Some(me) {
            " <- this status command"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "          pid {:<7} uid {:<6} {:<20} engines {:<16} {} events ({}){this}",
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.uid,
            or_dash(&c.process),
            list(&c.engines),
            c.events_received,
            c.framing
        );
        render_reported(o, c);
    }
    let _ = writeln!(
        o,
        "engines:  {} (advertised to the brain: {})",
        list(&s.engines),
        list(&s.advertised_engines)
    );
    if let Some(r) = &s.remembered {
        render_remembered(o, r);
    }
}

/// What is advertised only because it was before the restart.
fn render_remembered(o: &mut String, r: &crate::clients::RememberedReport) {
    let mut kept: Vec<String> = r.engines.clone();
    kept.extend(r.schedulers.iter().map(|s| format!("scheduler {s}")));
    kept.extend(
        r.capabilities
            .iter()
            .map(|(k, actions)| format!("{k}: {}", actions.join(" "))),
    );
    kept.extend(r.runtime_features.iter().map(|f| format!("feature {f}")));
    let _ = writeln!(
        o,
        "          remembered from before the restart, until {} ({} left) unless declared again: {}",
        r.until,
        human_duration(r.seconds_left),
        kept.join(", ")
    );
}

/// Most workers and queues `status` lists per engine of a client.
const MAX_LISTED: usize = 20;

/// A client's schedulers and what its latest health report says: per
/// engine its workers (pid, concurrency, queues), queue depths and facts.
fn render_reported(o: &mut String, c: &crate::stats::ClientReport) {
    const IND: &str = "            ";
    if !c.schedulers.is_empty() {
        let _ = writeln!(o, "{IND}schedulers {}", list(&c.schedulers));
    }
    let Some(h) = &c.health else {
        return;
    };
    let _ = writeln!(
        o,
        "{IND}health reported {} (fresh for {}s)",
        h.reported_at, h.fresh_for_seconds
    );
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    for (engine, e) in &h.engines {
        if e.workers.len() > MAX_LISTED {
            let _ = writeln!(
                o,
                "{IND}  {engine}: {} workers, the first {MAX_LISTED} listed (`status --json` lists all)",
                e.workers.len()
            );
        }
        for w in e.workers.iter().take(MAX_LISTED) {
            let _ = writeln!(
                o,
                "{IND}  {engine} worker {}: pid {}, concurrency {}, queues {}",
                w.name,
                opt(w.pid),
                opt(w.concurrency),
                list(&w.queues)
            );
        }
        if !e.queue_depths.is_empty() {
            let mut depths: Vec<String> = e
                .queue_depths
                .iter()
                .take(MAX_LISTED)
                .map(|(q, d)| format!("{q} {d}"))
                .collect();
            if e.queue_depths.len() > MAX_LISTED {
                depths.push(format!("{} more", e.queue_depths.len() - MAX_LISTED));
            }
            let _ = writeln!(o, "{IND}  {engine} queues: {}", depths.join(", "));
        }
        if !e.facts.is_empty() {
            let facts: Vec<String> = e.facts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(o, "{IND}  {engine} facts: {}", facts.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::ClientInfo;
    use crate::spool::SpoolStats;
    use crate::stats::Stats;

    #[test]
    fn renders_every_section_from_a_real_report() {
        let st = Stats::new();
        st.clients.connected(
            7,
            ClientInfo {
                pid: Some(4242),
                uid: 33,
                process: Some("celery-worker".into()),
                engines: vec!["celery".into()],
                framing: "msgpack",
                events_received: 12,
                ..Default::default()
            },
        );
        st.refuse(crate::refusal::RefusalCode::InvalidEvent, 3);
        st.record_failure("connection");
        st.update_uplink(|u| u.last_error = Some("cannot reach ws://x: refused".into()));
        let spool = SpoolStats::default();
        spool.depth.store(5, std::sync::atomic::Ordering::Relaxed);
        let text = render(&st.report(&spool)).unwrap();
        for needle in [
            "uplink:   connecting",
            "spool:    5 events",
            "refused:  3 (invalid_event 3)",
            "pid 4242",
            "celery-worker",
            "engines:  celery",
            "last error (-): cannot reach ws://x: refused",
            "failures by class: connection 1",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
    }

    /// The golden `stats` reply, edited.
    fn reply(edit: impl FnOnce(&mut Value)) -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/stats_reply.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut v);
        v
    }

    #[test]
    fn status_text_is_unchanged_for_the_same_reply() {
        let live = reply(|v| {
            v.insert("session_started_at", "2026-12-01T09:00:00.000000Z");
            v.insert("session_age_seconds", 3725.5);
            v.insert("last_ack_at", "2026-12-01T10:02:03.000000Z");
            v.insert("last_ack_age_seconds", 2.25);
            v.insert("spool_oldest_age_seconds", 61.0);
            if let Some(left) = v
                .get_mut("remembered")
                .and_then(|r| r.get_mut("seconds_left"))
            {
                *left = Value::from(42.5);
            }
        });
        crate::stats::fixture::golden("status_live.txt", &render(&live).unwrap());
        // An older daemon leaves keys out, a newer one adds some.
        let other = reply(|v| {
            for k in [
                "commands",
                "health",
                "rates",
                "metrics_refused_by_reason",
                "disconnected_since",
                "brain_rejected",
                "last_error",
                "failures_by_class",
                "client_list",
                "contract_line",
                "contract_rehellos",
            ] {
                v.remove(k);
            }
            v.insert("added_later", 1u64);
        });
        crate::stats::fixture::golden("status_other_daemon.txt", &render(&other).unwrap());
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(1.25), "1.2s");
        assert_eq!(human_duration(125.0), "2m 5s");
        assert_eq!(human_duration(3_725.0), "1h 2m 5s");
        assert_eq!(human_duration(90_000.0), "1d 1h 0m");
    }

    #[test]
    fn socket_path_prefers_the_flag_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agentd.toml");
        std::fs::write(&file, "socket_path = \"/run/x/agent.sock\"\n").unwrap();
        let host = HostEnv {
            tmpdir: "/tmp".into(),
            uid: 5,
            ..HostEnv::default()
        };
        assert_eq!(
            socket_path(Some("/a.sock".into()), Some(file.clone()), &host).unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(
            socket_path(None, Some(file.clone()), &host).unwrap(),
            PathBuf::from("/run/x/agent.sock")
        );
        assert_eq!(
            socket_path(None, None, &host).unwrap(),
            PathBuf::from("/tmp/z4j-5/agent.sock")
        );
        // An empty flag counts as not given, as for `run`.
        assert_eq!(
            socket_path(Some("".into()), Some(file.clone()), &host).unwrap(),
            PathBuf::from("/run/x/agent.sock")
        );
    }

    #[test]
    fn socket_path_reads_the_file_as_run_does() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostEnv {
            tmpdir: "/tmp".into(),
            uid: 5,
            ..HostEnv::default()
        };
        let missing = dir.path().join("missing.toml");
        let e = socket_path(None, Some(missing.clone()), &host).unwrap_err();
        assert!(
            e.starts_with(&format!("cannot read {}: ", missing.display())),
            "{e}"
        );
        // A key `run` does not know is refused, not skipped.
        let typo = dir.path().join("typo.toml");
        std::fs::write(&typo, "sokcet_path = \"/run/x/agent.sock\"\n").unwrap();
        let e = socket_path(None, Some(typo), &host).unwrap_err();
        assert!(e.contains("unknown field `sokcet_path`"), "{e}");
        let wrong_type = dir.path().join("int.toml");
        std::fs::write(&wrong_type, "socket_path = 3\n").unwrap();
        assert!(socket_path(None, Some(wrong_type), &host).is_err());
    }
}
