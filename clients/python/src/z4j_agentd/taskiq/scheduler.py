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
  created, updated (delete, then add under the same `schedule_id`) and
  deleted from the brain. The running scheduler takes the change at once
  (the list of schedules it holds for the source is edited in place, on its
  loop), and every later re-read of the source agrees. taskiq has no
  disabled state for a schedule, so enable and disable are not offered.

Source keys (a row's identity on the brain): the schedule's `schedule_id`,
the identity taskiq itself keys its schedules by; but a
`LabelScheduleSource` schedule declared without `schedule_id` gets a new
random id at each start, so it is keyed by its content
(`label:<sha256>`, as z4j-taskiqscheduler keys it, so rows stay the same
rows when a project moves over). A schedule of a writable source is named
by its `schedule_id` (a create from the brain uses the name it is given as
the `schedule_id`); the others `<task name> [<source key>]`.

Runs: taskiq keeps no run history, so a row's `total_runs` counts the sends
of this scheduler process (since it started) and of "Trigger now";
`last_run_at` is the latest of them.
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
from datetime import datetime, time as dtime, timedelta, timezone
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._schedules import (
    MUTATION, ROW_PAYLOAD_BYTES, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, canonical_json,
    configuration, fit_row, frame_bytes, normalize_row,
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
#: Seconds a read or write of the sources (on the scheduler's loop) may take.
SOURCE_TIMEOUT = 10.0
#: Seconds a snapshot may take to reach the daemon's spool.
SEND_TIMEOUT = 10.0
#: The file (in the scheduler's working directory unless `install` is told
#: otherwise) that keeps the rows last published (see `ExternalScheduler`).
STATE_FILE = "taskiq-scheduler.z4j-agentd.json"
#: Capabilities of every taskiq scheduler, and those of one with a writable source.
READ_CAPABILITIES = (STABLE_SNAPSHOT, "list", "trigger_now")
WRITE_CAPABILITIES = ("create", "update", "delete", MUTATION)
#: The longest `schedule_id` a create from the brain may give.
MAX_SCHEDULE_ID = 200

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


def next_cron(expression: str, offset: Any, now: datetime) -> Optional[datetime]:
    """The next minute after `now` (UTC) the scheduler fires a cron schedule,
    found with the same matcher taskiq uses (pycron) on the schedule's local
    time; None past a year or when it cannot be read. Days, then hours,
    that cannot match are skipped whole, so it costs a few hundred checks."""
    minute = now.astimezone(_UTC).replace(second=0, microsecond=0)
    cache_key = (expression, _offset_text(offset), minute)
    if cache_key in _next_cache:
        return _next_cache[cache_key]
    found = None
    try:
        import pycron

        fields = expression.split()
        if len(fields) == 5:
            zone = _zone(offset)
            local = minute.astimezone(zone)
            day_expr = "* * " + " ".join(fields[2:])
            hour_expr = "* " + " ".join(fields[1:])
            for d in range(367):
                date = local.date() + timedelta(days=d)
                if not pycron.is_now(day_expr, datetime.combine(date, dtime(12), tzinfo=zone)):
                    continue
                for h in range(24):
                    at_hour = datetime.combine(date, dtime(h), tzinfo=zone)
                    if at_hour + timedelta(hours=1) <= local or not pycron.is_now(hour_expr, at_hour):
                        continue
                    for m in range(60):
                        candidate = at_hour.replace(minute=m)
                        if candidate > local and pycron.is_now(expression, candidate):
                            found = candidate.astimezone(_UTC)
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


_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_NAMES = (None, None, None,
               {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
               {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())})
_CRON_ITEM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/([0-9]+))?$")


def check_cron(expression: str) -> str:
    """Refuses a cron expression taskiq's scheduler would skip without a
    word (pycron reads `99 foo * * *` as never), saying which field."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"a cron expression has five fields (minute hour day month weekday), got {expression!r}")
    labels = ("minute", "hour", "day of month", "month", "weekday")
    for value, (low, high), names, label in zip(fields, _CRON_RANGES, _CRON_NAMES, labels):
        for item in value.lower().split(","):
            match = _CRON_ITEM.match(item)
            if not match:
                raise ValueError(f"cron {label} field {value!r} is not understood")
            if match.group(2) is not None and int(match.group(2)) <= 0:
                raise ValueError(f"cron {label} field {value!r} has a step of 0")
            if match.group(1) == "*":
                continue
            for part in match.group(1).split("-"):
                number = names.get(part) if names and not part.isdigit() else (int(part) if part.isdigit() else None)
                if number is None or not low <= number <= high:
                    raise ValueError(f"cron {label} field {value!r}: {part!r} is not in {low}..{high}")
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
                keys = [key async for key in redis.scan_iter(f"{src._prefix}:data:*", count=500)]
                for i in range(0, len(keys), 200):
                    raw.extend(await redis.mget(keys[i:i + 200]))
            return [ScheduledTask.model_validate(src._serializer.loadb(item)) for item in raw if item]
        return list(await self.get_schedules())

    async def add(self, task: Any) -> None:
        await self.source.add_schedule(task)
        if self.live is not None:
            self.live.append(task)

    async def delete(self, schedule_id: str) -> None:
        await self.source.delete_schedule(schedule_id)
        if self.live is not None:
            self.live[:] = [t for t in self.live if getattr(t, "schedule_id", None) != schedule_id]


class _Entry:
    __slots__ = ("view", "task", "key", "name")

    def __init__(self, view: _View, task: Any, key: str, name: str) -> None:
        self.view, self.task, self.key, self.name = view, task, key, name


class SchedulerSource(Source):
    """Every source of one `TaskiqScheduler`, read and written on the
    scheduler's event loop `loop` (redis sources hold connections bound to
    it); this module's threads wait for the result."""

    def __init__(self, scheduler: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduler = scheduler
        self.loop = loop
        self.views = [_View(i, s) for i, s in enumerate(scheduler.sources)]
        #: Schedule id -> (sends, last send) since this process started.
        self._runs: Dict[str, Tuple[int, datetime]] = {}
        self._runs_lock = threading.Lock()
        #: The entries of the last read, by source key.
        self._entries: Dict[str, _Entry] = {}
        self.changed: Callable[[], None] = lambda: None

    # -- plumbing --------------------------------------------------------

    def watch(self) -> None:
        for view in self.views:
            view.watch(self._sent)

    def _sent(self, task: Any) -> None:
        self._count(str(task.schedule_id))
        self.changed()

    def _count(self, schedule_id: str) -> None:
        with self._runs_lock:
            count, _ = self._runs.get(schedule_id, (0, None))
            self._runs[schedule_id] = (count + 1, datetime.now(_UTC))

    def _call(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """Runs `work()` on the scheduler's loop and waits for it."""
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
            future.cancel()
            raise TimeoutError(f"the taskiq scheduler's loop did not read its sources within "
                               f"{SOURCE_TIMEOUT:g} s") from None

    async def _read_all(self) -> Dict[str, _Entry]:
        """Every schedule of every source, by source key. A source that
        cannot be read raises: a snapshot is complete, so leaving its
        schedules out would delete them from the page."""
        explicit = self._explicit_label_ids()
        entries: Dict[str, _Entry] = {}
        duplicates: Dict[str, int] = {}
        for view in self.views:
            try:
                tasks = await view.read()
            except Exception as exc:
                raise RuntimeError(f"taskiq schedule source {view.index} ({type(view.source).__name__}) "
                                   f"could not be read: {type(exc).__name__}: {exc}") from None
            for task in tasks:
                sid = str(task.schedule_id)
                if view.label and sid not in explicit:
                    key = "label:" + _hash(_content(task))
                    # Two identical entries: stable keys in declaration order.
                    n = duplicates[key] = duplicates.get(key, 0) + 1
                    if n > 1:
                        key = f"{key}:{n}"
                else:
                    key = sid
                name = sid if view.writable else f"{str(task.task_name)[:100]} [{key[:80]}]"
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

    def _row(self, entry: _Entry) -> Dict[str, Any]:
        task = entry.task
        kind, expression, tz = describe(task)
        with self._runs_lock:
            runs, last = self._runs.get(str(task.schedule_id), (0, None))
        now = datetime.now(_UTC)
        next_run = None
        if kind == "cron":
            next_run = next_cron(expression, task.cron_offset, now)
        elif kind == "interval" and last is not None:
            # Not sent yet: the scheduler sends it as soon as it sees it.
            next_run = (last + timedelta(seconds=int(expression))).replace(microsecond=0)
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
        entries = self._call(self._read_all)
        self._entries = entries
        return [self._row(e) for e in entries.values()]

    def capabilities(self) -> List[str]:
        caps = list(READ_CAPABILITIES)
        if any(v.writable for v in self.views):
            caps += list(WRITE_CAPABILITIES)
        return caps

    # -- trigger now -----------------------------------------------------

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        entry = self._entries.get(row["source_key"])
        if entry is None:
            raise Conflict(f"schedule {row['name']!r} is not in the taskiq scheduler any more")
        task = entry.task
        broker = self.scheduler.broker

        async def kick() -> Any:
            from taskiq.kicker import AsyncKicker

            kicker = AsyncKicker(task.task_name, broker, dict(task.labels or {}))
            kicker.with_labels(schedule_id=task.schedule_id)
            return await kicker.kiq(*(task.args or []), **(task.kwargs or {}))

        sent = self._call(kick)
        self._count(str(task.schedule_id))
        task_id = getattr(sent, "task_id", None)
        return {"task_id": str(task_id) if task_id else None, "task_name": str(task.task_name)}

    # -- the brain's writes ----------------------------------------------

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """Create, update or delete, on the scheduler's loop: the current
        schedule is read and compared with `expected` first, and the new
        one is built (and refused with the reason) before anything is
        written. An update deletes the schedule and adds it again under the
        same `schedule_id`."""
        _check_definition(definition)

        async def work() -> Optional[Dict[str, Any]]:
            entries = await self._read_all()
            if operation == "create":
                view = next((v for v in self.views if v.writable), None)
                if view is None:
                    raise Conflict("this taskiq scheduler has no writable schedule source")
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
                row = self._checked(entry)
                await view.add(task)
                self._entries = {**entries, sid: entry}
                return row
            entry = entries.get(source_key or "")
            if entry is None:
                raise Conflict(f"schedule {source_key!r} is not in the taskiq scheduler any more; refresh")
            if not entry.view.writable:
                raise Conflict(f"schedule {entry.name!r} comes from taskiq's {type(entry.view.source).__name__}, "
                               f"which is read-only (edit the task's schedule label in the code); only the "
                               f"schedules of a writable source (e.g. taskiq-redis's ListRedisScheduleSource) "
                               f"can be changed from the brain")
            current = fit_row(normalize_row(self._row(entry), SCHEDULER)) or {}
            if configuration(current) != configuration(dict(expected or {})):
                raise Conflict(f"schedule {entry.name!r} changed in its taskiq source since the brain saw it; "
                               f"refresh and try again")
            sid = str(entry.task.schedule_id)
            if operation == "delete":
                await entry.view.delete(sid)
                self._entries = {k: e for k, e in entries.items() if k != entry.key}
                return None
            if "name" in definition and str(definition["name"]).strip() != current["name"]:
                raise ValueError(f"the name of this schedule is its taskiq schedule_id ({sid!r}), which does "
                                 f"not change; create a schedule with the new name and delete this one")
            merged = {**current, **definition}
            if merged["kind"] != "cron" and "timezone" not in definition:
                merged["timezone"] = "UTC"
            task = self._build(sid, merged, entry.task, definition)
            new = _Entry(entry.view, task, entry.key, entry.name)
            row = self._checked(new)
            await entry.view.delete(sid)
            await entry.view.add(task)
            self._entries = {**entries, entry.key: new}
            return row

        return self._call(work)

    def _checked(self, entry: _Entry) -> Dict[str, Any]:
        row = self._row(entry)
        size = frame_bytes(normalize_row(row, SCHEDULER))
        if size > ROW_PAYLOAD_BYTES:
            raise ValueError(f"schedule {entry.name!r} is {size} bytes of JSON, more than a snapshot frame "
                             f"holds ({ROW_PAYLOAD_BYTES}); shorten its args or kwargs")
        return row

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
    for field in ("name", "task_name"):
        if field in spec and (not isinstance(spec[field], str) or not spec[field].strip()):
            raise ValueError(f"{field} must be a non-empty string, got {spec[field]!r}")
    for field in ("kind", "expression"):
        if field in spec and not isinstance(spec[field], str):
            raise ValueError(f"{field} must be a string, got {spec[field]!r}")
    if "args" in spec and not isinstance(spec["args"], list):
        raise ValueError(f"args must be a list, got {spec['args']!r}")
    if "kwargs" in spec and not isinstance(spec["kwargs"], dict):
        raise ValueError(f"kwargs must be an object, got {spec['kwargs']!r}")
    if "is_enabled" in spec and not isinstance(spec["is_enabled"], bool):
        raise ValueError(f"is_enabled must be true or false, got {spec['is_enabled']!r}")
    if "timezone" in spec and spec["timezone"] is not None and not isinstance(spec["timezone"], str):
        raise ValueError(f"timezone must be a string, got {spec['timezone']!r}")


# ---------------------------------------------------------------------------
# wiring


def _sender(client: Any) -> Callable[[List[Dict[str, Any]]], Any]:
    """`send_durable`, tried twice: after a daemon restart the first try
    finds the old connection closed, the second opens a new one."""
    from ..client import DaemonUnavailable

    def send(events: List[Dict[str, Any]]) -> Any:
        try:
            return client.send_durable(events, timeout=SEND_TIMEOUT)
        except DaemonUnavailable:
            return client.send_durable(events, timeout=SEND_TIMEOUT)

    return send


class _Installation:
    def __init__(self, scheduler: Any, client: Any, state_path: Optional[str]) -> None:
        self.scheduler = scheduler
        self.bound_client = client
        self.state_path = state_path
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


def start(scheduler: Any, loop: Optional[asyncio.AbstractEventLoop] = None, client: Any = None, *,
          state_path: Optional[str] = None) -> ExternalScheduler:
    """Serves `scheduler`'s sources now, reading them on `loop` (the running
    loop when called from a coroutine). `install` calls it in `taskiq
    scheduler`; call it yourself only from a runner of your own, after the
    sources' `startup()`. The second call in a process returns the first
    stream."""
    global _active
    with _lock:
        if _active is not None:
            return _active
        if loop is None:
            loop = asyncio.get_running_loop()
        if client is None:
            from ..client import get_client

            client = get_client()
        source = SchedulerSource(scheduler, loop)
        path = os.path.abspath(state_path or os.environ.get("Z4J_TASKIQ_SCHEDULER_STATE") or STATE_FILE)
        stream = ExternalScheduler(SCHEDULER, source, _sender(client), poll_interval=POLL_SECONDS,
                                   min_interval=MIN_SNAPSHOT_SECONDS, state_path=path)
        source.changed = stream.changed
        source.watch()
        stream.serve(client)
        _active = stream
    log.info("z4j-agentd: serving %s (%s) for the brain's Schedules page", SCHEDULER,
             ", ".join(f"{type(v.source).__name__}{' (writable)' if v.writable else ''}" for v in source.views))
    return stream


def install(scheduler: Any, client: Any = None, *, state_path: Optional[str] = None) -> Any:
    """Puts `scheduler` (a `taskiq.TaskiqScheduler`) on the brain's Schedules
    page when it runs in `taskiq scheduler`: wraps its `startup()`, which
    that command calls on its loop once every source has started. Elsewhere
    nothing happens. Without `client`, the process's default client
    (`z4j_agentd.get_client()`) as it is when the scheduler starts.
    `state_path` is the file that keeps the rows last published (default
    $Z4J_TASKIQ_SCHEDULER_STATE, else `STATE_FILE` in the working
    directory; keep it on persistent storage). Calling it again for the
    same scheduler only updates `client` and `state_path`. Returns the
    client."""
    installed = getattr(scheduler, "_z4j_agentd_installation", None)
    if isinstance(installed, _Installation):
        installed.bound_client = client
        installed.state_path = state_path
        return installed.client
    if not (hasattr(scheduler, "broker") and hasattr(scheduler, "sources") and hasattr(scheduler, "startup")):
        raise TypeError(f"install() takes a taskiq TaskiqScheduler, got {type(scheduler).__name__}")
    installation = _Installation(scheduler, client, state_path)
    original_startup = scheduler.startup
    original_shutdown = scheduler.shutdown

    async def startup(*args: Any, **kwargs: Any) -> Any:
        result = original_startup(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if getattr(scheduler.broker, "is_scheduler_process", False):
            try:
                installation.stream = start(scheduler, asyncio.get_running_loop(), installation.client,
                                            state_path=installation.state_path)
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
