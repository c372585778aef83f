"""The arq app of tests/e2e/test_arq.py: `arq arq_proj.WorkerSettings`, run
with the python of `brain.alt_venv()` (arq pins redis < 6).

Redis: 127.0.0.1:$Z4J_E2E_REDIS_PORT, database $Z4J_E2E_REDIS_DB. The
daemon's socket: $Z4J_SOCKET_PATH (the client's default).

Also a producer for the tests, which run in a venv without arq:
`python arq_proj.py enqueue '[["add", [2, 3], {}], ["slow", [30], {"_defer_by": 600}]]'`
prints the new jobs' ids as a JSON list.
"""

import asyncio
import json
import os
import sys

from arq.connections import RedisSettings, create_pool
from arq.worker import Retry

import z4j_agentd.arq


def redis_settings() -> RedisSettings:
    return RedisSettings(port=int(os.environ["Z4J_E2E_REDIS_PORT"]), database=int(os.environ["Z4J_E2E_REDIS_DB"]))


async def add(ctx, x, y):
    return x + y


async def boom(ctx, user="nobody", password=None):
    raise ValueError(f"no such user: {user}")


async def flaky(ctx, n):
    """Fails its first two tries with arq's Retry; the third returns."""
    if ctx["job_try"] < 3:
        raise Retry(defer=1.0)  # over a second apart: the brain keeps one event per task, kind and second
    return n * 10


async def slow(ctx, seconds):
    await asyncio.sleep(seconds)
    return "slept"


class WorkerSettings:
    functions = [add, boom, flaky, slow]
    redis_settings = redis_settings() if "Z4J_E2E_REDIS_PORT" in os.environ else None
    poll_delay = 0.2
    allow_abort_jobs = True
    max_jobs = 5


z4j_agentd.arq.install(WorkerSettings)


async def _enqueue(jobs):
    pool = await create_pool(redis_settings())
    try:
        ids = []
        for name, args, kwargs in jobs:
            job = await pool.enqueue_job(name, *args, **kwargs)
            ids.append(job.job_id if job is not None else None)
        return ids
    finally:
        await pool.aclose()


if __name__ == "__main__":
    if sys.argv[1:2] != ["enqueue"] or len(sys.argv) != 3:
        sys.exit("usage: arq_proj.py enqueue '[[function, args, kwargs], ...]'")
    print(json.dumps(asyncio.run(_enqueue(json.loads(sys.argv[2])))))
