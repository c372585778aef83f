"""The RQ integration (z4j_agentd.rq) against a real RQ 3 on a throwaway
redis-server (a Unix socket in a temporary directory): events from the
worker's main process around execute_job (SimpleWorker in this process, the
forking Worker with a real work horse), the commands (cancel stopping a job
running in an `rq worker -w z4j_agentd.rq.Worker` subprocess), health, and
install()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

rq = pytest.importorskip("rq")
redis = pytest.importorskip("redis")

import z4j_agentd.rq as zrq  # noqa: E402
from z4j_agentd.rq import _commands, _health  # noqa: E402
from test_celery import RecordingClient  # noqa: E402
from redis_server import unix_redis

HERE = os.path.dirname(os.path.abspath(__file__))
RQ_VERSION = tuple(int(p) for p in rq.__version__.split(".")[:2])


def spawn_worker_or_skip(cls_name="SpawnWorker"):
    if cls_name == "SpawnWorker" and getattr(zrq, cls_name) is not None and RQ_VERSION < (3, 0):
        # RQ 2's SpawnWorker rebuilds its Redis connection in the work horse from the repr of
        # the connection's arguments, which redis-py 6+ does not make valid Python.
        pytest.skip("RQ 2's SpawnWorker cannot start a work horse with this redis-py")
    if getattr(zrq, cls_name) is None:
        pytest.skip(f"this RQ has no {cls_name}")


@pytest.fixture(scope="module")
def redis_sock():
    with unix_redis() as sock:
        yield sock


@pytest.fixture
def conn(redis_sock):
    c = redis.Redis(unix_socket_path=redis_sock)
    c.flushall()
    yield c
    c.close()


def queue(conn, name="default"):
    return rq.Queue(name, connection=conn)


def without_pubsub(worker):
    """A burst worker here takes no RQ commands: without its pubsub thread, whose stop at the
    end of work() can wait up to 60 s for a subscription redis-py has not confirmed yet."""
    worker.subscribe = lambda: None
    worker.unsubscribe = lambda: None
    return worker


def run_burst(worker_cls, conn, client, queues=("default",), name=None):
    worker = worker_cls([queue(conn, q) for q in queues], connection=conn, name=name or f"w-{uuid.uuid4().hex[:6]}")
    worker.z4j_client = client
    worker.z4j_serve_commands = False
    without_pubsub(worker).work(burst=True, logging_level="WARNING")
    return worker


def events(client, job_id, kind=None):
    return [e for e in client.emitted if e["task_id"] == job_id and (kind is None or e["kind"] == kind)]


# ---------------------------------------------------------------- events


@pytest.mark.parametrize("cls_name", ["SimpleWorker", "Worker", "SpawnWorker"])
def test_lifecycle_events_with_args_results_and_errors(conn, cls_name, monkeypatch):
    spawn_worker_or_skip(cls_name)
    # a spawned work horse imports rq_tasks
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    client = RecordingClient()
    q = queue(conn)
    ok = q.enqueue("rq_tasks.add", 2, 3, password="hunter2")
    bad = q.enqueue("rq_tasks.boom", "bad thing")
    worker = run_burst(getattr(zrq, cls_name), conn, client, name=f"w-{cls_name}")
    name = worker.name

    kinds = [e["kind"] for e in events(client, ok.id)]
    assert kinds == ["task.received", "task.started", "task.succeeded"], client.emitted
    received, started, succeeded = events(client, ok.id)
    assert received["data"] == {"task_name": "rq_tasks.add", "queue": "default", "worker": name,
                                "args": [2, 3], "kwargs": {"password": "[REDACTED]"}}
    assert started["data"]["args"] == [2, 3] and started["data"]["kwargs"] == {"password": "[REDACTED]"}
    assert succeeded["data"]["result"] == {"sum": 5, "token": "[REDACTED]"}
    assert isinstance(succeeded["data"]["runtime_ms"], int) and 0 <= succeeded["data"]["runtime_ms"] < 10000

    assert [e["kind"] for e in events(client, bad.id)] == ["task.received", "task.started", "task.failed"]
    failed = events(client, bad.id, "task.failed")[0]["data"]
    assert failed["exception"] == "ValueError" and failed["exception_message"] == "bad thing", failed
    assert "Traceback" in failed["traceback"] and "rq_tasks.py" in failed["traceback"], failed
    assert failed["worker"] == name and isinstance(failed["runtime_ms"], int)

    online = [e for e in client.emitted if e["kind"] == "worker.online"]
    offline = [e for e in client.emitted if e["kind"] == "worker.offline"]
    assert len(online) == 1 and len(offline) == 1
    assert online[0]["data"]["worker"] == name and online[0]["data"]["pid"] == os.getpid()
    assert online[0]["data"]["concurrency"] == 1 and online[0]["data"]["queues"] == ["default"]
    assert online[0]["data"]["pool"] == f"z4j_agentd.rq:{cls_name}"
    assert offline[0]["data"] == {"worker": name, "hostname": online[0]["data"]["hostname"], "pid": os.getpid()}
    assert client.kinds()[0] == "worker.online" and client.kinds()[-1] == "worker.offline"


@pytest.mark.parametrize("cls_name", ["SimpleWorker", "Worker", "SpawnWorker"])
def test_retries_are_counted_with_each_attempts_traceback(conn, cls_name, monkeypatch):
    spawn_worker_or_skip(cls_name)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    """Retry(max=2): retried (1), retried (2), then failed; each retried
    event carries the traceback the work horse handed over."""
    client = RecordingClient()
    job = queue(conn).enqueue("rq_tasks.boom", "attempt failed", retry=rq.Retry(max=2))
    run_burst(getattr(zrq, cls_name), conn, client)
    kinds = [e["kind"] for e in events(client, job.id)]
    assert kinds == ["task.received", "task.started", "task.retried"] * 2 + \
        ["task.received", "task.started", "task.failed"], kinds
    retried = [e["data"] for e in events(client, job.id, "task.retried")]
    assert [r["retry_count"] for r in retried] == [1, 2]
    for r in retried:
        assert r["exception"] == "ValueError" and "attempt failed" in r["reason"], r
        assert "Traceback" in r["traceback"], r
    assert conn.keys("z4j:rq:retry-traceback:*") == []  # handed over and gone
    # The initial max is a field of the job's hash: the job's meta is not touched.
    assert conn.hget(job.key, zrq.RETRY_MAX_FIELD) == b"2"
    assert rq.job.Job.fetch(job.id, connection=conn).meta == {}


def test_returned_retry_and_dependencies(conn):
    client = RecordingClient()
    q = queue(conn)
    first = q.enqueue("rq_tasks.add", 1, 1)
    second = q.enqueue("rq_tasks.add", 2, 2, depends_on=first)
    again = q.enqueue("rq_tasks.returns_retry")
    run_burst(zrq.SimpleWorker, conn, client)
    received = events(client, second.id, "task.received")[0]["data"]
    assert received["parent_task_id"] == first.id and received["depends_on"] == [first.id]
    if RQ_VERSION < (2, 3):
        return  # a job returning rq.Retry: RQ 2.3 on
    kinds = [e["kind"] for e in events(client, again.id)]
    assert kinds == ["task.received", "task.started", "task.retried",
                     "task.received", "task.started", "task.failed"], kinds
    assert events(client, again.id, "task.retried")[0]["data"]["retry_count"] == 1
    assert events(client, again.id, "task.failed")[0]["data"]["exception"] == "MaxRetriesExceeded"


def test_helpers_read_rq_tracebacks():
    text = "Traceback (most recent call last):\n  File \"x\", line 1\nmyapp.errors.PaymentError: card https://u:pw@h declined"
    assert zrq.exception_of(text) == ("PaymentError", "card https://u:[REDACTED]@h declined")
    assert zrq.exception_of("Job stopped by user, work-horse terminated.") == \
        (None, "Job stopped by user, work-horse terminated.")
    assert zrq.exception_of("") == (None, None)
    long = "x" * 10000
    assert len(zrq.cut_text(long)) <= zrq.MAX_TRACEBACK_CHARS


# ---------------------------------------------------------------- install


def test_install_wires_a_worker_built_by_the_program(conn):
    client = RecordingClient()
    worker = rq.SimpleWorker([queue(conn)], connection=conn, name="built")
    assert zrq.install(worker, client, serve_commands=False) is client
    assert isinstance(worker, zrq.WorkerMixin) and isinstance(worker, rq.SimpleWorker)
    assert "rq" in client.engines
    job = queue(conn).enqueue("rq_tasks.add", 1, 2)
    without_pubsub(worker).work(burst=True, logging_level="WARNING")
    assert [e["kind"] for e in events(client, job.id)] == ["task.received", "task.started", "task.succeeded"]

    class Custom(rq.Worker):
        pass

    custom = Custom([queue(conn)], connection=conn, name="custom")
    zrq.install(custom, client)
    assert type(custom).__mro__[1:3] == (zrq.WorkerMixin, Custom)

    producer = RecordingClient()
    assert zrq.install(conn, producer) is producer and producer.engines == ["rq"]
    assert producer.served == [] and producer.emitted == []


def test_install_refuses_a_started_worker(conn):
    worker = rq.SimpleWorker([queue(conn)], connection=conn, name="late")
    worker.register_birth()
    try:
        with pytest.raises(ValueError, match="already started"):
            zrq.install(worker, RecordingClient())
    finally:
        worker.register_death()


def test_the_main_process_serves_commands_and_names_its_worker(conn):
    client = RecordingClient()
    worker = zrq.SimpleWorker([queue(conn)], connection=conn, name="serving")
    worker.z4j_client = client
    worker.register_birth()
    try:
        handlers, caps = client.served[0]
        assert sorted(a for _, a in handlers) == sorted(_commands.ACTIONS)
        assert caps == {"rq": ["list_dead_letters", "retry_by_reference_v1"]}
        assert client.served_workers == ["serving"]
    finally:
        worker.register_death()


# ---------------------------------------------------------------- commands


def commands_for(conn, client=None, name="probe"):
    worker = zrq.Worker([queue(conn)], connection=conn, name=name)
    hooks = zrq._Hooks(worker, client or RecordingClient(), True)
    return _commands.RqCommands(hooks), hooks.bound_client


def cmd(action, **params):
    return {"id": "c1", "action": action, "target": {}, "parameters": params}


def test_reconcile_compares_status_by_value(conn):
    """z4j-rq's str(JobStatus) bug made every state "unknown"."""
    client = RecordingClient()
    q = queue(conn)
    done, bad, waiting = q.enqueue("rq_tasks.add", 1, 2), q.enqueue("rq_tasks.boom"), None
    run_burst(zrq.SimpleWorker, conn, client)
    waiting = q.enqueue("rq_tasks.add", 3, 4)
    c, _ = commands_for(conn)
    assert c.reconcile_task(cmd("reconcile_task", task_id=done.id))["engine_state"] == "success"
    failed = c.reconcile_task(cmd("reconcile_task", task_id=bad.id))
    assert failed["engine_state"] == "failure" and "ValueError" in failed["exception"], failed
    assert c.reconcile_task(cmd("reconcile_task", task_id=waiting.id))["engine_state"] == "pending"
    assert c.reconcile_task(cmd("reconcile_task", task_id="nope"))["engine_state"] == "unknown"


def test_cancel_of_a_queued_job_cancels_it_before_it_runs(conn):
    c, client = commands_for(conn)
    job = queue(conn).enqueue("rq_tasks.add", 1, 2)
    out = c.cancel_task(cmd("cancel_task", task_id=job.id))
    assert out == {"task_id": job.id, "state_before": "queued", "cancelled": True, "stopped": False,
                   "status": "canceled"}
    assert queue(conn).count == 0
    assert [e["kind"] for e in client.emitted] == ["task.revoked"]
    # This worker only served the command: it never had the job.
    assert "worker" not in client.emitted[0]["data"], client.emitted[0]
    again = c.cancel_task(cmd("cancel_task", task_id=job.id))
    assert again["cancelled"] is False and again["state_before"] == "canceled"


def start_cli_worker(redis_sock, cls, name):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
               Z4J_AGENTD_SOCKET="/nonexistent/z4j.sock")
    return subprocess.Popen([sys.executable, "-m", "rq.cli", "worker", "-u", f"unix://{redis_sock}", "-w", cls,
                             "-n", name, "default"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_started(conn, job, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while _commands.status_of(job) != "started":
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_cancel_stops_a_job_running_in_a_forking_worker(conn, redis_sock):
    proc = start_cli_worker(redis_sock, "z4j_agentd.rq.Worker", "forker")
    try:
        job = queue(conn).enqueue("rq_tasks.sleepy", 30)
        wait_started(conn, job, proc)
        c, _ = commands_for(conn)
        began = time.monotonic()
        out = c.cancel_task(cmd("cancel_task", task_id=job.id))
        assert out["stopped"] is True and out["status"] == "stopped" and out["worker"] == "forker", out
        assert time.monotonic() - began < 5
        assert job.id in rq.registry.FailedJobRegistry("default", connection=conn)
        # stopped: retry_task requeues it from the failed registry
        again = c.retry_task(cmd("retry_task", task_id=job.id))
        assert again["requeued"] is True and again["new_task_id"] == job.id
        wait_started(conn, job, proc)
        c.cancel_task(cmd("cancel_task", task_id=job.id))
    finally:
        stop(proc)


def test_cancel_says_when_a_simple_worker_cannot_stop_a_job(conn, redis_sock, monkeypatch):
    monkeypatch.setattr(_commands, "STOP_WAIT", 3.0)
    proc = start_cli_worker(redis_sock, "z4j_agentd.rq.SimpleWorker", "simple")
    try:
        job = queue(conn).enqueue("rq_tasks.sleepy", 3)
        wait_started(conn, job, proc)
        # The worker noted its class in its RQ hash.
        assert conn.hmget("rq:worker:simple", _commands.WORKER_POOL_FIELD, _commands.WORKER_CAN_STOP_FIELD) == \
            [b"z4j_agentd.rq:SimpleWorker", b"0"]
        c, _ = commands_for(conn)
        sent = []
        monkeypatch.setattr("rq.command.send_stop_job_command", lambda *a, **k: sent.append(a))
        began = time.monotonic()
        with pytest.raises(_commands.CommandFailed, match="SimpleWorker.*nothing was sent"):
            c.cancel_task(cmd("cancel_task", task_id=job.id))
        # Refused before sending RQ's stop-job command, which would mark that worker's
        # _stopped_job_id (a later failure of the job would then read as stopped).
        assert sent == [] and time.monotonic() - began < 2.0
        assert _commands.status_of(job) == "started"
    finally:
        stop(proc)
    # In the SimpleWorker's own process the command says so at once.
    worker = zrq.SimpleWorker([queue(conn)], connection=conn, name="simple")
    hooks = zrq._Hooks(worker, RecordingClient(), True)
    running = queue(conn).enqueue("rq_tasks.sleepy", 1)
    running.set_status(rq.job.JobStatus.STARTED)
    running.worker_name = "simple"
    running.save()
    with pytest.raises(_commands.CommandFailed, match="cannot stop"):
        _commands.RqCommands(hooks).cancel_task(cmd("cancel_task", task_id=running.id))


def test_cancel_in_the_dequeue_gap_stops_the_job(conn, redis_sock):
    """A SpawnWorker takes the job from its queue and marks it started only
    once its spawned work horse runs: a cancel in between used to answer
    cancelled while the job then ran to its end."""
    spawn_worker_or_skip()
    proc = start_cli_worker(redis_sock, "z4j_agentd.rq.SpawnWorker", "spawner")
    try:
        deadline = time.monotonic() + 15
        while not conn.exists("rq:worker:spawner"):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.02)
        q = queue(conn)
        job = q.enqueue("rq_tasks.sleepy", 4)
        while conn.llen(q.key):
            assert time.monotonic() < deadline, "the worker did not take the job"
            time.sleep(0.001)
        assert _commands.status_of(job) == "queued"  # taken, not started yet: the gap
        c, client = commands_for(conn)
        out = c.cancel_task(cmd("cancel_task", task_id=job.id))
        assert out["stopped"] is True and out["status"] == "stopped" and out["worker"] == "spawner", out
        assert "just taken" in out["detail"]
        assert client.emitted == []  # the worker reports the stop, not the command
        time.sleep(0.2)
        assert _commands.status_of(job) == "stopped"
    finally:
        stop(proc)


def test_cancel_of_a_queued_job_a_worker_holds_or_lost(conn, monkeypatch):
    monkeypatch.setattr(_commands, "STOP_WAIT", 0.3)
    q = queue(conn)
    c, client = commands_for(conn)
    # Taken by a worker (in the queue's intermediate list) that never starts it: refused.
    held = q.enqueue("rq_tasks.add", 1, 2)
    conn.lmove(q.key, q.intermediate_queue_key)
    with pytest.raises(_commands.CommandFailed, match="has not started it"):
        c.cancel_task(cmd("cancel_task", task_id=held.id))
    assert _commands.status_of(held) == "queued" and client.emitted == []
    # Queued but in no list at all: nothing will run it, so it is cancelled.
    conn.delete(q.intermediate_queue_key)
    out = c.cancel_task(cmd("cancel_task", task_id=held.id))
    assert out["cancelled"] is True and out["status"] == "canceled", out


def test_cancel_watches_the_status_of_a_waiting_job(conn, monkeypatch):
    """The status read before the cancel is checked again in its transaction."""
    q = queue(conn)
    first = q.enqueue("rq_tasks.add", 1, 2)
    deferred = q.enqueue("rq_tasks.add", 3, 4, depends_on=first)
    assert _commands.status_of(deferred) == "deferred"
    c, _ = commands_for(conn)
    real = _commands.status_of
    calls = []

    def moving(job):
        state = real(job)
        calls.append(state)
        if len(calls) == 1:  # it becomes queued right after the first read
            conn.hset(job.key, "status", "queued")
            conn.rpush(q.key, job.id)
        return state

    monkeypatch.setattr(_commands, "status_of", moving)
    out = c.cancel_task(cmd("cancel_task", task_id=deferred.id))
    assert out["state_before"] == "queued" and out["cancelled"] is True, out
    assert deferred.id not in q.job_ids and real(deferred) == "canceled"


def test_retry_of_a_waiting_job_is_refused(conn):
    """A queued, deferred or scheduled job has not run: a copy would run it twice."""
    q = queue(conn)
    first = q.enqueue("rq_tasks.add", 1, 2)
    deferred = q.enqueue("rq_tasks.add", 3, 4, depends_on=first)
    scheduled = q.enqueue_in(__import__("datetime").timedelta(hours=1), "rq_tasks.add", 5, 6)
    c, _ = commands_for(conn)
    for job in (first, deferred, scheduled):
        with pytest.raises(_commands.CommandFailed, match="has not run yet"):
            c.retry_task(cmd("retry_task", task_id=job.id))
        with pytest.raises(_commands.CommandFailed, match="has not run yet"):
            c.retry_task(cmd("retry_task", task_id=job.id, override_args=[9, 9]))
    with pytest.raises(_commands.CommandFailed, match="retried none"):
        c.bulk_retry(cmd("bulk_retry", filter={"task_ids": [first.id, deferred.id]}))
    assert q.job_ids == [first.id] and len([k for k in conn.keys("rq:job:*") if k.count(b":") == 2]) == 3


def test_retry_requeue_dead_letters_and_bulk_retry(conn):
    client = RecordingClient()
    q = queue(conn)
    bad1, bad2 = q.enqueue("rq_tasks.boom", "one"), q.enqueue("rq_tasks.boom", "two")
    good = q.enqueue("rq_tasks.add", 5, 6)
    run_burst(zrq.SimpleWorker, conn, client)
    c, _ = commands_for(conn)

    page = c.dlq_list(cmd("dlq.list", queue=None, limit=1, cursor=None))
    assert page["total"] == 2 and len(page["entries"]) == 1 and page["next_cursor"] == "1", page
    rest = c.dlq_list(cmd("dlq.list", queue="default", limit=10, cursor="1"))
    entries = page["entries"] + rest["entries"]
    assert rest["next_cursor"] is None and {e["task_id"] for e in entries} == {bad1.id, bad2.id}
    for e in entries:
        assert e["task_name"] == "rq_tasks.boom" and e["queue"] == "default" and e["failed_at"]
        assert "ValueError" in e["error_excerpt"] and len(e["error_excerpt"]) <= 512
    with pytest.raises(_commands.BadCommand, match="invalid dead-letter cursor"):
        c.dlq_list(cmd("dlq.list", cursor="x"))

    # a finished job: a copy with its own args; overrides; the failed one requeued as it is
    copy = c.retry_task(cmd("retry_task", task_id=good.id))
    assert copy["requeued"] is False and copy["new_task_id"] != good.id
    new = rq.job.Job.fetch(copy["new_task_id"], connection=conn)
    assert new.func_name == "rq_tasks.add" and (new.args == [5, 6] or new.args == (5, 6))
    over = c.retry_task(cmd("retry_task", task_id=bad1.id, override_args=["changed"], priority="high"))
    assert rq.job.Job.fetch(over["new_task_id"], connection=conn).args in (["changed"], ("changed",))
    assert q.job_ids[0] == over["new_task_id"]  # high: at the front
    assert c.requeue_dead_letter(cmd("requeue_dead_letter", task_id=bad1.id))["requeued"] is True
    with pytest.raises(_commands.CommandFailed, match="not in the failed registry"):
        c.requeue_dead_letter(cmd("requeue_dead_letter", task_id=bad1.id))
    bulk = c.bulk_retry(cmd("bulk_retry", filter={"engine": "rq", "task_ids": [bad2.id, "missing"]}))
    assert bulk["succeeded"] == 1 and bulk["new_task_ids"] == {bad2.id: bad2.id} and "missing" in bulk["failures"]
    assert _commands.status_of(bad2) == "queued"


def test_purge_submit_and_bad_parameters(conn):
    c, _ = commands_for(conn)
    q = queue(conn, "bulk")
    for i in range(3):
        q.enqueue("rq_tasks.add", i, i)
    with pytest.raises(_commands.BadCommand, match="not confirmed"):
        c.purge_queue(cmd("purge_queue", queue="bulk"))
    with pytest.raises(_commands.CommandFailed, match="holds 3 jobs now, the purge was confirmed at 2"):
        c.purge_queue(cmd("purge_queue", queue="bulk", expected_depth=2))
    assert q.count == 3
    out = c.purge_queue(cmd("purge_queue", queue="bulk", expected_depth=3))
    assert out == {"queue": "bulk", "depth_before": 3, "purged": 3, "force": False} and q.count == 0
    assert conn.keys("rq:job:*") == []  # the jobs' hashes went with them

    sub = c.submit_task(cmd("submit_task", name="rq_tasks.add", args=[1], kwargs={"y": 2}, queue="subq"))
    job = rq.job.Job.fetch(sub["task_id"], connection=conn)
    assert job.origin == "subq" and job.kwargs == {"y": 2} and sub["engine"] == "rq"
    with pytest.raises(_commands.BadCommand, match="args must be a list"):
        c.submit_task(cmd("submit_task", name="rq_tasks.add", args="x"))
    with pytest.raises(_commands.BadCommand, match="task_id"):
        c.cancel_task(cmd("cancel_task"))
    with pytest.raises(_commands.BadCommand, match="Redis has no such job"):
        c.retry_task(cmd("retry_task", task_id="gone"))


def test_purge_racing_an_enqueue_deletes_only_the_confirmed_jobs(conn, monkeypatch):
    """A job enqueued after the depth was confirmed is never purged unseen:
    the measure and the purge are one step."""
    q = queue(conn, "racy")
    kept = [q.enqueue("rq_tasks.add", i, i).id for i in range(2)]
    c, _ = commands_for(conn)
    late = []
    real_llen = conn.llen

    def enqueue_first(*a, **k):  # the way the check used to measure (Queue.count)
        late.append(q.enqueue("rq_tasks.add", 9, 9).id)
        return real_llen(*a, **k) - 1

    monkeypatch.setattr(rq.Queue, "count", property(lambda self: enqueue_first(self.key)))
    real_empty = rq.Queue.empty

    def empty_after_an_enqueue(self):
        late.append(self.enqueue("rq_tasks.add", 8, 8).id)
        return real_empty(self)

    monkeypatch.setattr(rq.Queue, "empty", empty_after_an_enqueue)
    out = c.purge_queue(cmd("purge_queue", queue="racy", expected_depth=2))
    assert out["purged"] == out["depth_before"] == 2, out
    for job_id in late:  # a job enqueued meanwhile is still there
        assert conn.exists(f"rq:job:{job_id}") and job_id in q.job_ids
    for job_id in kept:
        assert not conn.exists(f"rq:job:{job_id}")
    # And a queue that grew before the purge ran is not purged at all.
    q.enqueue("rq_tasks.add", 7, 7)
    with pytest.raises(_commands.CommandFailed, match="nothing was purged"):
        c.purge_queue(cmd("purge_queue", queue="racy", expected_depth=len(late)))
    forced = c.purge_queue(cmd("purge_queue", queue="racy", force=True))
    assert forced["purged"] == forced["depth_before"] == len(late) + 1 and q.count == 0


def test_dlq_list_reads_each_registry_head_only(conn, monkeypatch):
    """A page reads offset+limit entries per registry (merged newest first
    across queues), and the total from ZCARD."""
    for name, n in (("qa", 30), ("qb", 20)):
        key = rq.registry.FailedJobRegistry(name, connection=conn).key
        conn.zadd(key, {f"{name}-{i:03d}": 1000 + i * (2 if name == "qa" else 3) for i in range(n)})
        queue(conn, name).enqueue("rq_tasks.add", 0, 0)  # so Queue.all() knows it
    c, _ = commands_for(conn)
    ranges = []
    real = redis.client.Pipeline.zrevrange

    def spy(self, name, start, end, *a, **k):
        ranges.append((start, end))
        return real(self, name, start, end, *a, **k)

    monkeypatch.setattr(redis.client.Pipeline, "zrevrange", spy)
    monkeypatch.setattr(redis.Redis, "zrange", lambda *a, **k: pytest.fail("the whole registry was read"))
    first = c.dlq_list(cmd("dlq.list", limit=5))
    assert first["total"] == 50 and first["next_cursor"] == "5"
    assert [e["task_id"] for e in first["entries"]] == ["qa-029", "qb-019", "qa-028", "qb-018", "qa-027"]
    assert all(end == 4 for _start, end in ranges), ranges
    seen = [e["task_id"] for e in first["entries"]]
    cursor = first["next_cursor"]
    while cursor is not None:
        page = c.dlq_list(cmd("dlq.list", limit=7, cursor=cursor))
        seen += [e["task_id"] for e in page["entries"]]
        cursor = page["next_cursor"]
    assert len(seen) == 50 and len(set(seen)) == 50
    only = c.dlq_list(cmd("dlq.list", queue="qa", limit=200))
    assert only["total"] == 30 and len(only["entries"]) == 30 and only["next_cursor"] is None


def test_command_errors_mask_the_redis_password():
    class Hooks:
        worker = type("W", (), {"connection": None})()

    c = _commands.RqCommands(Hooks())

    def broken(command):
        raise RuntimeError("cannot reach redis://:s3cret-pw@db:6379/0")

    with pytest.raises(_commands.CommandFailed) as info:
        c._masked("purge_queue", broken)({})
    assert "s3cret" not in str(info.value) and "redis://**@db:6379" in str(info.value)


# ---------------------------------------------------------------- health


def test_health_reports_depths_and_this_worker(conn):
    client = RecordingClient()
    queue(conn, "other").enqueue("rq_tasks.add", 1, 1)
    worker = zrq.Worker([queue(conn, "default"), queue(conn, "high")], connection=conn, name="healthy")
    worker.z4j_client = client
    hooks = zrq._hooks_of(worker)
    source = _health.HealthSource(hooks)
    assert source()["rq"].get("workers") is None  # not born yet
    queue(conn).enqueue("rq_tasks.add", 2, 2)
    queue(conn).enqueue("rq_tasks.add", 3, 3)
    worker.register_birth()
    try:
        report = source()["rq"]
        assert report["broker_type"] == "redis" and report["broker_connected"] is True
        assert report["queue_depths"] == {"default": 2, "high": 0, "other": 1}
        assert list(report["queue_depths"])[:2] == ["default", "high"]
        details = report["workers"]["healthy"]
        stats = details["stats"]
        assert stats["pid"] == os.getpid() and stats["pool"]["max-concurrency"] == 1
        assert stats["total"] == {"succeeded": 0, "failed": 0} and stats["rq_version"] == rq.__version__
        assert details["active_queues"] == [{"name": "default"}, {"name": "high"}] and details["active"] == []
    finally:
        worker.register_death()


def test_health_says_when_redis_is_unreachable():
    class Conn:
        connection_pool = type("P", (), {"connection_kwargs": {"password": "pa55word"}})()

        def ping(self):
            raise ConnectionError("auth failed for redis://:pa55word@h:1/0")

    class Hooks:
        name = "w"
        worker = type("W", (), {"connection": Conn()})()

    report = _health.HealthSource(Hooks())()["rq"]
    assert report["broker_connected"] is False and "pa55word" not in report["broker_error"], report


def test_health_interval_from_env(monkeypatch):
    monkeypatch.setenv(_health.INTERVAL_ENV, "2")
    assert _health.interval_from_env() == 2.0
    monkeypatch.setenv(_health.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="not a number"):
        _health.interval_from_env()


def test_a_job_that_cannot_be_deserialized_is_reported_without_its_arguments(conn):
    import zlib

    client = RecordingClient()
    job = queue(conn).enqueue("rq_tasks.add", 1, 2)
    conn.hset(job.key, "data", zlib.compress(b"not a pickle"))
    run_burst(zrq.SimpleWorker, conn, client)
    sent = events(client, job.id)
    assert [e["kind"] for e in sent][:2] == ["task.received", "task.started"], client.emitted
    received = sent[0]["data"]
    assert "args" not in received and "UnpicklingError" in received["args_unreadable"], received
    assert sent[-1]["kind"] == "task.failed", sent


def test_handle_job_failure_passes_what_rq_gives_through():
    """RQ 2.x's handle_job_failure has no `execution=`: passing it (as RQ 3
    does) killed the worker at the first failing job."""
    got = []

    class Rq2Base:  # RQ 2.0-2.3's signature
        def handle_job_failure(self, job, queue, started_job_registry=None, exc_string=""):
            got.append((started_job_registry, exc_string))

    class Rq3Base:
        def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
            got.append((started_job_registry, exc_string, execution))

    class Job:
        id, retries_left = "j1", None

    for base in (Rq2Base, Rq3Base):
        worker = type("W", (zrq.WorkerMixin, base), {})()
        worker.handle_job_failure(Job(), "q", exc_string="boom")
        worker.handle_job_failure(Job(), "q", "reg", "boom2")
    worker.handle_job_failure(Job(), "q", exc_string="boom3", execution="ex")
    assert got == [(None, "boom"), ("reg", "boom2"), (None, "boom", None), ("reg", "boom2", None),
                   (None, "boom3", "ex")]


def test_after_reads_only_the_end_fields_and_sees_another_workers_attempt(conn, monkeypatch):
    """after() reads the job's end with one HMGET (no full refresh), and an
    attempt retried at once and taken by another worker is reported retried."""
    client = RecordingClient()
    worker = zrq.SimpleWorker([queue(conn)], connection=conn, name="mine")
    worker.z4j_client = client
    hooks = zrq._hooks_of(worker)
    job = queue(conn).enqueue("rq_tasks.boom", retry=rq.Retry(max=2))
    fetched = rq.job.Job.fetch(job.id, connection=conn)
    attempt = hooks.before(fetched)
    monkeypatch.setattr(rq.job.Job, "refresh", lambda self, *a, **k: pytest.fail("after() reloaded the job"))
    conn.hset(job.key, mapping={"status": "started", "worker_name": "other", "retries_left": 1})
    hooks.after(fetched, attempt)
    retried = events(client, job.id, "task.retried")
    assert len(retried) == 1, client.emitted
    assert retried[0]["data"]["retry_count"] == 1 and "other" in retried[0]["data"]["note"]
    assert retried[0]["data"]["worker"] == "mine"


def test_a_large_payload_is_not_unpickled_by_the_main_process(conn):
    client = RecordingClient()
    big = "x" * (zrq.MAX_PAYLOAD_BYTES * 2)
    job = queue(conn).enqueue("rq_tasks.add", 1, 2, password=big)
    small = queue(conn).enqueue("rq_tasks.add", 1, 2)
    run_burst(zrq.SimpleWorker, conn, client)
    received, started, succeeded = events(client, job.id)
    for e in (received, started):
        assert e["data"]["task_name"] == "rq_tasks.add" and "args" not in e["data"], e
        assert "not read by the worker's main process" in e["data"]["args_skipped"]
    assert succeeded["kind"] == "task.succeeded"
    assert events(client, small.id, "task.received")[0]["data"]["args"] == [1, 2]
