//! Dialling the brain: TLS (system trust store plus an optional CA file),
//! the WebSocket upgrade with the bearer token, and the `hello` /
//! `hello_ack` handshake.

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::error::UplinkError;
use super::reader::{next_received, parse_hello_ack, read_signed, BrainMessage, Received};
use crate::config::UplinkSettings;
use crate::protocol::{self, Value};

pub use super::reader::HelloAck;

/// The connected socket type.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for TCP + TLS + upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for `hello_ack` (the reference agent waits 10 s).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
pub(crate) async fn dial(settings: &UplinkSettings) -> Result<Ws, UplinkError> {
    let mut request = settings
        .endpoint
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(UplinkError::BadUrl)?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", settings.token.expose()))
        .map_err(|_| UplinkError::TokenNotHeaderSafe)?;
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
            .map_err(UplinkError::TlsConfig)?;
        Some(Connector::Rustls(Arc::new(cfg)))
    } else {
        Some(Connector::Plain)
    };
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    // TCP first, on its own clock: a brain that cannot be reached is told
    // from a path that takes the connection but never answers the upgrade
    // (a proxy holding it), which `Z4J_TRANSPORT=auto` answers with
    // long-poll.
    let url = settings.endpoint.ws_url.clone();
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, tcp_connect(&url)).await {
        Err(_) => {
            return Err(UplinkError::ConnectTimeout {
                url,
                secs: CONNECT_TIMEOUT.as_secs(),
            })
        }
        Ok(Err(error)) => return Err(UplinkError::Unreachable { url, error }),
        Ok(Ok(tcp)) => tcp,
    };
    let upgrade =
        tokio_tungstenite::client_async_tls_with_config(request, tcp, Some(ws_config), connector);
    match tokio::time::timeout(CONNECT_TIMEOUT, upgrade).await {
        Err(_) => Err(UplinkError::UpgradeUnanswered {
            url,
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
        Ok(Err(e)) => Err(classify_ws_error(e, settings)),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

/// The TCP connection to the host and port of `url` (a `ws[s]://` URL).
async fn tcp_connect(url: &str) -> std::io::Result<TcpStream> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| bad("the brain URL has no port"))?;
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(bad("the brain URL has no host")),
    };
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn classify_ws_error(e: WsError, settings: &UplinkSettings) -> UplinkError {
    let url = settings.endpoint.ws_url.clone();
    match e {
        WsError::Http(resp) => UplinkError::HttpAnswer {
            url,
            status: resp.status().as_u16(),
        },
        WsError::Tls(tokio_tungstenite::tungstenite::error::TlsError::Rustls(t)) => {
            UplinkError::Tls(describe_tls_error(&t, settings))
        }
        WsError::Tls(t) => UplinkError::Tls(format!(
            "TLS with {url} failed: {t}; if the brain uses a private CA, set Z4J_CA_FILE"
        )),
        // The TLS handshake reports its failures as I/O errors that carry
        // the rustls error.
        WsError::Io(io) => match io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(t) => UplinkError::Tls(describe_tls_error(t, settings)),
            None => UplinkError::Unreachable { url, error: io },
        },
        error => UplinkError::Dial { url, error },
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

/// Who says `hello`: the daemon, or the doctor in a slot of its own.
pub(crate) struct Hello<'a> {
    pub settings: &'a UplinkSettings,
    /// The slot at the brain.
    pub worker_id: &'a str,
    /// The engines and capabilities announced.
    pub advertised: &'a crate::clients::Advertisement,
    /// When this process started.
    pub started_at: OffsetDateTime,
    /// The z4j contract line named in `agent_version` (see
    /// [`super::contract`]).
    pub agent_version: &'a str,
}

impl Hello<'_> {
    /// The `hello` frame's payload.
    fn payload(&self) -> Value {
        let mut payload = Value::empty_map();
        payload.insert("protocol_version", protocol::PROTOCOL_VERSION);
        payload.insert("agent_version", self.agent_version);
        payload.insert("framework", "z4j-agentd");
        payload.insert("engines", self.advertised.engines_value());
        payload.insert("schedulers", self.advertised.schedulers_value());
        payload.insert("capabilities", self.advertised.capabilities_value());
        payload.insert("host", self.host());
        payload.insert("worker_id", self.worker_id);
        payload.insert("worker_role", "other");
        payload.insert("worker_pid", std::process::id() as i64);
        payload.insert("worker_started_at", protocol::format_ts(self.started_at));
        payload.insert("runtime_features", self.advertised.runtime_features_value());
        payload
    }
}

impl Hello<'_> {
    /// `host`: stored whole by the brain (`agents.metadata.host`); the
    /// daemon's own version travels here, next to the contract line.
    fn host(&self) -> Value {
        let mut host = Value::empty_map();
        host.insert("name", self.settings.agent_name.as_str());
        host.insert("agent", "z4j-agentd");
        host.insert("agentd_version", env!("CARGO_PKG_VERSION"));
        host.insert("z4j_contract", self.agent_version);
        host
    }
}

/// Closes a session normally (1000) and waits, briefly, for the brain's
/// close, so the brain has let the slot go before the next `hello`.
///
/// Returns the `command` frames the brain sent into the session meanwhile
/// (verified with `verifier`, as the session would): the brain pushes the
/// agent's pending commands right after its `hello_ack`, and a command it
/// does not deliver again must still be acknowledged and answered (on the
/// next session). Other frames are not acted on: nothing was sent yet.
pub(crate) async fn close_normally(
    ws: &mut Ws,
    reason: &'static str,
    verifier: &mut protocol::Verifier,
) -> Vec<(String, Value)> {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        })),
    )
    .await;
    let mut commands = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        read_commands_until(ws, verifier, &mut commands, |_| false),
    )
    .await;
    commands
}

/// Reads what the brain sends into a session being closed, keeping the
/// `command` frames (verified with `verifier`), until the stream ends or
/// `last` says a frame is the last one awaited.
async fn read_commands_until(
    ws: &mut Ws,
    verifier: &mut protocol::Verifier,
    commands: &mut Vec<(String, Value)>,
    last: impl Fn(&BrainMessage) -> bool,
) {
    while let Received::Frame(bytes) = next_received(ws).await {
        match read_signed(verifier, &bytes, OffsetDateTime::now_utc()) {
            Ok(BrainMessage::Command { id, payload }) => commands.push((id, payload)),
            Ok(m) if last(&m) => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "a frame the brain sent into the session being closed failed verification; ignored"
            ),
        }
    }
}

/// Time allowed for the brain to answer the empty batch [`settle`] sends.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits, before a session that just answered `hello` is closed, until the
/// brain has pushed the agent's pending commands into it, and returns them
/// (verified with `verifier`).
///
/// Right after its `hello_ack` the brain hands the session every command
/// that waited for the agent, and only then reads what the agent sent. A
/// close that reaches it before that hand-over makes the push fail: the
/// brain puts the command back to pending after the next session's own
/// hand-over already ran, and it waits there until it times out. So an
/// empty `event_batch` goes first, and its `event_batch_ack` says the
/// hand-over is over (every command came before it on the stream). Bounded
/// by [`SETTLE_TIMEOUT`]; a brain that says nothing meanwhile loses only
/// the wait.
pub(crate) async fn settle(
    ws: &mut Ws,
    signer: &mut protocol::Signer,
    verifier: &mut protocol::Verifier,
) -> Vec<(String, Value)> {
    let id = protocol::new_frame_id("settle_");
    let mut payload = Vec::with_capacity(16);
    protocol::event_batch_payload::<&[u8]>(&[], &mut payload);
    let frame = signer.sign(
        "event_batch",
        &id,
        &payload,
        OffsetDateTime::now_utc(),
        &protocol::new_nonce(),
    );
    let mut commands = Vec::new();
    if ws.send(Message::binary(frame)).await.is_err() {
        return commands;
    }
    let last = |m: &BrainMessage| match m {
        BrainMessage::Ack { acked_id, .. } => acked_id.as_deref() == Some(id.as_str()),
        BrainMessage::Error { fatal, .. } => *fatal,
        _ => false,
    };
    let _ = tokio::time::timeout(
        SETTLE_TIMEOUT,
        read_commands_until(ws, verifier, &mut commands, last),
    )
    .await;
    commands
}

/// Sends `hello` and waits for the brain's `hello_ack`.
pub(crate) async fn exchange_hello(
    ws: &mut Ws,
    hello: &Hello<'_>,
) -> Result<HelloAck, UplinkError> {
    let now = OffsetDateTime::now_utc();
    let frame = protocol::hello_frame(
        &protocol::new_frame_id("hello_"),
        &protocol::format_ts(now),
        &hello.payload(),
    );
    ws.send(Message::binary(frame))
        .await
        .map_err(UplinkError::SendHello)?;
    let reply = tokio::time::timeout(HELLO_TIMEOUT, next_received(ws))
        .await
        .map_err(|_| UplinkError::HelloTimeout {
            secs: HELLO_TIMEOUT.as_secs(),
        })?;
    let bytes = match reply {
        Received::Frame(bytes) => bytes,
        Received::Closed(code) => return Err(UplinkError::HandshakeClosed { code }),
        Received::Lost(e) => return Err(UplinkError::HandshakeLost(e)),
        // (`next_received` passes over control frames.)
        Received::Ended | Received::Control => return Err(UplinkError::HandshakeEnded),
    };
    parse_hello_ack(&bytes, OffsetDateTime::now_utc())
}
