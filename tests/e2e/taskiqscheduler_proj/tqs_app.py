"""The taskiq app of test_taskiqscheduler: one task, scheduled by a label
(cron with an id, interval without one) and, through the test, in a
taskiq-redis ListRedisScheduleSource. Each run of the task adds to the
Redis counter `e2e:mark:<tag>`, which the test reads."""

import os

import redis
from taskiq import TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource
from taskiq_redis import ListQueueBroker, ListRedisScheduleSource

import z4j_agentd.taskiq.scheduler

URL = os.environ["Z4J_E2E_BROKER"]
PREFIX = os.environ.get("Z4J_E2E_SCHEDULE_PREFIX", "e2e-schedule")

broker = ListQueueBroker(URL, queue_name="e2e-tqs")
redis_source = ListRedisScheduleSource(URL, prefix=PREFIX)


@broker.task(task_name="tqs:mark", schedule=[
    {"cron": "30 2 * * *", "args": ["nightly"], "schedule_id": "nightly-mark"},
    {"interval": 3600, "args": ["hourly"]},  # taskiq sends an interval schedule once at start
])
def mark(tag: str, n: int = 1) -> int:
    return int(redis.Redis.from_url(URL).incrby(f"e2e:mark:{tag}", n))


scheduler = TaskiqScheduler(broker, sources=[LabelScheduleSource(broker), redis_source])
z4j_agentd.taskiq.scheduler.install(scheduler)
