"""arq's cron jobs on the brain's Schedules page, against the real z4j
1.13.0 brain, a real arq worker (app arqcron_proj.py, run with the python
of the arq venv) and Redis: the worker serves the scheduler `arq-cron`
through the daemon.

* both cron jobs are listed with their cron text in the brain's field
  order (arq's `weekday="sun"` is cron's 0; seconds last), function,
  queue, timezone and next run; "Trigger now" and nothing that writes;
* the worker's own cron runs (every 2 s) count, and the job ran;
* "Trigger now" enqueues the nightly job through the worker's pool, the
  worker runs it (its Redis key), and it counts as a run;
* a restarted worker gives the same rows (same ids), its run counters
  carried on from those it published.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import brain as brainmod
from harness import HERE, wait_for
from test_celery_beat import Api, command, env_for
from test_hueyperiodic import READ_ONLY_CAPS as CAPS, counter, refused_disable

OWNER = "arq-cron"


class ArqApi(Api):
    def rows(self) -> dict:
        status, _, body = self.call("GET", "?limit=50")
        assert status == 200, f"GET schedules: HTTP {status} {body}"
        return {s["name"]: s for s in body["items"] if s["scheduler"] == OWNER}

    def capabilities(self) -> list:
        status, _, caps = self.call("GET", "/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return sorted(caps.get(OWNER) or [])


def start_worker(background, daemon, env):
    python = str(brainmod.alt_venv() / "bin" / "python")
    worker = background([python, "-m", "arq", "arqcron_proj.WorkerSettings"], daemon.workdir, "arq-worker", env)
    wait_for(lambda: (worker.check_alive() or "Starting worker for" in worker.log_text(), worker.log_tail(5)),
             30, "the arq worker to start", interval=0.2)
    return worker


def test_arq_cron_jobs_are_listed_and_trigger_now_runs_the_job(
        brain, request, minted_agents, daemon_factory, redis_server, background):
    # A project of its own: the brain keeps one arq-cron stream per project.
    agent = brain.mint_agent(f"e2e-arqcron-{os.urandom(2).hex()}", project=f"ac-{uuid.uuid4().hex[:8]}")
    minted_agents.append(agent)
    daemon = daemon_factory(agent)
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    db = redis_server.fresh_db()
    env = env_for(daemon, redis_server.url(db), PYTHONPATH=str(HERE))
    t0 = time.monotonic()
    worker = start_worker(background, daemon, env)
    api = ArqApi(brain, agent["project_slug"])

    rows = api.wait_rows("the two cron jobs on the Schedules page", lambda r: {"nightly", "cron:tick"} <= set(r), 60)
    print(f"[e2e] rows on the page {time.monotonic() - t0:.2f} s after the start", file=sys.stderr)
    nightly, tick = rows["nightly"], rows["cron:tick"]
    assert (nightly["engine"], nightly["task_name"], nightly["kind"], nightly["expression"],
            nightly["timezone"]) == ("arq", "arqcron_proj.nightly_report", "cron", "30 2 * * 0", "UTC"), nightly
    assert (nightly["source"], nightly["queue"], nightly["is_enabled"]) == \
        ("arq-cron:code", "arqcron-e2e", True), nightly
    assert nightly["next_run_at"] and tick["expression"] == "* * * * * */2", (nightly, tick)
    assert api.capabilities() == CAPS

    # The worker's own cron runs count, and the job ran.
    tick = api.wait_rows("cron:tick's runs to count", lambda r: r["cron:tick"]["total_runs"] >= 2)["cron:tick"]
    assert tick["last_run_at"], tick
    # (arq enqueues a cron job up to a second ahead, deferred to its time: the
    # run counts when enqueued, the key moves when it has run.)
    wait_for(lambda: (counter(redis_server, db, "ac:tick") >= 2, None), 30, "cron:tick to run twice")

    # Trigger now: enqueued through the worker's pool, run, and a run.
    assert counter(redis_server, db, "ac:nightly") == 0
    assert counter(redis_server, db, "ac:started") == 1  # the application's on_startup ran too
    t1 = time.monotonic()
    status, location, _ = api.call("POST", f"/{nightly['id']}/trigger")
    assert status == 200 and location, (status, location)
    api.wait_applied(location)
    done = command(brain, agent["project_slug"], location.rsplit("/", 1)[-1])
    assert done["status"] == "completed", done
    result = done["result"]["trigger_result"]
    assert result["status"] == "success" and result["result"]["task_id"], done
    wait_for(lambda: (worker.check_alive() or counter(redis_server, db, "ac:nightly") == 1, None), 30,
             "the triggered nightly job to run")
    print(f"[e2e] trigger now to run: {time.monotonic() - t1:.2f} s", file=sys.stderr)
    api.wait_rows("the trigger to count as a run", lambda r: r["nightly"]["total_runs"] == 1)

    # Nothing that writes: the jobs are code.
    refused_disable(api, nightly["id"])

    # A restarted worker: the same rows (ids) again, its counters carried on
    # from those it published (and cron:tick's runs add to them).
    before = api.rows()
    ids = {name: row["id"] for name, row in before.items()}
    worker.stop(timeout=10)
    # (The stopped worker's last due time may be a second ahead of the stop:
    # arq enqueues ahead. Runs due 2 s after it are the new worker's.)
    new_runs_from = (datetime.now(timezone.utc) + timedelta(seconds=2)).replace(tzinfo=None, microsecond=0)
    start_worker(background, daemon, env)
    again = api.wait_rows("the restarted worker's rows, counters carried on",
                          lambda r: (r["cron:tick"]["last_run_at"] or "") >= new_runs_from.isoformat()
                          and r["nightly"]["total_runs"] == 1, 60)
    assert {name: row["id"] for name, row in again.items()} == ids
    assert again["cron:tick"]["total_runs"] > before["cron:tick"]["total_runs"], (before, again)
    stats = daemon.stats()
    assert not any(k in (stats.get("refused_by_reason") or {}) for k in ("invalid_event", "legacy_kind")), stats
