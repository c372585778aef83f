//! Which way to the brain works: the `websocket` and `longpoll` probes
//! judged together under `Z4J_TRANSPORT`. A refused upgrade is a failure
//! only when long-poll cannot stand in for it; with `auto` and long-poll
//! working it is a warning that says what to change in the proxy.

use super::{Finding, ProbeStatus};
use crate::config::Transport;

/// What to change in a proxy that does not pass WebSocket upgrades.
pub(super) const PROXY_FIX: &str = "the daemon works over HTTPS long-poll here; to use the WebSocket (commands at once, one connection), let the proxy in front of the brain pass upgrades on /ws/agent: nginx `proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; proxy_read_timeout 120s;`, ingress-nginx the same through a configuration snippet or an upgraded controller, and any load balancer with WebSocket support on and an idle timeout above 60 s";

/// Whether the long-poll probe runs after the websocket probe found `ws`
/// (`upgrade_refused` when the upgrade itself was refused).
pub(super) fn longpoll_runs(transport: Transport, ws: &Finding, upgrade_refused: bool) -> bool {
    match transport {
        Transport::WebSocket => false,
        Transport::LongPoll => true,
        Transport::Auto => ws.status != ProbeStatus::Fail || upgrade_refused,
    }
}

/// The two findings as reported. `longpoll` is `None` when it did not run.
pub(super) fn judge(
    transport: Transport,
    ws: Finding,
    upgrade_refused: bool,
    longpoll: Option<Finding>,
) -> (Finding, Finding) {
    let Some(lp) = longpoll else {
        let why = match transport {
            Transport::WebSocket => "skipped: Z4J_TRANSPORT=ws, long-poll is not used",
            _ => "skipped: `websocket` failed",
        };
        return (ws, Finding::skip(why));
    };
    let lp_ok = lp.status != ProbeStatus::Fail;
    match (transport, ws.status == ProbeStatus::Fail) {
        (Transport::Auto, false) if !lp_ok => {
            let Finding { message, fix, .. } = lp;
            let lp = Finding::warn(
                format!("{message} (the daemon uses the WebSocket, which works)"),
                fix.unwrap_or_default(),
            );
            (ws, lp)
        }
        (Transport::Auto, true) if upgrade_refused && lp_ok => {
            let ws = Finding {
                status: ProbeStatus::Warn,
                fix: Some(PROXY_FIX.into()),
                ..ws
            };
            let lp = Finding {
                message: format!("{}; the daemon runs on it (Z4J_TRANSPORT=auto)", lp.message),
                ..lp
            };
            (ws, lp)
        }
        (Transport::Auto, true) if upgrade_refused => {
            let ws = Finding {
                message: format!(
                    "{}; HTTPS long-poll did not work either: {}",
                    ws.message, lp.message
                ),
                ..ws
            };
            (ws, Finding::skip("skipped: `websocket` failed"))
        }
        _ => (ws, lp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Finding {
        Finding::fail(
            "ws://b/ws/agent answered HTTP 400 instead of a WebSocket upgrade",
            "pass upgrades",
        )
    }

    #[test]
    fn with_auto_a_refused_upgrade_only_warns_when_long_poll_works() {
        assert!(longpoll_runs(Transport::Auto, &refused(), true));
        let (ws, lp) = judge(Transport::Auto, refused(), true, Some(Finding::ok("taken")));
        assert_eq!(ws.status, ProbeStatus::Warn);
        assert_eq!(ws.fix.as_deref(), Some(PROXY_FIX));
        assert_eq!(lp.status, ProbeStatus::Ok);
        assert!(
            lp.message.contains("the daemon runs on it"),
            "{}",
            lp.message
        );
    }

    #[test]
    fn with_auto_both_failing_is_one_failure_naming_both() {
        let (ws, lp) = judge(
            Transport::Auto,
            refused(),
            true,
            Some(Finding::fail(
                "long-poll connect probe answered HTTP 404",
                "x",
            )),
        );
        assert_eq!(ws.status, ProbeStatus::Fail);
        assert!(
            ws.message.contains("HTTP 400") && ws.message.contains("HTTP 404"),
            "{}",
            ws.message
        );
        assert_eq!(lp.status, ProbeStatus::Skip);
    }

    #[test]
    fn other_websocket_failures_stop_there_and_ws_never_tries_long_poll() {
        let bad_token = Finding::fail("closed with 4401", "mint a token");
        assert!(!longpoll_runs(Transport::Auto, &bad_token, false));
        assert!(!longpoll_runs(Transport::WebSocket, &refused(), true));
        let (ws, lp) = judge(Transport::WebSocket, refused(), true, None);
        assert_eq!(ws.status, ProbeStatus::Fail);
        assert!(lp.message.contains("Z4J_TRANSPORT=ws"), "{}", lp.message);
    }

    #[test]
    fn with_auto_and_the_websocket_working_a_failing_long_poll_only_warns() {
        let (ws, lp) = judge(
            Transport::Auto,
            Finding::ok("round trip"),
            false,
            Some(Finding::fail(
                "long-poll connect probe answered HTTP 404",
                "route /api/v1/agent/",
            )),
        );
        assert_eq!(ws.status, ProbeStatus::Ok);
        assert_eq!(lp.status, ProbeStatus::Warn);
        assert_eq!(lp.fix.as_deref(), Some("route /api/v1/agent/"));
    }

    #[test]
    fn with_longpoll_its_probe_decides() {
        assert!(longpoll_runs(
            Transport::LongPoll,
            &Finding::skip("not used"),
            false
        ));
        let (_, lp) = judge(
            Transport::LongPoll,
            Finding::skip("not used"),
            false,
            Some(Finding::fail("401", "token")),
        );
        assert_eq!(lp.status, ProbeStatus::Fail);
    }
}
