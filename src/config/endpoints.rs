//! Where the daemon connects and listens: the brain's URL and the rule
//! that keeps a token off plain `ws://` to another host, the CA file
//! trusted for `wss://`, and the metrics address.
//!
//! Invariant: plain `ws://` (and a metrics listener) is allowed only to a
//! loopback host (`localhost` in any case, with or without its trailing
//! dot, 127.0.0.0/8, `::1`, or 127.0.0.0/8 mapped into IPv6) unless the
//! operator says otherwise (`Z4J_DEV_MODE`, `Z4J_METRICS_ALLOW_REMOTE`).

use std::path::Path;

use super::small_file::{read_small_file, SmallFileError, MAX_CA_FILE_BYTES};
use super::ConfigError;

/// Where to connect: the brain's agent WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrainEndpoint {
    /// The base URL as configured, without a trailing `/`.
    pub base_url: String,
    /// The WebSocket URL (`ws[s]://host:port/ws/agent`).
    pub ws_url: String,
    /// Host part, for logs and TLS.
    pub host: String,
    /// Whether the connection uses TLS.
    pub tls: bool,
}

/// Whether `name` is the loopback name `localhost`, in any case, with or
/// without the trailing dot of its absolute form (`localhost.`).
pub fn is_localhost_name(name: &str) -> bool {
    name.strip_suffix('.')
        .unwrap_or(name)
        .eq_ignore_ascii_case("localhost")
}

/// Whether `ip` is a loopback address: 127.0.0.0/8, `::1`, or 127.0.0.0/8
/// written as an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`).
pub fn ip_is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Parses and checks the brain URL, applying the `ws://` loopback rule.
pub fn parse_brain_url(raw: &str, dev_mode: bool) -> Result<BrainEndpoint, ConfigError> {
    const KEY: &str = "Z4J_BRAIN_URL";
    let trimmed = raw.trim().trim_end_matches('/');
    let url = url::Url::parse(trimmed).map_err(|e| {
        ConfigError::new(
            KEY,
            format!("not a valid URL ({e}); expected e.g. https://z4j.example.com"),
        )
    })?;
    let (tls, ws_scheme) = match url.scheme() {
        "https" | "wss" => (true, "wss"),
        "http" | "ws" => (false, "ws"),
        other => {
            return Err(ConfigError::new(
                KEY,
                format!("scheme {other:?} is not supported; use https:// (or http:// for a brain on this host)"),
            ))
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| ConfigError::new(KEY, "the URL has no host"))?
        .to_string();
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            KEY,
            "credentials in the URL are not allowed; use Z4J_TOKEN_FILE",
        ));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => is_localhost_name(name),
        Some(url::Host::Ipv4(ip)) => ip_is_loopback(ip.into()),
        Some(url::Host::Ipv6(ip)) => ip_is_loopback(ip.into()),
        None => false,
    };
    if !tls && !loopback && !dev_mode {
        return Err(ConfigError::new(
            KEY,
            format!(
                "plain ws:// to {host} would send the token unencrypted; use https:// \
                 (only loopback hosts, localhost, 127.0.0.0/8 and ::1, may use http://), or set Z4J_DEV_MODE=true for a test setup"
            ),
        ));
    }
    // `localhost.` (the absolute form) is `localhost`; not every resolver
    // reads /etc/hosts for the dotted form, so connect to the plain name.
    let host = match url.host() {
        Some(url::Host::Domain(name)) if is_localhost_name(name) => "localhost".to_string(),
        _ => host,
    };
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let path = url.path().trim_end_matches('/');
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let host_for_url = if bare_host.contains(':') {
        format!("[{bare_host}]")
    } else {
        bare_host.to_string()
    };
    let base_scheme = if tls { "https" } else { "http" };
    Ok(BrainEndpoint {
        base_url: format!("{base_scheme}://{host_for_url}{port}{path}"),
        ws_url: format!("{ws_scheme}://{host_for_url}{port}{path}/ws/agent"),
        host: bare_host.to_string(),
        tls,
    })
}

/// Checks `Z4J_CA_FILE` the way the uplink reads it (a regular file of at
/// most [`MAX_CA_FILE_BYTES`]); the certificates are parsed at connect.
pub(super) fn check_ca_file(ca: &Path) -> Result<(), ConfigError> {
    const KEY: &str = "Z4J_CA_FILE";
    let p = ca.display();
    match read_small_file(ca, MAX_CA_FILE_BYTES) {
        Ok(_) => Ok(()),
        Err(SmallFileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(
            ConfigError::new(KEY, format!("{p} does not exist or is not a file")),
        ),
        Err(SmallFileError::Io(e)) => Err(ConfigError::new(
            KEY,
            format!("cannot read {p}: {e}; check that this user may read it"),
        )),
        Err(e @ SmallFileError::NotRegular(_)) => Err(ConfigError::new(
            KEY,
            format!("{p}: {e}; point Z4J_CA_FILE at the PEM file of the CA that signed the brain's certificate"),
        )),
        Err(e @ SmallFileError::TooLarge(_)) => Err(ConfigError::new(
            KEY,
            format!("{p}: {e}; point Z4J_CA_FILE at the PEM file of the CA that signed the brain's certificate, not a larger bundle"),
        )),
    }
}

/// `HOST:PORT` for the metrics listener; loopback only unless allowed.
pub(super) fn parse_metrics_addr(
    v: &str,
    allow_remote: bool,
) -> Result<std::net::SocketAddr, ConfigError> {
    const KEY: &str = "Z4J_METRICS_ADDR";
    let addr = parse_listen_addr(KEY, v, "127.0.0.1:9464")?;
    if !ip_is_loopback(addr.ip()) && !allow_remote {
        return Err(ConfigError::new(
            KEY,
            format!(
                "{addr} is not a loopback address; use 127.0.0.1:<port>, or set Z4J_METRICS_ALLOW_REMOTE=true to serve metrics beyond this host"
            ),
        ));
    }
    Ok(addr)
}

/// `HOST:PORT` for the gateway: loopback only. It speaks the brain's
/// protocol without TLS, and z4j agents refuse a `ws://` brain URL that
/// is not on this host.
pub(super) fn parse_gateway_addr(v: &str) -> Result<std::net::SocketAddr, ConfigError> {
    const KEY: &str = "Z4J_GATEWAY_ADDR";
    let addr = parse_listen_addr(KEY, v, "127.0.0.1:7700")?;
    if !ip_is_loopback(addr.ip()) {
        return Err(ConfigError::new(
            KEY,
            format!(
                "{addr} is not a loopback address; the gateway serves the z4j agents of this host (or of this pod) without TLS, so it listens on loopback only: use 127.0.0.1:<port>"
            ),
        ));
    }
    Ok(addr)
}

/// An IP address and port (`localhost` read as 127.0.0.1), or an error
/// naming `key` with `example`.
fn parse_listen_addr(
    key: &'static str,
    v: &str,
    example: &str,
) -> Result<std::net::SocketAddr, ConfigError> {
    match v.rsplit_once(':') {
        Some((name, port)) if is_localhost_name(name) => format!("127.0.0.1:{port}").parse(),
        _ => v.parse(),
    }
    .map_err(|_| {
        ConfigError::new(
            key,
            format!("expected an IP address and port such as {example}, got {v:?}"),
        )
    })
}
