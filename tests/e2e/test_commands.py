"""Commands from the real z4j 1.13.0 brain, routed by z4j-agentd to local processes.

An operator issues `cancel-task` through the brain's REST API; the brain
sends the command over the daemon's one WebSocket; the daemon acknowledges
it, hands it to the local connection that declared the engine and action
in its `hello`, and relays that process's `command_result`. When no
process can answer (none registered, or it died mid-command) the daemon
answers `failed` itself, long before the brain's own 60 s timeout.

The clients: `examples/celery_commands.py` (engine celery, a bare Celery app
on the memory:// broker), in-test JSON-lines clients (threads) for other
engines, and a client subprocess that dies without answering. The last test
runs the example alone against a stand-in for the daemon's socket (no brain).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time

from control import LocalClient, cancel_task, issue_cancel, wait_brain_knows, wait_command_done
from harness import CELERY_COMMANDS, Service, wait_for

BRAIN_TIMEOUT = 60  # the brain's command_timeout_seconds (default)
LOCAL_BUDGET = 54.0  # what the daemon gives a local process: 60 s minus a tenth


# ---------------------------------------------------------------- daemon counters


def command_counts(daemon) -> dict:
    return daemon.stats()["commands"]


# ---------------------------------------------------------------- local clients


# Says hello for celery/cancel_task, prints every message it gets, never answers.
SILENT_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"type": "hello", "process": "e2e-silent-worker", "engines": ["celery"],
                      "capabilities": {"celery": ["cancel_task"]}, "ack_id": 1}).encode() + b"\n")
for line in s.makefile("rb"):
    print(line.decode().strip(), flush=True)
"""


def require_celery() -> None:
    assert importlib.util.find_spec("celery"), (
        f"celery is not installed in {sys.prefix}; `python3 tests/e2e/brain.py venv` (run.sh does it) installs it")


def start_example(daemon) -> Service:
    require_celery()
    return Service([sys.executable, CELERY_COMMANDS, "--socket", daemon.socket_path, "--broker", "memory://"],
                   daemon.workdir, "celery-commands")


def registered(daemon, process_prefix: str, capabilities: dict, timeout: float = 20.0) -> dict:
    """Until a client whose process name starts with `process_prefix` is registered with `capabilities`."""

    def check():
        clients = daemon.stats()["client_list"]
        mine = [c for c in clients if (c.get("process") or "").startswith(process_prefix)]
        return bool(mine) and mine[0]["capabilities"] == capabilities, clients

    return wait_for(check, timeout, f"{process_prefix} to register {capabilities} with the daemon")


# --------------------------------------------------------------------------- a


def test_commands_go_to_the_client_that_declared_the_engine(brain, agent, daemon):
    """celery -> examples/celery_commands.py, rq -> the in-test rq client; both complete in the brain."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    example = start_example(daemon)
    rq = LocalClient(daemon.socket_path, answer=lambda cmd: ("success", {"handled_by": "rq-client"}, None))
    try:
        rq.hello(process="e2e-rq-worker", engines=["rq"], capabilities={"rq": ["cancel_task"]})
        registered(daemon, "celery_commands.py", {"celery": ["cancel_task"]})
        wait_brain_knows(brain, agent, {"celery": ["cancel_task"], "rq": ["cancel_task"]})
        stats = daemon.stats()
        assert stats["advertised_capabilities"] == {"celery": ["cancel_task"], "rq": ["cancel_task"]}, stats
        assert set(stats["advertised_engines"]) == {"celery", "rq"}, stats

        # celery: the example revokes the task and answers.
        task_id = f"e2e-celery-{os.urandom(4).hex()}"
        cmd = issue_cancel(brain, agent, "celery", task_id)
        handled = example.next_json(20, "the example to handle the celery command")
        assert handled == {"id": cmd["id"], "action": "cancel_task", "task_id": task_id, "status": "success",
                           "result": {"task_id": task_id, "revoked": True, "terminated": False},
                           "error": None}, handled
        done = wait_command_done(brain, agent, cmd["id"], 20)
        assert done["status"] == "completed", done
        assert done["result"] == {"task_id": task_id, "revoked": True, "terminated": False}, done
        assert rq.commands == [], f"the rq client got a celery command: {rq.commands}"

        # rq: the in-test client answers; the example sees nothing.
        rq_task = f"e2e-rq-{os.urandom(4).hex()}"
        cmd2 = issue_cancel(brain, agent, "rq", rq_task)
        done2 = wait_command_done(brain, agent, cmd2["id"], 20)
        assert done2["status"] == "completed", done2
        assert done2["result"] == {"handled_by": "rq-client"}, done2
        assert [c["id"] for c in rq.commands] == [cmd2["id"]], rq.commands
        got = rq.commands[0]
        assert got["action"] == "cancel_task", got
        assert got["target"] == {"type": "task", "id": f"rq:{rq_task}", "engine": "rq"}, got
        assert got["parameters"] == {"engine": "rq", "task_id": rq_task}, got
        assert got["timeout_seconds"] == LOCAL_BUDGET, got
        assert example.pending_lines() == [], "the celery example handled an rq command"

        # e: the daemon counted both, both succeeded.
        assert command_counts(daemon) == {"received": 2, "succeeded": 2, "failed": 0}, daemon.stats()
    finally:
        rq.close()
        example.stop()


# --------------------------------------------------------------------------- b


def test_commands_for_an_engine_no_client_runs_fail_at_once(brain, agent, daemon_factory):
    """Advertised statically (Z4J_CAPABILITIES), no client: failed within seconds, naming host, engine, action."""
    daemon = daemon_factory(agent, Z4J_CAPABILITIES="huey:cancel_task")
    wait_brain_knows(brain, agent, {"huey": ["cancel_task"]})
    assert daemon.stats()["advertised_capabilities"] == {"huey": ["cancel_task"]}

    t0 = time.monotonic()
    cmd = issue_cancel(brain, agent, "huey", "e2e-huey-1")
    done = wait_command_done(brain, agent, cmd["id"], 15)
    took = time.monotonic() - t0
    assert done["status"] == "failed", done
    assert took < 10, f"the brain learned the failure after {took:.1f}s; the daemon should answer at once"
    error = done["error"] or ""
    for word in (agent["name"], "huey", "cancel_task", "no connected local process"):
        assert word in error, f"{word!r} not in the error {error!r}"
    assert command_counts(daemon) == {"received": 1, "succeeded": 0, "failed": 1}, daemon.stats()


# --------------------------------------------------------------------------- c


def test_commands_fail_when_the_client_dies_mid_command(brain, agent, daemon):
    """The process holding the command is killed: failed, saying it disconnected, long before 60 s."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    silent = Service([sys.executable, "-c", SILENT_CLIENT, daemon.socket_path], daemon.workdir, "silent")
    try:
        assert silent.next_json(10, "hello_ack")["type"] == "hello_ack"
        wait_brain_knows(brain, agent, {"celery": ["cancel_task"]})

        t0 = time.monotonic()
        cmd = issue_cancel(brain, agent, "celery", "e2e-dies-1")
        got = silent.next_json(20, "the command")
        assert got["type"] == "command" and got["id"] == cmd["id"], got
        silent.proc.kill()
        silent.proc.wait(10)

        done = wait_command_done(brain, agent, cmd["id"], 20)
        took = time.monotonic() - t0
        assert done["status"] == "failed", done
        assert took < 15, f"the brain learned the failure after {took:.1f}s (its own timeout is {BRAIN_TIMEOUT}s)"
        error = done["error"] or ""
        assert "disconnected" in error and f"pid {silent.proc.pid} (e2e-silent-worker)" in error, error
        assert command_counts(daemon) == {"received": 1, "succeeded": 0, "failed": 1}, daemon.stats()
    finally:
        silent.stop()


# --------------------------------------------------------------------------- d


def test_commands_for_an_engine_registered_while_connected(brain, agent, daemon):
    """A second hello adds arq: refused (422) before, accepted and completed after the re-handshake."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    client = LocalClient(daemon.socket_path, answer=lambda cmd: ("success", {"handled_by": "arq-client"}, None))
    try:
        client.hello(process="e2e-late-arq", engines=["celery"])
        wait_brain_knows(brain, agent, {"celery": []})

        status, body = cancel_task(brain, agent, "arq", "e2e-arq-early")
        assert status == 422, f"cancel-task for an engine nobody advertises: HTTP {status} {body}"
        assert "arq" in json.dumps(body), body

        client.hello(process="e2e-late-arq", engines=["celery"], capabilities={"arq": ["cancel_task"]})
        wait_brain_knows(brain, agent, {"arq": ["cancel_task"]})
        stats = daemon.stats()
        assert stats["advertised_capabilities"] == {"arq": ["cancel_task"]}, stats
        ours = [c for c in stats["client_list"] if c.get("process") == "e2e-late-arq"]
        assert ours and ours[0]["capabilities"] == {"arq": ["cancel_task"]}, stats["client_list"]

        cmd = issue_cancel(brain, agent, "arq", "e2e-arq-1")
        done = wait_command_done(brain, agent, cmd["id"], 20)
        assert done["status"] == "completed", done
        assert done["result"] == {"handled_by": "arq-client"}, done
        assert [c["id"] for c in client.commands] == [cmd["id"]], client.commands
        assert command_counts(daemon) == {"received": 1, "succeeded": 1, "failed": 0}, daemon.stats()
    finally:
        client.close()


# --------------------------------------------------------------------------- shutdown


def test_commands_running_at_shutdown_fail_in_the_brain(brain, agent, daemon):
    """SIGTERM while a client holds a command: the brain learns it failed, not after its 60 s timeout."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    client = LocalClient(daemon.socket_path)
    try:
        client.hello(process="e2e-holds-at-shutdown", capabilities={"celery": ["cancel_task"]})
        wait_brain_knows(brain, agent, {"celery": ["cancel_task"]})
        cmd = issue_cancel(brain, agent, "celery", "e2e-shutdown-1")
        wait_for(lambda: (len(client.commands) == 1, client.commands), 10, "the client to get the command")
        assert daemon.stop() == 0
        done = wait_command_done(brain, agent, cmd["id"], 5)
        assert done["status"] == "failed", done
        assert "shutting down" in (done.get("error") or ""), done
    finally:
        client.close()


# --------------------------------------------------------------------------- the example alone

# A user's Celery app, loaded the way `celery -A cmds_proj:app` would; its
# revoke fails for one task id, as it would with the broker unreachable.
EXAMPLE_APP = '''
from celery import Celery

app = Celery("cmds_proj", broker="memory://")
_revoke = app.control.revoke


def revoke(task_id, terminate=False, **kw):
    if task_id == "explode":
        raise ConnectionError("broker unreachable")
    return _revoke(task_id, terminate=terminate, **kw)


app.control.revoke = revoke
'''


class StandIn:
    """The daemon's side of the socket, played by the test (no daemon, no brain)."""

    def __init__(self, path) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.srv.settimeout(20)
        self.conn = None

    def accept(self) -> dict:
        """The next connection; returns its hello (answered with hello_ack)."""
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(10)
        self.lines = self.conn.makefile("rb")
        hello = self.read()
        self.send({"type": "hello_ack", "ack_id": hello.get("ack_id"), "version": "stand-in"})
        return hello

    def read(self) -> dict:
        line = self.lines.readline()
        assert line, "the example closed the connection"
        return json.loads(line)

    def send(self, msg: dict) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def command(self, action: str, **parameters) -> dict:
        """Sends a command; returns the example's command_result (acknowledged)."""
        cid = os.urandom(8).hex()
        self.send({"type": "command", "id": cid, "action": action, "target": {"engine": "celery"},
                   "parameters": {"engine": "celery", **parameters}, "timeout_seconds": LOCAL_BUDGET})
        result = self.read()
        assert result.get("type") == "command_result" and result.get("id") == cid, result
        assert "ack_id" in result, result
        self.send({"type": "ack", "ack_id": result["ack_id"]})
        return result

    def drop(self) -> None:
        self.lines.close()
        self.conn.close()


def test_commands_example_answers_each_command_and_reconnects(tmp_path):
    """--app module:attr; success, unknown action, exception -> failed; a new hello after the daemon restarts."""
    require_celery()
    (tmp_path / "cmds_proj.py").write_text(EXAMPLE_APP)
    standin = StandIn(tmp_path / "d.sock")
    example = Service([sys.executable, CELERY_COMMANDS, "--socket", tmp_path / "d.sock", "--app", "cmds_proj:app"],
                      tmp_path, "celery-commands", cwd=tmp_path)
    try:
        hello = standin.accept()
        assert hello["type"] == "hello" and hello["engines"] == ["celery"], hello
        assert hello["capabilities"] == {"celery": ["cancel_task"]}, hello

        ok = standin.command("cancel_task", task_id="t-1", terminate=True)
        assert (ok["status"], ok["result"], ok["error"]) == (
            "success", {"task_id": "t-1", "revoked": True, "terminated": True}, None), ok
        unknown = standin.command("retry_task", task_id="t-2")
        assert unknown["status"] == "failed" and unknown["result"] is None, unknown
        assert "retry_task" in unknown["error"], unknown
        boom = standin.command("cancel_task", task_id="explode")
        assert boom["status"] == "failed" and "broker unreachable" in boom["error"], boom

        lines = [example.next_json(5, f"stdout line {i}") for i in range(3)]
        assert [(ln["id"], ln["status"]) for ln in lines] == [
            (ok["id"], "success"), (unknown["id"], "failed"), (boom["id"], "failed")], lines
        assert lines[0]["result"] == ok["result"] and lines[2]["error"] == boom["error"], lines

        # The daemon restarts: the example connects again and says hello again.
        standin.drop()
        again = standin.accept()
        assert again["capabilities"] == {"celery": ["cancel_task"]}, again
        assert standin.command("cancel_task", task_id="t-3")["status"] == "success"
        assert example.stop() == 0, example.stderr_tail()
    finally:
        example.stop()
