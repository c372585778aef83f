#!/usr/bin/env python3
"""Send task lifecycles to a local z4j-agentd over its socket, as JSON lines.

Standard library only (Python 3.9+): copy this file anywhere and run it.

A connection whose first byte is `{` speaks JSON lines: one JSON object per
line, `\\n` terminated, replies in the same framing. Each simulated task gets
a full lifecycle: `task.received`, `task.started`, then `task.succeeded` or
(every `--fail-every`-th task) `task.failed`, each with an explicit
`occurred_at` so the daemon and the brain can deduplicate replays.

    python3 send_jsonl.py --tasks 5 --fail-every 2
    python3 send_jsonl.py --durable --batch --socket /run/z4j-agentd/agent.sock

`--durable` asks for an ack per message (sent only once the daemon has
committed the events to its spool) and waits for each; without it the sender
is fire-and-forget and finishes with a `ping` so that any `error` reply is
still seen. The last line on stdout is a JSON summary:

    {"sent": 9, "acked": 9, "tasks": [...], "failed_tasks": [...], "pid": 123, ...}

Exit status: 0 on success, 1 on an `error` reply or a missing ack (10 s),
2 when the socket cannot be used at all.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

ACK_TIMEOUT = 10.0
TASK_NAME = "app.tasks.add"
QUEUE = "default"


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


class Clock:
    """UTC timestamps, strictly increasing by at least 1 ms."""

    def __init__(self) -> None:
        self.last = None

    def next(self) -> datetime:
        now = datetime.now(timezone.utc)
        if self.last is not None and now < self.last + timedelta(milliseconds=1):
            now = self.last + timedelta(milliseconds=1)
        self.last = now
        return now


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds")  # 2026-11-22T23:29:59.500000+00:00


def lifecycle(engine: str, task_id: str, fail: bool, clock: Clock, worker: str) -> list:
    """The three events of one task, in order."""
    base = {"task_name": TASK_NAME, "queue": QUEUE}
    received = clock.next()
    started = clock.next()
    finished = clock.next()
    runtime_ms = max(1, round((finished - started) / timedelta(milliseconds=1)))
    if fail:
        last = ("task.failed", {
            **base,
            "exception": "ValueError",
            "exception_message": f"cannot add for {task_id}",
            "traceback": (
                "Traceback (most recent call last):\n"
                '  File "app/tasks.py", line 7, in add\n'
                "    raise ValueError(msg)\n"
                f"ValueError: cannot add for {task_id}"
            ),
            "runtime_ms": runtime_ms,
        })
    else:
        last = ("task.succeeded", {**base, "result": {"sum": 3.5}, "runtime_ms": runtime_ms})
    steps = [
        (received, "task.received", {
            **base,
            "args": [1.5, 2],
            "kwargs": {"note": "héllo wörld ✓", "ratio": 0.1},
        }),
        (started, "task.started", {**base, "worker": worker}),
        (finished, last[0], last[1]),
    ]
    return [
        {
            "engine": engine,
            "kind": kind,
            "task_id": task_id,
            "occurred_at": iso(ts),
            "id": str(uuid.uuid4()),
            "data": data,
        }
        for ts, kind, data in steps
    ]


class Conn:
    """JSON-lines connection to the daemon."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(ACK_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, msg: dict) -> None:
        line = json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self.sock.sendall(line.encode("utf-8") + b"\n")

    def recv(self, deadline: float) -> dict:
        """Next reply; raises TimeoutError at the deadline, EOFError on close."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError(f"reply is not an object: {reply!r}")
        return reply

    def close(self) -> None:
        self.sock.close()


class Sender:
    def __init__(self, conn: Conn, durable: bool) -> None:
        self.conn = conn
        self.durable = durable
        self.next_ack = 0
        self.sent = 0
        self.acked = 0
        self.errors = []

    def _new_ack_id(self):
        self.next_ack += 1
        return f"{os.getpid()}-{self.next_ack}"

    def _on_stray(self, reply: dict) -> None:
        if reply.get("type") == "error":
            self.errors.append(reply)
            print(f"error reply: {json.dumps(reply, ensure_ascii=False)}", file=sys.stderr)
        else:
            print(f"unexpected reply: {json.dumps(reply, ensure_ascii=False)}", file=sys.stderr)

    def send(self, msg: dict, n_events: int) -> bool:
        """Send one message; with --durable wait for its ack. False = give up."""
        ack_id = None
        if self.durable:
            ack_id = self._new_ack_id()
            msg = {**msg, "ack_id": ack_id}
        self.conn.send(msg)
        self.sent += n_events
        if ack_id is None:
            return True
        deadline = time.monotonic() + ACK_TIMEOUT
        while True:
            try:
                reply = self.conn.recv(deadline)
            except TimeoutError:
                self.errors.append({"type": "missing_ack", "ack_id": ack_id})
                print(f"no ack for ack_id {ack_id} within {ACK_TIMEOUT:.0f}s", file=sys.stderr)
                return False
            if reply.get("ack_id") != ack_id:
                self._on_stray(reply)
                continue
            if reply.get("type") == "ack":
                stored = reply.get("stored")
                if stored != n_events:
                    self.errors.append(reply)
                    print(f"ack {ack_id} stored={stored!r}, expected {n_events}", file=sys.stderr)
                self.acked += stored if isinstance(stored, int) else 0
                return True
            self._on_stray(reply)  # an error for this message: refused
            return True

    def finish(self) -> bool:
        """ping -> pong: every reply to what we sent before is read by then."""
        self.conn.send({"type": "ping"})
        deadline = time.monotonic() + ACK_TIMEOUT
        while True:
            try:
                reply = self.conn.recv(deadline)
            except TimeoutError:
                self.errors.append({"type": "missing_pong"})
                print(f"no pong within {ACK_TIMEOUT:.0f}s", file=sys.stderr)
                return False
            if reply.get("type") == "pong":
                return True
            self._on_stray(reply)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="daemon socket (default: Z4J_SOCKET_PATH, else /run/z4j-agentd/agent.sock "
                    "if it exists, else $XDG_RUNTIME_DIR/z4j/agent.sock, else $TMPDIR/z4j-<uid>/agent.sock)")
    ap.add_argument("--tasks", type=int, default=3, help="number of task lifecycles (default 3)")
    ap.add_argument("--engine", default="celery", help="engine name (default celery)")
    ap.add_argument("--fail-every", type=int, default=0, metavar="K",
                    help="every K-th task fails instead of succeeding (default 0 = never)")
    ap.add_argument("--prefix", default=None, help="task id prefix (default demo-<pid>-)")
    ap.add_argument("--durable", action="store_true", help="ask for durable acks and wait for each")
    ap.add_argument("--batch", action="store_true",
                    help="send each lifecycle as one `events` message instead of 3 `event` messages")
    ap.add_argument("--interval", type=float, default=0.0, metavar="SECONDS",
                    help="pause between two tasks (default 0)")
    args = ap.parse_args(argv)
    if args.tasks < 0:
        ap.error("--tasks must be >= 0")
    if args.fail_every < 0:
        ap.error("--fail-every must be >= 0")
    if args.interval < 0:
        ap.error("--interval must be >= 0")
    if not args.engine.strip():
        ap.error("--engine must not be empty")
    if args.socket is None:
        args.socket = default_socket_path()
    if args.prefix is None:
        args.prefix = f"demo-{os.getpid()}-"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    pid = os.getpid()
    try:
        conn = Conn(args.socket)
    except OSError as exc:
        print(f"cannot connect to {args.socket}: {exc}", file=sys.stderr)
        return 2
    sender = Sender(conn, args.durable)
    clock = Clock()
    worker = socket.gethostname()
    tasks, failed = [], []
    ok = True
    try:
        conn.send({
            "type": "hello",
            "process": os.path.basename(sys.argv[0]) or "send_jsonl.py",
            "pid": pid,
            "framework": "bare",
            "engines": [args.engine],
            "worker_role": "task",
        })
        for i in range(1, args.tasks + 1):
            if i > 1 and args.interval:
                time.sleep(args.interval)
            task_id = f"{args.prefix}{i}"
            fail = args.fail_every > 0 and i % args.fail_every == 0
            events = lifecycle(args.engine, task_id, fail, clock, worker)
            tasks.append(task_id)
            if fail:
                failed.append(task_id)
            if args.batch:
                ok = sender.send({"type": "events", "events": events}, len(events))
            else:
                for ev in events:
                    ok = sender.send({"type": "event", **ev}, 1)
                    if not ok:
                        break
            if not ok:
                break
        if ok:
            ok = sender.finish()
    except (OSError, EOFError, ValueError) as exc:
        print(f"connection failed: {exc}", file=sys.stderr)
        sender.errors.append({"type": "connection", "message": str(exc)})
    finally:
        conn.close()
    print(json.dumps({
        "sent": sender.sent,
        "acked": sender.acked,
        "tasks": tasks,
        "failed_tasks": failed,
        "pid": pid,
        "framing": "jsonl",
        "errors": len(sender.errors),
    }, ensure_ascii=False), flush=True)
    return 1 if sender.errors else 0


if __name__ == "__main__":
    sys.exit(main())
