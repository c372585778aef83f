use std::path::Path;
use std::time::Duration;

use super::schema::SCHEMA_VERSION;
use super::*;

fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        path: dir.join("spool.sqlite"),
        max_events: 1_000,
        max_bytes: 1 << 20,
        overflow: Overflow::DropOldest,
        synchronous: Synchronous::Normal,
    }
}

fn ev(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i}}}").into_bytes()
}

#[tokio::test]
async fn append_read_ack_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    let o = h.append_durable((0..10).map(ev).collect()).await.unwrap();
    assert_eq!(
        o,
        AppendOutcome {
            stored: 10,
            refused_full: 0
        }
    );
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 10);

    let first = h.read_after(0, 4, usize::MAX).await.unwrap();
    assert_eq!(first.len(), 4);
    assert_eq!(first[0].body, ev(0));
    let rest = h.read_after(first[3].id, 100, usize::MAX).await.unwrap();
    assert_eq!(rest.len(), 6);

    assert_eq!(h.ack(first[0].id, first[3].id).await.unwrap(), 4);
    // A second ack of the same range deletes nothing and does not underflow.
    assert_eq!(h.ack(first[0].id, first[3].id).await.unwrap(), 0);
    let snap = h.snapshot().await.unwrap();
    assert_eq!(snap.depth, 6);
    assert!(snap.oldest_stored_ms.is_some());
    assert_eq!(
        h.read_range(first[0].id, rest[1].id).await.unwrap().len(),
        2
    );
    spool.close().await;
}

#[tokio::test]
async fn read_respects_byte_budget_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    h.append_durable(vec![vec![b'x'; 100], vec![b'y'; 100], vec![b'z'; 100]])
        .await
        .unwrap();
    assert_eq!(h.read_after(0, 10, 10).await.unwrap().len(), 1);
    assert_eq!(h.read_after(0, 10, 205).await.unwrap().len(), 2);
    spool.close().await;
}

#[tokio::test]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig {
        max_events: 1_000_000,
        ..config(dir.path())
    })
    .unwrap();
    let h = spool.handle();
    // Queue many requests before awaiting any: the writer must fold them
    // into far fewer transactions than requests.
    let mut pending = Vec::new();
    for i in 0..500 {
        pending.push(h.append(vec![ev(i)]).await.unwrap());
    }
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().stored, 1);
    }
    let commits = h.stats().commits_total.load(Ordering::Relaxed);
    assert_eq!(h.stats().stored_total.load(Ordering::Relaxed), 500);
    assert!(
        commits < 500,
        "500 appends took {commits} commits: no group commit"
    );
    spool.close().await;
}

#[tokio::test]
async fn drop_oldest_evicts_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    for chunk in 0..6 {
        h.append_durable((chunk * 1000..(chunk + 1) * 1000).map(ev).collect())
            .await
            .unwrap();
    }
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 1000);
    assert_eq!(h.stats().dropped_oldest_total.load(Ordering::Relaxed), 5000);
    let oldest = h.read_after(0, 1, usize::MAX).await.unwrap();
    assert_eq!(oldest[0].body, ev(5000), "the newest 1000 are kept");
    spool.close().await;

    // The lifetime counter survives a restart.
    let spool = Spool::open(config(dir.path())).unwrap();
    assert_eq!(
        spool
            .handle()
            .stats()
            .dropped_oldest_total
            .load(Ordering::Relaxed),
        5000
    );
    assert_eq!(spool.handle().stats().depth.load(Ordering::Relaxed), 1000);
    spool.close().await;
}

#[tokio::test]
async fn byte_bound_evicts_too() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig {
        max_bytes: 1 << 20,
        max_events: 1_000_000,
        ..config(dir.path())
    })
    .unwrap();
    let h = spool.handle();
    for _ in 0..3 {
        h.append_durable(vec![vec![b'a'; 400 * 1024]])
            .await
            .unwrap();
    }
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 2);
    assert!(h.stats().bytes.load(Ordering::Relaxed) <= 1 << 20);
    assert_eq!(h.stats().dropped_oldest_total.load(Ordering::Relaxed), 1);
    spool.close().await;
}

#[tokio::test]
async fn drop_newest_refuses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig {
        overflow: Overflow::DropNewest,
        ..config(dir.path())
    })
    .unwrap();
    let h = spool.handle();
    let o = h.append_durable((0..1500).map(ev).collect()).await.unwrap();
    assert_eq!(
        o,
        AppendOutcome {
            stored: 1000,
            refused_full: 500
        }
    );
    assert_eq!(h.stats().refused_full_total.load(Ordering::Relaxed), 500);
    let oldest = h.read_after(0, 1, usize::MAX).await.unwrap();
    assert_eq!(oldest[0].body, ev(0), "history is kept");
    spool.close().await;
}

#[tokio::test]
async fn block_stops_holding_producers_on_shutdown_refusing_whole_appends() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig {
        overflow: Overflow::Block,
        ..config(dir.path())
    })
    .unwrap();
    let h = spool.handle();
    h.append_durable((0..998).map(ev).collect()).await.unwrap();
    // Room for 2 of 5: the 2 are stored, the producer waits to retry 3.
    let o = h.append_durable((0..5).map(ev).collect()).await.unwrap();
    assert_eq!(
        o,
        AppendOutcome {
            stored: 2,
            refused_full: 3
        }
    );
    // A waiter for room is woken when the daemon stops holding producers.
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move { h.space_freed().notified().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.stop_holding_producers();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken at once")
        .unwrap();
    let err = h
        .append_durable((0..3).map(ev).collect())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SpoolError::Stopping { not_stored: 3 }),
        "{err}"
    );
    assert_eq!(crate::refusal::RefusalCode::from(&err), "daemon_stopping");
    assert!(err.to_string().contains("send them again"), "{err}");
    // All or nothing: room for 1 of 2 stores neither.
    let first = h.read_after(0, 1, usize::MAX).await.unwrap();
    h.ack(first[0].id, first[0].id).await.unwrap();
    let err = h
        .append_durable((0..2).map(ev).collect())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SpoolError::Stopping { not_stored: 2 }),
        "{err}"
    );
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 999);
    // What fits whole is still stored.
    let o = h.append_durable(vec![ev(7)]).await.unwrap();
    assert_eq!(o.stored, 1);
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 1000);
    assert_eq!(h.stats().refused_full_total.load(Ordering::Relaxed), 0);
    spool.close().await;
}

#[tokio::test]
async fn ids_keep_growing_after_the_spool_empties() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    h.append_durable(vec![ev(1)]).await.unwrap();
    let a = h.read_after(0, 10, usize::MAX).await.unwrap();
    h.ack(a[0].id, a[0].id).await.unwrap();
    h.append_durable(vec![ev(2)]).await.unwrap();
    let b = h.read_after(a[0].id, 10, usize::MAX).await.unwrap();
    assert_eq!(
        b.len(),
        1,
        "a reader positioned after the old id still sees the new event"
    );
    assert!(b[0].id > a[0].id);
    spool.close().await;
}

#[tokio::test]
async fn committed_events_survive_an_unclean_stop() {
    // What a crash leaves behind is the files as they are on disk at that
    // instant: copy them while the spool is open and busy, never closed.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    for i in 0..20 {
        h.append_durable(vec![ev(i)]).await.unwrap();
    }
    let crash = crash_copy(dir.path());
    let recovered = Spool::open(config(crash.path())).unwrap();
    let rh = recovered.handle();
    assert_eq!(rh.stats().depth.load(Ordering::Relaxed), 20);
    let all = rh.read_after(0, 100, usize::MAX).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.body.clone()).collect::<Vec<_>>(),
        (0..20).map(ev).collect::<Vec<_>>()
    );
    recovered.close().await;
    spool.close().await;
}

#[tokio::test]
async fn second_spool_on_the_same_file_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let err = Spool::open(config(dir.path()))
        .err()
        .expect("must be refused");
    let msg = err.to_string();
    assert!(matches!(err, SpoolError::Locked { .. }), "{msg}");
    assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    spool.close().await;
    // Released on close.
    Spool::open(config(dir.path())).unwrap().close().await;
}

#[tokio::test]
async fn deleting_or_replacing_the_lock_file_does_not_let_a_second_spool_in() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let note = dir.path().join("spool.sqlite.lock");
    std::fs::remove_file(&note).unwrap();
    let err = Spool::open(config(dir.path()))
        .err()
        .expect("the lock is on the spool itself, not on the lock file");
    let msg = err.to_string();
    assert!(matches!(err, SpoolError::Locked { .. }), "{msg}");
    // The holder is still named, from /proc/locks.
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    // A lock file replaced by another one, with a made-up pid: the same.
    std::fs::write(&note, "1\n").unwrap();
    let err = Spool::open(config(dir.path()))
        .err()
        .expect("still refused");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    spool.close().await;
    Spool::open(config(dir.path())).unwrap().close().await;
}

#[tokio::test]
async fn a_symlink_at_the_lock_path_is_refused_and_its_target_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let note = dir.path().join("spool.sqlite.lock");
    let target = dir.path().join("precious.txt");
    std::fs::write(&target, "keep me\n").unwrap();
    std::os::unix::fs::symlink(&target, &note).unwrap();
    let err = Spool::open(config(dir.path())).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&note.display().to_string())
            && msg.contains("symbolic link")
            && msg.contains("rm "),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
    // A dangling one: nothing is created where it points.
    std::fs::remove_file(&note).unwrap();
    let nowhere = dir.path().join("created-through-the-link");
    std::os::unix::fs::symlink(&nowhere, &note).unwrap();
    assert!(Spool::open(config(dir.path())).is_err());
    assert!(!nowhere.exists());
    // A hard link to another file: refused, the file unchanged.
    std::fs::remove_file(&note).unwrap();
    std::fs::hard_link(&target, &note).unwrap();
    let msg = Spool::open(config(dir.path()))
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("hard links"), "{msg}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me\n");
    // Once the link is gone, the spool opens.
    std::fs::remove_file(&note).unwrap();
    Spool::open(config(dir.path())).unwrap().close().await;
}

#[tokio::test]
async fn a_symlinked_spool_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.sqlite");
    Spool::open(SpoolConfig {
        path: real.clone(),
        ..config(dir.path())
    })
    .unwrap()
    .close()
    .await;
    std::os::unix::fs::symlink(&real, dir.path().join("spool.sqlite")).unwrap();
    let msg = Spool::open(config(dir.path()))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("symbolic link") && msg.contains("Z4J_BUFFER_PATH"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_immutable_spool_file_is_refused_at_open_naming_it_and_the_fix() {
    if crate::host::current_uid() != 0 {
        eprintln!("skipped: chattr +i needs root (CI runs this test as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    spool.handle().append_durable(vec![ev(1)]).await.unwrap();
    spool.close().await;
    let file = dir.path().join("spool.sqlite");
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&file)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !chattr("+i") {
        eprintln!("skipped: chattr +i is not supported here");
        return;
    }
    let result = Spool::open(config(dir.path()));
    assert!(chattr("-i"), "chattr -i");
    let err = result.err().expect("an immutable spool must be refused");
    let msg = err.to_string();
    assert!(matches!(err, SpoolError::NotWritable { .. }), "{msg}");
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("chattr -i"),
        "{msg}"
    );
    // Writable again: it opens, with what it held.
    let spool = Spool::open(config(dir.path())).unwrap();
    assert_eq!(spool.handle().stats().depth.load(Ordering::Relaxed), 1);
    spool.close().await;
}

#[tokio::test]
async fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    spool.handle().append_durable(vec![ev(1)]).await.unwrap();
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let p = dir.path().join(format!("spool.sqlite{suffix}"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
    spool.close().await;
}

#[tokio::test]
async fn a_file_that_is_not_a_database_gets_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spool.sqlite"), vec![b'#'; 4096]).unwrap();
    let err = Spool::open(config(dir.path())).err().expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("move it aside"), "{msg}");
}

#[tokio::test]
async fn oldest_stored_time_follows_the_head_of_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().oldest_stored_ms(), None);
    h.append_durable(vec![ev(0)]).await.unwrap();
    let first = h
        .stats()
        .oldest_stored_ms()
        .expect("set after the first append");
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.append_durable(vec![ev(1)]).await.unwrap();
    // A later append does not move the head.
    assert_eq!(h.stats().oldest_stored_ms(), Some(first));
    let all = h.read_after(0, 10, usize::MAX).await.unwrap();
    h.ack(all[0].id, all[0].id).await.unwrap();
    let second = h.stats().oldest_stored_ms().expect("one event left");
    assert!(second > first, "the head moved to the second event");
    assert_eq!(h.snapshot().await.unwrap().oldest_stored_ms, Some(second));
    h.ack(all[1].id, all[1].id).await.unwrap();
    assert_eq!(h.stats().oldest_stored_ms(), None);
    spool.close().await;
    // Reopening reads it back from the file.
    let spool = Spool::open(config(dir.path())).unwrap();
    assert_eq!(spool.handle().stats().oldest_stored_ms(), None);
    spool.handle().append_durable(vec![ev(2)]).await.unwrap();
    spool.close().await;
    let spool = Spool::open(config(dir.path())).unwrap();
    assert!(spool.handle().stats().oldest_stored_ms().is_some());
    spool.close().await;
}

#[tokio::test]
async fn probe_commits_and_clears_the_failing_flag() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let h = spool.handle();
    h.stats().write_failing.store(true, Ordering::Relaxed);
    h.probe().await.unwrap();
    assert!(!h.stats().write_failing.load(Ordering::Relaxed));
    // The probe is a real write: it lands in the file.
    spool.close().await;
    let conn = Connection::open(dir.path().join("spool.sqlite")).unwrap();
    let probed: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'probed_ms'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(probed > 0);
}

#[tokio::test]
async fn a_truncated_file_gets_the_fix_and_is_left_as_it_is() {
    for cut in [100u64, 4096, 16_384, 40_000] {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        let h = spool.handle();
        for i in 0..10 {
            h.append_durable((0..100).map(|j| body(i * 100 + j)).collect())
                .await
                .unwrap();
        }
        spool.close().await;
        let path = dir.path().join("spool.sqlite");
        let whole = std::fs::metadata(&path).unwrap().len();
        assert!(whole > 2 * cut, "a spool of {whole} bytes to cut at {cut}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let err = Spool::open(config(dir.path())).err().expect("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("malformed") && msg.contains(&format!("mv {}", path.display())),
            "cut at {cut}: {msg}"
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len() as u64,
            cut,
            "the damaged file is kept for inspection"
        );
    }
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_new_spool_is_stamped_with_its_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    spool.close().await;
    assert_eq!(
        user_version(&dir.path().join("spool.sqlite")),
        SCHEMA_VERSION
    );
    assert_eq!(page_size(&dir.path().join("spool.sqlite")), 4096);
}

fn page_size(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_spool_from_before_the_version_keeps_its_events_and_is_stamped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let spool = Spool::open(config(dir.path())).unwrap();
    spool.handle().append_durable(vec![ev(1)]).await.unwrap();
    spool.close().await;
    // What a daemon that kept no version left: the same tables, version 0.
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version=0;")
        .unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let events = spool.handle().read_after(0, 10, usize::MAX).await.unwrap();
    assert_eq!(events.len(), 1);
    spool.close().await;
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[tokio::test]
async fn a_spool_from_a_newer_version_is_refused_untouched_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let spool = Spool::open(config(dir.path())).unwrap();
    spool.handle().append_durable(vec![ev(1)]).await.unwrap();
    spool.close().await;
    let newer = SCHEMA_VERSION + 1;
    Connection::open(&path)
        .unwrap()
        .execute_batch(&format!("PRAGMA user_version={newer};"))
        .unwrap();
    let err = Spool::open(config(dir.path())).err().expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("newer z4j-agentd")
            && msg.contains(&format!("version {newer}"))
            && msg.contains(&format!("mv {}", path.display())),
        "{msg}"
    );
    assert_eq!(user_version(&path), newer, "the file is left as it is");
    let conn = Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "its events are kept");
}

#[tokio::test]
async fn the_buffer_id_is_chosen_once_per_file_and_kept_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(dir.path())).unwrap();
    let id = spool.handle().stats().buffer_id().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    spool.close().await;
    let spool = Spool::open(config(dir.path())).unwrap();
    assert_eq!(spool.handle().stats().buffer_id(), id);
    spool.close().await;
    // Another file is another buffer.
    let other = tempfile::tempdir().unwrap();
    let spool = Spool::open(config(other.path())).unwrap();
    assert_ne!(spool.handle().stats().buffer_id(), id);
    spool.close().await;
}

#[tokio::test]
async fn loss_counters_and_the_brain_seen_survive_a_restart_and_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_events = 3;
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().brain_line(), None);
    h.append_durable((0..5).map(ev).collect()).await.unwrap();
    let evicted = h.stats().dropped_oldest_total.load(Ordering::Relaxed);
    assert_eq!(evicted, 2);
    let head = h.read_after(0, 1, usize::MAX).await.unwrap();
    assert_eq!(
        h.discard_undeliverable(head[0].id, head[0].id)
            .await
            .unwrap(),
        1
    );
    // Discarding what is gone counts nothing.
    assert_eq!(
        h.discard_undeliverable(head[0].id, head[0].id)
            .await
            .unwrap(),
        0
    );
    assert_eq!(h.stats().undeliverable_total.load(Ordering::Relaxed), 1);
    h.remember_brain(1013).await.unwrap();
    assert_eq!(h.stats().brain_line(), Some(1013));
    spool.close().await;

    let spool = Spool::open(cfg).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().dropped_oldest_total.load(Ordering::Relaxed), 2);
    assert_eq!(h.stats().undeliverable_total.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats().brain_line(), Some(1013));
    let head = h.read_after(0, 1, usize::MAX).await.unwrap();
    h.discard_undeliverable(head[0].id, head[0].id)
        .await
        .unwrap();
    assert_eq!(h.stats().undeliverable_total.load(Ordering::Relaxed), 2);
    spool.close().await;
}

fn wal_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("spool.sqlite-wal"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The WAL header's checkpoint sequence number and salts (bytes 12-23),
/// which SQLite changes each time the log starts over from the file's
/// start; zeros without a log.
fn wal_generation(dir: &Path) -> [u8; 12] {
    use std::io::Read;
    let mut header = [0u8; 24];
    let read = std::fs::File::open(dir.join("spool.sqlite-wal"))
        .and_then(|mut f| f.read_exact(&mut header));
    let mut generation = [0u8; 12];
    if read.is_ok() {
        generation.copy_from_slice(&header[12..24]);
    }
    generation
}

/// Polls `cond` every 20 ms for up to `secs`.
async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn big_config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        max_events: 10_000_000,
        max_bytes: 1 << 33,
        ..config(dir)
    }
}

fn body(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(400)).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_the_wal_and_empties_it_once_writes_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(big_config(dir.path())).unwrap();
    let h = spool.handle();
    for round in 0..200 {
        let batch: Vec<_> = (0..100).map(|i| body(round * 100 + i)).collect();
        h.append_durable(batch).await.unwrap();
    }
    let all = h.read_after(0, 100_000, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 20_000);
    let last = all.last().unwrap().id;
    assert!(wal_len(dir.path()) > 0, "the appends went to the WAL");
    // Commits never checkpoint: the checkpointer's passes do.
    eventually(5, "a checkpointer pass", || {
        h.stats().checkpoints_total.load(Ordering::Relaxed) > 0
    })
    .await;
    assert_eq!(h.ack(all[0].id, last).await.unwrap(), 20_000);
    // Drained and idle: the WAL file is emptied.
    eventually(10, "the WAL emptied after the drain", || {
        wal_len(dir.path()) == 0
    })
    .await;
    eventually(5, "the WAL's size in the stats", || {
        h.stats().wal_bytes.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(
        h.stats().checkpoint_failures_total.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        h.stats().writer_checkpoints_total.load(Ordering::Relaxed),
        0,
        "nothing outgrew the bound: no commit did a checkpoint"
    );
    // Writes after the truncation go on.
    h.append_durable(vec![body(1)]).await.unwrap();
    assert_eq!(h.snapshot().await.unwrap().depth, 1);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_commits_keep_the_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(big_config(dir.path())).unwrap();
    let h = spool.handle();
    // One event per commit writes a whole page to the log each time:
    // the log grows fast and never pauses, so only the writer's finishing
    // pass lets it start over.
    let mut largest = 0u64;
    let mut n = 0;
    let mut finished = 0;
    let mut generation = wal_generation(dir.path());
    let started = std::time::Instant::now();
    while finished < 3 {
        h.append_durable(vec![body(n)]).await.unwrap();
        n += 1;
        largest = largest.max(wal_len(dir.path()));
        let now = h.stats().writer_checkpoints_total.load(Ordering::Relaxed);
        if now > finished {
            finished = now;
            // The commit after the writer's checkpoint starts the log over,
            // from the file's start: SQLite writes a new header. The file
            // keeps its size (cutting it would hold that commit up).
            h.append_durable(vec![body(n)]).await.unwrap();
            n += 1;
            let next = wal_generation(dir.path());
            assert_ne!(
                next, generation,
                "the log did not start over after the writer's checkpoint"
            );
            generation = next;
            let kept = wal_len(dir.path());
            assert!(
                kept >= checkpoint::FINISH_BYTES,
                "the WAL file was cut to {kept} bytes when the log started over"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120) && largest < 1 << 30,
            "the writer was never asked to finish a pass ({n} commits, WAL {largest} bytes)"
        );
    }
    eprintln!("{n} commits; the WAL file reached {largest} bytes at most");
    // Every pass ran beside commits, so SQLite synced none of the copies:
    // the checkpointer did.
    assert!(
        spool.checkpoint.database_syncs.load(Ordering::Relaxed) > 0,
        "the checkpointer never synced the database file"
    );
    // Writes stop, whatever turn the writer was given last: the log file
    // is still emptied.
    eventually(10, "the WAL emptied once writes stopped", || {
        wal_len(dir.path()) == 0
    })
    .await;
    assert!(
        !spool.checkpoint.catching_up(),
        "the writer is still told to pause after each commit"
    );
    assert_eq!(
        h.stats().checkpoint_failures_total.load(Ordering::Relaxed),
        0
    );
    assert_eq!(h.snapshot().await.unwrap().depth, n as u64);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_checkpointer_is_counted_and_commits_checkpoint_until_it_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(big_config(dir.path())).unwrap();
    let h = spool.handle();
    spool
        .checkpoint
        .fail_passes
        .store(u32::MAX, Ordering::SeqCst);
    let mut n = 0;
    let mut stored = 0;
    // Writes go on and are stored while every pass fails.
    while h.stats().checkpoint_failures_total.load(Ordering::Relaxed) < 2
        || !h.stats().checkpoint_on_commit.load(Ordering::Relaxed)
    {
        stored += h.append_durable(vec![body(n)]).await.unwrap().stored;
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(n < 5_000, "the failure was never seen");
    }
    let why = h.stats().checkpoint_error.lock().unwrap().clone().unwrap();
    assert!(why.contains("checkpoint failed"), "{why}");
    // SQLite's own checkpoint keeps the log bounded meanwhile.
    for i in 0..3_000 {
        stored += h.append_durable(vec![body(n + i)]).await.unwrap().stored;
    }
    assert!(
        wal_len(dir.path()) < 2 * 2_500 * 16 * 1024,
        "the WAL grew to {} bytes with the automatic checkpoint on",
        wal_len(dir.path())
    );
    // It works again: commits no longer checkpoint, the error is gone.
    spool.checkpoint.fail_passes.store(0, Ordering::SeqCst);
    let mut k = 0;
    while h.stats().checkpoint_on_commit.load(Ordering::Relaxed) {
        stored += h.append_durable(vec![body(k)]).await.unwrap().stored;
        k += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(k < 5_000, "the checkpointer never came back");
    }
    assert!(h.stats().checkpoint_error.lock().unwrap().is_none());
    assert_eq!(h.snapshot().await.unwrap().depth, stored as u64);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpointer_thread_that_ends_is_reported_and_ingest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(big_config(dir.path())).unwrap();
    let h = spool.handle();
    spool.checkpoint.panic_next.store(true, Ordering::SeqCst);
    eventually(5, "the thread's end reported", || {
        h.stats().checkpoint_failures_total.load(Ordering::Relaxed) == 1
    })
    .await;
    let why = h.stats().checkpoint_error.lock().unwrap().clone().unwrap();
    assert!(why.contains("thread ended"), "{why}");
    for i in 0..3_000 {
        assert_eq!(h.append_durable(vec![body(i)]).await.unwrap().stored, 1);
    }
    assert!(h.stats().checkpoint_on_commit.load(Ordering::Relaxed));
    assert!(wal_len(dir.path()) < 2 * 2_500 * 16 * 1024);
    assert_eq!(h.snapshot().await.unwrap().depth, 3_000);
    // Closing still folds the WAL back.
    spool.close().await;
    assert_eq!(wal_len(dir.path()), 0);
}

fn opened_ms(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT value FROM meta WHERE key = 'opened_ms'", [], |r| {
            r.get(0)
        })
        .unwrap()
}

fn tally(path: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT key, value FROM meta WHERE key LIKE 'tally_%' ORDER BY key")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

/// The files as a crash would leave them: copied while the spool is open.
fn crash_copy(dir: &Path) -> tempfile::TempDir {
    let crash = tempfile::tempdir().unwrap();
    // The log before the database: a checkpoint between the copies then
    // finds its pages in both, never in neither.
    for suffix in ["-wal", "-shm", ""] {
        let src = dir.join(format!("spool.sqlite{suffix}"));
        if src.exists() {
            std::fs::copy(&src, crash.path().join(format!("spool.sqlite{suffix}"))).unwrap();
        }
    }
    crash
}

fn counted(path: &Path) -> (u64, u64) {
    let (n, b): (i64, i64) = rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    (n as u64, b as u64)
}

/// A spool that stored 50 events and deleted the first 10 after their ack;
/// returns those 10.
async fn fifty_with_ten_acked(cfg: &SpoolConfig) -> (Spool, Vec<StoredEvent>) {
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    h.append_durable((0..50).map(body).collect()).await.unwrap();
    let first = h.read_after(0, 10, usize::MAX).await.unwrap();
    h.ack(first[0].id, first[9].id).await.unwrap();
    (spool, first)
}

#[tokio::test]
async fn a_clean_stop_leaves_the_tally_and_the_next_start_counts_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    let (spool, first) = fifty_with_ten_acked(&cfg).await;
    let h = spool.handle();
    h.append_durable((50..55).map(body).collect())
        .await
        .unwrap();
    let bytes = h.stats().bytes.load(Ordering::Relaxed);
    spool.close().await;
    assert_eq!(
        tally(&cfg.path),
        vec![
            ("tally_bytes".to_string(), bytes as i64),
            ("tally_depth".to_string(), 45),
            ("tally_last_id".to_string(), first[0].id + 54),
            ("tally_opened_ms".to_string(), opened_ms(&cfg.path)),
        ]
    );
    // Rows at or below the tally's last id are not counted again: one
    // removed behind the daemon's back (never done by a daemon, which
    // rewrites the tally with every deletion) does not change the counts.
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute("DELETE FROM events WHERE id = ?1", [first[0].id + 20])
        .unwrap();
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 45);
    assert_eq!(h.stats().bytes.load(Ordering::Relaxed), bytes);
    spool.close().await;
}

#[tokio::test]
async fn after_a_crash_the_start_counts_the_rows_appended_since_the_tally() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    // The deletion rewrites the tally in its commit...
    let (spool, _) = fifty_with_ten_acked(&cfg).await;
    let h = spool.handle();
    let at_ack = tally(&cfg.path);
    assert!(
        at_ack.contains(&("tally_depth".to_string(), 40)),
        "{at_ack:?}"
    );
    // ...appends within a second of it do not.
    h.append_durable((50..57).map(body).collect())
        .await
        .unwrap();
    assert_eq!(tally(&cfg.path), at_ack);
    // Only the rows above the tally are counted: in one copy of what the
    // crash left, a row below it removed behind the daemon's back (never
    // done by a daemon) goes unseen.
    let probe = crash_copy(dir.path());
    rusqlite::Connection::open(probe.path().join("spool.sqlite"))
        .unwrap()
        .execute(
            "DELETE FROM events WHERE id = (SELECT min(id) FROM events)",
            [],
        )
        .unwrap();
    let counted_above = Spool::open(big_config(probe.path())).unwrap();
    assert_eq!(
        counted_above.handle().stats().depth.load(Ordering::Relaxed),
        47
    );
    counted_above.close().await;
    let crash = crash_copy(dir.path());
    let path = crash.path().join("spool.sqlite");
    let expected = counted(&path);
    assert_eq!(expected.0, 47);
    let recovered = Spool::open(big_config(crash.path())).unwrap();
    let rh = recovered.handle();
    assert_eq!(rh.stats().depth.load(Ordering::Relaxed), expected.0);
    assert_eq!(rh.stats().bytes.load(Ordering::Relaxed), expected.1);
    // Every later deletion keeps it exact.
    let all = rh.read_after(0, 100, usize::MAX).await.unwrap();
    rh.ack(all[3].id, all[5].id).await.unwrap();
    let again = crash_copy(crash.path());
    let expected = counted(&again.path().join("spool.sqlite"));
    assert_eq!(expected.0, 44);
    let reopened = Spool::open(big_config(again.path())).unwrap();
    assert_eq!(
        (
            reopened.handle().stats().depth.load(Ordering::Relaxed),
            reopened.handle().stats().bytes.load(Ordering::Relaxed)
        ),
        expected
    );
    reopened.close().await;
    recovered.close().await;
    spool.close().await;
}

#[tokio::test]
async fn appends_alone_rewrite_the_tally_a_second_after_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    h.append_durable(vec![body(0)]).await.unwrap();
    assert!(tally(&cfg.path).contains(&("tally_depth".to_string(), 0)));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    h.append_durable(vec![body(1)]).await.unwrap();
    assert!(
        tally(&cfg.path).contains(&("tally_depth".to_string(), 2)),
        "{:?}",
        tally(&cfg.path)
    );
    spool.close().await;
}

/// A spool that stored 5 events and stopped cleanly.
async fn five_stored_and_closed(cfg: &SpoolConfig) {
    let spool = Spool::open(cfg.clone()).unwrap();
    spool
        .handle()
        .append_durable((0..5).map(body).collect())
        .await
        .unwrap();
    spool.close().await;
}

#[tokio::test]
async fn a_tally_another_run_did_not_keep_is_not_trusted() {
    // A daemon that does not know the tally (an older version) ran on the
    // file in between: it rewrote `opened_ms`, as every version's start
    // does, and changed the events without touching the tally.
    // Both changes are at or below the tally's last id: a trusted tally
    // would not see them.
    for change in [
        "INSERT INTO events(id, stored_ms, body) VALUES (0, 1, x'7b7d')",
        "DELETE FROM events WHERE id = (SELECT min(id) FROM events)",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = big_config(dir.path());
        five_stored_and_closed(&cfg).await;
        assert_eq!(tally(&cfg.path).len(), 4);
        let conn = rusqlite::Connection::open(&cfg.path).unwrap();
        conn.execute_batch(&format!(
            "UPDATE meta SET value = value + 1 WHERE key = 'opened_ms'; {change}"
        ))
        .unwrap();
        drop(conn);
        let expected = counted(&cfg.path);
        let spool = Spool::open(cfg.clone()).unwrap();
        let h = spool.handle();
        let st = h.stats();
        assert_eq!(st.depth.load(Ordering::Relaxed), expected.0, "{change}");
        assert_eq!(st.bytes.load(Ordering::Relaxed), expected.1, "{change}");
        spool.close().await;
    }
}

#[tokio::test]
async fn counts_a_tally_overstated_are_set_right_once_the_spool_empties() {
    // A build from before the tally deleted a row without touching it (and
    // without rewriting `opened_ms`): the count is one too high until the
    // spool empties, then right, and stays right across a restart.
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    five_stored_and_closed(&cfg).await;
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch("DELETE FROM events WHERE id = (SELECT min(id) + 2 FROM events)")
        .unwrap();
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 5);
    let all = h.read_after(0, 10, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 4);
    h.ack(all[0].id, all[3].id).await.unwrap();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 0);
    assert_eq!(h.stats().bytes.load(Ordering::Relaxed), 0);
    spool.close().await;
    // A tally that says events are left in an empty table is set right at
    // open too.
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch("UPDATE meta SET value = 3 WHERE key = 'tally_depth'")
        .unwrap();
    let spool = Spool::open(cfg.clone()).unwrap();
    assert_eq!(spool.handle().stats().depth.load(Ordering::Relaxed), 0);
    spool.close().await;
}

#[tokio::test]
async fn ids_keep_growing_across_restarts_after_the_spool_empties() {
    for crash in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        let h = spool.handle();
        h.append_durable((0..3).map(ev).collect()).await.unwrap();
        let all = h.read_after(0, 10, usize::MAX).await.unwrap();
        h.ack(all[0].id, all[2].id).await.unwrap();
        assert_eq!(h.stats().depth.load(Ordering::Relaxed), 0);
        let (copy, next) = if crash {
            let copy = crash_copy(dir.path());
            let next = Spool::open(config(copy.path())).unwrap();
            (Some(copy), next)
        } else {
            spool.close().await;
            (None, Spool::open(config(dir.path())).unwrap())
        };
        let nh = next.handle();
        nh.append_durable(vec![ev(9)]).await.unwrap();
        let new = nh.read_after(0, 10, usize::MAX).await.unwrap();
        assert_eq!(new.len(), 1);
        assert!(new[0].id > all[2].id, "crash={crash}: {} reused", new[0].id);
        next.close().await;
        drop(copy);
    }
}

/// A spool as a version 1 daemon left it: `AUTOINCREMENT` ids, `n` events
/// of which the last `deleted` were acknowledged (so the high-water mark is
/// above the highest id kept), and its clean-stop record.
fn version_1_spool(path: &Path, n: i64, deleted: i64) {
    version_1_spool_of(path, n, deleted, body)
}

/// [`version_1_spool`] with the bodies `body_of` gives.
fn version_1_spool_of(path: &Path, n: i64, deleted: i64, body_of: fn(usize) -> Vec<u8>) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA page_size=16384; PRAGMA journal_mode=WAL;
         CREATE TABLE events (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             stored_ms INTEGER NOT NULL,
             body BLOB NOT NULL
         );
         CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
         INSERT INTO meta VALUES ('clean_close_depth', 1), ('opened_ms', 5);
         PRAGMA user_version=1;",
    )
    .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO events(stored_ms, body) VALUES (?1, ?2)",
            rusqlite::params![i, body_of(i as usize)],
        )
        .unwrap();
    }
    tx.execute("DELETE FROM events WHERE id > ?1", [n - deleted])
        .unwrap();
    tx.commit().unwrap();
}

fn has_autoincrement(path: &Path) -> bool {
    table_sql(path)
        .to_ascii_uppercase()
        .contains("AUTOINCREMENT")
}

fn table_sql(path: &Path) -> String {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn a_version_1_spool_is_rebuilt_keeping_its_events_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    version_1_spool(&cfg.path, 5, 2);
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    let kept = h.read_after(0, 10, usize::MAX).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(kept[2].body, body(2));
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 3);
    h.append_durable(vec![body(9)]).await.unwrap();
    let new = h.read_after(3, 10, usize::MAX).await.unwrap();
    assert_eq!(new[0].id, 6, "ids 4 and 5 were given before: not again");
    spool.close().await;
    assert_eq!(
        page_size(&cfg.path),
        16_384,
        "an existing spool keeps its pages"
    );
    assert!(!has_autoincrement(&cfg.path), "{}", table_sql(&cfg.path));
    assert_eq!(user_version(&cfg.path), SCHEMA_VERSION);
    let leftovers: i64 = rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM meta WHERE key LIKE 'clean_close_%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftovers, 0);
}

#[tokio::test]
async fn a_large_version_1_spool_keeps_its_table_until_a_start_finds_it_small() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    version_1_spool(&cfg.path, 10_003, 1);
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 10_002);
    h.append_durable(vec![body(1)]).await.unwrap();
    let new = h.read_after(10_002, 10, usize::MAX).await.unwrap();
    assert_eq!(new[0].id, 10_004);
    h.ack(1, 10_000).await.unwrap();
    spool.close().await;
    assert!(has_autoincrement(&cfg.path));
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 3);
    let kept = h.read_after(0, 10, usize::MAX).await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![10_001, 10_002, 10_004]
    );
    spool.close().await;
    assert!(!has_autoincrement(&cfg.path));
}

#[tokio::test]
async fn a_version_1_spool_over_16_mib_keeps_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = big_config(dir.path());
    // 20 events of 1 MiB: few events, but more bytes than a start copies.
    version_1_spool_of(&cfg.path, 20, 0, |i| vec![b'a' + (i % 26) as u8; 1 << 20]);
    let spool = Spool::open(cfg.clone()).unwrap();
    let h = spool.handle();
    assert_eq!(h.stats().depth.load(Ordering::Relaxed), 20);
    assert_eq!(h.stats().bytes.load(Ordering::Relaxed), 20 << 20);
    spool.close().await;
    assert!(has_autoincrement(&cfg.path));
}

fn append_op(n: usize) -> handle::Op {
    let (reply, _) = tokio::sync::oneshot::channel();
    handle::Op::Append {
        events: (0..n).map(ev).collect(),
        reply,
    }
}

/// The writer's pause while the checkpointer catches up holds back large
/// appends only: a small one, or any other request, ends it within a poll,
/// and what came meanwhile is kept for the next transaction, up to one
/// commit's worth of events.
#[test]
fn the_writers_pause_gives_way_to_a_small_append_not_to_a_large_one() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut ops = Vec::new();
    // Large appends only: the pause is waited out, and they are kept.
    tx.try_send(append_op(1_000)).ok().unwrap();
    tx.try_send(append_op(65)).ok().unwrap();
    let started = std::time::Instant::now();
    writer::pause(&mut rx, &mut ops, Duration::from_millis(50));
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(ops.len(), 2);
    // A small append behind a large one: it ends a pause of a minute.
    ops.clear();
    tx.try_send(append_op(1_000)).ok().unwrap();
    tx.try_send(append_op(1)).ok().unwrap();
    tx.try_send(append_op(1_000)).ok().unwrap();
    let started = std::time::Instant::now();
    writer::pause(&mut rx, &mut ops, Duration::from_secs(60));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the pause was waited out"
    );
    assert_eq!(ops.len(), 2, "received up to the small append");
    // So does any other request: the stop.
    ops.clear();
    tx.try_send(handle::Op::Close).ok().unwrap();
    let started = std::time::Instant::now();
    writer::pause(&mut rx, &mut ops, Duration::from_secs(60));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the pause was waited out"
    );
    assert_eq!(
        ops.len(),
        2,
        "the large append left in the channel, then the stop"
    );
    // A backlog of large appends: one commit's worth is taken, the rest
    // stay in the channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    for _ in 0..40 {
        tx.try_send(append_op(1_000)).ok().unwrap();
    }
    let mut ops = Vec::new();
    writer::pause(&mut rx, &mut ops, Duration::from_millis(20));
    assert_eq!(ops.len(), 33, "32,768 events, rounded up to whole appends");
    let mut left = 0;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    assert_eq!(left, 7);
}
