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

import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from . import _health

ENGINE = "rq"

#: The actions served, as the hello declares them (`dlq.list` is the wire
#: action of the capability `list_dead_letters`).
ACTIONS = ("bulk_retry", "cancel_task", "dlq.list", "purge_queue", "reconcile_task", "requeue_dead_letter",
           "retry_task", "submit_task")
#: Capability tokens beyond the actions.
TOKENS = ("list_dead_letters", "retry_by_reference_v1")
#: Seconds cancel_task waits for a running job to reach `stopped`.
STOP_WAIT = 5.0
#: Jobs one bulk_retry retries at most, whatever its `max`.
BULK_RETRY_MAX = 1000
#: A dead-letter page's entries at most (the brain's DLQ_LIST_MAX_LIMIT).
DLQ_MAX_LIMIT = 200
DLQ_DEFAULT_LIMIT = 100
#: The brain's error_excerpt limit.
EXCERPT_CHARS = 512
#: The text the brain reads as a bad cursor (422 to its caller).
CURSOR_REFUSAL = "invalid dead-letter cursor"
_ETA_MAX_PAST_SECONDS = 60
_ETA_MAX_FUTURE_SECONDS = 365 * 24 * 3600
_MAX_EXCEPTION_CHARS = 2000
# The brain's priority labels: RQ has no priorities, but a job can go to the front of its queue.
_AT_FRONT = {"critical": True, "high": True, "normal": False, "low": False}
_RECONCILED = {"queued": "pending", "deferred": "pending", "scheduled": "pending", "created": "pending",
               "rate_limited": "pending", "ready_to_enqueue": "pending", "started": "started",
               "finished": "success", "failed": "failure", "stopped": "failure", "canceled": "failure"}
_WAITING = ("queued", "deferred", "scheduled", "created", "rate_limited", "ready_to_enqueue")
_ENDED = ("finished", "failed", "stopped", "canceled")


class BadCommand(ValueError):
    """The command's parameters cannot work; the message says what to change."""


class CommandFailed(RuntimeError):
    """RQ or Redis did not do what the command asked."""


def _params(command: Mapping[str, Any]) -> Dict[str, Any]:
    params = command.get("parameters")
    return params if isinstance(params, dict) else {}


def _target(command: Mapping[str, Any]) -> Dict[str, Any]:
    target = command.get("target")
    return target if isinstance(target, dict) else {}


def _task_id(command: Mapping[str, Any], action: str) -> str:
    task_id = _params(command).get("task_id")
    if task_id is None:
        ident = _target(command).get("id")
        if isinstance(ident, str):
            task_id = ident[len(ENGINE) + 1:] if ident.startswith(f"{ENGINE}:") else ident
    if not isinstance(task_id, str) or not task_id.strip():
        raise BadCommand(f"{action} needs parameters.task_id (the RQ job id)")
    return task_id.strip()


def status_of(job: Any) -> str:
    """The job's status, fresh from Redis, as its plain value."""
    status = job.get_status(refresh=True)
    return str(getattr(status, "value", status))


def eta_from_unix(eta: Any) -> datetime:
    try:
        when = datetime.fromtimestamp(float(eta), tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        raise BadCommand(f"eta must be a unix time in seconds, got {eta!r}") from None
    delta = (when - datetime.now(timezone.utc)).total_seconds()
    if delta < -_ETA_MAX_PAST_SECONDS:
        raise BadCommand(f"eta is {-delta:.0f} s in the past; give a time from now on")
    if delta > _ETA_MAX_FUTURE_SECONDS:
        raise BadCommand(f"eta is {delta:.0f} s in the future (at most 365 days)")
    return when


def at_front_of(priority: Any) -> bool:
    if isinstance(priority, str):
        return _AT_FRONT.get(priority.strip().lower(), False)
    return False


def _iso(when: Any) -> Optional[str]:
    if not isinstance(when, datetime):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.isoformat()


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
        self._purge_lock = threading.Lock()

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
        """task.revoked for a job cancelled before it ran (no worker will)."""
        try:
            name = job.func_name
        except Exception:
            name = None
        self.hooks.emit("task.revoked", job.id, {k: v for k, v in {
            "task_name": name, "queue": job.origin, "worker": self.hooks.name, "terminated": False,
            "signum": None, "expired": False, "reason": reason}.items() if v is not None or k == "signum"})

    # -- cancel ----------------------------------------------------------

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Cancels a job. A waiting one (queued, deferred, scheduled) is
        cancelled and never runs (`cancelled: true`). A running one is
        stopped: its worker kills the work horse (RQ's stop-job command), and
        the answer waits until the job is `stopped` (`stopped: true`), or
        fails saying it is still running (a SimpleWorker runs jobs in its own
        process and cannot stop one). A job that already ended is left as
        it is (`state_before` says how it ended)."""
        task_id = _task_id(command, "cancel_task")
        job = self._fetch(task_id)
        if job is None:
            return {"task_id": task_id, "state_before": "unknown", "cancelled": False, "stopped": False,
                    "detail": "Redis has no such job (never enqueued here, or its TTL expired)"}
        state = status_of(job)
        if state in _ENDED:
            return {"task_id": task_id, "state_before": state, "cancelled": False, "stopped": False,
                    "detail": f"the job had already ended ({state})"}
        if state == "started":
            return self._stop_running(job)
        if state in _WAITING:
            try:
                job.cancel()
            except Exception as exc:
                # It may have started meanwhile.
                now = status_of(job)
                if now == "started":
                    return self._stop_running(job)
                raise CommandFailed(f"cancel_task {task_id}: RQ did not cancel the {state} job "
                                    f"({type(exc).__name__}: {self.scrub(str(exc))}); it is {now}") from None
            self._revoked(job, f"cancelled while {state}")
            return {"task_id": task_id, "state_before": state, "cancelled": True, "stopped": False,
                    "status": status_of(job)}
        raise CommandFailed(f"cancel_task {task_id}: the job is {state!r}, which cancel does not know; "
                            f"nothing was done")

    def _stop_running(self, job: Any) -> Dict[str, Any]:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation

        task_id = job.id
        owner = job.worker_name
        if owner and owner == self.hooks.name and not hasattr(self.worker, "fork_work_horse"):
            raise CommandFailed(f"cancel_task {task_id}: the job is running on worker {owner!r}, a "
                                f"{type(self.worker).__qualname__}, which runs jobs in its own process and "
                                f"cannot stop one; it will run to its end. Run the worker as "
                                f"z4j_agentd.rq.Worker (forking) for cancels that stop running jobs")
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
        if state == "stopped":
            return {"task_id": task_id, "state_before": "running", "cancelled": True, "stopped": True,
                    "status": state, "worker": owner, "waited_ms": waited_ms}
        if state in ("finished", "failed"):
            return {"task_id": task_id, "state_before": "running", "cancelled": False, "stopped": False,
                    "status": state, "worker": owner, "waited_ms": waited_ms,
                    "detail": f"the job ended ({state}) before its worker stopped it"}
        raise CommandFailed(f"cancel_task {task_id}: RQ's stop-job command went to worker {owner!r}, but the job "
                            f"is still {state} after {STOP_WAIT:.0f} s: that worker may be a SimpleWorker (which "
                            f"cannot stop a running job), or not listening to its commands")

    # -- retries ---------------------------------------------------------

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Runs the job again. A failed or stopped job in its queue's failed
        registry, with no overrides and no eta, is requeued as it is (same
        job id, `requeued: true`). Otherwise a new job is enqueued on the job's
        queue with its function and its args and kwargs (or the operator's
        override_args / override_kwargs), at `eta` if given. A running job
        is refused. `priority` critical or high puts it at the front of its
        queue."""
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
        filt = params.get("filter")
        if not isinstance(filt, dict):
            raise BadCommand("bulk_retry needs parameters.filter with task_ids (a list of RQ job ids)")
        ids = filt.get("task_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, str) and t for t in ids):
            raise BadCommand(f"bulk_retry needs parameters.filter.task_ids, a non-empty list of job ids, "
                             f"got {ids!r}")
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
        scored: List[Tuple[float, str, str]] = []
        for name in names:
            registry = FailedJobRegistry(name, connection=self.connection)
            for job_id, score in self.connection.zrange(registry.key, 0, -1, withscores=True):
                job_id = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
                scored.append((float(score), name, job_id))
        scored.sort(key=lambda e: (-e[0], e[2]))
        page = scored[offset:offset + limit]
        entries = [self._dead_letter(name, job_id) for _score, name, job_id in page]
        following = offset + len(page)
        return {"entries": entries, "next_cursor": str(following) if following < len(scored) else None,
                "total": len(scored), "engine": ENGINE}

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
        """Empties a queue's waiting jobs at the depth the daemon confirmed:
        measured again, and when it is not `expected_depth` nothing is
        purged (unless `force`). Running, scheduled, deferred and failed jobs
        stay (they are in RQ's registries, not the queue)."""
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
        with self._purge_lock:
            rq_queue = self._queue(queue)
            try:
                depth = rq_queue.count
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r}: its depth could not be measured "
                                    f"({type(exc).__name__}: {self.scrub(str(exc))}); nothing was purged") from None
            if not force and depth != expected:
                raise CommandFailed(
                    f"purge_queue for queue {queue!r}: it holds {depth} jobs now, the purge was confirmed at "
                    f"{expected}; nothing was purged. Re-issue the purge with the current depth")
            try:
                purged = rq_queue.empty()
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r} failed: {type(exc).__name__}: "
                                    f"{self.scrub(str(exc))}") from None
        purged = int(purged) if isinstance(purged, int) else None
        result = {"queue": queue, "depth_before": depth, "purged": purged, "force": force}
        if isinstance(purged, int) and purged > depth:
            result["note"] = f"{purged - depth} job(s) arrived between the measure and the purge and were purged too"
        return result

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
