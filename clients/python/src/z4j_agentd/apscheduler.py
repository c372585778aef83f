"""APScheduler 3: its jobs on the brain's Schedules page.

`z4j_agentd.apscheduler.install(scheduler)` in the process that runs an
APScheduler 3 scheduler (`BackgroundScheduler`, `BlockingScheduler`,
`AsyncIOScheduler`, any `BaseScheduler`), before or after its `start()`,
serves the scheduler `apscheduler` through z4j's external schedule protocol
(see `z4j_agentd._schedules`):

* every job of every job store is listed, with its trigger (`cron`,
  `interval` in seconds, `clocked` for a date trigger), function reference,
  arguments, next run and whether it is paused;
* "Trigger now" runs the job at once in its own executor (as APScheduler
  runs it when due; its next run stays as it was);
* the brain's create and update (a function named `module:function`, or
  the task of a job the scheduler has), delete, and the enable/disable
  switch change the jobs, checked against the row the brain showed in the
  scheduler's own lock; an update is checked whole (its trigger built, its
  next run found) and then written in one `modify_job`; a function is
  imported before the lock is taken;
* an update writes the arguments only when it changes them, and refuses to
  change arguments the page cannot show exactly (an object shown by its
  repr, a datetime, a tuple, a non-string key, or arguments cut from a row
  too large for a snapshot), saying why; enabling a job whose trigger has
  no run left is refused (APScheduler's `resume_job` would delete it);
* on an AsyncIOScheduler every read and write runs on its event loop; work
  the loop has not started within `LOOP_TIMEOUT` seconds is dropped and
  reported as not done, so it never runs late;
* a snapshot goes to the brain after each change to the jobs and after the
  runs (`MIN_SNAPSHOT_SECONDS` apart at most once), and a look every
  `POLL_SECONDS` catches the rest.

Dramatiq: a job whose function is an actor's `send` is listed under the
actor's name and queue, with the engine `dramatiq`; the brain can create
one by the actor's name.

Source keys are the job ids (`<job store>:<id>` outside the `default`
store), as z4j-apscheduler names its rows, so a row stays the same row
across restarts and when a project moves over.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import sys
import threading
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from ._jsonsafe import json_safe
from ._redact import scrub_text
from ._schedule_args import data_changes
from ._schedules import (MUTATION, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, check_definition_types,
                         configuration, durable_sender, fit_row, normalize_row)

log = logging.getLogger("z4j_agentd.apscheduler")

SCHEDULER = "apscheduler"
#: Seconds between two looks at the jobs (changes the scheduler's events miss,
#: such as a shared job store written by another process).
POLL_SECONDS = 5.0
#: Seconds at least between two snapshots caused by the scheduler's own
#: activity (its runs); the brain's commands get theirs at once.
MIN_SNAPSHOT_SECONDS = 5.0
#: Seconds a snapshot may take to reach the daemon's spool.
SEND_TIMEOUT = 10.0
#: Seconds an operation on an AsyncIOScheduler's event loop may take.
LOOP_TIMEOUT = 10.0
CAPABILITIES = (STABLE_SNAPSHOT, "list", "trigger_now", "create", "update", "delete", "enable", "disable",
                MUTATION)

_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = Sunday


# ---------------------------------------------------------------------------
# cron: APScheduler 3 numbers weekdays from Monday (0), crontab from Sunday


def crontab_weekdays(field: str) -> Set[int]:
    """The weekdays (0 = Sunday, as crontab) a crontab day-of-week field
    names: `*`, numbers 0-7, names, ranges, lists and steps."""
    days: Set[int] = set()
    for part in field.lower().split(","):
        spec, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
        except ValueError:
            raise ValueError(f"bad step in the day-of-week field {field!r}") from None
        if step <= 0:
            raise ValueError(f"bad step in the day-of-week field {field!r}")

        def day(text: str) -> int:
            if text in _DAYS:
                return _DAYS.index(text)
            if text.isdigit() and 0 <= int(text) <= 7:
                return int(text)
            raise ValueError(f"the day-of-week field {field!r} has {text!r} (0-7 or sun..sat)")

        if spec == "*":
            low, high = 0, 6
        elif "-" in spec:
            a, b = spec.split("-", 1)
            low, high = day(a), day(b)
            if high < low:
                raise ValueError(f"the range {spec!r} of the day-of-week field runs backwards")
        else:
            low = high = day(spec)
            if step_text:
                high = 7 if low == 0 else 6
        days.update(d % 7 for d in range(low, high + 1, step))
    return days


def _day_list(days: Set[int]) -> str:
    """Crontab numbers, consecutive ones as a range: `1-5`, `0,6`."""
    if days == set(range(7)):
        return "*"
    out: List[str] = []
    ordered = sorted(days)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if j == i else f"{ordered[i]}-{ordered[j]}" if j > i + 1
                   else f"{ordered[i]},{ordered[j]}")
        i = j + 1
    return ",".join(out)


def _trigger_weekdays(field: Any) -> Set[int]:
    """The weekdays (crontab numbering) APScheduler's day_of_week field matches."""
    monday = date(2024, 1, 1)  # a Monday
    days = set()
    for offset in range(7):
        day = monday + timedelta(days=offset)
        if field.get_next_value(day) == day.weekday():
            days.add((day.weekday() + 1) % 7)
    return days


def _cron_expression(trigger: Any) -> str:
    fields = {f.name: f for f in trigger.fields}
    text = {name: str(f) for name, f in fields.items()}
    if text.get("year") == "*" and text.get("week") == "*" and text.get("second") == "0":
        try:
            dow = _day_list(_trigger_weekdays(fields["day_of_week"]))
        except Exception:
            return str(trigger)
        return " ".join((text["minute"], text["hour"], text["day"], text["month"], dow))
    return str(trigger)


def _seconds_text(value: float) -> str:
    return format(Decimal(str(value)).normalize(), "f")


def _describe(trigger: Any) -> Tuple[str, str, str]:
    """(kind, expression, timezone) of an APScheduler trigger."""
    tz = str(getattr(trigger, "timezone", None) or "UTC")
    name = type(trigger).__name__
    if name == "CronTrigger":
        return "cron", _cron_expression(trigger), tz
    if name == "IntervalTrigger":
        return "interval", _seconds_text(trigger.interval_length), tz
    if name == "DateTrigger":
        return "clocked", trigger.run_date.astimezone(timezone.utc).isoformat(), "UTC"
    return "cron", str(trigger), tz  # a combined or custom trigger: shown as it describes itself


def _actor(func: Any) -> Any:
    """The Dramatiq actor whose `send` is `func`, or None."""
    owner = getattr(func, "__self__", None)
    if owner is None or getattr(func, "__name__", "") not in ("send", "send_with_options"):
        return None
    if type(owner).__module__.split(".")[0] == "dramatiq" and hasattr(owner, "actor_name"):
        return owner
    return None


def _func_ref(job: Any) -> str:
    ref = getattr(job, "func_ref", None)
    if ref:
        return str(ref)
    func = getattr(job, "func", None)
    return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', repr(func))}"


def _hash(native: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(json_safe(native), sort_keys=True).encode()).hexdigest()


def _list(value: Any) -> list:
    value = json_safe(list(value or ()))
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    value = json_safe(dict(value or {}))
    return value if isinstance(value, dict) else {}


def _aware(value: Any) -> Optional[datetime]:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------------
# the source


class APSchedulerSource(Source):
    """The jobs of one APScheduler 3 scheduler: listed, run now, written."""

    def __init__(self, scheduler: Any, *, engine: Optional[str] = None,
                 tasks: Optional[Mapping[str, Callable[..., Any]]] = None) -> None:
        try:
            from apscheduler.schedulers.base import BaseScheduler
        except ImportError:  # APScheduler 4 has no such module
            BaseScheduler = None
        if BaseScheduler is None or not isinstance(scheduler, BaseScheduler):
            raise TypeError(f"z4j_agentd.apscheduler.install takes an APScheduler 3 scheduler (a BaseScheduler: "
                            f"BackgroundScheduler, BlockingScheduler, AsyncIOScheduler, ...), got "
                            f"{type(scheduler).__module__}.{type(scheduler).__qualname__}; APScheduler 4 is "
                            f"a different API: install \"apscheduler<4\"")
        self.scheduler = scheduler
        self.engine = engine
        self.tasks = dict(tasks or {})
        #: Runs seen in this process, by source key: (count, latest run time).
        self._runs: Dict[str, Tuple[int, datetime]] = {}
        self._runs_lock = threading.Lock()

    # -- where the scheduler's state may be touched ---------------------

    def _on_loop(self, work: Callable[[], Any]) -> Any:
        """Runs `work` on an AsyncIOScheduler's event loop (its executor and
        job stores belong to it), waiting for the answer; elsewhere, here."""
        loop = getattr(self.scheduler, "_eventloop", None)
        if loop is None or not hasattr(loop, "call_soon_threadsafe"):
            return work()
        try:
            import asyncio

            if asyncio.get_running_loop() is loop:
                return work()
        except RuntimeError:
            pass
        if loop.is_closed() or not loop.is_running():
            raise RuntimeError("the AsyncIOScheduler's event loop is not running")
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        # Exactly one of "it ran" and "it timed out" wins: work that has not
        # started when the wait ends never runs (a retry from the brain
        # would do it twice), work that has started is waited for.
        gate = threading.Lock()
        state = {"started": False, "abandoned": False}

        def run() -> None:
            with gate:
                if state["abandoned"]:
                    return
                state["started"] = True
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return future.result(timeout=LOOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            with gate:
                if not state["started"]:
                    state["abandoned"] = True
                    raise RuntimeError(f"the AsyncIOScheduler's event loop did not take the work within "
                                       f"{LOOP_TIMEOUT:g} s (it is busy or blocked); nothing was done") from None
        try:
            return future.result(timeout=LOOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"the work started on the AsyncIOScheduler's event loop and is still running "
                               f"after {2 * LOOP_TIMEOUT:g} s; its outcome shows on the page with the next "
                               f"snapshot") from None

    def _check_running(self) -> None:
        from apscheduler.schedulers.base import STATE_STOPPED

        if self.scheduler.state == STATE_STOPPED:
            raise RuntimeError("the APScheduler scheduler is not started yet; its jobs are listed once it is")

    # -- rows ------------------------------------------------------------

    @staticmethod
    def key(alias: str, job_id: str) -> str:
        key = job_id if alias == "default" else f"{alias}:{job_id}"
        if len(key) > 200:  # the brain's names and ids hold 200 characters
            key = key[:135] + "~" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return key

    def _jobs(self) -> List[Tuple[str, Any]]:
        """(job store alias, job) of every job, read under the scheduler's lock."""
        scheduler = self.scheduler
        with scheduler._jobstores_lock:
            self._check_running()
            return [(alias, job) for alias, store in list(scheduler._jobstores.items())
                    for job in store.get_all_jobs()]

    def rows(self) -> List[Dict[str, Any]]:
        return self._on_loop(lambda: [self._row(alias, job) for alias, job in self._jobs()])

    def _row(self, alias: str, job: Any) -> Dict[str, Any]:
        kind, expression, tz = _describe(job.trigger)
        actor = _actor(job.func)
        key = self.key(alias, job.id)
        next_run = _aware(getattr(job, "next_run_time", None))
        with self._runs_lock:
            runs, last = self._runs.get(key, (0, None))
        trigger = job.trigger
        return {
            "source_key": key, "external_id": key, "scheduler": SCHEDULER,
            "engine": self.engine or ("dramatiq" if actor is not None else SCHEDULER),
            "name": key, "task_name": actor.actor_name if actor is not None else _func_ref(job),
            "kind": kind, "expression": expression, "timezone": tz,
            "queue": getattr(actor, "queue_name", None) if actor is not None else None,
            "args": _list(job.args), "kwargs": _dict(job.kwargs), "is_enabled": next_run is not None,
            "next_run_at": next_run, "last_run_at": last, "total_runs": runs,
            "source": "apscheduler:jobstore",
            "source_hash": _hash({"jobstore": alias, "trigger": str(trigger),
                                  "start_date": str(getattr(trigger, "start_date", None)),
                                  "end_date": str(getattr(trigger, "end_date", None)),
                                  "jitter": getattr(trigger, "jitter", None), "executor": job.executor,
                                  "coalesce": job.coalesce, "max_instances": job.max_instances,
                                  "misfire_grace_time": job.misfire_grace_time, "job_name": job.name}),
        }

    def capabilities(self) -> List[str]:
        return list(CAPABILITIES)

    def count_run(self, source_key: str, when: Optional[datetime] = None) -> None:
        with self._runs_lock:
            count, _ = self._runs.get(source_key, (0, None))
            self._runs[source_key] = (count + 1, _aware(when) or datetime.now(timezone.utc))

    def _find(self, source_key: Optional[str]) -> Tuple[str, Any]:
        for alias, job in self._jobs():
            if self.key(alias, job.id) == source_key:
                return alias, job
        raise Conflict(f"schedule {source_key!r} is not in APScheduler any more; refresh the page")

    # -- trigger now -----------------------------------------------------

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        def work() -> Dict[str, Any]:
            scheduler = self.scheduler
            with scheduler._jobstores_lock:
                alias, job = self._find(row["source_key"])
                now = datetime.now(timezone.utc)
                # The job as it is, to its own executor, as the scheduler does when
                # it is due: its next run and trigger stay as they were.
                job._jobstore_alias = alias
                scheduler._lookup_executor(job.executor).submit_job(job, [now])
            self.count_run(row["source_key"], now)
            return {"job_id": job.id, "jobstore": alias, "executor": job.executor, "task_name": row["task_name"],
                    "run_time": now.isoformat()}

        from apscheduler.executors.base import MaxInstancesReachedError

        try:
            return _scrubbed(lambda: self._on_loop(work))
        except MaxInstancesReachedError:
            raise RuntimeError(f"job {row['source_key']!r} is running already as often as it may at once "
                               f"(max_instances); nothing was started") from None

    # -- the brain's writes ---------------------------------------------

    def _import(self, task_name: str) -> Tuple[Optional[Callable[..., Any]], Optional[str]]:
        """(function, None) or (None, why): a function passed to
        `install(tasks=...)`, a Dramatiq actor's `send`, or `module:function`
        imported. Called before the scheduler's lock is taken (an import can
        take long, and runs module code)."""
        if task_name in self.tasks:
            return self.tasks[task_name], None
        dramatiq = sys.modules.get("dramatiq")
        if dramatiq is not None and ":" not in task_name:
            try:
                return dramatiq.get_broker().get_actor(task_name).send, None
            except Exception:
                pass
        if ":" not in task_name:
            return None, (f"task_name {task_name!r} names no job's function here: give it as "
                          f"module:function (e.g. myapp.jobs:cleanup)")
        from apscheduler.util import ref_to_obj

        try:
            func = ref_to_obj(task_name)
        except (ValueError, LookupError, ImportError) as exc:
            return None, f"cannot import the function {task_name!r} in the scheduler's process: {exc}"
        if not callable(func):
            return None, f"{task_name!r} is not callable"
        return func, None

    def _function(self, task_name: str, current: Optional[Tuple[Any, str]],
                  imported: Tuple[Optional[Callable[..., Any]], Optional[str]]) -> Callable[..., Any]:
        """The callable the brain names: the job's own when unchanged, a
        function passed to `install(tasks=...)`, the function of another
        job with that task, else what `_import` found beforehand."""
        if current is not None and current[1] == task_name:
            return current[0]
        if task_name in self.tasks:
            return self.tasks[task_name]
        for alias, job in self._jobs():
            actor = _actor(job.func)
            if (actor.actor_name if actor is not None else _func_ref(job)) == task_name:
                return job.func
        func, why = imported
        if func is None:
            raise ValueError(why)
        return func

    @staticmethod
    def _trigger(kind: str, expression: str, tz: str) -> Any:
        from zoneinfo import ZoneInfo

        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.date import DateTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        try:
            zone = ZoneInfo(tz or "UTC")
        except Exception:
            raise ValueError(f"unknown timezone {tz!r} (an IANA name such as Europe/Paris)") from None
        if kind == "cron":
            fields = expression.split()
            if len(fields) != 5:
                raise ValueError(f"a cron expression has five fields (minute hour day month weekday), "
                                 f"got {expression!r}")
            # As crontab reads it (0 = Sunday): APScheduler 3 counts weekdays from Monday.
            days = crontab_weekdays(fields[4])
            dow = "*" if days == set(range(7)) else ",".join(_DAYS[d] for d in sorted(days))
            try:
                return CronTrigger(minute=fields[0], hour=fields[1], day=fields[2], month=fields[3],
                                   day_of_week=dow, timezone=zone)
            except ValueError as exc:
                raise ValueError(f"APScheduler cannot run the cron expression {expression!r}: {exc}") from None
        if kind == "interval":
            try:
                seconds = Decimal(expression)
            except InvalidOperation:
                raise ValueError(f"an interval is a number of seconds, got {expression!r}") from None
            if not seconds.is_finite() or seconds <= 0:
                raise ValueError(f"an interval is a positive number of seconds, got {expression!r}")
            try:
                return IntervalTrigger(seconds=float(seconds), timezone=zone)
            except OverflowError:
                raise ValueError(f"the interval {expression!r} is longer than Python's timedelta holds") from None
        if kind == "clocked":
            try:
                when = datetime.fromisoformat(expression.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"a clocked schedule's expression is an ISO-8601 time, got {expression!r}") from None
            if when.tzinfo is None:
                raise ValueError(f"a clocked schedule's time needs an offset (e.g. +00:00), got {expression!r}")
            return DateTrigger(run_date=when, timezone=zone)
        raise ValueError(f"APScheduler runs cron, interval and clocked schedules, not {kind!r}")

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        def work() -> Optional[Dict[str, Any]]:
            _check_definition(definition)
            task = definition["task_name"].strip() if "task_name" in definition else None
            imported = self._import(task) if task is not None else (None, None)
            return self._on_loop(lambda: self._mutate(operation, source_key, expected, definition, imported))

        return _scrubbed(work)

    def _mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
                definition: Mapping[str, Any], imported: Tuple[Optional[Callable[..., Any]], Optional[str]]
                ) -> Optional[Dict[str, Any]]:
        """Everything is checked (the trigger built, its next run found)
        before the one write that changes the job."""
        scheduler = self.scheduler
        with scheduler._jobstores_lock:  # the scheduler's own tick waits for the check and the write
            if operation == "create":
                missing = {"name", "task_name", "kind", "expression"} - set(definition)
                if missing:
                    raise ValueError(f"a new schedule needs {sorted(missing)}")
                spec = {"timezone": "UTC", "queue": None, "args": [], "kwargs": {}, "is_enabled": True,
                        **definition}
                name = spec["name"].strip()
                if any(self.key(a, j.id) == name or j.id == name for a, j in self._jobs()):
                    raise Conflict(f"an APScheduler job with the id {name!r} exists already")
                func = self._function(spec["task_name"].strip(), None, imported)
                self._check_queue(func, spec.get("queue"))
                trigger = self._trigger(spec["kind"], spec["expression"], spec["timezone"])
                _check_future(trigger, name)
                paused = {} if spec["is_enabled"] else {"next_run_time": None}
                job = scheduler.add_job(func, trigger, args=list(spec["args"]), kwargs=dict(spec["kwargs"]),
                                        id=name, name=name, replace_existing=False, **paused)
                return self._checked_row("default", job.id)
            alias, job = self._find(source_key)
            shown = normalize_row(self._row(alias, job), SCHEDULER)
            current = fit_row(shown) or {}
            if configuration(current) != configuration(dict(expected or {})):
                raise Conflict(f"schedule {source_key!r} changed in APScheduler since the brain saw it; "
                               f"refresh and try again")
            if operation == "delete":
                scheduler.remove_job(job.id, jobstore=alias)
                return None
            if "name" in definition and definition["name"].strip() != current["name"]:
                raise ValueError("an APScheduler job's id is its name on the page and cannot change; "
                                 "create a new schedule and delete this one")
            changes: Dict[str, Any] = {}
            if "task_name" in definition and definition["task_name"].strip() != current["task_name"]:
                changes["func"] = self._function(definition["task_name"].strip(), (job.func, current["task_name"]),
                                                 imported)
            if "queue" in definition and definition["queue"] != current["queue"]:
                self._check_queue(changes.get("func", job.func), definition["queue"])
            data = data_changes(definition, current, {"args": list(job.args or ()), "kwargs": dict(job.kwargs or {})},
                                cut=current != shown, unreadable=None, name=str(source_key), where="APScheduler")
            if "args" in data:
                changes["args"] = tuple(data["args"])
            if "kwargs" in data:
                changes["kwargs"] = dict(data["kwargs"])
            timing = ("kind", "expression", "timezone")
            enabled = definition.get("is_enabled", current["is_enabled"])
            now = datetime.now(timezone.utc)
            if any(k in definition and definition[k] != current.get(k) for k in timing):
                merged = {k: definition.get(k, current[k]) for k in timing}
                trigger = self._trigger(merged["kind"], merged["expression"], merged["timezone"])
                _check_future(trigger, str(source_key))
                changes["trigger"] = trigger
                changes["next_run_time"] = trigger.get_next_fire_time(None, now) if enabled else None
            elif enabled != current["is_enabled"]:
                if enabled:
                    following = job.trigger.get_next_fire_time(None, now)
                    if following is None or (type(job.trigger).__name__ == "DateTrigger" and following < now):
                        # APScheduler's resume_job would remove the job.
                        raise ValueError(f"schedule {source_key!r} has no run left (its trigger's time has "
                                         f"passed): APScheduler would delete it when it is enabled; give it a "
                                         f"new kind and expression with the switch, or delete it")
                    changes["next_run_time"] = following
                else:
                    changes["next_run_time"] = None
            if changes:  # one write: the function, arguments, trigger and switch together
                scheduler.modify_job(job.id, jobstore=alias, **changes)
            return self._checked_row(alias, job.id)

    @staticmethod
    def _check_queue(func: Any, queue: Any) -> None:
        actor = _actor(func)
        if actor is None and queue is not None:
            raise ValueError(f"an APScheduler job runs its function, which names no queue: queue must be "
                             f"null, got {queue!r}")
        if actor is not None and queue is not None and queue != actor.queue_name:
            raise ValueError(f"the Dramatiq actor {actor.actor_name!r} sends to its own queue "
                             f"{actor.queue_name!r}, got {queue!r}")

    def _checked_row(self, alias: str, job_id: str) -> Dict[str, Any]:
        from . import _schedules

        job = self.scheduler.get_job(job_id, jobstore=alias)
        if job is None:
            raise RuntimeError(f"job {job_id!r} is not in APScheduler after the change (it had no next run)")
        row = self._row(alias, job)
        size = _schedules.frame_bytes(normalize_row(row, SCHEDULER))
        if size > _schedules.ROW_PAYLOAD_BYTES:
            log.warning("z4j-agentd: APScheduler job %r is %d bytes of JSON: the page shows it without its "
                        "arguments", job_id, size)
        return row


def _scrubbed(work: Callable[[], Any]) -> Any:
    """`work()`, its error's text with secret-looking parts (a job store
    URL's password) replaced: it reaches the brain's page."""
    try:
        return work()
    except Exception as exc:
        text = str(exc)
        clean = scrub_text(text)
        if clean == text:
            raise
        if isinstance(exc, (Conflict, ValueError)):
            raise type(exc)(clean) from None
        raise RuntimeError(f"{type(exc).__name__}: {clean}") from None


def _check_future(trigger: Any, name: str) -> None:
    now = datetime.now(timezone.utc)
    when = trigger.get_next_fire_time(None, now)
    if when is None or (type(trigger).__name__ == "DateTrigger" and when < now):
        raise ValueError(f"schedule {name!r} would never run (its time is in the past)")


def _check_definition(spec: Mapping[str, Any]) -> None:
    """Refuses a field of the brain's definition of the wrong type."""
    check_definition_types(spec)
    if "timezone" in spec and not isinstance(spec["timezone"], str):
        raise ValueError(f"timezone must be a string, got {spec['timezone']!r}")


# ---------------------------------------------------------------------------
# wiring



def default_state_path() -> str:
    """Where the rows last published are kept (see `install`)."""
    return os.path.join(os.path.expanduser("~"), ".z4j", f"{SCHEDULER}.z4j-agentd.json")


_installed: Dict[int, ExternalScheduler] = {}
_install_lock = threading.Lock()


def install(scheduler: Any, client: Any = None, *, serve_commands: bool = True, engine: Optional[str] = None,
            tasks: Optional[Mapping[str, Callable[..., Any]]] = None, state_path: Optional[str] = None) -> Any:
    """Serves `scheduler`'s jobs on the brain's Schedules page (scheduler
    `apscheduler`) through `client` (default: `z4j_agentd.get_client()`);
    returns the client. Call it in the process that runs the scheduler,
    before or after `start()` (once per scheduler; again is a no-op).

    `engine` names the engine on every row (default: `dramatiq` for a job
    sending a Dramatiq actor, `apscheduler` otherwise). `tasks` maps task
    names the brain may give (create, update) to functions, beside
    `module:function` references and the functions of existing jobs.
    `state_path` is the file keeping the rows last published, for the
    schedules removed while the process was stopped (default
    `~/.z4j/apscheduler.z4j-agentd.json`)."""
    from .client import get_client

    client = client or get_client()
    if not serve_commands:
        return client
    with _install_lock:
        if id(scheduler) in _installed:
            return client
        source = APSchedulerSource(scheduler, engine=engine, tasks=tasks)
        from apscheduler.events import (EVENT_ALL_JOBS_REMOVED, EVENT_JOB_ADDED, EVENT_JOB_MODIFIED,
                                        EVENT_JOB_REMOVED, EVENT_JOB_SUBMITTED, EVENT_JOBSTORE_ADDED,
                                        EVENT_JOBSTORE_REMOVED, EVENT_SCHEDULER_PAUSED, EVENT_SCHEDULER_RESUMED,
                                        EVENT_SCHEDULER_STARTED)
        stream = ExternalScheduler(SCHEDULER, source, durable_sender(client, SEND_TIMEOUT), poll_interval=POLL_SECONDS,
                                   min_interval=MIN_SNAPSHOT_SECONDS,
                                   state_path=state_path or default_state_path())
        if state_path is None:
            os.makedirs(os.path.dirname(default_state_path()), mode=0o700, exist_ok=True)

        def on_event(event: Any) -> None:
            try:
                if event.code == EVENT_JOB_SUBMITTED:
                    times = getattr(event, "scheduled_run_times", None) or [None]
                    source.count_run(source.key(event.jobstore, event.job_id), times[-1])
                stream.changed()
            except Exception:  # never into the scheduler
                log.debug("z4j-agentd: an APScheduler event was not handled", exc_info=True)

        scheduler.add_listener(on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_ADDED | EVENT_JOB_MODIFIED
                               | EVENT_JOB_REMOVED | EVENT_ALL_JOBS_REMOVED | EVENT_JOBSTORE_ADDED
                               | EVENT_JOBSTORE_REMOVED | EVENT_SCHEDULER_STARTED | EVENT_SCHEDULER_PAUSED
                               | EVENT_SCHEDULER_RESUMED)
        stream.serve(client)
        _installed[id(scheduler)] = stream
    log.info("z4j-agentd: serving %s (%s) for the brain's Schedules page", SCHEDULER, type(scheduler).__name__)
    return client


def active(scheduler: Any) -> Optional[ExternalScheduler]:
    """The stream serving `scheduler` (its `stats()`), or None."""
    return _installed.get(id(scheduler))


__all__ = ["APSchedulerSource", "SCHEDULER", "active", "crontab_weekdays", "install"]
