"""The Workers page and queue depth: a Huey consumer reports itself to the
daemon (`health`, docs/local-protocol.md).

* `queue_depths`: `{huey.name: pending_count()}`, the tasks waiting in the
  instance's one queue (tasks with an eta or a retry delay wait in the
  schedule instead: the fact `scheduled_count`);
* `workers`: the consumer under its name (`huey@<host>:<pid>`, as its
  events give it): `stats` (pid, uptime, pool with `max-concurrency` = the
  consumer's workers, the storage), `active` (the tasks running in this
  process), `active_queues`, `registered` (the task names);
* facts: `broker_type`, `broker_connected`, `scheduled_count`,
  `depth_failures`.

Each report also sends a `worker.heartbeat` event (at most one per
HEARTBEAT_EVENT_SECONDS), which keeps the worker's row fresh.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional

from .. import _integration
from .._redact import scrub_text

log = logging.getLogger("z4j_agentd.huey")

ENGINE = "huey"
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "Z4J_HUEY_HEALTH_INTERVAL"
HEARTBEAT_EVENT_SECONDS = 30.0
MAX_FACT_CHARS = 500
_INT_MAX = 2**31 - 1


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_HUEY_HEALTH_INTERVAL in seconds, else `default`; a bad value is
    an error saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


def broker_type(huey: Any) -> str:
    """The storage's kind: redis, sqlite, memory, file, or the class name."""
    name = type(getattr(huey, "storage", None)).__name__.lower()
    for kind in ("redis", "sqlite", "memory", "file"):
        if kind in name:
            return kind
    return name or "unknown"


def _storage_info(huey: Any) -> Dict[str, Any]:
    info: Dict[str, Any] = {"transport": broker_type(huey)}
    conn = getattr(getattr(huey, "storage", None), "conn", None)
    kwargs = getattr(getattr(conn, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict):  # never the password
        for key in ("host", "port", "db", "path"):
            if kwargs.get(key) is not None:
                info["hostname" if key == "host" else key] = kwargs[key]
    return info


class HealthSource:
    """`source()` for `Client.report_health`: the `engines` map of a Huey
    consumer's report. Never raises for a storage outage (the depth is
    skipped and counted)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self.interval = DEFAULT_INTERVAL
        self.reports = 0
        self.depth_failures = 0
        self.last_depth_error: Optional[str] = None
        self._last_heartbeat_event = 0.0

    def active(self) -> List[Dict[str, Any]]:
        hooks = self.hooks
        with hooks._lock:
            running = list(hooks.running.values())
        return [{"id": r.task_id, "name": r.name, "time_start": r.started, "worker_pid": os.getpid()}
                for r in running]

    def worker_details(self) -> Dict[str, Dict[str, Any]]:
        hooks = self.hooks
        if not hooks.worker_name:
            return {}
        stats: Dict[str, Any] = {
            "pid": hooks.consumer_pid,
            "uptime": max(0, int(time.time() - hooks.started_at)),
            "pool": {"implementation": f"huey.consumer({hooks.worker_type})",
                     "max-concurrency": hooks.concurrency if hooks.concurrency is not None else 1},
            "broker": _storage_info(hooks.huey),
        }
        try:
            stats["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:  # pragma: no cover
            pass
        details: Dict[str, Any] = {"stats": stats, "active_queues": [{"name": hooks.queue}]}
        try:
            details["active"] = self.active()
            details["registered"] = sorted(getattr(hooks.huey._registry, "_registry", {}) or {})
        except Exception:
            log.debug("z4j-agentd: Huey worker details not read", exc_info=True)
        return {hooks.worker_name: details}

    def __call__(self) -> Dict[str, Any]:
        hooks = self.hooks
        details = self.worker_details()
        report: Dict[str, Any] = {"workers": details, "broker_type": broker_type(hooks.huey)}
        try:
            depth = int(hooks.huey.pending_count())
            scheduled = int(hooks.huey.scheduled_count())
        except Exception as exc:
            self.depth_failures += 1
            self.last_depth_error = scrub_text(f"{type(exc).__name__}: {exc}"[:MAX_FACT_CHARS])
            if self.depth_failures == 1:
                log.warning("z4j-agentd: Huey queue depth skipped, the storage did not answer: %s",
                            self.last_depth_error)
            report.update({"broker_connected": False, "depth_failures": self.depth_failures,
                           "broker_error": self.last_depth_error})
        else:
            self.last_depth_error = None
            report.update({"queue_depths": {hooks.queue: max(0, min(depth, _INT_MAX))},
                           "scheduled_count": max(0, min(scheduled, _INT_MAX)),
                           "broker_connected": True, "depth_failures": self.depth_failures})
        self.reports += 1
        now = time.monotonic()
        if details and now - self._last_heartbeat_event >= HEARTBEAT_EVENT_SECONDS:
            self._last_heartbeat_event = now
            self._heartbeat(details)
        return {ENGINE: report}

    def _heartbeat(self, details: Dict[str, Dict[str, Any]]) -> None:
        for name, worker in details.items():
            stats = worker.get("stats") or {}
            data = {"worker": name, "hostname": socket.gethostname(), "pid": stats.get("pid"),
                    "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
                    "active": len(worker.get("active") or ()), "queues": [self.hooks.queue],
                    "loadavg": stats.get("loadavg"), "freq": max(self.interval, HEARTBEAT_EVENT_SECONDS)}
            try:
                self.hooks.client.emit(ENGINE, "worker.heartbeat", "",
                                       {k: v for k, v in data.items() if v is not None}, occurred_at=time.time())
            except Exception:  # pragma: no cover - emit never raises
                pass


def start(hooks: Any, interval: Optional[float] = None) -> HealthSource:
    """Starts the consumer's health reports (on `serve`'s connection)."""
    source = HealthSource(hooks)
    try:
        source.interval = float(interval) if interval is not None else interval_from_env()
    except ValueError as exc:  # never raise into Huey: say what to change, use the default
        log.error("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
    hooks.client.report_health(source, interval=source.interval)
    return source


__all__ = ["HealthSource", "start", "interval_from_env", "DEFAULT_INTERVAL", "INTERVAL_ENV"]
