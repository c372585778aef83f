//! `z4j-agentd status`: asks the running daemon over its socket (`stats`)
//! and renders the answer for an operator.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{Client, ClientError};
use crate::config::HostEnv;
use crate::protocol::Value;

/// Time allowed for the daemon to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where `status` looks for the daemon: `--socket-path`/`Z4J_SOCKET_PATH`,
/// else `socket_path` in the `--config` file, else the host-wide socket
/// (`/run/z4j-agentd/agent.sock`) when it exists, else the default `run` uses.
pub fn socket_path(
    explicit: Option<PathBuf>,
    config_file: Option<&Path>,
    host: &HostEnv,
) -> Result<PathBuf, String> {
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(p);
    }
    if let Some(file) = config_file.filter(|p| !p.as_os_str().is_empty()) {
        let text = crate::config::read_small_file(file, crate::config::MAX_CONFIG_FILE_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|b| {
                String::from_utf8(b).map_err(|_| format!("{} is not UTF-8 text", file.display()))
            })?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| format!("{} is not valid TOML: {}", file.display(), e.message()))?;
        if let Some(p) = table.get("socket_path").and_then(toml::Value::as_str) {
            return Ok(PathBuf::from(p));
        }
    }
    Ok(crate::ingest::client_socket_path(host))
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

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::Str(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => crate::protocol::canonical::to_vec(other)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, k: &str) -> Option<f64> {
    match v.get(k) {
        Some(Value::Float(x)) => Some(*x),
        Some(other) => other.as_i64().map(|i| i as f64),
        None => None,
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

fn list(v: Option<&Value>) -> String {
    match v {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".to_string(),
    }
}

fn by_reason(v: Option<&Value>) -> String {
    match v {
        Some(Value::Map(m)) => {
            let parts: Vec<String> = m
                .iter()
                .filter_map(|(k, v)| v.as_u64().filter(|n| *n > 0).map(|n| format!("{k} {n}")))
                .collect();
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            }
        }
        _ => "none".to_string(),
    }
}

/// The text `status` prints.
pub fn render(v: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "z4j-agentd {} (pid {}), up {}",
        s(v, "version"),
        n(v, "pid"),
        human_duration(n(v, "uptime_seconds") as f64)
    );
    let _ = writeln!(
        o,
        "brain:    {} as worker_id {} (agent {}, host label {})",
        s(v, "brain_url"),
        s(v, "worker_id"),
        s(v, "agent_id"),
        s(v, "agent_name")
    );
    let state = s(v, "uplink_state");
    let mut line = format!("uplink:   {state} since {}", s(v, "uplink_since"));
    if !matches!(v.get("disconnected_since"), None | Some(Value::Null)) {
        let _ = write!(line, ", no session since {}", s(v, "disconnected_since"));
    }
    if let Some(age) = f(v, "session_age_seconds") {
        let _ = write!(line, ", session {}", human_duration(age));
    }
    match f(v, "last_ack_age_seconds") {
        Some(a) => {
            let _ = write!(line, ", last ack {} ago", human_duration(a));
        }
        None => line.push_str(", no ack yet"),
    }
    if let Some(skew) = f(v, "clock_skew_seconds") {
        let _ = write!(line, ", clock skew {skew:+.1}s");
    }
    let _ = writeln!(o, "{line}");
    if !matches!(v.get("last_error"), None | Some(Value::Null)) {
        let _ = writeln!(
            o,
            "          last error ({}): {}",
            s(v, "last_failure_class"),
            s(v, "last_error")
        );
    }
    let _ = writeln!(
        o,
        "          failures by class: {}; in a row: {}; sessions established: {}",
        by_reason(v.get("failures_by_class")),
        n(v, "failure_streak"),
        n(v, "connects")
    );
    let oldest = f(v, "spool_oldest_age_seconds")
        .map(|a| format!(", oldest {}", human_duration(a)))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "spool:    {} events, {}{oldest} ({})",
        n(v, "spool_depth"),
        human_bytes(n(v, "spool_bytes")),
        s(v, "spool_path")
    );
    if let Some(r) = v.get("rates") {
        let _ = writeln!(
            o,
            "rates:    ingest {:.1}/s, forward {:.1}/s, acked {:.1}/s (last {:.0}s)",
            f(r, "ingest_per_second").unwrap_or(0.0),
            f(r, "forward_per_second").unwrap_or(0.0),
            f(r, "acked_per_second").unwrap_or(0.0),
            f(r, "window_seconds").unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        o,
        "totals:   received {}, stored {}, forwarded {}, acked {}, resent {}",
        n(v, "received"),
        n(v, "stored"),
        n(v, "forwarded"),
        n(v, "acked"),
        n(v, "resent")
    );
    let _ = writeln!(
        o,
        "dropped:  {} ({})",
        n(v, "dropped"),
        by_reason(v.get("dropped_by_reason"))
    );
    let _ = writeln!(
        o,
        "refused:  {} ({})",
        n(v, "refused"),
        by_reason(v.get("refused_by_reason"))
    );
    if let Some(c) = v.get("commands") {
        let _ = writeln!(
            o,
            "commands: received {}, succeeded {}, failed {}",
            n(c, "received"),
            n(c, "succeeded"),
            n(c, "failed")
        );
    }
    let _ = writeln!(
        o,
        "clients:  {} connected on {}",
        n(v, "clients"),
        s(v, "socket_path")
    );
    if let Some(Value::Array(cs)) = v.get("client_list") {
        let me = i64::from(std::process::id());
        for c in cs {
            let this = if c.get("pid").and_then(Value::as_i64) == Some(me) {
                " <- this status command"
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "          pid {:<7} uid {:<6} {:<20} engines {:<16} {} events ({}){this}",
                c.get("pid")
                    .and_then(Value::as_i64)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                n(c, "uid"),
                s(c, "process"),
                list(c.get("engines")),
                n(c, "events_received"),
                s(c, "framing")
            );
        }
    }
    let _ = writeln!(
        o,
        "engines:  {} (advertised to the brain: {})",
        list(v.get("engines")),
        list(v.get("advertised_engines"))
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolStats;
    use crate::stats::{ClientInfo, Stats};

    #[test]
    fn renders_every_section_from_a_real_report() {
        let st = Stats::new();
        st.client_connected(
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
        let text = render(&st.report(&spool));
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
            socket_path(Some("/a.sock".into()), Some(&file), &host).unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(
            socket_path(None, Some(&file), &host).unwrap(),
            PathBuf::from("/run/x/agent.sock")
        );
        assert_eq!(
            socket_path(None, None, &host).unwrap(),
            PathBuf::from("/tmp/z4j-5/agent.sock")
        );
    }
}
