#!/usr/bin/env python3
"""The stock Python agent (z4j-bare 1.13.0) under test. Runs in its own venv.

    bare_agent.py hotpath N IDLE_S   brain unreachable: time N record_event calls
    bare_agent.py e2e N PREFIX       real brain: record N events, wait until acked

Both build the runtime the way z4j-bare's own doctor does for a process with
no engine adapter: `AgentRuntime(config, BareFrameworkAdapter(config),
engines=[])` then `start()` (`install_agent` insists on at least one engine;
everything else it does is the same). Config comes from Z4J_BRAIN_URL,
Z4J_TOKEN, Z4J_PROJECT_ID and Z4J_HMAC_SECRET given by the driver; HOME is a
fresh directory, so the buffer is a new `~/.z4j/buffer-<pid>.sqlite`.

Protocol with the driver (compare.py): JSON lines on stdout; `e2e` prints
{"ready": ...} once connected, waits for a line on stdin, then runs.

benches/gateway_vs_direct.py's agent processes import `to_event`,
`wait_session` and `cpu_s` from here.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from common import emit, lifecycle_events, percentile, proc_mem_kb, task_data, wait_go

MEM_BARE = proc_mem_kb()  # before any z4j import

import uuid  # noqa: E402
from datetime import datetime  # noqa: E402

import z4j_bare  # noqa: E402
from z4j_bare.framework import BareFrameworkAdapter  # noqa: E402
from z4j_bare.runtime import AgentRuntime  # noqa: E402
from z4j_core.config import resolve_agent_config  # noqa: E402
from z4j_core.models import Event  # noqa: E402
from z4j_core.models.event import EventKind  # noqa: E402
from z4j_core.transport.frames import EventBatchFrame, EventBatchPayload, serialize_frame  # noqa: E402

MEM_IMPORTED = proc_mem_kb()
PLACEHOLDER = uuid.UUID(int=0)  # Event.project_id / agent_id are never sent


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_runtime() -> AgentRuntime:
    config = resolve_agent_config(
        framework_name="bare",
        explicit_kwargs={
            "brain_url": os.environ["Z4J_BRAIN_URL"],
            "token": os.environ["Z4J_TOKEN"],
            "project_id": os.environ["Z4J_PROJECT_ID"],
            "hmac_secret": os.environ["Z4J_HMAC_SECRET"],
            "agent_name": "compare-bare",
        },
    )
    rt = AgentRuntime(config=config, framework=BareFrameworkAdapter(config), engines=[])
    rt.start()
    return rt


def to_event(d: dict) -> Event:
    """A z4j Event from one of common.lifecycle_events' dicts."""
    return Event(id=uuid.UUID(d["id"]), project_id=PLACEHOLDER, agent_id=PLACEHOLDER,
                 engine=d["engine"], task_id=d["task_id"], kind=EventKind(d["kind"]),
                 occurred_at=datetime.fromisoformat(d["occurred_at"]), data=d["data"])


def buffered_frame_bytes(ev: Event) -> int:
    """Size of the frame record_event stores for `ev` (same construction as the runtime)."""
    frame = EventBatchFrame(id="ev_" + "0" * 32, ts=datetime.now().astimezone(), payload=EventBatchPayload(events=[{
        "id": str(ev.id), "kind": ev.kind.value, "engine": ev.engine, "task_id": ev.task_id,
        "occurred_at": ev.occurred_at.isoformat(), "data": ev.data}]))
    return len(serialize_frame(frame))


def wait_session(rt: AgentRuntime, timeout: float, who: str) -> None:
    """Wait until the runtime has a session with its brain (hello_ack received)."""
    deadline = time.monotonic() + timeout
    while rt.supervisor_state().get("session_id") is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{who} did not connect within {timeout:.0f} s: {rt.supervisor_state()}")
        time.sleep(0.02)


def hotpath(n: int, idle_s: float) -> None:
    t_start = time.monotonic()
    rt = make_runtime()
    start_ms = (time.monotonic() - t_start) * 1000
    time.sleep(idle_s)
    mem_idle = proc_mem_kb()
    # Events are built in chunks outside the timed loops: the figures are the
    # record_event calls only (as in the agent doc, 6.2), and the process never
    # holds more than one chunk of them, so its RSS is the agent's.
    def chunk(start: int, count: int) -> list:
        now = datetime.now().astimezone()
        return [Event(id=uuid.uuid4(), project_id=PLACEHOLDER, agent_id=PLACEHOLDER, engine="celery",
                      task_id=str(uuid.uuid4()), kind=EventKind.TASK_SUCCEEDED, occurred_at=now,
                      data=task_data(i, "task.succeeded")) for i in range(start, start + count)]

    frame_bytes = buffered_frame_bytes(chunk(0, 1)[0])
    lat = [0] * n
    record = rt.record_event
    clock = time.perf_counter_ns
    wall = cpu = 0.0
    for start in range(0, n, 1000):
        events = chunk(start, min(1000, n - start))
        c0 = cpu_s()
        t0 = time.perf_counter()
        for i, ev in enumerate(events, start):
            a = clock()
            record(ev)
            lat[i] = clock() - a
        wall += time.perf_counter() - t0
        cpu += cpu_s() - c0
    del events
    buffered = rt.buffer_size()
    mem_after = proc_mem_kb()
    state = rt.supervisor_state()
    rt.stop(timeout=5)
    lat.sort()
    us = lambda p: percentile(lat, p) / 1000  # noqa: E731
    emit({
        "calls": n, "buffered_rows": buffered, "frame_bytes": frame_bytes, "seconds": wall,
        "calls_per_s": n / wall, "p50_us": us(0.50), "p90_us": us(0.90), "p99_us": us(0.99),
        "p999_us": us(0.999), "max_us": lat[-1] / 1000, "cpu_us_per_call": cpu * 1e6 / n,
        "start_ms": start_ms, "connected": state.get("session_id") is not None,
        "connection_errors": state.get("connection_error_count"),
        "rss_kb": {"bare_interpreter": MEM_BARE["VmRSS"], "after_import": MEM_IMPORTED["VmRSS"],
                   "started_idle": mem_idle["VmRSS"], "after_load": mem_after["VmRSS"],
                   "hwm": mem_after["VmHWM"]},
    })


def e2e(n: int, prefix: str) -> None:
    events = [to_event(d) for d in lifecycle_events(n, prefix)]
    rt = make_runtime()
    wait_session(rt, 30, "z4j-bare")
    emit({"ready": True, "pid": os.getpid()})
    wait_go()
    c0 = cpu_s()
    t0 = time.monotonic()
    for ev in events:
        rt.record_event(ev)
    t_recorded = time.monotonic()
    while rt.buffer_size() > 0:  # rows leave the buffer only on event_batch_ack
        time.sleep(0.02)
        if time.monotonic() - t0 > 1800:
            raise SystemExit("buffer not drained after 30 min")
    t_drained = time.monotonic()
    cpu = cpu_s() - c0
    mem = proc_mem_kb()
    rt.stop(timeout=5)
    emit({"t0": t0, "t_written": t_recorded, "t_drained": t_drained, "client_cpu_s": cpu,
          "client_rss_kb": mem["VmRSS"], "client_hwm_kb": mem["VmHWM"]})


def main() -> None:
    mode = sys.argv[1]
    if mode == "version":
        emit({"z4j_bare": z4j_bare.__version__})
    elif mode == "hotpath":
        hotpath(int(sys.argv[2]), float(sys.argv[3]))
    elif mode == "e2e":
        e2e(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
