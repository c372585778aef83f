"""Huey: task lifecycle events from Huey's signals and execute hooks,
worker.online and worker.offline events, the brain's commands (`_commands`)
and the consumer's health report (`_health`).

    from huey import RedisHuey
    import z4j_agentd.huey

    huey = RedisHuey("proj")
    z4j_agentd.huey.install(huey)

One line, in the module that defines the Huey instance: every process that
imports it (a web app enqueueing tasks, `huey_consumer proj.huey`) reports
what it sees.

Signals and events (engine `huey`, `task_id` the Huey task id, `task_name`
the registry key `module.function` that discovery and periodic tasks use,
`queue` the Huey instance's name, `worker` the consumer's name
`huey@<host>:<pid>` in the consumer, absent in producers):

| signal | event | `data` |
|---|---|---|
| `enqueued` (a new task), `scheduled` (a task with an eta this process had not seen) | `task.received` | task_name, queue, worker, args, kwargs, eta, retries, parent_task_id |
| `executing` | `task.started` | task_name, queue, worker, args, kwargs, retries_left |
| `complete` | `task.succeeded` | task_name, queue, worker, result, runtime_ms |
| `error`, `timeout`, `rate-limited`, `interrupted` (no retry left) | `task.failed` | task_name, queue, worker, exception, exception_message, traceback, runtime_ms, retry_count |
| `retrying` | `task.retried` | task_name, queue, worker, reason, retry_count, retries_left |
| `revoked`, `expired`, `canceled`, `locked` (no retry left) | `task.revoked` | task_name, queue, worker, reason, terminated, expired |
| the consumer is created | `worker.online` | worker, hostname, pid, concurrency, pool, queues, sw_ver |
| the consumer process exits | `worker.offline` | worker, hostname, pid |

A retried task keeps its id: Huey re-enqueues (or schedules) the same task,
so a process sends `task.received` once per task id, and a consumer that
runs a task it did not see enqueued (the producer runs without this
client) sends `task.received` just before `task.started`. `result` comes
from a `post_execute` hook, runtime_ms is measured from `executing` to the
end of the attempt in the process that ran it. A pipeline's next task
(`task.then(...)`) and an `on_error` handler carry the parent's id in
`parent_task_id`, as does a task enqueued from inside another task's code.

The consumer is the process that calls `huey.create_consumer()`
(`huey_consumer` does): `install` wraps that method of the instance, and
the consumer process then names itself, sends `worker.online`, serves the
brain's commands and reports its health. With `-k process` its workers are
forked processes: they send their tasks' events (on their own connection,
under the consumer's worker name) and never serve commands. Producers
never serve commands.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from .._redact import MAX_TEXT_CHARS, event_value, exception_message, exception_traceback
from ..client import Client, get_client
from . import _commands, _health

log = logging.getLogger("z4j_agentd.huey")

ENGINE = "huey"
#: The name of the pre_execute / post_execute / startup hooks this installs.
HOOK_NAME = "z4j_agentd"
#: A traceback is cut to this many characters.
MAX_TRACEBACK_CHARS = MAX_TEXT_CHARS
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: Task ids a process remembers having sent task.received for.
REMEMBERED_IDS = 10000
#: Tasks whose name and arguments the consumer remembers for retry_task (by reference).
REMEMBERED_TASKS = 10000
#: A remembered task keeps its args and kwargs (as JSON text) only up to this many bytes.
MAX_REMEMBERED_ARGS_BYTES = 4 * 1024
#: Task ids whose `retrying` signals a process counts for retry_count.
MAX_RETRY_COUNTS = 10000
#: Set to 1 (or true, yes, on) to let the brain's cancel stop a running task
#: by raising in its thread; see `install(stop_running=...)`.
STOP_RUNNING_ENV = "Z4J_HUEY_STOP_RUNNING"
#: Start times kept for runtime_ms before the oldest are forgotten.
MAX_STARTED = 10000



def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


def task_name_of(huey: Any, task: Any) -> Optional[str]:
    """The registry key (`module.function`) of a task, else its bare name."""
    try:
        return huey._registry.task_to_string(type(task))
    except Exception:
        name = getattr(task, "name", None)
        return str(name) if name else None


def _iso(when: Any) -> Optional[str]:
    if not isinstance(when, datetime):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # Huey's utc=True (the default) keeps naive UTC
    return when.isoformat()


def _huey_traceback(exc: Any) -> Optional[str]:
    return None if exc is None else exception_traceback(exc)


def stop_running_from_env() -> bool:
    """$Z4J_HUEY_STOP_RUNNING: 1, true, yes, on turn stopping on; 0, false,
    no, off or unset leave it off; anything else is an error saying what to set."""
    raw = os.environ.get(STOP_RUNNING_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{STOP_RUNNING_ENV}={raw!r} is not understood: set 1 to let the brain's cancel stop a "
                     f"running task, or 0 (the default) to only revoke it")


#: The task the current thread runs (its `_Running`), for `cancel_requested()`.
_current = threading.local()


def cancel_requested() -> bool:
    """True when the brain cancelled the Huey task this thread is running
    (the cancel reached this consumer while it ran). A task that polls it
    can stop early: `raise huey.exceptions.CancelExecution()`; it then ends
    `canceled` and is not retried. False outside a task, and in a process
    that does not serve commands."""
    running = getattr(_current, "running", None)
    return bool(running is not None and running.cancel_requested)


class Cancelled(Exception):
    """Raised in a running task's thread when the brain cancels it: a
    `huey.exceptions.CancelExecution` with `retry=False` (see `_cancel_class`)."""


def _cancel_class() -> type:
    from huey.exceptions import CancelExecution

    class TaskCancelled(CancelExecution, Cancelled):  # type: ignore[misc]
        """The brain cancelled this running task; Huey does not retry it."""

        def __init__(self, msg: Any = "cancelled by z4j", retry: Any = False) -> None:
            # Huey retries a CancelExecution whose retry is None when the task has
            # retries left: a cancel must end it, so retry is always False.
            CancelExecution.__init__(self, msg, retry=False)

    return TaskCancelled


class _Running:
    """A task executing in this process: its thread, and whether a cancel
    asked it to stop."""

    __slots__ = ("task_id", "name", "thread_id", "started", "cancel_requested", "raised", "in_body", "done",
                 "outcome")

    def __init__(self, task_id: str, name: Optional[str], thread_id: int) -> None:
        self.task_id = task_id
        self.name = name
        self.thread_id = thread_id
        self.started = time.time()
        self.cancel_requested = False
        #: A cancel exception was raised into the task's thread.
        self.raised = False
        self.in_body = False
        self.done = threading.Event()
        #: The exception the attempt ended with (None: it returned), set before `done`;
        #: every cancel command waiting on it reads it.
        self.outcome: Any = None


class _Hooks:
    """The signal receivers and hooks of one installation, and the command handlers."""

    def __init__(self, huey: Any, client: Optional[Client], serve_commands: bool,
                 stop_running: bool = False) -> None:
        self.huey = huey
        self.bound_client = client
        self.serve_commands = serve_commands
        #: The brain's cancel may raise in a running task's thread (opt-in).
        self.stop_running = stop_running
        self._lock = threading.Lock()
        self._local = threading.local()
        self._started: "OrderedDict[str, float]" = OrderedDict()
        self._received: "OrderedDict[str, None]" = OrderedDict()
        #: task id -> (name, [args, kwargs] as JSON text or None): the consumer's memory for retry_task.
        self._remembered: "OrderedDict[str, Tuple[str, Optional[str]]]" = OrderedDict()
        #: task id -> how many `retrying` signals this process sent for it.
        self._retries_seen: "OrderedDict[str, int]" = OrderedDict()
        #: task id -> return value, from post_execute until `complete`.
        self._results: Dict[str, Any] = {}
        self.running: Dict[str, _Running] = {}
        self._cancel_cls = _cancel_class()
        self._forked = False
        self._serving = False
        self._online_sent = False
        self._offline_sent = False
        #: The huey.consumer.Consumer of this process (the consumer, or a forked worker of it).
        self.consumer: Any = None
        #: The consumer's pid, and its name as events give it (`data.worker`).
        self.consumer_pid: Optional[int] = None
        self.worker_name: Optional[str] = None
        self.worker_type: Optional[str] = None
        self.concurrency: Optional[int] = None
        self.started_at = time.time()
        self._startups = 0
        self._orig_create_consumer: Any = None
        self.commands = _commands.HueyCommands(self)
        self.health: Any = None

    # -- wiring ---------------------------------------------------------

    def connect(self) -> None:
        huey = self.huey
        huey.signal()(self.on_signal)
        huey.pre_execute(HOOK_NAME)(self.on_pre_execute)
        huey.post_execute(HOOK_NAME)(self.on_post_execute)
        huey.on_startup(HOOK_NAME)(self.on_startup)
        original = huey.create_consumer  # a bound method (or a previous wrapper)
        self._orig_create_consumer = original
        hooks = self

        def create_consumer(*args: Any, **options: Any) -> Any:
            consumer = original(*args, **options)
            try:
                hooks.on_consumer(consumer)
            except Exception:
                log.exception("z4j-agentd: the Huey consumer was not set up for z4j")
            return consumer

        create_consumer.__doc__ = getattr(original, "__doc__", None)
        create_consumer._z4j_agentd = True  # type: ignore[attr-defined]
        huey.create_consumer = create_consumer

    def disconnect(self) -> None:
        huey = self.huey
        try:
            huey.disconnect_signal(self.on_signal)
            huey.unregister_pre_execute(HOOK_NAME)
            huey.unregister_post_execute(HOOK_NAME)
            huey.unregister_on_startup(HOOK_NAME)
        except Exception:  # pragma: no cover
            pass
        if getattr(huey.__dict__.get("create_consumer"), "_z4j_agentd", False):
            del huey.create_consumer

    def _after_fork_in_child(self) -> None:
        # A forked process worker: its own locks and maps, and it never serves
        # commands (the consumer does). It keeps the consumer's name.
        self._lock = threading.Lock()
        self._local = threading.local()
        self._started = OrderedDict()
        self._received = OrderedDict()
        self._remembered = OrderedDict()
        self._retries_seen = OrderedDict()
        self._results = {}
        self.running = {}
        self._forked = True

    @property
    def client(self) -> Client:
        client = self.bound_client or get_client()
        if ENGINE not in client._engines:
            client._add_engine(ENGINE)
        return client

    def emit(self, kind: str, task_id: Any, data: Dict[str, Any]) -> None:
        try:
            self.client.emit(ENGINE, kind, str(task_id or ""), data)
        except Exception:  # pragma: no cover - emit never raises
            pass

    # -- the consumer ---------------------------------------------------

    def on_consumer(self, consumer: Any) -> None:
        """This process runs the consumer: name it, announce it, serve the
        brain's commands and report health. The consumer-side setup of every
        part of this integration starts here."""
        if self.consumer is not None and self.consumer_pid == os.getpid():
            return
        self.consumer = consumer
        self.consumer_pid = os.getpid()
        self.worker_name = f"huey@{socket.gethostname()}:{self.consumer_pid}"
        self.worker_type = str(getattr(consumer, "worker_type", None) or self._environment_type() or "thread")
        workers = getattr(consumer, "workers", None)
        self.concurrency = workers if isinstance(workers, int) and not isinstance(workers, bool) else None
        self.started_at = time.time()
        self.send_online()
        atexit.register(self.on_consumer_exit)
        if not self.serve_commands:
            return
        start = getattr(consumer, "start", None)
        if self.worker_type == "process" and callable(start):
            # `-k process`: the consumer forks its Scheduler and workers in
            # start(). Threads of ours running then (health reads the queue
            # through Huey's storage, connecting and importing as it goes)
            # could hold a lock (Huey's SQLite storage lock, a module's
            # import lock) at the fork, which the children then wait on for
            # ever: measured, 2 starts in 15 hung every child. So they start
            # once start() has forked; only the pipe that carries the
            # Scheduler process's periodic runs here is made before.
            try:
                from . import periodic

                periodic.relay(self.huey)
            except Exception:
                log.exception("z4j-agentd: Huey's periodic task runs in the Scheduler process are not counted")

            def start_then_serve(*args: Any, **kwargs: Any) -> Any:
                result = start(*args, **kwargs)
                self._serve_consumer()
                return result

            consumer.start = start_then_serve
        else:
            self._serve_consumer()

    def _serve_consumer(self) -> None:
        try:
            self.start_serving()
        except Exception:
            log.exception("z4j-agentd: could not start serving Huey commands")
        try:
            from . import periodic

            # The periodic tasks on the Schedules page (nothing when there are none).
            periodic.serve(self.huey, self.client)
        except Exception:
            log.exception("z4j-agentd: could not serve Huey's periodic tasks")

    def _environment_type(self) -> Optional[str]:
        """The worker type of the consumer built on this instance, from the
        environment its constructor hands Huey (`huey._timeout_handler` is a
        method of it): for a Consumer built directly, which create_consumer
        did not see."""
        env = getattr(getattr(self.huey, "_timeout_handler", None), "__self__", None)
        if env is None:
            return None
        try:
            from huey import consumer as hc

            for kind, cls in (("greenlet", hc.GreenletEnvironment), ("process", hc.ProcessEnvironment),
                              ("thread", hc.ThreadEnvironment)):
                if isinstance(env, cls):
                    return kind
        except Exception:  # pragma: no cover - another Huey layout
            pass
        return None

    def on_startup(self) -> None:
        # Each worker thread (or forked worker process) of a consumer runs this.
        # A consumer built without create_consumer (Consumer(huey) directly) is
        # recognised here.
        with self._lock:
            self._startups += 1
        if self.consumer is None and not self._forked:
            self.on_consumer(None)

    def send_online(self) -> None:
        if self._online_sent or self.worker_name is None:
            return
        self._online_sent = True
        self.emit("worker.online", "", self._worker_data(with_details=True))

    def on_consumer_exit(self) -> None:
        if os.getpid() != self.consumer_pid or self._offline_sent or not self._online_sent:
            return
        self._offline_sent = True
        self.emit("worker.offline", "", self._worker_data(with_details=False))
        try:
            self.client.flush(timeout=1.0)
        except Exception:  # pragma: no cover
            pass

    def _worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.worker_name, "hostname": hostname(),
                                "pid": self.consumer_pid}
        if not with_details:
            return data
        data["concurrency"] = self.concurrency
        data["pool"] = f"huey.consumer({self.worker_type})"
        data["queues"] = [self.queue]
        try:
            import huey

            data["sw_ver"] = getattr(huey, "__version__", None)
        except Exception:  # pragma: no cover
            pass
        return _compact(data)

    @property
    def queue(self) -> str:
        return str(getattr(self.huey, "name", None) or "huey")

    def in_consumer(self) -> bool:
        return self.worker_name is not None

    def start_serving(self) -> None:
        if self._serving or self._forked:
            return
        self._serving = True
        self.client.serve(self.commands.handlers(), capabilities=_commands.capabilities(),
                          workers=[self.worker_name] if self.worker_name else ())
        self.health = _health.start(self)

    # -- signals (never raise into Huey: its Signal.send logs what does) --

    def on_signal(self, signal: str, task: Any, *args: Any, **_: Any) -> None:
        try:
            handler = _SIGNALS.get(signal)
            if handler is not None:
                handler(self, task, *args)
        except Exception:
            log.debug("z4j-agentd: Huey signal %s not recorded", signal, exc_info=True)

    def _base(self, task: Any) -> Dict[str, Any]:
        return {"task_name": task_name_of(self.huey, task), "queue": self.queue, "worker": self.worker_name}

    def _mark_received(self, task_id: str) -> bool:
        """True the first time this process sees the id (then remembers it)."""
        with self._lock:
            if task_id in self._received:
                self._received.move_to_end(task_id)
                return False
            self._received[task_id] = None
            while len(self._received) > REMEMBERED_IDS:
                self._received.popitem(last=False)
            return True

    def _received_data(self, task: Any) -> Dict[str, Any]:
        data = self._base(task)
        data.update({
            "args": event_value(list(getattr(task, "args", None) or ()), MAX_VALUE_BYTES),
            "kwargs": event_value(dict(getattr(task, "kwargs", None) or {}), MAX_VALUE_BYTES),
            "eta": _iso(getattr(task, "eta", None)),
            "retries": getattr(task, "retries", None),
            "parent_task_id": self._parent_of(task),
        })
        return _compact(data)

    def _parent_of(self, task: Any) -> Optional[str]:
        """The task running in this thread that enqueues `task`: from its
        code, as its pipeline's next task, or as its on_error handler."""
        current = getattr(self._local, "task", None)
        if current is None or getattr(current, "id", None) == getattr(task, "id", None):
            return None
        if getattr(self._local, "in_body", False):
            return str(current.id)
        on_complete, on_error = getattr(current, "on_complete", None), getattr(current, "on_error", None)
        if task is on_complete or (on_error is not None and getattr(on_error, "id", None) == task.id):
            return str(current.id)
        return None

    def on_enqueued(self, task: Any, *_: Any) -> None:
        if self._mark_received(str(task.id)):
            self.emit("task.received", task.id, self._received_data(task))

    def on_scheduled(self, task: Any, *_: Any) -> None:
        # A retry's delay also schedules the task: seen before, nothing to send.
        self.on_enqueued(task)

    def on_executing(self, task: Any, *_: Any) -> None:
        task_id = str(task.id)
        with self._lock:
            self._started[task_id] = time.monotonic()
            while len(self._started) > MAX_STARTED:
                self._started.popitem(last=False)
        self._local.task = task
        self._local.in_body = False
        if self._mark_received(task_id):
            # The producer ran without this client: the row gets its arguments
            # from here, on the connection task.started takes.
            self.emit("task.received", task_id, self._received_data(task))
        self._remember(task)
        data = self._base(task)
        data.update({
            "args": event_value(list(task.args or ()), MAX_VALUE_BYTES),
            "kwargs": event_value(dict(task.kwargs or {}), MAX_VALUE_BYTES),
            "retries_left": getattr(task, "retries", None),
        })
        self.emit("task.started", task_id, _compact(data))

    def _runtime_ms(self, task_id: str) -> Optional[int]:
        with self._lock:
            started = self._started.pop(task_id, None)
        if started is None:
            return None
        return max(0, int(round((time.monotonic() - started) * 1000)))

    def on_complete(self, task: Any, *_: Any) -> None:
        task_id = str(task.id)
        with self._lock:
            result = self._results.pop(task_id, None)
        data = self._base(task)
        data.update({"result": event_value(result, MAX_VALUE_BYTES), "runtime_ms": self._runtime_ms(task_id)})
        self.emit("task.succeeded", task_id, _compact(data, keep_none=("result",)))

    def _count_retry(self, task_id: str) -> int:
        """One more `retrying` of the task in this process: how many so far.
        Counted, not derived from `retries`: RetryTask and a rate limit's
        retry leave `retries` as it was, and `enqueue(retries=N)` differs
        from the decorator's."""
        with self._lock:
            count = self._retries_seen.pop(task_id, 0) + 1
            self._retries_seen[task_id] = count
            while len(self._retries_seen) > MAX_RETRY_COUNTS:
                self._retries_seen.popitem(last=False)
        return count

    def _retries_so_far(self, task_id: str) -> int:
        with self._lock:
            return self._retries_seen.pop(task_id, 0)

    def _failed(self, task: Any, exc: Any, *, reason: Optional[str] = None) -> None:
        task_id = str(task.id)
        data = self._base(task)
        data.update({
            "exception": type(exc).__name__ if exc is not None else None,
            "exception_message": exception_message(exc),
            "traceback": _huey_traceback(exc),
            "runtime_ms": self._runtime_ms(task_id),
            "retry_count": self._retries_so_far(task_id),
            "reason": reason,
        })
        self.emit("task.failed", task_id, _compact(data))

    def _note_error(self, task: Any, exc: Any) -> None:
        """An attempt ended with an exception: terminal when no retry is
        left (Huey's own test), else `retrying` follows and says why."""
        if not task.retries:
            self._failed(task, exc)
        else:
            self._local.retry_reason = exc

    def on_error(self, task: Any, exc: Any = None, *_: Any) -> None:
        self._note_error(task, exc)

    def on_timeout(self, task: Any, *_: Any) -> None:
        self._note_error(task, sys.exc_info()[1])

    def on_rate_limited(self, task: Any, *_: Any) -> None:
        self._note_error(task, sys.exc_info()[1])

    def on_interrupted(self, task: Any, *_: Any) -> None:
        task_id = str(task.id)
        data = self._base(task)
        data.update({"exception": "Interrupted",
                     "exception_message": "the consumer shut down while the task ran",
                     "runtime_ms": self._runtime_ms(task_id), "reason": "interrupted"})
        self._forget_run(task_id)
        self.emit("task.failed", task_id, _compact(data))

    def on_retrying(self, task: Any, *_: Any) -> None:
        reason = getattr(self._local, "retry_reason", None)
        self._local.retry_reason = None
        left = max(0, int(task.retries or 0) - 1)  # Huey takes one off after this signal
        data = self._base(task)
        data.update({
            "reason": exception_message(reason) if reason is not None else None,
            "exception": type(reason).__name__ if reason is not None else None,
            "retry_count": self._count_retry(str(task.id)),
            "retries_left": left,
        })
        self._runtime_ms(str(task.id))
        self.emit("task.retried", task.id, _compact(data))

    def _revoked(self, task: Any, reason: str, *, terminated: bool = False, exc: Any = None) -> None:
        task_id = str(task.id)
        data = self._base(task)
        data.update({"reason": reason, "terminated": terminated, "expired": reason == "expired",
                     "exception_message": exception_message(exc) if exc is not None else None,
                     "runtime_ms": self._runtime_ms(task_id) if terminated else None})
        self._forget_run(task_id, exc)
        self._retries_so_far(task_id)
        self.emit("task.revoked", task_id, _compact(data))

    def _forget_run(self, task_id: str, exc: Any = None) -> None:
        # The attempt ended (post_execute may not follow: a pre_execute hook
        # cancelled it, or the consumer interrupted it): no longer running here.
        with self._lock:
            self._started.pop(task_id, None)
            running = self.running.pop(task_id, None)
        if running is not None:
            running.outcome = exc
            running.done.set()

    def on_revoked(self, task: Any, *_: Any) -> None:
        self._revoked(task, "revoked")

    def on_expired(self, task: Any, *_: Any) -> None:
        self._revoked(task, "expired")

    def on_canceled(self, task: Any, *_: Any) -> None:
        exc = sys.exc_info()[1]
        if task.retries:
            self._local.retry_reason = exc  # CancelExecution(retry=True): retrying follows
            return
        # From a pre_execute hook the task never ran; from its body (a brain
        # cancel, or the task's own CancelExecution) it stopped running.
        self._revoked(task, "canceled", terminated=isinstance(exc, Cancelled), exc=exc)

    def on_locked(self, task: Any, *_: Any) -> None:
        exc = sys.exc_info()[1]
        if task.retries:
            self._local.retry_reason = exc
            return
        self._revoked(task, "locked", exc=exc)

    # -- execute hooks --------------------------------------------------

    def on_pre_execute(self, task: Any) -> None:
        task_id = str(task.id)
        running = _Running(task_id, task_name_of(self.huey, task), threading.get_ident())
        with self._lock:
            self.running[task_id] = running
        original = task.execute
        hooks = self

        def execute() -> Any:
            # The task's own code runs here: only here may a cancel raise in
            # this thread (with stop_running, see _commands.cancel_task).
            with hooks._lock:
                running.in_body = True
            hooks._local.in_body = True
            _current.running = running
            try:
                if running.cancel_requested:  # cancelled before its code began: it never runs
                    raise hooks._cancel_cls()
                value = original()
            except Exception as exc:
                raised = leave()
                if (raised or running.cancel_requested) and not isinstance(exc, Cancelled):
                    # Cancelled while running, it ended with another exception
                    # (the task's own CancelExecution after cancel_requested(),
                    # or `raise AppError() from e` around the raised cancel):
                    # it ends cancelled, and Huey does not retry it.
                    raise hooks._cancel_cls() from exc
                raise
            except BaseException:
                leave()
                raise
            if leave():
                # The cancel was raised into the code, which caught it and
                # returned: it still ends cancelled (and is not retried).
                raise hooks._cancel_cls()
            return value

        def leave() -> bool:
            hooks._local.in_body = False
            _current.running = None
            with hooks._lock:
                running.in_body = False
                raised = running.raised
            if raised:
                # One raised after the code returned must not land outside
                # it (Huey would lose the task): take it back.
                _commands.clear_async_exception(running.thread_id)
            return raised

        task.execute = execute

    def on_post_execute(self, task: Any, value: Any, exc: Any) -> None:
        task_id = str(task.id)
        with self._lock:
            running = self.running.pop(task_id, None)
            if exc is None:
                self._results[task_id] = value
            while len(self._results) > MAX_STARTED:  # a `complete` that never came
                self._results.pop(next(iter(self._results)))
        try:
            del task.execute  # the instance's wrapper (the task may be retried in this process)
        except AttributeError:
            pass
        if running is not None:
            running.outcome = exc
            running.done.set()

    # -- memory for retry_task ------------------------------------------

    def _remember(self, task: Any) -> None:
        """Keeps the task's name and its arguments as JSON text (not the live
        objects), when they are JSON and at most MAX_REMEMBERED_ARGS_BYTES."""
        if self._forked or not self.serve_commands or not self.in_consumer():
            return
        text: Optional[str]
        try:
            text = json.dumps([list(task.args or ()), dict(task.kwargs or {})], separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):  # not JSON: retry by reference cannot send them
            text = None
        if text is not None and len(text.encode("utf-8", "surrogatepass")) > MAX_REMEMBERED_ARGS_BYTES:
            text = None
        entry = (task_name_of(self.huey, task) or "", text)
        with self._lock:
            self._remembered[str(task.id)] = entry
            self._remembered.move_to_end(str(task.id))
            while len(self._remembered) > REMEMBERED_TASKS:
                self._remembered.popitem(last=False)

    def remembered(self, task_id: str) -> Optional[Tuple[str, Any, Any]]:
        """(name, args, kwargs) of a task this consumer ran; args and kwargs
        None when they were not kept."""
        with self._lock:
            entry = self._remembered.get(task_id)
        if entry is None:
            return None
        name, text = entry
        if text is None:
            return name, None, None
        args, kwargs = json.loads(text)
        return name, args, kwargs


_SIGNALS = {
    "enqueued": _Hooks.on_enqueued,
    "scheduled": _Hooks.on_scheduled,
    "executing": _Hooks.on_executing,
    "complete": _Hooks.on_complete,
    "error": _Hooks.on_error,
    "timeout": _Hooks.on_timeout,
    "rate-limited": _Hooks.on_rate_limited,
    "interrupted": _Hooks.on_interrupted,
    "retrying": _Hooks.on_retrying,
    "revoked": _Hooks.on_revoked,
    "expired": _Hooks.on_expired,
    "canceled": _Hooks.on_canceled,
    "locked": _Hooks.on_locked,
}

_installed: Dict[int, _Hooks] = {}
_install_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _install_lock
    _install_lock = threading.Lock()
    for hooks in list(_installed.values()):
        hooks._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def hostname() -> str:
    """This host's name, as worker.online, worker.offline and worker.heartbeat give it."""
    return socket.gethostname()


def install(huey: Any, client: Optional[Client] = None, *, serve_commands: bool = True,
            stop_running: Optional[bool] = None) -> Client:
    """Connects `huey`'s signals and execute hooks to `client`, which also
    declares the engine `huey`. Without `client`, events go to the
    process's default client as it is when each event happens
    (`z4j_agentd.get_client()`). With `serve_commands`, the consumer process
    serves the brain's commands and reports its health (see the module
    documentation); producers never do.

    Calling it again with the same instance and client changes nothing;
    with another client it replaces the previous installation of that
    instance. Several Huey instances may each be installed. Returns the
    client.

    `stop_running` (default: $Z4J_HUEY_STOP_RUNNING, else False) decides
    what the brain's cancel does to a task running in this consumer's
    thread workers. Off: the task is revoked and runs to its end, unless
    its code polls `cancel_requested()` and stops itself; once cancelled
    it is not retried. On: a `CancelExecution` is also raised in its
    thread (once per task), which stops plain Python code within
    milliseconds but may land inside whatever the task is calling at that
    moment: a logging handler (whose lock can stay held, freezing every
    thread that logs), a lock's or a database transaction's `__exit__`, a
    client library mid-request, the task's own `finally`. Turn it on only
    for tasks written to be interrupted anywhere.
    """
    if stop_running is None:
        try:
            stop_running = stop_running_from_env()
        except ValueError as exc:  # never raise into the app's import: say what to change, keep it off
            log.error("z4j-agentd: %s; running tasks are not stopped", exc)
            stop_running = False
    with _install_lock:
        previous = _installed.get(id(huey))
        if previous is not None and previous.huey is huey and previous.bound_client is client:
            previous.serve_commands = previous.serve_commands or serve_commands
            previous.stop_running = bool(stop_running)
            return previous.client
        if previous is not None:
            previous.disconnect()
        hooks = _Hooks(huey, client, serve_commands, bool(stop_running))
        hooks.connect()
        _installed[id(huey)] = hooks
    if serve_commands:
        try:
            from . import periodic

            # From import on, so the consumer's first look for due periodic tasks counts.
            periodic.watch(huey)
        except Exception:
            log.exception("z4j-agentd: Huey's periodic task runs are not counted")
    return hooks.client


def uninstall(huey: Any = None) -> None:
    """Disconnects what `install` connected (of `huey`, or of every
    instance). A command server already started keeps running until its
    client closes."""
    with _install_lock:
        for key, hooks in list(_installed.items()):
            if huey is None or hooks.huey is huey:
                hooks.disconnect()
                del _installed[key]


def installed(huey: Any = None) -> Optional[_Hooks]:
    """The installation of `huey` (or the only one), or None."""
    if huey is not None:
        return _installed.get(id(huey))
    return next(iter(_installed.values()), None) if len(_installed) == 1 else None


__all__ = ["ENGINE", "Cancelled", "cancel_requested", "install", "installed", "uninstall", "task_name_of"]
