"""Dramatiq: task lifecycle events from a broker middleware, worker.online
and worker.offline events, the brain's commands (`_commands`) and the
Workers page and queue depths (`_health`).

    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    import z4j_agentd.dramatiq

    broker = RedisBroker(url="redis://localhost:6379/0")
    dramatiq.set_broker(broker)
    z4j_agentd.dramatiq.install(broker)

The `dramatiq` command imports that module in each worker process, and a
web app that sends messages imports it too: `install` adds the middleware
in every process that has the broker. Each worker process is a worker of
its own, named `<host>@<pid>` in `data.worker`, its `worker.*` events, its
command hello and its health report.

Hooks and events (engine `dramatiq`, `task_id` the message id, which a
retried message keeps):

| hook | event | `data` |
|---|---|---|
| `after_enqueue` (a producer, or an actor sending) | `task.received` | task_name, queue, args, kwargs, eta, parent_task_id, root_task_id (worker in a worker process) |
| `before_process_message` | `task.started` | task_name, queue, worker, args, kwargs, retry_count |
| `after_process_message`, no exception | `task.succeeded` | task_name, queue, worker, result, runtime_ms |
| `after_process_message`, Retries re-enqueued it | `task.retried` | task_name, queue, worker, exception, reason, retry_count, runtime_ms |
| `after_process_message`, no retry left (or `throws`, or no Retries) | `task.failed` | task_name, queue, worker, exception, exception_message, traceback, runtime_ms, retry_count |
| `after_process_message` with dramatiq-abort's `Abort` | `task.revoked` | task_name, queue, worker, terminated: true, reason |
| `after_skip_message` (a cancel, an age limit) | `task.revoked` | task_name, queue, worker, terminated: false, reason, expired |
| `after_worker_boot` | `worker.online` | worker, hostname, pid, concurrency, pool, queues, sw_ver |
| `before_worker_shutdown` | `worker.offline` | worker, hostname, pid |

`after_enqueue` also runs when Retries puts a failed message back (same
message id, `retries` in its options) and when a worker moves a delayed
message to its queue once due: neither is a new task, and neither sends
`task.received`. A worker process that runs a first attempt it did not
see enqueued sends `task.received` itself just before `task.started` (on
the same connection, so the brain has the arguments before the row
starts), stamped with the message's own timestamp; a retry attempt is not
new, so it sends none.

Parent links: a message enqueued while an actor runs (by the actor itself,
a pipeline's next step, a group's completion callback, an `on_success` /
`on_failure` / `on_retry_exhausted` callback) carries the running message's
id as `parent_task_id`, and the first message of that line as
`root_task_id`. Both travel in the message's options (`z4j_parent`,
`z4j_root`), so the worker that runs the child names them too.

The middleware's place: the events middleware goes first in
`broker.middleware`, because Dramatiq runs the `after_*` hooks last to
first: by the time it reads an outcome, Retries has decided between a
retry and a failure. A second one goes last (again when the worker boots,
for middleware added after `install`): its `before_process_message` sends
`task.started` once every other middleware let the message run (a cancel
or an age limit skips it there). A message dramatiq-abort stops while it
runs is retried or failed by Retries as any other exception (as without
z4j): a retry of a message cancelled from the brain is skipped when it
comes up, since the cancel stays in dramatiq-abort's backend for 7 days
(see `_commands`).
"""

from __future__ import annotations

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

import dramatiq
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from .._redact import MAX_TEXT_CHARS, event_value, exception_message, exception_traceback
from ..client import Client, get_client

log = logging.getLogger("z4j_agentd.dramatiq")

ENGINE = "dramatiq"
#: A traceback or exception message is cut to this many characters.
MAX_TRACEBACK_CHARS = MAX_TEXT_CHARS
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: Messages whose name, queue and arguments a worker process remembers
#: for retry_task (the arguments only up to MAX_REMEMBERED_ARGS_BYTES each
#: and MAX_REMEMBERED_ARGS_TOTAL together, as the Celery integration keeps them).
REMEMBERED_TASKS = 10000
MAX_REMEMBERED_ARGS_BYTES = 4 * 1024
MAX_REMEMBERED_ARGS_TOTAL = 1024 * 1024
#: A process that runs no worker (a producer) remembers only the ids (with
#: name and queue) of the last messages it sent, no arguments: it never
#: serves retry_task, and a worker it starts later sends task.received again
#: at worst.
REMEMBERED_IDS_ONLY = 1000
#: Start times kept for runtime_ms before the oldest are forgotten.
MAX_STARTED = 10000
#: Ids of messages a consumer of this process took from a delay queue
#: (moved to their queue once due): a worker prefetches up to
#: `delay_prefetch` of them (its threads x 1,000 by default), so it keeps
#: at least 65,536.
MAX_DELAYED = 65536
#: Ids of messages this process saw stopped by dramatiq-abort's Abort
#: while running (what cancel_task reports), the newest kept.
MAX_ABORTED = 1000
#: The options a message carries its parent and root in.
PARENT_OPTION = "z4j_parent"
ROOT_OPTION = "z4j_root"



def worker_name(pid: Optional[int] = None) -> str:
    """This process's worker name: `<host>@<pid>` (z4j-dramatiq's own)."""
    return f"{socket.gethostname()}@{pid if pid is not None else os.getpid()}"


def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


def _datetime_ms(ms: Any) -> Optional[datetime]:
    """A unix time in ms as a UTC datetime; None (now) for anything else."""
    if isinstance(ms, (int, float)) and not isinstance(ms, bool):
        try:
            return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _iso_ms(ms: Any) -> Optional[str]:
    if isinstance(ms, (int, float)) and not isinstance(ms, bool):
        try:
            return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat()
        except (OverflowError, OSError, ValueError):
            return None
    return None


_ABORT_UNSET: Any = object()
_abort_cls: Any = _ABORT_UNSET


def _abort_type() -> Optional[type]:
    """dramatiq-abort's Abort, or None without it: looked up once per
    process (a failed import searches sys.path again each time)."""
    global _abort_cls
    if _abort_cls is _ABORT_UNSET:
        try:
            from dramatiq_abort.abort_manager import Abort
        except Exception:
            Abort = None  # type: ignore[assignment,misc]
        _abort_cls = Abort
    return _abort_cls


class Z4JMiddleware(Middleware):
    """The events middleware (see the module). `install` adds it first in
    the broker's list."""

    def __init__(self, hooks: "_Hooks") -> None:
        self.hooks = hooks

    def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        self.hooks.before_enqueue(message)

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        self.hooks.after_enqueue(message, delay)

    def before_delay_message(self, broker: Any, message: Any) -> None:
        self.hooks.before_delay_message(message)

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: Any = None) -> None:
        self.hooks.after_process_message(message, result, exception)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self.hooks.after_skip_message(message)

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        self.hooks.before_worker_boot(worker)

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.hooks.after_worker_boot(worker)

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.hooks.before_worker_shutdown(worker)


class _Starter(Middleware):
    """Last in the list: its `before_process_message` runs once every other
    middleware let the message through (dramatiq-abort's cancel and the age
    limit skip a message there), so `task.started` means it runs."""

    def __init__(self, hooks: "_Hooks") -> None:
        self.hooks = hooks

    def before_process_message(self, broker: Any, message: Any) -> None:
        self.hooks.before_process_message(message)


class _Hooks:
    """What one installation keeps: the broker, the client, the messages
    this process saw, its worker."""

    def __init__(self, broker: Any, client: Optional[Client], serve_commands: bool) -> None:
        self.broker = broker
        #: None means the default client, looked up at each use.
        self.bound_client = client
        self.serve_commands = serve_commands
        self.middleware = Z4JMiddleware(self)
        self.starter = _Starter(self)
        self._local = threading.local()
        self._reset_state()
        #: The dramatiq Worker of this process once it booted; None elsewhere.
        self.worker: Any = None
        self.worker_name: Optional[str] = None
        self.booted_at: Optional[float] = None
        self._online_sent = False
        self._serving = False
        self.health: Any = None
        from . import _commands

        self.commands = _commands.DramatiqCommands(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._started: "OrderedDict[str, float]" = OrderedDict()
        #: message id -> (actor, queue, args and kwargs as JSON or None, why left out)
        self._remembered: "OrderedDict[str, Tuple[str, str, Optional[bytes], str]]" = OrderedDict()
        #: message id -> size of its kept arguments, oldest first (what the
        #: 1 MiB budget drops first, without walking every entry).
        self._remembered_args: "OrderedDict[str, int]" = OrderedDict()
        self._remembered_args_bytes = 0
        #: message id -> (queue as enqueued, its Redis id, its retries) of the
        #: last enqueue this process saw: reconcile reads that one entry.
        self._where: "OrderedDict[str, Tuple[str, str, int]]" = OrderedDict()
        #: message ids this process saw stopped by an Abort while running.
        self._aborted: "OrderedDict[str, None]" = OrderedDict()
        #: message ids a consumer of this process took from a delay queue:
        #: their move to the queue once due is not a new task.
        self._delayed: "OrderedDict[str, None]" = OrderedDict()
        #: message id -> what `active` shows of a running message.
        self.active: Dict[str, Dict[str, Any]] = {}
        #: actor name -> messages processed by this process.
        self.totals: Dict[str, int] = {}

    def _after_fork_in_child(self) -> None:
        self._reset_state()
        self._local = threading.local()
        self.worker = None
        self.worker_name = None
        self._online_sent = False
        self._serving = False

    # -- wiring ---------------------------------------------------------

    def connect(self) -> None:
        middleware = self.broker.middleware
        for ours in (self.middleware, self.starter):
            if ours in middleware:
                middleware.remove(ours)
        # First in the list: its after_* hooks run last (after Retries decided).
        self.broker.add_middleware(self.middleware)
        middleware.remove(self.middleware)
        middleware.insert(0, self.middleware)
        self.broker.add_middleware(self.starter)

    def _starter_last(self) -> None:
        """Middleware added after `install` (dramatiq-abort's, say) would
        run its before hooks after the starter's: put the starter last again.
        A new list, since the broker may be iterating over the current one."""
        middleware = self.broker.middleware
        if middleware and middleware[-1] is not self.starter and self.starter in middleware:
            self.broker.middleware = [m for m in middleware if m is not self.starter] + [self.starter]

    def disconnect(self) -> None:
        for ours in (self.middleware, self.starter):
            try:
                self.broker.middleware.remove(ours)
            except ValueError:
                pass

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

    def current(self) -> Any:
        """The message this thread is processing, or None."""
        return getattr(self._local, "message", None)

    # -- enqueue --------------------------------------------------------

    def before_enqueue(self, message: Any) -> None:
        try:
            options = message.options
            if PARENT_OPTION in options or "retries" in options:
                return
            parent = self.current()
            if parent is None or parent.message_id == message.message_id:
                return
            options[PARENT_OPTION] = parent.message_id
            options[ROOT_OPTION] = parent.options.get(ROOT_OPTION) or parent.message_id
        except Exception:
            log.debug("z4j-agentd: parent not recorded", exc_info=True)

    def before_delay_message(self, message: Any) -> None:
        with self._lock:
            self._delayed[message.message_id] = None
            while len(self._delayed) > MAX_DELAYED:
                self._delayed.popitem(last=False)

    def after_enqueue(self, message: Any, delay: Any) -> None:
        try:
            self._note_where(message)
            with self._lock:
                # A delayed message moved to its queue once due (its id taken off the list either way).
                moved = delay is None and self._delayed.pop(message.message_id, "no") is None
            if moved or "retries" in message.options:
                return  # not a new task (Retries puts a failed message back with its id)
            self._remember(message)
            self.emit("task.received", message.message_id, self._received_data(message))
        except Exception:
            log.debug("z4j-agentd: after_enqueue not recorded", exc_info=True)

    def _received_data(self, message: Any, worker: Optional[str] = None) -> Dict[str, Any]:
        options = message.options
        return _compact({
            "task_name": message.actor_name,
            "queue": q_name(message.queue_name),
            "worker": worker or self.worker_name,
            "args": event_value(list(message.args or ()), MAX_VALUE_BYTES),
            "kwargs": event_value(dict(message.kwargs or {}), MAX_VALUE_BYTES),
            "eta": _iso_ms(options.get("eta")),
            "parent_task_id": options.get(PARENT_OPTION),
            "root_task_id": options.get(ROOT_OPTION),
        })

    # -- processing -----------------------------------------------------

    def before_process_message(self, message: Any) -> None:
        try:
            self._local.message = message
            task_id = message.message_id
            self._note_where(message)
            now = time.monotonic()
            with self._lock:
                self._started[task_id] = now
                while len(self._started) > MAX_STARTED:
                    self._started.popitem(last=False)
                seen = task_id in self._remembered
                self.active[task_id] = {"id": task_id, "name": message.actor_name,
                                        "queue": q_name(message.queue_name), "time_start": time.time(),
                                        "retries": message.options.get("retries", 0)}
            if not seen:
                self._remember(message)
                if "retries" not in message.options:
                    # Same connection as task.started, so it reaches the brain
                    # first; a retry is not new (the first attempt's process sent it).
                    self.emit("task.received", task_id, self._received_data(message, worker_name()),
                              occurred_at=_datetime_ms(message.message_timestamp))
            self.emit("task.started", task_id, _compact({
                "task_name": message.actor_name,
                "queue": q_name(message.queue_name),
                "worker": self.worker_name or worker_name(),
                "args": event_value(list(message.args or ()), MAX_VALUE_BYTES),
                "kwargs": event_value(dict(message.kwargs or {}), MAX_VALUE_BYTES),
                "retry_count": message.options.get("retries", 0),
            }))
        except Exception:
            log.debug("z4j-agentd: before_process_message not recorded", exc_info=True)

    def _finish(self, task_id: str, name: str) -> Optional[int]:
        with self._lock:
            started = self._started.pop(task_id, None)
            self.active.pop(task_id, None)
            self.totals[name] = self.totals.get(name, 0) + 1
        if started is None:
            return None
        return max(0, int(round((time.monotonic() - started) * 1000)))

    def after_process_message(self, message: Any, result: Any, exception: Any) -> None:
        try:
            self._local.message = None
            task_id = message.message_id
            runtime_ms = self._finish(task_id, message.actor_name)
            base = {"task_name": message.actor_name, "queue": q_name(message.queue_name),
                    "worker": self.worker_name or worker_name()}
            retries = message.options.get("retries", 0)
            abort = _abort_type()
            if exception is not None and abort is not None and isinstance(exception, abort):
                with self._lock:
                    self._aborted[task_id] = None
                    while len(self._aborted) > MAX_ABORTED:
                        self._aborted.popitem(last=False)
                self.emit("task.revoked", task_id, {
                    **base, "terminated": True, "reason": "aborted while running (dramatiq-abort)",
                    "retry_scheduled": not message.failed})
            elif exception is None and not message.failed:
                self.emit("task.succeeded", task_id, _compact({
                    **base, "result": event_value(result, MAX_VALUE_BYTES), "runtime_ms": runtime_ms,
                }, keep_none=("result",)))
            elif exception is not None and not message.failed and self._retried(message):
                self.emit("task.retried", task_id, _compact({
                    **base, "exception": type(exception).__name__, "reason": exception_message(exception),
                    "retry_count": retries, "runtime_ms": runtime_ms,
                }))
            else:
                self.emit("task.failed", task_id, _compact({
                    **base,
                    "exception": type(exception).__name__ if exception is not None else "MessageFailed",
                    "exception_message": (exception_message(exception) if exception is not None else
                                          "a middleware failed the message before it ran"),
                    "traceback": (exception_traceback(exception, message.options.get("traceback"))
                                  if exception is not None else None),
                    "runtime_ms": runtime_ms,
                    "retry_count": retries,
                }))
        except Exception:
            log.debug("z4j-agentd: after_process_message not recorded", exc_info=True)

    def _retried(self, message: Any) -> bool:
        """Whether Retries put the message back (it stamps the time it did)."""
        from dramatiq.middleware import Retries

        return (any(isinstance(m, Retries) for m in self.broker.middleware)
                and "requeue_timestamp" in message.options)

    def after_skip_message(self, message: Any) -> None:
        try:
            self._local.message = None
            task_id = message.message_id
            self._finish(task_id, message.actor_name)
            expired = bool(message.failed)
            self.emit("task.revoked", task_id, {
                "task_name": message.actor_name, "queue": q_name(message.queue_name),
                "worker": self.worker_name or worker_name(), "terminated": False,
                "expired": expired,
                "reason": ("skipped: past its age limit" if expired else
                           "skipped: cancelled before it ran (or skipped by a middleware)")})
        except Exception:
            log.debug("z4j-agentd: after_skip_message not recorded", exc_info=True)

    # -- the worker -------------------------------------------------------

    def before_worker_boot(self, worker: Any) -> None:
        self._starter_last()
        # Its threads may run messages before after_worker_boot: name it now.
        self.worker = worker
        self.worker_name = worker_name()
        self.booted_at = time.time()

    def after_worker_boot(self, worker: Any) -> None:
        if self.worker is not worker:
            self.before_worker_boot(worker)
        if not self._online_sent:
            self._online_sent = True
            self.emit("worker.online", "", self._worker_data(with_details=True))
        if self.serve_commands:
            try:
                self.start_serving()
            except Exception:
                log.exception("z4j-agentd: could not start serving Dramatiq commands")

    def before_worker_shutdown(self, worker: Any) -> None:
        if not self._online_sent:
            return
        self.emit("worker.offline", "", self._worker_data(with_details=False))
        try:
            self.client.flush(timeout=1.0)
        except Exception:  # pragma: no cover
            pass

    def consumed_queues(self) -> list:
        consumers = getattr(self.worker, "consumers", None) or {}
        try:
            names = list(consumers)
        except RuntimeError:  # pragma: no cover - changed while read
            names = []
        return sorted({q_name(n) for n in names if isinstance(n, str)})

    def _worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.worker_name or worker_name(), "hostname": socket.gethostname(),
                                "pid": os.getpid()}
        if with_details:
            threads = getattr(self.worker, "worker_threads", None)
            data.update({
                "concurrency": threads if isinstance(threads, int) else None,
                "pool": "dramatiq.Worker(threads)",
                "queues": self.consumed_queues() or None,
                "sw_ver": getattr(dramatiq, "__version__", None),
            })
        return _compact(data)

    def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        from . import _commands, _health

        self.client.serve(self.commands.handlers(), capabilities=_commands.capabilities(self.broker),
                          workers=[self.worker_name] if self.worker_name else ())
        self.health = _health.start(self)

    # -- what a worker process remembers --------------------------------

    def _remember(self, message: Any) -> None:
        task_id = message.message_id
        blob: Optional[bytes] = None
        why = ""
        worker = self.worker is not None
        try:
            if not worker:
                raise _NotKept()
            blob = json.dumps([list(message.args or ()), dict(message.kwargs or {})], ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8")
            if len(blob) > MAX_REMEMBERED_ARGS_BYTES:
                blob, why = None, f"they take {len(blob):,} bytes as JSON (kept: up to {MAX_REMEMBERED_ARGS_BYTES:,})"
        except _NotKept:
            why = "a process that runs no worker keeps no arguments"
        except (TypeError, ValueError, RecursionError):
            blob, why = None, "they are not JSON"
        name = sys.intern(message.actor_name) if isinstance(message.actor_name, str) else message.actor_name
        queue = sys.intern(q_name(message.queue_name))
        with self._lock:
            self._forget_arguments(task_id)
            self._remembered.pop(task_id, None)
            self._remembered[task_id] = (name, queue, blob, why)
            if blob is not None:
                self._remembered_args[task_id] = len(blob)
                self._remembered_args_bytes += len(blob)
            while len(self._remembered) > (REMEMBERED_TASKS if worker else REMEMBERED_IDS_ONLY):
                gone, _ = self._remembered.popitem(last=False)
                self._forget_arguments(gone)
            # Over the budget: the oldest kept arguments go first, one entry each.
            while self._remembered_args_bytes > MAX_REMEMBERED_ARGS_TOTAL and self._remembered_args:
                oldest, size = self._remembered_args.popitem(last=False)
                self._remembered_args_bytes -= size
                kept = self._remembered.get(oldest)
                if kept is not None:  # same key: keeps its place in the order
                    self._remembered[oldest] = (kept[0], kept[1], None, "newer messages' arguments took their place")

    def _forget_arguments(self, task_id: str) -> None:
        """Under _lock: the arguments kept of `task_id` no longer count."""
        size = self._remembered_args.pop(task_id, None)
        if size is not None:
            self._remembered_args_bytes -= size

    def _note_where(self, message: Any) -> None:
        """Where this enqueue put the message on Redis (its queue and Redis
        id, one per enqueue), for reconcile_task."""
        redis_id = message.options.get("redis_message_id")
        if not isinstance(redis_id, str):
            return
        retries = message.options.get("retries", 0)
        entry = (sys.intern(str(message.queue_name)), redis_id, retries if isinstance(retries, int) else 0)
        with self._lock:
            self._where.pop(message.message_id, None)
            self._where[message.message_id] = entry
            while len(self._where) > REMEMBERED_TASKS:
                self._where.popitem(last=False)

    def where(self, task_id: str) -> Optional[Tuple[str, str, int]]:
        """(queue as enqueued, e.g. `q` or `q.DQ`, Redis id, retries) of the
        last enqueue of `task_id` this process saw, or None."""
        with self._lock:
            return self._where.get(task_id)

    def was_aborted(self, task_id: str) -> bool:
        """Whether this process saw `task_id` stopped by an Abort while running."""
        with self._lock:
            return task_id in self._aborted

    def remembered(self, task_id: str) -> Dict[str, Any]:
        """task_name, queue and (when kept) args and kwargs of a message this
        process saw; {} for one it did not."""
        with self._lock:
            kept = self._remembered.get(task_id)
        if kept is None:
            return {}
        name, queue, blob, why = kept
        out: Dict[str, Any] = {"task_name": name, "queue": queue}
        if blob is not None:
            out["args"], out["kwargs"] = json.loads(blob)
        else:
            out["args_left_out"] = why
        return out


class _NotKept(Exception):
    pass


_installed: Optional[_Hooks] = None
_install_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _install_lock
    _install_lock = threading.Lock()
    hooks = _installed
    if hooks is not None:
        hooks._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def install(broker: Any = None, client: Optional[Client] = None, *, serve_commands: bool = True) -> Client:
    """Adds the middleware to `broker` (default: `dramatiq.get_broker()`);
    events go to `client`, else to the process's default client as it is
    at each event (`z4j_agentd.get_client()`), which also declares the
    engine `dramatiq`. With `serve_commands`, each worker process serves
    the brain's commands and reports its health once it booted (producer
    processes never do).

    Calling it again with the same broker and client changes nothing; with
    another broker or client it replaces the previous installation.
    Returns the client."""
    global _installed
    if broker is None:
        broker = dramatiq.get_broker()
    with _install_lock:
        previous = _installed
        if previous is not None and previous.broker is broker and previous.bound_client is client:
            previous.serve_commands = previous.serve_commands or serve_commands
            return previous.client
        if previous is not None:
            previous.disconnect()
        hooks = _Hooks(broker, client, serve_commands)
        hooks.connect()
        _installed = hooks
    return hooks.client


def uninstall() -> None:
    """Removes the middleware of `install` (tests, reloads). A command
    server already started keeps running until its client closes."""
    global _installed
    with _install_lock:
        if _installed is not None:
            _installed.disconnect()
            _installed = None


def installed() -> Optional[_Hooks]:
    """The current installation, or None."""
    return _installed


__all__ = ["ENGINE", "Z4JMiddleware", "install", "installed", "uninstall", "worker_name"]
