//! The `tcp` probe: some address of the brain accepts a connection. Each
//! address gets [`NET_TIMEOUT`] of its own (a bound per step, not per
//! probe: one black-holed address must not hide a working one), and the
//! first that answers is handed on to the `tls` probe.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Finding, Target, NET_TIMEOUT};

/// Tries each address in turn; hands on the first that accepted.
pub(super) async fn check(target: &Target, addrs: &[SocketAddr]) -> (Finding, Option<SocketAddr>) {
    let (host, port) = (target.host.as_str(), target.port);
    let mut errors = Vec::new();
    for addr in addrs {
        let started = Instant::now();
        match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                let connected = Finding::ok(format!(
                    "TCP connect to {host}:{port} ({}) in {ms:.1} ms",
                    addr.ip()
                ))
                .detail("host", host)
                .detail("port", port as u64)
                .detail("address", addr.to_string())
                .detail("connect_ms", (ms * 10.0).round() / 10.0);
                return (connected, Some(*addr));
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!(
                "{addr}: timed out after {}s",
                NET_TIMEOUT.as_secs()
            )),
        }
    }
    let refused = Finding::fail(
        format!("TCP connect to {host}:{port} failed: {}", errors.join("; ")),
        format!(
            "is the brain running and listening on port {port}? Check Z4J_BRAIN_URL, and firewalls or proxies between this host and the brain"
        ),
    )
    .detail("host", host)
    .detail("port", port as u64);
    (refused, None)
}
