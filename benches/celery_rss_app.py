"""The Celery app of benches/celery_rss.py: one app, three ways of wiring
it, chosen by `BENCH_MODE`:

    none        no z4j integration at all
    agentd      z4j_agentd.celery.install(app)  (events to the local z4j-agentd)
    z4j-celery  import z4j_celery (1.13.0): its worker_ready bootstrap starts the
                embedded z4j agent in the worker's main process, configured by the
                Z4J_* environment

Broker and result backend: `BENCH_BROKER`, `BENCH_BACKEND` (Redis URLs).
"""

from __future__ import annotations

import hashlib
import os

from celery import Celery

app = Celery("rssbench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=600,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task
def work(i, payload):
    """A little CPU, a dict result: what a real task returns."""
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return {"i": i, "len": len(payload), "sha": digest[:16]}


MODE = os.environ.get("BENCH_MODE", "none")
if MODE == "agentd":
    import z4j_agentd.celery

    z4j_agentd.celery.install(app)
elif MODE == "z4j-celery":
    import z4j_celery  # noqa: F401  (registers its worker bootstrap)
elif MODE != "none":
    raise SystemExit(f"BENCH_MODE={MODE!r}: use none, agentd or z4j-celery")
