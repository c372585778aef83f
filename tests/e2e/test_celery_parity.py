"""Where z4j-agentd's Celery integration already does better than the z4j-celery
1.13.0 agent (issue 17, "Where we are already better"), row by row, against the
real z4j 1.13.0 brain:

    celery -A celery_parity_proj worker --pool=prefork --concurrency=2   (no -E: no Celery events)
        -> z4j_agentd.celery.install(app) -> z4j-agentd -> brain

| row | z4j-celery 1.13.0 | test |
|---|---|---|
| every task row has args and kwargs | often empty | test_parity_every_task_row_has_its_args_and_kwargs |
| results stored as JSON | a repr string (`"{'attempts': 3}"`) | test_parity_results_are_stored_as_json |
| failures have runtime_ms | null | test_parity_failures_have_runtime_ms |
| a retried task has its real retry_count | 0 | test_parity_retried_task_has_its_real_retry_count |
| started/succeeded events carry the task name | `<unknown:...>` | test_parity_every_event_carries_the_real_task_name |
| states right without `celery worker -E` | 20 of 20 stay `received` | test_parity_states_are_right_without_celery_events |

test_celery.py already checks one task of each kind (add's args, boom's
traceback, flaky's dict result through the REST API); this module checks
each row on every task it sends, in the brain's database as well as its API.
One worker, one daemon and one agent for the whole module (module-scoped
fixture); the tasks of the first five rows are sent once, at its start.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import uuid
from types import SimpleNamespace
from typing import Dict, List

import pytest

from control import wait_brain_knows
from harness import Background, brain_db, get_task, hexid, task_events, wait_for
from test_celery import ENGINE, app_env, require_client

APP = "celery_parity_proj"
NODE = "parity@%h"


# ---------------------------------------------------------------- helpers (also used by test_celery_app_safety.py)


def start_celery_worker(bg: List[Background], run_dir, brain, daemon, env: Dict[str, str], node: str,
                        extra_args=(), name: str = "celery-worker", stop_timeout: float = 10.0) -> Background:
    """`celery -A celery_parity_proj worker` (prefork, 2 children, no -E) until it is ready, serves
    its commands through the daemon and the brain knows them. Appended to `bg`, stopped by the caller."""
    require_client()
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
    worker = Background(
        [sys.executable, "-m", "celery", "-A", APP, "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=INFO", "-n", node, "--without-mingle", "--without-gossip", *extra_args],
        daemon.workdir, name, env, run_dir=run_dir)
    worker.stop_timeout = stop_timeout
    bg.append(worker)

    def ready():
        worker.check_alive()
        return " ready." in worker.log_text(), worker.log_tail(5)

    wait_for(ready, 60, f"the Celery worker {name} to be ready", interval=0.2)

    def registered():
        worker.check_alive()
        clients = daemon.stats()["client_list"]
        mine = [c for c in clients if c.get("pid") == worker.pid
                and "cancel_task" in ((c.get("capabilities") or {}).get(ENGINE) or [])]
        return bool(mine), clients

    wait_for(registered, 20, f"the Celery worker {name} to register its commands with the daemon")
    wait_brain_knows(brain, daemon.agent, {ENGINE: ["cancel_task"]})
    return worker


class Sender:
    """Sends tasks by name from the test process (no z4j_agentd here: every event comes from
    the worker); `result_backend` lets the test wait for a task's outcome in Celery itself."""

    def __init__(self, broker: str, backend: str = None) -> None:
        from celery import Celery

        self.app = Celery("e2e-parity-sender", broker=broker, backend=backend)
        self.app.conf.update(broker_connection_retry_on_startup=True, task_serializer="json",
                             result_serializer="json", accept_content=["json"])

    def send(self, name: str, args=(), kwargs=None, **options) -> str:
        short = name.rsplit(".", 1)[-1]
        task_id = f"e2e-{short}-{uuid.uuid4().hex[:12]}"
        self.app.send_task(name, args=list(args), kwargs=kwargs or {}, task_id=task_id, **options)
        return task_id

    def close(self) -> None:
        self.app.close()


def task_rows(brain, task_ids: List[str]) -> Dict[str, dict]:
    """The brain's `tasks` rows (raw database columns; JSON columns as stored) by task id."""
    rows = brain_db(brain, "SELECT * FROM tasks WHERE engine = ? AND task_id IN (%s)" % ",".join("?" * len(task_ids)),
                    (ENGINE, *task_ids))
    return {r["task_id"]: r for r in rows}


def event_rows(brain, agent: dict, task_ids: List[str]) -> List[dict]:
    """The brain's `events` rows of these tasks from this agent, payload decoded."""
    rows = brain_db(brain, "SELECT task_id, kind, occurred_at, payload FROM events WHERE agent_id = ? AND task_id IN "
                    "(%s) ORDER BY occurred_at" % ",".join("?" * len(task_ids)), (hexid(agent["agent_id"]), *task_ids))
    for r in rows:
        r["payload"] = json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
    return rows


def stored_json(value):
    """A JSON column as the brain's SQLite keeps it, decoded once."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


# ---------------------------------------------------------------- the module's worker


@pytest.fixture(scope="module")
def parity(brain, redis_server, run_dir, module_daemon):
    agent, daemon = module_daemon("celery-parity")
    bg: List[Background] = []
    sender = None
    try:
        daemon.start()
        broker = redis_server.url(redis_server.fresh_db())
        worker = start_celery_worker(bg, run_dir, brain, daemon, app_env(daemon, broker), NODE)
        sender = Sender(broker)
        p = "celery_proj."
        q = f"{APP}."
        sent = SimpleNamespace(
            add_kw=sender.send(p + "add", (2,), {"y": 40}),
            echo=sender.send(q + "echo", (1, "a", [2, 3]), {"k": {"n": 1}, "flag": True}),
            echo_empty=sender.send(q + "echo"),
            boom=sender.send(p + "boom"),
            retried=sender.send(q + "slow_flaky", (2,)),
            flaky_fast=sender.send(p + "flaky", (1,)),
            bulk=[sender.send(p + "add", (i, i)) for i in range(20)],
        )
        yield SimpleNamespace(brain=brain, agent=agent, daemon=daemon, worker=worker, sender=sender, sent=sent,
                              node=NODE.replace("%h", socket.gethostname()))
    finally:
        if sender is not None:
            sender.close()
        for proc in reversed(bg):
            proc.stop(timeout=proc.stop_timeout)
        daemon.stop()


def all_sent(sent) -> List[str]:
    return [sent.add_kw, sent.echo, sent.echo_empty, sent.boom, sent.retried, sent.flaky_fast, *sent.bulk]


def wait_finished(parity, task_ids: List[str], timeout: float = 40) -> Dict[str, dict]:
    """Until every task is success or failure in the brain; their rows."""
    def check():
        rows = task_rows(parity.brain, task_ids)
        done = [t for t, r in rows.items() if r["state"] in ("success", "failure")]
        return len(done) == len(task_ids), f"{len(done)}/{len(task_ids)} finished: " + str(
            sorted({r['state'] for r in rows.values()}))

    wait_for(check, timeout, f"{len(task_ids)} tasks to finish in the brain", interval=0.5)
    return task_rows(parity.brain, task_ids)


# ---------------------------------------------------------------- rows


def test_parity_worker_runs_without_celery_events(parity):
    """The premise of every row: the worker was started without -E, so nothing here comes from
    Celery's own event stream (z4j-celery needs it), only from the integration's signal receivers."""
    text = parity.worker.log_text()
    assert re.search(r"task events: OFF", text), text[:3000]
    assert "-E" not in parity.worker.argv and "--task-events" not in parity.worker.argv


def test_parity_every_task_row_has_its_args_and_kwargs(parity):
    """Row "every task row had args and kwargs": on every task this module sent (positional only,
    keyword only, both, none, nested values, failed and retried tasks included), the brain's row
    has exactly the args and kwargs it was sent with, as JSON arrays and objects."""
    s = parity.sent
    want = {
        s.add_kw: ([2], {"y": 40}),
        s.echo: ([1, "a", [2, 3]], {"k": {"n": 1}, "flag": True}),
        s.echo_empty: ([], {}),
        s.boom: ([], {}),
        s.retried: ([2], {}),
        s.flaky_fast: ([1], {}),
        **{tid: ([i, i], {}) for i, tid in enumerate(s.bulk)},
    }
    rows = wait_finished(parity, list(want))
    got = {tid: (stored_json(r["args"]), stored_json(r["kwargs"])) for tid, r in rows.items()}
    wrong = {tid: (got.get(tid), w) for tid, w in want.items() if got.get(tid) != w}
    assert not wrong, f"{len(wrong)} rows without their arguments (got, want): {dict(list(wrong.items())[:5])}"
    # The API shows the same.
    api = get_task(parity.brain, parity.agent["project_slug"], ENGINE, s.echo)
    assert (api["args"], api["kwargs"]) == want[s.echo], api


def test_parity_results_are_stored_as_json(parity):
    """Row "JSON results": a dict result is a JSON object in the brain's row and in its API (z4j-celery
    1.13.0 stores "{'attempts': 3}", the result's repr, as a string); an int is a JSON number."""
    s = parity.sent
    rows = wait_finished(parity, [s.echo, s.flaky_fast, s.add_kw])
    echo = stored_json(rows[s.echo]["result"])
    assert echo == {"args": [1, "a", [2, 3]], "kwargs": {"k": {"n": 1}, "flag": True},
                    "nested": {"list": [1, "two", None], "ok": True}}, rows[s.echo]["result"]
    assert stored_json(rows[s.flaky_fast]["result"]) == {"attempts": 2}, rows[s.flaky_fast]["result"]
    assert stored_json(rows[s.add_kw]["result"]) == 42, rows[s.add_kw]["result"]
    api = get_task(parity.brain, parity.agent["project_slug"], ENGINE, s.flaky_fast)
    assert api["result"] == {"attempts": 2} and isinstance(api["result"], dict), api
    # The event itself carries the JSON value, not its repr.
    ev = [e for e in event_rows(parity.brain, parity.agent, [s.echo]) if e["kind"] == "task.succeeded"]
    assert len(ev) == 1 and ev[0]["payload"]["result"] == echo, ev


def test_parity_failures_have_runtime_ms(parity):
    """Row "runtime_ms on failures": a failed task's row has its run time in ms (z4j-celery 1.13.0
    leaves it null), measured in the process that ran it, and so does its task.failed event."""
    s = parity.sent
    rows = wait_finished(parity, [s.boom])
    row = rows[s.boom]
    assert row["state"] == "failure" and row["exception"] == "ValueError", row
    assert isinstance(row["runtime_ms"], int) and 0 <= row["runtime_ms"] < 10_000, row["runtime_ms"]
    ev = [e for e in event_rows(parity.brain, parity.agent, [s.boom]) if e["kind"] == "task.failed"]
    assert len(ev) == 1 and ev[0]["payload"]["runtime_ms"] == row["runtime_ms"], ev
    # Successes have it too (test_celery.py checks add's), every one of them.
    bulk = wait_finished(parity, s.bulk)
    assert all(isinstance(r["runtime_ms"], int) and r["runtime_ms"] >= 0 for r in bulk.values()), \
        [r["runtime_ms"] for r in bulk.values()]


def test_parity_retried_task_has_its_real_retry_count(parity):
    """Row "the real retry_count": slow_flaky(2) fails twice, each retry 1.1 s later (so the brain,
    which keeps one event per task, kind and second, keeps both task.retried events), then succeeds:
    its row says retry_count 2 (z4j-celery 1.13.0 says 0) and the events count 1, then 2."""
    s = parity.sent
    rows = wait_finished(parity, [s.retried])
    row = rows[s.retried]
    assert row["state"] == "success" and stored_json(row["result"]) == {"attempts": 3}, row
    assert row["retry_count"] == 2, row
    retried = [e for e in event_rows(parity.brain, parity.agent, [s.retried]) if e["kind"] == "task.retried"]
    assert [e["payload"]["retry_count"] for e in retried] == [1, 2], retried
    # Celery's reason: "Retry in 1.1s: RuntimeError('slow_flaky attempt 1')".
    assert [f"slow_flaky attempt {n}" in e["payload"]["reason"] for n, e in enumerate(retried, 1)] == [True, True], \
        retried
    api = get_task(parity.brain, parity.agent["project_slug"], ENGINE, s.retried)
    assert api["retry_count"] == 2, api
    # The worker really retried twice.
    assert len(re.findall(rf"slow_flaky\[{s.retried}\] retry: Retry in 1.1s", parity.worker.log_text())) == 2


def test_parity_every_event_carries_the_real_task_name(parity):
    """Row "real task names on every event": every event of every task this module sent, started and
    succeeded included (z4j-celery 1.13.0 sends `<unknown:...>` on those), names the task, and no
    event or row of this agent says `<unknown`."""
    s = parity.sent
    ids = all_sent(s)
    rows = wait_finished(parity, ids)
    names = {tid: r["name"] for tid, r in rows.items()}
    expected = {s.add_kw: "celery_proj.add", s.echo: f"{APP}.echo", s.echo_empty: f"{APP}.echo",
                s.boom: "celery_proj.boom", s.retried: f"{APP}.slow_flaky", s.flaky_fast: "celery_proj.flaky",
                **{t: "celery_proj.add" for t in s.bulk}}
    assert names == expected, {t: (names.get(t), n) for t, n in expected.items() if names.get(t) != n}
    events = event_rows(parity.brain, parity.agent, ids)
    by_kind: Dict[str, int] = {}
    for e in events:
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
        assert e["payload"].get("task_name") == expected[e["task_id"]], e
    # Every kind the tasks went through, each named.
    assert {"task.received", "task.started", "task.succeeded", "task.failed", "task.retried"} <= set(by_kind), by_kind
    assert by_kind["task.started"] >= len(ids) and by_kind["task.succeeded"] == len(ids) - 1, by_kind
    unknown = brain_db(parity.brain, "SELECT kind, task_id FROM events WHERE agent_id = ? AND "
                       "(payload LIKE '%<unknown%')", (hexid(parity.agent["agent_id"]),))
    assert unknown == [], unknown
    assert not [n for n in names.values() if n.startswith("<unknown")]


def test_parity_states_are_right_without_celery_events(parity):
    """Row "correct states without -E": a task due in 2 s that sleeps 2 s is seen `received` while it
    waits, `started` while it runs and `success` after, in that order, with no Celery event stream;
    and 20 of 20 tasks sent at once end `success` (z4j-celery 1.13.0 leaves them all `received`)."""
    brain, agent = parity.brain, parity.agent
    tid = parity.sender.send("celery_proj.sleepy", (2,), countdown=2)
    seen = []

    def watch():
        t = get_task(brain, agent["project_slug"], ENGINE, tid)
        state = t and t["state"]
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        return state == "success", seen

    wait_for(watch, 30, f"task {tid} to reach success", interval=0.1)
    assert seen == ["received", "started", "success"], seen
    row = get_task(brain, agent["project_slug"], ENGINE, tid)
    assert row["received_at"] and row["started_at"] and row["finished_at"], row
    assert row["received_at"] < row["started_at"] < row["finished_at"], row
    assert row["result"] == 2 and row["runtime_ms"] >= 1900 and row["worker_name"] == parity.node, row
    kinds = sorted({e["kind"] for e in task_events(brain, agent["project_slug"], ENGINE, tid)})
    assert kinds == ["task.received", "task.started", "task.succeeded"], kinds

    bulk = wait_finished(parity, parity.sent.bulk)
    states = [r["state"] for r in bulk.values()]
    assert states.count("success") == 20, states
    assert all(stored_json(bulk[t]["result"]) == 2 * i for i, t in enumerate(parity.sent.bulk))
    # Every event the worker sent was taken by the daemon and acknowledged by the brain.
    stats = parity.daemon.wait_stats(lambda st: st["spool_depth"] == 0, 20, "the spool to drain")
    assert (stats["refused"], stats["dropped"]) == (0, 0) and stats["acked"] == stats["received"], stats
