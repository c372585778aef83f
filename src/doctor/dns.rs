//! The `dns` probe: the brain's host name resolves, within
//! [`NET_TIMEOUT`]. Hands the addresses on to the `tcp` probe, in the
//! resolver's order.

use std::future::Future;
use std::net::SocketAddr;

use super::runner::Plan;
use super::{Finding, Target, NET_TIMEOUT};
use crate::protocol::Value;

/// Looks the brain's host up; past [`NET_TIMEOUT`] the resolver is named.
pub(super) fn plan(target: &Target) -> Plan<impl Future<Output = (Finding, Vec<SocketAddr>)> + '_> {
    let host = target.host.as_str();
    let timed_out = Finding::fail(
        format!(
            "DNS lookup for {host:?} did not finish within {}s",
            NET_TIMEOUT.as_secs()
        ),
        "check this host's resolver (/etc/resolv.conf) and that the DNS servers are reachable",
    )
    .detail("host", host);
    Plan::new(resolve(target)).within(NET_TIMEOUT, timed_out)
}

async fn resolve(target: &Target) -> (Finding, Vec<SocketAddr>) {
    let host = target.host.as_str();
    let addrs = match tokio::net::lookup_host((host, target.port)).await {
        Ok(addrs) => addrs,
        Err(e) => {
            let failed = Finding::fail(
                format!("DNS lookup for {host:?} failed: {e}"),
                "check the host name in Z4J_BRAIN_URL and this host's resolver (/etc/resolv.conf, /etc/hosts)",
            )
            .detail("host", host);
            return (failed, Vec::new());
        }
    };
    let mut addrs: Vec<SocketAddr> = addrs.collect();
    addrs.dedup();
    if addrs.is_empty() {
        let none = Finding::fail(
            format!("{host} resolves to no address"),
            "check the host name in Z4J_BRAIN_URL and the DNS records",
        );
        return (none, addrs);
    }
    let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    let found = Finding::ok(format!("{host} -> {}", ips.join(", ")))
        .detail("host", host)
        .detail(
            "addresses",
            Value::Array(ips.iter().map(|i| Value::from(i.as_str())).collect()),
        );
    (found, addrs)
}
