//! Where the spool file lives, and the clamp that keeps it somewhere safe.
//!
//! Resolution: `Z4J_BUFFER_PATH`, else `$STATE_DIRECTORY/buffer.sqlite`
//! (systemd), else `~/.z4j/agentd.sqlite` (`$Z4J_HOME` replaces `~/.z4j`).
//! When the default directory cannot be created or written, the spool falls
//! back to `$TMPDIR/z4j-<uid>/agentd.sqlite` (directory mode 0700) and the
//! caller logs one WARNING naming both paths.
//!
//! The clamp: an explicit path must resolve (symlinks followed) under an
//! allowed root (`$STATE_DIRECTORY`, `~/.z4j`, `$TMPDIR/z4j-<uid>`), and the
//! directory holding the file must be owned by us and not group- or
//! world-writable. Every refusal says the exact fix.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::host::HostEnv;

/// Why a spool path was refused.
#[derive(Debug, Error)]
pub enum PathError {
    /// The explicit path is relative.
    #[error("Z4J_BUFFER_PATH: {0} is relative; give an absolute path under one of the allowed roots ({1})")]
    Relative(String, String),
    /// The path resolves outside every allowed root.
    #[error("Z4J_BUFFER_PATH: {path} resolves to {resolved}, which is outside the allowed roots ({roots}); move it under one of them")]
    OutsideRoots {
        /// As given.
        path: String,
        /// After following symlinks.
        resolved: String,
        /// The allowed roots.
        roots: String,
    },
    /// The directory is writable by group or others.
    #[error("spool directory {dir} has mode {mode:04o}, writable by other users who could replace the spool; run `chmod go-w {dir}` (or `chmod 700 {dir}`)")]
    GroupWritable {
        /// The directory.
        dir: String,
        /// Its mode.
        mode: u32,
    },
    /// The directory belongs to someone else.
    #[error("spool directory {dir} is owned by uid {owner}, not by this user (uid {uid}); run `chown {uid} {dir}` or set Z4J_BUFFER_PATH to a directory this user owns")]
    OtherOwner {
        /// The directory.
        dir: String,
        /// Its owner.
        owner: u32,
        /// Our uid.
        uid: u32,
    },
    /// Something on the way is not a directory or is a symlink where none is allowed.
    #[error("{0}")]
    NotADirectory(String),
    /// The directory could not be created or written.
    #[error("cannot use spool directory {dir}: {source}; create it (mode 0700) as this user or set Z4J_BUFFER_PATH")]
    Unusable {
        /// The directory.
        dir: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// The resolved spool location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolLocation {
    /// The spool file.
    pub path: PathBuf,
    /// The default path that could not be used, when we fell back to `$TMPDIR`.
    pub fell_back_from: Option<PathBuf>,
}

/// The allowed roots for an explicit path, as configured (not yet resolved).
pub fn allowed_roots(host: &HostEnv) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(s) = &host.state_directory {
        roots.push(s.clone());
    }
    if let Some(z) = host.z4j_dir() {
        roots.push(z);
    }
    roots.push(host.tmp_private_dir());
    roots
}

fn roots_text(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves the spool path from the explicit setting or the defaults.
pub fn resolve(explicit: Option<&Path>, host: &HostEnv) -> Result<SpoolLocation, PathError> {
    match explicit {
        Some(p) => resolve_explicit(p, host).map(|path| SpoolLocation {
            path,
            fell_back_from: None,
        }),
        None => resolve_default(host),
    }
}

fn resolve_explicit(path: &Path, host: &HostEnv) -> Result<PathBuf, PathError> {
    let roots = allowed_roots(host);
    if !path.is_absolute() {
        return Err(PathError::Relative(
            path.display().to_string(),
            roots_text(&roots),
        ));
    }
    let file_name = path.file_name().ok_or_else(|| {
        PathError::NotADirectory(format!(
            "Z4J_BUFFER_PATH: {} does not name a file",
            path.display()
        ))
    })?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    // The roots themselves may be created (mode 0700) so a first start works.
    if !parent.exists() && roots.iter().any(|r| r == parent) {
        create_private_dir(parent)?;
    }
    let resolved_parent = fs::canonicalize(parent).map_err(|source| PathError::Unusable {
        dir: parent.display().to_string(),
        source,
    })?;
    let mut resolved = resolved_parent.join(file_name);
    // A symlinked spool file is followed too: the target must be inside a root.
    if let Ok(target) = fs::canonicalize(&resolved) {
        resolved = target;
    }
    let inside = roots
        .iter()
        .filter_map(|r| fs::canonicalize(r).ok())
        .any(|root| resolved.starts_with(&root));
    if !inside {
        return Err(PathError::OutsideRoots {
            path: path.display().to_string(),
            resolved: resolved.display().to_string(),
            roots: roots_text(&roots),
        });
    }
    check_trusted_dir(resolved.parent().unwrap_or(Path::new("/")), host.uid)?;
    Ok(resolved)
}

fn resolve_default(host: &HostEnv) -> Result<SpoolLocation, PathError> {
    let preferred = if let Some(state) = &host.state_directory {
        Some(state.join("buffer.sqlite"))
    } else {
        host.z4j_dir().map(|d| d.join("agentd.sqlite"))
    };
    if let Some(path) = &preferred {
        let dir = path.parent().unwrap_or(Path::new("/"));
        match prepare_writable_dir(dir) {
            Ok(()) => {
                check_trusted_dir(dir, host.uid)?;
                return Ok(SpoolLocation {
                    path: path.clone(),
                    fell_back_from: None,
                });
            }
            Err(_) => { /* fall through to the private tmp directory */ }
        }
    }
    let dir = host.tmp_private_dir();
    ensure_private_tmp_dir(&dir, host.uid)?;
    Ok(SpoolLocation {
        path: dir.join("agentd.sqlite"),
        fell_back_from: preferred,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), PathError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PathError::Unusable {
            dir: dir.display().to_string(),
            source,
        })
}

/// Creates the directory if needed and proves it is writable with a probe file.
fn prepare_writable_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let probe = dir.join(format!(".z4j-agentd-probe-{}", std::process::id()));
    fs::write(&probe, b"")?;
    fs::remove_file(&probe)
}

/// `$TMPDIR/z4j-<uid>`: created 0700, or accepted only if it is a real
/// directory (not a symlink) owned by us without group/other access, since
/// anyone can create names in `/tmp`.
pub fn ensure_private_tmp_dir(dir: &Path, uid: u32) -> Result<(), PathError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PathError::Unusable {
                dir: dir.display().to_string(),
                source,
            })
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|source| PathError::Unusable {
        dir: dir.display().to_string(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(PathError::NotADirectory(format!(
            "{} exists but is not a directory (or is a symlink); remove it so z4j-agentd can create its private directory",
            dir.display()
        )));
    }
    if meta.uid() != uid {
        return Err(PathError::OtherOwner {
            dir: dir.display().to_string(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(PathError::NotADirectory(format!(
            "{} has mode {:04o} but must be private to this user; run `chmod 700 {}`",
            dir.display(),
            meta.permissions().mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// The directory holding the spool: ours and not writable by others.
pub fn check_trusted_dir(dir: &Path, uid: u32) -> Result<(), PathError> {
    let meta = fs::metadata(dir).map_err(|source| PathError::Unusable {
        dir: dir.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(PathError::NotADirectory(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if meta.uid() != uid {
        return Err(PathError::OtherOwner {
            dir: dir.display().to_string(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PathError::GroupWritable {
            dir: dir.display().to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_in(tmp: &Path) -> HostEnv {
        let home = tmp.join("home");
        fs::create_dir_all(&home).unwrap();
        let t = tmp.join("tmp");
        fs::create_dir_all(&t).unwrap();
        HostEnv {
            home: Some(home),
            tmpdir: t,
            uid: crate::host::current_uid(),
            hostname: "h".into(),
            ..HostEnv::default()
        }
    }

    #[test]
    fn default_is_under_home_and_created_private() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let loc = resolve(None, &h).unwrap();
        assert_eq!(loc.path, t.path().join("home/.z4j/agentd.sqlite"));
        assert_eq!(loc.fell_back_from, None);
        let mode = fs::metadata(t.path().join("home/.z4j"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn state_directory_wins_over_home() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host_in(t.path());
        let state = t.path().join("state");
        fs::DirBuilder::new().mode(0o700).create(&state).unwrap();
        h.state_directory = Some(state.clone());
        assert_eq!(resolve(None, &h).unwrap().path, state.join("buffer.sqlite"));
    }

    #[test]
    fn unwritable_home_falls_back_to_private_tmp() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host_in(t.path());
        // A home that is a regular file: `.z4j` cannot be created under it, as root or not.
        let fake_home = t.path().join("not-a-dir");
        fs::write(&fake_home, b"x").unwrap();
        h.home = Some(fake_home.clone());
        let loc = resolve(None, &h).unwrap();
        let tmpdir = h.tmp_private_dir();
        assert_eq!(loc.path, tmpdir.join("agentd.sqlite"));
        assert_eq!(
            loc.fell_back_from,
            Some(fake_home.join(".z4j/agentd.sqlite"))
        );
        let mode = fs::metadata(&tmpdir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn planted_tmp_dir_with_open_mode_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let dir = h.tmp_private_dir();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_tmp_dir(&dir, h.uid).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn explicit_path_inside_root_is_accepted() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let p = t.path().join("home/.z4j/custom.sqlite");
        let got = resolve(Some(&p), &h).unwrap().path;
        assert_eq!(
            got,
            fs::canonicalize(t.path())
                .unwrap()
                .join("home/.z4j/custom.sqlite")
        );
    }

    #[test]
    fn relative_path_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let err = resolve(Some(Path::new("spool.sqlite")), &h).unwrap_err();
        assert!(matches!(err, PathError::Relative(..)), "{err}");
    }

    #[test]
    fn symlink_escaping_the_root_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let outside = t.path().join("outside");
        fs::DirBuilder::new().mode(0o700).create(&outside).unwrap();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(t.path().join("home/.z4j"))
            .unwrap();
        std::os::unix::fs::symlink(&outside, t.path().join("home/.z4j/link")).unwrap();
        let err = resolve(Some(&t.path().join("home/.z4j/link/spool.sqlite")), &h).unwrap_err();
        match err {
            PathError::OutsideRoots { resolved, .. } => {
                assert!(resolved.contains("outside"), "{resolved}")
            }
            other => panic!("expected OutsideRoots, got {other}"),
        }
        // A symlinked file pointing out of the root is refused as well.
        fs::write(outside.join("real.sqlite"), b"").unwrap();
        std::os::unix::fs::symlink(
            outside.join("real.sqlite"),
            t.path().join("home/.z4j/spool.sqlite"),
        )
        .unwrap();
        let err = resolve(Some(&t.path().join("home/.z4j/spool.sqlite")), &h).unwrap_err();
        assert!(matches!(err, PathError::OutsideRoots { .. }), "{err}");
    }

    #[test]
    fn group_writable_directory_is_refused_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let h = host_in(t.path());
        let dir = t.path().join("home/.z4j");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).unwrap();
        let err = resolve(Some(&dir.join("s.sqlite")), &h).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PathError::GroupWritable { .. }), "{msg}");
        assert!(msg.contains("chmod go-w"), "{msg}");
    }

    #[test]
    fn directory_of_another_owner_is_refused_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let mut h = host_in(t.path());
        let dir = t.path().join("home/.z4j");
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        // Pretend to be another user: the directory's real owner is then "other".
        h.uid = h.uid.wrapping_add(4242);
        let err = check_trusted_dir(&dir, h.uid).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PathError::OtherOwner { .. }), "{msg}");
        assert!(msg.contains("chown"), "{msg}");
    }
}
