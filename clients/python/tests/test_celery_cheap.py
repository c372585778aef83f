"""z4j_agentd.celery's receivers never do I/O in the thread that runs the
task: every read, write and connect of the client happens in its own
threads, so a slow or absent daemon cannot hold a task up."""

import threading

import pytest

import z4j_agentd
import z4j_agentd.celery as z4j_celery
from z4j_agentd._wire import Connection

celery = pytest.importorskip("celery")


@pytest.fixture
def io_threads(monkeypatch):
    """(method, thread) of every call into the client's connections."""
    seen = []
    for name in ("__init__", "send_bytes", "send", "poll", "recv"):
        real = getattr(Connection, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, threading.current_thread()))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Connection, name, spy)
    return seen


def run_receivers(hooks, task, n):
    from billiard.einfo import ExceptionInfo

    try:
        raise ValueError("boom")
    except ValueError as exc:
        failure, einfo = exc, ExceptionInfo()
    delivery = {"routing_key": "celery", "exchange": ""}
    for i in range(n):
        tid = f"t-{i}"
        hooks.on_task_received(sender=None, request=_Req(tid, delivery))
        task.push_request(id=tid, hostname="celery@test", delivery_info=delivery, args=[1, 2], kwargs={},
                          retries=0)
        try:
            hooks.on_task_prerun(sender=task, task_id=tid, task=task, args=(1, 2), kwargs={})
            if i % 2:
                hooks.on_task_success(sender=task, result={"n": i})
            else:
                hooks.on_task_failure(sender=task, task_id=tid, exception=failure, einfo=einfo)
            hooks.on_task_postrun(sender=task, task_id=tid)
        finally:
            task.pop_request()
        hooks.on_task_retry(sender=task, request=_Req(tid, delivery), reason=failure)
        hooks.on_task_revoked(sender=task, request=_Req(tid, delivery), terminated=False)


class _Req:
    def __init__(self, tid, delivery):
        self.id, self.name, self.args, self.kwargs = tid, "t.add", [1, 2], {}
        self.delivery_info, self.hostname, self.retries = delivery, "celery@test", 0
        self.parent_id = self.root_id = None


@pytest.fixture
def app():
    app = celery.Celery("cheap", broker="memory://")

    @app.task(name="t.add", shared=False)
    def add(x, y):
        return x + y

    yield app
    z4j_celery.uninstall()


def test_receivers_do_no_io_in_the_tasks_thread(app, standin, sock_path, io_threads):
    client = z4j_agentd.Client(sock_path)
    z4j_celery.install(app, client, serve_commands=False)
    run_receivers(z4j_celery.installed(), app.tasks["t.add"], 20)
    # received, started, an outcome, retried, revoked: 5 events per task, all handed over.
    assert client.flush(5.0) and client.stats()["sent"] == 100
    standin.wait_for(lambda: len(standin.events()) == 100)
    me = threading.current_thread()
    assert io_threads, "the spy saw no connection at all"
    assert [name for name, thread in io_threads if thread is me] == []
    client.close(timeout=1)


def test_with_no_daemon_the_receivers_queue_and_count(app, sock_path, io_threads):
    client = z4j_agentd.Client(sock_path, queue_size=30)  # nothing listens there
    z4j_celery.install(app, client, serve_commands=False)
    run_receivers(z4j_celery.installed(), app.tasks["t.add"], 20)
    stats = client.stats()
    assert (stats["accepted"], stats["dropped_queue_full"], stats["sent"]) == (30, 70, 0), stats
    me = threading.current_thread()
    assert [name for name, thread in io_threads if thread is me] == []
    client.close(timeout=0.2)
