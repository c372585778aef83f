"""A real Celery worker and a real gunicorn web app, through the Python client
(`clients/python`, import name `z4j_agentd`), one z4j-agentd and a real z4j
1.13.0 brain, on one host:

    gunicorn -w 4 --preload web_app:app --- task.sent (its own) ----------+
      (Flask, z4j_agentd.flask)  | add.apply_async                         |
                                 v                                         v
                           redis-server  ->  celery -A celery_proj worker  ->  z4j-agentd  ->  brain
                                             --pool=prefork --concurrency=2   (one socket,    (one
                                             (z4j_agentd.celery.install:      many local       WebSocket)
                                             task events; cancel_task)        clients)

The apps are tests/e2e/celery_proj.py and tests/e2e/web_app.py. Each test
gets its own daemon, agent and Redis database (the redis-server is the
session's). The Celery worker and gunicorn run in their own process groups
(harness.Background) and are stopped at teardown.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import pytest

from harness import HERE, brain_db, get_task, hexid, http_get, task_events, wait_for
from test_commands import wait_brain_knows

ENGINE = "celery"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def broker(redis_server) -> str:
    """A Redis URL on a database no earlier test used (emptied)."""
    return redis_server.url(redis_server.fresh_db())


def app_env(daemon, broker: str, **extra) -> Dict[str, str]:
    """The environment of the Celery worker and gunicorn: nothing of the caller's Z4J_*."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(daemon.workdir),
        "PYTHONPATH": str(HERE),  # celery_proj, web_app
        "Z4J_SOCKET_PATH": str(daemon.socket_path),
        "Z4J_E2E_BROKER": broker,
        # One health report (and worker.heartbeat) when the worker is ready, and when its
        # command connection says hello again; none on a timer within a test's span.
        "Z4J_CELERY_HEALTH_INTERVAL": "300",
    }
    env.update(extra)
    return env


def require_client() -> None:
    try:
        import z4j_agentd  # noqa: F401
        import z4j_agentd.celery  # noqa: F401
        import z4j_agentd.flask  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Python client is not installed in {sys.prefix} ({exc}); "
                    "`python3 tests/e2e/brain.py venv` (run.sh does it) installs clients/python editable")


def start_worker(background, brain, daemon, broker: str, stop_timeout: float = 10.0):
    """`celery -A celery_proj worker` (prefork, 2 children) until it is ready, has said hello to
    the daemon with its commands, and the brain knows them. Returns the process."""
    require_client()
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
    worker = background(
        [sys.executable, "-m", "celery", "-A", "celery_proj", "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=INFO", "-n", "e2e@%h", "--without-mingle", "--without-gossip"],
        daemon.workdir, "celery-worker", app_env(daemon, broker), stop_timeout=stop_timeout)

    def ready():
        worker.check_alive()
        return " ready." in worker.log_text(), worker.log_tail(5)

    wait_for(ready, 60, "the Celery worker to be ready", interval=0.2)

    def registered():
        worker.check_alive()
        clients = daemon.stats()["client_list"]
        mine = [c for c in clients if c.get("pid") == worker.pid and "cancel_task" in
                ((c.get("capabilities") or {}).get(ENGINE) or [])]
        return bool(mine), clients

    wait_for(registered, 20, "the Celery worker to register cancel_task with the daemon")
    daemon.wait_stats(lambda s: "cancel_task" in (s["advertised_capabilities"].get(ENGINE) or [])
                      and s["uplink_state"] == "connected", 30, "the daemon to advertise celery/cancel_task")
    wait_brain_knows(brain, daemon.agent, {ENGINE: ["cancel_task"]})
    return worker


def start_web(background, daemon, broker: str, workers: int = 4, **env):
    """gunicorn -w <workers> --preload web_app:app on a free port; returns (process, base URL)."""
    require_client()
    from brain import free_port

    port = free_port()
    web = background(
        [sys.executable, "-m", "gunicorn", "-w", str(workers), "--preload", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "5", "--access-logfile", "-", "web_app:app"],
        daemon.workdir, "gunicorn", app_env(daemon, broker, **env))
    base = f"http://127.0.0.1:{port}"

    def up():
        web.check_alive()
        status, _, body = http_get(f"{base}/healthz", timeout=2)
        return status == 200 and len(web.children()) == workers, (status, body, web.children())

    wait_for(up, 30, f"gunicorn with {workers} workers to answer on {base}", interval=0.2)
    return web, base


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200, f"GET {url}: HTTP {resp.status}"
        return json.loads(resp.read())


class Producer:
    """Sends tasks by name from the test process (no z4j_agentd here: the events
    come from the worker)."""

    def __init__(self, broker: str) -> None:
        from celery import Celery

        self.app = Celery("e2e-producer", broker=broker)

    def send(self, name: str, *args) -> str:
        task_id = f"e2e-{name}-{uuid.uuid4().hex[:12]}"
        self.app.send_task(f"celery_proj.{name}", args=args, task_id=task_id)
        return task_id

    def close(self) -> None:
        self.app.close()


def wait_state(brain, agent: dict, task_id: str, states, timeout: float) -> dict:
    states = {states} if isinstance(states, str) else set(states)

    def check():
        t = get_task(brain, agent["project_slug"], ENGINE, task_id)
        return t is not None and t["state"] in states, t and {k: t.get(k) for k in ("state", "result", "exception")}

    wait_for(check, timeout, f"task {task_id} to be {sorted(states)} in the brain", interval=0.3)
    return get_task(brain, agent["project_slug"], ENGINE, task_id)


def kinds_of(brain, agent: dict, task_id: str, engine: str = ENGINE) -> List[str]:
    return sorted(e["kind"] for e in task_events(brain, agent["project_slug"], engine, task_id))


# ---------------------------------------------------------------- 1


def test_celery_tasks_reach_the_brain_with_their_states(brain, agent, daemon, broker, background):
    """add -> success with its result; boom -> failure with ValueError and its traceback;
    flaky -> retried twice, then success; all through the prefork worker's client."""
    worker = start_worker(background, brain, daemon, broker)
    producer = Producer(broker)
    try:
        t_add = producer.send("add", 2, 3)
        t_boom = producer.send("boom")
        t_flaky = producer.send("flaky", 2)
    finally:
        producer.close()
    worker_name = f"e2e@{socket.gethostname()}"

    done = wait_state(brain, agent, t_add, "success", 30)
    want = {"name": "celery_proj.add", "queue": "celery", "result": 5, "exception": None,
            "worker_name": worker_name}
    assert {k: done.get(k) for k in want} == want, done
    assert isinstance(done.get("runtime_ms"), int), done
    # The row has the arguments: the pool child sends task.received again just before
    # task.started on its own connection, so a late task.received from the main process
    # (another connection) cannot leave them empty. The brain keeps one event per task,
    # kind and second, so there are one or two task.received rows.
    assert done.get("args") == [2, 3] and done.get("kwargs") == {}, done
    received = [e for e in task_events(brain, agent["project_slug"], ENGINE, t_add) if e["kind"] == "task.received"]
    assert 1 <= len(received) <= 2 and all(e["payload"]["args"] == [2, 3] for e in received), received
    assert all(e["payload"]["task_name"] == "celery_proj.add" for e in received), received

    failed = wait_state(brain, agent, t_boom, "failure", 30)
    assert failed["name"] == "celery_proj.boom", failed
    # The brain keeps the exception's type; its message is the traceback's last line.
    assert failed.get("exception") == "ValueError", failed
    tb = failed.get("traceback") or ""
    assert tb.startswith("Traceback (most recent call last):") and tb.rstrip().endswith("ValueError: boom"), tb
    assert 'raise ValueError("boom")' in tb and "celery_proj.py" in tb, tb

    flaky = wait_state(brain, agent, t_flaky, "success", 30)
    assert flaky["result"] == {"attempts": 3} and flaky["retry_count"] >= 1, flaky
    retries = re.findall(rf"flaky\[{t_flaky}\] retry: Retry in 0.2s", worker.log_text())
    assert len(retries) == 2, f"the worker log shows {len(retries)} retries of {t_flaky}:\n{worker.log_tail()}"

    # The worker's processes sent 18 to 20 events: from the main process worker.online and the
    # worker.heartbeat of its health report once ready (two when the report at its command
    # hello already found it ready); add and boom 4 each (received from the main process and
    # again from the pool child, started, the outcome); flaky 1 received from the main process
    # (a retry's redelivery sends none), 1 or 2 from the pool children (once per child), 3
    # started, 2 retried, 1 succeeded. The daemon took them all and the brain acknowledged them.
    stats = daemon.wait_stats(lambda s: s["acked"] >= 18 and s["spool_depth"] == 0, 20, "18 events acked")
    assert 18 <= stats["received"] <= 20, stats
    assert (stats["stored"], stats["acked"], stats["refused"], stats["dropped"]) == (
        stats["received"], stats["received"], 0, 0), stats
    # The brain keeps one row per (task, kind, second) (z4j 1.13's fan-out de-duplication): flaky's
    # attempts, 0.2 s apart, mostly collapse; every kind is there, task.retried included.
    kinds = kinds_of(brain, agent, t_flaky)
    assert set(kinds) == {"task.received", "task.started", "task.retried", "task.succeeded"}, kinds
    assert kinds.count("task.succeeded") == 1 and kinds.count("task.retried") <= 2, kinds

    # Every event came from this agent, through the one daemon.
    rows = brain_db(brain, "SELECT DISTINCT agent_id FROM events WHERE task_id IN (?, ?, ?)",
                    (t_add, t_boom, t_flaky))
    assert rows == [{"agent_id": hexid(agent["agent_id"])}], rows
    assert worker.alive()


# ---------------------------------------------------------------- 2


def test_celery_gunicorn_workers_and_celery_pool_share_one_brain_connection(brain, agent, daemon, broker,
                                                                             background):
    """gunicorn -w 4 --preload and a prefork Celery worker on one host: every process has its own
    local connection, the brain sees one session on one worker slot (connects does not move)."""
    worker = start_worker(background, brain, daemon, broker)
    web, base = start_web(background, daemon, broker)
    settled = daemon.stats()
    connects = settled["connects"]
    # The first session, then one re-handshake on the same slot (documented: the daemon reconnects
    # once when its clients' capabilities change) so that the brain learns the worker's commands.
    assert connects == 2 and settled["uplink_state"] == "connected", settled

    # 32 requests, 8 at a time, enqueue 2 tasks each: the kernel spreads them over the workers.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: get_json(f"{base}/enqueue/2"), range(32)))
    task_ids = [tid for a in answers for tid in a["task_ids"]]
    web_pids = {a["pid"] for a in answers}
    assert len(task_ids) == 64 and all(a["accepted"] == 2 for a in answers), answers
    assert web_pids <= set(web.children()), (web_pids, web.children())
    assert len(web_pids) >= 2, f"32 concurrent requests all went to gunicorn worker {web_pids}"

    def all_succeeded():
        rows = brain_db(brain, "SELECT task_id, state FROM tasks WHERE task_id IN (%s)"
                        % ",".join("?" * len(task_ids)), tuple(task_ids))
        done = [r for r in rows if r["state"] == "success"]
        return len(done) == len(task_ids), f"{len(done)}/{len(task_ids)} success; {[r['state'] for r in rows][:8]}"

    wait_for(all_succeeded, 40, "the 64 enqueued tasks to succeed in the brain", interval=0.5)
    # Each task has the web app's task.sent (from a gunicorn worker) and the Celery worker's events.
    sample = task_ids[:: len(task_ids) // 4]
    for tid in sample:
        kinds = kinds_of(brain, agent, tid)
        # task.received once or twice (main process and pool child, when a second apart).
        assert sorted(set(kinds)) == ["task.received", "task.sent", "task.started", "task.succeeded"], (tid, kinds)
        assert 4 <= len(kinds) <= 5, (tid, kinds)

    stats = daemon.stats()
    clients = stats["client_list"]
    by_pid: Dict[int, List[dict]] = {}
    for c in clients:
        by_pid.setdefault(c["pid"], []).append(c)
    celery_children = set(worker.children())
    web_connected = set(by_pid) & set(web.children())
    celery_connected = set(by_pid) & celery_children
    assert worker.pid in by_pid, f"the Celery main process ({worker.pid}) is not connected: {clients}"
    assert celery_connected, f"no prefork child of {worker.pid} ({celery_children}) is connected: {clients}"
    assert web_connected >= web_pids, f"gunicorn workers {web_pids} not all connected: {clients}"
    assert web.pid not in by_pid, "the gunicorn master (preloaded, serves nothing) should not connect"
    assert len(by_pid) >= 1 + len(celery_connected) + len(web_pids) >= 4, clients
    frameworks = {c["pid"]: c.get("framework") for c in clients}
    assert all(frameworks[p] == "flask" for p in web_connected), frameworks
    # One uplink for all of them: no new session, no failure, one worker slot at the brain.
    assert stats["connects"] == connects and stats["uplink_state"] == "connected", stats
    assert not stats["failures_by_class"], stats
    slots = brain_db(brain, "SELECT worker_id, state FROM agent_workers WHERE agent_id = ?",
                     (hexid(agent["agent_id"]),))
    assert [s["worker_id"] for s in slots] == [stats["worker_id"]], (slots, stats["worker_id"])
    # 64 task.sent from gunicorn + 4 events per task from Celery (task.received from the main
    # process and from the pool child, started, succeeded) + the worker's worker.online and the
    # worker.heartbeat of one or two health reports (see above), all acknowledged by the brain.
    final = daemon.wait_stats(lambda s: s["acked"] >= 64 * 5 + 2 and s["spool_depth"] == 0, 20, "322 events acked")
    assert 322 <= final["received"] <= 323, final
    assert (final["acked"], final["refused"], final["dropped"]) == (final["received"], 0, 0), final
    assert final["connects"] == connects, final


# ---------------------------------------------------------------- 3


def test_celery_web_requests_stay_fast_and_count_drops_while_the_daemon_is_down(brain, agent, daemon, broker,
                                                                                background):
    """The daemon stopped: every request still answers 200 in well under a second; each gunicorn
    worker's client queues up to its queue size (5 here) and counts every further event as dropped,
    exactly as many as its emit() calls refused; once the daemon is back, the queued events reach
    the brain and the dropped ones never do."""
    queue_size = 5
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    web, base = start_web(background, daemon, broker, Z4J_E2E_QUEUE_SIZE=str(queue_size))

    def request(_):
        t0 = time.monotonic()
        answer = get_json(f"{base}/enqueue/1", timeout=10)
        return answer, time.monotonic() - t0

    # Daemon up: every event is taken and sent.
    with ThreadPoolExecutor(4) as pool:
        warm = list(pool.map(request, range(8)))
    assert all(a["accepted"] == 1 for a, _ in warm), warm
    warm_ids = [a["task_ids"][0] for a, _ in warm]
    daemon.wait_stats(lambda s: s["acked"] >= 8 and s["spool_depth"] == 0, 20, "the 8 warm-up events acked")

    assert daemon.stop() == 0
    with ThreadPoolExecutor(4) as pool:
        outage = list(pool.map(request, range(48)))
    slow = [(round(t, 3), a["elapsed_ms"]) for a, t in outage if t >= 1.0]
    assert not slow, f"requests took >= 1 s with the daemon down: {slow}"
    assert all(a["elapsed_ms"] < 500 for a, _ in outage), [a["elapsed_ms"] for a, _ in outage]

    # Per gunicorn worker: what its emit() refused is exactly what its client counts as dropped.
    served: Dict[int, List[dict]] = {}  # pid -> its answers during the outage
    for a, _ in outage:
        served.setdefault(a["pid"], []).append(a)
    # Each answer carries its worker's stats() after the request; counters only grow, so a
    # worker's last answer is the one with the most events counted.
    last = {pid: max((a["stats"] for a in answers), key=lambda st: st["accepted"] + st["dropped"])
            for pid, answers in served.items()}
    refused_total = 0
    for pid, answers in served.items():
        refused = sum(a["emitted"] - a["accepted"] for a in answers)
        accepted = sum(a["accepted"] for a in answers)
        st = last[pid]
        assert st["dropped_queue_full"] == refused and st["dropped"] == refused, (pid, refused, st)
        assert st["dropped_unavailable"] == 0 and st["refused"] == 0, (pid, st)
        # Nothing was handed over while the daemon was down: all accepted events still wait.
        assert st["queued"] == accepted, (pid, accepted, st)
        assert accepted >= min(queue_size, len(answers)), (pid, accepted, len(answers), st)
        refused_total += refused
    assert refused_total >= 48 - 4 * (queue_size + 1) > 0, (refused_total, {p: last[p] for p in served})
    accepted_ids = [a["task_ids"][0] for a, _ in outage if a["accepted"] == 1]
    dropped_ids = [a["task_ids"][0] for a, _ in outage if a["accepted"] == 0]
    assert len(dropped_ids) == refused_total and len(accepted_ids) + len(dropped_ids) == 48

    # The daemon is back (same spool and socket): the clients reconnect on their own and hand
    # over what they queued; the brain gets those and none of the dropped ones.
    daemon.start()
    wanted = set(warm_ids + accepted_ids)

    def sent_rows():
        rows = brain_db(brain, "SELECT task_id, COUNT(*) AS n FROM events WHERE agent_id = ? AND kind = 'task.sent' "
                        "GROUP BY task_id", (hexid(agent["agent_id"]),))
        got = {r["task_id"]: r["n"] for r in rows}
        return set(got) >= wanted, {"missing": len(wanted - set(got)), "rows": len(got)}

    wait_for(sent_rows, 30, f"the {len(accepted_ids)} queued task.sent events to reach the brain", interval=0.5)
    rows = brain_db(brain, "SELECT task_id, COUNT(*) AS n FROM events WHERE agent_id = ? AND kind = 'task.sent' "
                    "GROUP BY task_id", (hexid(agent["agent_id"]),))
    got = {r["task_id"]: r["n"] for r in rows}
    assert set(got) == wanted and set(got.values()) == {1}, {
        "dropped but in the brain": sorted(set(got) & set(dropped_ids))[:5],
        "duplicates": {k: v for k, v in got.items() if v != 1}}
    # Each worker that queued events is connected again, with an empty queue.
    pending = set(served)

    def drained():
        a = get_json(f"{base}/stats")
        if a["stats"]["connected"] and a["stats"]["queued"] == 0 and a["stats"]["sent"] > 0:
            pending.discard(a["pid"])
        return not pending, {"waiting_for": sorted(pending), "last": a}

    wait_for(drained, 20, "every gunicorn worker's client to reconnect and empty its queue", interval=0.05)
    # Requests were never slowed down: the slowest one.
    print(f"[e2e] slowest request with the daemon down: {max(t for _, t in outage) * 1000:.0f} ms "
          f"({len(outage)} requests, {refused_total} events dropped, {len(accepted_ids)} queued)")
