//! `z4j-agentd doctor` against the fake brain (refused token, wrong secret,
//! a badly signed ack, a running daemon it must not displace) and against
//! TLS servers with untrusted, trusted and misnamed certificates.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use support::fake_brain::{Behavior, FakeBrain};
use support::{options, wait_for, TestDaemon};
use z4j_agentd::config::Options;
use z4j_agentd::doctor::{self, ProbeStatus, Report};
use z4j_agentd::host::HostEnv;
use z4j_agentd::protocol::Value;
use z4j_agentd::stats::UplinkState;

fn host(dir: &Path) -> HostEnv {
    let h = HostEnv {
        home: Some(dir.join("home")),
        tmpdir: dir.join("tmp"),
        uid: z4j_agentd::host::current_uid(),
        hostname: "testhost".into(),
        ..HostEnv::default()
    };
    std::fs::create_dir_all(&h.tmpdir).unwrap();
    h
}

fn probe<'a>(r: &'a Report, name: &str) -> &'a doctor::Probe {
    r.probes.iter().find(|p| p.name == name).unwrap()
}

fn statuses(r: &Report) -> Vec<(&'static str, ProbeStatus)> {
    r.probes.iter().map(|p| (p.name, p.status)).collect()
}

async fn run_alone(o: Options, websocket: bool) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let mut o = o;
    o.socket_path = Some(dir.path().join("agent.sock"));
    let r = doctor::run(&o, host(dir.path()), websocket).await;
    support::keep_log("report", &r.to_text());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_brain_passes_on_the_doctors_own_slot_beside_a_running_daemon() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut o = options(&brain.url);
    o.engines = Some("rq".into());
    let d = TestDaemon::start(o.clone()).await;
    let stats = d.stats.clone();
    wait_for(10, "daemon connected", || {
        stats.uplink().state == UplinkState::Connected
    })
    .await;

    // A worker that runs cancel_task for celery is connected.
    let mut worker = d.client().await;
    worker
        .hello_with_capabilities("celery-worker", &[("celery", &["cancel_task"])])
        .await
        .unwrap();
    o.socket_path = Some(d.socket.clone());
    let r = doctor::run(&o, d.host.clone(), true).await;
    assert!(r.ok(), "{}", r.to_text());
    assert_eq!(
        probe(&r, "socket").status,
        ProbeStatus::Ok,
        "{}",
        r.to_text()
    );
    assert!(probe(&r, "socket")
        .message
        .contains(&format!("pid {}", std::process::id())));
    assert!(probe(&r, "buffer_path")
        .message
        .contains("in use by the running daemon"));
    assert_eq!(probe(&r, "tls").status, ProbeStatus::Skip);
    assert_eq!(probe(&r, "websocket").status, ProbeStatus::Ok);
    assert_eq!(probe(&r, "clock").status, ProbeStatus::Ok);

    // The doctor said hello on its own slot, advertising what the daemon
    // advertises (its engines and its worker's capabilities).
    let hellos = brain.seen.hellos.lock().unwrap().clone();
    let last = hellos
        .iter()
        .rev()
        .find(|h| h.get("worker_id").and_then(Value::as_str) == Some("agentd-test-doctor"))
        .unwrap();
    assert_eq!(
        last.get("worker_id").and_then(Value::as_str),
        Some("agentd-test-doctor")
    );
    let Some(Value::Array(engines)) = last.get("engines") else {
        panic!("engines list")
    };
    assert_eq!(engines, &vec![Value::from("celery"), Value::from("rq")]);
    assert_eq!(
        last.get("capabilities").and_then(|c| c.get("celery")),
        Some(&Value::Array(vec![Value::from("cancel_task")]))
    );
    // It proved the secret with a signed frame the fake verified.
    assert!(brain.seen.verify_failures.lock().unwrap().is_empty());
    assert!(brain
        .seen
        .frame_types
        .lock()
        .unwrap()
        .contains(&"event_batch".to_string()));
    // The daemon was not displaced (it may re-handshake once to advertise
    // its new worker, on its own slot).
    assert!(d.stats.failures().is_empty(), "{:?}", d.stats.failures());
    assert_eq!(d.stats.uplink().state, UplinkState::Connected);
    // The doctor's session is the only one not on the daemon's slot.
    let doctor_hellos = brain
        .seen
        .hellos
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.get("worker_id").and_then(Value::as_str) != Some("agentd-test"))
        .count();
    assert_eq!(doctor_hellos, 1);
    d.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_token_is_named_with_its_fix() {
    let brain = FakeBrain::start(Behavior {
        close_handshake_with: Some(4401),
        ..Behavior::default()
    })
    .await;
    let r = run_alone(options(&brain.url), true).await;
    assert!(!r.ok());
    let ws = probe(&r, "websocket");
    assert_eq!(ws.status, ProbeStatus::Fail);
    assert!(
        ws.message.contains("4401") && ws.message.contains("token"),
        "{}",
        ws.message
    );
    assert!(ws.fix.as_deref().unwrap().contains("Z4J_TOKEN_FILE"));
    assert_eq!(probe(&r, "clock").status, ProbeStatus::Skip);
}

#[tokio::test]
async fn a_wrong_hmac_secret_is_named() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let mut o = options(&brain.url);
    let wrong = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    support::keep_secret("doctor: a wrong HMAC secret", wrong);
    o.hmac_secret = Some(wrong.into());
    let r = run_alone(o, true).await;
    let ws = probe(&r, "websocket");
    assert_eq!(ws.status, ProbeStatus::Fail, "{}", r.to_text());
    assert!(
        ws.message.contains("4403") && ws.message.contains("HMAC secret"),
        "{}",
        ws.message
    );
    assert_eq!(
        ws.details.get("close_code").and_then(Value::as_u64),
        Some(4403)
    );
}

#[tokio::test]
async fn a_badly_signed_ack_from_the_brain_fails_the_round_trip() {
    let brain = FakeBrain::start(Behavior {
        bad_signature_acks: 1,
        ..Behavior::default()
    })
    .await;
    let r = run_alone(options(&brain.url), true).await;
    let ws = probe(&r, "websocket");
    assert_eq!(ws.status, ProbeStatus::Fail);
    assert!(ws.message.contains("failed verification"), "{}", ws.message);
}

#[tokio::test]
async fn no_websocket_skips_the_round_trip_and_the_clock() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let r = run_alone(options(&brain.url), false).await;
    assert!(r.ok(), "{}", r.to_text());
    assert_eq!(probe(&r, "websocket").status, ProbeStatus::Skip);
    assert_eq!(probe(&r, "clock").status, ProbeStatus::Skip);
    assert_eq!(brain.seen.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_missing_token_fails_config_and_skips_the_rest() {
    let mut o = options("http://127.0.0.1:9");
    o.token = None;
    let r = run_alone(o, true).await;
    assert_eq!(probe(&r, "config").status, ProbeStatus::Fail);
    assert!(probe(&r, "config").message.starts_with("Z4J_TOKEN"));
    assert!(r.probes[1..].iter().all(|p| p.status == ProbeStatus::Skip));
    // The header still shows what was given.
    assert_eq!(r.header.brain_url.as_deref(), Some("http://127.0.0.1:9"));
}

#[tokio::test]
async fn a_stopped_brain_fails_tcp() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let r = run_alone(options(&url), true).await;
    assert_eq!(
        statuses(&r)[4..],
        [
            ("dns", ProbeStatus::Ok),
            ("tcp", ProbeStatus::Fail),
            ("tls", ProbeStatus::Skip),
            ("websocket", ProbeStatus::Skip),
            ("longpoll", ProbeStatus::Skip),
            ("clock", ProbeStatus::Skip),
        ]
    );
    assert!(probe(&r, "tcp")
        .fix
        .as_deref()
        .unwrap()
        .contains("Z4J_BRAIN_URL"));
}

#[tokio::test]
async fn a_group_writable_spool_directory_fails_buffer_path_with_the_chmod() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    let z4j = h.home.clone().unwrap().join(".z4j");
    std::fs::create_dir_all(&z4j).unwrap();
    // Group-writable is refused whoever runs the test (root included).
    std::fs::set_permissions(&z4j, std::os::unix::fs::PermissionsExt::from_mode(0o770)).unwrap();
    let mut o = options("http://127.0.0.1:9");
    o.buffer_path = Some(z4j.join("agentd.sqlite"));
    o.socket_path = Some(dir.path().join("agent.sock"));
    let r = doctor::run(&o, h, false).await;
    let b = probe(&r, "buffer_path");
    assert_eq!(b.status, ProbeStatus::Fail, "{}", r.to_text());
    assert_eq!(
        b.fix.as_deref(),
        Some(format!("chmod 700 {}", z4j.display()).as_str())
    );
    assert_eq!(probe(&r, "socket").status, ProbeStatus::Skip);
}

// ---------------------------------------------------------------- TLS

/// A TLS server on 127.0.0.1 presenting `cert` for every connection.
fn tls_server(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> u16 {
    let der = rustls_pki_types::CertificateDer::from(cert.cert.der().to_vec());
    let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { return };
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(mut conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                while conn.is_handshaking() {
                    if conn.complete_io(&mut tcp).is_err() {
                        return;
                    }
                }
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let _ = tls.write_all(b"");
                let mut buf = [0u8; 64];
                let _ = tls.read(&mut buf);
            });
        }
    });
    port
}

/// The certificate as a PEM CA file (kept while the dir lives).
fn ca_file(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    (dir, ca)
}

async fn tls_doctor(port: u16, ca: Option<&Path>) -> Report {
    let mut o = options(&format!("https://localhost:{port}"));
    o.ca_file = ca.map(Path::to_path_buf);
    run_alone(o, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_tls_and_points_at_the_ca_file() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let port = tls_server(&cert);
    let r = tls_doctor(port, None).await;
    let t = probe(&r, "tls");
    assert_eq!(t.status, ProbeStatus::Fail, "{}", r.to_text());
    assert!(
        t.message.contains("not signed by a CA this host trusts"),
        "{}",
        t.message
    );
    assert!(t.fix.as_deref().unwrap().contains("Z4J_CA_FILE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_file_makes_a_private_certificate_trusted() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let port = tls_server(&cert);
    let (_dir, ca) = ca_file(&cert);
    let r = tls_doctor(port, Some(&ca)).await;
    let t = probe(&r, "tls");
    assert_eq!(t.status, ProbeStatus::Ok, "{}", r.to_text());
    assert!(
        t.message.contains("TLS 1.3") && t.message.contains("trusted"),
        "{}",
        t.message
    );
    assert!(t.details.get("days_left").and_then(Value::as_i64).unwrap() > 365);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_by_name() {
    let cert = rcgen::generate_simple_self_signed(vec!["brain.example".to_string()]).unwrap();
    let port = tls_server(&cert);
    let (_dir, ca) = ca_file(&cert);
    let r = tls_doctor(port, Some(&ca)).await;
    let t = probe(&r, "tls");
    assert_eq!(t.status, ProbeStatus::Fail, "{}", r.to_text());
    assert!(
        t.message.contains("not valid for the name localhost"),
        "{}",
        t.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_a_tls_url_is_a_handshake_failure() {
    // The fake brain speaks plain HTTP/WebSocket.
    let brain = FakeBrain::start(Behavior::default()).await;
    let port: u16 = brain.url.rsplit(':').next().unwrap().parse().unwrap();
    let r = tls_doctor(port, None).await;
    let t = probe(&r, "tls");
    assert_eq!(t.status, ProbeStatus::Fail, "{}", r.to_text());
    assert!(
        t.message.contains("TLS handshake with localhost"),
        "{}",
        t.message
    );
    assert!(t.fix.as_deref().unwrap().contains("http://"));
}

#[tokio::test]
async fn a_socket_path_nobody_can_create_fails_socket_and_a_creatable_one_warns() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options("http://127.0.0.1:9");
    o.socket_path = Some("/proc/z4j-agentd-nope/agent.sock".into());
    let r = doctor::run(&o, host(dir.path()), false).await;
    let s = probe(&r, "socket");
    assert_eq!(s.status, ProbeStatus::Fail, "{}", r.to_text());
    assert!(s.fix.as_deref().unwrap().contains("Z4J_SOCKET_PATH"));

    // A missing directory `run` can create is fine: only "no daemon yet".
    o.socket_path = Some(dir.path().join("run/z4j/agent.sock"));
    let r = doctor::run(&o, host(dir.path()), false).await;
    let s = probe(&r, "socket");
    assert_eq!(s.status, ProbeStatus::Warn, "{}", r.to_text());
    assert!(s.message.contains("no daemon is running"), "{}", s.message);
}
