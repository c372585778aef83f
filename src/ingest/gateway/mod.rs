//! The gateway: the brain's side of protocol v2, served to the z4j agents
//! of this host (z4j-celery, z4j-rq, z4j-django... on z4j-bare) on a
//! loopback address (`Z4J_GATEWAY_ADDR`), so that an unmodified agent
//! uses the daemon by pointing `Z4J_BRAIN_URL` at it.
//!
//! One concern per file:
//! * this file: the listener, the connection cap, the shared state
//!   (accepted tokens, agents whose signatures failed, their losses);
//! * [`handshake`]: the WebSocket upgrade, the bearer token, `hello`,
//!   `hello_ack`, with the brain's close codes;
//! * [`session`]: one agent's session: frames verified like the brain
//!   verifies them, handed to the same handler and spool path as socket
//!   messages, replies signed for the local session;
//! * [`translate`]: frames <-> local messages, with no I/O.
//!
//! Invariants:
//! * a local agent's events are acknowledged (`event_batch_ack`) only
//!   after the spool committed them, exactly as a socket client's;
//! * the brain sees one connection for the host (the daemon's worker slot):
//!   an agent's `hello` registers it as a local client, whose engines,
//!   schedulers and capabilities join the daemon's advertisement;
//! * no token or secret is logged or put in a close reason: tokens are
//!   compared as SHA-256 digests and named by nothing.

mod handshake;
mod peer;
mod session;
pub mod translate;

pub use handshake::PATH;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Ingest;
use crate::config::{GatewaySettings, UplinkSettings};

/// The largest frame a local agent may send, as the brain's default
/// (`hello_ack.max_frame_size_bytes`); a larger one closes with 4400.
pub const MAX_FRAME_BYTES: usize = 1_048_576;
/// How long an agent whose frames failed the signature check is refused
/// at its next handshakes (per token and `worker_id`: a restarted process
/// has a new `worker_id` and is heard at once).
pub const SUSPECT_FOR: Duration = Duration::from_secs(600);
/// Agents remembered as failing their signatures, at most.
const MAX_SUSPECTS: usize = 1024;
/// Agent buffers whose loss counters are remembered, at most.
const MAX_LOSS_BUFFERS: usize = 1024;
/// Connections refused for the cap that are still given their close code
/// at once; beyond, they are dropped.
pub const REFUSALS_IN_FLIGHT: usize = 32;

/// A token's SHA-256 digest: what the gateway compares and remembers.
type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// What every gateway connection shares.
pub struct Gateway {
    settings: GatewaySettings,
    /// The daemon's token and signing key, as SIGHUP last set them.
    uplink: watch::Receiver<UplinkSettings>,
    /// Agents whose frames failed the signature check under a key (its
    /// fingerprint: a new HMAC secret on SIGHUP hears them again), until when.
    suspects: Mutex<VecDeque<Suspect>>,
    /// Per agent buffer, the loss counters it reported last.
    losses: Mutex<BTreeMap<String, BufferLoss>>,
    /// The open sessions by agent slot (token and `worker_id`, as the
    /// brain keys them): the session id, and how to tell it a newer
    /// connection took its place.
    slots: Mutex<BTreeMap<(TokenDigest, String), (u64, CancellationToken)>>,
}

/// An agent whose frames failed the signature check.
struct Suspect {
    token: TokenDigest,
    worker_id: String,
    key: String,
    until: Instant,
}

/// What an agent's buffer reported lost, as last seen.
#[derive(Debug, Default, Clone)]
struct BufferLoss {
    events: u64,
    adapter_events: BTreeMap<String, u64>,
    seen: u64,
}

impl Gateway {
    /// The gateway's shared state.
    pub fn new(settings: GatewaySettings, uplink: watch::Receiver<UplinkSettings>) -> Arc<Self> {
        Arc::new(Gateway {
            settings,
            uplink,
            suspects: Mutex::new(VecDeque::new()),
            losses: Mutex::new(BTreeMap::new()),
            slots: Mutex::new(BTreeMap::new()),
        })
    }

    /// Session `id` takes this agent's slot; an older session in it is
    /// told to close with 4002, as the brain does. Returns what tells this
    /// one in turn.
    fn take_slot(&self, token: TokenDigest, worker_id: &str, id: u64) -> CancellationToken {
        let mine = CancellationToken::new();
        let old = self
            .slots
            .lock()
            .unwrap()
            .insert((token, worker_id.to_string()), (id, mine.clone()));
        if let Some((_, older)) = old {
            older.cancel();
        }
        mine
    }

    /// Session `id` ended: its slot is free, unless a newer one took it.
    fn leave_slot(&self, token: TokenDigest, worker_id: &str, id: u64) {
        let mut slots = self.slots.lock().unwrap();
        let key = (token, worker_id.to_string());
        if slots.get(&key).is_some_and(|(holder, _)| *holder == id) {
            slots.remove(&key);
        }
    }

    /// Whether `token` may connect: the daemon's own, or one of the tokens
    /// file (read again now, so a change applies to the next connection).
    /// `Err` says why the tokens file could not be read.
    fn accepts(&self, token: &str) -> Result<bool, String> {
        let given = digest(token);
        if digest(self.uplink.borrow().token.expose()) == given {
            return Ok(true);
        }
        let Some(path) = &self.settings.tokens_file else {
            return Ok(false);
        };
        let tokens = crate::config::gateway_tokens::read(path)?;
        Ok(tokens.iter().any(|t| digest(t.expose()) == given))
    }

    /// A fingerprint of the signing key in force (never the key).
    fn key_fingerprint(&self) -> String {
        let key = self.uplink.borrow().key.clone();
        crate::protocol::mac_hex(&key, b"z4j-agentd gateway suspect")[..16].to_string()
    }

    /// Whether this agent's frames failed the signature check lately,
    /// under the key in force now.
    fn is_suspect(&self, token: &TokenDigest, worker_id: &str) -> bool {
        let now = Instant::now();
        let key = self.key_fingerprint();
        let mut s = self.suspects.lock().unwrap();
        s.retain(|x| x.until > now);
        s.iter()
            .any(|x| x.token == *token && x.worker_id == worker_id && x.key == key)
    }

    /// This agent's frames failed the signature check.
    fn suspect(&self, token: TokenDigest, worker_id: &str) {
        let key = self.key_fingerprint();
        let mut s = self.suspects.lock().unwrap();
        s.retain(|x| !(x.token == token && x.worker_id == worker_id));
        if s.len() == MAX_SUSPECTS {
            s.pop_front();
        }
        s.push_back(Suspect {
            token,
            worker_id: worker_id.to_string(),
            key,
            until: Instant::now() + SUSPECT_FOR,
        });
    }

    /// What an agent's buffer lost since it last said: per engine, the
    /// events to count as lost (its own adapters' counts under their
    /// names, its buffer's under `engines`).
    fn loss_delta(
        &self,
        report: &translate::LossReport,
        engines: &[String],
    ) -> Vec<(Vec<String>, u64)> {
        let mut losses = self.losses.lock().unwrap();
        let seen = losses.values().map(|l| l.seen).max().unwrap_or(0) + 1;
        if !losses.contains_key(&report.buffer_id) && losses.len() == MAX_LOSS_BUFFERS {
            if let Some(oldest) = losses
                .iter()
                .min_by_key(|(_, l)| l.seen)
                .map(|(k, _)| k.clone())
            {
                losses.remove(&oldest);
            }
        }
        let last = losses.entry(report.buffer_id.clone()).or_default();
        let mut out = Vec::new();
        // A count lower than last time is a new buffer under the same id:
        // all of it is new.
        let new_events = match report.events.checked_sub(last.events) {
            Some(d) => d,
            None => report.events,
        };
        if new_events > 0 {
            out.push((engines.to_vec(), new_events));
        }
        for (adapter, n) in &report.adapter_events {
            let before = last.adapter_events.get(adapter).copied().unwrap_or(0);
            let d = n.checked_sub(before).unwrap_or(*n);
            if d > 0 {
                out.push((vec![adapter.clone()], d));
            }
        }
        last.events = report.events;
        last.adapter_events = report.adapter_events.iter().cloned().collect();
        last.seen = seen;
        out
    }
}

impl Ingest {
    /// Serves the gateway on `listener` until `shutdown`; each connection
    /// in a task of its own, at most `max_connections` at once (more get
    /// the brain's 4429).
    pub async fn serve_gateway(
        self: Arc<Self>,
        listener: TcpListener,
        gateway: Arc<Gateway>,
        shutdown: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(gateway.settings.max_connections));
        let refusing = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
        let mut tasks = JoinSet::new();
        let mut warned: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let me = self.clone();
                        let gw = gateway.clone();
                        let stop = shutdown.clone();
                        match slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                tasks.spawn(async move {
                                    me.gateway_connection(stream, peer, gw, stop).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                if let Ok(r) = refusing.clone().try_acquire_owned() {
                                    let max = gateway.settings.max_connections;
                                    tasks.spawn(async move {
                                        handshake::refuse_full(stream, &me.stats, max).await;
                                        drop(r);
                                    });
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, most likely: said at most
                        // every 10 s, and the loop pauses a little.
                        if warned.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(10)) {
                            warned = Some(Instant::now());
                            tracing::warn!(error = %e, "gateway: accepting a connection failed");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn uplink_settings(token: &str) -> UplinkSettings {
        UplinkSettings {
            endpoint: crate::config::parse_brain_url("http://127.0.0.1:1", false).unwrap(),
            token: crate::config::Secret::new(token.into()),
            key: crate::protocol::SigningKey::from_bytes(&[7; 32]).unwrap(),
            worker_id: "agentd-test".into(),
            agent_name: "test".into(),
            static_engines: vec![],
            static_capabilities: Default::default(),
            ca_file: None,
            batch_max_events: 100,
            inflight_frames: 2,
            ack_timeout: Duration::from_secs(60),
            transport: crate::config::Transport::Auto,
            longpoll_max_body: 8192,
            ws_retry: Duration::from_secs(300),
        }
    }

    fn gateway() -> Arc<Gateway> {
        let (_tx, rx) = watch::channel(uplink_settings("own-token"));
        Gateway::new(
            GatewaySettings {
                addr: "127.0.0.1:0".parse().unwrap(),
                tokens_file: None,
                max_connections: 4,
            },
            rx,
        )
    }

    #[test]
    fn the_daemons_own_token_is_accepted_and_another_is_not() {
        let g = gateway();
        assert_eq!(g.accepts("own-token"), Ok(true));
        assert_eq!(g.accepts("other-token"), Ok(false));
    }

    #[test]
    fn a_new_hmac_secret_hears_suspects_again() {
        let (tx, rx) = watch::channel(uplink_settings("own-token"));
        let g = Gateway::new(
            GatewaySettings {
                addr: "127.0.0.1:0".parse().unwrap(),
                tokens_file: None,
                max_connections: 4,
            },
            rx,
        );
        g.suspect(digest("t"), "celery-1");
        assert!(g.is_suspect(&digest("t"), "celery-1"));
        let mut reloaded = uplink_settings("own-token");
        reloaded.key = crate::protocol::SigningKey::from_bytes(&[8; 32]).unwrap();
        tx.send(reloaded).unwrap();
        assert!(!g.is_suspect(&digest("t"), "celery-1"));
    }

    #[test]
    fn a_newer_connection_of_the_same_slot_replaces_the_older_one() {
        let g = gateway();
        let first = g.take_slot(digest("t"), "w", 1);
        let other = g.take_slot(digest("t"), "v", 2);
        assert!(!first.is_cancelled());
        let second = g.take_slot(digest("t"), "w", 3);
        assert!(
            first.is_cancelled(),
            "the older session is told to close (4002)"
        );
        g.leave_slot(digest("t"), "w", 1);
        assert!(!second.is_cancelled());
        let third = g.take_slot(digest("t"), "w", 4);
        assert!(
            second.is_cancelled(),
            "the slot was still the second session's"
        );
        g.leave_slot(digest("t"), "w", 4);
        let fourth = g.take_slot(digest("t"), "w", 5);
        assert!(
            !third.is_cancelled(),
            "a session that left is not told again"
        );
        assert!(!fourth.is_cancelled() && !other.is_cancelled());
    }

    #[test]
    fn a_suspect_is_one_token_and_worker_id_only() {
        let g = gateway();
        g.suspect(digest("t"), "celery-1");
        assert!(g.is_suspect(&digest("t"), "celery-1"));
        assert!(!g.is_suspect(&digest("t"), "celery-2"));
        assert!(!g.is_suspect(&digest("u"), "celery-1"));
    }

    #[test]
    fn an_agents_losses_count_once_and_a_reset_buffer_counts_again() {
        let g = gateway();
        let r = |events, celery| translate::LossReport {
            buffer_id: "b".into(),
            events,
            adapter_events: vec![("celery".into(), celery)],
        };
        let engines = vec!["rq".to_string()];
        assert_eq!(
            g.loss_delta(&r(3, 1), &engines),
            vec![(engines.clone(), 3), (vec!["celery".into()], 1)]
        );
        assert_eq!(g.loss_delta(&r(3, 1), &engines), vec![]);
        assert_eq!(g.loss_delta(&r(5, 1), &engines), vec![(engines.clone(), 2)]);
        assert_eq!(g.loss_delta(&r(1, 1), &engines), vec![(engines.clone(), 1)]);
    }
}
