//! Files the daemon is pointed at (`Z4J_TOKEN_FILE`,
//! `Z4J_HMAC_SECRET_FILE`, `Z4J_CA_FILE`, `Z4J_CONFIG`) and paths it is
//! given, against an operator who points them somewhere hostile: a FIFO,
//! `/dev/zero`, a directory, a 1 GiB file. At start the daemon exits 64
//! naming the setting; at SIGHUP it keeps serving on its current settings,
//! says what is wrong, and still stops at once on SIGTERM. The real binary.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::fake_brain::{Behavior, FakeBrain, SECRET, TOKEN};
use support::free_port;

use crate::support::binary::BIN;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        for d in ["home", "tmp", "files"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Env { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("files").join(name)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `z4j-agentd run` with only what the test sets; the log (JSON) goes
    /// to a file.
    fn cmd(&self, brain_url: &str) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path().join("home"))
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("Z4J_BRAIN_URL", brain_url)
            .env("Z4J_TOKEN", TOKEN)
            .env("Z4J_HMAC_SECRET", SECRET)
            .env("Z4J_SOCKET_PATH", self.socket())
            .env("Z4J_LOG_FORMAT", "json")
            .env("Z4J_SHUTDOWN_GRACE_SECONDS", "1")
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }
}

/// Runs `c` and returns its exit code and stderr; fails the test when it
/// has not exited within `secs` (the old daemon waited on a FIFO forever).
fn run_bounded(c: Command, secs: u64) -> (Option<i32>, String) {
    let (status, err) = support::run_to_exit("config-files-start", c, secs);
    (status.code(), err)
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Removes whatever is at `path` (file, link, FIFO or directory).
fn clear(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// The hostile things a path can be made into, and the words the error
/// names it with.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    Fifo,
    DevZero,
    Directory,
    Huge,
}

impl Hostile {
    const ALL: [Hostile; 4] = [
        Hostile::Fifo,
        Hostile::DevZero,
        Hostile::Directory,
        Hostile::Huge,
    ];

    fn make(self, path: &Path) {
        clear(path);
        match self {
            Hostile::Fifo => mkfifo(path),
            Hostile::DevZero => std::os::unix::fs::symlink("/dev/zero", path).unwrap(),
            Hostile::Directory => std::fs::create_dir(path).unwrap(),
            // Sparse: 1 GiB that takes no disk space.
            Hostile::Huge => std::fs::File::create(path)
                .unwrap()
                .set_len(1 << 30)
                .unwrap(),
        }
    }

    fn words(self) -> &'static str {
        match self {
            Hostile::Fifo => "is a FIFO (named pipe), not a regular file",
            Hostile::DevZero => "is a character device, not a regular file",
            Hostile::Directory => "is a directory, not a regular file",
            Hostile::Huge => "is larger than",
        }
    }
}

#[test]
fn hostile_files_at_start_exit_64_at_once_naming_the_setting() {
    let env = Env::new();
    let brain = format!("http://127.0.0.1:{}", free_port());
    for (var, drop_var, name) in [
        ("Z4J_TOKEN_FILE", Some("Z4J_TOKEN"), "token"),
        (
            "Z4J_HMAC_SECRET_FILE",
            Some("Z4J_HMAC_SECRET"),
            "hmac_secret",
        ),
        ("Z4J_CA_FILE", None, "ca.pem"),
        ("Z4J_CONFIG", None, "agentd.toml"),
    ] {
        for hostile in Hostile::ALL {
            let path = env.file(name);
            hostile.make(&path);
            let mut c = env.cmd(&brain);
            if let Some(v) = drop_var {
                c.env_remove(v);
            }
            c.env(var, &path);
            let started = Instant::now();
            let (code, err) = run_bounded(c, 10);
            assert_eq!(code, Some(64), "{var} {hostile:?}: {err}");
            assert!(
                err.contains(&format!("config error: {var}: {}", path.display())),
                "{var} {hostile:?}: {err}"
            );
            assert!(err.contains(hostile.words()), "{var} {hostile:?}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{var} {hostile:?} took {:?}",
                started.elapsed()
            );
            clear(&path);
        }
    }
    assert!(!env.socket().exists());
}

/// Pings the daemon; `Err` when no pong within 2 s.
fn ping(socket: &Path) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"{\"type\":\"ping\"}\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| format!("no pong within 2 s: {e}"))?;
    if reply.contains("pong") {
        Ok(())
    } else {
        Err(reply)
    }
}

/// The JSON log lines whose message contains `text`.
fn log_lines(env: &Env, text: &str) -> Vec<serde_json::Value> {
    env.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_at_sighup_keep_the_daemon_serving_on_its_current_settings() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let env = Env::new();
    let (first, last) = ("first-token-hostile-0123", "last-token-hostile-4567");
    support::keep_secret("config files: token before SIGHUP", first);
    support::keep_secret("config files: token after SIGHUP", last);
    let token_file = env.file("token");
    let secret_file = env.file("hmac_secret");
    std::fs::write(&token_file, first).unwrap();
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut c = env.cmd(&brain.url);
    c.env_remove("Z4J_TOKEN")
        .env_remove("Z4J_HMAC_SECRET")
        .env("Z4J_TOKEN_FILE", &token_file)
        .env("Z4J_HMAC_SECRET_FILE", &secret_file);
    let mut child = support::RunningDaemon::start_logging_to(
        "config-files-sighup",
        c,
        &env.log_path(),
        Duration::from_secs(10),
        || ping(&env.socket()).is_ok(),
    );
    let seen = brain.seen.clone();
    support::wait_for(10, "the first session", || {
        seen.auth_headers.lock().unwrap().len() == 1
    })
    .await;

    let mut errors = 0;
    for (var, path) in [
        ("Z4J_TOKEN_FILE", &token_file),
        ("Z4J_HMAC_SECRET_FILE", &secret_file),
    ] {
        for hostile in Hostile::ALL {
            hostile.make(path);
            child.signal("HUP");
            errors += 1;
            let want = format!("config error: {var}: {}", path.display());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let lines = log_lines(&env, "SIGHUP: the new configuration is invalid");
                if lines.len() == errors {
                    let line = &lines[errors - 1];
                    assert_eq!(line["level"], "ERROR", "{line}");
                    let error = line["error"].as_str().unwrap();
                    assert!(error.starts_with(&want), "{var} {hostile:?}: {line}");
                    assert!(error.contains(hostile.words()), "{var} {hostile:?}: {line}");
                    assert!(error.contains(&format!("point {var} at")), "{line}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no error logged 5 s after SIGHUP with {var} made {hostile:?}: {}",
                    env.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Local clients are served all along, and the session stays.
            ping(&env.socket()).unwrap_or_else(|e| panic!("{var} {hostile:?}: {e}\n{}", env.log()));
            assert_eq!(brain.seen.auth_headers.lock().unwrap().len(), 1);
        }
        // Back to a good file.
        clear(path);
        if var == "Z4J_TOKEN_FILE" {
            std::fs::write(path, first).unwrap();
        } else {
            std::fs::write(path, SECRET).unwrap();
        }
    }

    // The reload still works: a new token (written by Notepad, with a
    // byte order mark) is taken and used.
    std::fs::write(&token_file, format!("\u{feff}{last}\r\n")).unwrap();
    child.signal("HUP");
    support::wait_for(10, "a reconnect with the new token", || {
        seen.auth_headers.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        brain.seen.auth_headers.lock().unwrap()[1],
        format!("Bearer {last}")
    );

    // A FIFO left in place does not hold up SIGTERM.
    Hostile::Fifo.make(&token_file);
    child.signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no exit 10 s after SIGTERM: {}",
            env.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}: {}", env.log());
    child.output();
}

#[test]
fn a_relative_socket_path_exits_64_asking_for_an_absolute_one() {
    let env = Env::new();
    let mut c = env.cmd(&format!("http://127.0.0.1:{}", free_port()));
    // Run from the temp dir, where a relative socket would have been made.
    c.current_dir(env.dir.path())
        .env("Z4J_SOCKET_PATH", "agent.sock");
    let (code, err) = run_bounded(c, 10);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("config error: Z4J_SOCKET_PATH: agent.sock is a relative path"),
        "{err}"
    );
    assert!(err.contains("use an absolute path"), "{err}");
    assert!(!env.socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brain_at_localhost_dot_is_loopback_and_reached_over_ws() {
    let brain = FakeBrain::start(Behavior::default()).await;
    let port = brain.url.rsplit(':').next().unwrap().trim_end_matches('/');
    for url in [
        format!("http://localhost.:{port}"),
        format!("http://LOCALHOST.:{port}"),
    ] {
        let before = brain.seen.auth_headers.lock().unwrap().len();
        let d = support::TestDaemon::start(support::options(&url)).await;
        let seen = brain.seen.clone();
        support::wait_for(10, &format!("a session through {url}"), || {
            seen.auth_headers.lock().unwrap().len() > before
        })
        .await;
        d.stop().await.unwrap();
    }
}

/// The real binary takes a setting from the flag, else the variable, else
/// the config file; an empty flag counts as not given, like an empty
/// variable. Each source gives a different bad value, so the error says
/// which one was taken.
#[test]
fn the_binary_takes_the_flag_then_the_variable_then_the_file() {
    let env = Env::new();
    let file = env.file("agentd.toml");
    std::fs::write(&file, "log_format = \"from-file\"\n").unwrap();
    let brain = format!("http://127.0.0.1:{}", free_port());
    let cases: [(Option<&str>, Option<&str>, &str); 4] = [
        (Some("from-flag"), Some("from-env"), "from-flag"),
        (None, Some("from-env"), "from-env"),
        (Some(""), Some("from-env"), "from-env"),
        (None, None, "from-file"),
    ];
    for (flag, var, taken) in cases {
        let mut c = env.cmd(&brain);
        c.env("Z4J_CONFIG", &file).env_remove("Z4J_LOG_FORMAT");
        if let Some(v) = var {
            c.env("Z4J_LOG_FORMAT", v);
        }
        if let Some(f) = flag {
            c.args(["--log-format", f]);
        }
        let (code, err) = run_bounded(c, 10);
        assert_eq!(code, Some(64), "{flag:?} {var:?}: {err}");
        let want = format!("config error: Z4J_LOG_FORMAT: expected text or json, got \"{taken}\"");
        assert!(err.contains(&want), "{flag:?} {var:?}: {err}");
    }
}
