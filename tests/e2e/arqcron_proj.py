"""The arq worker of test_arqcron.py: two cron jobs, on the Schedules page
through `z4j_agentd.arq.install(WorkerSettings)` (which serves them from
the worker's on_startup, after the application's own):

    arq arqcron_proj.WorkerSettings

Redis: `Z4J_E2E_BROKER` (a redis:// URL). Each job adds 1 to a Redis key
(`ac:<job>`), so a test sees that it ran. The daemon's socket comes from
`Z4J_SOCKET_PATH`.
"""

from __future__ import annotations

import os
from datetime import timezone

from arq import cron
from arq.connections import RedisSettings

import z4j_agentd.arq


async def nightly_report(ctx):
    await ctx["redis"].incr("ac:nightly")


async def tick(ctx):
    await ctx["redis"].incr("ac:tick")


async def startup(ctx):
    await ctx["redis"].set("ac:started", "1")  # the application's own on_startup still runs


class WorkerSettings:
    functions: list = []
    cron_jobs = [
        cron(nightly_report, name="nightly", hour=2, minute=30, weekday="sun"),
        cron(tick, second=set(range(0, 60, 2))),
    ]
    redis_settings = RedisSettings.from_dsn(os.environ["Z4J_E2E_BROKER"])
    queue_name = "arqcron-e2e"
    timezone = timezone.utc
    on_startup = startup
    poll_delay = 0.2


z4j_agentd.arq.install(WorkerSettings)
