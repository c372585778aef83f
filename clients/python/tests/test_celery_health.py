"""z4j_agentd.celery's health reports (the Workers page and queue depths):
the report's shape from fake workers, what never leaves the process
(passwords, settings outside the brain's allowlist), broker outages and
hangs, the queue depths of kombu's transports, and a real prefork worker
reporting itself to a stand-in daemon."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

celery = pytest.importorskip("celery")
from kombu import Exchange, Queue  # noqa: E402

from z4j_agentd.celery import _health, _queues  # noqa: E402
from test_celery import RecordingClient  # noqa: E402

SECRET = "s3cr3t-pw"
NAME = "celery@web-1"


# ---------------------------------------------------------------- fakes


class FakeRequest:
    def __init__(self, task_id, name, args, started):
        self.id, self.name, self.args, self.started = task_id, name, args, started

    def info(self, safe=False):
        return {"id": self.id, "name": self.name, "args": self.args, "kwargs": {"k": "v"},
                "type": self.name, "hostname": NAME, "time_start": self.started, "acknowledged": True,
                "delivery_info": {"routing_key": "default"}, "worker_pid": 4242}


class FakePool:
    def __init__(self, limit=3, processes=(11, 12, 13)):
        self.info = {"implementation": "celery.concurrency.prefork:TaskPool", "max-concurrency": limit,
                     "processes": list(processes), "max-tasks-per-child": "N/A"}


class FakeWorker:
    """What HealthSource reads of a celery.worker.WorkController."""

    def __init__(self, app, queues, *, stats_fails=False, pool=None):
        self.app = app
        self.hostname = NAME
        self.pool = pool or FakePool()
        self.concurrency = 3
        self.prefetch_multiplier = 7
        self.max_tasks_per_child = 100
        self.max_memory_per_child = None
        self.time_limit = 300
        self.soft_time_limit = None
        self.stats_fails = stats_fails
        conn = app.connection_for_read()  # the broker URL carries the password
        self.consumer = SimpleNamespace(task_consumer=SimpleNamespace(queues=queues), connection=conn,
                                        qos=SimpleNamespace(value=21))

    def info(self):
        return {"total": {"proj.add": 5, "proj.mul": 2}, "pid": os.getpid(), "clock": "9", "uptime": 12}

    def rusage(self):
        return {"utime": 0.5, "stime": 0.1, "maxrss": 1000}

    def stats(self):
        if self.stats_fails:
            raise RuntimeError("dictionary changed size during iteration")
        info = self.info()
        info.update({"pool": dict(self.pool.info), "prefetch_count": 21, "rusage": self.rusage(),
                     # as Celery's Connection step has it: no password, but the transport options
                     "broker": {"hostname": "127.0.0.1", "userid": "guest", "transport": "memory",
                                "transport_options": {"sentinel_kwargs": {"password": SECRET}}}})
        return info


def make_app(**conf):
    app = celery.Celery("healthtest", broker=f"memory://guest:{SECRET}@localhost//",
                        backend=f"redis://:{SECRET}@127.0.0.1:1/0", set_as_current=False)
    app.conf.update({"task_acks_late": False, "worker_prefetch_multiplier": 4, "task_default_queue": "default",
                     "broker_transport_options": {"sentinel_kwargs": {"password": SECRET}},
                     "aws_secret_access_key": SECRET, **conf})

    @app.task(name="proj.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="proj.mul", shared=False)
    def mul(x, y):
        return x * y

    return app


def fill(app, queue, n):
    """`n` messages waiting in `queue` (declared) on the app's broker."""
    with app.connection_for_write() as conn:
        q = Queue(queue, Exchange(queue, "direct"), routing_key=queue)
        producer = conn.Producer()
        for i in range(n):
            producer.publish({"i": i}, exchange=q.exchange, routing_key=queue, declare=[q])


@pytest.fixture(autouse=True)
def empty_memory_broker():
    """The memory transport's queues live in the process: each test starts without any."""
    from kombu.transport import memory

    memory.Channel.queues.clear()
    yield
    memory.Channel.queues.clear()


@pytest.fixture
def app():
    a = make_app()
    yield a
    a.close()


@pytest.fixture
def active_state(monkeypatch):
    """celery.worker.state with two running requests (one with huge args)."""
    from celery.worker import state

    requests = {FakeRequest("t-2", "proj.mul", ["x" * 10000], 20.0), FakeRequest("t-1", "proj.add", [1, 2], 10.0)}
    monkeypatch.setattr(state, "active_requests", requests)
    monkeypatch.setattr(state, "reserved_requests", set(requests) | {FakeRequest("t-3", "proj.add", [], 0)})
    return requests


def hooks_for(app, worker, client=None):
    return SimpleNamespace(app=app, worker=worker, hostname=worker.hostname if worker else None,
                           client=client or RecordingClient())


# ---------------------------------------------------------------- the report's shape


def test_report_shape_from_a_worker(app, active_state):
    consumed = [Queue("default", Exchange("default"), routing_key="default"),
                Queue("high", Exchange("high"), routing_key="high", queue_arguments={"x-max-priority": 10})]
    app.conf.task_routes = {"proj.mul": {"queue": "mulq"}, "proj.*": "globq"}
    fill(app, "default", 2)
    fill(app, "idle", 4)  # nobody consumes it: declared by the app only
    app.conf.task_queues = [Queue("idle"), Queue("default")]
    hooks = hooks_for(app, FakeWorker(app, consumed))
    source = _health.HealthSource(hooks)
    report = source()

    assert list(report) == ["celery"]
    celery_report = report["celery"]
    assert celery_report["broker_type"] == "memory"
    assert celery_report["broker_connected"] is True and celery_report["depth_failures"] == 0
    # Consumed (default, high) and declared (idle, task_default_queue, task_queues, static routes).
    assert celery_report["queue_depths"] == {"default": 2, "idle": 4}, celery_report["queue_depths"]

    details = celery_report["workers"][NAME]
    assert sorted(details) == ["active", "active_queues", "conf", "registered", "stats"]
    stats = details["stats"]
    assert stats["pid"] == os.getpid() and stats["total"] == {"proj.add": 5, "proj.mul": 2}
    assert stats["pool"]["max-concurrency"] == 3 and stats["pool"]["processes"] == [11, 12, 13]
    assert stats["prefetch_count"] == 21 and stats["rusage"]["maxrss"] == 1000
    assert len(stats["loadavg"]) == 3
    assert stats["broker"]["hostname"] == "localhost" and stats["broker"]["userid"] == "guest"
    assert "password" not in stats["broker"] and "transport_options" not in stats["broker"]

    assert [a["id"] for a in details["active"]] == ["t-1", "t-2"]
    assert details["active"][0]["args"] == [1, 2]
    assert isinstance(details["active"][1]["args"], str) and "truncated" in details["active"][1]["args"]
    assert [q["name"] for q in details["active_queues"]] == ["default", "high"]
    high = details["active_queues"][1]
    assert high["routing_key"] == "high" and high["exchange"]["name"] == "high"
    assert high["queue_arguments"] == {"x-max-priority": 10} and "durable" in high and "exclusive" in high
    assert details["registered"] == ["proj.add", "proj.mul"]  # no celery.* (celery.chord, ...)
    assert any(n.startswith("celery.") for n in app.tasks.keys())

    conf = details["conf"]
    assert set(conf) <= set(_health.CONF_KEYS)
    assert conf["task_acks_late"] is False and conf["task_default_queue"] == "default"
    # The worker's effective values win over the app's settings.
    assert conf["worker_prefetch_multiplier"] == 7 and conf["worker_concurrency"] == 3
    assert conf["worker_max_tasks_per_child"] == 100 and conf["task_time_limit"] == 300
    assert conf["task_soft_time_limit"] is None  # a default, reported (lint reads absence as unknown)
    assert conf["accept_content"] == ["json"] and "timezone" in conf and "enable_utc" in conf
    json.dumps(report)  # the client sends it as is


def test_no_secret_leaves_the_process(app, active_state):
    hooks = hooks_for(app, FakeWorker(app, [Queue("default")]))
    report = _health.HealthSource(hooks)()
    text = json.dumps(report)
    assert SECRET not in text
    for key in ("broker_url", "result_backend", "broker_transport_options", "aws_secret_access_key"):
        assert key not in text
    events = hooks.client.emitted
    assert events and SECRET not in json.dumps(events)


def test_stats_parts_when_celerys_own_stats_fails(app, active_state):
    worker = FakeWorker(app, [Queue("default")], stats_fails=True)
    stats = _health.HealthSource(hooks_for(app, worker))()["celery"]["workers"][NAME]["stats"]
    assert stats["pool"]["max-concurrency"] == 3 and stats["total"]["proj.add"] == 5
    assert stats["rusage"]["utime"] == 0.5 and stats["prefetch_count"] == 21
    assert "password" not in stats["broker"]


def test_concurrency_is_always_an_int(app, active_state):
    """The brain loses the worker's row when pool.max-concurrency is not an int."""
    pool = FakePool(limit=None, processes=[5, 6])
    pool.info["max-concurrency"] = "auto"
    worker = FakeWorker(app, [Queue("default")], pool=pool)
    stats = _health.stats_of(worker)
    assert stats["pool"]["max-concurrency"] == 3  # the worker's concurrency
    worker.concurrency = None
    assert _health.stats_of(worker)["pool"]["max-concurrency"] == 2  # its processes


def test_worker_heartbeat_event(app, active_state):
    hooks = hooks_for(app, FakeWorker(app, [Queue("default"), Queue("high")]))
    source = _health.HealthSource(hooks)
    source.interval = 12.0
    source()
    source()  # within HEARTBEAT_EVENT_SECONDS of the first: a report, no event
    beats = [e for e in hooks.client.emitted if e["kind"] == "worker.heartbeat"]
    assert len(beats) == 1 and source.reports == 2
    source._last_heartbeat_event[NAME] -= _health.HEARTBEAT_EVENT_SECONDS
    source()
    beats = [e for e in hooks.client.emitted if e["kind"] == "worker.heartbeat"]
    assert len(beats) == 2
    data = beats[0]["data"]
    assert beats[0]["engine"] == "celery" and beats[0]["task_id"] == ""
    assert data["worker"] == NAME and data["pid"] == os.getpid() and data["concurrency"] == 3
    assert data["active"] == 2 and data["reserved"] == 3 and data["processed"] == 7
    assert data["queues"] == ["default", "high"] and data["freq"] == _health.HEARTBEAT_EVENT_SECONDS


def test_before_the_worker_consumes_only_depths_and_facts(app):
    worker = FakeWorker(app, [])
    worker.consumer.task_consumer = None  # worker_init: nothing consumes yet
    fill(app, "default", 1)
    hooks = hooks_for(app, worker)
    report = _health.HealthSource(hooks)()["celery"]
    assert report["workers"] == {} and report["queue_depths"] == {"default": 1}
    assert hooks.client.emitted == []  # no heartbeat for a worker not reported


def test_a_process_without_a_worker_reports_no_worker(app):
    fill(app, "default", 2)
    report = _health.HealthSource(hooks_for(app, None))()["celery"]
    assert report["workers"] == {} and report["queue_depths"] == {"default": 2}


# ---------------------------------------------------------------- broker outages


def test_broker_unreachable_skips_depths_and_counts(active_state):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app()
    app.conf.broker_url = f"amqp://guest:{SECRET}@127.0.0.1:{port}//"
    hooks = hooks_for(app, FakeWorker(app, [Queue("default")]))
    source = _health.HealthSource(hooks, broker_timeout=0.5, depth_deadline=5)
    started = time.monotonic()
    report = source()["celery"]
    assert time.monotonic() - started < 5
    assert "queue_depths" not in report
    assert report["broker_connected"] is False and report["depth_failures"] == 1
    assert report["broker_type"] == "amqp"
    assert report["broker_error"] and SECRET not in report["broker_error"]
    assert NAME in report["workers"]  # the worker's own details still go
    assert source()["celery"]["depth_failures"] == 2
    app.close()


def test_a_hanging_broker_holds_up_no_report(app, monkeypatch, active_state):
    release = threading.Event()
    calls = []

    def hang(measurer, names):
        calls.append(names)
        release.wait(10)
        return {n: 1 for n in names}

    monkeypatch.setattr(_queues.Measurer, "depths", hang)
    source = _health.HealthSource(hooks_for(app, FakeWorker(app, [Queue("default")])), depth_deadline=0.2)
    started = time.monotonic()
    first = source()["celery"]
    second = source()["celery"]  # the first round trip still hangs: not started again
    assert time.monotonic() - started < 3
    assert "queue_depths" not in first and "queue_depths" not in second
    assert second["depth_failures"] == 2 and len(calls) == 1
    assert "did not answer" in first["broker_error"] and "not finished" in second["broker_error"]
    release.set()
    source._deadline._stuck.join(5)
    third = source()["celery"]
    assert third["queue_depths"] == {"default": 1} and third["broker_connected"] is True


# ---------------------------------------------------------------- parts


def test_declared_queues():
    app = make_app()
    app.conf.task_default_queue = "dq"
    app.conf.task_queues = [Queue("q1"), Queue("q2")]
    app.conf.task_routes = ([{"a.x": {"queue": "r1"}, "a.*": "r2", "b.y": {"exchange": "e"}},
                             "proj.routers.Router", lambda *a, **k: {"queue": "dynamic"},
                             [("c.z", {"queue": Queue("r3")})]])
    assert _health.declared_queues(app) == {"dq", "q1", "q2", "r1", "r2", "r3"}
    plain = make_app(task_default_queue="only")
    assert _health.declared_queues(plain) == {"only"}
    app.close()
    plain.close()


def test_scrub():
    assert _health.scrub("redis://:pw@h:1/0 and amqp://u:pw2@h//") == "redis://**@h:1/0 and amqp://u:**@h//"
    assert _health.scrub("Auth failed for s3cr3t-pw", ["s3cr3t-pw"]) == "Auth failed for **"
    # a password holding "@" (kombu reads credentials up to the last "@")
    assert _health.scrub("amqp://u:p@ss@h1//;amqp://u:p@ss@h2//") == "amqp://u:**@h1//;amqp://u:**@h2//"
    assert "ss" not in _health.scrub("failover amqp://u:p@ss@h1:5672//", ["p@ss"]).replace("failover", "")


def test_broker_info_drops_credentials():
    from kombu import Connection

    conn = Connection(f"amqp://user:{SECRET}@rabbit.example:5673/vh", transport_options={"k": SECRET},
                      ssl={"keyfile": "/k", "password": SECRET})
    info = _health.broker_info(conn)
    assert info["hostname"] == "rabbit.example" and info["port"] == 5673 and info["userid"] == "user"
    assert info["virtual_host"] == "vh" and info["ssl"] is True
    assert SECRET not in json.dumps(info) and "transport_options" not in info


def test_interval_from_env(monkeypatch):
    monkeypatch.delenv(_health.INTERVAL_ENV, raising=False)
    assert _health.interval_from_env() == 10.0
    monkeypatch.setenv(_health.INTERVAL_ENV, "2.5")
    assert _health.interval_from_env() == 2.5
    for bad, words in (("soon", "is not a number"), ("0", "out of range"), ("301", "out of range")):
        monkeypatch.setenv(_health.INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=words) as info:
            _health.interval_from_env()
        assert _health.INTERVAL_ENV in str(info.value) and "300" in str(info.value)


def test_start_with_a_bad_interval_reports_at_the_default(app, monkeypatch, caplog):
    monkeypatch.setenv(_health.INTERVAL_ENV, "often")
    client = RecordingClient()
    calls = []
    client.report_health = lambda source, interval: calls.append(interval)
    source = _health.start(hooks_for(app, None, client))
    assert calls == [10.0] and source.interval == 10.0
    assert "Z4J_CELERY_HEALTH_INTERVAL='often' is not a number" in caplog.text
    # worker_ready sends the next report at once.
    celery.signals.worker_ready.send(sender=None)
    assert calls == [10.0, 10.0]
    celery.signals.worker_ready.disconnect(source._on_ready)
    client.close(timeout=0)


# ---------------------------------------------------------------- _queues


def test_depths_and_purge_on_a_broker(app):
    fill(app, "qa", 3)
    fill(app, "qb", 1)
    assert _queues.depths(app, ["qa", "qb", "nope", "", None]) == {"qa": 3, "qb": 1}
    assert _queues.depth(app, "qa") == 3 and _queues.depth(app, "nope") is None
    assert _queues.purge(app, "qa") == 3
    assert _queues.depths(app, ["qa", "qb"]) == {"qa": 0, "qb": 1}
    assert _queues.depths(app, []) == {}


class FakeChannelError(Exception):
    pass


class FakeChannel:
    def __init__(self, conn):
        self.conn, self.closed = conn, False

    def queue_declare(self, queue, passive):
        assert passive and not self.closed
        self.conn.declared.append(queue)
        if queue in self.conn.missing:
            # AMQP closes the channel on a channel error; kombu's Redis channel stays open
            self.closed = self.conn.transport.driver_type == "amqp"
            raise FakeChannelError(f"NOT_FOUND - no queue '{queue}'", (50, 10), "Channel.queue_declare", "404")
        return (queue, self.conn.sizes[queue], 0)

    def close(self):
        self.closed = True


class FakeConn:
    channel_errors = (FakeChannelError,)

    def __init__(self, driver, sizes, missing):
        self.transport = SimpleNamespace(driver_type=driver)
        self.sizes, self.missing, self.declared, self.channels = sizes, missing, [], []
        self.released = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def ensure_connection(self, **kw):
        pass

    def release(self):
        self.released = True

    def channel(self):
        self.channels.append(FakeChannel(self))
        return self.channels[-1]


@pytest.mark.parametrize("driver,missing_depth", [("amqp", None), ("redis", 0)])
def test_missing_queue_on_each_kind_of_broker(driver, missing_depth):
    conn = FakeConn(driver, {"a": 2, "c": 5}, {"b"})
    opened = []
    app = SimpleNamespace(connection_for_read=lambda **kw: opened.append(kw) or conn)
    got = _queues.depths(app, ["c", "b", "a"], timeout=3)
    want = {"a": 2, "c": 5} if missing_depth is None else {"a": 2, "b": 0, "c": 5}
    assert got == want
    assert conn.declared == ["a", "b", "c"]
    # AMQP closes a channel on an error: a new one after it. On Redis an empty
    # queue's "not found" leaves the channel usable: one channel for all.
    assert len(conn.channels) == (2 if driver == "amqp" else 1)
    assert all(ch.closed for ch in conn.channels)
    # every broker call is bounded, not only the connect (a frozen broker)
    options = opened[0]["transport_options"]
    assert opened[0]["connect_timeout"] == 3
    assert options["socket_timeout"] == 3 and options["read_timeout"] == 3


def test_one_broker_connection_is_kept_between_reports(app, monkeypatch):
    conn = FakeConn("redis", {"default": 4}, set())
    opened = []
    # (calls without arguments only read the URL's parts: no connection)
    monkeypatch.setattr(app, "connection_for_read", lambda **kw: (opened.append(kw) if kw else None) or conn)
    source = _health.HealthSource(hooks_for(app, FakeWorker(app, [Queue("default")])))
    for _ in range(3):
        assert source()["celery"]["queue_depths"]["default"] == 4
    assert len(opened) == 1 and len(conn.channels) == 1  # one connection, one channel, three reports
    # a broker error closes them; the next report connects again
    conn.sizes = {}
    assert "queue_depths" not in source()["celery"]
    assert conn.channels[0].closed and conn.released
    conn.sizes = {"default": 5}
    assert source()["celery"]["queue_depths"]["default"] == 5 and len(opened) == 2


def test_queues_measured_consumed_first_and_capped(app, monkeypatch):
    worker = FakeWorker(app, [Queue("zz-consumed")])
    source = _health.HealthSource(hooks_for(app, worker))
    monkeypatch.setattr(_health, "declared_queues",
                        lambda _app: {f"q{i:05d}" for i in range(_health.MAX_QUEUES + 50)} | {"zz-consumed"})
    names = source.queue_names({"w": {"active_queues": [{"name": "zz-consumed"}]}})
    assert len(names) == _health.MAX_QUEUES
    assert names[0] == "zz-consumed" and names[1] == "q00000"


# ---------------------------------------------------------------- a real worker


WORKER_APP = '''
import os

from celery import Celery
from kombu import Queue

import z4j_agentd
import z4j_agentd.celery

FOLDER = os.environ["Z4J_TEST_BROKER"]
app = Celery("z4jhealthapp", broker="filesystem://", backend="cache+memory://")
app.conf.broker_transport_options = {
    "data_folder_in": FOLDER, "data_folder_out": FOLDER, "control_folder": FOLDER + "-control"}
app.conf.worker_hijack_root_logger = False
app.conf.task_queues = [Queue("work"), Queue("idle")]
app.conf.task_default_queue = "work"
app.conf.task_acks_late = True


@app.task(name="z4jhealthapp.add")
def add(x, y):
    return x + y


z4j_agentd.configure(framework="celery", worker_role="worker")
z4j_agentd.celery.install(app)
'''


def test_a_prefork_worker_reports_itself(tmp_path, standin, sock_path):
    """A real `celery worker --pool=prefork -Q work`: its health reports
    carry its pid, concurrency, queues, registered tasks and conf, and the
    depth of `idle`, a declared queue it does not consume; worker.heartbeat
    events come with them."""
    from celery import Celery

    broker = tmp_path / "broker"
    broker.mkdir()
    (tmp_path / "broker-control").mkdir()
    (tmp_path / "z4jhealthapp.py").write_text(WORKER_APP)
    producer = Celery("producer", broker="filesystem://")
    producer.conf.broker_transport_options = {
        "data_folder_in": str(broker), "data_folder_out": str(broker), "control_folder": str(broker) + "-control"}
    for i in range(3):
        producer.send_task("z4jhealthapp.add", args=[i, i], queue="idle")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), Z4J_SOCKET_PATH=sock_path, Z4J_TEST_BROKER=str(broker),
               Z4J_CELERY_HEALTH_INTERVAL="0.5")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "z4jhealthapp", "worker", "--pool=prefork", "-c", "2",
         "-Q", "work", "-n", "z4jhealth@%h", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "--prefetch-multiplier=3"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def full_report():
            for peer, msg in reversed(standin.all("health")):
                workers = msg["engines"]["celery"]["workers"]
                if workers:
                    return peer, msg
            return None

        peer, msg = standin.wait_for(full_report, 30)
        assert peer.pid == worker.pid  # the main process reports, on its command connection
        assert msg["interval_seconds"] == 0.5
        report = msg["engines"]["celery"]
        (name, details), = report["workers"].items()
        assert name.startswith("z4jhealth@")
        stats = details["stats"]
        assert stats["pid"] == worker.pid
        assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2
        assert stats["pool"]["implementation"] == "celery.concurrency.prefork:TaskPool"
        assert stats["broker"]["transport"] == "filesystem" and stats["prefetch_count"] == 6
        assert isinstance(stats["rusage"], dict) and isinstance(stats["uptime"], int)
        assert [q["name"] for q in details["active_queues"]] == ["work"]
        assert "z4jhealthapp.add" in details["registered"]
        assert not any(n.startswith("celery.") for n in details["registered"])
        conf = details["conf"]
        assert conf["task_acks_late"] is True and conf["worker_prefetch_multiplier"] == 3
        assert conf["worker_concurrency"] == 2 and conf["task_default_queue"] == "work"
        assert report["queue_depths"]["idle"] == 3 and report["queue_depths"]["work"] == 0
        assert report["broker_type"] == "filesystem" and report["broker_connected"] is True

        # A task run shows in stats.total of a later report, and heartbeats come along.
        producer.send_task("z4jhealthapp.add", args=[1, 2], queue="work")

        def counted():
            for _, m in reversed(standin.all("health")):
                for d in m["engines"]["celery"]["workers"].values():
                    if d["stats"].get("total", {}).get("z4jhealthapp.add") == 1:
                        return True
            return False

        standin.wait_for(counted, 30)
        beats = [e for e in standin.events() if e["kind"] == "worker.heartbeat"]
        assert beats and all(e["_pid"] == worker.pid and e["data"]["worker"] == name for e in beats)
        assert beats[-1]["data"]["concurrency"] == 2 and beats[-1]["data"]["queues"] == ["work"]
        # Only the main process reports; pool children never do.
        assert {p.pid for p, _ in standin.all("health")} == {worker.pid}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            output, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
    assert worker.returncode == 0, output.decode(errors="replace")[-3000:]
