"""z4j_agentd.huey: events, commands and health, with a real Huey consumer
(thread workers) on Huey's in-memory storage, in this process."""

import logging
import os
import threading
import time

import pytest

huey_mod = pytest.importorskip("huey")

from huey import MemoryHuey  # noqa: E402
from huey.exceptions import CancelExecution, RetryTask  # noqa: E402

import z4j_agentd.huey as zh  # noqa: E402
from z4j_agentd.huey import _commands, _health  # noqa: E402
from test_celery import RecordingClient  # noqa: E402
from redis_server import unix_redis

SECRET_URL = "redis://app:s3cr3t-pw@db.internal:6379/0"
STEP_LOG = logging.getLogger("test_huey.steps")
RETRY_MARKS = {}


def make_app(name="t"):
    huey = MemoryHuey(name, utc=True)

    @huey.task()
    def add(a, b):
        return a + b

    @huey.task(retries=1)
    def boom(x):
        raise ValueError(f"cannot reach {SECRET_URL} with {x}")

    @huey.task(retries=2)
    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "spun"

    @huey.task(retries=2)
    def stubborn(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                while time.monotonic() < end:
                    pass
            except Exception:  # swallows the cancel, as careless code does
                pass
        return "stubborn"

    class AppError(Exception):
        pass

    @huey.task(retries=2)
    def translating(seconds):
        """Turns whatever stops its work into its own error, as app code often does."""
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                pass
        except Exception as exc:
            raise AppError("step failed") from exc
        return "translated"

    @huey.task(retries=2)
    def polite(seconds):
        """Checks for a cancel between steps, and logs each step."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            STEP_LOG.info("step of polite")
            if zh.cancel_requested():
                raise CancelExecution()  # retry=None: Huey would retry it (retries=2) but for the cancel
            time.sleep(0.005)
        return "polite"

    @huey.task(retries=2)
    def failing_when_cancelled(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not zh.cancel_requested():
            time.sleep(0.005)
        if zh.cancel_requested():
            raise ValueError("gave up")
        return "done"

    @huey.task()
    def retry_twice(marker):
        RETRY_MARKS[marker] = RETRY_MARKS.get(marker, 0) + 1
        if RETRY_MARKS[marker] <= 2:
            raise RetryTask()
        raise ValueError("third attempt fails")

    @huey.task()
    def parent(x):
        add(x, 1)  # enqueued from inside a task
        return x

    @huey.task()
    def secret(password, token=None):
        return {"api_key": "k-123", "ok": True}

    return huey, dict(add=add, boom=boom, spin=spin, stubborn=stubborn, parent=parent, secret=secret,
                      translating=translating, polite=polite, failing_when_cancelled=failing_when_cancelled,
                      retry_twice=retry_twice)


@pytest.fixture
def app():
    huey, tasks = make_app()
    client = RecordingClient()
    zh.install(huey, client)
    consumers = []

    def consume(workers=2):
        consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=False,
                                        initial_delay=0.01, max_delay=0.05, scheduler_interval=1)
        consumer.start()
        consumers.append(consumer)
        return consumer

    yield huey, tasks, client, consume
    for consumer in consumers:
        consumer.stop(graceful=True)
    zh.uninstall(huey)


def wait(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def events(client, task_id=None, kind=None):
    return [e for e in client.emitted
            if (task_id is None or e["task_id"] == task_id) and (kind is None or e["kind"] == kind)]


def one(client, task_id, kind):
    found = wait(lambda: events(client, task_id, kind), what=f"{kind} of {task_id}")
    assert len(found) == 1, found
    return found[0]["data"]


def handler(client, action):
    handlers, _caps = client.served[-1]
    return handlers[("huey", action)]


# ---------------------------------------------------------------- events


def test_a_producer_sends_received_with_redacted_arguments_and_serves_nothing(app):
    huey, tasks, client, _consume = app
    res = tasks["secret"]("hunter2", token="abc")
    data = one(client, res.id, "task.received")
    assert data["task_name"] == "test_huey.secret" and data["queue"] == "t", data
    assert data["args"] == ["hunter2"] and data["kwargs"] == {"token": "[REDACTED]"}, data
    assert "worker" not in data and data["retries"] == 0
    assert client.served == [] and not any(e["kind"].startswith("worker.") for e in client.emitted)


def test_lifecycle_in_the_consumer_with_result_failure_retry_and_worker(app):
    huey, tasks, client, consume = app
    ok = tasks["add"](2, 3)
    bad = tasks["boom"](7)
    consume()
    assert ok.get(blocking=True, timeout=10) == 5
    wait(lambda: events(client, bad.id, "task.failed"), what="the failure")
    hooks = zh.installed(huey)
    worker = hooks.worker_name
    assert worker == f"huey@{os.uname().nodename}:{os.getpid()}"

    online = one(client, "", "worker.online")
    assert online == {"worker": worker, "hostname": os.uname().nodename, "pid": os.getpid(), "concurrency": 2,
                      "pool": "huey.consumer(thread)", "queues": ["t"], "sw_ver": huey_mod.__version__}

    started = one(client, ok.id, "task.started")
    assert started == {"task_name": "test_huey.add", "queue": "t", "worker": worker, "args": [2, 3],
                       "kwargs": {}, "retries_left": 0}
    done = one(client, ok.id, "task.succeeded")
    assert done["result"] == 5 and done["worker"] == worker and isinstance(done["runtime_ms"], int)
    # received once (the producer's), none again in the consumer that saw it enqueued
    assert len(events(client, ok.id, "task.received")) == 1

    kinds = [e["kind"] for e in events(client, bad.id)]
    assert kinds == ["task.received", "task.started", "task.retried", "task.started", "task.failed"], kinds
    retried = one(client, bad.id, "task.retried")
    assert retried["retry_count"] == 1 and retried["retries_left"] == 0 and retried["exception"] == "ValueError"
    assert "s3cr3t-pw" not in retried["reason"]
    failed = one(client, bad.id, "task.failed")
    assert failed["exception"] == "ValueError" and failed["retry_count"] == 1 and failed["worker"] == worker
    assert "s3cr3t-pw" not in failed["exception_message"] and "db.internal" in failed["exception_message"]
    assert "Traceback" in failed["traceback"] and "in boom" in failed["traceback"]
    assert "s3cr3t-pw" not in failed["traceback"]
    assert isinstance(failed["runtime_ms"], int)


def test_a_consumer_sends_received_for_a_task_whose_producer_had_no_client(app):
    huey, tasks, client, consume = app
    zh.uninstall(huey)
    res = tasks["add"](1, 1)  # a producer without z4j
    assert client.emitted == []
    zh.install(huey, client)
    consume()
    assert res.get(blocking=True, timeout=10) == 2
    kinds = [e["kind"] for e in events(client, res.id)]
    assert kinds[:2] == ["task.received", "task.started"], kinds
    assert events(client, res.id, "task.received")[0]["data"]["args"] == [1, 1]


def test_a_task_enqueued_by_a_task_and_a_pipeline_carry_the_parent(app):
    huey, tasks, client, consume = app
    pipe = tasks["add"].s(1, 2).then(tasks["add"], 10)
    results = huey.enqueue(pipe)
    first = tasks["parent"](4)
    consume()
    assert results.get(blocking=True, timeout=10) == [3, 13]
    assert one(client, pipe.on_complete.id, "task.received")["parent_task_id"] == pipe.id
    wait(lambda: [e for e in events(client, kind="task.received")
                  if e["data"].get("parent_task_id") == first.id], what="the child of parent()")
    assert "parent_task_id" not in one(client, first.id, "task.received")


def test_revoked_and_expired_tasks(app):
    huey, tasks, client, consume = app
    gone = tasks["add"](1, 2)
    gone.revoke()
    late = tasks["add"].schedule((1, 2), delay=0, expires=0.001)
    time.sleep(0.05)
    consume()
    assert one(client, gone.id, "task.revoked") == {
        "task_name": "test_huey.add", "queue": "t", "worker": zh.installed(huey).worker_name,
        "reason": "revoked", "terminated": False, "expired": False}
    assert one(client, late.id, "task.revoked")["reason"] == "expired"
    assert one(client, late.id, "task.revoked")["expired"] is True


def test_a_task_cancelled_by_a_pre_execute_hook_is_revoked_and_not_left_running(app):
    huey, tasks, client, consume = app

    @huey.pre_execute("refuse")
    def refuse(task):
        raise CancelExecution()

    res = tasks["add"](1, 2)
    consume()
    data = one(client, res.id, "task.revoked")
    assert data["reason"] == "canceled" and data["terminated"] is False
    assert zh.installed(huey).running == {}


# ---------------------------------------------------------------- commands


def test_the_consumer_serves_its_commands_under_its_worker_name(app):
    huey, _tasks, client, consume = app
    consume()
    handlers, caps = client.served[-1]
    assert sorted(a for _, a in handlers) == sorted(_commands.ACTIONS)
    assert caps == {"huey": ["retry_by_reference_v1"]}
    assert client.served_workers == [zh.installed(huey).worker_name]
    assert len(client.served) == 1  # once, not per worker thread


def stop_running(huey, client):
    """Installs again with the brain's cancel stopping running tasks (same client: the same hooks)."""
    zh.install(huey, client, stop_running=True)
    assert zh.installed(huey).stop_running is True


def test_cancel_with_stop_running_stops_a_running_task_which_is_not_retried(app):
    huey, tasks, client, consume = app
    stop_running(huey, client)
    consume()
    res = tasks["spin"](30)
    hooks = zh.installed(huey)
    wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="spin to run")
    began = time.monotonic()
    out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
    took = time.monotonic() - began
    assert out["stopped"] is True and out["state_before"] == "running" and out["revoked"] is True, out
    assert took < 5, took  # bound, not a target: it stopped long before its 30 s
    data = one(client, res.id, "task.revoked")
    assert data["reason"] == "canceled" and data["terminated"] is True
    time.sleep(1.5)  # a retry would be enqueued at once (retries=2, no delay)
    assert [e["kind"] for e in events(client, res.id)] == ["task.received", "task.started", "task.revoked"]
    assert huey.pending_count() == 0 and huey.scheduled_count() == 0


def test_cancel_of_a_task_that_catches_the_exception_ends_it_when_its_code_returns(app, monkeypatch):
    huey, tasks, client, consume = app
    stop_running(huey, client)
    consume()
    res = tasks["stubborn"](1.0)
    hooks = zh.installed(huey)
    wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="stubborn to run")
    raised = []
    real_raise = _commands.raise_async
    monkeypatch.setattr(_commands, "raise_async", lambda *a: raised.append(a) or real_raise(*a))
    cancel = handler(client, "cancel_task")
    second = []
    again = threading.Thread(target=lambda: time.sleep(0.1) or second.append(
        cancel({"parameters": {"task_id": res.id}})))
    again.start()  # a second cancel while the first waits: it must not raise again
    out = cancel({"parameters": {"task_id": res.id}})
    again.join()
    assert out["stopped"] is True, out
    assert second and second[0]["stopped"] is True, second  # both waiters read how it ended
    assert len(raised) == 1, raised  # at most once per task
    assert one(client, res.id, "task.revoked")["terminated"] is True
    assert not events(client, res.id, "task.succeeded") and not events(client, res.id, "task.retried")


def test_cancel_with_stop_running_of_a_task_that_raises_its_own_error_is_not_retried(app):
    """`except Exception as e: raise AppError() from e` around the raised cancel: it ends cancelled,
    not failed and retried (retries=2), and not succeeding on the retry."""
    huey, tasks, client, consume = app
    stop_running(huey, client)
    consume()
    res = tasks["translating"](30)
    hooks = zh.installed(huey)
    wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="translating to run")
    out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
    assert out["stopped"] is True, out
    data = one(client, res.id, "task.revoked")
    assert data["reason"] == "canceled" and data["terminated"] is True
    time.sleep(0.5)  # a retry would be enqueued at once
    assert [e["kind"] for e in events(client, res.id)] == ["task.received", "task.started", "task.revoked"]
    assert huey.pending_count() == 0 and huey.scheduled_count() == 0


def test_cancel_by_default_asks_a_running_task_which_stops_itself_and_logs_safely(app):
    """stop_running off (the default): nothing is raised in the task's thread; the task sees
    cancel_requested(), raises CancelExecution itself, ends cancelled and is not retried; the
    logging handler it logs through every step is never left locked."""
    huey, tasks, client, consume = app
    assert zh.installed(huey).stop_running is False
    records = []
    step_handler = logging.Handler()
    step_handler.emit = records.append
    STEP_LOG.addHandler(step_handler)
    STEP_LOG.setLevel(logging.INFO)
    try:
        consume(workers=1)
        hooks = zh.installed(huey)
        assert zh.cancel_requested() is False  # outside a task
        for _ in range(20):
            res = tasks["polite"](30)
            wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="polite to run")
            out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
            assert out["stopped"] is True and out["state_before"] == "running", out
            data = one(client, res.id, "task.revoked")
            assert data["reason"] == "canceled" and data["terminated"] is True
            assert step_handler.lock.acquire(timeout=1), "the logging handler's lock was left held"
            step_handler.lock.release()
        time.sleep(0.3)
        assert not events(client, kind="task.retried") and not events(client, kind="task.succeeded")
        assert records  # it logged while running
    finally:
        STEP_LOG.removeHandler(step_handler)


def test_cancel_by_default_lets_a_task_that_does_not_check_run_to_its_end(app, monkeypatch):
    huey, tasks, client, consume = app
    monkeypatch.setattr(_commands, "COOPERATIVE_WAIT", 0.2)
    consume()
    res = tasks["spin"](1.0)
    hooks = zh.installed(huey)
    wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="spin to run")
    out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
    assert out["stopped"] is False and out["cancel_requested"] is True and out["state_before"] == "running", out
    assert "stop_running=True" in out["detail"] and "Z4J_HUEY_STOP_RUNNING=1" in out["detail"], out
    assert one(client, res.id, "task.succeeded")["result"] == "spun"  # it ran to its end


def test_cancel_by_default_of_a_task_that_then_fails_is_not_retried(app):
    huey, tasks, client, consume = app
    consume()
    res = tasks["failing_when_cancelled"](30)
    hooks = zh.installed(huey)
    wait(lambda: res.id in hooks.running and hooks.running[res.id].in_body, what="the task to run")
    out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
    assert out["stopped"] is True, out
    assert one(client, res.id, "task.revoked")["reason"] == "canceled"
    time.sleep(0.3)
    assert not events(client, res.id, "task.retried") and not events(client, res.id, "task.failed")


def test_stop_running_from_the_environment(monkeypatch):
    huey, _tasks = make_app("env")
    client = RecordingClient()
    monkeypatch.setenv(zh.STOP_RUNNING_ENV, "1")
    try:
        zh.install(huey, client)
        assert zh.installed(huey).stop_running is True
        zh.uninstall(huey)
        monkeypatch.setenv(zh.STOP_RUNNING_ENV, "maybe")
        with pytest.raises(ValueError, match="Z4J_HUEY_STOP_RUNNING='maybe' is not understood"):
            zh.stop_running_from_env()
        zh.install(huey, client)  # a bad value: said in the log, left off
        assert zh.installed(huey).stop_running is False
        zh.uninstall(huey)
        zh.install(huey, client, stop_running=True)  # the argument wins
        assert zh.installed(huey).stop_running is True
    finally:
        zh.uninstall(huey)


def test_cancel_of_a_queued_task_revokes_it(app):
    huey, tasks, client, consume = app
    consume(workers=1)
    blocker = tasks["spin"](0.5)
    queued = tasks["add"](5, 5)
    wait(lambda: blocker.id in zh.installed(huey).running, what="the blocker to run")
    out = handler(client, "cancel_task")({"target": {"type": "task", "id": f"huey:{queued.id}"}})
    assert out["state_before"] == "not_running_here" and out["stopped"] is False and out["pending_only"]
    assert one(client, queued.id, "task.revoked")["reason"] == "revoked"
    assert not events(client, queued.id, "task.started")


def test_cancel_in_a_process_or_greenlet_worker_says_it_cannot_stop_it(app):
    huey, tasks, client, consume = app
    consume()
    hooks = zh.installed(huey)
    res = tasks["spin"](0.5)
    wait(lambda: res.id in hooks.running, what="spin to run")
    hooks.worker_type = "greenlet"
    out = handler(client, "cancel_task")({"parameters": {"task_id": res.id}})
    assert out["stopped"] is False and "greenlet" in out["detail"], out
    hooks.worker_type = "process"
    assert "process workers" in handler(client, "cancel_task")({"parameters": {"task_id": "nope"}})["detail"]


def test_submit_task_by_full_or_bare_name(app):
    huey, _tasks, client, consume = app
    consume()
    submit = handler(client, "submit_task")
    out = submit({"parameters": {"name": "test_huey.add", "args": [40, 2]}})
    assert out["task_name"] == "test_huey.add" and out["queue"] == "t"
    assert one(client, out["task_id"], "task.succeeded")["result"] == 42
    bare = submit({"parameters": {"task_name": "add", "args": [1, 1], "queue": "t"}})
    assert one(client, bare["task_id"], "task.succeeded")["result"] == 2
    with pytest.raises(_commands.BadCommand, match="no Huey task 'nope'"):
        submit({"parameters": {"name": "nope"}})
    with pytest.raises(_commands.BadCommand, match="one queue"):
        submit({"parameters": {"name": "add", "queue": "other"}})
    with pytest.raises(_commands.BadCommand, match="args must be a list"):
        submit({"parameters": {"name": "add", "args": "x"}})
    later = submit({"parameters": {"name": "add", "args": [1, 2], "eta": time.time() + 3600}})
    assert one(client, later["task_id"], "task.received")["eta"]
    wait(lambda: huey.scheduled_count() == 1, what="the consumer to schedule it")


def test_an_ambiguous_bare_name_is_refused():
    huey, _tasks = make_app()

    def add(a):  # same bare name, another module
        return a
    add.__module__ = "other_mod"
    huey.task()(add)
    with pytest.raises(_commands.BadCommand, match="ambiguous"):
        _commands.resolve_task(huey, "add")
    assert _commands.resolve_task(huey, "other_mod.add")[0] == "other_mod.add"


def test_retry_task_by_reference_and_with_overrides(app):
    huey, tasks, client, consume = app
    consume()
    bad = tasks["boom"](9)
    wait(lambda: events(client, bad.id, "task.failed"), what="boom to fail")
    retry = handler(client, "retry_task")
    out = retry({"parameters": {"task_id": bad.id, "task_name": "boom"}})
    assert out["original_task_id"] == bad.id and out["new_task_id"] != bad.id and out["task_name"] == "test_huey.boom"
    assert one(client, out["new_task_id"], "task.received")["args"] == [9]
    ok = tasks["add"](1, 2)
    wait(lambda: events(client, ok.id, "task.succeeded"), what="add")
    changed = retry({"parameters": {"task_id": ok.id, "override_args": [100, 5]}})
    assert one(client, changed["new_task_id"], "task.succeeded")["result"] == 105
    with pytest.raises(_commands.BadCommand, match="override_args"):
        retry({"parameters": {"task_id": "never-seen", "task_name": "add"}})
    with pytest.raises(_commands.BadCommand, match="task name is unknown"):
        retry({"parameters": {"task_id": "never-seen"}})


def test_purge_queue_at_the_confirmed_depth_only():
    huey, tasks = make_app("pq")
    client = RecordingClient()
    zh.install(huey, client)
    try:
        zh.installed(huey).on_consumer(None)  # a consumer that has not started its workers
        purge = handler(client, "purge_queue")
        for i in range(3):
            tasks["add"](i, i)
        with pytest.raises(_commands.CommandFailed, match="holds 3 tasks now, the purge was confirmed at 2"):
            purge({"parameters": {"queue": "pq", "expected_depth": 2}})
        assert huey.pending_count() == 3
        with pytest.raises(_commands.BadCommand, match="no expected_depth"):
            purge({"parameters": {"queue": "pq"}})
        with pytest.raises(_commands.BadCommand, match="not this Huey instance's queue"):
            purge({"parameters": {"queue": "other", "expected_depth": 3}})
        out = purge({"parameters": {"queue": "pq", "expected_depth": 3, "force": False}})
        assert out["queue"] == "pq" and out["depth_before"] == 3 and out["purged"] == 3
        assert huey.pending_count() == 0
    finally:
        zh.uninstall(huey)


def test_reconcile_from_the_result_store(app):
    huey, tasks, client, consume = app
    consume()
    ok, bad = tasks["add"](1, 2), tasks["boom"](1)
    wait(lambda: events(client, ok.id, "task.succeeded") and events(client, bad.id, "task.failed"), what="ends")
    reconcile = handler(client, "reconcile_task")
    assert reconcile({"parameters": {"task_id": ok.id}})["engine_state"] == "success"
    # Huey stores the error just after its `error` signal: wait for the store, not the event.
    failed = wait(lambda: [r for r in [reconcile({"parameters": {"task_id": bad.id}})]
                           if r["engine_state"] == "failure"], what="the stored error")[0]
    assert "ValueError" in failed["exception"]
    assert ok.get() == 3  # the probe did not consume the result
    assert reconcile({"target": {"id": "nobody"}})["engine_state"] == "unknown"
    slow = tasks["spin"](0.5)
    wait(lambda: slow.id in zh.installed(huey).running, what="spin")
    assert reconcile({"parameters": {"task_id": slow.id}})["engine_state"] == "started"


# ---------------------------------------------------------------- health


def test_health_reports_depth_scheduled_and_the_worker(app):
    huey, tasks, client, consume = app
    consume(workers=1)
    hooks = zh.installed(huey)
    tasks["add"].schedule((1, 1), delay=3600)  # the consumer moves it to the schedule
    wait(lambda: huey.scheduled_count() == 1, what="the consumer to schedule it")
    running = tasks["spin"](0.6)
    wait(lambda: running.id in hooks.running, what="spin")
    for i in range(3):
        tasks["add"](i, i)
    report = hooks.health()["huey"]
    assert report["queue_depths"] == {"t": 3} and report["scheduled_count"] == 1
    assert report["broker_type"] == "memory" and report["broker_connected"] is True
    details = report["workers"][hooks.worker_name]
    assert details["stats"]["pid"] == os.getpid()
    assert details["stats"]["pool"] == {"implementation": "huey.consumer(thread)", "max-concurrency": 1}
    assert [a["id"] for a in details["active"]] == [running.id]
    assert details["active_queues"] == [{"name": "t"}]
    assert "test_huey.add" in details["registered"] and "test_huey.spin" in details["registered"]
    beat = events(client, kind="worker.heartbeat")
    assert len(beat) == 1 and beat[0]["data"]["worker"] == hooks.worker_name


def test_health_without_storage_says_so(app):
    huey, _tasks, client, consume = app
    consume()
    hooks = zh.installed(huey)

    def broken():
        raise ConnectionError("storage down")
    huey.pending_count = broken
    report = hooks.health()["huey"]
    assert report["broker_connected"] is False and "storage down" in report["broker_error"]
    assert "queue_depths" not in report and report["workers"]


def test_the_health_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(_health.INTERVAL_ENV, "2.5")
    assert _health.interval_from_env() == 2.5
    monkeypatch.setenv(_health.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="is not a number"):
        _health.interval_from_env()


# ---------------------------------------------------------------- wiring


def test_install_is_idempotent_and_uninstall_restores_huey():
    huey, tasks = make_app("w")
    client = RecordingClient()
    assert zh.install(huey, client) is client
    zh.install(huey, client)
    assert len(huey._signal.receivers["any"]) == 1
    assert "create_consumer" in huey.__dict__
    zh.uninstall(huey)
    assert huey._signal.receivers["any"] == [] and "create_consumer" not in huey.__dict__
    assert zh.installed(huey) is None
    tasks["add"](1, 2)
    assert client.emitted == []


def test_a_consumer_built_directly_is_recognised_at_its_workers_startup():
    from huey.consumer import Consumer

    huey, tasks = make_app("d")
    client = RecordingClient()
    zh.install(huey, client)
    consumer = Consumer(huey, workers=2, periodic=False, initial_delay=0.01, max_delay=0.05)
    consumer.start()
    try:
        res = tasks["add"](2, 2)
        assert res.get(blocking=True, timeout=10) == 4
        hooks = zh.installed(huey)
        assert hooks.worker_name and len(client.served) == 1
        assert one(client, res.id, "task.started")["worker"] == hooks.worker_name
    finally:
        consumer.stop(graceful=True)
        zh.uninstall(huey)


def test_worker_offline_at_the_consumer_exit(app):
    huey, _tasks, client, consume = app
    consume()
    hooks = zh.installed(huey)
    hooks.on_consumer_exit()
    hooks.on_consumer_exit()
    assert [e["data"] for e in events(client, kind="worker.offline")] == [
        {"worker": hooks.worker_name, "hostname": os.uname().nodename, "pid": os.getpid()}]


def test_a_forked_worker_sends_events_under_the_consumer_name_and_serves_nothing():
    huey, tasks = make_app("f")
    client = RecordingClient()
    zh.install(huey, client)
    try:
        hooks = zh.installed(huey)
        hooks.on_consumer(None)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: a process worker
            try:
                child = zh.installed(huey)
                child.on_startup()
                ok = child._forked and child.worker_name == hooks.worker_name and child.running == {}
                child.start_serving()
                ok = ok and len(client.served) == 1
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1"
        os.waitpid(pid, 0)
    finally:
        zh.uninstall(huey)


PROCESS_APP = '''
import os
from huey import SqliteHuey
import z4j_agentd.huey

huey = SqliteHuey("procs", filename=os.environ["HUEY_DB"], utc=True)
z4j_agentd.huey.install(huey)


@huey.task()
def add(a, b):
    return a + b
'''


def test_process_workers_send_their_tasks_events_under_the_consumers_name(standin, tmp_path):
    """`huey_consumer -k process`: the tasks run in forked worker processes, whose events reach
    the daemon on their own connections; only the consumer serves commands."""
    import signal
    import subprocess
    import sys

    (tmp_path / "procs_app.py").write_text(PROCESS_APP)
    env = dict(os.environ, HUEY_DB=str(tmp_path / "huey.db"), Z4J_SOCKET_PATH=standin.path,
               PYTHONPATH=str(tmp_path))
    consumer = subprocess.Popen([sys.executable, "-m", "huey.bin.huey_consumer", "procs_app.huey", "-k", "process",
                                 "-w", "2", "-n", "-d", "0.05", "-m", "0.2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        from huey import SqliteHuey

        producer = SqliteHuey("procs", filename=str(tmp_path / "huey.db"), utc=True)

        def add(a, b):  # the consumer's task, as a producer without z4j enqueues it
            raise AssertionError

        add.__module__ = "procs_app"
        res = producer.task()(add)(20, 22)
        assert res.get(blocking=True, timeout=20) == 42
        worker = f"huey@{os.uname().nodename}:{consumer.pid}"
        done = standin.wait_for(lambda: [e for e in standin.events()
                                         if e.get("kind") == "task.succeeded" and e.get("task_id") == res.id], 10)
        assert done[0]["data"]["worker"] == worker and done[0]["data"]["result"] == 42
        assert done[0]["_pid"] != consumer.pid  # a worker process sent it
        online = [e for e in standin.events() if e.get("kind") == "worker.online"]
        assert [(e["_pid"], e["data"]["worker"], e["data"]["pool"]) for e in online] == [
            (consumer.pid, worker, "huey.consumer(process)")]
        served = [p.pid for p, m in standin.all("hello") if "huey" in (m.get("capabilities") or {})]
        assert served == [consumer.pid], served
    finally:
        consumer.send_signal(signal.SIGINT)
        consumer.wait(20)
    assert standin.wait_for(lambda: [e for e in standin.events() if e.get("kind") == "worker.offline"], 5)


# ---------------------------------------------------------------- review fixes


@pytest.fixture(scope="module")
def redis_sock():
    """A throwaway redis-server (the e2e suite needs one too, so it is not optional)."""
    with unix_redis(required=True) as sock:
        yield sock


def test_purge_on_redis_refuses_when_a_task_is_enqueued_between_the_check_and_the_delete(redis_sock):
    from huey import RedisHuey

    import redis

    huey = RedisHuey("pr", connection_pool=redis.ConnectionPool.from_url(f"unix://{redis_sock}"), utc=True)
    huey.storage.conn.flushall()

    @huey.task()
    def add(a, b):
        return a + b

    client = RecordingClient()
    zh.install(huey, client)
    try:
        zh.installed(huey).on_consumer(None)
        purge = handler(client, "purge_queue")
        for i in range(3):
            add(i, i)
        conn = huey.storage.conn
        real_pipeline = conn.pipeline
        late = []

        def pipeline(*args, **kwargs):
            pipe = real_pipeline(*args, **kwargs)
            real_execute = pipe.execute

            def execute(*a, **k):
                if not late:  # a producer enqueues once the depth was checked, before the delete runs
                    late.append(add(9, 9))
                return real_execute(*a, **k)
            pipe.execute = execute
            return pipe

        conn.pipeline = pipeline
        with pytest.raises(_commands.CommandFailed, match="enqueued or taken while it was purged; nothing was"):
            purge({"parameters": {"queue": "pr", "expected_depth": 3}})
        assert late and huey.pending_count() == 4  # the late task and the three were kept
        del conn.pipeline
        with pytest.raises(_commands.CommandFailed, match="holds 4 tasks now, the purge was confirmed at 3"):
            purge({"parameters": {"queue": "pr", "expected_depth": 3}})
        assert purge({"parameters": {"queue": "pr", "expected_depth": 4}}) == {
            "queue": "pr", "depth_before": 4, "purged": 4, "force": False}
        assert huey.pending_count() == 0
        add(1, 1)
        assert purge({"parameters": {"queue": "pr", "force": True}})["purged"] == 1
        assert purge({"parameters": {"queue": "pr", "expected_depth": 0}})["purged"] == 0
    finally:
        zh.uninstall(huey)
        huey.storage.conn.flushall()


def test_retry_memory_keeps_json_text_capped_and_nothing_for_other_values(app):
    huey, tasks, client, consume = app
    consume()
    hooks = zh.installed(huey)
    small = tasks["add"]([1, {"k": "v"}], 2)
    big = tasks["add"]("x" * (zh.MAX_REMEMBERED_ARGS_BYTES + 1), "")
    odd = tasks["add"]({1, 2}, 3)  # a set: not JSON
    for res in (small, big, odd):
        wait(lambda: events(client, res.id, "task.succeeded") or events(client, res.id, "task.failed"),
             what="the task to end")
    kept = hooks._remembered[small.id]
    assert kept == ("test_huey.add", '[[[1,{"k":"v"}],2],{}]'), kept  # the text, not the live objects
    assert hooks.remembered(small.id) == ("test_huey.add", [[1, {"k": "v"}], 2], {})
    assert hooks._remembered[big.id] == ("test_huey.add", None)
    assert hooks._remembered[odd.id] == ("test_huey.add", None)
    with pytest.raises(_commands.BadCommand, match="too large to keep in memory, or not JSON"):
        handler(client, "retry_task")({"parameters": {"task_id": odd.id}})


def test_secrets_in_errors_are_scrubbed_from_command_answers_and_health(app):
    huey, tasks, client, consume = app
    consume()
    bad = tasks["boom"](1)
    reconcile = handler(client, "reconcile_task")
    # Huey stores the error just after its `error` signal: wait for the store, not the event.
    failed = wait(lambda: [r for r in [reconcile({"parameters": {"task_id": bad.id}})]
                           if r["engine_state"] == "failure"], what="the stored error")[0]
    assert "db.internal" in failed["exception"], failed
    assert "s3cr3t-pw" not in failed["exception"]

    def down(*_a, **_k):
        raise ConnectionError(f"Error connecting to {SECRET_URL}")
    huey.revoke_by_id = down
    huey.get_raw = down
    huey.pending_count = down
    huey.enqueue = down
    for action, params in (("cancel_task", {"task_id": "x"}), ("reconcile_task", {"task_id": "x"}),
                           ("purge_queue", {"queue": "t", "expected_depth": 0}),
                           ("submit_task", {"name": "add", "args": [1, 2]})):
        with pytest.raises(_commands.CommandFailed) as caught:
            handler(client, action)({"parameters": params})
        assert "db.internal" in str(caught.value) and "s3cr3t-pw" not in str(caught.value), (action, caught.value)
    report = zh.installed(huey).health()["huey"]
    assert "db.internal" in report["broker_error"] and "s3cr3t-pw" not in report["broker_error"], report


def test_retry_count_counts_retry_task_attempts(app):
    huey, tasks, client, consume = app
    consume()
    res = tasks["retry_twice"]("a")  # retries=0: RetryTask retries anyway, leaving retries as it was
    data = one(client, res.id, "task.failed")
    assert [e["data"]["retry_count"] for e in events(client, res.id, "task.retried")] == [1, 2]
    assert data["retry_count"] == 2 and data["exception"] == "ValueError", data


def test_the_heartbeat_gives_the_host_name(app):
    huey, _tasks, client, consume = app
    consume()
    hooks = zh.installed(huey)
    hooks.health()
    beat = one(client, "", "worker.heartbeat")
    assert beat["hostname"] == os.uname().nodename and beat["worker"] == hooks.worker_name, beat


def test_a_greenlet_consumer_built_directly_is_recognised_as_greenlet(monkeypatch):
    """Consumer(huey, worker_type="greenlet"): create_consumer did not see it, its workers' startup
    does, and the consumer's environment says greenlet (cancel then says it cannot stop a task).
    gevent is not installed here: its three names Huey needs stand in."""
    from huey import consumer as hc

    class Monkey:
        @staticmethod
        def is_module_patched(name):
            return True

    class Greenlet:  # never started here
        def __init__(self, run=None):
            self.run = run

    monkeypatch.setattr(hc, "Greenlet", Greenlet, raising=False)
    monkeypatch.setattr(hc, "monkey", Monkey, raising=False)
    monkeypatch.setattr(hc, "GreenEvent", threading.Event, raising=False)
    huey, _tasks = make_app("g")
    client = RecordingClient()
    zh.install(huey, client)
    try:
        hc.Consumer(huey, workers=3, worker_type="greenlet", periodic=False)
        zh.installed(huey).on_startup()  # as each worker greenlet runs the startup hooks
        hooks = zh.installed(huey)
        assert hooks.worker_type == "greenlet"
        assert one(client, "", "worker.online")["pool"] == "huey.consumer(greenlet)"
    finally:
        zh.uninstall(huey)
FORK_ORDER_APP = '''
import json, os, sys, threading
from huey import SqliteHuey, crontab
import z4j_agentd.huey
from z4j_agentd.huey import periodic

huey = SqliteHuey("forkorder", filename=os.environ["HUEY_DB"], utc=True)
z4j_agentd.huey.install(huey)


@huey.periodic_task(crontab())
def every_minute():
    return 1


consumer = huey.create_consumer(workers=1, worker_type="process", periodic=True)
hooks = z4j_agentd.huey.installed(huey)
before = {"serving": hooks._serving, "periodic": periodic._served(huey) is not None,
          "relay": huey.__dict__[periodic._WATCHED]._relay is not None,
          "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("z4j-agentd"))}
consumer.start()
after = {"serving": hooks._serving, "periodic": periodic._served(huey) is not None}
print(json.dumps({"before": before, "after": after}))
sys.stdout.flush()
consumer.stop(graceful=False)
os._exit(0)
'''


def test_a_process_consumer_starts_its_threads_after_forking_its_scheduler_and_workers(standin, tmp_path):
    """`-k process`: no thread of ours runs while start() forks (a lock one held at the fork, Huey's
    SQLite lock or a module's import lock, hung every child in 2 starts of 15); the pipe for the
    Scheduler process's periodic runs exists before."""
    import json
    import subprocess
    import sys

    (tmp_path / "forkorder_app.py").write_text(FORK_ORDER_APP)
    env = dict(os.environ, HUEY_DB=str(tmp_path / "huey.db"), Z4J_SOCKET_PATH=standin.path)
    done = subprocess.run([sys.executable, str(tmp_path / "forkorder_app.py")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # No commands, health or schedule thread yet (the relay's reader only waits in a read; the event
    # sender has sent worker.online on the daemon's socket).
    threads = seen["before"].pop("threads")
    assert set(threads) <= {"z4j-agentd-events", "z4j-agentd-huey-periodic-relay"}, seen
    assert seen["before"] == {"serving": False, "periodic": False, "relay": True}, seen
    assert seen["after"] == {"serving": True, "periodic": True}, seen
