"""The example clients on their own: argument handling, socket defaults, framing
and message shapes, against a tiny in-process stand-in for the daemon's socket.

No brain and no daemon needed; these run in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from datetime import datetime, timedelta

import msgpack
import pytest

from harness import SEND_JSONL, SEND_MSGPACK


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", [SEND_JSONL, SEND_MSGPACK], ids=["jsonl", "msgpack"])
def test_default_socket_path(script, monkeypatch):
    mod = load(script)
    monkeypatch.setenv("Z4J_SOCKET_PATH", "/x/explicit.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert mod.default_socket_path() == "/x/explicit.sock"
    monkeypatch.delenv("Z4J_SOCKET_PATH")
    assert mod.default_socket_path() == "/run/user/7/z4j/agent.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    assert mod.default_socket_path() == f"/var/tmp/z4j-{os.getuid()}/agent.sock"
    monkeypatch.delenv("TMPDIR")
    assert mod.default_socket_path() == f"/tmp/z4j-{os.getuid()}/agent.sock"


@pytest.mark.parametrize("script", [SEND_JSONL, SEND_MSGPACK], ids=["jsonl", "msgpack"])
@pytest.mark.parametrize("bad", [["--tasks", "-1"], ["--fail-every", "-2"], ["--engine", " "], ["--tasks", "x"]])
def test_bad_arguments_exit_2(script, bad):
    r = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)


@pytest.mark.parametrize("script", [SEND_JSONL, SEND_MSGPACK], ids=["jsonl", "msgpack"])
def test_no_socket_exit_2(script, tmp_path):
    r = subprocess.run([sys.executable, str(script), "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot connect" in r.stderr, (r.stdout, r.stderr)


class StandIn:
    """Accepts one connection, records messages, answers like the daemon would."""

    def __init__(self, path, error_on_nth=None):
        self.path = str(path)
        self.error_on_nth = error_on_nth
        self.messages = []
        self.framing = None
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.srv.accept()
        f = conn.makefile("rb")
        self.framing = "jsonl" if f.peek(1)[:1] == b"{" else "msgpack"
        while True:
            if self.framing == "jsonl":
                line = f.readline()
                if not line:
                    break
                msg = json.loads(line)
            else:
                head = f.read(4)
                if len(head) < 4:
                    break
                msg = msgpack.unpackb(f.read(struct.unpack(">I", head)[0]), raw=False)
            self.messages.append(msg)
            reply = None
            if msg["type"] == "ping":
                reply = {"type": "pong"}
            elif self.error_on_nth == len(self.messages):
                reply = {"type": "error", "code": "invalid_event", "message": "refused by the test"}
                if "ack_id" in msg:
                    reply["ack_id"] = msg["ack_id"]
            elif "ack_id" in msg:
                n = len(msg["events"]) if msg["type"] == "events" else 1
                reply = {"type": "ack", "ack_id": msg["ack_id"], "stored": n}
            if reply is not None:
                if self.framing == "jsonl":
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                else:
                    body = msgpack.packb(reply)
                    conn.sendall(struct.pack(">I", len(body)) + body)
        conn.close()

    def close(self):
        self.srv.close()


def run(script, sock, *args):
    flags = ["-S"] if script == SEND_JSONL else []  # the JSON-lines example must be stdlib-only
    r = subprocess.run([sys.executable, *flags, str(script), "--socket", str(sock), *args],
                       capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    return r.returncode, (json.loads(lines[-1]) if lines else None), r.stderr


@pytest.mark.parametrize("script,framing", [(SEND_JSONL, "jsonl"), (SEND_MSGPACK, "msgpack")], ids=["jsonl", "msgpack"])
@pytest.mark.parametrize("mode", [[], ["--durable"], ["--batch"], ["--batch", "--durable"]],
                         ids=["plain", "durable", "batch", "batch-durable"])
def test_messages_on_the_wire(script, framing, mode, tmp_path):
    stand_in = StandIn(tmp_path / "s.sock")
    try:
        rc, summary, err = run(script, tmp_path / "s.sock", "--tasks", "4", "--fail-every", "2",
                               "--prefix", "p-", "--engine", "rq", *mode)
    finally:
        stand_in.close()
    assert rc == 0, err
    assert stand_in.framing == framing
    durable, batch = "--durable" in mode, "--batch" in mode
    assert summary["sent"] == 12 and summary["acked"] == (12 if durable else 0), summary
    assert summary["tasks"] == ["p-1", "p-2", "p-3", "p-4"] and summary["failed_tasks"] == ["p-2", "p-4"]
    assert summary["pid"] != os.getpid()

    msgs = stand_in.messages
    assert msgs[0]["type"] == "hello" and msgs[0]["engines"] == ["rq"] and msgs[0]["pid"] == summary["pid"]
    assert msgs[-1] == {"type": "ping"}
    body = msgs[1:-1]
    assert all(m["type"] == ("events" if batch else "event") for m in body)
    assert all(("ack_id" in m) == durable for m in body)
    if durable:
        assert len({json.dumps(m["ack_id"]) for m in body}) == len(body), "ack ids must be unique"
    events = [e for m in body for e in (m["events"] if batch else [m])]
    assert len(events) == 12
    by_task = {}
    for e in events:
        assert e["engine"] == "rq"
        by_task.setdefault(e["task_id"], []).append(e)
    for tid, evs in by_task.items():
        fail = tid in ("p-2", "p-4")
        assert [e["kind"] for e in evs] == ["task.received", "task.started", "task.failed" if fail else "task.succeeded"]
        stamps = [datetime.fromisoformat(e["occurred_at"]) for e in evs]
        for e, ts in zip(evs, stamps):
            assert e["occurred_at"].endswith("+00:00") and len(e["occurred_at"]) == 32, e["occurred_at"]
            assert ts.utcoffset() == timedelta(0)
        assert all(b - a >= timedelta(milliseconds=1) for a, b in zip(stamps, stamps[1:])), stamps
        rec, started, last = (e["data"] for e in evs)
        assert rec == {"task_name": "app.tasks.add", "queue": "default", "args": [1.5, 2],
                       "kwargs": {"note": "héllo wörld ✓", "ratio": 0.1}}
        assert started == {"task_name": "app.tasks.add", "queue": "default", "worker": socket.gethostname()}
        assert isinstance(last["runtime_ms"], int)
        if fail:
            assert last["exception"] == "ValueError" and last["exception_message"] and "ValueError" in last["traceback"]
        else:
            assert last["result"] == {"sum": 3.5}


@pytest.mark.parametrize("script", [SEND_JSONL, SEND_MSGPACK], ids=["jsonl", "msgpack"])
@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_error_reply_exits_nonzero(script, durable, tmp_path):
    stand_in = StandIn(tmp_path / "s.sock", error_on_nth=3)
    try:
        rc, summary, err = run(script, tmp_path / "s.sock", "--tasks", "2", *(["--durable"] if durable else []))
    finally:
        stand_in.close()
    assert rc == 1 and summary["errors"] == 1 and "refused by the test" in err, (rc, summary, err)
