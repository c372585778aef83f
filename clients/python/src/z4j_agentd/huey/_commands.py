"""The brain's commands, as the Huey consumer process runs them.

Each handler takes the `command` message the daemon routed here and returns
the result map, or raises `BadCommand` (the parameters cannot work; the
message says what to change) or `CommandFailed` (Huey or its storage did
not do it). Handlers run on the client's command threads.

Actions: `submit_task`, `retry_task` (by reference, with
`retry_by_reference_v1`), `cancel_task` (revokes; a running task is asked
to stop, and stopped only with `install(stop_running=True)`, see
`cancel_task`), `purge_queue` (the instance's one queue, at the depth the
daemon confirmed) and `reconcile_task`.

Messages built from an exception's text go through `scrub_text` (a storage
URL's password, a token in an error).
"""

from __future__ import annotations

import ctypes
import platform
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._integration import (BadCommand, CommandFailed, eta_from_unix, first as _first, params as _params,
                            target as _target, task_id as _command_task_id)
from .._redact import scrub_text

ENGINE = "huey"

ACTIONS = ("cancel_task", "purge_queue", "reconcile_task", "retry_task", "submit_task")
TOKENS = ("retry_by_reference_v1",)

#: Seconds cancel_task waits for a running task to stop once asked (stop_running on).
CANCEL_WAIT = 10.0
#: Seconds cancel_task waits for a running task that may poll cancel_requested() (stop_running off).
COOPERATIVE_WAIT = 2.0
#: A forced purge on Redis measures and deletes again this many times while the queue keeps moving.
FORCED_PURGE_ATTEMPTS = 5
_MAX_EXCEPTION_CHARS = 2000
_PRIORITY_LABELS = {"critical": 100, "high": 50, "normal": None, "low": 0}


_CPYTHON = platform.python_implementation() == "CPython"


def raise_async(thread_id: int, exc_type: type) -> bool:
    """Makes `exc_type` raise in thread `thread_id` at its next bytecode
    (CPython only). True when exactly that thread was found."""
    if not _CPYTHON:
        return False
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if done > 1:  # pragma: no cover - cannot happen for one thread id; undo as CPython's docs say
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return done == 1


def clear_async_exception(thread_id: int) -> None:
    """Takes back an exception `raise_async` set and the thread has not raised yet."""
    if _CPYTHON:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


# ---------------------------------------------------------------- parameters


def _error(exc: BaseException) -> str:
    """`Type: message` of an exception, scrubbed of secrets and cut."""
    return scrub_text(f"{type(exc).__name__}: {exc}"[:_MAX_EXCEPTION_CHARS])


def _task_id(command: Mapping[str, Any], action: str) -> str:
    return _command_task_id(command, ENGINE, action, "the Huey task id")


def _priority(value: Any) -> Optional[int]:
    """An int as is (Huey runs higher first); a label critical, high, normal,
    low as 100, 50, none, 0; anything else none."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return _PRIORITY_LABELS.get(value.strip().lower())
    return None


def resolve_task(huey: Any, name: str) -> Tuple[str, type]:
    """The registered task class for `name`: the registry key
    (`module.function`), or a bare function name registered once."""
    from huey.api import Task

    entries = getattr(getattr(huey, "_registry", None), "_registry", None) or {}
    key = name if name in entries else None
    if key is None:
        matches = sorted(k for k, cls in entries.items() if getattr(cls, "__name__", None) == name)
        if len(matches) > 1:
            raise BadCommand(f"task name {name!r} is ambiguous: registered as {', '.join(matches)}; "
                             f"give the full registered name")
        if not matches:
            known = ", ".join(sorted(entries)[:20]) or "none"
            raise BadCommand(f"no Huey task {name!r} is registered in this consumer (registered: {known})")
        key = matches[0]
    cls = entries[key]
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise BadCommand(f"registry entry {key!r} is not a Huey task")
    return key, cls


class HueyCommands:
    """The command handlers of one installation (`_Hooks`)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self._purge_lock = threading.Lock()

    @property
    def huey(self) -> Any:
        return self.hooks.huey

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        return {(ENGINE, action): self._wrapped(action, getattr(self, action)) for action in ACTIONS}

    def _wrapped(self, action: str, handler: Any) -> Any:
        def run(command: Dict[str, Any]) -> Any:
            try:
                return handler(command)
            except (BadCommand, CommandFailed):
                raise
            except Exception as exc:
                raise CommandFailed(f"{action} failed: {_error(exc)}") from None

        run.__name__ = run.__qualname__ = action
        run.__doc__ = handler.__doc__
        return run

    # -- enqueue ------------------------------------------------------------

    def _enqueue(self, name: str, args: Any, kwargs: Any, eta: Any, priority: Any, what: str) -> Tuple[str, str]:
        key, cls = resolve_task(self.huey, name)
        if args is not None and not isinstance(args, (list, tuple)):
            raise BadCommand(f"{what}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"{what}: kwargs must be a map, got {type(kwargs).__name__}")
        options: Dict[str, Any] = {"args": tuple(args or ()), "kwargs": dict(kwargs or {})}
        if eta is not None:
            when = eta_from_unix(eta)
            options["eta"] = when.replace(tzinfo=None) if getattr(self.huey, "utc", True) else \
                when.astimezone().replace(tzinfo=None)
        if priority is not None:
            options["priority"] = priority
        task = cls(**options)
        try:
            self.huey.enqueue(task)
        except Exception as exc:
            raise CommandFailed(f"{what}: {key} could not be enqueued ({_error(exc)})") from None
        return key, str(task.id)

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues a task by name: `name` (or `task_name`), `args`,
        `kwargs`, `eta` (unix seconds), `priority`. A Huey instance has one
        queue: a `queue` naming another is refused."""
        params = _params(command)
        name = _first(params.get("name"), params.get("task_name"), _target(command).get("name"))
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the task's registered name, module.function)")
        name = name.strip()
        self._check_queue(params.get("queue"), f"submit_task {name}")
        priority = _priority(params.get("priority"))
        key, new_id = self._enqueue(name, params.get("args"), params.get("kwargs"), params.get("eta"), priority,
                                    f"submit_task {name}")
        return json_safe({"task_id": new_id, "engine": ENGINE, "task_name": key, "queue": self.hooks.queue,
                          "priority": priority})

    def _check_queue(self, queue: Any, what: str) -> None:
        if queue is None or queue == "":
            return
        if not isinstance(queue, str) or queue.strip() != self.hooks.queue:
            raise BadCommand(f"{what}: queue {queue!r} is not this Huey instance's queue ({self.hooks.queue!r}); "
                             f"a Huey instance has one queue: leave queue empty")

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues the task again under a new id: the same name and the
        arguments this consumer saw it run with (or `override_args` /
        `override_kwargs`), with `eta` and `priority` if given."""
        params = _params(command)
        task_id = _task_id(command, "retry_task")
        kept = self.hooks.remembered(task_id)
        name = _first(params.get("task_name"), kept[0] if kept else None)
        if not isinstance(name, str) or not name:
            raise BadCommand(f"cannot retry {task_id}: its task name is unknown here (the brain sent none and this "
                             f"consumer did not run it)")
        args = _first(params.get("override_args"), kept[1] if kept else None)
        kwargs = _first(params.get("override_kwargs"), kept[2] if kept else None)
        if args is None and kwargs is None:
            why = ("this consumer ran it, but its arguments were too large to keep in memory, or not JSON"
                   if kept else "this consumer did not run it (since it started)")
            raise BadCommand(f"cannot retry {task_id} by reference: its original arguments are not known here "
                             f"({why}); retry with override_args/override_kwargs")
        priority = _priority(params.get("priority"))
        key, new_id = self._enqueue(name, args, kwargs, params.get("eta"), priority, f"cannot retry {task_id}")
        return json_safe({"task_id": task_id, "original_task_id": task_id, "new_task_id": new_id,
                          "task_name": key, "queue": self.hooks.queue, "priority": priority})

    # -- cancel ---------------------------------------------------------------

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Revokes the task (Huey then skips it when it comes off the queue
        or its eta comes). When it runs in this consumer's thread workers:

        * by default (`stop_running` off) it is asked to stop:
          `z4j_agentd.huey.cancel_requested()` turns true in its thread, and
          it runs to its end unless its code polls that and stops. However
          it ends, it is not retried (an exception it ends with becomes a
          `CancelExecution(retry=False)`). The command waits up to
          COOPERATIVE_WAIT for it and says whether it stopped;
        * with `stop_running` on, a `CancelExecution(retry=False)` is also
          raised in its thread (once per task), so plain Python code stops
          at once; it ends as `canceled` and is not retried. Still running
          after CANCEL_WAIT is a failed command (its code may block in C, or
          catch the exception: then it is cancelled when its code returns).

        `state_before` is `running` (it ran here), else `not_running_here`
        (queued, scheduled, finished, unknown, or running elsewhere).
        `stopped` says whether the running task ended by the cancel."""
        task_id = _task_id(command, "cancel_task")
        try:
            self.huey.revoke_by_id(task_id)
        except Exception as exc:
            raise CommandFailed(f"cancel_task {task_id}: Huey could not revoke it ({_error(exc)})") from None
        hooks = self.hooks
        with hooks._lock:
            running = hooks.running.get(task_id)
        if running is None:
            return {"task_id": task_id, "revoked": True, "state_before": "not_running_here", "stopped": False,
                    "pending_only": True,
                    "detail": self._elsewhere_detail()}
        if hooks.worker_type not in (None, "thread"):
            return {"task_id": task_id, "revoked": True, "state_before": "running", "stopped": False,
                    "detail": f"it runs in a {hooks.worker_type} worker, which cannot be stopped from outside; it "
                              f"will finish, and its retries are not prevented"}
        stop = bool(hooks.stop_running) and _CPYTHON
        with hooks._lock:
            running.cancel_requested = True
            if stop and running.in_body and not running.raised:  # at most once per task
                running.raised = raise_async(running.thread_id, hooks._cancel_cls)
        started = time.monotonic()
        if not running.done.wait(CANCEL_WAIT if stop else COOPERATIVE_WAIT):
            if stop:
                raise CommandFailed(
                    f"cancel_task {task_id}: the task was asked to stop (CancelExecution in its thread) but still "
                    f"runs after {CANCEL_WAIT:.0f} s: its code may wait in a blocking call or catch Exception. It "
                    f"is cancelled when its code returns, and not retried")
            return {"task_id": task_id, "revoked": True, "state_before": "running", "stopped": False,
                    "cancel_requested": True, "worker": hooks.worker_name,
                    "waited_ms": int(round((time.monotonic() - started) * 1000)),
                    "detail": self._cooperative_detail()}
        waited_ms = int(round((time.monotonic() - started) * 1000))
        exc = running.outcome
        from . import Cancelled

        stopped = isinstance(exc, Cancelled)
        result = {"task_id": task_id, "revoked": True, "state_before": "running", "stopped": stopped,
                  "worker": hooks.worker_name, "waited_ms": waited_ms}
        if not stopped:
            if exc is not None:
                result["detail"] = f"it ended with {type(exc).__name__} instead"
            elif stop:
                result["detail"] = "it finished before the cancel reached it"
            else:
                result["detail"] = ("it ran to its end (it finished first, or its code does not check "
                                    "z4j_agentd.huey.cancel_requested())")
        return result

    def _cooperative_detail(self) -> str:
        if self.hooks.stop_running:  # asked for, but this interpreter cannot raise in a thread
            return (f"revoked and asked to stop; stopping a running thread needs CPython (this is "
                    f"{platform.python_implementation()}), so it runs to its end unless its code checks "
                    f"z4j_agentd.huey.cancel_requested(); it is not retried")
        return ("revoked and asked to stop: it runs to its end unless its code checks "
                "z4j_agentd.huey.cancel_requested() and raises CancelExecution; it is not retried. To stop "
                "running tasks from the brain, install with stop_running=True (or set Z4J_HUEY_STOP_RUNNING=1) "
                "in the consumer")

    def _elsewhere_detail(self) -> str:
        hooks = self.hooks
        if hooks.worker_type == "process":
            return ("revoked: Huey skips it if it has not started; this consumer runs tasks in process workers, "
                    "so if it is running it will finish, and its retries are not prevented")
        return ("revoked: Huey skips it if it has not started (queued or scheduled); it is not running in this "
                "consumer; if it is running in another consumer it will finish, and its retries are not prevented")

    # -- purge ----------------------------------------------------------------

    def purge_queue(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Empties the instance's queue at the depth the daemon confirmed:
        the queue is measured again, and when its depth is not
        `expected_depth` nothing is purged (unless `force`). Scheduled tasks
        (etas, retry delays) and results stay."""
        params = _params(command)
        target = _target(command)
        queue = _first(params.get("queue"), target.get("queue"), target.get("id"))
        if not isinstance(queue, str) or not queue.strip():
            raise BadCommand("purge_queue needs parameters.queue (the queue's name)")
        queue = queue.strip()
        if queue != self.hooks.queue:
            raise BadCommand(f"purge_queue: queue {queue!r} is not this Huey instance's queue "
                             f"({self.hooks.queue!r})")
        force = params.get("force", False)
        if not isinstance(force, bool):
            raise BadCommand(f"purge_queue: parameters.force must be true or false, got {force!r}")
        expected = params.get("expected_depth")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 0):
            raise BadCommand(f"purge_queue: parameters.expected_depth must be a whole number >= 0, got {expected!r}")
        if expected is None and not force:
            raise BadCommand(f"purge_queue for queue {queue!r}: no expected_depth, so the purge is not confirmed; "
                             f"purge from the brain with the queue's observed depth (or force)")
        with self._purge_lock:
            depth, purged = self._purge(queue, None if force else expected)
        result: Dict[str, Any] = {"queue": queue, "depth_before": depth,
                                  "purged": purged if purged is not None else depth, "force": force}
        if purged is None:
            result["note"] = "the storage does not say how many it removed: purged is the depth measured before"
        return result

    def _refuse_depth(self, queue: str, depth: int, expected: int) -> CommandFailed:
        return CommandFailed(f"purge_queue for queue {queue!r}: it holds {depth} tasks now, the purge was "
                             f"confirmed at {expected}; nothing was purged. Re-issue the purge with the "
                             f"current depth")

    def _purge(self, queue: str, expected: Optional[int]) -> Tuple[int, Optional[int]]:
        """Measures the queue and empties it when its depth is `expected`
        (any depth when None): (depth before, how many were removed, when
        the storage can say). On Redis the check and the delete are one
        transaction: a task enqueued in between makes it purge nothing."""
        storage = self.huey.storage
        conn, key = getattr(storage, "conn", None), getattr(storage, "queue_key", None)
        if conn is not None and isinstance(key, str) and hasattr(conn, "pipeline"):
            return self._purge_redis(queue, expected, conn, key)
        try:
            depth = int(self.huey.pending_count())
        except Exception as exc:
            raise CommandFailed(f"purge_queue for queue {queue!r}: its depth could not be measured "
                                f"({_error(exc)}); nothing was purged") from None
        if expected is not None and depth != expected:
            raise self._refuse_depth(queue, depth, expected)
        try:
            storage.flush_queue()
        except Exception as exc:
            raise CommandFailed(f"purge_queue for queue {queue!r} failed: {_error(exc)}") from None
        return depth, None

    def _purge_redis(self, queue: str, expected: Optional[int], conn: Any, key: str) -> Tuple[int, Optional[int]]:
        from redis.exceptions import WatchError

        # A forced purge (no expected depth) tries again when the queue moved; a confirmed one refuses.
        for attempt in range(1 if expected is not None else FORCED_PURGE_ATTEMPTS):
            try:
                with conn.pipeline(transaction=True) as pipe:
                    pipe.watch(key)  # a change to the queue from here on makes EXEC do nothing
                    kind = pipe.type(key)
                    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                    if kind == "list":
                        depth = int(pipe.llen(key))
                    elif kind == "zset":  # PriorityRedisStorage
                        depth = int(pipe.zcard(key))
                    elif kind == "none":
                        depth = 0
                    else:
                        raise CommandFailed(f"purge_queue for queue {queue!r}: its Redis key {key!r} holds a "
                                            f"{kind}, not a Huey queue; nothing was purged")
                    if expected is not None and depth != expected:
                        pipe.unwatch()
                        raise self._refuse_depth(queue, depth, expected)
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
                return depth, depth
            except WatchError:
                continue
            except CommandFailed:
                raise
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r} failed: {_error(exc)}; nothing was "
                                    f"purged") from None
        raise CommandFailed(f"purge_queue for queue {queue!r}: tasks were enqueued or taken while it was purged; "
                            f"nothing was purged. Re-issue the purge with the current depth")

    # -- reconcile ----------------------------------------------------------------

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The task's state: `started` when it runs in this consumer, else
        what Huey's result store holds (success, or failure with its error,
        read without consuming it), else `unknown` (pending, running
        elsewhere, its result consumed or never stored)."""
        task_id = _task_id(command, "reconcile_task")
        hooks = self.hooks
        with hooks._lock:
            here = task_id in hooks.running
        if here:
            return {"task_id": task_id, "engine_state": "started", "finished_at": None, "exception": None,
                    "source": "worker", "worker": hooks.worker_name}
        from huey.api import Error
        from huey.constants import EmptyData

        try:
            raw = self.huey.get_raw(task_id, peek=True)
            value = None if raw is EmptyData else self.huey.serializer.deserialize(raw)
        except Exception as exc:
            raise CommandFailed(f"reconcile_task {task_id}: the result store could not be read "
                                f"({_error(exc)})") from None
        if raw is EmptyData:
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "source": "result_store",
                    "detail": "not running in this consumer and the result store holds nothing for it (pending, "
                              "running elsewhere, its result already read, or none stored)"}
        if isinstance(value, Error):
            meta = getattr(value, "metadata", None) or {}
            error = scrub_text(str(meta.get("error") or "task failed")[:_MAX_EXCEPTION_CHARS])
            return {"task_id": task_id, "engine_state": "failure", "finished_at": None, "exception": error,
                    "source": "result_store"}
        return {"task_id": task_id, "engine_state": "success", "finished_at": None, "exception": None,
                "source": "result_store"}


def capabilities() -> Dict[str, List[str]]:
    """The capability tokens beyond the handlers' actions."""
    return {ENGINE: list(TOKENS)}
