#!/usr/bin/env python3
"""How soon a restarted z4j-agentd answers on its socket with a large spool.

For each run: a daemon (brain unreachable, so nothing leaves the spool) is
filled with EVENTS durable events by examples/loadgen, then

* stopped with SIGTERM and started again: the time from the new process's
  spawn to the first `stats` reply on its socket ("after a clean stop");
* sent 20,000 more events while it runs, SIGKILLed, and started again: the
  same time after a crash ("after SIGKILL"), with the spool's WAL to read.

Each reply's `spool_depth` is checked against what was acknowledged.

    cargo build --release --bin z4j-agentd --example loadgen
    benches/restart.py [--runs 3] [--events 1000000] [--bin target/release/z4j-agentd]

Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time

SECRET = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU="


def env_for(work: str) -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.path.join(work, "home"),
        "Z4J_BRAIN_URL": "http://127.0.0.1:9",
        "Z4J_TOKEN": "bench",
        "Z4J_HMAC_SECRET": SECRET,
        "Z4J_SOCKET_PATH": os.path.join(work, "agent.sock"),
        "Z4J_LOG_LEVEL": "warn",
        "Z4J_BUFFER_MAX_EVENTS": "100000000",
        "Z4J_BUFFER_MAX_BYTES": "100000000000",
        "Z4J_SHUTDOWN_GRACE_SECONDS": "0",
    }


def stats_once(path: str) -> dict | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"type":"stats"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    return None
                buf += chunk
            return json.loads(buf)
    except OSError:
        return None


def start_and_time(binary: str, work: str, log) -> tuple[subprocess.Popen, float, dict]:
    """Spawns the daemon; returns it, ms until its first stats reply, and the reply."""
    sock = os.path.join(work, "agent.sock")
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "run"], env=env_for(work), stdout=subprocess.DEVNULL, stderr=log)
    while True:
        reply = stats_once(sock)
        if reply is not None:
            return p, (time.perf_counter() - t0) * 1000, reply
        if p.poll() is not None:
            raise SystemExit(f"the daemon exited with {p.returncode}; see {log.name}")
        time.sleep(0.0005)


def fill(loadgen: str, work: str, pid: int, events: int) -> None:
    subprocess.run([loadgen, "--socket", os.path.join(work, "agent.sock"), "--daemon-pid", str(pid),
                    "--clients", "4", "--events", str(events), "--durable", "--batch", "1000", "--json"],
                   check=True, stdout=subprocess.DEVNULL)


def one_run(binary: str, loadgen: str, events: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="z4j-restart.") as work:
        os.makedirs(os.path.join(work, "home"), mode=0o700)
        with open(os.path.join(work, "daemon.log"), "ab") as log:
            p, _, _ = start_and_time(binary, work, log)
            fill(loadgen, work, p.pid, events)
            p.send_signal(signal.SIGTERM)
            p.wait(120)
            p, clean_ms, reply = start_and_time(binary, work, log)
            assert reply["spool_depth"] == events, reply["spool_depth"]
            fill(loadgen, work, p.pid, 20_000)
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            p, crash_ms, reply = start_and_time(binary, work, log)
            assert reply["spool_depth"] == events + 20_000, reply["spool_depth"]
            p.send_signal(signal.SIGTERM)
            p.wait(120)
    return {"events": events, "clean_restart_ms": round(clean_ms, 1), "sigkill_restart_ms": round(crash_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--bin", default="target/release/z4j-agentd")
    ap.add_argument("--loadgen", default="target/release/examples/loadgen")
    a = ap.parse_args()
    rows = []
    for _ in range(a.runs):
        r = one_run(a.bin, a.loadgen, a.events)
        print(json.dumps(r), flush=True)
        rows.append(r)
    for k in ("clean_restart_ms", "sigkill_restart_ms"):
        runs = ", ".join(str(r[k]) for r in rows)
        print(f"{k}: median {statistics.median(r[k] for r in rows)} [{runs}]")


if __name__ == "__main__":
    main()
