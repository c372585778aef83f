"""The Celery app of the end-to-end tests (test_celery.py, test_celery_commands.py), wired to z4j-agentd
the way a user's project is: `z4j_agentd.celery.install(app)`.

    celery -A celery_proj worker --pool=prefork --concurrency=2 -n e2e@%h

Broker and result backend come from the environment (`Z4J_E2E_BROKER`, a
`redis://127.0.0.1:<port>/<db>` URL; `Z4J_E2E_BACKEND`, default the broker);
the daemon's socket from `Z4J_SOCKET_PATH`, read by the client itself;
`Z4J_E2E_POOL_RESTARTS=1` turns `worker_pool_restarts` on.
The web app (web_app.py) imports `add` from here to enqueue it.
"""

from __future__ import annotations

import os
import time

from celery import Celery

import z4j_agentd.celery

BROKER = os.environ.get("Z4J_E2E_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("celery_proj", broker=BROKER, backend=os.environ.get("Z4J_E2E_BACKEND") or BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,  # a long task does not hold others back in a prefetched slot
    result_expires=600,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # retry_task / bulk_retry by reference from any worker, not only the one that received the task
    result_extended=True,
    # test_celery_commands.py: restart_worker restarts the pool of a worker started with this set
    worker_pool_restarts=os.environ.get("Z4J_E2E_POOL_RESTARTS") == "1",
)
# test_celery_commands.py: a queue the app declares (a static route) and no worker consumes, so
# the workers' health reports name it and a purge of it may go to them.
if os.environ.get("Z4J_E2E_PURGE_QUEUE"):
    app.conf.task_routes = {"celery_proj.routed_to_purge_queue": {"queue": os.environ["Z4J_E2E_PURGE_QUEUE"]}}


@app.task
def add(x, y):
    return x + y


@app.task
def boom():
    raise ValueError("boom")


@app.task(bind=True)
def flaky(self, n):
    """Fails (and is retried after 0.2 s) on its first `n` attempts, then succeeds."""
    if self.request.retries < n:
        raise self.retry(exc=RuntimeError(f"flaky attempt {self.request.retries + 1}"), countdown=0.2,
                         max_retries=2)
    return {"attempts": self.request.retries + 1}


@app.task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


z4j_agentd.celery.install(app)
