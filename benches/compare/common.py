"""Shared pieces of the side-by-side comparison (stdlib only).

Imported by every process of `benches/compare/run.sh`: the driver
(compare.py), the stock-agent script (bare_agent.py, in the z4j-bare venv),
the z4j-agentd socket client (agentd_client.py) and the direct protocol
client (ceiling.py); also benches/gateway_vs_direct.py, driver and agents,
and benches/transport.py, driver and emitting client.
All of them send the SAME events, built here.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import datetime, timedelta, timezone

UTC = timezone.utc
CLK_TCK = os.sysconf("SC_CLK_TCK")

ENGINE = "celery"
KINDS = ("task.received", "task.started", "task.succeeded")


def task_data(i: int, kind: str) -> dict:
    """`data` of one event, shaped like z4j-celery's mapper (see the agent doc, 4.2/4.3).

    The task.succeeded variant is the event captured from a live z4j-bare run:
    about 570 bytes once wrapped by z4j-bare in its one-event event_batch frame.
    """
    base = {"task_name": "app.tasks.process_order", "queue": "default", "worker": "celery@host-1"}
    call = {"args": [i, f"order-{i}"], "kwargs": {"customer_id": 1001, "priority": "high", "note": ""}}
    if kind == "task.succeeded":
        return {**base, **call, "result": {"status": "ok", "items": 3}, "runtime_ms": 12}
    return {**base, **call}


def lifecycle_events(n_events: int, prefix: str) -> list:
    """n_events protocol-shaped event dicts: distinct tasks, 3 events each
    (received, started, succeeded), so every event is a NEW row in the brain.
    occurred_at strictly increases by 1 ms per event, ending about now."""
    start = datetime.now(UTC) - timedelta(milliseconds=n_events)
    out = []
    for j in range(n_events):
        task, kind = j // 3, KINDS[j % 3]
        out.append({
            "id": str(uuid.uuid4()),
            "kind": kind,
            "engine": ENGINE,
            "task_id": f"{prefix}-{task:06d}",
            "occurred_at": (start + timedelta(milliseconds=j)).isoformat(timespec="microseconds"),
            "data": task_data(task, kind),
        })
    return out


def proc_stat(pid) -> list:
    """The fields of /proc/<pid>/stat after the command name: [1] ppid, [2] process group,
    [11] utime, [12] stime (in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def all_proc_stats():
    """(pid, proc_stat(pid)) of every process, leaving out those gone while /proc is read."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                yield int(name), proc_stat(name)
            except OSError:
                continue


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kb(pid="self") -> dict:
    """VmRSS and VmHWM in kB, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def percentile(sorted_values: list, p: float):
    """Nearest-rank percentile of an ascending list (same rule as examples/loadgen.rs)."""
    if not sorted_values:
        return None
    return sorted_values[round((len(sorted_values) - 1) * p)]


def emit(obj: dict) -> None:
    """One JSON line on stdout: how the case scripts talk to the driver."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    """Block until the driver writes a line on stdin (it has taken its 'before' readings)."""
    if not sys.stdin.readline():
        raise SystemExit("driver went away")
