//! The `buffer_path` probe: the spool file `run` would open, checked the way
//! its first commit would use it. Users know the spool as the buffer
//! (`Z4J_BUFFER_PATH`, `Z4J_BUFFER_MAX_BYTES`), so the probe and its
//! messages keep that name.
//!
//! Order of the checks, each one's failure ending the probe: the path
//! resolves under the allowed roots (the spool's own clamp); its directory
//! takes a new file; an existing spool file is ours and opens for writing;
//! the filesystem has room for the spool to work at all. Then two warnings:
//! the daemon would fall back to a temporary directory, or the free space
//! is less than the spool may still grow by.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Finding;
use crate::admin::human_bytes;
use crate::config::Config;
use crate::protocol::Value;
use crate::spool::path::{self as spool_path, PathError, SpoolLocation};

/// Below this much free space the spool cannot work.
const MIN_FREE_BYTES: u64 = 16 << 20;

/// Checks the spool location; hands on its path once it resolved (the
/// report's header shows it even when a later check fails).
pub(super) fn check(c: &Config) -> (Finding, Option<String>) {
    let uid = c.host.uid;
    match spool_path::resolve(c.buffer_path.as_deref(), &c.host) {
        Ok(loc) => {
            let spool = Spool::at(&loc, uid);
            (spool.examine(c), Some(spool.path_text))
        }
        Err(e) => (
            Finding::fail(e.to_string(), path_fix(&e, uid)).detail("uid", uid as u64),
            None,
        ),
    }
}

/// The fix for a path the spool's clamp refuses.
fn path_fix(e: &PathError, uid: u32) -> String {
    match e {
        PathError::Relative(..) | PathError::OutsideRoots { .. } => {
            "set Z4J_BUFFER_PATH to an absolute path under one of the allowed roots, or unset it to use the default".into()
        }
        PathError::GroupWritable { dir, .. } => format!("chmod 700 {dir}"),
        PathError::OtherOwner { dir, .. } => format!(
            "chown {uid} {dir} (the user the daemon runs as), or set Z4J_BUFFER_PATH to a file in a directory that user owns"
        ),
        PathError::NotADirectory(_) => {
            "point Z4J_BUFFER_PATH at a file inside a real directory (no symlinks on the way)".into()
        }
        PathError::Unusable { dir, .. } => format!(
            "create {dir} as the daemon's user (install -d -m 0700 -o {uid} {dir}), or set Z4J_BUFFER_PATH (StateDirectory= under systemd)"
        ),
    }
}

/// A resolved spool location and the user that checks it.
struct Spool<'a> {
    loc: &'a SpoolLocation,
    uid: u32,
    path_text: String,
    dir: PathBuf,
    dir_text: String,
}

/// What the checks learned about the filesystem, for the verdict.
struct Room {
    /// Free bytes on the spool's filesystem, when `statvfs` answered.
    free: Option<u64>,
    /// The current size of the spool file (0 when it does not exist).
    spool_bytes: u64,
    /// "; in use by the running daemon (pid N)", or empty.
    in_use: String,
}

impl<'a> Spool<'a> {
    fn at(loc: &'a SpoolLocation, uid: u32) -> Self {
        let dir = loc.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        Spool {
            loc,
            uid,
            path_text: loc.path.display().to_string(),
            dir_text: dir.display().to_string(),
            dir,
        }
    }

    fn examine(&self, c: &Config) -> Finding {
        let uid = self.uid;
        if let Err(e) = self.dir_takes_a_file() {
            let dir = &self.dir_text;
            return Finding::fail(
                format!("buffer dir {dir} is not writable by uid {uid}: {e}"),
                format!(
                    "chown {uid} {dir} && chmod 700 {dir}, or set Z4J_BUFFER_PATH to a file in a directory uid {uid} owns"
                ),
            )
            .detail("path", self.path_text.as_str())
            .detail("uid", uid as u64);
        }
        let mut details = Value::empty_map();
        details.insert("path", self.path_text.as_str());
        details.insert("uid", uid as u64);
        let room = match self.existing_file(&mut details) {
            Ok(spool_bytes) => self.room(spool_bytes, &mut details),
            Err(refused) => return refused.with_details(details),
        };
        self.verdict(c, &room, &mut details).with_details(details)
    }

    /// Writable: the same check the spool's first commit would need.
    fn dir_takes_a_file(&self) -> std::io::Result<()> {
        let probe_file = self
            .dir
            .join(format!(".z4j-agentd-doctor-{}", std::process::id()));
        fs::write(&probe_file, b"").and_then(|()| fs::remove_file(&probe_file))
    }

    /// The spool file itself, when it exists, must be ours and writable.
    /// Returns its size, or the failure.
    fn existing_file(&self, details: &mut Value) -> Result<u64, Finding> {
        let (uid, path) = (self.uid, &self.path_text);
        let Ok(m) = fs::metadata(&self.loc.path) else {
            details.insert("spool_exists", false);
            return Ok(0);
        };
        details.insert("spool_exists", true);
        details.insert("spool_mode", format!("{:04o}", m.mode() & 0o7777));
        if m.uid() != uid {
            return Err(Finding::fail(
                format!(
                    "spool {path} belongs to uid {}, not to uid {uid} that runs this check",
                    m.uid()
                ),
                format!(
                    "run the doctor as the daemon's user, or chown {uid} {path} {path}-wal {path}-shm"
                ),
            ));
        }
        if let Err(e) = fs::OpenOptions::new().append(true).open(&self.loc.path) {
            return Err(Finding::fail(
                format!("spool {path} cannot be opened for writing: {e}"),
                format!("chmod 600 {path}"),
            ));
        }
        Ok(m.len())
    }

    /// Who holds the spool, and how much room its filesystem has.
    fn room(&self, spool_bytes: u64, details: &mut Value) -> Room {
        let lock_holder = read_lock_holder(&self.loc.path);
        if let Some(pid) = lock_holder {
            details.insert("locked_by_pid", pid as u64);
        }
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|st| st.f_bavail.saturating_mul(st.f_frsize));
        if let Some(f) = free {
            details.insert("free_bytes", f);
        }
        Room {
            free,
            spool_bytes,
            in_use: lock_holder
                .map(|pid| format!("; in use by the running daemon (pid {pid})"))
                .unwrap_or_default(),
        }
    }

    /// Too little space fails; a fallback directory or less room than the
    /// spool may still take warns.
    fn verdict(&self, c: &Config, room: &Room, details: &mut Value) -> Finding {
        let (dir, in_use) = (&self.dir_text, &room.in_use);
        if let Some(f) = room.free.filter(|f| *f < MIN_FREE_BYTES) {
            return Finding::fail(
                format!(
                    "only {} free on the filesystem of {dir}; the spool cannot store events",
                    human_bytes(f)
                ),
                "free space on that filesystem, or move the spool (Z4J_BUFFER_PATH) to one with room",
            );
        }
        if let Some(from) = &self.loc.fell_back_from {
            details.insert("fell_back_from", from.display().to_string());
            return self.fell_back(from, in_use);
        }
        let headroom = c.buffer_max_bytes.saturating_sub(room.spool_bytes);
        if let Some(f) = room.free.filter(|f| *f < headroom) {
            return Finding::warn(
                format!(
                    "buffer dir {dir} is writable, but only {} is free while the spool may grow by {} (Z4J_BUFFER_MAX_BYTES){in_use}",
                    human_bytes(f),
                    human_bytes(headroom)
                ),
                "free space there, or lower Z4J_BUFFER_MAX_BYTES below the free space",
            );
        }
        let free_text = room
            .free
            .map(|f| format!(" ({} free)", human_bytes(f)))
            .unwrap_or_default();
        Finding::ok(format!("buffer dir {dir} is writable{free_text}{in_use}"))
    }

    /// The default directory was not usable, so `run` would take the
    /// temporary one.
    fn fell_back(&self, from: &Path, in_use: &str) -> Finding {
        let (uid, path) = (self.uid, &self.path_text);
        let from_dir = from
            .parent()
            .unwrap_or(Path::new("/"))
            .display()
            .to_string();
        Finding::warn(
            format!(
                "buffer dir {from_dir} is not writable by uid {uid}; the daemon would use {path} instead, which may not survive a reboot{in_use}"
            ),
            format!(
                "create {from_dir} owned by uid {uid} (install -d -m 0700 -o {uid} {from_dir}), or set Z4J_HOME / Z4J_BUFFER_PATH (StateDirectory= under systemd)"
            ),
        )
    }
}

/// The pid in `<spool>.lock` when that process is alive.
fn read_lock_holder(spool: &Path) -> Option<u32> {
    let mut lock = spool.as_os_str().to_owned();
    lock.push(".lock");
    let text = fs::read_to_string(PathBuf::from(lock)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}
