//! What the daemon's `hello` tells the brain: the union of what the
//! connected processes declared, the static configuration, what is
//! remembered from before a restart and, while stopping, what was
//! advertised when the stop began, kept within the brain's limits on a
//! `hello` (what does not fit is left out, deterministically, and shown).

use std::collections::BTreeMap;
use std::time::Instant;

use super::ClientRegistry;
use crate::protocol::Value;

/// What the daemon's `hello` tells the brain: the union of what connected
/// clients declared, plus what is configured statically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Engines, sorted.
    pub engines: Vec<String>,
    /// Engine (or scheduler) -> actions, sorted.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Runtime features, sorted.
    pub runtime_features: Vec<String>,
    /// Schedulers, sorted.
    pub schedulers: Vec<String>,
}

/// The brain's limit on each list of the `hello` (z4j-core's
/// `HelloPayload`: `engines`, `schedulers` and `runtime_features` at most
/// 64 each; a `hello` over it is closed with 4400, again on every retry).
/// The daemon keeps each list of its advertisement, and each `capabilities`
/// list (the brain sets no count there, only the frame size), within it.
pub const MAX_HELLO_LIST: usize = 64;

/// What the advertisement left out to stay within [`MAX_HELLO_LIST`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LeftOut {
    /// Engines not advertised (with their capabilities).
    pub engines: Vec<String>,
    /// Schedulers not advertised (with their capabilities).
    pub schedulers: Vec<String>,
    /// Runtime features not advertised.
    pub runtime_features: Vec<String>,
    /// Actions not advertised, as `<engine or scheduler>.<action>`.
    pub actions: Vec<String>,
}

impl LeftOut {
    /// How many names were left out, over all lists.
    pub fn count(&self) -> usize {
        self.engines.len()
            + self.schedulers.len()
            + self.runtime_features.len()
            + self.actions.len()
    }
}

/// Names by the first source that declared them (0 the static
/// configuration, then connections in the order they were accepted, then
/// what is remembered from before a restart).
#[derive(Default)]
struct Ranked(BTreeMap<String, usize>);

impl Ranked {
    fn add<'a>(&mut self, rank: usize, names: impl IntoIterator<Item = &'a String>) {
        for n in names {
            self.0.entry(n.clone()).or_insert(rank);
        }
    }

    /// The first `max` by source, then by name, sorted by name; and the
    /// rest, sorted by name. Deterministic: a process that connects later
    /// cannot push out what an earlier one (or the configuration) declared.
    fn keep(self, max: usize) -> (Vec<String>, Vec<String>) {
        let mut all: Vec<(usize, String)> = self.0.into_iter().map(|(n, r)| (r, n)).collect();
        all.sort();
        let rest = all.split_off(all.len().min(max));
        let mut kept: Vec<String> = all.into_iter().map(|(_, n)| n).collect();
        let mut left: Vec<String> = rest.into_iter().map(|(_, n)| n).collect();
        kept.sort();
        left.sort();
        (kept, left)
    }
}

/// The runtime feature with which a process (and so the daemon) asks the
/// brain for the external schedule protocol: the brain then sends each
/// declared scheduler with `external_schedule_stable_snapshot_v1` a
/// `schedule.external.activate` right after the `hello`.
pub const EXTERNAL_SCHEDULE_FEATURE: &str = "external_schedule_protocol_v1";

impl Advertisement {
    /// The `hello` payload fields.
    pub fn engines_value(&self) -> Value {
        Value::Array(
            self.engines
                .iter()
                .map(|e| Value::from(e.as_str()))
                .collect(),
        )
    }

    /// `capabilities` as a map of lists.
    pub fn capabilities_value(&self) -> Value {
        let mut m = Value::empty_map();
        for (engine, actions) in &self.capabilities {
            m.insert(
                engine,
                Value::Array(actions.iter().map(|a| Value::from(a.as_str())).collect()),
            );
        }
        m
    }

    /// `runtime_features` as a list.
    pub fn runtime_features_value(&self) -> Value {
        strings_value(&self.runtime_features)
    }

    /// `schedulers` as a list.
    pub fn schedulers_value(&self) -> Value {
        strings_value(&self.schedulers)
    }

    /// What the static configuration alone advertises (no client connected).
    pub fn configured(
        static_engines: &[String],
        static_capabilities: &BTreeMap<String, Vec<String>>,
    ) -> Advertisement {
        ClientRegistry::default().advertisement(static_engines, static_capabilities)
    }
}

fn strings_value(items: &[String]) -> Value {
    Value::Array(items.iter().map(|e| Value::from(e.as_str())).collect())
}

impl ClientRegistry {
    /// What the `hello` must advertise now: the union over connected clients
    /// plus the static configuration.
    pub fn advertisement(
        &self,
        static_engines: &[String],
        static_capabilities: &BTreeMap<String, Vec<String>>,
    ) -> Advertisement {
        let mut engines = Ranked::default();
        let mut caps: BTreeMap<String, Ranked> = BTreeMap::new();
        let mut features = Ranked::default();
        let mut schedulers = Ranked::default();
        let mut cap_keys = Ranked::default();
        let mut add_caps = |rank: usize, c: &BTreeMap<String, Vec<String>>| {
            cap_keys.add(rank, c.keys());
            for (key, actions) in c {
                caps.entry(key.clone()).or_default().add(rank, actions);
            }
        };
        engines.add(0, static_engines);
        add_caps(0, static_capabilities);
        let mut rank = 0;
        for e in self.clients.lock().unwrap().values() {
            rank += 1;
            let c = &e.info;
            engines.add(rank, &c.engines);
            schedulers.add(rank, &c.schedulers);
            add_caps(rank, &c.capabilities);
            features.add(rank, &c.runtime_features);
        }
        // What was advertised before a restart and not declared again yet.
        if let Some(p) = self.memory.lock().unwrap().pending(Instant::now()) {
            rank += 1;
            engines.add(rank, &p.engines);
            schedulers.add(rank, &p.schedulers);
            add_caps(rank, &p.capabilities);
            features.add(rank, &p.runtime_features);
        }
        // What processes whose connections the stop closed declared.
        if let Some(a) = self.at_stop.lock().unwrap().as_ref() {
            rank += 1;
            engines.add(rank, &a.engines);
            schedulers.add(rank, &a.schedulers);
            add_caps(rank, &a.capabilities);
            features.add(rank, &a.runtime_features);
        }
        let mut left = LeftOut::default();
        let (schedulers, left_schedulers) = schedulers.keep(MAX_HELLO_LIST);
        left.schedulers = left_schedulers;
        // Capabilities keyed by a scheduler name are the scheduler's, not
        // an engine's (a scheduler left out included).
        for (key, rank) in cap_keys.0 {
            if schedulers.binary_search(&key).is_err() && !left.schedulers.contains(&key) {
                let r = engines.0.entry(key).or_insert(rank);
                *r = (*r).min(rank);
            }
        }
        let (engines, left_engines) = engines.keep(MAX_HELLO_LIST);
        left.engines = left_engines;
        let (runtime_features, left_features) = features.keep(MAX_HELLO_LIST);
        left.runtime_features = left_features;
        let mut capabilities = BTreeMap::new();
        for (key, actions) in caps {
            if engines.binary_search(&key).is_err() && schedulers.binary_search(&key).is_err() {
                continue;
            }
            let (kept, rest) = actions.keep(MAX_HELLO_LIST);
            left.actions
                .extend(rest.into_iter().map(|a| format!("{key}.{a}")));
            capabilities.insert(key, kept);
        }
        self.note_left_out(left);
        Advertisement {
            engines,
            capabilities,
            runtime_features,
            schedulers,
        }
    }

    /// Keeps what the last advertisement left out, and logs it when it
    /// changed (once per change, not on every read).
    fn note_left_out(&self, left: LeftOut) {
        let mut last = self.left_out.lock().unwrap();
        if *last == left {
            return;
        }
        if left.count() == 0 {
            tracing::info!("the hello to the brain advertises every engine, scheduler, runtime feature and action declared again");
        } else {
            tracing::warn!(
                left_out = left.count(),
                engines = ?left.engines,
                schedulers = ?left.schedulers,
                runtime_features = ?left.runtime_features,
                actions = ?left.actions,
                "the processes on this host declare more than the brain accepts in one hello (at most {MAX_HELLO_LIST} engines, schedulers, runtime features, and actions per engine): these are not advertised, and the brain sends them no commands; declare fewer per host (stats key advertisement_left_out)"
            );
        }
        *last = left;
    }

    /// What the latest advertisement left out to stay within the brain's
    /// limits ([`MAX_HELLO_LIST`]).
    pub fn left_out(&self) -> LeftOut {
        self.left_out.lock().unwrap().clone()
    }
}
