//! Reading one setting: where its value comes from (flags > environment >
//! file), and the readers that turn that value into what the daemon uses,
//! applying the default and the allowed range.
//!
//! Invariants:
//! * an empty flag or variable counts as not given (`Z4J_LOG_LEVEL=` falls
//!   through to the file, then the default); a value in the file is taken
//!   as written;
//! * every refusal is a [`ConfigError`] naming the setting's environment
//!   variable, in the words the operator reads in the docs.

use std::fmt;
use std::path::PathBuf;

use super::file::FileValues;
use super::keys::{Key, Options, Setting};
use super::ConfigError;

/// A setting's value as given, before it is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// A flag, a variable, or a file value given as text (numbers and
    /// booleans in the file are written as text, lists joined by commas).
    Text(String),
    /// A path, from a flag, a variable or the file.
    Path(PathBuf),
    /// A value of the file kept as TOML (a `[capabilities]` table).
    Toml(toml::Value),
}

impl Raw {
    /// The value as text.
    pub fn into_text(self) -> String {
        match self {
            Raw::Text(s) => s,
            Raw::Path(p) => p.to_string_lossy().into_owned(),
            Raw::Toml(v) => toml_scalar(v),
        }
    }

    /// The value as a path.
    pub fn into_path(self) -> PathBuf {
        match self {
            Raw::Path(p) => p,
            other => PathBuf::from(other.into_text()),
        }
    }

    /// Whether this flag or variable counts as not given.
    fn is_blank(&self) -> bool {
        match self {
            Raw::Text(s) => s.trim().is_empty(),
            Raw::Path(p) => p.as_os_str().is_empty(),
            Raw::Toml(_) => false,
        }
    }
}

/// A TOML value given where a string-like value is expected: scalars as
/// written, an array's items joined by commas.
pub fn toml_scalar(v: toml::Value) -> String {
    match v {
        toml::Value::String(s) => s,
        toml::Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                toml::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// The three places a value can come from, in precedence order.
pub struct Sources<'a> {
    /// Flags, and the environment they came with.
    pub options: &'a Options,
    /// The config file's values (empty without a file).
    pub file: FileValues,
}

impl Sources<'_> {
    /// The value of `key` from the first place that gives one.
    pub fn raw(&self, key: &Key) -> Result<Option<Raw>, ConfigError> {
        if let Some(v) = self.options.flag(key).filter(|v| !v.is_blank()) {
            return Ok(Some(v));
        }
        if let Some(v) = self.env(key)?.filter(|v| !v.is_blank()) {
            return Ok(Some(v));
        }
        Ok(self.file.get(key.name).cloned())
    }

    fn env(&self, key: &Key) -> Result<Option<Raw>, ConfigError> {
        let Some(v) = self.options.env.get(key.env) else {
            return Ok(None);
        };
        if key.kind.is_path() {
            return Ok(Some(Raw::Path(PathBuf::from(v))));
        }
        match v.to_str() {
            Some(s) => Ok(Some(Raw::Text(s.to_string()))),
            None => Err(ConfigError::new(
                key.env,
                "is not valid UTF-8; set it to plain text",
            )),
        }
    }

    /// Reads `setting`: its value from the first place that gives one,
    /// through its reader (default, range, form).
    pub fn get<R: Read>(&self, setting: &Setting<R>) -> Result<R::Value, ConfigError> {
        setting.read.read(setting.key.env, self.raw(&setting.key)?)
    }
}

/// Turns a setting's value as given (or its absence) into what the daemon
/// uses. `key` is the environment variable, named in errors.
pub trait Read {
    /// What the setting becomes.
    type Value;
    /// Reads `raw`; `None` means not given anywhere.
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<Self::Value, ConfigError>;
}

/// Text, no default.
pub struct Text;

impl Read for Text {
    type Value = Option<String>;
    fn read(&self, _: &'static str, raw: Option<Raw>) -> Result<Option<String>, ConfigError> {
        Ok(raw.map(Raw::into_text))
    }
}

/// A path, no default (the defaults depend on the host).
pub struct PathValue;

impl Read for PathValue {
    type Value = Option<PathBuf>;
    fn read(&self, _: &'static str, raw: Option<Raw>) -> Result<Option<PathBuf>, ConfigError> {
        Ok(raw.map(Raw::into_path))
    }
}

/// A whole number in `min..=max` (`_` allowed as a digit separator).
pub struct Number<T> {
    /// When not given.
    pub default: T,
    /// Smallest allowed.
    pub min: T,
    /// Largest allowed.
    pub max: T,
}

impl<T> Read for Number<T>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    type Value = T;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<T, ConfigError> {
        let Some(v) = raw.map(Raw::into_text) else {
            return Ok(self.default);
        };
        let n: T =
            v.trim().replace('_', "").parse().map_err(|_| {
                ConfigError::new(key, format!("expected a whole number, got {v:?}"))
            })?;
        if n < self.min || n > self.max {
            return Err(ConfigError::new(
                key,
                format!("must be between {} and {}, got {n}", self.min, self.max),
            ));
        }
        Ok(n)
    }
}

/// A yes/no setting, off by default.
pub struct Switch;

impl Read for Switch {
    type Value = bool;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<bool, ConfigError> {
        let Some(v) = raw.map(Raw::into_text) else {
            return Ok(false);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(
                key,
                format!("expected true or false, got {v:?}"),
            )),
        }
    }
}

/// One of a few names; the first is the default.
pub struct OneOf<T: 'static> {
    /// Each name and what it means; the first is the default.
    pub choices: &'static [(&'static str, T)],
    /// Whether `JSON` means `json`.
    pub fold_case: bool,
}

impl<T: Copy> Read for OneOf<T> {
    type Value = T;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<T, ConfigError> {
        let Some(v) = raw.map(Raw::into_text) else {
            return Ok(self.choices[0].1);
        };
        let v = match self.fold_case {
            true => v.trim().to_ascii_lowercase(),
            false => v.trim().to_string(),
        };
        if let Some((_, value)) = self.choices.iter().find(|(name, _)| *name == v) {
            return Ok(*value);
        }
        let names: Vec<&str> = self.choices.iter().map(|(name, _)| *name).collect();
        let (last, rest) = names.split_last().expect("a choice has names");
        let expected = match rest {
            [] => last.to_string(),
            _ => format!("{} or {last}", rest.join(", ")),
        };
        Err(ConfigError::new(
            key,
            format!("expected {expected}, got {v:?}"),
        ))
    }
}

/// Numeric user or group ids separated by commas; none by default.
pub struct Ids;

impl Read for Ids {
    type Value = Vec<u32>;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<Vec<u32>, ConfigError> {
        let Some(v) = raw.map(Raw::into_text) else {
            return Ok(Vec::new());
        };
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u32>().map_err(|_| {
                    ConfigError::new(
                        key,
                        format!("expected numeric ids separated by commas, got {s:?}"),
                    )
                })
            })
            .collect()
    }
}

/// A file mode in octal that keeps owner read/write (`0660`, `0o600`).
pub struct Mode {
    /// When not given.
    pub default: u32,
}

impl Read for Mode {
    type Value = u32;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<u32, ConfigError> {
        let Some(v) = raw.map(Raw::into_text) else {
            return Ok(self.default);
        };
        let m = u32::from_str_radix(v.trim().trim_start_matches("0o"), 8).map_err(|_| {
            ConfigError::new(
                key,
                format!("expected an octal mode such as 0660, got {v:?}"),
            )
        })?;
        if m & !0o777 != 0 || m & 0o600 != 0o600 {
            return Err(ConfigError::new(
                key,
                format!("{v} must be a permission mode that keeps owner read/write, e.g. 0660"),
            ));
        }
        Ok(m)
    }
}

/// Engine names separated by commas (a list in the file); none by default.
pub struct Engines;

impl Read for Engines {
    type Value = Vec<String>;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<Vec<String>, ConfigError> {
        let engines: Vec<String> = raw
            .map(Raw::into_text)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(bad) = engines
            .iter()
            .find(|e| !crate::protocol::limits::engine_name_fits(e))
        {
            return Err(ConfigError::new(
                key,
                format!(
                    "engine name {bad:?} is longer than {} characters",
                    crate::protocol::limits::MAX_ENGINE_CHARS
                ),
            ));
        }
        Ok(engines)
    }
}

/// A log level or tracing filter, lowercased.
pub struct Level {
    /// When not given.
    pub default: &'static str,
}

impl Read for Level {
    type Value = String;
    fn read(&self, key: &'static str, raw: Option<Raw>) -> Result<String, ConfigError> {
        let level = raw
            .map(Raw::into_text)
            .unwrap_or_else(|| self.default.to_string())
            .trim()
            .to_ascii_lowercase();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(ConfigError::new(
                key,
                format!("expected error, warn, info, debug or trace, got {level:?}"),
            ));
        }
        Ok(level)
    }
}

/// The value as given, for a setting read by its own function
/// (`[capabilities]`, a table in the file).
pub struct AsGiven;

impl Read for AsGiven {
    type Value = Option<Raw>;
    fn read(&self, _: &'static str, raw: Option<Raw>) -> Result<Option<Raw>, ConfigError> {
        Ok(raw)
    }
}
