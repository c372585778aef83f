"""arq's cron jobs on the brain's Schedules page.

arq has no scheduler process: each worker enqueues the cron jobs of its
`WorkerSettings.cron_jobs` as their times come. `serve(ctx, WorkerSettings)`
from the worker's `on_startup` (on the worker's event loop) serves the
scheduler `arq-cron` through z4j's external schedule protocol (see
`z4j_agentd._schedules`):

* every cron job is listed: its name (`cron:<function>` unless named), the
  function (`module.qualname`), its cron expression in the brain's form
  (`minute hour day month day-of-week`, 0 = Sunday; arq's 0 = Monday is
  converted; seconds other than arq's default 0 make a sixth field,
  last, as croniter reads it), the worker's timezone and queue, next run,
  and the last run and run count this worker saw;
* "Trigger now" enqueues the job at once on the worker's queue, through
  the worker's own Redis pool, on the worker's event loop (the command
  thread waits for it, the loop does not), with a new job id: a cron run
  due meanwhile still runs;
* the jobs are defined in code: the brain cannot create, update, enable,
  disable or delete them (the capabilities say so; edit `cron_jobs`).

Runs: a cron job's run is counted when the worker's cron loop passes its
time (arq then computes the next one): once per due time, whichever worker
of the fleet enqueued it (with `unique`, arq's default, only one does).
"Trigger now" counts too. A restarted worker carries on from the counters
it last published (read from its state file, below).

The timezone is the settings' `timezone`, else the one arq's Worker takes:
the system's UTC offset when the worker starts, fixed (a worker started in
winter keeps winter's offset after the clocks change, until it restarts),
shown as `Etc/GMT-h` (or a zone that keeps that offset all year).

A cron job with both `day` and `weekday` (arq runs it when both match;
cron text means either) is listed only when its days are whole weeks of
the month (1-7, 8-14, 15-21, 22-28, 29-31), as `weekday#n`
(`cron(f, day={1, ..., 7}, weekday=0)`, the first Monday, is `* * 1#1`).
It, and a job whose fields arq cannot match (a set of weekday names, a
None or a string in a set of numbers), is left out of the page, logged
once, and counted in `stats()["rows_unlisted"]`.

Source keys are the cron jobs' names (as z4j-arqcron's), so rows stay the
same rows across restarts and when a project moves over from it. The rows
last published are kept in `.z4j-agentd-arq-cron-<queue>.json` in the
working directory (or `state_dir`), so that a cron job removed from the
code while the worker was stopped leaves the page too.

Several workers on one host: the daemon lets one process serve `arq-cron`
at a time; the others wait and take over when it stops (each lists the
same code).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .. import _codesched as cs
from .._schedules import MUTATION, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source

log = logging.getLogger("z4j_agentd.arq.cron")

SCHEDULER = "arq-cron"
ENGINE = "arq"
#: Capabilities: listed and triggered; no writes (the jobs are code): no
#: create, update, delete, enable or disable. The mutation protocol's token
#: is declared all the same, so that the brain itself refuses a write (HTTP
#: 409, "does not support this operation") before sending anything: without
#: it, the brain's enable/disable falls back to its older
#: `schedule.external.control` command, whose refusal it takes as a protocol
#: fault: it then activates the stream no more, even for a restarted process.
CAPABILITIES = (STABLE_SNAPSHOT, MUTATION, "list", "read", "trigger_now")
#: Seconds between two looks at the jobs (they change only with the code;
#: runs ask for a snapshot themselves).
POLL_SECONDS = 30.0
#: Seconds at least between two snapshots the cron runs cause.
MIN_SNAPSHOT_SECONDS = 5.0
#: Seconds "Trigger now" waits for the enqueue on the worker's loop.
TRIGGER_TIMEOUT = 10.0
DEFAULT_QUEUE = "arq:queue"
_ARQ_WEEKDAYS = ("mon", "tues", "wed", "thurs", "fri", "sat", "sun")


def _values(option: Any, full: Sequence[int], what: str) -> List[int]:
    """An arq cron option (None, an int, or a set/list/tuple of them) as
    the values it matches."""
    if option is None:
        return list(full)
    if isinstance(option, bool):
        raise ValueError(f"{what} is {option!r}, not a number")
    if isinstance(option, int):
        return [option]
    if isinstance(option, (set, frozenset, list, tuple)):
        for v in option:
            if v is None or isinstance(v, str) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError(f"its {what} holds {v!r}: arq compares each member with the time's {what}, "
                                 f"which it never equals (the other members still match); use whole numbers")
        return [int(v) for v in option]
    raise ValueError(f"{what} is {option!r}: arq takes None, a number or a set of numbers")


def _weekdays(option: Any) -> List[int]:
    """arq's weekday option (0 = Monday, or `mon`...`sun`) in cron's
    numbering (0 = Sunday)."""
    def number(v: Any) -> int:
        if isinstance(v, str):
            if v.lower() not in _ARQ_WEEKDAYS:
                raise ValueError(f"weekday {v!r} is not one of {', '.join(_ARQ_WEEKDAYS)}")
            return _ARQ_WEEKDAYS.index(v.lower())
        return int(v)

    if option is None:
        return list(cs.WEEKDAYS)
    if isinstance(option, (set, frozenset, list, tuple)) and any(isinstance(v, str) for v in option):
        raise ValueError(f"its weekday is {option!r}: arq reads a name only on its own (weekday='mon'), and "
                         f"compares a set's members with day numbers, so this matches no day (arq never runs "
                         f"it, and its worker searches for the next run without end); use numbers (0 = Monday)")
    items = option if isinstance(option, (set, frozenset, list, tuple)) else [option]
    arq_days = [number(v) for v in items]
    bad = [d for d in arq_days if not 0 <= d <= 6]
    if bad:
        raise ValueError(f"weekday {bad[0]} is outside 0-6 (arq: 0 = Monday)")
    return [(d + 1) % 7 for d in arq_days]


def expression_of(job: Any) -> str:
    """A cron job's schedule as the brain's cron text."""
    return cs.expression(_values(job.minute, cs.MINUTES, "minute"), _values(job.hour, cs.HOURS, "hour"),
                         _values(job.day, cs.DAYS, "day"), _values(job.month, cs.MONTHS, "month"),
                         _weekdays(job.weekday), _values(job.second, cs.SECONDS, "second"))


def arq_timezone() -> tzinfo:
    """The timezone arq's Worker takes when given none: the system's UTC
    offset at the time it starts, fixed (`datetime.now().astimezone()`),
    so its cron times do not move with daylight saving time until the
    worker restarts."""
    return datetime.now().astimezone().tzinfo or dt_timezone.utc


def function_of(job: Any) -> str:
    fn = getattr(job, "coroutine", None)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else str(job.name)


def _next_run(job: Any, tz: tzinfo) -> Optional[datetime]:
    if getattr(job, "next_run", None) is not None:
        return job.next_run
    from arq.cron import next_cron

    try:
        return next_cron(datetime.now(tz), month=job.month, day=job.day, weekday=job.weekday, hour=job.hour,
                         minute=job.minute, second=job.second, microsecond=job.microsecond)
    except Exception:
        return None


class CronSource(Source):
    """One arq worker's cron jobs: read-only, triggerable."""

    def __init__(self, runs: cs.Runs) -> None:
        self.runs = runs
        self.jobs: List[Any] = []
        self.queue_name = DEFAULT_QUEUE
        self.tz: tzinfo = arq_timezone()
        self.pool: Any = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.loop_thread: Optional[int] = None
        self.rows_unlisted = 0
        self._warned: set = set()

    def bind(self, jobs: Iterable[Any], queue_name: str, tz: tzinfo, pool: Any,
             loop: asyncio.AbstractEventLoop) -> None:
        self.jobs, self.queue_name, self.tz, self.pool, self.loop = list(jobs), queue_name, tz, pool, loop
        self.loop_thread = threading.get_ident()

    def capabilities(self) -> List[str]:
        return list(CAPABILITIES)

    def rows(self) -> List[Dict[str, Any]]:
        tz_name = cs.timezone_name(self.tz)
        rows, unlisted = [], 0
        for job in list(self.jobs):
            name = str(job.name)
            try:
                expr = expression_of(job)
            except (ValueError, TypeError) as exc:  # TypeError: int(None), say
                unlisted += 1
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("z4j-agentd: the cron job %s is not on the Schedules page: %s", name, exc)
                continue
            count, last = self.runs.get(name)
            upcoming = _next_run(job, self.tz)
            function = function_of(job)
            rows.append({
                "source_key": name, "external_id": name, "engine": ENGINE, "scheduler": SCHEDULER,
                "name": name, "task_name": function, "kind": "cron", "expression": expr, "timezone": tz_name,
                "queue": self.queue_name, "args": [], "kwargs": {}, "is_enabled": True,
                "last_run_at": cs.to_second(last), "next_run_at": cs.to_second(upcoming),
                "total_runs": count, "source": "arq-cron:code",
                "source_hash": cs.source_hash({
                    "function": function, "cron": expr, "timezone": tz_name, "queue": self.queue_name,
                    "microsecond": job.microsecond, "run_at_startup": job.run_at_startup, "unique": job.unique,
                    "job_id": job.job_id, "timeout": job.timeout_s, "max_tries": job.max_tries}),
            })
        self.rows_unlisted = unlisted
        return rows

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        job = next((j for j in list(self.jobs) if str(j.name) == row["source_key"]), None)
        if job is None:
            raise Conflict(f"cron job {row['name']!r} is not in this arq worker any more")
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            raise RuntimeError("the arq worker's event loop is not running (the worker is stopping?); "
                               "trigger again once it runs")
        if threading.get_ident() == self.loop_thread:
            raise RuntimeError("Trigger now runs on the command thread, not on the worker's event loop")
        future = asyncio.run_coroutine_threadsafe(
            self.pool.enqueue_job(str(job.name), _queue_name=self.queue_name), loop)
        try:
            queued = future.result(TRIGGER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RuntimeError(f"the enqueue of {job.name} was not confirmed within {TRIGGER_TIMEOUT:g} s (the "
                               f"worker's event loop is busy): it may still be queued; look at the queue before "
                               f"triggering again") from None
        if queued is None:  # arq: a job with that id exists (ids here are new)
            raise RuntimeError(f"arq did not enqueue {job.name}: a job with its id exists")
        self.runs.count(str(job.name))
        return {"task_id": str(queued.job_id), "task_name": str(job.name)}


_lock = threading.Lock()
_streams: Dict[Tuple[int, str], ExternalScheduler] = {}


def _watch(job: Any, stream: ExternalScheduler) -> None:
    """Counts the runs of `job`: arq's cron loop calls `calculate_next`
    with the due time right after enqueueing it (and with the time it
    starts at, once, before the first)."""
    if job.__dict__.get("_z4j_agentd_watched"):
        job.__dict__["_z4j_agentd_stream"] = stream
        return
    original = job.calculate_next
    job.__dict__["_z4j_agentd_stream"] = stream

    def calculate_next(prev_run: datetime) -> None:
        due = job.next_run
        original(prev_run)
        try:
            if due is not None and prev_run == due:
                stream_now: ExternalScheduler = job.__dict__["_z4j_agentd_stream"]
                stream_now.source.runs.count(str(job.name), due)  # type: ignore[attr-defined]
                stream_now.changed()
        except Exception:  # never into arq's cron loop
            log.debug("z4j-agentd: a cron run was not counted", exc_info=True)

    job.calculate_next = calculate_next
    job.__dict__["_z4j_agentd_watched"] = True


def _setting(settings: Any, name: str) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(name)
    return getattr(settings, name, None)


def serve(ctx: Mapping[str, Any], settings: Any, client: Any = None, *, queue_name: Optional[str] = None,
          timezone: Optional[tzinfo] = None, state_dir: Optional[str] = None) -> Optional[ExternalScheduler]:
    """Serves the worker's cron jobs as the scheduler `arq-cron`.

    Call it from the worker's `on_startup(ctx)` (it needs the worker's
    running event loop and `ctx["redis"]`, the worker's pool). `settings`
    is what the worker was started with: the `WorkerSettings` class (or a
    dict of the same), or just the list of cron jobs; `queue_name` and
    `timezone` default to the settings' and then to arq's (`arq:queue`, the
    system's UTC offset now, as arq's Worker takes it). Idempotent: called again in the same process for
    the same queue, it binds the scheduler already served to this worker's
    loop, pool and jobs and returns it.

    A worker without cron jobs serves nothing (returns None), unless the
    state file of its queue holds rows published earlier: then it serves,
    so that they leave the page.
    """
    from ..client import get_client

    if isinstance(settings, (list, tuple)):
        jobs: List[Any] = list(settings)
    else:
        jobs = list(_setting(settings, "cron_jobs") or [])
        queue_name = queue_name or _setting(settings, "queue_name")
        timezone = timezone or _setting(settings, "timezone")
    queue_name = str(queue_name or DEFAULT_QUEUE)
    pool = ctx.get("redis") if isinstance(ctx, Mapping) else None
    if pool is None:
        raise ValueError("ctx has no 'redis' pool: call serve(ctx, WorkerSettings) from the worker's on_startup")
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("serve() needs the worker's running event loop: call it from the worker's "
                           "on_startup") from None
    tz = timezone or arq_timezone()
    key = (os.getpid(), queue_name)
    state_path = cs.state_file(SCHEDULER, queue_name, state_dir)
    with _lock:
        stream = _streams.get(key)
        fresh = stream is None
        if stream is None and not jobs and not cs.has_published(state_path):
            log.debug("z4j-agentd: the worker of %s has no cron jobs: %s is not served", queue_name, SCHEDULER)
            return None
        if stream is None:
            client = client or get_client()
            runs = cs.Runs()
            # The counters published before this worker started carry on.
            cs.seed_runs(runs, state_path, SCHEDULER)
            stream = ExternalScheduler(SCHEDULER, CronSource(runs), cs.sender(client),
                                       poll_interval=POLL_SECONDS, min_interval=MIN_SNAPSHOT_SECONDS,
                                       state_path=state_path)
            _streams[key] = stream
        source: CronSource = stream.source  # type: ignore[assignment]
        source.bind(jobs, queue_name, tz, pool, loop)
        for job in jobs:
            _watch(job, stream)
    if fresh:
        stream.serve(client)
        log.info("z4j-agentd: serving %s (%d cron jobs, queue %s) for the brain's Schedules page", SCHEDULER,
                 len(jobs), queue_name)
    else:
        stream.changed()
    return stream


def stats(queue_name: str = DEFAULT_QUEUE) -> Optional[Dict[str, Any]]:
    """The served scheduler's `stats()` plus `rows_unlisted`, or None."""
    stream = _streams.get((os.getpid(), queue_name))
    if stream is None:
        return None
    return {**stream.stats(), "rows_unlisted": getattr(stream.source, "rows_unlisted", 0)}


__all__ = ["CAPABILITIES", "CronSource", "SCHEDULER", "expression_of", "serve", "stats"]
