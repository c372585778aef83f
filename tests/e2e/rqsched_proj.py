"""rq-scheduler's jobs for tests/e2e/test_rqscheduler.py. `write_marker`
runs in an rq worker (it appends a line to a file, the effect the tests
look for); `python rqsched_proj.py <redis url> <dir>` schedules three jobs
in rq-scheduler's registry (run with the alt venv, which has rq-scheduler)."""

import os
import sys
from datetime import datetime, timedelta, timezone


def write_marker(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    from redis import Redis
    from rq_scheduler import Scheduler

    url, out = sys.argv[1], sys.argv[2]
    func = "rqsched_proj.write_marker"  # by import path: this file runs as __main__ here
    scheduler = Scheduler(connection=Redis.from_url(url))
    scheduler.cron("30 2 * * 1-5", func=func, args=[os.path.join(out, "nightly"), "nightly"],
                   id="weekday-report", queue_name="reports")
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=func,
                       args=[os.path.join(out, "hourly"), "hourly"], interval=3600, id="hourly-marker")
    scheduler.enqueue_at(datetime(2030, 1, 2, 3, 4, 5), func, os.path.join(out, "once"), "once",
                         job_id="new-year")
