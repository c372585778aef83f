//! Reading the small files the daemon is pointed at: the token and HMAC
//! secret files, the CA file and the config file.
//!
//! Invariant: only a regular file (symlinks followed) of at most a given
//! size is read; a FIFO, a device or a directory is refused before any
//! read, so a path pointing at one can neither make the daemon wait for a
//! writer that never comes nor read `/dev/zero` until memory runs out.

use std::path::Path;

use thiserror::Error;

/// Largest token or HMAC secret file read: a token is 43 characters and a
/// secret about as long, so anything near this is the wrong file.
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;
/// Largest `Z4J_CA_FILE` read (a bundle of a few hundred certificates).
pub const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest config file read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Why [`read_small_file`] refused a file.
#[derive(Debug, Error)]
pub enum SmallFileError {
    /// It could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It is not a regular file (a FIFO, a device, a directory, a socket):
    /// reading it could wait forever or never end.
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// It holds more than the limit (the limit in bytes).
    #[error("it is larger than {0} bytes")]
    TooLarge(u64),
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a small file the daemon is pointed at (a secret, the CA file, the
/// config file): only a regular file (symlinks followed), at most `limit`
/// bytes. A FIFO, a device or a directory is refused without reading, so a
/// path pointing at one cannot make the reader wait for a writer that
/// never comes, nor read `/dev/zero` until memory runs out. Blocking: call
/// it off the async runtime.
pub fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>, SmallFileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Checked before opening: opening some devices has effects of its own.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(SmallFileError::NotRegular(file_kind(meta.file_type())));
    }
    // O_NONBLOCK: should the path turn into a FIFO between the check and
    // the open, the open does not wait for a writer (the second check below
    // refuses it). O_NOCTTY: a terminal never becomes ours.
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(SmallFileError::NotRegular(file_kind(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(SmallFileError::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew since the check.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(SmallFileError::TooLarge(limit));
    }
    Ok(bytes)
}
