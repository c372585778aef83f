"""z4j_agentd.celery after a fork: a prefork pool child starts with the
per-process state of the signal receivers empty and its locks free, so it
sends task.received again for a task its parent received (and remembered)
before forking it, and never blocks on a lock another thread of the parent
held at the fork."""

import os
import threading

import pytest

import z4j_agentd.celery as z4j_celery
from test_celery import FakeApp, RecordingClient, fake_request, fake_task

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_in_child(body) -> int:
    """Runs body() in a forked child; its exit status (0: body returned True)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if body() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def installed():
    client = RecordingClient()
    z4j_celery.install(FakeApp(), client)
    yield z4j_celery.installed()
    z4j_celery.uninstall()
    client.close(timeout=0)


def test_a_child_sends_task_received_again_for_a_task_its_parent_received(installed):
    installed.on_task_received(sender=object(), request=fake_request(id="t-parent"))
    assert "t-parent" in installed._remembered

    def child():
        installed.client.emitted.clear()
        task = fake_task(id="t-parent")
        installed.on_task_prerun(sender=task, task_id="t-parent", task=task, args=(1, 2), kwargs={})
        return installed.client.kinds() == ["task.received", "task.started"]

    assert run_in_child(child) == 0
    # The parent keeps what it remembered (retry_task by reference uses it).
    assert "t-parent" in installed._remembered


def test_a_lock_held_by_another_thread_at_the_fork_is_free_in_the_child(installed):
    held, release = threading.Event(), threading.Event()

    def holder():
        with installed._remembered_lock, installed._started_lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        def child():
            task = fake_task(id="t-child")
            # Blocks for good if the child inherited the held locks.
            ok = installed._remembered_lock.acquire(timeout=2) and installed._started_lock.acquire(timeout=2)
            if ok:
                installed._remembered_lock.release()
                installed._started_lock.release()
                installed.on_task_prerun(sender=task, task_id="t-child", task=task, args=(), kwargs={})
            return ok and "t-child" in installed._started

        assert run_in_child(child) == 0
    finally:
        release.set()
        t.join(5)
