"""The Dramatiq app of tests/e2e/test_dramatiq.py: a Redis broker with
dramatiq-abort's Abortable (so cancel stops running messages), wired to
z4j-agentd with one line, and a few actors. The `dramatiq` command imports
it in each worker process; the broker URL comes from $Z4J_E2E_BROKER."""

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq_abort import Abortable, backends

import z4j_agentd.dramatiq

broker = RedisBroker(url=os.environ["Z4J_E2E_BROKER"])
broker.add_middleware(Abortable(backend=backends.RedisBackend(client=broker.client)))
dramatiq.set_broker(broker)
z4j_agentd.dramatiq.install(broker)

WORK = "dq-work"
IDLE = "dq-idle"  # nobody consumes it: its messages wait (depth, purge)


@dramatiq.actor(queue_name=WORK)
def add(x, y, password=None):
    return x + y


@dramatiq.actor(queue_name=WORK, max_retries=1, min_backoff=100, max_backoff=200)
def flaky(x):
    raise ValueError(f"flaky {x} failed")


@dramatiq.actor(queue_name=WORK)
def fanout(n):
    add.send(n, n)
    return n


@dramatiq.actor(queue_name=WORK, max_retries=3, min_backoff=100, max_backoff=200)
def spin(seconds):
    # Short sleeps: an abort lands between two of them.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return "spun"


@dramatiq.actor(queue_name=IDLE)
def idle(n):
    return n
