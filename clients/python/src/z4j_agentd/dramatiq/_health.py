"""The Workers page and queue depths: each Dramatiq worker process
reports itself to the daemon (`health`, docs/local-protocol.md).

* `workers`: this process's worker, `<host>@<pid>`:
  * `stats`: pid, uptime, `pool` (implementation `dramatiq.Worker(threads)`,
    `max-concurrency` = its worker threads, `processes` = [pid]),
    `prefetch_count` (the queue prefetch), `total` (messages processed per
    actor), `loadavg`, and the broker (`transport`, host and port, never
    a password);
  * `active`: the messages running now (id, name, queue, time_start, retries);
  * `active_queues`: the queues it consumes (`[{name}]`, without `.DQ`);
  * `registered`: the broker's actors.
* `queue_depths`: on Redis `HLEN <ns>:<q>.msgs` (every message enqueued
  and not yet acknowledged: waiting, fetched by a worker, or running) for
  the broker's declared queues and its actors' queues; on RabbitMQ the
  ready count. Every worker process reports them (the daemon keeps the
  most recent); a broker that does not answer leaves them out
  (`broker_connected` false, `depth_failures` counts it).

Each report also sends a `worker.heartbeat` event at most every
HEARTBEAT_EVENT_SECONDS, which keeps the worker's row fresh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional

from .. import _integration
from .._jsonsafe import json_safe
from .._redact import scrub_text
from . import _broker

log = logging.getLogger("z4j_agentd.dramatiq")

ENGINE = "dramatiq"
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "Z4J_DRAMATIQ_HEALTH_INTERVAL"
HEARTBEAT_EVENT_SECONDS = 30.0
MAX_QUEUES = 1024
_INT_MAX = 2**31 - 1


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_DRAMATIQ_HEALTH_INTERVAL in seconds, else `default`; a bad value is an error
    saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


def broker_info(broker: Any) -> Dict[str, Any]:
    """The broker's transport and address, without credentials."""
    kind = _broker.kind(broker)
    out: Dict[str, Any] = {"transport": kind}
    if kind == "redis":
        try:
            kwargs = broker.client.connection_pool.connection_kwargs
            for key in ("host", "port", "db", "path"):
                if kwargs.get(key) is not None:
                    out["hostname" if key == "host" else key] = kwargs[key]
        except Exception:
            pass
        out["namespace"] = _broker.namespace(broker)
    return json_safe(out)


class HealthSource:
    """`source()` for `Client.report_health` of one worker process."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self.interval = DEFAULT_INTERVAL
        self.reports = 0
        self.depth_failures = 0
        self.last_depth_error: Optional[str] = None
        self._last_heartbeat_event = 0.0

    def worker_details(self) -> Dict[str, Dict[str, Any]]:
        hooks = self.hooks
        worker, name = hooks.worker, hooks.worker_name
        if worker is None or not name:
            return {}
        threads = getattr(worker, "worker_threads", None)
        with hooks._lock:
            active = [dict(a) for a in hooks.active.values()]
            totals = dict(hooks.totals)
        stats: Dict[str, Any] = {
            "pid": os.getpid(),
            "pool": {"implementation": "dramatiq.Worker(threads)", "processes": [os.getpid()]},
            "total": totals,
            "broker": broker_info(hooks.broker),
        }
        if isinstance(threads, int) and not isinstance(threads, bool):
            stats["pool"]["max-concurrency"] = max(0, min(threads, _INT_MAX))
        prefetch = getattr(worker, "queue_prefetch", None)
        if isinstance(prefetch, int) and not isinstance(prefetch, bool):
            stats["prefetch_count"] = prefetch
        if hooks.booted_at is not None:
            stats["uptime"] = max(0, int(time.time() - hooks.booted_at))
        try:
            stats["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        except (OSError, AttributeError):
            pass
        try:
            registered = sorted(str(n) for n in list(hooks.broker.actors))
        except Exception:
            registered = []
        active.sort(key=lambda a: (a.get("time_start") or 0, a.get("id") or ""))
        return {name: json_safe({"stats": stats, "active": active,
                                 "active_queues": [{"name": q} for q in hooks.consumed_queues()],
                                 "registered": registered})}

    def queue_depths(self, consumed: List[str]) -> Optional[Dict[str, int]]:
        names = list(dict.fromkeys(consumed + _broker.queue_names(self.hooks.broker)))[:MAX_QUEUES]
        try:
            got = _broker.depths(self.hooks.broker, names)
        except Exception as exc:
            self.depth_failures += 1
            self.last_depth_error = scrub_text(f"{type(exc).__name__}: {exc}")[:500]
            if self.depth_failures == 1:
                log.warning("z4j-agentd: queue depths skipped, the broker did not answer: %s",
                            self.last_depth_error)
            return None
        self.last_depth_error = None
        return None if got is None else {k: max(0, min(int(v), _INT_MAX)) for k, v in got.items()}

    def __call__(self) -> Dict[str, Any]:
        details = self.worker_details()
        depths = self.queue_depths(self.hooks.consumed_queues())
        report: Dict[str, Any] = {"workers": details, "broker_type": _broker.kind(self.hooks.broker),
                                  "broker_connected": depths is not None or self.last_depth_error is None,
                                  "depth_failures": self.depth_failures}
        if depths is not None:
            report["queue_depths"] = depths
        elif self.last_depth_error:
            report["broker_error"] = self.last_depth_error
        self.reports += 1
        now = time.monotonic()
        if details and now - self._last_heartbeat_event >= HEARTBEAT_EVENT_SECONDS:
            self._last_heartbeat_event = now
            for name, worker in details.items():
                self._heartbeat(name, worker)
        return {ENGINE: report}

    def _heartbeat(self, name: str, details: Dict[str, Any]) -> None:
        stats = details.get("stats") or {}
        total = stats.get("total") or {}
        data = {"worker": name, "hostname": name, "pid": stats.get("pid"),
                "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
                "active": len(details.get("active") or ()),
                "processed": sum(v for v in total.values() if isinstance(v, int)),
                "queues": [q["name"] for q in details.get("active_queues") or ()],
                "loadavg": stats.get("loadavg"), "freq": max(self.interval, HEARTBEAT_EVENT_SECONDS)}
        try:
            self.hooks.client.emit(ENGINE, "worker.heartbeat", "", {k: v for k, v in data.items() if v is not None})
        except Exception:  # pragma: no cover - emit never raises
            pass


def start(hooks: Any, interval: Optional[float] = None) -> HealthSource:
    """Starts this worker process's health reports (on `serve`'s connection)."""
    source = HealthSource(hooks)
    try:
        source.interval = float(interval) if interval is not None else interval_from_env()
    except ValueError as exc:  # never raise into Dramatiq: say what to change, use the default
        log.error("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
    hooks.client.report_health(source, interval=source.interval)
    return source


__all__ = ["HealthSource", "start", "interval_from_env", "DEFAULT_INTERVAL", "INTERVAL_ENV"]
