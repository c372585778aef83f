#!/usr/bin/env python3
"""The same events into one brain over the WebSocket and over HTTPS long-poll.

    cargo build --release --bin z4j-agentd
    python3 benches/transport.py [--events 3000] [--modes ws,lp8192,lp65536,lp1048576]

One run, one throwaway real brain (z4j 1.13.0, SQLite, started by
tests/e2e/brain.py in its own state directory with
`Z4J_MAX_PAYLOAD_SIZE_BYTES=1048576`, so it takes long-poll uploads of up to
1 MiB), one minted agent token. Each mode starts a fresh release z4j-agentd
(its own spool) connected to that brain with that token, and one Python
process (the e2e venv's interpreter, with this repository's client) that
emits E task events (E / 3 distinct tasks: received, started, succeeded;
the events of benches/compare/common.py) with `z4j_agentd.emit` as fast as
the client takes them, then waits until the daemon has committed them all
(`flush`). Modes:

* **ws**: `Z4J_TRANSPORT=ws`, the WebSocket (default batching: up to 250
  events per `event_batch` frame, 2 frames in flight);
* **lpN**: `Z4J_TRANSPORT=longpoll` with `Z4J_LONGPOLL_MAX_BODY_BYTES=N`:
  one upload (HTTP POST of signed frames, at most N bytes) at a time.

Measured per mode:

* events/s stored: E / (the brain's SQLite `events` table holds the last of
  the mode's events - the first `emit` call); the driver polls the database
  read-only every 0.1 s and checks afterwards that every (task, kind) of the
  mode is stored exactly once. Also the time to 99 % of them and the longest
  stretch without a new row;
* brain CPU: utime + stime of the brain's process group (/proc) over the
  same window, per event, per upload (per frame over the WebSocket) and as a
  share of one core;
* uploads: over long-poll, the daemon's debug line for each upload
  (`long-poll upload frames=.. events=.. other_frames=.. bytes=..`, target
  `z4j_agentd::uplink::longpoll`, read from its JSON log between the first
  emit and the last row stored): uploads, those carrying events, frames,
  events per upload, bytes. Over the WebSocket: `event_batch` frames, the
  daemon's `z4j_agentd_brain_ack_latency_seconds_count` (one per
  acknowledged frame);
* ack latency: the daemon's `z4j_agentd_brain_ack_latency_seconds`
  histogram over the mode (read once the daemon has every acknowledgement):
  the exact mean (`_sum / _count`), and p50 / p99 interpolated within its
  buckets as Prometheus' `histogram_quantile` does. Over the WebSocket it is
  one sample per frame (sent to `event_batch_ack`), over long-poll one per
  upload that carried events (POST to the HTTP 200);
* the daemon's CPU, its re-sends, new sessions, warnings and the brain's
  answers 429 it logged (the brain allows 600 requests a minute per
  address on `/api/v1/agent/*`, uploads and command polls together); the
  client's CPU; the brain's warnings and errors.

After a long-poll mode the driver waits `--settle` seconds (default 61) so
the next mode starts with that per-address budget unused.

Prints one table and writes JSON (default benches/results/transport-<UTC>.json);
`transport.py render FILE.json` prints the table of a saved run again.
Internal: `transport.py _client SOCKET N_EVENTS PREFIX` is the emitting
process (run by the driver under the e2e venv's interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "compare"))  # common.py: the events every bench sends, /proc readers

from common import KINDS, emit, lifecycle_events, proc_cpu_seconds, proc_mem_kb, wait_go  # noqa: E402


# ================================================================ the emitting process


def client_main(socket_path: str, n_events: int, prefix: str) -> None:
    """z4j_agentd.emit n_events, then wait until the daemon has committed them all."""
    import resource

    import z4j_agentd

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    z4j_agentd.configure(socket_path=socket_path, queue_size=max(10_000, 2 * n_events),
                         process="transport-bench")
    client = z4j_agentd.get_client()
    if not client.ping(10):
        raise SystemExit(f"z4j-agentd does not answer on {socket_path}")
    events = lifecycle_events(n_events, prefix)
    emit({"ready": True, "framing": client.framing})
    wait_go()
    c0 = cpu_s()
    t0 = time.monotonic()
    refused = 0
    for ev in events:
        if not z4j_agentd.emit(ev["engine"], ev["kind"], ev["task_id"], ev["data"],
                               occurred_at=ev["occurred_at"], id=ev["id"]):
            refused += 1
    t_emitted = time.monotonic()
    flushed = client.flush(600)  # every event committed to the daemon's spool
    t_committed = time.monotonic()
    s = client.stats()
    emit({"t0": t0, "t_emitted": t_emitted, "t_committed": t_committed, "flushed": flushed,
          "not_queued": refused, "sent": s.get("sent"), "dropped": s.get("dropped"), "cpu_s": cpu_s() - c0})
    wait_go()  # until the driver has taken its readings
    client.close()


if __name__ == "__main__" and sys.argv[1:2] == ["_client"]:
    client_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    sys.exit(0)


# ================================================================ driver

sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(HERE))  # gateway_vs_direct.py

# benches/compare/compare.py: child processes, z4j-agentd, the brain's SQLite, the machine, CPU of others
from compare import (CHILDREN, BrainDB, Daemon, ForeignCpu, fmt, free_port, fresh_dir, git_commit,  # noqa: E402
                     host, kill_tree, loadavg, spawn)
from gateway_vs_direct import group_cpu_seconds, wait_brain_quiet  # noqa: E402

# The brain's request limit for this run: long-poll uploads up to 1 MiB.
BRAIN_MAX_PAYLOAD = 1_048_576
HIST = "z4j_agentd_brain_ack_latency_seconds"


def log(msg: str) -> None:
    print(f"[transport-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_mode(mode: str) -> dict:
    """"ws" or "lp<bytes>" -> the daemon's transport settings."""
    if mode == "ws":
        return {"transport": "ws", "budget": None}
    m = re.fullmatch(r"lp(\d+)", mode)
    if not m or not 1024 <= int(m.group(1)) <= BRAIN_MAX_PAYLOAD:
        raise ValueError(f"mode {mode!r}: ws, or lp<bytes> with 1024 <= bytes <= {BRAIN_MAX_PAYLOAD}")
    return {"transport": "longpoll", "budget": int(m.group(1))}


def label(mode: str) -> str:
    b = parse_mode(mode)["budget"]
    if b is None:
        return "WebSocket"
    size = f"{b // 1048576} MiB" if b % 1048576 == 0 else f"{b // 1024} KiB" if b % 1024 == 0 else f"{b} B"
    return f"long-poll {size}"


class TransportDaemon(Daemon):
    """z4j-agentd on one transport, with its metrics listener and a JSON log
    that has the long-poll upload lines."""

    def __init__(self, binary: Path, work: Path, brain_url: str, agent: dict, mode: str) -> None:
        t = parse_mode(mode)
        self.metrics_port = free_port()
        extra = {"Z4J_PROJECT_ID": agent["project_slug"], "Z4J_AGENT_NAME": f"transport-bench-{mode}",
                 "Z4J_TRANSPORT": t["transport"], "Z4J_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
                 "Z4J_LOG_FORMAT": "json", "Z4J_LOG_LEVEL": "info,z4j_agentd::uplink::longpoll=debug"}
        if t["budget"] is not None:
            extra["Z4J_LONGPOLL_MAX_BODY_BYTES"] = str(t["budget"])
        super().__init__(binary, work, brain_url, agent["token"], agent["hmac_secret"], extra)
        self.log_path = work / "daemon.log"
        self.wait_connected(30)
        want = "websocket" if t["transport"] == "ws" else "longpoll"
        if self.stats().get("transport") != want:
            raise RuntimeError(f"{mode}: the daemon runs on {self.stats().get('transport')}, not {want}")

    def histogram(self) -> dict:
        """The ack-latency histogram: {"buckets": [(le, cumulative count)], "sum", "count"}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        buckets = [(float("inf") if le == "+Inf" else float(le), int(float(v)))
                   for le, v in re.findall(rf'^{HIST}_bucket\{{le="([^"]+)"\}} (\S+)$', text, re.M)]
        s = re.search(rf"^{HIST}_sum (\S+)$", text, re.M)
        c = re.search(rf"^{HIST}_count (\S+)$", text, re.M)
        if not buckets or not s or not c:
            raise RuntimeError(f"{HIST} missing from /metrics")
        return {"buckets": sorted(buckets), "sum": float(s.group(1)), "count": int(float(c.group(1)))}


def histogram_delta(a: dict, b: dict) -> dict:
    before = dict(a["buckets"])
    return {"buckets": [(le, n - before.get(le, 0)) for le, n in b["buckets"]],
            "sum": b["sum"] - a["sum"], "count": b["count"] - a["count"]}


def histogram_quantile(q: float, h: dict):
    """Prometheus' histogram_quantile: linear within the bucket that holds rank q * count;
    the largest finite bound when it falls in +Inf. None without samples."""
    total = h["count"]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    finite = [le for le, _ in h["buckets"] if le != float("inf")]
    for le, cum in h["buckets"]:
        if cum >= rank:
            if le == float("inf"):
                return finite[-1] if finite else None
            if cum == below:
                return le
            return lower + (le - lower) * (rank - below) / (cum - below)
        lower, below = le, cum
    return finite[-1] if finite else None


def upload_lines(path: Path, start: int, end: int) -> list:
    """The daemon's `long-poll upload` debug lines between two offsets of its JSON log."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(max(0, end - start)).decode(errors="replace")
    out = []
    for line in text.splitlines():
        if '"long-poll upload"' not in line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def daemon_log_counts(path: Path, start: int, end: int) -> dict:
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(max(0, end - start)).decode(errors="replace")
    levels: dict = {}
    for line in text.splitlines():
        m = re.search(r'"level":"(WARN|ERROR)"', line)
        if m:
            levels[m.group(1)] = levels.get(m.group(1), 0) + 1
    return {"warnings": levels.get("WARN", 0), "errors": levels.get("ERROR", 0),
            "http_429": text.count("answered HTTP 429"), "http_413": text.count("(HTTP 413)")}


def wait_all_acked(daemon: TransportDaemon, acked0: int, n: int, timeout: float = 120) -> dict:
    """The daemon's stats once the brain has acknowledged all n events (spool empty)."""
    deadline = time.monotonic() + timeout
    while True:
        st = daemon.stats()
        if st.get("acked", 0) - acked0 >= n and st.get("spool_depth", 1) == 0:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon has {st.get('acked', 0) - acked0} of {n} acknowledgements, "
                               f"spool depth {st.get('spool_depth')}, after {timeout:.0f} s")
        time.sleep(0.05)


def run_mode(mode: str, args, brain, agent: dict, work: Path, client_python: Path, foreign) -> dict:
    n = args.events
    run_id = uuid.uuid4().hex[:8]
    like = f"tb-{mode}-{run_id}-%"
    agent_hex = uuid.UUID(agent["agent_id"]).hex
    mwork = fresh_dir(work / mode)
    pgid = brain.pid()
    quiet = wait_brain_quiet(pgid, 30)
    daemon = TransportDaemon(args.agentd, mwork / "daemon", brain.url, agent, mode)
    db = BrainDB(brain.db_path)
    client = None
    try:
        env = {"PATH": f"{client_python.parent}:/usr/bin:/bin", "HOME": str(fresh_dir(mwork / "client-home")),
               "LANG": "C.UTF-8"}
        client = spawn([client_python, Path(__file__).resolve(), "_client", daemon.socket, n,
                        f"tb-{mode}-{run_id}"], env, mwork / "client.log",
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = client.stdout.readline()
        ready = json.loads(line) if line.startswith("{") else None
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"{mode}: client not ready (exit {client.poll()}); see {mwork / 'client.log'}")
        st0 = daemon.stats()
        h0 = daemon.histogram()
        dlog0 = daemon.log_path.stat().st_size
        blog0 = brain.log_path.stat().st_size if brain.log_path.exists() else 0
        dcpu0 = proc_cpu_seconds(daemon.pid)
        bcpu0 = group_cpu_seconds(pgid)
        foreign0 = foreign.seconds()
        log(f"{mode}: daemon on {st0.get('transport')}, brain {quiet:.0f} % busy before; go")
        client.stdin.write("go\n")
        client.stdin.flush()
        deadline = time.monotonic() + args.timeout
        timeline = []  # (monotonic time, events stored) at each change
        while True:
            stored = db.count_prefix(agent_hex, like)
            if not timeline or stored != timeline[-1][1]:
                timeline.append((time.monotonic(), stored))
            if stored >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the brain stored {stored} of {n} events in {args.timeout:.0f} s")
            if client.poll() is not None:
                raise RuntimeError(f"{mode}: the client exited with {client.returncode}; see {mwork / 'client.log'}")
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"{mode}: z4j-agentd exited with {daemon.proc.returncode}")
            time.sleep(0.1)
        t_stored = time.monotonic()
        bcpu = group_cpu_seconds(pgid) - bcpu0
        dcpu = proc_cpu_seconds(daemon.pid) - dcpu0
        foreign_s = foreign.seconds() - foreign0
        dlog1 = daemon.log_path.stat().st_size
        line = client.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError(f"{mode}: the client gave no result (exit {client.poll()})")
        cr = json.loads(line)
        st1 = wait_all_acked(daemon, st0.get("acked", 0), n)
        h = histogram_delta(h0, daemon.histogram())
        dmem = proc_mem_kb(daemon.pid)
        client.stdin.write("stop\n")
        client.stdin.flush()
        client.wait(30)
        rows = db.rows_by_task(agent_hex, like)
    finally:
        if client is not None:
            kill_tree(client)
        db.close()
        daemon.stop()
    # Every (task, kind) of this mode exactly once, nothing else.
    bad = {t: k for t, k in rows.items() if k != {kind: 1 for kind in KINDS}}
    if len(rows) != n // 3 or bad:
        raise RuntimeError(f"{mode}: {len(rows)} tasks in the brain (want {n // 3}); "
                           f"{len(bad)} without exactly one row per kind, e.g. {list(bad.items())[:3]}")
    if not cr["flushed"] or cr["not_queued"] or cr.get("dropped"):
        raise RuntimeError(f"{mode}: the client did not hand over every event: {cr}")
    t0 = cr["t0"]
    seconds = t_stored - t0

    def reached(share: float) -> float:
        return next(t for t, k in timeline if k >= share * n) - t0

    gaps = [(b[0] - a[0], n - a[1]) for a, b in zip(timeline, timeline[1:])]
    gap_s, gap_missing = max(gaps) if gaps else (0.0, 0)
    with open(brain.log_path, "rb") as f:
        f.seek(blog0)
        brain_log = f.read().decode(errors="replace")
    t = parse_mode(mode)
    out = {
        "mode": mode, "label": label(mode), "transport": t["transport"], "max_body_bytes": t["budget"],
        "events": n, "brain_cpu_pct_before": round(quiet, 1),
        "seconds": seconds, "events_per_s": n / seconds, "foreign_cpu_s": round(foreign_s, 2),
        "seconds_to_99pct": reached(0.99), "events_per_s_to_99pct": 0.99 * n / reached(0.99),
        "longest_gap_s": gap_s, "events_missing_during_longest_gap": gap_missing,
        "emit_s": cr["t_emitted"] - t0, "committed_by_daemon_s": cr["t_committed"] - t0, "client_cpu_s": cr["cpu_s"],
        "brain_cpu_s": bcpu, "brain_cpu_ms_per_event": 1000 * bcpu / n, "brain_cpu_pct": 100 * bcpu / seconds,
        "brain_acks_withheld": brain_log.count("withholding ack so the agent re-sends"),
        "brain_log_warnings_errors": sum(1 for ln in brain_log.splitlines()
                                         if re.search(r'"level": "(warning|error|critical)"', ln)),
        "daemon_cpu_s": dcpu, "daemon_rss_kb": dmem["VmRSS"], "daemon_hwm_kb": dmem["VmHWM"],
        "daemon_forwarded": st1["forwarded"] - st0["forwarded"], "daemon_resent": st1["resent"] - st0["resent"],
        "daemon_brain_duplicates": st1["brain_duplicates"] - st0["brain_duplicates"],
        "daemon_connects_during_run": st1["connects"] - st0["connects"],
        "daemon_failures_by_class": st1.get("failures_by_class"),
        "daemon_log": daemon_log_counts(daemon.log_path, dlog0, dlog1),
        "ack_latency": {"samples": h["count"], "mean_s": h["sum"] / h["count"] if h["count"] else None,
                        "p50_s": histogram_quantile(0.5, h), "p99_s": histogram_quantile(0.99, h),
                        "buckets": [["+Inf" if le == float("inf") else le, c] for le, c in h["buckets"]]},
        "rows_checked": sum(sum(k.values()) for k in rows.values()),
    }
    if t["transport"] == "longpoll":
        ups = upload_lines(daemon.log_path, dlog0, dlog1)
        with_events = [u for u in ups if u.get("events", 0) > 0]
        ev_frames = sum(u["frames"] - u.get("other_frames", 0) for u in with_events)
        out.update({
            "uploads": len(ups), "uploads_with_events": len(with_events),
            "upload_events": sum(u["events"] for u in with_events),
            "upload_event_batch_frames": ev_frames,
            "upload_other_frames": sum(u.get("other_frames", 0) for u in ups),
            "upload_bytes": sum(u["bytes"] for u in ups),
            "upload_bytes_max": max((u["bytes"] for u in ups), default=0),
            "events_per_upload": sum(u["events"] for u in with_events) / len(with_events) if with_events else None,
            "frames_per_upload": ev_frames / len(with_events) if with_events else None,
            "events_per_frame": sum(u["events"] for u in with_events) / ev_frames if ev_frames else None,
            "bytes_per_upload": (sum(u["bytes"] for u in with_events) / len(with_events)) if with_events else None,
            # each upload in order: [frames, events, other frames, bytes]
            "upload_list": [[u["frames"], u.get("events", 0), u.get("other_frames", 0), u["bytes"]] for u in ups],
        })
        out["requests_to_brain"] = out["uploads"]
        if not ups:
            raise RuntimeError(f"{mode}: no `long-poll upload` lines in {daemon.log_path}")
    else:
        frames = h["count"]  # one sample per acknowledged event_batch frame
        out.update({"uploads": None, "uploads_with_events": frames, "upload_event_batch_frames": frames,
                    "events_per_upload": n / frames if frames else None, "frames_per_upload": 1.0,
                    "events_per_frame": n / frames if frames else None, "requests_to_brain": frames})
    out["brain_cpu_ms_per_upload"] = 1000 * bcpu / out["uploads_with_events"] if out["uploads_with_events"] else None
    return out


def fit_costs(modes: dict, per: str):
    """Least squares over the long-poll modes: brain CPU s = a * events + b * `per`
    (uploads that carried events, or their event_batch frames), when at least two
    modes differ in it."""
    pts = [(r["events"], r[per], r["brain_cpu_s"]) for r in modes.values()
           if r["transport"] == "longpoll" and r.get(per)]
    if len(pts) < 2 or len({u for _, u, _ in pts}) < 2:
        return None
    see = sum(e * e for e, _, _ in pts)
    suu = sum(u * u for _, u, _ in pts)
    seu = sum(e * u for e, u, _ in pts)
    sec = sum(e * c for e, _, c in pts)
    suc = sum(u * c for _, u, c in pts)
    det = see * suu - seu * seu
    if abs(det) < 1e-9:
        return None
    a = (sec * suu - suc * seu) / det
    b = (suc * see - sec * seu) / det
    return {"brain_cpu_ms_per_event": 1000 * a, "brain_cpu_ms_per_unit": 1000 * b, "per": per, "modes": len(pts)}


def render(res: dict) -> str:
    m = res["modes"]
    cols = list(m)

    def ms(v):
        return fmt(None if v is None else 1000 * v, 1)

    def latency(r):
        a = r["ack_latency"]
        if a["samples"] < 20:  # a bucket's bounds, not a measurement
            return f"{ms(a['mean_s'])} / - / -, {fmt(a['samples'])}"
        return f"{ms(a['mean_s'])} / {ms(a['p50_s'])} / {ms(a['p99_s'])}, {fmt(a['samples'])}"

    rows = [
        ("events stored", lambda r: fmt(r["events"])),
        ("seconds, first emit to last stored", lambda r: fmt(r["seconds"], 1)),
        ("**events/s stored**", lambda r: f"**{fmt(r['events_per_s'], 1)}**"),
        ("events/s to 99 % stored", lambda r: fmt(r["events_per_s_to_99pct"], 1)),
        ("longest stretch with no new row (s)", lambda r: fmt(r["longest_gap_s"], 1)),
        ("**brain CPU ms per event**", lambda r: f"**{fmt(r['brain_cpu_ms_per_event'], 2)}**"),
        ("brain CPU % of one core", lambda r: fmt(r["brain_cpu_pct"])),
        ("uploads with events (WebSocket: event_batch frames)", lambda r: fmt(r["uploads_with_events"])),
        ("... all uploads (with heartbeats)", lambda r: fmt(r.get("uploads"))),
        ("event_batch frames per upload", lambda r: fmt(r.get("frames_per_upload"), 1)),
        ("**events per upload** (WebSocket: per frame)", lambda r: f"**{fmt(r['events_per_upload'], 1)}**"),
        ("bytes per upload, mean / max", lambda r: f"{fmt(r.get('bytes_per_upload'))} / "
                                                   f"{fmt(r.get('upload_bytes_max'))}"
         if r.get("bytes_per_upload") else "-"),
        ("brain CPU ms per upload (per frame)", lambda r: fmt(r["brain_cpu_ms_per_upload"], 1)),
        ("ack latency ms: mean / p50 / p99, samples",
         latency),
        ("daemon CPU s / client CPU s", lambda r: f"{fmt(r['daemon_cpu_s'], 2)} / {fmt(r['client_cpu_s'], 2)}"),
        ("re-sent events / new sessions during the run",
         lambda r: f"{fmt(r['daemon_resent'])} / {fmt(r['daemon_connects_during_run'])}"),
        ("daemon warnings (of them HTTP 429) / brain warnings+errors",
         lambda r: f"{fmt(r['daemon_log']['warnings'])} ({fmt(r['daemon_log']['http_429'])}) / "
                   f"{fmt(r['brain_log_warnings_errors'])}"),
        ("every (task, kind) stored once", lambda r: f"yes ({fmt(r['rows_checked'])} rows)"),
        ("CPU s of other processes meanwhile", lambda r: fmt(r["foreign_cpu_s"], 1)),
    ]
    mc = res["machine"]
    L = [f"# the same events over the WebSocket and over long-poll, {res['started_at']}", "",
         f"{res['params']['events']} events per mode into one z4j 1.13.0 brain (SQLite, "
         f"Z4J_MAX_PAYLOAD_SIZE_BYTES={BRAIN_MAX_PAYLOAD}); machine {mc['nproc']} CPU ({mc['cpu_model']}); "
         f"git {mc['git_commit']}; load average at start {' '.join(mc['loadavg_at_start'])}; other processes' "
         f"CPU during the run: {res.get('foreign_cpu_s', '?')} s", "",
         "| | " + " | ".join(m[c]["label"] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, f in rows:
        L.append(f"| {name} | " + " | ".join(f(m[c]) for c in cols) + " |")
    fits = [f for f in (res.get("fit_uploads"), res.get("fit_frames")) if f]
    if fits:
        L += ["", f"Least squares over the {fits[0]['modes']} long-poll modes, each fit on its own: brain CPU = "
              + "; or = ".join(f"{f['brain_cpu_ms_per_event']:.2f} ms per event + {f['brain_cpu_ms_per_unit']:.1f} ms "
                               f"per {'upload' if f['per'] == 'uploads_with_events' else 'event_batch frame'}"
                               for f in fits) + "."]
    L += ["", "Ack latency: the daemon's histogram over the mode; the mean is exact (_sum / _count), p50 and p99 are "
          "interpolated within its buckets and shown only from 20 samples on."]
    return "\n".join(L)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", "-e", type=int, default=3000, help="events per mode (a multiple of 3)")
    ap.add_argument("--modes", default="ws,lp8192,lp65536,lp1048576",
                    help="comma-separated, run in this order: ws, lp<max body bytes>")
    ap.add_argument("--agentd", type=Path, default=REPO / "target" / "release" / "z4j-agentd")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mode for the brain to store all")
    ap.add_argument("--settle", type=float, default=61,
                    help="seconds to wait after a long-poll mode (the brain's per-address request window)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) after a good run")
    args = ap.parse_args()
    modes = [x for x in args.modes.split(",") if x]
    try:
        for x in modes:
            parse_mode(x)
    except ValueError as e:
        ap.error(str(e))
    if args.events % 3 or args.events <= 0 or not modes or len(set(modes)) != len(modes):
        ap.error("--events must be a positive multiple of 3; --modes distinct, at least one")
    args.agentd = args.agentd.absolute()
    if not os.access(args.agentd, os.X_OK):
        ap.error(f"{args.agentd} missing: cargo build --release --bin z4j-agentd")

    import brain as e2e_brain  # tests/e2e/brain.py
    venv = e2e_brain.ensure_venv()  # z4j 1.13.0 and this repository's Python client
    client_python = venv / "bin" / "python"

    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    foreign = ForeignCpu()
    foreign0 = foreign.seconds()
    work = Path(tempfile.mkdtemp(prefix="z4j-transportbench."))
    os.chmod(work, 0o700)
    res = {"started_at": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
           "params": {"events": args.events, "modes": modes, "agentd": str(args.agentd),
                      "brain_max_payload_size_bytes": BRAIN_MAX_PAYLOAD, "settle_s": args.settle},
           "machine": {**host(), "git_commit": git_commit(), "loadavg_at_start": loadavg(),
                       "z4j_agentd": subprocess.run([str(args.agentd), "--version"], capture_output=True,
                                                    text=True).stdout.strip()},
           "modes": {}}
    brain = e2e_brain.Brain(work / "brain", venv=venv, env={"Z4J_MAX_PAYLOAD_SIZE_BYTES": str(BRAIN_MAX_PAYLOAD)})
    ok = False
    try:
        log(f"work dir {work}; starting the brain")
        took = brain.start()
        agent = brain.mint_agent(f"transport-bench-{uuid.uuid4().hex[:6]}")
        log(f"brain pid {brain.pid()} on {brain.url} healthy after {took:.1f} s; agent minted")
        for i, mode in enumerate(modes):
            if i and parse_mode(modes[i - 1])["transport"] == "longpoll" and args.settle > 0:
                log(f"waiting {args.settle:.0f} s for the brain's per-address request window to pass")
                time.sleep(args.settle)
            r = run_mode(mode, args, brain, agent, work, client_python, foreign)
            res["modes"][mode] = r
            log(f"{mode}: {r['events']} events in {r['seconds']:.1f} s = {r['events_per_s']:.1f} events/s; "
                f"brain {r['brain_cpu_ms_per_event']:.2f} ms CPU/event ({r['brain_cpu_pct']:.0f} %); "
                f"{r['uploads_with_events']} uploads/frames of {r['events_per_upload']:.1f} events")
        ok = True
    finally:
        for p in CHILDREN:
            kill_tree(p)
        brain.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    res["fit_uploads"] = fit_costs(res["modes"], "uploads_with_events")
    res["fit_frames"] = fit_costs(res["modes"], "upload_event_batch_frames")
    res["total_s"] = time.monotonic() - t_start
    res["foreign_cpu_s"] = round(foreign.seconds() - foreign0, 1)
    res["machine"]["loadavg_at_end"] = loadavg()
    out = args.json or HERE / "results" / f"transport-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res))
    log(f"wrote {out} ({res['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
