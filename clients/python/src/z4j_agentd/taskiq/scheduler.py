"""taskiq scheduler: its schedule sources on the brain's Schedules page.

One line in the module that builds the scheduler is all it takes:

    scheduler = TaskiqScheduler(broker, sources=[LabelScheduleSource(broker), redis_source])
    z4j_agentd.taskiq.scheduler.install(scheduler)

`taskiq scheduler app:scheduler` marks the broker as a scheduler process
(`broker.is_scheduler_process`), starts every source, then calls
`scheduler.startup()` on the loop that runs the scheduler. `install` wraps
that call: once it returns in a scheduler process, this module serves the
scheduler `taskiq-scheduler` through z4j's external schedule protocol
(see `z4j_agentd._schedules`), on that loop. Anywhere else (a worker, a
web app importing the same module) it does nothing.

* every schedule of every source is listed, with its kind (cron,
  interval, or clocked for taskiq's `time`), expression, time zone,
  arguments, last run, next run and run count;
* "Trigger now" kicks the schedule's task at once, with the schedule's
  labels (plus `schedule_id`, as the scheduler adds) and arguments, from
  the scheduler's loop;
* the schedules of a writable source (taskiq-redis's
  `ListRedisScheduleSource` and `RedisScheduleSource`, or any source whose
  class implements both `add_schedule` and `delete_schedule`) may also be
  created, updated (delete, then add under the same `schedule_id`; the old
  one is added back when the add fails, and a write is never cancelled
  half-way) and deleted from the brain. The running scheduler takes the change at once
  (the list of schedules it holds for the source is edited in place, on its
  loop), and every later re-read of the source agrees. taskiq has no
  disabled state for a schedule, so enable and disable are not offered.
* a source other than the label one is read in full every READ_INTERVAL
  (and after the brain's writes and triggers), not at every look.

Source keys (a row's identity on the brain): the schedule's `schedule_id`,
the identity taskiq itself keys its schedules by; but a
`LabelScheduleSource` schedule declared without `schedule_id` gets a new
random id at each start, so it is keyed by its content
(`label:<sha256>`, as z4j-taskiqscheduler keys it, so rows stay the same
rows when a project moves over). A schedule of a writable source is named
by its `schedule_id` (a create from the brain uses the name it is given as
the `schedule_id`); the others `<task name> [<source key>]`. An id the
brain could not take as it is (over MAX_NAME characters, spaces at an
end) is keyed and named by its start and a hash of the whole.

Runs: taskiq keeps no run history, so a row's `total_runs` counts the sends
of this scheduler process (since it started) and of "Trigger now";
`last_run_at` is the latest of them; an interval's `next_run_at` follows
the scheduler's own sends only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
import os
import re
import threading
import time
from datetime import datetime, time as dtime, timedelta, timezone
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from .._schedules import (
    MUTATION, ROW_PAYLOAD_BYTES, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, canonical_json,
    check_definition_types, configuration, durable_sender, fit_row, frame_bytes, keep_left_out_arguments, normalize_row,
)

log = logging.getLogger("z4j_agentd.taskiq.scheduler")

SCHEDULER = "taskiq-scheduler"
ENGINE = "taskiq"
#: Seconds between two looks at the sources for changes made elsewhere (a
#: schedule added by the application, another process deleting one).
POLL_SECONDS = 5.0
#: Seconds at least between two snapshots the scheduler's own activity causes
#: (its sends, changes found by a look); the brain's commands get theirs at once.
MIN_SNAPSHOT_SECONDS = 5.0
#: Seconds between two full reads of a Redis (or other non-label) source
#: when nothing asked for one sooner (taskiq's own re-read, its
#: `update_interval`, defaults to 60 s too). A full read of a
#: ListRedisScheduleSource SCANs the Redis keyspace for its schedules on the
#: scheduler's loop, so the looks every POLL_SECONDS reuse the last one; a
#: write or trigger from the brain, and a send of a one-off (`time`)
#: schedule, read again at once. Changed with `install(read_interval=...)`
#: or $Z4J_TASKIQ_SCHEDULER_READ_INTERVAL.
READ_INTERVAL = 60.0
#: Keys a SCAN call of that read asks Redis for at once.
SCAN_COUNT = 10000
#: Seconds a read or write of the sources (on the scheduler's loop) may take.
SOURCE_TIMEOUT = 10.0
#: Seconds a snapshot may take to reach the daemon's spool.
SEND_TIMEOUT = 10.0
#: The file (in the scheduler's working directory unless `install` is told
#: otherwise) that keeps the rows last published (see `ExternalScheduler`).
STATE_FILE = "taskiq-scheduler.z4j-agentd.json"
#: Capabilities of every taskiq scheduler, and those of one with a writable
#: source. MUTATION is declared by every one: without it the brain sends an
#: enable/disable as the older `schedule.external.control`, which this
#: protocol does not take (its refusal stalls the stream); with it, a
#: change to a read-only schedule is refused as a conflict (HTTP 409).
READ_CAPABILITIES = (STABLE_SNAPSHOT, MUTATION, "list", "trigger_now")
WRITE_CAPABILITIES = ("create", "update", "delete")
#: The longest `schedule_id` a create from the brain may give, and the
#: longest name and source key of a row (the brain's limit for a name).
MAX_SCHEDULE_ID = 200
MAX_NAME = 200

_UTC = timezone.utc


# ---------------------------------------------------------------------------
# describing a ScheduledTask


def _offset_text(offset: Any) -> str:
    """A cron offset as the row's time zone: the IANA name taskiq was given,
    or a fixed offset `UTC+02:00`."""
    if offset is None or offset == "":
        return "UTC"
    if isinstance(offset, timedelta):
        seconds = int(offset.total_seconds())
        sign = "-" if seconds < 0 else "+"
        hours, rest = divmod(abs(seconds), 3600)
        return f"UTC{sign}{hours:02d}:{rest // 60:02d}"
    return str(offset)


def _zone(offset: Any) -> Any:
    if offset is None or offset == "":
        return _UTC
    if isinstance(offset, timedelta):
        return timezone(offset)
    from zoneinfo import ZoneInfo

    return ZoneInfo(str(offset))


def _interval_seconds(interval: Any) -> int:
    if isinstance(interval, timedelta):
        return int(interval.total_seconds())
    return int(interval)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=_UTC)


def describe(task: Any) -> Tuple[str, str, str]:
    """(kind, expression, timezone) of a taskiq `ScheduledTask`. A task with
    more than one of cron, interval and time (taskiq fires on each) is
    described by the first of them."""
    if task.cron is not None:
        return "cron", str(task.cron), _offset_text(task.cron_offset)
    if task.interval is not None:
        return "interval", str(_interval_seconds(task.interval)), "UTC"
    if task.time is not None:
        return "clocked", _aware(task.time).isoformat(), "UTC"
    return "cron", "", "UTC"


_next_cache: Dict[Tuple[str, str, datetime], Optional[datetime]] = {}
#: A Monday at midnight: the minute and hour fields are matched alone on it.
_PROBE = datetime(2001, 1, 1)


def next_cron(expression: str, offset: Any, now: datetime) -> Optional[datetime]:
    """The next minute after `now` (UTC) the scheduler fires a cron schedule,
    found with the same matcher taskiq uses (pycron) on the schedule's local
    time; None past a year or when it never fires. pycron itself is asked
    which minutes and which hours the expression takes (84 checks; none:
    None at once), then which of the next 367 days: at most 451 checks, for
    any expression (a read-only schedule's may be one `check_cron` refuses,
    and still fire now and then: `0-7` as a weekday range)."""
    minute = now.astimezone(_UTC).replace(second=0, microsecond=0)
    cache_key = (expression, _offset_text(offset), minute)
    if cache_key in _next_cache:
        return _next_cache[cache_key]
    found = None
    try:
        import pycron

        fields = expression.split(" ")  # as pycron splits it: two spaces is a field it cannot read
        zone = _zone(offset)
        local = minute.astimezone(zone)
        minutes = [m for m in range(60) if pycron.is_now(f"{fields[0]} * * * *", _PROBE.replace(minute=m))]
        hours = [h for h in range(24) if pycron.is_now(f"* {fields[1]} * * *", _PROBE.replace(hour=h))]
        day_expr = "* * " + " ".join(fields[2:])
        for d in range(367 if minutes and hours else 0):
            date = local.date() + timedelta(days=d)
            if not pycron.is_now(day_expr, datetime.combine(date, dtime(12))):
                continue
            for h in hours:
                for m in minutes:
                    candidate = datetime.combine(date, dtime(h, m), tzinfo=zone)
                    at = candidate.astimezone(_UTC)
                    if at.astimezone(zone).replace(tzinfo=None) != candidate.replace(tzinfo=None):
                        continue  # a local time the clock skips (DST): taskiq never sees it
                    if candidate > local:
                        found = at
                        break
                if found:
                    break
            if found:
                break
    except Exception:
        found = None
    if len(_next_cache) > 4096:
        _next_cache.clear()
    _next_cache[cache_key] = found
    return found


_CRON_LABELS = ("minute", "hour", "day of month", "month", "weekday")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
#: Weekday names pycron reads (full and short, any case); it reads no month names.
_WEEKDAYS = {name: i for i, name in enumerate("sunday monday tuesday wednesday thursday friday saturday".split())}
_WEEKDAYS.update({name[:3]: i for name, i in list(_WEEKDAYS.items())})
_CRON_ITEM = re.compile(r"^(\*|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/([0-9]+))?$")


def _cron_value(part: str, index: int, value: str) -> int:
    low, high = _CRON_RANGES[index]
    label = _CRON_LABELS[index]
    if re.fullmatch(r"[0-9]+", part):
        number = int(part)
        if not low <= number <= high:
            extra = " (pycron, taskiq's cron matcher, counts Sunday as 0 and never matches 7)" if index == 4 \
                else ""
            raise ValueError(f"cron {label} field {value!r}: {part!r} is not in {low}..{high}{extra}")
        return number
    if index == 4 and part in _WEEKDAYS:
        return _WEEKDAYS[part]
    if index == 3:
        raise ValueError(f"cron month field {value!r}: {part!r} is not a number 1..12 (pycron, taskiq's cron "
                         f"matcher, reads no month names)")
    raise ValueError(f"cron {label} field {value!r}: {part!r} is not in {low}..{high}")


def check_cron(expression: str) -> str:
    """Refuses a cron expression taskiq's scheduler would skip without a
    word (pycron, its matcher, reads `99 foo * * *`, month names, weekday 7,
    `5/15` or `mon-fri/2` as never), saying which field and what to write
    instead. What it accepts, pycron fires on: per field, a comma list of
    `*`, `*/N`, `V`, `A-B` and `A-B/N` (A <= B, N >= 1), numbers in the
    field's range, weekday names (sun..sat, sunday..saturday) as a single
    value or in a range without step."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"a cron expression has five fields (minute hour day month weekday), got {expression!r}")
    for index, value in enumerate(fields):
        label = _CRON_LABELS[index]
        for item in value.lower().split(","):
            match = _CRON_ITEM.match(item)
            if not match:
                raise ValueError(f"cron {label} field {value!r} is not understood")
            first, last, step = match.groups()
            if step is not None and int(step) <= 0:
                raise ValueError(f"cron {label} field {value!r} has a step of 0")
            if first == "*":
                if last is not None:
                    raise ValueError(f"cron {label} field {value!r} is not understood")
                continue
            if step is not None and last is None:
                raise ValueError(f"cron {label} field {value!r}: a step needs `*` or a range before it "
                                 f"(pycron never fires {item!r}): write */{step} or {first}-"
                                 f"{_CRON_RANGES[index][1]}/{step}")
            start = _cron_value(first, index, value)
            if last is None:
                continue
            end = _cron_value(last, index, value)
            if step is not None and not first.isdigit():
                raise ValueError(f"cron {label} field {value!r}: a range with a step starts with a number "
                                 f"(pycron never fires {item!r}): write {start}-{end}/{step}")
            if start > end:
                raise ValueError(f"cron {label} field {value!r}: the range {item!r} runs backwards (pycron "
                                 f"does not wrap it); write it as two ranges")
    return " ".join(fields)


def _hash(value: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(json_safe(value))).hexdigest()


def _content(task: Any) -> Dict[str, Any]:
    """A schedule's content, without the random `schedule_id` of a label
    schedule: what its `label:` key and `source_hash` are taken over."""
    data = task.model_dump(mode="json", exclude={"schedule_id", "task_id"})
    if task.task_id is not None:
        data["task_id"] = task.task_id
    return data


# ---------------------------------------------------------------------------
# the sources


def _overrides(source: Any, method: str) -> bool:
    from taskiq.abc.schedule_source import ScheduleSource

    return getattr(type(source), method, None) is not getattr(ScheduleSource, method)


class _View:
    """One taskiq schedule source as this module reads and writes it."""

    def __init__(self, index: int, source: Any) -> None:
        from taskiq.schedule_sources import LabelScheduleSource

        self.index = index
        self.source = source
        self.label = isinstance(source, LabelScheduleSource)
        self.list_redis = False
        self.redis = False
        try:
            from taskiq_redis import ListRedisScheduleSource, RedisScheduleSource

            self.list_redis = isinstance(source, ListRedisScheduleSource)
            self.redis = isinstance(source, RedisScheduleSource)
        except ImportError:
            pass
        self.writable = (not self.label) and _overrides(source, "add_schedule") and _overrides(
            source, "delete_schedule")
        self.name = ("label" if self.label else "redis" if self.list_redis or self.redis
                     else type(source).__name__)
        #: The source's own get_schedules, before `watch` wraps it.
        self.get_schedules = source.get_schedules
        #: The list the scheduler's loop last got from the source (it runs
        #: from that list until its next re-read).
        self.live: Optional[list] = None
        #: The schedules of the last full read, when (monotonic) it was done,
        #: and whether something since asked for a new one (see READ_INTERVAL).
        self.cached: Optional[List[Any]] = None
        self.read_at = 0.0
        self.stale = True
        #: Data keys of the last read whose value could not be decoded (left
        #: out), and those already logged.
        self.unreadable: List[str] = []
        self._logged_unreadable: set = set()

    def watch(self, on_sent: Callable[[Any], None]) -> None:
        """Wraps the source's get_schedules (keeping the list the scheduler
        runs from) and post_send (called after each task the scheduler
        kicked for the source)."""
        get_schedules = self.get_schedules
        post_send = self.source.post_send

        async def watched_get_schedules() -> list:
            result = await get_schedules()
            self.live = result if isinstance(result, list) else None
            return result

        def watched_post_send(task: Any) -> Any:
            try:
                if getattr(task, "time", None) is not None:
                    self.stale = True  # a one-off schedule: the source deletes it now
                on_sent(task)
            except Exception:  # never into the scheduler
                log.debug("z4j-agentd: a taskiq send was not counted", exc_info=True)
            return post_send(task)

        self.source.get_schedules = watched_get_schedules
        self.source.post_send = watched_post_send

    async def read(self) -> List[Any]:
        """Every schedule of the source. ListRedisScheduleSource's own
        get_schedules returns only what is due this minute (cron, interval,
        and the `time` schedules of this minute), so its data keys are read."""
        if self.list_redis and all(hasattr(self.source, a) for a in ("_connection_pool", "_serializer",
                                                                      "_prefix")):
            from redis.asyncio import Redis
            from taskiq import ScheduledTask

            src = self.source
            raw: List[Any] = []
            async with Redis(connection_pool=src._connection_pool) as redis:
                # SCAN may return a key twice (when Redis rehashes): each is read once.
                keys = list(dict.fromkeys([key async for key in redis.scan_iter(f"{src._prefix}:data:*",
                                                                               count=SCAN_COUNT)]))
                for i in range(0, len(keys), 500):
                    raw.extend(await redis.mget(keys[i:i + 500]))
            tasks: List[Any] = []
            bad: List[str] = []
            for key, item in zip(keys, raw):
                if not item:
                    continue  # deleted between the SCAN and the read
                try:
                    tasks.append(ScheduledTask.model_validate(src._serializer.loadb(item)))
                except Exception as exc:
                    name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
                    bad.append(name)
                    if name not in self._logged_unreadable:
                        self._logged_unreadable.add(name)
                        log.error("z4j-agentd: taskiq schedule %s cannot be decoded (%s): left out of the "
                                  "brain's Schedules page (taskiq's scheduler cannot read it either); "
                                  "delete or rewrite it", name, scrub_text(f"{type(exc).__name__}: {exc}")[:300])
            self.unreadable = bad
            if len(self._logged_unreadable) > 4096:
                self._logged_unreadable = set(bad)
            return tasks
        return list(await self.get_schedules())

    async def replace(self, schedule_id: str, old: Any, new: Any) -> None:
        """An update: `old` deleted, then `new` added under the same id
        (a taskiq source has no update, and its lists need the delete). When
        the add fails, `old` is added back, and the error says whether it
        was."""
        await self.delete(schedule_id)
        try:
            await self.add(new)
        except Exception as exc:
            failed = scrub_text(f"{type(exc).__name__}: {exc}")
            try:
                await self.add(old)
            except Exception as again:
                log.error("z4j-agentd: taskiq schedule %r was deleted for an update whose add failed (%s), and "
                          "could not be put back (%s)", schedule_id, failed,
                          scrub_text(f"{type(again).__name__}: {again}"))
                raise RuntimeError(f"the update of schedule {schedule_id!r} failed ({failed}) after it was "
                                   f"deleted, and putting it back failed too "
                                   f"({scrub_text(f'{type(again).__name__}: {again}')}): the schedule is "
                                   f"gone from its source; create it again") from None
            raise RuntimeError(f"the update of schedule {schedule_id!r} was not applied ({failed}); the "
                               f"schedule is in its source as it was") from None

    async def add(self, task: Any) -> None:
        await self.source.add_schedule(task)
        if self.live is not None:
            self.live.append(task)

    async def delete(self, schedule_id: str) -> None:
        await self.source.delete_schedule(schedule_id)
        if self.live is not None:
            self.live[:] = [t for t in self.live if getattr(t, "schedule_id", None) != schedule_id]


def _capped(text: str, limit: int = MAX_NAME) -> str:
    """`text` when it is at most `limit` characters and has no space at
    either end (the brain strips names and keys); else its start and a
    hash of the whole, so two long ids stay two rows."""
    if 0 < len(text) <= limit and text == text.strip():
        return text
    return f"{text.strip()[:limit - 18]}~{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _key(schedule_id: str) -> str:
    """The source key of a schedule with the id `schedule_id`."""
    return _capped(schedule_id)


class _Entry:
    __slots__ = ("view", "task", "key", "name")

    def __init__(self, view: _View, task: Any, key: str, name: str) -> None:
        self.view, self.task, self.key, self.name = view, task, key, name


class SchedulerSource(Source):
    """Every source of one `TaskiqScheduler`, read and written on the
    scheduler's event loop `loop` (redis sources hold connections bound to
    it); this module's threads wait for the result."""

    def __init__(self, scheduler: Any, loop: asyncio.AbstractEventLoop, *,
                 read_interval: float = READ_INTERVAL) -> None:
        self.scheduler = scheduler
        self.loop = loop
        self.read_interval = float(read_interval)
        self.views = [_View(i, s) for i, s in enumerate(scheduler.sources)]
        #: Schedule id -> (sends and triggers, the latest of them, the
        #: scheduler's latest send) since this process started, for the ids
        #: of the last read.
        self._runs: Dict[str, Tuple[int, datetime, Optional[datetime]]] = {}
        self._runs_lock = threading.Lock()
        #: The entries of the last read, by source key, and whether that read
        #: read every source (none from its last full read).
        self._entries: Dict[str, _Entry] = {}
        self.read_in_full = False
        self.changed: Callable[[], None] = lambda: None

    # -- plumbing --------------------------------------------------------

    def watch(self) -> None:
        for view in self.views:
            view.watch(self._sent)

    def _sent(self, task: Any) -> None:
        self._count(str(task.schedule_id), by_scheduler=True)
        self.changed()

    def _count(self, schedule_id: str, *, by_scheduler: bool) -> None:
        now = datetime.now(_UTC)
        with self._runs_lock:
            count, _, sent = self._runs.get(schedule_id, (0, None, None))
            self._runs[schedule_id] = (count + 1, now, now if by_scheduler else sent)

    def _stale(self) -> None:
        """The next read reads every source in full."""
        for view in self.views:
            view.stale = True

    def stats(self) -> Dict[str, Any]:
        """Counters `ExternalScheduler.stats()` adds to its own."""
        return {"schedules_unreadable": sum(len(v.unreadable) for v in self.views)}

    def _call(self, work: Callable[[], Awaitable[Any]], *, write: bool = False) -> Any:
        """Runs `work()` on the scheduler's loop and waits for it. A read
        that takes too long is cancelled; a write (`write`) never is: it
        runs to its end on the loop, and the error says it may have been
        applied."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("the taskiq scheduler's sources are read from another thread than its loop")
        if self.loop.is_closed():
            raise RuntimeError("the taskiq scheduler's event loop is closed (it is shutting down)")
        coroutine = work()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except BaseException:
            coroutine.close()
            raise
        try:
            return future.result(SOURCE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            if write:
                self._stale()
                raise TimeoutError(f"the taskiq scheduler's loop did not finish the change within "
                                   f"{SOURCE_TIMEOUT:g} s; it may have been applied (it is not cancelled): "
                                   f"the page shows the outcome after the next snapshot") from None
            future.cancel()
            raise TimeoutError(f"the taskiq scheduler's loop did not read its sources within "
                               f"{SOURCE_TIMEOUT:g} s") from None

    async def _read_all(self, fresh: bool = True) -> Dict[str, _Entry]:
        """Every schedule of every source, by source key. A source that
        cannot be read raises: a snapshot is complete, so leaving its
        schedules out would delete them from the page. Without `fresh`, a
        source other than the label one (which is read from memory) gives
        the schedules of its last full read while that is younger than
        `read_interval` and nothing asked for a new one."""
        explicit = self._explicit_label_ids()
        entries: Dict[str, _Entry] = {}
        duplicates: Dict[str, int] = {}
        now = time.monotonic()
        self.read_in_full = True
        for view in self.views:
            if not fresh and not view.label and not view.stale and view.cached is not None \
                    and now - view.read_at < self.read_interval:
                tasks = view.cached
                self.read_in_full = False
            else:
                view.stale = False  # a change during the read asks again
                try:
                    tasks = await view.read()
                except Exception as exc:
                    view.stale = True
                    raise RuntimeError(f"taskiq schedule source {view.index} ({type(view.source).__name__}) "
                                       f"could not be read: "
                                       f"{scrub_text(f'{type(exc).__name__}: {exc}')}") from None
                view.cached, view.read_at = tasks, now
            for task in tasks:
                sid = str(task.schedule_id)
                if view.label and sid not in explicit:
                    key = "label:" + _hash(_content(task))
                    # Two identical entries: stable keys in declaration order.
                    n = duplicates[key] = duplicates.get(key, 0) + 1
                    if n > 1:
                        key = f"{key}:{n}"
                else:
                    key = _key(sid)
                name = _capped(sid) if view.writable else f"{str(task.task_name)[:100]} [{key[:80]}]"
                if key in entries:
                    log.error("z4j-agentd: two taskiq schedules have the id %r (sources %d and %d); the "
                              "scheduler runs both, the brain lists the first", key, entries[key].view.index,
                              view.index)
                    continue
                entries[key] = _Entry(view, task, key, name)
        return entries

    def _explicit_label_ids(self) -> set:
        """The schedule ids written in the tasks' `schedule` labels."""
        ids = set()
        try:
            tasks = self.scheduler.broker.get_all_tasks()
        except Exception:
            return ids
        for task in tasks.values():
            for item in (getattr(task, "labels", None) or {}).get("schedule", []) or []:
                if isinstance(item, dict) and "schedule_id" in item:
                    ids.add(str(item["schedule_id"]))
        return ids

    # -- rows --------------------------------------------------------------

    def _row(self, entry: _Entry, *, live: bool = True) -> Dict[str, Any]:
        """The row of `entry`; without `live`, its next run is not computed
        (a stand-in of the same size takes its place: the row's size is
        right, and nothing is compared by it): as done on the loop."""
        task = entry.task
        kind, expression, tz = describe(task)
        with self._runs_lock:
            runs, last, sent = self._runs.get(str(task.schedule_id), (0, None, None))
        now = datetime.now(_UTC)
        next_run = None
        if not live:
            next_run = now if kind != "interval" or sent is not None else None
        elif kind == "cron":
            next_run = next_cron(expression, task.cron_offset, now)
        elif kind == "interval" and sent is not None:
            # Not sent yet: the scheduler sends it as soon as it sees it. A
            # trigger from the brain does not move it (taskiq times the
            # interval from its own sends).
            next_run = (sent + timedelta(seconds=int(expression))).replace(microsecond=0)
        elif kind == "clocked":
            next_run = _aware(task.time)
        args = json_safe(task.args)
        kwargs = json_safe(task.kwargs)
        return {
            "source_key": entry.key, "external_id": entry.key, "engine": ENGINE, "scheduler": SCHEDULER,
            "name": entry.name, "task_name": str(task.task_name), "kind": kind, "expression": expression,
            "timezone": tz, "queue": None, "args": args if isinstance(args, list) else [],
            "kwargs": kwargs if isinstance(kwargs, dict) else {}, "is_enabled": True,
            "last_run_at": last, "next_run_at": next_run, "total_runs": runs,
            "source": f"{SCHEDULER}:{entry.view.name}",
            "source_hash": _hash({"source": entry.view.index, **_content(task)}),
        }

    def rows(self) -> List[Dict[str, Any]]:
        entries = self._call(lambda: self._read_all(fresh=False))
        self._entries = entries
        if self.read_in_full:
            present = {str(e.task.schedule_id) for e in entries.values()}
            with self._runs_lock:
                # The counts of schedules gone from every source go too.
                for gone in [sid for sid in self._runs if sid not in present]:
                    del self._runs[gone]
        return [self._row(e) for e in entries.values()]

    def capabilities(self) -> List[str]:
        caps = list(READ_CAPABILITIES)
        if any(v.writable for v in self.views):
            caps += list(WRITE_CAPABILITIES)
        return caps

    # -- trigger now -----------------------------------------------------

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        """Kicks the schedule's task as the sources hold it now (read again
        first: the row the brain compared may be up to `read_interval`
        old)."""
        broker = self.scheduler.broker

        async def kick() -> Any:
            from taskiq.kicker import AsyncKicker

            entries = await self._read_all()
            self._entries = entries
            entry = entries.get(row["source_key"])
            if entry is None:
                raise Conflict(f"schedule {row['name']!r} is not in the taskiq scheduler any more")
            if configuration(fit_row(normalize_row(self._row(entry, live=False), SCHEDULER)) or {}) != \
                    configuration(normalize_row(row, SCHEDULER)):
                raise Conflict(f"schedule {row['name']!r} changed in its taskiq source since the brain saw it; "
                               f"refresh and trigger again")
            task = entry.task
            kicker = AsyncKicker(task.task_name, broker, dict(task.labels or {}))
            kicker.with_labels(schedule_id=task.schedule_id)
            return task, await kicker.kiq(*(task.args or []), **(task.kwargs or {}))

        task, sent = self._call(kick)
        self._count(str(task.schedule_id), by_scheduler=False)
        task_id = getattr(sent, "task_id", None)
        return {"task_id": str(task_id) if task_id else None, "task_name": str(task.task_name)}

    # -- the brain's writes ----------------------------------------------

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Create, update or delete, on the scheduler's loop: the current
        schedule is read and compared with `expected` first, and the new
        one is built (and refused with the reason) before anything is
        written. An update deletes the schedule and adds it again under the
        same `schedule_id` (the old one is put back when the add fails).
        The write is shielded: a timeout or the loop's shutdown does not
        cut it between its steps. The row returned is built after the
        write, off the loop."""
        _check_definition(definition)

        async def work() -> Optional[_Entry]:
            entries = await self._read_all()
            if operation == "create":
                view = next((v for v in self.views if v.writable), None)
                if view is None:
                    raise Conflict("this taskiq scheduler has no writable schedule source (taskiq-redis's "
                                   "ListRedisScheduleSource, for one); its schedules are read-only")
                missing = {"name", "task_name", "kind", "expression"} - set(definition)
                if missing:
                    raise ValueError(f"a new schedule needs {sorted(missing)}")
                sid = str(definition["name"]).strip()
                if len(sid) > MAX_SCHEDULE_ID:
                    raise ValueError(f"a schedule's name (its taskiq schedule_id) is at most {MAX_SCHEDULE_ID} "
                                     f"characters, got {len(sid)}")
                if sid in entries or any(e.name == sid for e in entries.values()):
                    raise Conflict(f"a taskiq schedule named {sid!r} exists already")
                spec = {"timezone": "UTC", "args": [], "kwargs": {}, **definition}
                task = self._build(sid, spec, None)
                entry = _Entry(view, task, sid, sid)
                self._checked(entry)
                await asyncio.shield(view.add(task))
                self._entries = {**entries, sid: entry}
                return entry
            entry = entries.get(source_key or "")
            if entry is None:
                raise Conflict(f"schedule {source_key!r} is not in the taskiq scheduler any more; refresh")
            if not entry.view.writable:
                raise Conflict(f"schedule {entry.name!r} comes from taskiq's {type(entry.view.source).__name__}, "
                               f"which is read-only (edit the task's schedule label in the code); only the "
                               f"schedules of a writable source (e.g. taskiq-redis's ListRedisScheduleSource) "
                               f"can be changed from the brain")
            full = normalize_row(self._row(entry, live=False), SCHEDULER)
            current = fit_row(full) or {}
            if configuration(current) != configuration(dict(expected or {})):
                raise Conflict(f"schedule {entry.name!r} changed in its taskiq source since the brain saw it; "
                               f"refresh and try again")
            sid = str(entry.task.schedule_id)
            if operation == "delete":
                await asyncio.shield(entry.view.delete(sid))
                self._entries = {k: e for k, e in entries.items() if k != entry.key}
                return None
            if "name" in definition and str(definition["name"]).strip() != current["name"]:
                raise ValueError(f"the name of this schedule is its taskiq schedule_id ({sid!r}), which does "
                                 f"not change; create a schedule with the new name and delete this one")
            changes = keep_left_out_arguments(definition, full)
            merged = {**current, **changes}
            if merged["kind"] != "cron" and "timezone" not in changes:
                merged["timezone"] = "UTC"
            task = self._build(sid, merged, entry.task, changes)
            new = _Entry(entry.view, task, entry.key, entry.name)
            if {"args", "kwargs"} & set(changes):
                self._checked(new)  # (arguments kept as they are: the page shows them as it can)
            await asyncio.shield(entry.view.replace(sid, entry.task, task))
            self._entries = {**entries, entry.key: new}
            return new

        try:
            done = self._call(work, write=True)
        finally:
            self._stale()  # the snapshot that confirms it reads the sources again
        return self._row(done) if done is not None else None

    def _checked(self, entry: _Entry) -> None:
        size = frame_bytes(normalize_row(self._row(entry, live=False), SCHEDULER))
        if size > ROW_PAYLOAD_BYTES:
            raise ValueError(f"schedule {entry.name!r} is {size} bytes of JSON, more than a snapshot frame "
                             f"holds ({ROW_PAYLOAD_BYTES}); shorten its args or kwargs")

    def _build(self, schedule_id: str, spec: Mapping[str, Any], native: Any,
               changes: Optional[Mapping[str, Any]] = None) -> Any:
        """The taskiq ScheduledTask `spec` describes; `native` is the one it
        replaces (its labels, task id and cron offset are kept), `changes`
        what the brain's update names."""
        from taskiq import ScheduledTask

        task_name = str(spec["task_name"]).strip()
        registered = self.scheduler.broker.find_task(task_name)
        if registered is None:
            raise ValueError(f"task {task_name!r} is not registered with the scheduler's broker (import the "
                             f"module that defines it in the scheduler, e.g. `taskiq scheduler app:scheduler "
                             f"app.tasks`)")
        if spec.get("queue") not in (None, ""):
            raise ValueError("taskiq routes a task by its broker and labels; queue must be empty")
        if spec.get("is_enabled", True) is not True:
            raise ValueError("taskiq schedule sources have no disabled state: delete the schedule, and create "
                             "it again to resume")
        if native is not None and native.task_name == task_name:
            labels = dict(native.labels or {})
        else:
            labels = {k: v for k, v in (registered.labels or {}).items() if k != "schedule"}
        kind, expression, tz = str(spec["kind"]), str(spec["expression"]).strip(), spec.get("timezone") or "UTC"
        fields: Dict[str, Any] = {}
        if kind == "cron":
            fields["cron"] = check_cron(expression)
            if native is not None and native.cron is not None and tz == _offset_text(native.cron_offset):
                fields["cron_offset"] = native.cron_offset
            elif tz != "UTC":
                try:
                    _zone(tz)
                except Exception:
                    raise ValueError(f"unknown timezone {tz!r} (an IANA name such as Europe/Paris)") from None
                fields["cron_offset"] = tz
        elif kind == "interval":
            if not re.fullmatch(r"[0-9]+", expression) or int(expression) <= 0:
                raise ValueError(f"a taskiq interval is a whole positive number of seconds, got {expression!r}")
            fields["interval"] = int(expression)
        elif kind == "clocked":
            try:
                when = datetime.fromisoformat(expression.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"a clocked schedule's expression is an ISO-8601 time, got {expression!r}") from None
            if when.tzinfo is None:
                raise ValueError(f"a clocked schedule's time needs an offset (e.g. +00:00), got {expression!r}")
            fields["time"] = when
        else:
            raise ValueError(f"a taskiq schedule is cron, interval or clocked (taskiq's time), got {kind!r}")
        if kind != "cron" and tz != "UTC":
            raise ValueError(f"only a cron schedule has a timezone; {kind} schedules run in UTC, got {tz!r}")
        # Arguments the brain does not name stay as the source holds them
        # (the row shows them made JSON-safe).
        changes = changes or {}
        args = spec.get("args") if native is None or "args" in changes else native.args
        kwargs = spec.get("kwargs") if native is None or "kwargs" in changes else native.kwargs
        return ScheduledTask(task_name=task_name, labels=labels, args=list(args or []),
                             kwargs=dict(kwargs or {}), schedule_id=schedule_id,
                             task_id=native.task_id if native is not None else None, **fields)


def _check_definition(spec: Mapping[str, Any]) -> None:
    """Refuses a field of the brain's definition of the wrong type."""
    check_definition_types(spec)
    if "timezone" in spec and spec["timezone"] is not None and not isinstance(spec["timezone"], str):
        raise ValueError(f"timezone must be a string, got {spec['timezone']!r}")


# ---------------------------------------------------------------------------
# wiring



class _Installation:
    def __init__(self, scheduler: Any, client: Any, state_path: Optional[str],
                 read_interval: Optional[float]) -> None:
        self.scheduler = scheduler
        self.bound_client = client
        self.state_path = state_path
        self.read_interval = read_interval
        self.stream: Optional[ExternalScheduler] = None

    @property
    def client(self) -> Any:
        from ..client import get_client

        return self.bound_client or get_client()


_active: Optional[ExternalScheduler] = None
_lock = threading.Lock()


def active() -> Optional[ExternalScheduler]:
    """The scheduler served by this process (its `stats()`), or None."""
    return _active


def _read_interval(value: Optional[float]) -> float:
    raw: Any = value
    where = "read_interval"
    if raw is None:
        raw = os.environ.get("Z4J_TASKIQ_SCHEDULER_READ_INTERVAL") or READ_INTERVAL
        where = "Z4J_TASKIQ_SCHEDULER_READ_INTERVAL"
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{where} is the seconds between two full reads of the taskiq schedule sources, a "
                         f"positive number; got {raw!r}")
    return seconds


def start(scheduler: Any, loop: Optional[asyncio.AbstractEventLoop] = None, client: Any = None, *,
          state_path: Optional[str] = None, read_interval: Optional[float] = None) -> ExternalScheduler:
    """Serves `scheduler`'s sources now, reading them on `loop` (the running
    loop when called from a coroutine). `install` calls it in `taskiq
    scheduler`; call it yourself only from a runner of your own, after the
    sources' `startup()`. The second call in a process returns the first
    stream. `read_interval`: see READ_INTERVAL."""
    global _active
    with _lock:
        if _active is not None:
            return _active
        if loop is None:
            loop = asyncio.get_running_loop()
        if client is None:
            from ..client import get_client

            client = get_client()
        source = SchedulerSource(scheduler, loop, read_interval=_read_interval(read_interval))
        path = os.path.abspath(state_path or os.environ.get("Z4J_TASKIQ_SCHEDULER_STATE") or STATE_FILE)
        stream = ExternalScheduler(SCHEDULER, source, durable_sender(client, SEND_TIMEOUT), poll_interval=POLL_SECONDS,
                                   min_interval=MIN_SNAPSHOT_SECONDS, state_path=path)
        source.changed = stream.changed
        source.watch()
        stream.serve(client)
        _active = stream
    log.info("z4j-agentd: serving %s (%s) for the brain's Schedules page", SCHEDULER,
             ", ".join(f"{type(v.source).__name__}{' (writable)' if v.writable else ''}" for v in source.views))
    return stream


def install(scheduler: Any, client: Any = None, *, state_path: Optional[str] = None,
            read_interval: Optional[float] = None) -> Any:
    """Puts `scheduler` (a `taskiq.TaskiqScheduler`) on the brain's Schedules
    page when it runs in `taskiq scheduler`: wraps its `startup()`, which
    that command calls on its loop once every source has started. Elsewhere
    nothing happens. Without `client`, the process's default client
    (`z4j_agentd.get_client()`) as it is when the scheduler starts.
    `state_path` is the file that keeps the rows last published (default
    $Z4J_TASKIQ_SCHEDULER_STATE, else `STATE_FILE` in the working
    directory; keep it on persistent storage). `read_interval`: seconds
    between two full reads of the Redis sources (default
    $Z4J_TASKIQ_SCHEDULER_READ_INTERVAL, else READ_INTERVAL). Calling it
    again for the same scheduler only updates `client`, `state_path` and
    `read_interval`. Returns the client."""
    installed = getattr(scheduler, "_z4j_agentd_installation", None)
    if isinstance(installed, _Installation):
        installed.bound_client = client
        installed.state_path = state_path
        installed.read_interval = read_interval
        return installed.client
    if not (hasattr(scheduler, "broker") and hasattr(scheduler, "sources") and hasattr(scheduler, "startup")):
        raise TypeError(f"install() takes a taskiq TaskiqScheduler, got {type(scheduler).__name__}")
    if read_interval is not None:
        _read_interval(read_interval)  # a bad value is refused here, not when the scheduler starts
    installation = _Installation(scheduler, client, state_path, read_interval)
    original_startup = scheduler.startup
    original_shutdown = scheduler.shutdown

    async def startup(*args: Any, **kwargs: Any) -> Any:
        result = original_startup(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if getattr(scheduler.broker, "is_scheduler_process", False):
            try:
                installation.stream = start(scheduler, asyncio.get_running_loop(), installation.client,
                                            state_path=installation.state_path,
                                            read_interval=installation.read_interval)
            except Exception:
                log.exception("z4j-agentd: could not serve the taskiq scheduler's schedules")
        return result

    async def shutdown(*args: Any, **kwargs: Any) -> Any:
        if installation.stream is not None:
            installation.stream.stop()
        result = original_shutdown(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    scheduler.startup = startup
    scheduler.shutdown = shutdown
    scheduler._z4j_agentd_installation = installation
    return installation.client


__all__ = ["SCHEDULER", "SchedulerSource", "active", "check_cron", "describe", "install", "next_cron", "start"]
