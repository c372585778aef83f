"""The jobs the RQ end-to-end tests enqueue, run by a real
`rq worker -w z4j_agentd.rq.Worker` (tests/e2e/test_rq.py)."""

import time


def add(x, y, password=None):
    return x + y


def boom(message="boom"):
    raise ValueError(message)


def flaky(key, failures):
    """Fails `failures` times (counted in Redis under `key`), then returns the attempts."""
    from rq import get_current_job

    attempt = get_current_job().connection.incr(key)
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} failed")
    return {"attempts": attempt}


def sleepy(seconds):
    time.sleep(seconds)
    return seconds
