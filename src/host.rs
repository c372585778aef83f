//! The host the daemon runs on, as the process environment describes it:
//! home and state directories, the runtime directory, the temporary
//! directory, our uid and the host name.
//!
//! Invariants:
//! * read from the process once, at the edge ([`HostEnv::from_process`]),
//!   and passed in everywhere else, so tests set each value per case;
//! * holds no setting and no secret: the `Z4J_*` settings are read by
//!   [`crate::config`], which, like the spool and the socket, only
//!   consumes this value (no module depends on `config` to learn where
//!   the host keeps its directories).

use std::path::PathBuf;

/// Values that come from the process environment other than the `Z4J_*`
/// settings. Passed in (not read globally) so tests can set them per case.
#[derive(Debug, Clone, Default)]
pub struct HostEnv {
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$Z4J_HOME` (replaces `~/.z4j`).
    pub z4j_home: Option<PathBuf>,
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`), first entry.
    pub state_directory: Option<PathBuf>,
    /// `$RUNTIME_DIRECTORY` (systemd `RuntimeDirectory=`), first entry.
    pub runtime_directory: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
    /// `$TMPDIR`, default `/tmp`.
    pub tmpdir: PathBuf,
    /// Our effective uid.
    pub uid: u32,
    /// The host name.
    pub hostname: String,
}

impl HostEnv {
    /// Reads the real process environment.
    pub fn from_process() -> Self {
        fn path_var(name: &str) -> Option<PathBuf> {
            std::env::var_os(name).filter(|v| !v.is_empty()).map(|v| {
                // systemd joins several directories with ':'; the first is ours.
                let s = v.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or_default())
            })
        }
        HostEnv {
            home: path_var("HOME"),
            z4j_home: path_var("Z4J_HOME"),
            state_directory: path_var("STATE_DIRECTORY"),
            runtime_directory: path_var("RUNTIME_DIRECTORY"),
            xdg_runtime_dir: path_var("XDG_RUNTIME_DIR"),
            credentials_directory: path_var("CREDENTIALS_DIRECTORY"),
            tmpdir: path_var("TMPDIR").unwrap_or_else(|| PathBuf::from("/tmp")),
            uid: current_uid(),
            hostname: hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_string()),
        }
    }

    /// `$Z4J_HOME`, else `~/.z4j`.
    pub fn z4j_dir(&self) -> Option<PathBuf> {
        self.z4j_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".z4j")))
    }

    /// `$TMPDIR/z4j-<uid>`.
    pub fn tmp_private_dir(&self) -> PathBuf {
        self.tmpdir.join(format!("z4j-{}", self.uid))
    }
}

/// Our effective uid.
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}
