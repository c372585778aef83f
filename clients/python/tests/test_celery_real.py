"""z4j_agentd.celery with Celery itself: eager tasks, real signals, the
command server started by the worker signals, and a real prefork worker."""

import time

import pytest

import z4j_agentd
import z4j_agentd.celery as z4j_celery
from test_celery import RecordingClient, fake_request

celery = pytest.importorskip("celery")


@pytest.fixture
def eager_app():
    app = celery.Celery("z4jtest", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = False

    @app.task(name="z4jtest.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="z4jtest.fail", shared=False)
    def fail():
        raise ValueError("boom")

    @app.task(name="z4jtest.flaky", bind=True, max_retries=2, shared=False)
    def flaky(self):
        if self.request.retries < 1:
            raise self.retry(countdown=0, exc=KeyError("k"))
        return "ok"

    yield app
    z4j_celery.uninstall()


def test_install_declares_the_engine_and_is_idempotent(eager_app):
    client = RecordingClient()
    assert z4j_celery.install(eager_app, client) is client
    assert client.engines == ["celery"]
    first = z4j_celery.installed()
    assert z4j_celery.install(eager_app, client) is client and z4j_celery.installed() is first
    other = RecordingClient()
    z4j_celery.install(eager_app, other)
    assert z4j_celery.installed().client is other  # replaced, not doubled
    eager_app.tasks["z4jtest.add"].delay(1, 2)
    assert client.emitted == [] and other.kinds() == ["task.received", "task.started", "task.succeeded"]


def test_install_defaults_to_the_default_client(eager_app, sock_path):
    configured = z4j_agentd.configure(socket_path=sock_path)
    assert z4j_celery.install(eager_app) is configured and configured.engines == ["celery"]


def test_install_without_a_client_follows_the_default_client(eager_app):
    from z4j_agentd import client as client_module

    z4j_celery.install(eager_app)
    later = RecordingClient()
    client_module._default = later  # as z4j_agentd.configure() after install() would
    eager_app.tasks["z4jtest.add"].delay(1, 1)
    assert later.kinds() == ["task.received", "task.started", "task.succeeded"] and later.engines == ["celery"]


def test_eager_tasks_send_started_succeeded_failed_retried(eager_app):
    client = RecordingClient()
    z4j_celery.install(eager_app, client)
    assert eager_app.tasks["z4jtest.add"].delay(2, 3).get() == 5
    eager_app.tasks["z4jtest.fail"].delay()
    eager_app.tasks["z4jtest.flaky"].delay()
    # Eager mode runs the task in-process: no task_received signal and no
    # task_revoked. The process that runs a task it did not receive sends
    # task.received itself, once, before task.started.
    assert client.kinds() == ["task.received", "task.started", "task.succeeded",
                              "task.received", "task.started", "task.failed",
                              "task.received", "task.started", "task.retried", "task.started",
                              "task.succeeded"]
    received, started, succeeded, _, _, failed, _, _, retried, _, _ = client.emitted
    assert received["data"]["args"] == [2, 3] and received["task_id"] == started["task_id"]
    assert started["data"]["args"] == [2, 3] and started["data"]["task_name"] == "z4jtest.add"
    assert started["task_id"] == succeeded["task_id"]
    assert succeeded["data"]["result"] == 5 and isinstance(succeeded["data"]["runtime_ms"], int)
    assert failed["data"]["exception"] == "ValueError" and failed["data"]["exception_message"] == "boom"
    assert "Traceback" in failed["data"]["traceback"]
    assert retried["data"]["retry_count"] == 1 and "k" in retried["data"]["reason"]


def test_real_signals_reach_the_receivers(eager_app):
    from celery import signals

    client = RecordingClient()
    z4j_celery.install(eager_app, client)
    signals.task_received.send(sender=None, request=fake_request(id="r-1"))
    signals.task_revoked.send(sender=eager_app.tasks["z4jtest.add"], request=fake_request(id="r-1"),
                              terminated=False, signum=None, expired=False)
    assert client.kinds() == ["task.received", "task.revoked"]
    assert client.emitted[1]["data"]["task_name"] == "z4jtest.add"


def test_worker_signals_start_the_command_server(eager_app, standin, sock_path):
    from celery import signals

    client = z4j_agentd.Client(sock_path)
    try:
        z4j_celery.install(eager_app, client)
        assert client.stats()["commands_serving"] is False
        signals.worker_init.send(sender=None)
        peer = standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
        from z4j_agentd.celery import _commands

        assert peer.hello["capabilities"] == {"celery": sorted(_commands.ACTIONS + _commands.TOKENS)}
        signals.worker_ready.send(sender=None)
        time.sleep(0.1)
        assert len([p for p, m in standin.all("hello") if m.get("capabilities")]) == 1
        result = standin.send_command("celery", "cancel_task", {"task_id": "c-1"})
        assert result["status"] == "success"
        assert {k: result["result"][k] for k in ("task_id", "revoked", "terminated", "state_before")} == {
            "task_id": "c-1", "revoked": True, "terminated": False, "state_before": "unknown"}
    finally:
        client.close(timeout=1)


WORKER_APP = '''
import os

from celery import Celery

import z4j_agentd
import z4j_agentd.celery

FOLDER = os.environ["Z4J_TEST_BROKER"]
app = Celery("z4jworkerapp", broker="filesystem://", backend="cache+memory://")
app.conf.broker_transport_options = {
    "data_folder_in": FOLDER, "data_folder_out": FOLDER, "control_folder": FOLDER + "-control"}
app.conf.worker_hijack_root_logger = False


@app.task(name="z4jworkerapp.add")
def add(x, y):
    return x + y


@app.task(name="z4jworkerapp.fail")
def fail():
    raise ValueError("boom in a pool child")


z4j_agentd.configure(framework="celery", worker_role="worker")
z4j_agentd.celery.install(app)
'''


def test_prefork_worker(tmp_path, standin, sock_path):
    """A real `celery worker --pool=prefork`: received/revoked in the main
    process, started/succeeded/failed in the pool children, commands served
    by the main process only."""
    import os
    import signal
    import subprocess
    import sys

    from celery import Celery

    broker = tmp_path / "broker"
    broker.mkdir()
    (tmp_path / "broker-control").mkdir()
    (tmp_path / "z4jworkerapp.py").write_text(WORKER_APP)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), Z4J_SOCKET_PATH=sock_path,
               Z4J_TEST_BROKER=str(broker))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "z4jworkerapp", "worker", "--pool=prefork", "-c", "2",
         "-n", "z4jtest@%h", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    producer = Celery("producer", broker="filesystem://")
    producer.conf.broker_transport_options = {
        "data_folder_in": str(broker), "data_folder_out": str(broker), "control_folder": str(broker) + "-control"}
    try:
        command_peer = standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"), 30)
        assert command_peer.pid == worker.pid
        ok = producer.send_task("z4jworkerapp.add", args=[2, 3], queue="celery")
        bad = producer.send_task("z4jworkerapp.fail", queue="celery")

        def lifecycle(task_id, final):
            events = {e["kind"]: e for e in standin.events() if e["task_id"] == task_id}
            return events if final in events and "task.received" in events else None

        done = standin.wait_for(lambda: lifecycle(ok.id, "task.succeeded"), 30)
        failed = standin.wait_for(lambda: lifecycle(bad.id, "task.failed"), 30)
        # task.received comes from the consumer (the main process) and again
        # from the pool child just before task.started, on the child's connection.
        received = [e for e in standin.events() if e["task_id"] == ok.id and e["kind"] == "task.received"]
        assert {e["_pid"] for e in received} == {worker.pid, done["task.started"]["_pid"]}
        assert all(e["data"]["args"] == [2, 3] for e in received)
        assert done["task.received"]["data"]["queue"] == "celery"
        child = done["task.started"]["_pid"]
        assert child != worker.pid and done["task.succeeded"]["_pid"] == child  # a pool child
        assert done["task.succeeded"]["data"]["result"] == 5
        assert done["task.succeeded"]["data"]["worker"].startswith("z4jtest@")
        assert failed["task.failed"]["_pid"] != worker.pid
        assert failed["task.failed"]["data"]["exception"] == "ValueError"

        # Exactly one process of the worker runs commands: the main one.
        serving = {p.pid for p, m in standin.all("hello") if m.get("capabilities")}
        assert serving == {worker.pid}
        result = standin.send_command("celery", "cancel_task", {"task_id": ok.id}, timeout=15)
        assert result["status"] == "success", result
        # The task finished: nothing to terminate, and the worker answered the revoke.
        assert {k: result["result"][k] for k in ("task_id", "revoked", "terminated", "signal")} == {
            "task_id": ok.id, "revoked": True, "terminated": False, "signal": "SIGTERM"}
        assert result["result"]["workers_answered"] == 1, result
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            output, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
    assert worker.returncode == 0, output.decode(errors="replace")[-3000:]
