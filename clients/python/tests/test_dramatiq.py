"""The Dramatiq integration against dramatiq's StubBroker and a real
dramatiq Worker in this process: events, parent links, the worker's
events, commands and health. Redis-only parts (depth by HLEN, the atomic
purge, dead letters and message lookup on Redis) run in
tests/e2e/test_dramatiq.py against a real Redis and worker."""

from __future__ import annotations

import time

import pytest

dramatiq = pytest.importorskip("dramatiq")

from dramatiq.brokers.stub import StubBroker  # noqa: E402
from dramatiq.middleware import AgeLimit, Retries  # noqa: E402

import z4j_agentd.dramatiq as zd  # noqa: E402
from z4j_agentd.dramatiq import _commands, _health  # noqa: E402
from test_celery import RecordingClient  # noqa: E402


class Recorder(RecordingClient):
    def emit(self, engine, kind, task_id="", data=None, occurred_at=None, id=None):
        self.emitted.append({"engine": engine, "kind": kind, "task_id": task_id, "data": data,
                             "occurred_at": occurred_at})
        return True

    def report_health(self, source, *, interval=30.0):
        self.health_source = source


def wait(check, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def setup():
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    client = Recorder()
    zd.install(broker, client)
    hooks = zd.installed()
    workers = []

    def start(threads=2):
        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=50)
        worker.start()
        workers.append(worker)
        return worker

    yield broker, client, hooks, start
    for worker in workers:
        worker.stop()
    zd.uninstall()
    broker.close()


def events(client, task_id=None, kind=None):
    return [e for e in client.emitted if (task_id is None or e["task_id"] == task_id)
            and (kind is None or e["kind"] == kind)]


def test_middleware_goes_first_and_the_starter_last(setup):
    broker, client, hooks, _ = setup
    assert broker.middleware[0] is hooks.middleware and broker.middleware[-1] is hooks.starter
    # Nothing of ours between them: Retries decides for an aborted message as without z4j.
    ours = [m for m in broker.middleware if type(m).__module__.startswith("z4j_agentd")]
    assert ours == [hooks.middleware, hooks.starter], ours
    # Again with the same broker and client: nothing changes.
    assert zd.install(broker, client) is client
    assert broker.middleware.count(hooks.middleware) == 1 and zd.installed() is hooks


def test_success_lifecycle_with_args_result_and_runtime(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="q1")
    def add(x, y, password=None):
        time.sleep(0.05)
        return {"sum": x + y, "token": "abc"}

    message = add.send(1, 2, password="hunter2")
    worker = start()
    broker.join("q1")
    worker.join()
    tid = message.message_id
    kinds = [e["kind"] for e in events(client, tid)]
    # Received once by the producer (this process); not again before started.
    assert kinds == ["task.received", "task.started", "task.succeeded"], kinds
    received, started, succeeded = events(client, tid)
    assert received["data"]["args"] == [1, 2] and received["data"]["kwargs"] == {"password": "[REDACTED]"}
    assert received["data"]["task_name"] == "add" and received["data"]["queue"] == "q1"
    assert "worker" not in received["data"]  # sent before this process's worker booted
    assert started["data"]["worker"] == zd.worker_name() and started["data"]["retry_count"] == 0
    assert succeeded["data"]["result"] == {"sum": 3, "token": "[REDACTED]"}
    assert succeeded["data"]["runtime_ms"] >= 40
    assert hooks.totals == {"add": 1} and hooks.active == {}


def test_worker_online_and_offline_name_the_process(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qa")
    def noop():
        pass

    worker = start(threads=3)
    online = events(client, kind="worker.online")
    assert len(online) == 1
    data = online[0]["data"]
    assert data["worker"] == zd.worker_name() and data["concurrency"] == 3 and data["queues"] == ["qa"]
    assert data["sw_ver"] == dramatiq.__version__ and data["pid"] > 0
    # Commands are served with the worker named in the hello.
    handlers, caps = client.served[0]
    assert sorted(a for (_e, a) in handlers) == ["cancel_task", "dlq.list", "purge_queue", "reconcile_task",
                                                 "retry_task", "submit_task"]
    assert caps == {"dramatiq": ["retry_by_reference_v1", "list_dead_letters"]}
    assert client.served_workers == [zd.worker_name()]
    worker.stop()
    offline = events(client, kind="worker.offline")
    assert [e["data"]["worker"] for e in offline] == [zd.worker_name()]


def test_retries_then_failure_keep_one_task_id_and_one_received(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qf", max_retries=1, min_backoff=10, max_backoff=20)
    def boom(x):
        raise ValueError(f"boom {x} at redis://u:s3cret@host/0")

    message = boom.send(7)
    worker = start()
    tid = message.message_id
    wait(lambda: events(client, tid, "task.failed"), what="the final failure")
    worker.join()
    kinds = [e["kind"] for e in events(client, tid)]
    assert kinds == ["task.received", "task.started", "task.retried", "task.started", "task.failed"], kinds
    retried = events(client, tid, "task.retried")[0]["data"]
    assert retried["retry_count"] == 1 and retried["exception"] == "ValueError"
    assert "s3cret" not in retried["reason"] and "boom 7" in retried["reason"]
    failed = events(client, tid, "task.failed")[0]["data"]
    assert failed["exception"] == "ValueError" and failed["retry_count"] == 2
    assert "Traceback" in failed["traceback"] and "s3cret" not in failed["traceback"]
    assert "s3cret" not in failed["exception_message"] and isinstance(failed["runtime_ms"], int)
    assert [e["data"]["retry_count"] for e in events(client, tid, "task.started")] == [0, 1]


def test_throws_fails_at_once(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qt", throws=(KeyError,))
    def nope():
        raise KeyError("x")

    message = nope.send()
    start()
    wait(lambda: events(client, message.message_id, "task.failed"), what="the failure")
    assert not events(client, message.message_id, "task.retried")


def test_a_process_that_did_not_see_the_enqueue_sends_received_before_started(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qr")
    def add(x, y):
        return x + y

    message = add.send(3, 4)
    client.emitted.clear()
    hooks._remembered.clear()  # as a worker process other than the producer
    worker = start()
    broker.join("qr")
    worker.join()
    got = events(client, message.message_id)
    assert [e["kind"] for e in got] == ["task.received", "task.started", "task.succeeded"]
    assert got[0]["data"]["args"] == [3, 4] and got[0]["data"]["worker"] == zd.worker_name()


def test_parent_and_root_links_through_an_actor_and_a_pipeline(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qp")
    def child(n):
        return n

    @dramatiq.actor(queue_name="qp")
    def parent(n):
        child.send(n + 1)
        return n

    @dramatiq.actor(queue_name="qp")
    def step(n):
        return n * 2

    first = parent.send(1)
    pipe = dramatiq.pipeline([step.message(2), step.message()]).run()
    worker = start()
    broker.join("qp")
    worker.join()
    received = {e["task_id"]: e["data"] for e in events(client, kind="task.received")}
    children = [tid for tid, d in received.items() if d["task_name"] == "child"]
    assert len(children) == 1
    assert received[children[0]]["parent_task_id"] == first.message_id
    assert received[children[0]]["root_task_id"] == first.message_id
    assert "parent_task_id" not in received[first.message_id]
    steps = [tid for tid, d in received.items() if d["task_name"] == "step"]
    assert len(steps) == 2
    second = [tid for tid in steps if received[tid].get("parent_task_id")]
    assert len(second) == 1 and pipe.messages[0].message_id == received[second[0]]["parent_task_id"]


def test_a_delayed_message_is_received_once_with_its_eta(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qd")
    def later():
        return "done"

    message = later.send_with_options(delay=200)
    worker = start()
    wait(lambda: events(client, message.message_id, "task.succeeded"), what="the delayed message")
    worker.join()
    got = events(client, message.message_id, "task.received")
    assert len(got) == 1 and got[0]["data"]["eta"] and got[0]["data"]["queue"] == "qd"


def test_a_skipped_message_is_revoked(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qs", max_age=1)
    def old():
        return 1

    message = old.send()
    time.sleep(0.05)
    start()
    wait(lambda: events(client, message.message_id, "task.revoked"), what="the skip")
    data = events(client, message.message_id, "task.revoked")[0]["data"]
    assert data["expired"] is True and data["terminated"] is False
    assert not events(client, message.message_id, "task.started")
    assert any(isinstance(m, AgeLimit) for m in broker.middleware)


# ---------------------------------------------------------------- cancel


@pytest.fixture
def abortable(setup):
    from dramatiq_abort import Abortable, backends

    broker = setup[0]
    middleware = Abortable(backend=backends.StubBackend())
    broker.add_middleware(middleware)
    return middleware


def _spinner(name, queue, ran, **options):
    @dramatiq.actor(actor_name=name, queue_name=queue, **options)
    def spin(seconds):
        ran.append(1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(range(1000))
        return "spun"

    return spin


def test_cancel_stops_a_running_message_and_its_retry_is_skipped(setup, abortable):
    broker, client, hooks, start = setup
    ran = []
    spin = _spinner("spin", "qc", ran, max_retries=3, min_backoff=10, max_backoff=20)
    message = spin.send(20)
    start()
    wait(lambda: message.message_id in hooks.active, what="the message to run")
    t0 = time.monotonic()
    result = hooks.commands.handlers()[("dramatiq", "cancel_task")](
        {"parameters": {"task_id": message.message_id}})
    took = time.monotonic() - t0
    assert result["state_before"] == "running" and result["terminated"] is True, result
    assert took < 8, took
    # Retries scheduled a retry, as for dramatiq-abort alone; the 7-day cancel skips it when it comes up.
    wait(lambda: len(events(client, message.message_id, "task.revoked")) == 2, what="the retry's skip")
    first, second = events(client, message.message_id, "task.revoked")
    assert first["data"]["terminated"] is True and first["data"]["retry_scheduled"] is True
    assert second["data"]["terminated"] is False
    assert len(ran) == 1 and not events(client, message.message_id, "task.succeeded")
    assert not broker.dead_letters_by_queue.get("qc")


def test_a_users_own_abort_is_retried_as_without_z4j(setup, abortable):
    """dramatiq-abort alone retries an aborted message (and its cancel key
    skips the retry): no dead letter, no on_retry_exhausted."""
    from dramatiq_abort import abort

    broker, client, hooks, start = setup
    exhausted, ran = [], []

    @dramatiq.actor(queue_name="qx2")
    def on_exhausted(message, info):
        exhausted.append(info)

    spin = _spinner("spin_user", "qu", ran, max_retries=3, min_backoff=10, max_backoff=20,
                    on_retry_exhausted="on_exhausted")
    message = spin.send(20)
    start()
    wait(lambda: message.message_id in hooks.active, what="the message to run")
    abort(message.message_id, middleware=abortable)
    wait(lambda: len(events(client, message.message_id, "task.revoked")) == 2, what="the retry's skip")
    broker.join("qx2")
    assert exhausted == [] and not broker.dead_letters_by_queue.get("qu"), (exhausted, broker.dead_letters)
    assert len(ran) == 1


def test_cancel_says_terminated_only_when_the_abort_stopped_it(setup, abortable):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qs")
    def stubborn():
        try:
            end = time.monotonic() + 20
            while time.monotonic() < end:
                sum(range(1000))
        except BaseException:  # catches dramatiq-abort's Abort and ends normally
            return "caught"

    message = stubborn.send()
    start()
    wait(lambda: message.message_id in hooks.active, what="the message to run")
    result = hooks.commands.cancel_task({"parameters": {"task_id": message.message_id}})
    assert result["state_before"] == "running" and result["terminated"] is False, result
    assert events(client, message.message_id, "task.succeeded")
    assert not events(client, message.message_id, "task.revoked")


def test_cancel_of_a_message_not_started_skips_it(setup, abortable):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qn")
    def later():
        return 1

    message = later.send_with_options(delay=300)
    start()
    result = hooks.commands.cancel_task({"parameters": {"task_id": message.message_id}})
    assert result["terminated"] is False and result["cancelled"] is True
    wait(lambda: events(client, message.message_id, "task.revoked"), what="the skip")
    assert not events(client, message.message_id, "task.started")


def test_cancel_without_abortable_says_how_to_enable_it(setup):
    broker, client, hooks, start = setup
    with pytest.raises(_commands.CommandFailed) as err:
        hooks.commands.handlers()[("dramatiq", "cancel_task")]({"parameters": {"task_id": "m-1"}})
    assert "Abortable" in str(err.value) and "pip install dramatiq-abort" in str(err.value)


# ---------------------------------------------------------------- commands


def test_submit_and_retry_by_reference_and_with_overrides(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qx")
    def mul(x, y):
        return x * y

    worker = start()  # commands are served by worker processes
    handlers = hooks.commands.handlers()
    sent = handlers[("dramatiq", "submit_task")]({"parameters": {"name": "mul", "args": [6, 7], "kwargs": {}}})
    assert sent["task_name"] == "mul" and sent["queue"] == "qx" and sent["task_id"]
    again = handlers[("dramatiq", "retry_task")]({"parameters": {"task_id": sent["task_id"], "task_name": "mul"}})
    assert again["arguments_from"] == "remembered" and again["new_task_id"] != sent["task_id"]
    other = handlers[("dramatiq", "retry_task")]({"parameters": {
        "task_id": sent["task_id"], "override_args": [2, 2], "override_kwargs": {}}})
    assert other["arguments_from"] == "override"
    broker.join("qx")
    worker.join()
    results = {e["task_id"]: e["data"]["result"] for e in events(client, kind="task.succeeded")}
    assert results == {sent["task_id"]: 42, again["new_task_id"]: 42, other["new_task_id"]: 4}
    with pytest.raises(_commands.BadCommand, match="no actor 'nope'"):
        handlers[("dramatiq", "submit_task")]({"parameters": {"name": "nope"}})
    with pytest.raises(_commands.BadCommand, match="override_args"):
        handlers[("dramatiq", "retry_task")]({"parameters": {"task_id": "unknown-id", "task_name": "mul"}})
    delayed = handlers[("dramatiq", "submit_task")]({"parameters": {"name": "mul", "args": [1, 1],
                                                                     "eta": time.time() + 60}})
    assert 55000 <= delayed["delay_ms"] <= 60000


def test_a_producer_keeps_no_arguments(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qk")
    def keep(x):
        pass

    message = keep.send("x" * 100)
    assert hooks.remembered(message.message_id) == {
        "task_name": "keep", "queue": "qk", "args_left_out": "a process that runs no worker keeps no arguments"}
    for n in range(zd.REMEMBERED_IDS_ONLY + 5):
        keep.send(n)
    assert len(hooks._remembered) == zd.REMEMBERED_IDS_ONLY and hooks._remembered_args_bytes == 0


def test_purge_at_the_confirmed_depth_only(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qq")
    def idle():
        pass

    for _ in range(3):
        idle.send()
    purge = hooks.commands.handlers()[("dramatiq", "purge_queue")]
    with pytest.raises(_commands.CommandFailed, match="holds 3 messages now, the purge was confirmed at 2"):
        purge({"parameters": {"queue": "qq", "expected_depth": 2, "force": False}})
    assert broker.queues["qq"].qsize() == 3
    with pytest.raises(_commands.BadCommand, match="not confirmed"):
        purge({"parameters": {"queue": "qq"}})
    done = purge({"parameters": {"queue": "qq", "expected_depth": 3, "force": False}})
    assert done["depth_before"] == 3 and done["purged"] == 3 and broker.queues["qq"].qsize() == 0


def test_dead_letters_and_reconcile(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qz", max_retries=0)
    def bad():
        raise RuntimeError("nope")

    message = bad.send()
    worker = start()
    wait(lambda: events(client, message.message_id, "task.failed"), what="the failure")
    worker.join()
    page = hooks.commands.handlers()[("dramatiq", "dlq.list")]({"parameters": {"queue": "qz", "limit": 10}})
    assert page["total"] == 1 and page["engine"] == "dramatiq" and page["next_cursor"] is None
    entry = page["entries"][0]
    assert entry["task_id"] == message.message_id and entry["task_name"] == "bad" and entry["attempts"] == 1
    assert "RuntimeError: nope" in entry["error_excerpt"]
    unknown = hooks.commands.reconcile_task({"parameters": {"task_id": "nobody"}})
    assert unknown["engine_state"] == "unknown"


def test_reconcile_a_running_message(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qw")
    def slow():
        time.sleep(0.5)

    message = slow.send()
    start()
    wait(lambda: message.message_id in hooks.active, what="the message to run")
    got = hooks.commands.reconcile_task({"parameters": {"task_id": message.message_id}})
    assert got["engine_state"] == "started" and got["worker"] == zd.worker_name()


# ---------------------------------------------------------------- health


def test_health_reports_the_worker_and_depths(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qh")
    def slow():
        time.sleep(0.4)

    @dramatiq.actor(queue_name="idle-q")
    def never():
        pass

    never.send()
    never.send()
    message = slow.send()
    start(threads=2)
    wait(lambda: message.message_id in hooks.active, what="the message to run")
    report = client.health_source()["dramatiq"]
    name = zd.worker_name()
    worker = report["workers"][name]
    assert worker["stats"]["pool"]["max-concurrency"] == 2 and worker["stats"]["pid"] > 0
    assert worker["active"][0]["id"] == message.message_id and worker["active"][0]["name"] == "slow"
    assert {"name": "qh"} in worker["active_queues"]
    assert worker["registered"] == ["never", "slow"]
    assert report["broker_type"] == "stub" and report["queue_depths"]["qh"] == 0
    assert report["broker_connected"] is True
    heartbeat = events(client, kind="worker.heartbeat")
    assert heartbeat and heartbeat[0]["data"]["worker"] == name


def test_health_interval_from_env_says_what_to_set(monkeypatch):
    monkeypatch.setenv(_health.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="not a number"):
        _health.interval_from_env()
    monkeypatch.setenv(_health.INTERVAL_ENV, "2")
    assert _health.interval_from_env() == 2.0


def test_rabbitmq_depths_are_the_ready_counts_and_a_broker_error_is_counted():
    from z4j_agentd.dramatiq import _broker

    class RabbitmqBroker:  # the class name is what tells the kind (as z4j-dramatiq reads it)
        fail = False

        def get_queue_message_counts(self, name):
            if self.fail:
                raise ConnectionError("amqp://guest:pw@rabbit:5672 is down")
            return {"a": (3, 1, 2), "b": (0, 0, 5)}[name]

    broker = RabbitmqBroker()
    assert _broker.kind(broker) == "rabbitmq"
    assert _broker.depths(broker, ["a", "b"]) == {"a": 3, "b": 0}  # not the delayed nor the dead ones

    class Hooks:
        pass

    hooks = Hooks()
    hooks.broker, hooks.worker, hooks.worker_name = broker, None, None
    broker.actors = {}
    source = _health.HealthSource(hooks)
    hooks.consumed_queues = lambda: ["a"]
    assert source()["dramatiq"]["queue_depths"] == {"a": 3}
    broker.fail = True
    report = source()["dramatiq"]
    assert report["broker_connected"] is False and report["depth_failures"] == 1
    assert "queue_depths" not in report and "pw@" not in report["broker_error"], report


def test_reconcile_reads_the_results_backend(setup):
    from dramatiq.results import Results
    from dramatiq.results.backends import StubBackend

    broker, client, hooks, start = setup
    broker.add_middleware(Results(backend=StubBackend()))

    @dramatiq.actor(queue_name="qres", store_results=True, max_retries=0)
    def answer(fail):
        if fail:
            raise RuntimeError("no answer")
        return 42

    ok, bad = answer.send(False), answer.send(True)
    worker = start()
    broker.join("qres", fail_fast=False)
    worker.join()
    reconcile = hooks.commands.handlers()[("dramatiq", "reconcile_task")]
    got = reconcile({"parameters": {"task_id": ok.message_id}})
    assert got["engine_state"] == "success" and got["source"] == "results" and got["result"] == 42, got
    failed = reconcile({"parameters": {"task_id": bad.message_id}})
    assert failed["engine_state"] == "failure" and "no answer" in failed["exception"], failed


def test_the_ids_of_moved_delayed_messages_are_not_kept(setup):
    broker, client, hooks, start = setup

    @dramatiq.actor(queue_name="qm", max_retries=2, min_backoff=10, max_backoff=20)
    def twice():
        raise ValueError("again")

    later = twice.send_with_options(delay=50)
    worker = start()
    wait(lambda: events(client, later.message_id, "task.failed"), what="the last attempt")
    worker.join()
    # The first delay and both retries went through the delay queue: none of their ids stays.
    assert len(hooks._delayed) == 0, hooks._delayed
    assert len(events(client, later.message_id, "task.received")) == 1


# ---------------------------------------------------------------- bounds and costs


class _CountingDict(dict):
    """Counts the entries a walk over the dict visits."""

    visited = 0

    def _count(self, it):
        for item in it:
            type(self).visited += 1
            yield item

    def __iter__(self):
        return self._count(super().__iter__())

    def items(self):
        return self._count(super().items())

    def values(self):
        return self._count(super().values())

    def keys(self):
        return self._count(super().keys())


def test_the_arguments_budget_drops_the_oldest_without_walking_every_entry(setup):
    from collections import OrderedDict

    from dramatiq.message import Message

    broker, client, hooks, start = setup
    hooks.worker = object()  # a worker process keeps arguments

    def remember(n):
        message = Message(queue_name="q", actor_name="a", args=("x" * 200,), kwargs={}, options={})
        hooks._remember(message)
        return message.message_id

    ids = [remember(n) for n in range(zd.REMEMBERED_TASKS)]  # 10,000 x ~208 bytes: over the 1 MiB budget
    assert hooks._remembered_args_bytes <= zd.MAX_REMEMBERED_ARGS_TOTAL

    class Counting(_CountingDict, OrderedDict):
        pass

    hooks._remembered = Counting(hooks._remembered)
    Counting.visited = 0
    more = [remember(n) for n in range(2000)]
    # Each call drops at most a few entries: no pass over the 10,000 (the old code walked them all each call).
    assert Counting.visited == 0, Counting.visited
    kept = {k: v for k, v in OrderedDict.items(hooks._remembered)}
    with_args = [k for k, v in kept.items() if v[2] is not None]
    assert sum(len(kept[k][2]) for k in with_args) == hooks._remembered_args_bytes <= zd.MAX_REMEMBERED_ARGS_TOTAL
    assert with_args == list(hooks._remembered_args)  # the budget's own order is the remembered order
    assert with_args == list(kept)[-len(with_args):] and more[-1] in with_args  # the newest keep theirs
    assert "args" in hooks.remembered(more[-1])
    assert ids[0] not in kept and ids[-1] in kept  # 10,000 entries at most
    assert hooks.remembered(list(kept)[0])["args_left_out"] == "newer messages' arguments took their place"


def test_dramatiq_abort_is_looked_up_once(setup, monkeypatch):
    import builtins
    import sys

    broker, client, hooks, start = setup
    monkeypatch.setitem(sys.modules, "dramatiq_abort", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "dramatiq_abort.abort_manager", None)
    if hasattr(zd, "_ABORT_UNSET"):  # forget what an earlier test looked up
        monkeypatch.setattr(zd, "_abort_cls", zd._ABORT_UNSET)
    imports = []
    real = builtins.__import__

    def counting(name, *args, **kwargs):
        if name.startswith("dramatiq_abort"):
            imports.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting)

    @dramatiq.actor(queue_name="qa")
    def quick(n):
        return n

    for n in range(20):
        quick.send(n)
    start()
    broker.join("qa")
    assert len(events(client, kind="task.succeeded")) == 20
    assert len(imports) <= 1, imports


def test_a_retry_in_a_process_that_did_not_see_it_sends_no_received(setup):
    from dramatiq.message import Message

    broker, client, hooks, start = setup
    first = Message(queue_name="q", actor_name="a", args=(1,), kwargs={}, options={},
                    message_timestamp=1_700_000_000_000)
    retry = Message(queue_name="q", actor_name="a", args=(2,), kwargs={}, options={"retries": 1})
    for message in (first, retry):
        hooks.before_process_message(message)
        hooks.after_process_message(message, None, None)
    received = events(client, kind="task.received")
    assert [e["task_id"] for e in received] == [first.message_id], received
    # It is stamped with the time the message was sent, not the time it started.
    assert received[0]["occurred_at"].timestamp() == 1_700_000_000
    assert events(client, retry.message_id, "task.started")


def test_moved_delayed_ids_are_kept_for_a_full_delay_prefetch(setup):
    from dramatiq.message import Message

    broker, client, hooks, start = setup
    assert zd.MAX_DELAYED >= 65535  # a worker's delay_prefetch: its threads x 1,000 (8 threads by default)
    messages = [Message(queue_name="q.DQ", actor_name="a", args=(), kwargs={}, options={}, message_id=f"m{n}")
                for n in range(zd.MAX_DELAYED + 10)]
    for message in messages:
        hooks.before_delay_message(message)
    assert len(hooks._delayed) == zd.MAX_DELAYED
    early = messages[12].copy(queue_name="q")  # taken 65,000 ids ago, due now
    hooks.after_enqueue(early, None)
    assert not events(client, kind="task.received")


def test_a_result_read_back_for_reconcile_is_redacted(setup):
    from dramatiq.results import Results
    from dramatiq.results.backends import StubBackend

    broker, client, hooks, start = setup
    broker.add_middleware(Results(backend=StubBackend()))

    @dramatiq.actor(queue_name="qsec", store_results=True)
    def login():
        return {"user": "ann", "password": "hunter2-secret", "blob": "y" * 1000}

    message = login.send()
    worker = start()
    broker.join("qsec")
    worker.join()
    got = hooks.commands.reconcile_task({"parameters": {"task_id": message.message_id}})
    assert got["engine_state"] == "success", got
    assert "hunter2-secret" not in repr(got), got
    assert got["result"]["user"] == "ann" and got["result"]["blob"] == "y" * 1000


def test_exception_texts_are_scrubbed_before_they_are_cut():
    secret = " redis://user:sup3rsecret@db.example:6379"
    # The cut of the message falls inside the URL, before its '@'.
    message = zd.exception_message(RuntimeError("x" * (zd.MAX_TRACEBACK_CHARS - 20) + secret))
    assert "sup3rs" not in message and len(message) <= zd.MAX_TRACEBACK_CHARS
    try:
        raise RuntimeError("y" * (zd.MAX_TRACEBACK_CHARS // 2 - 60) + secret + "z" * 10_000)
    except RuntimeError as exc:
        text = zd.exception_traceback(exc)
    assert "sup3rs" not in text and len(text) <= zd.MAX_TRACEBACK_CHARS, text[1900:2200]


def test_a_huge_exception_text_is_scrubbed_within_a_bound():
    secret = " redis://user:sup3rsecret@db.example:6379 "
    text = secret + "x" * 50_000_000 + secret
    t0 = time.monotonic()
    message = zd.exception_message(RuntimeError(text))
    try:
        raise RuntimeError(text)
    except RuntimeError as exc:
        tb = zd.exception_traceback(exc)
    assert "sup3rs" not in message + tb and len(tb) <= zd.MAX_TRACEBACK_CHARS
    assert tb.rstrip().endswith("db.example:6379"), tb[-100:]
    assert time.monotonic() - t0 < 10  # a bound against scrubbing 50 MB in the message's thread
