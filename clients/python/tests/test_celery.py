"""z4j_agentd.celery: signal mapping (fake objects first, then real Celery),
the retry command, and where commands are served (the other commands:
test_celery_commands.py)."""

import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

import z4j_agentd
from z4j_agentd.celery import _Hooks


class RecordingClient(z4j_agentd.Client):
    """A client that records what it is asked to emit instead of sending it."""

    def __init__(self, **kwargs):
        kwargs.setdefault("socket_path", "/nonexistent/agent.sock")
        super().__init__(**kwargs)
        self.emitted = []
        self.served = []

    def emit(self, engine, kind, task_id="", data=None, occurred_at=None, id=None):
        self.emitted.append({"engine": engine, "kind": kind, "task_id": task_id, "data": data})
        return True

    def serve(self, handlers, *, capabilities=None, workers=(), schedulers=(), runtime_features=()):
        self.served.append((dict(handlers), capabilities))
        self.served_workers = list(workers)

    def kinds(self):
        return [e["kind"] for e in self.emitted]


class FakeControl:
    def __init__(self):
        self.revoked = []

    def revoke(self, task_id, terminate=False):
        self.revoked.append((task_id, terminate))


class FakeApp:
    def __init__(self, backend=None):
        self.control = FakeControl()
        self.sent = []
        self.backend = backend or {}

    def send_task(self, name, args=None, kwargs=None, **options):
        self.sent.append({"name": name, "args": args, "kwargs": kwargs, **options})
        return SimpleNamespace(id=f"new-{len(self.sent)}")

    def AsyncResult(self, task_id):
        return SimpleNamespace(**self.backend.get(task_id, {}))


def fake_request(**overrides):
    values = dict(id="t-1", name="app.tasks.add", args=[1, 2], kwargs={"x": float("nan")},
                  delivery_info={"routing_key": "default", "exchange": ""}, hostname="celery@web-1",
                  parent_id="p-1", root_id="r-1", retries=0)
    values.update(overrides)
    return SimpleNamespace(**values)


def fake_task(**request):
    return SimpleNamespace(name="app.tasks.add", request=fake_request(**request))


@pytest.fixture
def hooks():
    client = RecordingClient()
    yield _Hooks(FakeApp(), client, serve_commands=True)
    client.close(timeout=0)


def test_received_started_succeeded(hooks):
    hooks.on_task_received(sender=object(), request=fake_request())
    task = fake_task()
    hooks.on_task_prerun(sender=task, task_id="t-1", task=task, args=(1, 2), kwargs={"x": 1})
    time.sleep(0.01)
    hooks.on_task_success(sender=task, result={"sum": 3, "when": datetime(2026, 1, 1)})
    hooks.on_task_postrun(sender=task, task_id="t-1", task=task, retval=3, state="SUCCESS")
    received, started, succeeded = hooks.client.emitted
    assert received == {"engine": "celery", "kind": "task.received", "task_id": "t-1", "data": {
        "task_name": "app.tasks.add", "queue": "default", "worker": "celery@web-1", "args": [1, 2],
        "kwargs": {"x": "nan"}, "parent_task_id": "p-1", "root_task_id": "r-1"}}
    assert started["kind"] == "task.started" and started["data"] == {
        "task_name": "app.tasks.add", "queue": "default", "worker": "celery@web-1", "args": [1, 2],
        "kwargs": {"x": 1}}
    assert succeeded["kind"] == "task.succeeded"
    assert succeeded["data"]["result"] == {"sum": 3, "when": "2026-01-01T00:00:00"}
    assert isinstance(succeeded["data"]["runtime_ms"], int) and succeeded["data"]["runtime_ms"] >= 10
    assert hooks._started == {}  # postrun forgot the start time


def test_success_prefers_celerys_runtime(hooks):
    task = fake_task()
    hooks.on_task_success(sender=task, result=None, runtime=0.25)
    (event,) = hooks.client.emitted
    assert event["data"]["runtime_ms"] == 250 and event["data"]["result"] is None


def test_failed(hooks):
    task = fake_task()
    hooks.on_task_prerun(sender=task, task_id="t-1", task=task, args=[], kwargs={})
    try:
        raise ValueError("cannot add " + "x" * 5000)
    except ValueError as exc:
        error = exc
    hooks.on_task_failure(sender=task, task_id="t-1", exception=error, args=[], kwargs={},
                          traceback=error.__traceback__, einfo=None)
    failed = hooks.client.emitted[-1]
    assert failed["kind"] == "task.failed" and failed["task_id"] == "t-1"
    data = failed["data"]
    assert data["exception"] == "ValueError" and data["exception_message"].startswith("cannot add")
    assert len(data["traceback"]) <= 4096 and data["traceback"].startswith("Traceback")
    assert "[... cut" in data["traceback"] and data["traceback"].rstrip().endswith("x")
    assert isinstance(data["runtime_ms"], int)
    assert data["task_name"] == "app.tasks.add" and data["worker"] == "celery@web-1"


def test_retried_and_revoked(hooks):
    task = fake_task()
    hooks.on_task_retry(sender=task, request=fake_request(retries=2), reason=KeyError("k"), einfo=None)
    hooks.on_task_revoked(sender=task, request=fake_request(), terminated=True, signum=15, expired=False)
    hooks.on_task_revoked(sender=None, request=SimpleNamespace(id="t-2", task="app.tasks.mul"),
                          terminated=False, signum=None, expired=True)
    retried, revoked, expired = hooks.client.emitted
    assert retried["kind"] == "task.retried"
    assert retried["data"] == {"task_name": "app.tasks.add", "queue": "default", "worker": "celery@web-1",
                               "reason": "'k'", "retry_count": 3}
    assert revoked["data"] == {"task_name": "app.tasks.add", "queue": "default", "worker": "celery@web-1",
                               "terminated": True, "signum": 15, "expired": False}
    assert expired["task_id"] == "t-2" and expired["data"] == {
        "task_name": "app.tasks.mul", "terminated": False, "signum": None, "expired": True}


def test_receivers_never_raise(hooks):
    class Hostile:
        def __getattr__(self, name):
            raise RuntimeError("no attributes here")

    hooks.on_task_received(sender=None, request=Hostile())
    hooks.on_task_prerun(sender=Hostile(), task_id=None, task=Hostile())
    hooks.on_task_success(sender=Hostile(), result=Hostile())
    hooks.on_task_failure(sender=Hostile(), exception=None)
    hooks.on_task_retry(sender=Hostile(), request=Hostile())
    hooks.on_task_revoked(sender=Hostile(), request=Hostile())
    hooks.on_task_received(sender=None, request=None)


def test_secrets_never_leave_the_process(hooks):
    task = fake_task()
    hooks.on_task_received(sender=None, request=fake_request(kwargs={"password": "hunter2", "user": "ada"}))
    hooks.on_task_prerun(sender=task, task_id="t-1", task=task, args=("redis://u:hunter2@h/0",),
                         kwargs={"api_key": "hunter2"})
    hooks.on_task_success(sender=task, result={"token": "hunter2", "ok": True})
    try:
        raise ConnectionError("cannot reach amqp://guest:hunter2@mq:5672//")
    except ConnectionError as exc:
        hooks.on_task_failure(sender=task, task_id="t-1", exception=exc, traceback=exc.__traceback__)
    hooks.on_task_retry(sender=task, request=fake_request(), reason=ValueError("token eyJabcdef.eyJabcdef.sig"))
    assert len(hooks.client.emitted) == 5
    assert "hunter2" not in repr(hooks.client.emitted) and "eyJabcdef" not in repr(hooks.client.emitted)
    received, started, succeeded, failed, _ = (e["data"] for e in hooks.client.emitted)
    assert received["kwargs"] == {"password": "[REDACTED]", "user": "ada"}
    assert started["args"] == ["redis://u:[REDACTED]@h/0"] and started["kwargs"] == {"api_key": "[REDACTED]"}
    assert succeeded["result"] == {"token": "[REDACTED]", "ok": True}
    assert "amqp://guest:[REDACTED]@mq:5672//" in failed["traceback"]
    assert failed["exception_message"] == "cannot reach amqp://guest:[REDACTED]@mq:5672//"


def test_a_secret_straddling_the_cut_of_a_long_message_is_still_replaced(hooks):
    task = fake_task()
    for pad in range(4060, 4100, 7):
        error = ConnectionError("x" * pad + " redis://app:hunter2hunter2@db:6379/0 " + "y" * 6000)
        hooks.on_task_failure(sender=task, task_id="t-1", exception=error, traceback=None, einfo=None)
        data = hooks.client.emitted[-1]["data"]
        assert "hunter2" not in data["exception_message"], pad
        assert "hunter2" not in data["traceback"], pad


def test_a_retrys_redelivery_sends_no_received_but_is_remembered(hooks):
    # The main process gets the retry's message as soon as the pool process
    # published it: its task.received could be newer than the pool process's
    # task.retried, which the brain would then drop as stale.
    hooks.on_task_received(sender=None, request=SimpleNamespace(
        id="t-9", name="app.tasks.add", args=[1], kwargs={}, delivery_info={"routing_key": "default"},
        hostname="celery@web-1", request_dict={"retries": 2}))
    hooks.on_task_received(sender=None, request=fake_request(id="t-8", retries=1))
    assert hooks.client.emitted == []
    assert {"t-9", "t-8"} <= set(hooks._remembered)
    hooks.on_task_received(sender=None, request=fake_request(id="t-7", retries=0))
    assert [e["task_id"] for e in hooks.client.emitted] == ["t-7"]


def test_large_arguments_are_cut(hooks):
    hooks.on_task_received(sender=None, request=fake_request(args=["x" * 200000]))
    args = hooks.client.emitted[0]["data"]["args"]
    assert isinstance(args, str) and "truncated" in args and len(args) < 70000


def test_retry_task_by_reference_uses_what_the_worker_received(hooks):
    hooks.on_task_received(sender=None, request=fake_request(id="t-7", args=[4, 5], kwargs={"k": 1},
                                                             delivery_info={"routing_key": "slow"}))
    params = {"engine": "celery", "task_id": "t-7", "task_name": "app.tasks.add", "args": None,
              "kwargs": None, "override_args": None, "override_kwargs": None, "original_had_args": True,
              "eta": None, "eta_seconds": None, "priority": "high"}
    result = hooks.retry_task({"parameters": params})
    assert result == {"task_id": "t-7", "new_task_id": "new-1", "task_name": "app.tasks.add",
                      "queue": "slow", "priority": 6}
    assert hooks.app.sent[-1] == {"name": "app.tasks.add", "args": [4, 5], "kwargs": {"k": 1},
                                  "queue": "slow", "priority": 6}

    eta = datetime.now(timezone.utc).timestamp() + 60
    hooks.retry_task({"parameters": {**params, "override_args": [9], "override_kwargs": {}, "eta": eta}})
    sent = hooks.app.sent[-1]
    assert sent["args"] == [9] and sent["kwargs"] == {}
    assert abs(sent["eta"].timestamp() - eta) < 0.001 and "priority" in sent

    hooks.retry_task({"parameters": {**params, "eta_seconds": 30, "priority": None}})
    assert hooks.app.sent[-1]["countdown"] == 30.0 and "priority" not in hooks.app.sent[-1]

    with pytest.raises(ValueError, match="past"):
        hooks.retry_task({"parameters": {**params, "eta": 1.0}})


def test_retry_task_falls_back_to_the_result_backend(hooks):
    hooks.app.backend["t-8"] = {"name": "app.tasks.mul", "args": [2, 3], "kwargs": {}, "queue": None}
    result = hooks.retry_task({"parameters": {"task_id": "t-8", "original_had_args": True}})
    assert result["task_name"] == "app.tasks.mul" and hooks.app.sent[-1]["args"] == [2, 3]


def test_retry_task_without_the_original_arguments_fails(hooks):
    with pytest.raises(ValueError, match="task name is unknown"):
        hooks.retry_task({"parameters": {"task_id": "t-9"}})
    with pytest.raises(ValueError, match="original arguments"):
        hooks.retry_task({"parameters": {"task_id": "t-9", "task_name": "app.tasks.add",
                                         "original_had_args": True}})
    result = hooks.retry_task({"parameters": {"task_id": "t-9", "task_name": "app.tasks.ping",
                                              "original_had_args": False}})
    assert result["new_task_id"] and hooks.app.sent[-1]["args"] == []


def test_worker_start_serves_commands_once(hooks):
    class Worker:
        hostname = "celery@h1"

    class Consumer:
        controller = Worker()

    hooks.on_worker_start(sender=Worker())
    hooks.on_worker_start(sender=Consumer())  # worker_init then worker_ready
    (handlers, capabilities), = hooks.client.served
    assert hooks.client.served_workers == ["celery@h1"] and hooks.hostname == "celery@h1"
    assert {("celery", "cancel_task"), ("celery", "retry_task"), ("celery", "purge_queue")} <= set(handlers)
    assert capabilities == {"celery": ["retry_by_reference_v1"]}
    quiet = _Hooks(FakeApp(), hooks.client, serve_commands=False)
    quiet.on_worker_start(sender=None)
    assert len(hooks.client.served) == 1
