"""A Celery app watched by the stock z4j-celery agent (PyPI 1.13.0, on the z4j-bare runtime), not by
this repository's client: the process a user already has, pointed at the daemon's gateway (or at
the brain itself) with `Z4J_BRAIN_URL`. Runs from `brain.gateway_venv()`.

    celery -A gw_celery_proj worker --pool=prefork --concurrency=2 -n gw@%h

Importing z4j_celery connects its `worker_ready` handler, which starts the agent runtime in the
worker's main process (not in `celery inspect`/`purge`/..., and not in the pool children; the
children's task events reach it through Celery's event exchange). Everything else comes from the
environment:

    GW_BROKER            redis://127.0.0.1:<port>/<db> (broker and result backend)
    Z4J_BRAIN_URL        http://127.0.0.1:<port>  (the agent connects to <url>/ws/agent)
    Z4J_TOKEN, Z4J_HMAC_SECRET, Z4J_PROJECT_ID, Z4J_AGENT_NAME
    Z4J_HOME             the agent's state: buffer-<pid>.sqlite, agent-celery.pid
    Z4J_CELERY_LOCAL_HOSTNAME  the worker's node name (gw@host): its broker-events monitor then
                         drops the events of other workers on the same broker
"""

from __future__ import annotations

import os
import time

from celery import Celery

import z4j_celery  # noqa: F401  (connects the worker_ready bootstrap)

BROKER = os.environ.get("GW_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("gw_celery_proj", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_extended=True,
    # Task events on from the start (what `-E` does). z4j-celery's own switch (an enable_events
    # broadcast when its runtime starts, at worker_ready) did not reach this worker in 1.13.0 with
    # Celery 5.7: the brain then saw task.received only, never started/succeeded.
    worker_send_task_events=True,
    task_send_sent_event=True,
)


@app.task
def add(x, y):
    return x + y


@app.task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def boom():
    raise ValueError("boom")
