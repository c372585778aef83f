#!/usr/bin/env python3
"""Freshness: from the application's call to the event's row in the real brain.

    benches/compare/run.sh --freshness [--events 300] [--rate 5]
    (or: compare venv's python benches/compare/freshness.py --bare-python ... --agentd ...)

One throwaway z4j 1.13.0 brain (tests/e2e/brain.py, SQLite), then, one
after the other:

* **z4j-agentd**: a release daemon connected to the brain, and one
  application process calling the Python client's `emit()` (the call a
  Celery signal receiver makes; fire and forget);
* **z4j-bare**: one process with the stock z4j-bare 1.13.0 runtime calling
  `record_event` (the call every z4j engine adapter's event stream ends in).

Each process records EVENTS task events (distinct tasks) at RATE per second
and notes the monotonic clock (CLOCK_MONOTONIC, shared by every process on
the host) just before each call. The driver reads the brain's SQLite file
read-only every millisecond and notes when each event's row is first there.
Freshness is the difference: what the application's event waits before an
operator can see it. For z4j-agentd, the daemon's own part is shown beside
it: the time from the brain frame's send to its `event_batch_ack`
(`z4j_agentd_brain_ack_latency_seconds`, the brain's own time plus the
loopback), so freshness minus that is what the client and the daemon add.

Prints a table and writes JSON (benches/compare/results/freshness-<UTC>.json).
Internal: `freshness.py _agentd SOCKET N RATE PREFIX` and
`freshness.py _bare N RATE PREFIX` are the application processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from common import emit, percentile, wait_go  # noqa: E402  the compare scripts' own helpers

DATA = {"task_name": "proj.tasks.add", "queue": "default", "worker": "celery@bench-1",
        "args": [1, 2], "kwargs": {}}


def paced(n: int, rate: float, call) -> dict:
    """Calls call(i) n times, rate per second; returns {task index: monotonic time before the call}."""
    times = {}
    period = 1.0 / rate
    start = time.monotonic()
    for i in range(n):
        due = start + i * period
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        times[i] = time.monotonic()
        call(i)
    return times


def agentd_main(socket_path: str, n: int, rate: float, prefix: str) -> None:
    sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
    import z4j_agentd

    c = z4j_agentd.Client(socket_path, process="freshness bench", engines=["celery"])
    c.emit("celery", "task.received", f"{prefix}-warm", DATA)
    if not c.flush(30):
        raise SystemExit(f"the warm-up event was not taken: {c.stats()}")
    emit({"ready": True})
    wait_go()
    times = paced(n, rate, lambda i: c.emit("celery", "task.received", f"{prefix}-{i}", DATA))
    ok = c.flush(60)
    c.close()
    emit({"times": times, "flushed": ok})


def bare_main(n: int, rate: float, prefix: str) -> None:
    from bare_agent import make_runtime, to_event, wait_session

    rt = make_runtime()
    wait_session(rt, 60, "z4j-bare")

    def record(i: int) -> None:
        rt.record_event(to_event({"id": str(uuid.uuid4()), "engine": "celery", "task_id": f"{prefix}-{i}",
                                  "kind": "task.received", "data": DATA,
                                  "occurred_at": datetime.now(timezone.utc).isoformat()}))
    emit({"ready": True})
    wait_go()
    times = paced(n, rate, record)
    deadline = time.monotonic() + 120
    while rt.buffer_size() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    rt.stop(timeout=10)
    emit({"times": times, "flushed": rt.buffer_size() == 0})


if __name__ == "__main__" and sys.argv[1:2] == ["_agentd"]:
    agentd_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    sys.exit(0)
if __name__ == "__main__" and sys.argv[1:2] == ["_bare"]:
    bare_main(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    sys.exit(0)

# ================================================================ driver

sys.path.insert(0, str(REPO / "tests" / "e2e"))
from compare import Daemon, fresh_dir, git_commit, host, kill_tree, loadavg, spawn  # noqa: E402


def log(msg: str) -> None:
    print(f"[freshness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def watch(db_path: Path, agent_hex: str, prefix: str, n: int, proc, timeout: float) -> dict:
    """Polls the brain's events table every 1 ms; {task index: monotonic time first seen}."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30, isolation_level=None)
    seen: dict = {}
    last = con.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]
    deadline = time.monotonic() + timeout
    pattern = re.compile(re.escape(prefix) + r"-(\d+)$")
    try:
        while len(seen) < n:
            rows = con.execute("SELECT rowid, task_id FROM events WHERE rowid > ? AND agent_id = ?",
                               (last, agent_hex)).fetchall()
            now = time.monotonic()
            for rowid, task in rows:
                last = max(last, rowid)
                m = pattern.match(task or "")
                if m and int(m.group(1)) not in seen:
                    seen[int(m.group(1))] = now
            if now > deadline:
                raise RuntimeError(f"the brain stored {len(seen)} of {n} events within {timeout:.0f} s")
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"the application process exited with {proc.returncode}")
            time.sleep(0.001)
    finally:
        con.close()
    return seen


def ack_latency(metrics_port: int) -> dict:
    """The daemon's brain ack latency histogram: count, sum and the buckets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets = [(float("inf") if le == "+Inf" else float(le), int(v)) for le, v in re.findall(
        r'^z4j_agentd_brain_ack_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', text, re.M)]
    count = int(re.search(r"^z4j_agentd_brain_ack_latency_seconds_count (\d+)", text, re.M).group(1))
    total = float(re.search(r"^z4j_agentd_brain_ack_latency_seconds_sum (\S+)", text, re.M).group(1))
    return {"count": count, "sum": total, "buckets": buckets}


def bucket_quantile(h0: dict, h1: dict, q: float) -> float:
    """The upper bound of the bucket holding quantile q of the frames between two readings."""
    diff = [(le, c1 - c0) for (le, c1), (_, c0) in zip(h1["buckets"], h0["buckets"])]
    total = h1["count"] - h0["count"]
    for le, c in diff:
        if total and c >= q * total:
            return le
    return float("inf")


def run_mode(mode: str, args, brain, work: Path) -> dict:
    agent = brain.mint_agent(f"freshness-{mode}-{uuid.uuid4().hex[:6]}")
    agent_hex = uuid.UUID(agent["agent_id"]).hex
    prefix = f"fr-{mode}-{uuid.uuid4().hex[:8]}"
    home = fresh_dir(work / mode)
    (home / "home").mkdir(mode=0o700)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home / "home"), "LANG": "C.UTF-8",
           "Z4J_BRAIN_URL": brain.url, "Z4J_TOKEN": agent["token"], "Z4J_HMAC_SECRET": agent["hmac_secret"],
           "Z4J_PROJECT_ID": agent["project_slug"]}
    daemon = None
    metrics_port = None
    if mode == "agentd":
        from compare import free_port
        metrics_port = free_port()
        daemon = Daemon(args.agentd, home / "daemon", brain.url, agent["token"], agent["hmac_secret"],
                        {"Z4J_METRICS_ADDR": f"127.0.0.1:{metrics_port}"})
        daemon.wait_connected()
        argv = [sys.executable, Path(__file__).resolve(), "_agentd", daemon.socket, args.events, args.rate, prefix]
    else:
        argv = [args.bare_python, Path(__file__).resolve(), "_bare", args.events, args.rate, prefix]
    p = spawn(argv, env, home / "app.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(p.stdout.readline() or "null")
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"{mode}: the application process is not ready; see {home / 'app.log'}")
        time.sleep(2)  # the warm-up's frame acknowledged, the brain quiet
        h0 = ack_latency(metrics_port) if daemon else None
        p.stdin.write("go\n")
        p.stdin.flush()
        seen = watch(brain.db_path, agent_hex, prefix, args.events, p, args.events / args.rate + 120)
        h1 = ack_latency(metrics_port) if daemon else None
        result = json.loads(p.stdout.readline() or "null")
        p.wait(60)
    finally:
        kill_tree(p)
        if daemon:
            daemon.stop()
    times = {int(k): v for k, v in result["times"].items()}
    fresh_ms = [1000 * (seen[i] - times[i]) for i in range(args.events)]
    fresh_ms.sort()
    out = {"events": args.events, "rate": args.rate, "p50_ms": percentile(fresh_ms, 0.50),
           "p90_ms": percentile(fresh_ms, 0.90), "p99_ms": percentile(fresh_ms, 0.99), "max_ms": fresh_ms[-1],
           "mean_ms": statistics.mean(fresh_ms)}
    if daemon:
        frames = h1["count"] - h0["count"]
        out.update({"brain_frames": frames,
                    "brain_ack_mean_ms": 1000 * (h1["sum"] - h0["sum"]) / frames if frames else None,
                    "brain_ack_p50_bucket_ms": 1000 * bucket_quantile(h0, h1, 0.50),
                    "brain_ack_p99_bucket_ms": 1000 * bucket_quantile(h0, h1, 0.99)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bare-python", type=Path, required=True)
    ap.add_argument("--agentd", type=Path, required=True)
    ap.add_argument("--events", type=int, default=300)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    args.agentd = args.agentd.absolute()
    import brain as e2e_brain  # tests/e2e/brain.py (stdlib only)
    work = Path(tempfile.mkdtemp(prefix="z4j-freshness."))
    os.chmod(work, 0o700)
    brain = e2e_brain.Brain(work / "brain", venv=Path(sys.prefix))
    started = datetime.now(timezone.utc)
    res = {"started_at": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": git_commit(), "host": host(),
           "loadavg_at_start": loadavg(), "events": args.events, "rate": args.rate, "modes": {}}
    ok = False
    try:
        log("starting the brain")
        brain.start()
        for r in range(args.runs):
            for mode in ("agentd", "bare"):
                log(f"{mode}, run {r + 1}: {args.events} events at {args.rate}/s")
                res["modes"].setdefault(mode, []).append(run_mode(mode, args, brain, work))
                log(f"   {res['modes'][mode][-1]}")
        ok = True
    finally:
        brain.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"FAILED; logs kept in {work}")
    res["loadavg_at_end"] = loadavg()
    print()
    print("| | freshness p50 / p90 / p99 / max (ms) | brain frames | brain ack mean (ms), p50 / p99 bucket (ms) |")
    print("|---|---|---|---|")
    for mode, runs in res["modes"].items():
        for x in runs:
            ack = (f"{x['brain_ack_mean_ms']:.1f}, {x['brain_ack_p50_bucket_ms']:g} / {x['brain_ack_p99_bucket_ms']:g}"
                   if x.get("brain_frames") else "-")
            print(f"| {'z4j-agentd (emit)' if mode == 'agentd' else 'z4j-bare (record_event)'} "
                  f"| {x['p50_ms']:.1f} / {x['p90_ms']:.1f} / {x['p99_ms']:.1f} / {x['max_ms']:.1f} "
                  f"| {x.get('brain_frames', '-')} | {ack} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"freshness-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
