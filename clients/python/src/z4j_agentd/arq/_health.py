"""The Workers page and queue depths: an arq worker reports itself to the
daemon (`health`, docs/local-protocol.md).

* `queue_depths`: the worker's queue, `ZCARD` of its sorted set (what arq's
  own health line calls `queued`): the jobs waiting, deferred and running
  (arq removes a job from the set when it ends);
* `workers`: this worker, under the name its events carry: `stats` (pid,
  the pool: implementation `arq`, `max-concurrency` = `max_jobs`; jobs run
  per function in `total`; succeeded/failed/retried/revoked counts),
  `active` (the jobs running now), `active_queues` (its queue) and
  `registered` (its functions and cron jobs).

arq has no registry of workers; everything but the depth is this
process's own count. The depth is read through the worker's pool on its
loop with a deadline: while a job blocks the loop in sync code the report
goes without it (`broker_connected` false).

Each report also sends a `worker.heartbeat` event (at most one per 30 s),
which keeps the worker's row on the brain's Workers page fresh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict

from .. import _integration

log = logging.getLogger("z4j_agentd.arq")

ENGINE = "arq"
#: Seconds between two reports unless $Z4J_ARQ_HEALTH_INTERVAL says otherwise.
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "Z4J_ARQ_HEALTH_INTERVAL"
HEARTBEAT_EVENT_SECONDS = 30.0
#: The longest a report waits for the queue's depth.
DEPTH_DEADLINE = 5.0
#: Jobs listed in `active` at most.
MAX_ACTIVE = 100
_INT_MAX = 2**31 - 1


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_ARQ_HEALTH_INTERVAL in seconds, else `default`; a bad value is an error
    saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


class Health:
    """The health source of one installation."""

    def __init__(self, integration: Any) -> None:
        self.integration = integration
        self._last_heartbeat = 0.0
        self.depth_failures = 0

    def depth(self) -> int:
        queue = self.integration.queue_name
        value = self.integration.commands.on_loop(lambda redis: redis.zcard(queue),
                                                  f"the depth of queue {queue}", timeout=DEPTH_DEADLINE)
        return max(0, min(int(value), _INT_MAX))

    def worker_details(self) -> Dict[str, Any]:
        integration = self.integration
        with integration._lock:
            totals = dict(integration.totals)
            counts = dict(integration.counts)
        stats: Dict[str, Any] = {
            "pid": os.getpid(),
            "pool": {"implementation": "arq", "max-concurrency": integration.settings.max_jobs},
            "total": totals,
            "jobs": counts,
            "allow_abort_jobs": integration.settings.allow_abort_jobs,
            # Cancelled jobs whose end neither arq's result nor its log told: no end sent.
            "outcomes_unknown": integration.outcomes_unknown,
        }
        active = integration.active()[:MAX_ACTIVE]
        return {"stats": stats, "active": active, "active_queues": [{"name": integration.queue_name}],
                "registered": integration.settings.registered()}

    def __call__(self) -> Dict[str, Any]:
        integration = self.integration
        report: Dict[str, Any] = {"workers": {integration.worker_name: self.worker_details()},
                                  "broker_type": "redis"}
        try:
            report["queue_depths"] = {integration.queue_name: self.depth()}
            report["broker_connected"] = True
        except Exception as exc:
            self.depth_failures += 1
            report["broker_connected"] = False
            log.debug("z4j-agentd: arq queue depth not read: %s", exc)
        report["depth_failures"] = self.depth_failures
        now = time.monotonic()
        if integration.online and now - self._last_heartbeat >= HEARTBEAT_EVENT_SECONDS:
            self._last_heartbeat = now
            integration.emit("worker.heartbeat", "", {"worker": integration.worker_name, "pid": os.getpid(),
                                                      "active": len(integration.active())})
        return {ENGINE: report}


def start(integration: Any) -> Health:
    health = Health(integration)
    try:
        interval = interval_from_env()
    except ValueError as exc:
        log.warning("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
        interval = DEFAULT_INTERVAL
    integration.client.report_health(health, interval=interval)
    return health
