#!/usr/bin/env python3
"""Driver of benches/compare/run.sh: the stock Python agent (z4j-bare 1.13.0)
and z4j-agentd side by side on this machine, in one go.

Runs under the brain venv's interpreter (z4j 1.13.0, websockets, msgpack);
run.sh creates both venvs and builds the release binaries, then calls

    compare.py --runs 3 --bare-python V/bin/python --agentd BIN --loadgen BIN --out DIR

Cases (each --runs times, median reported with every run):

A. hot path, brain unreachable (a closed loopback port)
   A1  z4j-bare: a started AgentRuntime, N record_event(Event) calls in one thread
   A2  z4j-agentd: `examples/loadgen.rs` durable ingest, 1 client x 1 event/msg
       (one ack awaited per event) and 8 clients x 100 events/msg
B. end to end into one real z4j 1.13.0 brain (tests/e2e/brain.py), events/s
   from the first event written until the brain's SQLite holds the last one
   B1  z4j-bare record_event + its own send loop
   B2  z4j-agentd (release) + one local client writing over the socket
   B3  the ceiling: a direct protocol client, 100 events/frame, 1 frame in flight
   B4  the same direct client with z4j-agentd's batching: 250 events/frame, 2 in flight

`compare.py render RESULT.json` prints the tables of a saved result again.

Import-safe (stdlib only, nothing runs on import): benches/gateway_vs_direct.py
and benches/transport.py take their child-process, z4j-agentd, brain-database
and machine helpers from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(HERE))

from common import CLK_TCK, all_proc_stats, proc_cpu_seconds, proc_mem_kb  # noqa: E402

# Any valid 32-byte secret will do while the brain is unreachable.
OFFLINE_SECRET = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU="
CHILDREN: list = []
B_CASES = ("b1_stock", "b2_agentd", "b3_ceiling", "b4_direct")


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): connect() is refused, bind() works."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.chmod(path, 0o700)
    return path


def last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON result in output:\n{text[-2000:]}")
    return json.loads(lines[-1])


def kill_tree(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()
        p.wait()


def spawn(argv, env, log_path: Path, **kw) -> subprocess.Popen:
    """Start a child in its own session, stderr appended to log_path; kill_tree(CHILDREN) ends them all."""
    with open(log_path, "ab") as logf:
        p = subprocess.Popen([str(a) for a in argv], env=env, stderr=logf, start_new_session=True, **kw)
    CHILDREN.append(p)
    return p


class ForeignCpu(threading.Thread):
    """CPU seconds used by user processes that are NOT this driver or its descendants
    (the brain, daemons, agents and clients are all its descendants), sampled from
    /proc every 0.5 s. Kernel threads are left out (they mostly do our own I/O)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me = os.getpid()
        self.ticks: dict = {}
        self.foreign = 0
        self.lock = threading.Lock()
        self.scan(count=False)
        self.start()

    def scan(self, count: bool = True) -> None:
        procs = {pid: (int(v[1]), int(v[11]) + int(v[12])) for pid, v in all_proc_stats()}  # ppid, utime + stime
        ours = {self.me}
        for pid in procs:
            chain, p = [], pid
            while p in procs and p not in ours and p > 2 and len(chain) < 64:
                chain.append(p)
                p = procs[p][0]
            if p in ours:
                ours.update(chain)
        delta = 0
        for pid, (ppid, ticks) in procs.items():
            kernel = pid == 2 or ppid == 2
            if count and pid not in ours and not kernel:
                delta += max(0, ticks - self.ticks.get(pid, 0))
        with self.lock:
            self.foreign += delta
            self.ticks = {pid: t for pid, (_, t) in procs.items()}

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001  a sampler must not kill the run
                log(f"foreign-CPU sampler: {exc!r}")

    def seconds(self) -> float:
        self.scan()
        with self.lock:
            return self.foreign / CLK_TCK


FOREIGN: ForeignCpu = None  # started by main()


def measured(fn, *a) -> dict:
    """Run one case; add the CPU seconds other processes used meanwhile."""
    f0 = FOREIGN.seconds()
    r = fn(*a)
    r["foreign_cpu_s"] = round(FOREIGN.seconds() - f0, 2)
    if r["foreign_cpu_s"] > 1.0:
        log(f"   WARNING: other processes used {r['foreign_cpu_s']:.1f} s of CPU during this run")
    return r


# ---------------------------------------------------------------- z4j-agentd process


class Daemon:
    def __init__(self, binary: Path, work: Path, brain_url: str, token: str, secret: str, extra=None) -> None:
        self.work = fresh_dir(work)
        self.home = fresh_dir(work / "home")
        self.socket = work / "agent.sock"
        env = base_env(self.home)
        env.update({"Z4J_BRAIN_URL": brain_url, "Z4J_TOKEN": token, "Z4J_HMAC_SECRET": secret,
                    "Z4J_PROJECT_ID": "default", "Z4J_SOCKET_PATH": str(self.socket),
                    "Z4J_AGENT_NAME": "compare-agentd"})
        env.update(extra or {})
        self.proc = spawn([binary, "run"], env, work / "daemon.log", stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"z4j-agentd exited with {self.proc.returncode}; see {work / 'daemon.log'}")
            try:
                if self.stats().get("type") == "stats":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"z4j-agentd did not answer on {self.socket} within 30 s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b'{"type":"stats"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def wait_connected(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (st := self.stats()).get("uplink_state") != "connected":
            if time.monotonic() > deadline:
                raise RuntimeError(f"z4j-agentd not connected to the brain after {timeout:.0f}s: "
                                   f"{st.get('uplink_state')} {st.get('last_error')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
        shutil.rmtree(self.home, ignore_errors=True)  # the spool can be hundreds of MB


# ---------------------------------------------------------------- A: hot path


def a1_bare_hotpath(args, work: Path, run: int) -> dict:
    home = fresh_dir(work / f"a1-{run}")
    env = base_env(home)
    env.update({"Z4J_BRAIN_URL": f"http://127.0.0.1:{free_port()}", "Z4J_TOKEN": "compare-offline",
                "Z4J_PROJECT_ID": "default", "Z4J_HMAC_SECRET": OFFLINE_SECRET})
    out = subprocess.run([args.bare_python, HERE / "bare_agent.py", "hotpath", str(args.hot_n), "2"],
                         env=env, capture_output=True, text=True, timeout=600)
    (work / f"a1-{run}.log").write_text(out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"bare_agent.py hotpath failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = last_json(out.stdout)
    if r["buffered_rows"] != args.hot_n or r["connected"]:
        raise RuntimeError(f"unexpected hot-path state: {r}")
    shutil.rmtree(home, ignore_errors=True)
    return r


def a2_agentd_ingest(args, work: Path, run: int, loadgen_args: list) -> dict:
    d = Daemon(args.agentd, work / f"a2-{run}", f"http://127.0.0.1:{free_port()}", "compare-offline",
               OFFLINE_SECRET, {"Z4J_SHUTDOWN_GRACE_SECONDS": "0", "Z4J_LOG_LEVEL": "warn",
                                "Z4J_BUFFER_SYNCHRONOUS": "normal"})
    try:
        time.sleep(2)  # as benches/ingest.sh: idle RSS after 2 s
        idle = proc_mem_kb(d.pid)["VmRSS"]
        out = subprocess.run([args.loadgen, "--socket", d.socket, "--daemon-pid", str(d.pid), "--json",
                              *loadgen_args], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed ({out.returncode}):\n{out.stderr[-3000:]}")
        r = last_json(out.stdout)
        st = d.stats()
        r.update({"idle_rss_kb": idle, "spool_depth": st.get("spool_depth"), "stored": st.get("stored")})
        if st.get("stored") != r["events"]:
            raise RuntimeError(f"daemon stored {st.get('stored')} of {r['events']} events")
    finally:
        d.stop()
    return r


# ---------------------------------------------------------------- B: end to end


class BrainDB:
    """Read-only view of the brain's SQLite file (as tests/e2e/harness.py brain_db), its `events` table."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)

    def max_rowid(self) -> int:
        return self.con.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]

    def count_since(self, rowid: int, agent_hex: str) -> int:
        return self.con.execute("SELECT COUNT(*) FROM events WHERE rowid > ? AND agent_id = ?",
                                (rowid, agent_hex)).fetchone()[0]

    def count_agent(self, agent_hex: str) -> int:
        return self.con.execute("SELECT COUNT(*) FROM events WHERE agent_id = ?", (agent_hex,)).fetchone()[0]

    def count_prefix(self, agent_hex: str, like: str) -> int:
        return self.con.execute("SELECT COUNT(*) FROM events WHERE agent_id = ? AND task_id LIKE ?",
                                (agent_hex, like)).fetchone()[0]

    def rows_by_task(self, agent_hex: str, like: str) -> dict:
        """{task_id: {kind: rows}} of the agent's tasks whose id is LIKE `like`."""
        out: dict = {}
        for task, kind, n in self.con.execute(
                "SELECT task_id, kind, COUNT(*) FROM events WHERE agent_id = ? AND task_id LIKE ? "
                "GROUP BY task_id, kind", (agent_hex, like)):
            out.setdefault(task, {})[kind] = n
        return out

    def close(self) -> None:
        self.con.close()


def b_case(args, brain, work: Path, case: str, run: int) -> dict:
    n = args.e2e_stock_n if case == "stock" else args.e2e_n
    agent = brain.mint_agent(f"compare-{case}-r{run}-{secrets.token_hex(3)}")
    agent_hex = uuid.UUID(agent["agent_id"]).hex
    prefix = f"cmp-{case}-r{run}-{secrets.token_hex(4)}"
    home = fresh_dir(work / f"b-{case}-{run}")
    env = base_env(home / "home")
    (home / "home").mkdir(mode=0o700)
    env.update({"Z4J_BRAIN_URL": brain.url, "Z4J_TOKEN": agent["token"], "Z4J_HMAC_SECRET": agent["hmac_secret"],
                "Z4J_PROJECT_ID": agent["project_slug"]})
    daemon = None
    if case == "stock":
        argv = [args.bare_python, HERE / "bare_agent.py", "e2e", n, prefix]
    elif case == "agentd":
        daemon = Daemon(args.agentd, home / "daemon", brain.url, agent["token"], agent["hmac_secret"])
        daemon.wait_connected()
        argv = [sys.executable, HERE / "agentd_client.py", daemon.socket, n, prefix]
    elif case == "ceiling":
        argv = [sys.executable, HERE / "ceiling.py", n, prefix, args.ceiling_batch, args.ceiling_window]
    else:
        argv = [sys.executable, HERE / "ceiling.py", n, prefix, args.direct_batch, args.direct_window]
    db = BrainDB(brain.db_path)
    p = spawn(argv, env, home / "client.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(p.stdout.readline() or "null")
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"{case} client not ready (exit {p.poll()}); see {home / 'client.log'}")
        brain_pid = brain.pid()
        base = db.max_rowid()
        brain_cpu0 = proc_cpu_seconds(brain_pid)
        daemon_cpu0 = proc_cpu_seconds(daemon.pid) if daemon else None
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + args.e2e_timeout
        while True:
            if db.max_rowid() - base >= n and db.count_since(base, agent_hex) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{case}: the brain stored {db.count_since(base, agent_hex)} of {n} "
                                   f"events in {args.e2e_timeout}s")
            if p.poll() not in (None, 0):
                raise RuntimeError(f"{case} client exited with {p.returncode}; see {home / 'client.log'}")
            time.sleep(0.1)
        t_stored = time.monotonic()
        brain_cpu = proc_cpu_seconds(brain_pid) - brain_cpu0
        daemon_cpu = proc_cpu_seconds(daemon.pid) - daemon_cpu0 if daemon else None
        daemon_mem = proc_mem_kb(daemon.pid) if daemon else None
        r = json.loads(p.stdout.readline() or "null")
        if not r:
            raise RuntimeError(f"{case} client gave no result (exit {p.wait()}); see {home / 'client.log'}")
        p.wait(60)
        total = db.count_agent(agent_hex)
    finally:
        kill_tree(p)
        db.close()
        if daemon:
            daemon.stop()
    if total != n:
        raise RuntimeError(f"{case}: the brain holds {total} events for the agent, expected {n}")
    elapsed = t_stored - r["t0"]
    out = {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "brain_cpu_s": brain_cpu,
           "brain_cpu_ms_per_event": 1000 * brain_cpu / n, "brain_cpu_pct": 100 * brain_cpu / elapsed,
           "write_s": r["t_written"] - r["t0"], "acked_s": r["t_drained"] - r["t0"],
           "client_cpu_s": r.get("client_cpu_s")}
    for k in ("client_rss_kb", "client_hwm_kb", "frames", "ack_ms_p50", "daemon_resent", "daemon_connects"):
        if k in r:
            out[k] = r[k]
    if daemon:
        out.update({"daemon_cpu_s": daemon_cpu, "daemon_rss_kb": daemon_mem["VmRSS"],
                    "daemon_hwm_kb": daemon_mem["VmHWM"]})
    return out


# ---------------------------------------------------------------- machine, versions


def cpu_idle_pct(seconds: float = 2.0) -> float:
    """Share of all CPUs' time idle (or waiting for I/O) over `seconds`, from /proc/stat."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return 100 * (i1 - i0) / max(1, t1 - t0)


def wait_idle(res: dict, phase: str, max_wait: float = 120, want: float = 90) -> None:
    """Wait (up to max_wait) until the machine is at least `want` % idle; record what was seen."""
    deadline = time.monotonic() + max_wait
    while (idle := cpu_idle_pct()) < want and time.monotonic() < deadline:
        log(f"waiting for an idle machine before {phase}: {idle:.0f} % idle")
    if idle < want:
        log(f"WARNING: only {idle:.0f} % idle before {phase}; something else is using the CPU")
    res["machine"].setdefault("cpu_idle_pct_before", {})[phase] = round(idle, 1)


def sh(*argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def host() -> dict:
    """CPUs, their model, memory and kernel of this machine."""
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem_kb / 2 ** 20, 1),
            "kernel": platform.release()}


def loadavg() -> list:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def git_commit() -> str:
    """The checkout's short HEAD, marked when tracked files differ from it."""
    commit = sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    if commit and sh("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"):
        commit += " (uncommitted changes)"
    return commit


def machine(args) -> dict:
    import importlib.metadata as md
    bare = sh(args.bare_python, str(HERE / "bare_agent.py"), "version")
    return {
        **host(), "os": sh("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"),
        "loadavg_at_start": loadavg(),
        "versions": {
            "z4j_agentd": sh(str(args.agentd), "--version"), "git_commit": git_commit(),
            "rustc": sh("rustc", "--version"),
            "z4j_brain": md.version("z4j"), "z4j_bare": json.loads(bare or "{}").get("z4j_bare", "?"),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "websockets": md.version("websockets"),
        },
    }


# ---------------------------------------------------------------- summary and tables


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(res: dict) -> dict:
    s = {}
    for key, runs in res["cases"].items():
        fields = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        s[key] = {k: med([r.get(k) for r in runs]) for k in fields}
        if "rss_kb" in runs[0]:
            s[key]["rss_kb"] = {k: med([r["rss_kb"][k] for r in runs]) for k in runs[0]["rss_kb"]}
    b = {k: s[k]["events_per_s"] for k in B_CASES if k in s}
    if len(b) == len(B_CASES):
        s["ratios"] = {"agentd_pct_of_ceiling": 100 * b["b2_agentd"] / b["b3_ceiling"],
                       "agentd_pct_of_direct_same_batching": 100 * b["b2_agentd"] / b["b4_direct"],
                       "stock_pct_of_ceiling": 100 * b["b1_stock"] / b["b3_ceiling"],
                       "agentd_over_stock": b["b2_agentd"] / b["b1_stock"]}
    return s


def fmt(v, nd=0) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def runs_list(runs, key, nd=0):
    return ", ".join(fmt(r.get(key), nd) for r in runs)


def foreign_line(cases: dict) -> str:
    runs = [(r.get("foreign_cpu_s"), key) for key, rows in cases.items() for r in rows]
    runs = [(v, k) for v, k in runs if v is not None]
    if not runs:
        return ""
    worst = max(runs)
    return (f"CPU used by processes other than the benchmark's during the measured runs: "
            f"{sum(v for v, _ in runs):.1f} s in total, at most {worst[0]:.1f} s in one run ({worst[1]}).")


def render(res: dict) -> str:
    m, c, s = res["machine"], res["cases"], res["summary"]
    v = m["versions"]
    L = [f"# z4j-bare vs z4j-agentd, {res['started_at']}", "",
         f"Machine: {m['nproc']} CPU ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}"
         f"{', ' + m['os'] if m.get('os') else ''}; load average at start {' '.join(m['loadavg_at_start'])}, "
         f"at end {' '.join(m.get('loadavg_at_end', ['?']))}; CPU idle just before each part: "
         + ", ".join(f"{k} {v:.0f} %" for k, v in m.get("cpu_idle_pct_before", {}).items()) + ".",
         f"Versions: z4j-agentd {v['z4j_agentd'].split()[-1] if v['z4j_agentd'] else '?'} (git {v['git_commit']}, "
         f"{v['rustc']}, release build); z4j-bare {v['z4j_bare']} and brain z4j {v['z4j_brain']} from PyPI; "
         f"Python {v['python']}, SQLite {v['sqlite']}, websockets {v['websockets']}.",
         f"Runs per case: {res['runs']}; medians, then every run in brackets. Total time {res['total_s']:.0f} s.",
         foreign_line(c), ""]
    if "a1_bare" in c:
        a1, a2a, a2b = c["a1_bare"], c.get("a2_agentd_1x1", []), c.get("a2_agentd_8x100", [])
        sa1 = s["a1_bare"]
        L += ["## A. Hot path, brain unreachable", "",
              "| case | events/s | per event p50 / p99 / p99.9 (µs) | CPU µs/event | RSS |",
              "|---|---|---|---|---|",
              f"| A1 z4j-bare `record_event`, 1 thread, {a1[0]['calls']:,} calls ({a1[0]['frame_bytes']} B frames) "
              f"| {fmt(sa1['calls_per_s'])} [{runs_list(a1, 'calls_per_s')}] "
              f"| {fmt(sa1['p50_us'])} / {fmt(sa1['p99_us'])} / {fmt(sa1['p999_us'])} "
              f"| {fmt(sa1['cpu_us_per_call'], 1)} (whole process) "
              f"| {sa1['rss_kb']['after_load'] / 1024:.1f} MB after load, per app process |"]
        for key, rows, label in (("a2_agentd_1x1", a2a, "1 client, 1 event/msg, each ack awaited"),
                                 ("a2_agentd_8x100", a2b, "8 clients, 100 events/msg, 4 msgs in flight")):
            if not rows:
                continue
            sa = s[key]
            L.append(f"| A2 z4j-agentd durable ingest, {label}, {rows[0]['events']:,} events ({rows[0]['event_bytes']} B) "
                     f"| {fmt(sa['events_per_s'])} [{runs_list(rows, 'events_per_s')}] "
                     f"| {fmt(sa['ack_p50_us'])} / {fmt(sa['ack_p99_us'])} / {fmt(sa['ack_p999_us'])}"
                     f"{'' if rows[0]['batch'] == 1 else ' per 100-event message'} "
                     f"| {fmt(sa['daemon_cpu_us_per_event'], 1)} (daemon) "
                     f"| {sa['idle_rss_kb'] / 1024:.1f} idle / {sa['daemon_hwm_kb'] / 1024:.1f} peak MB, per host |")
        r = sa1["rss_kb"]
        L += ["", f"z4j-bare process RSS (MB, medians): bare interpreter {r['bare_interpreter'] / 1024:.1f}, after "
              f"importing z4j {r['after_import'] / 1024:.1f}, runtime started and idle {r['started_idle'] / 1024:.1f}, "
              f"after the calls {r['after_load'] / 1024:.1f} (VmHWM {r['hwm'] / 1024:.1f}). z4j-agentd per-event "
              "latency is the round trip write -> durable ack (committed to its spool); z4j-bare's is the "
              "`record_event` call (committed to its buffer).", ""]
    if "b1_stock" in c:
        L += ["## B. End to end into one real brain", "",
              "| case | events/run | events/s stored | % of ceiling (B3) | time to store all (s) | brain CPU ms/event "
              "| brain CPU % | client/agent CPU s |",
              "|---|---|---|---|---|---|---|---|"]
        ceiling = s["b3_ceiling"]["events_per_s"] if "b3_ceiling" in s else None
        pr = res["params"]
        labels = {"b1_stock": "B1 z4j-bare (record_event, 1 event/frame, its send loop)",
                  "b2_agentd": "B2 z4j-agentd (1 local client, 1 event/msg durable; the daemon batches)",
                  "b3_ceiling": f"B3 ceiling: direct client, {pr['ceiling_batch']} events/frame, "
                                f"{pr['ceiling_window']} in flight",
                  "b4_direct": f"B4 direct client, {pr['direct_batch']} events/frame, {pr['direct_window']} in flight "
                               "(z4j-agentd's batching)"}
        for key, label in labels.items():
            rows = c.get(key)
            if not rows:
                continue
            sb = s[key]
            cpu = sb.get("client_cpu_s")
            if key == "b2_agentd":
                cpu_txt = f"client {fmt(cpu, 2)} + daemon {fmt(sb.get('daemon_cpu_s'), 2)}"
            else:
                cpu_txt = fmt(cpu, 2)
            pct = fmt(100 * sb["events_per_s"] / ceiling) + " %" if ceiling else "-"
            L.append(f"| {label} | {rows[0]['events']:,} | {fmt(sb['events_per_s'], 1)} "
                     f"[{runs_list(rows, 'events_per_s', 1)}] | {pct} | {fmt(sb['seconds'], 1)} "
                     f"| {fmt(sb['brain_cpu_ms_per_event'], 1)} | {fmt(sb['brain_cpu_pct'])} | {cpu_txt} |")
        if "ratios" in s:
            q = s["ratios"]
            L += ["", f"z4j-agentd stores **{q['agentd_over_stock']:.1f}x** the events/s of the stock agent; it "
                  f"reaches **{q['agentd_pct_of_ceiling']:.0f} %** of the ceiling case (100 events/frame, 1 in "
                  f"flight) and **{q['agentd_pct_of_direct_same_batching']:.0f} %** of a direct client with its own "
                  f"batching. The stock agent reaches {q['stock_pct_of_ceiling']:.0f} % of the ceiling case."]
        L += ["", "Events/s = events / (time the brain's SQLite holds the last event - time the first event was "
              "written). Each run mints a fresh agent; distinct tasks, 3 events each (received, started, "
              "succeeded), all new rows; the cases are interleaved run by run on the same brain.", ""]
    return "\n".join(L)


# ---------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bare-python", type=Path, required=True)
    ap.add_argument("--agentd", type=Path, required=True)
    ap.add_argument("--loadgen", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="results directory")
    ap.add_argument("--hot-n", type=int, default=20_000, help="A1 calls / A2 1x1 events per run")
    ap.add_argument("--ingest-n", type=int, default=400_000, help="A2 8x100 events per run")
    ap.add_argument("--e2e-n", type=int, default=3_000, help="B2/B3 events per run")
    ap.add_argument("--e2e-stock-n", type=int, default=1_500, help="B1 events per run (~27/s: ~55 s)")
    ap.add_argument("--ceiling-batch", type=int, default=100, help="B3 events per frame")
    ap.add_argument("--ceiling-window", type=int, default=1, help="B3 frames in flight")
    ap.add_argument("--direct-batch", type=int, default=250, help="B4 events per frame (z4j-agentd default)")
    ap.add_argument("--direct-window", type=int, default=2, help="B4 frames in flight (z4j-agentd default)")
    ap.add_argument("--e2e-timeout", type=float, default=600)
    ap.add_argument("--only", default="AB", help="A, B or AB")
    ap.add_argument("--idle-wait", type=float, default=120,
                    help="wait up to this many seconds for a >= 90%% idle CPU before A and before B")
    args = ap.parse_args()
    args.bare_python, args.agentd, args.loadgen = (p.absolute() for p in (args.bare_python, args.agentd, args.loadgen))
    for n in (args.e2e_n, args.e2e_stock_n):
        if n % 3:
            ap.error("end-to-end event counts must be multiples of 3 (whole task lifecycles)")

    global FOREIGN
    FOREIGN = ForeignCpu()
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="z4j-compare."))
    os.chmod(work, 0o700)
    res = {"started_at": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "runs": args.runs,
           "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": machine(args), "cases": {}}
    log(f"work dir {work}; load average {' '.join(res['machine']['loadavg_at_start'])}")
    cases = res["cases"]
    brain = None
    ok = False
    try:
        if "A" in args.only:
            wait_idle(res, "A", args.idle_wait)
            for r in range(1, args.runs + 1):
                log(f"A1 z4j-bare record_event x {args.hot_n:,}, run {r}")
                cases.setdefault("a1_bare", []).append(measured(a1_bare_hotpath, args, work, r))
                log(f"   {cases['a1_bare'][-1]['calls_per_s']:,.0f} calls/s")
            for key, lg in (("a2_agentd_1x1", ["--clients", "1", "--events", str(args.hot_n), "--batch", "1",
                                               "--pipeline", "1", "--durable"]),
                            ("a2_agentd_8x100", ["--clients", "8", "--events", str(args.ingest_n), "--batch",
                                                 "100", "--durable"])):
                for r in range(1, args.runs + 1):
                    log(f"A2 z4j-agentd {key}, run {r}")
                    cases.setdefault(key, []).append(measured(a2_agentd_ingest, args, work, r, lg))
                    log(f"   {cases[key][-1]['events_per_s']:,.0f} events/s")
        if "B" in args.only:
            wait_idle(res, "B", args.idle_wait)
            import brain as e2e_brain  # tests/e2e/brain.py (stdlib only)
            brain = e2e_brain.Brain(work / "brain", venv=Path(sys.prefix))
            log("starting the brain (z4j serve, fresh HOME, loopback)")
            took = brain.start()
            log(f"brain pid {brain.pid()} healthy on {brain.url} after {took:.1f}s")
            res["brain_start_s"] = took
            order = list(B_CASES)
            for r in range(1, args.runs + 1):
                k = (r - 1) % len(order)
                for key in order[k:] + order[:k]:  # rotate the order run by run
                    case = key.split("_", 1)[1]
                    log(f"B {case}, run {r}")
                    cases.setdefault(key, []).append(measured(b_case, args, brain, work, case, r))
                    x = cases[key][-1]
                    log(f"   {x['events']} events in {x['seconds']:.1f}s = {x['events_per_s']:.1f} events/s, "
                        f"brain CPU {x['brain_cpu_pct']:.0f} %")
        ok = True
    finally:
        for p in CHILDREN:
            kill_tree(p)
        if brain is not None:
            brain.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"FAILED; logs kept in {work}")
    res["total_s"] = time.monotonic() - t_start
    res["machine"]["loadavg_at_end"] = loadavg()
    res["summary"] = summarize(res)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    md = render(res)
    (args.out / f"{stamp}.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"{stamp}.md").write_text(md + "\n")
    print(md)
    log(f"wrote {args.out / (stamp + '.json')} and {args.out / (stamp + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
