"""`celery beat` for gw_celery_proj's app, watched by the stock z4j-celerybeat agent (PyPI 1.13.0,
on the z4j-bare runtime): a static `beat_schedule`, and the agent started as z4j-celerybeat's
README has a plain Celery project do it, with `install_agent(schedulers=[CeleryBeatSchedulerAdapter
(celery_app=app)])`, here once beat has initialised (`beat_init`). Runs from `brain.gateway_venv()`:

    celery -A gw_beat_proj beat -s <schedule file>

The worker of gw_celery_proj runs what beat (or "trigger now") sends. The process only runs the
scheduler (no engine adapter), so the Celery worker stays the one process that runs Celery
commands. Everything else comes from the environment, as for gw_celery_proj: GW_BROKER,
Z4J_BRAIN_URL, Z4J_TOKEN, Z4J_HMAC_SECRET, Z4J_PROJECT_ID, Z4J_AGENT_NAME, Z4J_HOME.
"""

from __future__ import annotations

from celery.schedules import crontab
from celery.signals import beat_init
from z4j_bare import install_agent
from z4j_celerybeat import CeleryBeatSchedulerAdapter

from gw_celery_proj import app

app.conf.timezone = "UTC"
app.conf.beat_schedule = {
    # Neither is due while the test runs: what the worker runs of add(20, 22) is what
    # "trigger now" sent.
    "gw-add-hourly": {"task": "gw_celery_proj.add", "schedule": 3600.0, "args": (20, 22),
                      "options": {"queue": "celery"}},
    "gw-nightly": {"task": "gw_celery_proj.add", "schedule": crontab(minute=30, hour=2), "args": (0, 0)},
}

_runtime = None


@beat_init.connect
def _start_z4j_agent(sender=None, **_kwargs):
    global _runtime
    _runtime = install_agent(engines=[], schedulers=[CeleryBeatSchedulerAdapter(celery_app=app)])
