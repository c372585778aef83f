"""The Dramatiq commands' Redis parts against a throwaway redis-server
(skipped without one): reconcile by the Redis id of the last enqueue, a
message another worker process fetched, a retry waiting its backoff, the
cap on queue scans, and a purge that leaves fetched messages alone."""

from __future__ import annotations

import threading
import time

import pytest

dramatiq = pytest.importorskip("dramatiq")
pytest.importorskip("redis")

from dramatiq.brokers.redis import RedisBroker  # noqa: E402
from dramatiq.message import Message  # noqa: E402

import z4j_agentd.dramatiq as zd  # noqa: E402
from z4j_agentd.dramatiq import _broker, _commands  # noqa: E402
from test_dramatiq import Recorder  # noqa: E402
from redis_server import unix_redis


@pytest.fixture(scope="module")
def redis_url():
    with unix_redis() as sock:
        yield f"unix://{sock}"


@pytest.fixture
def setup(redis_url):
    broker = RedisBroker(url=redis_url)
    broker.client.flushall()
    dramatiq.set_broker(broker)
    zd.install(broker, Recorder())
    hooks = zd.installed()
    for n in range(1, 6):
        broker.declare_queue(f"rq{n}")  # a worker's broker declares its actors' queues
    # Another process's broker: what it enqueues, this process did not see.
    other = RedisBroker(url=redis_url)
    yield broker, other, hooks
    zd.uninstall()
    broker.close()
    other.close()


def _message(queue, options=None):
    return Message(queue_name=queue, actor_name="job", args=(1,), kwargs={}, options=dict(options or {}))


def reconcile(hooks, task_id):
    return hooks.commands.handlers()[("dramatiq", "reconcile_task")]({"parameters": {"task_id": task_id}})


def _fetch(broker, queue, n=1):
    """A consumer as another worker process's: takes `n` messages, does not ack them."""
    consumer = broker.consume(queue, prefetch=n, timeout=1000)
    got = [next(consumer) for _ in range(n)]
    assert all(m is not None for m in got)
    return consumer, got


@pytest.mark.parametrize("seen_here", [True, False], ids=["by-redis-id", "by-scan"])
def test_reconcile_tells_waiting_from_fetched_by_another_process(setup, seen_here):
    broker, other, hooks = setup
    sender = broker if seen_here else other
    first = sender.enqueue(_message("rq1"))
    second = sender.enqueue(_message("rq1"))
    assert (hooks.where(first.message_id) is not None) is seen_here
    consumer, _ = _fetch(other, "rq1")  # takes the first: it runs in "another process"
    try:
        running = reconcile(hooks, first.message_id)
        # Not "pending": the brain would demote a STARTED task.
        assert running["engine_state"] == "unknown" and running["place"] == "fetched", running
        waiting = reconcile(hooks, second.message_id)
        assert waiting["engine_state"] == "pending" and waiting["place"] == "waiting", waiting
    finally:
        consumer.close()


def test_a_retry_waiting_its_backoff_is_unknown(setup):
    broker, other, hooks = setup
    for sender in (broker, other):
        retry = sender.enqueue(_message("rq2", {"retries": 2}), delay=60_000)
        got = reconcile(hooks, retry.message_id)
        assert got["engine_state"] == "unknown" and got["place"] == "retry", got
    plain = broker.enqueue(_message("rq2"), delay=60_000)
    got = reconcile(hooks, plain.message_id)
    assert got["engine_state"] == "pending" and got["place"] == "delayed", got


def test_reconcile_of_a_message_seen_here_reads_one_id_and_scans_are_capped(setup, monkeypatch):
    broker, other, hooks = setup
    seen = broker.enqueue(_message("rq3"))
    started, release = threading.Event(), threading.Event()
    scans = []

    def slow_find(*args, **kwargs):
        scans.append(args[1])
        started.set()
        release.wait(10)
        return None

    monkeypatch.setattr(_broker, "find", slow_find)
    monkeypatch.setattr(_commands, "SCAN_WAIT", 0.2)
    # Known Redis id: answered without a scan.
    assert reconcile(hooks, seen.message_id)["engine_state"] == "pending" and scans == []
    # Messages this process did not see are scanned, at most MAX_SCANS at once; the others answer unknown.
    threads = [threading.Thread(target=reconcile, args=(hooks, f"unseen-{n}")) for n in range(_commands.MAX_SCANS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while len(scans) < _commands.MAX_SCANS and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    busy = reconcile(hooks, "unseen-late")
    assert busy["engine_state"] == "unknown" and "not looked up" in busy["detail"], busy
    assert time.monotonic() - t0 < 5 and len(scans) == _commands.MAX_SCANS
    release.set()
    for thread in threads:
        thread.join(10)


def test_a_dead_letter_is_found_by_its_redis_id(setup):
    broker, other, hooks = setup
    sent = broker.enqueue(_message("rq4"))
    consumer, (message,) = _fetch(other, "rq4")
    message.fail()
    consumer.nack(message)
    consumer.close()
    got = reconcile(hooks, sent.message_id)
    assert got["engine_state"] == "failure" and got["source"] == "broker" and got["finished_at"], got


def test_purge_deletes_the_waiting_messages_only(setup):
    broker, other, hooks = setup
    for _ in range(3):
        broker.enqueue(_message("rq5"))
    consumer, (fetched,) = _fetch(other, "rq5")
    try:
        assert _broker.depth(broker, "rq5") == 3
        done = hooks.commands.handlers()[("dramatiq", "purge_queue")](
            {"parameters": {"queue": "rq5", "expected_depth": 3}})
        assert done["depth_before"] == 3 and done["purged"] == 2 and done["kept_fetched"] == 1, done
        # The fetched message stays, and its worker acknowledges it as usual.
        assert _broker.depth(broker, "rq5") == 1 and broker.client.llen("dramatiq:rq5") == 0
        consumer.ack(fetched)
        assert _broker.depth(broker, "rq5") == 0
    finally:
        consumer.close()
