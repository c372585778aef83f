"""The arq integration against a real arq worker on a real redis-server:
events, commands, health (z4j_agentd.arq). Runs in .venv-alt (arq pins
redis < 6)."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

pytest.importorskip("arq")

from arq.connections import RedisSettings, create_pool  # noqa: E402
from arq.worker import Retry, Worker, func  # noqa: E402

import z4j_agentd.arq as zarq  # noqa: E402
from z4j_agentd.arq import _commands  # noqa: E402
from test_celery import RecordingClient  # noqa: E402


# ---------------------------------------------------------------- the app


async def add(ctx, x, y):
    return x + y


async def boom(ctx, password=None):
    raise ValueError(f"cannot connect to redis://app:{password}@db:6379")


async def flaky(ctx, n):
    if ctx["job_try"] < 3:
        raise Retry(defer=0.05)
    return n * 10


async def slow(ctx, seconds):
    await asyncio.sleep(seconds)
    return "slept"


async def sync_sleep(ctx, seconds):
    time.sleep(seconds)  # blocks the worker's loop: what arq cannot cancel
    return "blocked"


FUNCTIONS = [add, boom, flaky, slow, sync_sleep, func(slow, name="short", timeout=0.3, max_tries=1),
             func(flaky, name="flaky2", max_tries=2)]
NAMES = ["add", "boom", "flaky", "slow", "sync_sleep", "short", "flaky2"]


# ---------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="z4j-arq-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def settings(redis_port):
    """A fresh WorkerSettings class on an empty Redis database."""
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True)

    class WorkerSettings:
        functions = FUNCTIONS
        redis_settings = RedisSettings(port=redis_port)
        poll_delay = 0.05
        allow_abort_jobs = True
        max_jobs = 4

    yield WorkerSettings
    zarq.uninstall()


def enqueue(port, name, *args, **kwargs):
    async def go():
        pool = await create_pool(RedisSettings(port=port))
        try:
            job = await pool.enqueue_job(name, *args, **kwargs)
            return job.job_id
        finally:
            await pool.aclose()

    return asyncio.run(go())


class WorkerThread:
    """An arq Worker built from the settings (as `arq` builds it) running on
    a loop in a thread of its own."""

    def __init__(self, settings, **overrides):
        self.settings = settings
        self.overrides = overrides
        self.worker = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the worker did not start"
        integration = zarq.installed()
        if integration is not None:
            wait_until(lambda: integration.online, what="the worker's on_startup")

    def _run(self):
        from arq.worker import get_kwargs

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.worker = Worker(**{**get_kwargs(self.settings), "handle_signals": False, **self.overrides})
        self.loop = loop
        self.ready.set()
        try:
            loop.run_until_complete(self.worker.async_run())
        except asyncio.CancelledError:
            pass
        finally:
            loop.run_until_complete(self.worker.close())
            loop.close()

    def stop(self):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.worker.handle_sig, signal.SIGTERM)
        self.thread.join(10)
        assert not self.thread.is_alive()


def wait_until(check, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def events_of(client, task_id):
    return [e for e in client.emitted if e["task_id"] == task_id]


def kinds_of(client, task_id):
    return [e["kind"] for e in events_of(client, task_id)]


def one(client, task_id, kind):
    found = [e["data"] for e in events_of(client, task_id) if e["kind"] == kind]
    assert len(found) == 1, (kind, kinds_of(client, task_id))
    return found[0]


# ---------------------------------------------------------------- wiring


def test_install_chains_the_settings_own_hooks_once_even_when_installed_again(settings):
    calls = []

    async def startup(ctx):
        calls.append("startup")
        ctx["db"] = "connected"

    async def job_start(ctx):
        calls.append(("start", ctx["job_id"]))

    async def job_ended(ctx):
        calls.append(("ended", ctx["job_id"]))

    settings.on_startup = startup
    settings.on_job_start = job_start
    settings.after_job_end = staticmethod(job_ended)  # chained as the function it holds
    functions = settings.functions
    client = RecordingClient()
    assert zarq.install(settings, client) is client
    assert zarq.install(settings, client) is client  # no second wrapper
    zarq.uninstall()
    assert zarq.install(settings, client) is client  # nor after uninstall and again
    assert vars(settings)["on_startup"] is not startup
    assert vars(settings)["on_job_start"] is job_start  # a hook the integration does not need: as it was
    assert [f.name for f in settings.functions] == NAMES
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "add", 1, 2)
        wait_until(lambda: "task.succeeded" in kinds_of(client, job), what="add to succeed")
        wait_until(lambda: ("ended", job) in calls, what="the application's after_job_end")
    finally:
        w.stop()
    assert calls == ["startup", ("start", job), ("ended", job)]
    assert kinds_of(client, job) == ["task.received", "task.started", "task.succeeded"]
    zarq.uninstall()
    assert vars(settings)["on_startup"] is startup and vars(settings)["after_job_end"].__func__ is job_ended
    assert settings.functions is functions


def test_a_worker_built_by_hand_is_wired_too(settings):
    client = RecordingClient()
    holder = {}

    class Built(WorkerThread):
        def _run(self):
            from arq.worker import get_kwargs

            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.worker = Worker(**{**get_kwargs(self.settings), "handle_signals": False})
            zarq.install(self.worker, client, worker_name="built")
            holder["functions"] = dict(self.worker.functions)
            self.loop = loop
            self.ready.set()
            try:
                loop.run_until_complete(self.worker.async_run())
            except asyncio.CancelledError:
                pass
            finally:
                loop.run_until_complete(self.worker.close())
                loop.close()

    w = Built(settings)
    try:
        job = enqueue(settings.redis_settings.port, "add", 5, 6)
        wait_until(lambda: "task.succeeded" in kinds_of(client, job))
    finally:
        w.stop()
    assert one(client, job, "task.succeeded")["result"] == 11
    assert one(client, job, "task.started")["worker"] == "built"
    assert sorted(holder["functions"]) == sorted(NAMES)


def test_installing_other_settings_replaces_the_earlier_installation(settings):
    import logging

    other = {"functions": [add]}
    client = RecordingClient()
    zarq.install(settings, client)
    zarq.install(other, client)
    assert vars(settings)["functions"] is FUNCTIONS and "on_startup" not in vars(settings)
    assert other["functions"][0].coroutine is not add and zarq.installed().settings.target is other
    notes = [h for h in logging.getLogger("arq.worker").handlers if isinstance(h, zarq._LogNotes)]
    assert notes == [zarq.installed().notes]
    zarq.uninstall()
    assert other == {"functions": [add]}
    assert not [h for h in logging.getLogger("arq.worker").handlers if isinstance(h, zarq._LogNotes)]


def test_install_refuses_what_is_not_settings_a_worker_or_a_pool():
    with pytest.raises(TypeError, match="WorkerSettings class"):
        zarq.install("proj.WorkerSettings")
    with pytest.raises(ValueError, match="worker_name"):
        zarq.install({"functions": FUNCTIONS}, RecordingClient(), worker_name=" ")


# ---------------------------------------------------------------- events


def test_a_jobs_lifecycle_reaches_the_client_with_args_results_failures_and_retries(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    port = settings.redis_settings.port
    name = zarq.installed().worker_name
    try:
        ok = enqueue(port, "add", 2, 3)
        bad = enqueue(port, "boom", password="hunter2-secret")
        retried = enqueue(port, "flaky", 7)
        timed_out = enqueue(port, "short", 5)
        gave_up = enqueue(port, "flaky2", 1)
        unknown = enqueue(port, "nope", 1)
        for job, kind in ((ok, "task.succeeded"), (bad, "task.failed"), (retried, "task.succeeded"),
                          (timed_out, "task.failed"), (gave_up, "task.failed"), (unknown, "task.failed")):
            wait_until(lambda: kind in kinds_of(client, job), what=f"{job} {kind}")
    finally:
        w.stop()
    assert name == f"arq@{socket.gethostname()}:{os.getpid()}"

    assert kinds_of(client, ok) == ["task.received", "task.started", "task.succeeded"]
    received = one(client, ok, "task.received")
    assert received == {"task_name": "add", "queue": "arq:queue", "worker": name, "args": [2, 3], "kwargs": {},
                        "retry_count": 0}
    done = one(client, ok, "task.succeeded")
    assert done["result"] == 5 and done["worker"] == name and isinstance(done["runtime_ms"], int)

    assert kinds_of(client, bad) == ["task.received", "task.started", "task.failed"]
    assert one(client, bad, "task.started")["kwargs"] == {"password": "[REDACTED]"}
    failed = one(client, bad, "task.failed")
    assert failed["exception"] == "ValueError"
    assert "hunter2" not in failed["exception_message"] and "[REDACTED]" in failed["exception_message"]
    # The traceback arq logged, with the job's own frame, scrubbed too.
    assert "in boom" in failed["traceback"] and "raise ValueError" in failed["traceback"]
    assert "hunter2" not in failed["traceback"]

    assert kinds_of(client, retried) == ["task.received", "task.started", "task.retried", "task.started",
                                         "task.retried", "task.started", "task.succeeded"]
    retries = [e["data"] for e in events_of(client, retried) if e["kind"] == "task.retried"]
    assert [r["retry_count"] for r in retries] == [1, 2]
    assert retries[0]["reason"].startswith("Retry: again in")
    starts = [e["data"]["retry_count"] for e in events_of(client, retried) if e["kind"] == "task.started"]
    assert starts == [0, 1, 2]
    assert one(client, retried, "task.succeeded")["result"] == 70

    # Past its timeout arq cancels the job and fails it with TimeoutError (arq's log has the traceback).
    assert kinds_of(client, timed_out) == ["task.received", "task.started", "task.failed"]
    late = one(client, timed_out, "task.failed")
    assert late["exception"] == "TimeoutError" and "TimeoutError" in late["traceback"], late
    assert 250 <= late["runtime_ms"] < 5000, late

    # Ends arq decides without calling the function: only its log says so.
    assert kinds_of(client, gave_up) == ["task.received", "task.started", "task.retried", "task.started",
                                         "task.retried", "task.failed"]
    assert one(client, gave_up, "task.failed") == {
        "task_name": "flaky2", "queue": "arq:queue", "worker": name, "exception": "JobExecutionFailed",
        "exception_message": "max 2 retries exceeded"}
    assert kinds_of(client, unknown) == ["task.failed"]
    assert one(client, unknown, "task.failed")["exception_message"] == (
        f"function 'nope' not found on worker {name}")

    online = [e["data"] for e in client.emitted if e["kind"] == "worker.online"]
    offline = [e["data"] for e in client.emitted if e["kind"] == "worker.offline"]
    assert len(online) == 1 and len(offline) == 1
    assert online[0]["worker"] == offline[0]["worker"] == name
    assert online[0]["concurrency"] == 4 and online[0]["queues"] == ["arq:queue"] and online[0]["pool"] == "arq"
    assert client.served_workers == [name]


def test_a_dict_of_settings_is_wired_too(redis_port):
    client = RecordingClient()
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True)
    conf = {"functions": FUNCTIONS, "redis_settings": RedisSettings(port=redis_port), "poll_delay": 0.05,
            "queue_name": "arq:other"}
    try:
        zarq.install(conf, client, serve_commands=False, worker_name="mail-worker")
        w = WorkerThread(conf)
        try:
            job = enqueue(redis_port, "add", 1, 1, _queue_name="arq:other")
            wait_until(lambda: "task.succeeded" in kinds_of(client, job))
        finally:
            w.stop()
    finally:
        zarq.uninstall()
    assert one(client, job, "task.started")["queue"] == "arq:other"
    assert one(client, job, "task.started")["worker"] == "mail-worker"
    assert client.served == []  # serve_commands=False


def test_a_producer_pool_sends_task_received_with_the_arguments(redis_port):
    client = RecordingClient()

    async def go():
        pool = await create_pool(RedisSettings(port=redis_port))
        try:
            assert zarq.install(pool, client) is client
            zarq.install(pool, client)  # once only
            job = await pool.enqueue_job("add", 4, y=5, token="abc", _queue_name="arq:q2", _job_id="p-1")
            again = await pool.enqueue_job("add", 4, _job_id="p-1")  # exists: nothing enqueued, no event
            return job.job_id, again
        finally:
            await pool.aclose()

    job_id, again = asyncio.run(go())
    assert again is None
    assert client.emitted == [{"engine": "arq", "kind": "task.received", "task_id": "p-1", "data": {
        "task_name": "add", "queue": "arq:q2", "args": [4], "kwargs": {"y": 5, "token": "[REDACTED]"}}}]


# ---------------------------------------------------------------- commands


def handler(client, action):
    return client.served[0][0][("arq", action)]


def test_cancel_aborts_a_running_async_job_and_the_worker_goes_on(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    port = settings.redis_settings.port
    try:
        job = enqueue(port, "slow", 30)
        wait_until(lambda: "task.started" in kinds_of(client, job))
        t0 = time.monotonic()
        out = handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 20})
        took = time.monotonic() - t0
        assert out == {"task_id": job, "worker": zarq.installed().worker_name, "state_before": "running",
                       "aborted": True}
        assert took < 5, took  # bound against a hang, not a speed target
        wait_until(lambda: "task.revoked" in kinds_of(client, job))
        assert one(client, job, "task.revoked")["aborted"] is True
        assert "task.failed" not in kinds_of(client, job)
        # Cancelling it again: it is over, and arq says it ended aborted.
        again = handler(client, "cancel_task")({"parameters": {"task_id": job}})
        assert again["aborted"] is True and again["state_before"] == "finished"
        after = enqueue(port, "add", 1, 1)
        wait_until(lambda: "task.succeeded" in kinds_of(client, after))
        with pytest.raises(_commands.CommandFailed, match="has no job nope"):
            handler(client, "cancel_task")({"target": {"type": "task", "id": "arq:nope"}})
    finally:
        w.stop()


def test_cancel_of_a_job_blocked_in_sync_code_says_it_could_not_stop_it(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "sync_sleep", 3)
        wait_until(lambda: "task.started" in kinds_of(client, job))
        with pytest.raises(_commands.CommandFailed) as err:
            handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 2.5})
        text = str(err.value)
        # Either the loop was still blocked when the budget ran out, or the abort ran after the job's end.
        assert "sync code" in text and ("not aborted" in text or "did not finish it" in text), text
        wait_until(lambda: "task.succeeded" in kinds_of(client, job))  # it ran to its end
    finally:
        w.stop()


def test_cancel_without_allow_abort_jobs_fails_at_once_saying_how_to_turn_it_on(settings):
    settings.allow_abort_jobs = False
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    try:
        t0 = time.monotonic()
        with pytest.raises(_commands.CommandFailed, match="allow_abort_jobs = True in its WorkerSettings"):
            handler(client, "cancel_task")({"parameters": {"task_id": "any"}})
        assert time.monotonic() - t0 < 1
    finally:
        w.stop()


def test_submit_retry_and_reconcile(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    port = settings.redis_settings.port
    run = lambda action, params: handler(client, action)({"parameters": params})  # noqa: E731
    try:
        out = run("submit_task", {"name": "add", "args": [20, 22], "kwargs": {}, "priority": "normal"})
        job = out["task_id"]
        assert out["queue"] == "arq:queue" and out["engine"] == "arq"
        wait_until(lambda: "task.succeeded" in kinds_of(client, job))
        assert one(client, job, "task.succeeded")["result"] == 42
        with pytest.raises(_commands.BadCommand, match="has no function 'nope'"):
            run("submit_task", {"name": "nope"})
        with pytest.raises(_commands.BadCommand, match="no job priorities"):
            run("submit_task", {"name": "add", "priority": 9})

        again = run("retry_task", {"task_id": job})
        assert again["task_id"] == job and again["task_name"] == "add" and again["new_task_id"] != job
        wait_until(lambda: "task.succeeded" in kinds_of(client, again["new_task_id"]))
        assert one(client, again["new_task_id"], "task.started")["args"] == [20, 22]
        over = run("retry_task", {"task_id": job, "override_args": [1, 2], "override_kwargs": {}})
        wait_until(lambda: "task.succeeded" in kinds_of(client, over["new_task_id"]))
        assert one(client, over["new_task_id"], "task.succeeded")["result"] == 3

        assert run("reconcile_task", {"task_id": job})["engine_state"] == "success"
        bad = enqueue(port, "boom")
        wait_until(lambda: "task.failed" in kinds_of(client, bad))
        rec = run("reconcile_task", {"task_id": bad})
        assert rec["engine_state"] == "failure" and rec["exception"].startswith("ValueError")
        assert rec["finished_at"]
        slow_job = enqueue(port, "slow", 30)
        wait_until(lambda: "task.started" in kinds_of(client, slow_job))
        assert run("reconcile_task", {"task_id": slow_job})["engine_state"] == "started"
        assert run("reconcile_task", {"task_id": "missing"})["engine_state"] == "unknown"
        run("cancel_task", {"task_id": slow_job})
    finally:
        w.stop()
    assert client.served[0][1] == {"arq": ["retry_by_reference_v1"]}
    assert sorted(a for _, a in client.served[0][0]) == sorted(_commands.ACTIONS)


def test_a_command_error_quoting_a_redis_url_keeps_no_password(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    integration = zarq.installed()
    integration.loop = asyncio.new_event_loop()
    integration.redis = object()
    thread = threading.Thread(target=integration.loop.run_forever, daemon=True)
    thread.start()
    try:
        def failing(redis):
            async def go():
                raise ConnectionError("cannot reach redis://app:s3cr3t-pw@cache:6379/0")
            return go()

        integration.commands.on_loop = lambda make, what, timeout=1.0: _commands.ArqCommands.on_loop(
            integration.commands, failing, what, timeout)
        with pytest.raises(_commands.CommandFailed) as err:
            integration.commands.handlers()[("arq", "reconcile_task")]({"parameters": {"task_id": "x"}})
        assert "s3cr3t" not in str(err.value) and "redis://app:[REDACTED]@cache" in str(err.value)
    finally:
        integration.loop.call_soon_threadsafe(integration.loop.stop)
        thread.join(5)


def test_a_deferred_job_cancelled_before_it_starts_is_revoked(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "add", 1, 2, _defer_by=60)
        out = handler(client, "cancel_task")({"parameters": {"task_id": job}})
        assert out["aborted"] is True and out["state_before"] == "deferred"
        wait_until(lambda: "task.revoked" in kinds_of(client, job))
        assert "task.started" not in kinds_of(client, job)
    finally:
        w.stop()


# ---------------------------------------------------------------- health


def test_health_reports_the_queue_depth_and_the_worker(settings):
    client = RecordingClient()
    zarq.install(settings, client)
    port = settings.redis_settings.port
    for _ in range(3):
        enqueue(port, "add", 1, 1, _defer_by=60)
    w = WorkerThread(settings)
    try:
        job = enqueue(port, "slow", 30)
        wait_until(lambda: "task.started" in kinds_of(client, job))
        integration = zarq.installed()
        report = integration.health()["arq"]
        assert report["queue_depths"] == {"arq:queue": 4}  # 3 deferred + the running one
        assert report["broker_connected"] is True
        worker = report["workers"][integration.worker_name]
        assert worker["stats"]["pool"] == {"implementation": "arq", "max-concurrency": 4}
        assert worker["stats"]["pid"] == os.getpid()
        assert worker["active"] == [{"id": job, "name": "slow", "job_try": 1}]
        assert worker["active_queues"] == [{"name": "arq:queue"}]
        assert worker["registered"] == sorted(NAMES)
        heartbeats = [e for e in client.emitted if e["kind"] == "worker.heartbeat"]
        assert heartbeats and heartbeats[0]["data"]["worker"] == integration.worker_name
        handler(client, "cancel_task")({"parameters": {"task_id": job}})
    finally:
        w.stop()
