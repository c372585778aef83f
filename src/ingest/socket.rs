//! Socket setup: binding the local socket (where it lives is the
//! configuration's rule, `config::socket_path`), and the process's limit on
//! open files that its connections need.
//!
//! Invariants: the socket file never exists with the wrong mode (it is
//! bound under a temporary name, given its mode, then renamed into place);
//! a live daemon's socket is never replaced; a stale one is.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::UnixListener;

/// Binding problems.
#[derive(Debug, Error)]
pub enum IngestError {
    /// Another daemon answers on the socket.
    #[error("another z4j-agentd is already listening on {0}; stop it first, or set Z4J_SOCKET_PATH to a different path")]
    AlreadyRunning(String),
    /// Something that is not a socket is in the way.
    #[error(
        "{0} exists and is not a socket; remove it or set Z4J_SOCKET_PATH to a different path"
    )]
    NotASocket(String),
    /// An I/O failure while binding.
    #[error("cannot bind the local socket {path}: {source}; check that the directory exists and this user may write to it")]
    Bind {
        /// The socket path.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
}

/// Binds the socket: replaces a stale file, refuses when a daemon answers.
/// The socket is bound under a temporary name, given its mode, then renamed
/// into place, so it never exists with the wrong mode.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, IngestError> {
    let text = path.display().to_string();
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| IngestError::Bind {
                    path: text.clone(),
                    source,
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(IngestError::NotASocket(text));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(IngestError::AlreadyRunning(text)),
                Err(_) => {
                    tracing::info!(socket = %text, "replacing the stale socket of a daemon that is gone");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(IngestError::Bind { path: text, source }),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let std_listener =
        std::os::unix::net::UnixListener::bind(&tmp).map_err(|source| IngestError::Bind {
            path: text.clone(),
            source,
        })?;
    let finish = || -> std::io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        std_listener.set_nonblocking(true)
    };
    if let Err(source) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(IngestError::Bind { path: text, source });
    }
    UnixListener::from_std(std_listener).map_err(|source| IngestError::Bind { path: text, source })
}

/// Descriptors the daemon needs besides one per client connection: the
/// spool (database, WAL, shared memory, lock), the listener, the runtime,
/// the uplink, the metrics listener, and the refusals in flight.
pub const FD_MARGIN: u64 = 64;

/// Raises this process's soft limit on open files (RLIMIT_NOFILE) to its
/// hard limit, as Go and many daemons do: each client connection takes a
/// descriptor, and the soft default (1,024 under systemd) is below what
/// `max_clients` connections need. Logs the result at debug, and one
/// warning when the limit stays below `max_clients` plus
/// `metrics_connections` (what the metrics listener may hold; 0 when it is
/// off) plus [`FD_MARGIN`]. Returns the soft limit now in force (`None`:
/// unlimited).
pub fn raise_fd_limit(
    max_clients: usize,
    metrics_connections: usize,
    gateway_connections: usize,
) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let mut limit = before.current;
    if before.current.is_some() && before.current != before.maximum {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        ) {
            Ok(()) => limit = getrlimit(Resource::Nofile).current,
            Err(e) => tracing::debug!(error = %e, "cannot raise the soft limit on open files"),
        }
    }
    let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
    tracing::debug!(
        soft_before = %show(before.current),
        soft = %show(limit),
        hard = %show(before.maximum),
        "limit on open files (RLIMIT_NOFILE)"
    );
    if let Some(needed) = fd_shortfall(
        limit,
        max_clients,
        metrics_connections + gateway_connections,
    ) {
        let mut metrics = match metrics_connections {
            0 => String::new(),
            n => format!(" + {n} for the metrics listener (Z4J_METRICS_ADDR)"),
        };
        if gateway_connections > 0 {
            metrics.push_str(&format!(
                " + {gateway_connections} for the gateway (Z4J_GATEWAY_MAX_CONNECTIONS)"
            ));
        }
        tracing::warn!(
            limit = %show(limit),
            max_clients,
            metrics_connections,
            needed,
            "the limit on open files (RLIMIT_NOFILE) is {}, below the {needed} that Z4J_MAX_CLIENTS={max_clients} connections need ({max_clients}{metrics} + {FD_MARGIN} for the daemon itself): connections beyond it wait unanswered until a descriptor frees up; raise LimitNOFILE= in the systemd unit (ulimit -n elsewhere) to at least {needed}, or lower Z4J_MAX_CLIENTS",
            show(limit)
        );
    }
    limit
}

/// The descriptors `max_clients` local and `metrics` metrics connections
/// need, when `limit` is short of it.
pub(super) fn fd_shortfall(limit: Option<u64>, max_clients: usize, metrics: usize) -> Option<u64> {
    let needed = max_clients as u64 + metrics as u64 + FD_MARGIN;
    limit.filter(|l| *l < needed).map(|_| needed)
}
