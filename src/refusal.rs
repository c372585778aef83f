//! The error codes the local socket sends, as one enum.
//!
//! Owns the vocabulary of `{"type": "error", "code": ..}` replies: every
//! code a client can read is a variant here, and [`RefusalCode::as_str`] is
//! both the wire code and the label under which [`crate::stats::Stats`]
//! counts the refusal (`refused_by_reason`, `/metrics`).
//!
//! Invariants: the strings never change (clients, dashboards and the
//! Python client match on them); a new code is a new variant, listed in
//! `docs/local-protocol.md` (a unit test checks every variant is there).
//! A client's value is quoted back in a refusal through [`excerpt`], so no
//! message echoes megabytes.

use crate::spool::SpoolError;

/// Most characters of a client's value quoted back in an error message.
pub const MAX_EXCERPT_CHARS: usize = 64;

/// `s` quoted for an error message: whole when short, else its first
/// [`MAX_EXCERPT_CHARS`] characters and its length. Errors name what was
/// wrong without echoing megabytes back to the client.
pub fn excerpt(s: &str) -> String {
    let head = truncate_chars(s, MAX_EXCERPT_CHARS);
    if head.len() == s.len() {
        format!("{s:?}")
    } else {
        format!("{head:?}... ({} bytes)", s.len())
    }
}

/// The first `max` characters of `s` (all of it when shorter).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Why the daemon refused a message, an event or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalCode {
    /// Not decodable, not a map, no `type`, an `ack_id` too long, a bad
    /// `hello` entry.
    BadMessage,
    /// A `type` the daemon does not know.
    UnknownType,
    /// A `command_result` without an id, or with fields of the wrong type.
    BadCommandResult,
    /// A `command_result` for no command waiting on this connection.
    UnknownCommand,
    /// A required event field is missing or has the wrong type.
    InvalidEvent,
    /// An event `kind` the brain does not know.
    UnknownKind,
    /// A legacy schedule `kind` the brain refuses.
    LegacyKind,
    /// The normalised event does not fit one brain frame.
    EventTooLarge,
    /// A message over the message limit.
    MessageTooLarge,
    /// Part of a message, then silence.
    IncompleteMessage,
    /// The spool is full (`drop_newest`); counted as a loss, not a refusal.
    SpoolFull,
    /// The spool's disk is full.
    SpoolDiskFull,
    /// A SQLite error while committing.
    SpoolError,
    /// The spool is closed (the daemon is stopping).
    SpoolClosed,
    /// The spool is locked by another process (only when opening).
    SpoolLocked,
    /// The spool cannot be opened (only when opening).
    SpoolOpen,
    /// The spool cannot be written (only when opening).
    SpoolNotWritable,
    /// `block`: the spool is full and the daemon is stopping.
    DaemonStopping,
    /// The peer's uid/gid may not write.
    NotAllowed,
    /// More connections than `Z4J_MAX_CLIENTS`.
    TooManyClients,
    /// A `health` message, or a part of one (an engine, a queue depth, a
    /// worker, a fact), that the brain could not take; the rest is kept.
    InvalidHealth,
}

impl RefusalCode {
    /// Every code, for tests and documentation checks.
    pub const ALL: [RefusalCode; 21] = [
        RefusalCode::BadMessage,
        RefusalCode::UnknownType,
        RefusalCode::BadCommandResult,
        RefusalCode::UnknownCommand,
        RefusalCode::InvalidEvent,
        RefusalCode::UnknownKind,
        RefusalCode::LegacyKind,
        RefusalCode::EventTooLarge,
        RefusalCode::MessageTooLarge,
        RefusalCode::IncompleteMessage,
        RefusalCode::SpoolFull,
        RefusalCode::SpoolDiskFull,
        RefusalCode::SpoolError,
        RefusalCode::SpoolClosed,
        RefusalCode::SpoolLocked,
        RefusalCode::SpoolOpen,
        RefusalCode::SpoolNotWritable,
        RefusalCode::DaemonStopping,
        RefusalCode::NotAllowed,
        RefusalCode::TooManyClients,
        RefusalCode::InvalidHealth,
    ];

    /// The wire code and metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            RefusalCode::BadMessage => "bad_message",
            RefusalCode::UnknownType => "unknown_type",
            RefusalCode::BadCommandResult => "bad_command_result",
            RefusalCode::UnknownCommand => "unknown_command",
            RefusalCode::InvalidEvent => "invalid_event",
            RefusalCode::UnknownKind => "unknown_kind",
            RefusalCode::LegacyKind => "legacy_kind",
            RefusalCode::EventTooLarge => "event_too_large",
            RefusalCode::MessageTooLarge => "message_too_large",
            RefusalCode::IncompleteMessage => "incomplete_message",
            RefusalCode::SpoolFull => "spool_full",
            RefusalCode::SpoolDiskFull => "spool_disk_full",
            RefusalCode::SpoolError => "spool_error",
            RefusalCode::SpoolClosed => "spool_closed",
            RefusalCode::SpoolLocked => "spool_locked",
            RefusalCode::SpoolOpen => "spool_open",
            RefusalCode::SpoolNotWritable => "spool_not_writable",
            RefusalCode::DaemonStopping => "daemon_stopping",
            RefusalCode::NotAllowed => "not_allowed",
            RefusalCode::TooManyClients => "too_many_clients",
            RefusalCode::InvalidHealth => "invalid_health",
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with a wire code, so that checks read like the protocol.
impl PartialEq<&str> for RefusalCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&SpoolError> for RefusalCode {
    /// The code a client gets when the spool refused its events.
    fn from(e: &SpoolError) -> Self {
        match e {
            SpoolError::Locked { .. } => RefusalCode::SpoolLocked,
            SpoolError::Open { .. } => RefusalCode::SpoolOpen,
            SpoolError::NotWritable { .. } => RefusalCode::SpoolNotWritable,
            SpoolError::Sqlite(_) => RefusalCode::SpoolError,
            SpoolError::DiskFull => RefusalCode::SpoolDiskFull,
            SpoolError::Closed => RefusalCode::SpoolClosed,
            SpoolError::Stopping { .. } => RefusalCode::DaemonStopping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_in_the_local_protocol_document() {
        let doc = include_str!("../docs/local-protocol.md");
        for code in RefusalCode::ALL {
            assert!(
                doc.contains(&format!("`{}`", code.as_str())),
                "docs/local-protocol.md does not list the error code `{code}`"
            );
        }
    }

    #[test]
    fn codes_are_distinct_and_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for code in RefusalCode::ALL {
            let s = code.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "{s} twice");
        }
    }

    #[test]
    fn spool_errors_keep_the_spools_own_codes() {
        let errors = [
            (
                SpoolError::Locked {
                    path: "s".into(),
                    pid: "1".into(),
                },
                "spool_locked",
            ),
            (
                SpoolError::Open {
                    path: "s".into(),
                    message: "m".into(),
                },
                "spool_open",
            ),
            (
                SpoolError::NotWritable {
                    path: "s".into(),
                    message: "m".into(),
                },
                "spool_not_writable",
            ),
            (SpoolError::Sqlite("x".into()), "spool_error"),
            (SpoolError::DiskFull, "spool_disk_full"),
            (SpoolError::Closed, "spool_closed"),
            (SpoolError::Stopping { not_stored: 3 }, "daemon_stopping"),
        ];
        for (e, code) in &errors {
            assert_eq!(RefusalCode::from(e).as_str(), *code, "{e:?}");
        }
    }
}
