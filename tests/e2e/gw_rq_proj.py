"""RQ jobs run by an RQ worker that the stock z4j-rq agent (PyPI 1.13.0, on the z4j-bare runtime)
watches, pointed at the daemon's gateway (or at the brain itself) with `Z4J_BRAIN_URL`. Runs from
`brain.gateway_venv()`.

RQ has no start-up signal, so z4j-rq is started by a module the worker imports; `rq worker`'s
settings module (`-c`) is that module here:

    rq worker -c gw_rq_proj --url redis://127.0.0.1:<port>/<db> default other

Importing it calls `z4j_rq.register_worker_bootstrap()`, which builds the RQ engine on
`Z4J_RQ_REDIS_URL` (its own Redis connection: queues, depths, purge, cancel), patches
`rq.Worker.execute_job` (task.started / succeeded / failed from the worker's main process, the one
that forks the work horses) and starts the agent runtime (a thread of the worker process). It
does nothing unless Z4J_BRAIN_URL, Z4J_TOKEN and Z4J_PROJECT_ID are all set. The rest of the
agent's environment as for gw_celery_proj.py: Z4J_HMAC_SECRET, Z4J_AGENT_NAME, Z4J_HOME.
"""

from __future__ import annotations

import os
import time

# rq's settings module: the Redis URL if --url is not given.
REDIS_URL = os.environ.get("Z4J_RQ_REDIS_URL", "redis://127.0.0.1:6379/0")

# A no-op (one INFO line) without the Z4J_* environment, e.g. in a producer that imports the jobs.
from z4j_rq import register_worker_bootstrap  # noqa: E402

register_worker_bootstrap()


def add(x, y):
    return x + y


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def boom(message="boom"):
    raise ValueError(message)
