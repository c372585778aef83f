"""The Celery app of test_celery_beat.py, wired as a user's project is:
`z4j_agentd.celery.install(app)` in the app module, nothing else.

    celery -A beat_app beat -s <file>                    # the static schedule
    celery -A beat_app beat -S django_celery_beat.schedulers:DatabaseScheduler
    celery -A beat_app worker

Broker and result backend: `Z4J_E2E_BROKER` (a redis:// URL). With
`Z4J_E2E_BEAT_DB` (a SQLite file) Django is set up with beat_settings.py,
for django-celery-beat. The daemon's socket comes from `Z4J_SOCKET_PATH`.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab

import z4j_agentd.celery

if os.environ.get("Z4J_E2E_BEAT_DB"):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "beat_settings")
    import django

    django.setup()

BROKER = os.environ["Z4J_E2E_BROKER"]

app = Celery("beat_app", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
    timezone="UTC",
    beat_max_loop_interval=1,
)
app.conf.beat_schedule = {
    "add-hourly": {"task": "beat_app.add", "schedule": 3600.0, "args": (20, 22), "options": {"queue": "celery"}},
    "nightly-report": {"task": "beat_app.add", "schedule": crontab(minute=30, hour=2), "args": (0, 0)},
}
if os.environ.get("Z4J_E2E_BEAT_TICK"):
    app.conf.beat_schedule["add-tick"] = {"task": "beat_app.add", "schedule": 2.0, "args": (1, 1)}


@app.task
def add(x, y):
    return x + y


z4j_agentd.celery.install(app)
