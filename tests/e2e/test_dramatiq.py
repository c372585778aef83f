"""Dramatiq through `z4j_agentd.dramatiq.install(broker)`, one z4j-agentd and
the real z4j 1.13.0 brain: a real `dramatiq` worker (one process, two
threads, tests/e2e/dramatiq_proj.py) on Redis, and this test process as a
producer (its own broker and client on the daemon's socket).

Lifecycles with arguments, results, failures and retries; the worker's
events, Workers page row and queue depths; and each command the worker
serves, issued through the brain's REST API: cancel (dramatiq-abort) of a
running message, purge at the confirmed depth, retry with
overrides (the brain itself refuses a plain retry for Dramatiq), submit_task,
and the Dead letters page. The worker, the daemon
and the agent are started once for the module (tests run in file order).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

import brain_bootstrap as bb
from control import wait_brain_knows, wait_command_done
from harness import Background, brain_db, get_task, hexid, resp, task_events, wait_for
from test_celery_commands import probe_reconcile

ENGINE = "dramatiq"
HERE = Path(__file__).resolve().parent
HOST = socket.gethostname()
WORK, IDLE = "dq-work", "dq-idle"
ACTIONS = ["cancel_task", "dlq.list", "list_dead_letters", "purge_queue", "reconcile_task", "retry_task",
           "submit_task", "retry_by_reference_v1"]
HEARTBEAT = 10  # the brain's heartbeat interval: the daemon forwards health this often


class Cluster:
    def __init__(self, brain, agent, daemon, broker_url, worker, producer, db) -> None:
        self.brain, self.agent, self.daemon = brain, agent, daemon
        self.broker_url, self.worker, self.producer, self.db = broker_url, worker, producer, db
        self.slug = agent["project_slug"]

    @property
    def worker_name(self) -> str:
        children = self.worker.children()
        assert len(children) == 1, f"the dramatiq master should have one worker process: {children}"
        return f"{HOST}@{children[0]}"

    def send(self, actor: str, *args, queue: str = WORK, **kwargs) -> str:
        from dramatiq.message import Message

        message = Message(queue_name=queue, actor_name=actor, args=args, kwargs=kwargs, options={})
        return self.producer.enqueue(message).message_id

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
        return [e["kind"] for e in task_events(self.brain, self.slug, ENGINE, task_id)]

    def run(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.slug}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return wait_command_done(self.brain, self.agent, cmd["id"], timeout)

    def redis(self, *command) -> bytes:
        return resp(self.port, ["SELECT", str(self.db)], list(command))[1]

    @property
    def port(self) -> int:
        return int(self.broker_url.rsplit(":", 1)[1].split("/")[0])

    def brain_depths(self) -> dict:
        status, body = self.brain.api("GET", f"/api/v1/projects/{self.slug}/stats")
        assert status == 200, f"GET stats: HTTP {status} {body}"
        return {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}

    def reported_depth(self, queue: str):
        """The depth of `queue` in the daemon's freshest client report."""
        for c in self.daemon.stats()["client_list"]:
            e = ((c.get("health") or {}).get("engines") or {}).get(ENGINE)
            if e and queue in (e.get("queue_depths") or {}):
                return e["queue_depths"][queue]
        return None


@pytest.fixture(scope="module")
def cluster(brain, run_dir, redis_server, module_daemon):
    from dramatiq.brokers.redis import RedisBroker

    import z4j_agentd
    import z4j_agentd.dramatiq as zd

    agent, daemon = module_daemon("dramatiq")
    worker = producer = client = None
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        db = redis_server.fresh_db()
        url = redis_server.url(db)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
               "PYTHONPATH": str(HERE), "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_BROKER": url,
               "Z4J_DRAMATIQ_HEALTH_INTERVAL": "2"}
        worker = Background([sys.executable, "-m", "dramatiq", "dramatiq_proj", "--processes", "1", "--threads", "2",
                             "-Q", WORK, "--path", str(HERE)], daemon.workdir, "dramatiq-worker", env, run_dir=run_dir)

        def ready():
            worker.check_alive()
            serving = [c for c in daemon.stats()["client_list"]
                       if "purge_queue" in ((c.get("capabilities") or {}).get(ENGINE) or [])]
            return "ready for action" in worker.log_text() and len(serving) == 1, worker.log_tail(5)

        wait_for(ready, 60, "the dramatiq worker to serve its commands", interval=0.2)
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})
        producer = RedisBroker(url=url)
        client = z4j_agentd.Client(socket_path=str(daemon.socket_path), process="e2e-dramatiq-producer")
        zd.install(producer, client, serve_commands=False)
        yield Cluster(brain, agent, daemon, url, worker, producer, db)
    finally:
        zd.uninstall()
        if client is not None:
            client.close(timeout=5)
        if producer is not None:
            producer.close()
        if worker is not None:
            worker.stop(timeout=5)
        daemon.stop()


# ---------------------------------------------------------------- 1 lifecycles


def test_lifecycles_reach_the_brain_with_args_results_failures_and_retries(cluster):
    ok = cluster.send("add", 2, 3, password="hunter2")
    bad = cluster.send("flaky", 7)
    fan = cluster.send("fanout", 5)
    name = cluster.worker_name

    done = cluster.wait_state(ok, "success")
    assert done["name"] == "add" and done["queue"] == WORK and done["worker_name"] == name, done
    assert done["args"] == [2, 3] and done["kwargs"] == {"password": "[REDACTED]"}, done
    assert done["result"] == 5 and isinstance(done["runtime_ms"], int), done
    # The producer's task.received, and the worker's own just before task.started (it did not see
    # the enqueue): the brain keeps one event per task, kind and second, so one or two.
    kinds = cluster.kinds(ok)
    assert set(kinds) == {"task.received", "task.started", "task.succeeded"} and len(kinds) <= 4, kinds

    failed = cluster.wait_state(bad, "failure")
    assert failed["args"] == [7] and failed["retry_count"] == 1 and failed["worker_name"] == name, failed
    assert "ValueError" in failed["exception"] and "flaky 7 failed" in failed["traceback"], failed
    kinds = cluster.kinds(bad)
    # The retry re-enqueues the same message: no task.received of its own (producer + worker at most).
    assert kinds.count("task.retried") == 1 and kinds.count("task.received") <= 2, kinds
    # Both attempts started (the brain keeps one event per task, kind and second: usually one here).
    assert kinds.count("task.started") >= 1 and kinds.count("task.failed") == 1, kinds

    cluster.wait_state(fan, "success")
    rows = brain_db(cluster.brain, "SELECT task_id, root_task_id FROM tasks WHERE parent_task_id = ?", (fan,))
    assert len(rows) == 1 and rows[0]["root_task_id"] == fan, rows
    child = cluster.wait_state(rows[0]["task_id"], "success")
    assert child["name"] == "add" and child["args"] == [5, 5] and child["result"] == 10, child

    events = brain_db(cluster.brain, "SELECT kind, payload FROM events WHERE agent_id = ? AND kind = 'worker.online'",
                      (hexid(cluster.agent["agent_id"]),))
    online = [json.loads(r["payload"]) for r in events]
    assert len(online) == 1, online
    data = online[0]
    assert data["worker"] == name and data["pid"] == int(name.rsplit("@", 1)[1]), data
    assert data["concurrency"] == 2 and data["queues"] == [WORK] and data["hostname"] == HOST, data


# ---------------------------------------------------------------- 2 health and cancel


def test_workers_page_depths_and_cancel_of_a_running_message(cluster):
    for n in range(3):
        cluster.send("idle", n, queue=IDLE)
    spin = cluster.send("spin", 40)
    cluster.wait_state(spin, "started", 20)
    name = cluster.worker_name

    def row():
        status, rows = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/workers")
        assert status == 200, rows
        mine = [r for r in rows if r["name"] == name]
        depths = cluster.brain_depths()
        return (len(mine) == 1 and mine[0].get("active_tasks") == 1 and depths.get(IDLE) == 3,
                (mine, depths))

    mine, depths = wait_for(row, 4 * HEARTBEAT, "the brain's Workers page and queue depths")
    worker = mine[0]
    assert worker["concurrency"] == 2 and worker["queues"] == [WORK] and worker["state"] == "online", worker
    assert depths.get(WORK) == 1, depths  # the running spin is not acknowledged yet
    status, detail = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/workers/{worker['id']}")
    assert status == 200, detail
    meta = detail["metadata"]
    assert meta["stats"]["pool"]["max-concurrency"] == 2 and meta["stats"]["pid"] == int(name.rsplit("@", 1)[1])
    assert meta["stats"]["broker"]["transport"] == "redis" and meta["stats"]["broker"]["port"] == cluster.port
    assert [a["id"] for a in meta["active"]] == [spin] and meta["active"][0]["name"] == "spin", meta["active"]
    assert meta["registered"] == ["add", "fanout", "flaky", "idle", "spin"], meta["registered"]

    t0 = time.monotonic()
    done = cluster.run("cancel-task", {"engine": ENGINE, "task_id": spin})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert {k: done["result"][k] for k in ("task_id", "cancelled", "state_before", "terminated", "worker")} == {
        "task_id": spin, "cancelled": True, "state_before": "running", "terminated": True, "worker": name}, done
    assert time.monotonic() - t0 < 15
    cluster.wait_state(spin, "revoked", 15)
    # Retries put it back (as it would without z4j, backoff 100-200 ms); the cancel skips that retry when it
    # comes up (its task.revoked falls in the same second as the first: the brain keeps one of the two).
    wait_for(lambda: ("spin(40) was skipped" in cluster.worker.log_text(), cluster.worker.log_tail(3)), 15,
             "the retry of the cancelled message to be skipped")
    kinds = cluster.kinds(spin)
    assert kinds.count("task.started") == 1 and "task.retried" not in kinds, kinds
    assert "task.succeeded" not in kinds and cluster.task(spin)["state"] == "revoked", kinds
    assert cluster.redis("HLEN", f"dramatiq:{WORK}.DQ.msgs") == b":0"


# ---------------------------------------------------------------- 3 purge


def test_purge_empties_the_queue_at_the_confirmed_depth_only(cluster):
    from z4j_agentd.dramatiq import _broker

    wait_for(lambda: (cluster.reported_depth(IDLE) == 3, cluster.reported_depth(IDLE)), 10,
             "the worker to report 3 messages waiting on the idle queue")
    done = cluster.run("purge-queue", {"queue": IDLE, "observed_depth": 3})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert {k: done["result"][k] for k in ("queue", "depth_before", "purged", "force")} == {
        "queue": IDLE, "depth_before": 3, "purged": 3, "force": False}, done
    assert cluster.redis("HLEN", f"dramatiq:{IDLE}.msgs") == b":0"
    assert cluster.redis("LLEN", f"dramatiq:{IDLE}") == b":0"

    cluster.send("idle", 1, queue=IDLE)
    cluster.send("idle", 2, queue=IDLE)
    wait_for(lambda: (cluster.reported_depth(IDLE) == 2, cluster.reported_depth(IDLE)), 10, "the new depth")
    stale = cluster.run("purge-queue", {"queue": IDLE, "observed_depth": 1})
    assert stale["status"] == "failed" and "confirm_token does not match" in stale["error"], stale
    # The worker's own check, one atomic step on Redis: a depth that is not the confirmed one purges nothing.
    assert _broker.purge(cluster.producer, IDLE, 1, False) == (False, 2, 0)
    assert cluster.redis("HLEN", f"dramatiq:{IDLE}.msgs") == b":2"


# ---------------------------------------------------------------- 4 retry, submit, dead letters


def test_retry_with_overrides_runs_the_actor_again(cluster):
    """The brain's "retry with different inputs"; a plain Retry of a Dramatiq task is refused by the
    brain itself (409: it keeps the arguments redacted and does not send a by-reference retry for
    this engine), before any command reaches the agent."""
    original = cluster.send("add", 19, 23)
    cluster.wait_state(original, "success")
    status, body = cluster.brain.api("POST", f"/api/v1/projects/{cluster.slug}/commands/retry-task",
                                     body={"agent_id": cluster.agent["agent_id"], "engine": ENGINE,
                                           "task_id": original})
    assert status == 409 and "override_args" in json.dumps(body), (status, body)

    changed = cluster.run("retry-task", {"engine": ENGINE, "task_id": original, "override_args": [100, 5],
                                         "override_kwargs": {}})
    assert changed["status"] == "completed", (changed["error"], changed["result"])
    result = changed["result"]
    assert result["task_id"] == original and result["task_name"] == "add", result
    assert result["arguments_from"] == "override" and result["new_task_id"] != original, result
    other = cluster.wait_state(result["new_task_id"], "success")
    assert other["args"] == [100, 5] and other["result"] == 105, other


def test_submit_task_runs_the_actor_the_brain_names(cluster):
    key = bb.create_api_key(cluster.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(cluster.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{cluster.slug}/schedules", bearer=key, body={
        "name": f"e2e-dq-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval", "expression": "3600",
        "task_name": "add", "args": [40, 2], "kwargs": {}, "scheduler": "z4j-scheduler"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{cluster.slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(cluster.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(cluster.agent["agent_id"]),))
    assert len(rows) == 1, rows
    done = wait_command_done(cluster.brain, cluster.agent, str(uuid.UUID(rows[0]["id"])), 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    ran = cluster.wait_state(done["result"]["task_id"], "success")
    assert ran["name"] == "add" and ran["args"] == [40, 2] and ran["result"] == 42, ran


def test_dead_letters_page_lists_the_failed_message(cluster):
    bad = cluster.send("flaky", 99)
    cluster.wait_state(bad, "failure")
    status, page = cluster.brain.api("GET", f"/api/v1/projects/{cluster.slug}/dead-letters",
                                     params={"engine": ENGINE, "queue": WORK, "limit": 50})
    assert status == 200, (status, page)
    entries = {e["task_id"]: e for e in page["entries"]}
    assert bad in entries and page["total"] == len(page["entries"]) >= 2, page
    entry = entries[bad]
    assert entry["task_name"] == "flaky" and entry["queue"] == WORK and entry["attempts"] == 1, entry
    assert "flaky 99 failed" in entry["error_excerpt"] and entry["failed_at"], entry


# ---------------------------------------------------------------- 5 reconcile


def test_reconcile_answers_what_the_worker_or_the_broker_knows(cluster):
    running = cluster.send("spin", 30)
    cluster.wait_state(running, "started", 20)
    # A message another worker process has taken (this process's consumer, unacknowledged): not "pending".
    held = cluster.send("idle", 4, queue=IDLE)
    consumer = cluster.producer.consume(IDLE, prefetch=int(cluster.redis("LLEN", f"dramatiq:{IDLE}")[1:]),
                                        timeout=1000)
    taken = {m.message_id for m in iter(lambda: next(consumer), None)}
    assert held in taken, taken
    waiting = cluster.send("idle", 5, queue=IDLE)
    dead = cluster.send("flaky", 3)
    cluster.wait_state(dead, "failure")
    nobody = f"e2e-nobody-{uuid.uuid4().hex[:8]}"
    try:
        on_worker, queued, fetched, failed, unknown = probe_reconcile(
            cluster, [running, waiting, held, dead, nobody], engine=ENGINE)
    finally:
        consumer.close()
    for done in (on_worker, queued, fetched, failed, unknown):
        assert done["status"] == "completed", (done["error"], done["result"])
    assert {k: fetched["result"][k] for k in ("engine_state", "queue", "place")} == {
        "engine_state": "unknown", "queue": IDLE, "place": "fetched"}, fetched
    assert on_worker["result"] == {"task_id": running, "engine_state": "started", "finished_at": None,
                                   "exception": None, "source": "worker", "worker": cluster.worker_name}
    assert {k: queued["result"][k] for k in ("engine_state", "source", "queue", "place")} == {
        "engine_state": "pending", "source": "broker", "queue": IDLE, "place": "waiting"}, queued
    result = failed["result"]
    assert result["engine_state"] == "failure" and result["source"] == "broker" and result["queue"] == WORK, result
    assert "flaky 3 failed" in result["exception"] and result["finished_at"], result
    assert unknown["result"]["engine_state"] == "unknown", unknown
    cancel = cluster.run("cancel-task", {"engine": ENGINE, "task_id": running})  # leave the worker idle
    assert cancel["status"] == "completed", cancel


# ---------------------------------------------------------------- 6 shutdown (last: stops the worker)


def test_worker_offline_when_the_worker_stops(cluster):
    name = cluster.worker_name
    rc = cluster.worker.stop(timeout=30)
    assert rc == 0, (rc, cluster.worker.log_tail(10))

    def offline():
        rows = brain_db(cluster.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'worker.offline'",
                        (hexid(cluster.agent["agent_id"]),))
        return [json.loads(r["payload"]) for r in rows], rows

    got = wait_for(lambda: (lambda o: (len(o[0]) == 1, o[1]))(offline()), 20, "worker.offline in the brain")
    data = json.loads(got[0]["payload"])
    assert data["worker"] == name and data["pid"] == int(name.rsplit("@", 1)[1]) and data["hostname"] == HOST, data
