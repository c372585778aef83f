//! Wiring: startup order, readiness, shutdown and reload.
//!
//! Start: resolve and open the spool (recovering what a previous run left),
//! bind the socket, report `READY=1`, then start the uplink. The brain being
//! down never delays readiness: applications can write while it is away.
//!
//! Stop (the `shutdown` token): `STOPPING=1`, stop accepting, let open
//! connections finish what they sent, commit, drain to the brain, close the
//! WebSocket with 1000, close the spool. The grace period bounds all of it:
//! producers held back by a full spool (`block`) wait for room for half of
//! it, then are told the daemon is stopping; connections still open when it
//! ends are closed; the uplink then gets [`UPLINK_CLOSE_MARGIN`] to close.
//! Nothing is global: the caller owns the shutdown token and the settings
//! channel (SIGHUP sends new settings on it), so tests run whole daemons
//! in-process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, UplinkSettings};
use crate::ingest::{self, Ingest, IngestConfig, IngestError};
use crate::spool::path::{self, PathError};
use crate::spool::{Spool, SpoolConfig, SpoolError};
use crate::stats::{DaemonInfo, Stats};
use crate::uplink::Uplink;
use crate::watchdog::Watchdog;

/// After the grace period, how long the uplink may take to close the
/// brain connection before it is dropped.
pub const UPLINK_CLOSE_MARGIN: Duration = Duration::from_secs(3);

/// The least time open connections get to finish what they sent, even with
/// a grace period of 0.
const CLIENTS_FINISH_MIN: Duration = Duration::from_secs(1);

/// Startup failures.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The spool path was refused.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The socket could not be bound.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The metrics listener could not be bound.
    #[error(
        "cannot serve metrics on {addr}: {source}; choose another Z4J_METRICS_ADDR or unset it"
    )]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Process exit code: 64 for a configuration problem, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Path(_) => 64,
            _ => 1,
        }
    }
}

/// What a started daemon reports to its caller once it accepts clients.
#[derive(Clone)]
pub struct Ready {
    /// The spool file in use.
    pub spool_path: PathBuf,
    /// The socket path in use.
    pub socket_path: PathBuf,
    /// The shared status (for tests and the admin side).
    pub status: Arc<Stats>,
    /// Where `/metrics` is served, when enabled (the bound port for `:0`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled and the drain finished.
pub async fn run(
    config: Config,
    settings: watch::Receiver<UplinkSettings>,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), DaemonError> {
    let location = path::resolve(config.buffer_path.as_deref(), &config.host)?;
    if let Some(from) = &location.fell_back_from {
        tracing::warn!(
            wanted = %from.display(),
            using = %location.path.display(),
            "spool directory not writable; using the private fallback directory instead (set Z4J_BUFFER_PATH or Z4J_HOME, or StateDirectory= under systemd, to keep the spool across reboots)"
        );
    }
    let spool_config = SpoolConfig {
        path: location.path.clone(),
        max_events: config.buffer_max_events,
        max_bytes: config.buffer_max_bytes,
        overflow: config.buffer_overflow,
        synchronous: config.buffer_synchronous,
    };
    let spool = tokio::task::spawn_blocking(move || Spool::open(spool_config))
        .await
        .expect("spool open does not panic")?;
    let spool_handle = spool.handle();
    let recovered = spool_handle
        .stats()
        .depth
        .load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        spool = %location.path.display(),
        recovered_events = recovered,
        "spool open"
    );

    let configured_socket = config
        .socket_path
        .clone()
        .unwrap_or_else(|| ingest::default_socket_path(&config.host));
    let (listener, socket_path) = match &config.activated {
        Some(activated) => {
            match take_activated(activated, config.socket_path.as_deref(), &configured_socket) {
                Ok(taken) => taken,
                Err(e) => {
                    spool.close().await;
                    return Err(e.into());
                }
            }
        }
        None => {
            if config.socket_path.is_none()
                && config.host.runtime_directory.is_none()
                && config.host.xdg_runtime_dir.is_none()
            {
                // The default lives in our private tmp directory; make sure it is ours.
                path::ensure_private_tmp_dir(&config.host.tmp_private_dir(), config.host.uid)?;
            }
            match ingest::bind(&configured_socket, config.socket_mode) {
                Ok(l) => {
                    tracing::info!(
                        socket = %configured_socket.display(),
                        mode = format!("{:04o}", config.socket_mode),
                        "listening for local clients"
                    );
                    (l, configured_socket)
                }
                Err(e) => {
                    spool.close().await;
                    return Err(e.into());
                }
            }
        }
    };

    let status = Arc::new(Stats::new());
    status.set_info(DaemonInfo {
        brain_url: config.uplink.endpoint.base_url.clone(),
        worker_id: config.uplink.worker_id.clone(),
        agent_name: config.uplink.agent_name.clone(),
        static_engines: config.uplink.static_engines.clone(),
        static_capabilities: config.uplink.static_capabilities.clone(),
        spool_path: location.path.display().to_string(),
        socket_path: socket_path.display().to_string(),
    });
    status.sample(spool_handle.stats());
    let (router, results) = crate::commands::Router::new(status.clone());
    let ingest = Ingest::new(
        IngestConfig {
            socket_path: socket_path.clone(),
            allowed_uids: config.allowed_uids.clone(),
            allowed_gids: config.allowed_gids.clone(),
            max_clients: config.max_clients,
            max_message_bytes: ingest::DEFAULT_MAX_MESSAGE_BYTES,
            max_event_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES
                - ingest::FRAME_ENVELOPE_RESERVE,
            partial_message_timeout: ingest::PARTIAL_MESSAGE_TIMEOUT,
            remove_socket_on_exit: config.activated.is_none(),
        },
        spool_handle.clone(),
        status.clone(),
        router.clone(),
    );
    // Every part answers the watchdog; without one the beats are never asked.
    let mut watchdog = Watchdog::new();
    let ingest_beat = watchdog.part("ingest");
    let spool_beat = watchdog.part("spool");
    let uplink_beat = watchdog.part("uplink");
    let ingest_stop = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest.serve(listener, ingest_stop.clone(), ingest_beat));

    let metrics_stop = CancellationToken::new();
    let metrics_addr = match config.metrics_addr {
        None => None,
        Some(addr) => match crate::metrics::serve(
            addr,
            status.clone(),
            spool_handle.clone(),
            socket_path.clone(),
            metrics_stop.clone(),
        )
        .await
        {
            Ok(bound) => {
                tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
                Some(bound)
            }
            Err(source) => {
                ingest_stop.cancel();
                let _ = ingest_task.await;
                let _ = std::fs::remove_file(&socket_path);
                spool.close().await;
                return Err(DaemonError::Metrics { addr, source });
            }
        },
    };

    let first_status = status_line(&status, spool_handle.stats());
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&first_status),
    ]);
    let watchdog_stop = CancellationToken::new();
    let spool_pinger = spool_handle.clone();
    let spool_beat_task = tokio::spawn(spool_beat.answer_with(move || {
        let spool = spool_pinger.clone();
        async move { spool.ping().await.is_ok() }
    }));
    let watchdog_task = match config.watchdog {
        Some(timeout) => {
            let period = crate::watchdog::period(timeout);
            tracing::info!(
                watchdog_ms = timeout.as_millis() as u64,
                ping_every_ms = period.as_millis() as u64,
                "systemd watchdog on: WATCHDOG=1 only while ingest, spool and uplink answer"
            );
            Some(tokio::spawn(watchdog.run(
                period,
                watchdog_stop.clone(),
                || notify(&[sd_notify::NotifyState::Watchdog]),
                |_| {},
            )))
        }
        None => {
            drop(watchdog);
            None
        }
    };
    if let Some(tx) = ready {
        let _ = tx.send(Ready {
            spool_path: location.path.clone(),
            socket_path: socket_path.clone(),
            status: status.clone(),
            metrics_addr,
        });
    }
    tracing::info!(
        brain = %config.uplink.endpoint.base_url,
        worker_id = %config.uplink.worker_id,
        "z4j-agentd {} ready",
        env!("CARGO_PKG_VERSION")
    );

    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    let uplink = Uplink::new(
        settings,
        spool_handle.clone(),
        status.clone(),
        crate::uplink::Control {
            drain: drain.clone(),
            stop: stop.clone(),
            beat: uplink_beat,
        },
        router.clone(),
        results,
    );
    let mut uplink_task = tokio::spawn(uplink.run());
    let status_task = tokio::spawn(report_status(
        status.clone(),
        spool_handle.clone(),
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    let stop_began = tokio::time::Instant::now();
    let deadline = stop_began + config.shutdown_grace;
    // systemd stops watching once the unit is stopping; so do we.
    watchdog_stop.cancel();
    if let Some(t) = watchdog_task {
        let _ = t.await;
    }
    spool_beat_task.abort();
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status(
            "stopping: finishing client messages and draining the spool",
        ),
    ]);
    tracing::info!("shutting down: no new clients; finishing what connected clients sent");
    router.shutting_down(&config.uplink.agent_name);
    ingest_stop.cancel();
    let mut ingest_task = ingest_task;
    // A producer held back by a full spool (`block`) may still get room
    // while the uplink delivers, for the first half of the grace period;
    // then it is told the daemon is stopping (nothing of what did not fit is
    // stored, and it is counted) instead of waiting for a brain that may
    // never come back.
    let hold_until = stop_began + config.shutdown_grace / 2;
    if tokio::time::timeout_at(hold_until, &mut ingest_task)
        .await
        .is_err()
    {
        if spool_handle.overflow() == crate::spool::Overflow::Block {
            tracing::info!(
                "shutting down: producers waiting for room in the spool are told the daemon is stopping"
            );
        }
        spool_handle.stop_holding_producers();
        let clients_until = deadline.max(stop_began + CLIENTS_FINISH_MIN);
        if tokio::time::timeout_at(clients_until, &mut ingest_task)
            .await
            .is_err()
        {
            tracing::warn!(
                clients = status.clients().len(),
                "shutdown grace period over: closing local connections that are still sending; what they sent and got no ack for may or may not be stored"
            );
            ingest_task.abort();
            let _ = ingest_task.await;
        }
    }
    let depth = spool_handle
        .stats()
        .depth
        .load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        spool_depth = depth,
        grace_s = config.shutdown_grace.as_secs(),
        grace_left_ms = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_millis() as u64,
        "draining the spool to the brain"
    );
    drain.cancel();
    if tokio::time::timeout_at(deadline, &mut uplink_task)
        .await
        .is_err()
    {
        stop.cancel();
        if tokio::time::timeout(UPLINK_CLOSE_MARGIN, &mut uplink_task)
            .await
            .is_err()
        {
            tracing::warn!("the brain connection did not close in time; dropping it");
            uplink_task.abort();
            let _ = uplink_task.await;
        }
    }
    status_task.abort();
    metrics_stop.cancel();
    let left = spool_handle
        .stats()
        .depth
        .load(std::sync::atomic::Ordering::Relaxed);
    spool.close().await;
    tracing::info!(
        undelivered_events_kept = left,
        refused_while_stopping = status
            .refused()
            .get("daemon_stopping")
            .copied()
            .unwrap_or(0),
        stop_ms = stop_began.elapsed().as_millis() as u64,
        "stopped"
    );
    Ok(())
}

use crate::systemd::notify;

/// The listener systemd passed, ready for tokio, and where it lives.
fn take_activated(
    activated: &crate::systemd::Activated,
    explicit: Option<&std::path::Path>,
    configured: &std::path::Path,
) -> Result<(tokio::net::UnixListener, PathBuf), IngestError> {
    let path = activated
        .path
        .clone()
        .unwrap_or_else(|| configured.to_path_buf());
    let bind_error = |source| IngestError::Bind {
        path: path.display().to_string(),
        source,
    };
    let std_listener = activated.listener.try_clone().map_err(bind_error)?;
    std_listener.set_nonblocking(true).map_err(bind_error)?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(bind_error)?;
    if activated.path.is_some() && explicit.is_some_and(|e| e != path) {
        tracing::warn!(
            activated = %path.display(),
            configured = %configured.display(),
            "the socket systemd passed is not at the configured socket path; serving the one systemd passed (align Z4J_SOCKET_PATH with ListenStream=)"
        );
    }
    tracing::info!(
        socket = %path.display(),
        fd_name = activated.name.as_deref().unwrap_or(""),
        "listening for local clients on the socket systemd passed (socket activation)"
    );
    Ok((listener, path))
}

/// Samples the counters every second (for the rates `status` shows) and
/// keeps `systemctl status` informative: a STATUS= line whenever what it
/// says changed, at most once a second.
async fn report_status(
    status: Arc<Stats>,
    spool: crate::spool::SpoolHandle,
    shutdown: CancellationToken,
) {
    let systemd = std::env::var_os("NOTIFY_SOCKET").is_some();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        status.sample(spool.stats());
        if !systemd {
            continue;
        }
        let line = status_line(&status, spool.stats());
        if line != last {
            notify(&[sd_notify::NotifyState::Status(&line)]);
            last = line;
        }
    }
}

/// What `systemctl status` shows on its Status: line.
fn status_line(stats: &Stats, st: &crate::spool::SpoolStats) -> String {
    crate::systemd::status_text(&stats.snapshot(st))
}
