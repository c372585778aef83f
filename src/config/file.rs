//! The optional TOML config file (`Z4J_CONFIG`): its keys are the settings'
//! names (the variable in lowercase without `Z4J_`, e.g.
//! `brain_url = "https://..."`), except the secrets themselves and the
//! path of the file, which the file cannot hold.
//!
//! Invariants:
//! * the whole file is checked when it is read, before any value is used:
//!   an unknown key or a value of the wrong type is one error naming
//!   `Z4J_CONFIG`, in serde's words (`unknown field ..., expected one of
//!   ...`, `invalid type: integer ..., expected a string`), the first in
//!   key-name order (the order the TOML reader hands the keys over);
//! * the file is read with [`read_small_file`], so a FIFO, a device or a
//!   huge file is refused without waiting or reading it all.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};

use super::keys::{Kind, ALL};
use super::read::{toml_scalar, Raw};
use super::small_file::{read_small_file, SmallFileError, MAX_CONFIG_FILE_BYTES};
use super::ConfigError;

/// The keys a config file may hold, in the order of the table.
static FILE_KEYS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    ALL.iter()
        .filter(|k| k.kind.in_file())
        .map(|k| k.name)
        .collect()
});

/// The values of a config file, by key, each already of its key's form.
#[derive(Debug, Default)]
pub struct FileValues(BTreeMap<&'static str, Raw>);

impl FileValues {
    /// The value of the file key `name`, if the file gives one.
    pub fn get(&self, name: &str) -> Option<&Raw> {
        self.0.get(name)
    }
}

impl<'de> Deserialize<'de> for FileValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FileVisitor)
    }
}

struct FileVisitor;

impl<'de> Visitor<'de> for FileVisitor {
    type Value = FileValues;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a table of settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileValues, A::Error> {
        let mut values = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            let key = ALL
                .iter()
                .find(|k| k.kind.in_file() && k.name == name)
                .ok_or_else(|| A::Error::unknown_field(&name, &FILE_KEYS))?;
            let value = match key.kind {
                Kind::Text => Raw::Text(map.next_value::<String>()?),
                Kind::Path => Raw::Path(map.next_value::<PathBuf>()?),
                Kind::Scalar => Raw::Text(toml_scalar(map.next_value::<toml::Value>()?)),
                Kind::Table => Raw::Toml(map.next_value::<toml::Value>()?),
                Kind::Secret | Kind::CliPath => unreachable!("not a file key"),
            };
            values.insert(key.name, value);
        }
        Ok(FileValues(values))
    }
}

/// Reads and checks the config file.
pub fn load(path: &Path) -> Result<FileValues, ConfigError> {
    let bytes = read_small_file(path, MAX_CONFIG_FILE_BYTES).map_err(|e| {
        let p = path.display();
        ConfigError::new(
            "Z4J_CONFIG",
            match e {
                SmallFileError::Io(e) => format!("cannot read {p}: {e}"),
                _ => format!("{p}: {e}; point Z4J_CONFIG at the TOML config file"),
            },
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            "Z4J_CONFIG",
            format!(
                "{} is not UTF-8 text; it should be a TOML file",
                path.display()
            ),
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        ConfigError::new(
            "Z4J_CONFIG",
            format!("{} is not valid: {}", path.display(), e.message()),
        )
    })
}
