"""The brain's commands, as an arq worker process runs them.

The actions z4j-arq advertises (`submit_task`, `cancel_task`), plus
`retry_task` (by reference: arq keeps a finished job's function and
arguments with its result) and `reconcile_task` (the brain's probe of a job
it believes stuck).

Each handler runs on one of the client's command threads and returns the
result map, or raises: `BadCommand` when the parameters cannot work (the
message says what to change), `CommandFailed` when arq or Redis did not do
it. arq's API is asyncio, and its Redis pool belongs to the worker's event
loop: every call runs there (`asyncio.run_coroutine_threadsafe`) with a
deadline, so a command never blocks the loop, and a loop held up by a job
blocking it in sync code makes the command fail saying so instead of
hanging.

Cancel is arq's abort (`Job.abort`): it needs the worker to run with
`allow_abort_jobs = True` (arq's default is False, and then nothing reads
an abort request: the command fails at once saying how to turn it on). arq
cancels the job's asyncio task, so the job stops at its next `await`; a job
blocked in sync code (time.sleep, CPU work) cannot be stopped, and the
answer says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from .._integration import BadCommand, CommandFailed, eta_from_unix, params as _params, target as _target

ENGINE = "arq"

#: The actions served, as the hello declares them.
ACTIONS = ("cancel_task", "reconcile_task", "retry_task", "submit_task")
#: Capability tokens beyond the actions: retry_task retries by reference.
TOKENS = ("retry_by_reference_v1",)
#: Seconds a Redis call on the worker's loop may take before the command fails.
LOOP_TIMEOUT = 10.0
#: Seconds cancel_task waits, at most, for the worker to confirm the abort
#: (it reads abort requests at each poll, every `poll_delay`, 0.5 s by default).
ABORT_WAIT = 10.0
_MAX_EXCEPTION_CHARS = 2000
#: arq's job states, as the brain's reconcile projection names them.
_RECONCILED = {"deferred": "pending", "queued": "pending", "in_progress": "started", "complete": "success",
               "not_found": "unknown"}


def task_id_of(command: Mapping[str, Any], action: str) -> str:
    """parameters.task_id, else the task target's id (`arq:<job id>` or plain)."""
    task_id = _params(command).get("task_id")
    if not isinstance(task_id, str) or not task_id.strip():
        ident = _target(command).get("id") or _target(command).get("task_id")
        task_id = ident[len(ENGINE) + 1:] if isinstance(ident, str) and ident.startswith(f"{ENGINE}:") else ident
    if not isinstance(task_id, str) or not task_id.strip():
        raise BadCommand(f"{action} needs parameters.task_id (the arq job id)")
    return task_id.strip()


def _no_priority(value: Any, action: str) -> None:
    """arq has no job priorities: only none (or the brain's "normal") is taken."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "normal")):
        return
    raise BadCommand(f"{action}: arq has no job priorities (jobs run in the order they are due); send "
                     f"priority null or \"normal\", got {value!r}")


def _deadline(command: Mapping[str, Any], default: float) -> float:
    """The monotonic time the command must answer by: 1 s before the end of
    its budget (`timeout_seconds`, at least 0.5 s from now), else `default`
    seconds from now."""
    budget = command.get("timeout_seconds")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0:
        return time.monotonic() + max(0.5, float(budget) - 1.0)
    return time.monotonic() + default


class ArqCommands:
    """The command handlers of one installation (`_Integration`)."""

    def __init__(self, integration: Any) -> None:
        self.integration = integration

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        return {(ENGINE, action): self._guarded(action, getattr(self, action)) for action in ACTIONS}

    def _guarded(self, action: str, handler: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Any:
        """`handler`, its errors' texts scrubbed (a Redis error quoting a URL
        keeps no password); an exception no handler expected becomes
        CommandFailed naming the action."""
        def run(command: Dict[str, Any]) -> Any:
            try:
                return handler(command)
            except (BadCommand, CommandFailed) as exc:
                raise type(exc)(scrub_text(str(exc))) from None
            except Exception as exc:
                raise CommandFailed(f"{action} failed: {type(exc).__name__}: {scrub_text(str(exc))}") from None

        run.__name__ = run.__qualname__ = action
        run.__doc__ = handler.__doc__
        return run

    # -- the worker's loop -------------------------------------------------

    def on_loop(self, make: Callable[[Any], Any], what: str, timeout: float = LOOP_TIMEOUT,
                deadline: Optional[float] = None) -> Any:
        """Runs the coroutine `make(redis)` on the worker's loop with its pool;
        its result. Raises CommandFailed when the worker has not started, or
        its loop did not finish it within `timeout` (and before `deadline`,
        the command's, a monotonic time)."""
        loop, redis = self.integration.loop, self.integration.redis
        if loop is None or redis is None or loop.is_closed():
            raise CommandFailed(f"{what}: the arq worker of this process is not running (its on_startup has "
                                f"not run, or it stopped)")
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise CommandFailed(f"{what}: the command's time budget ran out before the worker's event loop "
                                    f"could run the next step; a job running sync code may be blocking it")
        future = asyncio.run_coroutine_threadsafe(make(redis), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                raise  # the coroutine's own exception
            future.cancel()
            raise CommandFailed(
                f"{what}: the worker's event loop did not finish it within {timeout:.1f} s: a job running sync "
                f"code (time.sleep, CPU work) blocks the loop and every job with it; the request may still "
                f"run when the loop is free") from None

    def _job(self, redis: Any, job_id: str) -> Any:
        from arq.jobs import Job

        return Job(job_id, redis, _queue_name=self.integration.queue_name,
                   _deserializer=self.integration.settings.deserializer)

    def _status(self, job_id: str, what: str, deadline: Optional[float] = None) -> str:
        async def read(redis: Any) -> str:
            status = await self._job(redis, job_id).status()
            return str(getattr(status, "value", status))

        return self.on_loop(read, what, deadline=deadline)

    def _result(self, job_id: str, what: str, deadline: Optional[float] = None) -> Any:
        return self.on_loop(lambda redis: self._job(redis, job_id).result_info(), what, deadline=deadline)

    def _definition(self, job_id: str, what: str) -> Any:
        """The job's JobResult when it finished, else its JobDef; None when Redis no longer has it."""
        return self.on_loop(lambda redis: self._job(redis, job_id).info(), what)

    def _enqueue(self, name: str, args: List[Any], kwargs: Dict[str, Any], queue: str,
                 defer_until: Optional[datetime], what: str) -> str:
        bad = [k for k in kwargs if not isinstance(k, str) or k.startswith("_")]
        if bad:
            raise BadCommand(f"{what}: kwargs names starting with \"_\" are arq's enqueue options, not the "
                             f"job's arguments: {bad!r}")
        options: Dict[str, Any] = {"_queue_name": queue}
        if defer_until is not None:
            options["_defer_until"] = defer_until

        async def enqueue(redis: Any) -> Any:
            return await redis.enqueue_job(name, *args, **kwargs, **options)

        try:
            job = self.on_loop(enqueue, what)
        except CommandFailed:
            raise
        except Exception as exc:
            raise CommandFailed(f"{what}: arq could not enqueue it ({type(exc).__name__}: {exc})") from None
        if job is None:  # pragma: no cover - a random id never exists already
            raise CommandFailed(f"{what}: arq did not enqueue it (a job with the same id exists)")
        return str(job.job_id)

    def _check_function(self, name: str, queue: str, what: str) -> None:
        """A job for this worker's queue must name a function it registers
        (else arq fails it with "function not found")."""
        if queue != self.integration.queue_name:
            return
        registered = self.integration.settings.registered()
        if registered and name not in registered:
            shown = ", ".join(registered[:20]) + (", ..." if len(registered) > 20 else "")
            raise BadCommand(f"{what}: worker {self.integration.worker_name} has no function {name!r} "
                             f"(it registers {shown}); name one of them")

    # -- actions -----------------------------------------------------------

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues a job by function name: `name`, `args`, `kwargs`,
        `queue` (default this worker's), `eta` (unix seconds: arq's
        `_defer_until`). arq has no priorities."""
        params = _params(command)
        name = params.get("name") or params.get("task_name") or _target(command).get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the function's registered name)")
        name = name.strip()
        args, kwargs = params.get("args"), params.get("kwargs")
        if args is not None and not isinstance(args, list):
            raise BadCommand(f"submit_task {name}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"submit_task {name}: kwargs must be a map, got {type(kwargs).__name__}")
        queue = params.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise BadCommand(f"submit_task {name}: queue must be a queue's name or null, got {queue!r}")
        queue = (queue or "").strip() or self.integration.queue_name
        _no_priority(params.get("priority"), f"submit_task {name}")
        eta = eta_from_unix(params["eta"]) if params.get("eta") is not None else None
        self._check_function(name, queue, f"submit_task {name}")
        job_id = self._enqueue(name, list(args or []), dict(kwargs or {}), queue, eta, f"submit_task {name}")
        return json_safe({"task_id": job_id, "engine": ENGINE, "task_name": name, "queue": queue,
                          "eta": eta.isoformat() if eta else None})

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues the job again by reference: its function and arguments as
        arq keeps them (with the result, `keep_result`, an hour by default;
        or while it waits), or the operator's `override_args` /
        `override_kwargs`; a new job id, the same queue."""
        params = _params(command)
        task_id = task_id_of(command, "retry_task")
        what = f"retry_task {task_id}"
        info = self._definition(task_id, what)
        name = (getattr(info, "function", None) if info is not None else None) or params.get("task_name")
        if not isinstance(name, str) or not name:
            raise BadCommand(f"cannot retry {task_id}: Redis no longer has the job (its result is kept for "
                             f"keep_result, an hour by default) and the brain sent no task_name; submit it "
                             f"again with submit_task")
        args = params.get("override_args")
        kwargs = params.get("override_kwargs")
        if args is None:
            args = list(info.args) if info is not None else None
        if kwargs is None:
            kwargs = dict(info.kwargs) if info is not None else None
        if args is None and kwargs is None:
            raise BadCommand(f"cannot retry {task_id} by reference: Redis no longer has its arguments (a "
                             f"job's result, and its arguments with it, are kept for keep_result); give "
                             f"override_args/override_kwargs")
        if args is not None and not isinstance(args, (list, tuple)):
            raise BadCommand(f"cannot retry {task_id}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"cannot retry {task_id}: kwargs must be a map, got {type(kwargs).__name__}")
        _no_priority(params.get("priority"), what)
        queue = getattr(info, "queue_name", None) if info is not None else None
        queue = queue if isinstance(queue, str) and queue and queue != "<unknown>" else self.integration.queue_name
        eta = eta_from_unix(params["eta"]) if params.get("eta") is not None else None
        self._check_function(name, queue, what)
        new_id = self._enqueue(name, list(args or []), dict(kwargs or {}), queue, eta, what)
        return json_safe({"task_id": task_id, "new_task_id": new_id, "task_name": name, "queue": queue})

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Aborts the job (arq's `Job.abort`): a running job's asyncio task is
        cancelled (it stops at its next `await`), a waiting one fails with
        CancelledError when the worker picks it up. `state_before` says what
        it was doing (running, queued, deferred, finished); `aborted: true`
        means arq stored the job's end as aborted, or (arq keeping no result,
        keep_result = 0) this worker saw the job cancelled while aborting
        it. Every step shares one deadline: the command's budget
        (`timeout_seconds`) less 1 s."""
        task_id = task_id_of(command, "cancel_task")
        what = f"cancel_task {task_id}"
        integration = self.integration
        if not integration.settings.allow_abort_jobs:
            raise CommandFailed(
                f"{what}: worker {integration.worker_name} runs with allow_abort_jobs = False (arq's default), "
                f"so it never reads abort requests and no job of it can be cancelled; set allow_abort_jobs = "
                f"True in its WorkerSettings and restart it")
        deadline = _deadline(command, ABORT_WAIT + 2 * LOOP_TIMEOUT)
        status = self._status(task_id, what, deadline)
        result: Dict[str, Any] = {"task_id": task_id, "worker": integration.worker_name,
                                  "state_before": {"in_progress": "running"}.get(status, status),
                                  "aborted": False}
        if status == "not_found":
            raise CommandFailed(f"{what}: arq has no job {task_id} on queue {integration.queue_name} (never "
                                f"enqueued there, or finished and its result expired); nothing was cancelled")
        if status == "complete":
            return self._finished(task_id, what, result, "it had finished before the cancel", deadline)
        # The abort waits for the job's end until 0.5 s before the deadline, leaving time to answer.
        wait = max(0.1, min(ABORT_WAIT, deadline - time.monotonic() - 0.5))
        poll = 0.2  # one GET of the result each time, on the worker's loop

        async def abort(redis: Any) -> Tuple[Optional[bool], Any]:
            job = self._job(redis, task_id)
            try:
                aborted = await job.abort(timeout=wait, poll_delay=poll)
            except Exception:
                # Not confirmed in time (TimeoutError), or arq re-raising the exception the job
                # ended with (a TimeoutError too when it had just timed out): the stored result says.
                aborted = None
            return aborted, await job.result_info()

        integration.abort_started(task_id)
        try:
            aborted, info = self.on_loop(abort, what, timeout=wait + 2.0, deadline=deadline)
        finally:
            integration.abort_done(task_id)
        if info is not None:
            if info.success or not isinstance(info.result, asyncio.CancelledError):
                raise CommandFailed(f"{what}: the job was not aborted: it ended before the abort reached it, or "
                                    f"ran sync code arq cannot interrupt ({self._outcome(info)})")
        elif aborted or integration.abort_confirmed(task_id):
            pass  # confirmed by arq, or cancelled here while aborting (arq keeps no result: keep_result = 0)
        elif aborted is None:
            blocking = " and blocks the worker's loop" if status == "in_progress" else ""
            raise CommandFailed(
                f"{what}: the abort was requested, but the job did not end within {wait:.1f} s; it may still be "
                f"aborted. arq stops a job at its next await: a job running sync code (time.sleep, CPU "
                f"work){blocking} cannot be stopped, and runs to its end")
        elif not (status != "in_progress" and integration.ended_as_revoked(task_id)):
            raise CommandFailed(
                f"{what}: the abort was requested and the job is no longer queued, but arq keeps no result "
                f"for it (keep_result = 0) and this worker did not see it end: aborted or run by another "
                f"worker, it cannot tell")
        result["aborted"] = True
        if status != "in_progress":
            # arq ends a job aborted before it started without any hook: say it here (nothing when
            # the job was picked up here meanwhile: its after_job_end says how it ended).
            integration.ended_without_hooks("task.revoked", task_id, getattr(info, "function", None),
                                            {"aborted": True, "reason": "aborted before it started"})
        return result

    @staticmethod
    def _outcome(info: Any) -> str:
        if info.success:
            return "it ended in success"
        exc = info.result
        name = type(exc).__name__ if isinstance(exc, BaseException) else "an error"
        return f"it ended in failure: {name}"

    def _finished(self, task_id: str, what: str, result: Dict[str, Any], why: str,
                  deadline: Optional[float] = None) -> Dict[str, Any]:
        info = self._result(task_id, what, deadline)
        if info is None:
            raise CommandFailed(f"{what}: the job was not aborted ({why}), and arq keeps no result for it "
                                f"(keep_result = 0?)")
        if not info.success and isinstance(info.result, asyncio.CancelledError):
            result["aborted"] = True  # aborted earlier
            result["state_before"] = "finished"
            return result
        raise CommandFailed(f"{what}: the job was not aborted: {why} ({self._outcome(info)})")

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The job's state as arq keeps it in Redis: `engine_state` pending
        (queued or deferred), started (in progress), success, failure (an
        aborted job too), or unknown (Redis has no job by this id)."""
        task_id = task_id_of(command, "reconcile_task")
        what = f"reconcile_task {task_id}"
        status = self._status(task_id, what)
        out: Dict[str, Any] = {"task_id": task_id, "engine_state": _RECONCILED.get(status, "unknown"),
                               "finished_at": None, "exception": None, "source": "redis", "arq_status": status}
        if task_id in self.integration.running:
            out["worker"] = self.integration.worker_name
        if status != "complete":
            if status == "not_found":
                out["detail"] = (f"arq has no job {task_id} on queue {self.integration.queue_name} (never "
                                 f"enqueued there, or its result expired)")
            return out
        info = self._result(task_id, what)
        if info is not None:
            finish = getattr(info, "finish_time", None)
            if isinstance(finish, datetime):
                out["finished_at"] = (finish if finish.tzinfo else finish.replace(tzinfo=timezone.utc)).isoformat()
            if not info.success:
                out["engine_state"] = "failure"
                exc = info.result
                text = ("aborted" if isinstance(exc, asyncio.CancelledError) else
                        f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc))
                out["exception"] = scrub_text(text[:_MAX_EXCEPTION_CHARS + 512])[:_MAX_EXCEPTION_CHARS]
        return out


def capabilities() -> Dict[str, List[str]]:
    """The capability tokens beyond the handlers' actions."""
    return {ENGINE: list(TOKENS)}
