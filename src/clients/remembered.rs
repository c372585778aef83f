//! The advertisement remembered across a restart, so the brain never sees
//! this host's engines, schedulers and capabilities vanish while its
//! workers reconnect.
//!
//! The brain replaces an agent's engines, schedulers and capabilities with
//! what each `hello` carries. A daemon that starts with no client connected
//! would tell it "nothing" until its workers are back. So the daemon keeps
//! the last advertisement the brain acknowledged in a small file beside the
//! spool ([`AdvertisementFile`]), and at start advertises it again
//! ([`Memory`]): each remembered entry (an engine, a scheduler, one action
//! of an engine or scheduler, a runtime feature) stays advertised until a
//! live process declares it again or the restart grace
//! (`Z4J_RESTART_GRACE_SECONDS`) is over, whichever comes first.
//!
//! Invariants: the file is only a hint: unreadable, corrupt or written
//! for another brain, worker slot or agent token, it is ignored with a
//! warning and start goes on; it is written atomically (temp file, fsync,
//! rename) and only when what the brain acknowledged differs from what it
//! holds; an entry once declared again by a live process is never
//! remembered again (it leaves with that process).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

use super::{Advertisement, Registration};
use crate::protocol::limits::engine_name_fits;

/// The file's format version.
const FORMAT: u32 = 1;
/// The largest file read; a bigger one is ignored as corrupt.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
/// At most this many entries in each list (and actions per engine).
const MAX_ENTRIES: usize = 1024;
/// The longest action or runtime feature name accepted from the file.
const MAX_NAME_BYTES: usize = 80;

/// Whom an advertisement was made to: the brain, this daemon's worker
/// slot, and the agent (a fingerprint of its token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The brain's base URL.
    pub brain_url: String,
    /// `Z4J_WORKER_ID`.
    pub worker_id: String,
    /// HMAC-SHA256 of a fixed label keyed with the agent token, first 16
    /// bytes in hex: tells two tokens apart without holding either (the
    /// token cannot be recovered from it).
    pub agent: String,
}

impl Identity {
    /// The identity of a daemon using these settings.
    pub fn new(brain_url: &str, worker_id: &str, token: &str) -> Identity {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC accepts any key length");
        mac.update(b"z4j-agentd remembered advertisement v1");
        let digest = mac.finalize().into_bytes();
        Identity {
            brain_url: brain_url.to_string(),
            worker_id: worker_id.to_string(),
            agent: hex::encode(&digest[..16]),
        }
    }
}

/// Who the brain said this agent is in the `hello_ack` that acknowledged
/// the advertisement: what the gateway tells local z4j agents while the
/// brain cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrainIdentity {
    /// The agent's id at the brain.
    pub agent_id: String,
    /// The project's id at the brain.
    pub project_id: String,
    /// The brain's version.
    pub brain_version: String,
}

/// What the file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    format: u32,
    #[serde(flatten)]
    identity: Identity,
    written_at: String,
    /// Absent in files written before the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    brain: Option<BrainIdentity>,
    engines: Vec<String>,
    capabilities: BTreeMap<String, Vec<String>>,
    schedulers: Vec<String>,
    runtime_features: Vec<String>,
}

/// Where the advertisement is remembered: beside the spool, named after it.
pub fn file_beside(spool: &Path) -> PathBuf {
    let mut name = spool.file_name().unwrap_or_default().to_os_string();
    name.push(".advertisement.json");
    spool.with_file_name(name)
}

/// The remembered advertisement file, and what it holds now.
#[derive(Debug)]
pub struct AdvertisementFile {
    path: PathBuf,
    identity: Identity,
    /// What the file holds (None: nothing valid yet).
    holds: Option<Advertisement>,
    /// The brain's identity it holds.
    brain: Option<BrainIdentity>,
}

impl AdvertisementFile {
    /// Reads `path`, written for `identity`. Returns the file and the
    /// advertisement it holds, or why it was ignored (a warning for the
    /// log; a missing file is not worth one: `Ok(None)`).
    pub fn open(
        path: PathBuf,
        identity: Identity,
    ) -> (AdvertisementFile, Result<Option<Advertisement>, String>) {
        let read = read(&path, &identity);
        let (holds, brain) = match &read {
            Ok(Some((adv, brain))) => (Some(adv.clone()), brain.clone()),
            _ => (None, None),
        };
        (
            AdvertisementFile {
                path,
                identity,
                holds,
                brain,
            },
            read.map(|r| r.map(|(adv, _)| adv)),
        )
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The brain's identity it holds (read at start, or written since).
    pub fn brain(&self) -> Option<&BrainIdentity> {
        self.brain.as_ref()
    }

    /// Whom what it holds was advertised to.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The brain acknowledged a `hello` that advertised `adv` for
    /// `identity`: written when it differs from what the file holds.
    /// Returns whether it was written; a failure is a warning, and the
    /// next acknowledged `hello` tries again.
    pub fn acknowledged(&mut self, adv: &Advertisement, identity: &Identity) -> bool {
        let brain = self.brain.clone();
        let Some(job) = self.to_write(adv, identity, brain.as_ref()) else {
            return false;
        };
        let written = job.run();
        if !written {
            self.not_written(&job);
        }
        written
    }

    /// What to write now that the brain acknowledged `adv` for
    /// `identity` (None: the file holds it already). The file counts as
    /// holding it from now on, so the write itself can be done without
    /// the lock this is held under; a failed write is reported back with
    /// [`AdvertisementFile::not_written`].
    pub fn to_write(
        &mut self,
        adv: &Advertisement,
        identity: &Identity,
        brain: Option<&BrainIdentity>,
    ) -> Option<FileWrite> {
        if self.holds.as_ref() == Some(adv)
            && &self.identity == identity
            && self.brain.as_ref() == brain
        {
            return None;
        }
        self.identity = identity.clone();
        self.holds = Some(adv.clone());
        self.brain = brain.cloned();
        Some(FileWrite {
            path: self.path.clone(),
            adv: adv.clone(),
            identity: identity.clone(),
            brain: brain.cloned(),
        })
    }

    /// `job` failed: the file does not hold it, so the next acknowledged
    /// `hello` tries again (unless another write took its place).
    pub fn not_written(&mut self, job: &FileWrite) {
        if self.holds.as_ref() == Some(&job.adv) && self.identity == job.identity {
            self.holds = None;
        }
    }
}

/// One write of the file, decided under the registry's lock and done
/// outside it (it fsyncs: a slow disk must not stall routing or hellos).
#[derive(Debug)]
pub struct FileWrite {
    path: PathBuf,
    adv: Advertisement,
    identity: Identity,
    brain: Option<BrainIdentity>,
}

impl FileWrite {
    /// Writes the file; a failure is a warning. Returns whether it was
    /// written.
    pub fn run(&self) -> bool {
        match write(&self.path, &self.adv, &self.identity, self.brain.as_ref()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    file = %self.path.display(),
                    error = %e,
                    "cannot remember the advertisement for the next start; after a restart the brain may show this host without engines until its workers reconnect"
                );
                false
            }
        }
    }
}

/// What a valid file holds: the advertisement, and the brain's identity
/// when the file has it.
type Held = (Advertisement, Option<BrainIdentity>);

fn read(path: &Path, identity: &Identity) -> Result<Option<Held>, String> {
    let bytes = match crate::config::read_small_file(path, MAX_FILE_BYTES) {
        Ok(b) => b,
        Err(crate::config::small_file::SmallFileError::Io(e))
            if e.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let stored: Stored =
        serde_json::from_slice(&bytes).map_err(|e| format!("it is not valid: {e}"))?;
    if stored.format != FORMAT {
        return Err(format!(
            "it has format {}, this daemon reads format {FORMAT}",
            stored.format
        ));
    }
    if stored.identity.brain_url != identity.brain_url {
        return Err(format!(
            "it was written for brain {}, this daemon talks to {}",
            stored.identity.brain_url, identity.brain_url
        ));
    }
    if stored.identity.worker_id != identity.worker_id {
        return Err(format!(
            "it was written for worker_id {}, this daemon is {}",
            stored.identity.worker_id, identity.worker_id
        ));
    }
    if stored.identity.agent != identity.agent {
        return Err("it was written for another agent token".into());
    }
    let adv = Advertisement {
        engines: stored.engines,
        capabilities: stored.capabilities,
        runtime_features: stored.runtime_features,
        schedulers: stored.schedulers,
    };
    check(&adv)?;
    if let Some(b) = &stored.brain {
        let fits =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_graphic());
        if !(fits(&b.agent_id) && fits(&b.project_id) && fits(&b.brain_version)) {
            return Err("its brain identity is not valid".into());
        }
    }
    Ok(Some((adv, stored.brain)))
}

/// What a hand-edited or damaged file could put in a `hello`: names the
/// local `hello` would not have accepted.
fn check(adv: &Advertisement) -> Result<(), String> {
    let labels = adv
        .engines
        .iter()
        .chain(&adv.schedulers)
        .chain(adv.capabilities.keys());
    if let Some(bad) = labels
        .clone()
        .find(|n| !engine_name_fits(n) || n.trim() != *n)
    {
        return Err(format!(
            "it names an engine or scheduler {bad:?} that is not valid"
        ));
    }
    let names = adv
        .capabilities
        .values()
        .flatten()
        .chain(&adv.runtime_features);
    if let Some(bad) = names
        .clone()
        .find(|n| n.is_empty() || n.len() > MAX_NAME_BYTES || n.trim() != *n)
    {
        return Err(format!(
            "it names an action or feature {bad:?} that is not valid"
        ));
    }
    let too_many = adv.engines.len() > MAX_ENTRIES
        || adv.schedulers.len() > MAX_ENTRIES
        || adv.runtime_features.len() > MAX_ENTRIES
        || adv.capabilities.len() > MAX_ENTRIES
        || adv.capabilities.values().any(|a| a.len() > MAX_ENTRIES);
    if too_many {
        return Err(format!("it lists more than {MAX_ENTRIES} entries"));
    }
    Ok(())
}

/// Writes `adv` to `path` atomically: a temp file beside it (mode 0600),
/// fsync, rename, fsync of the directory.
fn write(
    path: &Path,
    adv: &Advertisement,
    identity: &Identity,
    brain: Option<&BrainIdentity>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let stored = Stored {
        format: FORMAT,
        identity: identity.clone(),
        written_at: crate::protocol::format_ts(OffsetDateTime::now_utc()),
        brain: brain.cloned(),
        engines: adv.engines.clone(),
        capabilities: adv.capabilities.clone(),
        schedulers: adv.schedulers.clone(),
        runtime_features: adv.runtime_features.clone(),
    };
    let body = serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&body)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The remembered entries not yet declared again, and until when they
/// are advertised. Held by the registry, under its own lock (taken after
/// the clients' lock, never before).
#[derive(Debug, Default)]
pub struct Memory {
    /// Where the acknowledged advertisement is written.
    pub file: Option<AdvertisementFile>,
    /// Entries advertised only because they are remembered.
    pending: Advertisement,
    /// When they stop being advertised (monotonic, and wall clock for
    /// reports).
    until: Option<(Instant, OffsetDateTime)>,
}

impl Memory {
    /// Remembers `adv` (less what the configuration advertises anyway)
    /// for `grace` from now.
    pub fn remember(
        &mut self,
        mut adv: Advertisement,
        configured: &Advertisement,
        grace: Duration,
    ) {
        subtract(&mut adv, configured);
        self.pending = adv;
        self.until = Some((Instant::now() + grace, OffsetDateTime::now_utc() + grace));
    }

    /// Remembers `adv` until these instants (tests: a fixed wall clock).
    #[cfg(test)]
    pub fn remember_until(&mut self, adv: Advertisement, until: Instant, wall: OffsetDateTime) {
        self.pending = adv;
        self.until = Some((until, wall));
    }

    /// The entries still advertised only because they are remembered
    /// (none once the grace is over).
    pub fn pending(&self, now: Instant) -> Option<&Advertisement> {
        match self.until {
            Some((until, _)) if now < until && !is_empty(&self.pending) => Some(&self.pending),
            _ => None,
        }
    }

    /// How long the remembered entries stay advertised.
    pub fn left(&self, now: Instant) -> Duration {
        self.until
            .map(|(u, _)| u.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// A live process declared `r`: what it declares is no longer only
    /// remembered.
    pub fn declared(&mut self, r: &Registration) {
        if is_empty(&self.pending) {
            return;
        }
        let live = Advertisement {
            engines: r.engines.clone(),
            capabilities: r.capabilities.clone(),
            runtime_features: r.runtime_features.clone(),
            schedulers: r.schedulers.clone(),
        };
        subtract(&mut self.pending, &live);
    }

    /// The grace is over (or the memory is void): forgets every remembered
    /// entry. Returns whether some were still advertised.
    pub fn forget(&mut self) -> bool {
        let had = !is_empty(&self.pending);
        self.pending = Advertisement::default();
        self.until = None;
        had
    }

    /// For `stats` and `status`.
    pub fn report(&self, now: Instant) -> Option<RememberedReport> {
        let p = self.pending(now)?;
        let (_, wall) = self.until?;
        let left = self.left(now).as_secs_f64();
        Some(RememberedReport {
            engines: p.engines.clone(),
            capabilities: p.capabilities.clone(),
            schedulers: p.schedulers.clone(),
            runtime_features: p.runtime_features.clone(),
            until: crate::protocol::format_ts(wall),
            seconds_left: (left * 1000.0).round() / 1000.0,
        })
    }
}

fn is_empty(a: &Advertisement) -> bool {
    a.engines.is_empty()
        && a.capabilities.is_empty()
        && a.runtime_features.is_empty()
        && a.schedulers.is_empty()
}

/// `from` without the entries of `what`. A scheduler `what` declares
/// takes all of its actions with it: the one process that runs a
/// scheduler says what it can do, and a remembered action of it left
/// behind would be keyed by a name no longer listed as a scheduler, which
/// [`super::ClientRegistry::advertisement`] would then take for an engine.
fn subtract(from: &mut Advertisement, what: &Advertisement) {
    from.engines.retain(|e| !what.engines.contains(e));
    from.schedulers.retain(|s| !what.schedulers.contains(s));
    for s in &what.schedulers {
        from.capabilities.remove(s);
    }
    from.runtime_features
        .retain(|f| !what.runtime_features.contains(f));
    for (key, live) in &what.capabilities {
        if let Some(actions) = from.capabilities.get_mut(key) {
            actions.retain(|a| !live.contains(a));
            if actions.is_empty() {
                from.capabilities.remove(key);
            }
        }
    }
}

/// The remembered entries as `stats` reports them (`remembered`), and
/// `status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RememberedReport {
    /// Engines advertised only because they were advertised before the
    /// restart.
    pub engines: Vec<String>,
    /// Actions per engine or scheduler, likewise.
    pub capabilities: BTreeMap<String, Vec<String>>,
    /// Schedulers, likewise.
    pub schedulers: Vec<String>,
    /// Runtime features, likewise.
    pub runtime_features: Vec<String>,
    /// When they stop being advertised unless a process declares them.
    pub until: String,
    /// How long until then.
    pub seconds_left: f64,
}

#[cfg(test)]
mod tests;
