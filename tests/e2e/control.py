"""What the e2e tests use to play local processes and read the brain's control plane.

`LocalClient` is a local process on the daemon's socket (JSON lines, a
reader thread that records or answers commands); the functions read the
real brain's REST API (agent row, commands).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from typing import Callable, Optional

from harness import wait_for

# ---------------------------------------------------------------- brain REST


def agent_row(brain, agent: dict) -> dict:
    status, agents = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/agents")
    assert status == 200, f"GET agents: HTTP {status} {agents}"
    return next(a for a in agents if a["id"] == agent["agent_id"])


def wait_brain_knows(brain, agent: dict, capabilities: dict, timeout: float = 30.0) -> dict:
    """Until the brain's agent row is online and lists every engine with its actions."""

    def check():
        a = agent_row(brain, agent)
        engines = set(a.get("engine_adapters") or [])
        caps = a.get("capabilities") or {}
        ok = a["state"] == "online" and all(
            engine in engines and set(actions) <= set(caps.get(engine) or [])
            for engine, actions in capabilities.items()
        )
        return ok, {k: a.get(k) for k in ("state", "engine_adapters", "capabilities")}

    return wait_for(check, timeout, f"the brain's agent row to advertise {capabilities}")


def cancel_task(brain, agent: dict, engine: str, task_id: str):
    """POST cancel-task -> (HTTP status, body)."""
    return brain.api("POST", f"/api/v1/projects/{agent['project_slug']}/commands/cancel-task",
                     body={"agent_id": agent["agent_id"], "engine": engine, "task_id": task_id})


def issue_cancel(brain, agent: dict, engine: str, task_id: str) -> dict:
    status, body = cancel_task(brain, agent, engine, task_id)
    assert status == 202, f"cancel-task engine={engine}: HTTP {status} {body}"
    return body


def wait_command_done(brain, agent: dict, command_id: str, timeout: float) -> dict:
    """Until the command leaves pending/dispatched; returns it."""
    path = f"/api/v1/projects/{agent['project_slug']}/commands/{command_id}"

    def check():
        status, body = brain.api("GET", path)
        assert status == 200, f"GET command: HTTP {status} {body}"
        return body["status"] not in ("pending", "dispatched"), body

    return wait_for(check, timeout, f"command {command_id} to finish", interval=0.2)



# ---------------------------------------------------------------- local clients


class LocalClient:
    """An in-test local process on the daemon's socket (JSON lines, a reader thread).

    `answer(command) -> (status, result, error)` answers each command;
    without it commands are only recorded.
    """

    def __init__(self, socket_path, answer: Optional[Callable[[dict], tuple]] = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.answer = answer
        self.commands: list = []
        self.replies: "queue.Queue[dict]" = queue.Queue()
        self.next_ack = 0
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, msg: dict) -> None:
        with self._send_lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def hello(self, **fields) -> dict:
        """hello with an ack_id; waits for hello_ack, fails on any error reply."""
        self.next_ack += 1
        ack_id = f"hello-{self.next_ack}"
        self.send({"type": "hello", "pid": os.getpid(), **fields, "ack_id": ack_id})
        deadline = time.monotonic() + 5
        while True:
            reply = self.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            assert reply.get("type") != "error", f"hello refused: {reply}"
            if reply.get("type") == "hello_ack" and reply.get("ack_id") == ack_id:
                return reply

    def _read(self) -> None:
        for line in self.sock.makefile("rb"):
            msg = json.loads(line)
            if msg.get("type") != "command":
                self.replies.put(msg)
                continue
            self.commands.append(msg)
            if self.answer is not None:
                status, result, error = self.answer(msg)
                self.send({"type": "command_result", "id": msg["id"], "status": status,
                           "result": result, "error": error, "ack_id": f"result-{msg['id']}"})

    def close(self) -> None:
        # shutdown first: the reader thread's file object keeps the socket open otherwise.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


