"""The Huey app the e2e tests run with `huey_consumer huey_proj.huey -k thread -w 2`
(tests/e2e/test_huey.py): RedisHuey on $Z4J_E2E_BROKER, wired to z4j-agentd in one line. The
consumer runs with Z4J_HUEY_STOP_RUNNING=1, so the brain's cancel stops running tasks."""

import os
import time

from huey import RedisHuey

import z4j_agentd.huey

huey = RedisHuey(os.environ.get("Z4J_E2E_HUEY_NAME", "e2e-huey"), url=os.environ["Z4J_E2E_BROKER"], utc=True)
z4j_agentd.huey.install(huey)


@huey.task()
def add(x, y):
    return x + y


@huey.task(retries=1)
def flaky(marker):
    """Fails its first attempt (the marker key does not exist yet), succeeds on the retry."""
    if huey.storage.conn.set(f"e2e-flaky:{marker}", 1, nx=True):
        raise RuntimeError(f"first attempt of {marker} fails")
    return f"ok {marker}"


@huey.task(retries=1)
def boom(credential):
    raise ValueError(f"the API refused Authorization: Bearer {credential}")


@huey.task(retries=2)
def sleepy(seconds):
    """Sleeps in short steps (as a task waiting on I/O with timeouts does)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return seconds


class AppError(Exception):
    pass


@huey.task(retries=2)
def guarded(seconds):
    """Sleeps in short steps and turns whatever stops it into its own error, as app code often does."""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
    except Exception as exc:
        raise AppError("step failed") from exc
    return seconds


@huey.task()
def login(user, password=None):
    return {"user": user, "token": "t-123"}
