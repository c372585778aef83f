"""The daemon's gateway (`Z4J_GATEWAY_ADDR`) with the stock z4j agents from PyPI, unmodified:
a prefork Celery worker with z4j-celery (gw_celery_proj.py), an RQ worker with z4j-rq
(gw_rq_proj.py) and a Flask process with z4j-flask (gw_flask_app.py), all pointed at the gateway
with `Z4J_BRAIN_URL` and the daemon's own token and HMAC secret, and beside them a process on the
daemon's socket with this repository's client. One daemon forwards all of it to the real brain.

The brain, Redis, the daemon (gateway and metrics listener), the three agent processes and the
socket client are started once for the module; the tests run in file order and share them.
The agent processes run from `brain.gateway_venv()`; the test process enqueues RQ jobs itself and
Celery tasks through the Flask app.

A purge_queue is checked by the daemon (confirm token against the depth the operator saw) and
reaches the RQ agent with the brain's confirm_token for that depth, which z4j-rq checks again.

Last, a `celery beat` with the stock z4j-celerybeat agent (gw_beat_proj.py) joins them: its static
schedule reaches the Schedules page with z4j's external schedule protocol, through the daemon's
one connection, and "trigger now" reaches it there. The module's agent has a brain project of its
own: the brain keeps one celery-beat stream per project.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import brain as brainmod
from control import wait_command_done
from sched_api import Api as SchedulesApi
from harness import (
    Background,
    Service,
    brain_db,
    get_task,
    hexid,
    http_get,
    metric,
    parse_metrics,
    run_agentd,
    task_events,
    wait_for,
)

HERE = Path(__file__).resolve().parent
HOST = socket.gethostname()
SFX = uuid.uuid4().hex[:6]
CELERY_NODE = f"gw-{SFX}@{HOST}"
RQ_WORKER = f"gw-rq-{SFX}"
RQ_QUEUES = (f"gw-{SFX}", f"gw-low-{SFX}")
PURGE_QUEUE = f"gw-purge-{SFX}"  # nobody consumes it
SCHEDULER = "celery-beat"  # z4j-celerybeat's scheduler
# What the stock agents report per task (z4j-celery: the worker's received/started/succeeded
# from Celery's events; z4j-rq: started and the outcome from the worker's main process).
CELERY_KINDS = {"task.received", "task.started", "task.succeeded"}
RQ_KINDS = {"task.started", "task.succeeded"}
RQ_FAILED_KINDS = {"task.started", "task.failed"}

# A process on the daemon's socket (this repository's client): a few task lifecycles, committed
# to the spool before it prints their ids; then it stays connected until it is stopped.
SOCKET_CLIENT = r"""
import json, signal, sys, uuid
from z4j_agentd import Client

client = Client(sys.argv[1], process="gw-e2e socket client", engines=["celery"])
ok, failed, events = [], [], []
for i in range(5):
    tid = str(uuid.uuid4())
    base = {"task_name": "gw_e2e.socket_add", "queue": "gw-socket"}
    events.append({"engine": "celery", "kind": "task.received", "task_id": tid, "data": {**base, "args": [i, i]}})
    events.append({"engine": "celery", "kind": "task.started", "task_id": tid, "data": base})
    if i == 4:
        failed.append(tid)
        events.append({"engine": "celery", "kind": "task.failed", "task_id": tid,
                       "data": {**base, "exception": "ValueError", "exception_message": "socket boom",
                                "traceback": "Traceback (most recent call last):\nValueError: socket boom\n"}})
    else:
        ok.append(tid)
        events.append({"engine": "celery", "kind": "task.succeeded", "task_id": tid,
                       "data": {**base, "result": 2 * i, "runtime_ms": 3}})
stored = client.send_durable(events, timeout=30)
print(json.dumps({"ok": ok, "failed": failed, "stored": stored}), flush=True)
signal.pause()
"""


class Stack:
    """What the module's tests share."""

    def __init__(self, brain, agent, daemon, run_dir: Path, redis_url: str, gw_venv: Path,
                 gw_port: int, metrics_port: int) -> None:
        import redis

        self.brain, self.agent, self.daemon, self.run_dir = brain, agent, daemon, run_dir
        self.slug, self.agent_id = agent["project_slug"], agent["agent_id"]
        self.redis_url, self.gw_venv = redis_url, gw_venv
        self.gw_url = f"http://127.0.0.1:{gw_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.conn = redis.Redis.from_url(redis_url)
        self.procs: dict = {}  # name -> Background: the stock agents' processes
        self.socket_client = None  # the Service on the daemon's socket
        self.flask_url = ""
        self.socket_tasks: dict = {}

    # -- the stock agents' environment

    def agent_env(self, name: str, **extra) -> dict:
        """A stock agent's environment: the gateway as its brain, the daemon's credentials,
        its own Z4J_HOME (buffer and pidfile)."""
        home = self.run_dir / "gateway" / name / "home"
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        env = {"PATH": f"{self.gw_venv}/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "Z4J_BRAIN_URL": self.gw_url, "Z4J_TOKEN": self.agent["token"],
               "Z4J_HMAC_SECRET": self.agent["hmac_secret"], "Z4J_PROJECT_ID": self.slug,
               "Z4J_AGENT_NAME": self.agent["name"], "Z4J_HOME": str(home / ".z4j"),
               "GW_BROKER": self.redis_url, "Z4J_RQ_REDIS_URL": self.redis_url, "PYTHONPATH": str(HERE)}
        env.update(extra)
        return env

    def start_rq(self, name: str, worker: str, queues, **env) -> Background:
        proc = Background([f"{self.gw_venv}/bin/rq", "worker", "-c", "gw_rq_proj", "--url", self.redis_url,
                           "-n", worker, *queues], self.run_dir / "gateway" / name, name,
                          self.agent_env(name, **env), run_dir=self.run_dir, cwd=HERE)
        self.procs[name] = proc
        return proc

    def start_flask(self) -> Background:
        port = brainmod.free_port()
        self.flask_url = f"http://127.0.0.1:{port}"
        proc = Background(
            [f"{self.gw_venv}/bin/flask", "--app", "gw_flask_app", "run", "--port", str(port), "--no-reload"],
            self.run_dir / "gateway" / "flask", "flask",
            # Its Celery engine watches the broker's events too: a node name no worker has keeps it
            # from reporting the worker's task events a second time.
            self.agent_env("flask", Z4J_CELERY_LOCAL_HOSTNAME="web@nowhere"), run_dir=self.run_dir, cwd=HERE)
        self.procs["flask"] = proc
        return proc

    def wait_flask(self, timeout: float) -> None:
        wait_for(lambda: (self.flask("GET", "/health")["z4j"], "runtime not started"), timeout, "Flask /health")

    # -- producers

    def flask(self, method: str, path: str) -> dict:
        req = urllib.request.Request(self.flask_url + path, method=method,
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def celery_add(self, x: int, y: int) -> str:
        return self.flask("POST", f"/add?x={x}&y={y}")["task_id"]

    def rq_enqueue(self, func: str, *args, queue: str = RQ_QUEUES[0]) -> str:
        from rq import Queue

        return Queue(queue, connection=self.conn).enqueue(f"gw_rq_proj.{func}", *args).id

    # -- the brain

    def api(self, method: str, path: str, **kw):
        return self.brain.api(method, f"/api/v1/projects/{self.slug}{path}", **kw)

    def states(self, engine: str, want: dict):
        got = {}
        for tid in want:
            t = get_task(self.brain, self.slug, engine, tid)
            got[tid] = t and t["state"]
        return got == want, {t: s for t, s in got.items() if s != want[t]}

    def wait_states(self, engine: str, want: dict, timeout: float, what: str) -> None:
        wait_for(lambda: self.states(engine, want), timeout, what, interval=0.5)

    def kinds_by_task(self) -> dict:
        """From the brain's database: {task_id: {kind: rows}} of the daemon's agent."""
        out: dict = {}
        for r in brain_db(self.brain, "SELECT task_id, kind, COUNT(*) AS n FROM events WHERE agent_id = ? "
                                      "GROUP BY task_id, kind", (hexid(self.agent_id),)):
            out.setdefault(r["task_id"], {})[r["kind"]] = r["n"]
        return out

    def agent_workers(self) -> list:
        status, rows = self.brain.rest().call("GET", f"/api/v1/projects/{self.slug}/agent-workers")
        assert status == 200, f"GET agent-workers: HTTP {status} {rows}"
        return [r for r in rows if str(r.get("agent_id", "")).replace("-", "") == hexid(self.agent_id)]

    def command(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        status, cmd = self.api("POST", f"/commands/{what}", body={"agent_id": self.agent_id, **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return wait_command_done(self.brain, self.agent, cmd["id"], timeout)

    # -- the daemon

    def gateway(self) -> dict:
        return self.daemon.stats()["gateway"]

    def gateway_clients(self) -> list:
        return [c for c in self.daemon.stats()["client_list"] if c.get("framing") == "gateway"]

    def brain_frames(self) -> float:
        code, _, body = http_get(self.metrics_url)
        assert code == 200, f"GET /metrics: HTTP {code}"
        value = metric(parse_metrics(body), "z4j_agentd_brain_ack_latency_seconds_count")
        assert value is not None, "z4j_agentd_brain_ack_latency_seconds_count missing from /metrics"
        return value

    def check_alive(self) -> None:
        for p in self.procs.values():
            p.check_alive()
        assert self.daemon.alive(), f"the daemon exited; log tail:\n{self.daemon.log_tail()}"

    def wait_gateway_agents(self, timeout: float, what: str) -> list:
        """Until the Celery worker, the RQ worker and the Flask app are the daemon's gateway
        clients (their handshakes done); their `process` names."""
        def check():
            self.check_alive()
            got = sorted(c.get("process") for c in self.gateway_clients())
            return len(got) == 3, got

        return wait_for(check, timeout, what, interval=0.1)


@pytest.fixture(scope="module")
def stack(brain, run_dir, redis_server, module_daemon):
    gw_venv = brainmod.gateway_venv()
    agent, daemon = module_daemon("gateway", project=f"gw-{SFX}")
    gw_port, metrics_port = brainmod.free_port(), brainmod.free_port()
    daemon.extra_env.update(Z4J_GATEWAY_ADDR=f"127.0.0.1:{gw_port}", Z4J_METRICS_ADDR=f"127.0.0.1:{metrics_port}")
    s = Stack(brain, agent, daemon, run_dir, redis_server.url(redis_server.fresh_db()), gw_venv, gw_port,
              metrics_port)
    t0 = time.monotonic()
    try:
        daemon.start()
        daemon.wait_stats(lambda st: st["uplink_state"] == "connected", 60, "the daemon's first brain session")
        s.procs["celery"] = Background(
            [f"{gw_venv}/bin/celery", "-A", "gw_celery_proj", "worker", "--pool=prefork", "--concurrency=2",
             "-n", CELERY_NODE, "-l", "INFO"], run_dir / "gateway" / "celery", "celery",
            s.agent_env("celery", Z4J_CELERY_LOCAL_HOSTNAME=CELERY_NODE), run_dir=run_dir, cwd=HERE)
        s.start_rq("rq", RQ_WORKER, RQ_QUEUES)
        s.start_flask()
        s.socket_client = Service([sys.executable, "-c", SOCKET_CLIENT, str(daemon.socket_path)],
                                  run_dir / "gateway", "socket-client")
        s.socket_tasks = s.socket_client.next_json(30, "the socket client's stored events")
        assert s.socket_tasks["stored"] == 15, s.socket_tasks
        s.wait_gateway_agents(60, "the three stock agents to finish their gateway handshakes")
        s.wait_flask(30)
        print(f"\n[gateway] daemon, 3 stock agents and the socket client up in {time.monotonic() - t0:.1f}s",
              file=sys.stderr)
        yield s
    finally:
        if s.socket_client is not None:
            s.socket_client.stop(timeout=5)
        for p in reversed(list(s.procs.values())):
            p.stop(timeout=10)
        daemon.stop()


# ---------------------------------------------------------------- 1 delivery


def test_stock_agents_through_the_gateway_reach_the_brain(stack):
    """Celery tasks enqueued through the Flask app, RQ jobs (one failing) and the socket client's
    tasks are all in the brain in their final state; the brain sees one agent, online, with one
    worker slot (the daemon's); the Workers and Queues pages show what the agents report; the
    daemon lists the three stock agents as gateway clients."""
    s = stack
    celery_ids = [s.celery_add(i, i) for i in range(5)]
    rq_ok = [s.rq_enqueue("add", i, i) for i in range(5)]
    rq_bad = s.rq_enqueue("boom", "gateway boom")
    t0 = time.monotonic()
    s.wait_states("celery", {t: "success" for t in celery_ids}, 60, "the Celery tasks to succeed in the brain")
    s.wait_states("rq", {**{t: "success" for t in rq_ok}, rq_bad: "failure"}, 60, "the RQ jobs in the brain")
    s.wait_states("celery", {**{t: "success" for t in s.socket_tasks["ok"]},
                             **{t: "failure" for t in s.socket_tasks["failed"]}}, 30,
                  "the socket client's tasks in the brain")
    took = time.monotonic() - t0

    t = get_task(s.brain, s.slug, "celery", celery_ids[3])
    # z4j-celery reports a result as its text ('6'), the daemon forwards it as it came.
    assert (t["name"], str(t["result"]), t["worker_name"]) == ("gw_celery_proj.add", "6", CELERY_NODE), t
    t = get_task(s.brain, s.slug, "rq", rq_bad)
    # z4j-rq reports the formatted traceback as the exception, the daemon forwards it as it came.
    assert "ValueError: gateway boom" in (t.get("exception") or "") + (t.get("traceback") or ""), t
    assert {e["kind"] for e in task_events(s.brain, s.slug, "celery", celery_ids[0])} == CELERY_KINDS
    assert {e["kind"] for e in task_events(s.brain, s.slug, "rq", rq_ok[0])} == RQ_KINDS
    assert {e["kind"] for e in task_events(s.brain, s.slug, "rq", rq_bad)} == RQ_FAILED_KINDS

    # One agent and one worker slot: the daemon's.
    status, agents = s.api("GET", "/agents")
    assert status == 200, agents
    online = [a for a in agents if a["state"] == "online"]
    assert [a["id"] for a in online] == [s.agent_id], [(a["name"], a["state"]) for a in agents]
    engines = set(online[0].get("engine_adapters") or [])
    assert {"celery", "rq"} <= engines, online[0]
    worker_id = s.daemon.stats()["worker_id"]
    slots = s.agent_workers()
    assert [(r.get("worker_id"), r.get("state")) for r in slots] == [(worker_id, "online")], slots

    # The Workers and Queues pages show what the agents report.
    def workers():
        status, rows = s.api("GET", "/workers")
        got = {(r["engine"], r["name"]): r["state"] for r in rows} if status == 200 else rows
        return (status == 200 and got.get(("celery", CELERY_NODE)) == "online"
                and got.get(("rq", RQ_WORKER)) == "online"), got

    wait_for(workers, 30, "the Celery and RQ workers on the Workers page", interval=0.5)

    def queues():
        status, rows = s.api("GET", "/queues")
        got = {(q.get("engine"), q.get("name")) for q in rows} if status == 200 else rows
        return status == 200 and {("celery", "celery"), ("rq", RQ_QUEUES[0])} <= got, got

    wait_for(queues, 30, "the Celery and RQ queues on the Queues page", interval=0.5)

    # The daemon's local clients: the three agents through the gateway (z4j-celery reports the
    # framework "flask" when z4j_flask is importable, z4j-rq "bare"), the socket client beside them.
    clients = s.daemon.stats()["client_list"]
    procs = sorted(c["process"] for c in clients if c.get("framing") == "gateway")
    frameworks = sorted(p.split()[2] for p in procs)
    assert frameworks == ["bare", "flask", "flask"], procs
    assert all(p.startswith("z4j agent ") and " 1.13.0 (worker_id " in p for p in procs), procs
    assert [c.get("framing") for c in clients if c.get("process") == "gw-e2e socket client"] in (
        ["json"], ["msgpack"]), clients
    gws = s.gateway()
    assert gws["connections"] >= 3 and gws["sessions"] == 3 and gws["event_batches_received"] > 0, gws
    print(f"[gateway] 5 celery + 6 rq + 5 socket tasks final in the brain {took:.1f}s after enqueue; "
          f"gateway clients {procs}; gateway stats {gws}", file=sys.stderr)


# ---------------------------------------------------------------- 2 commands


def routed_to(daemon, command_id: str):
    """The pid the daemon's log says it routed a command to, None if not (yet)."""
    for line in daemon.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("message") == "command routed to a local process" and rec.get("command_id") == command_id:
            return int(rec["to"].split()[1])
    return None


def test_commands_reach_the_right_agent(stack):
    """cancel_task of a running Celery task, issued through the brain's REST API, reaches a
    process that runs the Celery engine and completes; the task is revoked in the brain. The
    daemon routes each command by its engine to a local agent that declared it (the Celery
    worker or the Flask app for celery, the RQ worker for rq), so the order the agents connected
    in does not matter: no start-order tricks are needed, unlike the same agents connected
    straight to the brain, which hands every command to the token's first worker slot."""
    s = stack
    long = s.flask("POST", "/sleepy?seconds=60")["task_id"]
    s.wait_states("celery", {long: "started"}, 30, "sleepy to start")
    done = s.command("cancel-task", {"engine": "celery", "task_id": long})
    assert (done["status"], done.get("result"), done.get("error")) == \
        ("completed", {"task_id": long, "terminated": True}, None), done
    assert routed_to(s.daemon, done["id"]) in (s.procs["celery"].pid, s.procs["flask"].pid), done["id"]
    s.wait_states("celery", {long: "revoked"}, 30, "sleepy revoked in the brain")


def test_purge_queue_reaches_the_rq_agent(stack):
    """purge_queue of an RQ queue at depth 3 (nobody consumes it), issued through the brain's
    REST API, is routed to the RQ worker (the only process whose health reports name the queue)
    and completes; the queue is empty in Redis. z4j-rq checks the confirm_token itself, so this
    fails when the gateway hands it the daemon's local form (the confirmed depth, no token)."""
    from rq import Queue

    s = stack
    q = Queue(PURGE_QUEUE, connection=s.conn)
    for i in range(3):
        q.enqueue("gw_rq_proj.add", i, i)

    def depth():
        status, body = s.api("GET", "/stats")
        d = {(x.get("engine"), x["name"]): x["pending_count"] for x in body.get("queue_depths") or []}
        return d.get(("rq", PURGE_QUEUE)) == 3, d

    wait_for(depth, 60, f"the brain to show {PURGE_QUEUE} at depth 3", interval=0.5)
    done = s.command("purge-queue", {"queue": PURGE_QUEUE, "observed_depth": 3})
    assert routed_to(s.daemon, done["id"]) == s.procs["rq"].pid, done["id"]
    assert (done["status"], done.get("error")) == ("completed", None), done
    assert (done.get("result") or {}).get("purged") == 3, done
    assert q.count == 0, q.count


# ---------------------------------------------------------------- 3 doctor, wrong credentials


def test_doctor_and_wrong_credentials(stack, daemon_bin):
    """`python -m z4j_bare doctor` against the gateway exits 0. It never authenticates (its
    websocket probe only starts a runtime: "remote connection and authentication were not
    verified"), so it exits 0 with the same output for a wrong token or secret and cannot name
    either. What names them is the agent itself: an RQ worker with a wrong token logs the
    gateway's 4401 and its reason on stderr, one with a wrong HMAC secret logs the 4403 that
    closes it at its first signed frame (and again before hello_ack on its next attempt), and the
    daemon counts the 4403s. `z4j-agentd doctor`, run with the daemon's environment, checks the
    gateway with the daemon's token and reports the probe ok."""
    s = stack
    env = s.agent_env("z4j-bare-doctor")
    r = subprocess_run([f"{s.gw_venv}/bin/python", "-m", "z4j_bare", "doctor"], env)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "[OK]" in r.stdout and "[FAIL]" not in r.stdout, r.stdout

    closed_before = dict(s.gateway()["closed_by_code"])
    wrong_token = s.start_rq("rq-wrong-token", f"gw-badtoken-{SFX}", [f"gw-badtoken-{SFX}"],
                             Z4J_TOKEN="z4j-e2e-not-a-token-" + uuid.uuid4().hex)
    bad_secret = s.start_rq("rq-wrong-secret", f"gw-badsecret-{SFX}", [f"gw-badsecret-{SFX}"],
                            Z4J_HMAC_SECRET=base64.urlsafe_b64encode(os.urandom(32)).decode())
    # The wrong-secret agent's first signed frame: the job's events.
    bad_job = s.rq_enqueue("add", 40, 2, queue=f"gw-badsecret-{SFX}")

    def logged(proc, *needles):
        def check():
            proc.check_alive()
            text = proc.log_text()
            return all(n in text for n in needles), text[-1500:]
        return check

    wait_for(logged(wrong_token, "close code 4401, reason: unknown agent token", "Z4J_GATEWAY_TOKENS_FILE"), 30,
             "the wrong-token agent to log the gateway's 4401", interval=0.3)
    # Closed at its first signed frame (after hello_ack), then refused before hello_ack, where
    # its auth backoff applies.
    wait_for(logged(bad_secret, "received 4403 (private use) frame signature failed: set Z4J_HMAC_SECRET",
                    "close code 4403, reason: frame signatures failed: set Z4J_HMAC_SECRET"), 60,
             "the wrong-secret agent to log the gateway's 4403", interval=0.3)
    closed = s.gateway()["closed_by_code"]
    assert closed.get("4401", 0) > closed_before.get("4401", 0), (closed_before, closed)
    assert closed.get("4403", 0) > closed_before.get("4403", 0), (closed_before, closed)
    # What a bad signature carried never reaches the brain.
    assert get_task(s.brain, s.slug, "rq", bad_job) is None
    for name in ("rq-wrong-token", "rq-wrong-secret"):
        s.procs.pop(name).stop(timeout=10)

    r = run_agentd(daemon_bin, ["doctor", "--json"], s.daemon.env(), cwd=s.daemon.workdir)
    report = json.loads(r.stdout)
    probes = {p["name"]: p for p in report["probes"]}
    assert probes["gateway"]["status"] == "ok", probes["gateway"]
    print(f"[gateway] closed_by_code {closed}; agentd doctor gateway: {probes['gateway']['message']}",
          file=sys.stderr)


def subprocess_run(argv, env, timeout=60.0):
    return subprocess.run(argv, env=env, cwd=str(HERE), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- 4 daemon SIGKILL


def test_daemon_sigkill_while_agents_send(stack):
    """Celery tasks (through Flask) and RQ jobs are enqueued in a loop while the daemon is
    SIGKILLed and started again on the same spool: the agents reconnect by themselves, and every
    task is in the brain with each of its events exactly once."""
    s = stack
    celery_ids, rq_ids = [], []
    stop = threading.Event()
    errors = []

    def produce():
        i = 0
        while not stop.is_set():
            try:
                celery_ids.append(s.celery_add(i, 1000))
                rq_ids.append(s.rq_enqueue("add", i, 1000))
            except Exception as exc:  # noqa: BLE001  (reported below)
                errors.append(repr(exc))
            i += 1
            stop.wait(0.1)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_for(lambda: (len(rq_ids) >= 10, len(rq_ids)), 30, "tasks enqueued before the kill")
        killed_at = time.monotonic()
        s.daemon.kill()
        at_kill = len(rq_ids)
        # Down for 15 rounds of the producer (about 2 s): long enough for the agents' first
        # reconnect attempts to be refused.
        wait_for(lambda: (len(rq_ids) >= at_kill + 15, len(rq_ids)), 30, "tasks enqueued while the daemon is down")
        s.daemon.start()
        restarted_at = time.monotonic()
        s.wait_gateway_agents(60, "the three stock agents back on the restarted daemon")
        reconnected = time.monotonic() - restarted_at
        at_back = len(rq_ids)
        wait_for(lambda: (len(rq_ids) >= at_back + 10, len(rq_ids)), 30, "tasks enqueued after the reconnect")
    finally:
        stop.set()
        producer.join(15)
    assert not errors, errors[:5]
    t0 = time.monotonic()
    s.wait_states("celery", {t: "success" for t in celery_ids}, 90, "every Celery task to succeed in the brain")
    s.wait_states("rq", {t: "success" for t in rq_ids}, 90, "every RQ job to succeed in the brain")
    drained = time.monotonic() - t0

    want = {**{t: CELERY_KINDS for t in celery_ids}, **{t: RQ_KINDS for t in rq_ids}}

    def every_event_in():
        rows = s.kinds_by_task()
        missing = {t: sorted(k - set(rows.get(t, {}))) for t, k in want.items() if not k <= set(rows.get(t, {}))}
        return not missing, missing

    wait_for(every_event_in, 30, "every event of every task in the brain's database", interval=0.5)
    rows = s.kinds_by_task()
    wrong = {t: rows[t] for t, k in want.items() if rows[t] != dict.fromkeys(k, 1)}
    assert not wrong, f"{len(wrong)} of {len(want)} tasks without each of their events exactly once: " \
                      f"{dict(list(wrong.items())[:10])}"
    st = s.daemon.stats()
    counts = {k: st[k] for k in ("received", "stored", "acked", "resent", "brain_duplicates", "brain_rejected")}
    print(f"[gateway] daemon down {restarted_at - killed_at:.1f}s (SIGKILL to restart); {len(celery_ids)} celery + "
          f"{len(rq_ids)} rq tasks, {at_back - at_kill} rq enqueued while down, each event once in the brain; "
          f"3 agents back {reconnected:.1f}s after the restart ({restarted_at - killed_at + reconnected:.1f}s after "
          f"the kill); all final {drained:.1f}s after the producer stopped; restarted daemon {counts}",
          file=sys.stderr)


# ---------------------------------------------------------------- 5 batching


def test_one_brain_frame_carries_many_agents_events(stack):
    """A burst from the three stock agents: each sends its own small `event_batch` frames to the
    gateway; the daemon forwards them from its spool in frames of many events, so the brain gets
    far fewer frames than the agents sent."""
    s = stack
    before_gw, before_brain = s.gateway()["event_batches_received"], s.brain_frames()
    celery_ids = [s.celery_add(i, 2000) for i in range(30)]
    rq_ids = [s.rq_enqueue("add", i, 2000) for i in range(30)]
    s.wait_states("celery", {t: "success" for t in celery_ids}, 60, "the burst's Celery tasks")
    s.wait_states("rq", {t: "success" for t in rq_ids}, 60, "the burst's RQ jobs")
    agent_frames = s.gateway()["event_batches_received"] - before_gw
    brain_frames = s.brain_frames() - before_brain
    print(f"[gateway] burst of 30 celery + 30 rq tasks: {agent_frames} event_batch frames from the agents, "
          f"{brain_frames:.0f} frames to the brain", file=sys.stderr)
    assert agent_frames >= 60, agent_frames
    assert brain_frames < agent_frames / 2, (agent_frames, brain_frames)


# ---------------------------------------------------------------- 6 a scheduler: z4j-celerybeat


def test_celery_beat_schedules_and_trigger_now_through_the_gateway(stack):
    """A real `celery beat` with the stock z4j-celerybeat agent (scheduler only, the static
    `beat_schedule` of gw_beat_proj.py) pointed at the gateway.

    z4j-flask declares the scheduler `celery-beat` in the web process as soon as z4j-celerybeat
    is importable there (with the app's Celery app, whose own `beat_schedule` is empty here), so
    the Flask app, connected first, holds it: the daemon leaves it out of the beat's `hello`
    (one process per scheduler, a `bad_message` naming the holder). Once the Flask app stops,
    the beat takes it over, the daemon says hello again, the brain's
    `schedule.external.activate` goes to the beat, and the beat's stable snapshot, sent as
    `schedule.snapshot` events, fills the Schedules page, on the daemon's one connection (still
    one worker slot at the brain). "Trigger now", issued through the brain's REST API, is routed
    to the beat, which sends the task; the Celery worker runs it and it reaches the brain in
    state success. The Flask app started again does not take the scheduler back."""
    s = stack
    api = SchedulesApi(s.brain, s.slug, SCHEDULER)
    refused_before = dict(s.daemon.stats().get("refused_by_reason") or {})
    log_from = len(s.daemon.log_text().splitlines())
    by_pid = lambda pid: [c for c in s.gateway_clients() if c.get("pid") == pid]  # noqa: E731
    t0 = time.monotonic()
    beat = s.procs["beat"] = Background(
        [f"{s.gw_venv}/bin/celery", "-A", "gw_beat_proj", "beat", "-l", "INFO",
         "-s", str(s.run_dir / "gateway" / "beat" / "celerybeat-schedule")],
        s.run_dir / "gateway" / "beat", "beat", s.agent_env("beat"), run_dir=s.run_dir, cwd=HERE)
    try:
        # The Flask app holds the scheduler: the beat's is left out, with a bad_message.
        assert [c.get("schedulers") for c in by_pid(s.procs["flask"].pid)] == [[SCHEDULER]], s.gateway_clients()

        def beat_waits():
            s.check_alive()
            refused = (s.daemon.stats().get("refused_by_reason") or {}).get("bad_message", 0)
            got = by_pid(beat.pid)
            return len(got) == 1 and refused > refused_before.get("bad_message", 0), (refused, got)

        _, (client,) = wait_for(beat_waits, 30, "the beat agent connected, its scheduler left out", interval=0.1)
        assert client["schedulers"] == [] and client["engines"] == [], client
        assert client["process"].startswith("z4j agent bare 1.13.0 (worker_id "), client
        connected = time.monotonic() - t0
        # What the page lists is the Flask app's (its Celery app has no beat_schedule), not the beat's.
        assert not {"gw-add-hourly", "gw-nightly"} & set(api.rows()), api.rows()

        # The Flask app stops: the beat takes the scheduler over.
        s.procs.pop("flask").stop(timeout=10)
        t1 = time.monotonic()

        def beat_holds():
            s.check_alive()
            got = by_pid(beat.pid)
            return len(got) == 1 and got[0].get("schedulers") == [SCHEDULER], got

        wait_for(beat_holds, 30, "the beat agent to take the scheduler over", interval=0.1)

        def listed():
            s.check_alive()
            got = api.rows()
            return {"gw-add-hourly", "gw-nightly"} <= set(got), got

        rows = wait_for(listed, 30, "beat's static schedule on the Schedules page", interval=0.3)
        listed_in = time.monotonic() - t1
        hourly, nightly = rows["gw-add-hourly"], rows["gw-nightly"]
        # z4j-celerybeat reports an interval as the seconds it reads (3600.0).
        assert (hourly["engine"], hourly["task_name"], hourly["kind"], float(hourly["expression"])) == \
            ("celery", "gw_celery_proj.add", "interval", 3600), hourly
        assert (hourly["args"], hourly["kwargs"], hourly["queue"], hourly["source"]) == \
            ([20, 22], {}, "celery", "celery-beat:static"), hourly
        assert (nightly["kind"], nightly["expression"], nightly["args"]) == ("cron", "30 2 * * *", [0, 0]), nightly
        assert api.capabilities() == ["list", "trigger_now"]
        # On the daemon's one connection: one worker slot online at the brain, the daemon's
        # (`z4j-agentd doctor` of the test before left its own slot, offline).
        worker_id = s.daemon.stats()["worker_id"]
        slots = s.agent_workers()
        assert [r.get("worker_id") for r in slots if r.get("state") == "online"] == [worker_id], slots
        # The brain's activation since the beat started went to the beat.
        recs = daemon_log(s.daemon)[log_from:]
        activated = [r.get("to") for r in recs
                     if r.get("message") == "held activation handed to the process that declared its scheduler"
                     or (r.get("message") == "command routed to a local process"
                         and r.get("action") == "schedule.external.activate")]
        assert activated and activated[-1].split()[1] == str(beat.pid), activated

        # Trigger now, through the REST API: routed to the beat, the worker runs the task.
        sent_after = time.time() - 1
        status, location, answer = api.post(lambda: f"/{api.rows()['gw-add-hourly']['id']}/trigger")
        assert status == 200 and location, (status, answer)
        t2 = time.monotonic()
        op = api.wait_applied(location)
        assert op["schedule_id"] == hourly["id"], op
        command_id = location.rsplit("/", 1)[-1]
        status, done = s.brain.api("GET", f"/api/v1/projects/{s.slug}/commands/{command_id}")
        assert status == 200 and done["status"] == "completed", done
        trigger = done["result"]["trigger_result"]
        assert trigger["status"] == "success" and trigger["result"]["task_name"] == "gw_celery_proj.add", done
        assert routed_to(s.daemon, command_id) == beat.pid, command_id

        def ran():
            s.check_alive()
            status, body = s.api("GET", "/tasks", params={"name": "gw_celery_proj.add", "limit": 200})
            assert status == 200, body
            got = [t for t in body["items"] if str(t.get("args")) in ("[20, 22]", "(20, 22)")
                   and t.get("received_at") and brain_time(t["received_at"]) >= sent_after]
            return len(got) == 1 and got[0]["state"] == "success", got

        task = wait_for(ran, 30, "the triggered add(20, 22) to succeed in the brain", interval=0.3)[0]
        ran_in = time.monotonic() - t2
        assert (str(task["result"]), task["worker_name"]) == ("42", CELERY_NODE), task

        # The Flask app back: the beat keeps the scheduler.
        flask = s.start_flask()
        s.wait_flask(30)
        wait_for(lambda: (len(by_pid(flask.pid)) == 1, s.gateway_clients()), 30, "the Flask app back on the gateway")
        assert by_pid(flask.pid)[0]["schedulers"] == [] and by_pid(beat.pid)[0]["schedulers"] == [SCHEDULER], \
            s.gateway_clients()
        refused = s.daemon.stats().get("refused_by_reason") or {}
        new = {k: v - refused_before.get(k, 0) for k, v in refused.items() if v != refused_before.get(k, 0)}
        assert set(new) == {"bad_message"}, (refused_before, refused)
    finally:
        s.procs.pop("beat").stop(timeout=10)
        if "flask" not in s.procs:
            s.start_flask()
    print(f"[gateway] celery beat with z4j-celerybeat: a gateway client {connected:.1f}s after its start "
          f"(scheduler held by the Flask app); its schedules on the page {listed_in:.1f}s after the Flask app "
          f"stopped; trigger now -> task success in the brain {ran_in:.1f}s after the POST; whole test "
          f"{time.monotonic() - t0:.1f}s", file=sys.stderr)


def daemon_log(daemon) -> list:
    out = []
    for line in daemon.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({})
    return out


def brain_time(text: str) -> float:
    from datetime import datetime, timezone

    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
