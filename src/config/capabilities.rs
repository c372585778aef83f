//! `Z4J_CAPABILITIES`: the actions advertised per engine before any local
//! client declares them, as text (`engine:action,action;engine:action`)
//! or as the config file's `[capabilities]` table
//! (`engine = ["action", ...]`).
//!
//! Invariant: `retry_by_reference_v1` is never advertised from here: only a
//! connected client that can retry by reference may declare it.

use std::collections::BTreeMap;

use super::read::Raw;
use super::ConfigError;

const KEY: &str = "Z4J_CAPABILITIES";

/// Actions per engine, sorted and without repeats.
pub type Capabilities = BTreeMap<String, Vec<String>>;

/// Reads the setting as given (`None`: no static capabilities).
pub fn parse(raw: Option<Raw>) -> Result<Capabilities, ConfigError> {
    let mut out = Capabilities::new();
    match raw {
        None => {}
        Some(Raw::Toml(toml::Value::Table(t))) => from_table(t, &mut out)?,
        Some(Raw::Toml(toml::Value::String(text))) | Some(Raw::Text(text)) => {
            from_text(&text, &mut out)?
        }
        Some(Raw::Path(p)) => from_text(&p.to_string_lossy(), &mut out)?,
        Some(Raw::Toml(other)) => {
            return Err(ConfigError::new(
                KEY,
                format!(
                    "capabilities must be a table or a string, got {}",
                    other.type_str()
                ),
            ))
        }
    }
    for actions in out.values_mut() {
        actions.sort();
        actions.dedup();
    }
    Ok(out)
}

/// `engine:action,action;engine:action`.
fn from_text(text: &str, out: &mut Capabilities) -> Result<(), ConfigError> {
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (engine, actions) = part.split_once(':').ok_or_else(|| {
            ConfigError::new(
                KEY,
                format!("expected engine:action,action (e.g. celery:cancel_task,retry_task), got {part:?}"),
            )
        })?;
        for action in actions.split(',') {
            add(out, engine, action)?;
        }
    }
    Ok(())
}

/// `[capabilities]` with `engine = ["action", ...]`.
fn from_table(table: toml::Table, out: &mut Capabilities) -> Result<(), ConfigError> {
    for (engine, actions) in table {
        let list = actions.as_array().ok_or_else(|| {
            ConfigError::new(
                KEY,
                format!("[capabilities] {engine} must be a list of action names"),
            )
        })?;
        for a in list {
            let a = a.as_str().ok_or_else(|| {
                ConfigError::new(
                    KEY,
                    format!("[capabilities] {engine} must list action names as strings"),
                )
            })?;
            add(out, &engine, a)?;
        }
    }
    Ok(())
}

/// Adds one action of one engine (an empty action adds nothing).
fn add(out: &mut Capabilities, engine: &str, action: &str) -> Result<(), ConfigError> {
    let (engine, action) = (engine.trim(), action.trim());
    if !crate::protocol::limits::engine_name_fits(engine) {
        return Err(ConfigError::new(
            KEY,
            format!(
                "engine name {engine:?} must be 1 to {} characters",
                crate::protocol::limits::MAX_ENGINE_CHARS
            ),
        ));
    }
    if action.is_empty() {
        return Ok(());
    }
    if action == "retry_by_reference_v1" {
        return Err(ConfigError::new(
            KEY,
            "retry_by_reference_v1 is advertised only when a connected client declares it (it can retry by reference); remove it here",
        ));
    }
    out.entry(engine.to_string())
        .or_default()
        .push(action.to_string());
    Ok(())
}
