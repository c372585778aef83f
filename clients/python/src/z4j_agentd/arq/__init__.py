"""arq: job lifecycle events from the worker's hooks, worker.online and
worker.offline events, the brain's commands (`_commands`) and the
worker's health report (`_health`).

    from arq.connections import RedisSettings
    import z4j_agentd.arq

    class WorkerSettings:
        functions = [send_email]
        redis_settings = RedisSettings()
        allow_abort_jobs = True          # lets the brain cancel a running job

    z4j_agentd.arq.install(WorkerSettings)

`install` must run when the module defining the settings is imported (as
above, at module level): arq copies the settings once, when `arq
app.WorkerSettings` builds its Worker. It takes the settings class, a
settings dict, or a Worker built by hand. It chains the `on_startup`,
`on_shutdown` and `after_job_end` hooks the settings already have (each of
the application's own runs as before; `on_job_start` and `on_job_end` are
left alone), and replaces each entry of `functions` and `cron_jobs` by a
copy whose coroutine calls the original through a thin wrapper (same name,
timeout, tries and result settings).

Events (engine `arq`, `task_id` the arq job id, `worker` this worker's name,
`arq@<host>:<pid>` unless `install(worker_name=...)` names it):

| where | event | `data` |
|---|---|---|
| the job's function is called | `task.received` (the first time this process runs the job), `task.started` | task_name, queue, worker, args, kwargs, retry_count (job_try - 1) |
| `after_job_end`, the function returned | `task.succeeded` | task_name, queue, worker, result, runtime_ms, retry_count |
| `after_job_end`, the function raised | `task.failed` | task_name, queue, worker, exception, exception_message, traceback, runtime_ms, retry_count |
| `after_job_end`, `Retry` raised (or cancelled by a stopping worker): the job back in the queue | `task.retried` | task_name, queue, worker, reason, retry_count (job_try) |
| `after_job_end`, aborted (`Job.abort`, the brain's cancel) | `task.revoked` | task_name, queue, worker, aborted, runtime_ms |
| arq's log only: too many tries, expired, unknown function | `task.failed` | task_name, queue, worker, exception, exception_message |
| a job aborted before it started (arq's log, or the cancel that aborted it) | `task.revoked` | task_name, queue, worker, aborted, reason |
| `on_startup` | `worker.online` | worker, hostname, pid, concurrency (max_jobs), pool, queues, sw_ver |
| `on_shutdown` | `worker.offline` | worker, hostname, pid |

Everything runs on the worker's event loop, inline with the jobs, and never
blocks it: events go through the client's non-blocking `emit`, and what
the job got, returned or raised (with its traceback) is seen in-process,
with no Redis read in a job's path. Only a job cancelled by arq (aborted,
past its timeout, or stopped with the worker) has its end read back: from
arq's own log lines on `arq.worker` (a logging filter keyed by the job,
which lets every record through: a handler would silence Python's last
resort when no logging is configured) and the result arq stored (one GET).
The same filter sees the jobs arq ends without calling their function (too
many tries, expired, unknown function, aborted before they started); the
last is logged at INFO, which `arq` configures, and is also sent by the
cancel command that aborted it. With `keep_result = 0` and no INFO lines,
a cancelled job that left the queue before its timeout is taken as
aborted (a timeout is logged at ERROR, a stopping worker requeues it).

Commands are served by the worker process (`_commands`): they run on the
client's command threads and reach Redis through the worker's own pool on
its loop (`asyncio.run_coroutine_threadsafe`), with a deadline.

A producer (a web app enqueueing jobs) may install the pool it enqueues
with: `install(pool)` on an `ArqRedis` sends `task.received` with the job's
arguments for each `enqueue_job` of that pool object (nothing else of arq is
changed). The worker still sends its own at the job's first run (knowing
the producer's would take a Redis read in each job's path).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
import traceback as _traceback
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._redact import cut_text, event_value, exception_message
from ..client import Client, get_client

log = logging.getLogger("z4j_agentd.arq")

ENGINE = "arq"
#: args, kwargs and results longer than this as JSON are replaced by their start.
MAX_VALUE_BYTES = 64 * 1024
#: Jobs whose task.received this process sent (a retried job comes back
#: without a second one); the oldest are forgotten first.
REMEMBERED_IDS = 10000
#: Running jobs remembered at most (arq runs max_jobs at a time; an entry
#: whose after_job_end never came is dropped, oldest first, past
#: RUNNING_PER_SLOT * max_jobs, at least MIN_RUNNING, at most MAX_RUNNING).
MAX_RUNNING = 10000
RUNNING_PER_SLOT = 4
MIN_RUNNING = 64
#: Log records kept for jobs whose after_job_end has not come yet.
MAX_LOG_NOTES = 1000
#: arq's hooks the integration chains (the application's own run as before;
#: on_job_start and on_job_end are left as they are).
HOOKS = ("on_startup", "on_shutdown", "after_job_end")
DEFAULT_QUEUE = "arq:queue"
_MARK = "__z4j_agentd_arq__"


def _compact(data: Dict[str, Any], keep_none: Tuple[str, ...] = ()) -> Dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep_none}


def _function_name(fn: Any) -> Optional[str]:
    """The name a WorkerSettings.functions entry registers, as arq's `func` gives it."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "name", None)  # arq.worker.Function, arq.cron.CronJob
    if isinstance(name, str):
        return name
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else None


def _ms(start: Any, end: Any) -> Optional[int]:
    try:
        return max(0, int(round((end - start).total_seconds() * 1000)))
    except Exception:
        return None


class _Settings:
    """What the integration reads of the worker's settings: a WorkerSettings
    class (its own attributes, as arq reads them), a dict, or a Worker."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.worker = target if _is_worker(target) else None

    def get(self, name: str, default: Any = None) -> Any:
        t = self.target
        if isinstance(t, dict):
            return t.get(name, default)
        if self.worker is not None:
            return getattr(t, name, default)
        return vars(t).get(name, default)  # arq reads the class's own __dict__

    def set(self, name: str, value: Any) -> None:
        if isinstance(self.target, dict):
            self.target[name] = value
        else:
            setattr(self.target, name, value)

    def has(self, name: str) -> bool:
        t = self.target
        if isinstance(t, dict):
            return name in t
        return hasattr(t, name) if self.worker is not None else name in vars(t)

    def remove(self, name: str) -> None:
        if isinstance(self.target, dict):
            self.target.pop(name, None)
        elif self.worker is None and name in vars(self.target):
            delattr(self.target, name)

    @property
    def queue_name(self) -> str:
        q = self.get("queue_name", DEFAULT_QUEUE)
        return q if isinstance(q, str) and q else DEFAULT_QUEUE

    @property
    def max_jobs(self) -> int:
        n = self.get("max_jobs", 10)
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 10

    @property
    def allow_abort_jobs(self) -> bool:
        return bool(self.get("allow_abort_jobs", False))

    @property
    def deserializer(self) -> Any:
        return self.get("job_deserializer", None)

    def registered(self) -> List[str]:
        if self.worker is not None:
            names = list(getattr(self.worker, "functions", {}) or {})
            return sorted(n for n in names if isinstance(n, str))
        names = [_function_name(f) for f in (self.get("functions", ()) or ())]
        names += [_function_name(c) for c in (self.get("cron_jobs", ()) or ())]
        return sorted({n for n in names if n})

    def cron_names(self) -> List[str]:
        jobs = (getattr(self.worker, "cron_jobs", None) if self.worker is not None
                else self.get("cron_jobs", ())) or ()
        return [n for n in (_function_name(c) for c in jobs) if n]


def _is_worker(obj: Any) -> bool:
    try:
        from arq.worker import Worker
    except Exception:  # pragma: no cover - arq is installed wherever this runs
        return False
    return isinstance(obj, Worker)


def _is_pool(obj: Any) -> bool:
    try:
        from arq.connections import ArqRedis
    except Exception:  # pragma: no cover
        return False
    return isinstance(obj, ArqRedis)


class _Running:
    """A job this process runs, and how its function ended. Only what the
    end's event needs is kept, never the job's arguments, its live result
    or exception (whose traceback holds every frame's locals): an entry
    whose after_job_end never comes costs what its event would carry."""

    __slots__ = ("name", "job_try", "started", "ended", "returned", "result", "failure", "defer",
                 "exception", "message", "traceback", "aborted_here", "timeout")

    def __init__(self, name: Optional[str], job_try: Optional[int]) -> None:
        self.name, self.job_try = name, job_try
        self.started = time.monotonic()
        self.ended: Optional[float] = None
        #: True once the function returned (`result`: the event's value, cut
        #: and redacted), False once it raised (`failure` says how).
        self.returned: Optional[bool] = None
        self.result: Any = None
        #: "retry" (arq's Retry, `defer` its delay in ms), "cancelled"
        #: (CancelledError: aborted, timed out, or the worker stopping),
        #: "interrupted" (arq's RetryJob, a TimeoutError), "error" (the rest:
        #: `exception`, `message`, `traceback` as text).
        self.failure: Optional[str] = None
        self.defer: Any = None
        self.exception: Optional[str] = None
        self.message: Optional[str] = None
        self.traceback: Optional[str] = None
        #: Cancelled while a cancel_task of this process was aborting it.
        self.aborted_here = False
        #: The job's timeout in seconds (arq cancels it then), when known.
        self.timeout: Optional[float] = None

    def near_timeout(self) -> bool:
        """It ran (about) as long as its timeout: arq's timeout may have cancelled it."""
        return self.timeout is not None and self.runtime_ms() >= self.timeout * 1000 - 100

    def runtime_ms(self) -> int:
        return max(0, int(round(((self.ended or time.monotonic()) - self.started) * 1000)))


class _LogNotes(logging.Filter):
    """Keeps what arq's `arq.worker` log says of each job (its traceback,
    why it retried), and reports the jobs that end without any hook.

    A filter on the logger, not a handler: it sees each record the logger
    passes and lets every one through. A handler would count as one, so
    with no logging configured (a Worker run from code) Python's last
    resort would no longer print arq's own warnings and errors."""

    def __init__(self, integration: "_Integration") -> None:
        super().__init__()
        self.integration = integration
        self.notes: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self._notes_lock = threading.Lock()

    def note(self, ref: str, **what: Any) -> None:
        with self._notes_lock:
            self.notes.setdefault(ref, {}).update(what)
            self.notes.move_to_end(ref)
            while len(self.notes) > MAX_LOG_NOTES:
                self.notes.popitem(last=False)

    def take(self, ref: str) -> Dict[str, Any]:
        with self._notes_lock:
            return self.notes.pop(ref, {})

    def filter(self, record: logging.LogRecord) -> bool:  # never raises into arq, never drops a record
        try:
            self._read(record)
        except Exception:
            pass
        return True

    def _read(self, record: logging.LogRecord) -> None:
        msg, args = record.msg, record.args
        if not isinstance(msg, str) or not isinstance(args, tuple):
            return
        if msg.endswith("failed, %s: %s") and len(args) >= 4 and record.exc_info:
            exc_info = record.exc_info
            text = "".join(_traceback.format_exception(exc_info[0], exc_info[1], exc_info[2]))
            self.note(str(args[1]), outcome="failed", traceback=text)
        elif "retrying job in" in msg and len(args) >= 3:
            self.note(str(args[1]), outcome="retried", reason=f"Retry: again in {float(args[2]):.2f} s")
        elif msg.endswith("cancelled, will be run again") and len(args) >= 2:
            self.note(str(args[1]), outcome="retried",
                      reason="cancelled (the worker was stopping); arq runs it again")
        elif msg.endswith("%s aborted") and len(args) >= 2:
            self.note(str(args[1]), outcome="aborted")
        elif "← %s ●" in msg and len(args) >= 2:
            self.note(str(args[1]), outcome="succeeded")
        elif msg.endswith("aborted before start") and len(args) >= 3:
            self.integration.ended_without_hooks("task.revoked", str(args[1]), str(args[2]),
                                                 {"aborted": True, "reason": "aborted before it started"})
        elif msg.endswith("max retries %d exceeded") and len(args) >= 3:
            ref = str(args[1])
            if ":" in ref and ref not in self.integration.settings.cron_names():
                job_id, name = ref.rsplit(":", 1)
                self.integration.ended_without_hooks("task.failed", job_id, name, {
                    "exception": "JobExecutionFailed",
                    "exception_message": f"max {args[2]} retries exceeded"})
        elif msg == "job %s expired" and len(args) >= 1:
            self.integration.ended_without_hooks("task.failed", str(args[0]), None, {
                "exception": "JobExecutionFailed", "exception_message": "job expired"})
        elif msg == "job %s, function %r not found" and len(args) >= 2:
            self.integration.ended_without_hooks("task.failed", str(args[0]), str(args[1]), {
                "exception": "JobExecutionFailed",
                "exception_message": f"function {args[1]!r} not found on worker "
                                     f"{self.integration.worker_name}"})


class _Integration:
    """One installation: the hooks, the worker's state, the command handlers."""

    def __init__(self, target: Any, client: Optional[Client], serve_commands: bool,
                 worker_name: Optional[str]) -> None:
        self.settings = _Settings(target)
        #: None means the default client, looked up at each use.
        self.bound_client = client
        self.serve_commands = serve_commands
        self._worker_name = worker_name
        #: The worker's event loop and its ArqRedis pool, from on_startup.
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.redis: Any = None
        self.running: Dict[str, _Running] = {}  # insertion-ordered: oldest first
        self._received: "OrderedDict[str, None]" = OrderedDict()
        #: Jobs whose end (succeeded, failed, revoked) was sent, so a second
        #: report of the same end (arq's log, the cancel that aborted it) sends nothing.
        self._ended: "OrderedDict[str, str]" = OrderedDict()  # job id -> the end's kind
        #: Jobs a cancel_task of this process is aborting now (how many at once),
        #: and the running jobs seen cancelled meanwhile: the abort's confirmation
        #: when arq keeps no result (keep_result = 0).
        self._aborting: Dict[str, int] = {}
        self._abort_seen: "OrderedDict[str, None]" = OrderedDict()
        self._lock = threading.Lock()
        #: Jobs run per function name, and outcomes (the health report's `stats`).
        self.totals: Dict[str, int] = {}
        self.counts = {"succeeded": 0, "failed": 0, "retried": 0, "revoked": 0}
        self.outcomes_unknown = 0
        self.notes = _LogNotes(self)
        self.online = False
        self._serving = False
        self.originals: Dict[str, Any] = {}
        #: Hooks the settings did not have: taken away again by unwire.
        self._absent: set = set()
        self._raw: Dict[str, Any] = {}
        self.health: Any = None
        from . import _commands

        self.commands = _commands.ArqCommands(self)

    # -- names -------------------------------------------------------------

    @property
    def worker_name(self) -> str:
        if self._worker_name is None:
            self._worker_name = f"arq@{socket.gethostname()}:{os.getpid()}"
        return self._worker_name

    @property
    def queue_name(self) -> str:
        return self.settings.queue_name

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

    def _ref(self, job_id: str, name: Optional[str]) -> str:
        """The job as arq's log names it: the cron job's name, else `id:function`."""
        if name and name in self.settings.cron_names():
            return name
        return f"{job_id}:{name}"

    # -- wiring -----------------------------------------------------------

    def wire(self) -> None:
        for hook in HOOKS:
            current = self.settings.get(hook)
            self._raw[hook] = current  # put back as it was (a staticmethod stays one)
            if isinstance(current, staticmethod):
                current = current.__func__
            # Installed again: chain the application's hook, not our own wrapper.
            original = getattr(current, _MARK, current)
            self.originals[hook] = original
            if not self.settings.has(hook):
                self._absent.add(hook)
            self.settings.set(hook, self._wrapper(hook, original))
        self._wrap_functions()

    def unwire(self) -> None:
        logging.getLogger("arq.worker").removeFilter(self.notes)
        for hook in HOOKS:
            if hook in self.originals and hasattr(self.settings.get(hook), _MARK):
                if hook in self._absent:
                    self.settings.remove(hook)
                else:
                    raw = self._raw.get(hook)
                    self.settings.set(hook, raw if not hasattr(raw, _MARK) else self.originals[hook])
        worker = self.settings.worker
        for key in ("functions", "cron_jobs"):
            if key not in self.originals:
                continue
            if worker is not None:
                setattr(worker, key, self.originals[key])
            else:
                self.settings.set(key, self.originals[key])

    def _wrap_functions(self) -> None:
        """Each job function (and cron job) runs through `_job`, which sees
        its arguments, its return value or its exception (with its traceback)
        in-process: no Redis read in a job's path."""
        worker = self.settings.worker
        if worker is not None:  # built already: its own map and cron list
            self.originals["functions"] = dict(worker.functions)
            self.originals["cron_jobs"] = list(worker.cron_jobs)
            wrapped = {name: self._wrapped(entry) for name, entry in worker.functions.items()}
            worker.functions = wrapped
            worker.cron_jobs = [wrapped.get(c.name, c) for c in worker.cron_jobs]
            return
        for key in ("functions", "cron_jobs"):
            entries = self.settings.get(key)
            if entries is None:
                continue
            self.originals[key] = entries
            try:
                self.settings.set(key, [self._wrapped(entry) for entry in entries])
            except TypeError:  # not a sequence: arq will say so itself
                del self.originals[key]

    def _wrapped(self, entry: Any) -> Any:
        """A copy of a functions/cron_jobs entry whose coroutine is `_job`'s;
        the entry itself when it cannot be read (arq reports it when it
        builds the worker)."""
        import dataclasses

        from arq.cron import CronJob
        from arq.worker import Function, func

        try:
            if not isinstance(entry, (Function, CronJob)):
                entry = func(entry)  # a coroutine or an import path, as arq reads them
            return dataclasses.replace(entry, coroutine=self._job(entry.name, entry.coroutine,
                                                                  getattr(entry, "timeout_s", None)))
        except Exception:
            log.warning("z4j-agentd: arq job function %r is not watched (its jobs get no task.received and "
                        "task.started events)", entry, exc_info=True)
            return entry

    def _job_timeout(self) -> Optional[float]:
        """The worker's job_timeout in seconds (arq's default 300)."""
        if self.settings.worker is not None:
            value = getattr(self.settings.worker, "job_timeout_s", None)
        else:
            value = self.settings.get("job_timeout", 300)
        if hasattr(value, "total_seconds"):
            value = value.total_seconds()
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def _job(self, name: str, coroutine: Any, timeout_s: Optional[float] = None) -> Any:
        original = getattr(coroutine, _MARK, coroutine)
        integration = self
        timeout = timeout_s if isinstance(timeout_s, (int, float)) else self._job_timeout()

        @functools.wraps(original)
        async def job(ctx: Dict[Any, Any], *args: Any, **kwargs: Any) -> Any:
            run = integration._job_started(ctx, name, args, kwargs)
            if run is not None:
                run.timeout = timeout
            try:
                result = await original(ctx, *args, **kwargs)
            except BaseException as exc:
                if run is not None:
                    integration._job_raised(ctx, run, exc)
                raise
            if run is not None:
                integration._job_returned(run, result)
            return result

        setattr(job, _MARK, original)
        return job

    def _wrapper(self, hook: str, original: Any) -> Callable[[Dict[Any, Any]], Any]:
        ours = getattr(self, f"_{hook}")

        if hook in ("on_startup", "on_shutdown"):
            async def chained(ctx: Dict[Any, Any]) -> None:
                try:
                    if original is not None:
                        await original(ctx)
                finally:
                    await self._safely(hook, ours, ctx)
        else:
            async def chained(ctx: Dict[Any, Any]) -> None:
                await self._safely(hook, ours, ctx)
                if original is not None:
                    await original(ctx)

        chained.__name__ = chained.__qualname__ = f"z4j_agentd_{hook}"
        setattr(chained, _MARK, original)
        return chained

    async def _safely(self, hook: str, ours: Any, ctx: Dict[Any, Any]) -> None:
        try:
            await ours(ctx)
        except Exception:
            log.debug("z4j-agentd: arq %s not recorded", hook, exc_info=True)

    # -- the worker ---------------------------------------------------------

    async def _on_startup(self, ctx: Dict[Any, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.redis = ctx.get("redis")
        self.attach_log_notes()  # arq's CLI configured logging after the import
        if self.serve_commands:
            try:
                self.start_serving()
            except Exception:
                log.exception("z4j-agentd: could not start serving arq commands")
            try:
                from . import cron

                # The worker's cron jobs on the Schedules page (nothing when it has none).
                cron.serve(ctx, self.settings.target, self.client, queue_name=self.queue_name)
            except Exception:
                log.exception("z4j-agentd: could not serve the arq cron jobs")
        self.online = True
        self.emit("worker.online", "", self.worker_data(with_details=True))

    async def _on_shutdown(self, ctx: Dict[Any, Any]) -> None:
        if not self.online:
            return
        self.online = False
        self.emit("worker.offline", "", self.worker_data(with_details=False))
        self.loop = None  # commands from now on: "the worker is not running", not a blocked loop
        try:
            self.client.flush(timeout=1.0)  # the process exits next
        except Exception:  # pragma: no cover
            pass

    def attach_log_notes(self) -> None:
        logger = logging.getLogger("arq.worker")
        if self.notes not in logger.filters:
            logger.addFilter(self.notes)

    def start_serving(self) -> None:
        """The worker process's side of the brain: commands and health. Runs
        once, in on_startup."""
        if self._serving:
            return
        self._serving = True
        from . import _commands, _health

        self.client.serve(self.commands.handlers(), capabilities=_commands.capabilities(),
                          workers=[self.worker_name])
        self.health = _health.start(self)

    def worker_data(self, with_details: bool) -> Dict[str, Any]:
        data: Dict[str, Any] = {"worker": self.worker_name, "hostname": socket.gethostname(),
                                "pid": os.getpid()}
        if with_details:
            try:
                import arq.version

                data["sw_ver"] = getattr(arq.version, "VERSION", None)
            except Exception:  # pragma: no cover
                pass
            data.update(concurrency=self.settings.max_jobs, pool="arq", queues=[self.queue_name])
        return _compact(data)

    # -- jobs -----------------------------------------------------------------

    def _job_started(self, ctx: Dict[Any, Any], name: str, args: Tuple[Any, ...],
                     kwargs: Dict[str, Any]) -> Optional[_Running]:
        """task.received (the first time this process runs the job) and
        task.started, from inside the job's task, before its function runs."""
        try:
            job_id = str(ctx.get("job_id") or "")
            job_try = ctx.get("job_try")
            job_try = job_try if isinstance(job_try, int) else None
            run = _Running(name, job_try)
            limit = min(MAX_RUNNING, max(MIN_RUNNING, RUNNING_PER_SLOT * self.settings.max_jobs))
            with self._lock:
                self.running.pop(job_id, None)
                self.running[job_id] = run
                while len(self.running) > limit:
                    # A job whose after_job_end never came (arq failed to store its end).
                    self.running.pop(next(iter(self.running)))
                self.totals[name] = self.totals.get(name, 0) + 1
                self._ended.pop(job_id, None)  # a job id used again, once its result expired
                first_here = job_id not in self._received
                self._received[job_id] = None
                self._received.move_to_end(job_id)
                while len(self._received) > REMEMBERED_IDS:
                    self._received.popitem(last=False)
            data = _compact({
                "task_name": name,
                "queue": self.queue_name,
                "worker": self.worker_name,
                "args": event_value(list(args), MAX_VALUE_BYTES),
                "kwargs": event_value(dict(kwargs), MAX_VALUE_BYTES),
                "retry_count": job_try - 1 if job_try else None,
            })
            if first_here:
                # Same connection as task.started, so the brain gets the name and arguments first.
                self.emit("task.received", job_id, data)
            self.emit("task.started", job_id, data)
            return run
        except Exception:
            log.debug("z4j-agentd: arq job start not recorded", exc_info=True)
            return None

    def _job_returned(self, run: _Running, result: Any) -> None:
        run.ended, run.returned = time.monotonic(), True
        try:
            run.result = event_value(result, MAX_VALUE_BYTES)  # the event's value, not the live object
        except Exception:  # pragma: no cover - event_value never raises
            run.result = None

    def _job_raised(self, ctx: Dict[Any, Any], run: _Running, exc: BaseException) -> None:
        """What the end's event needs of the exception, as text: the live
        exception (its traceback holds every frame's locals) is not kept."""
        run.ended, run.returned = time.monotonic(), False
        try:
            from arq.worker import Retry

            if isinstance(exc, Retry):  # a failure like the rest when the worker has retry_jobs off
                run.failure, run.defer = "retry", getattr(exc, "defer_score", None)
                run.exception, run.message = "Retry", exception_message(exc)
            elif isinstance(exc, asyncio.CancelledError):
                run.failure = "cancelled"
                job_id = str(ctx.get("job_id") or "")
                with self._lock:
                    if job_id in self._aborting:
                        run.aborted_here = True
                        self._abort_seen[job_id] = None
                        while len(self._abort_seen) > MAX_LOG_NOTES:
                            self._abort_seen.popitem(last=False)
            elif isinstance(exc, asyncio.TimeoutError) or type(exc).__name__ == "RetryJob":
                run.failure = "interrupted"
            else:
                run.failure = "error"
                run.exception = type(exc).__name__
                run.message = exception_message(exc)
                tb = exc.__traceback__
                tb = tb.tb_next or tb if tb is not None else None  # from the job's function on, not this wrapper
                run.traceback = cut_text("".join(_traceback.format_exception(type(exc), exc, tb)))
        except Exception:
            log.debug("z4j-agentd: arq job end not recorded", exc_info=True)
            run.failure = run.failure or "error"

    async def _after_job_end(self, ctx: Dict[Any, Any]) -> None:
        """The job's end, once arq stored it: from what its function did,
        else (cancelled, or its function never ran) from arq's log and the
        result arq stored. The job stays in `running` until its end is sent
        (a cancel racing it then leaves the end to this hook)."""
        job_id = str(ctx.get("job_id") or "")
        with self._lock:
            run = self.running.get(job_id)
        try:
            await self._job_end(ctx, job_id, run)
        finally:
            with self._lock:
                if run is not None and self.running.get(job_id) is run:
                    del self.running[job_id]

    async def _job_end(self, ctx: Dict[Any, Any], job_id: str, run: Optional[_Running]) -> None:
        name = run.name if run is not None else None
        note = self.notes.take(self._ref(job_id, name))
        if run is None or run.returned is None:
            await self._end_from_arq(ctx, job_id, run, note)
            return
        base = {"task_name": name, "queue": self.queue_name, "worker": self.worker_name}
        retries = run.job_try - 1 if run.job_try else None
        if run.returned:
            self._count("succeeded")
            self._emit_end("task.succeeded", job_id, _compact({
                **base, "result": run.result, "runtime_ms": run.runtime_ms(),
                "retry_count": retries}, keep_none=("result",)))
            return
        if run.failure == "retry" and self.settings.get("retry_jobs", True):
            defer = run.defer
            self._count("retried")
            self.emit("task.retried", job_id, _compact({
                **base, "reason": f"Retry: again in {defer / 1000:.2f} s" if defer else "Retry",
                "retry_count": run.job_try}))
        elif run.failure in ("cancelled", "interrupted"):
            # Aborted, timed out, or stopped with the worker: arq's log and result say which.
            await self._end_from_arq(ctx, job_id, run, note)
        else:
            self._failed(job_id, base, None, run.traceback, run.runtime_ms(), retries,
                         exception=run.exception, message=run.message)

    async def _end_from_arq(self, ctx: Dict[Any, Any], job_id: str, run: Optional[_Running],
                            note: Dict[str, Any]) -> None:
        name = run.name if run is not None else None
        job_try = run.job_try if run is not None else ctx.get("job_try")
        own_ms = run.runtime_ms() if run is not None else None
        redis = ctx.get("redis") or self.redis
        result = None
        if redis is not None:
            from arq.jobs import Job

            result = await Job(job_id, redis, _queue_name=self.queue_name,
                               _deserializer=self.settings.deserializer).result_info()
        base = {"task_name": name or (result.function if result is not None else None),
                "queue": self.queue_name, "worker": self.worker_name}
        retries = job_try - 1 if isinstance(job_try, int) and job_try > 0 else None
        if result is not None:
            runtime_ms = _ms(result.start_time, result.finish_time)
            if result.success:
                self._count("succeeded")
                self._emit_end("task.succeeded", job_id, _compact({
                    **base, "result": event_value(result.result, MAX_VALUE_BYTES), "runtime_ms": runtime_ms,
                    "retry_count": retries}, keep_none=("result",)))
            elif isinstance(result.result, asyncio.CancelledError) and note.get("outcome") != "failed":
                self._count("revoked")
                self._emit_end("task.revoked", job_id, _compact({**base, "aborted": True,
                                                                 "runtime_ms": runtime_ms}))
            else:
                self._failed(job_id, base, result.result, note.get("traceback"), runtime_ms, retries)
            return
        outcome = note.get("outcome")
        if outcome is None and run is not None and run.aborted_here:
            outcome = "aborted"  # cancelled while this process's cancel_task aborted it
        if outcome is None and redis is not None:
            from arq.jobs import Job, JobStatus

            status = await Job(job_id, redis, _queue_name=self.queue_name).status()
            if status in (JobStatus.queued, JobStatus.deferred):
                outcome = "retried"
            elif (status == JobStatus.not_found and run is not None and run.failure == "cancelled"
                  and self.settings.allow_abort_jobs and not run.near_timeout()):
                # Cancelled before its timeout and gone with no result kept (keep_result = 0) and no
                # log line (a failure is logged at ERROR, a stopping worker puts the job back): an abort.
                outcome = "aborted"
        if outcome == "retried":
            self._count("retried")
            self.emit("task.retried", job_id, _compact({
                **base, "reason": note.get("reason") or "back in the queue for another try",
                "retry_count": job_try if isinstance(job_try, int) else None}))
        elif outcome == "succeeded":  # keep_result = 0: no result stored
            self._count("succeeded")
            self._emit_end("task.succeeded", job_id, _compact({**base, "result": None, "runtime_ms": own_ms,
                                                               "retry_count": retries}, keep_none=("result",)))
        elif outcome == "failed":
            self._failed(job_id, base, None, note.get("traceback"), own_ms, retries)
        elif outcome == "aborted":
            self._count("revoked")
            self._emit_end("task.revoked", job_id, _compact({**base, "aborted": True, "runtime_ms": own_ms}))
        else:
            with self._lock:
                self.outcomes_unknown += 1
            log.debug("z4j-agentd: arq job %s ended with no result stored (keep_result = 0?) and no log line "
                      "telling its outcome; no event sent for its end", job_id)

    def _failed(self, job_id: str, base: Dict[str, Any], exc: Any, tb_text: Optional[str],
                runtime_ms: Optional[int], retries: Optional[int], *, exception: Optional[str] = None,
                message: Optional[str] = None) -> None:
        self._count("failed")
        if not tb_text and isinstance(exc, BaseException):
            tb_text = "".join(_traceback.format_exception_only(type(exc), exc))
        if exception is None:
            exception = type(exc).__name__ if isinstance(exc, BaseException) else None
            message = exception_message(exc)
        if exception is None and tb_text:
            # The last line of the traceback: "ValueError: text".
            last = tb_text.strip().splitlines()[-1]
            exception = last.split(":", 1)[0].strip() or None
            message = message or exception_message(last.split(":", 1)[1].strip() if ":" in last else "")
        self._emit_end("task.failed", job_id, _compact({
            **base, "exception": exception, "exception_message": message,
            "traceback": cut_text(tb_text), "runtime_ms": runtime_ms, "retry_count": retries}))

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _mark_ended(self, job_id: str, kind: str) -> bool:
        """Records that the job's end is sent; False when it was already."""
        with self._lock:
            if job_id in self._ended:
                return False
            self._ended[job_id] = kind
            while len(self._ended) > REMEMBERED_IDS:
                self._ended.popitem(last=False)
            return True

    def _emit_end(self, kind: str, job_id: str, data: Dict[str, Any]) -> None:
        self._mark_ended(job_id, kind)
        self.emit(kind, job_id, data)

    def ended_without_hooks(self, kind: str, job_id: str, name: Optional[str], extra: Dict[str, Any]) -> bool:
        """A job arq ended without calling any hook: its log says so, or the
        cancel that aborted it before it started. Sent once per job, and
        never for a job this process runs (its after_job_end sends its end:
        a cancel that raced the job's pickup). True when it was sent."""
        outcome = {"task.revoked": "revoked", "task.failed": "failed"}[kind]
        with self._lock:
            if job_id in self.running:
                return False
        if not self._mark_ended(job_id, kind):
            return False
        self._count(outcome)
        self.emit(kind, job_id, _compact({"task_name": name, "queue": self.queue_name,
                                          "worker": self.worker_name, **extra}))
        return True

    # -- aborts of this process's cancel_task ----------------------------------

    def abort_started(self, job_id: str) -> None:
        with self._lock:
            self._aborting[job_id] = self._aborting.get(job_id, 0) + 1

    def abort_done(self, job_id: str) -> None:
        with self._lock:
            left = self._aborting.get(job_id, 0) - 1
            if left > 0:
                self._aborting[job_id] = left
            else:
                self._aborting.pop(job_id, None)

    def ended_as_revoked(self, job_id: str) -> bool:
        """This process sent the job's end as revoked (arq's log said it was aborted)."""
        with self._lock:
            return self._ended.get(job_id) == "task.revoked"

    def abort_confirmed(self, job_id: str) -> bool:
        """The job's function was cancelled here while a cancel_task aborted it."""
        with self._lock:
            return job_id in self._abort_seen

    def active(self) -> List[Dict[str, Any]]:
        """The jobs whose function is running now."""
        with self._lock:
            return [{"id": job_id, "name": run.name, "job_try": run.job_try}
                    for job_id, run in list(self.running.items()) if run.ended is None]


# ---------------------------------------------------------------- producers


def _instrument_pool(pool: Any, client: Optional[Client]) -> Client:
    """task.received for each job this ArqRedis pool enqueues."""
    enqueue = pool.enqueue_job
    original = getattr(enqueue, _MARK, enqueue)

    def target_client() -> Client:
        c = client or get_client()
        if ENGINE not in c._engines:
            c._add_engine(ENGINE)
        return c

    async def enqueue_job(function: str, *args: Any, **kwargs: Any) -> Any:
        job = await original(function, *args, **kwargs)
        if job is not None:  # None: a job with this id exists, nothing was enqueued
            try:
                queue = kwargs.get("_queue_name") or getattr(pool, "default_queue_name", None)
                job_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
                target_client().emit(ENGINE, "task.received", str(job.job_id), _compact({
                    "task_name": function, "queue": queue,
                    "args": event_value(list(args), MAX_VALUE_BYTES),
                    "kwargs": event_value(job_kwargs, MAX_VALUE_BYTES)}))
            except Exception:
                log.debug("z4j-agentd: arq enqueue not recorded", exc_info=True)
        return job

    setattr(enqueue_job, _MARK, original)
    pool.enqueue_job = enqueue_job
    return target_client()


# ---------------------------------------------------------------- install


_installed: Optional[_Integration] = None
_install_lock = threading.Lock()


def install(settings: Any, client: Optional[Client] = None, *, serve_commands: bool = True,
            worker_name: Optional[str] = None) -> Client:
    """Wires arq to `client` (without it, the process's default client as
    it is when each event happens, so `z4j_agentd.configure()` may run
    before or after). `settings` is:

    * the worker's settings (a WorkerSettings class, or a dict for
      `arq.worker.run_worker`), at import, before the Worker is built;
    * or a Worker built by hand (`Worker(...)`), before it runs;
    * or an `ArqRedis` pool of a producer: `task.received` for each job
      it enqueues (see the module).

    With `serve_commands` the worker serves the brain's commands and
    reports its health from on_startup on. `worker_name` names the worker in
    the brain (default `arq@<host>:<pid>`). Installing the same settings
    again changes nothing but `serve_commands`; other settings replace the
    earlier installation. Returns the client.
    """
    global _installed
    if _is_pool(settings):
        return _instrument_pool(settings, client)
    if not (isinstance(settings, (dict, type)) or _is_worker(settings)):
        raise TypeError(f"z4j_agentd.arq.install takes the worker's settings (a WorkerSettings class or a "
                        f"settings dict), an arq Worker or an ArqRedis pool; got {type(settings).__name__}")
    if worker_name is not None and (not isinstance(worker_name, str) or not worker_name.strip()
                                    or len(worker_name) > 200):
        raise ValueError(f"worker_name must be a non-empty name of at most 200 characters, got {worker_name!r}")
    with _install_lock:
        previous = _installed
        if previous is not None and previous.settings.target is settings and previous.bound_client is client:
            previous.serve_commands = previous.serve_commands or serve_commands
            return previous.client
        if previous is not None:
            previous.unwire()
        integration = _Integration(settings, client, serve_commands,
                                   worker_name.strip() if worker_name else None)
        integration.wire()
        integration.attach_log_notes()
        _installed = integration
    return integration.client


def uninstall() -> None:
    """Gives the settings their own hooks back (tests, reloads). A Worker
    already built keeps the hooks it copied."""
    global _installed
    with _install_lock:
        if _installed is not None:
            _installed.unwire()
            _installed = None


def installed() -> Optional[_Integration]:
    """The current installation (its client, worker name, counts), or None."""
    return _installed


__all__ = ["ENGINE", "install", "installed", "uninstall"]
