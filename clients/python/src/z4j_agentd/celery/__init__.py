"""Celery: task lifecycle events from Celery's signals, worker.online and
worker.offline events, and the brain's commands (`_commands`).

    from celery import Celery
    import z4j_agentd.celery

    app = Celery("proj")
    z4j_agentd.celery.install(app)

Signals and events (engine `celery`, `task_id` the Celery task id, `worker`
the worker's host name, e.g. `celery@web-1`):

| signal | event | `data` |
|---|---|---|
| `task_received` | `task.received` (not for a retry's redelivery) | task_name, queue, worker, args, kwargs, parent_task_id, root_task_id |
| `task_prerun` | `task.started` | task_name, queue, worker, args, kwargs |
| `task_success` | `task.succeeded` | task_name, queue, worker, result, runtime_ms |
| `task_failure` | `task.failed` | task_name, queue, worker, exception, exception_message, traceback, runtime_ms |
| `task_retry` | `task.retried` | task_name, queue, worker, reason, retry_count |
| `task_revoked` | `task.revoked` | task_name, queue, worker, terminated, signum, expired |
| `worker_ready` | `worker.online` | worker, hostname, pid, concurrency, pool, queues, sw_ver |
| `worker_shutdown` | `worker.offline` | worker, hostname, pid |

`task_postrun` sends nothing: it forgets the start time kept since
`task_prerun` (runtime_ms is measured from `task_prerun` to
`task_success`/`task_failure`, in the process that ran the task).
`task_received` and `task_revoked` run in the worker's main process;
the others in the process that runs the task (a prefork child), whose own
client the fork-safe `Client` gives it. Two processes mean two
connections to the daemon, and the main process's `task.received` can
then reach the brain after the child's `task.started`; the brain ignores
such a late `received` for the task's row (its args and kwargs would be
lost). So a process that runs a task it did not receive itself sends
`task.received` again, just before `task.started`, on its own connection.
The brain keeps one event per task, kind and second, so the two usually
collapse into one; the row gets its arguments either way.

Commands are served from the worker's main process only: the server starts
on `worker_init` (or, when `install` ran during it, as Django's fixup does,
on `worker_ready`), which Celery sends in the main process alone, and a
forked pool child never inherits a command server. Web processes and
scripts that call `install` never serve commands; `celery beat` serves its
scheduler's (`beat.py`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback as _traceback
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

from .._redact import MAX_TEXT_CHARS, cut_text, event_value, exception_message
from ..client import Client, get_client
from . import _commands, _health
from ._util import attr as _get
from . import beat as _beat

log = logging.getLogger("z4j_agentd.celery")

ENGINE = "celery"
#: A traceback is cut to this many characters (as z4j-celery does).
MAX_TRACEBACK_CHARS = MAX_TEXT_CHARS
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: Tasks whose name and queue the process serving commands remembers for
#: retry_task (with their args and kwargs when small, see below).
REMEMBERED_TASKS = 10000
#: A remembered task keeps its args and kwargs only up to this many bytes as
#: JSON (UTF-8): ordinary Celery arguments (ids, short strings, a few
#: options) take well under 1 KiB, and 4 KiB keeps them while 10,000 tasks
#: still cannot take more than 40 MB. Larger ones: name and queue only, and
#: retry_task reads the arguments from the result backend.
MAX_REMEMBERED_ARGS_BYTES = 4 * 1024
#: All remembered args and kwargs together stay within this many bytes (the
#: oldest are forgotten first, their name and queue stay): enough for all
#: 10,000 tasks when their arguments are a few ids (under 100 bytes), for
#: the last ~2,000 with 512-byte ones. With the entries themselves (about
#: 0.25 KB each) a worker's map never takes more than about 4 MB, whatever
#: its tasks' arguments; older arguments come from the result backend.
MAX_REMEMBERED_ARGS_TOTAL = 1024 * 1024
#: A pool child (or any process that does not serve commands) remembers
#: only the ids of the last tasks it sent task.received for, no arguments:
#: forgetting one costs at most a repeated task.received when a task
#: retried long after comes back to the same process.
REMEMBERED_IDS_ONLY = 1000
#: Content types whose arguments are remembered (as JSON): any other
#: serializer's values (pickle, msgpack) could come back changed.
_JSON_CONTENT_TYPES = (None, "", "application/json")
#: Start times kept for runtime_ms before the oldest are forgotten.
MAX_STARTED = 10000



def _queue_of(request: Any) -> Optional[str]:
    info = _get(request, "delivery_info")
    if isinstance(info, dict):
        queue = info.get("routing_key") or info.get("queue")
        if isinstance(queue, str) and queue:
            return queue
    return None


def _received_data(name: Any, queue: Optional[str], request: Any, args: Any, kwargs: Any) -> Dict[str, Any]:
    """The `data` of a `task.received` event."""
    parent = _get(request, "parent_id")
    root = _get(request, "root_id")
    return _compact({
        "task_name": name,
        "queue": queue,
        "worker": _get(request, "hostname"),
        "args": event_value(list(args) if isinstance(args, tuple) else args if args is not None else [],
                        MAX_VALUE_BYTES),
        "kwargs": event_value(kwargs if kwargs is not None else {}, MAX_VALUE_BYTES),
        "parent_task_id": str(parent) if parent else None,
        "root_task_id": str(root) if root else None,
    })


def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


class _Hooks:
    """The signal receivers of one installation, and the command handlers."""

    def __init__(self, app: Any, client: Optional[Client], serve_commands: bool,
                 cancel_signal: Optional[Any] = None) -> None:
        self.app = app
        #: The client given to install(); None means the default client,
        #: looked up at each use, so a later z4j_agentd.configure() applies.
        self.bound_client = client
        self.serve_commands = serve_commands
        self._started: "OrderedDict[str, float]" = OrderedDict()
        self._started_lock = threading.Lock()
        #: task id -> (name, queue, args and kwargs as JSON or None, their
        #: size, why left out); in a pool child task id -> None.
        self._remembered: "OrderedDict[str, Any]" = OrderedDict()
        #: The ids whose arguments are kept, oldest first, and their sizes.
        self._remembered_args: "OrderedDict[str, int]" = OrderedDict()
        self._remembered_args_bytes = 0
        self._remembered_lock = threading.Lock()
        #: True in a process forked after install (a pool child).
        self._forked = False
        self._connected: list = []
        self._serving = False
        #: The worker (celery.worker.WorkController) of this process, once
        #: worker_init or worker_ready named it; None elsewhere.
        self.worker: Any = None
        #: Its node name (`celery@host`), as events name it in `data.worker`.
        self.hostname: Optional[str] = None
        self.commands = _commands.CeleryCommands(self, cancel_signal)
        self._online_sent = False

    def _after_fork_in_child(self) -> None:
        # A pool child forked after the main process received tasks must not
        # take their ids for its own (it would skip sending task.received
        # again before task.started), nor inherit a lock another thread of
        # the parent held at the fork.
        self._started = OrderedDict()
        self._started_lock = threading.Lock()
        self._remembered = OrderedDict()
        self._remembered_args = OrderedDict()
        self._remembered_args_bytes = 0
        self._remembered_lock = threading.Lock()
        # It never serves commands: ids only (see REMEMBERED_IDS_ONLY).
        self._forked = True

    # -- wiring ---------------------------------------------------------

    def connect(self) -> None:
        from celery import signals

        pairs = [
            (signals.task_received, self.on_task_received),
            (signals.task_prerun, self.on_task_prerun),
            (signals.task_success, self.on_task_success),
            (signals.task_failure, self.on_task_failure),
            (signals.task_retry, self.on_task_retry),
            (signals.task_revoked, self.on_task_revoked),
            (signals.task_postrun, self.on_task_postrun),
            (signals.worker_init, self.on_worker_start),
            (signals.worker_ready, self.on_worker_ready),
            (signals.worker_shutdown, self.on_worker_shutdown),
            (signals.worker_process_shutdown, self.on_process_shutdown),
            (signals.beat_init, _beat.receiver(self)),  # celery beat: its schedules (beat.py)
        ]
        for signal, receiver in pairs:
            signal.connect(receiver, weak=False)
            self._connected.append((signal, receiver))

    def disconnect(self) -> None:
        for signal, receiver in self._connected:
            try:
                signal.disconnect(receiver)
            except Exception:  # pragma: no cover
                pass
        self._connected.clear()

    @property
    def client(self) -> Client:
        client = self.bound_client or get_client()
        if ENGINE not in client._engines:
            client._add_engine(ENGINE)
        return client

    def emit(self, kind: str, task_id: Any, data: Dict[str, Any]) -> None:
        try:
            self.client.emit(ENGINE, kind, str(task_id or ""), data)
        except Exception:  # pragma: no cover - emit never raises; belt and braces
            pass

    # -- signal receivers (never raise into Celery) --------------------

    def on_task_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        try:
            if request is None:
                return
            task_id = _get(request, "id") or _get(request, "task_id")
            name = _get(request, "name") or _get(request, "task_name") or _get(_get(request, "task"), "name")
            args = _get(request, "args")
            kwargs = _get(request, "kwargs")
            queue = _queue_of(request)
            self._remember(task_id, name, args, kwargs, queue, _get(request, "content_type"))
            retries = _get(_get(request, "request_dict"), "retries", _get(request, "retries"))
            if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0:
                # A retry's redelivery: the brain has the row. This process gets
                # the new message as soon as the pool process published it, so
                # its task.received can be newer than that process's own
                # task.retried, which the brain would then drop as stale.
                return
            self.emit("task.received", task_id, _received_data(name, queue, request, args, kwargs))
        except Exception:
            log.debug("z4j-agentd: task_received not recorded", exc_info=True)

    def on_task_prerun(self, sender: Any = None, task_id: Any = None, task: Any = None,
                       args: Any = None, kwargs: Any = None, **_: Any) -> None:
        try:
            task = task or sender
            request = _get(task, "request")
            task_id = task_id or _get(request, "id")
            with self._started_lock:
                self._started[str(task_id)] = time.monotonic()
                while len(self._started) > MAX_STARTED:
                    self._started.popitem(last=False)
            with self._remembered_lock:
                received_here = str(task_id) in self._remembered
            if not received_here:
                # Same connection as task.started, so it reaches the brain first.
                self.emit("task.received", task_id,
                          _received_data(_get(task, "name"), _queue_of(request), request, args, kwargs))
                # Once per task in this process, retries included.
                self._remember(task_id, _get(task, "name"), args, kwargs, _queue_of(request),
                               _get(request, "content_type"))
            self.emit("task.started", task_id, _compact({
                "task_name": _get(task, "name"),
                "queue": _queue_of(request),
                "worker": _get(request, "hostname"),
                "args": event_value(args if args is not None else [], MAX_VALUE_BYTES),
                "kwargs": event_value(kwargs if kwargs is not None else {}, MAX_VALUE_BYTES),
            }))
        except Exception:
            log.debug("z4j-agentd: task_prerun not recorded", exc_info=True)

    def _runtime_ms(self, task_id: Any) -> Optional[int]:
        with self._started_lock:
            started = self._started.get(str(task_id))
        if started is None:
            return None
        return max(0, int(round((time.monotonic() - started) * 1000)))

    def on_task_success(self, sender: Any = None, result: Any = None, runtime: Any = None,
                        **_: Any) -> None:
        try:
            request = _get(sender, "request")
            task_id = _get(request, "id")
            if isinstance(runtime, (int, float)) and not isinstance(runtime, bool) and runtime >= 0:
                runtime_ms: Optional[int] = int(round(runtime * 1000))  # recent Celery passes its own measure
            else:
                runtime_ms = self._runtime_ms(task_id)
            self.emit("task.succeeded", task_id, _compact({
                "task_name": _get(sender, "name"),
                "queue": _queue_of(request),
                "worker": _get(request, "hostname"),
                "result": event_value(result, MAX_VALUE_BYTES),
                "runtime_ms": runtime_ms,
            }, keep_none=("result",)))
        except Exception:
            log.debug("z4j-agentd: task_success not recorded", exc_info=True)

    def on_task_failure(self, sender: Any = None, task_id: Any = None, exception: Any = None,
                        args: Any = None, kwargs: Any = None, traceback: Any = None,
                        einfo: Any = None, **_: Any) -> None:
        try:
            request = _get(sender, "request")
            task_id = task_id or _get(request, "id")
            tb_text = _get(einfo, "traceback")
            if not isinstance(tb_text, str) or not tb_text:
                if traceback is not None or exception is not None:
                    tb_text = "".join(_traceback.format_exception(
                        type(exception), exception, traceback if traceback is not None else
                        getattr(exception, "__traceback__", None)))
                else:
                    tb_text = None
            tb_text = cut_text(tb_text)  # scrubbed, then cut to its start and its end
            self.emit("task.failed", task_id, _compact({
                "task_name": _get(sender, "name"),
                "queue": _queue_of(request),
                "worker": _get(request, "hostname"),
                "exception": type(exception).__name__ if exception is not None else None,
                "exception_message": exception_message(exception),
                "traceback": tb_text,
                "runtime_ms": self._runtime_ms(task_id),
            }))
        except Exception:
            log.debug("z4j-agentd: task_failure not recorded", exc_info=True)

    def on_task_retry(self, sender: Any = None, request: Any = None, reason: Any = None,
                      einfo: Any = None, **_: Any) -> None:
        try:
            task_id = _get(request, "id")
            retries = _get(request, "retries")
            self.emit("task.retried", task_id, _compact({
                "task_name": _get(sender, "name") or _get(request, "task"),
                "queue": _queue_of(request),
                "worker": _get(request, "hostname"),
                "reason": exception_message(reason) if reason is not None else None,
                # The retry about to be sent is number retries + 1.
                "retry_count": (retries if isinstance(retries, int) else 0) + 1,
            }))
        except Exception:
            log.debug("z4j-agentd: task_retry not recorded", exc_info=True)

    def on_task_revoked(self, sender: Any = None, request: Any = None, terminated: Any = False,
                        signum: Any = None, expired: Any = False, **_: Any) -> None:
        try:
            task_id = _get(request, "id")
            self.emit("task.revoked", task_id, _compact({
                "task_name": _get(sender, "name") or _get(request, "task"),
                "queue": _queue_of(request),
                "worker": _get(request, "hostname"),
                "terminated": bool(terminated),
                "signum": int(signum) if signum is not None else None,
                "expired": bool(expired),
            }, keep_none=("signum",)))
        except Exception:
            log.debug("z4j-agentd: task_revoked not recorded", exc_info=True)

    def on_task_postrun(self, sender: Any = None, task_id: Any = None, **_: Any) -> None:
        with self._started_lock:
            self._started.pop(str(task_id), None)

    def on_worker_start(self, sender: Any = None, **_: Any) -> None:
        # worker_init sends the WorkController, worker_ready its Consumer.
        worker = _get(sender, "controller") or sender
        if worker is not None and self.worker is None:
            self.worker = worker
            name = _get(worker, "hostname")
            self.hostname = name if isinstance(name, str) and name else None
        if not self.serve_commands:
            return
        try:
            self.start_serving()
        except Exception:
            log.exception("z4j-agentd: could not start serving Celery commands")

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        self.on_worker_start(sender=sender)
        # worker.online names the worker: the brain admits worker controls
        # (restart, pool, consumers) only for a worker some worker.* event
        # of this agent named. Sent once, from the main process.
        if self.hostname is None or self._online_sent:
            return
        self._online_sent = True
        self.emit("worker.online", "", self._worker_data(with_details=True))

    def on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        # The main process is stopping (warm or cold shutdown).
        if self.hostname is None or not self._online_sent:
            return
        self.emit("worker.offline", "", self._worker_data(with_details=False))
        try:
            self.client.flush(timeout=1.0)
        except Exception:  # pragma: no cover
            pass

    def _worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.hostname, "hostname": socket.gethostname(), "pid": os.getpid()}
        if not with_details:
            return data
        try:
            worker = self.worker
            data["concurrency"] = _get(worker, "concurrency")
            pool_cls = _get(worker, "pool_cls")
            data["pool"] = (pool_cls if isinstance(pool_cls, str)
                            else f"{_get(pool_cls, '__module__', '')}:{_get(pool_cls, '__name__', '')}"
                            if pool_cls is not None else None)
            queues = _get(_get(self.app, "amqp"), "queues")
            consuming = queues.consume_from if queues is not None else None
            data["queues"] = sorted(str(q) for q in (consuming or {})) or None
            import celery

            data["sw_ver"] = getattr(celery, "__version__", None)
        except Exception:
            log.debug("z4j-agentd: worker details left out of worker.online", exc_info=True)
        return _compact(data)

    def on_process_shutdown(self, **_: Any) -> None:
        # A pool child is exiting: hand over what its queue still holds
        # (briefly when the daemon is away: the pool waits for this child).
        try:
            client = self.client
            client.flush(timeout=1.0 if client._connected else 0.1)
        except Exception:  # pragma: no cover
            pass

    # -- commands -------------------------------------------------------

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        return self.commands.handlers()

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self.commands.cancel_task(command)

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self.commands.retry_task(command)

    def start_serving(self) -> None:
        if self._serving:  # worker_init and worker_ready both call this
            return
        self._serving = True
        self.client.serve(self.handlers(), capabilities=_commands.capabilities(),
                          workers=[self.hostname] if self.hostname else ())
        self.health = _health.start(self)  # the Workers page and queue depths

    def _keeps_arguments(self) -> bool:
        """Only the process that serves retry_task needs the arguments."""
        return self.serve_commands and not self._forked

    def _remember(self, task_id: Any, name: Any, args: Any, kwargs: Any, queue: Any,
                  content_type: Any = None) -> None:
        if not task_id or not name:
            return
        key = str(task_id)
        if not self._keeps_arguments():
            with self._remembered_lock:
                self._remembered[key] = None
                self._remembered.move_to_end(key)
                while len(self._remembered) > REMEMBERED_IDS_ONLY:
                    self._remembered.popitem(last=False)
            return
        blob, size, why = _arguments_blob(args, kwargs, content_type)
        entry = (_shared(name), _shared(queue), blob, size, why)
        with self._remembered_lock:
            self._forget_arguments(key)
            self._remembered[key] = entry
            self._remembered.move_to_end(key)
            if blob is not None:
                self._remembered_args[key] = len(blob)
                self._remembered_args_bytes += len(blob)
            while len(self._remembered) > REMEMBERED_TASKS:
                oldest, _ = self._remembered.popitem(last=False)
                self._forget_arguments(oldest)
            while self._remembered_args_bytes > MAX_REMEMBERED_ARGS_TOTAL and self._remembered_args:
                oldest, size = self._remembered_args.popitem(last=False)
                self._remembered_args_bytes -= size
                kept = self._remembered.get(oldest)
                if kept is not None:  # same key: keeps its place in the order
                    self._remembered[oldest] = (kept[0], kept[1], None, kept[3], _WHY_BUDGET)

    def _forget_arguments(self, key: str) -> None:
        """Under _remembered_lock: the arguments of `key` no longer count."""
        size = self._remembered_args.pop(key, None)
        if size is not None:
            self._remembered_args_bytes -= size

    def remembered(self, task_id: str) -> Dict[str, Any]:
        """What this process remembers of a task it received: task_name and
        queue, args and kwargs when kept, else `args_left_out` (why); {} for
        a task it did not receive."""
        with self._remembered_lock:
            kept = self._remembered.get(task_id)
        if kept is None:
            return {}
        name, queue, blob, size, why = kept
        out: Dict[str, Any] = {"task_name": name, "queue": queue}
        if blob is not None:
            try:
                out["args"], out["kwargs"] = json.loads(blob)
                return out
            except Exception:  # pragma: no cover - written by json.dumps above
                why = _WHY_NOT_JSON
        out["args_left_out"] = _why_text(why, size)
        return out


_WHY_TOO_LARGE = "too large"
_WHY_BUDGET = "budget"
_WHY_NOT_JSON = "not json"


def _why_text(why: str, size: int) -> str:
    if why == _WHY_TOO_LARGE:
        taken = f"{size:,} bytes" if size > 0 else f"more than {MAX_REMEMBERED_ARGS_BYTES:,} bytes"
        return (f"they take {taken} as JSON, and a worker keeps in memory only a task's arguments "
                f"up to {MAX_REMEMBERED_ARGS_BYTES:,} bytes")
    if why == _WHY_BUDGET:
        return (f"a worker keeps at most {MAX_REMEMBERED_ARGS_TOTAL // (1024 * 1024)} MiB of arguments in "
                f"memory, and newer tasks' took their place")
    return "they were not sent as JSON, and a worker keeps only JSON arguments in memory"


def _shared(text: Any) -> Any:
    """One copy of each task or queue name for all the entries naming it."""
    return sys.intern(text) if type(text) is str else text


def _arguments_blob(args: Any, kwargs: Any, content_type: Any) -> Tuple[Optional[bytes], int, str]:
    """args and kwargs as UTF-8 JSON when they are at most
    MAX_REMEMBERED_ARGS_BYTES (and came as JSON); else None, their size
    (-1: not measured), and why."""
    if content_type not in _JSON_CONTENT_TYPES:
        return None, -1, _WHY_NOT_JSON
    args = list(args) if isinstance(args, (list, tuple)) else []
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    # A long string argument is too large without encoding it (cheap check).
    at_least = sum(len(v) for v in args if isinstance(v, (str, bytes)))
    at_least += sum(len(v) for v in kwargs.values() if isinstance(v, (str, bytes)))
    if at_least > MAX_REMEMBERED_ARGS_BYTES:
        return None, -1, _WHY_TOO_LARGE
    try:
        blob = json.dumps([args, kwargs], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError):
        return None, -1, _WHY_NOT_JSON
    if len(blob) > MAX_REMEMBERED_ARGS_BYTES:
        return None, len(blob), _WHY_TOO_LARGE
    return blob, len(blob), ""


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


def install(app: Any, client: Optional[Client] = None, *, serve_commands: bool = True,
            cancel_signal: Optional[Any] = None) -> Client:
    """Connects Celery's signals to `client`, which also declares the engine
    `celery`. Without `client`, events go to the process's default client
    as it is when each event happens (`z4j_agentd.get_client()`), so
    `z4j_agentd.configure()` may run before or after `install`. With
    `serve_commands`, a worker's main process serves the brain's commands
    (see the module documentation and `_commands`).

    `cancel_signal` is the signal a running task's process gets when the
    brain cancels it (SIGTERM, SIGKILL, SIGQUIT, SIGHUP or SIGABRT, by name
    or number); without it $Z4J_CELERY_CANCEL_SIGNAL, else SIGTERM (SIGQUIT
    under REMAP_SIGTERM). A signal that would not end the process raises
    ValueError saying why.

    Calling it again with the same app and client changes nothing; with
    another app or client it replaces the previous installation. Returns
    the client.
    """
    global _installed
    with _install_lock:
        previous = _installed
        if previous is not None and previous.app is app and previous.bound_client is client:
            previous.serve_commands = previous.serve_commands or serve_commands
            if cancel_signal is not None:
                previous.commands.cancel_signal = _commands.cancel_signal_from(cancel_signal)
            return previous.client
        if previous is not None:
            previous.disconnect()
        hooks = _Hooks(app, client, serve_commands, cancel_signal)
        hooks.connect()
        _installed = hooks
    return hooks.client


def uninstall() -> None:
    """Disconnects the signal receivers of `install` (tests, reloads). A
    command server already started keeps running until its client closes."""
    global _installed
    with _install_lock:
        if _installed is not None:
            _installed.disconnect()
            _installed = None


def installed() -> Optional[_Hooks]:
    """The current installation (its `client`, `app`, handlers), or None."""
    return _installed


__all__ = ["ENGINE", "install", "installed", "uninstall"]
