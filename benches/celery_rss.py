#!/usr/bin/env python3
"""Memory of a Celery worker: without z4j, with z4j_agentd.celery.install(app),
and with the z4j-celery 1.13.0 agent.

    tests/e2e/.state/venv/bin/python benches/celery_rss.py [--runs 3] [--tasks 1000]
        [--agentd target/release/z4j-agentd] [--ref-venv DIR] [--work DIR]

Run it with a Python that has celery[redis], z4j==1.13.0 (the brain) and
the client (`clients/python`) installed: the e2e venv
(`python3 tests/e2e/brain.py venv` makes it). The z4j-celery agent gets a
venv of its own (`--ref-venv`, default tests/e2e/.state/celery-rss-ref-venv,
created on first use with
`pip install z4j-celery==1.13.0 celery[redis]==<this celery>`), so nothing
of it is importable in the other two.

What runs, all on 127.0.0.1 in a scratch directory:

* a redis-server (no persistence): the broker (db 0) and result backend (db 1);
* a real z4j 1.13.0 brain (`tests/e2e/brain.py start`), with two agents;
* z4j-agentd (`--agentd`) connected to the brain with the first agent;
* for each run and each of the three ways, in turn (the order rotates from
  run to run), a fresh worker
  `celery -A celery_rss_app worker --pool=prefork --concurrency=2`
  (benches/celery_rss_app.py; `BENCH_MODE` none, agentd or z4j-celery; the
  z4j-celery worker has the second agent's Z4J_* environment and starts its
  embedded agent, which connects to the brain: the script waits until the
  brain lists that agent online). Then 100 warm-up tasks, then `--tasks`
  tasks (a 512-byte argument, a dict result; 10,000 fill what the
  integration remembers per task to its bound), all waited for through the
  result backend; 3 s to settle; then the memory of the main process and of
  its two pool children, from /proc: VmRSS, and Pss (from smaps_rollup: the
  pages shared copy-on-write by the children counted once, the honest sum).
  Also the CPU time of the worker's three processes per task during the
  load (/proc/<pid>/stat), and tasks/s; the brain stores the events on the
  same machine, so tasks/s falls with what the brain is given to do and
  says little about the worker itself.

`--modes` picks the ways (the first is the baseline); besides the three,
`agentd-no-daemon` is `install(app)` with no daemon listening: the
integration builds and queues every event, which is then dropped, so its
CPU is what the signal receivers cost without any hand-over.

Prints one line per run and way, then the medians over the runs, as a
Markdown table for BENCHMARKS.md; with `--json FILE` also writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHES = REPO / "benches"
BRAIN_PY = REPO / "tests" / "e2e" / "brain.py"
MODES = ("none", "agentd", "z4j-celery", "agentd-no-daemon")
LABELS = {"none": "no z4j", "agentd": "`z4j_agentd.celery.install(app)`", "z4j-celery": "z4j-celery 1.13.0",
          "agentd-no-daemon": "`install(app)`, no daemon running"}
WARMUP_TASKS = 100
SETTLE_SECONDS = 3.0
PAYLOAD = "x" * 512


def log(msg: str) -> None:
    print(f"[celery-rss] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}: {last}")


# ---------------------------------------------------------------- /proc


def mem_kb(pid: int) -> dict:
    """VmRSS (status) and Pss (smaps_rollup) of one process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1])
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    """utime + stime of these processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children_of(pid: int) -> list:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                with open(entry / "stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)


# ---------------------------------------------------------------- the pieces


class Redis:
    def __init__(self, work: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        (work / "redis").mkdir()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work / "redis"), "--logfile", str(work / "redis" / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG"), None
            except OSError as exc:
                return False, exc

        wait_for(up, 20, "redis-server")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Brain:
    """A real z4j 1.13.0 brain through tests/e2e/brain.py (its own state under `work`)."""

    def __init__(self, work: Path, venv: Path) -> None:
        self.state = work / "brain"
        self.env = {**os.environ, "Z4J_E2E_VENV": str(venv)}
        out = subprocess.run([sys.executable, str(BRAIN_PY), "start", "--state", str(self.state)], env=self.env,
                             check=True, capture_output=True, text=True).stdout
        self.agent_env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        out = subprocess.run([sys.executable, str(BRAIN_PY), "mint", "--state", str(self.state), "--name",
                              f"rss-z4j-celery-{os.getpid()}"], env=self.env, check=True, capture_output=True,
                             text=True).stdout
        self.ref_env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def agent_state(self, agent_id: str) -> str:
        base, slug = self.agent_env["Z4J_BRAIN_URL"], self.agent_env["Z4J_PROJECT_SLUG"]
        req = urllib.request.Request(f"{base}/api/v1/projects/{slug}/agents")
        req.add_header("Authorization", f"Bearer {self.agent_env['Z4J_API_KEY']}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            agents = json.loads(resp.read())
        return next((a["state"] for a in agents if a["id"] == agent_id), "absent")

    def stop(self) -> None:
        subprocess.run([sys.executable, str(BRAIN_PY), "stop", "--state", str(self.state)], env=self.env,
                       capture_output=True)


class Daemon:
    def __init__(self, binary: Path, work: Path, brain: Brain) -> None:
        home = work / "agentd-home"
        home.mkdir(mode=0o700)
        self.socket = work / "agentd.sock"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
               "Z4J_SOCKET_PATH": str(self.socket), "Z4J_LOG_LEVEL": "warn",
               **{k: brain.agent_env[k] for k in ("Z4J_BRAIN_URL", "Z4J_TOKEN", "Z4J_HMAC_SECRET",
                                                  "Z4J_PROJECT_ID", "Z4J_AGENT_NAME")}}
        self.log = open(work / "agentd.log", "wb")
        self.proc = subprocess.Popen([str(binary), "run"], env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: (self.stats().get("uplink_state") == "connected", None), 60,
                 "z4j-agentd to connect to the brain")

    def stats(self) -> dict:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(self.socket))
                s.sendall(b'{"type": "stats"}\n')
                return json.loads(s.makefile("rb").readline())
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def ensure_ref_venv(path: Path) -> Path:
    import celery

    py = path / "bin" / "python"
    check = "import z4j_celery, celery, sys; sys.exit(0 if celery.__version__ == sys.argv[1] else 3)"
    if py.exists() and subprocess.run([str(py), "-c", check, celery.__version__], capture_output=True).returncode == 0:
        return py
    log(f"creating {path} with z4j-celery==1.13.0 and celery[redis]=={celery.__version__}")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "z4j-celery==1.13.0",
                    f"celery[redis]=={celery.__version__}"], check=True)
    return py


# ---------------------------------------------------------------- one run


def run_worker(mode: str, python: Path, work: Path, run: int, redis: Redis, brain: Brain, daemon: Daemon,
               sender, n_tasks: int) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONPATH": str(BENCHES),
           "HOME": str(work), "BENCH_MODE": "agentd" if mode.startswith("agentd") else mode,
           "BENCH_BROKER": redis.url(0), "BENCH_BACKEND": redis.url(1)}
    if mode == "agentd":
        env["Z4J_SOCKET_PATH"] = str(daemon.socket)
    if mode == "agentd-no-daemon":
        # The integration's own cost: events are built and queued, then dropped (no socket).
        env["Z4J_SOCKET_PATH"] = str(work / "no-daemon.sock")
    if mode == "z4j-celery":
        z4j_home = work / f"z4j-home-{run}"
        z4j_home.mkdir(mode=0o700)
        env.update({k: brain.ref_env[k] for k in ("Z4J_BRAIN_URL", "Z4J_TOKEN", "Z4J_HMAC_SECRET",
                                                    "Z4J_PROJECT_ID", "Z4J_AGENT_NAME")})
        env["Z4J_HOME"] = str(z4j_home)
    log_path = work / f"worker-{mode}-{run}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            # The venv's `celery` script, not `python -m celery`: z4j-celery's bootstrap only starts
            # when argv[0] is a `celery` program.
            [str(python.parent / "celery"), "-A", "celery_rss_app", "worker", "--pool=prefork", "--concurrency=2",
             "--loglevel=INFO", "-n", f"rss-{mode}-{run}@%h", "--without-mingle", "--without-gossip"],
            env=env, cwd=str(work), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def ready():
            if proc.poll() is not None:
                raise SystemExit(f"{mode} worker exited with {proc.returncode}: {log_path}")
            return " ready." in log_path.read_text(errors="replace"), None

        wait_for(ready, 60, f"the {mode} worker to be ready")
        if mode == "z4j-celery":
            wait_for(lambda: ((s := brain.agent_state(brain.ref_env["Z4J_AGENT_ID"])) == "online", s), 60,
                     "the z4j-celery agent to be online in the brain")
        received_before = daemon.stats().get("received", 0)

        def load(n: int, tag: str) -> None:
            results = [sender.send_task("celery_rss_app.work", args=(i, PAYLOAD)) for i in range(n)]
            for i, r in enumerate(results):
                got = r.get(timeout=120)
                assert got["i"] == i, (tag, got)

        load(WARMUP_TASKS, "warm-up")
        kids = children_of(proc.pid)
        assert len(kids) == 2, f"{mode}: expected 2 pool children of {proc.pid}, found {kids}"
        cpu0 = cpu_seconds([proc.pid, *kids])
        t0 = time.monotonic()
        load(n_tasks, "load")
        took = time.monotonic() - t0
        time.sleep(SETTLE_SECONDS)
        # The same children (a replaced child would hide its CPU time and its memory).
        assert children_of(proc.pid) == kids, f"{mode}: the pool children changed during the load"
        cpu = cpu_seconds([proc.pid, *kids]) - cpu0
        main = mem_kb(proc.pid)
        child = [mem_kb(k) for k in kids]
        out = {"mode": mode, "run": run, "main_rss": main["rss"], "main_pss": main["pss"],
               "total_rss": main["rss"] + sum(c["rss"] for c in child),
               "total_pss": main["pss"] + sum(c["pss"] for c in child),
               "children_rss": [c["rss"] for c in child], "tasks_per_s": round(n_tasks / took, 1),
               "cpu_ms_per_task": round(cpu * 1000 / n_tasks, 3)}
        if mode == "agentd":
            out["daemon_received"] = daemon.stats().get("received", 0) - received_before
        if mode == "z4j-celery":
            out["agent_state"] = brain.agent_state(brain.ref_env["Z4J_AGENT_ID"])
        return out
    finally:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(10)


# ---------------------------------------------------------------- main


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=1000, help="tasks per run after the warm-up")
    ap.add_argument("--agentd", type=Path, default=REPO / "target" / "release" / "z4j-agentd")
    ap.add_argument("--ref-venv", type=Path, default=REPO / "tests" / "e2e" / ".state" / "celery-rss-ref-venv")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--modes", default="none,agentd,z4j-celery",
                    help=f"comma-separated, the first is the baseline; of {', '.join(MODES)}")
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    if not modes or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")

    try:
        import celery
        import z4j_agentd  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"run this with a Python that has celery[redis] and the client installed ({exc})")
    if not args.agentd.is_file():
        raise SystemExit(f"{args.agentd} not found: cargo build --release, or give --agentd")
    ref_python = ensure_ref_venv(args.ref_venv)
    work = args.work or Path(tempfile.mkdtemp(prefix="z4j-celery-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"scratch directory {work}")
    redis = brain = daemon = None
    rows = []
    try:
        redis = Redis(work)
        brain = Brain(work, Path(sys.prefix))
        daemon = Daemon(args.agentd, work, brain)
        sender = celery.Celery("rss-sender", broker=redis.url(0), backend=redis.url(1))
        sender.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
        pythons = {"none": Path(sys.executable), "agentd": Path(sys.executable), "z4j-celery": ref_python,
                   "agentd-no-daemon": Path(sys.executable)}
        for run in range(args.runs):
            order = modes[run % len(modes):] + modes[:run % len(modes)]
            for mode in order:
                r = run_worker(mode, pythons[mode], work, run, redis, brain, daemon, sender, args.tasks)
                rows.append(r)
                log(f"run {run} {mode}: main {mb(r['main_rss'])} MB RSS / {mb(r['main_pss'])} MB PSS; "
                    f"main + 2 children {mb(r['total_rss'])} MB RSS / {mb(r['total_pss'])} MB PSS; "
                    f"{r['tasks_per_s']} tasks/s; worker CPU {r['cpu_ms_per_task']} ms/task"
                    + "".join(f"; {k} {r[k]}" for k in ("daemon_received", "agent_state") if k in r))
        sender.close()
    finally:
        if daemon is not None:
            daemon.stop()
        if brain is not None:
            brain.stop()
        if redis is not None:
            redis.stop()

    import platform

    print(f"\nPython {platform.python_version()}, celery {celery.__version__}, {args.runs} runs of "
          f"{WARMUP_TASKS} + {args.tasks} tasks, medians (MB):\n")
    print("| worker (prefork, concurrency 2) | main RSS | main + children RSS | main + children PSS | "
          "worker CPU ms/task | tasks/s |")
    print("|---|---|---|---|---|---|")
    base = None
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in mine) for k in ("main_rss", "total_rss", "total_pss", "tasks_per_s",
                                                          "cpu_ms_per_task")}
        base = base or med

        def cell(key: str) -> str:
            return mb(med[key]) if med is base else f"{mb(med[key])} (+{mb(med[key] - base[key])})"

        label = LABELS[mode]
        print(f"| {label} | {cell('main_rss')} | {cell('total_rss')} | {cell('total_pss')} | "
              f"{med['cpu_ms_per_task']:.2f} | {med['tasks_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
