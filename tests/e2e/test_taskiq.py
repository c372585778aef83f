"""TaskIQ through `z4j_agentd.taskiq.install(broker)` (tests/e2e/taskiq_proj.py),
one z4j-agentd and the real z4j 1.13.0 brain: a real `taskiq worker` (one
worker process, at most 2 tasks at a time) on a Redis list broker with a
Redis result backend and TaskIQ's retry middleware. This test process
sends the tasks with the same app (a producer, as a web app would),
connected to the same daemon.

Checked in the brain: task lifecycles with failures and retries in the
right states with args, results, tracebacks, retry counts and parent links;
the worker's worker.online; every action the worker declares, through the
brain's REST API, with its effect (submit, retry, reconcile, cancel); the
queue depth and the worker's details on the Workers page.

The worker, the daemon and the agent are started once for the module (the
tests run in file order and share them).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

import brain_bootstrap as bb
from control import wait_brain_knows, wait_command_done
from harness import Background, brain_db, get_task, hexid, task_events, wait_for
from test_celery_commands import probe_reconcile
from test_health import brain_workers

ENGINE = "taskiq"
HOST = socket.gethostname()
HERE = Path(__file__).resolve().parent
QUEUE = "tq-e2e"
ACTIONS = ["cancel_task", "reconcile_task", "retry_task", "submit_task"]
#: The brain forwards health reports with its heartbeat, every 10 s.
HEARTBEAT = 10


class Setup:
    """The agent, the daemon, the worker and this process's producer app."""

    def __init__(self, brain, agent, daemon, worker: Background, child_pid: int, app, loop) -> None:
        self.brain, self.agent, self.daemon, self.worker = brain, agent, daemon, worker
        self.child_pid = child_pid
        self.name = f"taskiq@{HOST}:{child_pid}"
        self.app, self.loop = app, loop
        self.produced: list = []

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def kick(self, task: str, *args, **kwargs) -> str:
        return self.call(getattr(self.app, task).kiq(*args, **kwargs)).task_id

    def result(self, task_id: str):
        return self.call(self.app.broker.result_backend.get_result(task_id))

    # -- brain
    def issue(self, what: str, body: dict) -> dict:
        status, cmd = self.brain.api("POST", f"/api/v1/projects/{self.agent['project_slug']}/commands/{what}",
                                     body={"agent_id": self.agent["agent_id"], **body})
        assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
        return cmd

    def run(self, what: str, body: dict, timeout: float = 30.0) -> dict:
        return wait_command_done(self.brain, self.agent, self.issue(what, body)["id"], timeout)

    def task(self, task_id: str):
        return get_task(self.brain, self.agent["project_slug"], ENGINE, task_id)

    def wait_state(self, task_id: str, states, timeout: float = 20.0, **fields) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def check():
            t = self.task(task_id)
            ok = t is not None and t["state"] in states and all(t.get(k) == v for k, v in fields.items())
            return ok, t and {k: t.get(k) for k in ("state", "retry_count", "worker_name", *fields)}

        wait_for(check, timeout, f"task {task_id} to be {sorted(states)} {fields or ''} in the brain", interval=0.2)
        return self.task(task_id)

    def check_worker_kept_its_process(self) -> None:
        """The worker process of the module's start still runs (TaskIQ restarts a dead one)."""
        assert "is dead" not in self.worker.log_text(), self.worker.log_tail(40)
        assert self.worker.children() == [self.child_pid], self.worker.children()

    def kinds(self, task_id: str) -> list:
        """The task's events in the brain, oldest first. The brain keeps their time to the second
        and lists them newest first; events of the same second are put in lifecycle order (a
        task.retried is dated when the retry was sent, before the next attempt starts)."""
        events = task_events(self.brain, self.agent["project_slug"], ENGINE, task_id)
        events.sort(key=lambda e: (e["occurred_at"], RANK.get(e["kind"], 9)))
        return [e["kind"] for e in events]

    def received_seconds(self, task_id: str) -> set:
        """The seconds of the task's task.received events in the brain."""
        return {e["occurred_at"][:19] for e in task_events(self.brain, self.agent["project_slug"], ENGINE, task_id)
                if e["kind"] == "task.received"}


#: Lifecycle order of events dated in the same second.
RANK = {"task.received": 0, "task.retried": 1, "task.started": 2, "task.succeeded": 3, "task.failed": 3,
        "task.revoked": 3}


def collapse(kinds: list) -> list:
    """`kinds` with runs of one kind shown once (the producer's and the worker's task.received,
    in two seconds, are two events)."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def worker_env(daemon, broker: str) -> dict:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(daemon.workdir),
        "PYTHONPATH": str(HERE),
        "Z4J_SOCKET_PATH": str(daemon.socket_path),
        "Z4J_E2E_BROKER": broker,
        "Z4J_TASKIQ_HEALTH_INTERVAL": "2",
    }


def serving_pids(daemon) -> list:
    return [c.get("pid") for c in daemon.stats()["client_list"]
            if "cancel_task" in ((c.get("capabilities") or {}).get(ENGINE) or [])]


@pytest.fixture(scope="module")
def setup(brain, run_dir, redis_server, module_daemon):
    try:
        import z4j_agentd
        import z4j_agentd.taskiq  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Python client or taskiq is not installed in {sys.prefix} ({exc})")
    agent, daemon = module_daemon("taskiq")
    worker = loop = app = None
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        broker = redis_server.url(redis_server.fresh_db())
        worker = Background(
            [sys.executable, "-m", "taskiq", "worker", "taskiq_proj:broker", "--workers", "1",
             "--max-async-tasks", "2", "--shutdown-timeout", "2"],
            daemon.workdir, "taskiq-worker", worker_env(daemon, broker), run_dir=run_dir)

        def ready():
            worker.check_alive()
            log = worker.log_text()
            # A worker process that cannot import the app is restarted forever: fail at once.
            assert "is dead" not in log, f"the TaskIQ worker process died at start:\n{worker.log_tail(30)}"
            pids = [p for p in serving_pids(daemon) if p in worker.children()]
            return len(pids) == 1, (pids, worker.log_tail(3))

        child_pid = wait_for(ready, 60, "the TaskIQ worker process to serve its commands", interval=0.2)[0][0]
        wait_brain_knows(brain, agent, {ENGINE: ACTIONS})

        # The producer: this process, the same app, its own client on the same daemon.
        z4j_agentd.configure(socket_path=str(daemon.socket_path), process="e2e-taskiq-producer")
        os.environ["Z4J_E2E_BROKER"] = broker
        app = importlib.import_module("taskiq_proj")
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="e2e-taskiq-loop", daemon=True).start()
        s = Setup(brain, agent, daemon, worker, child_pid, app, loop)
        # What the producer's middleware sends (kind, task id, data, time), as it hands it over.
        middleware = z4j_agentd.taskiq.installed(app.broker)
        send = middleware.emit

        def recording(kind, task_id, data, occurred_at=None):
            s.produced.append((kind, str(task_id), data, occurred_at))
            send(kind, task_id, data, occurred_at)

        middleware.emit = recording
        s.call(app.broker.startup())
        yield s
    finally:
        if app is not None and loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(app.broker.shutdown(), loop).result(10)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            sys.modules.pop("taskiq_proj", None)
        if worker is not None:
            worker.stop(timeout=5)
        daemon.stop()


# ---------------------------------------------------------------- 1 events


def test_the_worker_announces_itself_with_its_name_pid_and_concurrency(setup):
    rows = brain_db(setup.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'worker.online'",
                    (hexid(setup.agent["agent_id"]),))
    online = [json.loads(r["payload"]) for r in rows]
    assert len(online) == 1, online
    data = online[0]
    assert data["worker"] == setup.name and data["pid"] == setup.child_pid and data["hostname"] == HOST, data
    assert data["concurrency"] == 2 and data["queues"] == [QUEUE], data
    assert data["pool"] == "taskiq:ListQueueBroker" and data["sw_ver"], data


def test_lifecycles_reach_the_brain_with_args_results_failures_and_retries(setup):
    ok = setup.kick("add", 2, 3, api_token="tok-12345")
    boom = setup.kick("boom", "bad thing happened")
    flaky = setup.kick("flaky", 2)      # fails twice, succeeds on the third attempt
    hopeless = setup.kick("flaky", 9)   # fails all three attempts

    t = setup.wait_state(ok, "success")
    assert t["args"] == [2, 3] and t["kwargs"] == {"api_token": "[REDACTED]"}, t
    assert t["result"] == 5 and t["worker_name"] == setup.name and t["queue"] == QUEUE, t
    assert isinstance(t["runtime_ms"], int) and t["name"] == "taskiq_proj:add", t
    # In time order: task.received (the producer's and the worker's: one event when both fall in
    # the same second, else two), then the worker's started and succeeded.
    kinds = setup.kinds(ok)
    assert collapse(kinds) == ["task.received", "task.started", "task.succeeded"], kinds
    assert kinds.count("task.received") in (1, 2), kinds
    # The producer sent its task.received, with the arguments, dated when the send began, and an
    # event of that second is in the brain.
    produced = [(d, at) for kind, tid, d, at in setup.produced if kind == "task.received" and tid == ok]
    assert len(produced) == 1 and produced[0][0]["args"] == [2, 3] and produced[0][1] is not None, produced
    assert produced[0][1].strftime("%Y-%m-%dT%H:%M:%S") in setup.received_seconds(ok), (
        produced[0][1], setup.received_seconds(ok))

    t = setup.wait_state(boom, "failure")
    assert t["name"] == "boom" and t["args"] == ["bad thing happened"], t
    assert t["exception"] == "ValueError", t
    assert "raise ValueError(message)" in t["traceback"] and "ValueError: bad thing happened" in t["traceback"], t

    t = setup.wait_state(flaky, "success", retry_count=2)
    assert t["result"] == "ok after 2 retries" and t["args"] == [2], t
    kinds = setup.kinds(flaky)
    assert collapse(kinds) == ["task.received", "task.started", "task.retried", "task.started", "task.retried",
                               "task.started", "task.succeeded"], kinds

    t = setup.wait_state(hopeless, "failure", retry_count=2)
    assert t["exception"] == "RuntimeError" and "attempt 2 fails" in t["traceback"], t
    kinds = setup.kinds(hopeless)
    assert collapse(kinds) == ["task.received", "task.started", "task.retried", "task.started", "task.retried",
                               "task.started", "task.failed"], kinds
    # The result backend has the same outcomes.
    assert setup.result(ok).return_value == 5 and setup.result(boom).is_err


def test_a_task_sent_from_a_task_is_linked_to_its_parent(setup):
    parent = setup.kick("spawn", 4)
    child = setup.wait_state(parent, "success")["result"]
    t = setup.wait_state(child, "success")
    assert t["parent_task_id"] == parent and t["args"] == [4, 4] and t["result"] == 8, t


# ---------------------------------------------------------------- 2 commands


def test_submit_task_runs_the_task_the_brain_names(setup):
    """The brain's "run now" of a schedule it fires itself sends submit_task to the engine."""
    slug = setup.agent["project_slug"]
    key = bb.create_api_key(setup.brain.rest(), scopes=["admin:*"])
    rest = bb.Rest(setup.brain.url)
    status, sched = rest.call("POST", f"/api/v1/projects/{slug}/schedules", bearer=key, body={
        "name": f"e2e-tq-submit-{uuid.uuid4().hex[:6]}", "engine": ENGINE, "kind": "interval",
        "expression": "3600", "task_name": "taskiq_proj:add", "args": [40, 2], "kwargs": {},
        "scheduler": "z4j-scheduler"})
    assert status == 201, (status, sched)
    status, body = rest.call("POST", f"/api/v1/projects/{slug}/schedules/{sched['id']}/trigger", bearer=key)
    assert status == 200, (status, body)
    rows = brain_db(setup.brain, "SELECT id FROM commands WHERE agent_id = ? AND action = 'submit_task'",
                    (hexid(setup.agent["agent_id"]),))
    assert len(rows) == 1, rows
    done = wait_command_done(setup.brain, setup.agent, str(uuid.UUID(rows[0]["id"])), 20)
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"]["task_name"] == "taskiq_proj:add" and done["result"]["queue"] == QUEUE, done
    ran = setup.wait_state(done["result"]["task_id"], "success")
    assert ran["result"] == 42 and ran["args"] == [40, 2], ran


def test_retry_task_sends_the_task_again_with_the_operators_arguments(setup):
    original = setup.kick("boom", "first try")
    setup.wait_state(original, "failure")
    # The brain refuses a retry of a TaskIQ task without both override halves (409).
    status, body = setup.brain.api("POST", f"/api/v1/projects/{setup.agent['project_slug']}/commands/retry-task",
                                   body={"agent_id": setup.agent["agent_id"], "engine": ENGINE,
                                         "task_id": original})
    assert status == 409, (status, body)
    done = setup.run("retry-task", {"engine": ENGINE, "task_id": original, "override_args": ["second try"],
                                    "override_kwargs": {}})
    # The brain names the original task ("boom"); the worker re-sends it under a new id.
    assert done["status"] == "completed", (done["error"], done["result"])
    result = done["result"]
    assert result["task_id"] == original and result["task_name"] == "boom", result
    assert result["arguments"] == "overrides" and result["new_task_id"] != original, result
    again = setup.wait_state(result["new_task_id"], "failure")
    assert again["name"] == "boom" and again["args"] == ["second try"], again
    assert "ValueError: second try" in again["traceback"], again


def test_reconcile_answers_from_the_result_backend(setup):
    finished = setup.kick("add", 1, 1)
    setup.wait_state(finished, "success")
    failed = setup.kick("boom", "for reconcile")
    setup.wait_state(failed, "failure")
    nobody = f"e2e-nobody-{uuid.uuid4().hex[:8]}"
    done = probe_reconcile(setup, [finished, failed, nobody], engine=ENGINE)
    assert [d["status"] for d in done] == ["completed"] * 3, done
    ok, bad, unknown = (d["result"] for d in done)
    assert ok == {"task_id": finished, "engine_state": "success", "finished_at": None, "exception": None,
                  "source": "result_backend"}, ok
    assert bad["engine_state"] == "failure" and bad["exception"] == "ValueError: for reconcile", bad
    assert unknown["engine_state"] == "unknown" and unknown["source"] == "result_backend", unknown


# ---------------------------------------------------------------- 3 a busy worker: depth, details, cancel


def brain_depths(setup) -> dict:
    status, body = setup.brain.api("GET", f"/api/v1/projects/{setup.agent['project_slug']}/stats")
    assert status == 200, f"GET stats: HTTP {status} {body}"
    return {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == ENGINE}


def test_a_busy_worker_shows_its_depth_and_tasks_and_cancel_stops_a_running_task(setup):
    # Both slots taken by long async tasks; three more wait in the Redis list.
    long = [setup.kick("sleepy", 60) for _ in range(2)]
    for tid in long:
        setup.wait_state(tid, "started")
    waiting = [setup.kick("add", n, 1) for n in range(3)]

    wait_for(lambda: (lambda d: (d.get(QUEUE) == 3, d))(brain_depths(setup)), 4 * HEARTBEAT,
             "the brain's depth of the TaskIQ queue to be 3")

    def row():
        r = brain_workers(setup.brain, setup.agent).get(setup.name)
        return r is not None and r.get("active_tasks") == 2, r

    r = wait_for(row, 4 * HEARTBEAT, "the Workers page to show the worker with its 2 running tasks")
    assert r["engine"] == ENGINE and r["state"] == "online" and r["pid"] == setup.child_pid, r
    assert r["concurrency"] == 2 and r["queues"] == [QUEUE], r
    status, detail = setup.brain.api("GET", f"/api/v1/projects/{setup.agent['project_slug']}/workers/{r['id']}")
    assert status == 200, (status, detail)
    meta = detail["metadata"]
    assert sorted(a["id"] for a in meta["active"]) == sorted(long), meta["active"]
    assert {a["name"] for a in meta["active"]} == {"taskiq_proj:sleepy"}, meta["active"]
    assert meta["stats"]["pool"]["max-concurrency"] == 2 and meta["stats"]["pid"] == setup.child_pid, meta
    assert {"taskiq_proj:add", "boom", "taskiq_proj:sleepy"} <= set(meta["registered"]), meta["registered"]
    assert meta["active_queues"] == [{"name": QUEUE}], meta

    # Cancel the first: it stops at once, is revoked, and the retry middleware does not run it again.
    done = setup.run("cancel-task", {"engine": ENGINE, "task_id": long[0]})
    assert done["status"] == "completed", (done["error"], done["result"])
    res = done["result"]
    assert res["cancelled"] is True and res["worker"] == setup.name and res["retry_suppressed"] is True, res
    t = setup.wait_state(long[0], "revoked")
    assert t["retry_count"] == 0, t
    backend = setup.result(long[0])
    assert backend.is_err and type(backend.error).__name__ == "CancelledError", backend
    # A slot freed: one waiting task runs. Then the second long one goes too.
    done = setup.run("cancel-task", {"engine": ENGINE, "task_id": long[1]})
    assert done["status"] == "completed", (done["error"], done["result"])
    for tid in waiting:
        setup.wait_state(tid, "success")
    for tid in long:
        assert "task.retried" not in setup.kinds(tid) and setup.task(tid)["state"] == "revoked"
    wait_for(lambda: (lambda d: (d.get(QUEUE) == 0, d))(brain_depths(setup)), 4 * HEARTBEAT,
             "the brain's depth of the TaskIQ queue to be 0 again")

    # A finished task is not running anywhere: said so.
    late = setup.run("cancel-task", {"engine": ENGINE, "task_id": waiting[0]})
    assert late["status"] == "failed" and "is not running in worker " + setup.name in late["error"], late
    setup.check_worker_kept_its_process()


def test_cancel_of_a_sync_task_says_it_cannot_stop_it(setup):
    tid = setup.kick("blocking", 3)
    setup.wait_state(tid, "started")
    done = setup.run("cancel-task", {"engine": ENGINE, "task_id": tid})
    assert done["status"] == "failed", done
    assert "synchronous function" in done["error"] and "cannot stop a thread" in done["error"], done
    assert setup.wait_state(tid, "success")["result"] == "blocked"
    setup.check_worker_kept_its_process()


# ---------------------------------------------------------------- 4 the end (last: it stops the worker)


def test_a_stopped_worker_says_so_with_worker_offline(setup):
    setup.worker.stop(timeout=10)  # SIGTERM: TaskIQ shuts its worker process's broker down

    def offline():
        rows = brain_db(setup.brain, "SELECT payload FROM events WHERE agent_id = ? AND kind = 'worker.offline'",
                        (hexid(setup.agent["agent_id"]),))
        return len(rows) == 1, [json.loads(r["payload"]) for r in rows]

    rows = wait_for(offline, 20, "the worker's worker.offline in the brain")
    assert rows == [{"worker": setup.name, "hostname": HOST, "pid": setup.child_pid}], rows
