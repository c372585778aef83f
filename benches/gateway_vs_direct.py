#!/usr/bin/env python3
"""Stock z4j agents straight to the brain, and the same agents through z4j-agentd's gateway.

    cargo build --release --bin z4j-agentd
    python3 benches/gateway_vs_direct.py [--processes 8] [--events 300] [--modes direct,gateway]

One run, one throwaway real brain (z4j 1.13.0, SQLite, started by
tests/e2e/brain.py in its own state directory), one minted agent token.
Each mode starts N processes, each a stock z4j-bare 1.13.0 `AgentRuntime`
(the package as published, from the e2e harness's `gateway_venv()`), and
each process records E task events (distinct tasks: received, started,
succeeded) with `AgentRuntime.record_event`, the call every z4j engine
adapter's event stream ends in, as fast as the agent takes them. Then:

* **direct**: the N agents have `Z4J_BRAIN_URL` = the brain;
* **gateway**: the N agents have `Z4J_BRAIN_URL` = a z4j-agentd daemon
  (`Z4J_GATEWAY_ADDR`), itself connected to the same brain with the same
  token and HMAC secret.

Measured per mode:

* events/s stored: N x E events / (the brain's SQLite `events` table holds
  the last of them - the first `record_event` call); the driver polls the
  database read-only every 0.1 s and checks afterwards that every task has
  exactly its three rows. Also the time to 99 % of them, and the longest
  stretch without a new row: when the brain's transaction for a frame
  fails (z4j 1.13.0 on SQLite logs "event_batch transient DB failure;
  withholding ack so the agent re-sends", counted here from its log), it
  neither stores nor acknowledges the frame, and z4j-bare sends it again
  only after its 90 s ack deadline, which then sets the time to 100 %;
* brain CPU: utime + stime of the brain's process group (/proc) over the
  same window, per event and as a share of one core;
* connections to the brain's port (`ss -tnp`, established, sampled every
  0.5 s during the run, by owning process) and the worker slots the brain
  shows online for the agent (REST `agent-workers`, admin cookie session,
  read once all agents are connected before the clock starts, and again
  after it stops; the larger number of online slots is reported);
* frames: `event_batch` frames the agents sent (counted in each agent
  process by a counting wrapper around its transport's `send_frames`; the
  package's own code runs unchanged), and `event_batch` frames the brain
  received: the agents' own in direct mode, the daemon's in gateway mode
  (its `z4j_agentd_brain_ack_latency_seconds_count`, one per acknowledged
  frame), with the daemon's `gateway.event_batches_received` beside the
  agents' count;
* CPU of the agents (and of the daemon) over the window.

Prints one table and writes JSON (default benches/results/gateway_vs_direct-<UTC>.json).
Internal: `gateway_vs_direct.py _agent N_EVENTS PREFIX NAME` is one agent
process (run by the driver under the gateway venv's interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "compare"))  # common.py: the events every bench sends, /proc readers

from common import (CLK_TCK, KINDS, all_proc_stats, emit, lifecycle_events, proc_cpu_seconds,  # noqa: E402
                    proc_mem_kb, wait_go)


# ================================================================ one agent process


def agent_main(n_events: int, prefix: str, name: str) -> None:
    """A stock z4j-bare runtime: connect, record n_events, wait until its buffer is empty."""
    from bare_agent import cpu_s, to_event, wait_session  # compare/bare_agent.py, the same z4j-bare under test
    from z4j_bare.framework import BareFrameworkAdapter
    from z4j_bare.runtime import AgentRuntime
    from z4j_bare.transport import websocket as ws_transport
    from z4j_core.config import resolve_agent_config

    counts = {"frames": 0, "event_batch_frames": 0, "connects": 0}
    send_frames = ws_transport.WebSocketTransport.send_frames
    connect = ws_transport.WebSocketTransport.connect

    async def counting_send_frames(self, frames):  # observation only: same call, same result
        counts["frames"] += len(frames)
        counts["event_batch_frames"] += sum(1 for raw in frames if b'"event_batch"' in raw)
        return await send_frames(self, frames)

    async def counting_connect(self):
        await connect(self)
        counts["connects"] += 1

    ws_transport.WebSocketTransport.send_frames = counting_send_frames
    ws_transport.WebSocketTransport.connect = counting_connect

    events = [to_event(d) for d in lifecycle_events(n_events, prefix)]
    # Configuration from the environment, as every z4j agent reads it
    # (Z4J_BRAIN_URL, Z4J_TOKEN, Z4J_HMAC_SECRET, Z4J_PROJECT_ID, Z4J_AGENT_NAME).
    config = resolve_agent_config(framework_name="bare")
    rt = AgentRuntime(config=config, framework=BareFrameworkAdapter(config), engines=[])
    rt.start()
    wait_session(rt, 60, name)
    emit({"ready": True, "pid": os.getpid()})
    wait_go()

    c0, f0 = cpu_s(), dict(counts)
    t0 = time.monotonic()
    for ev in events:
        rt.record_event(ev)
    t_recorded = time.monotonic()
    deadline = t0 + 900
    while rt.buffer_size() > 0:  # a row leaves the buffer only on its event_batch_ack
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: {rt.buffer_size()} frames still buffered after 900 s")
        time.sleep(0.02)
    t_drained = time.monotonic()
    emit({"t0": t0, "t_recorded": t_recorded, "t_drained": t_drained, "cpu_s": cpu_s() - c0,
          "rss_kb": proc_mem_kb()["VmRSS"],
          **{k: counts[k] - f0[k] for k in counts}, "connects_total": counts["connects"]})
    wait_go()  # stay connected until the driver has taken its readings
    rt.stop(timeout=10)


# An agent process ends here: it loads nothing more than the modules above.
if __name__ == "__main__" and sys.argv[1:2] == ["_agent"]:
    agent_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    sys.exit(0)


# ================================================================ driver

sys.path.insert(0, str(REPO / "tests" / "e2e"))

# benches/compare/compare.py: child processes, z4j-agentd, the brain's SQLite, the machine, CPU of others
from compare import (CHILDREN, BrainDB, Daemon, ForeignCpu, fmt, free_port, fresh_dir, git_commit,  # noqa: E402
                     host, kill_tree, loadavg, spawn)


def log(msg: str) -> None:
    print(f"[gw-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group `pgid` (the brain and its children)."""
    return sum(int(v[11]) + int(v[12]) for _, v in all_proc_stats() if int(v[2]) == pgid) / CLK_TCK


def group_pids(pgid: int) -> list:
    return [pid for pid, v in all_proc_stats() if int(v[2]) == pgid]


def established(port: int) -> dict:
    """Established TCP connections to 127.0.0.1:port (one `ss` call, about 6 ms):
    {"total": count of the server's ends, "by_pid": {client pid: connections}}."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    total, by_pid = 0, {}
    for line in out.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        if f[2].endswith(f":{port}"):
            total += 1
        elif f[3].endswith(f":{port}"):
            for pid in set(re.findall(r"pid=(\d+)", line)):
                by_pid[int(pid)] = by_pid.get(int(pid), 0) + 1
    return {"total": total, "by_pid": by_pid}


class ConnSampler(threading.Thread):
    """Samples `established(port)` every 0.5 s; keeps the maxima by class of owner."""

    def __init__(self, port: int, classes: dict) -> None:
        super().__init__(daemon=True)
        self.port, self.classes = port, classes  # classes: pid -> "agent" | "daemon"
        self.stop_evt = threading.Event()
        self.max_total = 0
        self.max_by_class: dict = {}
        self.samples = 0
        self.start()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            s = established(self.port)
            self.samples += 1
            self.max_total = max(self.max_total, s["total"])
            per: dict = {}
            for pid, n in s["by_pid"].items():
                c = self.classes.get(pid, "other")
                per[c] = per.get(c, 0) + n
            for c, n in per.items():
                self.max_by_class[c] = max(self.max_by_class.get(c, 0), n)
            self.stop_evt.wait(0.5)

    def finish(self) -> dict:
        self.stop_evt.set()
        self.join(10)
        return {"max_established": self.max_total, "max_by_owner": self.max_by_class, "samples": self.samples}


class GatewayDaemon(Daemon):
    """z4j-agentd with the gateway (and the metrics listener) on, connected to the brain."""

    def __init__(self, binary: Path, work: Path, brain_url: str, agent: dict) -> None:
        self.gateway_port, self.metrics_port = free_port(), free_port()
        super().__init__(binary, work, brain_url, agent["token"], agent["hmac_secret"], {
            "Z4J_PROJECT_ID": agent["project_slug"], "Z4J_AGENT_NAME": "gw-bench-daemon",
            "Z4J_GATEWAY_ADDR": f"127.0.0.1:{self.gateway_port}",
            "Z4J_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}", "Z4J_LOG_LEVEL": "info"})
        self.wait_connected(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def brain_frames_acked(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(r"^z4j_agentd_brain_ack_latency_seconds_count (\d+)", text, re.M)
        if not m:
            raise RuntimeError("z4j_agentd_brain_ack_latency_seconds_count missing from /metrics")
        return int(m.group(1))


def agent_slots(brain, slug: str, agent_id: str) -> list:
    """The agent's worker slots as the brain lists them: [{worker_id, framework, pid, state}]."""
    status, body = brain.rest().call("GET", f"/api/v1/projects/{slug}/agent-workers")
    if status != 200:
        raise RuntimeError(f"agent-workers answered {status}")
    want = str(uuid.UUID(agent_id))
    return [{k: r.get(k) for k in ("worker_id", "framework", "pid", "state")}
            for r in body if str(r.get("agent_id")) == want]


def online(slots: list) -> list:
    return [s for s in slots if s["state"] == "online"]


def wait_brain_quiet(pgid: int, max_wait: float) -> float:
    """Wait until the brain uses under 5 % of a core over 1 s (bounded); return what was seen."""
    deadline = time.monotonic() + max_wait
    while True:
        c0 = group_cpu_seconds(pgid)
        time.sleep(1.0)
        pct = 100 * (group_cpu_seconds(pgid) - c0)
        if pct < 5 or time.monotonic() > deadline:
            return pct


def wait_advertised(daemon: GatewayDaemon, timeout: float = 30) -> dict:
    """Wait until the daemon's hello to the brain advertises what its clients registered.

    A new set of engines, capabilities or runtime features (the z4j agents
    declare `external_schedule_protocol`) makes the daemon reconnect about 2 s
    later so the brain learns it; the frames in flight then are sent again.
    The clock starts after that, so the figures are the steady state."""
    deadline = time.monotonic() + timeout
    while True:
        st = daemon.stats()
        if (st.get("uplink_state") == "connected" and st.get("engines") == st.get("advertised_engines")
                and st.get("capabilities") == st.get("advertised_capabilities")
                and st.get("runtime_features") == st.get("advertised_runtime_features")):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon's advertisement did not settle within {timeout:.0f} s: "
                               f"{st.get('uplink_state')} {st.get('last_error')}")
        time.sleep(0.1)


def run_mode(mode: str, args, brain, agent: dict, work: Path, gw_python: Path, foreign) -> dict:
    n, e = args.processes, args.events
    run_id = uuid.uuid4().hex[:8]
    like = f"gwb-{mode}-{run_id}-%"
    agent_hex = uuid.UUID(agent["agent_id"]).hex
    mwork = fresh_dir(work / mode)
    pgid = brain.pid()
    quiet = wait_brain_quiet(pgid, 30)
    daemon = None
    url = brain.url
    if mode == "gateway":
        daemon = GatewayDaemon(args.agentd, mwork / "daemon", brain.url, agent)
        url = daemon.url
    procs = []
    db = BrainDB(brain.db_path)
    try:
        log(f"{mode}: starting {n} z4j-bare processes -> {url}")
        t_spawn = time.monotonic()
        for i in range(n):
            home = fresh_dir(mwork / f"agent-{i}")
            env = {"PATH": f"{gw_python.parent}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                   "Z4J_HOME": str(home / ".z4j"), "Z4J_BRAIN_URL": url, "Z4J_TOKEN": agent["token"],
                   "Z4J_HMAC_SECRET": agent["hmac_secret"], "Z4J_PROJECT_ID": agent["project_slug"],
                   "Z4J_AGENT_NAME": f"gw-bench-{mode}-{i}"}
            procs.append(spawn([gw_python, Path(__file__).resolve(), "_agent", e, f"gwb-{mode}-{run_id}-p{i}",
                                f"{mode}-{i}"], env, mwork / f"agent-{i}.log",
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for i, p in enumerate(procs):
            line = p.stdout.readline()
            ready = json.loads(line) if line.startswith("{") else None
            if not ready or not ready.get("ready"):
                raise RuntimeError(f"{mode}: agent {i} not ready (exit {p.poll()}); see {mwork / f'agent-{i}.log'}")
        connect_s = time.monotonic() - t_spawn
        if daemon:
            wait_advertised(daemon)
            settle_s = time.monotonic() - t_spawn - connect_s
        agent_pids = {p.pid for p in procs}
        classes = {pid: "agent" for pid in agent_pids}
        if daemon:
            classes[daemon.pid] = "daemon"
        slots_before = agent_slots(brain, agent["project_slug"], agent["agent_id"])
        conns_before = established(brain.port)
        sampler = ConnSampler(brain.port, classes)
        base_rowid = db.max_rowid()
        st0 = daemon.stats() if daemon else None
        acked0 = daemon.brain_frames_acked() if daemon else None
        dcpu0 = proc_cpu_seconds(daemon.pid) if daemon else None
        bcpu0 = group_cpu_seconds(pgid)
        foreign0 = foreign.seconds()
        log(f"{mode}: {n} agents connected in {connect_s:.1f} s; brain slots online {len(online(slots_before))}; go")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        total = n * e
        deadline = time.monotonic() + args.timeout
        timeline = []  # (monotonic time, events stored) at each change
        log_offset = brain.log_path.stat().st_size if brain.log_path.exists() else 0
        while True:
            stored = db.count_prefix(agent_hex, like)
            if not timeline or stored != timeline[-1][1]:
                timeline.append((time.monotonic(), stored))
            if stored >= total:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the brain stored {stored} of {total} events in {args.timeout:.0f} s")
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    raise RuntimeError(f"{mode}: agent {i} exited with {p.returncode}; see {mwork / f'agent-{i}.log'}")
            time.sleep(0.1)
        t_stored = time.monotonic()
        bcpu = group_cpu_seconds(pgid) - bcpu0
        foreign_s = foreign.seconds() - foreign0
        dcpu = proc_cpu_seconds(daemon.pid) - dcpu0 if daemon else None
        conns = sampler.finish()
        results = []
        for i, p in enumerate(procs):
            line = p.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"{mode}: agent {i} gave no result (exit {p.poll()})")
            results.append(json.loads(line))
        st1 = daemon.stats() if daemon else None
        acked1 = daemon.brain_frames_acked() if daemon else None
        dmem = proc_mem_kb(daemon.pid) if daemon else None
        slots_after = agent_slots(brain, agent["project_slug"], agent["agent_id"])  # clock stopped: REST is free
        for p in procs:
            p.stdin.write("stop\n")
            p.stdin.flush()
        for i, p in enumerate(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                log(f"{mode}: agent {i} did not stop within 30 s; killed")
        rows = db.rows_by_task(agent_hex, like)
    finally:
        for p in procs:
            kill_tree(p)
        db.close()
        if daemon:
            daemon.stop()
    # Every task of this mode: exactly one row per kind, nothing else.
    bad = {t: k for t, k in rows.items() if k != {kind: 1 for kind in KINDS}}
    if len(rows) != total // 3 or bad:
        raise RuntimeError(f"{mode}: {len(rows)} tasks in the brain (want {total // 3}); "
                           f"{len(bad)} without exactly one row per kind, e.g. {list(bad.items())[:3]}")
    t0 = min(r["t0"] for r in results)
    seconds = t_stored - t0

    def reached(share: float) -> float:
        return next(t for t, k in timeline if k >= share * total) - t0

    # The longest stretch without a new row, and how many rows were still missing then:
    # a frame the brain neither stored nor acknowledged is re-sent by z4j-bare only after
    # its 90 s ack deadline, which shows up here as one long gap before the last rows.
    gaps = [(b[0] - a[0], total - a[1]) for a, b in zip(timeline, timeline[1:])]
    gap_s, gap_missing = max(gaps) if gaps else (0.0, 0)
    with open(brain.log_path, "rb") as f:  # what the brain logged from the start of the clock on
        f.seek(log_offset)
        brain_log = f.read().decode(errors="replace")
    out = {
        "mode": mode, "processes": n, "events_per_process": e, "events": total, "brain_url_of_agents": url,
        "brain_cpu_pct_before": round(quiet, 1), "connect_s": connect_s,
        "seconds": seconds, "events_per_s": total / seconds, "foreign_cpu_s": round(foreign_s, 2),
        "seconds_to_50pct": reached(0.5), "seconds_to_99pct": reached(0.99),
        "events_per_s_to_99pct": 0.99 * total / reached(0.99),
        "longest_gap_s": gap_s, "events_missing_during_longest_gap": gap_missing,
        "brain_log_lines_during_run": len(brain_log.splitlines()),
        # z4j 1.13.0 logs this when a frame's transaction failed (SQLite busy): no row, no ack.
        "brain_acks_withheld": brain_log.count("withholding ack so the agent re-sends"),
        "brain_log_warnings_errors": sum(1 for ln in brain_log.splitlines()
                                         if re.search(r'"level": "(warning|error|critical)"', ln)),
        "record_s": max(r["t_recorded"] for r in results) - t0,
        "agents_drained_s": max(r["t_drained"] for r in results) - t0,
        "brain_cpu_s": bcpu, "brain_cpu_ms_per_event": 1000 * bcpu / total, "brain_cpu_pct": 100 * bcpu / seconds,
        "brain_processes": len(group_pids(pgid)),
        "agent_cpu_s": sum(r["cpu_s"] for r in results),
        "agent_rss_kb_mean": sum(r["rss_kb"] for r in results) / n,
        "agent_event_batch_frames": sum(r["event_batch_frames"] for r in results),
        "agent_frames": sum(r["frames"] for r in results),
        "agent_reconnects": sum(r["connects"] for r in results),
        "brain_slots_online": max(len(online(slots_before)), len(online(slots_after))),
        "brain_slots_before_go": slots_before, "brain_slots_after_run": slots_after,
        "brain_connections_before_go": conns_before["total"],
        "brain_connections": conns,
        "rows_checked": sum(sum(k.values()) for k in rows.values()),
    }
    if daemon:
        g0, g1 = st0["gateway"], st1["gateway"]
        out.update({
            "brain_event_batch_frames": acked1 - acked0,
            "daemon_gateway_event_batches_received": g1["event_batches_received"] - g0["event_batches_received"],
            "daemon_gateway_frames_received": g1["frames_received"] - g0["frames_received"],
            "daemon_gateway_sessions": g1["sessions"],
            "daemon_gateway_closed_by_code": g1["closed_by_code"],
            "daemon_forwarded": st1["forwarded"] - st0["forwarded"], "daemon_resent": st1["resent"] - st0["resent"],
            "daemon_brain_duplicates": st1["brain_duplicates"] - st0["brain_duplicates"],
            "daemon_brain_rejected": st1["brain_rejected"] - st0["brain_rejected"],
            "daemon_advertisement_settled_s": settle_s,
            "daemon_connects_before_go": st0["connects"], "daemon_connects_during_run": st1["connects"] - st0["connects"],
            "daemon_cpu_s": dcpu,
            "daemon_rss_kb": dmem["VmRSS"], "daemon_hwm_kb": dmem["VmHWM"],
        })
    else:
        out["brain_event_batch_frames"] = out["agent_event_batch_frames"]  # nothing in between
    out["events_per_brain_frame"] = total / out["brain_event_batch_frames"]
    return out


def machine() -> dict:
    return {**host(), "python": platform.python_version(), "git_commit": git_commit(),
            "loadavg_at_start": loadavg()}


def render(res: dict) -> str:
    m = res["modes"]
    cols = [k for k in ("direct", "gateway") if k in m]
    rows = [
        ("events stored", lambda r: fmt(r["events"])),
        ("seconds, first event to last stored", lambda r: fmt(r["seconds"], 1)),
        ("events/s stored", lambda r: fmt(r["events_per_s"], 1)),
        ("seconds to 99 % stored", lambda r: fmt(r["seconds_to_99pct"], 1)),
        ("events/s to 99 % stored", lambda r: fmt(r["events_per_s_to_99pct"], 1)),
        ("longest stretch with no new row (s) / events missing then",
         lambda r: f"{fmt(r['longest_gap_s'], 1)} / {fmt(r['events_missing_during_longest_gap'])}"),
        ("frames the brain neither stored nor acked (its log)", lambda r: fmt(r["brain_acks_withheld"])),
        ("brain CPU ms/event", lambda r: fmt(r["brain_cpu_ms_per_event"], 2)),
        ("brain CPU % of one core", lambda r: fmt(r["brain_cpu_pct"])),
        ("TCP connections to the brain (max)", lambda r: fmt(r["brain_connections"]["max_established"])),
        ("worker slots online at the brain", lambda r: fmt(r["brain_slots_online"])),
        ("event_batch frames sent by the agents", lambda r: fmt(r["agent_event_batch_frames"])),
        ("... received by the gateway", lambda r: fmt(r.get("daemon_gateway_event_batches_received"))),
        ("event_batch frames the brain received", lambda r: fmt(r["brain_event_batch_frames"])),
        ("events per brain frame", lambda r: fmt(r["events_per_brain_frame"], 1)),
        ("agents' CPU s (all N)", lambda r: fmt(r["agent_cpu_s"], 2)),
        ("daemon CPU s", lambda r: fmt(r.get("daemon_cpu_s"), 2)),
        ("agents: last buffer emptied (s)", lambda r: fmt(r["agents_drained_s"], 1)),
        ("re-sent: daemon events / agent reconnects", lambda r: f"{fmt(r.get('daemon_resent'))} / "
                                                                f"{fmt(r['agent_reconnects'])}"),
        ("CPU s of other processes meanwhile", lambda r: fmt(r["foreign_cpu_s"], 1)),
    ]
    L = [f"# stock z4j agents: direct vs through the z4j-agentd gateway, {res['started_at']}", "",
         f"{res['params']['processes']} z4j-bare processes x {res['params']['events']} events; machine "
         f"{res['machine']['nproc']} CPU ({res['machine']['cpu_model']}); git {res['machine']['git_commit']}; "
         f"other processes' CPU during the run: {res.get('foreign_cpu_s', '?')} s", "",
         "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, f in rows:
        L.append(f"| {label} | " + " | ".join(f(m[c]) for c in cols) + " |")
    if len(cols) == 2:
        d, g = m["direct"], m["gateway"]
        L += ["", f"gateway / direct: {g['events_per_s'] / d['events_per_s']:.2f} x events/s "
              f"({g['events_per_s_to_99pct'] / d['events_per_s_to_99pct']:.2f} x to 99 %), "
              f"{g['brain_cpu_ms_per_event'] / d['brain_cpu_ms_per_event']:.2f} x brain CPU per event, "
              f"{d['brain_event_batch_frames'] / g['brain_event_batch_frames']:.0f} x fewer brain frames."]
    return "\n".join(L)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", "-n", type=int, default=8, help="z4j-bare processes per mode")
    ap.add_argument("--events", "-e", type=int, default=300, help="events per process (a multiple of 3)")
    ap.add_argument("--modes", default="direct,gateway", help="comma-separated, run in this order")
    ap.add_argument("--agentd", type=Path, default=REPO / "target" / "release" / "z4j-agentd")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mode for the brain to store all")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) after a good run")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.events % 3 or args.events <= 0 or args.processes <= 0 or set(modes) - {"direct", "gateway"}:
        ap.error("--events must be a positive multiple of 3, --processes positive, --modes direct and/or gateway")
    args.agentd = args.agentd.absolute()
    if "gateway" in modes and not os.access(args.agentd, os.X_OK):
        ap.error(f"{args.agentd} missing: cargo build --release --bin z4j-agentd")
    if not shutil.which("ss"):
        ap.error("needs `ss` (iproute2) to count connections")

    import brain as e2e_brain  # tests/e2e/brain.py
    brain_venv = e2e_brain.ensure_venv()
    gw_python = e2e_brain.gateway_venv() / "bin" / "python"

    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    foreign = ForeignCpu()
    foreign0 = foreign.seconds()
    work = Path(tempfile.mkdtemp(prefix="z4j-gwbench."))
    os.chmod(work, 0o700)
    res = {"started_at": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
           "params": {"processes": args.processes, "events": args.events, "modes": modes,
                      "agentd": str(args.agentd), "timeout": args.timeout},
           "machine": machine(), "modes": {}}
    res["machine"]["z4j_agentd"] = subprocess.run([str(args.agentd), "--version"], capture_output=True,
                                                  text=True).stdout.strip() if "gateway" in modes else None
    brain = e2e_brain.Brain(work / "brain", venv=brain_venv)
    ok = False
    try:
        log(f"work dir {work}; starting the brain")
        took = brain.start()
        agent = brain.mint_agent(f"gw-bench-{uuid.uuid4().hex[:6]}")
        log(f"brain pid {brain.pid()} on {brain.url} healthy after {took:.1f} s; agent minted")
        for mode in modes:
            r = run_mode(mode, args, brain, agent, work, gw_python, foreign)
            res["modes"][mode] = r
            log(f"{mode}: {r['events']} events in {r['seconds']:.1f} s = {r['events_per_s']:.1f} events/s; "
                f"brain {r['brain_cpu_ms_per_event']:.2f} ms CPU/event ({r['brain_cpu_pct']:.0f} %); "
                f"{r['brain_event_batch_frames']} brain frames")
        ok = True
    finally:
        for p in CHILDREN:
            kill_tree(p)
        brain.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    res["total_s"] = time.monotonic() - t_start
    res["foreign_cpu_s"] = round(foreign.seconds() - foreign0, 1)
    res["machine"]["loadavg_at_end"] = loadavg()
    out = args.json or HERE / "results" / f"gateway_vs_direct-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res))
    log(f"wrote {out} ({res['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
