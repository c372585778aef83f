//! Shared test harness: a whole daemon in-process on a temp dir, against a
//! brain URL of the test's choosing.

#![allow(dead_code)]

pub mod fake_brain;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use z4j_agentd::client::{Client, Event};
use z4j_agentd::config::{HostEnv, Options};
use z4j_agentd::daemon::{self, DaemonError};
use z4j_agentd::status::Status;

/// A daemon running in this process.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub status: Arc<Status>,
    pub metrics: Option<std::net::SocketAddr>,
    pub host: HostEnv,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), DaemonError>>,
}

/// Options pointing at `brain_url` with the fake's credentials.
pub fn options(brain_url: &str) -> Options {
    Options {
        brain_url: Some(brain_url.to_string()),
        token: Some(fake_brain::TOKEN.to_string()),
        hmac_secret: Some(fake_brain::SECRET.to_string()),
        worker_id: Some("agentd-test".to_string()),
        ..Options::default()
    }
}

impl TestDaemon {
    /// Starts a daemon with `options` in a fresh temp dir.
    pub async fn start(opts: Options) -> TestDaemon {
        Self::start_prepared(opts, |_| {}).await
    }

    /// Like [`TestDaemon::start`], with `prepare` called on the daemon's
    /// home directory first (to mount something on its `.z4j`, say).
    pub async fn start_prepared(mut opts: Options, prepare: impl FnOnce(&Path)) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        prepare(&home);
        let socket = dir.path().join("agent.sock");
        opts.socket_path = Some(socket.clone());
        let host = HostEnv {
            home: Some(home),
            tmpdir: dir.path().join("tmp"),
            uid: z4j_agentd::config::current_uid(),
            hostname: "testhost".into(),
            ..HostEnv::default()
        };
        std::fs::create_dir_all(&host.tmpdir).unwrap();
        let config = opts.resolve(host.clone()).expect("valid test config");
        let (_tx, rx) = watch::channel(config.uplink.clone());
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let _keep_settings_sender = _tx;
            daemon::run(config, rx, token, Some(ready_tx)).await
        });
        let ready = match tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("daemon ready in time")
        {
            Ok(ready) => ready,
            Err(_) => panic!("the daemon did not start: {:?}", task.await),
        };
        TestDaemon {
            dir,
            socket: ready.socket_path,
            spool: ready.spool_path,
            status: ready.status,
            metrics: ready.metrics_addr,
            host,
            shutdown,
            task,
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    pub async fn stop(self) -> Result<(), DaemonError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stops in time")
            .unwrap()
    }
}

/// A task lifecycle event for tests.
pub fn event(task: &str, kind: &str) -> Event {
    Event {
        engine: "celery".into(),
        kind: kind.into(),
        task_id: task.into(),
        occurred_at: None,
        data: serde_json::json!({"task_name": "app.tasks.add", "queue": "default"}),
    }
}

/// Polls `cond` every 20 ms until it holds or `secs` pass.
pub async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
