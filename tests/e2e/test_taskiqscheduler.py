"""The taskiq scheduler through z4j-agentd, against the real z4j 1.13.0 brain.

A real `taskiq scheduler` (app taskiqscheduler_proj/tqs_app.py, which only
calls `z4j_agentd.taskiq.scheduler.install(scheduler)`) with a
LabelScheduleSource and a taskiq-redis ListRedisScheduleSource declares
the scheduler `taskiq-scheduler`; a real `taskiq worker --workers 1` runs
what it kicks (each run adds to a Redis counter). One daemon, scheduler and
worker serve the module, in a brain project of their own.

* label schedules (one with a schedule_id, one without: keyed by content)
  and a schedule already in the Redis source are on the Schedules page; the
  scheduler's own sends count as runs;
* "trigger now" kicks the task, which the worker runs;
* the brain's create, update and delete change the Redis source, and the
  running scheduler runs a created schedule at once (not after its 60 s
  re-read); a create taskiq could not run, and a write to a label schedule,
  are refused with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import brain_bootstrap as bb
from harness import HERE, Background, Daemon, wait_for

OWNER = "taskiq-scheduler"
PROJ = HERE / "taskiqscheduler_proj"
PREFIX = "e2e-tqs"
TASK = "tqs:mark"
# What the brain's native-capabilities shows (it leaves out the snapshot capability).
CAPS = ["create", "delete", "external_schedule_mutation_v1", "list", "trigger_now", "update"]


class Api:
    """The brain's Schedules REST API with an `admin:*` key (writes need it)."""

    def __init__(self, brain, slug: str) -> None:
        self.brain, self.slug = brain, slug
        self.key = bb.create_api_key(brain.rest(), scopes=["admin:*"])

    def call(self, method: str, path: str, body=None):
        """-> (HTTP status, Location header, decoded body)."""
        req = urllib.request.Request(f"{self.brain.url}/api/v1/projects/{self.slug}/schedules{path}",
                                     method=method, data=json.dumps(body).encode() if body is not None
                                     else (b"" if method == "POST" else None))
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, resp.headers.get("Location"), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location"), exc.read().decode(errors="replace")

    def rows(self) -> dict:
        status, _, body = self.call("GET", "?limit=50")
        assert status == 200, f"GET schedules: HTTP {status} {body}"
        return {s["name"]: s for s in body["items"] if s["scheduler"] == OWNER}

    def wait_rows(self, what: str, pred, timeout: float = 20.0) -> dict:
        def check():
            rows = self.rows()
            return bool(pred(rows)), rows

        return wait_for(check, timeout, what, interval=0.3)

    def capabilities(self) -> list:
        status, _, caps = self.call("GET", "/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return sorted(caps.get(OWNER) or [])

    def outcome(self, location: str, want: str) -> dict:
        """Waits for the native operation at `location` to end `want`
        (APPLIED or UNCONFIRMED; the other one fails at once)."""
        op_id = location.rstrip("/").rsplit("/", 1)[-1]

        def check():
            status, _, op = self.call("GET", f"/native-operations/{op_id}")
            assert status == 200, f"native operation: HTTP {status} {op}"
            assert op["status"] in ("PENDING", want), op
            return op["status"] == want, op

        return wait_for(check, 30, f"native operation {op_id} to be {want}", interval=0.3)

    def native(self, operation: str, target=None, want: str = "APPLIED", **definition) -> dict:
        """A native operation on the row named `target` (none for a create),
        as the page makes it: retried when the row changed since it was read."""
        for _ in range(3):
            body = {"request_id": str(uuid.uuid4()), "scheduler": OWNER, "operation": operation,
                    "definition": definition}
            if target is not None:
                row = self.rows()[target]
                body.update(schedule_id=row["id"], observed_control_token=row["control_token"])
            status, location, answer = self.call("POST", "/native-operations", body)
            if status != 409 or "changed since it was displayed" not in str(answer):
                break
        assert status == 202 and location, (operation, status, answer)
        return self.outcome(location, want)


class Setup:
    def __init__(self, brain, agent, daemon, url, worker, scheduler) -> None:
        import redis

        self.brain, self.agent, self.daemon, self.url = brain, agent, daemon, url
        self.worker, self.scheduler = worker, scheduler
        self.api = Api(brain, agent["project_slug"])
        self.redis = redis.Redis.from_url(url)

    def alive(self) -> None:
        self.worker.check_alive()
        self.scheduler.check_alive()

    def marks(self, tag: str) -> int:
        return int(self.redis.get(f"e2e:mark:{tag}") or 0)

    def wait_marks(self, tag: str, at_least: int, timeout: float = 20.0) -> int:
        def check():
            self.alive()
            n = self.marks(tag)
            return n >= at_least, n

        return wait_for(check, timeout, f"the worker to run {TASK}({tag!r}) {at_least} time(s)", interval=0.2)

    def stored(self, schedule_id: str):
        """The schedule as the Redis source keeps it (its data key), or None."""
        raw = self.redis.get(f"{PREFIX}:data:{schedule_id}")
        return pickle.loads(raw) if raw is not None else None


def seed(url: str, schedule_id: str = "redis-daily", **fields) -> None:
    """A schedule added to the Redis source as an application does (by
    default the one there when the scheduler starts)."""
    from taskiq import ScheduledTask
    from taskiq_redis import ListRedisScheduleSource

    fields = fields or {"args": ["daily"], "kwargs": {"n": 2}, "cron": "0 6 * * *"}

    async def add():
        source = ListRedisScheduleSource(url, prefix=PREFIX)
        await source.add_schedule(ScheduledTask(task_name=TASK, labels={}, schedule_id=schedule_id,
                                                **{"args": [], "kwargs": {}, **fields}))
        await source.shutdown()

    asyncio.run(add())


@pytest.fixture(scope="module")
def setup(brain, run_dir, redis_server, daemon_bin, sock_dir, all_daemons, minted_agents):
    # A project of its own: the brain keeps one taskiq-scheduler stream per project.
    agent = brain.mint_agent(f"e2e-tqs-{os.urandom(3).hex()}", project=f"tqs-{uuid.uuid4().hex[:8]}")
    minted_agents.append(agent)
    daemon = Daemon(daemon_bin, workdir=run_dir / "daemons" / "taskiqscheduler", brain_url=brain.url, agent=agent,
                    socket_path=sock_dir / f"{len(all_daemons) + 1}.sock")
    all_daemons.append(daemon)
    started = []
    try:
        daemon.start()
        daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
        url = redis_server.url(redis_server.fresh_db())
        seed(url)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
               "PYTHONPATH": str(PROJ), "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_BROKER": url,
               "Z4J_E2E_SCHEDULE_PREFIX": PREFIX,
               # A full read of the Redis source every 5 s (default 60 s), so a schedule the
               # application adds reaches the page within this module's waits.
               "Z4J_TASKIQ_SCHEDULER_READ_INTERVAL": "5"}
        taskiq = str(Path(sys.executable).parent / "taskiq")
        worker = Background([taskiq, "worker", "tqs_app:broker", "--workers", "1"], daemon.workdir,
                            "taskiq-worker", env, run_dir=run_dir)
        started.append(worker)
        scheduler = Background([taskiq, "scheduler", "tqs_app:scheduler"], daemon.workdir, "taskiq-scheduler",
                               env, run_dir=run_dir)
        started.append(scheduler)
        s = Setup(brain, agent, daemon, url, worker, scheduler)
        s.started_at = time.monotonic()
        yield s
    finally:
        for proc in reversed(started):
            proc.stop(timeout=10)
        daemon.stop()


def label_hourly(rows: dict) -> str:
    names = [n for n in rows if n.startswith(f"{TASK} [label:")]
    assert len(names) == 1, rows
    return names[0]


def test_label_and_redis_schedules_are_listed_and_the_schedulers_sends_are_runs(setup):
    api = setup.api
    rows = api.wait_rows("the label and redis schedules on the Schedules page",
                         lambda r: {f"{TASK} [nightly-mark]", "redis-daily"} <= set(r), 60)
    assert len(rows) == 3, rows
    print(f"[e2e] taskiq scheduler: its schedules on the page {time.monotonic() - setup.started_at:.1f} s "
          f"after it started", file=sys.stderr)
    nightly, daily = rows[f"{TASK} [nightly-mark]"], rows["redis-daily"]
    assert (nightly["engine"], nightly["task_name"], nightly["kind"], nightly["expression"], nightly["timezone"],
            nightly["args"], nightly["source"], nightly["external_id"]) == \
        ("taskiq", TASK, "cron", "30 2 * * *", "UTC", ["nightly"], "taskiq-scheduler:label", "nightly-mark"), nightly
    assert nightly["next_run_at"] and nightly["total_runs"] == 0, nightly
    assert (daily["kind"], daily["expression"], daily["args"], daily["kwargs"], daily["source"]) == \
        ("cron", "0 6 * * *", ["daily"], {"n": 2}, "taskiq-scheduler:redis"), daily
    hourly = rows[label_hourly(rows)]
    assert (hourly["kind"], hourly["expression"], hourly["args"]) == ("interval", "3600", ["hourly"]), hourly
    assert hourly["external_id"].startswith("label:") and len(hourly["external_id"]) == 6 + 64, hourly
    assert api.capabilities() == CAPS

    # taskiq sends an interval schedule once at start: a run, and the worker ran it.
    setup.wait_marks("hourly", 1)
    hourly = api.wait_rows("the scheduler's send to count as a run",
                           lambda r: r[label_hourly(r)]["total_runs"] == 1)[label_hourly(rows)]
    assert hourly["last_run_at"], hourly


def test_trigger_now_kicks_the_task_and_the_worker_runs_it(setup):
    api = setup.api
    nightly = api.wait_rows("nightly-mark", lambda r: f"{TASK} [nightly-mark]" in r, 60)[f"{TASK} [nightly-mark]"]
    began = time.monotonic()
    status, location, _ = api.call("POST", f"/{nightly['id']}/trigger")
    assert status == 200 and location, (status, location)
    op = api.outcome(location, "APPLIED")
    applied = time.monotonic() - began
    assert op["schedule_id"] == nightly["id"], op
    status, done = setup.brain.api("GET", f"/api/v1/projects/{setup.agent['project_slug']}/commands/"
                                          f"{location.rsplit('/', 1)[-1]}")
    assert status == 200 and done["status"] == "completed", done
    result = done["result"]["trigger_result"]
    assert result["status"] == "success" and result["result"]["task_id"], result
    assert setup.wait_marks("nightly", 1) == 1
    print(f"[e2e] taskiq trigger now: APPLIED after {applied:.1f} s, run by the worker after "
          f"{time.monotonic() - began:.1f} s", file=sys.stderr)
    api.wait_rows("the trigger to count as a run", lambda r: r[f"{TASK} [nightly-mark]"]["total_runs"] == 1)


def test_create_update_and_delete_from_the_brain_change_the_redis_source(setup):
    api = setup.api
    api.wait_rows("the schedules", lambda r: "redis-daily" in r, 60)

    # added by the application, not through the brain: on the page after a look.
    began = time.monotonic()
    seed(setup.url, "app-added", interval=7200, args=["app"])
    row = api.wait_rows("the schedule the application added", lambda r: "app-added" in r)["app-added"]
    assert (row["kind"], row["expression"], row["args"]) == ("interval", "7200", ["app"]), row
    print(f"[e2e] taskiq: a schedule added by the application on the page after "
          f"{time.monotonic() - began:.1f} s", file=sys.stderr)

    # create: in Redis under the name as its schedule_id; the running scheduler
    # sends the new interval schedule at once (its own re-read is 60 s away).
    began = time.monotonic()
    api.native("create", name="e2e-made", task_name=TASK, kind="interval", expression="3600", args=["made"])
    stored = setup.stored("e2e-made")
    assert (stored["task_name"], stored["interval"], stored["args"]) == (TASK, 3600, ["made"]), stored
    row = api.wait_rows("the created schedule", lambda r: "e2e-made" in r)["e2e-made"]
    assert (row["kind"], row["expression"], row["args"], row["source"]) == \
        ("interval", "3600", ["made"], "taskiq-scheduler:redis"), row
    setup.wait_marks("made", 1, timeout=15)
    print(f"[e2e] taskiq create: run by the scheduler {time.monotonic() - began:.1f} s after the request",
          file=sys.stderr)

    # update: delete + add under the same schedule_id.
    api.native("update", "e2e-made", kind="cron", expression="*/10 * * * *", args=["made", 5])
    stored = setup.stored("e2e-made")
    assert (stored["cron"], stored["interval"], stored["args"]) == ("*/10 * * * *", None, ["made", 5]), stored
    api.wait_rows("the updated schedule", lambda r: r["e2e-made"]["expression"] == "*/10 * * * *"
                  and r["e2e-made"]["args"] == ["made", 5])

    # refused, with the reason, and written nowhere.
    op = api.native("create", want="UNCONFIRMED", name="e2e-bad", task_name=TASK, kind="cron",
                    expression="99 foo * * *")
    assert "cron minute field" in (op["error"] or ""), op
    assert setup.stored("e2e-bad") is None
    op = api.native("delete", f"{TASK} [nightly-mark]", want="UNCONFIRMED")
    assert "read-only" in (op["error"] or ""), op
    # Disable: taskiq has no disabled state. The scheduler declares the mutation protocol
    # (always, read-only sources or not), so the brain answers 409 itself and sends nothing
    # (without it, it sent the older schedule.external.control, and the refusal stalled the stream).
    nightly = api.rows()[f"{TASK} [nightly-mark]"]
    status, _, body = api.call("POST", f"/{nightly['id']}/disable")
    assert status == 409 and "does not support this operation" in str(body), (status, body)

    # delete: gone from Redis and from the page.
    api.native("delete", "e2e-made")
    assert setup.stored("e2e-made") is None
    api.wait_rows("the deleted schedule to leave the page", lambda r: "e2e-made" not in r and "app-added" in r)
    setup.alive()
