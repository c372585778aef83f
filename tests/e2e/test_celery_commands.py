"""Every Celery command through the real z4j 1.13.0 brain's REST API, run by
real Celery workers (`z4j_agentd.celery.install`, tests/e2e/celery_proj.py)
on Redis, checked in the brain (the command's final status and result) and
in the workers themselves (inspect, their processes, their logs, the queue).

Two workers on this host, each its own process and its own connection to
one daemon: `wA@<host>` (worker_pool_restarts on) and `wB@<host>` (off).
Each announces itself with `worker.online` and names itself in its
command hello, so the brain admits worker controls for it and the daemon
hands each worker command to the process hosting that worker only.

The workers, the daemon and the agent are started once for the module
(the tests run in file order and share them).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid

import pytest

import brain_bootstrap as bb
from control import LocalClient, wait_brain_knows, wait_command_done
from harness import Background, Daemon, brain_db, get_task, hexid, task_events, wait_for
from test_celery import app_env, require_client

ENGINE = "celery"
HOST = socket.gethostname()
WA, WB = f"wA@{HOST}", f"wB@{HOST}"
ACTIONS = ["add_consumer", "bulk_retry", "cancel_consumer", "cancel_task", "pool_grow", "pool_shrink",
           "purge_queue", "rate_limit", "reconcile_task", "restart_worker", "retry_task", "submit_task"]


# ---------------------------------------------------------------- the module's cluster


class Cluster:
    """One agent, one daemon, two Celery workers and a producer/inspector app."""

    def __init__(self, brain, agent: dict, daemon: Daemon, broker: str, workers: dict) -> None:
        from celery import Celery

        self.brain, self.agent, self.daemon, self.broker, self.workers = brain, agent, daemon, broker, workers
        self.app = Celery("e2e-commands-probe", broker=broker, backend=broker)
        self.app.conf.update(result_extended=True, task_serializer="json", accept_content=["json"])

    # -- brain REST
    def issue(self, what: str, body: dict) -> dict:
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.agent['project_slug']}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return cmd

    def run(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        """Issues the command and waits until the brain has its outcome."""
        return wait_command_done(self.brain, self.agent, self.issue(what, body)["id"], timeout)

    def task(self, task_id: str):
        return get_task(self.brain, self.agent["project_slug"], ENGINE, task_id)

    def wait_state(self, task_id: str, states, timeout: float = 30.0) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def check():
            t = self.task(task_id)
            return t is not None and t["state"] in states, t and {k: t.get(k) for k in ("state", "worker_name")}

        wait_for(check, timeout, f"task {task_id} to be {sorted(states)} in the brain", interval=0.3)
        return self.task(task_id)

    def kinds(self, task_id: str) -> list:
        return sorted(e["kind"] for e in task_events(self.brain, self.agent["project_slug"], ENGINE, task_id))

    # -- Celery
    def send(self, name: str, *args, **options) -> str:
        task_id = options.pop("task_id", None) or f"e2e-{name}-{uuid.uuid4().hex[:12]}"
        self.app.send_task(f"celery_proj.{name}", args=args, task_id=task_id, **options)
        return task_id

    def inspect(self, worker: str, method: str, *args):
        answer = getattr(self.app.control.inspect(destination=[worker], timeout=3), method)(*args) or {}
        assert worker in answer, f"{worker} did not answer inspect {method}: {answer}"
        return answer[worker]

    def pool_pids(self, worker: str) -> list:
        return sorted(self.inspect(worker, "stats")["pool"]["processes"])


def start_worker(background, daemon: Daemon, broker: str, name: str, **env) -> Background:
    return background(
        [sys.executable, "-m", "celery", "-A", "celery_proj", "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=INFO", "-n", name, "--without-mingle", "--without-gossip"],
        daemon.workdir, f"celery-{name.split('@')[0]}", app_env(daemon, broker, **env))


@pytest.fixture(scope="module")
def cluster(brain, run_dir, redis_server, module_daemon):
    require_client()
    agent, daemon = module_daemon("celery-commands")
    started = []

    def background(argv, workdir, name, env):
        proc = Background(argv, workdir, name, env, run_dir=run_dir)
        started.append(proc)
        return proc

    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        broker = redis_server.url(redis_server.fresh_db())
        workers = {WA: start_worker(background, daemon, broker, WA, Z4J_E2E_POOL_RESTARTS="1",
                                    Z4J_E2E_PURGE_QUEUE=PURGE_QUEUE),
                   WB: start_worker(background, daemon, broker, WB, Z4J_E2E_PURGE_QUEUE=PURGE_QUEUE)}

        def ready():
            for w in workers.values():
                w.check_alive()
            serving = {c.get("pid") for c in daemon.stats()["client_list"]
                       if "purge_queue" in ((c.get("capabilities") or {}).get(ENGINE) or [])}
            return {w.pid for w in workers.values()} <= serving, serving

        wait_for(ready, 90, "both Celery workers to serve their commands", interval=0.3)
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})
        c = Cluster(brain, agent, daemon, broker, workers)
        yield c
        c.app.close()
    finally:
        for proc in reversed(started):
            proc.stop(timeout=2)  # a task may still run: no warm shutdown wait
        daemon.stop()


# ---------------------------------------------------------------- 1 workers


def test_each_worker_announces_itself_and_the_brain_admits_its_controls(cluster):
    """worker.online from each worker's main process names it; the brain lists both workers."""
    path = f"/api/v1/projects/{cluster.agent['project_slug']}/workers"

    def listed():
        status, body = cluster.brain.api("GET", path)
        assert status == 200, f"GET workers: HTTP {status} {body}"
        items = body if isinstance(body, list) else body.get("items", [])
        return {WA, WB} <= {w.get("name") for w in items}, items

    wait_for(listed, 30, "the brain to list both workers")
    rows = brain_db(cluster.brain, "SELECT kind, payload FROM events WHERE agent_id = ? AND kind LIKE 'worker.%'",
                    (hexid(cluster.agent["agent_id"]),))
    online = {json.loads(r["payload"])["worker"]: json.loads(r["payload"]) for r in rows
              if r["kind"] == "worker.online"}
    assert set(online) == {WA, WB}, rows
    for name, proc in cluster.workers.items():
        data = online[name]
        assert data["pid"] == proc.pid and data["hostname"] == HOST and data["concurrency"] == 2, data
        assert data["queues"] == ["celery"] and "prefork" in data["pool"].lower(), data


# ---------------------------------------------------------------- 2 cancel


def process_exists(pid: int) -> bool:
    """A live (not zombie) process with this pid on this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cancel_terminates_a_running_task_and_revokes_a_queued_one(cluster):
    # Short enough that a task surviving the cancel would finish inside this test (checked at the end).
    seconds = 12
    running = cluster.send("sleepy", seconds)
    started = cluster.wait_state(running, "started", 20)
    finish_by = time.monotonic() + seconds  # it started before the brain showed it started
    host = started["worker_name"]
    assert host in (WA, WB), started
    # The pool process running it, as its worker reports it (once the worker has the pool's ack).
    def running_pid():
        pids = [t.get("worker_pid") for t in cluster.inspect(host, "active") if t["id"] == running]
        return bool(pids and pids[0]), pids

    pid = wait_for(running_pid, 10, f"{host} to list {running} as active with its pool process")[0]
    assert pid in cluster.pool_pids(host) and pid in cluster.workers[host].children(), pid

    done = cluster.run("cancel-task", {"engine": ENGINE, "task_id": running})
    assert done["status"] == "completed", (done["error"], done["result"])
    result = done["result"]
    assert {k: result[k] for k in ("task_id", "revoked", "terminated", "state_before", "signal", "worker",
                                   "processes")} == {
        "task_id": running, "revoked": True, "terminated": True, "state_before": "running", "signal": "SIGTERM",
        "worker": host, "processes": {host: pid}}, result
    # "terminated" means that process is gone: out of the worker's pool, and no process on this host.
    assert pid not in cluster.pool_pids(host)
    wait_for(lambda: (not process_exists(pid), pid), 5, f"pool process {pid} to be gone")
    assert pid not in cluster.workers[host].children()
    # Revoked in the brain, from the worker's own task.revoked (terminated, SIGTERM).
    cluster.wait_state(running, "revoked", 15)
    ev = [e for e in task_events(cluster.brain, cluster.agent["project_slug"], ENGINE, running)
          if e["kind"] == "task.revoked"]
    assert ev and ev[0]["payload"]["terminated"] is True and ev[0]["payload"]["signum"] == 15, ev

    # Sent only now, due in 8 s: received and held by a worker (its ETA), not started yet.
    later = cluster.send("add", 1, 1, countdown=8)
    due = time.monotonic() + 8
    cluster.wait_state(later, "received", 10)
    queued = cluster.run("cancel-task", {"engine": ENGINE, "task_id": later})
    assert queued["status"] == "completed", (queued["error"], queued["result"])
    assert time.monotonic() < due - 0.5, "the cancel completed too close to the task's ETA for this test"
    assert {k: queued["result"][k] for k in ("revoked", "terminated", "state_before")} == {
        "revoked": True, "terminated": False, "state_before": "queued"}, queued
    holder = queued["result"]["worker"]
    assert holder in (WA, WB), queued
    # When due, the worker discards it: revoked in the brain, it never started.
    cluster.wait_state(later, "revoked", 20)
    wait_for(lambda: (f"Discarding revoked task: celery_proj.add[{later}]" in cluster.workers[holder].log_text(),
                      cluster.workers[holder].log_tail(5)), 10, "the worker to discard the revoked task")
    assert "task.started" not in cluster.kinds(later), cluster.kinds(later)

    # The terminated one never finishes: past the time it would have, it is still revoked everywhere.
    time.sleep(max(0.0, finish_by + 2 - time.monotonic()))
    assert cluster.task(running)["state"] == "revoked"
    assert not {"task.succeeded", "task.failed"} & set(cluster.kinds(running)), cluster.kinds(running)
    assert cluster.app.AsyncResult(running).state == "REVOKED"
    assert f"celery_proj.sleepy[{running}] succeeded" not in cluster.workers[host].log_text()


# ---------------------------------------------------------------- 3 worker controls


def test_pool_resize_reaches_the_named_worker_only(cluster):
    before = {w: cluster.pool_pids(w) for w in (WA, WB)}
    assert [len(p) for p in before.values()] == [2, 2], before
    done = cluster.run("pool-resize", {"worker_name": WB, "engine": ENGINE, "delta": 1})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert {k: done["result"][k] for k in ("worker", "delta", "concurrency_before")} == {
        "worker": WB, "delta": 1, "concurrency_before": 2}, done
    wait_for(lambda: (len(cluster.pool_pids(WB)) == 3, cluster.pool_pids(WB)), 10, f"{WB}'s pool to grow to 3")
    wait_for(lambda: (len(cluster.workers[WB].children()) == 3, cluster.workers[WB].children()), 10,
             f"{WB} to have 3 pool processes")
    assert cluster.pool_pids(WA) == before[WA]

    shrink = cluster.run("pool-resize", {"worker_name": WB, "engine": ENGINE, "delta": -1})
    assert shrink["status"] == "completed", (shrink["error"], shrink["result"])
    wait_for(lambda: (len(cluster.pool_pids(WB)) == 2, cluster.pool_pids(WB)), 15, f"{WB}'s pool to shrink to 2")
    assert cluster.pool_pids(WA) == before[WA]

    # Bad parameters fail at once, naming what to change.
    too_far = cluster.run("pool-resize", {"worker_name": WA, "engine": ENGINE, "delta": -5})
    assert too_far["status"] == "failed", too_far
    assert "would leave worker" in too_far["error"] and "shrink by at most 1" in too_far["error"], too_far


def test_consumers_are_added_and_cancelled_on_the_named_worker(cluster):
    queue = f"extra-{uuid.uuid4().hex[:6]}"
    done = cluster.run("add-consumer", {"worker_name": WB, "engine": ENGINE, "queue": queue})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"]["worker"] == WB and done["result"]["queue"] == queue, done

    def consuming(worker):
        return {q["name"] for q in cluster.inspect(worker, "active_queues")}

    wait_for(lambda: (queue in consuming(WB), consuming(WB)), 10, f"{WB} to consume {queue}")
    assert queue not in consuming(WA)
    # A task sent to that queue runs, on wB.
    task_id = cluster.send("add", 20, 22, queue=queue)
    ran = cluster.wait_state(task_id, "success", 20)
    assert ran["worker_name"] == WB and ran["result"] == 42, ran

    off = cluster.run("cancel-consumer", {"worker_name": WB, "engine": ENGINE, "queue": queue})
    assert off["status"] == "completed", (off["error"], off["result"])
    wait_for(lambda: (queue not in consuming(WB), consuming(WB)), 10, f"{WB} to stop consuming {queue}")


def test_rate_limit_is_in_force_on_the_named_worker(cluster):
    def limit(worker):
        rows = cluster.inspect(worker, "registered", "rate_limit")
        # "celery_proj.add [rate_limit=7/m]"; without a limit, no rate_limit field
        return next(r for r in rows if r.split(" ")[0] == "celery_proj.add")

    done = cluster.run("rate-limit", {"task_name": "celery_proj.add", "rate": "7/m", "worker_name": WA})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert {k: done["result"][k] for k in ("task_name", "rate", "worker")} == {
        "task_name": "celery_proj.add", "rate": "7/m", "worker": WA}, done
    assert "rate_limit=7/m" in limit(WA), limit(WA)
    assert "rate_limit=" not in limit(WB), limit(WB)

    cleared = cluster.run("rate-limit", {"task_name": "celery_proj.add", "rate": "0", "worker_name": WA})
    assert cleared["status"] == "completed", (cleared["error"], cleared["result"])
    assert "rate_limit=7/m" not in limit(WA), limit(WA)

    unknown = cluster.run("rate-limit", {"task_name": "celery_proj.nope", "rate": "1/s", "worker_name": WA})
    assert unknown["status"] == "failed" and "unknown task" in unknown["error"], unknown


def test_restart_worker_restarts_the_pool_or_says_why_not(cluster):
    before_a, before_b = cluster.pool_pids(WA), cluster.pool_pids(WB)
    done = cluster.run("restart-worker", {"worker_name": WA, "engine": ENGINE})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"]["worker"] == WA and done["result"]["restarted"] == "pool", done
    assert done["result"]["processes_before"] == before_a, done
    # Celery's pool restart is graceful: a process leaves when it next looks for work (an idle one
    # waiting for the pool's queue may first run one more task) and a new one takes its place.
    # Tasks on a queue only wA consumes get every process of wA there.
    only_a = f"only-a-{uuid.uuid4().hex[:6]}"
    cluster.app.control.add_consumer(only_a, destination=[WA], reply=True, timeout=5)

    def replaced():
        now = cluster.pool_pids(WA)
        if set(now) & set(before_a):  # enough work for every process of the pool
            for _ in range(4):
                cluster.send("sleepy", 0.2, queue=only_a)
        return len(now) == 2 and not set(now) & set(before_a), now

    wait_for(replaced, 20, f"every pool process of {WA} to be replaced", interval=1.0)
    assert cluster.workers[WA].alive()

    refused = cluster.run("restart-worker", {"worker_name": WB, "engine": ENGINE})
    assert refused["status"] == "failed", refused
    assert "worker_pool_restarts off" in refused["error"] and "worker_pool_restarts = True" in refused["error"]
    assert cluster.pool_pids(WB) == before_b and cluster.workers[WB].alive()


# ---------------------------------------------------------------- 4 purge


#: Declared by the workers' app (a static route), consumed by none: their health reports name it
#: (at depth 0, when they start), so the daemon may hand them its purge.
PURGE_QUEUE = f"purge-{uuid.uuid4().hex[:6]}"


class DepthReporter:
    """What a worker's health report carries: a queue's depth, by which the daemon confirms a
    purge. A report counts while its connection is open."""

    def __init__(self, cluster) -> None:
        self.client = LocalClient(cluster.daemon.socket_path)
        self.client.hello(process="e2e-depth-probe", engines=[ENGINE])

    def report(self, queue: str, depth: int) -> None:
        ack = f"health-{uuid.uuid4().hex[:6]}"
        self.client.send({"type": "health", "ack_id": ack, "interval_seconds": 60,
                          "engines": {ENGINE: {"queue_depths": {queue: depth}}}})
        deadline = time.monotonic() + 10
        while True:
            reply = self.client.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("ack_id") == ack:
                assert reply.get("type") == "ack", reply
                return

    def close(self) -> None:
        self.client.close()


def test_purge_empties_the_queue_at_the_confirmed_depth_only(cluster):
    from z4j_agentd.celery import _queues

    queue = PURGE_QUEUE  # nobody consumes it; the workers' reports name it
    for n in range(3):
        cluster.send("add", n, n, queue=queue)
    assert _queues.depth(cluster.app, queue) == 3
    reporter = DepthReporter(cluster)
    try:
        purge_and_refuse(cluster, reporter, queue)
    finally:
        reporter.close()


def purge_and_refuse(cluster, reporter: DepthReporter, queue: str) -> None:
    from z4j_agentd.celery import _queues

    reporter.report(queue, 3)
    done = cluster.run("purge-queue", {"queue": queue, "observed_depth": 3})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"queue": queue, "depth_before": 3, "purged": 3, "force": False}, done
    assert _queues.depth(cluster.app, queue) == 0

    # Two more arrive; the depth the operator confirmed (1) is not the queue's: nothing is purged.
    cluster.send("add", 1, 2, queue=queue)
    cluster.send("add", 3, 4, queue=queue)
    reporter.report(queue, 1)
    stale = cluster.run("purge-queue", {"queue": queue, "observed_depth": 1})
    assert stale["status"] == "failed", stale
    # The daemon accepts the token (the reporter's depth 1 is the queue's freshest report); the
    # worker measures again and refuses.
    assert "holds 2 messages now, the purge was confirmed at 1; nothing was purged" in stale["error"], stale
    assert _queues.depth(cluster.app, queue) == 2


# ---------------------------------------------------------------- 5 submit, bulk retry


def test_submit_task_runs_the_task_the_brain_names(cluster):
    """The brain's "run now" of a schedule it owns (z4j-scheduler) sends submit_task to the engine."""
    slug = cluster.agent["project_slug"]
    key = bb.create_api_key(cluster.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(cluster.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{slug}/schedules", bearer=key, body={
        "name": f"e2e-submit-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval", "expression": "3600",
        "task_name": "celery_proj.add", "args": [40, 2], "kwargs": {}, "scheduler": "z4j-scheduler"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(cluster.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(cluster.agent["agent_id"]),))
    assert len(rows) == 1, rows
    command_id = str(uuid.UUID(rows[0]["id"]))
    done = wait_command_done(cluster.brain, cluster.agent, command_id, 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    new_id = done["result"]["task_id"]
    assert done["result"]["task_name"] == "celery_proj.add" and new_id, done
    ran = cluster.wait_state(new_id, "success", 20)
    assert ran["result"] == 42 and ran["args"] == [40, 2], ran


def test_bulk_retry_runs_each_task_again(cluster):
    originals = [cluster.send("add", n, 100) for n in (1, 2)]
    for tid in originals:
        cluster.wait_state(tid, "success", 20)
    done = cluster.run("bulk-retry", {"filter": {"engine": ENGINE, "task_ids": originals}, "max": 10})
    assert done["status"] == "completed", (done["error"], done["result"])
    result = done["result"]
    assert {k: result[k] for k in ("requested", "succeeded", "failed", "capped")} == {
        "requested": 2, "succeeded": 2, "failed": 0, "capped": False}, result
    assert set(result["new_task_ids"]) == set(originals), result
    for old, n in zip(originals, (1, 2)):
        again = cluster.wait_state(result["new_task_ids"][old], "success", 20)
        assert again["result"] == n + 100 and again["args"] == [n, 100], again


def test_retry_task_runs_the_original_again_or_with_the_operators_overrides(cluster):
    """The brain's Retry on a finished task (POST .../commands/retry-task): the brain sends the
    task by reference (its name, no args: it keeps them redacted), the worker re-sends it with
    the original args; "retry with different inputs" sends override_args/override_kwargs."""
    original = cluster.send("add", 19, 23)
    cluster.wait_state(original, "success", 20)

    done = cluster.run("retry-task", {"engine": ENGINE, "task_id": original})
    assert done["status"] == "completed", (done["error"], done["result"])
    new_id = done["result"]["new_task_id"]
    assert done["result"]["task_id"] == original and done["result"]["task_name"] == "celery_proj.add", done
    assert new_id and new_id != original, done
    again = cluster.wait_state(new_id, "success", 20)
    assert again["name"] == "celery_proj.add" and again["args"] == [19, 23] and again["result"] == 42, again
    res = cluster.app.AsyncResult(new_id)  # the result backend (result_extended) has the run too
    assert res.get(timeout=10) == 42 and res.args == [19, 23], (res.state, res.args)
    assert cluster.task(original)["state"] == "success"

    # Both override halves (the brain refuses one without the other).
    changed = cluster.run("retry-task", {"engine": ENGINE, "task_id": original, "override_args": [100, 5],
                                         "override_kwargs": {}})
    assert changed["status"] == "completed", (changed["error"], changed["result"])
    other = changed["result"]["new_task_id"]
    assert other and other not in (original, new_id), changed
    ran = cluster.wait_state(other, "success", 20)
    assert ran["args"] == [100, 5] and ran["result"] == 105, ran
    assert cluster.app.AsyncResult(other).get(timeout=10) == 105


# ---------------------------------------------------------------- 6 reconcile


def probe_reconcile(cluster, task_ids: list, engine: str = ENGINE) -> list:
    """Puts a reconcile_task probe per task in the brain's command table, as its reconciliation
    sweep does (same action, target and payload, `pending`): the sweep itself runs every 30 s at
    the least, for tasks older than 60 s at the least, too slow for a test. The brain delivers
    pending commands when the agent says hello, so a local process declaring one more action
    makes the daemon say hello again (once: the daemon allows 3 such reconnects a minute).
    Returns the finished commands, in order."""
    import sqlite3
    from datetime import datetime, timedelta, timezone as tz

    ids = [uuid.uuid4() for _ in task_ids]
    now = datetime.now(tz.utc).replace(tzinfo=None)
    con = sqlite3.connect(str(cluster.brain.db_path), timeout=30)
    try:
        with con:
            for command_id, task_id in zip(ids, task_ids):
                con.execute(
                    "INSERT INTO commands (id, project_id, agent_id, action, target_type, target_id, payload, "
                    "status, issued_at, timeout_at) VALUES (?, ?, ?, 'reconcile_task', 'task', ?, ?, 'pending', ?, ?)",
                    (command_id.hex, uuid.UUID(cluster.agent["project_id"]).hex, hexid(cluster.agent["agent_id"]),
                     task_id, json.dumps({"task_id": task_id, "engine": engine}),
                     now.strftime("%Y-%m-%d %H:%M:%S.%f"),
                     (now + timedelta(seconds=60)).strftime("%Y-%m-%d %H:%M:%S.%f")))
    finally:
        con.close()
    nudge = LocalClient(cluster.daemon.socket_path)
    try:
        nudge.hello(process="e2e-rehello", engines=[engine], capabilities={engine: ["e2e_nudge"]})
        return [wait_command_done(cluster.brain, cluster.agent, str(command_id), 90) for command_id in ids]
    finally:
        nudge.close()


def test_reconcile_answers_the_state_a_worker_or_the_result_backend_knows(cluster):
    # A running task: a worker holds it (task_track_started is off: the backend knows nothing).
    running = cluster.send("sleepy", 30)
    host = cluster.wait_state(running, "started", 20)["worker_name"]
    # A task the brain last saw received, whose outcome only the result backend has.
    stuck = f"e2e-stuck-{uuid.uuid4().hex[:12]}"
    probe = LocalClient(cluster.daemon.socket_path)
    try:
        probe.hello(process="e2e-received-only", engines=[ENGINE])
        probe.send({"type": "event", "kind": "task.received", "engine": ENGINE, "task_id": stuck, "ack_id": "r",
                    "data": {"task_name": "celery_proj.add", "queue": "celery", "args": [2, 2], "kwargs": {}}})
        cluster.wait_state(stuck, "received", 15)
    finally:
        probe.close()
    cluster.app.backend.store_result(stuck, 4, "SUCCESS")
    nobody = f"e2e-nobody-{uuid.uuid4().hex[:8]}"

    on_worker, from_backend, unknown = probe_reconcile(cluster, [running, stuck, nobody])
    assert on_worker["status"] == "completed", (on_worker["error"], on_worker["result"])
    assert on_worker["result"] == {"task_id": running, "engine_state": "started", "finished_at": None,
                                   "exception": None, "source": "worker", "worker": host}, on_worker

    assert from_backend["status"] == "completed", (from_backend["error"], from_backend["result"])
    result = from_backend["result"]
    assert {k: result[k] for k in ("task_id", "engine_state", "exception", "source", "celery_state")} == {
        "task_id": stuck, "engine_state": "success", "exception": None, "source": "result_backend",
        "celery_state": "SUCCESS"}, result
    assert result["finished_at"] and result["finished_at"].endswith("+00:00"), result
    # The brain takes the backend's terminal state for the task it believed received.
    assert cluster.wait_state(stuck, "success", 15)["state"] == "success"

    # An id nobody knows: unknown (the brain leaves its rows alone).
    assert unknown["status"] == "completed" and unknown["result"]["engine_state"] == "unknown", unknown
    assert unknown["result"]["celery_state"] == "PENDING", unknown
