"""The arq integration against a real arq worker on a real redis-server:
events, commands, health (z4j_agentd.arq). Runs in .venv-alt (arq pins
redis < 6)."""

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref

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
    notes = [f for f in logging.getLogger("arq.worker").filters if isinstance(f, zarq._LogNotes)]
    assert notes == [zarq.installed().notes]
    assert not [h for h in logging.getLogger("arq.worker").handlers if isinstance(h, zarq._LogNotes)]
    zarq.uninstall()
    assert other == {"functions": [add]}
    assert not [f for f in logging.getLogger("arq.worker").filters if isinstance(f, zarq._LogNotes)]


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
        t0 = time.monotonic()
        with pytest.raises(_commands.CommandFailed) as err:
            handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 2.5})
        took = time.monotonic() - t0
        # Every step shares the command's budget (less 1 s): the answer comes within it, though the
        # job holds the worker's loop for 3 s.
        assert took < 2.5, took
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

        integration.commands.on_loop = lambda make, what, timeout=1.0, deadline=None: (
            _commands.ArqCommands.on_loop(integration.commands, failing, what, timeout, deadline))
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


# ---------------------------------------------------------------- arq's own log


_UNCONFIGURED = r'''
import asyncio, json, sys
sys.path.insert(0, sys.argv[2])
from arq.connections import RedisSettings, create_pool
from arq.worker import run_worker
import z4j_agentd.arq as zarq
from test_celery import RecordingClient


async def boom(ctx):
    raise ValueError("kaboom from the job")


class WorkerSettings:
    functions = [boom]
    redis_settings = RedisSettings(port=int(sys.argv[1]))
    burst = True
    poll_delay = 0.05


client = RecordingClient()
zarq.install(WorkerSettings, client, serve_commands=False)


async def enqueue():
    pool = await create_pool(WorkerSettings.redis_settings)
    await pool.enqueue_job("boom", _job_id="lr-boom")
    await pool.enqueue_job("missing", _job_id="lr-missing")
    await pool.aclose()


asyncio.run(enqueue())
run_worker(WorkerSettings)  # no logging configured: arq's errors go to Python's last resort
print(json.dumps([[e["kind"], e["task_id"], e["data"]] for e in client.emitted]))
'''


def test_with_no_logging_configured_arqs_own_errors_are_still_printed(redis_port):
    """A Worker run from code with no logging configured: Python prints arq's
    warnings and errors through its last resort only when no handler is on
    the logger's chain. The integration reads arq's log through a filter, so
    they are still printed, and the lines it reads still reach it."""
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True)
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _UNCONFIGURED, str(redis_port), tests], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # arq's own lines, as the last resort prints them (a traceback with the job's frame).
    assert "lr-boom:boom failed, ValueError: kaboom from the job" in out.stderr, out.stderr
    assert 'in boom\nValueError: kaboom from the job' in out.stderr, out.stderr
    assert "job lr-missing, function 'missing' not found" in out.stderr, out.stderr
    events = {(kind, task_id): data for kind, task_id, data in json.loads(out.stdout.strip().splitlines()[-1])}
    assert events[("task.failed", "lr-boom")]["exception"] == "ValueError"
    # Seen only in arq's log (a WARNING): the filter read it.
    assert events[("task.failed", "lr-missing")]["exception_message"].startswith("function 'missing' not found")


# ---------------------------------------------------------------- keep_result = 0, aborts by the app


@pytest.fixture
def info_logging(request):
    """arq's INFO lines on (as the `arq` CLI sets them) or left at Python's default (WARNING)."""
    logger = logging.getLogger("arq")
    level = logger.level
    if request.param:
        logger.setLevel(logging.INFO)
    yield request.param
    logger.setLevel(level)


def abort_from_the_app(port, job_id):
    """What an application does itself: arq's Job.abort (False when arq keeps no result)."""
    from arq.jobs import Job

    async def go():
        pool = await create_pool(RedisSettings(port=port))
        try:
            return await Job(job_id, pool).abort(timeout=10, poll_delay=0.05)
        finally:
            await pool.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("info_logging", [False, True], ids=["warning-logging", "info-logging"], indirect=True)
def test_ends_with_no_result_kept_and_aborts_by_the_app(settings, info_logging):
    """keep_result = 0 keeps no result to read an end back from: an abort is
    told by the job's CancelledError and its leaving the queue, a timeout by
    arq's ERROR line; with arq's INFO lines on, they say it too."""
    settings.functions = FUNCTIONS + [func(slow, name="slow0", keep_result=0),
                                      func(slow, name="short0", timeout=0.3, max_tries=1, keep_result=0),
                                      func(add, name="add0", keep_result=0)]
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    port = settings.redis_settings.port
    try:
        kept, unkept = enqueue(port, "slow", 30), enqueue(port, "slow0", 30)
        timed_out, done = enqueue(port, "short0", 5), enqueue(port, "add0", 1, 2)
        for job in (kept, unkept):
            wait_until(lambda: "task.started" in kinds_of(client, job), what=f"{job} to start")
        assert abort_from_the_app(port, kept) is True
        assert abort_from_the_app(port, unkept) is False  # arq cannot tell without a result
        for job, kind in ((kept, "task.revoked"), (unkept, "task.revoked"), (timed_out, "task.failed"),
                          (done, "task.succeeded")):
            wait_until(lambda: kind in kinds_of(client, job), what=f"{job} {kind}")
    finally:
        w.stop()
    for job in (kept, unkept):
        assert kinds_of(client, job) == ["task.received", "task.started", "task.revoked"]
        assert one(client, job, "task.revoked")["aborted"] is True
    assert kinds_of(client, timed_out) == ["task.received", "task.started", "task.failed"]
    assert one(client, timed_out, "task.failed")["exception"] == "TimeoutError"
    assert one(client, done, "task.succeeded")["result"] == 3
    assert zarq.installed().outcomes_unknown == 0


def test_cancel_of_a_job_whose_result_is_not_kept_says_it_aborted_it(settings):
    settings.functions = FUNCTIONS + [func(slow, name="slow0", keep_result=0)]
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "slow0", 30)
        wait_until(lambda: "task.started" in kinds_of(client, job))
        out = handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 20})
        assert out["aborted"] is True and out["state_before"] == "running", out
        wait_until(lambda: "task.revoked" in kinds_of(client, job))
        assert kinds_of(client, job) == ["task.received", "task.started", "task.revoked"]
    finally:
        w.stop()


# ---------------------------------------------------------------- cancel races


def test_a_cancel_racing_the_jobs_pickup_sends_one_end(settings):
    """The cancel read the job queued; the worker picked it up before the
    abort reached it, so arq aborted it running: one task.revoked (its
    after_job_end's), none saying it was aborted before it started."""
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    commands = zarq.installed().commands
    try:
        job = enqueue(settings.redis_settings.port, "slow", 30)
        wait_until(lambda: "task.started" in kinds_of(client, job))
        commands._status = lambda task_id, what, deadline=None: "queued"  # as read before the pickup
        out = handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 20})
        assert out["aborted"] is True and out["state_before"] == "queued", out
        wait_until(lambda: "task.revoked" in kinds_of(client, job))
    finally:
        w.stop()
    assert kinds_of(client, job) == ["task.received", "task.started", "task.revoked"]
    assert "reason" not in one(client, job, "task.revoked")


def test_cancel_of_a_job_that_just_timed_out_or_failed_says_how_it_ended(settings):
    """The cancel read the job running; it timed out (or failed) before the
    abort reached it. arq's Job.abort re-raises the stored exception: the
    answer says the job ended in failure, not that the abort timed out."""
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    commands = zarq.installed().commands
    port = settings.redis_settings.port
    try:
        late, bad = enqueue(port, "short", 5), enqueue(port, "boom")
        for job in (late, bad):
            wait_until(lambda: "task.failed" in kinds_of(client, job))
        commands._status = lambda task_id, what, deadline=None: "in_progress"  # as read before its end
        for job, name in ((late, "TimeoutError"), (bad, "ValueError")):
            t0 = time.monotonic()
            with pytest.raises(_commands.CommandFailed) as err:
                handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 20})
            assert "not aborted: it ended before the abort reached it" in str(err.value), err.value
            assert f"it ended in failure: {name}" in str(err.value), err.value
            assert time.monotonic() - t0 < 5  # bound against waiting out the abort
    finally:
        w.stop()
    assert "task.revoked" not in kinds_of(client, late) + kinds_of(client, bad)


# ---------------------------------------------------------------- memory


class _Big:
    """Stands for what a job holds: its arguments, result, locals."""


def test_a_job_whose_after_job_end_never_comes_keeps_no_arguments_results_or_tracebacks(settings):
    settings.max_jobs = 2
    client = RecordingClient()
    zarq.install(settings, client)
    integration = zarq.installed()
    refs = []

    async def fails(ctx, arg):
        local = _Big()  # held by the traceback's frame
        refs.append(weakref.ref(local))
        raise ValueError("nope")

    async def returns(ctx, arg):
        out = _Big()
        refs.append(weakref.ref(out))
        return out

    failing = integration._job("fails", fails)
    returning = integration._job("returns", returns)

    async def go():
        for n in range(100):
            arg = _Big()
            refs.append(weakref.ref(arg))
            try:
                await (failing if n % 2 else returning)({"job_id": f"j{n}", "job_try": 1}, arg)
            except ValueError:
                pass

    asyncio.run(go())
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    # Never ended (no after_job_end): kept up to a small multiple of max_jobs.
    assert len(integration.running) == zarq.MIN_RUNNING
    assert integration.running["j99"].traceback.startswith("Traceback") and "ValueError: nope" in (
        integration.running["j99"].traceback)


def test_a_timeout_with_no_result_kept_and_arqs_log_silenced_is_not_taken_for_an_abort(settings):
    """keep_result = 0 and arq's log above ERROR: a job arq cancelled at its
    timeout leaves nothing saying how it ended; it is counted unknown, never
    sent as revoked."""
    settings.functions = FUNCTIONS + [func(slow, name="short0", timeout=0.3, max_tries=1, keep_result=0)]
    logger = logging.getLogger("arq.worker")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    client = RecordingClient()
    zarq.install(settings, client)
    integration = zarq.installed()
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "short0", 5)
        wait_until(lambda: integration.outcomes_unknown == 1, what="the timed-out job's end")
    finally:
        w.stop()
        logger.setLevel(level)
    assert kinds_of(client, job) == ["task.received", "task.started"]
    assert integration.health.worker_details()["stats"]["outcomes_unknown"] == 1  # where an operator sees it


@pytest.mark.parametrize("info_logging", [False, True], ids=["warning-logging", "info-logging"], indirect=True)
def test_cancel_of_a_waiting_job_with_no_results_kept(settings, info_logging):
    """keep_result = 0 on the worker: a waiting job aborted before it starts
    leaves no result; arq's INFO line confirms it, and without it the
    cancel says it cannot tell instead of claiming either way."""
    settings.keep_result = 0
    client = RecordingClient()
    zarq.install(settings, client)
    w = WorkerThread(settings)
    try:
        job = enqueue(settings.redis_settings.port, "add", 1, 2, _defer_by=60)
        run = lambda: handler(client, "cancel_task")({"parameters": {"task_id": job}, "timeout_seconds": 20})  # noqa
        if info_logging:
            out = run()
            assert out["aborted"] is True and out["state_before"] == "deferred", out
        else:
            with pytest.raises(_commands.CommandFailed, match="keeps no result for it .* it cannot tell"):
                run()
    finally:
        w.stop()
    assert kinds_of(client, job) == (["task.revoked"] if info_logging else [])
