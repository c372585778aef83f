//! The one place that decides whether a probe runs, how long it may take,
//! and what the probes after a failure say.
//!
//! A probe is a name and a [`Plan`]: a future that returns what the probe
//! found and what the probes after it need, plus an optional time limit
//! with the finding to report when the limit passes. The runner:
//!
//! * runs probes in the order [`run`](super::run) calls them, which is the
//!   order of [`PROBES`]; a probe called out of that order is a bug
//!   (checked in debug builds);
//! * stops at the first failure: no later probe is planned or run, and
//!   [`Runner::report`] lists each of them as "skipped: `<first failure>`
//!   failed";
//! * applies a probe's time limit around its whole future. Limits on one
//!   step inside a probe (one per TCP address, the signed round trip after
//!   the handshake) stay with that step, because their message carries
//!   what the earlier steps found.
//!
//! Invariant: the report lists every name of [`PROBES`] exactly once, in
//! order.

use std::future::{Future, Ready};
use std::time::Duration;

use super::{Finding, Header, Probe, ProbeStatus, Report, PROBES};

/// What a probe will do once the runner lets it.
pub(super) struct Plan<F> {
    work: F,
    limit: Option<Limit>,
}

/// How long a probe may take, and what it reports when it takes longer.
struct Limit {
    after: Duration,
    finding: Finding,
}

impl<F> Plan<F> {
    /// A probe with no time limit of its own.
    pub(super) fn new(work: F) -> Self {
        Plan { work, limit: None }
    }

    /// Bounds the whole probe by `after`; past it the probe reports
    /// `timed_out` (a failure) and the probes after it are skipped.
    pub(super) fn within(self, after: Duration, timed_out: Finding) -> Self {
        debug_assert_eq!(timed_out.status, ProbeStatus::Fail);
        Plan {
            limit: Some(Limit {
                after,
                finding: timed_out,
            }),
            ..self
        }
    }
}

impl<T> Plan<Ready<(Finding, T)>> {
    /// A probe that found its result without waiting (no I/O to bound).
    pub(super) fn now(found: (Finding, T)) -> Self {
        Plan::new(std::future::ready(found))
    }
}

/// The probes run so far, and the first one that failed.
#[derive(Default)]
pub(super) struct Runner {
    probes: Vec<Probe>,
    failed: Option<&'static str>,
}

impl Runner {
    /// Runs the probe `name` unless an earlier probe failed. `plan` is only
    /// called when the probe runs. Returns what the probe handed on, whether
    /// it passed or failed; `None` when it did not run or ran out of time.
    pub(super) async fn probe<T, F>(
        &mut self,
        name: &'static str,
        plan: impl FnOnce() -> Plan<F>,
    ) -> Option<T>
    where
        F: Future<Output = (Finding, T)>,
    {
        if self.failed.is_some() {
            return None;
        }
        let Plan { work, limit } = plan();
        let (finding, handed_on) = match limit {
            None => {
                let (finding, handed_on) = work.await;
                (finding, Some(handed_on))
            }
            Some(limit) => match tokio::time::timeout(limit.after, work).await {
                Ok((finding, handed_on)) => (finding, Some(handed_on)),
                Err(_) => (limit.finding, None),
            },
        };
        self.record(finding.named(name));
        handed_on
    }

    /// Lists `name` as not run, for `why`, unless an earlier probe failed
    /// (then [`Runner::report`] says which).
    pub(super) fn skip(&mut self, name: &'static str, why: &str) {
        if self.failed.is_none() {
            self.record(Finding::skip(why).named(name));
        }
    }

    fn record(&mut self, probe: Probe) {
        debug_assert_eq!(
            PROBES.get(self.probes.len()),
            Some(&probe.name),
            "probes run in the order of PROBES"
        );
        if probe.status == ProbeStatus::Fail && self.failed.is_none() {
            self.failed = Some(probe.name);
        }
        self.probes.push(probe);
    }

    /// The report: every probe that ran, then each one that did not, as
    /// skipped because of the first failure.
    pub(super) fn report(self, header: Header) -> Report {
        let Runner { mut probes, failed } = self;
        let why = match failed {
            Some(f) => format!("skipped: `{f}` failed"),
            None => "skipped".to_string(),
        };
        for name in PROBES {
            if !probes.iter().any(|p| p.name == name) {
                probes.push(Finding::skip(why.clone()).named(name));
            }
        }
        Report { header, probes }
    }
}
