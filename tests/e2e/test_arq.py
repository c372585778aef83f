"""A real arq worker (`arq arq_proj.WorkerSettings`, wired with
`z4j_agentd.arq.install`) on the session's redis-server, one z4j-agentd and
the real z4j 1.13.0 brain: job lifecycles with failures and retries, the
Workers page and the queue depth, and every command the worker serves
(submit_task, cancel_task, retry_task, reconcile_task) issued through the
brain's REST API.

arq pins redis < 6, so the worker runs with the python of
`brain.alt_venv()`; this module (in the test venv, without arq) enqueues
jobs through `arq_proj.py enqueue` in that venv. The worker, the daemon and
the agent are started once for the module; the tests run in file order.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid

import pytest

import brain as brainmod
import brain_bootstrap as bb
from control import wait_brain_knows, wait_command_done
from harness import HERE, Background, brain_db, get_task, hexid, resp, task_events, wait_for
from test_celery_commands import probe_reconcile

ENGINE = "arq"
ACTIONS = ["cancel_task", "reconcile_task", "retry_task", "submit_task"]
QUEUE = "arq:queue"
#: The daemon's heartbeat to the brain (what carries health), in seconds.
HEARTBEAT = 10


class Arq:
    """The module's agent, daemon, arq worker and the brain's REST API."""

    def __init__(self, brain, agent, daemon, worker: Background, env: dict, python: str, redis_port: int,
                 db: int) -> None:
        self.brain, self.agent, self.daemon, self.worker = brain, agent, daemon, worker
        self.env, self.python, self.redis_port, self.db = env, python, redis_port, db
        self.name = f"arq@{socket.gethostname()}:{worker.pid}"

    def enqueue(self, *jobs) -> list:
        """[(function, args, kwargs), ...] -> their job ids (through arq, in the alt venv)."""
        out = subprocess.run([self.python, str(HERE / "arq_proj.py"), "enqueue", json.dumps(jobs)],
                             env=self.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def zcard(self) -> int:
        replies = resp(self.redis_port, ["SELECT", str(self.db)], ["ZCARD", QUEUE])
        assert replies[1].startswith(b":"), replies
        return int(replies[1][1:])

    def task(self, job_id: str):
        return get_task(self.brain, self.agent["project_slug"], ENGINE, job_id)

    def wait_state(self, job_id: str, states, timeout: float = 20.0) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def check():
            t = self.task(job_id)
            return t is not None and t["state"] in states, t and {k: t.get(k) for k in ("state", "worker_name")}

        wait_for(check, timeout, f"arq job {job_id} to be {sorted(states)} in the brain", interval=0.3)
        return self.task(job_id)

    def kinds(self, job_id: str) -> list:
        return [e["kind"] for e in sorted(task_events(self.brain, self.agent["project_slug"], ENGINE, job_id),
                                          key=lambda e: e["occurred_at"])]

    def run(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.agent['project_slug']}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return wait_command_done(self.brain, self.agent, cmd["id"], timeout)


@pytest.fixture(scope="module")
def arq(brain, run_dir, redis_server, module_daemon):
    python = str(brainmod.alt_venv() / "bin" / "python")
    agent, daemon = module_daemon("arq")
    started = []
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        db = redis_server.fresh_db()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(daemon.workdir), "PYTHONPATH": str(HERE),
               "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_REDIS_PORT": str(redis_server.port),
               "Z4J_E2E_REDIS_DB": str(db), "Z4J_ARQ_HEALTH_INTERVAL": "2"}
        worker = Background([python, "-m", "arq", "arq_proj.WorkerSettings"], daemon.workdir, "arq-worker", env,
                            run_dir=run_dir, cwd=HERE)
        started.append(worker)

        def serving():
            worker.check_alive()
            caps = set()  # its command connection's (its event connection declares none)
            for c in daemon.stats()["client_list"]:
                if c.get("pid") == worker.pid:
                    caps.update((c.get("capabilities") or {}).get(ENGINE) or [])
            return set(ACTIONS) <= caps, worker.log_tail(5)

        wait_for(serving, 60, "the arq worker to serve its commands", interval=0.2)
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})
        yield Arq(brain, agent, daemon, worker, env, python, redis_server.port, db)
    finally:
        for proc in reversed(started):
            proc.stop(timeout=5)
        daemon.stop()


# ---------------------------------------------------------------- events


def test_jobs_reach_the_brain_with_args_results_failures_and_retries(arq):
    ok, bad, flaky = arq.enqueue(["add", [2, 3], {}], ["boom", [], {"user": "ann", "password": "hunter2-e2e"}], ["flaky", [7], {}])

    done = arq.wait_state(ok, "success")
    assert (done["name"], done["queue"], done["args"], done["kwargs"], done["result"]) == (
        "add", QUEUE, [2, 3], {}, 5), done
    assert done["worker_name"] == arq.name and isinstance(done["runtime_ms"], int), done

    failed = arq.wait_state(bad, "failure")
    assert failed["name"] == "boom" and failed["kwargs"] == {"user": "ann", "password": "[REDACTED]"}, failed
    assert failed["exception"] == "ValueError", failed
    tb = failed["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and "in boom" in tb, tb
    assert 'raise ValueError(f"no such user: {user}")' in tb and tb.rstrip().endswith("ValueError: no such user: ann")
    assert "hunter2" not in json.dumps(failed), failed

    again = arq.wait_state(flaky, "success")
    assert again["result"] == 70 and again["args"] == [7] and again["retry_count"] == 2, again
    kinds = arq.kinds(flaky)
    assert kinds.count("task.retried") == 2 and kinds.count("task.started") == 3, kinds

    # worker.online named the worker as its jobs do.
    rows = brain_db(arq.brain, "SELECT json_extract(payload, '$.worker') AS w FROM events WHERE kind = "
                    "'worker.online' AND agent_id = ?", (hexid(arq.agent["agent_id"]),))
    assert [r["w"] for r in rows] == [arq.name], rows


# ---------------------------------------------------------------- health


def brain_depths(arq) -> dict:
    status, body = arq.brain.api("GET", f"/api/v1/projects/{arq.agent['project_slug']}/stats")
    assert status == 200, f"GET stats: HTTP {status} {body}"
    return {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}


def test_the_workers_page_and_the_queue_depth(arq):
    later = arq.enqueue(*[["add", [n, n], {"_defer_by": 600}] for n in range(3)])
    assert arq.zcard() == 3

    def depth():
        d = brain_depths(arq)
        return d.get(QUEUE) == 3, d

    wait_for(depth, 4 * HEARTBEAT, "the brain's depth of the arq queue to be 3")

    def row():
        status, rows = arq.brain.api("GET", f"/api/v1/projects/{arq.agent['project_slug']}/workers")
        assert status == 200, rows
        mine = [r for r in rows if r["name"] == arq.name]
        return len(mine) == 1 and mine[0].get("pid") == arq.worker.pid, mine or rows

    worker = wait_for(row, 4 * HEARTBEAT, f"the brain's Workers page to show {arq.name}")[0]
    assert worker["engine"] == ENGINE and worker["state"] == "online", worker
    assert worker["concurrency"] == 5 and worker["queues"] == [QUEUE], worker
    status, detail = arq.brain.api("GET", f"/api/v1/projects/{arq.agent['project_slug']}/workers/{worker['id']}")
    assert status == 200, detail
    meta = detail["metadata"]
    assert meta["stats"]["pool"] == {"implementation": "arq", "max-concurrency": 5}, meta["stats"]
    assert meta["registered"] == ["add", "boom", "flaky", "slow"], meta
    assert meta["active_queues"] == [{"name": QUEUE}], meta

    # Cancelled before they start (arq's abort of a deferred job): revoked, and the queue empties.
    for job in later:
        out = arq.run("cancel-task", {"engine": ENGINE, "task_id": job})
        assert out["status"] == "completed", (out["error"], out["result"])
        assert out["result"]["aborted"] is True and out["result"]["state_before"] == "deferred", out
    for job in later:
        arq.wait_state(job, "revoked")
        assert "task.started" not in arq.kinds(job)
    wait_for(lambda: (arq.zcard() == 0, arq.zcard()), 10, "the aborted jobs to leave the queue")
    wait_for(lambda: (brain_depths(arq).get(QUEUE) == 0, brain_depths(arq)), 4 * HEARTBEAT,
             "the brain's depth of the arq queue to be 0")


# ---------------------------------------------------------------- commands


def test_cancel_stops_a_running_async_job(arq):
    (job,) = arq.enqueue(["slow", [30], {}])
    arq.wait_state(job, "started")
    t0 = time.monotonic()
    out = arq.run("cancel-task", {"engine": ENGINE, "task_id": job})
    assert out["status"] == "completed", (out["error"], out["result"])
    assert out["result"] == {"task_id": job, "worker": arq.name, "state_before": "running", "aborted": True}, out
    assert time.monotonic() - t0 < 20
    row = arq.wait_state(job, "revoked")
    assert row["result"] is None, row
    assert not {"task.succeeded", "task.failed"} & set(arq.kinds(job)), arq.kinds(job)
    assert f"{job}:slow aborted" in arq.worker.log_text()
    # The worker goes on.
    (after,) = arq.enqueue(["add", [1, 1], {}])
    assert arq.wait_state(after, "success")["result"] == 2


def test_submit_task_runs_the_job_the_brain_names(arq):
    slug = arq.agent["project_slug"]
    key = bb.create_api_key(arq.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(arq.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{slug}/schedules", bearer=key, body={
        "name": f"e2e-arq-submit-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval",
        "expression": "3600", "task_name": "add", "args": [40, 2], "kwargs": {}, "scheduler": "z4j-scheduler"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(arq.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(arq.agent["agent_id"]),))
    assert len(rows) == 1, rows
    done = wait_command_done(arq.brain, arq.agent, str(uuid.UUID(rows[0]["id"])), 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    new_id = done["result"]["task_id"]
    assert done["result"]["task_name"] == "add" and done["result"]["queue"] == QUEUE and new_id, done
    ran = arq.wait_state(new_id, "success")
    assert ran["result"] == 42 and ran["args"] == [40, 2], ran


def test_retry_task_runs_the_job_again_with_the_operators_inputs(arq):
    """The brain's "retry with different inputs" (both override halves). A plain Retry by
    reference the brain itself refuses for arq (it allows it for celery and rq only), though the
    worker could serve it (arq keeps a finished job's arguments with its result)."""
    (original,) = arq.enqueue(["add", [19, 23], {}])
    arq.wait_state(original, "success")
    status, body = arq.brain.api("POST", f"/api/v1/projects/{arq.agent['project_slug']}/commands/retry-task",
                                 body={"agent_id": arq.agent["agent_id"], "engine": ENGINE, "task_id": original})
    assert status == 409 and "no native retry" in json.dumps(body), (status, body)

    changed = arq.run("retry-task", {"engine": ENGINE, "task_id": original, "override_args": [100, 5],
                                     "override_kwargs": {}})
    assert changed["status"] == "completed", (changed["error"], changed["result"])
    result = changed["result"]
    assert result["task_id"] == original and result["task_name"] == "add" and result["queue"] == QUEUE, result
    assert result["new_task_id"] not in (None, original), result
    ran = arq.wait_state(result["new_task_id"], "success")
    assert ran["name"] == "add" and ran["args"] == [100, 5] and ran["result"] == 105, ran


def test_reconcile_answers_the_state_arq_keeps(arq):
    (running,) = arq.enqueue(["slow", [30], {}])
    arq.wait_state(running, "started")
    (failed,) = arq.enqueue(["boom", [], {}])
    arq.wait_state(failed, "failure")
    nobody = f"e2e-nobody-{uuid.uuid4().hex[:8]}"
    on_worker, from_redis, unknown = probe_reconcile(arq, [running, failed, nobody], engine=ENGINE)
    assert on_worker["status"] == "completed", (on_worker["error"], on_worker["result"])
    assert on_worker["result"]["engine_state"] == "started", on_worker
    assert on_worker["result"]["worker"] == arq.name, on_worker
    assert from_redis["status"] == "completed" and from_redis["result"]["engine_state"] == "failure", from_redis
    assert from_redis["result"]["exception"].startswith("ValueError") and from_redis["result"]["finished_at"]
    assert unknown["status"] == "completed" and unknown["result"]["engine_state"] == "unknown", unknown
    out = arq.run("cancel-task", {"engine": ENGINE, "task_id": running})
    assert out["status"] == "completed", out


def test_a_stopped_worker_says_so_with_worker_offline(arq):
    arq.worker.stop(timeout=10)
    rows = lambda: brain_db(arq.brain, "SELECT json_extract(payload, '$.worker') AS w FROM events "  # noqa: E731
                            "WHERE kind = 'worker.offline' AND agent_id = ?", (hexid(arq.agent["agent_id"]),))
    wait_for(lambda: ([r["w"] for r in rows()] == [arq.name], rows()), 20, "worker.offline in the brain")
