//! Where the local socket lives when no path is configured: the rule the
//! daemon binds by, the configuration checks, and `status` and the doctor
//! look by. Written once here, from the host's facts ([`HostEnv`]).

use std::path::{Path, PathBuf};

use crate::host::HostEnv;

/// The socket of the host-wide daemon that the packages install
/// (`z4j-agentd.socket`).
pub const SYSTEM_SOCKET_PATH: &str = "/run/z4j-agentd/agent.sock";

/// Where a client (`status`, the doctor) looks for the daemon when no path
/// is given: the host-wide socket when it exists, else what `run` would
/// bind with the same environment.
pub fn client_socket_path(host: &HostEnv) -> PathBuf {
    client_socket_path_with(host, Path::new(SYSTEM_SOCKET_PATH))
}

fn client_socket_path_with(host: &HostEnv, system: &Path) -> PathBuf {
    if host.runtime_directory.is_none() && system.exists() {
        return system.to_path_buf();
    }
    default_socket_path(host)
}

/// Which directory the default socket path is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketDir {
    /// The service's runtime directory (`$RUNTIME_DIRECTORY`).
    Runtime,
    /// The user's runtime directory (`$XDG_RUNTIME_DIR`).
    XdgRuntime,
    /// `$TMPDIR/z4j-<uid>`, which the daemon creates private to its user.
    PrivateTmp,
}

impl SocketDir {
    /// The variable the directory comes from, for messages.
    pub fn variable(self) -> &'static str {
        match self {
            SocketDir::Runtime => "$RUNTIME_DIRECTORY",
            SocketDir::XdgRuntime => "$XDG_RUNTIME_DIR",
            SocketDir::PrivateTmp => "$TMPDIR",
        }
    }
}

/// Where `run` binds when no path is configured: the service's runtime
/// directory, else the user's runtime directory, else a private directory
/// under the temporary directory.
pub fn default_socket_path(host: &HostEnv) -> PathBuf {
    default_socket(host).0
}

/// [`default_socket_path`] and which directory it is under.
pub fn default_socket(host: &HostEnv) -> (PathBuf, SocketDir) {
    if let Some(r) = &host.runtime_directory {
        (r.join("agent.sock"), SocketDir::Runtime)
    } else if let Some(x) = &host.xdg_runtime_dir {
        (x.join("z4j").join("agent.sock"), SocketDir::XdgRuntime)
    } else {
        (
            host.tmp_private_dir().join("agent.sock"),
            SocketDir::PrivateTmp,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_prefer_the_host_wide_socket_when_it_exists() {
        let t = tempfile::tempdir().unwrap();
        let system = t.path().join("system.sock");
        let host = HostEnv {
            tmpdir: t.path().to_path_buf(),
            uid: 1000,
            xdg_runtime_dir: Some(PathBuf::from("/run/user/1000")),
            ..HostEnv::default()
        };
        assert_eq!(
            client_socket_path_with(&host, &system),
            PathBuf::from("/run/user/1000/z4j/agent.sock")
        );
        std::fs::write(&system, b"").unwrap();
        assert_eq!(client_socket_path_with(&host, &system), system);
        // The daemon's own service environment means: use what run binds.
        let service = HostEnv {
            runtime_directory: Some(PathBuf::from("/run/z4j-agentd")),
            ..host
        };
        assert_eq!(
            client_socket_path_with(&service, &system),
            PathBuf::from("/run/z4j-agentd/agent.sock")
        );
    }
}
