"""The brain's commands, as each TaskIQ worker process runs them.

Served (and declared in the `hello`) by every worker process, on the
client's command threads; what needs the broker (sending a task, reading
the result backend) runs on the worker's own event loop
(`asyncio.run_coroutine_threadsafe`), with a deadline.

| action | what it does |
|---|---|
| `submit_task` | sends the task the brain names (`name`, `args`, `kwargs`) with `.kiq()`; `queue` only when it is the broker's own queue (or null/"default"); `eta` and `priority` are refused, saying why; a send not confirmed within the deadline is left to finish and answered "may have been sent" |
| `retry_task` | sends the task again under a new id: its name (from the brain, or what this process remembers of it), the operator's `override_args`/`override_kwargs`, else the arguments this process remembers |
| `reconcile_task` | the task's state: `started` when this process runs it, else from the result backend (`success`/`failure`), else `unknown` |
| `cancel_task` | cancels a task this process runs while its own function runs (an async task: its asyncio task is cancelled, so it stops at its next `await`; a retry middleware does not run it again); a sync task (in the thread pool) cannot be stopped, one whose function returned (end hooks, result, ack under way) is left to finish, and a task another process runs or that waits in the queue is not here: each answers `failed` saying so |

What z4j-taskiq 1.13.0 refuses (bulk_retry, purge_queue,
requeue_dead_letter, list_dead_letters, rate_limit, restart_worker) is not
declared, so the daemon answers the brain at once that no process runs it.
Handlers raise `BadCommand` (parameters that cannot work; the message says
what to change) or `CommandFailed` (TaskIQ or the broker did not do it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from .._integration import (BadCommand, CommandFailed, first as _first, params as _params, target as _target,
                            task_id as _command_task_id)

ENGINE = "taskiq"

#: The actions served, as the hello declares them.
ACTIONS = ("cancel_task", "reconcile_task", "retry_task", "submit_task")
#: Capability tokens beyond the actions: retry_task re-sends a task by its
#: name with the operator's overrides or arguments this process kept, never
#: the brain's stored (redacted) ones.
TOKENS = ("retry_by_reference_v1",)
#: Seconds a broker or result-backend round trip may take on the worker loop.
LOOP_TIMEOUT = 10.0
#: Seconds cancel_task waits for the cancelled task to end.
CANCEL_WAIT = 10.0
#: Seconds cancel_task keeps looking for a task that is not inside its own
#: function (starting: other middlewares' pre_execute, its dependencies;
#: finishing: its end hooks, acknowledgement, result) before saying so.
CANCEL_SETTLE = 2.0
#: Coroutines followed down a suspended asyncio task's await chain at most.
_MAX_AWAIT_DEPTH = 500
_MAX_EXCEPTION_CHARS = 2000
# Priority labels that ask for nothing (TaskIQ has no portable priority).
_NO_PRIORITY = (None, "", "normal")


def _task_id(command: Mapping[str, Any], action: str) -> str:
    return _command_task_id(command, ENGINE, action, "the TaskIQ task id")


def capabilities() -> Dict[str, List[str]]:
    return {ENGINE: list(TOKENS)}


class TaskiqCommands:
    """The command handlers of one worker process's middleware."""

    def __init__(self, middleware: Any) -> None:
        self.mw = middleware

    @property
    def broker(self) -> Any:
        return self.mw.broker

    def handlers(self) -> Dict[Tuple[str, str], Callable[[Dict[str, Any]], Any]]:
        return {(ENGINE, action): self._masked(action, getattr(self, action)) for action in ACTIONS}

    def _masked(self, action: str, handler: Callable[[Dict[str, Any]], Any]) -> Callable[[Dict[str, Any]], Any]:
        """`handler`, its error texts scrubbed of secrets (a broker error may
        quote its URL); BadCommand and CommandFailed keep their type."""
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

    def _where(self) -> str:
        return f"worker {self.mw.worker_name()} (pid {os.getpid()})"

    def on_loop(self, make: Callable[[], Any], what: str, timeout: Optional[float] = None,
                sends: bool = False) -> Any:
        """Runs the coroutine `make()` on the worker's event loop and returns
        its value; CommandFailed when it fails or takes longer than `timeout`
        (LOOP_TIMEOUT). A read is cancelled at its deadline; a send
        (`sends`) is not, as the broker may have it already: the answer says
        it may have been sent."""
        timeout = LOOP_TIMEOUT if timeout is None else timeout
        loop = self.mw.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            raise CommandFailed(f"{what}: the broker's event loop of {self._where()} is not running "
                                f"(the broker has not started or has shut down)")

        async def call() -> Any:
            return await make()

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(timeout)
        except Exception as exc:
            # concurrent.futures' TimeoutError (the builtin one from Python 3.11)
            if isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError":
                if sends:
                    raise CommandFailed(
                        f"{what}: the broker did not confirm within {timeout:.0f} s on {self._where()}; the task "
                        f"may have been sent (the send was left to finish, not cancelled): look for it in the "
                        f"brain's task list before sending it again") from None
                future.cancel()
                raise CommandFailed(f"{what}: no answer within {timeout:.0f} s on {self._where()}") from None
            raise CommandFailed(f"{what}: {type(exc).__name__}: {exc}") from None

    # -- sending --------------------------------------------------------

    def _send(self, name: str, args: Any, kwargs: Any, what: str) -> str:
        task = self.broker.find_task(name)
        if task is None:
            known = sorted(self.broker.get_all_tasks())[:20]
            raise BadCommand(f"{what}: {name!r} is not a task this worker knows; its tasks are "
                             f"{', '.join(known) or 'none'}")
        if args is not None and not isinstance(args, (list, tuple)):
            raise BadCommand(f"{what}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"{what}: kwargs must be a map, got {type(kwargs).__name__}")
        sent = self.on_loop(lambda: task.kiq(*(args or []), **(kwargs or {})), f"{what}: sending {name}",
                            sends=True)
        return str(sent.task_id)

    def _check_options(self, params: Mapping[str, Any], what: str) -> Optional[str]:
        """The queue to report; refuses what TaskIQ cannot honour portably."""
        own = getattr(self.broker, "queue_name", None)
        queue = params.get("queue")
        if queue not in (None, "", "default") and queue != own:
            raise BadCommand(f"{what}: queue {queue!r} cannot be chosen: a TaskIQ broker sends to its own "
                             f"queue ({own!r}); leave queue empty")
        if params.get("eta") is not None or params.get("eta_seconds") is not None:
            raise BadCommand(f"{what}: TaskIQ sends a task at a later time only through a schedule source; "
                             f"leave eta empty to send it now")
        priority = params.get("priority")
        if not (priority in _NO_PRIORITY or (isinstance(priority, str) and priority.strip().lower() == "normal")):
            raise BadCommand(f"{what}: TaskIQ has no portable task priority; leave priority empty or normal, "
                             f"got {priority!r}")
        return own if isinstance(own, str) else None

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Sends a task by name (the brain's "run now" of a schedule it owns)."""
        params = _params(command)
        name = _first(params.get("name"), params.get("task_name"), _target(command).get("name"))
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the task's registered name)")
        name = name.strip()
        queue = self._check_options(params, f"submit_task {name}")
        new_id = self._send(name, params.get("args"), params.get("kwargs"), f"submit_task {name}")
        return json_safe({"task_id": new_id, "engine": ENGINE, "task_name": name, "queue": queue,
                          "worker": self.mw.worker_name()})

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Sends the task again under a new id: with the operator's overrides,
        else with the arguments this process kept when it ran it."""
        params = _params(command)
        task_id = _task_id(command, "retry_task")
        kept = self.mw.remembered(task_id)
        name = params.get("task_name") or kept.get("task_name")
        if not isinstance(name, str) or not name:
            raise BadCommand(f"cannot retry {task_id}: its task name is unknown here (the brain sent none "
                             f"and {self._where()} did not run it)")
        has_overrides = params.get("override_args") is not None or params.get("override_kwargs") is not None
        if has_overrides:
            args, kwargs = params.get("override_args") or [], params.get("override_kwargs") or {}
        elif "args" in kept:
            args, kwargs = kept["args"], kept["kwargs"]
        elif params.get("original_had_args") is False:
            args, kwargs = [], {}
        else:
            why = (f"{self._where()} ran it but did not keep them: {kept['args_left_out']}" if kept
                   else f"{self._where()} did not run it, and TaskIQ's result backend keeps no arguments")
            raise BadCommand(f"cannot retry {task_id}: its original arguments are not known here ({why}); "
                             f"retry with override_args and override_kwargs")
        queue = self._check_options(params, f"retry_task {task_id}")
        new_id = self._send(name, args, kwargs, f"retry_task {task_id}")
        return json_safe({"task_id": task_id, "new_task_id": new_id, "task_name": name, "queue": queue,
                          "arguments": "overrides" if has_overrides else "original"})

    # -- state ----------------------------------------------------------

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The task's state as this process (running it) or the result
        backend knows it; `unknown` when neither does."""
        task_id = _task_id(command, "reconcile_task")
        entry = self.mw.running(task_id)
        if entry is not None and entry.outcome is None:
            return {"task_id": task_id, "engine_state": "started", "finished_at": None, "exception": None,
                    "source": "worker", "worker": self.mw.worker_name()}
        backend = getattr(self.broker, "result_backend", None)
        if backend is None or type(backend).__name__ == "DummyResultBackend":
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "source": None, "detail": f"{self._where()} does not run the task and the broker has no "
                                              f"result backend"}
        ready = self.on_loop(lambda: backend.is_result_ready(task_id), f"reconcile_task {task_id}")
        if not ready:
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "source": "result_backend",
                    "detail": f"{self._where()} does not run the task and the result backend has no result for "
                              f"it (it may wait in the queue, run in another worker process, or be unknown)"}
        result = self.on_loop(lambda: backend.get_result(task_id), f"reconcile_task {task_id}")
        is_err = bool(getattr(result, "is_err", False))
        exception = None
        if is_err:
            err = getattr(result, "error", None)
            exception = (f"{type(err).__name__}: {err}" if isinstance(err, BaseException)
                         else str(err) if err is not None else "failed")
            exception = scrub_text(exception[:_MAX_EXCEPTION_CHARS])
        return {"task_id": task_id, "engine_state": "failure" if is_err else "success", "finished_at": None,
                "exception": exception, "source": "result_backend"}

    # -- cancel ---------------------------------------------------------

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Cancels a task this process runs (async tasks only)."""
        task_id = _task_id(command, "cancel_task")
        entry = self.mw.running(task_id)
        if entry is None or entry.outcome is not None:
            raise CommandFailed(
                f"task {task_id} is not running in {self._where()}: TaskIQ cancels only a running task, in "
                f"the worker process that runs it; a task still waiting in the queue cannot be taken out, and "
                f"one another worker process runs (taskiq worker --workers N) is cancelled only there")
        if entry.is_async is False:
            raise CommandFailed(
                f"task {task_id} ({entry.name}) is a synchronous function running in {self._where()}'s thread "
                f"pool, and Python cannot stop a thread: it runs to its end. Only async tasks can be cancelled")
        loop, task = entry.loop, entry.task
        if loop is None or task is None or loop.is_closed():
            raise CommandFailed(f"task {task_id} runs in {self._where()} outside an event loop this process can "
                                f"reach; it cannot be cancelled")

        codes = _function_codes(getattr(self.broker.find_task(entry.name), "original_func", None))

        def cancel(outcome: "concurrent.futures.Future[str]") -> None:
            # On the loop, so the asyncio task is suspended: its await chain
            # says where it is.
            try:
                if entry.outcome is not None or task.done():
                    answer = "ended"
                elif not in_function(task, codes):
                    answer = "outside"
                else:
                    entry.cancel_requested = True
                    labels = getattr(entry.message, "labels", None)
                    if isinstance(labels, dict):
                        labels["retry_on_error"] = False  # a retry middleware must not run it again
                    task.cancel()
                    answer = "cancelled"
            except BaseException as exc:  # pragma: no cover - answer the command thread whatever happens
                outcome.set_exception(exc)
                return
            outcome.set_result(answer)

        settle = time.monotonic() + CANCEL_SETTLE
        while True:
            outcome: "concurrent.futures.Future[str]" = concurrent.futures.Future()
            loop.call_soon_threadsafe(cancel, outcome)
            try:
                answer = outcome.result(LOOP_TIMEOUT)
            except concurrent.futures.TimeoutError:
                raise CommandFailed(f"cancel_task {task_id}: the event loop of {self._where()} did not answer "
                                    f"within {LOOP_TIMEOUT:.0f} s; the task was not cancelled") from None
            if answer != "outside" or time.monotonic() >= settle:
                break
            time.sleep(0.05)  # starting or finishing: look again shortly
        if answer == "outside":
            raise CommandFailed(
                f"task {task_id} ({entry.name}) is finishing or starting in {self._where()}, not inside its own "
                f"function (its function has returned and TaskIQ's end hooks, acknowledgement and result saving "
                f"are under way, or other middlewares' hooks before it still run): not cancelled, as cancelling "
                f"there would lose its result or its acknowledgement")
        if answer == "cancelled" and not entry.done.wait(CANCEL_WAIT):
            raise CommandFailed(f"task {task_id} ({entry.name}) was asked to stop in {self._where()} but did not "
                                f"end within {CANCEL_WAIT:.0f} s (it may be blocked in code that does not await); "
                                f"it stops at its next await")
        if answer == "ended":
            entry.done.wait(CANCEL_WAIT)
        if entry.outcome != "revoked":
            raise CommandFailed(f"task {task_id} ({entry.name}) ended before the cancel reached it: it "
                                f"{entry.outcome or 'finished'}")
        return {"task_id": task_id, "cancelled": True, "state_before": "running", "task_name": entry.name,
                "worker": self.mw.worker_name(), "pid": os.getpid(), "retry_suppressed": True}


def _function_codes(func: Any) -> Tuple[Any, ...]:
    """The code objects of the task's function and of the functions it
    wraps (`functools.wraps`): one of them is on the await chain while the
    task's own code runs."""
    codes = []
    for _ in range(20):
        code = getattr(func, "__code__", None)
        if code is not None:
            codes.append(code)
        func = getattr(func, "__wrapped__", None)
        if func is None:
            break
    return tuple(codes)


def in_function(task: Any, codes: Tuple[Any, ...]) -> bool:
    """True when the suspended asyncio `task` waits inside one of `codes`
    (the task's own function): its coroutine, then what each awaits."""
    if not codes:
        return False
    try:
        coro = task.get_coro()
    except Exception:
        return False
    for _ in range(_MAX_AWAIT_DEPTH):
        if coro is None:
            return False
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and frame.f_code in codes:
            return True
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return False
