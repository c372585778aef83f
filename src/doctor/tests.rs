//! The report's renderings and the runner's rules: order, skips after a
//! failure, time limits. The probes' messages are checked against real
//! brains, sockets and certificates in `tests/it/doctor.rs`.

use std::time::Duration;

use super::*;

/// A report whose probes found `findings`, in the order of [`PROBES`].
async fn report_of(findings: Vec<Finding>) -> Report {
    let mut runner = Runner::default();
    for (name, finding) in PROBES.into_iter().zip(findings) {
        runner.probe(name, || Plan::now((finding, ()))).await;
    }
    runner.report(Header::default())
}

#[tokio::test]
async fn a_failure_skips_every_later_probe() {
    let r = report_of(vec![Finding::ok("fine"), Finding::fail("no", "do this")]).await;
    let names: Vec<&str> = r.probes.iter().map(|p| p.name).collect();
    assert_eq!(names, PROBES);
    assert!(!r.ok());
    assert!(r.probes[2..]
        .iter()
        .all(|p| p.status == ProbeStatus::Skip && p.message.contains("`buffer_path` failed")));
}

#[tokio::test]
async fn after_a_failure_no_later_probe_is_planned_and_skips_name_the_failure() {
    let mut runner = Runner::default();
    runner
        .probe("config", || Plan::now((Finding::fail("no", "fix"), ())))
        .await;
    let mut planned = false;
    let handed_on = runner
        .probe("buffer_path", || {
            planned = true;
            Plan::now((Finding::ok("ran anyway"), 7))
        })
        .await;
    assert!(!planned, "a probe after a failure must not be planned");
    assert_eq!(handed_on, None);
    // An explicit skip (--no-websocket) gives way to the failure's skip.
    runner.skip("socket", "skipped (--no-websocket)");
    let r = runner.report(Header::default());
    assert_eq!(r.probes.len(), PROBES.len());
    assert!(r.probes[1..]
        .iter()
        .all(|p| p.status == ProbeStatus::Skip && p.message == "skipped: `config` failed"));
}

#[tokio::test]
async fn a_failed_probe_still_hands_on_what_it_found() {
    let mut runner = Runner::default();
    let found = runner
        .probe("config", || {
            Plan::now((Finding::fail("no", "fix"), "the path"))
        })
        .await;
    assert_eq!(found, Some("the path"));
}

#[tokio::test(start_paused = true)]
async fn a_probe_past_its_limit_reports_its_timeout_and_stops_the_run() {
    let mut runner = Runner::default();
    runner
        .probe("config", || Plan::now((Finding::ok("fine"), ())))
        .await;
    let handed_on = runner
        .probe("buffer_path", || {
            // Answers an hour late: without the limit, the test sees this.
            let late = async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                (Finding::ok("answered an hour late"), ())
            };
            Plan::new(late).within(
                Duration::from_secs(3),
                Finding::fail("did not answer within 3s", "restart it").detail("path", "/x"),
            )
        })
        .await;
    assert_eq!(handed_on, None);
    let r = runner.report(Header::default());
    let p = &r.probes[1];
    assert_eq!((p.name, p.status), ("buffer_path", ProbeStatus::Fail));
    assert_eq!(p.message, "did not answer within 3s");
    assert_eq!(p.fix.as_deref(), Some("restart it"));
    assert_eq!(p.details.get("path").and_then(Value::as_str), Some("/x"));
    assert_eq!(r.probes[2].message, "skipped: `buffer_path` failed");
}

#[tokio::test(start_paused = true)]
async fn a_probe_within_its_limit_reports_what_it_found() {
    let mut runner = Runner::default();
    let found = runner
        .probe("config", || {
            Plan::new(async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                (Finding::warn("slow but fine", "nothing"), 5)
            })
            .within(Duration::from_secs(3), Finding::fail("late", "wait"))
        })
        .await;
    assert_eq!(found, Some(5));
    let r = runner.report(Header::default());
    assert_eq!(r.probes[0].status, ProbeStatus::Warn);
    assert_eq!(r.probes[0].message, "slow but fine");
}

#[tokio::test]
async fn warnings_do_not_fail_the_run() {
    let r = report_of(
        PROBES
            .iter()
            .map(|_| Finding::warn("hmm", "maybe"))
            .collect(),
    )
    .await;
    assert!(r.ok());
    assert!(r
        .to_text()
        .contains("all checks passed (10 warning(s) above)"));
}

#[tokio::test]
async fn the_text_report_lists_the_header_each_probe_and_its_fix() {
    let mut r = report_of(vec![
        Finding::ok("fine"),
        Finding::fail("no room", "free space"),
    ])
    .await;
    r.header.brain_url = Some("http://127.0.0.1:7700".into());
    let text = r.to_text();
    let version = env!("CARGO_PKG_VERSION");
    let title = format!("z4j-agentd doctor {version}");
    assert!(text.starts_with(&format!("{title}\n{}\n", "=".repeat(title.len()))));
    assert!(text.contains("\n  brain_url:   http://127.0.0.1:7700\n  project_id:  (unknown)\n"));
    assert!(text.contains("\n  [OK]   config       fine\n"));
    assert!(
        text.contains("\n  [FAIL] buffer_path  no room\n                      fix: free space\n")
    );
    assert!(text.contains("\n  [SKIP] socket       skipped: `buffer_path` failed\n"));
    assert!(text.ends_with("\nfailed: buffer_path\n"));
}

#[tokio::test]
async fn json_follows_the_schema() {
    let mut r = report_of(vec![
        Finding::fail("Z4J_TOKEN: is required", "set it").detail("key", "Z4J_TOKEN")
    ])
    .await;
    r.header.brain_url = Some("http://127.0.0.1:7700".into());
    let v = r.to_value();
    assert_eq!(v.get("ok"), Some(&Value::Bool(false)));
    let Some(Value::Array(probes)) = v.get("probes") else {
        panic!("probes is a list")
    };
    assert_eq!(probes.len(), PROBES.len());
    for p in probes {
        for key in ["name", "status", "message", "fix", "details"] {
            assert!(p.get(key).is_some(), "{key} missing");
        }
    }
    assert_eq!(
        probes[0].get("status").and_then(Value::as_str),
        Some("fail")
    );
    assert_eq!(
        v.get("config")
            .and_then(|c| c.get("brain_url"))
            .and_then(Value::as_str),
        Some("http://127.0.0.1:7700")
    );
    assert_eq!(
        v.get("config").and_then(|c| c.get("worker_id")),
        Some(&Value::Null)
    );
}
