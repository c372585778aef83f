"""The brain's commands, as an RQ worker's main process runs them (on the
client's command threads, never in a job's path), with the worker's own
Redis connection, job class and serializer.

Each handler takes the `command` message the daemon routed here and returns
the result map, or raises `BadCommand` (the parameters cannot work; the
message says what to change) or `CommandFailed` (RQ or Redis did not do it).
Error texts are masked: no URL credentials, not the connection's password.

A job's status is compared by its value (`"started"`): RQ 3's JobStatus is a
str enum whose str() is `JobStatus.STARTED`.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from . import _health
from .._integration import (BadCommand, bulk_filter, CommandFailed, eta_from_unix, params as _params,
                            target as _target, task_id as _command_task_id)

ENGINE = "rq"

#: The actions served, as the hello declares them (`dlq.list` is the wire
#: action of the capability `list_dead_letters`).
ACTIONS = ("bulk_retry", "cancel_task", "dlq.list", "purge_queue", "reconcile_task", "requeue_dead_letter",
           "retry_task", "submit_task")
#: Capability tokens beyond the actions.
TOKENS = ("list_dead_letters", "retry_by_reference_v1")
#: Seconds cancel_task waits for a running job to reach `stopped` (and for a
#: job a worker has just taken from its queue to be marked started).
STOP_WAIT = 5.0
#: Times cancel_task looks at a job whose status changes under it.
CANCEL_ROUNDS = 5
#: The fields our workers add to their RQ worker hash: their class, and
#: whether they can stop a running job ("0": a SimpleWorker).
WORKER_POOL_FIELD = "z4j_pool"
WORKER_CAN_STOP_FIELD = "z4j_can_stop"
#: Jobs one bulk_retry retries at most, whatever its `max`.
BULK_RETRY_MAX = 1000
#: A dead-letter page's entries at most (the brain's DLQ_LIST_MAX_LIMIT).
DLQ_MAX_LIMIT = 200
DLQ_DEFAULT_LIMIT = 100
#: The brain's error_excerpt limit.
EXCERPT_CHARS = 512
#: The text the brain reads as a bad cursor (422 to its caller).
CURSOR_REFUSAL = "invalid dead-letter cursor"
#: purge_queue in one step. KEYS[1] the queue; ARGV force ("1"/"0"), the
#: expected depth, the job key prefix, the result key prefix. Returns
#: {1, depth, purged} or {0, depth, 0} (the depth is not the expected one).
PURGE_SCRIPT = """
local depth = redis.call('LLEN', KEYS[1])
if ARGV[1] ~= '1' and depth ~= tonumber(ARGV[2]) then
    return {0, depth, 0}
end
local purged = 0
while true do
    local id = redis.call('LPOP', KEYS[1])
    if not id then break end
    redis.call('DEL', ARGV[3] .. id, ARGV[4] .. id, ARGV[3] .. id .. ':dependents')
    purged = purged + 1
end
return {1, depth, purged}
"""
_MAX_EXCEPTION_CHARS = 2000
# The brain's priority labels: RQ has no priorities, but a job can go to the front of its queue.
_AT_FRONT = {"critical": True, "high": True, "normal": False, "low": False}
_RECONCILED = {"queued": "pending", "deferred": "pending", "scheduled": "pending", "created": "pending",
               "rate_limited": "pending", "ready_to_enqueue": "pending", "started": "started",
               "finished": "success", "failed": "failure", "stopped": "failure", "canceled": "failure"}
_WAITING = ("queued", "deferred", "scheduled", "created", "rate_limited", "ready_to_enqueue")
_ENDED = ("finished", "failed", "stopped", "canceled")


def _task_id(command: Mapping[str, Any], action: str) -> str:
    return _command_task_id(command, ENGINE, action, "the RQ job id")


def status_of(job: Any) -> str:
    """The job's status, fresh from Redis, as its plain value."""
    status = job.get_status(refresh=True)
    return str(getattr(status, "value", status))


def at_front_of(priority: Any) -> bool:
    if isinstance(priority, str):
        return _AT_FRONT.get(priority.strip().lower(), False)
    return False


def _iso(when: Any) -> Optional[str]:
    if not isinstance(when, datetime):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.isoformat()


def _result_prefix() -> str:
    """The key prefix of RQ's job results (`rq:results:`)."""
    try:
        from rq.results import Result

        return str(Result.get_key(""))
    except Exception:
        return "rq:results:"


def can_stop_jobs(worker: Any) -> bool:
    """Whether the worker runs jobs in a work horse it can kill (not a
    SimpleWorker, which runs them in its own process)."""
    from rq import SimpleWorker

    return not isinstance(worker, SimpleWorker)


def _positive_int(value: Any, action: str, key: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadCommand(f"{action}: parameters.{key} must be a whole number >= 1, got {value!r}")
    return value


class RqCommands:
    """The command handlers of one worker (`_Hooks`)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self._purge: Any = None

    @property
    def worker(self) -> Any:
        return self.hooks.worker

    @property
    def connection(self) -> Any:
        return self.worker.connection

    def scrub(self, text: str) -> str:
        return _health.scrub(text, _health.password_of(self.connection))

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        return {(ENGINE, action): self._masked(action, getattr(self, action.replace(".", "_")))
                for action in ACTIONS}

    def _masked(self, action: str, handler: Any) -> Any:
        def run(command: Dict[str, Any]) -> Any:
            try:
                return handler(command)
            except (BadCommand, CommandFailed) as exc:
                raise type(exc)(self.scrub(str(exc))) from None
            except Exception as exc:
                raise CommandFailed(f"{action} failed: {type(exc).__name__}: {self.scrub(str(exc))}") from None

        run.__name__ = run.__qualname__ = action.replace(".", "_")
        run.__doc__ = handler.__doc__
        return run

    # -- RQ objects ------------------------------------------------------

    def _queue(self, name: str) -> Any:
        return self.worker.queue_class(name, connection=self.connection, job_class=self.worker.job_class,
                                       serializer=self.worker.serializer)

    def _fetch(self, task_id: str) -> Any:
        """The job, or None when Redis has no such job (never was, or expired)."""
        from rq.exceptions import NoSuchJobError

        try:
            return self.worker.job_class.fetch(task_id, connection=self.connection,
                                               serializer=self.worker.serializer)
        except NoSuchJobError:
            return None

    def _queue_names(self) -> List[str]:
        from rq import Queue

        names = [str(n) for n in self.worker.queue_names()]
        for queue in Queue.all(connection=self.connection):
            if queue.name not in names:
                names.append(queue.name)
        return names

    def _revoked(self, job: Any, reason: str) -> None:
        """task.revoked for a job cancelled before it ran (no worker will).
        No `worker`: this worker only served the command, it never had the
        job."""
        try:
            name = job.func_name
        except Exception:
            name = None
        self.hooks.emit("task.revoked", job.id, {k: v for k, v in {
            "task_name": name, "queue": job.origin, "terminated": False,
            "signum": None, "expired": False, "reason": reason}.items() if v is not None or k == "signum"})

    # -- cancel ----------------------------------------------------------

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Cancels a job. A waiting one (queued, deferred, scheduled) is
        cancelled and never runs (`cancelled: true`): a queued one is first
        taken out of its queue (LREM), so no worker can take it meanwhile;
        the others are cancelled in a transaction that watches the job,
        so a status that changed in between is looked at again. A queued
        job already taken by a worker whose work horse has not marked it
        started yet is waited for (up to STOP_WAIT) and stopped as a
        running one. A running one is stopped: its worker kills the work
        horse (RQ's stop-job command), and the answer waits until the job is
        `stopped` (`stopped: true`), or fails saying it is still running. A
        job on a SimpleWorker (which runs jobs in its own process and cannot
        stop one) is refused before anything is sent. A job that already
        ended is left as it is (`state_before` says how it ended)."""
        task_id = _task_id(command, "cancel_task")
        job = self._fetch(task_id)
        if job is None:
            return {"task_id": task_id, "state_before": "unknown", "cancelled": False, "stopped": False,
                    "detail": "Redis has no such job (never enqueued here, or its TTL expired)"}
        picked_up = False
        for _round in range(CANCEL_ROUNDS):
            state = status_of(job)
            if state in _ENDED:
                return {"task_id": task_id, "state_before": state, "cancelled": False, "stopped": False,
                        "detail": f"the job had already ended ({state})"}
            if state == "started":
                return self._stop_running(job, picked_up=picked_up)
            if state not in _WAITING:
                raise CommandFailed(f"cancel_task {task_id}: the job is {state!r}, which cancel does not know; "
                                    f"nothing was done")
            if state == "queued" and not self._take_out_of_queue(job):
                # Not in its queue but still queued: a worker has just taken
                # it and its work horse has not marked it started yet.
                now = self._wait_while_queued(job)
                if now != "queued":
                    picked_up = True
                    continue
                if self._held_by_a_worker(job):
                    raise CommandFailed(
                        f"cancel_task {task_id}: a worker took the job from queue {job.origin!r} but has not "
                        f"started it after {STOP_WAIT:.0f} s; nothing was done. Cancel it again")
                # In no queue and no worker's hands: nothing will run it; cancel it.
            if self._cancel_watched(job, state):
                self._revoked(job, f"cancelled while {state}")
                return {"task_id": task_id, "state_before": state, "cancelled": True, "stopped": False,
                        "status": status_of(job)}
            # Its status changed between the read and the cancel: look again.
        raise CommandFailed(f"cancel_task {task_id}: the job's status kept changing ({status_of(job)} now); "
                            f"nothing was done. Cancel it again")

    def _take_out_of_queue(self, job: Any) -> bool:
        """LREM the job's id from its queue: True when it was there (no
        worker can take it any more)."""
        key = self._queue(job.origin).key
        return bool(self.connection.lrem(key, 0, job.id))

    def _held_by_a_worker(self, job: Any) -> bool:
        """The job's id in its queue's intermediate list, where a worker
        listening to that one queue moves a job it takes (RQ 2 and 3)."""
        try:
            key = self._queue(job.origin).intermediate_queue_key
            return self.connection.lpos(key, job.id) is not None
        except Exception:
            return False

    def _wait_while_queued(self, job: Any) -> str:
        deadline = time.monotonic() + STOP_WAIT
        state = status_of(job)
        while state == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
            state = status_of(job)
        return state

    def _cancel_watched(self, job: Any, state: str) -> bool:
        """RQ's cancel in a transaction that watches the job's hash: False
        when the status is no longer `state` (or changed before EXEC)."""
        from redis.exceptions import WatchError

        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(job.key)
                now = pipe.hget(job.key, "status")
                now = now.decode() if isinstance(now, bytes) else now
                if now != state:
                    return False
                pipe.multi()
                job.cancel(pipeline=pipe)
                pipe.execute()
                return True
            except WatchError:
                return False

    def _owner_cannot_stop(self, owner: str) -> Optional[str]:
        """The class of worker `owner` when it cannot stop a running job (a
        SimpleWorker), as our workers record it in their hash; None when it
        can, or when the worker is not one of ours (unknown)."""
        if owner == self.hooks.name:
            if not can_stop_jobs(self.worker):
                return f"{type(self.worker).__module__}:{type(self.worker).__qualname__}"
            return None
        try:
            pool, can_stop = self.connection.hmget(self.worker.redis_worker_namespace_prefix + owner,
                                                   WORKER_POOL_FIELD, WORKER_CAN_STOP_FIELD)
        except Exception:
            return None
        if can_stop in (b"0", "0"):
            return pool.decode() if isinstance(pool, bytes) else str(pool or "a SimpleWorker")
        return None

    def _stop_running(self, job: Any, picked_up: bool = False) -> Dict[str, Any]:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation

        task_id = job.id
        owner = self.connection.hget(job.key, "worker_name")  # fresh: the copy in hand may predate the start
        owner = (owner.decode() if isinstance(owner, bytes) else owner) or job.worker_name
        cannot = self._owner_cannot_stop(owner) if owner else None
        if cannot is not None:
            raise CommandFailed(f"cancel_task {task_id}: the job is running on worker {owner!r}, a {cannot}, "
                                f"which runs jobs in its own process and cannot stop one; nothing was sent and "
                                f"it will run to its end. Run the worker as z4j_agentd.rq.Worker (forking) for "
                                f"cancels that stop running jobs")
        began = time.monotonic()
        try:
            send_stop_job_command(self.connection, task_id, serializer=self.worker.serializer)
        except InvalidJobOperation:
            # Not executing any more: it ended between the two reads.
            state = status_of(job)
            return {"task_id": task_id, "state_before": state, "cancelled": False, "stopped": False,
                    "detail": f"the job ended ({state}) before the stop was sent"}
        deadline = began + STOP_WAIT
        state = status_of(job)
        while state == "started" and time.monotonic() < deadline:
            time.sleep(0.05)
            state = status_of(job)
        waited_ms = int(round((time.monotonic() - began) * 1000))
        extra = {"detail": "a worker had just taken it from its queue: stopped as a running job"} \
            if picked_up else {}
        if state == "stopped":
            return {"task_id": task_id, "state_before": "running", "cancelled": True, "stopped": True,
                    "status": state, "worker": owner, "waited_ms": waited_ms, **extra}
        if state in ("finished", "failed"):
            return {"task_id": task_id, "state_before": "running", "cancelled": False, "stopped": False,
                    "status": state, "worker": owner, "waited_ms": waited_ms,
                    "detail": f"the job ended ({state}) before its worker stopped it"}
        raise CommandFailed(f"cancel_task {task_id}: RQ's stop-job command went to worker {owner!r}, but the job "
                            f"is still {state} after {STOP_WAIT:.0f} s: that worker may not be listening to its "
                            f"commands (or is a SimpleWorker not started as z4j_agentd.rq.SimpleWorker)")

    # -- retries ---------------------------------------------------------

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Runs the job again. A failed or stopped job in its queue's failed
        registry, with no overrides and no eta, is requeued as it is (same
        job id, `requeued: true`). Otherwise a new job is enqueued on the job's
        queue with its function and its args and kwargs (or the operator's
        override_args / override_kwargs), at `eta` if given. A running job
        is refused, and so is a waiting one (queued, deferred, scheduled...):
        it has not run, and a copy would run it twice. `priority` critical or
        high puts it at the front of its queue."""
        params = _params(command)
        task_id = _task_id(command, "retry_task")
        return self._retry_one(task_id, params)

    def _retry_one(self, task_id: str, params: Mapping[str, Any]) -> Dict[str, Any]:
        from rq.registry import FailedJobRegistry

        override_args, override_kwargs = params.get("override_args"), params.get("override_kwargs")
        if override_args is not None and not isinstance(override_args, list):
            raise BadCommand(f"retry_task {task_id}: override_args must be a list, got "
                             f"{type(override_args).__name__}")
        if override_kwargs is not None and not isinstance(override_kwargs, dict):
            raise BadCommand(f"retry_task {task_id}: override_kwargs must be a map, got "
                             f"{type(override_kwargs).__name__}")
        eta = eta_from_unix(params["eta"]) if params.get("eta") is not None else None
        if eta is None and params.get("eta_seconds") is not None:
            try:
                seconds = max(0.0, float(params["eta_seconds"]))
            except (TypeError, ValueError):
                raise BadCommand(f"eta_seconds must be a number, got {params['eta_seconds']!r}") from None
            eta = datetime.fromtimestamp(time.time() + seconds, tz=timezone.utc)
        at_front = at_front_of(params.get("priority"))
        job = self._fetch(task_id)
        if job is None:
            name = params.get("task_name")
            if not isinstance(name, str) or not name or (override_args is None and override_kwargs is None):
                raise BadCommand(f"cannot retry {task_id}: Redis has no such job (its TTL expired, or it never "
                                 f"was), so its function and arguments are unknown; retry with task_name and "
                                 f"override_args/override_kwargs")
            return self._enqueue_copy(task_id, name, override_args or [], override_kwargs or {},
                                      params.get("queue") or "default", eta, at_front, None)
        state = status_of(job)
        if state == "started":
            raise CommandFailed(f"cannot retry {task_id}: it is running now (on worker {job.worker_name!r}); "
                                f"cancel it first or wait for it to end")
        if state in _WAITING:
            raise CommandFailed(f"cannot retry {task_id}: it is {state} and has not run yet, so a retry would "
                                f"enqueue a second copy of it (one that would not wait for what it depends on); "
                                f"nothing was done. Wait for it to run, or cancel it and retry it then")
        registry = FailedJobRegistry(job.origin, connection=self.connection, job_class=self.worker.job_class,
                                     serializer=self.worker.serializer)
        if override_args is None and override_kwargs is None and eta is None and job.id in registry:
            try:
                registry.requeue(job, at_front=at_front)
            except Exception as exc:
                raise CommandFailed(f"cannot retry {task_id}: RQ did not requeue it from the failed registry of "
                                    f"queue {job.origin!r} ({type(exc).__name__}: {self.scrub(str(exc))})") from None
            return {"task_id": task_id, "new_task_id": task_id, "requeued": True, "source": "failed_registry",
                    "queue": job.origin, "task_name": job.func_name, "at_front": at_front}
        args = override_args if override_args is not None else list(job.args or ())
        kwargs = override_kwargs if override_kwargs is not None else dict(job.kwargs or {})
        return self._enqueue_copy(task_id, job.func_name, args, kwargs, job.origin, eta, at_front, job)

    def _enqueue_copy(self, task_id: str, name: str, args: Any, kwargs: Any, queue_name: str,
                      eta: Optional[datetime], at_front: bool, job: Any) -> Dict[str, Any]:
        queue = self._queue(queue_name)
        options: Dict[str, Any] = {}
        if job is not None:
            for key in ("timeout", "result_ttl", "ttl", "failure_ttl"):
                value = getattr(job, key, None)
                if value is not None:
                    options[key] = value
            if job.description:
                options["description"] = job.description
        try:
            if eta is not None:
                if "timeout" in options:
                    options["job_timeout"] = options.pop("timeout")  # enqueue_at's name for it
                new = queue.enqueue_at(eta, name, args=args, kwargs=kwargs, **options)
            else:
                new = queue.enqueue_call(name, args=args, kwargs=kwargs, at_front=at_front, **options)
        except Exception as exc:
            raise CommandFailed(f"cannot retry {task_id}: {name} could not be enqueued on {queue_name!r} "
                                f"({type(exc).__name__}: {self.scrub(str(exc))})") from None
        return json_safe({"task_id": task_id, "new_task_id": new.id, "requeued": False, "source": "copy",
                          "queue": queue_name, "task_name": name, "at_front": at_front,
                          "scheduled_for": _iso(eta)})

    def bulk_retry(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Retries each job of `filter.task_ids` as retry_task does by
        reference (at most `max`, and BULK_RETRY_MAX)."""
        params = _params(command)
        filt, ids = bulk_filter(command, "RQ job ids", "job ids")
        limit = min(_positive_int(params.get("max"), "bulk_retry", "max", BULK_RETRY_MAX), BULK_RETRY_MAX)
        priorities = filt.get("task_priorities") if isinstance(filt.get("task_priorities"), dict) else {}
        unique: List[str] = list(dict.fromkeys(ids))
        new_task_ids: Dict[str, Optional[str]] = {}
        failures: Dict[str, str] = {}
        for task_id in unique[:limit]:
            try:
                out = self._retry_one(task_id, {"priority": priorities.get(task_id)})
                new_task_ids[task_id] = out["new_task_id"]
            except Exception as exc:
                failures[task_id] = self.scrub(f"{type(exc).__name__}: {exc}")[:500]
        if not new_task_ids:
            sample = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
            raise CommandFailed(f"bulk_retry retried none of the {min(len(unique), limit)} jobs: {sample}")
        return {"requested": len(ids), "attempted": min(len(unique), limit), "succeeded": len(new_task_ids),
                "retried": len(new_task_ids), "failed": len(failures), "capped": len(unique) > limit,
                "max": limit, "new_task_ids": new_task_ids, "failures": failures}

    # -- the dead letters (RQ's failed job registries) --------------------

    def requeue_dead_letter(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Requeues a job from its queue's failed registry (same job id)."""
        from rq.registry import FailedJobRegistry

        task_id = _task_id(command, "requeue_dead_letter")
        job = self._fetch(task_id)
        if job is None:
            raise CommandFailed(f"requeue_dead_letter {task_id}: Redis has no such job (its failure TTL "
                                f"expired, or it never was)")
        registry = FailedJobRegistry(job.origin, connection=self.connection, job_class=self.worker.job_class,
                                     serializer=self.worker.serializer)
        if job.id not in registry:
            raise CommandFailed(f"requeue_dead_letter {task_id}: the job is not in the failed registry of queue "
                                f"{job.origin!r} (it is {status_of(job)}); retry_task runs a copy of it")
        registry.requeue(job)
        return {"task_id": task_id, "queue": job.origin, "requeued": True, "source": "failed_registry"}

    def dlq_list(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """One page of the failed registries (of `queue`, else of every
        queue), newest first: the brain's DeadLetterPage."""
        params = _params(command)
        queue = params.get("queue") or _target(command).get("id")
        if queue is not None and not isinstance(queue, str):
            raise BadCommand(f"dlq.list: parameters.queue must be a queue's name or null, got {queue!r}")
        limit = params.get("limit")
        if limit is None:
            limit = DLQ_DEFAULT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise BadCommand(f"dlq.list: parameters.limit must be a whole number >= 1, got {limit!r}")
        limit = min(limit, DLQ_MAX_LIMIT)
        cursor = params.get("cursor")
        offset = 0
        if cursor is not None:
            if not isinstance(cursor, str) or not cursor.isdigit() or len(cursor) > 12:
                raise BadCommand(f"{CURSOR_REFUSAL}: {cursor!r} (pass back the next_cursor of the previous page)")
            offset = int(cursor)
        from rq.registry import FailedJobRegistry

        names = [queue] if queue else self._queue_names()
        keys = [FailedJobRegistry(name, connection=self.connection).key for name in names]
        # Each registry's first offset+limit entries (newest first) are
        # enough for the page; ZCARD counts the rest without reading them.
        with self.connection.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zcard(key)
                pipe.zrevrange(key, 0, offset + limit - 1, withscores=True)
            replies = pipe.execute()
        total = 0
        scored: List[Tuple[float, str, str]] = []
        for i, name in enumerate(names):
            total += int(replies[2 * i] or 0)
            for job_id, score in replies[2 * i + 1]:
                job_id = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
                scored.append((float(score), job_id, name))
        # ZREVRANGE's own order: score, then member, both descending.
        scored.sort(reverse=True)
        page = scored[offset:offset + limit]
        entries = [self._dead_letter(name, job_id) for _score, job_id, name in page]
        following = offset + len(page)
        return {"entries": entries, "next_cursor": str(following) if following < total else None,
                "total": total, "engine": ENGINE}

    def _dead_letter(self, queue: str, job_id: str) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"task_id": job_id, "task_name": "", "queue": queue, "failed_at": None,
                                 "error_excerpt": "", "attempts": None}
        job = self._fetch(job_id)
        if job is None:
            return entry
        try:
            entry["task_name"] = str(job.func_name)[:500]
        except Exception:
            pass
        entry["failed_at"] = _iso(job.ended_at)
        try:
            result = job.latest_result()
            text = getattr(result, "exc_string", None) if result is not None else None
        except Exception:
            text = None
        if isinstance(text, str) and text:
            entry["error_excerpt"] = scrub_text(text.strip()[-EXCERPT_CHARS:])[-EXCERPT_CHARS:]
        return entry

    # -- queues ----------------------------------------------------------

    def purge_queue(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Empties a queue's waiting jobs at the depth the daemon confirmed,
        in one Lua script (PURGE_SCRIPT): the depth is measured again, and
        when it is not `expected_depth` nothing is purged (unless `force`);
        otherwise exactly those jobs are popped and deleted (their hash,
        result and dependents keys, as RQ's Queue.empty does), so a job
        enqueued meanwhile is either counted or stays. Running, scheduled,
        deferred and failed jobs stay (they are in RQ's registries, not the
        queue)."""
        params = _params(command)
        target = _target(command)
        queue = params.get("queue") or target.get("queue") or target.get("id")
        if not isinstance(queue, str) or not queue.strip():
            raise BadCommand("purge_queue needs parameters.queue (the queue's name)")
        queue = queue.strip()
        force = params.get("force", False)
        if not isinstance(force, bool):
            raise BadCommand(f"purge_queue: parameters.force must be true or false, got {force!r}")
        expected = params.get("expected_depth")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 0):
            raise BadCommand(f"purge_queue: parameters.expected_depth must be a whole number >= 0, "
                             f"got {expected!r}")
        if expected is None and not force:
            raise BadCommand(f"purge_queue for queue {queue!r}: no expected_depth, so the purge is not "
                             f"confirmed; purge from the brain with the queue's observed depth (or force)")
        rq_queue = self._queue(queue)
        try:
            done, depth, purged = self._purge_script()(
                keys=[rq_queue.key], args=["1" if force else "0", -1 if expected is None else expected,
                                           self.worker.job_class.redis_job_namespace_prefix, _result_prefix()])
        except Exception as exc:
            raise CommandFailed(f"purge_queue for queue {queue!r} failed: {type(exc).__name__}: "
                                f"{self.scrub(str(exc))}; nothing was purged") from None
        if not done:
            raise CommandFailed(
                f"purge_queue for queue {queue!r}: it holds {depth} jobs now, the purge was confirmed at "
                f"{expected}; nothing was purged. Re-issue the purge with the current depth")
        return {"queue": queue, "depth_before": int(depth), "purged": int(purged), "force": force}

    def _purge_script(self) -> Any:
        if self._purge is None:
            self._purge = self.connection.register_script(PURGE_SCRIPT)
        return self._purge

    # -- submit and reconcile --------------------------------------------

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues a function by its dotted path: `name`, `args`, `kwargs`,
        `queue` (default `default`), `eta` (needs a worker started with
        --with-scheduler), `priority` (critical or high: at the front)."""
        params = _params(command)
        name = params.get("name") or params.get("task_name")
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the function's dotted path, e.g. tasks.add)")
        name = name.strip()
        args, kwargs = params.get("args"), params.get("kwargs")
        if args is not None and not isinstance(args, list):
            raise BadCommand(f"submit_task {name}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"submit_task {name}: kwargs must be a map, got {type(kwargs).__name__}")
        queue = params.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise BadCommand(f"submit_task {name}: queue must be a queue's name or null, got {queue!r}")
        queue = (queue or "").strip() or "default"
        eta = eta_from_unix(params["eta"]) if params.get("eta") is not None else None
        at_front = at_front_of(params.get("priority"))
        rq_queue = self._queue(queue)
        try:
            if eta is not None:
                job = rq_queue.enqueue_at(eta, name, args=args or [], kwargs=kwargs or {})
            else:
                job = rq_queue.enqueue_call(name, args=args or [], kwargs=kwargs or {}, at_front=at_front)
        except Exception as exc:
            raise CommandFailed(f"submit_task {name}: the job could not be enqueued on {queue!r} "
                                f"({type(exc).__name__}: {self.scrub(str(exc))})") from None
        return json_safe({"task_id": job.id, "engine": ENGINE, "task_name": name, "queue": queue,
                          "at_front": at_front, "scheduled_for": _iso(eta)})

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The job's state as Redis has it: `engine_state` pending, started,
        success, failure, or unknown (no such job)."""
        task_id = _task_id(command, "reconcile_task")
        job = self._fetch(task_id)
        if job is None:
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "detail": "Redis has no such job (never enqueued here, or its TTL expired)"}
        state = status_of(job)
        engine_state = _RECONCILED.get(state, "unknown")
        exception = None
        if state in ("failed", "stopped"):
            try:
                result = job.latest_result()
                exception = getattr(result, "exc_string", None) if result is not None else None
            except Exception:
                exception = None
            exception = scrub_text(exception[-_MAX_EXCEPTION_CHARS:]) if exception else state
        elif state == "canceled":
            exception = "canceled"
        return {"task_id": task_id, "engine_state": engine_state, "rq_status": state,
                "finished_at": _iso(job.ended_at) if state in _ENDED else None, "exception": exception,
                "worker": job.worker_name or None}


def capabilities() -> Dict[str, List[str]]:
    """The capability tokens beyond the handlers' actions."""
    return {ENGINE: list(TOKENS)}
