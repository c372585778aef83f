"""The Celery app of test_celery_parity.py and test_celery_app_safety.py:
celery_proj's app and tasks (`z4j_agentd.celery.install(app)` included),
plus what those tests need to look inside the worker:

    celery -A celery_parity_proj worker --pool=prefork --concurrency=2 -n parity@%h

Tasks (names `celery_parity_proj.<name>`):

    echo(*args, **kwargs)   returns {"args": [...], "kwargs": {...}, "nested": {...}}: a dict result
    slow_flaky(n)           fails its first `n` attempts, retried 1.1 s later each time (so each
                            task.retried event falls in a second of its own), then succeeds
    whoami()                the pid and parent pid of the pool child that ran it, and that
                            child's client counters once it has handed over its events

A remote control command, answered by the worker's main process (the one
that receives tasks and emits task.received):

    app.control.broadcast("z4j_client_stats", reply=True)  ->  [{node: {"pid", "stats"}}]

`Z4J_E2E_QUEUE_SIZE` (optional) sets the queue size of every process's
client (the default client, which `install` uses).
"""

from __future__ import annotations

import os

from celery.worker.control import control_command

import z4j_agentd
import z4j_agentd.celery
from celery_proj import app  # noqa: F401  (app, its tasks and install(app))

if os.environ.get("Z4J_E2E_QUEUE_SIZE"):
    z4j_agentd.configure(queue_size=int(os.environ["Z4J_E2E_QUEUE_SIZE"]))


def _client_stats() -> dict:
    return z4j_agentd.celery.installed().client.stats()


@app.task
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs, "nested": {"list": [1, "two", None], "ok": True}}


@app.task(bind=True)
def slow_flaky(self, n):
    if self.request.retries < n:
        raise self.retry(exc=RuntimeError(f"slow_flaky attempt {self.request.retries + 1}"), countdown=1.1,
                         max_retries=n)
    return {"attempts": self.request.retries + 1}


@app.task
def whoami():
    client = z4j_agentd.celery.installed().client
    handed_over = client.flush(timeout=5.0)
    return {"pid": os.getpid(), "ppid": os.getppid(), "flushed": handed_over, "stats": client.stats()}


@control_command()
def z4j_client_stats(state):
    """The main process's client counters (remote control runs in the main process)."""
    return {"pid": os.getpid(), "stats": _client_stats()}
