"""The brain's commands, as the worker's main process runs them.

Each handler takes the `command` message the daemon routed here and returns
the result map (the brain shows it as the command's result), or raises:
`BadCommand` when the parameters cannot work (the message says what to
change), `CommandFailed` when Celery or the broker did not do it. The
client answers `failed` with `"<ExceptionName>: <message>"` either way.
Handlers run on the client's command threads, never in a task's path.

Worker controls (restart_worker, pool_grow, pool_shrink, add_consumer,
cancel_consumer, rate_limit for a named worker) are run for this worker
only: a Celery remote-control command addressed to this worker's node name
(`destination=[name]`), so it executes on the worker's own loop, with its
reply awaited (`CONTROL_TIMEOUT`); no reply is a failed command saying so.

Every error text, and every note in a result that quotes an exception, is
masked as the health report's broker errors are (`_health.scrub`): no URL
credentials and none of the broker's or result backend's passwords, so a
broker exception that quotes its URL never carries the password to the
brain. An exception no handler expected answers `failed` as CommandFailed
naming the action and the exception's type.
"""

from __future__ import annotations

import os
import re
import signal as _signal
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._jsonsafe import json_safe
from .._redact import scrub_text
from . import _health, _queues
from ._util import attr as _attr
from .._integration import (BadCommand, bulk_filter, CommandFailed, eta_from_unix, first as _first,
                            params as _params, target as _target)

ENGINE = "celery"

#: Seconds to wait for this worker's reply to a remote-control command.
CONTROL_TIMEOUT = 5.0
#: Seconds cancel_task waits for every worker to say whether it holds the task.
QUERY_WAIT = 1.0
#: Tasks one bulk_retry re-sends at most, whatever its `max`.
BULK_RETRY_MAX = 1000
#: The signal a running task's process gets when the task is cancelled,
#: unless `install` (`cancel_signal=`) or this environment variable names
#: another.
CANCEL_SIGNAL_ENV = "Z4J_CELERY_CANCEL_SIGNAL"
DEFAULT_CANCEL_SIGNAL = "SIGTERM"
#: The signals a cancel may use: each ends a pool process unless the task
#: itself catches it (SIGKILL cannot be caught). Others (SIGINT, SIGUSR1,
#: SIGSTOP, ...) are ignored by Celery's pool processes or do not end them.
CANCEL_SIGNALS = ("SIGTERM", "SIGKILL", "SIGQUIT", "SIGHUP", "SIGABRT")
#: Seconds cancel_task waits, after the worker sent the signal, for the
#: process that ran the task to leave the worker's pool.
TERMINATE_WAIT = 10.0


#: The actions served, as the hello declares them.
ACTIONS = ("add_consumer", "bulk_retry", "cancel_consumer", "cancel_task", "pool_grow", "pool_shrink",
           "purge_queue", "rate_limit", "reconcile_task", "restart_worker", "retry_task", "submit_task")
#: Capability tokens beyond the actions.
TOKENS = ("retry_by_reference_v1",)

# Celery's rate grammar as the brain accepts it: "0" clears the limit.
_RATE_RE = re.compile(r"^(?:0|[1-9]\d*(?:/[smh])?)$")
# The brain's priority labels. RabbitMQ runs higher numbers first, and a
# message without a priority counts as 0 (the lowest); kombu's Redis
# transport runs lower numbers first, and a message without a priority goes
# to step 0 (the first). "normal", the label of an ordinary task, sets no
# priority, so a retried task queues as a fresh one does.
_PRIORITY_LABELS = {"critical": 9, "high": 6, "normal": None, "low": 0}
_REDIS_PRIORITY_LABELS = {"critical": 0, "high": 0, "normal": None, "low": 9}
# Result-backend states, as the brain's reconcile projection names them.
_RECONCILED = {"PENDING": "pending", "RECEIVED": "pending", "RETRY": "pending", "STARTED": "started",
               "SUCCESS": "success", "FAILURE": "failure", "REVOKED": "failure"}
_FINISHED = ("SUCCESS", "FAILURE", "REVOKED")
_MAX_EXCEPTION_CHARS = 2000


def _remapped_sigterm() -> Optional[str]:
    """billiard's REMAP_SIGTERM (read from the environment when billiard is
    imported): when set, Celery's pool processes ignore SIGTERM."""
    try:
        from billiard import common
        remap = getattr(common, "REMAP_SIGTERM", None)
    except Exception:  # pragma: no cover - billiard comes with Celery
        remap = os.environ.get("REMAP_SIGTERM")
    return str(remap) if remap else None


def resolve_signal(value: Any) -> str:
    """A signal given as `SIGTERM`, `TERM`, `sigkill`, a number or a digit
    string (`"9"`), as its canonical name (`SIGKILL`). Raises ValueError for
    anything that is not one of CANCEL_SIGNALS, saying why."""
    name: Optional[str] = None
    if isinstance(value, _signal.Signals):
        name = value.name
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if name is None and isinstance(value, int) and not isinstance(value, bool):
        try:
            name = _signal.Signals(value).name
        except ValueError:
            name = None
    elif name is None and isinstance(value, str) and value.strip():
        upper = value.strip().upper()
        upper = upper if upper.startswith("SIG") else f"SIG{upper}"
        if upper in _signal.Signals.__members__ and not upper.startswith("SIG_"):
            name = _signal.Signals[upper].name
    if name is None:
        raise ValueError(f"cancel signal {value!r} is not a signal this system knows; give one of "
                         f"{', '.join(CANCEL_SIGNALS)}")
    if name not in CANCEL_SIGNALS:
        raise ValueError(f"cancel signal {value!r} ({name}) would not end the process running the task "
                         f"(Celery's pool processes ignore SIGINT, and {name} does not terminate them); give "
                         f"one of {', '.join(CANCEL_SIGNALS)}")
    return name


def cancel_signal_from(value: Any = None) -> str:
    """The cancel signal: `value` (install's `cancel_signal`) if given, else
    $Z4J_CELERY_CANCEL_SIGNAL, else SIGTERM (SIGQUIT when billiard's
    REMAP_SIGTERM is set, since the pool processes then ignore SIGTERM).
    Raises ValueError, saying what to change, for a signal that would not
    end the task's process."""
    remap = _remapped_sigterm()
    if value is not None:
        name, source = resolve_signal(value), "cancel_signal"
    else:
        env = os.environ.get(CANCEL_SIGNAL_ENV, "").strip()
        if not env:
            return "SIGQUIT" if remap else DEFAULT_CANCEL_SIGNAL
        try:
            name, source = resolve_signal(env), CANCEL_SIGNAL_ENV
        except ValueError as exc:
            raise ValueError(f"{CANCEL_SIGNAL_ENV}: {exc}") from None
    if remap and name == "SIGTERM":
        raise ValueError(f"{source}: SIGTERM would not end the process running the task: REMAP_SIGTERM="
                         f"{remap} is set, so Celery's pool processes ignore SIGTERM; give SIGQUIT or SIGKILL "
                         f"(or leave the cancel signal unset: it is then SIGQUIT)")
    return name


# ---------------------------------------------------------------- parameters


def task_id_of_target(target: Any) -> Optional[str]:
    # The brain's task target id is "<engine>:<task id>" (plain for reconcile_task).
    if isinstance(target, dict) and isinstance(target.get("id"), str):
        ident = target["id"]
        prefix = f"{ENGINE}:"
        return ident[len(prefix):] if ident.startswith(prefix) else ident
    return None


def _task_id(command: Mapping[str, Any], action: str) -> str:
    task_id = _params(command).get("task_id") or task_id_of_target(command.get("target"))
    if not isinstance(task_id, str) or not task_id.strip():
        raise BadCommand(f"{action} needs parameters.task_id (the Celery task id)")
    return task_id.strip()


def _text(params: Mapping[str, Any], key: str, action: str, what: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadCommand(f"{action} needs parameters.{key} ({what}), got {value!r}")
    return value.strip()


def _positive_int(value: Any, action: str, key: str, default: Optional[int] = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadCommand(f"{action}: parameters.{key} must be a whole number >= 1, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadCommand(f"{action}: parameters.{key} must be a whole number >= 1, got {value!r}") from None
    if number < 1 or number != float(value):
        raise BadCommand(f"{action}: parameters.{key} must be a whole number >= 1, got {value!r}")
    return number


def priority_of(value: Any, transport: Optional[str] = None) -> Optional[int]:
    """An integer 0..255 as is; a label (critical, high, normal, low) as
    9, 6, none, 0, or on Redis (`transport` "redis", where lower runs first
    and a message without a priority runs with the first) 0, 0, none, 9;
    anything else None (the queue's default)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 255 else None
    if isinstance(value, str):
        labels = _REDIS_PRIORITY_LABELS if transport == "redis" else _PRIORITY_LABELS
        return labels.get(value.strip().lower())
    return None


def transport_of(app: Any) -> Optional[str]:
    """The broker transport's kind ("redis", "amqp", ...), without connecting."""
    try:
        conn = app.connection_for_write()
        try:
            kind = str(getattr(conn.transport, "driver_type", "") or "").lower()
        finally:
            conn.release()
    except Exception:
        return None
    return "redis" if "redis" in kind else kind or None


def from_result_backend(app: Any, task_id: str) -> Dict[str, Any]:
    """Name, args and kwargs as the result backend keeps them
    (`result_extended=True`); {} when it does not."""
    try:
        res = app.AsyncResult(task_id)
        out = {"task_name": getattr(res, "name", None), "args": getattr(res, "args", None),
               "kwargs": getattr(res, "kwargs", None), "queue": getattr(res, "queue", None)}
        return {k: v for k, v in out.items() if v is not None}
    except Exception:
        return {}


def _reply_text(reply: Any) -> str:
    if isinstance(reply, dict):
        for key in ("ok", "error"):
            if key in reply:
                return str(reply[key])
    return repr(reply)[:300]


def _pid(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _terminated_in(answer: str, task_id: str) -> bool:
    """Whether a revoke's answer ("terminate: <id>, <id>") names the task."""
    if not answer.startswith("terminate:"):
        return False
    return task_id in (part.strip() for part in answer[len("terminate:"):].split(","))


def _local_requests() -> Tuple[Dict[str, Any], set, set]:
    """This process's worker state: requests by id, active and reserved ones
    (empty outside a worker)."""
    try:
        from celery.worker import state as worker_state
    except Exception:  # pragma: no cover - Celery is installed wherever this runs
        return {}, set(), set()
    for _ in range(3):  # the worker's loop may change them while we copy
        try:
            return (dict(worker_state.requests), set(worker_state.active_requests),
                    set(worker_state.reserved_requests))
        except RuntimeError:
            continue
    return {}, set(), set()


# ---------------------------------------------------------------- the handlers


class CeleryCommands:
    """The command handlers of one installation (`_Hooks`): its app, its
    worker's node name, the tasks it remembers for retries."""

    def __init__(self, hooks: Any, cancel_signal: Optional[Any] = None) -> None:
        self.hooks = hooks
        self.cancel_signal = cancel_signal_from(cancel_signal)
        self._purge_lock = threading.Lock()
        self._secrets: Optional[List[str]] = None

    def scrub(self, text: str) -> str:
        """`text` without URL credentials and the broker's or result
        backend's passwords (read once, without connecting)."""
        if self._secrets is None:
            self._secrets = _health.broker_secrets(self.app)
        return _health.scrub(text, self._secrets)

    @property
    def app(self) -> Any:
        return self.hooks.app

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        return {(ENGINE, action): self._masked(action, getattr(self, action)) for action in ACTIONS}

    def _masked(self, action: str, handler: Any) -> Any:
        """`handler`, its exceptions' texts masked (see the module's
        documentation); BadCommand and CommandFailed keep their type."""
        def run(command: Dict[str, Any]) -> Any:
            try:
                return handler(command)
            except (BadCommand, CommandFailed) as exc:
                raise type(exc)(self.scrub(str(exc))) from None
            except Exception as exc:
                raise CommandFailed(f"{action} failed: {type(exc).__name__}: {self.scrub(str(exc))}") from None

        run.__name__ = run.__qualname__ = action
        run.__doc__ = handler.__doc__
        return run

    # -- worker controls ---------------------------------------------------

    def _own_worker(self, command: Mapping[str, Any], action: str, required: bool = True) -> Optional[str]:
        """The worker the command names, which must be this process's."""
        params = _params(command)
        target = _target(command)
        named = params.get("worker_name")
        if named is None and target.get("type") == "worker":
            named = target.get("id")
        own = self.hooks.hostname
        if named is None or (isinstance(named, str) and not named.strip()):
            if required:
                raise BadCommand(f"{action} names no worker: parameters.worker_name is required "
                                 f"(this process hosts {own!r})")
            return None
        if not isinstance(named, str):
            raise BadCommand(f"{action}: parameters.worker_name must be a worker's node name, got {named!r}")
        named = named.strip()
        if own is None:
            raise CommandFailed(f"{action} for worker {named!r}: this process (pid {os.getpid()}) hosts no "
                                f"Celery worker")
        if named != own:
            raise BadCommand(f"{action} for worker {named!r} reached pid {os.getpid()}, which hosts worker "
                             f"{own!r}; address the worker by its node name")
        return own

    def _control(self, command_name: str, worker: str, arguments: Optional[Dict[str, Any]] = None) -> str:
        """Runs a remote-control command on this worker and returns its `ok`
        text; raises CommandFailed on an error reply or none in time."""
        self._require_remote_control(command_name)
        try:
            replies = self.app.control.broadcast(command_name, arguments=arguments or {}, destination=[worker],
                                                 reply=True, timeout=CONTROL_TIMEOUT, limit=1)
        except Exception as exc:
            raise CommandFailed(f"{command_name} could not be sent to worker {worker!r} through the broker: "
                                f"{type(exc).__name__}: {self.scrub(str(exc))}") from None
        for reply in replies or []:
            if isinstance(reply, dict) and worker in reply:
                answer = reply[worker]
                if isinstance(answer, dict) and "error" in answer:
                    raise CommandFailed(f"worker {worker!r} refused {command_name}: {answer['error']}")
                return _reply_text(answer)
        raise CommandFailed(f"worker {worker!r} did not answer {command_name} within {CONTROL_TIMEOUT:.0f} s "
                            f"(its loop may be blocked, or it lost the broker); the command may still run")

    def _pool_size(self) -> Optional[int]:
        pool = _attr(self.hooks.worker, "pool")
        size = _attr(pool, "num_processes")
        if isinstance(size, int):
            return size
        inner = _attr(pool, "_pool")
        procs = _attr(inner, "_processes")
        return procs if isinstance(procs, int) else None

    def _pool_pids(self) -> Optional[List[int]]:
        try:
            info = self.hooks.worker.pool._get_info()  # what `inspect stats` shows as pool.processes
            pids = info.get("processes")
            return sorted(int(p) for p in pids) if isinstance(pids, list) else None
        except Exception:
            return None

    def restart_worker(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Restarts the worker's pool (every pool process is replaced) with
        Celery's `pool_restart`. Needs `worker_pool_restarts = True`; without
        it the command fails saying so, and nothing is stopped: the worker
        process itself is never shut down from the brain, since nothing here
        could start it again."""
        worker = self._own_worker(command, "restart_worker")
        conf = _attr(self.app, "conf")
        if not _attr(conf, "worker_pool_restarts", False):
            raise CommandFailed(
                f"restart_worker: worker {worker!r} has worker_pool_restarts off, so Celery cannot restart "
                f"its pool; set worker_pool_restarts = True in the app's configuration and restart the worker "
                f"once by hand (z4j-agentd never stops a worker process, which it could not start again)")
        before = self._pool_size()
        pids = self._pool_pids()
        answer = self._control("pool_restart", worker, {"reload": False})
        return {"worker": worker, "restarted": "pool", "reply": answer, "concurrency": before,
                "processes_before": pids,
                "how": "each pool process exits when it next looks for work (an idle one may first run one "
                       "more task) and a new one takes its place; running tasks finish"}

    def _resize(self, command: Dict[str, Any], action: str) -> Dict[str, Any]:
        worker = self._own_worker(command, action)
        delta = _positive_int(_params(command).get("delta"), action, "delta", default=1)
        before = self._pool_size()
        if action == "pool_shrink" and before is not None and delta >= before:
            raise BadCommand(f"pool_shrink by {delta} would leave worker {worker!r} with no pool process "
                             f"(it has {before}); shrink by at most {before - 1}")
        answer = self._control(action, worker, {"n": delta})
        return {"worker": worker, "delta": delta, "reply": answer, "concurrency_before": before,
                "concurrency_after": self._pool_size()}

    def pool_grow(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self._resize(command, "pool_grow")

    def pool_shrink(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self._resize(command, "pool_shrink")

    def _consumer(self, command: Dict[str, Any], action: str) -> Dict[str, Any]:
        worker = self._own_worker(command, action)
        queue = _text(_params(command), "queue", action, "the queue's name")
        answer = self._control(action, worker, {"queue": queue})
        return {"worker": worker, "queue": queue, "reply": answer}

    def add_consumer(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self._consumer(command, "add_consumer")

    def cancel_consumer(self, command: Dict[str, Any]) -> Dict[str, Any]:
        return self._consumer(command, "cancel_consumer")

    def rate_limit(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Sets a task's rate limit on this worker (when the command names
        it), or on every worker of the broker (worker_name null)."""
        params = _params(command)
        task_name = params.get("task_name")
        if not isinstance(task_name, str) or not task_name.strip():
            task_name = _target(command).get("id")
        if not isinstance(task_name, str) or not task_name.strip():
            raise BadCommand("rate_limit needs parameters.task_name (the task's registered name)")
        task_name = task_name.strip()
        rate = params.get("rate")
        rate = str(rate) if isinstance(rate, int) and not isinstance(rate, bool) else rate
        if not isinstance(rate, str) or not _RATE_RE.match(rate.strip()):
            raise BadCommand(f"rate_limit: invalid rate {rate!r}; use '0' to remove the limit, or '<n>', "
                             f"'<n>/s', '<n>/m', '<n>/h'")
        rate = rate.strip()
        worker = self._own_worker(command, "rate_limit", required=False)
        if worker is not None:
            answer = self._control("rate_limit", worker, {"task_name": task_name, "rate_limit": rate})
            return {"task_name": task_name, "rate": rate, "worker": worker, "reply": answer}
        self._require_remote_control("rate_limit")
        try:
            replies = self.app.control.broadcast("rate_limit", arguments={"task_name": task_name,
                                                                          "rate_limit": rate},
                                                 reply=True, timeout=QUERY_WAIT)
        except Exception as exc:
            raise CommandFailed(f"rate_limit could not be sent through the broker: {type(exc).__name__}: "
                                f"{self.scrub(str(exc))}") from None
        applied, refused = [], {}
        for reply in replies or []:
            for node, answer in (reply.items() if isinstance(reply, dict) else ()):
                if isinstance(answer, dict) and "error" in answer:
                    refused[node] = str(answer["error"])
                else:
                    applied.append(node)
        if not applied:
            why = f"; refused: {refused}" if refused else ""
            raise CommandFailed(f"rate_limit {task_name} {rate}: no worker applied it within "
                                f"{QUERY_WAIT:.0f} s{why}")
        return {"task_name": task_name, "rate": rate, "worker": None, "applied_by": sorted(applied),
                "refused_by": refused}

    # -- queues -------------------------------------------------------------

    def purge_queue(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Purges a queue at the depth the daemon confirmed: the queue is
        measured again, and when its depth is not `expected_depth` nothing is
        purged (unless `force`)."""
        params = _params(command)
        target = _target(command)
        queue = _first(params.get("queue"), target.get("queue"), target.get("id"))
        if not isinstance(queue, str) or not queue.strip():
            raise BadCommand("purge_queue needs parameters.queue (the queue's name)")
        queue = queue.strip()
        force = params.get("force", False)
        if not isinstance(force, bool):
            raise BadCommand(f"purge_queue: parameters.force must be true or false, got {force!r}")
        expected = params.get("expected_depth")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)
                                     or expected < 0):
            raise BadCommand(f"purge_queue: parameters.expected_depth must be a whole number >= 0, "
                             f"got {expected!r}")
        if expected is None and not force:
            raise BadCommand(f"purge_queue for queue {queue!r}: no expected_depth, so the purge is not "
                             f"confirmed; purge from the brain with the queue's observed depth (or force)")
        with self._purge_lock:  # two purges of one queue do not interleave here
            try:
                depth = _queues.depth(self.app, queue)
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r}: its depth could not be measured "
                                    f"({type(exc).__name__}: {self.scrub(str(exc))}); nothing was purged") from None
            if depth is None:
                raise CommandFailed(f"purge_queue: the broker does not know queue {queue!r}; nothing was "
                                    f"purged")
            if not force and depth != expected:
                raise CommandFailed(
                    f"purge_queue for queue {queue!r}: it holds {depth} messages now, the purge was confirmed "
                    f"at {expected}; nothing was purged. Re-issue the purge with the current depth")
            try:
                purged = _queues.purge(self.app, queue)
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r} failed: {type(exc).__name__}: "
                                    f"{self.scrub(str(exc))}") from None
        result = {"queue": queue, "depth_before": depth, "purged": purged, "force": force}
        if isinstance(purged, int) and purged > depth:
            # The broker purges what the queue holds when the purge runs, a moment after the measure.
            result["note"] = (f"{purged - depth} message(s) arrived between the measure and the purge and "
                              f"were purged too")
        return result

    # -- tasks --------------------------------------------------------------

    def _require_remote_control(self, action: str) -> None:
        if not _attr(_attr(self.app, "conf"), "worker_enable_remote_control", True):
            raise CommandFailed(f"{action}: the app sets worker_enable_remote_control = False, so its workers "
                                f"take no remote-control command and {action} needs one; set it to True and "
                                f"restart the workers")

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Revokes the task on every worker, and terminates it where it runs
        (with the cancel signal). The result says what it was doing:
        `state_before` is `running` (a worker was executing it),
        `queued` (a worker held it, received and not started),
        `finished` (it ended before the cancel reached it) or `unknown` (no
        worker that answered holds it: still in the broker, or an unknown
        id; every running worker discards it if it comes).

        `terminated: true` means the process that ran the task is gone: each
        worker running it confirmed sending the signal, and the process the
        task ran in (its `worker_pid`) then left that worker's pool within
        TERMINATE_WAIT. A process still there is a failed command saying
        so. Where the task has no process of its own (the threads, gevent,
        eventlet pools), nothing can be checked: `terminated` is false and
        `detail` says why."""
        task_id = _task_id(command, "cancel_task")
        self._require_remote_control("cancel_task")
        sig = self.cancel_signal
        holders, pids = self._who_holds(task_id)
        running = sorted(node for node, state in holders.items() if state == "active")
        queued = sorted(node for node, state in holders.items() if state != "active")
        try:
            # The workers holding it, awaiting their answers (revoke flags the id, terminate=True
            # signals the process where it runs); without a holder, every worker, briefly.
            replies = self.app.control.revoke(task_id, terminate=True, signal=sig,
                                              destination=sorted(holders) if holders else None, reply=True,
                                              timeout=CONTROL_TIMEOUT if holders else QUERY_WAIT)
        except Exception as exc:
            raise CommandFailed(f"cancel_task {task_id}: the revoke could not be sent through the broker "
                                f"({type(exc).__name__}: {self.scrub(str(exc))}); the task was not cancelled") from None
        result: Dict[str, Any] = {"task_id": task_id, "revoked": True, "terminated": False, "signal": sig,
                                  "worker": None}
        if holders:
            # Then every worker, so that a copy anywhere else (a redelivery) is discarded too.
            try:
                self.app.control.revoke(task_id, terminate=True, signal=sig)
            except Exception as exc:
                result["note"] = self.scrub(f"the workers holding the task got the revoke, the others did not "
                                            f"({type(exc).__name__}: {exc}): a copy delivered to another worker "
                                            f"may run")
        answers: Dict[str, str] = {}
        for reply in replies or []:
            if isinstance(reply, dict):
                answers.update({node: _reply_text(answer) for node, answer in reply.items()})
        signalled = sorted(node for node, text in answers.items() if _terminated_in(text, task_id))
        result["workers_answered"] = len(answers)
        if running:
            return self._cancel_running(task_id, sig, running, pids, answers, signalled, result)
        if queued:
            result.update(state_before="queued", worker=queued[0])
            if len(queued) > 1:
                result["workers"] = queued
            return result
        if signalled:
            # A worker that did not answer the query in time held it after all.
            result.update(state_before="unknown", worker=signalled[0], signal_sent=True,
                          detail=f"worker {signalled[0]!r} held the task (it had not answered the query within "
                                 f"{QUERY_WAIT:.0f} s) and sent it {sig}; whether it was running, and whether its "
                                 f"process ended, was not checked")
            return result
        finished_state = self._backend_state(task_id)
        if finished_state in _FINISHED:
            result.update(state_before="finished", celery_state=finished_state)
        else:
            result.update(state_before="unknown")
        return result

    def _cancel_running(self, task_id: str, sig: str, running: List[str], pids: Dict[str, Optional[int]],
                        answers: Dict[str, str], signalled: List[str], result: Dict[str, Any]) -> Dict[str, Any]:
        """Every worker running the task must confirm the signal (a task
        redelivered to a second worker runs on both), and each process that
        ran it must then be gone."""
        ended = [node for node in running if answers.get(node) == "terminate: tasks unknown"]
        unconfirmed = {node: (f"it answered {answers[node]!r}" if node in answers else
                              f"it did not answer within {CONTROL_TIMEOUT:.0f} s")
                       for node in running if node not in signalled and node not in ended}
        if unconfirmed:
            why = "; ".join(f"{node!r}: {text}" for node, text in unconfirmed.items())
            raise CommandFailed(f"cancel_task {task_id}: the task is running on worker(s) "
                                f"{', '.join(map(repr, unconfirmed))}, which did not confirm terminating it "
                                f"({why}); it is revoked, but may still be running")
        confirmed = [node for node in running if node in signalled]
        if not confirmed:
            # Each worker no longer had it when the revoke came: it finished meanwhile.
            result.update(state_before="finished", celery_state=self._backend_state(task_id), worker=running[0],
                          detail=f"the task finished on {', '.join(map(repr, running))} before the revoke "
                                 f"reached it")
            return result
        waiting = {node: pids.get(node) for node in confirmed}
        outcome = self._await_exit(task_id, sig, waiting)
        result.update(state_before="running", worker=confirmed[0],
                      processes={node: pid for node, pid in waiting.items()})
        if len(confirmed) > 1:
            result["workers"] = confirmed
        unchecked = {node: why for node, why in outcome.items() if why}
        if unchecked:
            result.update(terminated=False, signal_sent=True,
                          detail="; ".join(f"worker {node!r}: {why}" for node, why in unchecked.items()))
        else:
            result["terminated"] = True
        if ended:
            result["finished_on"] = ended
        return result

    def _await_exit(self, task_id: str, sig: str, waiting: Dict[str, Optional[int]]) -> Dict[str, Optional[str]]:
        """Waits for each worker's process that ran the task to leave its
        pool. Returns, per worker, None (gone) or why it could not be
        checked; raises CommandFailed when a process is still there after
        TERMINATE_WAIT."""
        outcome: Dict[str, Optional[str]] = {}
        pending: Dict[str, int] = {}
        for node, pid in waiting.items():
            if not isinstance(pid, int) or pid <= 0:
                outcome[node] = (f"it sent {sig}, but the process running the task is not known (its pool "
                                 f"gave no worker_pid), so whether it ended was not checked")
            else:
                pending[node] = pid
        deadline = time.monotonic() + TERMINATE_WAIT
        last: Dict[str, str] = {}
        while pending:
            for node, pid in list(pending.items()):
                gone, why = self._process_gone(node, pid, deadline)
                if gone is None:
                    outcome[node] = why
                    del pending[node]
                elif gone:
                    outcome[node] = None
                    del pending[node]
                else:
                    last[node] = why or "it is still in the worker's pool"
            if not pending:
                break
            if time.monotonic() >= deadline:
                state = self._backend_state(task_id)
                after = f"; the result backend says {state}" if state in _FINISHED else ""
                alive = ", ".join(f"pid {pid} on worker {node!r} ({last.get(node)})" for node, pid in pending.items())
                raise CommandFailed(f"cancel_task {task_id}: {sig} was sent, but the process running the task is "
                                    f"still alive after {TERMINATE_WAIT:.0f} s: {alive}{after}. The task may "
                                    f"catch {sig}; SIGKILL cannot be caught (Z4J_CELERY_CANCEL_SIGNAL=SIGKILL). "
                                    f"It is revoked, but may still be running")
            time.sleep(0.2)
        return outcome

    def _process_gone(self, node: str, pid: int, deadline: float) -> Tuple[Optional[bool], Optional[str]]:
        """(True, None) when pid left the worker's pool; (False, why) while
        it is there; (None, why) when the pool runs tasks in the worker's
        own process, so there is no process of the task's to end."""
        if node == self.hooks.hostname:
            if pid == os.getpid():
                return None, (f"its pool runs tasks in the worker's own process (pid {pid}), so no process "
                              f"could end; Celery asked the task to stop, which it may ignore")
            pool = self._pool_pids()
            if pool is None:
                return None, (f"its pool lists no processes (tasks run as greenlets), so whether the task's "
                              f"{pid} ended was not checked; Celery asked it to stop, which it may ignore")
            return (pid not in pool), None
        try:
            wait = max(0.5, min(CONTROL_TIMEOUT, deadline - time.monotonic()))
            stats = (self.app.control.inspect(destination=[node], timeout=wait).stats() or {}).get(node)
        except Exception as exc:
            return False, self.scrub(f"its pool could not be read: {type(exc).__name__}: {exc}")
        if not isinstance(stats, dict):
            return False, "it did not answer inspect stats"
        if stats.get("pid") == pid:
            return None, (f"its pool runs tasks in the worker's own process (pid {pid}), so no process "
                          f"could end; Celery asked the task to stop, which it may ignore")
        processes = _attr(stats.get("pool"), "processes")
        if not isinstance(processes, list):
            return None, (f"its pool ({_attr(stats.get('pool'), 'implementation', 'unknown')}) lists no "
                          f"processes (tasks run as greenlets), so whether the task's {pid} ended was not "
                          f"checked; Celery asked it to stop, which it may ignore")
        return (pid not in processes), None

    def _who_holds(self, task_id: str) -> Tuple[Dict[str, str], Dict[str, Optional[int]]]:
        """Which workers hold the task and how (active, reserved, scheduled),
        and the pid of the process running it where one does."""
        held: Dict[str, str] = {}
        pids: Dict[str, Optional[int]] = {}
        requests, active, reserved = _local_requests()
        own = self.hooks.hostname
        local = requests.get(task_id)
        if own and local is not None:
            held[own] = "active" if local in active else "reserved"
            pids[own] = _pid(_attr(local, "worker_pid"))
        try:
            replies = self.app.control.inspect(timeout=QUERY_WAIT).query_task(task_id) or {}
        except Exception:
            replies = {}
        for node, tasks in replies.items() if isinstance(replies, dict) else ():
            info = tasks.get(task_id) if isinstance(tasks, dict) else None
            if isinstance(info, (list, tuple)) and info:
                state = str(info[0])
                if state in ("active", "reserved", "scheduled"):
                    held[node] = "active" if held.get(node) == "active" else state
                    if pids.get(node) is None and len(info) > 1:
                        pids[node] = _pid(_attr(info[1], "worker_pid"))
        return held, pids

    def _backend_state(self, task_id: str) -> Optional[str]:
        if _attr(_attr(self.app, "conf"), "task_always_eager", False):
            return None  # eager tasks store no results
        try:
            return str(self.app.AsyncResult(task_id).state)
        except Exception:
            return None

    def _remembered(self, task_id: str) -> Dict[str, Any]:
        remembered = getattr(self.hooks, "remembered", None)
        return remembered(task_id) if remembered is not None else {}

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Re-sends the task by reference: same name, the original args and
        kwargs (or the operator's overrides), a new task id."""
        params = _params(command)
        task_id = _task_id(command, "retry_task")
        return self._retry_one(task_id, params)

    def _retry_one(self, task_id: str, params: Mapping[str, Any],
                   priority_given: Any = None) -> Dict[str, Any]:
        kept = self._remembered(task_id)
        # Arguments too large to keep in memory (or never received here):
        # the result backend may keep them (result_extended).
        stored = from_result_backend(self.app, task_id) if "args" not in kept else {}
        name = params.get("task_name") or kept.get("task_name") or stored.get("task_name")
        if not isinstance(name, str) or not name:
            raise BadCommand(
                f"cannot retry {task_id}: its task name is unknown here (the brain sent none, this "
                f"worker did not receive it, and the result backend does not keep it)")
        args = _first(params.get("override_args"), params.get("args"), kept.get("args"), stored.get("args"))
        kwargs = _first(params.get("override_kwargs"), params.get("kwargs"), kept.get("kwargs"),
                             stored.get("kwargs"))
        if args is None and kwargs is None and params.get("original_had_args") is not False:
            if kept.get("args_left_out"):
                raise BadCommand(
                    f"cannot retry {task_id} by reference: its original arguments are not known here "
                    f"(this worker received it but did not keep them: {kept['args_left_out']}; and the "
                    f"result backend does not keep them); set result_extended=True in the Celery app's "
                    f"configuration so the result backend keeps every task's arguments, or retry with "
                    f"override_args/override_kwargs")
            raise BadCommand(
                f"cannot retry {task_id} by reference: its original arguments are not known here (this "
                f"worker did not receive it and the result backend does not keep them; set "
                f"result_extended=True, or give override_args/override_kwargs)")
        if args is not None and not isinstance(args, (list, tuple)):
            raise BadCommand(f"cannot retry {task_id}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"cannot retry {task_id}: kwargs must be a map, got {type(kwargs).__name__}")
        options: Dict[str, Any] = {}
        queue = kept.get("queue") or stored.get("queue")
        if queue:
            options["queue"] = queue
        eta = params.get("eta")
        if eta is not None:
            options["eta"] = eta_from_unix(eta)
        elif params.get("eta_seconds") is not None:
            try:
                options["countdown"] = max(0.0, float(params["eta_seconds"]))
            except (TypeError, ValueError):
                raise BadCommand(f"eta_seconds must be a number, got {params['eta_seconds']!r}") from None
        priority = priority_of(_first(priority_given, params.get("priority")), transport_of(self.app))
        if priority is not None:
            options["priority"] = priority
        new_id = self._send(name, args, kwargs, options, f"cannot retry {task_id}: {name} could not be sent")
        return json_safe({"task_id": task_id, "new_task_id": new_id,
                          "task_name": name, "queue": queue, "priority": priority})

    def _send(self, name: str, args: Any, kwargs: Any, options: Dict[str, Any], failed: str) -> Optional[str]:
        """`app.send_task`; the new task's id. A broker error is CommandFailed,
        `failed` followed by the error (masked)."""
        try:
            result = self.app.send_task(name, args=list(args or []), kwargs=dict(kwargs or {}), **options)
        except Exception as exc:
            raise CommandFailed(f"{failed} ({type(exc).__name__}: {self.scrub(str(exc))})") from None
        new_id = _attr(result, "id") or _attr(result, "task_id")
        return str(new_id) if new_id else None

    def bulk_retry(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Retries each task of `filter.task_ids` by reference, as retry_task
        does (names from `filter.task_names`, priorities from
        `filter.task_priorities`), at most `max` (and BULK_RETRY_MAX)."""
        params = _params(command)
        filt, ids = bulk_filter(command, "Celery task ids", "task ids")
        limit = min(_positive_int(params.get("max"), "bulk_retry", "max", default=BULK_RETRY_MAX),
                    BULK_RETRY_MAX)
        names = filt.get("task_names") if isinstance(filt.get("task_names"), dict) else {}
        priorities = filt.get("task_priorities") if isinstance(filt.get("task_priorities"), dict) else {}
        unique: List[str] = list(dict.fromkeys(ids))
        capped = len(unique) > limit
        new_task_ids: Dict[str, Optional[str]] = {}
        failures: Dict[str, str] = {}
        for task_id in unique[:limit]:
            one = {"task_name": names.get(task_id), "original_had_args": True}
            try:
                out = self._retry_one(task_id, one, priority_given=priorities.get(task_id))
                new_task_ids[task_id] = out["new_task_id"]
            except Exception as exc:
                failures[task_id] = self.scrub(f"{type(exc).__name__}: {exc}")[:500]
        if not new_task_ids:
            sample = "; ".join(f"{k}: {v}" for k, v in list(failures.items())[:3])
            raise CommandFailed(f"bulk_retry retried none of the {min(len(unique), limit)} tasks: {sample}")
        return {"requested": len(ids), "attempted": min(len(unique), limit), "succeeded": len(new_task_ids),
                "failed": len(failures), "capped": capped, "max": limit, "new_task_ids": new_task_ids,
                "failures": failures}

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Enqueues a task by name (the brain's "run now" of a schedule it
        fires itself): `name`, `args`, `kwargs`, `queue`, `eta`, `priority`."""
        params = _params(command)
        name = _first(params.get("name"), params.get("task_name"), _target(command).get("name"))
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the task's registered name)")
        name = name.strip()
        args = params.get("args")
        kwargs = params.get("kwargs")
        if args is not None and not isinstance(args, list):
            raise BadCommand(f"submit_task {name}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"submit_task {name}: kwargs must be a map, got {type(kwargs).__name__}")
        queue = params.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise BadCommand(f"submit_task {name}: queue must be a queue's name or null, got {queue!r}")
        queue = queue.strip() if queue else None  # "" or null: the task's own routing
        options: Dict[str, Any] = {}
        if queue:
            options["queue"] = queue
        if params.get("eta") is not None:
            options["eta"] = eta_from_unix(params["eta"])
        priority = priority_of(params.get("priority"), transport_of(self.app))
        if priority is not None:
            options["priority"] = priority
        new_id = self._send(name, args, kwargs, options, f"submit_task {name}: the task could not be sent")
        return json_safe({"task_id": new_id, "engine": ENGINE, "task_name": name,
                          "queue": options.get("queue"), "priority": priority})

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The task's state as a worker knows it (running or waiting: this
        one, else the one that answers `query_task`), else as the result
        backend keeps it. `engine_state` is one of
        the brain's pending, started, success, failure, or unknown when
        neither knows the task (Celery's PENDING for an id the backend has
        no record of is not a state)."""
        task_id = _task_id(command, "reconcile_task")
        requests, active, _reserved = _local_requests()
        local = requests.get(task_id)
        if local is not None:
            started = local in active and bool(_attr(local, "time_start"))
            return {"task_id": task_id, "engine_state": "started" if started else "pending",
                    "finished_at": None, "exception": None, "source": "worker",
                    "worker": self.hooks.hostname}
        # Another worker may hold it (its own state beats the backend's, which
        # says STARTED only with task_track_started).
        held, _pids = self._who_holds(task_id)
        if held:
            node = sorted(held, key=lambda n: (held[n] != "active", n))[0]
            return {"task_id": task_id, "engine_state": "started" if held[node] == "active" else "pending",
                    "finished_at": None, "exception": None, "source": "worker", "worker": node}
        backend = _attr(self.app, "backend")
        if backend is None or type(backend).__name__ == "DisabledBackend":
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "source": None, "detail": "this worker does not hold the task and the app has no result "
                                              "backend"}
        try:
            res = self.app.AsyncResult(task_id)
            state = str(res.state)
        except Exception as exc:
            raise CommandFailed(f"reconcile_task {task_id}: the result backend could not be read "
                                f"({type(exc).__name__}: {self.scrub(str(exc))})") from None
        if state == "PENDING":
            return {"task_id": task_id, "engine_state": "unknown", "finished_at": None, "exception": None,
                    "source": "result_backend", "celery_state": state,
                    "detail": "this worker does not hold the task and the result backend has no record of it"}
        engine_state = _RECONCILED.get(state, "unknown")
        finished_at = None
        if state in _FINISHED:
            done = _attr(res, "date_done")
            if isinstance(done, datetime):
                done = done if done.tzinfo else done.replace(tzinfo=timezone.utc)
                finished_at = done.isoformat()
        exception = None
        if state == "FAILURE":
            exc = _attr(res, "result")
            exception = (f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException)
                         else str(_attr(res, "traceback") or "") or None)
        elif state == "REVOKED":
            exception = "revoked"
        if exception:
            exception = scrub_text(exception[:_MAX_EXCEPTION_CHARS + 512])[:_MAX_EXCEPTION_CHARS]
        return {"task_id": task_id, "engine_state": engine_state, "finished_at": finished_at,
                "exception": exception, "source": "result_backend", "celery_state": state}


def capabilities() -> Dict[str, List[str]]:
    """The capability tokens beyond the handlers' actions."""
    return {ENGINE: list(TOKENS)}
