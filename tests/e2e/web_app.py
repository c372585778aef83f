"""The web app of the end-to-end tests (test_celery.py): Flask with
`z4j_agentd.flask`, served by gunicorn with several workers forked from one
preloaded master, next to a Celery worker on the same host:

    gunicorn -w 4 --preload -b 127.0.0.1:<port> web_app:app

The extension configures the process's default client (`framework` flask)
and installs Celery's signals on it (`celery_app`), so the app and the
Celery integration share one client per process; each gunicorn worker gets
its own after the fork. `Z4J_E2E_QUEUE_SIZE` (optional) sets the client's
queue size (`Z4J_AGENTD_QUEUE_SIZE`).

Routes (JSON; `pid` is the gunicorn worker that served the request):

    /healthz        "ok"
    /enqueue/<n>    n times: the app's own `task.sent` event (engine celery,
                    task name celery_proj.add, args [i, i]) through the
                    client, then `add.apply_async((i, i))` with that task id
                    on the Redis broker. Answers the task ids, `emitted` (n),
                    `accepted` (how many `emit()` calls returned True), the
                    time it took, and the client's `stats()` afterwards.
    /stats          the client's `stats()`

`emit()` never blocks and never raises: with the daemon down an event waits
in the process's queue, and once the queue is full `emit()` returns False
and counts it as dropped (`dropped_queue_full`).
"""

from __future__ import annotations

import os
import time
import uuid

from flask import Flask, jsonify

from celery_proj import add, app as celery_app
from z4j_agentd.flask import Z4JAgentd

app = Flask(__name__)
if os.environ.get("Z4J_E2E_QUEUE_SIZE"):
    app.config["Z4J_AGENTD_QUEUE_SIZE"] = int(os.environ["Z4J_E2E_QUEUE_SIZE"])
z4j = Z4JAgentd(app, celery_app=celery_app)


@app.get("/healthz")
def healthz():
    return "ok"


@app.get("/enqueue/<int:n>")
def enqueue(n: int):
    t0 = time.monotonic()
    task_ids, accepted = [], 0
    for i in range(n):
        task_id = str(uuid.uuid4())
        # Sent before the publish, as Celery's own task-sent would be: the
        # worker's task.received can never be older than it.
        accepted += bool(z4j.client.emit("celery", "task.sent", task_id=task_id, data={
            "task_name": add.name, "args": [i, i], "kwargs": {}, "queue": "celery"}))
        add.apply_async((i, i), task_id=task_id)
        task_ids.append(task_id)
    return jsonify(pid=os.getpid(), task_ids=task_ids, emitted=n, accepted=accepted,
                   elapsed_ms=round((time.monotonic() - t0) * 1000, 1), stats=z4j.client.stats())


@app.get("/stats")
def stats():
    return jsonify(pid=os.getpid(), stats=z4j.client.stats())
