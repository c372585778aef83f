//! The `config` probe: the settings resolve exactly as `run` would resolve
//! them (flags, environment, config file, secret files). A failure names the
//! key to change; the token and the HMAC secret are only said to be present,
//! never shown.

use super::Finding;
use crate::config::{Config, ConfigError, Options};
use crate::host::HostEnv;

/// Resolves the configuration; hands it on when it is valid.
pub(super) fn check(options: &Options, host: HostEnv) -> (Finding, Option<Config>) {
    match options.resolve(host) {
        Ok(c) => (valid(&c), Some(c)),
        Err(e) => (invalid(&e), None),
    }
}

fn invalid(e: &ConfigError) -> Finding {
    Finding::fail(
        format!("{}: {}", e.key, e.message),
        format!(
            "set {} correctly (as a flag, in the environment, or in the Z4J_CONFIG file) and run the doctor again with the service's environment",
            e.key
        ),
    )
    .detail("key", e.key)
}

fn valid(c: &Config) -> Finding {
    Finding::ok(format!(
        "configuration is valid (brain {}, worker_id {}, token and HMAC secret present)",
        c.uplink.endpoint.base_url, c.uplink.worker_id
    ))
    .detail("brain_url", c.uplink.endpoint.base_url.as_str())
    .detail("worker_id", c.uplink.worker_id.as_str())
    .detail("dev_mode", c.dev_mode)
}
