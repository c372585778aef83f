"""APScheduler 3 through z4j-agentd, against the real z4j 1.13.0 brain.

One BlockingScheduler process (tests/e2e/apscheduler_proj.py, which calls
`z4j_agentd.apscheduler.install(scheduler)`) and one daemon for the module,
in a project of its own. Its jobs write lines to files, the effect checked:

* the jobs are on the Schedules page with their kind, expression (crontab
  weekdays), arguments and next run; the scheduler's own runs count;
* "trigger now" runs the job in the scheduler at once;
* the brain's create (a function named `module:function`), update, the
  disable/enable switch and delete change the scheduler's jobs and show on
  the page; a job the scheduler could not run is refused with the reason.
"""

from __future__ import annotations

import sys

import pytest

from harness import HERE, Background, wait_for
from sched_api import Api, client_env, module_agent_daemon

OWNER = "apscheduler"
CAPS = ["create", "delete", "disable", "enable", "external_schedule_mutation_v1", "list", "trigger_now",
        "update"]


@pytest.fixture(scope="module")
def aps(brain, daemon_bin, run_dir, sock_dir, all_daemons, minted_agents):
    agent, daemon = module_agent_daemon(brain, daemon_bin, run_dir, sock_dir, all_daemons, minted_agents,
                                        "apscheduler")
    out = daemon.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    proc = Background([sys.executable, str(HERE / "apscheduler_proj.py"), str(out)], daemon.workdir,
                      "apscheduler", client_env(daemon, HERE), run_dir=run_dir)
    try:
        api = Api(brain, agent["project_slug"], OWNER)
        api.wait_rows("APScheduler's jobs on the Schedules page",
                      lambda r: {"hourly-marker", "weekday-report", "tick"} <= set(r), 60)
        yield api, out, proc
    finally:
        proc.stop(timeout=5)
        daemon.stop()


def lines(path) -> list:
    return path.read_text().split() if path.exists() else []


def test_the_jobs_are_listed_their_runs_count_and_trigger_now_runs_one(aps):
    api, out, proc = aps
    rows = api.rows()
    hourly, weekday = rows["hourly-marker"], rows["weekday-report"]
    assert (hourly["engine"], hourly["task_name"], hourly["kind"], hourly["expression"]) == \
        ("apscheduler", "__main__:write_marker", "interval", "3600"), hourly
    assert hourly["args"] == [str(out / "hourly"), "hourly"] and hourly["next_run_at"], hourly
    assert (weekday["kind"], weekday["expression"], weekday["timezone"]) == ("cron", "30 2 * * 1-5", "UTC"), weekday
    assert hourly["source"] == "apscheduler:jobstore" and hourly["is_enabled"] is True
    assert api.capabilities() == CAPS
    api.wait_rows("the tick job's runs to count", lambda r: r["tick"]["total_runs"] >= 2)

    result = api.trigger("hourly-marker")
    assert result["job_id"] == "hourly-marker", result
    wait_for(lambda: (lines(out / "hourly") == ["hourly"], lines(out / "hourly")), 10, "the triggered job to run")
    row = api.wait_rows("the trigger to count as a run", lambda r: r["hourly-marker"]["total_runs"] == 1)
    assert row["hourly-marker"]["next_run_at"] == hourly["next_run_at"]  # its cadence stays
    proc.check_alive()


def test_the_brain_creates_updates_toggles_and_deletes_jobs(aps):
    api, out, proc = aps
    target = str(out / "created")
    api.native("create", name="e2e-created", task_name="__main__:write_marker", kind="interval",
               expression="3600", timezone="UTC", queue=None, args=[target, "first"], kwargs={}, is_enabled=True)
    row = api.wait_rows("the created job", lambda r: "e2e-created" in r)["e2e-created"]
    assert (row["kind"], row["expression"], row["args"]) == ("interval", "3600", [target, "first"]), row
    api.trigger("e2e-created")
    wait_for(lambda: (lines(out / "created") == ["first"], lines(out / "created")), 10, "the created job to run")

    # update: a cron cadence (Sunday, as crontab counts) and new arguments
    api.native("update", "e2e-created", kind="cron", expression="15 4 * * 0", args=[target, "second"])
    row = api.wait_rows("the updated job", lambda r: r["e2e-created"]["kind"] == "cron")["e2e-created"]
    assert (row["expression"], row["args"]) == ("15 4 * * 0", [target, "second"]), row
    assert row["next_run_at"][11:16] == "04:15", row
    api.trigger("e2e-created")
    wait_for(lambda: (lines(out / "created")[-1:] == ["second"], lines(out / "created")), 10,
             "the updated job to run with its new arguments")

    # the enable/disable switch pauses and resumes the job
    api.toggle("e2e-created", "disable")
    row = api.wait_rows("the job paused", lambda r: r["e2e-created"]["is_enabled"] is False)["e2e-created"]
    assert row["next_run_at"] is None, row
    api.toggle("e2e-created", "enable")
    api.wait_rows("the job resumed", lambda r: r["e2e-created"]["is_enabled"] is True
                  and r["e2e-created"]["next_run_at"])

    # a job APScheduler could not run is refused with the reason, and not added
    error = api.native("create", refused=True, name="e2e-bad", task_name="__main__:write_marker", kind="cron",
                       expression="99 * * * *", timezone="UTC", queue=None, args=[], kwargs={}, is_enabled=True)
    assert "cannot run the cron expression" in error, error
    error = api.native("create", refused=True, name="e2e-bad", task_name="nosuch.module:f", kind="interval",
                       expression="60", timezone="UTC", queue=None, args=[], kwargs={}, is_enabled=True)
    assert "cannot import the function" in error, error

    api.native("delete", "e2e-created")
    api.wait_rows("the deleted job to leave the page", lambda r: "e2e-created" not in r and "e2e-bad" not in r)
    proc.check_alive()
