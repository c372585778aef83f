//! The `clock` probe: this host's clock against the brain's, as read from
//! the `hello_ack` of the `websocket` probe. Past the brain's limit every
//! signed frame is refused, so that fails; half of it warns.

use super::Finding;
use crate::protocol::limits::{MAX_CLOCK_SKEW_SECONDS, WARN_CLOCK_SKEW_SECONDS};
use crate::uplink::close::CLOCK_FIX;

/// Clock skew that earns a warning.
const WARN_SKEW_SECONDS: f64 = WARN_CLOCK_SKEW_SECONDS as f64;
/// The brain's hard limit: beyond it, it refuses every signed frame.
pub(super) const FAIL_SKEW_SECONDS: f64 = MAX_CLOCK_SKEW_SECONDS as f64;

/// Judges `skew` (brain clock minus ours, seconds; `None` when the
/// `hello_ack` carried no readable time).
pub(super) fn check(skew: Option<f64>) -> (Finding, ()) {
    (judge(skew), ())
}

fn judge(skew: Option<f64>) -> Finding {
    let Some(s) = skew else {
        return Finding::warn(
            "the brain's hello_ack carried no readable time; the clock was not checked",
            "check time synchronisation on this host (timedatectl)",
        );
    };
    let side = if s >= 0.0 { "behind" } else { "ahead of" };
    let text = format!("this host's clock is {:.1} s {side} the brain's", s.abs());
    let finding = if s.abs() > FAIL_SKEW_SECONDS {
        Finding::fail(
            format!(
                "{text}; beyond {MAX_CLOCK_SKEW_SECONDS} s the brain refuses every signed frame"
            ),
            CLOCK_FIX,
        )
    } else if s.abs() > WARN_SKEW_SECONDS {
        Finding::warn(
            format!("{text}; past {MAX_CLOCK_SKEW_SECONDS} s the brain refuses every signed frame"),
            CLOCK_FIX,
        )
    } else {
        Finding::ok(format!("{text} (limit {MAX_CLOCK_SKEW_SECONDS} s)"))
    };
    finding.detail("skew_seconds", (s * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::ProbeStatus;

    #[test]
    fn clock_thresholds() {
        assert_eq!(judge(Some(1.0)).status, ProbeStatus::Ok);
        assert_eq!(judge(Some(-45.0)).status, ProbeStatus::Warn);
        assert_eq!(judge(Some(61.0)).status, ProbeStatus::Fail);
        assert!(judge(Some(-45.0)).message.contains("ahead of"));
    }
}
