"""TaskIQ: task lifecycle events from a broker middleware, worker.online and
worker.offline for each worker process, the brain's commands (`_commands`)
and the Workers page and queue depths (`_health`).

    from taskiq_redis import ListQueueBroker
    import z4j_agentd.taskiq

    broker = ListQueueBroker("redis://localhost:6379")
    z4j_agentd.taskiq.install(broker)

`install` adds the middleware as the broker's first one (TaskIQ runs
`on_error` hooks in reverse order, so a retry middleware has re-sent the
task before this one tells a retry from a failure) and registers the
broker's startup and shutdown handlers. Nothing starts at import: `taskiq
worker` forks its worker processes after importing the broker's module, so
each worker process starts its own connection to the daemon when its
broker starts (`WORKER_STARTUP`), names itself `taskiq@<host>:<pid>`,
sends `worker.online` and serves the brain's commands. A process that only
sends tasks (a web app, `taskiq scheduler`) connects at its first event.

Hooks and events (engine `taskiq`, `task_id` TaskIQ's task id, which a
retry keeps):

| hook | process | event | `data` |
|---|---|---|---|
| `post_send` | the one that sent the task | `task.received` | task_name, queue, args, kwargs, parent_task_id |
| `pre_execute` | the worker process | `task.received` (first attempt, unless this process sent it already) and `task.started` | task_name, queue, worker, retry_count, parent_task_id; args, kwargs only when this process sent no task.received for it |
| `post_execute` | the worker process | `task.succeeded` | task_name, queue, worker, result, runtime_ms, retry_count |
| `on_error` | the worker process | `task.failed`, or `task.retried` (dated when the retry middleware sent it again) when a retry middleware re-sent it, or `task.revoked` when the brain cancelled it | task_name, queue, worker, exception, exception_message, traceback, runtime_ms, retry_count (`task.retried`: reason, retry_count of the attempt to come) |
| the task's asyncio task ends, our end hooks not run | the worker process | `task.failed` (what ended it), or `task.revoked` when it was cancelled | task_name, queue, worker, retry_count, runtime_ms, ... |
| `WORKER_STARTUP` | each worker process | `worker.online` | worker, hostname, pid, concurrency, pool, queues, sw_ver |
| `WORKER_SHUTDOWN` | each worker process | `worker.offline` | worker, hostname, pid |

The brain keeps a task's arguments from `task.received` only when it comes
before `task.started`, and puts a row back to `received` for a
`task.received` dated after the row's start. The process sending the task
has its own connection, and a worker may start the task before the
sender's `post_send` runs. So the worker process sends `task.received`
itself before the first `task.started` (once per process), and the
sender's, sent from `post_send`, is dated when `pre_send` saw the task.
The brain keeps one event per task, kind and second: both are kept when
they fall in different seconds. `task.started` goes without the arguments
when this process's own `task.received` (same connection, sent first)
carried them.

A task sent from inside a running task (in the same worker process) gets a
label `z4j_parent_id` with the running task's id, which its events carry as
`parent_task_id`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from taskiq import TaskiqEvents, TaskiqMiddleware
from taskiq.exceptions import NoResultError

from .._redact import MAX_TEXT_CHARS, event_value, exception_message, exception_traceback
from ..client import Client, get_client

log = logging.getLogger("z4j_agentd.taskiq")

ENGINE = "taskiq"
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: A traceback or exception message is cut to this many characters.
MAX_TRACEBACK_CHARS = MAX_TEXT_CHARS
#: The label a task sent from inside a running task carries: the running task's id.
PARENT_LABEL = "z4j_parent_id"
#: Ids of tasks whose `task.received` this process sent (from post_send or
#: pre_execute), so that it sends it once.
REMEMBERED_SENT = 1000
#: Tasks a worker process remembers after running them (name, queue and,
#: when small, args and kwargs) for retry_task.
REMEMBERED_TASKS = 1000
#: A remembered task keeps its args and kwargs only up to this many bytes as
#: JSON: 1,000 tasks then take at most about 4 MB.
MAX_REMEMBERED_ARGS_BYTES = 4 * 1024
#: Running tasks tracked at most (a task cancelled between two hooks may
#: never reach the end hooks; the oldest entries go first).
MAX_RUNNING = 10000


#: The id of the task running in this asyncio task, and its Running entry
#: (set in pre_execute, reset in post_execute). TaskIQ runs each task in an
#: asyncio task of its own, whose hooks (pre_execute, on_error,
#: post_execute, and pre_send for what the task sends) all run there: each
#: attempt finds its own entry, even while another attempt of the same task
#: id (a retry) already runs.
_current_task: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar(
    "z4j_agentd_taskiq_current_task", default=None)
_current_entry: "contextvars.ContextVar[Optional[Running]]" = contextvars.ContextVar(
    "z4j_agentd_taskiq_current_entry", default=None)


def retries_of(labels: Any) -> int:
    """`_retries` as an int: TaskIQ's label is a string when sent and an int
    once the worker parsed it."""
    value = labels.get("_retries") if isinstance(labels, dict) else None
    try:
        number = int(value) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        return 0
    return max(0, number)


def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


def worker_name() -> str:
    """This process's worker name, as events, `hello` and health name it."""
    return f"taskiq@{socket.gethostname()}:{os.getpid()}"


class Running:
    """A task this worker process is running."""

    __slots__ = ("task_id", "name", "queue", "loop", "task", "message", "started", "started_wall",
                 "is_async", "retries", "cancel_requested", "retry_sent", "retry_sent_at", "outcome", "done",
                 "tokens", "on_done", "active_view")

    def __init__(self, task_id: str, name: str, queue: Optional[str], loop: Any, task: Any, message: Any,
                 is_async: Optional[bool], retries: int) -> None:
        self.task_id = task_id
        self.name = name
        self.queue = queue
        self.loop = loop
        self.task = task
        self.message = message
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.is_async = is_async
        self.retries = retries
        self.cancel_requested = False
        #: True once a retry middleware sent this attempt's task again.
        self.retry_sent = False
        #: When the retry middleware sent it again (task.retried's time).
        self.retry_sent_at: Optional[datetime] = None
        self.tokens: Any = None
        #: The done callback pre_execute put on the task's asyncio task.
        self.on_done: Any = None
        #: (args, kwargs) as the health report's `active` shows them,
        #: computed once (by the first report that lists the task).
        self.active_view: Optional[Tuple[Any, Any]] = None
        #: "succeeded", "failed", "retried", "revoked" once the end hooks ran.
        self.outcome: Optional[str] = None
        self.done = threading.Event()


class Z4jMiddleware(TaskiqMiddleware):
    """The middleware `install` adds (first among the broker's)."""

    def __init__(self, client: Optional[Client] = None, serve_commands: bool = True) -> None:
        super().__init__()
        #: The client given to install(); None means the default client,
        #: looked up at each use, so a later z4j_agentd.configure() applies.
        self.bound_client = client
        self.serve_commands = serve_commands
        self._init_state()
        _live.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._running: "OrderedDict[str, Running]" = OrderedDict()
        self._received_sent: "OrderedDict[str, None]" = OrderedDict()
        #: task id -> when pre_send saw it, until post_send.
        self._sending: "OrderedDict[str, datetime]" = OrderedDict()
        self._remembered: "OrderedDict[str, Tuple[str, Optional[str], Optional[bytes]]]" = OrderedDict()
        self._totals: Dict[str, int] = {}
        #: Set in a worker process when its broker starts.
        self.worker: Optional[str] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.concurrency: Optional[int] = None
        self.threads: Optional[int] = None
        self.pid = os.getpid()
        self._serving = False
        self._online_sent = False
        self.commands: Any = None
        self.health: Any = None

    def _after_fork_in_child(self) -> None:
        # taskiq worker forks its worker processes: each is a worker of its
        # own, with nothing of the parent's tasks or locks.
        self._init_state()

    # -- the client ----------------------------------------------------

    @property
    def client(self) -> Client:
        client = self.bound_client or get_client()
        if ENGINE not in client._engines:
            client._add_engine(ENGINE)
        return client

    def emit(self, kind: str, task_id: Any, data: Dict[str, Any], occurred_at: Any = None) -> None:
        try:
            self.client.emit(ENGINE, kind, str(task_id or ""), data, occurred_at)
        except Exception:  # pragma: no cover - emit never raises
            pass

    def queue_of(self, message: Any) -> Optional[str]:
        labels = getattr(message, "labels", None) or {}
        queue = labels.get("queue_name") if isinstance(labels, dict) else None
        if isinstance(queue, str) and queue:
            return queue
        queue = getattr(self.broker, "queue_name", None)
        return queue if isinstance(queue, str) and queue else None

    def _is_async(self, name: str) -> Optional[bool]:
        try:
            task = self.broker.find_task(name)
            func = getattr(task, "original_func", None)
        except Exception:
            return None
        if func is None:
            return None
        import inspect

        return bool(inspect.iscoroutinefunction(func) or asyncio.iscoroutinefunction(func))

    def _received_data(self, message: Any) -> Dict[str, Any]:
        labels = message.labels if isinstance(message.labels, dict) else {}
        parent = labels.get(PARENT_LABEL)
        return _compact({
            "task_name": message.task_name,
            "queue": self.queue_of(message),
            "args": event_value(list(message.args or []), MAX_VALUE_BYTES),
            "kwargs": event_value(dict(message.kwargs or {}), MAX_VALUE_BYTES),
            "parent_task_id": str(parent) if parent else None,
        })

    # -- the sending side ----------------------------------------------

    @staticmethod
    def _own_retry(task_id: str, message: Any) -> Optional[Running]:
        """The running attempt, when `message` is a retry middleware sending
        it again (same id, `_retries` raised, from inside its on_error)."""
        entry = _current_entry.get()
        if entry is not None and entry.task_id == task_id and retries_of(message.labels) > entry.retries:
            return entry
        return None

    def pre_send(self, message: Any) -> Any:
        try:
            task_id = str(message.task_id)
            own = self._own_retry(task_id, message)
            if own is not None:
                own.retry_sent = True  # on_error tells the retry from a failure by this
                # task.retried is dated now: the next attempt may start (and
                # send task.started) in another process before on_error runs.
                own.retry_sent_at = datetime.now(timezone.utc)
                return message
            parent = _current_task.get()
            if parent and parent != task_id and isinstance(message.labels, dict):
                message.labels.setdefault(PARENT_LABEL, parent)
            with self._lock:
                self._sending[task_id] = datetime.now(timezone.utc)
                while len(self._sending) > REMEMBERED_SENT:  # sends that failed: no post_send
                    self._sending.popitem(last=False)
        except Exception:
            log.debug("z4j-agentd: pre_send not recorded", exc_info=True)
        return message

    def post_send(self, message: Any) -> None:
        try:
            task_id = str(message.task_id)
            if self._own_retry(task_id, message) is not None:
                return  # on_error sends task.retried
            with self._lock:
                sent_at = self._sending.pop(task_id, None)
                if not self._first_received(task_id):
                    return  # this process runs it and sent it from pre_execute already
            # Sent only once the broker took it, dated when the send began: a
            # worker may start the task before post_send runs here, and the
            # brain puts a row back to `received` for a received event dated
            # after its started one (it takes the arguments from the worker's
            # own task.received, which goes before its task.started).
            self.emit("task.received", task_id, self._received_data(message), occurred_at=sent_at)
        except Exception:
            log.debug("z4j-agentd: post_send not recorded", exc_info=True)

    # -- the worker side -----------------------------------------------

    def pre_execute(self, message: Any) -> Any:
        try:
            task_id = str(message.task_id)
            retries = retries_of(message.labels)
            try:
                loop = asyncio.get_running_loop()
                task = asyncio.current_task()
            except RuntimeError:
                loop, task = None, None
            entry = Running(task_id, message.task_name, self.queue_of(message), loop, task, message,
                            self._is_async(message.task_name), retries)
            entry.tokens = (_current_task.set(task_id), _current_entry.set(entry))
            with self._lock:
                # This process sent the task's task.received already (from
                # post_send or an earlier attempt's pre_execute), on this
                # same connection: it reached the brain with the arguments.
                sent_before = task_id in self._received_sent
                first = retries == 0 and self._first_received(task_id)
                self._running[task_id] = entry
                self._running.move_to_end(task_id)
                while len(self._running) > MAX_RUNNING:
                    self._running.popitem(last=False)
            if task is not None:
                # Our end hooks run last (this middleware is first): when a
                # hook before them raises (a retry middleware's re-send, an
                # ack), they never run. The asyncio task's end tells then.
                entry.on_done = lambda done, entry=entry: self._task_ended(entry, done)
                task.add_done_callback(entry.on_done)
            received = self._received_data(message)
            if first:
                # Same connection as task.started, so it reaches the brain
                # first (the sender's may come later, on its own connection).
                self.emit("task.received", task_id, received)
            self._remember(task_id, message)
            started = {**received, "worker": self.worker_name(), "retry_count": retries}
            if first or sent_before:
                # The brain takes the arguments from task.received only, and
                # this process's own went first on the same connection: not
                # sent twice (up to 64 KiB each) through the client's queue.
                started.pop("args", None)
                started.pop("kwargs", None)
            self.emit("task.started", task_id, _compact(started))
        except Exception:
            log.debug("z4j-agentd: pre_execute not recorded", exc_info=True)
        return message

    def _first_received(self, task_id: str) -> bool:
        """Under _lock: True the first time this process is to send the
        task's task.received (remembered for the last REMEMBERED_SENT)."""
        if task_id in self._received_sent:
            return False
        self._received_sent[task_id] = None
        while len(self._received_sent) > REMEMBERED_SENT:
            self._received_sent.popitem(last=False)
        return True

    def worker_name(self) -> str:
        if self.worker is None:
            self.worker = worker_name()
        return self.worker

    def _runtime_ms(self, entry: Optional[Running], result: Any = None) -> Optional[int]:
        if entry is not None:
            return max(0, int(round((time.monotonic() - entry.started) * 1000)))
        seconds = getattr(result, "execution_time", None)
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            return int(round(seconds * 1000))
        return None

    @staticmethod
    def _entry(task_id: str) -> Optional[Running]:
        entry = _current_entry.get()
        return entry if entry is not None and entry.task_id == task_id else None

    def on_error(self, message: Any, result: Any, exception: BaseException) -> None:
        try:
            task_id = str(message.task_id)
            entry = self._entry(task_id)
            # A retry middleware raises the message's own `_retries` label
            # as it re-sends it: the attempt's count is the one it started with.
            retries = entry.retries if entry is not None else retries_of(message.labels)
            base = {"task_name": message.task_name, "queue": self.queue_of(message),
                    "worker": self.worker_name()}
            retry_sent = entry is not None and entry.retry_sent
            retried_by_result = (isinstance(getattr(result, "error", None), NoResultError)
                                 and not isinstance(exception, NoResultError))
            if entry is not None and entry.cancel_requested and isinstance(exception, asyncio.CancelledError):
                outcome = "revoked"
                self.emit("task.revoked", task_id, _compact({
                    **base, "terminated": True, "reason": "cancelled through z4j",
                    "retry_count": retries, "runtime_ms": self._runtime_ms(entry, result)}))
            elif retry_sent or retried_by_result:
                outcome = "retried"
                self.emit("task.retried", task_id, _compact({
                    **base,
                    "reason": exception_message(f"{type(exception).__name__}: {exception}"),
                    "exception": type(exception).__name__,
                    "retry_count": retries + 1,
                    "runtime_ms": self._runtime_ms(entry, result)}),
                    occurred_at=entry.retry_sent_at if entry is not None else None)
            elif isinstance(exception, NoResultError):
                outcome = "succeeded"  # the task asked for no result to be kept
                self.emit("task.succeeded", task_id, _compact({
                    **base, "result": None, "runtime_ms": self._runtime_ms(entry, result),
                    "retry_count": retries}, keep_none=("result",)))
            else:
                outcome = "failed"
                self.emit("task.failed", task_id, _compact({
                    **base,
                    "exception": type(exception).__name__,
                    "exception_message": exception_message(exception),
                    "traceback": exception_traceback(exception),
                    "runtime_ms": self._runtime_ms(entry, result),
                    "retry_count": retries}))
            if entry is not None:
                entry.outcome = outcome
        except Exception:
            log.debug("z4j-agentd: on_error not recorded", exc_info=True)

    def post_execute(self, message: Any, result: Any) -> None:
        try:
            task_id = str(message.task_id)
            entry = self._entry(task_id)
            with self._lock:
                if entry is not None and self._running.get(task_id) is entry:
                    del self._running[task_id]  # not a retry of it that started meanwhile
                self._totals[message.task_name] = self._totals.get(message.task_name, 0) + 1
            if not getattr(result, "is_err", False):
                self.emit("task.succeeded", task_id, _compact({
                    "task_name": message.task_name,
                    "queue": self.queue_of(message),
                    "worker": self.worker_name(),
                    "result": event_value(getattr(result, "return_value", None), MAX_VALUE_BYTES),
                    "runtime_ms": self._runtime_ms(entry, result),
                    "retry_count": entry.retries if entry is not None else retries_of(message.labels),
                }, keep_none=("result",)))
                if entry is not None:
                    entry.outcome = "succeeded"
            if entry is not None:
                entry.done.set()
                _reset(entry)
                self._forget_done_callback(entry)
        except Exception:
            log.debug("z4j-agentd: post_execute not recorded", exc_info=True)

    @staticmethod
    def _forget_done_callback(entry: Running) -> None:
        """The end hooks ran: the asyncio task's done callback has nothing
        left to do (and a task run in its sender's own asyncio task,
        InMemoryBroker's `await_inplace`, would gather them)."""
        callback, entry.on_done = entry.on_done, None
        if callback is not None and entry.task is not None:
            try:
                entry.task.remove_done_callback(callback)
            except Exception:  # pragma: no cover
                pass

    def _task_ended(self, entry: Running, task: Any) -> None:
        """The done callback of the asyncio task that ran `entry`: when our
        end hooks did not run (a hook of another middleware or an
        acknowledgement raised first, or the asyncio task was cancelled
        outside the task's function), the entry leaves the running ones and
        the task's end is sent: `task.revoked` when its asyncio task was
        cancelled, else `task.failed`."""
        try:
            entry.on_done = None
            with self._lock:
                if self._running.get(entry.task_id) is entry:
                    del self._running[entry.task_id]
                if not entry.done.is_set():  # post_execute did not count it
                    self._totals[entry.name] = self._totals.get(entry.name, 0) + 1
            if entry.outcome is None:
                message = entry.message
                base = {"task_name": entry.name, "queue": entry.queue, "worker": self.worker_name(),
                        "retry_count": entry.retries, "runtime_ms": self._runtime_ms(entry)}
                if task.cancelled():
                    entry.outcome = "revoked"
                    reason = ("cancelled through z4j" if entry.cancel_requested else
                              "its asyncio task was cancelled before TaskIQ's end hooks ran "
                              "(the worker shutting down?)")
                    self.emit("task.revoked", entry.task_id, _compact({**base, "terminated": True,
                                                                       "reason": reason}))
                else:
                    exc = task.exception()
                    entry.outcome = "failed"
                    note = ("the task ended in TaskIQ's hooks without its end reaching z4j (a middleware's "
                            "hook or the acknowledgement raised)")
                    self.emit("task.failed", entry.task_id, _compact({
                        **base,
                        "exception": type(exc).__name__ if exc is not None else None,
                        "exception_message": exception_message(f"{note}: {exc}" if exc is not None else note),
                        "traceback": exception_traceback(exc) if exc is not None else None,
                    }))
                log.debug("z4j-agentd: task %s (%s) ended without its end hooks",
                          entry.task_id, getattr(message, "task_name", entry.name))
            entry.done.set()
        except Exception:
            log.debug("z4j-agentd: the end of a task was not recorded", exc_info=True)

    # -- what commands and health read -----------------------------------

    def running(self, task_id: str) -> Optional[Running]:
        with self._lock:
            return self._running.get(task_id)

    def running_now(self) -> list:
        with self._lock:
            return [e for e in self._running.values() if e.outcome is None]

    def totals(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def _remember(self, task_id: str, message: Any) -> None:
        """Name, queue and (small) arguments of a task this process runs, for
        retry_task."""
        blob: Optional[bytes] = None
        try:
            value = [list(message.args or []), dict(message.kwargs or {})]
            # Encoded only when a walk that stops past the limit finds it
            # small: a 10 MB argument costs a few steps, not its encoding.
            if json_size_at_most(value, MAX_REMEMBERED_ARGS_BYTES) is not None:
                encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                blob = encoded if len(encoded) <= MAX_REMEMBERED_ARGS_BYTES else None
        except (TypeError, ValueError, RecursionError, UnicodeEncodeError):
            blob = None
        name = sys.intern(message.task_name) if type(message.task_name) is str else message.task_name
        with self._lock:
            self._remembered[task_id] = (name, self.queue_of(message), blob)
            self._remembered.move_to_end(task_id)
            while len(self._remembered) > REMEMBERED_TASKS:
                self._remembered.popitem(last=False)

    def remembered(self, task_id: str) -> Dict[str, Any]:
        """What this process remembers of a task it ran: task_name, queue,
        and args and kwargs when they were small; {} otherwise."""
        with self._lock:
            kept = self._remembered.get(task_id)
        if kept is None:
            return {}
        name, queue, blob = kept
        out: Dict[str, Any] = {"task_name": name, "queue": queue}
        if blob is not None:
            out["args"], out["kwargs"] = json.loads(blob)
        else:
            out["args_left_out"] = (f"they were not JSON or took more than {MAX_REMEMBERED_ARGS_BYTES:,} "
                                    f"bytes, and a worker keeps only smaller ones in memory")
        return out

    # -- the broker's startup and shutdown --------------------------------

    def on_worker_startup(self, state: Any = None) -> None:
        """WORKER_STARTUP: in each worker process, on its loop."""
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.worker = worker_name()
        self.pid = os.getpid()
        # Nothing here may raise into TaskIQ: a WORKER_STARTUP handler that
        # raises kills the worker process, which TaskIQ restarts for ever.
        try:
            self.concurrency, self.threads = _receiver_limits(self.broker)
        except Exception:
            log.warning("z4j-agentd: the worker's concurrency could not be read", exc_info=True)
            self.concurrency, self.threads = None, None
        try:
            if self.serve_commands:
                self.start_serving()
        except Exception:
            log.exception("z4j-agentd: could not start serving TaskIQ commands")
        if not self._online_sent:
            self._online_sent = True
            try:
                data = self.worker_data(with_details=True)
            except Exception:
                log.warning("z4j-agentd: the worker's details could not be read", exc_info=True)
                data = {"worker": self.worker, "hostname": socket.gethostname(), "pid": self.pid}
            self.emit("worker.online", "", data)

    def on_worker_shutdown(self, state: Any = None) -> None:
        if not self._online_sent or self.worker is None:
            return
        self._online_sent = False
        self.emit("worker.offline", "", self.worker_data(with_details=False))
        try:
            self.client.flush(timeout=1.0)
        except Exception:  # pragma: no cover
            pass

    def on_client_startup(self, state: Any = None) -> None:
        """CLIENT_STARTUP (a process that sends tasks): the loop commands
        would use; the client itself connects at the first event."""
        if self.loop is None:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                pass

    def worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.worker_name(), "hostname": socket.gethostname(), "pid": os.getpid()}
        if not with_details:
            return data
        data["concurrency"] = self.concurrency
        data["pool"] = "taskiq:" + type(self.broker).__name__
        queue = getattr(self.broker, "queue_name", None)
        data["queues"] = [queue] if isinstance(queue, str) and queue else None
        try:
            import taskiq

            data["sw_ver"] = getattr(taskiq, "__version__", None) or _version("taskiq")
        except Exception:
            pass
        return _compact(data)

    def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        from . import _commands, _health

        self.commands = _commands.TaskiqCommands(self)
        self.client.serve(self.commands.handlers(), capabilities=_commands.capabilities(),
                          workers=[self.worker_name()])
        self.health = _health.start(self)


def json_size_at_most(value: Any, limit: int) -> Optional[int]:
    """A lower bound of `value`'s size as compact JSON in UTF-8 bytes, or
    None once it passes `limit` or meets what JSON cannot hold. The walk
    stops as soon as the bound passes the limit, so its work is bounded by
    `limit` whatever the value's size (each item counts at least a byte)."""
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) > limit:  # a character is at least a byte
                return None
            size += len(item.encode("utf-8", "surrogatepass")) + 2
        elif item is None or isinstance(item, bool):
            size += 4
        elif isinstance(item, (int, float)):
            if isinstance(item, int) and item.bit_length() > 4 * limit:  # more digits than the limit
                return None
            size += len(repr(item))
        elif isinstance(item, (list, tuple)):
            size += 1 + max(1, len(item))  # brackets and commas
            if size > limit:
                return None
            stack.extend(item)
        elif isinstance(item, dict):
            size += 1 + max(1, len(item)) + len(item)  # braces, commas and colons
            if size > limit:
                return None
            for key, sub in item.items():
                stack.append(key if isinstance(key, str) else str(key))
                stack.append(sub)
        else:
            return None  # not JSON: json.dumps would refuse it
        if size > limit:
            return None
    return size


def _reset(entry: Running) -> None:
    """Leaves the task's context as pre_execute found it (it matters where
    the task ran in the sender's own asyncio task: InMemoryBroker's
    `await_inplace`)."""
    tokens, entry.tokens = entry.tokens, None
    for var, token in zip((_current_entry, _current_task), reversed(tokens or ())):
        try:
            var.reset(token)
        except (ValueError, RuntimeError):  # another context: nothing of ours to undo there
            pass


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _receiver_limits(broker: Any) -> Tuple[Optional[int], Optional[int]]:
    """(max async tasks, thread pool size) of the receiver running this
    broker, when it can be found: the broker's own (InMemoryBroker), else
    the one whose `listen` started the broker (taskiq worker), read from the
    stack at WORKER_STARTUP, before any task took a slot."""
    receiver = getattr(broker, "receiver", None)
    if receiver is None:
        frame = sys._getframe(1)
        while frame is not None and receiver is None:
            candidate = frame.f_locals.get("self")
            if type(candidate).__name__.endswith("Receiver") and getattr(candidate, "broker", None) is broker:
                receiver = candidate
            frame = frame.f_back
    if receiver is None:
        return None, None
    sem = getattr(receiver, "sem", None)
    limit = getattr(sem, "_value", None) if sem is not None else None
    threads = getattr(getattr(receiver, "executor", None), "_max_workers", None)
    ok = lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None  # noqa: E731
    return ok(limit), ok(threads)


_live: "weakref.WeakSet[Z4jMiddleware]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for middleware in list(_live):
        try:
            middleware._after_fork_in_child()
        except Exception:  # pragma: no cover - never break the child
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def installed(broker: Any) -> Optional[Z4jMiddleware]:
    """The middleware `install` added to `broker`, or None."""
    for middleware in getattr(broker, "middlewares", ()):
        if isinstance(middleware, Z4jMiddleware):
            return middleware
    return None


def install(broker: Any, client: Optional[Client] = None, *, serve_commands: bool = True) -> Client:
    """Adds the z4j middleware to `broker` as its first middleware, and the
    broker's startup and shutdown handlers (see the module documentation).
    Events go to `client`, which also declares the engine `taskiq`; without
    it, to the process's default client as it is when each event happens
    (`z4j_agentd.get_client()`). With `serve_commands`, each worker process
    serves the brain's commands and reports its health.

    Calling it again on the same broker keeps the one middleware (with the
    new client and `serve_commands`). Returns the client.
    """
    if not hasattr(broker, "middlewares") or not hasattr(broker, "add_event_handler"):
        raise TypeError(f"z4j_agentd.taskiq.install needs a TaskIQ broker (an AsyncBroker), "
                        f"got {type(broker).__name__}")
    middleware = installed(broker)
    if middleware is not None:
        middleware.bound_client = client
        middleware.serve_commands = serve_commands
    else:
        middleware = Z4jMiddleware(client, serve_commands)
        broker.add_middlewares(middleware)
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, middleware.on_worker_startup)
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, middleware.on_worker_shutdown)
        broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, middleware.on_client_startup)
    # First: on_error runs last, after a retry middleware decided.
    broker.middlewares.remove(middleware)
    broker.middlewares.insert(0, middleware)
    return middleware.client


__all__ = ["ENGINE", "PARENT_LABEL", "Z4jMiddleware", "install", "installed", "worker_name"]
