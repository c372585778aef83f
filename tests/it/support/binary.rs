//! The real `z4j-agentd` binary as a child process, for the tests that run
//! it as an operator would (signals, exit codes, descriptor limits).
//!
//! [`RunningDaemon`] owns the child from spawn to reap: it is returned only
//! once the daemon's socket accepts, and a test that fails before stopping
//! it does not leave a daemon behind: on drop the child is killed and
//! reaped. Whatever the daemon wrote to stderr is kept for the secrets
//! check ([`super::keep_log`]) however the test ends.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_z4j-agentd");

/// How long a daemon may take to accept on its socket (a bound against a
/// hang, not a start-up target).
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Where the daemon's stderr goes.
enum Stderr {
    /// A pipe, read once the daemon has exited.
    Piped,
    /// A file the test reads while the daemon runs (JSON log lines).
    File(PathBuf),
}

/// A running `z4j-agentd`, killed and reaped on drop.
pub struct RunningDaemon {
    child: Child,
    /// Names the kept log (`keep_log`).
    name: String,
    stderr: Stderr,
    /// Set once the child has been reaped and its output kept.
    done: bool,
}

impl RunningDaemon {
    /// Spawns `cmd` (stdin and stdout null, stderr piped) and waits until
    /// `socket` accepts; panics with the daemon's stderr if it exits first.
    pub fn start(name: &str, cmd: Command, socket: &Path) -> RunningDaemon {
        Self::spawn(name, cmd, Stderr::Piped, READY_WITHIN, || {
            UnixStream::connect(socket).is_ok()
        })
    }

    /// Like [`RunningDaemon::start`], with `ready` polled every 20 ms for up
    /// to `within` to say when the daemon is up.
    pub fn start_until(
        name: &str,
        cmd: Command,
        within: Duration,
        ready: impl FnMut() -> bool,
    ) -> RunningDaemon {
        Self::spawn(name, cmd, Stderr::Piped, within, ready)
    }

    /// Like [`RunningDaemon::start`], with stderr written to `log` (read it
    /// with [`RunningDaemon::log`]) and `ready` polled every 20 ms for up to
    /// `within` to say when the daemon is listening.
    pub fn start_logging_to(
        name: &str,
        cmd: Command,
        log: &Path,
        within: Duration,
        ready: impl FnMut() -> bool,
    ) -> RunningDaemon {
        Self::spawn(name, cmd, Stderr::File(log.to_path_buf()), within, ready)
    }

    fn spawn(
        name: &str,
        mut cmd: Command,
        stderr: Stderr,
        within: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> RunningDaemon {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        match &stderr {
            Stderr::Piped => cmd.stderr(Stdio::piped()),
            Stderr::File(path) => cmd.stderr(std::fs::File::create(path).unwrap()),
        };
        let child = cmd.spawn().unwrap();
        let mut d = RunningDaemon {
            child,
            name: name.to_string(),
            stderr,
            done: false,
        };
        let deadline = Instant::now() + within;
        while !ready() {
            if let Some(status) = d.child.try_wait().unwrap() {
                let err = d.finish();
                panic!("the daemon exited early ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never listened within {within:?}: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The daemon's pid (a `sh -c '... exec z4j-agentd'` keeps the shell's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`TERM`, `HUP`, `KILL`...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// The exit status once the daemon has exited, `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `secs` for the daemon to exit; fails the test if it has
    /// not (the guard then kills it).
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {secs}s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig`, waits up to `secs` for the exit, keeps the output:
    /// the exit status and what the daemon wrote to stderr.
    pub fn stop_with(mut self, sig: &str, secs: u64) -> (ExitStatus, String) {
        self.signal(sig);
        let status = self.wait_exit(secs);
        (status, self.finish())
    }

    /// SIGTERM, then a clean exit (status 0) within 20 s; what the daemon
    /// wrote to stderr.
    pub fn stop(self) -> String {
        self.stop_expecting_success("TERM", 20)
    }

    /// `sig`, then a clean exit (status 0) within `secs`; what the daemon
    /// wrote to stderr.
    pub fn stop_expecting_success(self, sig: &str, secs: u64) -> String {
        let (status, err) = self.stop_with(sig, secs);
        assert!(status.success(), "exit status {status}: {err}");
        err
    }

    /// SIGKILL and reap, as a crash would end it; what it wrote to stderr.
    pub fn kill(self) -> String {
        self.stop_with("KILL", 10).1
    }

    /// What the daemon wrote to stderr, once it has exited (after
    /// [`RunningDaemon::wait_exit`]); one still running is killed first.
    pub fn output(mut self) -> String {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.finish()
    }

    /// What the daemon wrote to its log file so far (empty with a piped
    /// stderr: that is read once it has exited).
    pub fn log(&self) -> String {
        match &self.stderr {
            Stderr::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
            Stderr::Piped => String::new(),
        }
    }

    /// Keeps the exited daemon's output (see [`super::keep_log`]) and
    /// returns it. Call only once the child has exited.
    fn finish(&mut self) -> String {
        self.done = true;
        match &self.stderr {
            Stderr::Piped => super::keep_stderr(&self.name, &mut self.child),
            Stderr::File(_) => {
                let log = self.log();
                super::keep_log(&self.name, &log);
                log
            }
        }
    }
}

/// Runs a daemon that must exit on its own (a start it refuses): its exit
/// status and what it wrote to stderr (kept, like a [`RunningDaemon`]'s).
/// One still running after `secs` is killed and the test fails.
pub fn run_to_exit(name: &str, cmd: Command, secs: u64) -> (ExitStatus, String) {
    let mut d = RunningDaemon::start_until(name, cmd, Duration::ZERO, || true);
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = d.try_wait() {
            return (status, d.output());
        }
        if Instant::now() > deadline {
            let err = d.output();
            panic!("the daemon had not exited {secs} s after start (it started instead of refusing): {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Reaped, so a piped stderr reads to its end without waiting.
        self.finish();
    }
}
