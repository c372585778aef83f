//! Whether this process can write the spool, found before the daemon
//! reports ready, and the [`SpoolError::NotWritable`] that names the path,
//! the reason and the fix when it cannot.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::SpoolError;

/// Creates and removes a file in the spool's directory: the directory must
/// take new files (SQLite creates the `-wal` and `-shm` files there).
pub(super) fn probe_directory(spool: &Path) -> Result<(), SpoolError> {
    let dir = spool.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".z4j-agentd-write-probe-{}", std::process::id()));
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&probe);
    match made {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(
            not_writable(spool, dir, &e).unwrap_or_else(|| SpoolError::Open {
                path: spool.display().to_string(),
                message: format!("cannot create a file in {}: {e}", dir.display()),
            }),
        ),
    }
}

/// The [`SpoolError::NotWritable`] for `e`, raised on `file` (the spool's
/// directory or one of its files), when `e` says it cannot be written.
pub(super) fn not_writable(spool: &Path, file: &Path, e: &std::io::Error) -> Option<SpoolError> {
    use rustix::io::Errno;
    let p = file.display();
    let fix = match Errno::from_io_error(e)? {
        Errno::ROFS => format!(
            "{p} is on a read-only filesystem; remount it read-write, or set Z4J_BUFFER_PATH to a writable place"
        ),
        Errno::PERM => format!(
            "{p} may not be written (immutable or append-only: `lsattr -d {p}`); run `chattr -i -a {p}`, or set Z4J_BUFFER_PATH to a writable place"
        ),
        Errno::ACCESS => format!(
            "{p} is not writable by uid {uid}; make it so (`chown {uid} {p}` and `chmod u+rw{x} {p}`), or set Z4J_BUFFER_PATH to a writable place",
            uid = crate::host::current_uid(),
            x = if file.is_dir() { "x" } else { "" },
        ),
        _ => return None,
    };
    Some(SpoolError::NotWritable {
        path: spool.display().to_string(),
        message: format!("{fix} ({e})"),
    })
}

/// After SQLite could not write the spool: which of its directory and files
/// this process may not write, as a [`SpoolError::NotWritable`].
pub(super) fn diagnose_not_writable(spool: &Path) -> Option<SpoolError> {
    use rustix::fs::{Access, AtFlags, CWD};
    let dir = spool.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut candidates = vec![dir, spool.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut s = spool.as_os_str().to_owned();
        s.push(suffix);
        candidates.push(PathBuf::from(s));
    }
    candidates.into_iter().find_map(|p| {
        if !p.exists() {
            return None;
        }
        match rustix::fs::accessat(CWD, &p, Access::WRITE_OK, AtFlags::EACCESS) {
            Ok(()) => None,
            Err(errno) => not_writable(spool, &p, &std::io::Error::from(errno)),
        }
    })
}
