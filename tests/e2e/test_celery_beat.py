"""celery beat through z4j-agentd, against the real z4j 1.13.0 brain.

A real `celery beat` (app tests/e2e/beat_proj/beat_app.py, which only calls
`z4j_agentd.celery.install(app)`) declares the scheduler `celery-beat` on
the daemon's socket; the brain activates its stream and beat publishes
its schedules (frames and digests built by the client itself). Each test
has its own brain project: the brain keeps one celery-beat stream per
project, and a snapshot that leaves out a row of another test's epoch is
refused by the brain.

* the static schedule: listed with its kind, expression, arguments and
  queue; beat's own sends count as runs; "trigger now" sends the task,
  which a real worker runs (success, result in the brain), and counts as a
  run of its schedule;
* django-celery-beat (DatabaseScheduler, SQLite): the brain's create,
  update, disable, enable and delete change the PeriodicTask rows and the
  Schedules page; an edit made in the database directly (as in the Django
  admin) reaches the page too; a create beat could not run is refused with
  the reason and written nowhere.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import urllib.error
import urllib.request
import uuid

import brain_bootstrap as bb
from harness import HERE, get_task, wait_for

OWNER = "celery-beat"
PROJ = HERE / "beat_proj"
# What the brain's native-capabilities shows (it leaves out the snapshot capability).
READ_CAPS = ["list", "trigger_now"]
WRITE_CAPS = ["create", "delete", "disable", "enable", "external_schedule_mutation_v1", "update"]


# ---------------------------------------------------------------- set-up


def fresh_agent(brain, request, minted_agents) -> dict:
    project = f"beat-{uuid.uuid4().hex[:8]}"
    a = brain.mint_agent(f"e2e-{request.node.name[:30]}-{os.urandom(2).hex()}", project=project)
    minted_agents.append(a)
    return a


def env_for(daemon, broker: str, **extra) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
           "PYTHONPATH": str(PROJ), "Z4J_SOCKET_PATH": str(daemon.socket_path), "Z4J_E2E_BROKER": broker}
    env.update(extra)
    return env


def start_beat(background, daemon, env: dict, *extra):
    beat = background([sys.executable, "-m", "celery", "-A", "beat_app", "beat", "--loglevel=INFO", *extra],
                      daemon.workdir, "celery-beat", env)
    wait_for(lambda: (beat.check_alive() or "beat: Starting..." in beat.log_text(), beat.log_tail(5)), 60,
             "celery beat to start", interval=0.2)
    return beat


class Api:
    """The brain's REST API with an `admin:*` key (schedule writes need it)."""

    def __init__(self, brain, slug: str) -> None:
        self.brain, self.slug = brain, slug
        self.key = bb.create_api_key(brain.rest(), scopes=["admin:*"])

    def call(self, method: str, path: str, body=None):
        """-> (HTTP status, Location header, decoded body)."""
        url = f"{self.brain.url}/api/v1/projects/{self.slug}/schedules{path}"
        req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None
                                     else (b"" if method == "POST" else None))
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, resp.headers.get("Location"), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, exc.headers.get("Location"), raw.decode(errors="replace")

    def rows(self) -> dict:
        status, _, body = self.call("GET", "?limit=50")
        assert status == 200, f"GET schedules: HTTP {status} {body}"
        return {s["name"]: s for s in body["items"] if s["scheduler"] == OWNER}

    def wait_rows(self, what: str, pred, timeout: float = 30.0) -> dict:
        def check():
            rows = self.rows()
            return bool(pred(rows)), rows

        return wait_for(check, timeout, what, interval=0.3)

    def capabilities(self) -> list:
        status, _, caps = self.call("GET", "/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return sorted(caps.get(OWNER) or [])

    def wait_applied(self, location: str, timeout: float = 30.0) -> dict:
        op_id = location.rstrip("/").rsplit("/", 1)[-1]

        def check():
            status, _, op = self.call("GET", f"/native-operations/{op_id}")
            assert status == 200, f"native operation: HTTP {status} {op}"
            assert op["status"] != "UNCONFIRMED", op
            return op["status"] == "APPLIED", op

        return wait_for(check, timeout, f"native operation {op_id} to be APPLIED", interval=0.3)

    def refused_create(self, **definition) -> str:
        """A create the scheduler refuses: the brain's operation ends
        UNCONFIRMED; returns its error."""
        body = {"request_id": str(uuid.uuid4()), "scheduler": OWNER, "operation": "create",
                "definition": definition}
        status, location, answer = self.call("POST", "/native-operations", body)
        assert status == 202 and location, (status, answer)
        op_id = location.rstrip("/").rsplit("/", 1)[-1]

        def check():
            status, _, op = self.call("GET", f"/native-operations/{op_id}")
            assert status == 200 and op["status"] != "APPLIED", (status, op)
            return op["status"] == "UNCONFIRMED", op

        return wait_for(check, 30, f"native operation {op_id} to be refused", interval=0.3)["error"] or ""

    def refreshed(self, method: str, path, body=None):
        """A write as the page makes it: with the row as just read (`path(row)`,
        `body(row)`), read again and retried when the brain answers that the row
        changed since (a snapshot after a run gives the row a new control token)."""
        for _ in range(3):
            status, location, answer = self.call(method, *((path(),) + ((body(),) if body else ())))
            if status != 409 or "changed since it was displayed" not in str(answer):
                return status, location, answer
        return status, location, answer

    def native(self, operation: str, target=None, **definition) -> dict:
        """A native operation on the row named `target` (none for a create)."""
        def body():
            b = {"request_id": str(uuid.uuid4()), "scheduler": OWNER, "operation": operation,
                 "definition": definition}
            if target is not None:
                row = self.rows()[target]
                b.update(schedule_id=row["id"], observed_control_token=row["control_token"])
            return b

        status, location, answer = self.refreshed("POST", lambda: "/native-operations", body)
        assert status == 202 and location, (operation, status, answer)
        return self.wait_applied(location)


def command(brain, slug: str, command_id: str) -> dict:
    status, body = brain.api("GET", f"/api/v1/projects/{slug}/commands/{command_id}")
    assert status == 200, f"GET command: HTTP {status} {body}"
    return body


# ---------------------------------------------------------------- tests


def test_celery_beat_lists_its_static_schedule_and_trigger_now_runs_the_task(
        brain, request, minted_agents, daemon_factory, redis_server, background):
    agent = fresh_agent(brain, request, minted_agents)
    daemon = daemon_factory(agent)
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    env = env_for(daemon, redis_server.url(redis_server.fresh_db()), Z4J_E2E_BEAT_TICK="1")
    worker = background([sys.executable, "-m", "celery", "-A", "beat_app", "worker", "--pool=solo",
                         "--loglevel=INFO", "-n", "beat-e2e@%h", "--without-mingle", "--without-gossip"],
                        daemon.workdir, "celery-worker", env)
    start_beat(background, daemon, env, "-s", str(daemon.workdir / "celerybeat-schedule"))
    api = Api(brain, agent["project_slug"])

    rows = api.wait_rows("beat's three schedules on the Schedules page",
                         lambda r: {"add-hourly", "nightly-report", "add-tick"} <= set(r), 60)
    hourly, nightly = rows["add-hourly"], rows["nightly-report"]
    assert (hourly["engine"], hourly["task_name"], hourly["kind"], hourly["expression"]) == \
        ("celery", "beat_app.add", "interval", "3600"), hourly
    assert (hourly["args"], hourly["kwargs"], hourly["queue"], hourly["source"]) == \
        ([20, 22], {}, "celery", "celery-beat:static"), hourly
    assert hourly["total_runs"] == 0 and hourly["last_run_at"] is None and hourly["next_run_at"], hourly
    assert (nightly["kind"], nightly["expression"], nightly["timezone"]) == ("cron", "30 2 * * *", "UTC"), nightly
    assert api.capabilities() == READ_CAPS

    # beat's own sends are runs of their schedule.
    tick = api.wait_rows("add-tick's runs to show", lambda r: r["add-tick"]["total_runs"] >= 2)["add-tick"]
    assert tick["last_run_at"], tick

    # Trigger now: the task is sent, the worker runs it, and it is a run.
    status, location, _ = api.call("POST", f"/{hourly['id']}/trigger")
    assert status == 200 and location, (status, location)
    op = api.wait_applied(location)
    assert op["schedule_id"] == hourly["id"], op
    done = command(brain, agent["project_slug"], location.rsplit("/", 1)[-1])
    assert done["status"] == "completed", done
    receipt = done["result"]
    task_id = receipt["trigger_result"]["result"]["task_id"]
    assert receipt["trigger_result"]["status"] == "success" and task_id, receipt

    def ran():
        worker.check_alive()
        task = get_task(brain, agent["project_slug"], "celery", task_id)
        return task is not None and task["state"] == "success", task

    task = wait_for(ran, 60, "the triggered task to succeed in the brain")
    assert task["name"] == "beat_app.add" and task["result"] == 42 and task["args"] == [20, 22], task
    hourly = api.wait_rows("the trigger to count as a run of add-hourly",
                           lambda r: r["add-hourly"]["total_runs"] == 1)["add-hourly"]
    assert hourly["last_run_at"], hourly

    # The daemon restarted while beat runs: a new epoch, and trigger now works again.
    daemon.stop()
    daemon.start()
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the restarted daemon's brain session")
    wait_for(lambda: (api.capabilities() == READ_CAPS, api.capabilities()), 60,
             "the celery-beat stream to be active again after the daemon's restart", interval=0.5)
    status, location, _ = api.call("POST", f"/{hourly['id']}/trigger")
    assert status == 200 and location, (status, location)
    api.wait_applied(location)
    api.wait_rows("the second trigger to count", lambda r: r["add-hourly"]["total_runs"] == 2)

    # What the brain refuses for a static schedule stays refused (no write).
    status, _, body = api.call("POST", f"/{hourly['id']}/disable")
    assert status == 409 and "read-only" in str(body), (status, body)
    stats = daemon.stats()
    assert not any(k in (stats.get("refused_by_reason") or {}) for k in ("invalid_event", "legacy_kind")), stats


def dcb_rows(db) -> dict:
    con = sqlite3.connect(str(db), timeout=20)
    try:
        con.row_factory = sqlite3.Row
        sql = ("SELECT t.id, t.name, t.task, t.args, t.enabled, i.every, i.period, c.minute, c.hour "
               "FROM django_celery_beat_periodictask t "
               "LEFT JOIN django_celery_beat_intervalschedule i ON i.id = t.interval_id "
               "LEFT JOIN django_celery_beat_crontabschedule c ON c.id = t.crontab_id")
        return {r["name"]: dict(r) for r in con.execute(sql)}
    finally:
        con.close()


def test_django_celery_beat_schedules_are_created_updated_toggled_and_deleted_from_the_brain(
        brain, request, minted_agents, daemon_factory, redis_server, background):
    import subprocess

    agent = fresh_agent(brain, request, minted_agents)
    daemon = daemon_factory(agent)
    db = daemon.workdir / "beat.sqlite3"
    env = env_for(daemon, redis_server.url(redis_server.fresh_db()), Z4J_E2E_BEAT_DB=str(db))
    migrate = subprocess.run([sys.executable, "-m", "django", "migrate", "--settings=beat_settings", "-v", "0"],
                             env=env, cwd=str(PROJ), capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    beat_args = ("-S", "django_celery_beat.schedulers:DatabaseScheduler",
                 "-s", str(daemon.workdir / "celerybeat-schedule"))
    beat = start_beat(background, daemon, env, *beat_args)
    api = Api(brain, agent["project_slug"])

    rows = api.wait_rows("the PeriodicTask rows on the Schedules page",
                         lambda r: {"add-hourly", "nightly-report"} <= set(r), 60)
    assert rows["add-hourly"]["source"] == "celery-beat:database", rows
    pk = dcb_rows(db)["add-hourly"]["id"]
    assert rows["add-hourly"]["external_id"] == f"dcb:{pk}", rows
    assert api.capabilities() == sorted(READ_CAPS + WRITE_CAPS)

    # trigger now on a database row: sent, and counted as a run
    status, location, _ = api.call("POST", f"/{rows['add-hourly']['id']}/trigger")
    assert status == 200 and location, (status, location)
    api.wait_applied(location)
    api.wait_rows("the trigger to count as a run", lambda r: r["add-hourly"]["total_runs"] == 1)

    # create
    api.native("create", name="e2e-created", task_name="beat_app.add", kind="interval", expression="3600",
               timezone="UTC", queue=None, args=[2, 3], kwargs={}, is_enabled=True)
    stored = dcb_rows(db)["e2e-created"]
    assert (stored["task"], json.loads(stored["args"]), stored["enabled"], stored["every"], stored["period"]) == \
        ("beat_app.add", [2, 3], 1, 3600, "seconds"), stored
    row = api.wait_rows("the created schedule", lambda r: "e2e-created" in r)["e2e-created"]
    assert (row["kind"], row["expression"], row["args"]) == ("interval", "3600", [2, 3]), row

    # Creates beat could not run are refused with the reason and written nowhere (saved, the
    # interval would stop beat with an OverflowError at every start; the cron would never run).
    bad = dict(task_name="beat_app.add", timezone="UTC", queue=None, args=[], kwargs={}, is_enabled=True)
    error = api.refused_create(name="e2e-huge", kind="interval", expression="100000000000000", **bad)
    assert "an interval is at most 2147483647 seconds" in error, error
    error = api.refused_create(name="e2e-badcron", kind="cron", expression="99 foo * * *", **bad)
    assert "celery beat cannot run schedule 'e2e-badcron'" in error, error
    assert not {"e2e-huge", "e2e-badcron"} & set(dcb_rows(db)), dcb_rows(db)
    beat.check_alive()

    # update: a new cadence (cron) and new arguments
    api.native("update", "e2e-created", kind="cron", expression="*/10 * * * *", args=[5, 5])
    stored = dcb_rows(db)["e2e-created"]
    assert (json.loads(stored["args"]), stored["every"], stored["minute"], stored["hour"]) == \
        ([5, 5], None, "*/10", "*"), stored
    row = api.wait_rows("the updated schedule",
                        lambda r: r["e2e-created"]["expression"] == "*/10 * * * *")["e2e-created"]
    assert (row["kind"], row["args"]) == ("cron", [5, 5]), row

    # disable and enable, as the Schedules page's switch does
    for action, flag in (("disable", 0), ("enable", 1)):
        status, location, body = api.refreshed("POST",
                                               lambda a=action: f"/{api.rows()['e2e-created']['id']}/{a}")
        assert status == 202 and location, (action, status, body)
        api.wait_applied(location)
        assert dcb_rows(db)["e2e-created"]["enabled"] == flag, (action, dcb_rows(db))
        row = api.wait_rows(f"the schedule {action}d",
                            lambda r, f=flag: r["e2e-created"]["is_enabled"] == bool(f))["e2e-created"]

    # an edit made in the database itself (the Django admin) reaches the page
    # (a save through Django also marks the table changed, which beat and z4j-agentd look at first)
    con = sqlite3.connect(str(db), timeout=20)
    with con:
        con.execute("UPDATE django_celery_beat_periodictask SET args = '[9, 9]' WHERE name = 'nightly-report'")
        con.execute("INSERT OR REPLACE INTO django_celery_beat_periodictasks (ident, last_update) "
                    "VALUES (1, strftime('%Y-%m-%d %H:%M:%f', 'now'))")
    con.close()
    api.wait_rows("the database edit on the Schedules page", lambda r: r["nightly-report"]["args"] == [9, 9])

    # delete
    api.native("delete", "e2e-created")
    assert "e2e-created" not in dcb_rows(db)
    api.wait_rows("the deleted schedule to leave the page", lambda r: "e2e-created" not in r)

    # Rows removed while beat is stopped: one for good, one that django-celery-beat
    # creates again from beat_schedule when beat starts (same name, a new id). The
    # restarted beat's new epoch takes both changes (the brain refuses a new epoch's
    # snapshot that simply leaves out a row of an earlier epoch).
    api.native("create", name="e2e-gone", task_name="beat_app.add", kind="interval", expression="60",
               timezone="UTC", queue=None, args=[], kwargs={}, is_enabled=True)
    api.wait_rows("e2e-gone on the page", lambda r: "e2e-gone" in r)
    beat.stop()
    con = sqlite3.connect(str(db), timeout=20)
    with con:
        con.execute("DELETE FROM django_celery_beat_periodictask WHERE name IN ('e2e-gone', 'nightly-report')")
    con.close()
    start_beat(background, daemon, env, *beat_args)
    new_pk = wait_for(lambda: ("nightly-report" in dcb_rows(db), dcb_rows(db).get("nightly-report")), 30,
                      "django-celery-beat to create nightly-report again")["id"]
    rows = api.wait_rows("the restarted beat's schedules on the page",
                         lambda r: "e2e-gone" not in r and "nightly-report" in r
                         and r["nightly-report"]["external_id"] == f"dcb:{new_pk}", 60)
    assert rows["nightly-report"]["args"] == [0, 0], rows
    assert api.capabilities() == sorted(READ_CAPS + WRITE_CAPS)
    stats = daemon.stats()
    assert not any(k in (stats.get("refused_by_reason") or {}) for k in ("invalid_event", "legacy_kind")), stats
