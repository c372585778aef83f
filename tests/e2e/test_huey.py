"""Huey through `z4j_agentd.huey.install(huey)` (tests/e2e/huey_proj.py), one z4j-agentd and
the real z4j 1.13.0 brain: a real `huey_consumer huey_proj.huey -k thread -w 2` on Redis.
Task lifecycles (success, failure after a retry, success on a retry, redacted arguments)
reach the brain in their states with arguments and results; the consumer announces itself
and its queue depth and details reach the Workers page; every command the consumer
advertises, issued through the brain's REST API, completes and has its effect: cancel stops
a running task and revokes a queued one, purge empties the queue at the confirmed depth,
retry and submit enqueue again, reconcile reads the result store.

The consumer, the daemon and the agent are started once for the module (the tests run in
file order and share them). The test process enqueues as a web app would, with its own
Huey instance of the same name; one producer installs z4j too.
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
from harness import Background, brain_db, get_task, hexid, task_events, wait_for
from test_celery_commands import probe_reconcile

ENGINE = "huey"
HERE = Path(__file__).resolve().parent
ACTIONS = ["cancel_task", "purge_queue", "reconcile_task", "retry_task", "submit_task"]
SECRET = "e2e-s3cr3t-0123456789abcdef"


def producer_tasks(huey):
    """The consumer's tasks, as a producer defines them (same registry names, huey_proj.*)."""
    tasks = {}

    def define(name):
        def fn(*args, **kwargs):  # never runs here
            raise AssertionError("producers do not run tasks")
        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = "huey_proj"
        return fn

    for name, options in (("add", {}), ("flaky", {"retries": 1}), ("boom", {"retries": 1}),
                          ("sleepy", {"retries": 2}), ("guarded", {"retries": 2}), ("login", {})):
        tasks[name] = huey.task(**options)(define(name))
    return tasks


class Cluster:
    def __init__(self, brain, agent, daemon, consumer, broker, name):
        from huey import RedisHuey

        self.brain, self.agent, self.daemon, self.consumer, self.broker, self.name = (
            brain, agent, daemon, consumer, broker, name)
        self.huey = RedisHuey(name, url=broker, utc=True)
        self.tasks = producer_tasks(self.huey)
        self.worker = f"huey@{socket.gethostname()}:{consumer.pid}"

    def run(self, what, body, timeout=30.0):
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.agent['project_slug']}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return wait_command_done(self.brain, self.agent, cmd["id"], timeout)

    def task(self, task_id):
        return get_task(self.brain, self.agent["project_slug"], ENGINE, task_id)

    def wait_state(self, task_id, states, timeout=20.0):
        states = {states} if isinstance(states, str) else set(states)

        def check():
            t = self.task(task_id)
            return t is not None and t["state"] in states, t and {k: t.get(k) for k in ("state", "worker_name")}

        wait_for(check, timeout, f"huey task {task_id} to be {sorted(states)} in the brain", interval=0.2)
        return self.task(task_id)

    def kinds(self, task_id):
        return sorted(e["kind"] for e in task_events(self.brain, self.agent["project_slug"], ENGINE, task_id))

    def reported_depth(self):
        for c in self.daemon.stats()["client_list"]:
            if c.get("pid") == self.consumer.pid and c.get("health"):
                depth = ((c["health"].get("engines") or {}).get(ENGINE) or {}).get("queue_depths", {}).get(self.name)
                if depth is not None:
                    return depth
        return None


@pytest.fixture(scope="module")
def cluster(brain, run_dir, redis_server, module_daemon):
    try:
        import z4j_agentd.huey  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Python client with Huey is not installed in {sys.prefix} ({exc})")
    agent, daemon = module_daemon("huey")
    consumer = None
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        broker = redis_server.url(redis_server.fresh_db())
        name = f"e2e-huey-{uuid.uuid4().hex[:6]}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
               "PYTHONPATH": str(HERE), "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_BROKER": broker,
               "Z4J_E2E_HUEY_NAME": name, "Z4J_HUEY_HEALTH_INTERVAL": "0.5",
               "Z4J_HUEY_STOP_RUNNING": "1"}  # the cancel test stops running tasks
        consumer = Background([sys.executable, "-m", "huey.bin.huey_consumer", "huey_proj.huey", "-k", "thread",
                               "-w", "2", "-n", "-d", "0.05", "-m", "0.2"],
                              daemon.workdir, "huey-consumer", env, run_dir=run_dir)

        def ready():
            consumer.check_alive()
            serving = {c.get("pid") for c in daemon.stats()["client_list"]
                       if "purge_queue" in ((c.get("capabilities") or {}).get(ENGINE) or [])}
            return consumer.pid in serving and "Huey consumer started" in consumer.log_text(), serving

        wait_for(ready, 60, "the Huey consumer to serve its commands", interval=0.2)
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})
        c = Cluster(brain, agent, daemon, consumer, broker, name)
        yield c
    finally:
        if consumer is not None:
            consumer.stop(timeout=5)
        daemon.stop()


# ---------------------------------------------------------------- 1 the consumer


def test_the_consumer_announces_itself_and_reaches_the_workers_page(cluster):
    rows = brain_db(cluster.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'worker.online'",
                    (hexid(cluster.agent["agent_id"]),))
    online = [json.loads(r["payload"]) for r in rows]
    assert len(online) == 1, online
    assert {k: online[0].get(k) for k in ("worker", "pid", "concurrency", "pool", "queues")} == {
        "worker": cluster.worker, "pid": cluster.consumer.pid, "concurrency": 2, "pool": "huey.consumer(thread)",
        "queues": [cluster.name]}, online

    def listed():
        status, body = cluster.brain.api("GET", f"/api/v1/projects/{cluster.agent['project_slug']}/workers")
        assert status == 200, body
        items = {w["name"]: w for w in (body if isinstance(body, list) else body.get("items", []))}
        return cluster.worker in items and items[cluster.worker].get("concurrency") == 2, items.get(cluster.worker)

    row = wait_for(listed, 30, "the brain to list the consumer with its concurrency")
    assert row["concurrency"] == 2, row


# ---------------------------------------------------------------- 2 lifecycles


def test_lifecycles_reach_the_brain_with_arguments_results_and_failures(cluster):
    t = cluster.tasks
    ok = t["add"](2, 3)
    flaky = t["flaky"](uuid.uuid4().hex[:8])
    bad = t["boom"](SECRET)
    secret = t["login"]("ann", password="hunter2")

    done = cluster.wait_state(ok.id, "success")
    assert done["name"] == "huey_proj.add" and done["queue"] == cluster.name, done
    assert done["args"] == [2, 3] and done["result"] == 5 and done["worker_name"] == cluster.worker, done
    assert isinstance(done["runtime_ms"], int) and done["started_at"] and done["finished_at"], done

    again = cluster.wait_state(flaky.id, "success")
    assert again["result"].startswith("ok ") and again["retry_count"] == 1, again
    # (the brain keeps one event per task, kind and second: the two starts may be one)
    assert set(cluster.kinds(flaky.id)) == {"task.received", "task.retried", "task.started",
                                            "task.succeeded"}, cluster.kinds(flaky.id)

    failed = cluster.wait_state(bad.id, "failure")
    assert failed["retry_count"] == 1 and failed["exception"] and "ValueError" in failed["exception"], failed
    assert failed["traceback"] and "in boom" in failed["traceback"], failed
    # Scrubbed in the consumer: the rest of the text stays (the brain would blank a value still
    # holding the token whole).
    assert "e2e-s3cr3t" not in failed["traceback"] + failed["exception"], failed
    assert "the API refused Authorization: Bearer [REDACTED]" in failed["traceback"], failed["traceback"]
    assert set(cluster.kinds(bad.id)) == {"task.failed", "task.received", "task.retried", "task.started"}, \
        cluster.kinds(bad.id)

    redacted = cluster.wait_state(secret.id, "success")
    assert redacted["args"] == ["ann"] and redacted["kwargs"] == {"password": "[REDACTED]"}, redacted
    assert redacted["result"] == {"user": "ann", "token": "[REDACTED]"}, redacted


def test_a_producer_with_z4j_sends_received_for_the_task_it_enqueues(cluster):
    import z4j_agentd
    import z4j_agentd.huey
    from huey import RedisHuey

    producer = RedisHuey(cluster.name, url=cluster.broker, utc=True)
    tasks = producer_tasks(producer)
    client = z4j_agentd.Client(socket_path=str(cluster.daemon.socket_path), process="e2e-huey-producer")
    try:
        z4j_agentd.huey.install(producer, client)
        res = tasks["add"](20, 22)
        assert client.flush(timeout=5)
        # The producer's task.received reached the daemon (its only event).
        sent = client.stats()
        assert sent["sent"] == 1 and sent["dropped"] == 0, sent
        done = cluster.wait_state(res.id, "success")
        assert done["args"] == [20, 22] and done["result"] == 42, done
        rows = brain_db(cluster.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'task.received' "
                        "AND task_id = ?", (hexid(cluster.agent["agent_id"]), res.id))
        # The consumer, which did not see the task enqueued in its own process, sends one too; the brain
        # keeps the first of a task's task.received, whichever process's reached it first (the consumer
        # may pick the task up before the producer's event is out). One row either way, with the args.
        assert len(rows) == 1, rows
        assert json.loads(rows[0]["payload"])["args"] == [20, 22], rows
    finally:
        z4j_agentd.huey.uninstall(producer)
        client.close(timeout=1)


# ---------------------------------------------------------------- 3 depth, purge, cancel


def test_depth_purge_and_cancel_of_running_and_queued_tasks(cluster):
    t = cluster.tasks
    # Both workers busy: what is enqueued next waits in the queue. `guarded` turns the cancel into
    # its own error: it still ends revoked, not failed and retried.
    sleepers = [t["sleepy"](60), t["guarded"](60)]
    for s in sleepers:
        cluster.wait_state(s.id, "started")  # both worker threads run one
    waiting = [t["add"](n, n) for n in range(3)]
    wait_for(lambda: (cluster.reported_depth() == 3, cluster.reported_depth()), 10, "the consumer to report depth 3")

    def brain_depth():
        status, body = cluster.brain.api("GET", f"/api/v1/projects/{cluster.agent['project_slug']}/stats")
        assert status == 200, body
        depths = {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}
        return depths.get(cluster.name) == 3, depths

    wait_for(brain_depth, 30, "the brain to show the queue's depth 3", interval=0.5)

    stale = cluster.run("purge-queue", {"queue": cluster.name, "observed_depth": 2})
    assert stale["status"] == "failed", stale
    assert cluster.huey.pending_count() == 3
    done = cluster.run("purge-queue", {"queue": cluster.name, "observed_depth": 3})
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"queue": cluster.name, "depth_before": 3, "purged": 3, "force": False}, done
    assert cluster.huey.pending_count() == 0
    # Enqueued without z4j and purged before a worker took them: the brain never heard of them.
    assert [cluster.task(w.id) for w in waiting] == [None, None, None]

    queued = t["add"](7, 7)
    cancelled = cluster.run("cancel-task", {"engine": ENGINE, "task_id": queued.id})
    assert cancelled["status"] == "completed", (cancelled["error"], cancelled["result"])
    assert cancelled["result"]["state_before"] == "not_running_here" and cancelled["result"]["revoked"], cancelled

    began = time.monotonic()
    for s in sleepers:
        out = cluster.run("cancel-task", {"engine": ENGINE, "task_id": s.id})
        assert out["status"] == "completed", (out["error"], out["result"])
        assert {k: out["result"][k] for k in ("state_before", "stopped", "revoked", "worker")} == {
            "state_before": "running", "stopped": True, "revoked": True, "worker": cluster.worker}, out
        assert cluster.wait_state(s.id, "revoked")["state"] == "revoked"
    assert time.monotonic() - began < 20  # bound: each had ~55 s left to run
    # The freed workers take the queued task: revoked, never started.
    assert cluster.wait_state(queued.id, "revoked")["started_at"] is None
    time.sleep(0.5)  # a retry (sleepy has retries=2) would be enqueued at once
    for s in sleepers:
        assert cluster.kinds(s.id) == ["task.received", "task.revoked", "task.started"], cluster.kinds(s.id)
    assert cluster.huey.pending_count() == 0 and cluster.huey.scheduled_count() == 0


# ---------------------------------------------------------------- 4 retry, submit, reconcile


def test_retry_with_overrides_and_the_brains_refusal_by_reference(cluster):
    """The brain (1.13.0) refuses a Huey retry without both override halves (its static rule for
    engines without a native retry: it keeps arguments redacted); with them the consumer enqueues
    the task again under a new id. (The consumer's by-reference retry, from the arguments it saw
    the task run with, is unit-tested: the brain never sends one for Huey.)"""
    original = cluster.tasks["add"](19, 23)
    cluster.wait_state(original.id, "success")
    status, body = cluster.brain.api("POST", f"/api/v1/projects/{cluster.agent['project_slug']}/commands/retry-task",
                                     body={"agent_id": cluster.agent["agent_id"], "engine": ENGINE,
                                           "task_id": original.id})
    assert status == 409 and "override_args and override_kwargs" in json.dumps(body), (status, body)

    changed = cluster.run("retry-task", {"engine": ENGINE, "task_id": original.id, "override_args": [100, 5],
                                         "override_kwargs": {}})
    assert changed["status"] == "completed", (changed["error"], changed["result"])
    result = changed["result"]
    assert result["original_task_id"] == original.id and result["task_name"] == "huey_proj.add", result
    assert result["new_task_id"] not in (None, original.id), result
    ran = cluster.wait_state(result["new_task_id"], "success")
    assert ran["args"] == [100, 5] and ran["result"] == 105 and ran["name"] == "huey_proj.add", ran


def test_submit_task_from_a_brain_schedule_runs_the_task(cluster):
    slug = cluster.agent["project_slug"]
    key = bb.create_api_key(cluster.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(cluster.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{slug}/schedules", bearer=key, body={
        "name": f"e2e-huey-submit-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval",
        "expression": "3600", "task_name": "huey_proj.add", "args": [40, 2], "kwargs": {},
        "scheduler": "z4j-scheduler"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(cluster.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(cluster.agent["agent_id"]),))
    assert len(rows) == 1, rows
    done = wait_command_done(cluster.brain, cluster.agent, str(uuid.UUID(rows[0]["id"])), 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    ran = cluster.wait_state(done["result"]["task_id"], "success")
    assert ran["result"] == 42 and ran["args"] == [40, 2] and ran["name"] == "huey_proj.add", ran


def test_reconcile_reads_the_running_task_and_the_result_store(cluster):
    running = cluster.tasks["sleepy"](30)
    cluster.wait_state(running.id, "started")
    finished = cluster.tasks["add"](1, 1)
    cluster.wait_state(finished.id, "success")
    nobody = f"e2e-nobody-{uuid.uuid4().hex[:8]}"
    try:
        on_worker, stored, unknown = probe_reconcile(cluster, [running.id, finished.id, nobody], engine=ENGINE)
        assert on_worker["status"] == "completed", on_worker
        assert on_worker["result"]["engine_state"] == "started" and on_worker["result"]["worker"] == cluster.worker
        assert stored["status"] == "completed" and stored["result"]["engine_state"] == "success", stored
        assert cluster.huey.get(finished.id, peek=True) == 2  # read, not consumed
        assert unknown["status"] == "completed" and unknown["result"]["engine_state"] == "unknown", unknown
    finally:
        cluster.run("cancel-task", {"engine": ENGINE, "task_id": running.id})
