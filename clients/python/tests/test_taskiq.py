"""The TaskIQ integration (z4j_agentd.taskiq) on TaskIQ's InMemoryBroker,
which runs the worker side (receiver, middlewares, startup events) in this
process: events, worker.* events, commands and the health report; the
queue depths of taskiq-redis's brokers on a real redis-server."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

pytest.importorskip("taskiq")

from taskiq import Context, InMemoryBroker, TaskiqDepends, TaskiqEvents, TaskiqMiddleware  # noqa: E402
from taskiq.middlewares import SimpleRetryMiddleware  # noqa: E402

import z4j_agentd.taskiq as zt  # noqa: E402
from z4j_agentd.taskiq import _commands, _health  # noqa: E402
from test_celery import RecordingClient  # noqa: E402


class Loop:
    """An event loop on a thread of its own: the worker's loop, while the
    test thread plays the client's command and health threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class App:
    """An InMemoryBroker with the retry middleware, the z4j middleware and a few tasks."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.broker = InMemoryBroker(max_async_tasks=7).with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
        self.client = RecordingClient()
        assert zt.install(self.broker, self.client) is self.client
        self.mw = zt.installed(self.broker)
        self.release = threading.Event()
        broker, release = self.broker, self.release

        @broker.task(task_name="add")
        async def add(a, b, password=None):
            return a + b

        @broker.task(task_name="boom")
        async def boom(text):
            raise ValueError(text)

        @broker.task(task_name="flaky", retry_on_error=True, max_retries=3)
        async def flaky(fails, attempts):
            attempts.append(1)
            if len(attempts) <= fails:
                raise RuntimeError(f"attempt {len(attempts)}")
            return len(attempts)

        @broker.task(task_name="sleepy", retry_on_error=True, max_retries=3)
        async def sleepy(seconds):
            await asyncio.sleep(seconds)
            return "slept"

        @broker.task(task_name="blocking")
        def blocking():
            release.wait(10)
            return "done"

        @broker.task(task_name="spawn")
        async def spawn():
            child = await add.kiq(1, 1)
            return child.task_id

        self.tasks = {t.task_name: t for t in (add, boom, flaky, sleepy, blocking, spawn)}
        self.loop.run(self.broker.startup())

    def kick(self, name: str, *args, **kwargs) -> str:
        return self.loop.run(self.tasks[name].kiq(*args, **kwargs)).task_id

    def wait(self, timeout: float = 10.0) -> None:
        self.loop.run(self.broker.wait_all(), timeout)

    def events(self, task_id: str = None, kind: str = None) -> list:
        return [e for e in self.client.emitted if (task_id is None or e["task_id"] == task_id)
                and (kind is None or e["kind"] == kind)]

    def handler(self, action: str):
        handlers, _caps = self.client.served[-1]
        return handlers[(zt.ENGINE, action)]

    def command(self, action: str, **parameters):
        return self.handler(action)({"id": str(uuid.uuid4()), "action": action,
                                     "target": {"engine": zt.ENGINE}, "parameters": parameters})

    def wait_started(self, task_id: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.events(task_id, "task.started"):
            assert time.monotonic() < deadline, f"{task_id} did not start"
            time.sleep(0.01)


@pytest.fixture
def app():
    loop = Loop()
    a = App(loop)
    yield a
    a.release.set()
    try:
        loop.run(a.broker.shutdown())
    finally:
        loop.stop()


# ---------------------------------------------------------------- wiring


def test_install_puts_the_middleware_first_once_and_starts_nothing():
    broker = InMemoryBroker().with_middlewares(SimpleRetryMiddleware())
    client = RecordingClient()
    assert zt.install(broker, client) is client
    assert isinstance(broker.middlewares[0], zt.Z4jMiddleware) and len(broker.middlewares) == 2
    # Again (a reload): still one, still first; the new client applies.
    other = RecordingClient()
    assert zt.install(broker, other) is other
    assert [type(m).__name__ for m in broker.middlewares] == ["Z4jMiddleware", "SimpleRetryMiddleware"]
    assert zt.installed(broker).bound_client is other
    assert other.served == [] and other.emitted == []
    assert len(broker.event_handlers[TaskiqEvents.WORKER_STARTUP]) == 1
    # Nothing connects, serves or starts a thread before the broker starts: a real client (whose
    # first emit or serve would start its threads), not one that records.
    import z4j_agentd

    real = z4j_agentd.Client(socket_path="/nonexistent/agent.sock")
    threads = set(threading.enumerate())
    assert zt.install(broker, real) is real
    assert real._thread is None and real._cmd_thread is None and real._health_thread is None
    assert set(threading.enumerate()) == threads
    assert real.stats()["accepted"] == 0


def test_install_refuses_what_is_not_a_broker():
    with pytest.raises(TypeError, match="needs a TaskIQ broker"):
        zt.install(object())


# ---------------------------------------------------------------- events


def test_a_task_sends_received_started_and_succeeded_with_args_result_and_worker(app):
    tid = app.kick("add", 2, 3, password="hunter2")
    app.wait()
    kinds = [e["kind"] for e in app.events(tid)]
    assert kinds == ["task.received", "task.started", "task.succeeded"], kinds
    received, started, succeeded = app.events(tid)
    assert received["data"] == {"task_name": "add", "args": [2, 3], "kwargs": {"password": "[REDACTED]"}}
    name = f"taskiq@{socket.gethostname()}:{os.getpid()}"
    # The arguments went with this process's own task.received, on the same connection: the brain
    # takes them from there only, so task.started goes without them.
    assert started["data"] == {"task_name": "add", "worker": name, "retry_count": 0}
    assert succeeded["data"]["result"] == 5 and succeeded["data"]["worker"] == name
    assert isinstance(succeeded["data"]["runtime_ms"], int) and succeeded["data"]["retry_count"] == 0


def test_a_failure_sends_failed_with_the_exception_and_a_scrubbed_traceback(app):
    tid = app.kick("boom", "cannot reach redis://app:s3cretpw@db:6379/0")
    app.wait()
    assert [e["kind"] for e in app.events(tid)] == ["task.received", "task.started", "task.failed"]
    data = app.events(tid, "task.failed")[0]["data"]
    assert data["exception"] == "ValueError"
    assert data["exception_message"] == "cannot reach redis://app:[REDACTED]@db:6379/0"
    assert "raise ValueError(text)" in data["traceback"] and "s3cretpw" not in data["traceback"]
    assert data["retry_count"] == 0 and isinstance(data["runtime_ms"], int)


def test_retries_are_retried_events_with_their_count_and_one_outcome(app):
    ok = app.kick("flaky", 2, [])
    bad = app.kick("flaky", 5, [])
    for _ in range(4):  # each retry is a new message
        app.wait()
    ok_kinds = [e["kind"] for e in app.events(ok)]
    assert ok_kinds == ["task.received", "task.started", "task.retried", "task.started", "task.retried",
                        "task.started", "task.succeeded"], ok_kinds
    assert [e["data"]["retry_count"] for e in app.events(ok, "task.retried")] == [1, 2]
    assert [e["data"]["retry_count"] for e in app.events(ok, "task.started")] == [0, 1, 2]
    assert app.events(ok, "task.retried")[0]["data"]["reason"] == "RuntimeError: attempt 1"
    assert app.events(ok, "task.succeeded")[0]["data"]["result"] == 3
    # max_retries=3: attempts 0, 1, 2; the last one fails, once (no failed for the retried ones).
    bad_kinds = [e["kind"] for e in app.events(bad)]
    assert bad_kinds.count("task.retried") == 2 and bad_kinds.count("task.failed") == 1, bad_kinds
    assert bad_kinds[-1] == "task.failed" and app.events(bad, "task.failed")[0]["data"]["retry_count"] == 2


def test_a_task_sent_from_a_task_names_its_parent(app):
    parent = app.kick("spawn")
    app.wait()
    app.wait()
    child = app.events(parent, "task.succeeded")[0]["data"]["result"]
    received = app.events(child, "task.received")
    assert received and received[0]["data"]["parent_task_id"] == parent
    assert app.events(child, "task.started")[0]["data"]["parent_task_id"] == parent
    # The parent itself, sent from outside any task, has none.
    assert "parent_task_id" not in app.events(parent, "task.received")[0]["data"]


def test_a_worker_process_sends_received_for_a_task_another_process_sent(app):
    """The sender's task.received may reach the brain after the worker's task.started (two
    connections): the worker sends its own first, so the row keeps the arguments."""
    mw = app.mw
    mw._received_sent.clear()
    message = type("M", (), {"task_id": "t-other", "task_name": "add", "args": [1, 2], "kwargs": {},
                             "labels": {"_retries": 0}})()

    async def run():
        mw.pre_execute(message)
        mw.post_execute(message, type("R", (), {"is_err": False, "return_value": 3})())

    app.loop.run(run())
    assert [e["kind"] for e in app.events("t-other")] == ["task.received", "task.started", "task.succeeded"]
    assert app.events("t-other", "task.received")[0]["data"]["args"] == [1, 2]
    assert "args" not in app.events("t-other", "task.started")[0]["data"]
    # A retry of it (same id, _retries 1) does not send task.received again.
    message.labels = {"_retries": 1}
    app.loop.run(run())
    assert [e["kind"] for e in app.events("t-other")] == ["task.received", "task.started", "task.succeeded", "task.started",
                                                          "task.succeeded"]
    assert "args" not in app.events("t-other", "task.started")[1]["data"]


def test_a_retry_in_a_process_that_sent_no_received_keeps_its_arguments_on_started(app):
    """A later attempt that runs in another worker process: that process sent no task.received
    (only the first attempt's runner and the sender do), so its task.started carries them."""
    mw = app.mw
    message = type("M", (), {"task_id": "t-retry-elsewhere", "task_name": "add", "args": [5, 6],
                             "kwargs": {"k": 1}, "labels": {"_retries": 1}})()

    async def run():
        mw.pre_execute(message)
        mw.post_execute(message, type("R", (), {"is_err": False, "return_value": 3})())

    app.loop.run(run())
    assert [e["kind"] for e in app.events("t-retry-elsewhere")] == ["task.started", "task.succeeded"]
    data = app.events("t-retry-elsewhere", "task.started")[0]["data"]
    assert data["args"] == [5, 6] and data["kwargs"] == {"k": 1} and data["retry_count"] == 1


def test_the_worker_says_online_and_offline_under_the_name_its_events_carry(app):
    online = app.events(kind="worker.online")
    name = f"taskiq@{socket.gethostname()}:{os.getpid()}"
    assert len(online) == 1 and online[0]["data"]["worker"] == name
    assert online[0]["data"]["concurrency"] == 7 and online[0]["data"]["pid"] == os.getpid()
    assert online[0]["data"]["pool"] == "taskiq:InMemoryBroker" and online[0]["data"]["sw_ver"]
    assert app.client.served_workers == [name]
    app.loop.run(app.broker.shutdown())
    offline = app.events(kind="worker.offline")
    assert [e["data"] for e in offline] == [{"worker": name, "hostname": socket.gethostname(), "pid": os.getpid()}]


def test_retries_of_labels_read_strings_and_ints():
    assert zt.retries_of({"_retries": "2"}) == 2 and zt.retries_of({"_retries": 3}) == 3
    assert zt.retries_of({}) == 0 and zt.retries_of({"_retries": "x"}) == 0 and zt.retries_of(None) == 0


# ---------------------------------------------------------------- commands


def test_the_worker_declares_its_actions_and_the_retry_contract(app):
    handlers, caps = app.client.served[-1]
    assert sorted(a for _, a in handlers) == ["cancel_task", "reconcile_task", "retry_task", "submit_task"]
    assert caps == {"taskiq": ["retry_by_reference_v1"]}


def test_submit_task_sends_the_named_task_and_refuses_what_taskiq_cannot_do(app):
    out = app.command("submit_task", name="add", args=[40, 2], kwargs={})
    app.wait()
    assert out["task_name"] == "add" and out["engine"] == "taskiq"
    assert app.events(out["task_id"], "task.succeeded")[0]["data"]["result"] == 42
    with pytest.raises(_commands.BadCommand, match="'nope' is not a task this worker knows"):
        app.command("submit_task", name="nope")
    with pytest.raises(_commands.BadCommand, match="queue 'other' cannot be chosen"):
        app.command("submit_task", name="add", args=[1, 1], queue="other")
    with pytest.raises(_commands.BadCommand, match="only through a schedule source"):
        app.command("submit_task", name="add", args=[1, 1], eta=time.time() + 60)
    with pytest.raises(_commands.BadCommand, match="no portable task priority"):
        app.command("submit_task", name="add", args=[1, 1], priority="high")
    with pytest.raises(_commands.BadCommand, match="args must be a list"):
        app.command("submit_task", name="add", args="1, 2")
    # "default" and "normal" ask for nothing: sent.
    assert app.command("submit_task", name="add", args=[1, 1], queue="default", priority="normal")["task_id"]


def test_retry_task_sends_again_with_overrides_or_the_remembered_arguments(app):
    original = app.kick("add", 20, 22)
    app.wait()
    again = app.command("retry_task", task_id=original)
    app.wait()
    assert again["task_id"] == original and again["new_task_id"] != original and again["arguments"] == "original"
    assert app.events(again["new_task_id"], "task.succeeded")[0]["data"]["result"] == 42
    changed = app.command("retry_task", task_id=original, task_name="add", override_args=[1, 2],
                          override_kwargs={})
    app.wait()
    assert changed["arguments"] == "overrides"
    assert app.events(changed["new_task_id"], "task.succeeded")[0]["data"]["result"] == 3
    with pytest.raises(_commands.BadCommand, match="its task name is unknown here"):
        app.command("retry_task", task_id="never-seen")
    with pytest.raises(_commands.BadCommand, match="original arguments are not known here"):
        app.command("retry_task", task_id="never-seen", task_name="add")


def test_reconcile_reads_this_worker_then_the_result_backend(app):
    done = app.kick("add", 1, 1)
    failed = app.kick("boom", "nope")
    running = app.kick("sleepy", 30)
    app.wait_started(running)
    out = app.command("reconcile_task", task_id=running)
    assert out == {"task_id": running, "engine_state": "started", "finished_at": None, "exception": None,
                   "source": "worker", "worker": app.mw.worker_name()}
    assert app.command("reconcile_task", task_id=done)["engine_state"] == "success"
    bad = app.command("reconcile_task", task_id=failed)
    assert bad["engine_state"] == "failure" and bad["exception"] == "ValueError: nope"
    assert app.command("reconcile_task", task_id="nobody")["engine_state"] == "unknown"
    app.command("cancel_task", task_id=running)


def test_cancel_stops_a_running_async_task_and_the_retry_middleware_leaves_it(app):
    tid = app.kick("sleepy", 30)
    app.wait_started(tid)
    started = time.monotonic()
    out = app.command("cancel_task", task_id=tid)
    assert time.monotonic() - started < 5
    assert out["cancelled"] is True and out["retry_suppressed"] is True and out["worker"] == app.mw.worker_name()
    app.wait()
    kinds = [e["kind"] for e in app.events(tid)]
    assert kinds == ["task.received", "task.started", "task.revoked"], kinds
    assert app.events(tid, "task.revoked")[0]["data"]["terminated"] is True
    result = app.loop.run(app.broker.result_backend.get_result(tid))
    assert result.is_err and isinstance(result.error, asyncio.CancelledError)
    # The worker goes on.
    ok = app.kick("add", 1, 2)
    app.wait()
    assert app.events(ok, "task.succeeded")


def test_cancel_says_why_it_cannot_stop_a_sync_task_or_one_not_running_here(app):
    tid = app.kick("blocking")
    app.wait_started(tid)
    with pytest.raises(_commands.CommandFailed, match="synchronous function .* cannot stop a thread"):
        app.command("cancel_task", task_id=tid)
    app.release.set()
    app.wait()
    assert app.events(tid, "task.succeeded")[0]["data"]["result"] == "done"
    with pytest.raises(_commands.CommandFailed, match="is not running in worker taskiq@"):
        app.command("cancel_task", task_id=tid)
    with pytest.raises(_commands.BadCommand, match="needs parameters.task_id"):
        app.command("cancel_task")


def test_a_command_handler_masks_secrets_in_errors(app):
    handler = _commands.TaskiqCommands(app.mw)._masked("submit_task", lambda c: 1 / 0 if c else None)
    with pytest.raises(_commands.CommandFailed, match="submit_task failed: ZeroDivisionError"):
        handler({"x": 1})

    def leaky(command):
        raise ConnectionError("redis://u:topsecret@h:1 refused")

    with pytest.raises(_commands.CommandFailed) as info:
        _commands.TaskiqCommands(app.mw)._masked("submit_task", leaky)({})
    assert "topsecret" not in str(info.value) and "[REDACTED]" in str(info.value)


# ---------------------------------------------------------------- health


def test_the_health_report_names_the_worker_its_running_tasks_and_registered_ones(app):
    tid = app.kick("sleepy", 30, )
    app.wait_started(tid)
    report = _health.HealthSource(app.mw)()["taskiq"]
    name = app.mw.worker_name()
    assert list(report["workers"]) == [name]
    worker = report["workers"][name]
    assert worker["stats"]["pid"] == os.getpid()
    assert worker["stats"]["pool"]["max-concurrency"] == 7 and worker["stats"]["pool"]["implementation"] == "taskiq"
    assert [(a["id"], a["name"], a["args"]) for a in worker["active"]] == [(tid, "sleepy", [30])]
    assert worker["registered"] == ["add", "blocking", "boom", "flaky", "sleepy", "spawn"]
    assert "queue_depths" not in report and report["broker_type"] == "InMemoryBroker"
    beats = app.events(kind="worker.heartbeat")
    assert beats and beats[-1]["data"]["worker"] == name and beats[-1]["data"]["active"] == 1
    app.command("cancel_task", task_id=tid)


def test_the_health_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(_health.INTERVAL_ENV, "2.5")
    assert _health.interval_from_env() == 2.5
    monkeypatch.setenv(_health.INTERVAL_ENV, "0")
    with pytest.raises(ValueError, match="out of range"):
        _health.interval_from_env()
    monkeypatch.setenv(_health.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="is not a number"):
        _health.interval_from_env()


@pytest.fixture(scope="module")
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("taskiq_redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("kind", ["list", "stream"])
def test_the_depth_of_a_redis_broker_is_what_waits(redis_url, kind):
    from taskiq_redis import ListQueueBroker, RedisStreamBroker

    queue = f"q-{kind}-{uuid.uuid4().hex[:6]}"
    loop = Loop()
    try:
        broker = (ListQueueBroker(redis_url, queue_name=queue) if kind == "list"
                  else RedisStreamBroker(redis_url, queue_name=queue, consumer_group_name="g"))
        zt.install(broker, RecordingClient())
        mw = zt.installed(broker)
        mw.loop = loop.loop

        @broker.task(task_name="noop")
        async def noop():
            return None

        source = _health.HealthSource(mw)
        if kind == "stream":
            loop.run(broker.startup())  # declares the consumer group
        assert source.queue_depths() == {queue: 0}
        for _ in range(3):
            loop.run(noop.kiq())
        assert source.queue_depths() == {queue: 3}
        report = source()["taskiq"]
        assert report["queue_depths"] == {queue: 3} and report["broker_connected"] is True
        loop.run(broker.shutdown())
    finally:
        loop.stop()


def test_a_broker_that_does_not_answer_is_counted_and_the_details_still_go(app):
    async def never():
        await asyncio.sleep(60)

    source = _health.HealthSource(app.mw)
    source._probe = lambda: never()
    old = _health.DEPTH_DEADLINE
    _health.DEPTH_DEADLINE = 0.2
    try:
        report = source()["taskiq"]
    finally:
        _health.DEPTH_DEADLINE = old
    assert report["broker_connected"] is False and report["depth_failures"] == 1
    assert "no answer within" in report["broker_error"] and report["workers"]


# ---------------------------------------------------------------- fork


def test_a_forked_worker_process_starts_with_nothing_of_its_parent(app):
    tid = app.kick("sleepy", 30)
    app.wait_started(tid)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        try:
            mw = app.mw
            ok = (mw.running_now() == [] and mw.worker is None and mw.loop is None and not mw._serving
                  and mw.remembered(tid) == {})
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert got == b"1"
    assert [e.task_id for e in app.mw.running_now()] == [tid]  # the parent keeps its own
    app.command("cancel_task", task_id=tid)


def test_a_retry_that_starts_before_its_failed_attempt_ended_keeps_both_apart():
    """A retry middleware sends the task again from on_error; the next attempt (same task id)
    may start while the failed one is still in its end hooks (here a middleware awaiting in
    on_error, as a metrics or logging one may). Each attempt keeps its own count, and the
    new attempt stays cancellable."""
    class SlowOnError(TaskiqMiddleware):
        async def on_error(self, message, result, exception):
            await asyncio.sleep(0.3)

    loop = Loop()
    broker = InMemoryBroker()
    broker.add_middlewares(SlowOnError(), SimpleRetryMiddleware(default_retry_count=3))
    client = RecordingClient()
    zt.install(broker, client)  # first: [z4j, SlowOnError, SimpleRetry]

    @broker.task(task_name="second_try_sleeps", retry_on_error=True, max_retries=3)
    async def second_try_sleeps(context: Context = TaskiqDepends()):
        if int(context.message.labels.get("_retries", 0)) == 0:
            raise RuntimeError("first attempt")
        await asyncio.sleep(30)

    try:
        loop.run(broker.startup())
        tid = loop.run(second_try_sleeps.kiq()).task_id
        deadline = time.monotonic() + 5
        while len([e for e in client.emitted if e["kind"] == "task.started"]) < 2:
            assert time.monotonic() < deadline, client.kinds()
            time.sleep(0.01)
        time.sleep(0.5)  # the first attempt's end hooks are over
        retried = [e["data"]["retry_count"] for e in client.emitted if e["kind"] == "task.retried"]
        assert retried == [1], client.emitted
        assert "task.failed" not in client.kinds()
        handlers, _ = client.served[-1]
        out = handlers[("taskiq", "cancel_task")]({"parameters": {"task_id": tid}})
        assert out["cancelled"] is True
        assert client.kinds()[-1] == "task.revoked"
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_a_task_run_in_the_senders_own_asyncio_task_leaves_no_parent_behind():
    """InMemoryBroker(await_inplace=True) runs the task inside the coroutine that sent it: the
    next task that coroutine sends is not the first one's child."""
    broker = InMemoryBroker(await_inplace=True)
    client = RecordingClient()
    zt.install(broker, client)

    @broker.task(task_name="noop")
    async def noop():
        return None

    async def main():
        await broker.startup()
        first = (await noop.kiq()).task_id
        second = (await noop.kiq()).task_id
        await broker.shutdown()
        return first, second

    first, second = asyncio.run(main())
    received = [e for e in client.emitted if e["task_id"] == second and e["kind"] == "task.received"]
    assert received and "parent_task_id" not in received[0]["data"], received


def test_the_senders_received_is_dated_before_the_worker_could_start_the_task():
    """A worker process may start a task before the sender's post_send runs; the brain puts a
    row back to `received` for a received event dated after its started one. So the sender's
    task.received, sent once the broker took the task, is dated when the send began; and a
    process that runs a task it sent sends task.received once, before task.started."""
    from datetime import datetime, timedelta, timezone

    class TimedClient(RecordingClient):
        def emit(self, engine, kind, task_id="", data=None, occurred_at=None, id=None):
            super().emit(engine, kind, task_id, data, occurred_at, id)
            self.emitted[-1]["at"] = occurred_at or datetime.now(timezone.utc)
            return True

    class SlowToConfirm(InMemoryBroker):
        async def kick(self, message):
            await super().kick(message)   # the task starts on the loop...
            await asyncio.sleep(0.2)      # ...before the send returns

    broker = SlowToConfirm()
    client = TimedClient()
    zt.install(broker, client)

    @broker.task(task_name="noop")
    async def noop():
        return None

    async def main():
        await broker.startup()
        tid = (await noop.kiq()).task_id
        await broker.wait_all()
        await broker.shutdown()
        return tid

    tid = asyncio.run(main())
    kinds = [e["kind"] for e in client.emitted if e["task_id"] == tid]
    assert kinds == ["task.received", "task.started", "task.succeeded"], kinds

    # The sender alone (another process runs the task): dated at pre_send, sent at post_send.
    mw = zt.installed(broker)
    message = type("M", (), {"task_id": "t-elsewhere", "task_name": "noop", "args": [], "kwargs": {},
                             "labels": {}})()
    before = datetime.now(timezone.utc)
    mw.pre_send(message)
    time.sleep(0.2)
    mw.post_send(message)
    received = [e for e in client.emitted if e["task_id"] == "t-elsewhere"]
    assert [e["kind"] for e in received] == ["task.received"]
    assert before <= received[0]["at"] < before + timedelta(seconds=0.1), (before, received[0]["at"])


# ---------------------------------------------------------------- review fixes


class TimedClient(RecordingClient):
    """Records each event's time as the client would send it (its occurred_at, else now)."""

    def emit(self, engine, kind, task_id="", data=None, occurred_at=None, id=None):
        from datetime import datetime, timezone

        super().emit(engine, kind, task_id, data, occurred_at, id)
        self.emitted[-1]["at"] = occurred_at or datetime.now(timezone.utc)
        return True


def test_remembering_large_arguments_stops_once_past_the_limit(monkeypatch):
    """retry_task keeps arguments up to 4 KiB: a 10 MB argument (or a list of a million items) is
    not encoded to JSON just to learn it is too large."""
    encoded = []
    real_dumps = zt.json.dumps

    def dumps(value, *a, **k):
        encoded.append(value)
        return real_dumps(value, *a, **k)

    monkeypatch.setattr(zt.json, "dumps", dumps)
    mw = zt.Z4jMiddleware(RecordingClient())
    mw.set_broker(InMemoryBroker())

    def remember(task_id, *args, **kwargs):
        mw._remember(task_id, type("M", (), {"task_name": "t", "args": list(args), "kwargs": kwargs,
                                             "labels": {}})())
        return mw.remembered(task_id)

    assert "args_left_out" in remember("big-str", "x" * 10_000_000)
    assert "args_left_out" in remember("long-list", list(range(1_000_000)))
    assert "args_left_out" in remember("deep", [[["y" * 3000]], {"k": "z" * 2000}])
    assert "args_left_out" in remember("not-json", object())
    assert encoded == []  # none of them was encoded
    # Small enough for the walk, too large once escaped: encoded, then left out.
    assert "args_left_out" in remember("escapes", "\n" * 3000)
    kept = remember("small", 1, "two", [3.5, None, True], key={"a": 1})
    assert kept["args"] == [1, "two", [3.5, None, True]] and kept["kwargs"] == {"key": {"a": 1}}
    assert zt.json_size_at_most([1, "two", {"a": None}], 100) == len(real_dumps([1, "two", {"a": None}],
                                                                              separators=(",", ":")))


def test_the_health_report_walks_a_running_tasks_arguments_once(app, monkeypatch):
    """A task running for hours is listed in every report: its cut args and kwargs are computed
    once, not again at each report (every 10 s)."""
    calls = []
    real = _health.event_value
    monkeypatch.setattr(_health, "event_value", lambda v, n: calls.append(n) or real(v, n))
    tid = app.kick("sleepy", 30, )
    app.wait_started(tid)
    source = _health.HealthSource(app.mw)
    for _ in range(3):
        worker = source()["taskiq"]["workers"][app.mw.worker_name()]
        assert [(a["id"], a["args"], a["kwargs"]) for a in worker["active"]] == [(tid, [30], {})]
    assert len(calls) == 2, calls  # args and kwargs, once
    app.command("cancel_task", task_id=tid)


def test_the_health_reports_running_tasks_carry_the_task_id_as_id(app):
    """The daemon sends cancel_task and reconcile_task to the process whose latest report lists the
    task in a worker's `active`, matching `id` (or `task_id`) with the command's task id."""
    tids = [app.kick("sleepy", 30) for _ in range(2)]
    for tid in tids:
        app.wait_started(tid)
    worker = _health.HealthSource(app.mw)()["taskiq"]["workers"][app.mw.worker_name()]
    assert sorted(a["id"] for a in worker["active"]) == sorted(tids)
    assert all(isinstance(a["id"], str) for a in worker["active"])
    for tid in tids:
        app.command("cancel_task", task_id=tid)


class _Raising(TaskiqMiddleware):
    """A middleware after ours whose end hook raises (a broker hiccup in a re-send, a metrics sink)."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook

    def post_execute(self, message, result):
        if self.hook == "post_execute":
            raise ConnectionError("redis://u:pw@h:1 went away")

    def on_error(self, message, result, exception):
        if self.hook == "on_error":
            raise ConnectionError("redis://u:pw@h:1 went away")


@pytest.mark.parametrize("hook", ["post_execute", "on_error"])
def test_a_task_whose_end_hooks_never_reach_ours_is_not_running_for_ever(hook):
    """Our middleware is first, so its post_execute and on_error run last: when a hook before them
    raises, the task's asyncio task ends without them. The task leaves the running ones (health,
    reconcile, cancel) and its end is sent: task.failed."""
    loop = Loop()
    broker = InMemoryBroker().with_middlewares(_Raising(hook))
    client = RecordingClient()
    zt.install(broker, client)

    @broker.task(task_name="job")
    async def job(fail):
        if fail:
            raise ValueError("the task's own error")
        return 1

    try:
        loop.run(broker.startup())
        tid = loop.run(job.kiq(hook == "on_error")).task_id
        loop.run(broker.wait_all())
        mw = zt.installed(broker)
        assert mw.running(tid) is None and mw.running_now() == []
        kinds = [e["kind"] for e in client.emitted if e["task_id"] == tid]
        assert kinds == ["task.received", "task.started", "task.failed"], kinds
        data = [e for e in client.emitted if e["kind"] == "task.failed"][0]["data"]
        assert data["exception"] == "ConnectionError" and "pw@" not in data["exception_message"]
        assert "end reaching z4j" in data["exception_message"]
        handlers, _ = client.served[-1]
        out = handlers[("taskiq", "reconcile_task")]({"parameters": {"task_id": tid}})
        assert out["engine_state"] != "started", out
        assert _health.HealthSource(mw)()["taskiq"]["workers"][mw.worker_name()]["active"] == []
        assert mw.totals() == {"job": 1}
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_a_task_whose_asyncio_task_is_cancelled_outside_our_hooks_ends_revoked():
    """A worker shutting down cancels the asyncio tasks still running (TaskIQ's wait_tasks_timeout):
    cancelled in a later middleware's pre_execute, ours never sees an end: task.revoked."""
    class Stuck(TaskiqMiddleware):
        async def pre_execute(self, message):
            await asyncio.sleep(30)
            return message

    loop = Loop()
    broker = InMemoryBroker().with_middlewares(Stuck())
    client = RecordingClient()
    zt.install(broker, client)

    @broker.task(task_name="job")
    async def job():
        return 1

    try:
        loop.run(broker.startup())
        tid = loop.run(job.kiq()).task_id
        deadline = time.monotonic() + 5
        while not [e for e in client.emitted if e["kind"] == "task.started"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def cancel_all():
            for task in list(broker._running_tasks):
                task.cancel()
            await asyncio.sleep(0.05)

        loop.run(cancel_all())
        assert zt.installed(broker).running_now() == []
        revoked = [e for e in client.emitted if e["task_id"] == tid and e["kind"] == "task.revoked"]
        assert len(revoked) == 1 and "cancelled before TaskIQ's end hooks" in revoked[0]["data"]["reason"]
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_cancel_leaves_a_task_whose_function_returned_while_later_hooks_run(monkeypatch):
    """The task's function returned; another middleware's post_execute still awaits (then come the
    result and the ack). A cancel now would lose the result and task.succeeded: it is refused,
    saying the task is finishing, and the task ends as it would have."""
    monkeypatch.setattr(_commands, "CANCEL_SETTLE", 0.3, raising=False)  # absent before it was needed
    monkeypatch.setattr(_commands, "CANCEL_WAIT", 2.0)
    in_hook = threading.Event()

    class SlowPostExecute(TaskiqMiddleware):
        async def post_execute(self, message, result):
            in_hook.set()
            await asyncio.sleep(1.0)

    loop = Loop()
    broker = InMemoryBroker().with_middlewares(SlowPostExecute())
    client = RecordingClient()
    zt.install(broker, client)

    @broker.task(task_name="quick")
    async def quick():
        return "kept"

    try:
        loop.run(broker.startup())
        tid = loop.run(quick.kiq()).task_id
        assert in_hook.wait(5)
        handlers, _ = client.served[-1]
        with pytest.raises(_commands.CommandFailed, match="is finishing or starting .* not cancelled"):
            handlers[("taskiq", "cancel_task")]({"parameters": {"task_id": tid}})
        loop.run(broker.wait_all())
        assert [e["kind"] for e in client.emitted if e["task_id"] == tid][-1] == "task.succeeded"
        assert loop.run(broker.result_backend.get_result(tid)).return_value == "kept"
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_in_function_follows_the_await_chain_to_the_tasks_own_code():
    async def inner():
        await asyncio.sleep(10)

    async def own():
        await inner()

    async def other():
        await asyncio.sleep(10)

    async def main():
        a, b = asyncio.ensure_future(own()), asyncio.ensure_future(other())
        await asyncio.sleep(0.01)
        found = (_commands.in_function(a, (own.__code__,)), _commands.in_function(b, (own.__code__,)),
                 _commands.in_function(a, ()))
        a.cancel()
        b.cancel()
        return found

    assert asyncio.run(main()) == (True, False, False)


def test_task_retried_is_dated_when_the_retry_was_sent():
    """The next attempt may start (another worker process: task.started) while this attempt's
    later on_error hooks still run: task.retried is dated when the retry middleware sent it
    again, so it comes before that task.started."""
    class SlowOnError(TaskiqMiddleware):
        async def on_error(self, message, result, exception):
            await asyncio.sleep(0.3)

    loop = Loop()
    broker = InMemoryBroker()
    broker.add_middlewares(SlowOnError(), SimpleRetryMiddleware(default_retry_count=3))
    client = TimedClient()
    zt.install(broker, client)

    @broker.task(task_name="fails_once", retry_on_error=True, max_retries=3)
    async def fails_once(context: Context = TaskiqDepends()):
        if int(context.message.labels.get("_retries", 0)) == 0:
            raise RuntimeError("first attempt")
        return "second"

    try:
        loop.run(broker.startup())
        tid = loop.run(fails_once.kiq()).task_id
        deadline = time.monotonic() + 5
        while "task.succeeded" not in client.kinds() or "task.retried" not in client.kinds():
            assert time.monotonic() < deadline, client.kinds()
            time.sleep(0.01)
        mine = [e for e in client.emitted if e["task_id"] == tid]
        retried = [e for e in mine if e["kind"] == "task.retried"]
        second_start = [e for e in mine if e["kind"] == "task.started"][1]
        assert len(retried) == 1 and retried[0]["at"] <= second_start["at"], (retried, second_start)
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_a_failing_startup_read_does_not_kill_the_worker_process(monkeypatch):
    """WORKER_STARTUP handlers that raise kill TaskIQ's worker process (restarted for ever):
    reading the receiver's limits or the worker's details failing leaves a worker.online with
    what is known, and the worker serves."""
    def broken(*_a, **_k):
        raise RuntimeError("a frame without f_locals")

    monkeypatch.setattr(zt, "_receiver_limits", broken)
    monkeypatch.setattr(zt.Z4jMiddleware, "worker_data",
                        lambda self, with_details: broken() if with_details else {"worker": self.worker_name()})
    loop = Loop()
    broker = InMemoryBroker()
    client = RecordingClient()
    zt.install(broker, client)
    try:
        loop.run(broker.startup())  # raised on the old code
        online = [e for e in client.emitted if e["kind"] == "worker.online"]
        assert [e["data"] for e in online] == [{"worker": zt.worker_name(), "hostname": socket.gethostname(),
                                                "pid": os.getpid()}]
        assert client.served and zt.installed(broker).concurrency is None
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_a_send_the_broker_is_slow_to_confirm_may_have_been_sent_and_is_not_cancelled(monkeypatch):
    """submit_task's kiq outlasting the deadline may already be in the broker: the answer says it
    may have been sent, and the send is left to finish (cancelling it could cut it half-way)."""
    monkeypatch.setattr(_commands, "LOOP_TIMEOUT", 0.2)
    finished = threading.Event()

    class SlowBroker(InMemoryBroker):
        async def kick(self, message):
            await asyncio.sleep(0.5)
            await super().kick(message)
            finished.set()

    loop = Loop()
    broker = SlowBroker()
    client = RecordingClient()
    zt.install(broker, client)

    @broker.task(task_name="noop")
    async def noop():
        return None

    try:
        loop.run(broker.startup())
        handlers, _ = client.served[-1]
        with pytest.raises(_commands.CommandFailed, match="may have been sent .*not cancelled"):
            handlers[("taskiq", "submit_task")]({"parameters": {"name": "noop"}})
        assert finished.wait(5), "the send was cancelled"
    finally:
        loop.run(broker.shutdown())
        loop.stop()


def test_a_redis_stream_without_lag_reports_no_depth_but_a_connected_broker(redis_url, monkeypatch):
    """Redis < 7 gives no `lag` in XINFO GROUPS: the broker answered, so it is not reported
    disconnected; the depth is left out and counted in depth_unknown."""
    from redis.asyncio import Redis
    from taskiq_redis import RedisStreamBroker

    real = Redis.xinfo_groups

    async def without_lag(self, name):
        return [{k: v for k, v in g.items() if k not in ("lag", "entries-read")} for g in await real(self, name)]

    monkeypatch.setattr(Redis, "xinfo_groups", without_lag)
    queue = f"q-nolag-{uuid.uuid4().hex[:6]}"
    loop = Loop()
    try:
        broker = RedisStreamBroker(redis_url, queue_name=queue, consumer_group_name="g")
        zt.install(broker, RecordingClient())
        mw = zt.installed(broker)
        mw.loop = loop.loop
        loop.run(broker.startup())
        source = _health.HealthSource(mw)
        report = source()["taskiq"]
        assert report["broker_connected"] is True and report["depth_failures"] == 0, report
        assert "queue_depths" not in report and report["depth_unknown"] == 1, report
        loop.run(broker.shutdown())
    finally:
        loop.stop()
