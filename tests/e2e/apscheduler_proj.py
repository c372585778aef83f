"""An APScheduler 3 process for tests/e2e/test_apscheduler.py: a
BlockingScheduler with three jobs, served to z4j-agentd by
`z4j_agentd.apscheduler.install`. Each job appends a line to a file, the
effect the tests look for. Argument: the directory of those files."""

import os
import sys

from apscheduler.schedulers.blocking import BlockingScheduler

import z4j_agentd.apscheduler


def write_marker(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    out = sys.argv[1]
    scheduler = BlockingScheduler(timezone="UTC")
    scheduler.add_job(write_marker, "interval", hours=1, args=[os.path.join(out, "hourly"), "hourly"],
                      id="hourly-marker")
    scheduler.add_job(write_marker, "cron", day_of_week="mon-fri", hour=2, minute=30,
                      args=[os.path.join(out, "nightly"), "nightly"], id="weekday-report")
    scheduler.add_job(write_marker, "interval", seconds=1, args=[os.path.join(out, "tick"), "tick"], id="tick")
    z4j_agentd.apscheduler.install(scheduler)
    print("scheduler starting", flush=True)
    scheduler.start()
