"""The health report of an RQ worker's main process (`Client.report_health`):
the depth of every queue its Redis connection knows (the ones it listens to
first) and this worker's details, keyed by its name.

    {"rq": {"queue_depths": {"default": 3, "high": 0},
            "workers": {"w1": {"stats": {"pid": 404, "hostname": "vm", "uptime": 79,
                                         "pool": {"implementation": "z4j_agentd.rq:Worker",
                                                  "max-concurrency": 1},
                                         "total": {"succeeded": 4, "failed": 5},
                                         "state": "idle", "rq_version": "3.0.0", ...},
                               "active": [{"id": "<job id>", "name": "tasks.slow"}],
                               "active_queues": [{"name": "default"}]}},
            "broker_type": "redis", "broker_connected": true}}

Only this process's worker is reported (another host's daemon reports its
own), read fresh from Redis (`Worker.find_by_key`, the counters RQ keeps
there). An RQ worker runs one job at a time: max-concurrency 1. RQ keeps
no list of task names, so `registered` is not sent. A report that cannot
reach Redis says `broker_connected: false` and `broker_error` (its
credentials masked).
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from .._redact import scrub_text
from .. import _integration

log = logging.getLogger("z4j_agentd.rq")

ENGINE = "rq"
#: Seconds between two reports unless $Z4J_RQ_HEALTH_INTERVAL says otherwise:
#: the brain's heartbeat interval, so each heartbeat carries fresh details.
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "Z4J_RQ_HEALTH_INTERVAL"
#: Queues measured per report (the daemon keeps at most 1,024).
MAX_QUEUES = 1024
MAX_FACT_CHARS = 500
_INT_MAX = 2**31 - 1
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/\s;]*)@")


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_RQ_HEALTH_INTERVAL in seconds, else `default`; a bad value is an error
    saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


def scrub(text: str, password: Optional[str] = None) -> str:
    """`text` without URL credentials and without the connection's password."""
    out = text
    if isinstance(password, str) and len(password) >= 3:
        out = out.replace(password, "**")

    def mask(m: "re.Match[str]") -> str:
        auth = m.group("auth")
        user = auth.split(":", 1)[0] if ":" in auth else ""
        return f"{m.group('scheme')}{user}:**@" if user else f"{m.group('scheme')}**@"

    return scrub_text(_URL_CREDENTIALS.sub(mask, out))


def password_of(connection: Any) -> Optional[str]:
    try:
        kwargs = connection.connection_pool.connection_kwargs
        password = kwargs.get("password")
        return password if isinstance(password, str) and password else None
    except Exception:
        return None


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return max(0, min(int(value), _INT_MAX))


def _iso(when: Any) -> Optional[str]:
    if not isinstance(when, datetime):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.isoformat()


class HealthSource:
    """Builds one report (called on the client's health thread)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self.interval = DEFAULT_INTERVAL

    @property
    def worker(self) -> Any:
        return self.hooks.worker

    def __call__(self) -> Dict[str, Any]:
        report: Dict[str, Any] = {"broker_type": "redis"}
        connection = self.worker.connection
        try:
            connection.ping()
            report["broker_connected"] = True
        except Exception as exc:
            report["broker_connected"] = False
            report["broker_error"] = scrub(f"{type(exc).__name__}: {exc}",
                                           password_of(connection))[:MAX_FACT_CHARS]
            return {ENGINE: report}
        report["queue_depths"] = self.queue_depths()
        details = self.worker_details()
        if details is not None:
            report["workers"] = {self.hooks.name: details}
        return {ENGINE: report}

    def queue_names(self) -> List[str]:
        """This worker's queues, then every other queue Redis knows."""
        from rq import Queue

        names = [str(n) for n in self.worker.queue_names()]
        try:
            for queue in Queue.all(connection=self.worker.connection):
                if queue.name not in names:
                    names.append(queue.name)
        except Exception:
            log.debug("z4j-agentd: RQ's queue set not read", exc_info=True)
        return names[:MAX_QUEUES]

    def queue_depths(self) -> Dict[str, int]:
        from rq import Queue

        connection = self.worker.connection
        names = self.queue_names()
        keys = [Queue(name, connection=connection).key for name in names]
        with connection.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            counts = pipe.execute()
        return {name: _int(count) or 0 for name, count in zip(names, counts)}

    def worker_details(self) -> Optional[Dict[str, Any]]:
        """This worker as Redis has it (a fresh copy, not the running
        worker's own object, which its main loop changes meanwhile)."""
        from rq import Worker as RqWorker

        mine = self.worker
        try:
            fresh = RqWorker.find_by_key(mine.key, connection=mine.connection)
        except Exception:
            log.debug("z4j-agentd: RQ worker %s not read back", mine.name, exc_info=True)
            fresh = None
        if fresh is None:
            return None  # not born yet, or dead
        cls = type(mine)
        born = getattr(fresh, "birth_date", None)
        uptime = None
        if isinstance(born, datetime):
            born_utc = born if born.tzinfo else born.replace(tzinfo=timezone.utc)
            uptime = _int((datetime.now(timezone.utc) - born_utc).total_seconds())
        import rq

        stats: Dict[str, Any] = {
            "pid": _int(fresh.pid) or os.getpid(),
            "hostname": fresh.hostname,
            "uptime": uptime,
            "pool": {"implementation": f"{cls.__module__}:{cls.__qualname__}", "max-concurrency": 1},
            "total": {"succeeded": _int(fresh.successful_job_count) or 0,
                      "failed": _int(fresh.failed_job_count) or 0},
            "total_working_time": round(float(fresh.total_working_time or 0), 3),
            "state": str(getattr(fresh.get_state(), "value", fresh.get_state())),
            "rq_version": getattr(rq, "__version__", None),
            "last_heartbeat": _iso(fresh.last_heartbeat),
            "birth": _iso(born),
        }
        active = []
        for job_id in self._running_job_ids(fresh):
            entry = {"id": job_id}
            name = self._job_name(job_id)
            if name:
                entry["name"] = name
            active.append(entry)
        return {"stats": {k: v for k, v in stats.items() if v is not None},
                "active": active,
                "active_queues": [{"name": str(n)} for n in mine.queue_names()]}

    @staticmethod
    def _running_job_ids(worker: Any) -> List[str]:
        """The jobs the worker runs now: its executions (RQ 3), else its
        current job (RQ 2 keeps one id in the worker's hash)."""
        try:
            if hasattr(worker, "get_current_executions"):
                return [str(e.job_id) for e in worker.get_current_executions(refresh=True)]
            current = worker.get_current_job_id()
            return [current.decode() if isinstance(current, bytes) else str(current)] if current else []
        except Exception:
            return []

    def _job_name(self, job_id: str) -> Optional[str]:
        try:
            job = self.worker.job_class.fetch(job_id, connection=self.worker.connection,
                                              serializer=self.worker.serializer)
            return job.func_name
        except Exception:
            return None


def start(hooks: Any, interval: Optional[float] = None) -> HealthSource:
    """Starts the health reports of this worker's main process (on `serve`'s
    connection)."""
    source = HealthSource(hooks)
    try:
        source.interval = float(interval) if interval is not None else interval_from_env()
    except ValueError as exc:  # never raise into RQ: say what to change, use the default
        log.error("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
    hooks.client.report_health(source, interval=source.interval)
    return source


__all__ = ["HealthSource", "start", "interval_from_env", "DEFAULT_INTERVAL", "INTERVAL_ENV"]
