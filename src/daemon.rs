//! Wiring: startup order, readiness, shutdown and reload, in three phases.
//!
//! [`run`] is start → running → shutdown(grace), each a function:
//!
//! * **start** (open, bind, spawn): resolve and open the spool (recovering
//!   what a previous run left), bind the socket (or take the one systemd
//!   passed), start ingest, bind `/metrics`, report `READY=1`, then start
//!   the uplink. The brain being down never delays readiness: applications
//!   can write while it is away. Until start succeeds, a `Startup` guard
//!   owns what is open; an early error drops it, which stops what was
//!   spawned, removes the socket it bound and closes the spool, so no error
//!   path cleans up by hand.
//! * **running**: until the `shutdown` token is cancelled, or until ingest
//!   or the uplink ends on its own, which only a bug does; the daemon then
//!   stops the same way and exits with an error, so a supervisor restarts it.
//! * **shutdown(grace)**: `STOPPING=1`, stop accepting, let open
//!   connections finish what they sent, commit, drain to the brain, close
//!   the WebSocket with 1000, close the spool. The grace period bounds all
//!   of it: producers held back by a full spool (`block`) wait for room for
//!   half of it, then are told the daemon is stopping; connections still
//!   open when it ends are closed; the uplink then gets
//!   [`UPLINK_CLOSE_MARGIN`] to close.
//!
//! Nothing is global: the caller owns the shutdown token and the settings
//! channel (SIGHUP sends new settings on it), so tests run whole daemons
//! in-process.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::commands::Router;
use crate::config::{Config, UplinkSettings};
use crate::ingest::{self, Ingest, IngestConfig, IngestError};
use crate::spool::path::{self, PathError};
use crate::spool::{Spool, SpoolConfig, SpoolError, SpoolHandle};
use crate::stats::{DaemonInfo, Stats};
use crate::systemd::notify;
use crate::uplink::Uplink;
use crate::watchdog::{Beat, Watchdog};

/// After the grace period, how long the uplink may take to close the
/// brain connection before it is dropped.
pub const UPLINK_CLOSE_MARGIN: Duration = Duration::from_secs(3);

/// The least time open connections get to finish what they sent, even with
/// a grace period of 0.
const CLIENTS_FINISH_MIN: Duration = Duration::from_secs(1);

/// Why the daemon could not start, or stopped on its own.
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
    /// The gateway listener could not be bound.
    #[error(
        "cannot serve the gateway on {addr}: {source}; choose another Z4J_GATEWAY_ADDR or unset it"
    )]
    Gateway {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// A part that runs until shutdown ended on its own (a bug); the
    /// daemon stopped as on a signal, keeping the spool.
    #[error("the {part} stopped unexpectedly, so z4j-agentd stopped too (undelivered events stay in the spool); start it again, and report the log above as a bug")]
    PartEnded {
        /// `ingest` or `uplink`.
        part: &'static str,
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

    /// Whether the daemon never got to serve (false: it ran, then stopped).
    pub fn at_start(&self) -> bool {
        !matches!(self, DaemonError::PartEnded { .. })
    }
}

/// What a started daemon reports to its caller once it accepts clients.
#[derive(Clone)]
pub struct Ready {
    /// The spool file in use.
    pub spool_path: PathBuf,
    /// The socket path in use.
    pub socket_path: PathBuf,
    /// The shared counters (for tests and the admin side).
    pub stats: Arc<Stats>,
    /// Where `/metrics` is served, when enabled (the bound port for `:0`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where the gateway listens, when enabled (the bound port for `:0`).
    pub gateway_addr: Option<std::net::SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled and the drain finished.
pub async fn run(
    config: Config,
    settings: watch::Receiver<UplinkSettings>,
    shutdown: CancellationToken,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<(), DaemonError> {
    let mut daemon = start(config, settings, ready).await?;
    let ended = daemon.wait(&shutdown).await;
    daemon.shutdown().await;
    match ended {
        None => Ok(()),
        Some(part) => Err(DaemonError::PartEnded { part }),
    }
}

/// What [`start`] has opened so far. Dropped before start succeeds (an
/// early error), it undoes it: stops and aborts what was spawned, removes
/// the socket it bound, and closes the spool, releasing its lock before
/// [`run`] returns.
struct Startup {
    spool: Option<Spool>,
    /// The socket bound here (not one systemd passed), removed on failure.
    bound_socket: Option<PathBuf>,
    stops: Vec<CancellationToken>,
    tasks: Vec<AbortHandle>,
}

impl Startup {
    fn new(spool: Spool) -> Startup {
        Startup {
            spool: Some(spool),
            bound_socket: None,
            stops: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// Start succeeded: nothing is undone, the spool is the daemon's.
    fn succeeded(mut self) -> Spool {
        self.bound_socket = None;
        self.stops.clear();
        self.tasks.clear();
        self.spool
            .take()
            .expect("the spool is held until start succeeds")
    }
}

impl Drop for Startup {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.cancel();
        }
        for task in &self.tasks {
            task.abort();
        }
        if let Some(socket) = self.bound_socket.take() {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(spool) = self.spool.take() {
            spool.close_blocking();
        }
    }
}

/// A started daemon: its parts, and what [`Daemon::shutdown`] stops them by.
struct Daemon {
    spool: Spool,
    spool_handle: SpoolHandle,
    stats: Arc<Stats>,
    router: Arc<Router>,
    /// For the command results failed at shutdown.
    agent_name: String,
    grace: Duration,
    /// `None` once it ended (on its own, while running).
    ingest: Option<JoinHandle<()>>,
    ingest_stop: CancellationToken,
    metrics_stop: CancellationToken,
    watchdog: Option<JoinHandle<()>>,
    watchdog_stop: CancellationToken,
    spool_beat: JoinHandle<()>,
    /// `None` once it ended (on its own, while running).
    uplink: Option<JoinHandle<()>>,
    uplink_drain: CancellationToken,
    uplink_stop: CancellationToken,
    reporter: JoinHandle<()>,
    /// Ends the restart grace of the remembered advertisement.
    remembered_expiry: Option<JoinHandle<()>>,
}

/// The watchdog and the beats of the three parts it asks.
struct Beats {
    watchdog: Watchdog,
    ingest: Beat,
    spool: Beat,
    uplink: Beat,
}

impl Beats {
    /// Every part answers the watchdog; without one the beats are never asked.
    fn new() -> Beats {
        let mut watchdog = Watchdog::new();
        Beats {
            ingest: watchdog.part("ingest"),
            spool: watchdog.part("spool"),
            uplink: watchdog.part("uplink"),
            watchdog,
        }
    }
}

/// Start: open the spool, bind the socket, start ingest, bind `/metrics`,
/// report ready, start the uplink. On an error, what was opened is undone
/// by the [`Startup`] guard.
async fn start(
    config: Config,
    settings: watch::Receiver<UplinkSettings>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<Daemon, DaemonError> {
    let (spool, spool_path) = open_spool(&config).await?;
    let spool_handle = spool.handle();
    let mut startup = Startup::new(spool);
    let (listener, socket_path) = listen(&config)?;
    if config.activated.is_none() {
        startup.bound_socket = Some(socket_path.clone());
    }
    let stats = Arc::new(Stats::new());
    stats.set_info(daemon_info(&config, &spool_path, &socket_path));
    let remembered_expiry = remember_advertisement(&config, &stats, &spool_path);
    if let Some(t) = &remembered_expiry {
        startup.tasks.push(t.abort_handle());
    }
    stats.sample(spool_handle.stats());
    let (router, results) = command_router(&stats, &settings);
    let beats = Beats::new();
    let ingest_stop = CancellationToken::new();
    let ingest = Ingest::new(
        ingest_config(&config, socket_path.clone()),
        spool_handle.clone(),
        stats.clone(),
        router.clone(),
    );
    startup.stops.push(ingest_stop.clone());
    let gateway_addr = bind_gateway(&config, &ingest, &settings).await?;
    let ingest_task = tokio::spawn(ingest.serve(listener, ingest_stop.clone(), beats.ingest));
    startup.tasks.push(ingest_task.abort_handle());

    let metrics_stop = CancellationToken::new();
    startup.stops.push(metrics_stop.clone());
    let metrics_addr =
        serve_metrics(&config, &stats, &spool_handle, &socket_path, &metrics_stop).await?;

    // Nothing fails from here on.
    let spool = startup.succeeded();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(&stats, spool_handle.stats())),
    ]);
    let spool_beat = spawn_spool_beat(&spool_handle, beats.spool);
    let watchdog_stop = CancellationToken::new();
    let watchdog = spawn_watchdog(config.watchdog, beats.watchdog, &watchdog_stop);
    let report = Ready {
        spool_path,
        socket_path,
        stats: stats.clone(),
        metrics_addr,
        gateway_addr,
    };
    say_ready(&config, ready, report);
    let (uplink_task, uplink_drain, uplink_stop) = spawn_uplink(
        settings,
        &spool_handle,
        &stats,
        beats.uplink,
        &router,
        results,
    );
    let reporter = tokio::spawn(report_status(stats.clone(), spool_handle.clone()));
    Ok(Daemon {
        spool,
        spool_handle,
        stats,
        router,
        agent_name: config.uplink.agent_name.clone(),
        grace: config.shutdown_grace,
        ingest: Some(ingest_task),
        ingest_stop,
        metrics_stop,
        watchdog,
        watchdog_stop,
        spool_beat,
        uplink: Some(uplink_task),
        uplink_drain,
        uplink_stop,
        reporter,
        remembered_expiry,
    })
}

/// The uplink, and the tokens that tell it to drain, then to stop.
fn spawn_uplink(
    settings: watch::Receiver<UplinkSettings>,
    spool: &SpoolHandle,
    stats: &Arc<Stats>,
    beat: Beat,
    router: &Arc<Router>,
    results: crate::commands::Results,
) -> (JoinHandle<()>, CancellationToken, CancellationToken) {
    let control = crate::uplink::Control {
        drain: CancellationToken::new(),
        stop: CancellationToken::new(),
        beat,
    };
    let (drain, stop) = (control.drain.clone(), control.stop.clone());
    let uplink = Uplink::new(
        settings,
        spool.clone(),
        stats.clone(),
        control,
        router.clone(),
        results,
    );
    (tokio::spawn(uplink.run()), drain, stop)
}

/// Hands `report` to the caller waiting for readiness, and logs it.
fn say_ready(config: &Config, ready: Option<oneshot::Sender<Ready>>, report: Ready) {
    if let Some(tx) = ready {
        let _ = tx.send(report);
    }
    tracing::info!(
        brain = %config.uplink.endpoint.base_url,
        worker_id = %config.uplink.worker_id,
        "z4j-agentd {} ready",
        env!("CARGO_PKG_VERSION")
    );
}

/// What `status` and the reports say about this daemon.
fn daemon_info(
    config: &Config,
    spool_path: &std::path::Path,
    socket_path: &std::path::Path,
) -> DaemonInfo {
    DaemonInfo {
        brain_url: config.uplink.endpoint.base_url.clone(),
        worker_id: config.uplink.worker_id.clone(),
        agent_name: config.uplink.agent_name.clone(),
        static_engines: config.uplink.static_engines.clone(),
        static_capabilities: config.uplink.static_capabilities.clone(),
        spool_path: spool_path.display().to_string(),
        socket_path: socket_path.display().to_string(),
        transport_setting: config.uplink.transport.as_str(),
    }
}

/// The command router. `purge_queue`'s confirm token is checked under the
/// key that signs frames, as the settings hold it at the time (SIGHUP may
/// replace it).
fn command_router(
    stats: &Arc<Stats>,
    settings: &watch::Receiver<UplinkSettings>,
) -> (Arc<Router>, crate::commands::Results) {
    let keys = settings.clone();
    Router::with_key(stats.clone(), move || keys.borrow().key.clone())
}

/// Opens the file beside the spool where the advertisement the brain
/// acknowledged is remembered, and advertises what it holds until the
/// processes declare it again or the restart grace is over (so the brain
/// does not see this host's engines vanish while they reconnect). When
/// anything was remembered, returns the task that ends the grace.
fn remember_advertisement(
    config: &Config,
    stats: &Arc<Stats>,
    spool_path: &std::path::Path,
) -> Option<tokio::task::JoinHandle<()>> {
    let u = &config.uplink;
    let identity =
        crate::clients::Identity::new(&u.endpoint.base_url, &u.worker_id, u.token.expose());
    let configured =
        crate::clients::Advertisement::configured(&u.static_engines, &u.static_capabilities);
    let until = stats.clients.remember_from(
        crate::clients::file_beside(spool_path),
        identity,
        config.restart_grace,
        &configured,
    );
    // Who the brain said this agent is, before this start: `status` shows
    // it, and the gateway can answer local agents while the brain is down.
    if let Some(brain) = stats.clients.remembered_brain() {
        stats.update_uplink(|u| {
            u.agent_id = Some(brain.agent_id);
            u.project_id = Some(brain.project_id);
            u.brain_version = Some(brain.brain_version);
        });
    }
    let until = until?;
    let stats = stats.clone();
    Some(tokio::spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        stats.clients.forget_remembered();
    }))
}

/// Resolves the spool's path (warning when it fell back to the private
/// directory) and opens it off the runtime. Returns the spool and its path.
async fn open_spool(config: &Config) -> Result<(Spool, PathBuf), DaemonError> {
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
    let recovered = spool.handle().stats().depth.load(Ordering::Relaxed);
    tracing::info!(
        spool = %location.path.display(),
        recovered_events = recovered,
        "spool open"
    );
    Ok((spool, location.path))
}

/// The local socket: the one systemd passed, or one bound here (in our
/// private tmp directory by default, which must be ours).
fn listen(config: &Config) -> Result<(tokio::net::UnixListener, PathBuf), DaemonError> {
    let configured = config
        .socket_path
        .clone()
        .unwrap_or_else(|| crate::config::default_socket_path(&config.host));
    if let Some(activated) = &config.activated {
        return Ok(take_activated(
            activated,
            config.socket_path.as_deref(),
            &configured,
        )?);
    }
    if config.socket_path.is_none()
        && crate::config::default_socket(&config.host).1 == crate::config::SocketDir::PrivateTmp
    {
        path::ensure_private_tmp_dir(&config.host.tmp_private_dir(), config.host.uid)?;
    }
    let listener = ingest::bind(&configured, config.socket_mode)?;
    tracing::info!(
        socket = %configured.display(),
        mode = format!("{:04o}", config.socket_mode),
        "listening for local clients"
    );
    Ok((listener, configured))
}

/// Ingest's settings: the configured ones and the protocol's bounds.
fn ingest_config(config: &Config, socket_path: PathBuf) -> IngestConfig {
    IngestConfig {
        socket_path,
        allowed_uids: config.allowed_uids.clone(),
        allowed_gids: config.allowed_gids.clone(),
        max_clients: config.max_clients,
        max_message_bytes: ingest::DEFAULT_MAX_MESSAGE_BYTES,
        max_event_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES - ingest::FRAME_ENVELOPE_RESERVE,
        partial_message_timeout: ingest::PARTIAL_MESSAGE_TIMEOUT,
        remove_socket_on_exit: config.activated.is_none(),
    }
}

/// Binds `/metrics`, `/healthz` and `/readyz` when configured; returns
/// the bound address.
async fn serve_metrics(
    config: &Config,
    stats: &Arc<Stats>,
    spool: &SpoolHandle,
    socket_path: &std::path::Path,
    stop: &CancellationToken,
) -> Result<Option<std::net::SocketAddr>, DaemonError> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let bound = crate::metrics::serve(
        addr,
        stats.clone(),
        spool.clone(),
        socket_path.to_path_buf(),
        stop.clone(),
    )
    .await
    .map_err(|source| DaemonError::Metrics { addr, source })?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(Some(bound))
}

/// Binds the gateway for local z4j agents, when configured (so a taken
/// address fails the start); ingest serves it beside the socket. Returns
/// the bound address.
async fn bind_gateway(
    config: &Config,
    ingest: &Arc<Ingest>,
    settings: &watch::Receiver<UplinkSettings>,
) -> Result<Option<std::net::SocketAddr>, DaemonError> {
    let Some(gateway) = &config.gateway else {
        return Ok(None);
    };
    let addr = gateway.addr;
    let (listener, bound) = async {
        let l = tokio::net::TcpListener::bind(addr).await?;
        let bound = l.local_addr()?;
        Ok((l, bound))
    }
    .await
    .map_err(|source| DaemonError::Gateway { addr, source })?;
    ingest.stats().gateway.listening(bound.to_string());
    ingest.add_gateway(
        listener,
        crate::ingest::gateway::Gateway::new(gateway.clone(), settings.clone()),
    );
    tracing::info!(addr = %bound, "serving z4j agents on the gateway (their Z4J_BRAIN_URL: http://{bound})");
    Ok(Some(bound))
}

/// The spool's answer to the watchdog: a request through the writer's queue.
fn spawn_spool_beat(spool: &SpoolHandle, beat: Beat) -> JoinHandle<()> {
    let spool = spool.clone();
    tokio::spawn(beat.answer_with(move || {
        let spool = spool.clone();
        async move { spool.ping().await.is_ok() }
    }))
}

/// `WATCHDOG=1` while every part answers, when systemd asked for it.
fn spawn_watchdog(
    timeout: Option<Duration>,
    watchdog: Watchdog,
    stop: &CancellationToken,
) -> Option<JoinHandle<()>> {
    let timeout = timeout?;
    let period = crate::watchdog::period(timeout);
    tracing::info!(
        watchdog_ms = timeout.as_millis() as u64,
        ping_every_ms = period.as_millis() as u64,
        "systemd watchdog on: WATCHDOG=1 only while ingest, spool and uplink answer"
    );
    Some(tokio::spawn(watchdog.run(
        period,
        stop.clone(),
        || notify(&[sd_notify::NotifyState::Watchdog]),
        |_| {},
    )))
}

impl Daemon {
    /// Running: until `shutdown`, or until ingest or the uplink ends on its
    /// own; then returns which one did.
    async fn wait(&mut self, shutdown: &CancellationToken) -> Option<&'static str> {
        let (Some(ingest), Some(uplink)) = (&mut self.ingest, &mut self.uplink) else {
            return None;
        };
        let (part, ended) = tokio::select! {
            _ = shutdown.cancelled() => return None,
            ended = ingest => {
                self.ingest = None;
                ("ingest", ended)
            }
            ended = uplink => {
                self.uplink = None;
                ("uplink", ended)
            }
        };
        match ended {
            Err(e) if e.is_panic() => {
                tracing::error!(part, "the {part} panicked; stopping the daemon")
            }
            _ => tracing::error!(part, "the {part} ended on its own; stopping the daemon"),
        }
        Some(part)
    }

    /// Shutdown: the ordered stop, bounded by the grace period.
    async fn shutdown(mut self) {
        let stop_began = Instant::now();
        let deadline = stop_began + self.grace;
        // Before any connection is closed by the stop: no re-handshake, and
        // no smaller advertisement remembered, because of it.
        self.stats.clients.stopping();
        self.reporter.abort();
        if let Some(t) = &self.remembered_expiry {
            t.abort();
        }
        self.stop_watching().await;
        self.finish_clients(stop_began, deadline).await;
        self.drain_uplink(deadline).await;
        self.metrics_stop.cancel();
        let left = self.spool_handle.stats().depth.load(Ordering::Relaxed);
        self.spool.close().await;
        tracing::info!(
            undelivered_events_kept = left,
            refused_while_stopping = self
                .stats
                .refused()
                .get("daemon_stopping")
                .copied()
                .unwrap_or(0),
            stop_ms = stop_began.elapsed().as_millis() as u64,
            "stopped"
        );
    }

    /// Stops the watchdog (systemd stops watching once the unit is
    /// stopping; so do we), says `STOPPING=1`, and fails the commands still
    /// waiting for a local client.
    async fn stop_watching(&mut self) {
        self.watchdog_stop.cancel();
        if let Some(t) = self.watchdog.take() {
            let _ = t.await;
        }
        self.spool_beat.abort();
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(
                "stopping: finishing client messages and draining the spool",
            ),
        ]);
        tracing::info!("shutting down: no new clients; finishing what connected clients sent");
        self.router.shutting_down(&self.agent_name);
    }

    /// Stops accepting and lets connections finish what they sent.
    ///
    /// A producer held back by a full spool (`block`) may still get room
    /// while the uplink delivers, for the first half of the grace period;
    /// then it is told the daemon is stopping (nothing of what did not fit
    /// is stored, and it is counted) instead of waiting for a brain that may
    /// never come back. Connections still open at the deadline (at least
    /// [`CLIENTS_FINISH_MIN`] after the stop began) are closed.
    async fn finish_clients(&mut self, stop_began: Instant, deadline: Instant) {
        self.ingest_stop.cancel();
        let Some(mut ingest) = self.ingest.take() else {
            return;
        };
        let hold_until = stop_began + self.grace / 2;
        if tokio::time::timeout_at(hold_until, &mut ingest)
            .await
            .is_ok()
        {
            return;
        }
        if self.spool_handle.overflow() == crate::spool::Overflow::Block {
            tracing::info!(
                "shutting down: producers waiting for room in the spool are told the daemon is stopping"
            );
        }
        self.spool_handle.stop_holding_producers();
        let clients_until = deadline.max(stop_began + CLIENTS_FINISH_MIN);
        if tokio::time::timeout_at(clients_until, &mut ingest)
            .await
            .is_err()
        {
            tracing::warn!(
                clients = self.stats.clients.len(),
                "shutdown grace period over: closing local connections that are still sending; what they sent and got no ack for may or may not be stored"
            );
            ingest.abort();
            let _ = ingest.await;
        }
    }

    /// Lets the uplink drain the spool until the deadline, then gives it
    /// [`UPLINK_CLOSE_MARGIN`] to close the connection before dropping it.
    async fn drain_uplink(&mut self, deadline: Instant) {
        tracing::info!(
            spool_depth = self.spool_handle.stats().depth.load(Ordering::Relaxed),
            grace_s = self.grace.as_secs(),
            grace_left_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "draining the spool to the brain"
        );
        self.uplink_drain.cancel();
        let Some(mut uplink) = self.uplink.take() else {
            return;
        };
        if tokio::time::timeout_at(deadline, &mut uplink).await.is_ok() {
            return;
        }
        self.uplink_stop.cancel();
        if tokio::time::timeout(UPLINK_CLOSE_MARGIN, &mut uplink)
            .await
            .is_err()
        {
            tracing::warn!("the brain connection did not close in time; dropping it");
            uplink.abort();
            let _ = uplink.await;
        }
    }
}

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
async fn report_status(stats: Arc<Stats>, spool: SpoolHandle) {
    let systemd = std::env::var_os("NOTIFY_SOCKET").is_some();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = String::new();
    loop {
        tick.tick().await;
        stats.sample(spool.stats());
        if !systemd {
            continue;
        }
        let line = status_line(&stats, spool.stats());
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
