//! One daemon per spool: the `flock` on the database file that keeps a
//! second daemon out, and `<spool>.lock`, which only records the holder's
//! pid for people and `doctor`. Neither file is opened through a symlink.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::writable::not_writable;
use super::SpoolError;

/// `<spool>.lock`: the holder's pid, for people and `doctor`.
fn note_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The exclusive hold on one spool, kept by the writer for as long as its
/// connection is open.
///
/// What keeps a second daemon out is an `flock` on the database file
/// itself: the lock belongs to the spool, so deleting or replacing any
/// other file cannot release it. SQLite's own locks on that file are POSIX
/// record locks, independent of `flock` on local filesystems (a spool in WAL
/// mode must be on one: WAL needs shared memory). This descriptor must stay
/// open until SQLite's connection is closed, since closing any descriptor of
/// a file drops the process's POSIX locks on it; the writer drops its
/// connection first.
///
/// `<spool>.lock` only records the holder's pid. It is locked too, so a
/// daemon of an earlier version, which locks only that file, is kept out as
/// well. Neither file is ever opened through a symlink.
pub(super) struct SpoolLock {
    db: File,
    _note: File,
}

impl SpoolLock {
    pub(super) fn acquire(path: &Path) -> Result<SpoolLock, SpoolError> {
        let db = open_no_follow(path, "spool", path, false)?;
        match db.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    path: path.display().to_string(),
                    pid: holder_pid(&db, path),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SpoolError::Open {
                    path: path.display().to_string(),
                    message: format!("cannot lock it: {e}"),
                })
            }
        }
        same_file(&db, path, path)?;
        let note_at = note_path(path);
        let mut note = open_no_follow(&note_at, "lock file", path, true)?;
        match note.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    path: path.display().to_string(),
                    pid: read_pid_note(&note_at).unwrap_or_else(|| "unknown".into()),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SpoolError::Open {
                    path: path.display().to_string(),
                    message: format!("cannot lock {}: {e}", note_at.display()),
                })
            }
        }
        same_file(&note, &note_at, path)?;
        let _ = note.set_len(0);
        let _ = note.rewind();
        let _ = writeln!(note, "{}", std::process::id());
        let _ = note.flush();
        Ok(SpoolLock { db, _note: note })
    }

    /// Checks that `path` still names the locked database file, after
    /// SQLite opened it by name.
    pub(super) fn still_at(&self, path: &Path) -> Result<(), SpoolError> {
        same_file(&self.db, path, path)
    }

    /// Another descriptor of the locked database file (for the
    /// checkpointer's syncs: see `checkpoint::Database` on when it may be
    /// closed).
    pub(super) fn database(&self) -> std::io::Result<File> {
        self.db.try_clone()
    }
}

/// Opens `file` (the spool, or its lock file when `note`) read-write,
/// creating it 0600, never through a symlink and never truncating it.
fn open_no_follow(file: &Path, what: &str, spool: &Path, note: bool) -> Result<File, SpoolError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refuse = |message: String| SpoolError::Open {
        path: spool.display().to_string(),
        message,
    };
    let symlink = || {
        refuse(format!(
            "{what} {p} is a symbolic link; z4j-agentd never opens one there, since it would write to whatever it points to; remove the link (`rm {p}`){and}",
            p = file.display(),
            and = if note {
                " and start again"
            } else {
                ", or set Z4J_BUFFER_PATH to the real file"
            }
        ))
    };
    // Checked before opening too, so nothing (a FIFO, a device) is opened
    // that is not a plain file.
    match std::fs::symlink_metadata(file) {
        Ok(m) if m.file_type().is_symlink() => return Err(symlink()),
        Ok(m) if !m.file_type().is_file() => {
            return Err(refuse(format!(
            "{what} {p} is not a regular file; move it aside (`mv {p} {p}.aside`) and start again",
            p = file.display()
        )))
        }
        _ => {}
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(file)
        .map_err(|e| {
            if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::LOOP) {
                symlink()
            } else {
                not_writable(spool, file, &e).unwrap_or_else(|| {
                    refuse(format!(
                        "cannot open {what} {}: {e}; check the directory's owner and mode",
                        file.display()
                    ))
                })
            }
        })?;
    let meta = f.metadata().map_err(|e| refuse(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!(
            "{what} {p} is not a regular file; move it aside (`mv {p} {p}.aside`) and start again",
            p = file.display()
        )));
    }
    // The lock file is rewritten: a second name for it would be another
    // file written through this one.
    if note && meta.nlink() > 1 {
        return Err(refuse(format!(
            "lock file {p} has {n} hard links, so writing the pid to it would change another file; remove it (`rm {p}`) and start again",
            p = file.display(),
            n = meta.nlink()
        )));
    }
    // An existing spool keeps working, but is tightened to 0600.
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| refuse(format!("cannot chmod 600 {}: {e}", file.display())))?;
    }
    Ok(f)
}

/// Refuses when `path` no longer names the file `f` is open on (it was
/// replaced or removed in the meantime).
fn same_file(f: &File, path: &Path, spool: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::MetadataExt;
    let held = f.metadata().ok().map(|m| (m.dev(), m.ino()));
    let named = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if held.is_some() && held == named {
        return Ok(());
    }
    Err(SpoolError::Open {
        path: spool.display().to_string(),
        message: format!(
            "{} was replaced or removed while this daemon opened it; make sure nothing else manages that file, and start again",
            path.display()
        ),
    })
}

/// Who holds the `flock` on the spool: from `/proc/locks` (which lists it
/// even when the lock file is gone), else from the lock file, else "unknown".
fn holder_pid(db: &File, spool: &Path) -> String {
    flock_holder(db)
        .map(|pid| pid.to_string())
        .or_else(|| read_pid_note(&note_path(spool)))
        .unwrap_or_else(|| "unknown".into())
}

fn flock_holder(f: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = f.metadata().ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 4242 fd:01:5678 0 EOF"; a waiter has "->" after the number.
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == id)
            .then(|| f[4].parse::<u32>().ok().filter(|pid| *pid != 0))
            .flatten()
    })
}

/// The pid written in the lock file, read without following a symlink.
fn read_pid_note(note: &Path) -> Option<String> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(
            rustix::fs::OFlags::NOFOLLOW.bits() as i32 | rustix::fs::OFlags::NONBLOCK.bits() as i32,
        )
        .open(note)
        .ok()?;
    let mut text = String::new();
    (&mut f).take(32).read_to_string(&mut text).ok()?;
    let pid = text.trim();
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.to_string())
}
