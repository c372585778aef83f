//! Every setting, written once: its name (the `Options` field and the
//! config file key), its environment variable, the flag (the name with
//! `-` for `_`), the help text, the form it is given in, and how it is
//! read (default and allowed range). `z4j-agentd run --help`, the
//! environment, the config file and the validation all come from
//! [`settings!`]'s one table, so adding a setting is one entry here plus
//! its docs (README's settings table, `packaging/agentd.toml.example`),
//! and the code that uses it.
//!
//! Why a `macro_rules!` table and not a `#[derive(clap::Args)]` struct:
//! the derive writes a key's flag and variable once, but its file key,
//! default, range and error name would each be written again elsewhere;
//! the table gives all of them one line, and the macro turns the line
//! into the `Options` field (what the flags say, for `--help` and for
//! tests) and the typed [`Setting`] constant that reads it.
//!
//! Invariants:
//! * flags are taken from the command line only; the environment is read
//!   once, into [`Options::env`], so precedence (flags > environment >
//!   file > default) is decided in one place ([`super::read::Sources`]) and
//!   tests give the environment as a map;
//! * `--help` shows each variable, as clap did, but never the value of a
//!   secret ([`Kind::Secret`]).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::sync::LazyLock;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use super::read::{
    AsGiven, Engines, Ids, Level, Mode, Number, OneOf, PathValue, Raw, Switch, Text,
};
use super::{LogFormat, Transport};
use crate::spool::{Overflow, Synchronous};

/// How a setting is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text; a string in the file.
    Text,
    /// A path; a string in the file.
    Path,
    /// Text; in the file a string, number, boolean or list (joined by commas).
    Scalar,
    /// Text; in the file a string or a table (`[capabilities]`).
    Table,
    /// A secret: never in the file, its variable's value never shown by `--help`.
    Secret,
    /// A path given only as a flag or variable (the config file's own path).
    CliPath,
}

impl Kind {
    /// Whether flags and the file give this setting as a path.
    pub fn is_path(self) -> bool {
        matches!(self, Kind::Path | Kind::CliPath)
    }

    /// Whether the config file may hold this setting.
    pub fn in_file(self) -> bool {
        !matches!(self, Kind::Secret | Kind::CliPath)
    }
}

/// A setting's names and help.
#[derive(Debug)]
pub struct Key {
    /// The `Options` field and the config file key: `buffer_max_events`.
    pub name: &'static str,
    /// The environment variable, also what errors name: `Z4J_BUFFER_MAX_EVENTS`.
    pub env: &'static str,
    /// The placeholder in `--help`: `N`.
    pub value_name: &'static str,
    /// The help line (also the `Options` field's doc).
    pub help: &'static str,
    /// How it is given.
    pub kind: Kind,
}

impl Key {
    /// The flag, without `--`: `buffer-max-events`.
    pub fn flag(&self) -> &'static str {
        static FLAGS: LazyLock<BTreeMap<&'static str, String>> = LazyLock::new(|| {
            ALL.iter()
                .map(|k| (k.name, k.name.replace('_', "-")))
                .collect()
        });
        FLAGS
            .get(self.name)
            .map(String::as_str)
            .unwrap_or(self.name)
    }
}

/// A setting and how its value is read.
pub struct Setting<R> {
    /// Its names.
    pub key: Key,
    /// Its reader: form, default, range.
    pub read: R,
}

/// The `Z4J_*` variables of the process, read once (or given as a map by a
/// test). `Debug` shows the names only: the token and secret may be here.
#[derive(Clone, Default)]
pub struct Environment(BTreeMap<String, OsString>);

impl Environment {
    /// The settings' variables in the process environment.
    pub fn from_process() -> Self {
        ALL.iter()
            .filter_map(|k| std::env::var_os(k.env).map(|v| (k.env.to_string(), v)))
            .collect()
    }

    /// The value of the variable `name`.
    pub fn get(&self, name: &str) -> Option<&OsStr> {
        self.0.get(name).map(OsString::as_os_str)
    }
}

impl<K: Into<String>, V: Into<OsString>> FromIterator<(K, V)> for Environment {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Environment(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The type of a setting's `Options` field.
macro_rules! flag_type {
    (Path) => {
        PathBuf
    };
    (CliPath) => {
        PathBuf
    };
    ($other:ident) => {
        String
    };
}

/// The settings table: for each setting, its help line, then
/// `CONSTANT name: Kind "VARIABLE" "VALUE_NAME" => Reader = how;`.
macro_rules! settings {
    ($(
        #[doc = $help:literal]
        $konst:ident $name:ident: $kind:ident $env:literal $value_name:literal
            => $read:ty = $init:expr;
    )*) => {
        /// Options shared by every subcommand that reads the daemon's
        /// configuration: what the flags say, and the environment. Each
        /// setting is taken from its flag, else the environment variable
        /// named in its help, else the same key (lowercase, without
        /// `Z4J_`) in the config file, else its default.
        // No `Debug`: the struct holds the raw token and secret.
        #[derive(Clone, Default)]
        pub struct Options {
            $(#[doc = $help] pub $name: Option<flag_type!($kind)>,)*
            /// The `Z4J_*` environment: the process's for the binary, a map
            /// in tests (empty by default).
            pub env: Environment,
        }

        $(
            #[doc = $help]
            pub const $konst: Setting<$read> = Setting {
                key: Key {
                    name: stringify!($name),
                    env: $env,
                    value_name: $value_name,
                    help: $help,
                    kind: Kind::$kind,
                },
                read: $init,
            };
        )*

        /// Every setting, in `--help` order.
        pub const ALL: &[&Key] = &[$(&$konst.key),*];

        impl Options {
            /// The flag's value, if given on the command line.
            pub fn flag(&self, key: &Key) -> Option<Raw> {
                match key.name {
                    $(stringify!($name) => self.$name.clone().map(Into::into),)*
                    _ => None,
                }
            }

            /// Takes the flags given on the command line (not those clap
            /// filled from the environment: [`Options::env`] has those).
            fn take_flags(&mut self, m: &ArgMatches) {
                $(
                    if m.value_source(stringify!($name)) == Some(ValueSource::CommandLine) {
                        self.$name = m.get_one::<flag_type!($kind)>(stringify!($name)).cloned();
                    }
                )*
            }
        }
    };
}

impl From<String> for Raw {
    fn from(s: String) -> Raw {
        Raw::Text(s)
    }
}

impl From<PathBuf> for Raw {
    fn from(p: PathBuf) -> Raw {
        Raw::Path(p)
    }
}

settings! {
    /// TOML config file; keys are the lowercase names of the variables without the `Z4J_` prefix (e.g. `brain_url = "https://..."`)
    CONFIG config: CliPath "Z4J_CONFIG" "PATH" => PathValue = PathValue;
    /// Base URL of the z4j brain (http://, https://, ws:// or wss://)
    BRAIN_URL brain_url: Text "Z4J_BRAIN_URL" "URL" => Text = Text;
    /// Agent bearer token minted by the brain. Prefer --token-file
    TOKEN token: Secret "Z4J_TOKEN" "TOKEN" => Text = Text;
    /// File holding the agent token
    TOKEN_FILE token_file: Path "Z4J_TOKEN_FILE" "PATH" => PathValue = PathValue;
    /// Per-project HMAC secret (URL-safe base64 of at least 32 bytes). Prefer --hmac-secret-file
    HMAC_SECRET hmac_secret: Secret "Z4J_HMAC_SECRET" "SECRET" => Text = Text;
    /// File holding the HMAC secret
    HMAC_SECRET_FILE hmac_secret_file: Path "Z4J_HMAC_SECRET_FILE" "PATH" => PathValue = PathValue;
    /// Project slug (informational: the brain derives the project from the token)
    PROJECT_ID project_id: Text "Z4J_PROJECT_ID" "SLUG" => Text = Text;
    /// Name shown as the agent's host label in the brain (default: the host name)
    AGENT_NAME agent_name: Text "Z4J_AGENT_NAME" "NAME" => Text = Text;
    /// Deployment environment label (informational)
    ENVIRONMENT environment: Text "Z4J_ENVIRONMENT" "NAME" => Text = Text;
    /// Allow plain ws:// to a host that is not loopback (never use in production)
    DEV_MODE dev_mode: Scalar "Z4J_DEV_MODE" "BOOL" => Switch = Switch;
    /// Worker slot of this daemon's connection (default: agentd-<host name>). Stable across restarts so a restart replaces its own slot
    WORKER_ID worker_id: Text "Z4J_WORKER_ID" "ID" => Text = Text;
    /// Engines advertised even when no local client registered them (comma-separated)
    ENGINES engines: Scalar "Z4J_ENGINES" "LIST" => Engines = Engines;
    /// Actions advertised per engine before any client declares them, e.g. `celery:cancel_task,retry_task;rq:cancel_task`
    CAPABILITIES capabilities: Table "Z4J_CAPABILITIES" "ENGINE:ACTIONS;..." => AsGiven = AsGiven;
    /// Extra CA certificate (PEM) trusted for wss://, in addition to the system store
    CA_FILE ca_file: Path "Z4J_CA_FILE" "PATH" => PathValue = PathValue;
    /// The spool file (default: $STATE_DIRECTORY/buffer.sqlite, else ~/.z4j/agentd.sqlite)
    SPOOL_PATH buffer_path: Path "Z4J_BUFFER_PATH" "PATH" => PathValue = PathValue;
    /// Spool bound in events (default 1000000)
    SPOOL_MAX_EVENTS buffer_max_events: Scalar "Z4J_BUFFER_MAX_EVENTS" "N"
        => Number<u64> = Number { default: 1_000_000, min: 1_000, max: 1_000_000_000 };
    /// Spool bound in bytes of event data (default 536870912 = 512 MiB)
    SPOOL_MAX_BYTES buffer_max_bytes: Scalar "Z4J_BUFFER_MAX_BYTES" "N"
        => Number<u64> = Number { default: 512 * 1024 * 1024, min: 1024 * 1024, max: 1 << 40 };
    /// What to do when the spool is full: drop_oldest (default), drop_newest or block
    SPOOL_OVERFLOW buffer_overflow: Text "Z4J_BUFFER_OVERFLOW" "POLICY" => OneOf<Overflow> = OneOf {
        choices: &[("drop_oldest", Overflow::DropOldest), ("drop_newest", Overflow::DropNewest), ("block", Overflow::Block)],
        fold_case: false,
    };
    /// SQLite synchronous mode of the spool: normal (default) or full
    SPOOL_SYNCHRONOUS buffer_synchronous: Text "Z4J_BUFFER_SYNCHRONOUS" "MODE" => OneOf<Synchronous> = OneOf {
        choices: &[("normal", Synchronous::Normal), ("full", Synchronous::Full)],
        fold_case: true,
    };
    /// Local socket (default: $RUNTIME_DIRECTORY/agent.sock, else $XDG_RUNTIME_DIR/z4j/agent.sock, else $TMPDIR/z4j-<uid>/agent.sock)
    SOCKET_PATH socket_path: Path "Z4J_SOCKET_PATH" "PATH" => PathValue = PathValue;
    /// Mode of the local socket, octal (default 0660)
    SOCKET_MODE socket_mode: Scalar "Z4J_SOCKET_MODE" "OCTAL" => Mode = Mode { default: 0o660 };
    /// Only these uids may write to the socket (comma-separated; default: anyone who can open it)
    ALLOWED_UIDS allowed_uids: Scalar "Z4J_ALLOWED_UIDS" "LIST" => Ids = Ids;
    /// Only these gids may write to the socket (comma-separated)
    ALLOWED_GIDS allowed_gids: Scalar "Z4J_ALLOWED_GIDS" "LIST" => Ids = Ids;
    /// Most local connections at once (default 1024)
    MAX_CLIENTS max_clients: Scalar "Z4J_MAX_CLIENTS" "N"
        => Number<usize> = Number { default: 1024, min: 1, max: 65_536 };
    /// Most events per event_batch frame (default 250, at most 5000)
    BATCH_MAX_EVENTS batch_max_events: Scalar "Z4J_BATCH_MAX_EVENTS" "N"
        => Number<usize> = Number { default: 250, min: 1, max: crate::protocol::MAX_EVENTS_PER_FRAME };
    /// Un-acknowledged event_batch frames in flight (default 2)
    INFLIGHT_FRAMES inflight_frames: Scalar "Z4J_INFLIGHT_FRAMES" "N"
        => Number<usize> = Number { default: 2, min: 1, max: 16 };
    /// Seconds to wait for an event_batch_ack before re-sending the frame (default 60)
    ACK_TIMEOUT_SECONDS ack_timeout_seconds: Scalar "Z4J_ACK_TIMEOUT_SECONDS" "SECONDS"
        => Number<u64> = Number { default: 60, min: 1, max: 3600 };
    /// How to reach the brain: auto (default: WebSocket, HTTPS long-poll when the path refuses the upgrade), ws or longpoll
    TRANSPORT transport: Text "Z4J_TRANSPORT" "MODE" => OneOf<Transport> = OneOf {
        choices: &[("auto", Transport::Auto), ("ws", Transport::WebSocket), ("longpoll", Transport::LongPoll)],
        fold_case: true,
    };
    /// Largest request body sent over long-poll, in bytes; match the brain's Z4J_MAX_PAYLOAD_SIZE_BYTES (default 8192, the brain's default)
    LONGPOLL_MAX_BODY_BYTES longpoll_max_body_bytes: Scalar "Z4J_LONGPOLL_MAX_BODY_BYTES" "BYTES"
        => Number<usize> = Number { default: 8192, min: 1024, max: 16 << 20 };
    /// Seconds between tries of the WebSocket while Z4J_TRANSPORT=auto runs on long-poll (default 300)
    WS_RETRY_SECONDS ws_retry_seconds: Scalar "Z4J_WS_RETRY_SECONDS" "SECONDS"
        => Number<u64> = Number { default: 300, min: 5, max: 86_400 };
    /// Seconds to drain the spool to the brain on SIGTERM before exiting (default 10)
    SHUTDOWN_GRACE_SECONDS shutdown_grace_seconds: Scalar "Z4J_SHUTDOWN_GRACE_SECONDS" "SECONDS"
        => Number<u64> = Number { default: 10, min: 0, max: 3600 };
    /// Seconds what was advertised before a restart stays advertised while its processes reconnect (default 60; 0: off)
    RESTART_GRACE_SECONDS restart_grace_seconds: Scalar "Z4J_RESTART_GRACE_SECONDS" "SECONDS"
        => Number<u64> = Number { default: 60, min: 0, max: 3600 };
    /// Log format: text (default) or json
    LOG_FORMAT log_format: Text "Z4J_LOG_FORMAT" "FORMAT" => OneOf<LogFormat> = OneOf {
        choices: &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        fold_case: true,
    };
    /// Log level or tracing filter (default info)
    LOG_LEVEL log_level: Text "Z4J_LOG_LEVEL" "LEVEL" => Level = Level { default: "info" };
    /// Serve /metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9464). Off when unset
    METRICS_ADDR metrics_addr: Text "Z4J_METRICS_ADDR" "HOST:PORT" => Text = Text;
    /// Allow Z4J_METRICS_ADDR on a non-loopback address (e.g. a pod IP scraped by Prometheus)
    METRICS_ALLOW_REMOTE metrics_allow_remote: Scalar "Z4J_METRICS_ALLOW_REMOTE" "BOOL" => Switch = Switch;
    /// Serve z4j agents the brain's protocol v2 on this loopback address (e.g. 127.0.0.1:7700); their Z4J_BRAIN_URL becomes http://127.0.0.1:7700. Off when unset
    GATEWAY_ADDR gateway_addr: Text "Z4J_GATEWAY_ADDR" "HOST:PORT" => Text = Text;
    /// File of further agent tokens the gateway accepts besides Z4J_TOKEN, one per line (mode 0600 or 0640)
    GATEWAY_TOKENS_FILE gateway_tokens_file: Path "Z4J_GATEWAY_TOKENS_FILE" "PATH" => PathValue = PathValue;
    /// Most z4j agent connections the gateway holds at once (default 256)
    GATEWAY_MAX_CONNECTIONS gateway_max_connections: Scalar "Z4J_GATEWAY_MAX_CONNECTIONS" "N"
        => Number<usize> = Number { default: 256, min: 1, max: 4096 };
}

/// One setting's flag, with its variable shown in `--help` as clap shows it.
fn arg(key: &'static Key) -> Arg {
    let arg = Arg::new(key.name)
        .long(key.flag())
        .env(key.env)
        .value_name(key.value_name)
        .help(key.help.trim())
        .action(ArgAction::Set)
        .hide_env_values(key.kind == Kind::Secret);
    match key.kind.is_path() {
        true => arg.value_parser(clap::value_parser!(PathBuf)),
        false => arg.value_parser(clap::value_parser!(String)),
    }
}

impl Args for Options {
    fn augment_args(cmd: Command) -> Command {
        ALL.iter().fold(cmd, |cmd, key| cmd.arg(arg(key)))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Options {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut options = Options {
            env: Environment::from_process(),
            ..Options::default()
        };
        options.take_flags(m);
        Ok(options)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.take_flags(m);
        Ok(())
    }
}
