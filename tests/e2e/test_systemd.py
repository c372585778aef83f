"""The daemon as systemd runs it, against the real brain.

* Socket activation with Debian's `systemd-socket-activate`: the socket
  exists before the daemon does; a client that connects first is served once
  the daemon starts; restarting the daemon behind a socket that outlives it
  (as z4j-agentd.socket does) loses no client connection attempt.
* A service user with no writable home (as `nobody`, through setpriv): the
  spool falls back to $TMPDIR/z4j-<uid>/ with exactly one WARNING naming
  both paths, and events still reach the brain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness import event_rows_by_task, sock_request, wait_for

ACTIVATE = shutil.which("systemd-socket-activate")
NOBODY = 65534


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def daemon_pids(root: int) -> list:
    """z4j-agentd processes at or below `root` (by the name of the binary
    under test, as the kernel keeps it: at most 15 characters)."""
    name = Path(os.environ.get("Z4J_AGENTD_BIN") or "z4j-agentd").name[:15]
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        if comm(p) == name:
            found.append(p)
        todo.extend(children(p))
    return found


def send_durable(sock_path: Path, task_id: str, timeout: float = 60.0) -> dict:
    """One connection, one event with an ack id; returns the daemon's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        line = {"type": "event", "engine": "celery", "kind": "task.received", "task_id": task_id,
                "name": "tests.activation", "ack_id": task_id}
        s.sendall(json.dumps(line).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed without a reply to {task_id}")
            buf += chunk
        return json.loads(buf)


def activate(d, sock: Path, argv: list, env: dict, log: Path) -> subprocess.Popen:
    """`systemd-socket-activate -l <sock> --fdname=agent` around `argv`."""
    assert ACTIVATE, "systemd-socket-activate is missing: apt-get install systemd (.ci/run does)"
    cmd = [ACTIVATE, "-l", str(sock), "--fdname=agent"]
    for k in env:
        cmd += ["-E", k]
    d.logs.append(log)
    with open(log, "wb") as f:
        return subprocess.Popen(cmd + argv, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_brain_rows(brain, agent, task_ids: list, timeout: float = 60.0) -> dict:
    def check():
        rows = event_rows_by_task(brain, agent["agent_id"])
        missing = [t for t in task_ids if t not in rows]
        return not missing, f"{len(missing)} of {len(task_ids)} tasks missing, e.g. {missing[:5]}"

    wait_for(check, timeout, f"{len(task_ids)} tasks in the brain", interval=0.5)
    return event_rows_by_task(brain, agent["agent_id"])


def test_a_client_that_connects_before_the_daemon_runs_is_served_once_it_starts(
        brain, agent, daemon_factory, daemon_bin):
    d = daemon_factory(agent, start=False)
    env = d.env()
    proc = activate(d, d.socket_path, [str(daemon_bin), "run"], env, d.workdir / "activated.log")
    try:
        wait_for(lambda: (d.socket_path.exists(), "no socket yet"), 10, "systemd-socket-activate to listen")
        assert daemon_pids(proc.pid) == [], "no daemon runs before the first connection"
        assert stat.S_ISSOCK(os.stat(d.socket_path).st_mode)

        # The client connects and writes while no daemon exists; its durable
        # ack comes from the daemon that the connection starts.
        reply = send_durable(d.socket_path, "act-first-1")
        assert reply.get("type") == "ack" and reply.get("stored") == 1, reply
        assert daemon_pids(proc.pid) == [proc.pid], "systemd-socket-activate execs the daemon"

        stats = d.wait_stats(lambda s: s["acked"] >= 1 and s["spool_depth"] == 0, 60,
                             "the event to be acknowledged by the brain")
        assert stats["socket_path"] == str(d.socket_path), stats
        rows = wait_brain_rows(brain, agent, ["act-first-1"])
        assert rows["act-first-1"] == {"task.received": 1}, rows
        log = Path(d.logs[-1]).read_text()
        assert "socket systemd passed" in log, log[-2000:]
    finally:
        stop_group(proc)
    # The socket belongs to whoever passed it: the daemon leaves the file.
    assert d.socket_path.exists()


def test_restarting_the_daemon_behind_an_activated_socket_loses_no_connection(
        brain, agent, daemon_factory, daemon_bin):
    d = daemon_factory(agent, start=False, Z4J_SHUTDOWN_GRACE_SECONDS="2")
    env = d.env()
    restarts = 3
    # Holds the passed socket (fd 3) across daemon runs, as systemd does for
    # z4j-agentd.socket; each run gets LISTEN_PID of its own.
    supervisor = d.workdir / "supervise.sh"
    supervisor.write_text(
        "#!/bin/sh\n"
        f"n=0\nwhile [ $n -le {restarts} ]; do\n"
        "  n=$((n+1))\n"
        "  sh -c 'export LISTEN_PID=$$; exec \"$0\" run' \"$Z4J_AGENTD_BIN\"\n"
        "done\n")
    supervisor.chmod(0o755)
    env["Z4J_AGENTD_BIN"] = str(daemon_bin)
    proc = activate(d, d.socket_path, ["/bin/sh", str(supervisor)], env, d.workdir / "activated.log")

    sent, acked, failures = [], [], []
    stop = threading.Event()

    def client():
        # About 100 attempts/s: well within what the brain stores (~130
        # events/s), so the brain is idle again soon after the test.
        i = 0
        while not stop.is_set():
            time.sleep(0.01)
            i += 1
            tid = f"act-restart-{i}"
            sent.append(tid)
            try:
                reply = send_durable(d.socket_path, tid)
            except OSError as exc:
                failures.append(f"{tid}: {type(exc).__name__}: {exc}")
                continue
            if reply.get("type") == "ack" and reply.get("stored") == 1:
                acked.append(tid)
            else:
                failures.append(f"{tid}: {reply}")

    try:
        wait_for(lambda: (d.socket_path.exists(), "no socket yet"), 10, "systemd-socket-activate to listen")
        t = threading.Thread(target=client, daemon=True)
        t.start()
        seen = set()
        for _ in range(restarts):
            wait_for(lambda: (bool(daemon_pids(proc.pid)), "no daemon"), 30, "a daemon to run")
            pid = daemon_pids(proc.pid)[0]
            assert pid not in seen
            seen.add(pid)
            before = len(acked)
            wait_for(lambda: (len(acked) >= before + 20, f"{len(acked)} acked"), 30,
                     "the client to get acks from this daemon")
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: (pid not in daemon_pids(proc.pid), "still running"), 30,
                     f"daemon {pid} to exit")
        wait_for(lambda: (bool(daemon_pids(proc.pid)), "no daemon"), 30, "the last daemon to run")
        before = len(acked)
        wait_for(lambda: (len(acked) >= before + 20, f"{len(acked)} acked"), 30, "acks after the last restart")
        stop.set()
        t.join(90)
        assert not t.is_alive(), "the client is stuck"
        assert failures == [], f"{len(failures)} of {len(sent)} connection attempts failed: {failures[:5]}"
        assert acked == sent, f"{len(sent) - len(acked)} events without an ack"
        assert len(seen) == restarts

        rows = wait_brain_rows(brain, agent, acked, timeout=120)
        wrong = {t: rows.get(t) for t in acked if rows.get(t) != {"task.received": 1}}
        assert not wrong, f"{len(wrong)} tasks missing or stored twice: {dict(list(wrong.items())[:10])}"
    finally:
        stop.set()
        stop_group(proc)


@pytest.mark.parametrize("home", ["/nonexistent", "/"], ids=["home-missing", "home-not-writable"])
def test_a_service_user_without_a_writable_home_falls_back_with_one_warning(
        brain, agent, daemon_factory, daemon_bin, home):
    if os.geteuid() != 0:
        pytest.skip("switching to uid 65534 needs root (CI runs as root)")
    d = daemon_factory(agent, start=False)
    env = d.env()
    for k in ("Z4J_BUFFER_PATH", "Z4J_SOCKET_PATH"):
        env.pop(k)
    # A world-writable sticky TMPDIR that uid 65534 can reach, like /tmp.
    base = Path(tempfile.mkdtemp(prefix="z4j-e2e-nobody-", dir="/tmp"))
    os.chmod(base, 0o755)
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    os.chmod(tmpdir, 0o1777)
    env.update(HOME=home, TMPDIR=str(tmpdir))
    private = tmpdir / f"z4j-{NOBODY}"
    sock = private / "agent.sock"
    log = d.workdir / "nobody.log"
    d.logs.append(log)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             str(daemon_bin), "run"],
            env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                return sock_request(sock, {"type": "ping"}, timeout=2).get("type") == "pong", "no pong"
            except OSError as exc:
                return False, str(exc)

        wait_for(up, 30, f"the daemon running as uid {NOBODY} to answer on {sock}")
        reply = send_durable(sock, f"nobody-{home.strip('/') or 'root'}")
        assert reply.get("type") == "ack" and reply.get("stored") == 1, reply
        stats = wait_for(lambda: ((s := sock_request(sock, {"type": "stats"}))["acked"] >= 1, s), 60,
                         "the event to reach the brain")
        spool = private / "agentd.sqlite"
        assert stats["spool_path"] == str(spool), stats
        st = os.stat(spool)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
        st = os.stat(private)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    assert rc == 0, log.read_text()[-2000:]

    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    warnings = [ln for ln in lines if ln.get("level") == "WARN"]
    assert len(warnings) == 1, json.dumps(warnings, indent=1)
    text = json.dumps(warnings[0])
    wanted = os.path.join(home, ".z4j", "agentd.sqlite")
    assert wanted in text and str(spool) in text, text
