//! The `hello`s local processes send, for the tests of the registry and of
//! the command router.

use std::collections::BTreeMap;

use super::Registration;

/// A worker process's `hello`: engine `engine`, declaring `actions`.
pub(crate) fn worker_hello(engine: &str, actions: &[&str]) -> Registration {
    Registration {
        process: Some(format!("{engine}-worker")),
        engines: vec![engine.to_string()],
        capabilities: BTreeMap::from([(
            engine.to_string(),
            actions.iter().map(|a| a.to_string()).collect(),
        )]),
        ..Registration::default()
    }
}

/// A scheduler process's `hello` for scheduler `name` (process
/// `<name>-process`), with the capabilities z4j-celerybeat declares.
pub(crate) fn beat_hello(name: &str) -> Registration {
    Registration {
        process: Some(format!("{name}-process")),
        schedulers: vec![name.to_string()],
        capabilities: BTreeMap::from([(
            name.to_string(),
            vec![
                "external_schedule_stable_snapshot_v1".to_string(),
                "list".to_string(),
                "trigger_now".to_string(),
            ],
        )]),
        ..Registration::default()
    }
}
