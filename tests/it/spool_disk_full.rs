//! The spool's filesystem fills up while clients send and the brain is away:
//! clients are told `spool_disk_full` with what to do, every refusal is
//! counted, the daemon stays up, and once space returns it stores and
//! delivers again. A brain that returns before the space does cannot empty
//! the spool (deleting needs space too): the events stay, the reason is in
//! `last_error`. No event the daemon refused ever reaches the brain, and
//! every event it acknowledged does, once.
//!
//! The full disk is a real one: a 2 MiB tmpfs mounted for the test, later
//! grown with `mount -o remount`. Mounting needs root (CI runs as root);
//! without it the test says so and does nothing.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::fake_brain::{Behavior, FakeBrain};
use support::{options, TestDaemon};
use z4j_agentd::client::{Client, ClientError, Event};
use z4j_agentd::protocol::Value;

/// A tmpfs mounted on a directory, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ],
            path,
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    fn grow(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], &self.path);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn mount(args: &[&str], at: &Path) {
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?} {}: {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An event of about 2 KB, so the disk fills in a few hundred messages.
fn big_event(task: &str) -> Event {
    Event {
        engine: "celery".into(),
        kind: "task.received".into(),
        task_id: task.into(),
        occurred_at: None,
        data: serde_json::json!({
            "task_name": "app.tasks.add",
            "queue": "default",
            "kwargs": {"blob": "x".repeat(2000)},
        }),
    }
}

/// Sends one message of `n` events; `Ok(true)` when acked, `Ok(false)` when
/// refused for a full disk (checking the error's words).
async fn send_batch(c: &mut Client, prefix: &str, n: usize, acked: &mut BTreeSet<String>) -> bool {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let events: Vec<Event> = ids.iter().map(|t| big_event(t)).collect();
    match c.send_durable(&events).await {
        Ok(stored) => {
            assert_eq!(stored, n as u64);
            acked.extend(ids);
            true
        }
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "spool_disk_full", "{message}");
            assert!(
                message.contains("free space")
                    && message.contains("nothing of this batch was stored"),
                "the error says what happened and what to do: {message}"
            );
            false
        }
        Err(e) => panic!("unexpected reply to a batch: {e}"),
    }
}

fn num(s: &Value, key: &str) -> u64 {
    s.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Polls `stats` on `c` until `cond` holds (30 s at most).
async fn wait_stats(c: &mut Client, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = c.stats().await.unwrap();
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn refused_disk_full(s: &Value) -> u64 {
    s.get("refused_by_reason")
        .and_then(|m| m.get("spool_disk_full"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_a_clear_error_counts_it_and_recovers_when_space_returns() {
    if z4j_agentd::host::current_uid() != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs this test as root)");
        return;
    }
    // The brain refuses every session until the end, so everything stays in the spool.
    let brain = FakeBrain::start(Behavior {
        close_handshake_with: Some(1013),
        ..Behavior::default()
    })
    .await;
    // The spool's own directory ($HOME/.z4j) is the small disk.
    let mut disk = None;
    let d = TestDaemon::start_prepared(options(&brain.url), |home| {
        disk = Some(SmallDisk::mount(&home.join(".z4j"), "2m"));
    })
    .await;
    let disk = disk.unwrap();
    assert!(d.spool.starts_with(&disk.path), "{}", d.spool.display());
    let mut c = d.client().await;

    let mut acked = BTreeSet::new();
    let mut batch = 0;
    loop {
        batch += 1;
        assert!(batch < 2_000, "a 2 MiB disk never filled");
        if !send_batch(&mut c, &format!("fill{batch}"), 20, &mut acked).await {
            break;
        }
    }
    assert!(
        !acked.is_empty(),
        "the disk filled before any batch was stored"
    );
    eprintln!(
        "the 2 MiB disk filled after {} events in {} messages",
        acked.len(),
        batch - 1
    );
    // Still full: each further batch is refused and counted, and the
    // connection, the daemon and new connections all go on.
    for i in 0..3 {
        assert!(!send_batch(&mut c, &format!("full{i}"), 20, &mut acked).await);
    }
    c.ping().await.unwrap();
    let s = Client::connect(&d.socket)
        .await
        .unwrap()
        .stats()
        .await
        .unwrap();
    assert_eq!(
        refused_disk_full(&s),
        4 * 20,
        "every refused event is counted: {s:?}"
    );
    assert_eq!(
        s.get("spool_depth").and_then(Value::as_u64),
        Some(acked.len() as u64),
        "{s:?}"
    );
    assert!(!d.task.is_finished(), "the daemon stays up on a full disk");

    // The brain comes back first. Deleting what it acknowledged needs space
    // too: the deletions that do not fit fail, the spool keeps those events
    // and says why, and none is lost (each is either still in the spool or
    // deleted after the brain's ack).
    brain.set_behavior(Behavior::default());
    let s = wait_stats(&mut c, "the delete failure reported", |s| {
        s.get("last_error")
            .and_then(Value::as_str)
            .is_some_and(|e| e.contains("cannot be deleted") && e.contains("free space"))
    })
    .await;
    assert!(num(&s, "spool_depth") > 0, "{s:?}");
    assert_eq!(
        num(&s, "spool_depth") + num(&s, "acked"),
        acked.len() as u64,
        "{s:?}"
    );
    assert!(!d.task.is_finished(), "the daemon stays up on a full disk");

    // Space returns: the same connection stores again.
    disk.grow("64m");
    let mut stored_after = 0;
    for i in 0..5 {
        if send_batch(&mut c, &format!("after{i}"), 20, &mut acked).await {
            stored_after += 1;
        }
    }
    assert_eq!(
        stored_after, 5,
        "every batch is stored once there is space again"
    );

    // And everything acknowledged reaches the brain.
    let want = acked.len() as u64;
    wait_stats(&mut c, "every acknowledged event delivered", |s| {
        num(s, "acked") == want && num(s, "spool_depth") == 0
    })
    .await;
    let delivered = brain.seen.task_ids.lock().unwrap().clone();
    assert_eq!(
        delivered, acked,
        "the brain got exactly the acknowledged events"
    );
    assert_eq!(brain.seen.event_ids.lock().unwrap().len(), acked.len());
    d.stop().await.unwrap();
    drop(disk);
}
