//! The agent token and the HMAC secret: where they come from, how they are
//! cleaned and checked.
//!
//! Invariants:
//! * a secret comes from its variable or flag, else its `*_FILE`, else the
//!   systemd credential (`$CREDENTIALS_DIRECTORY/token`,
//!   `$CREDENTIALS_DIRECTORY/hmac_secret`); the files are re-read on SIGHUP;
//! * a secret lives only in [`Secret`] and [`SigningKey`], whose `Debug`
//!   output is redacted, and never enters a [`ConfigError`]: errors name
//!   the setting, the file and the position of a bad character, never the
//!   value.

use std::fmt;
use std::path::{Path, PathBuf};

use super::keys;
use super::read::Sources;
use super::small_file::{read_small_file, SmallFileError, MAX_SECRET_FILE_BYTES};
use super::ConfigError;
use crate::host::HostEnv;
use crate::protocol::SigningKey;

/// A secret string (the agent token). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The token and the signing key, checked.
pub(super) fn read(sources: &Sources, host: &HostEnv) -> Result<(Secret, SigningKey), ConfigError> {
    let token = resolve_secret(
        sources.get(&keys::TOKEN)?,
        keys::TOKEN.key.env,
        sources.get(&keys::TOKEN_FILE)?,
        keys::TOKEN_FILE.key.env,
        "token",
        host,
    )?
    .ok_or_else(|| {
        ConfigError::new(
            "Z4J_TOKEN",
            "is required; set Z4J_TOKEN_FILE to a file holding the agent token minted in the brain",
        )
    })?;
    check_token(&token)?;
    let secret = resolve_secret(
        sources.get(&keys::HMAC_SECRET)?,
        keys::HMAC_SECRET.key.env,
        sources.get(&keys::HMAC_SECRET_FILE)?,
        keys::HMAC_SECRET_FILE.key.env,
        "hmac_secret",
        host,
    )?
    .ok_or_else(|| {
        ConfigError::new(
            "Z4J_HMAC_SECRET",
            "is required; set Z4J_HMAC_SECRET_FILE to a file holding the project's hmac_secret",
        )
    })?;
    let key = SigningKey::from_base64(&secret)
        .map_err(|e| ConfigError::new("Z4J_HMAC_SECRET", e.to_string()))?;
    Ok((Secret::new(token), key))
}

/// A token the brain could have minted: no whitespace, control or
/// non-ASCII character. Tokens are URL-safe base64; anything else (a
/// typographic quote or an invisible character from a copy) would only be
/// refused by the brain, which then blames the token itself. The error
/// gives the position, never the token.
fn check_token(token: &str) -> Result<(), ConfigError> {
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::new(
            "Z4J_TOKEN",
            "contains whitespace or control characters; paste the token exactly as minted",
        ));
    }
    if let Some(i) = token.chars().position(|c| !c.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "Z4J_TOKEN",
            format!(
                "character {} is not printable ASCII (an invisible character or a typographic quote from a copy?); paste the token exactly as minted",
                i + 1
            ),
        ));
    }
    Ok(())
}

/// A token or secret as given, without what editors and copies add around
/// it: a leading UTF-8 byte order mark (Windows Notepad writes one) and
/// surrounding whitespace (the final newline).
fn clean_secret(raw: &str) -> &str {
    let t = raw.trim();
    t.strip_prefix('\u{feff}').unwrap_or(t).trim()
}

/// Reads a secret file. `key` is reported; `setting` is what to change
/// (`Z4J_TOKEN_FILE`, or the systemd credential); `what` names the secret.
fn read_secret_file(
    key: &'static str,
    path: &Path,
    setting: &str,
    what: &str,
) -> Result<String, ConfigError> {
    let bytes = read_small_file(path, MAX_SECRET_FILE_BYTES).map_err(|e| {
        let p = path.display();
        ConfigError::new(
            key,
            match e {
                SmallFileError::Io(e) => format!(
                    "cannot read {p}: {e}; check the path and that this user may read it"
                ),
                SmallFileError::NotRegular(_) => format!(
                    "{p}: {e}; put the {what} in a regular file and point {setting} at it"
                ),
                SmallFileError::TooLarge(_) => format!(
                    "{p}: {e}, far more than the {what} it should hold; point {setting} at a file holding only the {what}"
                ),
            },
        )
    })?;
    let raw = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "{} is not UTF-8 text; it should hold only the {what}",
                path.display()
            ),
        )
    })?;
    let v = clean_secret(&raw).to_string();
    if v.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(v)
}

/// Resolves one secret: the value itself, else its `*_FILE`, else the systemd credential.
fn resolve_secret(
    value: Option<String>,
    value_key: &'static str,
    file: Option<PathBuf>,
    file_key: &'static str,
    credential_name: &str,
    host: &HostEnv,
) -> Result<Option<String>, ConfigError> {
    let what = match credential_name {
        "token" => "agent token",
        _ => "HMAC secret",
    };
    if let Some(v) = value {
        return Ok(Some(clean_secret(&v).to_string()));
    }
    if let Some(path) = file {
        return read_secret_file(file_key, &path, file_key, what).map(Some);
    }
    if let Some(dir) = &host.credentials_directory {
        let path = dir.join(credential_name);
        if path.exists() {
            let setting = format!("the credential {credential_name} (LoadCredential=)");
            return read_secret_file(value_key, &path, &setting, what).map(Some);
        }
    }
    Ok(None)
}
