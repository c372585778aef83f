//! What systemd hands the daemon (the notify socket, the watchdog timeout
//! and, under socket activation, the listening socket) and the status text
//! it shows.
//!
//! Everything here reads the process environment, so [`activated_socket`]
//! runs once, first thing in `main`, before any thread exists (listenfd
//! clears `LISTEN_FDS` and `LISTEN_PID` so children never inherit them).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::stats::Snapshot;

/// The name the socket unit gives our listening socket (`FileDescriptorName=`).
pub const FD_NAME: &str = "agent";

/// The `STATUS=` text `systemctl status` shows: the brain's state, the
/// spool, what was lost and how many clients are connected.
pub fn status_text(s: &Snapshot) -> String {
    let failing = if s.spool_write_failing {
        " (spool writes failing)"
    } else {
        ""
    };
    format!(
        "brain {}; spool {} events{failing}; dropped {}; clients {}",
        s.uplink_state.as_str(),
        s.spool_depth,
        s.dropped,
        s.clients
    )
}

/// Sends states to the service manager; a no-op outside systemd.
pub fn notify(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(state);
}

/// The watchdog timeout systemd expects pings within (`WATCHDOG_USEC`,
/// for this pid), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// A listening socket passed by the service manager.
#[derive(Debug, Clone)]
pub struct Activated {
    /// The listener (shared so the configuration stays `Clone`).
    pub listener: Arc<UnixListener>,
    /// Where it is bound, when it has a path.
    pub path: Option<PathBuf>,
    /// The name systemd gave it, if any.
    pub name: Option<String>,
}

/// Why the passed sockets cannot be used.
#[derive(Debug, Error)]
pub enum ActivationError {
    /// Several sockets and none named for us.
    #[error(
        "systemd passed {count} sockets ({names}) and none is named {FD_NAME:?}; set FileDescriptorName={FD_NAME} on the Unix stream socket in z4j-agentd.socket"
    )]
    Ambiguous {
        /// How many.
        count: usize,
        /// Their names, as passed.
        names: String,
    },
    /// The chosen descriptor is not a listening Unix stream socket.
    #[error(
        "the socket systemd passed (fd {fd}) is not a Unix stream socket: {source}; use ListenStream=/run/z4j-agentd/agent.sock in z4j-agentd.socket"
    )]
    NotUnixStream {
        /// The descriptor number.
        fd: usize,
        /// What listenfd found.
        source: std::io::Error,
    },
}

/// Takes the socket systemd passed, if any: reads `LISTEN_FDS`,
/// `LISTEN_PID` and `LISTEN_FDNAMES` and takes the one named [`FD_NAME`],
/// or the only one. Call before any thread is spawned.
pub fn activated_socket() -> Result<Option<Activated>, ActivationError> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .ok()
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let count = fds.len();
    if count == 0 {
        return Ok(None);
    }
    let index = match pick(count, &names) {
        Some(i) => i,
        None => {
            return Err(ActivationError::Ambiguous {
                count,
                names: if names.is_empty() {
                    "unnamed".into()
                } else {
                    names.join(", ")
                },
            })
        }
    };
    let listener = match fds.take_unix_listener(index) {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(ActivationError::NotUnixStream {
                fd: 3 + index,
                source,
            })
        }
    };
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from));
    Ok(Some(Activated {
        listener: Arc::new(listener),
        path,
        name: names.get(index).cloned(),
    }))
}

/// Which of `count` passed sockets is ours.
fn pick(count: usize, names: &[String]) -> Option<usize> {
    if let Some(i) = names.iter().position(|n| n == FD_NAME) {
        if i < count {
            return Some(i);
        }
    }
    (count == 1).then_some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_named_socket_wins_and_a_single_one_needs_no_name() {
        assert_eq!(pick(1, &[]), Some(0));
        assert_eq!(pick(1, &names(&["whatever"])), Some(0));
        assert_eq!(pick(2, &names(&["metrics", "agent"])), Some(1));
        assert_eq!(pick(2, &names(&["a", "b"])), None);
        assert_eq!(pick(2, &[]), None);
    }

    #[test]
    fn the_status_text_reads_the_snapshot() {
        let sp = crate::spool::SpoolStats::default();
        crate::stats::fixture::spool(&sp);
        let s = crate::stats::fixture::stats().snapshot(&sp);
        assert_eq!(
            status_text(&s),
            "brain backoff; spool 42 events (spool writes failing); dropped 52; clients 2"
        );
        let calm = Snapshot {
            spool_write_failing: false,
            ..s
        };
        assert_eq!(
            status_text(&calm),
            "brain backoff; spool 42 events; dropped 52; clients 2"
        );
    }
}
