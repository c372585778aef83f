"""rq-scheduler: its scheduled jobs on the brain's Schedules page.

Run rq-scheduler through this module instead of the `rqscheduler` command,
with the same arguments:

    python -m z4j_agentd.rq.scheduler --url redis://localhost:6379/0 -i 5

or, in code that runs an `rq_scheduler.Scheduler` itself, call
`install(scheduler)` before `scheduler.run()`. Either way the process serves
the scheduler `rq-scheduler` through z4j's external schedule protocol (see
`z4j_agentd._schedules`):

* every job in rq-scheduler's registry (the Redis sorted set
  `rq:scheduler:scheduled_jobs`) is listed: cron (`Scheduler.cron`),
  interval (`Scheduler.schedule(..., interval=)`, with or without `repeat`)
  and one-off (`enqueue_at`, `enqueue_in`, `schedule` without interval, as
  `clocked`), with its function, arguments, queue, next run, and the runs
  this integration counted (`last_run_at`, `total_runs`, kept in Redis);
* "Trigger now" enqueues the job's function at once on its queue, as a new
  job (the schedule, its next run and its remaining repeats stay as they
  were);
* the brain's create and update (cron and interval, a function named by
  its import path), delete (rq-scheduler's `cancel`) and the enable/disable
  switch change the registry in Redis, each in one step checked against
  the row the brain showed (a transaction watching the job's hash, and a
  script re-checking its place in the registry as it writes: producers
  adding other jobs never make it fail);
* an update writes the arguments only when it changes them, and refuses to
  change arguments the page cannot show exactly (a datetime, a tuple, a
  non-string key, arguments cut from a row too large for a snapshot, or
  arguments this process cannot unpickle), saying why;
* a disabled job waits in a second sorted set beside the registry
  (`rq:scheduler:scheduled_jobs:z4j-paused`, the one z4j-rqscheduler uses),
  with its next run time; rq-scheduler does not look there, so it does not
  run until it is enabled again. A job in both sets (the application
  scheduled the same id again while it was paused) is enabled: the
  registration wins, it runs and leaves the paused set.

Rows are read without a transaction, each job in one command. This
process's scheduler moves due jobs to their queues in a Redis transaction
that watches the job's hash and re-checks its place in the registry, so a
change from the brain never races a run (an unmodified `rqscheduler`
elsewhere can lose a change made at the instant it enqueues that job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from .._schedule_args import data_changes
from .._schedules import (MUTATION, STABLE_SNAPSHOT, Conflict, ExternalScheduler, Source, check_definition_types,
                          configuration, durable_sender, fit_row, normalize_row)

log = logging.getLogger("z4j_agentd.rq.scheduler")

SCHEDULER = "rq-scheduler"
ENGINE = "rq"
#: Seconds between two looks at the registry (jobs scheduled by other
#: processes, runs of another scheduler).
POLL_SECONDS = 5.0
#: Seconds at least between two snapshots caused by the scheduler's own runs.
MIN_SNAPSHOT_SECONDS = 5.0
SEND_TIMEOUT = 10.0
#: Suffixes of the keys kept beside rq-scheduler's registry.
PAUSED_SUFFIX = ":z4j-paused"
RUNS_SUFFIX = ":z4j-runs"
LAST_RUN_SUFFIX = ":z4j-last-run"
#: Meta keys of a job this integration writes (the name the brain gave it).
NAME_META = "_z4j_schedule_name"
#: ... and the queue the brain gave it (null: the scheduler's queue, shown as null).
QUEUE_META = "_z4j_queue"
CAPABILITIES = (STABLE_SNAPSHOT, "list", "trigger_now", "create", "update", "delete", "enable", "disable",
                MUTATION)
#: Meta keys that are the schedule's timing or this integration's own, left out of `source_hash`.
_TIMING_META = {"cron_string", "interval", "repeat", "use_local_timezone", NAME_META, "_z4j_task_name",
                QUEUE_META}
#: Checks the job's places in the registry and the paused set (ARGV 2, 3:
#: the scores read, "" for none), then deletes it from both, or writes its
#: hash (the field/value pairs from ARGV 7 on; none: the hash is only
#: touched, so a transaction watching it fails) and puts it in one of them
#: (ARGV 5) at the score ARGV 6. Returns 0 when the places changed.
_WRITE = """
local function same(s, want)
  if want == '' then return not s end
  return s and tonumber(s) == tonumber(want)
end
if not same(redis.call('ZSCORE', KEYS[2], ARGV[1]), ARGV[2])
    or not same(redis.call('ZSCORE', KEYS[3], ARGV[1]), ARGV[3]) then
  return 0
end
if #ARGV > 6 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 7))
else
  local status = redis.call('HGET', KEYS[1], 'status')
  if status then redis.call('HSET', KEYS[1], 'status', status) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[4] == 'delete' then
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  return 1
end
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', ARGV[5] == 'active' and KEYS[2] or KEYS[3], ARGV[6], ARGV[1])
return 1
"""
#: A due run's next time: only when the registry still holds the job at the
#: score read (ARGV 2); out of the paused set too (the registration wins);
#: ARGV 3 "" ends the schedule.
_ADVANCE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  end
end
return 1
"""
_FUNC_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


def local_zone() -> str:
    """The IANA name of this host's time zone, in which rq-scheduler reads
    cron expressions (it evaluates them on `datetime.now()`): `$TZ`, else
    the target of /etc/localtime, else UTC when the host's offset is zero."""
    from zoneinfo import ZoneInfo

    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if not name:
            continue
        try:
            ZoneInfo(name)
            return "UTC" if name in ("Etc/UTC", "UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu") else name
        except Exception:
            continue
    return "UTC" if time.timezone == 0 and not time.daylight else (time.tzname[0] or "UTC")


def _hash(native: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(json_safe(native), sort_keys=True).encode()).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utc(stamp: float) -> datetime:
    return datetime.fromtimestamp(float(stamp), timezone.utc)


class RQSchedulerSource(Source):
    """rq-scheduler's registry in Redis: listed, triggered, written."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.connection = scheduler.connection
        self.active = scheduler.scheduled_jobs_key
        self.paused = self.active + PAUSED_SUFFIX
        self.runs = self.active + RUNS_SUFFIX
        self.last_runs = self.active + LAST_RUN_SUFFIX

    def capabilities(self) -> List[str]:
        return list(CAPABILITIES)

    # -- rows --------------------------------------------------------------

    def _fetch(self, job_id: str) -> Any:
        from rq.exceptions import NoSuchJobError

        try:
            return self.scheduler.job_class.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None

    def _read(self) -> List[Tuple[Any, float, bool, int, Optional[float]]]:
        """(job, score, enabled, runs, last run) of every scheduled job.

        Read without a transaction: producers add jobs to the registry all
        the time, and a read that waited for a quiet moment might never
        finish. Each job is read in one command (its hash), so each row is
        self-consistent; a job removed meanwhile is left out, one added
        meanwhile shows in the next snapshot."""
        active = {_text(k): s for k, s in self.connection.zrange(self.active, 0, -1, withscores=True)}
        paused = {_text(k): s for k, s in self.connection.zrange(self.paused, 0, -1, withscores=True)}
        runs = {_text(k): v for k, v in (self.connection.hgetall(self.runs) or {}).items()}
        last = {_text(k): v for k, v in (self.connection.hgetall(self.last_runs) or {}).items()}
        out = []
        for job_id in sorted(set(active) | set(paused)):
            job = self._fetch(job_id)
            if job is None:  # its hash expired: rq-scheduler drops it when it comes due
                continue
            # In both sets (the application scheduled a fixed id again while it was paused):
            # the application's registration wins, the job runs (see enqueue_due).
            enabled = job_id in active
            score = active[job_id] if enabled else paused[job_id]
            out.append((job, score, enabled, int(runs.get(job_id, 0) or 0),
                        float(last[job_id]) if job_id in last else None))
        return out

    def rows(self) -> List[Dict[str, Any]]:
        return [self._row(*item) for item in self._read()]

    @staticmethod
    def key(job_id: str) -> str:
        """The row's source key: the job id, bounded to the brain's 200
        characters (a longer id keeps its start and a digest of the whole)."""
        if len(job_id) > 200:
            job_id = job_id[:135] + "~" + hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()
        return job_id

    def _job_id(self, source_key: str) -> str:
        """The job id a source key names (see `key`)."""
        if len(source_key) < 200:
            return source_key
        for ids in (self.connection.zrange(self.active, 0, -1), self.connection.zrange(self.paused, 0, -1)):
            for raw in ids:
                if self.key(_text(raw)) == source_key:
                    return _text(raw)
        return source_key

    @staticmethod
    def _data(job: Any) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
        """(function name, {"args", "kwargs"} as stored, why they cannot be
        read here or None): every read that unpickles the job's data is in
        this one place, so a job this process cannot read is still listed."""
        try:
            func = job.func_name or "?"
            return func, {"args": list(job.args or ()), "kwargs": dict(job.kwargs or {})}, None
        except Exception as exc:  # e.g. an argument of a class this process cannot import
            return _raw_func_name(job), None, type(exc).__name__

    def _row(self, job: Any, score: float, enabled: bool, runs: int = 0, last: Optional[float] = None
             ) -> Dict[str, Any]:
        meta = dict(job.meta or {})
        cron, interval = meta.get("cron_string"), meta.get("interval")
        if cron:
            kind, expression, tz = "cron", str(cron), local_zone()
        elif interval:
            kind, expression, tz = "interval", str(int(interval)), "UTC"
        else:
            kind, expression, tz = "clocked", _utc(score).isoformat(), "UTC"
        func, native, unreadable = self._data(job)
        if native is None:
            args, kwargs = [f"<not readable here: {unreadable}>"], {}
        else:
            args, kwargs = json_safe(native["args"]), json_safe(native["kwargs"])
        options = {k: v for k, v in meta.items() if k not in _TIMING_META}
        options.update(timeout=job.timeout, result_ttl=job.result_ttl, ttl=job.ttl,
                       at_front=bool(getattr(job, "enqueue_at_front", False)), description=job.description)
        key = self.key(job.id)
        shown_id = job.id if len(job.id) <= 100 else \
            job.id[:75] + "~" + hashlib.sha256(job.id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return {
            "source_key": key, "external_id": key, "engine": ENGINE, "scheduler": SCHEDULER,
            "name": str(meta.get(NAME_META) or f"{func[:90]} [{shown_id}]"), "task_name": func,
            "kind": kind, "expression": expression, "timezone": tz,
            "queue": meta[QUEUE_META] if QUEUE_META in meta else job.origin,
            "args": args, "kwargs": kwargs, "is_enabled": enabled,
            "next_run_at": _utc(score) if enabled else None,
            "last_run_at": _utc(last) if last is not None else None, "total_runs": runs,
            "source": "rq-scheduler:redis", "source_hash": _hash(options),
        }

    # -- runs --------------------------------------------------------------

    def _count_run(self, pipe: Any, job_id: str) -> None:
        pipe.hincrby(self.runs, job_id, 1)
        pipe.hset(self.last_runs, job_id, repr(time.time()))

    def enqueue_due(self, job: Any, original: Callable[[Any], Any]) -> None:
        """Replaces `Scheduler.enqueue_job` in this process: the job goes to
        its queue and its next run into the registry in one transaction,
        after checking that it is still due and not paused or deleted (the
        brain's changes cannot race it: each one writes the job's hash,
        which the transaction watches, and the registry is re-checked
        inside it). Only the job's own key is watched, so producers adding
        other jobs do not delay it; a job that keeps changing as it comes
        due goes through rq-scheduler's own `enqueue_job` after 5 tries,
        never skipped. A job with dependencies or a rate limit goes through
        rq-scheduler's own `enqueue_job` (RQ cannot enqueue those inside a
        transaction)."""
        from redis.exceptions import WatchError

        from rq_scheduler.utils import get_next_scheduled_time

        key = self.scheduler.job_class.key_for(job.id)
        for _ in range(5):
            with self.connection.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    score = pipe.zscore(self.active, job.id)
                    if score is None or score > time.time():
                        return  # paused, deleted or moved on meanwhile
                    fresh = self._fetch(job.id)
                    if fresh is None:
                        pipe.unwatch()
                        self.scheduler.cancel(job.id)
                        return
                    if getattr(fresh, "_dependency_ids", None) or getattr(fresh, "has_rate_limit", False):
                        pipe.unwatch()
                        self._run_original(fresh, original)
                        return
                    meta = fresh.meta
                    repeat = meta.get("repeat")
                    if repeat:
                        meta["repeat"] = int(repeat) - 1
                    queue = self.scheduler.get_queue_for_job(fresh)
                    again = repeat is None or meta.get("repeat") != 0
                    following = ""
                    if again and meta.get("interval"):
                        following = repr(float(int(time.time()) + int(meta["interval"])))
                    elif again and meta.get("cron_string"):
                        when = get_next_scheduled_time(meta["cron_string"],
                                                       use_local_timezone=meta.get("use_local_timezone", False))
                        following = repr(float(when.timestamp()))
                    pipe.multi()
                    queue.enqueue_job(fresh, pipeline=pipe, at_front=bool(getattr(fresh, "enqueue_at_front", False)))
                    # The run's next time, only if the registry still holds the time read above (a
                    # cancel by the application meanwhile stays a cancel). In the paused set too: the
                    # application scheduled this id again while it was paused, and that wins.
                    pipe.eval(_ADVANCE, 2, self.active, self.paused, fresh.id, repr(float(score)), following)
                    self._count_run(pipe, fresh.id)
                    pipe.execute()
                    return
                except WatchError:
                    continue
        log.warning("z4j-agentd: rq-scheduler job %s kept changing as it came due; it goes through "
                    "rq-scheduler's own enqueue_job", job.id)
        fresh = self._fetch(job.id)
        if fresh is not None and self.connection.zscore(self.active, job.id) is not None:
            self._run_original(fresh, original)

    def _run_original(self, job: Any, original: Callable[[Any], Any]) -> None:
        self.connection.zrem(self.paused, job.id)  # in both sets: the registration wins
        original(job)
        self._after_run(job.id)

    def _after_run(self, job_id: str) -> None:
        with self.connection.pipeline() as pipe:
            self._count_run(pipe, job_id)
            pipe.execute()

    # -- trigger now -------------------------------------------------------

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        return _scrubbed(lambda: self._trigger(row))

    def _trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        job = self._fetch(self._job_id(str(row["source_key"])))
        if job is None:
            raise Conflict(f"schedule {row['name']!r} is not in rq-scheduler any more; refresh the page")
        func, native, unreadable = self._data(job)
        if native is None:
            raise RuntimeError(f"the function and arguments of schedule {row['name']!r} cannot be read in this "
                               f"process ({unreadable}); nothing was sent")
        queue = self.scheduler.get_queue_for_job(job)
        result_ttl = job.result_ttl if job.result_ttl is not None and job.result_ttl >= 0 else None
        sent = queue.create_job(func, args=native["args"], kwargs=native["kwargs"], timeout=job.timeout,
                                result_ttl=result_ttl, ttl=job.ttl,
                                description=job.description if job.description else None)
        with self.connection.pipeline() as pipe:
            queue.enqueue_job(sent, pipeline=pipe)
            self._count_run(pipe, job.id)
            pipe.execute()
        return {"task_id": sent.id, "task_name": func, "queue": queue.name}

    # -- the brain's writes ------------------------------------------------

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        _check_definition(definition)
        return _scrubbed(lambda: self._mutate_retrying(operation, source_key, expected, definition))

    def _mutate_retrying(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
                         definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The write, checked and made in one step on the job's hash and its
        places in the registry: the transaction watches the job's hash
        only, and a script re-checks its scores as it writes (producers
        adding other jobs never make it fail). Tried again when the job
        changed between the read and the write."""
        from redis.exceptions import WatchError

        for _ in range(5):
            with self.connection.pipeline() as pipe:
                try:
                    done, result = self._mutate(pipe, operation, source_key, expected, definition)
                except WatchError:
                    continue
            if done:
                return result
        raise Conflict(f"schedule {source_key!r} kept changing in rq-scheduler while it was written; "
                       f"refresh and try again")

    def _mutate(self, pipe: Any, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
                definition: Mapping[str, Any]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        from rq.job import JobStatus

        names = {row["name"]: row["source_key"] for row in self.rows()}
        now = time.time()
        was: Tuple[Optional[float], Optional[float]] = (None, None)
        runs: Tuple[int, Optional[float]] = (0, None)
        if operation == "create":
            missing = {"name", "task_name", "kind", "expression"} - set(definition)
            if missing:
                raise ValueError(f"a new schedule needs {sorted(missing)}")
            spec = {"timezone": "UTC", "queue": None, "args": [], "kwargs": {}, "is_enabled": True, **definition}
            name = spec["name"].strip()
            if name in names:
                raise Conflict(f"an rq-scheduler schedule named {name!r} exists already")
            meta, score = self._timing({}, spec["kind"], spec["expression"], spec["timezone"], now)
            meta[NAME_META] = name
            meta[QUEUE_META] = spec["queue"]
            job = self.scheduler.job_class.create(
                _func_path(spec["task_name"]), args=list(spec["args"]), kwargs=dict(spec["kwargs"]),
                connection=self.connection, id=uuid.uuid4().hex, result_ttl=-1, meta=meta,
                status=JobStatus.SCHEDULED)
            job.origin = spec["queue"] or self.scheduler.queue_name
            if getattr(self.scheduler, "queue_class_name", None):
                job.meta["queue_class_name"] = self.scheduler.queue_class_name
            enabled = spec["is_enabled"]
            write = True
        else:
            job_id = self._job_id(str(source_key))
            pipe.watch(self.scheduler.job_class.key_for(job_id))
            job = self._fetch(job_id)
            was = (pipe.zscore(self.active, job_id), pipe.zscore(self.paused, job_id))
            if job is None or was == (None, None):
                raise Conflict(f"schedule {source_key!r} is not in rq-scheduler any more; refresh the page")
            enabled = was[0] is not None
            score = was[0] if enabled else was[1]
            counted = pipe.hget(self.runs, job_id)
            last = pipe.hget(self.last_runs, job_id)
            runs = (int(counted or 0), float(last) if last is not None else None)
            row = self._row(job, score, enabled, *runs)
            shown = normalize_row(row, SCHEDULER)
            current = fit_row(shown) or {}
            if configuration(current) != configuration(dict(expected or {})):
                raise Conflict(f"schedule {row['name']!r} changed in rq-scheduler since the brain saw it; "
                               f"refresh and try again")
            if operation == "delete":
                return self._write(pipe, job, was, "delete", False, 0.0, False), None
            func, native, unreadable = self._data(job)
            data = data_changes(definition, current, native, cut=current != shown, unreadable=unreadable,
                                name=row["name"], where="rq-scheduler")
            new_func = None
            if "task_name" in definition and definition["task_name"].strip() != row["task_name"]:
                new_func = _func_path(definition["task_name"])
                if unreadable is not None:
                    raise ValueError(f"the function and arguments of schedule {row['name']!r} cannot be read in "
                                     f"this process ({unreadable}), so the page cannot change its function; "
                                     f"delete it and create it again")
            new_queue = "queue" in definition and definition["queue"] != current.get("queue")
            if (data or new_func or new_queue) and job.get_status(refresh=False) == JobStatus.STARTED:
                # rq-scheduler runs every run under the job's own id, and the worker writes the
                # job's function, arguments and queue back as the run ends: the change would be lost.
                raise Conflict(f"a run of schedule {row['name']!r} is on a worker now, and RQ writes the job back "
                               f"when it ends; change its function, arguments or queue once the run is over")
            if "name" in definition:
                name = definition["name"].strip()
                if names.get(name, source_key) != source_key:
                    raise Conflict(f"an rq-scheduler schedule named {name!r} exists already")
                if name != row["name"]:
                    job.meta[NAME_META] = name
            timing = ("kind", "expression", "timezone")
            retimed = any(k in definition and definition[k] != current.get(k) for k in timing)
            if retimed:
                merged = {k: definition.get(k, current[k]) for k in timing}
                if merged["kind"] != "cron" and "timezone" not in definition:
                    merged["timezone"] = "UTC"
                meta, score = self._timing(job.meta, merged["kind"], merged["expression"], merged["timezone"], now)
                job.meta = meta
            elif "timezone" in definition:
                self._timing({}, current["kind"], current["expression"], definition["timezone"], now)
            if new_func is not None:
                job.func_name = new_func
                job.instance = None
            if "args" in data:
                job.args = list(data["args"])
            if "kwargs" in data:
                job.kwargs = dict(data["kwargs"])
            if new_queue:
                job.origin = definition["queue"] or self.scheduler.queue_name
                job.meta[QUEUE_META] = definition["queue"]
            new_enabled = definition.get("is_enabled", enabled)
            if new_enabled and not enabled and score < now and current["kind"] != "clocked" and not retimed:
                # Enabled again after its time passed: the next run from now on, not a burst of
                # catching up. A one-off (clocked) job keeps its time, so it runs at once.
                _, score = self._timing(dict(job.meta), current["kind"], current["expression"],
                                        current["timezone"], now)
            enabled = new_enabled
            write = set(definition) != {"is_enabled"}
        if not self._write(pipe, job, was, "write", enabled, score, write):
            return False, None
        return True, self._row(job, score, enabled, *runs)

    def _write(self, pipe: Any, job: Any, was: Tuple[Optional[float], Optional[float]], operation: str,
               enabled: bool, score: float, write: bool) -> bool:
        """One script, in the transaction watching the job's hash: checks that
        the job's places in the registry are still `was`, then writes the job
        (`write`; else it only marks its hash as touched, so a due run in
        flight sees the change), and moves it to the registry or the paused
        set. False when its places changed meanwhile."""
        fields: List[Any] = []
        if write:
            for field, value in job.to_dict(include_meta=True).items():
                fields += [field, value]
        pipe.multi()
        pipe.eval(_WRITE, 5, job.key, self.active, self.paused, self.runs, self.last_runs, job.id,
                  "" if was[0] is None else repr(float(was[0])), "" if was[1] is None else repr(float(was[1])),
                  operation, "active" if enabled else "paused", repr(float(score)), *fields)
        return bool(pipe.execute()[0])

    @staticmethod
    def _timing(meta: Mapping[str, Any], kind: str, expression: str, tz: str, now: float
                ) -> Tuple[Dict[str, Any], float]:
        """The job's meta and next run (Unix time) for a kind and expression
        the brain gives; ValueError saying what to change otherwise."""
        out = {k: v for k, v in meta.items() if k not in ("cron_string", "interval", "use_local_timezone")}
        if kind == "cron":
            from rq_scheduler.utils import get_next_scheduled_time

            zone = local_zone()
            if tz not in (zone, "") and not (tz == "UTC" and zone == "UTC"):
                raise ValueError(f"rq-scheduler reads cron expressions in this host's time zone ({zone}); "
                                 f"the timezone must be {zone!r}, got {tz!r}")
            if len(expression.split()) != 5:
                raise ValueError(f"a cron expression has five fields (minute hour day month weekday), "
                                 f"got {expression!r}")
            try:  # as rq-scheduler computes it
                when = get_next_scheduled_time(expression, use_local_timezone=False)
            except Exception as exc:
                raise ValueError(f"rq-scheduler cannot run the cron expression {expression!r}: {exc}") from None
            if when is None:
                raise ValueError(f"the cron expression {expression!r} never comes due")
            out.update(cron_string=expression, use_local_timezone=False)
            out.pop("repeat", None)
            return out, float(round(when.timestamp()))
        if tz not in ("UTC", ""):
            raise ValueError(f"only a cron schedule has a timezone; {kind} schedules run in UTC, got {tz!r}")
        if kind == "interval":
            if not re.fullmatch(r"[0-9]+", expression.strip()) or int(expression) <= 0:
                raise ValueError(f"rq-scheduler repeats a job every whole number of seconds (at least 1), "
                                 f"got {expression!r}")
            seconds = int(expression)
            if seconds > 100 * 365 * 86400:
                raise ValueError(f"an interval is at most 100 years, got {expression!r} seconds")
            out["interval"] = seconds
            return out, float(int(now) + seconds)
        if kind == "clocked":
            try:
                when = datetime.fromisoformat(expression.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"a clocked schedule's expression is an ISO-8601 time, got {expression!r}") from None
            if when.tzinfo is None:
                raise ValueError(f"a clocked schedule's time needs an offset (e.g. +00:00), got {expression!r}")
            out.pop("repeat", None)
            return out, float(int(when.timestamp()))
        raise ValueError(f"rq-scheduler runs cron, interval and clocked (one-off) schedules, not {kind!r}")


def _raw_func_name(job: Any) -> str:
    """The function's name read from the job's pickled data without
    unpickling it (the first text in it), else from its description."""
    raw = getattr(job, "_data", None)
    if isinstance(raw, bytes):
        try:
            import pickletools

            for _, arg, _ in pickletools.genops(raw):
                if isinstance(arg, str) and arg.strip():
                    return arg.strip()[:500]
        except Exception:
            pass
    description = str(getattr(job, "description", None) or "").split("(", 1)[0].strip()
    return description[:500] or "<not readable here>"


def _scrubbed(work: Callable[[], Any]) -> Any:
    """`work()`, its error's text with secret-looking parts (a Redis URL's
    password) replaced: it reaches the brain's page."""
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


def _func_path(task_name: str) -> str:
    """An import path (`tasks.send_report`, or `tasks:send_report`)."""
    path = task_name.strip().replace(":", ".")
    if not _FUNC_PATH.match(path):
        raise ValueError(f"task_name is the function's import path (e.g. myapp.tasks.send_report), "
                         f"got {task_name!r}")
    return path


def _check_definition(spec: Mapping[str, Any]) -> None:
    check_definition_types(spec)
    if "name" in spec and len(spec["name"].strip()) > 200:
        raise ValueError("name is at most 200 characters")
    if "timezone" in spec and not isinstance(spec["timezone"], str):
        raise ValueError(f"timezone must be a string, got {spec['timezone']!r}")
    if "task_name" in spec:
        _func_path(spec["task_name"])
    if "queue" in spec and spec["queue"] is not None and not spec["queue"].strip():
        raise ValueError(f"queue must be a queue name or null, got {spec['queue']!r}")


# ---------------------------------------------------------------------------
# wiring



def default_state_path(scheduler: Any) -> str:
    """Where the rows last published are kept: `~/.z4j/`, one file per Redis
    database and registry."""
    kwargs = getattr(getattr(scheduler.connection, "connection_pool", None), "connection_kwargs", {}) or {}
    ident = f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db')}:{kwargs.get('path')}:" \
            f"{scheduler.scheduled_jobs_key}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".z4j", f"{SCHEDULER}-{digest}.z4j-agentd.json")


_installed: Dict[int, ExternalScheduler] = {}
_install_lock = threading.Lock()


def install(scheduler: Any, client: Any = None, *, serve_commands: bool = True,
            state_path: Optional[str] = None) -> Any:
    """Serves `scheduler`'s (an `rq_scheduler.Scheduler`) jobs on the
    brain's Schedules page through `client` (default:
    `z4j_agentd.get_client()`), and makes its `enqueue_job` transactional
    (see the module's docstring); returns the client. Call it before
    `scheduler.run()`, in the process that runs it (once per scheduler).

    `state_path` is the file keeping the rows last published, for the
    schedules removed while the process was stopped (default: in
    `~/.z4j/`, named after the Redis database)."""
    from ..client import get_client

    client = client or get_client()
    if not serve_commands:
        return client
    with _install_lock:
        if id(scheduler) in _installed:
            return client
        source = RQSchedulerSource(scheduler)
        path = state_path or default_state_path(scheduler)
        if state_path is None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        stream = ExternalScheduler(SCHEDULER, source, durable_sender(client, SEND_TIMEOUT), poll_interval=POLL_SECONDS,
                                   min_interval=MIN_SNAPSHOT_SECONDS, state_path=path)
        original = scheduler.enqueue_job

        def enqueue_job(job: Any) -> None:
            try:
                source.enqueue_due(job, original)
            finally:
                stream.changed()

        scheduler.enqueue_job = enqueue_job
        stream.serve(client)
        _installed[id(scheduler)] = stream
    log.info("z4j-agentd: serving %s (registry %s) for the brain's Schedules page", SCHEDULER,
             scheduler.scheduled_jobs_key)
    return client


def active(scheduler: Any) -> Optional[ExternalScheduler]:
    """The stream serving `scheduler` (its `stats()`), or None."""
    return _installed.get(id(scheduler))


def parser() -> argparse.ArgumentParser:
    """rqscheduler's own options (rq-scheduler 0.14), and `--state-file`."""
    p = argparse.ArgumentParser(prog="python -m z4j_agentd.rq.scheduler",
                                description="Runs rq-scheduler, with its jobs on the z4j brain's Schedules page")
    env = os.environ.get
    p.add_argument("-b", "--burst", action="store_true", default=False,
                   help="Run in burst mode (quit after all work is done)")
    p.add_argument("-H", "--host", default=env("RQ_REDIS_HOST", "localhost"), help="Redis host")
    p.add_argument("-p", "--port", default=int(env("RQ_REDIS_PORT", 6379)), type=int, help="Redis port number")
    p.add_argument("-d", "--db", default=int(env("RQ_REDIS_DB", 0)), type=int, help="Redis database")
    p.add_argument("-P", "--password", default=env("RQ_REDIS_PASSWORD"), help="Redis password")
    p.add_argument("--verbose", "-v", action="store_true", default=False, help="Show more output")
    p.add_argument("--quiet", action="store_true", default=False, help="Show less output")
    p.add_argument("--url", "-u", default=env("RQ_REDIS_URL"),
                   help="URL describing Redis connection details; overrides the other connection arguments")
    p.add_argument("-i", "--interval", default=60.0, type=float,
                   help="How often the scheduler checks for new jobs to add to the queue (seconds)")
    p.add_argument("--path", default=".", help="Specify the import path.")
    p.add_argument("--pid", help="A filename to use for the PID file.", metavar="FILE")
    p.add_argument("-j", "--job-class", help="Custom RQ Job class")
    p.add_argument("-q", "--queue-class", help="Custom RQ Queue class")
    p.add_argument("--state-file", help="The file keeping the rows last published to the brain "
                                        "(default: in ~/.z4j/)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    from redis import Redis

    from rq_scheduler.scheduler import Scheduler
    from rq_scheduler.utils import setup_loghandlers

    args = parser().parse_args(argv)
    if args.path:
        sys.path = args.path.split(":") + sys.path
    if args.pid:
        with open(args.pid, "w") as f:
            f.write(str(os.getpid()))
    if args.url is not None:
        connection = Redis.from_url(args.url)
    else:
        connection = Redis(args.host, args.port, args.db, args.password)
    setup_loghandlers("DEBUG" if args.verbose else "WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    scheduler = Scheduler(connection=connection, interval=args.interval, job_class=args.job_class,
                          queue_class=args.queue_class)
    install(scheduler, state_path=args.state_file)
    scheduler.run(burst=args.burst)


if __name__ == "__main__":
    main()


__all__ = ["RQSchedulerSource", "SCHEDULER", "active", "install", "local_zone", "main", "parser"]
