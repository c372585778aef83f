"""The TaskIQ app of the end-to-end tests (test_taskiq.py): a Redis list
broker with a Redis result backend and TaskIQ's retry middleware, wired to
z4j-agentd with one line. The broker's URL comes from $Z4J_E2E_BROKER.

    taskiq worker taskiq_proj:broker --workers 1 --max-async-tasks 2
"""

from __future__ import annotations

import asyncio
import os
import time

from taskiq import Context, TaskiqDepends
from taskiq.middlewares import SimpleRetryMiddleware
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import z4j_agentd.taskiq

URL = os.environ["Z4J_E2E_BROKER"]
QUEUE = os.environ.get("Z4J_E2E_TASKIQ_QUEUE", "tq-e2e")

# socket_timeout=None: redis-py 8 reads with a 5 s timeout by default, which
# ends the worker's blocking BRPOP after 5 idle seconds: taskiq-redis 1.2.4
# does not catch that error, so the worker process dies and is restarted.
broker = (ListQueueBroker(URL, queue_name=QUEUE, socket_timeout=None)
          .with_result_backend(RedisAsyncResultBackend(URL, result_ex_time=600))
          .with_middlewares(SimpleRetryMiddleware(default_retry_count=3)))
z4j_agentd.taskiq.install(broker)


@broker.task
async def add(a: int, b: int, api_token: str = "") -> int:
    return a + b


@broker.task(task_name="boom")
async def boom(message: str) -> None:
    raise ValueError(message)


@broker.task(retry_on_error=True, max_retries=3)
async def flaky(fails: int, context: Context = TaskiqDepends()) -> str:
    """Fails its first `fails` attempts, each after a second: the brain keeps
    one event per task, kind and second, so retries a second apart each count."""
    attempt = int(context.message.labels.get("_retries", 0))
    if attempt < fails:
        await asyncio.sleep(1.1)
        raise RuntimeError(f"attempt {attempt} fails")
    return f"ok after {attempt} retries"


@broker.task(retry_on_error=True, max_retries=3)
async def sleepy(seconds: float) -> str:
    """An async task: stops at its next await when cancelled (and is not
    retried, although it would be on an error)."""
    await asyncio.sleep(seconds)
    return "slept"


@broker.task
def blocking(seconds: float) -> str:
    """A sync task (TaskIQ runs it in its thread pool): cannot be cancelled."""
    time.sleep(seconds)
    return "blocked"


@broker.task
async def spawn(n: int) -> str:
    """Sends a child task from inside a task: the child's parent is this one."""
    child = await add.kiq(n, n)
    return child.task_id
