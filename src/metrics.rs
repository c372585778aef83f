//! The optional metrics and health listener (`Z4J_METRICS_ADDR`).
//!
//! * `/metrics`: Prometheus (OpenMetrics text) rendered by `prometheus-client`
//!   from one [`Snapshot`] of the daemon's counters taken at scrape time (the
//!   one `stats` and the heartbeat render), so they never disagree. Only the
//!   ack latency histogram is read from [`Stats`] itself: it is a metric
//!   already, not a counter to report.
//! * `/healthz`: the process is alive and serving.
//! * `/readyz`: the spool commits a probe write and the local socket answers
//!   a ping. The brain's connection is shown but not required: applications
//!   can write while the brain is away, and the spool keeps their events.
//!
//! Names and meanings are documented in `docs/metrics.md`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::protocol::Value;
use crate::spool::SpoolHandle;
use crate::stats::{Snapshot, Stats, UplinkState};
use crate::uplink::backoff::FailureClass;

/// Time allowed for each readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Most HTTP connections served at once; each further one gets a 503 and
/// is closed at once (`metrics_connections_refused_total{reason="limit"}`).
/// A scraper and a health checker use one or two.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to send a whole request head, from its start and
/// again after each response (so also the idle timeout of a kept-alive
/// connection); then it is closed. Counted (`reason="timeout"`) when the
/// connection never sent a whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection; then it is closed after the request in
/// progress (within [`REQUEST_TIMEOUT`]). A scraper simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head (request line and headers): larger gets 431 and
/// the connection is closed (`reason="too_large"`). Request bodies are
/// never read; a request that sends one is answered, then the connection
/// is closed.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines in a request.
const MAX_REQUEST_HEADERS: usize = 32;
/// The read buffer of a connection (hyper's smallest is 8 KiB).
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Pause after a failed accept (out of descriptors, mostly).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning about failed accepts this often.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// What a connection beyond [`MAX_CONNECTIONS`] reads before it is closed.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 45\r\nConnection: close\r\n\r\ntoo many connections to the metrics listener\n";

/// The OpenMetrics content type `prometheus-client` renders.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads the daemon's counters at scrape time.
struct DaemonCollector {
    stats: Arc<Stats>,
    spool: SpoolHandle,
}

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonCollector")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn counter_family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        ConstCounter::new(v).encode(m.encode_family(&[(label, l)])?)?;
    }
    Ok(())
}

fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

const STATES: [UplinkState; 5] = [
    UplinkState::Connecting,
    UplinkState::Handshaking,
    UplinkState::Connected,
    UplinkState::Backoff,
    UplinkState::Stopped,
];

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.stats.snapshot(self.spool.stats());
        encode_process(&mut enc, &snap)?;
        encode_events(&mut enc, &snap)?;
        encode_local(&mut enc, &snap)?;
        encode_health(&mut enc, &snap)?;
        encode_brain(&mut enc, &snap, &self.stats.ack_latency)?;
        encode_spool(&mut enc, &snap)?;
        encode_connections(&mut enc, &snap)
    }
}

/// The build and the uptime.
fn encode_process(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    let info = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
    info.encode(enc.encode_descriptor(
        "build",
        "The running z4j-agentd version.",
        None,
        info.metric_type(),
    )?)?;
    gauge(
        enc,
        "uptime",
        "Seconds since the daemon started.",
        Some(&Unit::Seconds),
        s.uptime.as_secs_f64(),
    )
}

/// Each event's way: received, stored, forwarded, acked, or lost, refused.
fn encode_events(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    counter(
        enc,
        "events_received",
        "Events decoded from local clients, valid or not.",
        s.received,
    )?;
    counter(
        enc,
        "events_stored",
        "Events committed to the spool by this process.",
        s.stored,
    )?;
    counter(
        enc,
        "events_forwarded",
        "Events put on the wire to the brain for the first time.",
        s.forwarded,
    )?;
    counter(
        enc,
        "events_resent",
        "Events sent again after an ack timeout or a reconnect.",
        s.resent,
    )?;
    counter(
        enc,
        "events_acked",
        "Events the brain acknowledged (then deleted from the spool).",
        s.acked,
    )?;
    counter_family(
        enc,
        "events_dropped",
        "Events lost by policy: oldest_evicted (drop_oldest made room), spool_full (drop_newest refused them), undeliverable (larger than the brain's frame limit).",
        "reason",
        s.dropped_by_reason.by_reason(),
    )?;
    counter(
        enc,
        "events_brain_rejected",
        "Events the brain acknowledged but did not store on their first delivery: the same task, kind and second as an event it has, or events it could not ingest (its log says which).",
        s.brain_rejected,
    )?;
    counter(
        enc,
        "events_time_corrected",
        "Events whose occurred_at was outside the brain's window (over 30 s ahead or 365 days behind) and was replaced by the time the daemon received them.",
        s.time_corrected,
    )?;
    counter(
        enc,
        "events_brain_duplicates",
        "Events in re-sent frames that the brain did not store again: it had them from an earlier copy (expected after a re-send).",
        s.brain_duplicates,
    )?;
    counter_family(
        enc,
        "refused",
        "Events or messages refused at the socket, by the error code the client received.",
        "reason",
        s.refused_by_reason.iter().map(|(k, v)| (k.as_str(), *v)),
    )
}

/// What the local socket did beside events: replies lost, clients held
/// back, accepts that failed.
fn encode_local(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    counter(
        enc,
        "replies_dropped",
        "Replies not written because a client did not read them.",
        s.replies_dropped,
    )?;
    counter(
        enc,
        "producer_waits",
        "Times a producer was held back because the spool was full (block policy).",
        s.producer_waits,
    )?;
    counter(
        enc,
        "message_budget_waits",
        "Times a local connection was not read because the daemon-wide budget for buffered messages was taken; its client waited (back-pressure, nothing lost).",
        s.message_budget_waits,
    )?;
    counter(
        enc,
        "accept_failures",
        "Failed accept calls on the local socket, mostly for lack of file descriptors; each is retried after a pause of up to 250 ms while new connections wait.",
        s.accept_failures,
    )
}

/// Health reports from local processes, and what heartbeats left out.
fn encode_health(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    // Always there in a snapshot of this daemon.
    let h = s.health.unwrap_or_default();
    counter_family(
        enc,
        "health_reports",
        "Health reports from local processes by outcome: received (valid or not), refused (whole: no map of engines; refused parts are in refused_total{reason=\"invalid_health\"}), expired (the process stopped reporting; its workers and queues left the heartbeat).",
        "outcome",
        [
            ("received", h.received),
            ("refused", h.refused),
            ("expired", h.expired),
        ],
    )?;
    counter_family(
        enc,
        "health_cut",
        "What heartbeats left out of adapter_health to keep within the brain's limits (256 keys, 1024 queues per engine, its frame size), counted per heartbeat, by kind: registered (a worker's task list), details (a worker's active and conf), workers, queues, facts.",
        "kind",
        h.cut.by_kind(),
    )
}

/// Commands, sessions, failures, ack latency and the uplink's state.
fn encode_brain(
    enc: &mut DescriptorEncoder,
    s: &Snapshot,
    ack_latency: &Histogram,
) -> Result<(), fmt::Error> {
    // Always there in a snapshot of this daemon.
    let cmds = s.commands.unwrap_or_default();
    counter_family(
        enc,
        "commands",
        "Commands from the brain by outcome: received (re-deliveries not counted), succeeded and failed (failed includes those no local process could run, timed out or lost with their process).",
        "outcome",
        [
            ("received", cmds.received),
            ("succeeded", cmds.succeeded),
            ("failed", cmds.failed),
        ],
    )?;
    counter(
        enc,
        "purges_forced",
        "purge_queue commands passed on to a local process with force, without the confirm-token check (each is also logged at error level).",
        s.purges_forced,
    )?;
    counter(
        enc,
        "brain_connects",
        "Sessions established with the brain (hello_ack received).",
        s.connects,
    )?;
    counter_family(
        enc,
        "brain_reconnects",
        "Reconnects after a failed connection attempt or a failed session, by the failure's backoff class.",
        "class",
        FailureClass::ALL.iter().map(|c| {
            let c = c.as_str();
            (c, s.failures_by_class.get(c).copied().unwrap_or(0))
        }),
    )?;
    ack_latency.encode(enc.encode_descriptor(
        "brain_ack_latency",
        "Seconds from sending an event_batch to the brain's event_batch_ack.",
        Some(&Unit::Seconds),
        ack_latency.metric_type(),
    )?)?;
    encode_uplink_state(enc, s)
}

/// Whether a session is up, which state the uplink is in, the clock skew.
fn encode_uplink_state(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    gauge(
        enc,
        "brain_connected",
        "1 while a session with the brain is established.",
        None,
        i64::from(s.uplink_state == UplinkState::Connected),
    )?;
    let mut m = enc.encode_descriptor(
        "brain_connection_state",
        "1 for the uplink's current state, 0 for the others.",
        None,
        MetricType::Gauge,
    )?;
    for st in STATES {
        ConstGauge::new(i64::from(st == s.uplink_state))
            .encode(m.encode_family(&[("state", st.as_str())])?)?;
    }
    let mut m = enc.encode_descriptor(
        "brain_transport",
        "1 for how the daemon reaches the brain now (websocket or longpoll), 0 for the other.",
        None,
        MetricType::Gauge,
    )?;
    for t in ["websocket", "longpoll"] {
        ConstGauge::new(i64::from(s.transport.as_deref() == Some(t)))
            .encode(m.encode_family(&[("transport", t)])?)?;
    }
    counter(
        enc,
        "brain_transport_fallbacks",
        "Times Z4J_TRANSPORT=auto switched to HTTPS long-poll because the path to the brain refused the WebSocket upgrade.",
        s.transport_fallbacks,
    )?;
    if let Some(skew) = s.clock_skew_seconds {
        gauge(
            enc,
            "brain_clock_skew",
            "Brain clock minus this host's at the last handshake; past 60 s the brain refuses signed frames.",
            Some(&Unit::Seconds),
            skew,
        )?;
    }
    Ok(())
}

/// The spool's depth, size, age and health.
fn encode_spool(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    gauge(
        enc,
        "spool_depth_events",
        "Events stored and not yet acknowledged by the brain.",
        None,
        s.spool_depth as i64,
    )?;
    gauge(
        enc,
        "spool",
        "Bytes of the events waiting in the spool.",
        Some(&Unit::Bytes),
        s.spool_bytes as i64,
    )?;
    gauge(
        enc,
        "spool_oldest_age",
        "Age of the oldest event waiting in the spool (0 when empty).",
        Some(&Unit::Seconds),
        s.spool_oldest_age_seconds.unwrap_or(0.0),
    )?;
    gauge(
        enc,
        "spool_write_failing",
        "1 when the spool's last write transaction failed (disk full, I/O error).",
        None,
        i64::from(s.spool_write_failing),
    )?;
    counter(
        enc,
        "spool_commits",
        "Spool write transactions committed.",
        s.spool_commits,
    )?;
    let c = &s.spool_checkpoint;
    gauge(
        enc,
        "spool_wal",
        "Bytes of write-ahead log the spool's last checkpoint found (0 once emptied).",
        Some(&Unit::Bytes),
        c.wal_bytes as i64,
    )?;
    counter_family(
        enc,
        "spool_checkpoints",
        "WAL checkpoints: by the checkpointer thread (off the commit path), or by the writer between two transactions.",
        "by",
        [("checkpointer", c.passes), ("writer", c.by_writer)],
    )?;
    counter(
        enc,
        "spool_checkpoint_failures",
        "Failures of the spool's checkpointer thread (a pass, its connection, its thread).",
        c.failures,
    )?;
    gauge(
        enc,
        "spool_checkpoint_on_commit",
        "1 while commits checkpoint themselves because the checkpointer fails or is stuck.",
        None,
        i64::from(c.on_commit),
    )
}

/// Connections open now: local clients, this listener's; and the ones it
/// closed itself.
fn encode_connections(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), fmt::Error> {
    gauge(
        enc,
        "clients_connected",
        "Local client connections open now.",
        None,
        s.clients as i64,
    )?;
    gauge(
        enc,
        "advertisement_left_out",
        "Engines, schedulers, runtime features and actions the processes declared that the hello leaves out now, to stay within the brain's limits (64 of each).",
        None,
        s.advertisement_left_out.as_ref().map_or(0, |l| l.count()) as i64,
    )?;
    if let Some(g) = &s.gateway {
        gauge(
            enc,
            "gateway_connections",
            "z4j agent sessions open on the gateway now (Z4J_GATEWAY_ADDR).",
            None,
            g.connections as i64,
        )?;
        counter_family(
            enc,
            "gateway_closed",
            "Connections of z4j agents the gateway closed itself, by the close code the agent got (4401 token, 4403 signature, 4400 frame, 4426 version, 4408 idle, 4429 too many, 1011 protocol, 1012 stopping, 1013 brain not reached yet).",
            "code",
            g.closed_by_code.iter().map(|(c, n)| (c.as_str(), *n)),
        )?;
    }
    gauge(
        enc,
        "metrics_connections",
        "HTTP connections open on this metrics listener now (this scrape's included).",
        None,
        s.metrics_connections as i64,
    )?;
    counter_family(
        enc,
        "metrics_connections_refused",
        &format!(
            "Connections to this metrics listener that it closed itself: limit ({MAX_CONNECTIONS} already open; answered 503), timeout (no whole request within {} s of connecting), too_large (a request head over {} bytes; answered 431).",
            REQUEST_TIMEOUT.as_secs(),
            MAX_REQUEST_HEAD_BYTES
        ),
        "reason",
        s.metrics_refused_by_reason.by_reason(),
    )
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    stats: Arc<Stats>,
    spool: SpoolHandle,
    socket_path: PathBuf,
}

/// Binds `addr` (so a taken or bad address fails the start) and serves in
/// the background until `stop` is cancelled. Returns the bound address.
///
/// Every local user can reach a loopback port, so the listener bounds what
/// one can hold: at most [`MAX_CONNECTIONS`] connections at once (more are
/// answered 503 and closed at once), [`REQUEST_TIMEOUT`] to send each
/// request head, [`MAX_REQUEST_HEAD_BYTES`] per head, and
/// [`CONNECTION_LIFETIME`] per connection. Each refusal is counted
/// (`metrics_connections_refused_total`).
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    spool: SpoolHandle,
    socket_path: PathBuf,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut registry = Registry::with_prefix("z4j_agentd");
    registry.register_collector(Box::new(DaemonCollector {
        stats: stats.clone(),
        spool: spool.clone(),
    }));
    let state = AppState {
        registry: Arc::new(registry),
        stats: stats.clone(),
        spool,
        socket_path,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    tokio::spawn(accept_loop(listener, app, stats, stop));
    Ok(local)
}

/// Accepts until `stop`; dropping the connections' `JoinSet` then ends them.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let slot = Slot::new(permit, stats.clone());
                        connections.spawn(connection(stream, app.clone(), slot));
                    }
                    Err(_) => {
                        stats.metrics_refused_limit.fetch_add(1, Ordering::Relaxed);
                        // Never waits: what the socket buffer takes goes,
                        // then the connection is closed.
                        let _ = stream.try_write(TOO_MANY);
                    }
                },
                Err(e) => {
                    // Out of descriptors, mostly: pause instead of spinning.
                    if last_warning.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
                        tracing::warn!(error = %e, "metrics listener: cannot accept a connection; retrying every 100 ms");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }
}

/// One connection's place: counted in `metrics_connections` while it lasts.
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, stats: Arc<Stats>) -> Slot {
        stats.metrics_connections.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats
            .metrics_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection within the listener's bounds.
async fn connection(stream: tokio::net::TcpStream, app: Router, slot: Slot) {
    let _ = stream.set_nodelay(true);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // Runs from the connection's start and again after each response,
        // so it is also the idle timeout of a kept-alive connection.
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_header_size(MAX_REQUEST_HEAD_BYTES)
        .max_headers(MAX_REQUEST_HEADERS)
        .max_buf_size(READ_BUFFER_BYTES);
    // Whether a whole request arrived: a kept-alive connection closed for
    // idling after its responses is not a refusal.
    let served = Arc::new(AtomicBool::new(false));
    let svc = {
        let served = served.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            served.store(true, Ordering::Relaxed);
            // A Router is always ready: no poll_ready needed.
            tower_service::Service::call(&mut app.clone(), req)
        })
    };
    let conn = http.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // A client that keeps the connection busy (or stops reading a
        // response) is let go after the request in progress.
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(REQUEST_TIMEOUT, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    slot.stats.metrics_refused_timeout.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() && !served.load(Ordering::Relaxed) {
            slot.stats
                .metrics_refused_timeout
                .fetch_add(1, Ordering::Relaxed);
        } else if e.is_parse_too_large() {
            slot.stats
                .metrics_refused_too_large
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "metrics listener: connection closed");
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &st.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n").into_response(),
    }
}

fn json(code: StatusCode, v: &Value) -> Response {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn healthz(State(st): State<AppState>) -> Response {
    let mut v = Value::empty_map();
    v.insert("status", "alive");
    v.insert("version", env!("CARGO_PKG_VERSION"));
    v.insert("uptime_seconds", st.stats.started.elapsed().as_secs());
    json(StatusCode::OK, &v)
}

/// One readiness check's outcome.
fn check(ok: bool, message: String) -> Value {
    let mut v = Value::empty_map();
    v.insert("ok", ok);
    v.insert("message", message);
    v
}

async fn readyz(State(st): State<AppState>) -> Response {
    let spool = match tokio::time::timeout(CHECK_TIMEOUT, st.spool.probe()).await {
        Ok(Ok(())) => check(true, "a probe write committed".into()),
        Ok(Err(e)) => check(false, format!("the spool cannot commit: {e}")),
        Err(_) => check(
            false,
            format!(
                "the spool did not commit a probe write within {}s",
                CHECK_TIMEOUT.as_secs()
            ),
        ),
    };
    let socket = match tokio::time::timeout(CHECK_TIMEOUT, ping(&st.socket_path)).await {
        Ok(Ok(())) => check(true, format!("{} answers a ping", st.socket_path.display())),
        Ok(Err(e)) => check(
            false,
            format!("{} does not answer: {e}", st.socket_path.display()),
        ),
        Err(_) => check(
            false,
            format!(
                "{} did not answer a ping within {}s",
                st.socket_path.display(),
                CHECK_TIMEOUT.as_secs()
            ),
        ),
    };
    let u = st.stats.uplink();
    let mut brain = Value::empty_map();
    brain.insert("required", false);
    brain.insert("connected", u.state == UplinkState::Connected);
    brain.insert("state", u.state.as_str());
    brain.insert(
        "last_error",
        u.last_error.map(Value::from).unwrap_or(Value::Null),
    );
    let ready = [&spool, &socket]
        .iter()
        .all(|c| matches!(c.get("ok"), Some(Value::Bool(true))));
    let mut checks = Value::empty_map();
    checks.insert("spool", spool);
    checks.insert("socket", socket);
    checks.insert("brain", brain);
    let mut v = Value::empty_map();
    v.insert("ready", ready);
    v.insert("checks", checks);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &v)
}

async fn ping(path: &std::path::Path) -> Result<(), crate::client::ClientError> {
    let mut c = crate::client::Client::connect(path).await?;
    c.ping().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Overflow, Spool, SpoolConfig, Synchronous};
    use crate::stats::fixture;

    #[test]
    fn metrics_text_is_unchanged_for_the_same_counters() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolConfig {
            path: dir.path().join("spool.sqlite"),
            max_events: 1000,
            max_bytes: 1 << 20,
            overflow: Overflow::DropOldest,
            synchronous: Synchronous::Normal,
        })
        .unwrap();
        let handle = spool.handle();
        fixture::spool(handle.stats());
        let mut registry = Registry::with_prefix("z4j_agentd");
        registry.register_collector(Box::new(DaemonCollector {
            stats: Arc::new(fixture::stats()),
            spool: handle,
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        // The uptime differs from run to run.
        let steady: Vec<String> = text
            .lines()
            .map(|l| match l.strip_prefix("z4j_agentd_uptime_seconds ") {
                Some(_) => "z4j_agentd_uptime_seconds (varies)".to_string(),
                None => l.replace(env!("CARGO_PKG_VERSION"), "VERSION"),
            })
            .collect();
        fixture::golden("metrics.txt", &(steady.join("\n") + "\n"));
    }
}
