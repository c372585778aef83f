"""The Workers page and queue depths: each TaskIQ worker process reports
itself to the daemon (`health`, docs/local-protocol.md).

* `workers`: this process, as `taskiq@<host>:<pid>`: `stats` (pid, the
  pool: `max-concurrency` the worker's `--max-async-tasks` when it has one,
  the thread pool's size for sync tasks, tasks run per name in `total`),
  `active` (the tasks running now), `active_queues` (the broker's queue),
  `registered` (the broker's task names).
* `queue_depths`: the broker's queue, for the brokers whose depth can be
  read: taskiq-redis's `ListQueueBroker` (LLEN: messages waiting) and
  `RedisStreamBroker` (XINFO GROUPS: the consumer group's `lag`, entries
  not delivered yet, plus `pending`, delivered and not acknowledged; a
  Redis without `lag`, before 7, gives no depth, the broker still counts as
  connected and `depth_unknown` counts those reports). Other brokers report
  no depth. The round trip runs on the worker's event loop
  with a deadline; a broker that does not answer is counted
  (`depth_failures`) and the worker's details still go.

Each report also sends a `worker.heartbeat` event (at most one per
HEARTBEAT_EVENT_SECONDS), which keeps the worker's row fresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Dict, Optional

from .._redact import event_value, scrub_text
from .. import _integration

log = logging.getLogger("z4j_agentd.taskiq")

ENGINE = "taskiq"
#: Seconds between two reports unless $Z4J_TASKIQ_HEALTH_INTERVAL says otherwise.
DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "Z4J_TASKIQ_HEALTH_INTERVAL"
HEARTBEAT_EVENT_SECONDS = 30.0
#: The longest a report waits for the broker's depth.
DEPTH_DEADLINE = 5.0
#: A running task's args and kwargs in `active` are cut to this many bytes each.
ACTIVE_ARGS_BYTES = 512
#: Running tasks listed in `active` at most.
MAX_ACTIVE = 100
MAX_FACT_CHARS = 500
_INT_MAX = 2**31 - 1


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_TASKIQ_HEALTH_INTERVAL in seconds, else `default`; a bad value is an error
    saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


def depth_probe(broker: Any) -> Optional[Any]:
    """A coroutine function measuring the broker's queue `{name: depth}`, or
    None for a broker whose depth cannot be read."""
    try:
        from taskiq_redis.redis_broker import ListQueueBroker, RedisStreamBroker
    except Exception:
        return None
    queue = getattr(broker, "queue_name", None)
    pool = getattr(broker, "connection_pool", None)
    if not isinstance(queue, str) or pool is None:
        return None
    from redis.asyncio import Redis

    if isinstance(broker, ListQueueBroker):
        async def list_depth() -> Dict[str, int]:
            async with Redis(connection_pool=pool) as conn:
                return {queue: int(await conn.llen(queue))}

        return list_depth
    if isinstance(broker, RedisStreamBroker):
        group = getattr(broker, "consumer_group_name", None)

        async def stream_depth() -> Dict[str, int]:
            async with Redis(connection_pool=pool) as conn:
                try:
                    groups = await conn.xinfo_groups(queue)
                except Exception as exc:
                    if "no such key" in str(exc).lower():
                        return {queue: 0}  # nothing was ever sent
                    raise
            for info in groups or ():
                name = info.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                if name == group:
                    lag = info.get("lag")
                    pending = info.get("pending") or 0
                    if lag is None:
                        # Redis < 7 has no `lag`, and Redis 7 gives none once
                        # entries were deleted: the broker answered, but the
                        # count waiting is unknown, so no depth is reported.
                        return {}
                    return {queue: int(lag) + int(pending)}
            raise RuntimeError(f"the stream {queue!r} has no consumer group {group!r} yet")

        return stream_depth
    return None


def active_view(entry: Any) -> Any:
    """(args, kwargs) of a running task as `active` shows them, cut to
    ACTIVE_ARGS_BYTES each: computed by the first report listing the task
    and kept on its entry, so a task running for hours is not walked again
    at every report."""
    view = entry.active_view
    if view is None:
        message = entry.message
        view = (event_value(list(getattr(message, "args", None) or []), ACTIVE_ARGS_BYTES),
                event_value(dict(getattr(message, "kwargs", None) or {}), ACTIVE_ARGS_BYTES))
        entry.active_view = view
    return view


class HealthSource:
    """`source()` for `Client.report_health`: the `engines` map of one
    worker process's report. Runs on the client's health thread."""

    def __init__(self, middleware: Any) -> None:
        self.mw = middleware
        self.interval = DEFAULT_INTERVAL
        self.reports = 0
        self.depth_failures = 0
        #: Reports whose broker answered without a depth (a Redis stream
        #: without its consumer group's `lag`: Redis < 7).
        self.depth_unknown = 0
        self.last_depth_error: Optional[str] = None
        self._probe = depth_probe(middleware.broker)
        self._last_heartbeat_event = 0.0

    def worker_details(self) -> Dict[str, Any]:
        mw = self.mw
        pool: Dict[str, Any] = {"implementation": "taskiq"}
        if mw.concurrency is not None:
            pool["max-concurrency"] = min(int(mw.concurrency), _INT_MAX)
        if mw.threads is not None:
            pool["threads"] = int(mw.threads)
        stats = {"pid": os.getpid(), "pool": pool, "total": mw.totals(),
                 "broker": type(mw.broker).__name__}
        active = []
        for entry in sorted(mw.running_now(), key=lambda e: e.started)[:MAX_ACTIVE]:
            args, kwargs = active_view(entry)
            active.append({
                # `id`: the daemon sends cancel_task and reconcile_task for a
                # task to the process whose report lists it here.
                "id": entry.task_id, "name": entry.name, "args": args, "kwargs": kwargs,
                "time_start": entry.started_wall, "retries": entry.retries,
                "async": entry.is_async,
            })
        queue = getattr(mw.broker, "queue_name", None)
        try:
            registered = sorted(str(n) for n in mw.broker.get_all_tasks())
        except Exception:
            registered = []
        return {mw.worker_name(): {
            "stats": stats, "active": active,
            "active_queues": [{"name": queue}] if isinstance(queue, str) and queue else [],
            "registered": registered,
        }}

    def queue_depths(self) -> Optional[Dict[str, int]]:
        if self._probe is None:
            return None
        probe = self._probe
        loop = self.mw.loop
        try:
            if loop is None or loop.is_closed() or not loop.is_running():
                raise RuntimeError("the worker's event loop is not running")
            future = asyncio.run_coroutine_threadsafe(probe(), loop)
            try:
                got = future.result(DEPTH_DEADLINE)
            except BaseException:
                future.cancel()
                raise
        except Exception as exc:
            self.depth_failures += 1
            text = str(exc) or f"no answer within {DEPTH_DEADLINE:.0f} s"
            self.last_depth_error = scrub_text(f"{type(exc).__name__}: {text}")[:MAX_FACT_CHARS]
            if self.depth_failures == 1:
                log.warning("z4j-agentd: queue depth skipped: %s", self.last_depth_error)
            return None
        self.last_depth_error = None
        if not got:
            self.depth_unknown += 1
        return {name: max(0, min(int(depth), _INT_MAX)) for name, depth in got.items()}

    def __call__(self) -> Dict[str, Any]:
        details = self.worker_details()
        report: Dict[str, Any] = {"workers": details, "broker_type": type(self.mw.broker).__name__}
        if self._probe is not None:
            depths = self.queue_depths()
            report["broker_connected"] = depths is not None
            report["depth_failures"] = self.depth_failures
            if depths:
                report["queue_depths"] = depths
            elif depths is not None:
                report["depth_unknown"] = self.depth_unknown
            elif self.last_depth_error:
                report["broker_error"] = self.last_depth_error
        self.reports += 1
        now = time.monotonic()
        if not self._last_heartbeat_event or now - self._last_heartbeat_event >= HEARTBEAT_EVENT_SECONDS:
            self._last_heartbeat_event = now
            self._heartbeat(details)
        return {ENGINE: report}

    def _heartbeat(self, details: Dict[str, Any]) -> None:
        for name, worker in details.items():
            stats = worker.get("stats") or {}
            data = {
                "worker": name, "hostname": name, "pid": stats.get("pid"),
                "concurrency": (stats.get("pool") or {}).get("max-concurrency"),
                "active": len(worker.get("active") or ()),
                "processed": sum((stats.get("total") or {}).values()),
                "queues": [q["name"] for q in worker.get("active_queues") or ()],
                "freq": max(self.interval, HEARTBEAT_EVENT_SECONDS),
            }
            try:
                self.mw.client.emit(ENGINE, "worker.heartbeat", "", {k: v for k, v in data.items() if v is not None},
                                    occurred_at=time.time())
            except Exception:  # pragma: no cover - emit never raises
                pass


def start(middleware: Any, interval: Optional[float] = None) -> HealthSource:
    """Starts this worker process's health reports (on `serve`'s connection)."""
    source = HealthSource(middleware)
    try:
        source.interval = float(interval) if interval is not None else interval_from_env()
    except ValueError as exc:  # never raise into TaskIQ: say what to change, use the default
        log.error("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
    middleware.client.report_health(source, interval=source.interval)
    return source


__all__ = ["HealthSource", "start", "depth_probe", "interval_from_env", "DEFAULT_INTERVAL", "INTERVAL_ENV"]
