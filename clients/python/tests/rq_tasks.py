"""Jobs the RQ unit tests enqueue (importable by a forked or spawned work horse
and by an `rq worker` subprocess: tests/ is on their path)."""

import time


def add(x, y, password=None):
    return {"sum": x + y, "token": "abc"}


def boom(message="it broke"):
    raise ValueError(message)


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def returns_retry():
    from rq import Retry

    return Retry(max=1)
