//! Dialling the brain: TLS (system trust store plus an optional CA file),
//! the WebSocket upgrade with the bearer token, and the `hello` /
//! `hello_ack` handshake.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::backoff::{classify_close, describe_close, FailureClass};
use crate::config::UplinkSettings;
use crate::protocol::{self, Value};

/// The connected socket type.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for TCP + TLS + upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for `hello_ack` (the reference agent waits 10 s).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed attempt, classified.
#[derive(Debug)]
pub(crate) struct Failure {
    pub class: FailureClass,
    pub error: String,
    /// The brain's close code, when it closed the connection.
    pub close_code: Option<u16>,
}

impl Failure {
    fn new(class: FailureClass, error: impl Into<String>) -> Self {
        Failure {
            class,
            error: error.into(),
            close_code: None,
        }
    }
}

/// What the brain told us in `hello_ack`.
#[derive(Debug, Clone)]
pub(crate) struct HelloAck {
    pub agent_id: String,
    pub project_id: String,
    pub session_id: String,
    pub heartbeat_interval: Duration,
    pub max_frame_bytes: usize,
    pub brain_version: String,
    /// Brain clock minus ours, seconds.
    pub clock_skew_seconds: Option<f64>,
}

/// Builds the rustls client config: system roots plus `ca_file`. Reads
/// files (blocking): call it off the async runtime.
pub(crate) fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        // A regular file of bounded size only: the path may have been
        // changed since the configuration was checked.
        let pem = crate::config::read_small_file(path, crate::config::MAX_CA_FILE_BYTES)
            .map_err(|e| format!("cannot read Z4J_CA_FILE {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("Z4J_CA_FILE {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("Z4J_CA_FILE {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "Z4J_CA_FILE {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Opens the WebSocket with the bearer token.
pub(crate) async fn open(settings: &UplinkSettings) -> Result<Ws, Failure> {
    let mut request = settings
        .endpoint
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::new(FailureClass::Incompatible, format!("bad brain URL: {e}")))?;
    let mut auth =
        HeaderValue::from_str(&format!("Bearer {}", settings.token.expose())).map_err(|_| {
            Failure::new(
                FailureClass::Auth,
                "the token contains characters that cannot be sent in a header",
            )
        })?;
    auth.set_sensitive(true);
    request.headers_mut().insert("Authorization", auth);
    request.headers_mut().insert(
        "User-Agent",
        HeaderValue::from_static(concat!("z4j-agentd/", env!("CARGO_PKG_VERSION"))),
    );
    let connector = if settings.endpoint.tls {
        // The system store and the CA file are files: read them off the
        // runtime, so a slow filesystem cannot stall local clients.
        let ca_file = settings.ca_file.clone();
        let cfg = tokio::task::spawn_blocking(move || tls_config(ca_file.as_deref()))
            .await
            .map_err(|e| format!("building the TLS configuration failed: {e}"))
            .and_then(|r| r)
            .map_err(|e| Failure::new(FailureClass::Connection, e))?;
        Some(Connector::Rustls(Arc::new(cfg)))
    } else {
        Some(Connector::Plain)
    };
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    let connect =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, connector);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Err(_) => Err(Failure::new(
            FailureClass::Connection,
            format!(
                "no answer from {} within {}s",
                settings.endpoint.ws_url,
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(classify_ws_error(e, settings)),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

fn classify_ws_error(e: WsError, settings: &UplinkSettings) -> Failure {
    let url = settings.endpoint.ws_url.as_str();
    match e {
        WsError::Http(resp) => {
            // The brain upgrades every request for its agent path and
            // refuses a bad token afterwards, with close 4401: an HTTP
            // answer comes from a wrong path or from something in front of
            // the brain, never from a bad token.
            let code = resp.status().as_u16();
            let class = if code == 401 {
                FailureClass::Auth
            } else {
                FailureClass::Connection
            };
            let hint = match code {
                401 => "a proxy in front of the brain asks for credentials of its own",
                403..=405 => "the brain upgrades every request at its agent path, so the path is wrong or a proxy refused it: Z4J_BRAIN_URL is the brain's base URL (e.g. https://z4j.example.com, without /ws/agent), and a proxy must pass WebSocket upgrades (Upgrade and Connection headers)",
                _ => "check Z4J_BRAIN_URL and any proxy in front of the brain (it must pass WebSocket upgrades)",
            };
            Failure::new(
                class,
                format!("{url} answered HTTP {code} instead of a WebSocket upgrade; {hint}"),
            )
        }
        WsError::Tls(tokio_tungstenite::tungstenite::error::TlsError::Rustls(t)) => {
            Failure::new(FailureClass::Connection, describe_tls_error(&t, settings))
        }
        WsError::Tls(t) => Failure::new(
            FailureClass::Connection,
            format!("TLS with {url} failed: {t}; if the brain uses a private CA, set Z4J_CA_FILE"),
        ),
        // The TLS handshake reports its failures as I/O errors that carry
        // the rustls error.
        WsError::Io(io) => match io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(t) => Failure::new(FailureClass::Connection, describe_tls_error(t, settings)),
            None => Failure::new(
                FailureClass::Connection,
                format!("cannot reach {url}: {io}"),
            ),
        },
        other => Failure::new(
            FailureClass::Connection,
            format!("WebSocket to {url} failed: {other}"),
        ),
    }
}

/// A failed TLS handshake with the brain: what is wrong and what to change.
fn describe_tls_error(e: &rustls::Error, settings: &UplinkSettings) -> String {
    use rustls::CertificateError as C;
    let host = &settings.endpoint.host;
    let at = url::Url::parse(&settings.endpoint.ws_url)
        .ok()
        .and_then(|u| u.port_or_known_default())
        .map(|port| format!("{host}:{port}"))
        .unwrap_or_else(|| host.clone());
    let rustls::Error::InvalidCertificate(cert) = e else {
        return format!(
            "TLS handshake with {at} failed: {e}; check that this port serves TLS \
             (a brain without TLS needs Z4J_BRAIN_URL=http://...) and any proxy in between"
        );
    };
    let fix = match cert {
        C::UnknownIssuer | C::BadSignature => match &settings.ca_file {
            Some(ca) => format!(
                "is not signed by a CA this host trusts; Z4J_CA_FILE ({}) does not hold \
                 the CA that issued it: point Z4J_CA_FILE at that CA's PEM certificate",
                ca.display()
            ),
            None => "is not signed by a CA this host trusts; if the brain uses a private CA, \
                     set Z4J_CA_FILE to its PEM certificate, otherwise install the CA in the \
                     system trust store (update-ca-certificates)"
                .to_string(),
        },
        C::Expired | C::ExpiredContext { .. } => {
            "has expired; renew the brain's certificate (and check this host's clock)".to_string()
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "is not valid yet; check this host's clock (timedatectl) or the certificate's start date"
                .to_string()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "is not valid for the name {host}; use the host name the certificate was issued \
             for in Z4J_BRAIN_URL, or reissue the certificate with {host} in its subjectAltName"
        ),
        C::Revoked => "was revoked; install a new certificate on the brain".to_string(),
        _ => "was refused; check the brain's certificate chain, or set Z4J_CA_FILE for a \
              private CA"
            .to_string(),
    };
    format!("the TLS certificate of {at} {fix} ({e})")
}

/// Sends `hello` and waits for `hello_ack`.
/// `worker_id` names the slot at the brain: the daemon's own, or the
/// doctor's, so a doctor run never displaces the daemon.
pub(crate) async fn handshake(
    ws: &mut Ws,
    settings: &UplinkSettings,
    worker_id: &str,
    advertised: &crate::stats::Advertisement,
    started_at: OffsetDateTime,
) -> Result<HelloAck, Failure> {
    let mut payload = Value::empty_map();
    payload.insert("protocol_version", protocol::PROTOCOL_VERSION);
    payload.insert("agent_version", env!("CARGO_PKG_VERSION"));
    payload.insert("framework", "z4j-agentd");
    payload.insert("engines", advertised.engines_value());
    payload.insert("schedulers", Value::Array(Vec::new()));
    payload.insert("capabilities", advertised.capabilities_value());
    let mut host = Value::empty_map();
    host.insert("name", settings.agent_name.as_str());
    payload.insert("host", host);
    payload.insert("worker_id", worker_id);
    payload.insert("worker_role", "other");
    payload.insert("worker_pid", std::process::id() as i64);
    payload.insert("worker_started_at", protocol::format_ts(started_at));
    payload.insert("runtime_features", advertised.runtime_features_value());
    let now = OffsetDateTime::now_utc();
    let hello = protocol::hello_frame(
        &protocol::new_frame_id("hello_"),
        &protocol::format_ts(now),
        &payload,
    );
    ws.send(Message::binary(hello)).await.map_err(|e| {
        Failure::new(
            FailureClass::Connection,
            format!("sending hello failed: {e}"),
        )
    })?;

    let reply = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match ws.next().await {
                None => {
                    return Err(Failure::new(
                        FailureClass::Connection,
                        "the brain closed the connection during the handshake",
                    ))
                }
                Some(Err(e)) => {
                    return Err(Failure::new(
                        FailureClass::Connection,
                        format!("handshake failed: {e}"),
                    ))
                }
                Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
                Some(Ok(Message::Text(t))) => return Ok(t.as_bytes().to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                    let mut f = Failure::new(
                        classify_close(code),
                        format!(
                            "the brain closed the handshake with {code}: {}",
                            describe_close(code)
                        ),
                    );
                    f.close_code = Some(code);
                    return Err(f);
                }
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .map_err(|_| {
        Failure::new(
            FailureClass::Connection,
            format!("no hello_ack within {}s", HELLO_TIMEOUT.as_secs()),
        )
    })??;

    let received_at = OffsetDateTime::now_utc();
    let ack = protocol::parse_unsigned(&reply)
        .map_err(|e| Failure::new(FailureClass::Protocol, format!("bad hello_ack: {e}")))?;
    if ack.get("type").and_then(Value::as_str) != Some("hello_ack") {
        return Err(Failure::new(
            FailureClass::Protocol,
            format!(
                "expected hello_ack, got {:?}",
                ack.get("type").and_then(Value::as_str).unwrap_or("?")
            ),
        ));
    }
    let p = ack
        .get("payload")
        .ok_or_else(|| Failure::new(FailureClass::Protocol, "hello_ack without payload"))?;
    let field = |k: &str| -> Result<String, Failure> {
        p.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Failure::new(FailureClass::Protocol, format!("hello_ack without {k}")))
    };
    if let Some(v) = p.get("protocol_version").and_then(Value::as_str) {
        if v != protocol::PROTOCOL_VERSION {
            return Err(Failure::new(
                FailureClass::Incompatible,
                format!("the brain answered protocol version {v:?}; this daemon speaks \"2\""),
            ));
        }
    }
    let clock_skew_seconds = ack
        .get("ts")
        .and_then(Value::as_str)
        .and_then(protocol::parse_iso8601)
        .map(|brain| (brain - received_at).as_seconds_f64());
    Ok(HelloAck {
        agent_id: field("agent_id")?,
        project_id: field("project_id")?,
        session_id: field("session_id")?,
        heartbeat_interval: Duration::from_secs(
            p.get("heartbeat_interval_seconds")
                .and_then(Value::as_u64)
                .filter(|s| (1..=3600).contains(s))
                .unwrap_or(10),
        ),
        max_frame_bytes: p
            .get("max_frame_size_bytes")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .filter(|n| *n >= 16 * 1024)
            .unwrap_or(protocol::DEFAULT_MAX_FRAME_BYTES),
        brain_version: p
            .get("brain_version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        clock_skew_seconds,
    })
}
