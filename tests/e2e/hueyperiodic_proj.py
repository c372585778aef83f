"""The Huey app of test_hueyperiodic.py: two periodic tasks and the
scheduler served from the consumer, as the Huey integration's install does:
`periodic.watch(huey)` where the instance is made (so the consumer's first
periodic check counts), `periodic.serve(huey)` in the consumer's
`on_startup` (each worker calls it; the second call is a no-op).

    huey_consumer hueyperiodic_proj.huey -k thread -w 2

Broker: `Z4J_E2E_BROKER` (a redis:// URL). Each task adds 1 to a Redis key
(`hp:<task>`), so a test sees that it ran. The daemon's socket comes from
`Z4J_SOCKET_PATH`.
"""

from __future__ import annotations

import os

import redis
from huey import RedisHuey, crontab

from z4j_agentd.huey import periodic

BROKER = os.environ["Z4J_E2E_BROKER"]

huey = RedisHuey("hueyperiodic-e2e", url=BROKER, utc=True)
periodic.watch(huey)
_redis = redis.Redis.from_url(BROKER)


@huey.periodic_task(crontab(minute="*/5", hour="9-17", day_of_week="1-5"))
def office_report():
    _redis.incr("hp:office_report")


@huey.periodic_task(crontab())
def every_minute():
    _redis.incr("hp:every_minute")


@huey.on_startup()
def serve_schedules():
    periodic.serve(huey)
