"""Nothing the application notices (issue 17, item 6): a Celery worker with
`z4j_agentd.celery.install(app)` goes on running its tasks, at full speed and
without an error, whatever happens to the broker or to the daemon, and its
pool children, forked from a main process whose client is already live, each
send their own events.

    celery -A celery_parity_proj worker --pool=prefork --concurrency=2
           --pool-start-method=fork --max-tasks-per-child=1
        broker: a redis-server of this module's own (stopped and started again)
        results: the session's redis-server (so a task's outcome is known even
                 while the broker or the daemon is away)

Celery has no `--preload` flag (gunicorn's): its prefork pool always imports
the app in the main process and forks the children from it. With
`--max-tasks-per-child=1` every task runs in a child forked *after* the main
process's client has connected, started its sender and command threads and
queued events: the hard case for fork safety, on every task of the module.

Each process's client has a queue of 5 events here (`Z4J_E2E_QUEUE_SIZE`), so
an outage fills it at once. The main process's counters are read through a
Celery remote control command (`z4j_client_stats`, in celery_parity_proj),
which its main process answers; a child's, by the task `whoami` it ran.

The gunicorn side of a daemon outage (requests stay fast, drops counted per
worker) is test_celery.py's `..._while_the_daemon_is_down`; the cost of one
signal receiver is measured by benches/celery_hooks.py (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from types import SimpleNamespace
from typing import List

import pytest

from harness import Background, RedisServer, brain_db, hexid, wait_for
from test_celery import app_env, wait_state
from test_celery_parity import APP, Sender, start_celery_worker, task_rows

QUEUE_SIZE = 5
NODE = "safety@%h"


@pytest.fixture(scope="module")
def safety(brain, redis_server, run_dir, module_daemon):
    import brain as brainmod

    agent, daemon = module_daemon("celery-safety")
    broker_redis = RedisServer(shutil.which("redis-server"), run_dir / "redis-safety", brainmod.free_port(), run_dir)
    bg: List[Background] = []
    ns = None
    try:
        broker_redis.wait_ready()
        daemon.start()
        broker = broker_redis.url(0)
        backend = redis_server.url(redis_server.fresh_db())
        env = app_env(daemon, broker, Z4J_E2E_BACKEND=backend, Z4J_E2E_QUEUE_SIZE=str(QUEUE_SIZE))
        worker = start_celery_worker(bg, run_dir, brain, daemon, env, NODE, name="celery-safety",
                                     extra_args=["--pool-start-method=fork", "--max-tasks-per-child=1"],
                                     stop_timeout=5)
        sender = Sender(broker, backend)
        ns = SimpleNamespace(brain=brain, agent=agent, daemon=daemon, worker=worker, sender=sender,
                             broker_redis=broker_redis, run_dir=run_dir, backend=backend,
                             node=NODE.replace("%h", socket.gethostname()))
        yield ns
    finally:
        if ns is not None:
            ns.sender.close()
        for proc in reversed(bg):
            proc.stop(timeout=proc.stop_timeout)
        daemon.stop()
        broker_redis.stop()


def main_stats(s) -> dict:
    """The worker main process's client counters (remote control, answered by that process)."""
    import redis

    for attempt in range(3):
        try:
            replies = s.sender.app.control.broadcast("z4j_client_stats", reply=True, timeout=5, destination=[s.node])
            break
        except redis.exceptions.ConnectionError:
            # The test process's reply consumer, once after the broker restart (kombu's, not the worker's).
            if attempt == 2:
                raise
            time.sleep(0.5)
    assert len(replies) == 1 and s.node in replies[0], f"z4j_client_stats answered {replies}"
    answer = replies[0][s.node]
    assert answer["pid"] == s.worker.pid, answer
    return answer["stats"]


def results(s, task_ids: List[str], timeout: float) -> list:
    """Each task's return value, from the result backend (Celery's own view, not the brain's)."""
    deadline = time.monotonic() + timeout
    out = []
    for tid in task_ids:
        left = max(0.1, deadline - time.monotonic())
        out.append(s.sender.app.AsyncResult(tid).get(timeout=left))
    return out


def integration_errors(worker) -> List[str]:
    """Worker log lines where the integration raised or logged an error."""
    return [line for line in worker.log_text().splitlines()
            if "z4j_agentd" in line and ("Traceback" in line or "ERROR" in line or "Error" in line)]


def wait_brain_success(s, task_ids: List[str], timeout: float) -> None:
    def check():
        rows = task_rows(s.brain, task_ids)
        done = [t for t, r in rows.items() if r["state"] == "success"]
        return len(done) == len(task_ids), f"{len(done)}/{len(task_ids)} success in the brain"

    wait_for(check, timeout, f"{len(task_ids)} tasks to be success in the brain", interval=0.5)


def restart_redis(r: RedisServer, run_dir, down_for: float) -> None:
    """Stops the redis-server, keeps it down `down_for` s (part of the fault, not a wait for a
    result), starts it again on the same port (empty: no persistence)."""
    argv = r.proc.argv
    r.proc.stop(timeout=5)
    time.sleep(down_for)
    r.proc = Background(argv, r.workdir, "redis-server",
                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}, run_dir=run_dir)
    r.wait_ready()


# ---------------------------------------------------------------- c: fork safety


def test_safety_every_forked_child_sends_its_own_events(safety):
    """Fork safety (prefork, app imported in the parent): 6 tasks, each in a child forked after the
    main process's client was live. Each child starts with a client of its own (its own pid, zeroed
    counters: exactly the 2 events it queued for this task, none inherited from the parent's queue),
    connects on its own and hands them over; the brain has every task from start to success; the
    main process's client goes on, connected, nothing dropped."""
    s = safety
    before = main_stats(s)
    assert before["commands_serving"], before
    # The main process's event connection is up (it connects on its first event) before the
    # children that run the tasks below are forked.
    warm = s.sender.send("celery_proj.add", (0, 0))
    assert results(s, [warm], 30) == [0]
    wait_for(lambda: (main_stats(s)["connected"], None), 10, "the main process's client to connect")
    before = main_stats(s)
    ids = [s.sender.send(f"{APP}.whoami") for _ in range(6)]
    answers = results(s, ids, 60)
    pids = [a["pid"] for a in answers]
    assert len(set(pids)) == 6, f"--max-tasks-per-child=1 should give each task a new child: {pids}"
    assert all(a["ppid"] == s.worker.pid and a["pid"] != s.worker.pid for a in answers), answers
    for a in answers:
        st = a["stats"]
        assert a["flushed"] and st["pid"] == a["pid"], a
        # task.received (sent again by the child that did not receive it) and task.started.
        assert (st["accepted"], st["sent"], st["queued"], st["dropped"]) == (2, 2, 0, 0), a
        assert st["connected"] and st["reconnects"] == 0 and not st["commands_serving"], a
    wait_brain_success(s, ids, 30)
    rows = brain_db(s.brain, "SELECT task_id, kind, payload FROM events WHERE agent_id = ? AND task_id IN (%s)"
                    % ",".join("?" * len(ids)), (hexid(s.agent["agent_id"]), *ids))
    kinds = {tid: sorted({r["kind"] for r in rows if r["task_id"] == tid}) for tid in ids}
    assert all(k == ["task.received", "task.started", "task.succeeded"] for k in kinds.values()), kinds
    after = main_stats(s)
    assert after["connected"] and after["dropped"] == 0 and after["reconnects"] == before["reconnects"], after
    assert after["sent"] >= before["sent"] + 6, (before, after)  # its task.received of each
    assert s.worker.alive() and not integration_errors(s.worker)


# ---------------------------------------------------------------- a: broker outage


def test_safety_broker_outage_never_reaches_a_task(safety):
    """A broker outage (redis-server stopped for 2 s and started again, empty) while a task runs:
    that task finishes and succeeds (its outcome reaches the result backend and the brain), the
    worker reconnects on its own and runs the tasks sent afterwards; the integration, which never
    touches the broker in a task's path, logs no error and drops nothing."""
    s = safety
    running = s.sender.send("celery_proj.sleepy", (4,))
    wait_state(s.brain, s.agent, running, "started", 20)
    restart_redis(s.broker_redis, s.run_dir, 2.0)

    # The test's own producer lost its pooled broker connections with the server: a new one.
    s.sender.close()
    s.sender = Sender(s.broker_redis.url(0), s.backend)
    assert results(s, [running], 30) == [4]
    wait_brain_success(s, [running], 20)

    # The worker is back on the broker: tasks sent now run (sending waits for the broker too).
    def reconnected():
        s.worker.check_alive()
        return s.worker.log_text().count("Connected to redis://") >= 2, s.worker.log_tail(5)

    wait_for(reconnected, 60, "the worker to reconnect to the restarted broker")
    ids = [s.sender.send("celery_proj.add", (i, 1)) for i in range(10)]
    assert results(s, ids, 60) == [i + 1 for i in range(10)]
    wait_brain_success(s, ids, 30)
    stats = main_stats(s)
    assert stats["connected"] and stats["dropped"] == 0, stats
    assert s.worker.alive() and not integration_errors(s.worker), integration_errors(s.worker)
    daemon = s.daemon.stats()
    assert (daemon["refused"], daemon["dropped"]) == (0, 0), daemon


# ---------------------------------------------------------------- b + d: daemon outage, emit only enqueues


def test_safety_daemon_outage_never_blocks_or_fails_a_task(safety):
    """The daemon stopped: a burst of 30 tasks all succeed (Celery's result backend says so), none
    waits for the daemon: the main process's client took 5 task.received events into its queue
    (full) and counted every further one as dropped, emit() having only enqueued; the worker lives
    on. The daemon back: the main process reconnects and hands over its 5, the tasks sent then reach
    the brain, and nothing was refused."""
    s = safety
    n = 30
    # The same burst with the daemon up, for the figure printed below (not asserted).
    t0 = time.monotonic()
    warm = [s.sender.send("celery_proj.add", (i, i)) for i in range(n)]
    assert results(s, warm, 90) == [2 * i for i in range(n)]
    took_up = time.monotonic() - t0
    wait_for(lambda: ((st := main_stats(s))["connected"] and st["queued"] == 0, st), 20,
             "the main process's client to hand over the burst's events")
    before = main_stats(s)
    assert s.daemon.stop() == 0

    t0 = time.monotonic()
    ids = [s.sender.send("celery_proj.add", (i, i)) for i in range(n)]
    assert results(s, ids, 90) == [2 * i for i in range(n)]
    took = time.monotonic() - t0
    during = main_stats(s)
    assert not during["connected"], during
    accepted = during["accepted"] - before["accepted"]
    dropped = during["dropped_queue_full"] - before["dropped_queue_full"]
    # One task.received per task in the main process (later additions of the integration may
    # emit more there, never fewer): whatever did not fit was counted, not waited for. What the
    # client accepted all still waits (the queue, full, and the batch its sender held when the
    # connection broke, kept for a resend).
    assert during["queued"] == accepted and QUEUE_SIZE <= accepted <= 2 * QUEUE_SIZE, (before, during)
    assert dropped >= n - accepted and accepted + dropped >= n, (before, during)
    assert during["dropped"] - before["dropped"] == dropped, (before, during)
    assert s.worker.alive() and not integration_errors(s.worker), integration_errors(s.worker)
    print(f"[e2e] {n} tasks with the daemon up: {took_up:.2f}s, down: {took:.2f}s; main process queued {accepted}, "
          f"dropped {dropped}")

    s.daemon.start()

    def handed_over():
        st = main_stats(s)
        return st["connected"] and st["queued"] == 0, st

    after = wait_for(handed_over, 30, "the main process's client to reconnect and hand over its queue")
    # Besides what it held, the main process emits one worker.heartbeat when its command
    # connection says hello again (its health report): handed over, or counted dropped when it
    # found the queue still full. Nothing else is lost.
    extra_sent = after["sent"] - during["sent"] - accepted
    extra_dropped = after["dropped_queue_full"] - during["dropped_queue_full"]
    assert extra_sent in (0, 1) and extra_dropped in (0, 1) and extra_sent + extra_dropped <= 1, (during, after)
    # The 5 queued task.received events reached the brain, for tasks of the burst.
    def received_rows():
        rows = brain_db(s.brain, "SELECT DISTINCT task_id FROM events WHERE agent_id = ? AND kind = 'task.received' "
                        "AND task_id IN (%s)" % ",".join("?" * n), (hexid(s.agent["agent_id"]), *ids))
        return len(rows) >= accepted, len(rows)

    wait_for(received_rows, 30, "the queued task.received events to reach the brain")
    later = [s.sender.send("celery_proj.add", (i, 100)) for i in range(5)]
    assert results(s, later, 30) == [i + 100 for i in range(5)]
    wait_brain_success(s, later, 30)
    daemon = s.daemon.stats()
    assert daemon["refused"] == 0 and daemon["dropped"] == 0, daemon
