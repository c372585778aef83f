//! The `tls` probe: the brain's certificate is trusted by the same TLS
//! configuration the uplink uses (system roots, or `Z4J_CA_FILE`), is valid
//! for the host name in `Z4J_BRAIN_URL`, and is not about to expire.
//!
//! The handshake is a blocking rustls one on its own thread, bounded by
//! [`NET_TIMEOUT`] per socket operation, so a refused certificate comes back
//! as rustls' own [`rustls::CertificateError`] and each kind gets its fix.
//! A plain `ws://` brain (loopback or dev mode) skips the probe.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use time::OffsetDateTime;

use super::{Finding, Target, NET_TIMEOUT};
use crate::config::Config;
use crate::protocol;
use crate::uplink::connect;

/// Certificates expiring sooner than this earn a warning.
const CERT_WARN_DAYS: i64 = 14;

/// Shakes hands with the address the `tcp` probe reached.
pub(super) async fn check(
    c: &Config,
    target: &Target,
    reached: Option<SocketAddr>,
) -> (Finding, ()) {
    if !c.uplink.endpoint.tls {
        let plain = Finding::skip(format!(
            "{} is plain ws:// (allowed for loopback or dev mode): no TLS to check",
            c.uplink.endpoint.base_url
        ));
        return (plain, ());
    }
    let Some(addr) = reached else {
        return (
            Finding::fail("no address to connect to", "see the tcp probe"),
            (),
        );
    };
    let (host, port) = (target.host.clone(), target.port);
    let ca_file = c.uplink.ca_file.clone();
    let h = host.clone();
    let result = tokio::task::spawn_blocking(move || handshake(addr, &h, ca_file.as_deref()))
        .await
        .unwrap_or_else(|e| Err(TlsFailure::Other(format!("the TLS check stopped: {e}"))));
    let finding = match result {
        Ok(info) => info.finding(&host, port),
        Err(TlsFailure::Certificate(e)) => certificate_refused(&e, &host, port),
        Err(TlsFailure::Other(e)) => Finding::fail(
            format!("TLS handshake with {host}:{port} failed: {e}"),
            format!(
                "check that port {port} serves TLS (an http:// brain needs Z4J_BRAIN_URL=http://...), and any proxy in between"
            ),
        ),
    };
    (finding, ())
}

/// The certificate was refused: what is wrong with it and what to change.
fn certificate_refused(e: &rustls::CertificateError, host: &str, port: u16) -> Finding {
    use rustls::CertificateError as C;
    let (what, fix) = match e {
        C::UnknownIssuer | C::BadSignature => (
            "is not signed by a CA this host trusts".to_string(),
            "if the brain uses a private CA, set Z4J_CA_FILE to its PEM certificate; otherwise install the CA in the system trust store (update-ca-certificates)".to_string(),
        ),
        C::Expired | C::ExpiredContext { .. } => (
            "has expired".to_string(),
            "renew the brain's certificate (and check this host's clock)".to_string(),
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => (
            "is not valid yet".to_string(),
            "check this host's clock (timedatectl), or the certificate's start date".to_string(),
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => (
            format!("is not valid for the name {host}"),
            format!("use the host name the certificate was issued for in Z4J_BRAIN_URL, or reissue the certificate with {host} in its subjectAltName"),
        ),
        C::Revoked => (
            "was revoked".to_string(),
            "install a new certificate on the brain".to_string(),
        ),
        _ => (
            format!("was refused ({e:?})"),
            "check the brain's certificate chain, or set Z4J_CA_FILE for a private CA".to_string(),
        ),
    };
    Finding::fail(format!("the certificate of {host}:{port} {what}"), fix)
        .detail("error", format!("{e:?}"))
}

enum TlsFailure {
    Certificate(rustls::CertificateError),
    Other(String),
}

/// What a successful handshake showed of the brain's certificate.
struct TlsInfo {
    version: String,
    subject: String,
    issuer: String,
    not_after: i64,
}

impl TlsInfo {
    /// Trusted; a warning when it expires within [`CERT_WARN_DAYS`].
    fn finding(&self, host: &str, port: u16) -> Finding {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let days = (self.not_after - now).div_euclid(86_400);
        let until = OffsetDateTime::from_unix_timestamp(self.not_after)
            .map(protocol::format_ts)
            .unwrap_or_default();
        let msg = format!(
            "{} to {host}:{port}: certificate for {} issued by {}, valid until {until} ({days} days), trusted",
            self.version, self.subject, self.issuer
        );
        let finding = if days < CERT_WARN_DAYS {
            Finding::warn(
                msg,
                "renew the brain's certificate before it expires; after that every connection fails",
            )
        } else {
            Finding::ok(msg)
        };
        finding
            .detail("version", self.version.as_str())
            .detail("subject", self.subject.as_str())
            .detail("issuer", self.issuer.as_str())
            .detail("not_after", until)
            .detail("days_left", days)
    }

    /// Reads the negotiated version and the leaf certificate.
    fn of(conn: &rustls::ClientConnection) -> Result<Self, TlsFailure> {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "TLS".to_string(),
        };
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| TlsFailure::Other("the brain sent no certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| TlsFailure::Other(format!("cannot read the brain's certificate: {e}")))?;
        let cn = |n: &x509_parser::x509::X509Name| {
            n.iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(|s| format!("CN={s}"))
                .unwrap_or_else(|| n.to_string())
        };
        Ok(TlsInfo {
            version,
            subject: cn(cert.subject()),
            issuer: cn(cert.issuer()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// A blocking handshake with the uplink's own TLS configuration.
fn handshake(addr: SocketAddr, host: &str, ca_file: Option<&Path>) -> Result<TlsInfo, TlsFailure> {
    let config = connect::tls_config(ca_file).map_err(TlsFailure::Other)?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| TlsFailure::Other(format!("{host:?} is not a valid TLS name: {e}")))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, NET_TIMEOUT)
        .map_err(|e| TlsFailure::Other(e.to_string()))?;
    let _ = sock.set_read_timeout(Some(NET_TIMEOUT));
    let _ = sock.set_write_timeout(Some(NET_TIMEOUT));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            let inner = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .cloned();
            return Err(match inner {
                Some(rustls::Error::InvalidCertificate(c)) => TlsFailure::Certificate(c),
                Some(other) => TlsFailure::Other(other.to_string()),
                None => TlsFailure::Other(e.to_string()),
            });
        }
    }
    TlsInfo::of(&conn)
}
