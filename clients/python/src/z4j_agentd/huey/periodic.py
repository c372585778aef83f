"""Huey's periodic tasks on the brain's Schedules page.

`serve(huey)` in the consumer (the process whose Scheduler enqueues the
periodic tasks: `huey_consumer app.huey`, without `-n`) serves the
scheduler `huey-periodic` through z4j's external schedule protocol (see
`z4j_agentd._schedules`):

* every `@huey.periodic_task(crontab(...))` of the Huey instance is listed:
  its name, task (the registry's `module.name`), cron expression (five
  fields, `minute hour day month day-of-week`, 0 = Sunday as in Huey),
  timezone (UTC with `Huey(utc=True)`, Huey's default; else the system's),
  next run, and the last run and run count this process saw;
* "Trigger now" enqueues the task at once (`huey.enqueue` of a new
  instance, as the Scheduler does), and counts as a run; a disabled task
  is refused (Huey's consumer would skip it: enable it first);
* enable and disable are Huey's own switch, `huey.restore_all(task)` and
  `huey.revoke_all(task)`: kept in Huey's storage, so every consumer of
  the instance (and a restarted one) follows it. A row shows disabled
  while the task is revoked, whoever revoked it (the application's own
  `revoke_all`, `revoke(revoke_once=True)` until its one skipped run, or
  `revoke(revoke_until=...)` until that time); it is read without
  consuming a one-time revoke. A disabled task is still picked by the
  Scheduler, and the consumer skips it (Huey's `SIGNAL_REVOKED`): that
  is no run. A revoke made by the application shows within
  `POLL_SECONDS`; one made from the brain at once;
* the tasks are defined in code: the brain cannot create, update (other
  than enable/disable) or delete them (the capabilities say so; edit the
  decorator).

Runs: the Scheduler's runs are seen through `huey.read_periodic` (the
call it makes each minute to pick the tasks due) and counted when its
`huey.enqueue` of a picked task returns (an enqueue that raised is no run).
`watch(huey)` puts that watch in place (`install(huey)` calls it); `serve`
does too, but the Scheduler makes its first check when the consumer
starts, so watch where the Huey instance is made to count that one too.
A restarted consumer carries on from the counters it last published (read
from its state file, below). With `-k process` the Scheduler runs in a
process the consumer forks after it serves: that process hands its runs
(and check times) to the serving one through a pipe made at `serve`.

Huey's Scheduler checks every 60 s from the consumer's start, not on the
minute: a task due at 09:00 runs at 09:00 plus the seconds the consumer
started past a minute. The next run shown includes those seconds once the
Scheduler's first check was seen in this process.

A periodic task whose validator is not Huey's `crontab` (any function of a
datetime) has no cron expression, and one with both a day of month and a
day of week (Huey runs it when both match; cron text means either) has
one only when its days are whole weeks of the month (1-7, 8-14, 15-21,
22-28, 29-31: `crontab(day="1-7", day_of_week="1")`, the first Monday, is
`* * 1#1`). Others are left out of the page, logged once, and counted in
`stats(huey)["rows_unlisted"]`.

Source keys are the registry's task names (`module.name`, as
z4j-hueyperiodic's), so rows stay the same rows across restarts and when a
project moves over from it. The rows last published are kept in
`.z4j-agentd-huey-periodic-<huey name>.json` in the working directory (or
`state_dir`), so that a periodic task removed from the code while the
consumer was stopped leaves the page too (see `ExternalScheduler`).
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import weakref
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import _codesched as cs
from .._schedules import MUTATION, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, configuration, normalize_row

log = logging.getLogger("z4j_agentd.huey.periodic")

SCHEDULER = "huey-periodic"
ENGINE = "huey"
#: Capabilities: listed, triggered, enabled and disabled (Huey's
#: `restore_all` / `revoke_all`); no create, update of another field or
#: delete (the tasks are code). The brain asks for `enable` / `disable`
#: for an update whose definition is only `is_enabled`, and sends it as
#: `schedule.external.mutate` (needing the mutation token); it refuses
#: create, update and delete itself (HTTP 409, "does not support this
#: operation") before sending anything.
CAPABILITIES = (STABLE_SNAPSHOT, MUTATION, "list", "read", "trigger_now", "enable", "disable")
#: Seconds between two looks at the tasks (they change only with the code;
#: runs ask for a snapshot themselves).
POLL_SECONDS = 30.0
#: Seconds at least between two snapshots the Scheduler's runs cause.
MIN_SNAPSHOT_SECONDS = 5.0
#: Days searched for a task's next run (Huey needs day *and* weekday to
#: match: February 29th on a Monday comes back within 28 years).
NEXT_RUN_DAYS = 28 * 366

_WATCHED = "_z4j_agentd_periodic_runs"


def cron_settings(task: Any) -> Optional[List[List[int]]]:
    """The five sets of Huey's `crontab` (month, day, weekday, hour,
    minute), read from the periodic task's validator; None for another
    validator."""
    fn = getattr(task, "validate_datetime", None)
    fn = getattr(fn, "__func__", fn)
    for _ in range(3):  # the decorator's method -> crontab's validate_date
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
        if code is None or not cells:
            return None
        free = dict(zip(code.co_freevars, cells))
        if "cron_settings" in free:
            settings = free["cron_settings"].cell_contents
            if isinstance(settings, list) and len(settings) == 5:
                return [list(s) for s in settings]
            return None
        inner = free.get("validate_datetime")
        fn = inner.cell_contents if inner is not None else None
    return None


def expression_of(settings: Sequence[Sequence[int]]) -> str:
    months, days, weekdays, hours, minutes = settings
    # Huey's `*` day-of-week is 0-7 (7 is Sunday again); cron's is 0-6.
    return cs.expression(minutes, hours, days, months, {d % 7 for d in weekdays})


def next_run(settings: Sequence[Sequence[int]], after: datetime) -> Optional[datetime]:
    """The first minute after `after` (naive, Huey's clock) that matches
    every set, as Huey matches them (all five, day and weekday both)."""
    months, days, weekdays, hours, minutes = (sorted(set(s)) for s in settings)
    weekdays = sorted({d % 7 for d in weekdays})
    day: date = after.date()
    for _ in range(NEXT_RUN_DAYS):
        if day.month in months and day.day in days and (day.weekday() + 1) % 7 in weekdays:
            for h in hours:
                for m in minutes:
                    candidate = datetime(day.year, day.month, day.day, h, m)
                    if candidate > after:
                        return candidate
        day += timedelta(days=1)
    return None


class PeriodicSource(Source):
    """The periodic tasks of one Huey instance: triggerable, and enabled or
    disabled with Huey's own revoke switch; otherwise read-only."""

    def __init__(self, huey: Any, runs: cs.Runs, check_offset: Optional[Callable[[], Optional[float]]] = None) -> None:
        self.huey = huey
        self.runs = runs
        #: Seconds past the minute the Scheduler checks at, when seen (its
        #: runs come that late in their minute).
        self.check_offset = check_offset or (lambda: None)
        self.rows_unlisted = 0
        self._warned: set = set()

    def capabilities(self) -> List[str]:
        return list(CAPABILITIES)

    def key(self, task_class: Any) -> str:
        return str(self.huey._registry.task_to_string(task_class))

    def _tasks(self) -> List[Tuple[str, Any]]:
        return [(self.key(cls), cls) for cls in list(self.huey._registry._periodic_tasks)]

    def _timezone(self) -> Tuple[str, Any]:
        if getattr(self.huey, "utc", True):
            return "UTC", timezone.utc
        tz = cs.local_timezone()
        return cs.timezone_name(tz), tz

    def rows(self) -> List[Dict[str, Any]]:
        tz_name, tz = self._timezone()
        now = self.huey._get_timestamp()
        shift = timedelta(seconds=self.check_offset() or 0)
        tasks = self._tasks()
        names: Dict[str, int] = {}
        for _, cls in tasks:
            names[str(cls.__name__)] = names.get(str(cls.__name__), 0) + 1
        rows, unlisted = [], 0
        for key, cls in tasks:
            task = cls()
            settings = cron_settings(task)
            try:
                if settings is None:
                    raise ValueError("its validator is not huey's crontab(), so it has no cron expression")
                expr = expression_of(settings)
            except ValueError as exc:
                unlisted += 1
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("z4j-agentd: the periodic task %s is not on the Schedules page: %s", key, exc)
                continue
            assert settings is not None
            # The Scheduler's check of minute m happens at m + offset.
            upcoming = next_run(settings, now - shift)
            if upcoming is not None:
                upcoming += shift
            enabled = not self.revoked(cls)
            count, last = self.runs.get(key)
            name = str(cls.__name__) if names[str(cls.__name__)] == 1 else key
            rows.append({
                "source_key": key, "external_id": key, "engine": ENGINE, "scheduler": SCHEDULER,
                "name": name, "task_name": key, "kind": "cron", "expression": expr, "timezone": tz_name,
                "queue": str(self.huey.name), "args": [], "kwargs": {}, "is_enabled": enabled,
                "last_run_at": cs.to_second(last),
                # A revoked task's picks are skipped: no next run while it is.
                "next_run_at": cs.to_second(upcoming.replace(tzinfo=tz)) if upcoming and enabled else None,
                "total_runs": count, "source": "huey-periodic:code",
                "source_hash": cs.source_hash({"task": key, "cron": expr, "utc": bool(self.huey.utc),
                                               "retries": getattr(task, "retries", None),
                                               "priority": getattr(task, "priority", None)}),
            })
        self.rows_unlisted = unlisted
        return rows

    def revoked(self, task_class: Any) -> bool:
        """Is the task revoked in Huey's storage (`revoke_all`, by the brain's
        disable or the application)? Peeked: a one-time revoke is not
        consumed, an expired `revoke_until` is not deleted."""
        return bool(self.huey.is_revoked(task_class, peek=True))

    def _task(self, source_key: Optional[str], name: Any) -> Any:
        cls = next((c for k, c in self._tasks() if k == source_key), None)
        if cls is None:
            raise Conflict(f"periodic task {name!r} is not in this Huey instance any more")
        return cls

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        cls = self._task(row["source_key"], row["name"])
        if self.revoked(cls):
            # Huey's consumer skips every instance of a revoked task class:
            # an enqueued run would never run.
            raise Conflict(f"periodic task {row['name']!r} is disabled (revoked in Huey): its run would be "
                           f"skipped by the consumer; enable it first, then trigger it")
        task = cls()
        self.huey.enqueue(task)
        self.runs.count(row["source_key"])
        return {"task_id": str(task.id), "task_name": row["source_key"]}

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The brain's enable or disable (an update of `is_enabled` alone):
        `huey.restore_all` or `huey.revoke_all` of the task, when the row is
        still what the brain saw (else Conflict). A change of any other
        field, a create or a delete raises: the task is defined in code."""
        name = (expected or {}).get("name") or source_key
        if operation != "update":
            raise Conflict(f"{SCHEDULER} cannot {operation} periodic tasks: they are defined in code "
                           f"(@huey.periodic_task); change the code, or enable/disable the task here")
        cls = self._task(source_key, name)
        current = next((normalize_row(r, SCHEDULER) for r in self.rows() if r["source_key"] == source_key), None)
        if current is None:
            raise Conflict(f"periodic task {name!r} is not on the Schedules page any more (see the "
                           f"consumer's log); refresh the page")
        if configuration(current) != configuration(normalize_row(dict(expected or {}), SCHEDULER)):
            raise Conflict(f"periodic task {current['name']!r} changed since the brain saw it (enabled or "
                           f"disabled by the application, or its code changed); refresh and try again")
        other = sorted(k for k, v in definition.items() if k != "is_enabled" and v != current.get(k))
        if other:
            raise ValueError(f"periodic task {current['name']!r} is defined in code (@huey.periodic_task): "
                             f"only enable and disable apply here; change {', '.join(other)} in the code")
        if "is_enabled" in definition and bool(definition["is_enabled"]) != current["is_enabled"]:
            if definition["is_enabled"]:
                self.huey.restore_all(cls)
            else:
                self.huey.revoke_all(cls)
            log.info("z4j-agentd: periodic task %s %s from the brain", source_key,
                     "enabled (restore_all)" if definition["is_enabled"] else "disabled (revoke_all)")
        return next((r for r in self.rows() if r["source_key"] == source_key), None)


def _clock(huey: Any, timestamp: Optional[datetime]) -> datetime:
    """Huey's timestamp (naive: UTC, or local time with `utc=False`), aware."""
    when = timestamp if timestamp is not None else huey._get_timestamp()
    if when.tzinfo is not None:
        return when
    if getattr(huey, "utc", True):
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone()


class _Watch:
    """The runs of one Huey instance's periodic tasks: the Scheduler's pick
    of the tasks due (`huey.read_periodic`, each minute), counted when
    `huey.enqueue` of a picked task returns (an enqueue that raised is no
    run). Also the seconds past the minute the Scheduler checks at (it
    checks every 60 s from the consumer's start, not on the minute)."""

    def __init__(self, huey: Any) -> None:
        self.huey = huey
        self.runs = cs.Runs()
        self.streams: List[ExternalScheduler] = []
        self._lock = threading.Lock()
        #: The tasks the Scheduler's last check picked and has not enqueued
        #: yet: task id -> the check's time (replaced at each check).
        self._picked: Dict[str, datetime] = {}
        #: Seconds past the minute of the Scheduler's last check (None: none seen).
        self.check_offset: Optional[float] = None
        #: (the serving process's pid, the pipe's read end, its write end):
        #: how a Scheduler in a process forked from it (`-k process`) hands
        #: it the runs (see `relay`).
        self._relay: Optional[Tuple[int, int, int]] = None
        #: Runs this process could not hand to the serving process (the pipe was full or closed).
        self.relay_dropped = 0
        read_original, enqueue_original = huey.read_periodic, huey.enqueue

        def read_periodic(timestamp: Any = None) -> Any:
            tasks = read_original(timestamp)
            try:
                self._picked_now(tasks, timestamp)
            except Exception:  # never into Huey's Scheduler
                log.debug("z4j-agentd: a periodic check was not seen", exc_info=True)
            return tasks

        def enqueue(task: Any) -> Any:
            picked = self._take(task)
            result = enqueue_original(task)
            if picked is not None:
                self._enqueued(task, picked)
            return result

        huey.read_periodic = read_periodic
        huey.enqueue = enqueue
        _watches.add(self)

    def _picked_now(self, tasks: Any, timestamp: Any) -> None:
        when = _clock(self.huey, timestamp)
        if timestamp is None:  # the Scheduler's own check (it passes no time)
            self.check_offset = when.second + when.microsecond / 1e6
            self._send(["offset", self.check_offset])
        # A revoked task is enqueued all the same and skipped by the
        # consumer: no run (peeked, as the rows read it).
        picked = {str(t.id): when for t in tasks or ()
                  if getattr(t, "id", None) is not None and not self._revoked(t, timestamp)}
        with self._lock:
            self._picked = picked

    def _revoked(self, task: Any, timestamp: Any) -> bool:
        try:
            return bool(self.huey.is_revoked(type(task), timestamp, peek=True))
        except Exception:  # storage unreachable: the enqueue fails as well, and is no run
            log.debug("z4j-agentd: the revoke state of a periodic task was not read", exc_info=True)
            return False

    def _take(self, task: Any) -> Optional[datetime]:
        try:
            task_id = getattr(task, "id", None)
            if task_id is None:
                return None
            with self._lock:
                return self._picked.pop(str(task_id), None)
        except Exception:  # never into Huey's enqueue
            return None

    def _enqueued(self, task: Any, when: datetime) -> None:
        try:
            key = str(self.huey._registry.task_to_string(type(task)))
            if not self._send(["run", key, when.isoformat()]):
                self._count(key, when)
        except Exception:  # never into Huey's Scheduler
            log.debug("z4j-agentd: a periodic run was not counted", exc_info=True)

    def _count(self, key: str, when: datetime) -> None:
        self.runs.count(key, when)
        for stream in list(self.streams):
            stream.changed()

    def relay(self) -> None:
        """In the serving process: a Scheduler in a process forked from it
        from now on (`huey_consumer -k process` forks its Scheduler after
        the consumer serves) hands its runs and check times to this
        process, through a pipe a thread here reads."""
        if self._relay is not None and self._relay[0] == os.getpid():
            return
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a full pipe never holds the Scheduler
        self._relay = (os.getpid(), read_end, write_end)
        threading.Thread(target=self._receive, args=(read_end,), name="z4j-agentd-huey-periodic-relay",
                         daemon=True).start()

    def _send(self, message: List[Any]) -> bool:
        """In a process forked from the serving one: hands `message` to it
        (True, also when it could not: then counted in `relay_dropped` and
        logged once). False in the serving process or without a relay."""
        relay = self._relay
        if relay is None or relay[0] == os.getpid():
            return False
        data = (json.dumps(message) + "\n").encode()
        try:
            if len(data) > select.PIPE_BUF:  # larger writes to a pipe are not atomic
                raise ValueError(f"{len(data)} bytes, more than a pipe writes at once")
            os.write(relay[2], data)
        except Exception as exc:
            self.relay_dropped += 1
            if self.relay_dropped == 1:
                log.warning("z4j-agentd: a periodic run of this Scheduler process did not reach the consumer "
                            "that serves the Schedules page (%s); its counters miss it", exc)
        return True

    def _receive(self, read_end: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                    if message[0] == "run":
                        self._count(str(message[1]), datetime.fromisoformat(message[2]))
                    elif message[0] == "offset":
                        self.check_offset = float(message[1])
                except Exception:
                    log.debug("z4j-agentd: a relayed periodic run was not read", exc_info=True)

    def after_fork(self) -> None:
        """In a forked child (a `-k process` worker or Scheduler): locks of
        its own, and none of the parent's schedulers (they are served by the
        parent, which its runs reach through the relay; this process serves
        its own if it calls serve)."""
        self._lock = threading.Lock()
        self.runs.after_fork()
        self.streams = []
        self.relay_dropped = 0


#: Every _Watch of this process, for the fork hook.
_watches: "weakref.WeakSet[_Watch]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for watched in list(_watches):
        watched.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_lock = threading.Lock()
#: On the Huey instance: (pid, the scheduler served for it in that process).
_SERVED = "_z4j_agentd_periodic_served"


def _served(huey: Any) -> Optional[ExternalScheduler]:
    held = huey.__dict__.get(_SERVED)
    return held[1] if held is not None and held[0] == os.getpid() else None


def watch(huey: Any) -> cs.Runs:
    """Counts the Scheduler's runs of `huey`'s periodic tasks from now on
    (idempotent; harmless in a process that runs no Scheduler)."""
    with _lock:
        watched = huey.__dict__.get(_WATCHED)
        if watched is None:
            watched = _Watch(huey)
            setattr(huey, _WATCHED, watched)
        return watched.runs


def relay(huey: Any) -> None:
    """Makes, in this process, the pipe through which a Scheduler forked
    from it (`huey_consumer -k process`) hands its periodic runs here; for
    a consumer that serves after its start() forked (`serve` makes it too).
    Nothing without periodic tasks."""
    if not huey._registry._periodic_tasks:
        return
    watch(huey)
    with _lock:
        huey.__dict__[_WATCHED].relay()


def serve(huey: Any, client: Any = None, *, state_dir: Optional[str] = None) -> Optional[ExternalScheduler]:
    """Serves `huey`'s periodic tasks as the scheduler `huey-periodic`, from
    this process (the consumer that runs them). Idempotent: called again
    for the same Huey instance in the same process (each worker's
    `on_startup`, say), it returns the scheduler already served.

    A Huey instance without periodic tasks serves nothing (returns None),
    unless its state file holds rows published earlier: then it serves, so
    that they leave the page."""
    from ..client import get_client

    watch(huey)
    state_path = cs.state_file(SCHEDULER, str(huey.name), state_dir)
    with _lock:
        stream = _served(huey)
        if stream is not None:
            return stream
        if not huey._registry._periodic_tasks and not cs.has_published(state_path):
            log.debug("z4j-agentd: %r has no periodic tasks: %s is not served", huey.name, SCHEDULER)
            return None
        watched: _Watch = huey.__dict__[_WATCHED]
        watched.relay()
        client = client or get_client()
        # The counters published before this process started carry on.
        cs.seed_runs(watched.runs, state_path, SCHEDULER)
        source = PeriodicSource(huey, watched.runs, lambda: watched.check_offset)
        stream = ExternalScheduler(SCHEDULER, source, cs.sender(client), poll_interval=POLL_SECONDS,
                                   min_interval=MIN_SNAPSHOT_SECONDS, state_path=state_path)
        watched.streams.append(stream)
        setattr(huey, _SERVED, (os.getpid(), stream))
    stream.serve(client)
    log.info("z4j-agentd: serving %s (%d periodic tasks of %r) for the brain's Schedules page", SCHEDULER,
             len(huey._registry._periodic_tasks), huey.name)
    return stream


def stats(huey: Any) -> Optional[Dict[str, Any]]:
    """The served scheduler's `stats()` plus `rows_unlisted`, or None."""
    stream = _served(huey)
    if stream is None:
        return None
    source = stream.source
    return {**stream.stats(), "rows_unlisted": getattr(source, "rows_unlisted", 0)}


__all__ = ["CAPABILITIES", "PeriodicSource", "SCHEDULER", "cron_settings", "next_run", "relay", "serve", "stats",
           "watch"]
