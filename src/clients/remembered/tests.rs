use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::*;
use crate::clients::{ClientInfo, ClientRegistry, Outbox};
use crate::protocol::Value;

struct Sink;

impl Outbox for Sink {
    fn offer(&self, _msg: &Value) -> bool {
        true
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What a Celery worker and a beat declared before the restart.
fn before() -> Advertisement {
    Advertisement {
        engines: strings(&["celery"]),
        capabilities: BTreeMap::from([
            ("celery".into(), strings(&["cancel_task", "retry_task"])),
            ("celery-beat".into(), strings(&["schedule.trigger_now"])),
        ]),
        runtime_features: strings(&["retry_by_reference"]),
        schedulers: strings(&["celery-beat"]),
    }
}

fn brain() -> BrainIdentity {
    BrainIdentity {
        agent_id: "ea12aefd-04ac-43d0-af34-08b77434f37a".into(),
        project_id: "817e2571-38a5-4109-92c2-612c66108836".into(),
        brain_version: "1.13.0".into(),
    }
}

#[test]
fn the_brains_identity_is_remembered_with_the_advertisement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adv.json");
    write(&path, &before(), &identity(), None).unwrap();
    let (file, read) = AdvertisementFile::open(path.clone(), identity());
    assert_eq!(
        read.unwrap(),
        Some(before()),
        "a file without it still reads"
    );
    assert_eq!(file.brain(), None);
    let r = ClientRegistry::default();
    r.remember_from(
        path.clone(),
        identity(),
        Duration::from_secs(60),
        &Advertisement::default(),
    );
    r.acknowledged(&before(), &identity(), &brain());
    assert_eq!(r.remembered_brain(), Some(brain()));
    let (again, _) = AdvertisementFile::open(path.clone(), identity());
    assert_eq!(again.brain(), Some(&brain()), "read back at the next start");
    let mut other = identity();
    other.agent = "another token".into();
    let (moved, read) = AdvertisementFile::open(path, other);
    assert!(read.is_err());
    assert_eq!(moved.brain(), None, "not for another agent token");
}

fn identity() -> Identity {
    Identity::new("http://brain:7700", "agentd-a", "token-one")
}

fn worker(engine: &str, actions: &[&str]) -> Registration {
    Registration {
        engines: strings(&[engine]),
        capabilities: BTreeMap::from([(engine.to_string(), strings(actions))]),
        ..Registration::default()
    }
}

fn live(r: &ClientRegistry) -> Advertisement {
    r.advertisement(&[], &BTreeMap::new())
}

/// Whether a change signal is pending, without waiting.
fn signalled(r: &ClientRegistry) -> bool {
    let mut wait = std::pin::pin!(r.changed());
    let mut cx = Context::from_waker(Waker::noop());
    matches!(wait.as_mut().poll(&mut cx), Poll::Ready(()))
}

/// A registry that read `adv` from a file written for [`identity`].
fn restarted_with(adv: &Advertisement, grace: Duration) -> (ClientRegistry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer.sqlite.advertisement.json");
    write(&path, adv, &identity(), None).unwrap();
    let r = ClientRegistry::new();
    r.remember_from(path, identity(), grace, &Advertisement::default());
    (r, dir)
}

#[test]
fn the_first_advertisement_after_a_restart_is_the_one_before() {
    let (r, _dir) = restarted_with(&before(), Duration::from_secs(60));
    assert_eq!(live(&r), before());
    let report = r.remembered_report().expect("remembered");
    assert_eq!(report.engines, strings(&["celery"]));
    assert_eq!(report.schedulers, strings(&["celery-beat"]));
    assert!(report.seconds_left > 50.0 && report.seconds_left <= 60.0);
}

#[test]
fn a_process_declaring_again_takes_its_entries_over_and_the_rest_stays() {
    let (r, _dir) = restarted_with(&before(), Duration::from_secs(60));
    r.connected(1, ClientInfo::default());
    r.declared(1, worker("celery", &["cancel_task"]), Arc::new(Sink));
    // Nothing disappears: the union is what it was.
    assert_eq!(live(&r), before());
    let left = r.remembered_report().unwrap();
    assert!(left.engines.is_empty(), "celery is declared again");
    assert_eq!(
        left.capabilities,
        BTreeMap::from([
            ("celery".into(), strings(&["retry_task"])),
            ("celery-beat".into(), strings(&["schedule.trigger_now"])),
        ])
    );
    assert_eq!(
        r.only_remembered(Some("celery"), "retry_task").unwrap().0,
        "celery"
    );
    assert!(r.only_remembered(Some("celery"), "cancel_task").is_none());
    // The process that declared it again leaves: its entries leave with it,
    // they are not remembered again.
    r.disconnected(1);
    let now = live(&r);
    assert!(!now.capabilities["celery"].contains(&"cancel_task".to_string()));
    assert_eq!(now.capabilities["celery"], strings(&["retry_task"]));
    assert_eq!(
        now.engines,
        strings(&["celery"]),
        "the action still names it"
    );
}

#[test]
fn every_entry_declared_again_leaves_nothing_remembered() {
    let (r, _dir) = restarted_with(&before(), Duration::from_secs(60));
    r.connected(1, ClientInfo::default());
    let mut all = worker("celery", &["cancel_task", "retry_task"]);
    all.runtime_features = strings(&["retry_by_reference"]);
    r.connected(2, ClientInfo::default());
    r.declared(1, all, Arc::new(Sink));
    let beat = Registration {
        schedulers: strings(&["celery-beat"]),
        capabilities: BTreeMap::from([(
            "celery-beat".to_string(),
            strings(&["schedule.trigger_now"]),
        )]),
        ..Registration::default()
    };
    r.declared(2, beat, Arc::new(Sink));
    assert!(r.remembered_report().is_none());
    assert_eq!(live(&r), before());
}

#[test]
fn the_grace_ends_what_nobody_declared_again_and_signals_it() {
    let (r, _dir) = restarted_with(&before(), Duration::from_secs(60));
    r.connected(1, ClientInfo::default());
    r.declared(1, worker("celery", &["cancel_task"]), Arc::new(Sink));
    while signalled(&r) {}
    r.forget_remembered();
    assert!(signalled(&r), "the advertisement shrank");
    let now = live(&r);
    assert_eq!(now.engines, strings(&["celery"]));
    assert_eq!(
        now.capabilities,
        BTreeMap::from([("celery".into(), strings(&["cancel_task"]))])
    );
    assert!(now.schedulers.is_empty() && now.runtime_features.is_empty());
    assert!(r.only_remembered(None, "retry_task").is_none());
    r.forget_remembered();
    assert!(!signalled(&r), "nothing left to forget: no signal");
}

#[test]
fn the_grace_is_a_deadline_even_before_anyone_forgets() {
    let r = ClientRegistry::new();
    let past = Instant::now();
    r.remember_until(before(), past, OffsetDateTime::now_utc());
    assert_eq!(live(&r), Advertisement::default());
    assert!(r.remembered_report().is_none());
    assert!(r.only_remembered(Some("celery"), "retry_task").is_none());
}

#[test]
fn a_zero_grace_remembers_nothing_but_still_writes() {
    let (r, dir) = restarted_with(&before(), Duration::ZERO);
    assert_eq!(live(&r), Advertisement::default());
    let path = dir.path().join("buffer.sqlite.advertisement.json");
    let new = Advertisement {
        engines: strings(&["rq"]),
        ..Advertisement::default()
    };
    r.acknowledged(&new, &identity(), &brain());
    assert_eq!(read(&path, &identity()).unwrap().map(|h| h.0), Some(new));
}

#[test]
fn the_configuration_is_not_reported_as_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(&path, &before(), &identity(), None).unwrap();
    let r = ClientRegistry::new();
    let configured = Advertisement::configured(
        &[],
        &BTreeMap::from([("celery".into(), strings(&["cancel_task", "retry_task"]))]),
    );
    r.remember_from(path, identity(), Duration::from_secs(60), &configured);
    let report = r.remembered_report().unwrap();
    assert!(report.engines.is_empty());
    assert!(!report.capabilities.contains_key("celery"));
}

#[test]
fn an_unusable_file_is_ignored_and_start_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    let good = serde_json::to_value(Stored {
        brain: None,
        format: FORMAT,
        identity: identity(),
        written_at: "2026-12-01T10:00:00.000000Z".into(),
        engines: strings(&["celery"]),
        capabilities: BTreeMap::new(),
        schedulers: Vec::new(),
        runtime_features: Vec::new(),
    })
    .unwrap();
    let edited = |key: &str, v: serde_json::Value| {
        let mut x = good.clone();
        x[key] = v;
        serde_json::to_vec(&x).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"{\"format\": 1, \"engi".to_vec()),
        ("empty", Vec::new()),
        ("binary", vec![0xff, 0x00, 0x12]),
        (
            "another brain",
            edited("brain_url", "http://other:7700".into()),
        ),
        (
            "another worker slot",
            edited("worker_id", "agentd-b".into()),
        ),
        ("another token", edited("agent", "00".repeat(16).into())),
        ("another format", edited("format", 2.into())),
        ("a wrong type", edited("engines", "celery".into())),
        ("an unknown key", edited("extra", 1.into())),
        (
            "a bad engine name",
            edited("engines", serde_json::json!(["x".repeat(41)])),
        ),
        (
            "a padded name",
            edited("engines", serde_json::json!([" celery"])),
        ),
        (
            "an empty action",
            edited("capabilities", serde_json::json!({"celery": [""]})),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let r = ClientRegistry::new();
        let until = r.remember_from(
            path.clone(),
            identity(),
            Duration::from_secs(60),
            &Advertisement::default(),
        );
        assert!(until.is_none(), "{what}: ignored");
        assert_eq!(live(&r), Advertisement::default(), "{what}");
        // It is replaced by the next acknowledged advertisement.
        r.acknowledged(&before(), &identity(), &brain());
        assert_eq!(
            read(&path, &identity()).unwrap().map(|h| h.0),
            Some(before()),
            "{what}"
        );
    }
    // The good one is used.
    std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
    let r = ClientRegistry::new();
    assert!(r
        .remember_from(
            path.clone(),
            identity(),
            Duration::from_secs(60),
            &Advertisement::default()
        )
        .is_some());
    // A directory where the file should be: ignored too.
    let r = ClientRegistry::new();
    assert!(r
        .remember_from(
            dir.path().to_path_buf(),
            identity(),
            Duration::from_secs(60),
            &Advertisement::default()
        )
        .is_none());
}

#[test]
fn a_missing_file_is_no_warning_and_nothing_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let (_, read) = AdvertisementFile::open(dir.path().join("none.json"), identity());
    assert_eq!(read, Ok(None));
}

#[test]
fn the_file_is_written_only_when_what_was_acknowledged_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    let (mut f, _) = AdvertisementFile::open(path.clone(), identity());
    assert!(f.acknowledged(&before(), &identity()), "first: written");
    let first = std::fs::read(&path).unwrap();
    assert!(!f.acknowledged(&before(), &identity()), "same: not written");
    assert_eq!(std::fs::read(&path).unwrap(), first);
    let fewer = Advertisement {
        engines: strings(&["celery"]),
        ..Advertisement::default()
    };
    assert!(f.acknowledged(&fewer, &identity()), "changed: written");
    assert_eq!(
        read(&path, &identity()).unwrap().map(|h| h.0),
        Some(fewer.clone())
    );
    let other = Identity::new("http://brain:7700", "agentd-a", "token-two");
    assert!(f.acknowledged(&fewer, &other), "another agent: written");
    assert!(
        read(&path, &identity()).is_err(),
        "now written for the other"
    );
    // What a restart reads is what was written: nothing written again.
    let (mut again, got) = AdvertisementFile::open(path.clone(), other.clone());
    assert_eq!(got, Ok(Some(fewer.clone())));
    assert!(!again.acknowledged(&fewer, &other));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!dir.path().join("a.json.tmp").exists(), "no temp file left");
}

#[test]
fn the_token_is_not_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    let token = "a-very-secret-agent-token-value";
    let id = Identity::new("http://brain:7700", "agentd-a", token);
    write(&path, &before(), &id, None).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(token));
    assert_ne!(id.agent, identity().agent, "tokens told apart");
}

#[test]
fn an_acknowledgement_for_another_brain_forgets_what_was_remembered() {
    let (r, _dir) = restarted_with(&before(), Duration::from_secs(60));
    while signalled(&r) {}
    let other = Identity::new("http://other:7700", "agentd-a", "token-one");
    r.acknowledged(&before(), &other, &brain());
    assert!(r.remembered_report().is_none());
    assert!(signalled(&r), "the advertisement shrank");
    assert_eq!(live(&r), Advertisement::default());
}

#[test]
fn the_file_lives_beside_the_spool() {
    assert_eq!(
        file_beside(Path::new("/var/lib/z4j-agentd/buffer.sqlite")),
        Path::new("/var/lib/z4j-agentd/buffer.sqlite.advertisement.json")
    );
}

/// What a beat declared before the restart: a scheduler and three of its
/// actions.
fn beat_before() -> Advertisement {
    Advertisement {
        capabilities: BTreeMap::from([(
            "beat".into(),
            strings(&["stable_snapshot", "list", "trigger_now"]),
        )]),
        schedulers: strings(&["beat"]),
        ..Advertisement::default()
    }
}

#[test]
fn a_scheduler_declared_again_with_fewer_actions_never_becomes_an_engine() {
    let (r, _dir) = restarted_with(&beat_before(), Duration::from_secs(60));
    assert!(live(&r).engines.is_empty(), "{:?}", live(&r));
    r.connected(1, ClientInfo::default());
    let beat = Registration {
        schedulers: strings(&["beat"]),
        capabilities: BTreeMap::from([("beat".into(), strings(&["stable_snapshot", "list"]))]),
        ..Registration::default()
    };
    r.declared(1, beat, Arc::new(Sink));
    let now = live(&r);
    assert!(now.engines.is_empty(), "{now:?}");
    assert_eq!(now.schedulers, strings(&["beat"]));
    // The process that runs it says what it can do: nothing of it stays
    // remembered, so its leaving does not leave a key behind.
    assert!(r.remembered_report().is_none());
    r.disconnected(1);
    let now = live(&r);
    assert!(now.engines.is_empty(), "beat is no engine: {now:?}");
    assert!(now.capabilities.is_empty(), "{now:?}");
    assert!(now.schedulers.is_empty(), "{now:?}");
}

/// Runs `f` on another thread; whether it returned within 5 s (it is left
/// running otherwise, blocked on what the test holds).
fn returns_promptly(f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).is_ok()
}

#[test]
fn a_hello_does_not_wait_for_the_memory_when_nothing_is_remembered() {
    let r = Arc::new(ClientRegistry::new());
    r.connected(1, ClientInfo::default());
    let held = r.memory.lock().unwrap();
    let r2 = r.clone();
    let done = returns_promptly(move || {
        r2.declared(1, worker("celery", &["cancel_task"]), Arc::new(Sink));
    });
    drop(held);
    assert!(done, "declared() waited for the memory's lock");
    assert_eq!(live(&r).engines, strings(&["celery"]));
}

#[test]
fn the_file_is_written_without_holding_the_memory() {
    let (r, dir) = restarted_with(&before(), Duration::from_secs(60));
    let r = Arc::new(r);
    // A write that cannot finish until the test lets it: the temp file is
    // a FIFO, whose open blocks until someone reads it (a stalled disk).
    let tmp = dir.path().join("buffer.sqlite.advertisement.json.tmp");
    let made = std::process::Command::new("mkfifo")
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(made.success());
    let writer = {
        let r = r.clone();
        std::thread::spawn(move || {
            let fewer = Advertisement {
                engines: strings(&["rq"]),
                ..Advertisement::default()
            };
            r.acknowledged(&fewer, &identity(), &brain());
        })
    };
    // Give it time to reach the write.
    std::thread::sleep(Duration::from_millis(200));
    let r2 = r.clone();
    let free = returns_promptly(move || {
        let _ = r2.remembered_report();
        let _ = r2.only_remembered(None, "cancel_task");
    });
    // Unblock the writer whatever happened.
    let _ = std::fs::read(&tmp);
    writer.join().unwrap();
    assert!(free, "the memory's lock was held during the write");
}

#[test]
fn once_stopping_the_processes_the_stop_closes_stay_advertised() {
    let (r, dir) = restarted_with(&Advertisement::default(), Duration::from_secs(60));
    let path = dir.path().join("buffer.sqlite.advertisement.json");
    r.connected(1, ClientInfo::default());
    let mut beat = worker("rq", &["cancel_task"]);
    beat.schedulers = strings(&["beat"]);
    beat.capabilities.insert("beat".into(), strings(&["list"]));
    r.declared(1, beat, Arc::new(Sink));
    r.connected(2, ClientInfo::default());
    r.declared(2, worker("celery", &["cancel_task"]), Arc::new(Sink));
    let before_stop = live(&r);
    r.acknowledged(&before_stop, &identity(), &brain());
    r.stopping();
    assert!(r.is_stopping());
    r.disconnected(1);
    // A hello said during the stop still carries it, so what the brain
    // acknowledges then leaves the file as it was.
    assert_eq!(live(&r), before_stop);
    r.acknowledged(&live(&r), &identity(), &brain());
    assert_eq!(
        read(&path, &identity()).unwrap().map(|h| h.0),
        Some(before_stop)
    );
}
