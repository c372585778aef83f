"""The Workers page and queue depths from real Celery workers, through
`z4j_agentd.celery.install(app)`, one z4j-agentd and the real z4j 1.13.0
brain: a prefork worker on Redis and one on RabbitMQ, side by side on one
daemon (started once for the module).

Each worker's main process reads its own details in-process (stats, active
tasks, queues, registered tasks, conf) and measures the depth of the queues
it consumes and the queues its app declares; the brain shows them on the
Workers page (REST: workers, worker detail, lint) and as queue depths
(`GET /stats`, the only place 1.13.0 shows them). Every app here declares,
besides the queue its worker consumes, a queue nobody consumes holding
waiting messages and a priority queue holding messages of several
priorities (on Redis these land in one key per priority step).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

from control import wait_command_done
from harness import Background, Daemon, brain_db, hexid, resp, wait_for
from test_health import brain_depths, brain_workers

ENGINE = "celery"
INTERVAL = "1"  # seconds between a worker's health reports (Z4J_CELERY_HEALTH_INTERVAL)
HEARTBEAT = 10  # the brain's heartbeat interval: the daemon forwards reports this often
PRIORITIES = (0, 3, 6, 9, 9)

#: The app both workers run (and the test process sends with): queues named after a tag.
APP_SOURCE = '''
from celery import Celery
from kombu import Exchange, Queue


def make_app(broker, tag):
    app = Celery("health_proj", broker=broker, backend=None, set_as_current=False)
    work, idle, prio = f"work-{tag}", f"idle-{tag}", f"prio-{tag}"
    app.conf.update(
        task_queues=[Queue(work, Exchange(work), routing_key=work),
                     Queue(idle, Exchange(idle), routing_key=idle),
                     Queue(prio, Exchange(prio), routing_key=prio, queue_arguments={"x-max-priority": 9})],
        task_default_queue=work,
        task_routes={"health_proj.slow": {"queue": work}},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_serializer="json", accept_content=["json"],
        task_acks_late=False,  # the defaults the brain's lint flags
        broker_transport_options={"priority_steps": [0, 3, 6, 9], "queue_order_strategy": "priority"},
    )

    @app.task(name="health_proj.add")
    def add(x, y):
        return x + y

    @app.task(name="health_proj.slow")
    def slow(seconds):
        import time
        time.sleep(seconds)
        return seconds

    return app
'''

WORKER_FOOTER = '''
import os

import z4j_agentd.celery

app = make_app(os.environ["Z4J_E2E_BROKER"], os.environ["Z4J_E2E_TAG"])
z4j_agentd.celery.install(app)
'''


def make_app(broker: str, tag: str):
    ns: dict = {}
    exec(compile(APP_SOURCE, "health_proj", "exec"), ns)
    return ns["make_app"](broker, tag)


# ---------------------------------------------------------------- the module's setup


class Setup:
    """One agent and daemon; one worker on Redis, one on RabbitMQ."""

    def __init__(self, brain, agent, daemon, workers: dict):
        self.brain, self.agent, self.daemon, self.workers = brain, agent, daemon, workers


def start_worker(run_dir: Path, daemon: Daemon, broker: str, kind: str, tag: str) -> dict:
    proj = daemon.workdir / "proj"
    proj.mkdir(exist_ok=True)
    (proj / "health_proj.py").write_text(APP_SOURCE + WORKER_FOOTER)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
           "PYTHONPATH": str(proj), "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_BROKER": broker,
           "Z4J_E2E_TAG": tag, "Z4J_CELERY_HEALTH_INTERVAL": INTERVAL}
    proc = Background(
        [sys.executable, "-m", "celery", "-A", "health_proj", "worker", "--pool=prefork", "--concurrency=2",
         "--loglevel=INFO", "-n", f"health-{kind}-{tag}@%h", "-Q", f"work-{tag}", "--without-mingle",
         "--without-gossip"],
        daemon.workdir, f"celery-{kind}", env, run_dir=run_dir)
    return {"proc": proc, "kind": kind, "tag": tag, "broker": broker, "name": f"health-{kind}-{tag}@",
            "work": f"work-{tag}", "idle": f"idle-{tag}", "prio": f"prio-{tag}"}


def wait_ready(worker: dict) -> None:
    proc = worker["proc"]

    def ready():
        proc.check_alive()
        return " ready." in proc.log_text(), proc.log_tail(5)

    wait_for(ready, 60, f"the Celery worker on {worker['kind']} to be ready", interval=0.2)


@pytest.fixture(scope="module")
def setup(brain, run_dir, redis_server, rabbitmq_server, module_daemon):
    try:
        import z4j_agentd.celery  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Python client is not installed in {sys.prefix} ({exc})")
    agent, daemon = module_daemon("celery-health")
    daemon.start()
    workers = {}
    try:
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's first brain session")
        redis_url = redis_server.url(redis_server.fresh_db())
        amqp_url = rabbitmq_server.url()
        # The RabbitMQ worker first: its command connection is then the longest connected,
        # the one routing by engine alone would pick for the Redis queue's purge.
        for kind, broker in (("amqp", amqp_url), ("redis", redis_url)):
            tag = uuid.uuid4().hex[:8]
            producer = make_app(broker, tag)
            # Waiting before the worker starts: 3 in a queue nobody consumes, one per priority
            # in the priority queue (nobody consumes it either).
            for i in range(3):
                producer.send_task("health_proj.add", args=[i, i], queue=f"idle-{tag}")
            for p in PRIORITIES:
                producer.send_task("health_proj.add", args=[p, p], queue=f"prio-{tag}", priority=p)
            producer.close()
            workers[kind] = start_worker(run_dir, daemon, broker, kind, tag)
        for w in workers.values():
            wait_ready(w)
        yield Setup(brain, agent, daemon, workers)
    finally:
        for w in workers.values():  # a cold shutdown: the slow task need not finish
            w["proc"].stop(timeout=10, sig=signal.SIGQUIT)
        daemon.stop()


# ---------------------------------------------------------------- reading the brain


def worker_row(setup, kind: str, pred=lambda row: True, what: str = "") -> dict:
    """The brain's Workers page row of the worker on `kind`, once `pred(row)` holds."""
    prefix = setup.workers[kind]["name"]

    def check():
        rows = [r for n, r in brain_workers(setup.brain, setup.agent).items() if n.startswith(prefix)]
        return len(rows) == 1 and pred(rows[0]), rows

    return wait_for(check, 4 * HEARTBEAT, f"the brain's Workers page to show {prefix}* {what}")[0]


def worker_detail(setup, row: dict) -> dict:
    status, detail = setup.brain.api("GET", f"/api/v1/projects/{setup.agent['project_slug']}/workers/{row['id']}")
    assert status == 200, f"GET worker: HTTP {status} {detail}"
    return detail


# ---------------------------------------------------------------- the tests


def test_redis_worker_fills_the_workers_page_and_lint_evaluates(setup, redis_server):
    """Hostname, pid, concurrency, queues; stats, active, registered and conf in the detail;
    lint evaluates the reported conf; worker.heartbeat events reach the brain."""
    w = setup.workers["redis"]
    producer = make_app(w["broker"], w["tag"])
    slow = producer.send_task("health_proj.slow", args=[25], queue=w["work"])
    producer.close()
    row = worker_row(setup, "redis", lambda r: r.get("active_tasks") == 1 and r.get("pid") == w["proc"].pid,
                     "with its pid and the slow task running")
    assert row["name"].startswith(w["name"]) and row["hostname"] == row["name"], row
    assert row["engine"] == ENGINE and row["state"] == "online", row
    assert row["concurrency"] == 2 and row["queues"] == [w["work"]], row
    assert isinstance(row["load_average"], list) and len(row["load_average"]) == 3, row

    meta = worker_detail(setup, row)["metadata"]
    stats = meta["stats"]
    assert stats["pid"] == w["proc"].pid, stats
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2, stats["pool"]
    assert stats["pool"]["implementation"] == "celery.concurrency.prefork:TaskPool", stats["pool"]
    assert stats["broker"]["transport"] == "redis" and stats["broker"]["port"] == redis_server.port, stats["broker"]
    assert "password" not in stats["broker"] and stats["prefetch_count"] == 2, stats
    assert isinstance(stats["rusage"], dict) and stats["rusage"]["maxrss"] > 0, stats
    assert [a["id"] for a in meta["active"]] == [slow.id], meta["active"]
    assert meta["active"][0]["name"] == "health_proj.slow" and meta["active"][0]["args"] == [25], meta["active"]
    assert [q["name"] for q in meta["active_queues"]] == [w["work"]], meta["active_queues"]
    assert meta["active_queues"][0]["routing_key"] == w["work"], meta["active_queues"]
    assert meta["registered"] == ["health_proj.add", "health_proj.slow"], meta["registered"]
    conf = meta["conf"]
    assert conf["task_acks_late"] is False and conf["worker_prefetch_multiplier"] == 1, conf
    assert conf["worker_concurrency"] == 2 and conf["task_default_queue"] == w["work"], conf
    assert "broker_url" not in conf and "result_backend" not in conf, conf

    status, lint = setup.brain.api("GET", f"/api/v1/projects/{setup.agent['project_slug']}/workers/lint")
    assert status == 200, f"GET lint: HTTP {status} {lint}"
    mine = [x for x in lint["workers"] if x["worker_name"] == row["name"]]
    assert len(mine) == 1 and mine[0]["evaluated"] is True, lint
    rules = {f["rule_id"] for f in mine[0]["findings"]}
    assert {"celery.acks-late-off", "celery.no-time-limit"} <= rules, mine[0]["findings"]

    beats = brain_db(setup.brain, "SELECT count(*) AS n FROM events WHERE kind = 'worker.heartbeat' "
                     "AND agent_id = ? AND json_extract(payload, '$.worker') = ?",
                     (hexid(setup.agent["agent_id"]), row["name"]))
    assert beats[0]["n"] >= 1, beats


def test_redis_queue_depths_count_priority_keys_and_unconsumed_queues(setup, redis_server):
    w = setup.workers["redis"]
    db = int(w["broker"].rsplit("/", 1)[1])
    # The priority queue's messages are in one Redis list per priority step.
    keys = resp(redis_server.port, ["SELECT", str(db)], ["KEYS", f"{w['prio']}*"])[1]
    assert keys.startswith(b"*") and int(keys[1:]) >= 2, f"priority keys of {w['prio']}: {keys}"

    def depths():
        d = brain_depths(setup.brain, setup.agent)
        want = {w["idle"]: 3, w["prio"]: len(PRIORITIES), w["work"]: 0}
        return all(d.get(k) == v for k, v in want.items()), d

    wait_for(depths, 4 * HEARTBEAT, "the brain's queue depths of the Redis worker's app")
    # A message more in the unconsumed queue shows at a later heartbeat.
    producer = make_app(w["broker"], w["tag"])
    producer.send_task("health_proj.add", args=[9, 9], queue=w["idle"])
    producer.close()
    wait_for(lambda: (lambda d: (d.get(w["idle"]) == 4, d))(brain_depths(setup.brain, setup.agent)),
             4 * HEARTBEAT, "the brain's depth of the unconsumed queue to follow a new message")


def test_rabbitmq_worker_reports_itself_and_its_queue_depths(setup):
    w = setup.workers["amqp"]
    row = worker_row(setup, "amqp", lambda r: r.get("pid") == w["proc"].pid, "with its pid")
    assert row["concurrency"] == 2 and row["queues"] == [w["work"]], row
    meta = worker_detail(setup, row)["metadata"]
    assert meta["stats"]["broker"]["transport"] == "amqp", meta["stats"]["broker"]
    assert meta["stats"]["broker"]["userid"] == "guest" and "password" not in meta["stats"]["broker"]
    assert meta["active_queues"][0]["exchange"]["name"] == w["work"], meta["active_queues"]

    def depths():
        d = brain_depths(setup.brain, setup.agent)
        want = {w["idle"]: 3, w["prio"]: len(PRIORITIES), w["work"]: 0}
        return all(d.get(k) == v for k, v in want.items()), d

    wait_for(depths, 4 * HEARTBEAT, "the brain's queue depths of the RabbitMQ worker's app")
    # The daemon's view of the report: the broker's facts.
    reports = [c["health"] for c in setup.daemon.stats()["client_list"]
               if c.get("pid") == w["proc"].pid and c.get("health")]
    assert reports, setup.daemon.stats()["client_list"]
    facts = reports[0]["engines"][ENGINE]["facts"]
    assert facts.get("broker_type") == "amqp" and facts.get("broker_connected") in ("True", True), facts


def test_purge_at_the_depth_the_brain_shows_empties_the_queue(setup, redis_server):
    """An operator's purge from the dashboard: the depth the brain shows (from the worker's own
    health report) is the purge's observed_depth. The priority queue's messages are in several
    Redis keys; all of them are emptied. A purge at a depth the queue no longer has is refused
    by the daemon (the worker reports every second, so the daemon's last report is fresher than
    the brain's depth) and nothing is purged.

    The RabbitMQ worker, on the same daemon, also declared purge_queue for celery and is
    connected: the purge goes to the Redis worker, whose report named the queue (the RabbitMQ
    worker's broker does not know it)."""
    assert setup.workers["amqp"]["proc"].alive(), "the RabbitMQ worker must still run here"
    w = setup.workers["redis"]
    queue = w["prio"]
    before = redis_lengths(redis_server, w["broker"], queue)
    assert sum(before.values()) >= 2 and sum(1 for n in before.values() if n) >= 2, before

    def shown():
        d = brain_depths(setup.brain, setup.agent)
        return d.get(queue) == sum(before.values()), d

    observed = wait_for(shown, 4 * HEARTBEAT, f"the brain to show the depth of {queue}")[queue]
    path = f"/api/v1/projects/{setup.agent['project_slug']}/commands/purge-queue"
    status, cmd = setup.brain.api("POST", path, body={"agent_id": setup.agent["agent_id"], "queue": queue,
                                                      "observed_depth": observed})
    assert status == 202, f"POST purge-queue: HTTP {status} {cmd}"
    done = wait_command_done(setup.brain, setup.agent, cmd["id"], 30)
    assert done["status"] == "completed", (done["error"], done["result"])
    assert done["result"] == {"queue": queue, "depth_before": observed, "purged": observed, "force": False}, done
    assert redis_lengths(redis_server, w["broker"], queue) == {k: 0 for k in before}

    # Two more arrive (at two priorities); the brain may still show the old depth.
    producer = make_app(w["broker"], w["tag"])
    for p in (0, 9):
        producer.send_task("health_proj.add", args=[p, p], queue=queue, priority=p)
    producer.close()

    def reported():  # the worker's own report of the new depth, as the daemon holds it
        depths = [((c["health"].get("engines") or {}).get(ENGINE) or {}).get("queue_depths", {}).get(queue)
                  for c in setup.daemon.stats()["client_list"] if c.get("pid") == w["proc"].pid and c.get("health")]
        return depths == [2], depths  # its command connection carries the reports

    wait_for(reported, 20, f"the worker to report 2 messages in {queue}")
    status, cmd = setup.brain.api("POST", path, body={"agent_id": setup.agent["agent_id"], "queue": queue,
                                                      "observed_depth": observed})
    assert status == 202, f"POST purge-queue: HTTP {status} {cmd}"
    stale = wait_command_done(setup.brain, setup.agent, cmd["id"], 30)
    assert stale["status"] == "failed", stale
    assert (f"confirm_token does not match the last reported depth 2 of queue \"{queue}\"" in stale["error"]
            and f"reported by pid {w['proc'].pid}" in stale["error"]), stale["error"]
    assert sum(redis_lengths(redis_server, w["broker"], queue).values()) == 2


def test_a_stopped_worker_says_so_with_worker_offline(setup):
    """A worker's warm shutdown sends worker.offline for it; the brain stores the event. The
    brain (1.13.0) leaves the worker's row on the Workers page as it was: every event carrying
    `data.worker` upserts the row as online, worker.offline included, and nothing ages it."""
    w = setup.workers["amqp"]
    row = worker_row(setup, "amqp", lambda r: r.get("pid") == w["proc"].pid, "with its pid")
    name = row["name"]
    assert w["proc"].stop(timeout=30) == 0, w["proc"].log_tail(20)  # SIGTERM: Celery's warm shutdown

    def offline():
        rows = brain_db(setup.brain, "SELECT payload FROM events WHERE kind = 'worker.offline' AND agent_id = ? "
                        "AND json_extract(payload, '$.worker') = ?", (hexid(setup.agent["agent_id"]), name))
        return len(rows) == 1, rows

    data = json.loads(wait_for(offline, 30, f"worker.offline of {name} in the brain")[0]["payload"])
    assert data["pid"] == w["proc"].pid and data["hostname"] == name.split("@", 1)[1], data
    after = brain_workers(setup.brain, setup.agent)[name]
    assert after["state"] == "online" and after["pid"] == w["proc"].pid, after


def redis_lengths(redis_server, broker: str, queue: str) -> dict:
    """LLEN of each Redis list holding `queue`'s messages: kombu keeps one per priority step
    (`<queue>` for step 0, `<queue>\\x06\\x16<step>` for the others)."""
    db = broker.rsplit("/", 1)[1]
    keys = [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]
    replies = resp(redis_server.port, ["SELECT", db], *(["LLEN", k] for k in keys))
    assert replies[0] == b"+OK", replies
    lengths = {}
    for key, reply in zip(keys, replies[1:]):
        assert reply.startswith(b":"), f"LLEN {key!r}: {reply!r}"
        lengths[key] = int(reply[1:])
    return lengths


