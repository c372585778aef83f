"""rq-scheduler through z4j-agentd, against the real z4j 1.13.0 brain.

One scheduler process (`python -m z4j_agentd.rq.scheduler -u <url> -i 1`,
with the alt venv's rq-scheduler), one rq worker (the test venv's rq) and
one daemon for the module, in a project of its own. The jobs
(tests/e2e/rqsched_proj.py) write lines to files, the effect checked:

* the cron, interval and one-off jobs are on the Schedules page with their
  function, arguments, queue and next run;
* "trigger now" enqueues the job's function, which the worker runs;
* the brain's create runs a new interval job (the scheduler enqueues it,
  the worker runs it, the page counts the runs); update changes its
  arguments; the disable switch stops its runs and enable starts them
  again; delete cancels it; a job rq-scheduler could not run is refused
  with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import brain as brainmod
import pytest
from harness import HERE, Background, wait_for
from sched_api import Api, client_env, module_agent_daemon

OWNER = "rq-scheduler"
CAPS = ["create", "delete", "disable", "enable", "external_schedule_mutation_v1", "list", "trigger_now",
        "update"]


@pytest.fixture(scope="module")
def rqs(brain, daemon_bin, run_dir, sock_dir, all_daemons, minted_agents, redis_server):
    alt_python = str(brainmod.alt_venv() / "bin" / "python")
    agent, daemon = module_agent_daemon(brain, daemon_bin, run_dir, sock_dir, all_daemons, minted_agents,
                                        "rqscheduler")
    out = daemon.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    url = redis_server.url(redis_server.fresh_db())
    env = client_env(daemon, HERE)
    setup = subprocess.run([alt_python, str(HERE / "rqsched_proj.py"), url, str(out)], env=env, cwd=str(HERE),
                           capture_output=True, text=True, timeout=60)
    assert setup.returncode == 0, setup.stderr[-2000:]
    started = []
    try:
        started.append(Background([str(Path(sys.executable).parent / "rq"), "worker", "-u", url, "--path", str(HERE),
                                   "-n", "rqs-e2e", "default", "reports"], daemon.workdir, "rq-worker", env,
                                  run_dir=run_dir))
        started.append(Background([alt_python, "-m", "z4j_agentd.rq.scheduler", "-u", url, "-i", "1",
                                   "--path", str(HERE)], daemon.workdir, "rqscheduler", env, run_dir=run_dir))
        api = Api(brain, agent["project_slug"], OWNER)
        api.wait_rows("rq-scheduler's jobs on the Schedules page", lambda r: len(r) >= 3, 60)
        yield api, out, started
    finally:
        for proc in reversed(started):
            proc.stop(timeout=5)
        daemon.stop()


def lines(path) -> list:
    return path.read_text().split() if path.exists() else []


def test_the_jobs_are_listed_and_trigger_now_enqueues_one_for_the_worker(rqs):
    api, out, procs = rqs
    rows = {r["external_id"]: r for r in api.rows().values()}
    assert set(rows) == {"weekday-report", "hourly-marker", "new-year"}, rows
    cron, hourly, once = rows["weekday-report"], rows["hourly-marker"], rows["new-year"]
    assert (cron["engine"], cron["task_name"], cron["kind"], cron["expression"], cron["queue"]) == \
        ("rq", "rqsched_proj.write_marker", "cron", "30 2 * * 1-5", "reports"), cron
    assert cron["name"] == "rqsched_proj.write_marker [weekday-report]" and cron["next_run_at"], cron
    assert (hourly["kind"], hourly["expression"], hourly["queue"], hourly["args"]) == \
        ("interval", "3600", "default", [str(out / "hourly"), "hourly"]), hourly
    assert (once["kind"], once["expression"]) == ("clocked", "2030-01-02T03:04:05+00:00"), once
    assert all(r["source"] == "rq-scheduler:redis" and r["is_enabled"] for r in rows.values())
    assert api.capabilities() == CAPS

    result = api.trigger(hourly["name"])
    assert result["queue"] == "default" and result["task_id"] != "hourly-marker", result
    wait_for(lambda: (lines(out / "hourly") == ["hourly"], lines(out / "hourly")), 20,
             "the worker to run the triggered job")
    row = api.wait_rows("the trigger to count as a run", lambda r: r[hourly["name"]]["total_runs"] == 1)
    assert row[hourly["name"]]["next_run_at"] == hourly["next_run_at"]  # its cadence stays
    for proc in procs:
        proc.check_alive()


def test_the_brain_creates_updates_toggles_and_deletes_jobs(rqs):
    api, out, procs = rqs
    target = str(out / "created")
    api.native("create", name="e2e-every-2s", task_name="rqsched_proj.write_marker", kind="interval",
               expression="2", timezone="UTC", queue=None, args=[target, "first"], kwargs={}, is_enabled=True)
    wait_for(lambda: (len(lines(out / "created")) >= 2, lines(out / "created")), 20,
             "the scheduler and the worker to run the created job twice")
    row = api.wait_rows("the created job's runs on the page",
                        lambda r: "e2e-every-2s" in r and r["e2e-every-2s"]["total_runs"] >= 2)["e2e-every-2s"]
    assert (row["kind"], row["expression"], row["queue"]) == ("interval", "2", None), row  # null: the scheduler's queue

    api.toggle("e2e-every-2s", "disable")
    api.wait_rows("the job disabled", lambda r: r["e2e-every-2s"]["is_enabled"] is False)
    time.sleep(1)  # a run enqueued just before the switch may still be with the worker
    count = len(lines(out / "created"))
    time.sleep(3)  # one and a half intervals (the scheduler looks every second): no run while disabled
    assert len(lines(out / "created")) == count, lines(out / "created")

    # update (while no run is on the worker: RQ writes a running job back as it ends), then enable
    api.native("update", "e2e-every-2s", args=[target, "second"])
    api.toggle("e2e-every-2s", "enable")
    wait_for(lambda: (lines(out / "created")[-1:] == ["second"], lines(out / "created")), 20,
             "the job to run again once enabled, with its new arguments")

    error = api.native("create", refused=True, name="e2e-bad", task_name="rqsched_proj.write_marker",
                       kind="interval", expression="1.5", timezone="UTC", queue=None, args=[], kwargs={},
                       is_enabled=True)
    assert "whole number of seconds" in error, error

    api.native("delete", "e2e-every-2s")
    api.wait_rows("the deleted job to leave the page", lambda r: "e2e-every-2s" not in r)
    time.sleep(1)
    count = len(lines(out / "created"))
    time.sleep(3)
    assert len(lines(out / "created")) == count, "a deleted job ran"
    for proc in procs:
        proc.check_alive()
