"""RQ: task lifecycle events from the worker's main process, worker.online
and worker.offline events, the brain's commands (`_commands`) and the
worker's health (`_health`).

    rq worker -w z4j_agentd.rq.Worker default high

`z4j_agentd.rq.Worker` is RQ's forking `rq.Worker` with the integration
mixed in first (`WorkerMixin`); `z4j_agentd.rq.SimpleWorker` and
`z4j_agentd.rq.SpawnWorker` are the same for RQ's other two worker classes.
A program that builds its workers itself uses one of them, or hands its
worker to `install(worker)`. The client is the process's default one
(`z4j_agentd.get_client()`: its settings from the environment, as
`Z4J_AGENTD_SOCKET`), unless `install` or the class attribute `z4j_client`
gives one.

Events (engine `rq`, `task_id` the RQ job id, `worker` the RQ worker's
name, as `rq info` and `Worker.all()` name it), all sent by the worker's
main process around RQ's `execute_job` (the work horse a job runs in
sends nothing: it exits as soon as the job ends; the main process unpickles
each job's payload to send its args, up to MAX_PAYLOAD_BYTES, and reads
the job's end with one HMGET):

| when | event | `data` |
|---|---|---|
| before the job runs | `task.received` (at the job's `enqueued_at`) | task_name, queue, worker, args, kwargs (or args_skipped), parent_task_id, depends_on |
| before the job runs | `task.started` | task_name, queue, worker, args, kwargs (or args_skipped) |
| status `finished` | `task.succeeded` | task_name, queue, worker, result, runtime_ms |
| status `failed` | `task.failed` | task_name, queue, worker, exception, exception_message, traceback, runtime_ms |
| status `queued`/`scheduled` (a retry), or another worker's next attempt | `task.retried` | task_name, queue, worker, reason, traceback, retry_count, runtime_ms |
| status `stopped` (stopped by a cancel) | `task.revoked` | task_name, queue, worker, terminated: true, runtime_ms |
| status `canceled` | `task.revoked` | task_name, queue, worker, terminated: false |
| `register_birth` | `worker.online` | worker, hostname, pid, concurrency (1), pool (the worker class), queues, sw_ver |
| `register_death` | `worker.offline` | worker, hostname, pid |

RQ has no parent task: `parent_task_id` is the first job this one depends
on (`depends_on`), and `depends_on` lists them all. `retry_count` is the
retry about to happen: `number_of_retries` for a job that returned
`rq.Retry`, else the `Retry(max=...)` the job was enqueued with less the
retries left (the first attempt notes the initial `max` in a field of the
job's hash, `z4j_retry_max`, with HSETNX; RQ ignores it and deletes it with
the job). RQ stores no result for a failed attempt it retries:
its traceback is handed from the work horse to the main process through a
short-lived Redis key (`z4j:rq:retry-traceback:<job id>`).

Commands are served by the worker's main process (started in
`register_birth`, never in a work horse); its health report names this
worker and the depth of every queue the Redis connection knows.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from .._redact import MAX_TEXT_CHARS, cut_text, event_value, exception_message
from ..client import Client, get_client

log = logging.getLogger("z4j_agentd.rq")

ENGINE = "rq"
#: A traceback is cut to this many characters (as the Celery integration does).
MAX_TRACEBACK_CHARS = MAX_TEXT_CHARS
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: Where the work horse leaves the traceback of a failed attempt RQ retries.
RETRY_TRACEBACK_KEY = "z4j:rq:retry-traceback:{}"
#: Seconds that key lives when the main process does not read it.
RETRY_TRACEBACK_TTL = 600
#: The job hash field holding the Retry(max=...) a job was enqueued with
#: (RQ ignores it and deletes it with the job).
RETRY_MAX_FIELD = "z4j_retry_max"
#: A job whose stored payload (`job.data`, RQ's serialized function name,
#: args and kwargs) is longer than this is not unpickled by the worker's
#: main process: its events carry no args and kwargs, and say so.
MAX_PAYLOAD_BYTES = 256 * 1024
#: The job hash fields after() reads once the attempt ended.
_END_FIELDS = ("status", "started_at", "ended_at", "retries_left", "number_of_retries", "worker_name",
               RETRY_MAX_FIELD)



def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


def _text(raw: Any) -> Optional[str]:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw if isinstance(raw, str) and raw != "" else None


def _int_field(raw: Any) -> Optional[int]:
    text = _text(raw)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _when(raw: Any) -> Optional[datetime]:
    text = _text(raw)
    if text is None:
        return None
    try:
        from rq.utils import str_to_date

        return str_to_date(text)
    except Exception:
        return None


class _Ended:
    """The fields of a job's hash once an attempt ended (one HMGET, not a
    full reload of the job and its payload)."""

    __slots__ = ("status", "started_at", "ended_at", "retries_left", "number_of_retries", "worker_name",
                 "retry_max")

    def __init__(self, values: Any) -> None:
        status, started, ended, left, retries, worker, retry_max = values
        self.status = _text(status)
        self.started_at = _when(started)
        self.ended_at = _when(ended)
        self.retries_left = _int_field(left)
        self.number_of_retries = _int_field(retries)
        self.worker_name = _text(worker)
        self.retry_max = _int_field(retry_max)


def exception_of(exc_string: Any) -> Tuple[Optional[str], Optional[str]]:
    """(type name, message) from RQ's formatted traceback: its last line,
    `module.Error: message` (the type without its module)."""
    if not isinstance(exc_string, str) or not exc_string.strip():
        return None, None
    last = exc_string.strip().splitlines()[-1].strip()
    name, sep, message = last.partition(":")
    name = name.strip()
    if not sep or not name or " " in name:
        return None, exception_message(last)
    return name.rsplit(".", 1)[-1], exception_message(message.strip())


def _runtime_ms(job: Any, fallback_since: float) -> int:
    started, ended = getattr(job, "started_at", None), getattr(job, "ended_at", None)
    if isinstance(started, datetime) and isinstance(ended, datetime) and ended >= started:
        return int(round((ended - started).total_seconds() * 1000))
    return max(0, int(round((time.monotonic() - fallback_since) * 1000)))


def _payload_size(job: Any) -> Optional[int]:
    """The length of the job's stored payload, without unpickling it."""
    data = getattr(job, "_data", None)
    return len(data) if isinstance(data, (bytes, bytearray)) else None


def _name_from_description(job: Any) -> Optional[str]:
    """The function's name from RQ's default description, `name(args...)`,
    when it starts with a dotted name (a custom description: None)."""
    text = getattr(job, "description", None)
    if not isinstance(text, str):
        return None
    name = text.split("(", 1)[0].strip()
    ok = name and all(part.isidentifier() for part in name.split("."))
    return name[:500] if ok else None


def _iso(when: Any) -> Optional[str]:
    if not isinstance(when, datetime):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.isoformat()


class _Attempt:
    """What the main process noted of a job before its work horse ran it."""

    __slots__ = ("job_id", "name", "queue", "since", "retries_left", "number_of_retries", "retry_max")

    def __init__(self, job: Any) -> None:
        self.job_id = str(job.id)
        self.name: Optional[str] = None
        self.queue = getattr(job, "origin", None)
        self.since = time.monotonic()
        self.retries_left = getattr(job, "retries_left", None)
        self.number_of_retries = getattr(job, "number_of_retries", None)
        self.retry_max: Optional[int] = None


class _Hooks:
    """The events, commands and health of one RQ worker (its main process)."""

    def __init__(self, worker: Any, client: Optional[Client], serve_commands: bool) -> None:
        self.worker = worker
        #: None means the default client, looked up at each use.
        self.bound_client = client
        self.serve_commands = serve_commands
        self.pid = os.getpid()
        self._online_sent = False
        self._serving = False
        self.commands: Any = None
        self.health: Any = None

    @property
    def name(self) -> str:
        return str(self.worker.name)

    @property
    def client(self) -> Client:
        client = self.bound_client or get_client()
        if ENGINE not in client._engines:
            client._add_engine(ENGINE)
        return client

    def emit(self, kind: str, task_id: Any, data: Dict[str, Any], occurred_at: Any = None) -> None:
        try:
            self.client.emit(ENGINE, kind, str(task_id or ""), data, occurred_at=occurred_at)
        except Exception:  # pragma: no cover - emit never raises; belt and braces
            pass

    # -- the job, around execute_job ------------------------------------

    def before(self, job: Any) -> Optional[_Attempt]:
        try:
            attempt = _Attempt(job)
        except Exception:
            log.debug("z4j-agentd: an RQ job without an id", exc_info=True)
            return None
        try:
            base = {"queue": attempt.queue, "worker": self.name}
            skipped = None
            try:
                size = _payload_size(job)
                if size is not None and size > MAX_PAYLOAD_BYTES:
                    # Unpickling it here would cost the main process (and
                    # every job after it) what the work horse pays anyway.
                    attempt.name = _name_from_description(job)
                    args = kwargs = None
                    skipped = (f"the job's payload is {size} bytes (over {MAX_PAYLOAD_BYTES}): its args and "
                               f"kwargs are not read by the worker's main process")
                else:
                    attempt.name = job.func_name
                    args = event_value(list(job.args or ()), MAX_VALUE_BYTES)
                    kwargs = event_value(dict(job.kwargs or {}), MAX_VALUE_BYTES)
                unreadable = None
            except Exception as exc:  # DeserializationError: RQ fails the job itself
                args = kwargs = None
                cause = exc.__cause__ or exc.__context__
                why = str(exc) or (f"{type(cause).__name__}: {cause}" if cause is not None else "")
                unreadable = exception_message(f"{type(exc).__name__}: {why}", 500)
            base["task_name"] = attempt.name
            deps = [str(d) for d in (getattr(job, "_dependency_ids", None) or [])]
            self._note_retry_max(job, attempt)
            self.emit("task.received", attempt.job_id, _compact({
                **base, "args": args, "kwargs": kwargs, "args_unreadable": unreadable, "args_skipped": skipped,
                "parent_task_id": deps[0] if deps else None, "depends_on": deps or None,
            }), occurred_at=getattr(job, "enqueued_at", None))
            self.emit("task.started", attempt.job_id, _compact({
                **base, "args": args, "kwargs": kwargs, "args_skipped": skipped}))
        except Exception:
            log.debug("z4j-agentd: the start of RQ job %s not recorded", attempt.job_id, exc_info=True)
        return attempt

    def _note_retry_max(self, job: Any, attempt: _Attempt) -> None:
        """The Retry(max=...) of the job: a field of its hash, set at its
        first attempt (HSETNX: one writer wins, the job's meta is never
        touched), so later attempts, on any worker, can count."""
        left = attempt.retries_left
        if not isinstance(left, int):
            return
        try:
            with self.worker.connection.pipeline(transaction=False) as pipe:
                _, kept = pipe.hsetnx(job.key, RETRY_MAX_FIELD, left).hget(job.key, RETRY_MAX_FIELD).execute()
        except Exception:
            log.debug("z4j-agentd: retry max of RQ job %s not noted", attempt.job_id, exc_info=True)
            return
        kept = _int_field(kept)
        attempt.retry_max = kept if isinstance(kept, int) and kept >= left else left

    def after(self, job: Any, attempt: Optional[_Attempt]) -> None:
        if attempt is None:
            return
        try:
            self._after(job, attempt)
        except Exception:
            log.debug("z4j-agentd: the end of RQ job %s not recorded", attempt.job_id, exc_info=True)

    def _after(self, job: Any, attempt: _Attempt) -> None:
        base = {"task_name": attempt.name, "queue": attempt.queue, "worker": self.name}
        ended = _Ended(self.worker.connection.hmget(job.key, *_END_FIELDS))
        if ended.status is None:
            # result_ttl=0: RQ deleted the job as soon as it finished.
            self.emit("task.succeeded", attempt.job_id, _compact({
                **base, "result": None, "runtime_ms": _runtime_ms(None, attempt.since),
                "note": "the job was deleted when it finished (result_ttl=0): no result kept"},
                keep_none=("result",)))
            return
        status = ended.status
        if ended.worker_name not in (None, self.name) and status not in ("queued", "scheduled"):
            # Retried at once (rq.Retry without an interval) and taken by
            # another worker: what the hash holds is that worker's attempt.
            self.emit("task.retried", attempt.job_id, _compact({
                **base, **self._retry_reason(job), "retry_count": self._retry_count(ended, attempt),
                "runtime_ms": _runtime_ms(None, attempt.since),
                "note": f"its next attempt is on worker {ended.worker_name} already ({status})"}))
            return
        runtime = _runtime_ms(ended, attempt.since)
        if status == "finished":
            result = self._latest_result(job)
            value = getattr(result, "return_value", None) if result is not None else None
            self.emit("task.succeeded", attempt.job_id, _compact({
                **base, "result": event_value(value, MAX_VALUE_BYTES), "runtime_ms": runtime},
                keep_none=("result",)))
        elif status == "failed":
            result = self._latest_result(job)
            text = getattr(result, "exc_string", None) if result is not None else None
            exc, message = exception_of(text)
            if exc is None and (getattr(getattr(result, "type", None), "name", "") == "MAX_RETRIES_EXCEEDED"
                                or (isinstance(text, str) and text.startswith("Job failed after"))):  # RQ 2.3
                exc, message = "MaxRetriesExceeded", "the job returned rq.Retry after its last retry"
            self.emit("task.failed", attempt.job_id, _compact({
                **base, "exception": exc, "exception_message": message, "traceback": cut_text(text),
                "runtime_ms": runtime}))
        elif status == "stopped":
            self.emit("task.revoked", attempt.job_id, _compact({
                **base, "terminated": True, "signum": None, "expired": False, "runtime_ms": runtime,
                "reason": "stopped by a cancel: RQ killed its work horse"}, keep_none=("signum",)))
        elif status == "canceled":
            self.emit("task.revoked", attempt.job_id, _compact({
                **base, "terminated": False, "signum": None, "expired": False,
                "reason": "canceled while it ran: RQ let it finish"}, keep_none=("signum",)))
        elif status in ("queued", "scheduled"):
            self.emit("task.retried", attempt.job_id, _compact({
                **base, **self._retry_reason(job), "retry_count": self._retry_count(ended, attempt),
                "runtime_ms": runtime, "scheduled": status == "scheduled" or None}))
        else:
            log.debug("z4j-agentd: RQ job %s ended its attempt with status %r", attempt.job_id, status)

    def _retry_reason(self, job: Any) -> Dict[str, Any]:
        text = self._retry_traceback(job)
        exc, message = exception_of(text)
        return {"reason": f"{exc}: {message}" if exc else message, "exception": exc,
                "traceback": cut_text(text)}

    @staticmethod
    def _latest_result(job: Any) -> Any:
        try:
            return job.latest_result()
        except Exception:
            log.debug("z4j-agentd: no result for RQ job %s", job.id, exc_info=True)
            return None

    def _retry_traceback(self, job: Any) -> Optional[str]:
        key = RETRY_TRACEBACK_KEY.format(job.id)
        try:
            with self.worker.connection.pipeline() as pipe:  # GETDEL needs Redis 6.2
                raw, _ = pipe.get(key).delete(key).execute()
        except Exception:
            return None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        return raw if isinstance(raw, str) and raw else None

    @staticmethod
    def _retry_count(ended: _Ended, attempt: _Attempt) -> Optional[int]:
        returned = ended.number_of_retries
        if isinstance(returned, int) and returned != (attempt.number_of_retries or 0):
            return returned  # the job returned rq.Retry
        left = ended.retries_left
        if isinstance(attempt.retry_max, int) and isinstance(left, int):
            return max(1, attempt.retry_max - left)
        return None

    # -- the work horse: a failed attempt RQ retries --------------------

    def stash_retry_traceback(self, job: Any, exc_string: Any) -> None:
        if not exc_string or not isinstance(exc_string, str):
            return
        try:
            self.worker.connection.set(RETRY_TRACEBACK_KEY.format(job.id), exc_string[-16384:],
                                       ex=RETRY_TRACEBACK_TTL)
        except Exception:
            log.debug("z4j-agentd: the traceback of RQ job %s's retried attempt not kept", job.id,
                      exc_info=True)

    # -- the worker ----------------------------------------------------

    def online(self) -> None:
        self.record_class()
        try:
            if self.serve_commands:
                self.start_serving()
        except Exception:
            log.exception("z4j-agentd: could not start serving RQ commands")
        if self._online_sent:
            return
        self._online_sent = True
        self.emit("worker.online", "", self.worker_data(with_details=True))

    def record_class(self) -> None:
        """Notes this worker's class in its RQ worker hash (deleted with it),
        so another worker's cancel knows a SimpleWorker, which cannot stop a
        running job, before sending it RQ's stop-job command."""
        from ._commands import WORKER_CAN_STOP_FIELD, WORKER_POOL_FIELD, can_stop_jobs

        cls = type(self.worker)
        try:
            self.worker.connection.hset(self.worker.key, mapping={
                WORKER_POOL_FIELD: f"{cls.__module__}:{cls.__qualname__}",
                WORKER_CAN_STOP_FIELD: "1" if can_stop_jobs(self.worker) else "0"})
        except Exception:
            log.debug("z4j-agentd: RQ worker %s's class not noted in its hash", self.name, exc_info=True)

    def offline(self) -> None:
        if not self._online_sent:
            return
        self.emit("worker.offline", "", self.worker_data(with_details=False))
        try:
            self.client.flush(timeout=1.0)
        except Exception:  # pragma: no cover
            pass

    def worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.name, "hostname": socket.gethostname(), "pid": os.getpid()}
        if not with_details:
            return data
        try:
            import rq

            cls = type(self.worker)
            data.update(concurrency=1, pool=f"{cls.__module__}:{cls.__qualname__}",
                        queues=list(self.worker.queue_names()), sw_ver=getattr(rq, "__version__", None))
        except Exception:
            log.debug("z4j-agentd: worker details left out of worker.online", exc_info=True)
        return _compact(data)

    def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        from . import _commands, _health

        self.commands = _commands.RqCommands(self)
        self.client.serve(self.commands.handlers(), capabilities=_commands.capabilities(), workers=[self.name])
        self.health = _health.start(self)


# ---------------------------------------------------------------- the worker classes


def _hooks_of(worker: Any) -> _Hooks:
    hooks = worker.__dict__.get("_z4j_hooks")
    if hooks is None:
        hooks = _Hooks(worker, getattr(worker, "z4j_client", None), getattr(worker, "z4j_serve_commands", True))
        worker.__dict__["_z4j_hooks"] = hooks
    return hooks


class WorkerMixin:
    """Put first among an RQ worker class's bases (as `Worker`,
    `SimpleWorker` and `SpawnWorker` here do): events around `execute_job`,
    worker.online/offline at `register_birth`/`register_death`, commands and
    health from the worker's main process."""

    #: The client; None: the process's default client (from the environment).
    z4j_client: Optional[Client] = None
    #: Whether the worker's main process serves the brain's commands.
    z4j_serve_commands: bool = True

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[misc]
        _hooks_of(self).online()

    def register_death(self) -> None:
        try:
            super().register_death()  # type: ignore[misc]
        finally:
            _hooks_of(self).offline()

    def execute_job(self, job: Any, queue: Any) -> Any:
        hooks = _hooks_of(self)
        attempt = hooks.before(job)
        try:
            return super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            hooks.after(job, attempt)

    def handle_job_failure(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        # In the work horse (or the main process for a killed horse): RQ
        # keeps no result for an attempt it retries, so its traceback is
        # handed to the main process here. Whatever RQ passes goes through
        # as it came: RQ 3 adds `execution=`, which RQ 2 does not take.
        try:
            exc_string = kwargs.get("exc_string", args[1] if len(args) > 1 else "")
            left = job.retries_left  # RQ 2.0 has no job.should_retry
            if isinstance(left, int) and left > 0 and getattr(self, "_stopped_job_id", None) != job.id:
                _hooks_of(self).stash_retry_traceback(job, exc_string)
        except Exception:
            pass
        return super().handle_job_failure(job, queue, *args, **kwargs)  # type: ignore[misc]


def _worker_classes() -> Dict[str, Any]:
    import rq
    from rq import worker as rq_worker

    out = {"Worker": rq.Worker, "SimpleWorker": rq.SimpleWorker}
    spawn = getattr(rq_worker, "SpawnWorker", None) or getattr(rq, "SpawnWorker", None)
    if spawn is not None:
        out["SpawnWorker"] = spawn
    return out


def _make_classes() -> Dict[str, Any]:
    made = {}
    for name, base in _worker_classes().items():
        cls = type(name, (WorkerMixin, base), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"RQ's `{base.__module__}.{base.__qualname__}` with z4j-agentd's events, commands and "
                       f"health (`WorkerMixin`).",
        })
        made[name] = cls
    return made


_classes = _make_classes()
Worker = _classes["Worker"]
SimpleWorker = _classes["SimpleWorker"]
SpawnWorker = _classes.get("SpawnWorker")


def install(target: Any = None, client: Optional[Client] = None, *, serve_commands: bool = True) -> Client:
    """Declares the engine `rq` on `client` (the process's default client
    without it) and returns the client.

    `target` an RQ worker (built by the program itself): it gets this
    integration (its class becomes the matching subclass with `WorkerMixin`
    first) before it starts working; `serve_commands` then says whether its
    main process serves the brain's commands. A worker already started
    (`register_birth` done) raises ValueError: wire it before `work()`.

    `target` None, a Redis connection or a queue (a process that only
    enqueues, such as a web app): nothing more happens. Such a process
    sends no events (the worker that runs each job sends its
    `task.received`, at the job's enqueue time) and serves no commands (the
    workers do).
    """
    from rq.worker import BaseWorker

    if isinstance(target, BaseWorker):
        _wire(target, client, serve_commands)
        hooks = _hooks_of(target)
        return hooks.client
    chosen = client or get_client()
    if ENGINE not in chosen._engines:
        chosen._add_engine(ENGINE)
    return chosen


def _wire(worker: Any, client: Optional[Client], serve_commands: bool) -> None:
    if getattr(worker, "birth_date", None) is not None and not isinstance(worker, WorkerMixin):
        raise ValueError(f"RQ worker {worker.name!r} has already started (register_birth ran); install it "
                         f"before calling its work(), or start it as `rq worker -w z4j_agentd.rq.Worker`")
    if not isinstance(worker, WorkerMixin):
        base = type(worker)
        if SpawnWorker is not None and isinstance(worker, _worker_classes()["SpawnWorker"]) \
                and base is not _worker_classes()["SpawnWorker"]:
            raise ValueError(f"install cannot wire a {base.__qualname__}: a spawn worker's work horse imports "
                             f"its class by name; put z4j_agentd.rq.WorkerMixin first in its bases instead")
        exact = {v: k for k, v in _worker_classes().items()}.get(base)
        cls = _classes[exact] if exact else _subclass(base)
        worker.__class__ = cls
    worker.z4j_client = client
    worker.z4j_serve_commands = serve_commands
    worker.__dict__.pop("_z4j_hooks", None)


_subclasses: Dict[Any, Any] = {}


def _subclass(base: Any) -> Any:
    cls = _subclasses.get(base)
    if cls is None:
        cls = type(f"Z4j{base.__name__}", (WorkerMixin, base), {"__module__": base.__module__})
        _subclasses[base] = cls
    return cls


__all__ = ["ENGINE", "SimpleWorker", "SpawnWorker", "Worker", "WorkerMixin", "install"]
