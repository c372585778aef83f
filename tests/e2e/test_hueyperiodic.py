"""Huey's periodic tasks on the brain's Schedules page, against the real
z4j 1.13.0 brain, a real `huey_consumer` (app hueyperiodic_proj.py) and
Redis: the consumer serves the scheduler `huey-periodic` through the daemon.

* both periodic tasks are listed with their cron text, task, timezone,
  next run and source; the brain offers "Trigger now", enable and
  disable, and nothing else that writes (they are code);
* the consumer's own first periodic check (every_minute is due at once)
  counts as a run, and the task ran;
* "Trigger now" enqueues office_report, the consumer runs it (its Redis
  key), and it counts as a run;
* disable (the brain's REST API) revokes every_minute in Huey (its revoke
  key in Redis) and the row shows disabled; a consumer started then skips
  the task at its first check (no run, none counted); enable restores it;
* a restarted consumer (`-k process`) gives the same rows (same ids: the
  source keys are the code's), its run counters carried on from those it
  published, and its Scheduler process's first check counts.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from harness import HERE, resp, wait_for
from test_celery_beat import Api, command, env_for

OWNER = "huey-periodic"
#: What the brain's native-capabilities shows for a code-defined scheduler
#: that cannot even enable or disable (arq's cron jobs: test_arqcron.py).
READ_ONLY_CAPS = ["external_schedule_mutation_v1", "list", "read", "trigger_now"]
# What it shows for huey-periodic: enable and disable; no create, update, delete.
CAPS = ["disable", "enable", "external_schedule_mutation_v1", "list", "read", "trigger_now"]
#: Where Huey's RedisStorage keeps `revoke_all(every_minute)`: a field of its
#: results hash (the storage drops the name's `-`).
REVOKE = ("huey.results.hueyperiodice2e", "rt:hueyperiodic_proj.every_minute")


class HueyApi(Api):
    def rows(self) -> dict:
        status, _, body = self.call("GET", "?limit=50")
        assert status == 200, f"GET schedules: HTTP {status} {body}"
        return {s["name"]: s for s in body["items"] if s["scheduler"] == OWNER}

    def capabilities(self) -> list:
        status, _, caps = self.call("GET", "/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return sorted(caps.get(OWNER) or [])


def counter(redis_server, db: int, key: str) -> int:
    reply = resp(redis_server.port, ["SELECT", str(db)], ["INCRBY", key, "0"])[1]
    assert reply.startswith(b":"), reply
    return int(reply[1:])


def refused_disable(api, schedule_id: str) -> None:
    """The brain's "disable" of a row of a scheduler with READ_ONLY_CAPS:
    refused by the brain itself, nothing is sent; the row stays enabled."""
    status, _, body = api.call("POST", f"/{schedule_id}/disable")
    assert status == 409 and "does not support this operation" in str(body), (status, body)
    assert next(r for r in api.rows().values() if r["id"] == schedule_id)["is_enabled"] is True


def revoked(redis_server, db: int) -> bool:
    reply = resp(redis_server.port, ["SELECT", str(db)], ["HEXISTS", *REVOKE])[1]
    assert reply in (b":0\r\n", b":1\r\n", b":0", b":1"), reply
    return reply.startswith(b":1")


def switch(api, name: str, action: str) -> dict:
    """The Schedules page's switch: POST /schedules/<id>/<action>, applied,
    then the row as the page shows it."""
    status, location, body = api.refreshed("POST", lambda: f"/{api.rows()[name]['id']}/{action}")
    assert status == 202 and location, (action, status, body)
    api.wait_applied(location)
    return api.wait_rows(f"{name} {action}d", lambda r: r[name]["is_enabled"] is (action == "enable"))[name]


def start_consumer(background, daemon, env, kind="thread"):
    consumer = background([str(Path(sys.executable).parent / "huey_consumer"), "hueyperiodic_proj.huey",
                           "-k", kind, "-w", "2"], daemon.workdir, "huey-consumer", env)
    wait_for(lambda: (consumer.check_alive() or "Huey consumer started" in consumer.log_text(),
                      consumer.log_tail(5)), 30, "huey_consumer to start", interval=0.2)
    return consumer


def test_huey_periodic_tasks_are_listed_and_trigger_now_runs_the_task(
        brain, request, minted_agents, daemon_factory, redis_server, background):
    # A project of its own: the brain keeps one huey-periodic stream per project.
    agent = brain.mint_agent(f"e2e-hueyperiodic-{os.urandom(2).hex()}", project=f"hp-{uuid.uuid4().hex[:8]}")
    minted_agents.append(agent)
    daemon = daemon_factory(agent)
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    db = redis_server.fresh_db()
    # office_report's hours: twelve hours from now, so that it never falls
    # due on its own while the test runs (it counts the task's runs).
    hours = f"{(datetime.now(timezone.utc).hour + 12) % 24}"
    env = env_for(daemon, redis_server.url(db), PYTHONPATH=str(HERE), HP_REPORT_HOURS=hours)
    t0 = time.monotonic()
    consumer = start_consumer(background, daemon, env)
    api = HueyApi(brain, agent["project_slug"])

    rows = api.wait_rows("the two periodic tasks on the Schedules page",
                         lambda r: {"office_report", "every_minute"} <= set(r), 60)
    print(f"[e2e] rows on the page {time.monotonic() - t0:.2f} s after the start", file=sys.stderr)
    report, every = rows["office_report"], rows["every_minute"]
    assert (report["engine"], report["task_name"], report["kind"], report["expression"], report["timezone"]) == \
        ("huey", "hueyperiodic_proj.office_report", "cron", f"*/5 {hours} * * 1-5", "UTC"), report
    assert (report["source"], report["queue"], report["is_enabled"]) == \
        ("huey-periodic:code", "hueyperiodic-e2e", True), report
    assert report["next_run_at"] and every["expression"] == "* * * * *", (report, every)
    assert api.capabilities() == CAPS

    # The consumer's first periodic check sent every_minute: a run, and it ran.
    every = api.wait_rows("every_minute's first run to count",
                          lambda r: r["every_minute"]["total_runs"] >= 1)["every_minute"]
    assert every["last_run_at"], every
    wait_for(lambda: (counter(redis_server, db, "hp:every_minute") >= 1, None), 30, "every_minute to run")

    # Trigger now: the task runs in the consumer and counts as a run.
    assert counter(redis_server, db, "hp:office_report") == 0
    t1 = time.monotonic()
    status, location, _ = api.call("POST", f"/{report['id']}/trigger")
    assert status == 200 and location, (status, location)
    op = api.wait_applied(location)
    assert op["schedule_id"] == report["id"], op
    done = command(brain, agent["project_slug"], location.rsplit("/", 1)[-1])
    assert done["status"] == "completed", done
    assert done["result"]["trigger_result"]["status"] == "success", done
    assert done["result"]["trigger_result"]["result"]["task_id"], done
    wait_for(lambda: (consumer.check_alive() or counter(redis_server, db, "hp:office_report") == 1, None), 30,
             "the triggered office_report to run")
    print(f"[e2e] trigger now to run: {time.monotonic() - t1:.2f} s", file=sys.stderr)
    api.wait_rows("the trigger to count as a run", lambda r: r["office_report"]["total_runs"] == 1)

    # Other writes are refused by the brain itself: the tasks are code.
    status, _, body = api.call("POST", "/native-operations", {
        "request_id": str(uuid.uuid4()), "scheduler": OWNER, "operation": "delete",
        "schedule_id": report["id"], "observed_control_token": api.rows()["office_report"]["control_token"],
        "definition": {}})
    assert status == 409 and "does not support this operation" in str(body), (status, body)

    # Disable: Huey's revoke_all, in Redis; a consumer started now skips
    # the task at its first check, and that is no run.
    t2 = time.monotonic()
    row = switch(api, "every_minute", "disable")
    print(f"[e2e] disable to the row disabled: {time.monotonic() - t2:.2f} s", file=sys.stderr)
    assert revoked(redis_server, db) and row["next_run_at"] is None, row
    runs, ran = row["total_runs"], counter(redis_server, db, "hp:every_minute")
    sessions = daemon.stats()["connects"]
    consumer.stop(timeout=10)
    consumer = start_consumer(background, daemon, env)
    # The restarted consumer's stream: a new daemon session (the processes'
    # hello changed), then the brain's activation of a new epoch.
    daemon.wait_stats(lambda st: st["connects"] > sessions, 30, "the daemon's new session")
    wait_for(lambda: (api.capabilities() == CAPS, api.capabilities()), 30,
             "the restarted consumer's huey-periodic stream to be active", interval=0.3)
    wait_for(lambda: (consumer.check_alive() or "hueyperiodic_proj.every_minute" in consumer.log_text()
                      and "was revoked, not executing" in consumer.log_text(), consumer.log_tail(5)), 30,
             "the restarted consumer to skip the revoked every_minute")
    row = switch(api, "every_minute", "enable")  # its snapshot holds the counters after that check
    assert not revoked(redis_server, db) and row["next_run_at"], row
    assert (row["total_runs"], counter(redis_server, db, "hp:every_minute")) == (runs, ran), row

    # A restarted consumer, now with process workers: the same rows (ids)
    # again, its counters carried on from those it published, and its first
    # check (in the Scheduler's own process) adds a run of every_minute.
    before = api.rows()
    ids = {name: row["id"] for name, row in before.items()}
    consumer.stop(timeout=10)
    restarted_at = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    start_consumer(background, daemon, env, "process")
    again = api.wait_rows("the restarted consumer's rows, counters carried on",
                          lambda r: (r["every_minute"]["last_run_at"] or "") >= restarted_at.isoformat()
                          and r["every_minute"]["total_runs"] >= 2 and r["office_report"]["total_runs"] == 1, 60)
    assert {name: row["id"] for name, row in again.items()} == ids
    assert again["every_minute"]["total_runs"] > before["every_minute"]["total_runs"], (before, again)
    stats = daemon.stats()
    assert not any(k in (stats.get("refused_by_reason") or {}) for k in ("invalid_event", "legacy_kind")), stats
