//! TLS verification of the daemon's own uplink: a brain behind a TLS
//! terminator whose certificate is self-signed, issued by a private CA, or
//! issued for another name. An untrusted brain never gets a session (nor an
//! event), the events wait in the spool, and `stats` says why; trusting the
//! CA with `ca_file` (`Z4J_CA_FILE`) lets everything through exactly once.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::fake_brain::{Behavior, FakeBrain, SECRET, TOKEN};
use support::{event, num, options, text, wait_for, wait_stats, TestDaemon};
use tokio::net::{TcpListener, TcpStream};
use z4j_agentd::config::Options;
use z4j_agentd::protocol::Value;
use z4j_agentd::spool::{Overflow, Spool, SpoolConfig, Synchronous};

// ------------------------------------------------------------ terminator

/// A TLS terminator on 127.0.0.1 in front of the fake brain: it presents
/// one certificate chain and, once a handshake completes, copies bytes both
/// ways to the brain's plain TCP port.
struct Terminator {
    port: u16,
    /// Handshakes that completed.
    established: Arc<AtomicUsize>,
    /// Handshakes the client broke off (or that failed otherwise).
    refused: Arc<AtomicUsize>,
}

impl Terminator {
    async fn start(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        backend: SocketAddr,
    ) -> Terminator {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let established = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (ok, bad) = (established.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, ok, bad) = (acceptor.clone(), ok.clone(), bad.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            bad.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Terminator {
            port,
            established,
            refused,
        }
    }

    fn established(&self) -> usize {
        self.established.load(Ordering::SeqCst)
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// The fake brain's plain TCP address.
fn backend(brain: &FakeBrain) -> SocketAddr {
    brain.url.trim_start_matches("http://").parse().unwrap()
}

// ------------------------------------------------------------ certificates

/// A server certificate with its key, and the PEM an operator would put in
/// `ca_file` to trust it.
struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_pem: String,
}

/// A self-signed certificate for `names` (its own trust anchor).
fn self_signed(names: &[&str]) -> ServerCert {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    ServerCert {
        chain: vec![c.cert.der().clone()],
        key: PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap(),
        trust_pem: c.cert.pem(),
    }
}

/// A certificate for `names` issued by a fresh private CA; `trust_pem` is
/// the CA's certificate.
fn issued_by_private_ca(names: &[&str]) -> ServerCert {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "z4j test private CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    ServerCert {
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        trust_pem: ca.pem(),
    }
}

/// Writes `pem` to `dir/ca.pem`.
fn write_ca_file(dir: &Path, pem: &str) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

// ------------------------------------------------------------ daemon

/// Options for a brain at `https://{host}:{port}`, trusting `ca_file`.
fn tls_options(host: &str, port: u16, ca_file: Option<&Path>) -> Options {
    let mut o = options(&format!("https://{host}:{port}"));
    o.ca_file = ca_file.map(Path::to_path_buf);
    o.shutdown_grace_seconds = Some("1".into());
    o
}

/// Stores `n` events durably through the local socket.
async fn send_events(d: &TestDaemon, prefix: &str, n: usize) {
    let mut c = d.client().await;
    let events: Vec<_> = (0..n)
        .map(|i| event(&format!("{prefix}{i}"), "task.received"))
        .collect();
    assert_eq!(c.send_durable(&events).await.unwrap(), n as u64);
}

/// Waits until the uplink failed at least once, then checks that nothing
/// got through: no session, nothing forwarded or acked, every event still
/// in the spool, nothing at the brain. Returns the `stats` reply.
async fn assert_refused(d: &TestDaemon, brain: &FakeBrain, tls: &Terminator, n: u64) -> Value {
    let s = wait_stats(d, 8, "a failed connection attempt", |s| {
        text(s, "uplink_state") == "backoff" && !text(s, "last_error").is_empty()
    })
    .await;
    assert_eq!(text(&s, "last_failure_class"), "connection", "{s:?}");
    assert_eq!(num(&s, "connects"), 0, "no session: {s:?}");
    assert_eq!(s.get("session_id"), Some(&Value::Null), "{s:?}");
    assert_eq!(num(&s, "forwarded"), 0, "{s:?}");
    assert_eq!(num(&s, "acked"), 0, "{s:?}");
    assert_eq!(
        num(&s, "spool_depth"),
        n,
        "the events wait in the spool: {s:?}"
    );
    assert_eq!(num(&s, "dropped"), 0, "{s:?}");
    // The terminator's side of the broken-off handshake may finish a moment
    // after the daemon has recorded its failure.
    wait_for(5, "the terminator to see the daemon break off TLS", || {
        tls.refused() >= 1
    })
    .await;
    assert_eq!(tls.established(), 0, "no TLS session completed");
    assert_eq!(brain.seen.connections.load(Ordering::SeqCst), 0);
    assert!(brain.seen.event_ids.lock().unwrap().is_empty());
    let error = text(&s, "last_error");
    assert!(!error.contains(TOKEN), "no token in errors: {error}");
    assert!(!error.contains(SECRET), "no secret in errors: {error}");
    s
}

/// Stops the daemon, keeping its directory (and so its spool file).
async fn stop_keeping_files(d: TestDaemon) -> support::DaemonDir {
    let TestDaemon {
        dir,
        shutdown,
        task,
        ..
    } = d;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("daemon stops in time")
        .unwrap()
        .unwrap();
    dir
}

/// Events in the spool file at `path`, read after the daemon stopped.
async fn spool_depth(path: PathBuf) -> u64 {
    let spool = tokio::task::spawn_blocking(move || {
        Spool::open(SpoolConfig {
            path,
            max_events: 1000,
            max_bytes: 1 << 20,
            overflow: Overflow::Block,
            synchronous: Synchronous::Normal,
        })
        .unwrap()
    })
    .await
    .unwrap();
    let depth = spool.handle().stats().depth.load(Ordering::SeqCst);
    spool.close().await;
    depth
}

// ------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_brain_is_refused_and_the_events_wait_in_the_spool() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let cert = self_signed(&["localhost", "127.0.0.1"]);
    let tls = Terminator::start(cert.chain, cert.key, backend(&brain)).await;
    let d = TestDaemon::start(tls_options("localhost", tls.port, None)).await;
    send_events(&d, "t", 5).await;
    let s = assert_refused(&d, &brain, &tls, 5).await;
    let error = text(&s, "last_error");
    assert!(
        error.contains(&format!("certificate of localhost:{}", tls.port))
            && error.contains("not signed by a CA this host trusts")
            && error.contains("set Z4J_CA_FILE"),
        "the error names the brain, the cause and the fix: {error}"
    );
    // Shutting down delivers nothing either: every event is still there.
    let spool = d.spool.clone();
    let _dir = stop_keeping_files(d).await;
    assert_eq!(tls.established(), 0);
    assert_eq!(brain.seen.connections.load(Ordering::SeqCst), 0);
    assert!(brain.seen.event_ids.lock().unwrap().is_empty());
    // Nothing lost: every event is still in the spool file.
    assert_eq!(spool_depth(spool).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_holding_another_ca_does_not_make_the_brain_trusted() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let cert = issued_by_private_ca(&["localhost"]);
    let unrelated = issued_by_private_ca(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca_file(dir.path(), &unrelated.trust_pem);
    let tls = Terminator::start(cert.chain, cert.key, backend(&brain)).await;
    let d = TestDaemon::start(tls_options("localhost", tls.port, Some(&ca))).await;
    send_events(&d, "t", 3).await;
    let s = assert_refused(&d, &brain, &tls, 3).await;
    let error = text(&s, "last_error");
    assert!(
        error.contains("not signed by a CA this host trusts")
            && error.contains(&format!("Z4J_CA_FILE ({})", ca.display())),
        "the error names the CA file that did not match: {error}"
    );
    d.stop().await.unwrap();
    assert_eq!(tls.established(), 0);
    assert_eq!(brain.seen.connections.load(Ordering::SeqCst), 0);
}

/// Starts a daemon trusting `cert` through `ca_file`, sends `n` events and
/// checks each reaches the brain exactly once and the spool empties.
async fn delivered_through_tls(cert: ServerCert, host: &str, n: usize) {
    let brain = FakeBrain::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca_file(dir.path(), &cert.trust_pem);
    let tls = Terminator::start(cert.chain, cert.key, backend(&brain)).await;
    let d = TestDaemon::start(tls_options(host, tls.port, Some(&ca))).await;
    send_events(&d, "t", n).await;
    let s = wait_stats(&d, 8, "every event acked", |s| {
        num(s, "acked") == n as u64 && num(s, "spool_depth") == 0
    })
    .await;
    assert_eq!(text(&s, "uplink_state"), "connected", "{s:?}");
    assert_eq!(num(&s, "connects"), 1, "{s:?}");
    assert_eq!(s.get("last_error"), Some(&Value::Null), "{s:?}");
    assert_eq!(num(&s, "resent"), 0, "{s:?}");
    assert_eq!(tls.established(), 1);
    assert_eq!(tls.refused(), 0);
    let batches = brain.seen.batch_event_ids.lock().unwrap().clone();
    let all: Vec<&String> = batches.iter().flatten().collect();
    assert_eq!(all.len(), n, "each event sent once: {batches:?}");
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), n, "{batches:?}");
    assert_eq!(
        brain.seen.auth_headers.lock().unwrap().as_slice(),
        &[format!("Bearer {TOKEN}")]
    );
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_file_makes_a_self_signed_brain_trusted_and_every_event_arrives_once() {
    delivered_through_tls(self_signed(&["localhost", "127.0.0.1"]), "localhost", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_file_makes_a_private_ca_trusted_for_an_ip_address_url() {
    delivered_through_tls(
        issued_by_private_ca(&["localhost", "127.0.0.1"]),
        "127.0.0.1",
        50,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_even_with_the_ca_file() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let cert = issued_by_private_ca(&["other.example"]);
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca_file(dir.path(), &cert.trust_pem);
    let tls = Terminator::start(cert.chain, cert.key, backend(&brain)).await;
    let d = TestDaemon::start(tls_options("localhost", tls.port, Some(&ca))).await;
    send_events(&d, "t", 3).await;
    let s = assert_refused(&d, &brain, &tls, 3).await;
    let error = text(&s, "last_error");
    assert!(
        error.contains("not valid for the name localhost"),
        "the error names the mismatch: {error}"
    );
    assert!(
        error.contains("other.example"),
        "and the certificate's names: {error}"
    );
    d.stop().await.unwrap();
    assert_eq!(tls.established(), 0);
    assert_eq!(brain.seen.connections.load(Ordering::SeqCst), 0);
}
