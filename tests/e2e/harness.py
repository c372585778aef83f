"""Helpers for the end-to-end tests: the daemon process, its local socket,
the example clients, and bounded polling of the brain (REST and its SQLite).

Nothing here sleeps blindly: every wait polls a condition with a deadline
and fails with what it saw last.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLES = REPO / "examples"
SEND_JSONL = EXAMPLES / "send_jsonl.py"
SEND_MSGPACK = EXAMPLES / "send_msgpack.py"
CELERY_COMMANDS = EXAMPLES / "celery_commands.py"

TERMINAL = {"success", "failure"}


# ---------------------------------------------------------------- polling


def wait_for(check: Callable[[], Tuple[bool, object]], timeout: float, what: str, interval: float = 0.25):
    """Call `check()` -> (done, detail) until done; return detail.

    Raises AssertionError after `timeout` seconds with the last detail.
    """
    deadline = time.monotonic() + timeout
    detail: object = None
    while True:
        try:
            done, detail = check()
        except Exception as exc:  # a transient failure is a detail, not a verdict
            done, detail = False, f"{type(exc).__name__}: {exc}"
        if done:
            return detail
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {detail}")
        time.sleep(interval)


# ---------------------------------------------------------------- local socket


@contextlib.contextmanager
def running_brain(b, label: str):
    """A brain other than the session's, started for a module: stopped when the module
    is done (or the interpreter exits)."""
    atexit.register(b.stop)
    took = b.start()
    print(f"[e2e] {label} on {b.url} healthy after {took:.1f}s", file=sys.stderr)
    try:
        yield b
    finally:
        b.stop()


class SockClient:
    """JSON-lines client for the daemon's socket (ping, stats)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def request(self, msg: dict) -> dict:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def read(self) -> dict:
        """The next reply, without sending anything (e.g. the ack that follows an error)."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sock_request(path: Path, msg: dict, timeout: float = 5.0) -> dict:
    with SockClient(path, timeout) as c:
        return c.request(msg)


# ---------------------------------------------------------------- daemon


class Daemon:
    """One `z4j-agentd run` process (restartable on the same spool and socket)."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        socket_path: Path,
        brain_url: str,
        agent: dict,
        extra_env: Optional[dict] = None,
    ) -> None:
        self.binary = Path(binary)
        self.workdir = Path(workdir)
        self.socket_path = Path(socket_path)
        self.brain_url = brain_url
        self.agent = agent
        self.extra_env = dict(extra_env or {})
        self.home = self.workdir / "home"
        self.spool_dir = self.home / ".z4j"
        self.buffer_path = self.spool_dir / "agentd.sqlite"
        self.proc: Optional[subprocess.Popen] = None
        self.logs: List[Path] = []
        self.exit_codes: List[int] = []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        os.chmod(self.spool_dir, 0o700)

    def env(self) -> Dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "RUST_BACKTRACE": "1",
            "Z4J_BRAIN_URL": self.brain_url,
            "Z4J_TOKEN": self.agent["token"],
            "Z4J_HMAC_SECRET": self.agent["hmac_secret"],
            "Z4J_PROJECT_ID": self.agent["project_slug"],
            "Z4J_AGENT_NAME": self.agent["name"],
            "Z4J_SOCKET_PATH": str(self.socket_path),
            "Z4J_BUFFER_PATH": str(self.buffer_path),
            "Z4J_LOG_FORMAT": "json",
            "Z4J_LOG_LEVEL": "info",
        }
        env.update(self.extra_env)
        return env

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready_timeout: float = 30.0) -> "Daemon":
        assert not self.alive(), "daemon already running"
        log_path = self.workdir / f"daemon-{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [str(self.binary), "run"],
                env=self.env(),
                cwd=str(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.workdir / "daemon.pid").write_text(f"{self.proc.pid} {self.binary}\n")
        try:
            wait_for(self._ready, ready_timeout, f"daemon pid {self.proc.pid} to answer ping on {self.socket_path}",
                     interval=0.1)
        except AssertionError as exc:
            tail = self.log_tail()
            self.kill()
            raise AssertionError(f"{exc}\n--- daemon log tail ({log_path}) ---\n{tail}") from None
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode} before it was ready")
        try:
            reply = sock_request(self.socket_path, {"type": "ping"}, timeout=2.0)
        except OSError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return reply.get("type") == "pong", reply

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc = self.proc.returncode
        self.exit_codes.append(rc)
        self.proc = None
        return rc

    def kill(self) -> Optional[int]:
        """SIGKILL (a crash): nothing gets a chance to flush."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        rc = self.proc.returncode
        self.exit_codes.append(rc)
        self.proc = None
        return rc

    def stats(self) -> dict:
        reply = sock_request(self.socket_path, {"type": "stats"})
        assert reply.get("type") == "stats", f"stats request answered with {reply}"
        return reply

    def wait_stats(self, pred: Callable[[dict], bool], timeout: float, what: str) -> dict:
        def check():
            s = self.stats()
            return pred(s), s
        return wait_for(check, timeout, what, interval=0.25)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_tail(self, n: int = 40) -> str:
        if not self.logs or not self.logs[-1].exists():
            return "(no log)"
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-n:])


def reap_stale_daemon(pidfile: Path) -> None:
    """Kill a daemon an earlier (killed) run left behind, if that pid is still it."""
    try:
        pid_s, binary = pidfile.read_text().split(maxsplit=1)
        pid = int(pid_s)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    home = f"HOME={pidfile.parent / 'home'}".encode()
    if argv[:2] == [binary.strip().encode(), b"run"] and home in env:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- clients


class Client:
    """One example sender process."""

    def __init__(self, script: Path, socket_path: Path, args: Iterable[str], workdir: Path, name: str) -> None:
        self.name = name
        # send_jsonl.py is stdlib-only: run it with -S (no site-packages) to keep it honest.
        flags = ["-S"] if script == SEND_JSONL else []
        self.argv = [sys.executable, *flags, str(script), "--socket", str(socket_path), *map(str, args)]
        self.stderr_path = Path(workdir) / f"client-{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )

    def wait(self, timeout: float = 120.0) -> dict:
        """Wait for exit; assert status 0; return the JSON summary."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"client {self.name} still running after {timeout:.0f}s: {self.describe(out)}")
        finally:
            self._stderr.close()
        summary = self.summary(out)
        assert self.proc.returncode == 0, f"client {self.name} exited {self.proc.returncode}: {self.describe(out)}"
        assert summary is not None, f"client {self.name} printed no summary: {self.describe(out)}"
        return summary

    @staticmethod
    def summary(out: bytes) -> Optional[dict]:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return None

    def describe(self, out: bytes) -> str:
        err = self.stderr_path.read_text(errors="replace")[-2000:] if self.stderr_path.exists() else ""
        return f"argv={self.argv[2:]} stdout={out.decode(errors='replace')[-1000:]!r} stderr={err!r}"


def run_clients(clients: List[Client], timeout: float = 120.0) -> List[dict]:
    return [c.wait(timeout) for c in clients]


class Service:
    """A long-running client process (e.g. examples/celery_commands.py) whose
    stdout lines are read as they come, with a deadline."""

    def __init__(self, argv: List[str], workdir: Path, name: str, cwd: Optional[Path] = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.stderr_path = Path(workdir) / f"service-{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            cwd=str(cwd) if cwd else None,
            # faulthandler: a process that hangs is made to print its stack (stop()).
            env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        )
        self._lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))

    def next_json(self, timeout: float, what: str) -> dict:
        """The next stdout line, parsed; fails after `timeout` with the process's stderr."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no stdout line within {timeout:.0f}s ({what}); "
                                 f"exit={self.proc.poll()} stderr={self.stderr_tail()!r}") from None
        return json.loads(line)

    def pending_lines(self) -> List[str]:
        """Stdout lines printed and not read yet."""
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def stderr_tail(self, n: int = 2000) -> str:
        return self.stderr_path.read_text(errors="replace")[-n:] if self.stderr_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM; after `timeout` SIGABRT (its Python stack goes to stderr), then SIGKILL.
        Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._stderr.close()
        return self.proc.returncode


# ---------------------------------------------------------------- background services

# Every Background process carries this variable (the run directory) and leaves a
# `<name>.bg-pid` file, so a later session can find and kill what a killed session
# left behind, pool children included (reap_marked).
RUN_MARKER = "Z4J_E2E_RUN"


def proc_start_time(pid: int) -> str:
    """Kernel start time of a process (field 22 of /proc/<pid>/stat), "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def proc_ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def reap_marked(run_dir: Path) -> List[int]:
    """Kill what a Background of a dead session left: the process group of every
    `*.bg-pid` file whose process is still that one (same start time), then every
    process whose environment carries RUN_MARKER=<run_dir> (children whose leader
    is gone; redis-server rewrites its environment, hence the pid files).
    Returns the pids killed."""
    killed = []
    for pidfile in run_dir.rglob("*.bg-pid"):
        try:
            pid_s, started = pidfile.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            continue
        if started and proc_start_time(pid) == started:
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    marker = f"{RUN_MARKER}={run_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


class Background:
    """A long-running server process (redis-server, a Celery worker, gunicorn) in
    its own process group, stdout and stderr to `<workdir>/<name>.log`.

    stop(): SIGTERM to the process, then SIGKILL to its whole group (pool
    children included) after `timeout`; whatever of the group is left after
    the process exited gets SIGKILL too.
    """

    def __init__(self, argv: List[str], workdir: Path, name: str, env: Dict[str, str],
                 run_dir: Path, cwd: Optional[Path] = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        env = {**env, RUN_MARKER: str(run_dir), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, env=env, cwd=str(cwd or workdir), stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        # For a later session's reap_marked(), should this one be killed before its teardown.
        (workdir / f"{name}.bg-pid").write_text(f"{self.pid} {proc_start_time(self.pid)}\n")

    def alive(self) -> bool:
        return not self._exited()

    def group_pids(self) -> List[int]:
        """Live processes of its process group (the process and its children)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                with open(entry / "stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid and fields[0] != "Z":
                out.append(int(entry.name))
        return out

    def children(self) -> List[int]:
        return [p for p in self.group_pids() if proc_ppid(p) == self.pid]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def check_alive(self) -> None:
        if not self.alive():
            rc = self.stop(timeout=0)
            raise AssertionError(f"{self.name} exited with {rc}; log tail ({self.log_path}):\n{self.log_tail()}")

    def _exited(self) -> bool:
        """Has the process exited? Does not reap it: while it is a zombie its pid, and so its
        process group id, cannot be reused, which keeps the killpg below safe."""
        if self.proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """`sig` (SIGTERM) to the process; after `timeout` s, or once it exited, SIGKILL to
        what is left of its group. Returns the process's exit status. Idempotent."""
        if self.proc.returncode is None:
            if not self._exited():
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + timeout
                while not self._exited() and time.monotonic() < deadline:
                    time.sleep(0.05)
            try:
                os.killpg(self.pid, signal.SIGKILL)  # leftovers (or everything, after the timeout)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(10)
        return self.proc.returncode


def resp(port: int, *commands: List[str], timeout: float = 5.0) -> List[bytes]:
    """Redis commands over RESP on one connection, stdlib only; one raw reply line per command
    (enough for status and integer replies)."""
    payload = b""
    for args in commands:
        payload += f"*{len(args)}\r\n".encode()
        for a in args:
            payload += f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while buf.count(b"\r\n") < len(commands):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\r\n")[:len(commands)]


class RedisServer:
    """redis-server on 127.0.0.1:<port>, no persistence, its files in `workdir`."""

    def __init__(self, binary: str, workdir: Path, port: int, run_dir: Path) -> None:
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Background(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir), "--logfile", ""],
            self.workdir, "redis-server", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            run_dir=run_dir)
        self._next_db = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        def check():
            self.proc.check_alive()
            reply = resp(self.port, ["PING"], timeout=1.0)
            return reply == [b"+PONG"], reply

        wait_for(check, timeout, f"redis-server on port {self.port} to answer PING", interval=0.1)

    def fresh_db(self) -> int:
        """A database index not used earlier in the session (0..15, then round again), emptied."""
        db = self._next_db % 16
        self._next_db += 1
        replies = resp(self.port, ["SELECT", str(db)], ["FLUSHDB"])
        assert replies == [b"+OK", b"+OK"], f"redis SELECT/FLUSHDB answered {replies}"
        return db

    def stop(self) -> Optional[int]:
        return self.proc.stop(timeout=10)


def amqp_handshake(port: int, timeout: float = 2.0) -> bytes:
    """The first bytes an AMQP 0-9-1 broker on 127.0.0.1:`port` answers to the protocol
    header (a Connection.Start method frame begins with 01 00 00), stdlib only."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        buf = b""
        while len(buf) < 8:
            chunk = s.recv(64)
            if not chunk:
                break
            buf += chunk
    return buf


class RabbitMQServer:
    """A throwaway RabbitMQ node: AMQP on 127.0.0.1:<port>, its own epmd on another free
    port, its own node name, cookie (HOME), config, database and logs in `workdir`; the
    host's configuration (/etc/rabbitmq) and any node the distribution started are not
    used. `guest`/`guest` from 127.0.0.1; no plugins.

    `server` is the `rabbitmq-server` found on PATH (or /usr/sbin); Debian's wraps the
    real script with `su rabbitmq`, so the script in /usr/lib/rabbitmq/bin is run
    directly when it is there."""

    def __init__(self, server: str, workdir: Path, port: int, epmd_port: int, dist_port: int,
                 run_dir: Path) -> None:
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        real = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        server = str(real) if real.is_file() else server
        epmd = shutil.which("epmd") or "epmd"
        path = os.environ.get("PATH", "/usr/bin:/bin")
        path = path if "/usr/sbin" in path.split(":") else f"{path}:/usr/sbin"
        base_env = {"PATH": path, "LANG": "C.UTF-8", "HOME": str(self.workdir)}
        self.epmd = Background([epmd, "-address", "127.0.0.1", "-port", str(epmd_port)], self.workdir,
                               "epmd", env=base_env, run_dir=run_dir)
        # The node must find our epmd listening, or the Erlang VM starts one of
        # its own (outside our process group) and ours dies on the port.
        def epmd_listening():
            self.epmd.check_alive()
            try:
                socket.create_connection(("127.0.0.1", epmd_port), timeout=0.5).close()
                return True, None
            except OSError as exc:
                return False, exc

        wait_for(epmd_listening, 20.0, f"epmd listening on 127.0.0.1:{epmd_port}", interval=0.05)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n")
        w = str(self.workdir)
        self.proc = Background([server], self.workdir, "rabbitmq-server", env={
            **base_env,
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODENAME": f"rabbit-e2e-{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONF_ENV_FILE": f"{w}/rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": f"{w}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{w}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{w}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{w}/mnesia",
            "RABBITMQ_LOG_BASE": f"{w}/log",
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": f"{w}/rabbitmq.pid",
        }, run_dir=run_dir)

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{'' if vhost == '/' else vhost}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        def check():
            self.epmd.check_alive()
            self.proc.check_alive()
            reply = amqp_handshake(self.port)
            return reply[:3] == b"\x01\x00\x00", reply

        wait_for(check, timeout, f"rabbitmq-server on port {self.port} to answer the AMQP header",
                 interval=0.25)

    def stop(self) -> Optional[int]:
        # The script starts the Erlang VM as its child: stop the whole group, then epmd.
        if self.proc.proc.returncode is None:  # not reaped: its group id is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        rc = self.proc.stop(timeout=15)
        self.epmd.stop(timeout=5)
        return rc


def postgres_bindir() -> Optional[Path]:
    """The directory of Debian's PostgreSQL server programs (initdb, postgres, psql,
    pg_isready): /usr/lib/postgresql/<newest version>/bin, or `pg_config --bindir`."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parts[-3].split(".")])
    if found:
        return found[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "postgres").exists():
            return Path(out)
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster: initdb into a data directory of its own, the
    server on 127.0.0.1:<port> (password logins) and a Unix socket (the cluster
    owner's logins, for setting up); no fsync (nothing here outlives the session).

    initdb and postgres refuse to run as root: as root they run as the `postgres`
    user (setpriv), which must then own the data and socket directory. Those live in
    a short temporary directory (`z4je2e-pg-*`, named in `<workdir>/tmp_dir` for a
    later session to remove should this one be killed): a socket path is limited to
    107 bytes, and the `postgres` user may not be able to reach a checkout under
    root's home. The server's log is `<workdir>/postgres.log`."""

    def __init__(self, bindir: Path, workdir: Path, port: int, run_dir: Path) -> None:
        self.bindir = Path(bindir)
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="z4je2e-pg-"))
        (self.workdir / "tmp_dir").write_text(f"{self.tmp}\n")
        self.data = self.tmp / "data"
        self.as_owner: List[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise AssertionError("running as root, and there is no `postgres` user to run PostgreSQL "
                                     "as (Debian's postgresql package creates it)") from None
            os.chown(self.tmp, owner.pw_uid, owner.pw_gid)
            self.as_owner = [shutil.which("setpriv") or "setpriv", f"--reuid={owner.pw_uid}",
                             f"--regid={owner.pw_gid}", "--init-groups"]
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(self.tmp),
                    RUN_MARKER: str(run_dir)}
        t0 = time.monotonic()
        with open(self.workdir / "initdb.log", "wb") as logf:
            rc = subprocess.run(
                [*self.as_owner, str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
                env=self.env, cwd=str(self.tmp), stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (self.workdir / "initdb.log").read_text(errors="replace")[-2000:]
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise AssertionError(f"initdb exited {rc}:\n{tail}")
        self.initdb_seconds = time.monotonic() - t0
        self.proc = Background(
            [*self.as_owner, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.tmp}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            self.workdir, "postgres", env=self.env, run_dir=run_dir, cwd=self.tmp)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def check():
            self.proc.check_alive()
            r = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True, text=True, env=self.env)
            return r.returncode == 0, r.stdout.strip()

        wait_for(check, timeout, f"PostgreSQL on 127.0.0.1:{self.port} to accept connections", interval=0.1)

    def psql(self, sql: str) -> str:
        """Run `sql` as the cluster owner over the Unix socket (on stdin, not argv); stdout."""
        r = subprocess.run(
            [*self.as_owner, str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.tmp), "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-f", "-"],
            input=sql, capture_output=True, text=True, env=self.env, cwd=str(self.tmp), timeout=30)
        assert r.returncode == 0, f"psql exited {r.returncode}: {r.stderr.strip()}"
        return r.stdout

    def create_database(self, name: str) -> str:
        """A role `name` with a fresh password and a database `name` it owns; returns the
        SQLAlchemy asyncpg URL (password included) for 127.0.0.1."""
        import secrets as _secrets

        assert name.isidentifier() and name.islower(), name
        password = _secrets.token_hex(16)
        self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}';\nCREATE DATABASE {name} OWNER {name};\n")
        return f"postgresql+asyncpg://{name}:{password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> Optional[int]:
        """Fast shutdown (SIGINT: ends sessions, no waiting on clients), then the files go."""
        rc = self.proc.stop(timeout=15, sig=signal.SIGINT)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return rc


# ---------------------------------------------------------------- brain faults


def _group_exited(proc: subprocess.Popen) -> bool:
    """Has the leader of a process group we started exited? Does not reap it, so its pid
    (and the group id) cannot be reused while we still signal the group."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def signal_brain(brain, sig: int) -> bool:
    """`sig` to the running brain's process group (SIGSTOP freezes it, SIGCONT resumes it).
    False when no brain of this session is running."""
    proc = brain.proc
    if proc is None or _group_exited(proc):
        return False
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


class BrainThrottle:
    """Slows the running brain down: a thread freezes its process group (SIGSTOP) and
    resumes it (SIGCONT) in a duty cycle, letting it run `run_s` out of every `period_s`.
    Short periods keep the brain answering WebSocket pings within seconds while it
    gets through its work at a fraction of its speed. `stop()` (or leaving the `with`)
    always leaves the brain running; a brain that exits meanwhile ends the cycle.

    `run_fraction()` is the share of wall time the brain was actually let run."""

    def __init__(self, brain, run_s: float, period_s: float) -> None:
        assert 0 < run_s < period_s, (run_s, period_s)
        self.brain = brain
        self.run_s = run_s
        self.period_s = period_s
        self.cycles = 0
        self.ran = 0.0
        self.started = 0.0
        self.ended: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, daemon=True, name="brain-throttle")

    def start(self) -> "BrainThrottle":
        assert self.brain.proc is not None and not _group_exited(self.brain.proc), "brain not running"
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _cycle(self) -> None:
        try:
            while not self._stop.is_set():
                if not signal_brain(self.brain, signal.SIGSTOP):
                    return
                self._stop.wait(self.period_s - self.run_s)
                resumed = time.monotonic()
                if not signal_brain(self.brain, signal.SIGCONT):
                    return
                self.cycles += 1
                self._stop.wait(self.run_s)
                self.ran += time.monotonic() - resumed
        finally:
            signal_brain(self.brain, signal.SIGCONT)

    def stop(self) -> None:
        """Ends the cycle and resumes the brain. Idempotent; fine before start() too."""
        self._stop.set()
        if self.started:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the brain throttle did not stop"
            if self.ended is None:
                self.ended = time.monotonic()
        signal_brain(self.brain, signal.SIGCONT)

    def run_fraction(self) -> float:
        wall = (self.ended or time.monotonic()) - self.started
        return self.ran / wall if wall > 0 else 0.0

    def __enter__(self) -> "BrainThrottle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- brain queries


def hexid(agent_id: str) -> str:
    """Brain SQLite stores UUIDs as 32 hex chars."""
    return uuid.UUID(agent_id).hex


def brain_db(brain, sql: str, args: tuple = ()) -> list:
    """Read-only query against the running brain's SQLite file."""
    con = sqlite3.connect(f"file:{brain.db_path}?mode=ro", uri=True, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(sql, args).fetchall()]
    finally:
        con.close()


def task_events(brain, slug: str, engine: str, task_id: str) -> list:
    status, body = brain.api("GET", f"/api/v1/projects/{slug}/events",
                             params={"engine": engine, "task_id": task_id, "limit": 100})
    assert status == 200, f"GET events for {task_id}: HTTP {status} {body}"
    return body["items"]


def get_task(brain, slug: str, engine: str, task_id: str) -> Optional[dict]:
    status, body = brain.api("GET", f"/api/v1/projects/{slug}/tasks/{engine}/{task_id}")
    if status == 404:
        return None
    assert status == 200, f"GET task {task_id}: HTTP {status} {body}"
    return body


def wait_tasks_complete(brain, slug: str, engine: str, task_ids: List[str], timeout: float) -> Dict[str, list]:
    """Poll REST until every task has its 3 lifecycle events; return events by task."""
    pending = list(task_ids)
    seen: Dict[str, list] = {}

    def check():
        for tid in list(pending):
            evs = task_events(brain, slug, engine, tid)
            if len(evs) >= 3:
                seen[tid] = evs
                pending.remove(tid)
        return not pending, f"{len(pending)}/{len(task_ids)} tasks incomplete, e.g. {pending[:5]}"

    wait_for(check, timeout, f"{len(task_ids)} tasks to reach the brain with 3 events each", interval=0.5)
    return seen


def verify_tasks(brain, slug: str, engine: str, summaries: List[dict], agent_id: str, worker: str) -> int:
    """Check every task of every client summary in the brain, return how many.

    Collects every problem before failing so one run shows all of them.
    """
    problems: List[str] = []
    n = 0
    for s in summaries:
        failed = set(s["failed_tasks"])
        for tid in s["tasks"]:
            n += 1
            want_state = "failure" if tid in failed else "success"
            last_kind = "task.failed" if tid in failed else "task.succeeded"
            t = get_task(brain, slug, engine, tid)
            if t is None:
                problems.append(f"{tid}: task missing")
                continue
            p = []
            if t["state"] != want_state:
                p.append(f"state {t['state']!r} != {want_state!r}")
            if t["name"] != "app.tasks.add":
                p.append(f"name {t['name']!r}")
            if t["queue"] != "default":
                p.append(f"queue {t['queue']!r}")
            args = t.get("args")
            if args != [1.5, 2] or not isinstance(args[0], float) or not isinstance(args[1], int):
                p.append(f"args {json.dumps(args)} != [1.5, 2]")
            kwargs = t.get("kwargs")
            if kwargs != {"note": "héllo wörld ✓", "ratio": 0.1}:
                p.append(f"kwargs {json.dumps(kwargs, ensure_ascii=False)}")
            if t.get("worker_name") != worker:
                p.append(f"worker_name {t.get('worker_name')!r} != {worker!r}")
            if not isinstance(t.get("runtime_ms"), int):
                p.append(f"runtime_ms {t.get('runtime_ms')!r}")
            if want_state == "success":
                if t.get("result") != {"sum": 3.5}:
                    p.append(f"result {t.get('result')!r}")
                if t.get("exception"):
                    p.append(f"unexpected exception {t.get('exception')!r}")
            else:
                if "ValueError" not in (t.get("exception") or ""):
                    p.append(f"exception {t.get('exception')!r}")
                if "ValueError:" not in (t.get("traceback") or ""):
                    p.append(f"traceback {t.get('traceback')!r}")
            evs = task_events(brain, slug, engine, tid)
            kinds = sorted(e["kind"] for e in evs)
            want_kinds = sorted(["task.received", "task.started", last_kind])
            if kinds != want_kinds:
                p.append(f"event kinds {kinds} != {want_kinds}")
            if len({e["id"] for e in evs}) != len(evs):
                p.append("duplicate event ids")
            if any(e["agent_id"] != agent_id for e in evs):
                p.append(f"events from other agents: {[e['agent_id'] for e in evs]}")
            rec = [e for e in evs if e["kind"] == "task.received"]
            if rec:
                payload = rec[0]["payload"]
                if payload.get("args") != [1.5, 2] or payload.get("kwargs") != {"note": "héllo wörld ✓", "ratio": 0.1}:
                    p.append(f"received payload {json.dumps(payload, ensure_ascii=False)}")
            if p:
                problems.append(f"{tid}: " + "; ".join(p))
    assert not problems, f"{len(problems)} of {n} tasks wrong in the brain:\n  " + "\n  ".join(problems[:40])
    return n


def event_rows_by_task(brain, agent_id: str) -> Dict[str, Dict[str, int]]:
    """From the brain DB: {task_id: {kind: rows}} for one agent."""
    rows = brain_db(
        brain,
        "SELECT task_id, kind, COUNT(*) AS n FROM events WHERE agent_id = ? GROUP BY task_id, kind",
        (hexid(agent_id),),
    )
    out: Dict[str, Dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["task_id"], {})[r["kind"]] = r["n"]
    return out


def log_lines(text: str) -> List[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------- CLI, HTTP, metrics


def run_agentd(binary: Path, args: Iterable[str], env: Dict[str, str], cwd: Optional[Path] = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a one-shot `z4j-agentd <args>` (doctor, status, a `run` expected to exit); text output.

    With `cwd` (a daemon's workdir), the output is also appended to
    `<cwd>/agentd-cli.log`, a log of the run like the daemon's own.
    """
    argv = [str(binary), *map(str, args)]
    try:
        r = subprocess.run(argv, env=env, cwd=str(cwd) if cwd else None, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv[1:]} still running after {timeout:.0f}s; stdout={exc.stdout!r} "
                             f"stderr={exc.stderr!r}") from None
    if cwd:
        with open(Path(cwd) / "agentd-cli.log", "a", errors="replace") as f:
            f.write(f"$ z4j-agentd {' '.join(argv[1:])}  (exit {r.returncode})\n{r.stdout}{r.stderr}\n")
    return r


def secret_forms(agent: dict) -> List[Tuple[str, str]]:
    """An agent's credentials in every form a log could show them: [(label, value)]."""
    s = agent["hmac_secret"]
    raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    return [
        ("token", agent["token"]),
        ("hmac_secret", s),
        ("hmac_secret (unpadded)", s.rstrip("=")),
        ("signing key (hex)", raw.hex()),
        ("signing key (std base64)", base64.b64encode(raw).decode()),
    ]


def http_get(url: str, timeout: float = 5.0) -> Tuple[int, Dict[str, str], str]:
    """GET -> (status, headers with lowercase names, body text); 4xx/5xx are answers, not exceptions."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


Labels = Tuple[Tuple[str, str], ...]


def parse_metrics(text: str) -> Dict[Tuple[str, Labels], float]:
    """OpenMetrics/Prometheus text -> {(name, sorted labels): value}; fails on any unparseable sample line."""
    import re

    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
    label = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')
    out: Dict[Tuple[str, Labels], float] = {}
    for ln in text.splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        m = sample.match(ln)
        assert m, f"metrics line does not parse as `name{{labels}} value`: {ln!r}"
        name, labels_text, value = m.groups()
        labels: List[Tuple[str, str]] = []
        pos = 0
        labels_text = labels_text or ""
        while pos < len(labels_text):
            lm = label.match(labels_text, pos)
            assert lm, f"metrics labels do not parse: {ln!r}"
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        key = (name, tuple(sorted(labels)))
        assert key not in out, f"duplicate metrics sample {ln!r}"
        out[key] = float(value)
    return out


def metric(samples: Dict[Tuple[str, Labels], float], name: str, **labels: str) -> Optional[float]:
    """The value of one sample, None when absent."""
    return samples.get((name, tuple(sorted(labels.items()))))
