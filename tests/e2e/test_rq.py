"""RQ through the real z4j 1.13.0 brain: a real `rq worker -w z4j_agentd.rq.Worker`
on Redis runs tests/e2e/rq_proj.py; its main process sends every job's lifecycle,
announces the worker, serves the brain's commands and reports its health through
one z4j-agentd.

The worker, the daemon and the agent are started once for the module (the tests
run in file order and share them).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid

import pytest

import brain_bootstrap as bb
from control import wait_brain_knows, wait_command_done
from harness import Background, brain_db, get_task, hexid, task_events, wait_for
from test_health import brain_workers
from test_celery_commands import probe_reconcile

ENGINE = "rq"
HOST = socket.gethostname()
WORKER = f"rq-e2e-{uuid.uuid4().hex[:6]}"
QUEUES = ("default", "rq-e2e-low")
PURGE_QUEUE = f"rq-purge-{uuid.uuid4().hex[:6]}"  # nobody consumes it
ACTIONS = ["bulk_retry", "cancel_task", "dlq.list", "list_dead_letters", "purge_queue", "reconcile_task",
           "requeue_dead_letter", "retry_by_reference_v1", "retry_task", "submit_task"]
HERE = os.path.dirname(os.path.abspath(__file__))


class Cluster:
    def __init__(self, brain, agent, daemon, redis_url, worker) -> None:
        import redis
        from rq import Queue

        self.brain, self.agent, self.daemon, self.worker = brain, agent, daemon, worker
        self.conn = redis.Redis.from_url(redis_url)
        self.queue = Queue("default", connection=self.conn)
        self.slug = agent["project_slug"]

    def enqueue(self, func: str, *args, queue: str = "default", **kwargs):
        from rq import Queue

        return Queue(queue, connection=self.conn).enqueue(f"rq_proj.{func}", *args, **kwargs)

    def issue(self, what: str, body: dict) -> dict:
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.slug}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return cmd

    def run(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        return wait_command_done(self.brain, self.agent, self.issue(what, body)["id"], timeout)

    def task(self, task_id: str):
        return get_task(self.brain, self.slug, ENGINE, task_id)

    def wait_state(self, task_id: str, states, timeout: float = 30.0) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def check():
            t = self.task(task_id)
            return t is not None and t["state"] in states, t and {k: t.get(k) for k in ("state", "worker_name")}

        wait_for(check, timeout, f"task {task_id} to be {sorted(states)} in the brain", interval=0.3)
        return self.task(task_id)

    def kinds(self, task_id: str) -> list:
        return sorted(e["kind"] for e in task_events(self.brain, self.slug, ENGINE, task_id))

    def status(self, job) -> str:
        return job.get_status(refresh=True).value


@pytest.fixture(scope="module")
def cluster(brain, run_dir, redis_server, module_daemon):
    pytest.importorskip("rq")
    agent, daemon = module_daemon("rq")
    started = []
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        redis_url = redis_server.url(redis_server.fresh_db())
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
               "PYTHONPATH": HERE, "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_RQ_HEALTH_INTERVAL": "1"}
        worker = Background([sys.executable, "-m", "rq.cli", "worker", "-u", redis_url, "-w", "z4j_agentd.rq.Worker",
                             "-n", WORKER, "--with-scheduler", *QUEUES], daemon.workdir, "rq-worker", env,
                            run_dir=run_dir)
        started.append(worker)
        c = Cluster(brain, agent, daemon, redis_url, worker)
        c.enqueue("add", 0, 0, queue=PURGE_QUEUE).delete()  # the queue exists (rq:queues) at depth 0

        def ready():
            worker.check_alive()
            serving = {cl.get("pid") for cl in daemon.stats()["client_list"]
                       if "purge_queue" in ((cl.get("capabilities") or {}).get(ENGINE) or [])}
            return worker.pid in serving, serving

        wait_for(ready, 60, "the RQ worker to serve its commands", interval=0.2)
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})
        yield c
    finally:
        for proc in reversed(started):
            proc.stop(timeout=5)
        daemon.stop()


# ---------------------------------------------------------------- 1 lifecycles


def test_jobs_reach_the_brain_with_args_results_failures_and_retries(cluster):
    """add -> success with its args and result; boom -> failure with ValueError and its
    traceback; flaky (Retry(max=3), fails twice) -> retried, then success; the worker announces
    itself by the name RQ gives it."""
    from rq import Retry

    ok = cluster.enqueue("add", 2, 3, password="hunter2")
    bad = cluster.enqueue("boom", "it broke")
    key = f"flaky-{uuid.uuid4().hex[:6]}"
    flaky = cluster.enqueue("flaky", key, 2, retry=Retry(max=3))
    gives_up = cluster.enqueue("flaky", key + "-x", 5, retry=Retry(max=1))

    done = cluster.wait_state(ok.id, "success")
    want = {"name": "rq_proj.add", "queue": "default", "result": 5, "exception": None, "worker_name": WORKER,
            "args": [2, 3], "kwargs": {"password": "[REDACTED]"}}
    assert {k: done.get(k) for k in want} == want, done
    assert isinstance(done.get("runtime_ms"), int), done

    failed = cluster.wait_state(bad.id, "failure")
    assert failed["exception"] == "ValueError" and failed["args"] == ["it broke"], failed
    tb = failed.get("traceback") or ""
    assert tb.startswith("Traceback (most recent call last):") and "rq_proj.py" in tb, tb
    assert tb.rstrip().endswith("ValueError: it broke"), tb

    ran = cluster.wait_state(flaky.id, "success")
    assert ran["result"] == {"attempts": 3} and ran["retry_count"] >= 1, ran
    kinds = cluster.kinds(flaky.id)
    assert set(kinds) == {"task.received", "task.started", "task.retried", "task.succeeded"}, kinds
    retried = [e["payload"] for e in task_events(cluster.brain, cluster.slug, ENGINE, flaky.id)
               if e["kind"] == "task.retried"]
    assert retried and all("RuntimeError: attempt" in r["traceback"] for r in retried), retried

    lost = cluster.wait_state(gives_up.id, "failure")
    assert lost["exception"] == "RuntimeError", lost
    assert "task.retried" in cluster.kinds(gives_up.id)

    rows = brain_db(cluster.brain, "SELECT kind, payload FROM events WHERE agent_id = ? AND kind = 'worker.online'",
                    (hexid(cluster.agent["agent_id"]),))
    online = [json.loads(r["payload"]) for r in rows]
    assert len(online) == 1 and online[0]["worker"] == WORKER, online
    assert online[0]["pid"] == cluster.worker.pid and online[0]["concurrency"] == 1, online
    assert online[0]["queues"] == list(QUEUES) and online[0]["pool"] == "z4j_agentd.rq:Worker", online


# ---------------------------------------------------------------- 2 health


def test_the_workers_page_and_queue_depths_fill_in(cluster):
    def listed():
        rows = brain_workers(cluster.brain, cluster.agent)
        row = rows.get(WORKER)
        return row is not None and row.get("concurrency") == 1 and row.get("pid") == cluster.worker.pid, rows

    wait_for(listed, 30, "the brain to list the RQ worker with its pid and concurrency")

    for n in range(2):
        cluster.enqueue("add", n, n, queue="rq-e2e-idle")

    def depths():
        status, body = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/stats")
        assert status == 200, body
        seen = {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}
        return seen.get("rq-e2e-idle") == 2 and seen.get("default") == 0, seen

    wait_for(depths, 30, "the brain to show the RQ queue depths", interval=0.5)


# ---------------------------------------------------------------- 3 cancel


def test_cancel_stops_a_running_job_and_cancels_a_waiting_one(cluster):
    running = cluster.enqueue("sleepy", 30)
    cluster.wait_state(running.id, "started")
    waiting = cluster.enqueue("add", 7, 8)  # behind the running one: the worker runs one job at a time
    assert cluster.status(waiting) == "queued"

    done = cluster.run("cancel-task", {"engine": ENGINE, "task_id": waiting.id})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"task_id": waiting.id, "state_before": "queued", "cancelled": True,
                              "stopped": False, "status": "canceled"}, done

    began = time.monotonic()
    done = cluster.run("cancel-task", {"engine": ENGINE, "task_id": running.id})
    assert done["status"] == "completed", (done["error"], done["result"])
    result = done["result"]
    assert {k: result[k] for k in ("task_id", "state_before", "cancelled", "stopped", "status", "worker")} == {
        "task_id": running.id, "state_before": "running", "cancelled": True, "stopped": True, "status": "stopped",
        "worker": WORKER}, result
    assert time.monotonic() - began < 20
    assert cluster.status(running) == "stopped"
    assert cluster.wait_state(running.id, "revoked")["worker_name"] == WORKER
    cluster.wait_state(waiting.id, "revoked")
    # The worker goes on with the next job; the cancelled one never ran.
    after = cluster.enqueue("add", 1, 1)
    cluster.wait_state(after.id, "success")
    assert cluster.status(waiting) == "canceled" and "task.started" not in cluster.kinds(waiting.id)


# ---------------------------------------------------------------- 4 retries and dead letters


def test_dead_letters_are_listed_requeued_and_retried(cluster):
    bad = cluster.enqueue("boom", "dead letter")
    cluster.wait_state(bad.id, "failure")

    status, page = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/dead-letters",
                                     params={"engine": ENGINE, "queue": "default", "limit": 200})
    assert status == 200, (status, page)
    entry = next(e for e in page["entries"] if e["task_id"] == bad.id)
    assert entry["task_name"] == "rq_proj.boom" and entry["queue"] == "default", entry
    assert "ValueError: dead letter" in entry["error_excerpt"] and entry["failed_at"], entry

    done = cluster.run("requeue-dead-letter", {"engine": ENGINE, "task_id": bad.id})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"task_id": bad.id, "queue": "default", "requeued": True,
                              "source": "failed_registry"}, done
    # Same job id, run again: RQ keeps a result per run (the brain keeps one event per task, kind
    # and second, so two quick runs may show as one row each).
    wait_for(lambda: (len(bad.results()) >= 2, [r.type for r in bad.results()]), 30,
             "the requeued job to run (and fail) again")
    assert cluster.wait_state(bad.id, "failure")["exception"] == "ValueError"

    ok = cluster.enqueue("add", 19, 23)
    cluster.wait_state(ok.id, "success")
    done = cluster.run("retry-task", {"engine": ENGINE, "task_id": ok.id})
    assert done["status"] == "completed", (done["error"], done["result"])
    new_id = done["result"]["new_task_id"]
    assert new_id != ok.id and done["result"]["task_name"] == "rq_proj.add", done
    again = cluster.wait_state(new_id, "success")
    assert again["args"] == [19, 23] and again["result"] == 42, again

    changed = cluster.run("retry-task", {"engine": ENGINE, "task_id": ok.id, "override_args": [100, 5],
                                         "override_kwargs": {}})
    assert changed["status"] == "completed", (changed["error"], changed["result"])
    assert cluster.wait_state(changed["result"]["new_task_id"], "success")["result"] == 105

    first, second = cluster.enqueue("boom", "one"), cluster.enqueue("boom", "two")
    cluster.wait_state(first.id, "failure")
    cluster.wait_state(second.id, "failure")
    done = cluster.run("bulk-retry", {"filter": {"engine": ENGINE, "task_ids": [first.id, second.id]}, "max": 10})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"]["succeeded"] == 2 and done["result"]["new_task_ids"] == {first.id: first.id,
                                                                                    second.id: second.id}, done
    for job in (first, second):
        # Same job id, run again: RQ keeps a result per run.
        wait_for(lambda: (cluster.status(job) == "failed" and len(job.results()) >= 2, cluster.status(job)),
                 30, f"{job.id} to run again")


# ---------------------------------------------------------------- 5 purge and submit


def test_purge_empties_the_queue_at_the_confirmed_depth_only(cluster):
    for n in range(3):
        cluster.enqueue("add", n, n, queue=PURGE_QUEUE)

    def reported(depth):
        def check():
            status, body = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/stats")
            seen = {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}
            return seen.get(PURGE_QUEUE) == depth, seen
        return check

    wait_for(reported(3), 30, f"the brain to see {PURGE_QUEUE} at depth 3", interval=0.5)
    done = cluster.run("purge-queue", {"queue": PURGE_QUEUE, "observed_depth": 3})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"queue": PURGE_QUEUE, "depth_before": 3, "purged": 3, "force": False}, done
    from rq import Queue

    assert Queue(PURGE_QUEUE, connection=cluster.conn).count == 0

    cluster.enqueue("add", 1, 2, queue=PURGE_QUEUE)
    cluster.enqueue("add", 3, 4, queue=PURGE_QUEUE)
    # The brain shows what the daemon last heard from the worker: depth 2.
    wait_for(reported(2), 30, f"the brain to see {PURGE_QUEUE} at depth 2", interval=0.5)
    stale = cluster.run("purge-queue", {"queue": PURGE_QUEUE, "observed_depth": 1})
    assert stale["status"] == "failed", stale
    assert "confirm_token does not match the last reported depth 2" in stale["error"], stale
    assert Queue(PURGE_QUEUE, connection=cluster.conn).count == 2


def test_submit_task_runs_the_job_the_brain_names(cluster):
    """The brain's "run now" of a schedule it owns sends submit_task to the engine."""
    key = bb.create_api_key(cluster.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(cluster.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{cluster.slug}/schedules", bearer=key, body={
        "name": f"e2e-rq-submit-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval",
        "expression": "3600", "task_name": "rq_proj.add", "args": [40, 2], "kwargs": {},
        "scheduler": "z4j-scheduler", "queue": "default"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{cluster.slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(cluster.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(cluster.agent["agent_id"]),))
    assert len(rows) == 1, rows
    done = wait_command_done(cluster.brain, cluster.agent, str(uuid.UUID(rows[0]["id"])), 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"]["task_name"] == "rq_proj.add" and done["result"]["queue"] == "default", done
    ran = cluster.wait_state(done["result"]["task_id"], "success")
    assert ran["result"] == 42 and ran["args"] == [40, 2], ran


def test_reconcile_answers_the_state_redis_has(cluster):
    """z4j-rq answers `unknown` for every job (it compares RQ 3's status with str())."""
    ok, bad = cluster.enqueue("add", 1, 2), cluster.enqueue("boom", "for reconcile")
    cluster.wait_state(ok.id, "success")
    cluster.wait_state(bad.id, "failure")
    waiting = cluster.enqueue("add", 5, 5, queue="rq-e2e-idle")  # nobody consumes it
    done, failed, pending, nobody = probe_reconcile(cluster, [ok.id, bad.id, waiting.id, "rq-e2e-nobody"], engine=ENGINE)
    for cmd in (done, failed, pending, nobody):
        assert cmd["status"] == "completed", (cmd["error"], cmd["result"])
    assert done["result"]["engine_state"] == "success" and done["result"]["finished_at"], done
    assert failed["result"]["engine_state"] == "failure", failed
    assert "ValueError: for reconcile" in failed["result"]["exception"], failed
    assert pending["result"]["engine_state"] == "pending" and pending["result"]["rq_status"] == "queued", pending
    assert nobody["result"]["engine_state"] == "unknown", nobody


def test_the_worker_says_offline_when_it_stops(cluster):
    code = cluster.worker.stop(timeout=10)  # SIGTERM: a warm shutdown
    assert code is not None
    cluster.daemon.wait_stats(lambda s: s["spool_depth"] == 0, 20, "the daemon to forward the last events")

    def offline():
        rows = brain_db(cluster.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'worker.offline'",
                        (hexid(cluster.agent["agent_id"]),))
        return len(rows) == 1 and json.loads(rows[0]["payload"])["worker"] == WORKER, rows

    wait_for(offline, 20, "the brain to store worker.offline")
