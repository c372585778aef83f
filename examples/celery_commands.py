#!/usr/bin/env python3
"""Serve the brain's `cancel_task` command for a Celery app, through z4j-agentd.

The daemon holds the one connection to the brain. This process tells the
daemon, in its `hello`, that it runs `cancel_task` for the engine `celery`;
the daemon then advertises that to the brain and routes every such command
here. A command arrives as one message:

    {"type": "command", "id": "<uuid>", "action": "cancel_task",
     "target": {...}, "parameters": {"engine": "celery", "task_id": "..."},
     "timeout_seconds": 54.0}

and is answered with one `command_result`, which the daemon relays to the
brain:

    {"type": "command_result", "id": "<uuid>", "status": "success",
     "result": {"task_id": "...", "revoked": true, "terminated": false}, "error": null}

`cancel_task` calls `app.control.revoke(task_id, terminate=...)`
(`parameters.terminate`, default false: the brain sends none, so a
running task runs on). This file shows the local protocol in a few lines;
a Celery application uses `z4j_agentd.celery.install(app)` instead, which
serves every command the brain has for Celery and whose cancel stops a
running task (docs/quickstart-celery.md). Any exception is answered `failed`
with its text; any other action is answered `failed` naming it.

    python3 celery_commands.py --app proj.celery:app      # your app, as `celery -A` takes it
    python3 celery_commands.py --broker redis://localhost:6379/0

Needs `pip install celery` (and your broker's client library); the daemon
side is the standard library only (JSON lines on the Unix socket). When the
daemon restarts, this process reconnects (backoff 0.5 s doubling to 10 s)
and says hello again. One JSON line per command handled goes to stdout:

    {"id": "...", "action": "cancel_task", "task_id": "...", "status": "success", "result": {...}, "error": null}

Exit status: 0 on SIGTERM or Ctrl-C, 2 when the Celery app cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

ENGINE = "celery"
ACTIONS = ["cancel_task"]
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 10.0


def default_socket_path() -> str:
    """Z4J_SOCKET_PATH, else the packaged daemon's /run/z4j-agentd/agent.sock if it
    exists, else $XDG_RUNTIME_DIR/z4j/agent.sock, else $TMPDIR/z4j-<uid>/agent.sock
    (the same order as the z4j_agentd client)."""
    explicit = os.environ.get("Z4J_SOCKET_PATH")
    if explicit:
        return explicit
    if os.path.exists("/run/z4j-agentd/agent.sock"):
        return "/run/z4j-agentd/agent.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "z4j", "agent.sock")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"z4j-{os.getuid()}", "agent.sock")


def load_app(app_name, broker):
    """The user's Celery app (`module`, `module:attribute` or `module.attribute`,
    found the way `celery -A` finds it), or a bare app on `broker`."""
    if app_name:
        from celery.app.utils import find_app

        # `celery -A proj` imports from the current directory too.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return find_app(app_name)
    from celery import Celery

    return Celery("z4j-commands", broker=broker)


def run_command(app, msg: dict) -> tuple:
    """Run one command -> (status, result, error)."""
    action = msg.get("action")
    if action != "cancel_task":
        return "failed", None, f"unsupported action {action!r}: this process runs only {', '.join(ACTIONS)}"
    parameters = msg.get("parameters") or {}
    task_id = parameters.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        return "failed", None, "cancel_task needs parameters.task_id"
    terminate = bool(parameters.get("terminate", False))
    try:
        app.control.revoke(task_id, terminate=terminate)
    except Exception as exc:  # the brain gets the reason, this process goes on
        return "failed", None, f"revoking {task_id} failed: {type(exc).__name__}: {exc}"
    return "success", {"task_id": task_id, "revoked": True, "terminated": terminate}, None


class Conn:
    """JSON-lines connection to the daemon."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.next_ack = 0
        self.registered = False  # the daemon answered our hello

    def send(self, msg: dict, ack: bool = False) -> None:
        if ack:
            self.next_ack += 1
            msg = {**msg, "ack_id": self.next_ack}
        line = json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self.sock.sendall(line.encode("utf-8") + b"\n")

    def recv(self) -> dict:
        """The next message; blocks; EOFError when the daemon goes away."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def hello() -> dict:
    return {
        "type": "hello",
        "process": "celery_commands.py",
        "pid": os.getpid(),
        "framework": "celery",
        "engines": [ENGINE],
        "capabilities": {ENGINE: ACTIONS},
        "worker_role": "commands",
    }


def serve(conn: Conn, app) -> None:
    """Say hello, then answer commands until the connection ends."""
    conn.send(hello(), ack=True)
    while True:
        msg = conn.recv()
        kind = msg.get("type")
        if kind == "command":
            status, result, error = run_command(app, msg)
            conn.send({"type": "command_result", "id": msg.get("id"), "status": status,
                       "result": result, "error": error}, ack=True)
            print(json.dumps({"id": msg.get("id"), "action": msg.get("action"),
                              "task_id": (msg.get("parameters") or {}).get("task_id"),
                              "status": status, "result": result, "error": error}), flush=True)
        elif kind == "hello_ack":
            conn.registered = True
            print(f"registered with z4j-agentd {msg.get('version')}: {ENGINE} {ACTIONS}", file=sys.stderr)
        elif kind == "error":
            # e.g. unknown_command: the answer came after the daemon's deadline.
            print(f"daemon error {msg.get('code')}: {msg.get('message')}", file=sys.stderr)
        # `ack` replies need no action.


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="daemon socket (default: Z4J_SOCKET_PATH, else /run/z4j-agentd/agent.sock "
                    "if it exists, else $XDG_RUNTIME_DIR/z4j/agent.sock, else $TMPDIR/z4j-<uid>/agent.sock)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--app", "-A", help="your Celery app, e.g. proj.celery:app (as `celery -A` takes it)")
    which.add_argument("--broker", help="build a bare Celery app on this broker URL, e.g. redis://localhost:6379/0")
    args = ap.parse_args(argv)
    if args.socket is None:
        args.socket = default_socket_path()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        app = load_app(args.app, args.broker)
    except Exception as exc:
        print(f"cannot load the Celery app: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    delay = RECONNECT_FIRST
    try:
        while True:
            conn = None
            try:
                conn = Conn(args.socket)
                serve(conn, app)
            except (OSError, EOFError, ValueError) as exc:
                if conn is not None and conn.registered:
                    delay = RECONNECT_FIRST  # it was serving: start the backoff over
                print(f"no connection to z4j-agentd on {args.socket}: {exc}; retrying in {delay:.1f}s",
                      file=sys.stderr)
            finally:
                if conn is not None:
                    conn.close()
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
