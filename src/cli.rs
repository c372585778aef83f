//! The command line: `z4j-agentd run`, `doctor`, `status` (and `--help`,
//! `--version`).
//!
//! Parsing and usage errors exit 64 (EX_USAGE); signals are turned into the
//! daemon's shutdown token and settings channel here, so the daemon itself
//! never reads global state.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat, Options};
use crate::host::HostEnv;

/// One daemon per host between Python task processes and a z4j brain:
/// a local socket, a durable SQLite spool, one signed WebSocket.
#[derive(Parser)]
#[command(name = "z4j-agentd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (under systemd, a container, or a shell).
    Run(Box<Options>),
    /// Check everything `run` needs, in order: config, spool directory,
    /// socket, DNS, TCP, TLS, a signed round trip with the brain, the clock.
    /// Run it as the service's user with the service's environment.
    /// Exit 0 when every check passes, 1 when one fails.
    Doctor(Box<DoctorArgs>),
    /// Show what the running daemon is doing (asks it over its socket).
    /// Exit 1 when no daemon answers.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct DoctorArgs {
    #[command(flatten)]
    options: Options,
    /// Print one JSON object (schema in docs/doctor.md) instead of text.
    #[arg(long)]
    json: bool,
    /// Skip the round trip with the brain (the websocket and clock checks).
    #[arg(long)]
    no_websocket: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The daemon's socket (default: the path `run` uses).
    #[arg(long, env = "Z4J_SOCKET_PATH", value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Read `socket_path` from this config file.
    #[arg(long, env = "Z4J_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the daemon's `stats` object as JSON (keys in docs/local-protocol.md).
    #[arg(long)]
    json: bool,
}

/// Exit code for usage and configuration errors (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match cli.command {
        Command::Run(options) => run(*options),
        Command::Doctor(args) => doctor(*args),
        Command::Status(args) => status(args),
    }
}

fn small_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("z4j-agentd: cannot start the runtime: {e}");
            None
        }
    }
}

fn doctor(args: DoctorArgs) -> ExitCode {
    let Some(rt) = small_runtime() else {
        return ExitCode::from(1);
    };
    let report = rt.block_on(crate::doctor::run(
        &args.options,
        HostEnv::from_process(),
        !args.no_websocket,
    ));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_value()).unwrap_or_default()
        );
    } else {
        print!("{}", report.to_text());
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn status(args: StatusArgs) -> ExitCode {
    let host = HostEnv::from_process();
    let path = match crate::admin::socket_path(args.socket_path, args.config, &host) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("z4j-agentd status: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(rt) = small_runtime() else {
        return ExitCode::from(1);
    };
    match rt.block_on(crate::admin::fetch(&path)) {
        Ok(v) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                match crate::admin::render(&v) {
                    Ok(text) => print!("{text}"),
                    Err(e) => {
                        eprintln!("z4j-agentd status: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("z4j-agentd status: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(options: Options) -> ExitCode {
    // First, while the process has one thread: take what systemd passed.
    let activated = match crate::systemd::activated_socket() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("z4j-agentd: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut config = match options.resolve(HostEnv::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("z4j-agentd: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    config.activated = activated;
    config.watchdog = crate::systemd::watchdog_timeout();
    init_logging(&config);
    // Before the runtime starts threads: every client connection takes a
    // descriptor, and so does every metrics connection (plus one refused
    // at a time).
    let metrics_connections = match config.metrics_addr {
        Some(_) => crate::metrics::MAX_CONNECTIONS + 1,
        None => 0,
    };
    // The gateway's agents, and the refusals it answers at once beyond them.
    let gateway_connections = config.gateway.as_ref().map_or(0, |g| {
        g.max_connections + crate::ingest::gateway::REFUSALS_IN_FLIGHT
    });
    crate::ingest::raise_fd_limit(config.max_clients, metrics_connections, gateway_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("z4j-agentd")
        // A thread going idle gives back the memory it holds free once a
        // burst of large messages is over (see `memory`).
        .on_thread_park(crate::memory::on_thread_idle)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("z4j-agentd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        let (settings_tx, settings_rx) = watch::channel(config.uplink.clone());
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(handle_signals(options, settings_tx, shutdown.clone()));
        let (ready_tx, _ready_rx) = oneshot::channel();
        let result = crate::daemon::run(config, settings_rx, shutdown, Some(ready_tx)).await;
        signals.abort();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if e.at_start() {
                    tracing::error!(error = %e, "z4j-agentd cannot start");
                } else {
                    tracing::error!(error = %e, "z4j-agentd stopped on an error");
                }
                eprintln!("z4j-agentd: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    });
    // A SIGHUP reload stuck on a hung filesystem must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Longest a SIGHUP waits for the configuration and secret files to be
/// read; past it the current settings stay (the read may go on in the
/// background and its result is dropped).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Re-reads the configuration and the secret files off the runtime (they
/// may sit on a slow filesystem) and sends the new settings; keeps the
/// current ones, with an error naming the setting, when anything is wrong.
async fn reload(options: Options, settings: Arc<watch::Sender<crate::config::UplinkSettings>>) {
    let read = tokio::task::spawn_blocking(move || options.resolve(HostEnv::from_process()));
    match tokio::time::timeout(RELOAD_TIMEOUT, read).await {
        Ok(Ok(Ok(c))) => {
            tracing::info!("SIGHUP: configuration and secret files re-read");
            let _ = settings.send(c.uplink);
        }
        Ok(Ok(Err(e))) => tracing::error!(
            error = %e,
            "SIGHUP: the new configuration is invalid; keeping the current one"
        ),
        Ok(Err(e)) => tracing::error!(
            error = %e,
            "SIGHUP: reading the configuration failed; keeping the current one"
        ),
        Err(_) => tracing::error!(
            "SIGHUP: reading the configuration and secret files took more than {} s (a hung filesystem?); keeping the current one",
            RELOAD_TIMEOUT.as_secs()
        ),
    }
}

/// SIGTERM/SIGINT: graceful stop, a second one exits at once.
/// SIGHUP: re-read the configuration and secret files (in a task of its
/// own, so a slow read never delays SIGTERM), then reconnect.
async fn handle_signals(
    options: Options,
    settings: watch::Sender<crate::config::UplinkSettings>,
    shutdown: CancellationToken,
) {
    let settings = Arc::new(settings);
    let mut reloading: Option<tokio::task::JoinHandle<()>> = None;
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                if reloading.as_ref().is_some_and(|r| !r.is_finished()) {
                    tracing::warn!("SIGHUP: the previous reload is still reading the configuration; ignoring this one");
                } else {
                    reloading = Some(tokio::spawn(reload(options.clone(), settings.clone())));
                }
                continue;
            }
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second signal: exiting now; undelivered events stay in the spool");
            std::process::exit(1);
        }
        shutdown.cancel();
    }
}
