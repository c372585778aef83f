"""celery beat: its schedules on the brain's Schedules page.

`z4j_agentd.celery.install(app)` in the module that defines the Celery app
is all it takes: `celery beat` (and the beat of `celery worker -B`) sends
Celery's `beat_init` signal once its scheduler exists, and this module then
serves the scheduler `celery-beat` through z4j's external schedule protocol
(see `z4j_agentd._schedules`):

* the schedules beat runs are listed, with their kind (interval, cron,
  solar, clocked), arguments, queue, last run, next run and run count;
* "Trigger now" sends the schedule's task at once, with the schedule's
  arguments and options;
* with django-celery-beat's `DatabaseScheduler` the brain may also create,
  update, enable, disable and delete schedules: each writes the
  `PeriodicTask` rows, which beat reloads as it does after an edit in the
  Django admin;
* a new snapshot goes to the brain after the tasks beat sends (so a run
  shows within `MIN_SNAPSHOT_SECONDS` in the schedule's last run and run
  count), at once after each change the brain asks for, and when a look at
  the schedules every `POLL_SECONDS` finds them changed (an edit in the
  Django admin, a schedule added to the database).

Which schedules: with the default scheduler (`PersistentScheduler`, or any
scheduler that keeps its entries in `scheduler.schedule`) the entries beat
runs, i.e. `app.conf.beat_schedule` plus Celery's own (such as
`celery.backend_cleanup`); they are read-only (`source`
`celery-beat:static`, source key `static:<sha256 of the name>`). With
django-celery-beat every `PeriodicTask` row, enabled or not (`source`
`celery-beat:database`, source key `dcb:<primary key>`; django-celery-beat
copies `beat_schedule` into the database itself). The keys are those of
z4j-celerybeat, so rows stay the same rows when a project moves over.

A schedule removed while beat was stopped (or while the daemon's uplink was
down): the brain refuses a first snapshot of a new stream epoch that leaves
out a row it still holds from an earlier epoch, so beat's process keeps the
rows it last published and the rows removed since in a file beside beat's
schedule file (`<schedule file>.z4j-agentd.json`; it must be on persistent
storage) and carries them into the first snapshot of each epoch; the next
snapshot removes them (see `z4j_agentd._schedules.ExternalScheduler._steps`).

Run counts: a schedule's `total_runs` counts the tasks beat sent for it
(beat's own count, which django-celery-beat keeps in the database) plus
the ones "Trigger now" sent from this process; `last_run_at` is the latest
of the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._schedules import MUTATION, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, check_definition_types, durable_sender

log = logging.getLogger("z4j_agentd.celery.beat")

SCHEDULER = "celery-beat"
ENGINE = "celery"
#: Seconds between two looks at the schedules for changes made elsewhere.
POLL_SECONDS = 5.0
#: Seconds at least between two snapshots that beat's own activity causes
#: (its sends, changes found by a look): the brain rewrites every row of a
#: snapshot, so a beat sending every second does not make it do so every
#: second. The brain's commands get theirs at once.
MIN_SNAPSHOT_SECONDS = 5.0
#: Seconds at most between two reads of django-celery-beat's PeriodicTask
#: table; in between, it is read again only when `PeriodicTasks.last_change()`
#: moved (every save through Django moves it; beat's own writes of its run
#: counts do not, and a bulk `update()` does not either).
FULL_READ_SECONDS = 60.0
#: Seconds a snapshot may take to reach the daemon's spool.
SEND_TIMEOUT = 10.0
#: Added to beat's schedule file name for the file that keeps the rows last
#: published (see `state_path`).
STATE_SUFFIX = ".z4j-agentd.json"
#: Capabilities of every beat, and those of a beat that can write its schedules.
READ_CAPABILITIES = (STABLE_SNAPSHOT, "list", "trigger_now")
WRITE_CAPABILITIES = ("create", "update", "delete", "enable", "disable", MUTATION)

_PERIOD_SECONDS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}


def _aware(value: Any) -> Optional[datetime]:
    """A datetime with an offset (one without is read as UTC), or None."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _seconds_text(value: Any) -> str:
    """Seconds as the brain's interval expression: `15`, `0.5`."""
    return format(Decimal(str(value)).normalize(), "f")


def _describe(schedule: Any) -> Tuple[str, str, str]:
    """(kind, expression, timezone) of a Celery schedule object."""
    if hasattr(schedule, "_orig_minute"):  # crontab
        fields = [getattr(schedule, f"_orig_{f}", "*") for f in
                  ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")]
        tz = getattr(schedule, "tz", None)
        return "cron", " ".join("*" if f is None else str(f) for f in fields), str(tz) if tz else "UTC"
    if hasattr(schedule, "event") and hasattr(schedule, "lat"):  # solar
        return "solar", str(schedule.event), "UTC"
    if hasattr(schedule, "clocked_time"):  # django-celery-beat's clocked
        return "clocked", _aware(schedule.clocked_time).isoformat(), "UTC"
    run_every = getattr(schedule, "run_every", None)
    if isinstance(run_every, timedelta):
        return "interval", _seconds_text(run_every.total_seconds()), "UTC"
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return "interval", _seconds_text(schedule), "UTC"
    return "cron", str(schedule), "UTC"


def _next_run(schedule: Any, last_run_at: Any) -> Optional[datetime]:
    try:
        remaining = schedule.remaining_estimate(last_run_at)
        when = datetime.now(timezone.utc) + remaining
        # To the nearest second: the same next run reads the same in every
        # snapshot (the brain gives a row a new control token when it changes).
        return (when + timedelta(microseconds=500_000)).replace(microsecond=0)
    except Exception:
        return None


def _hash(native: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(json_safe(native), sort_keys=True).encode()).hexdigest()


def _list(value: Any) -> list:
    value = json_safe(value)
    return value if isinstance(value, list) else [] if value is None else [value]


def _dict(value: Any) -> dict:
    value = json_safe(value)
    return value if isinstance(value, dict) else {}


def _queue_name(queue: Any) -> Optional[str]:
    if queue is None or queue == "":
        return None
    return str(getattr(queue, "name", queue))


class _BeatSource(Source):
    """What both sources share: the app, the scheduler, the runs of "Trigger now"."""

    def __init__(self, app: Any, scheduler: Any) -> None:
        self.app = app
        self.scheduler = scheduler
        self._triggered: Dict[str, Tuple[int, datetime]] = {}
        self._triggered_lock = threading.Lock()

    def _with_triggers(self, row: Dict[str, Any]) -> Dict[str, Any]:
        with self._triggered_lock:
            count, last = self._triggered.get(row["source_key"], (0, None))
        if count:
            row["total_runs"] = int(row.get("total_runs") or 0) + count
            native_last = _aware(row.get("last_run_at"))
            row["last_run_at"] = last if native_last is None or last > native_last else native_last
        return row

    def after_send(self) -> None:
        """Called in beat's thread after each task beat sends."""

    def _count_trigger(self, source_key: str) -> None:
        with self._triggered_lock:
            count, _ = self._triggered.get(source_key, (0, None))
            self._triggered[source_key] = (count + 1, datetime.now(timezone.utc))

    def _send(self, source_key: str, task: str, args: list, kwargs: dict, options: Dict[str, Any]
              ) -> Dict[str, Any]:
        # As beat sends: through the registered task when there is one, so
        # its own options (queue, routing, ...) apply as they do for beat.
        registered = self.app.tasks.get(task)
        if registered is not None:
            result = registered.apply_async(args, kwargs, **options)
        else:
            result = self.app.send_task(task, args=args, kwargs=kwargs, **options)
        self._count_trigger(source_key)
        task_id = getattr(result, "id", None)
        return {"task_id": str(task_id) if task_id else None, "task_name": task}


class EntriesSource(_BeatSource):
    """The entries of beat's own scheduler (`app.conf.beat_schedule` and
    Celery's default entries): read-only.

    The entries are read in beat's own thread (when it starts, and after
    each task it sends, when it has just replaced the entry with the next
    one): `PersistentScheduler` keeps them in a `shelve`, which other threads
    must leave alone. Other threads read that copy."""

    def __init__(self, app: Any, scheduler: Any) -> None:
        super().__init__(app, scheduler)
        self._seen: List[Tuple[str, Any]] = []
        self.after_send()

    def after_send(self) -> None:
        try:
            self._seen = list(self.scheduler.schedule.items())
        except Exception:  # never into beat; the copy taken before stays
            log.debug("z4j-agentd: beat's entries were not read", exc_info=True)

    def capabilities(self) -> List[str]:
        return list(READ_CAPABILITIES)

    @staticmethod
    def key(name: str) -> str:
        return "static:" + hashlib.sha256(name.encode("utf-8")).hexdigest()

    def _entries(self) -> List[Tuple[str, Any]]:
        return list(self._seen)

    def rows(self) -> List[Dict[str, Any]]:
        return [self._with_triggers(self._row(name, entry)) for name, entry in self._entries()]

    def _row(self, name: str, entry: Any) -> Dict[str, Any]:
        kind, expression, tz = _describe(entry.schedule)
        options = dict(getattr(entry, "options", None) or {})
        runs = int(getattr(entry, "total_run_count", 0) or 0)
        # A new entry's last_run_at is the time beat loaded it: not a run.
        last_run_at = _aware(getattr(entry, "last_run_at", None)) if runs else None
        key = self.key(name)
        return {
            "source_key": key, "external_id": key, "engine": ENGINE, "scheduler": SCHEDULER,
            "name": name, "task_name": entry.task, "kind": kind, "expression": expression, "timezone": tz,
            "queue": _queue_name(options.get("queue")), "args": _list(entry.args), "kwargs": _dict(entry.kwargs),
            "is_enabled": True, "last_run_at": last_run_at,
            "next_run_at": _next_run(entry.schedule, getattr(entry, "last_run_at", None)),
            "total_runs": runs, "source": "celery-beat:static",
            "source_hash": _hash({"task": entry.task, "schedule": repr(entry.schedule), "args": entry.args,
                                  "kwargs": entry.kwargs, "options": options}),
        }

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        entry = next((e for n, e in self._entries() if self.key(n) == row["source_key"]), None)
        if entry is None:
            raise Conflict(f"schedule {row['name']!r} is not in celery beat any more")
        from celery.beat import _evaluate_entry_args, _evaluate_entry_kwargs

        options = dict(entry.options or {})
        options["headers"] = {**(options.get("headers") or {}), "celery_beat_task": True}
        return self._send(row["source_key"], entry.task, list(_evaluate_entry_args(entry.args)),
                          dict(_evaluate_entry_kwargs(entry.kwargs)), options)


class DatabaseSource(_BeatSource):
    """django-celery-beat's `PeriodicTask` rows: listed, triggered, and
    written by the brain's create, update (enable, disable) and delete."""

    def __init__(self, app: Any, scheduler: Any) -> None:
        super().__init__(app, scheduler)
        from django_celery_beat import models

        self.models = models
        #: The PeriodicTask rows last read, the last_change() they were read
        #: at, and when (monotonic seconds).
        self._read: Optional[Tuple[List[Any], Any, float]] = None

    def capabilities(self) -> List[str]:
        return list(READ_CAPABILITIES) + list(WRITE_CAPABILITIES)

    def _query(self) -> Any:
        return self.models.PeriodicTask.objects.select_related("interval", "crontab", "clocked", "solar")

    @staticmethod
    def _pk(source_key: Optional[str]) -> int:
        if not isinstance(source_key, str) or not source_key.startswith("dcb:"):
            raise Conflict(f"{source_key!r} is not a django-celery-beat schedule (dcb:<id>)")
        try:
            return int(source_key[4:])
        except ValueError:
            raise Conflict(f"{source_key!r} is not a django-celery-beat schedule (dcb:<id>)") from None

    def _db(self, work: Callable[[], Any]) -> Any:
        from django.db import close_old_connections

        close_old_connections()
        try:
            return work()
        finally:
            close_old_connections()

    def _live(self) -> Dict[str, Any]:
        """Beat's entries in memory (it replaces the dict whole; a copy taken
        while it fills one is tried again)."""
        for _ in range(5):
            try:
                return dict(getattr(self.scheduler, "_schedule", None) or {})
            except RuntimeError:
                continue
        return {}

    def _models(self) -> List[Any]:
        """Every PeriodicTask, read again only when the table changed (see
        `FULL_READ_SECONDS`): a look every `POLL_SECONDS` costs one query."""
        changed = self.models.PeriodicTasks.last_change()
        now = time.monotonic()
        if self._read is not None and self._read[1] == changed and now - self._read[2] < FULL_READ_SECONDS:
            return self._read[0]
        models = list(self._query())
        self._read = (models, changed, now)
        return models

    def rows(self) -> List[Dict[str, Any]]:
        live = self._live()
        return self._db(lambda: [self._with_triggers(self._row(m, live.get(m.name))) for m in self._models()])

    def _row(self, model: Any, entry: Any = None) -> Dict[str, Any]:
        kind, expression, tz = self._kind(model)
        runs = int(model.total_run_count or 0)
        last = _aware(model.last_run_at)
        next_run = None
        live_model = getattr(entry, "model", None)
        if live_model is not None and getattr(live_model, "pk", None) == model.pk and model.enabled:
            # Beat counts its runs in memory and writes them every few minutes.
            if int(live_model.total_run_count or 0) > runs:
                runs, last = int(live_model.total_run_count), _aware(live_model.last_run_at)
            next_run = _next_run(entry.schedule, live_model.last_run_at)
        elif model.enabled:
            # Not in beat's entries (django-celery-beat 2.7+ loads only the
            # cron rows due within about two hours): from the model itself.
            try:
                schedule = model.schedule
            except Exception:
                schedule = None
            if schedule is not None:
                next_run = _next_run(schedule, model.last_run_at or datetime.now(timezone.utc))
        key = f"dcb:{model.pk}"
        native = {f: str(getattr(model, f, None)) for f in (
            "task", "args", "kwargs", "headers", "queue", "exchange", "routing_key", "priority", "expires",
            "expire_seconds", "start_time", "one_off", "interval_id", "crontab_id", "clocked_id", "solar_id")}
        if model.solar is not None:
            native["solar"] = f"{model.solar.latitude},{model.solar.longitude}"
        return {
            "source_key": key, "external_id": key, "engine": ENGINE, "scheduler": SCHEDULER,
            "name": model.name, "task_name": model.task, "kind": kind, "expression": expression, "timezone": tz,
            "queue": model.queue or None, "args": _list(_loads(model.args, [])),
            "kwargs": _dict(_loads(model.kwargs, {})), "is_enabled": bool(model.enabled),
            "last_run_at": last if runs else None, "next_run_at": next_run, "total_runs": runs,
            "source": "celery-beat:database", "source_hash": _hash(native),
        }

    @staticmethod
    def _kind(model: Any) -> Tuple[str, str, str]:
        if model.interval is not None:
            every, period = int(model.interval.every), str(model.interval.period).lower()
            if period == "microseconds":
                return "interval", _seconds_text(Decimal(every) / Decimal(1_000_000)), "UTC"
            return "interval", _seconds_text(every * _PERIOD_SECONDS.get(period, 1)), "UTC"
        if model.crontab is not None:
            c = model.crontab
            expression = " ".join(str(v) for v in (c.minute, c.hour, c.day_of_month, c.month_of_year,
                                                   c.day_of_week))
            return "cron", expression, str(c.timezone) if c.timezone else "UTC"
        if model.clocked is not None:
            return "clocked", _aware(model.clocked.clocked_time).isoformat(), "UTC"
        if model.solar is not None:
            return "solar", str(model.solar.event), "UTC"
        return "interval", "0", "UTC"

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        pk = self._pk(row["source_key"])

        def load() -> Any:
            try:
                return self._query().get(pk=pk)
            except self.models.PeriodicTask.DoesNotExist:
                raise Conflict(f"schedule {row['name']!r} is not in the database any more") from None

        model = self._db(load)
        options: Dict[str, Any] = {}
        for option in ("queue", "exchange", "routing_key", "priority"):
            if getattr(model, option, None) not in (None, ""):
                options[option] = getattr(model, option)
        headers = _loads(model.headers, {})
        options["headers"] = {**(headers if isinstance(headers, dict) else {}),
                              "periodic_task_name": model.name}
        return self._send(row["source_key"], model.task, _list(_loads(model.args, [])),
                          _dict(_loads(model.kwargs, {})), options)

    # -- the brain's writes -------------------------------------------------

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The brain's create, update (enable, disable) and delete, in one
        transaction: a change beat could not run (a cron field out of range,
        an interval past what Python's timedelta holds) or the brain could
        not list (no name, args too large for a snapshot frame) raises
        ValueError and leaves the database as it was. An update writes only
        the fields the brain's definition names."""
        from django.db import transaction

        from .._schedules import configuration, fit_row, keep_left_out_arguments, normalize_row

        def work() -> Optional[Dict[str, Any]]:
            PeriodicTask = self.models.PeriodicTask
            with transaction.atomic():
                if operation == "create":
                    missing = {"name", "task_name", "kind", "expression"} - set(definition)
                    if missing:
                        raise ValueError(f"a new schedule needs {sorted(missing)}")
                    spec = {"timezone": "UTC", "queue": None, "args": [], "kwargs": {}, "is_enabled": True,
                            **definition}
                    _check_definition(spec, str(spec["kind"]))
                    name = spec["name"].strip()
                    if PeriodicTask.objects.filter(name=name).exists():
                        raise Conflict(f"a django-celery-beat schedule named {name!r} exists already")
                    model = PeriodicTask(name=name)
                    self._apply(model, spec, self._schedule_object(spec["kind"], spec["expression"],
                                                                   spec["timezone"] or "UTC"))
                    model.save()
                    return self._checked_row(model.pk)
                try:
                    model = PeriodicTask.objects.select_for_update().get(pk=self._pk(source_key))
                except PeriodicTask.DoesNotExist:
                    raise Conflict(f"schedule {source_key} is not in the database any more") from None
                model = self._query().get(pk=model.pk)
                full = normalize_row(self._row(model), SCHEDULER)
                current = fit_row(full) or {}
                if configuration(current) != configuration(dict(expected or {})):
                    raise Conflict(f"schedule {model.name!r} changed in the database since the brain saw it; "
                                   f"refresh and try again")
                if operation == "delete":
                    model.delete()
                    return None
                # Args and kwargs the page shows as a note (too large for a frame) are not written back.
                changes = keep_left_out_arguments(definition, full)
                timing = ("kind", "expression", "timezone")
                merged = {**current, **changes}
                if merged["kind"] != "cron" and "timezone" not in changes:
                    merged["timezone"] = "UTC"  # a cron row's timezone does not follow it to another kind
                _check_definition(changes, str(merged["kind"]), timezone=merged["timezone"])
                if "name" in changes and PeriodicTask.objects.filter(
                        name=changes["name"].strip()).exclude(pk=model.pk).exists():
                    raise Conflict(f"a django-celery-beat schedule named {changes['name'].strip()!r} "
                                   f"exists already")
                schedule = None
                if any(k in changes and changes[k] != current.get(k) for k in timing):
                    schedule = self._schedule_object(str(merged["kind"]), str(merged["expression"] or ""),
                                                     str(merged["timezone"] or "UTC"))
                self._apply(model, changes, schedule)
                model.save()
                # Args kept as they are may be too large for a frame: the page shows them as it can.
                return self._checked_row(model.pk, check_size=bool({"args", "kwargs"} & set(changes)))

        return self._db(work)

    def _checked_row(self, pk: int, check_size: bool = True) -> Dict[str, Any]:
        """The row of a schedule just written, inside the transaction that
        wrote it: raises ValueError (the write rolls back) when beat could
        not build its schedule or the brain could not take the row."""
        from .. import _schedules

        model = self._query().get(pk=pk)
        try:
            schedule = model.schedule
            if schedule is None:
                raise ValueError("it has no schedule")
            schedule.remaining_estimate(datetime.now(timezone.utc))
        except (ValueError, OverflowError, TypeError, ArithmeticError, RuntimeError) as exc:
            raise ValueError(f"celery beat cannot run schedule {model.name!r}: {exc}") from None
        row = self._row(model)
        normalized = _schedules.normalize_row(row, SCHEDULER)
        size = _schedules.frame_bytes(normalized)
        if check_size and size > _schedules.ROW_PAYLOAD_BYTES:
            raise ValueError(f"schedule {model.name!r} is {size} bytes of JSON, more than a snapshot frame "
                             f"holds ({_schedules.ROW_PAYLOAD_BYTES}); shorten its args or kwargs")
        return row

    @staticmethod
    def _apply(model: Any, spec: Mapping[str, Any], schedule: Optional[Tuple[str, Any]]) -> None:
        """Writes the fields `spec` names (checked by `_check_definition`),
        and the schedule object when one is given."""
        if "name" in spec:
            model.name = spec["name"].strip()
        if "task_name" in spec:
            model.task = spec["task_name"].strip()
        if "args" in spec:
            model.args = json.dumps(spec["args"])
        if "kwargs" in spec:
            model.kwargs = json.dumps(spec["kwargs"])
        if "queue" in spec:
            model.queue = spec["queue"] or None
        if "is_enabled" in spec:
            model.enabled = spec["is_enabled"]
        if schedule is not None:
            for field in ("interval", "crontab", "clocked", "solar"):
                setattr(model, field, None)
            field, value = schedule
            setattr(model, field, value)
            model.one_off = field == "clocked"

    def _schedule_object(self, kind: str, expression: str, tz: str) -> Tuple[str, Any]:
        m = self.models
        if kind == "interval":
            try:
                seconds = Decimal(expression)
            except InvalidOperation:
                raise ValueError(f"an interval is a number of seconds, got {expression!r}") from None
            if not seconds.is_finite() or seconds <= 0:
                raise ValueError(f"an interval is a positive number of seconds, got {expression!r}")
            if seconds == seconds.to_integral_value():
                if seconds > _MAX_EVERY:
                    raise ValueError(f"an interval is at most {_MAX_EVERY} seconds (about 68 years), "
                                     f"got {expression!r}")
                obj, _ = m.IntervalSchedule.objects.get_or_create(every=int(seconds), period=m.IntervalSchedule.SECONDS)
            else:
                micros = seconds * 1_000_000
                if micros != micros.to_integral_value():
                    raise ValueError(f"an interval is at most microsecond-precise, got {expression!r}")
                if micros > _MAX_EVERY:
                    raise ValueError(f"an interval with a fraction of a second is at most "
                                     f"{_seconds_text(Decimal(_MAX_EVERY) / 1_000_000)} seconds, got {expression!r}")
                obj, _ = m.IntervalSchedule.objects.get_or_create(every=int(micros),
                                                                  period=m.IntervalSchedule.MICROSECONDS)
            return "interval", obj
        if kind == "cron":
            parts = expression.split()
            if len(parts) != 5:
                raise ValueError(f"a cron expression has five fields (minute hour day month weekday), "
                                 f"got {expression!r}")
            obj, _ = m.CrontabSchedule.objects.get_or_create(
                minute=parts[0], hour=parts[1], day_of_month=parts[2], month_of_year=parts[3],
                day_of_week=parts[4], timezone=tz)
            return "crontab", obj
        if kind == "clocked":
            try:
                when = datetime.fromisoformat(expression.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"a clocked schedule's expression is an ISO-8601 time, got {expression!r}") from None
            if when.tzinfo is None:
                raise ValueError(f"a clocked schedule's time needs an offset (e.g. +00:00), got {expression!r}")
            obj, _ = m.ClockedSchedule.objects.get_or_create(clocked_time=when)
            return "clocked", obj
        if kind == "solar":
            raise ValueError("a solar schedule needs a latitude and a longitude, which the brain does not send; "
                             "create or change it in the Django admin")
        raise ValueError(f"kind is one of interval, cron, clocked, solar; got {kind!r}")


#: The largest `every` django-celery-beat's IntervalSchedule holds on every
#: database (a 32-bit integer column).
_MAX_EVERY = 2**31 - 1


def _check_definition(spec: Mapping[str, Any], kind: str, *, timezone: Any = None) -> None:
    """Refuses a field of the brain's definition of the wrong type, saying
    which; `timezone` is the schedule's timezone after the change."""
    check_definition_types(spec)
    tz = spec.get("timezone", timezone)
    if tz is not None and not isinstance(tz, str):
        raise ValueError(f"timezone must be a string, got {tz!r}")
    if kind == "cron" and tz:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(tz)
        except Exception:
            raise ValueError(f"unknown timezone {tz!r} (an IANA name such as Europe/Paris)") from None
    elif tz not in (None, "", "UTC"):
        raise ValueError(f"only a cron schedule has a timezone; {kind} schedules run in UTC, got {tz!r}")


def _loads(text: Any, default: Any) -> Any:
    if text is None or text == "":
        return default
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return default


def is_database_scheduler(scheduler: Any) -> bool:
    """django-celery-beat's DatabaseScheduler, or a subclass of it."""
    return any(c.__module__.startswith("django_celery_beat") and c.__name__ == "DatabaseScheduler"
               for c in type(scheduler).__mro__)


def source_for(app: Any, scheduler: Any) -> _BeatSource:
    return DatabaseSource(app, scheduler) if is_database_scheduler(scheduler) else EntriesSource(app, scheduler)


def _watch_sends(scheduler: Any, stream: Any, source: _BeatSource) -> None:
    """After each task beat sends, ask for a snapshot (beat counted the run)."""
    original = scheduler.apply_async
    if getattr(original, "_z4j_watched", False):
        return

    def apply_async(entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        try:
            return original(entry, producer=producer, advance=advance, **kwargs)
        finally:
            source.after_send()
            stream.changed()

    apply_async._z4j_watched = True  # type: ignore[attr-defined]
    scheduler.apply_async = apply_async



def state_path(service: Any) -> Optional[str]:
    """Where beat's process keeps the rows it last published: beside beat's
    schedule file (`-s`, `beat_schedule_filename`), with `STATE_SUFFIX`."""
    filename = getattr(service, "schedule_filename", None) or "celerybeat-schedule"
    return os.path.abspath(str(filename)) + STATE_SUFFIX


_active: Optional[ExternalScheduler] = None


def active() -> Optional[ExternalScheduler]:
    """The scheduler served by this process (its `stats()`), or None."""
    return _active


def start(hooks: Any, service: Any) -> Optional[ExternalScheduler]:
    """Serves beat's schedules for `service` (a `celery.beat.Service`)."""
    global _active
    if not hooks.serve_commands or _active is not None:
        return _active
    scheduler = service.scheduler
    client = hooks.client
    source = source_for(hooks.app, scheduler)
    stream = ExternalScheduler(SCHEDULER, source, durable_sender(client, SEND_TIMEOUT),
                               poll_interval=POLL_SECONDS, min_interval=MIN_SNAPSHOT_SECONDS,
                               state_path=state_path(service))
    _watch_sends(scheduler, stream, source)
    stream.serve(client)
    _active = stream
    log.info("z4j-agentd: serving %s (%s) for the brain's Schedules page", SCHEDULER,
             type(scheduler).__name__)
    return stream


def receiver(hooks: Any) -> Callable[..., None]:
    """The `beat_init` receiver of one installation."""

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        try:
            start(hooks, sender)
        except Exception:
            log.exception("z4j-agentd: could not serve celery beat's schedules")

    return on_beat_init


__all__ = ["DatabaseSource", "EntriesSource", "SCHEDULER", "active", "is_database_scheduler", "receiver",
           "source_for", "start"]
