"""The Huey app of test_hueyperiodic.py: two periodic tasks, on the
Schedules page through `z4j_agentd.huey.install(huey)` (which counts the
consumer's periodic runs from import on and serves the scheduler from the
consumer).

    huey_consumer hueyperiodic_proj.huey -k thread -w 2

Broker: `Z4J_E2E_BROKER` (a redis:// URL). Each task adds 1 to a Redis key
(`hp:<task>`), so a test sees that it ran. The daemon's socket comes from
`Z4J_SOCKET_PATH`.
"""

from __future__ import annotations

import os

import redis
from huey import RedisHuey, crontab

import z4j_agentd.huey

BROKER = os.environ["Z4J_E2E_BROKER"]

huey = RedisHuey("hueyperiodic-e2e", url=BROKER, utc=True)
z4j_agentd.huey.install(huey)
_redis = redis.Redis.from_url(BROKER)


# Office hours: the test sets them to an hour far from the time it runs, so
# this task runs only when triggered (the test counts its runs).
REPORT_HOURS = os.environ.get("HP_REPORT_HOURS", "9-17")


@huey.periodic_task(crontab(minute="*/5", hour=REPORT_HOURS, day_of_week="1-5"))
def office_report():
    _redis.incr("hp:office_report")


@huey.periodic_task(crontab())
def every_minute():
    _redis.incr("hp:every_minute")
