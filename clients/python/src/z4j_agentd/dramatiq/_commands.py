"""The brain's commands, as a Dramatiq worker process runs them.

Each worker process serves them once it booted (`after_worker_boot`); the
daemon hands a command to one of them. Every handler takes the `command`
message and returns the result map, or raises `BadCommand` (the
parameters cannot work; the message says what to change) or
`CommandFailed` (Dramatiq or the broker did not do it). Error texts are
scrubbed of URL passwords and secret-looking parts.

* `submit_task`: sends a message to an actor by name (`name`/`task_name`,
  `args`, `kwargs`, `queue`, `eta` in unix seconds as a delay).
* `retry_task`: sends the task again as a new message: the operator's
  `override_args`/`override_kwargs`, else the arguments this process
  remembers of it, else those of its dead letter (or its message still
  waiting) on Redis.
* `cancel_task`: with dramatiq-abort's `Abortable` on the broker, aborts
  the message: a running one is interrupted in its worker thread (any
  worker process; CPython raises the exception between two bytecodes, so a
  thread blocked in a C call such as `time.sleep` stops once it returns),
  a waiting or delayed one is skipped when it comes up (within
  CANCEL_TTL_MS). An interrupted message goes through Retries as any
  exception would (as with dramatiq-abort alone): a retry it schedules is
  skipped when it comes up, since the cancel stays for CANCEL_TTL_MS.
  `terminated` is true only when this process saw the Abort stop it.
  Without `Abortable` it fails at once, saying how to add it.
* `purge_queue`: at the depth the daemon confirmed (`expected_depth`),
  deletes the queue's waiting messages, checked and done in one atomic
  step on Redis; messages a worker already fetched (prefetched or
  running), delayed messages and dead letters stay.
* `reconcile_task`: the message's state as this process or the broker
  knows it (running here, waiting, delayed, dead, or the Results backend);
  `unknown` for a message another worker process holds and for a retry
  waiting its backoff, so the brain keeps the state its events gave.
* `dlq.list` (capability `list_dead_letters`): a page of dead letters,
  newest first, as the brain's Dead letters page asks for it.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from dramatiq.common import q_name

from .._jsonsafe import json_safe
from .._redact import event_value, scrub_text
from . import _broker
from .._integration import (BadCommand, CommandFailed, first as _first, params as _params, target as _target,
                            task_id as _command_task_id)

ENGINE = "dramatiq"

#: Tokens beyond the actions: retries by reference (z4j's contract).
TOKENS = ("retry_by_reference_v1",)
#: How long (ms) a cancel keeps a message that has not started from
#: starting: Dramatiq delays a message by at most 7 days.
CANCEL_TTL_MS = 7 * 24 * 3600 * 1000
#: Seconds cancel_task waits for a message running in this process to stop.
CANCEL_WAIT = 10.0
#: Scans of the broker's queues (a message whose place this process does
#: not know) that run at once at most, and the seconds a reconcile waits
#: for its turn before it answers `unknown` (the brain probes again later).
MAX_SCANS = 2
SCAN_WAIT = 5.0
_scans = threading.BoundedSemaphore(MAX_SCANS)
#: Dead letters per page at most (the brain's limit) and by default.
DLQ_MAX_LIMIT = 200
DLQ_DEFAULT_LIMIT = 100
#: A result read from the Results backend is cut to this (as an event's).
MAX_RESULT_BYTES = 64 * 1024
#: A dead letter's error excerpt: its traceback's last characters.
EXCERPT_CHARS = 512
_ETA_MAX_PAST_SECONDS = 60
_ETA_MAX_FUTURE_SECONDS = 7 * 24 * 3600

ABORT_HOWTO = ("add dramatiq-abort's Abortable middleware to the broker, in the module that builds it, and "
               "restart the workers: `pip install dramatiq-abort`, then `from dramatiq_abort import Abortable, "
               "backends` and `broker.add_middleware(Abortable(backend=backends.RedisBackend(client="
               "broker.client)))`")


_BUSY: Any = object()


def _task_id(command: Mapping[str, Any], action: str) -> str:
    return _command_task_id(command, ENGINE, action, "the Dramatiq message id")


def _delay_ms(eta: Any) -> int:
    """A unix time in seconds as a delay from now in ms (0 when due)."""
    if isinstance(eta, bool):
        raise BadCommand(f"eta must be a unix time in seconds, got {eta!r}")
    try:
        when = float(eta)
    except (TypeError, ValueError):
        raise BadCommand(f"eta must be a unix time in seconds, got {eta!r}") from None
    delta = when - time.time()
    if delta < -_ETA_MAX_PAST_SECONDS:
        raise BadCommand(f"eta is {-delta:.0f} s in the past; give a time from now on")
    if delta > _ETA_MAX_FUTURE_SECONDS:
        raise BadCommand(f"eta is {delta:.0f} s in the future; Dramatiq delays a message by at most 7 days")
    return max(0, int(delta * 1000))


def _abortable(broker: Any) -> Tuple[Any, Any]:
    """(the broker's Abortable middleware or None, AbortMode or None)."""
    try:
        from dramatiq_abort import Abortable
        from dramatiq_abort.middleware import AbortMode
    except Exception:
        return None, None
    for middleware in list(getattr(broker, "middleware", ()) or ()):
        if isinstance(middleware, Abortable):
            return middleware, AbortMode
    return None, AbortMode


def capabilities(broker: Any) -> Dict[str, List[str]]:
    tokens = list(TOKENS)
    if _broker.kind(broker) in ("redis", "stub"):
        tokens.append("list_dead_letters")
    return {ENGINE: tokens}


class DramatiqCommands:
    """The command handlers of one installation (`_Hooks`)."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self._purge_lock = threading.Lock()

    @property
    def broker(self) -> Any:
        return self.hooks.broker

    def actions(self) -> List[str]:
        actions = ["cancel_task", "reconcile_task", "retry_task", "submit_task"]
        if _broker.kind(self.broker) in ("redis", "stub"):
            actions += ["purge_queue", "dlq.list"]
        return sorted(actions)

    def handlers(self) -> Dict[Tuple[str, str], Any]:
        table = {"dlq.list": self.list_dead_letters}
        return {(ENGINE, action): self._masked(action, table.get(action) or getattr(self, action))
                for action in self.actions()}

    def _masked(self, action: str, handler: Any) -> Any:
        def run(command: Dict[str, Any]) -> Any:
            try:
                return handler(command)
            except (BadCommand, CommandFailed) as exc:
                raise type(exc)(scrub_text(str(exc))) from None
            except Exception as exc:
                raise CommandFailed(f"{action} failed: {type(exc).__name__}: {scrub_text(str(exc))}") from None

        run.__name__ = run.__qualname__ = action.replace(".", "_")
        run.__doc__ = handler.__doc__
        return run

    # -- sending ------------------------------------------------------------

    def _send(self, name: str, args: Any, kwargs: Any, queue: Optional[str], delay: Optional[int],
              what: str) -> Tuple[str, str]:
        """Sends a message to actor `name` (on `queue` when given); its id and queue."""
        if args is not None and not isinstance(args, (list, tuple)):
            raise BadCommand(f"{what}: args must be a list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadCommand(f"{what}: kwargs must be a map, got {type(kwargs).__name__}")
        if queue is not None and (not isinstance(queue, str) or not queue.strip()):
            queue = None
        try:
            actor = self.broker.get_actor(name)
        except Exception:
            actor = None
        try:
            if actor is not None:
                message = actor.message_with_options(args=tuple(args or ()), kwargs=dict(kwargs or {}))
            elif queue:
                from dramatiq.message import Message

                message = Message(queue_name=q_name(queue.strip()), actor_name=name, args=tuple(args or ()),
                                  kwargs=dict(kwargs or {}), options={})
            else:
                known = ", ".join(sorted(self.broker.actors)[:20])
                raise BadCommand(f"{what}: no actor {name!r} is declared in this worker process (pid "
                                 f"{os.getpid()}), which knows {known or 'none'}; name a declared actor, or give "
                                 f"the queue its workers consume")
            if queue and q_name(queue.strip()) != message.queue_name:
                message = message.copy(queue_name=q_name(queue.strip()))
            sent = self.broker.enqueue(message, delay=delay)
        except BadCommand:
            raise
        except Exception as exc:
            raise CommandFailed(f"{what}: the message could not be sent ({type(exc).__name__}: "
                                f"{scrub_text(str(exc))})") from None
        return sent.message_id, q_name(sent.queue_name)

    def submit_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Sends a message to an actor by name (the brain's "run now")."""
        params = _params(command)
        name = _first(params.get("name"), params.get("task_name"), _target(command).get("name"))
        if not isinstance(name, str) or not name.strip():
            raise BadCommand("submit_task needs parameters.name (the actor's name)")
        name = name.strip()
        delay = _delay_ms(params["eta"]) if params.get("eta") is not None else None
        new_id, queue = self._send(name, params.get("args"), params.get("kwargs"), params.get("queue"), delay,
                                   f"submit_task {name}")
        out = {"task_id": new_id, "engine": ENGINE, "task_name": name, "queue": queue, "delay_ms": delay}
        if params.get("priority") not in (None, "normal"):
            out["note"] = "Dramatiq messages carry no priority here; it was ignored"
        return json_safe(out)

    def retry_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Sends the task again as a new message, by reference: the
        operator's overrides, else its original arguments (remembered by
        this process, or read from its dead letter on Redis)."""
        params = _params(command)
        task_id = _task_id(command, "retry_task")
        kept = self.hooks.remembered(task_id)
        args = _first(params.get("override_args"), params.get("args"))
        kwargs = _first(params.get("override_kwargs"), params.get("kwargs"))
        source = "override" if args is not None or kwargs is not None else None
        stored: Dict[str, Any] = {}
        if source is None and "args" in kept:
            args, kwargs, source = kept["args"], kept["kwargs"], "remembered"
        if source is None:
            found = self._lookup(task_id, kept, wait=None)
            if found is not None:
                queue, place, body, _score, _rid = found
                stored = {"task_name": body.get("actor_name"), "queue": queue}
                args, kwargs, source = body.get("args") or [], body.get("kwargs") or {}, f"broker ({place})"
        name = _first(params.get("task_name"), kept.get("task_name"), stored.get("task_name"))
        if not isinstance(name, str) or not name:
            raise BadCommand(f"cannot retry {task_id}: its actor is unknown here (the brain sent no task_name, "
                             f"this worker process did not see the message, and no queue holds it)")
        if source is None:
            seen = (f"worker process {os.getpid()} saw the message but did not keep them ({kept['args_left_out']})"
                    if kept.get("args_left_out") else f"worker process {os.getpid()} did not see the message")
            raise BadCommand(f"cannot retry {task_id} by reference: its original arguments are not known here: "
                             f"{seen}, and it is not among the broker's dead letters or waiting messages; retry "
                             f"with override_args and override_kwargs")
        queue = _first(kept.get("queue"), stored.get("queue"))
        delay = _delay_ms(params["eta"]) if params.get("eta") is not None else None
        new_id, queue = self._send(name, args, kwargs, queue, delay, f"cannot retry {task_id}")
        return json_safe({"task_id": task_id, "new_task_id": new_id, "previous_task_id": task_id,
                          "task_name": name, "queue": queue, "arguments_from": source})

    def _lookup(self, task_id: str, kept: Mapping[str, Any], wait: Optional[float]) -> Any:
        """Where the broker holds the message: by the Redis id of its last
        enqueue this process saw (a few reads), else by a scan of the
        queues, at most MAX_SCANS at once; `_BUSY` when no turn came within
        `wait` seconds (None: waits)."""
        where = self.hooks.where(task_id)
        if where is not None:
            found = _broker.locate(self.broker, where[0], where[1])
            if found is not None:
                return found
        if not (_scans.acquire() if wait is None else _scans.acquire(timeout=wait)):
            return _BUSY
        try:
            return _broker.find(self.broker, task_id, self._queues_for(kept))
        finally:
            _scans.release()

    def _queues_for(self, kept: Mapping[str, Any]) -> List[str]:
        names = _broker.queue_names(self.broker)
        queue = kept.get("queue")
        return ([queue] if queue else []) + [n for n in names if n != queue]

    # -- cancel -------------------------------------------------------------

    def cancel_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Aborts the message with dramatiq-abort (see the module)."""
        task_id = _task_id(command, "cancel_task")
        abortable, mode = _abortable(self.broker)
        if abortable is None:
            raise CommandFailed(f"cancel_task {task_id}: Dramatiq cannot stop a message by itself; {ABORT_HOWTO}. "
                                f"Nothing was cancelled")
        with self.hooks._lock:
            running = dict(self.hooks.active.get(task_id) or {})
        actor_name = running.get("name") or self.hooks.remembered(task_id).get("task_name")
        note = None
        if actor_name:
            try:
                actor = self.broker.get_actor(actor_name)
                if actor.options.get("abortable") is False or (actor.options.get("abortable") is None
                                                              and not abortable.abortable):
                    raise CommandFailed(f"cancel_task {task_id}: actor {actor_name!r} is not abortable "
                                        f"(abortable=False), so dramatiq-abort would neither stop nor skip it; "
                                        f"nothing was cancelled")
            except CommandFailed:
                raise
            except Exception:
                note = f"actor {actor_name!r} is not declared in this process: whether it is abortable was not checked"
        try:
            abortable.abort(task_id, abort_ttl=max(int(abortable.abort_ttl), CANCEL_TTL_MS), mode=mode.ABORT)
        except Exception as exc:
            raise CommandFailed(f"cancel_task {task_id}: the abort could not be written to dramatiq-abort's "
                                f"backend ({type(exc).__name__}: {scrub_text(str(exc))}); nothing was cancelled") \
                from None
        result: Dict[str, Any] = {"task_id": task_id, "cancelled": True, "mode": "abort",
                                  "worker": self.hooks.worker_name}
        if running:
            deadline = time.monotonic() + CANCEL_WAIT
            while time.monotonic() < deadline:
                with self.hooks._lock:
                    if task_id not in self.hooks.active:
                        break
                time.sleep(0.05)
            with self.hooks._lock:
                still = task_id in self.hooks.active
            if not still and not self.hooks.was_aborted(task_id):
                result.update(state_before="running", terminated=False,
                              detail="it ended without the abort stopping it (it finished first, or the actor "
                                     "caught the exception; its own event says how); a retry of it is skipped "
                                     "when it comes up")
                if note:
                    result["note"] = note
                return result
            if still:
                raise CommandFailed(
                    f"cancel_task {task_id}: the abort was sent, but the message is still running in worker "
                    f"{self.hooks.worker_name} after {CANCEL_WAIT:.0f} s: its thread is blocked in a call "
                    f"that does not return to Python (the abort lands once it does), or the actor catches "
                    f"BaseException. It will not start again once it stops")
            result.update(state_before="running", terminated=True,
                          detail="interrupted in its worker thread; it is not retried")
        else:
            result.update(state_before="not running here", terminated=False,
                          detail=(f"not running in worker {self.hooks.worker_name}: if another worker process "
                                  f"runs it, its Abortable interrupts it within about a second; if it has not "
                                  f"started, it is skipped when it comes up (within "
                                  f"{CANCEL_TTL_MS // 86400000} days); if it finished, nothing changes"))
        if note:
            result["note"] = note
        return result

    # -- queues -------------------------------------------------------------

    def purge_queue(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """Deletes the queue's messages when its depth is the confirmed one."""
        params = _params(command)
        target = _target(command)
        queue = _first(params.get("queue"), target.get("queue"), target.get("id"))
        if not isinstance(queue, str) or not queue.strip():
            raise BadCommand("purge_queue needs parameters.queue (the queue's name)")
        queue = q_name(queue.strip())
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
            try:
                done, depth, waiting = _broker.purge(self.broker, queue, expected, force)
            except NotImplementedError as exc:
                raise CommandFailed(str(exc)) from None
            except Exception as exc:
                raise CommandFailed(f"purge_queue for queue {queue!r} failed: {type(exc).__name__}: "
                                    f"{scrub_text(str(exc))}; nothing was purged") from None
        if not done:
            raise CommandFailed(f"purge_queue for queue {queue!r}: it holds {depth} messages now, the purge was "
                                f"confirmed at {expected}; nothing was purged. Re-issue the purge with the "
                                f"current depth")
        result: Dict[str, Any] = {"queue": queue, "depth_before": depth, "purged": waiting, "force": force}
        if waiting < depth:
            result["kept_fetched"] = depth - waiting
            result["note"] = (f"{depth - waiting} of the {depth} had been fetched by a worker already (prefetched "
                              f"or running): they stay and run; delayed messages and dead letters stay")
        else:
            result["note"] = "delayed messages and dead letters stay"
        return result

    # -- state --------------------------------------------------------------

    def reconcile_task(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """The message's state: running here, else where the broker holds
        it, else what the Results backend keeps; `unknown` otherwise."""
        task_id = _task_id(command, "reconcile_task")
        base = {"task_id": task_id, "finished_at": None, "exception": None}
        with self.hooks._lock:
            running = task_id in self.hooks.active
        if running:
            return {**base, "engine_state": "started", "source": "worker", "worker": self.hooks.worker_name}
        kept = self.hooks.remembered(task_id)
        where = self.hooks.where(task_id)
        if where is not None and where[2] > 0 and where[0].endswith(".DQ"):
            found: Any = _broker.locate(self.broker, where[0], where[1]) if _broker.kind(self.broker) == "redis" \
                else None
            if found is None or found[1] == "delayed":
                return {**base, "engine_state": "unknown", "source": None, "place": "retry",
                        "detail": f"retry {where[2]} of it was scheduled after a backoff; not looked up further"}
        else:
            try:
                found = self._lookup(task_id, kept, wait=SCAN_WAIT)
            except Exception as exc:
                raise CommandFailed(f"reconcile_task {task_id}: the broker could not be read "
                                    f"({type(exc).__name__}: {scrub_text(str(exc))})") from None
        if found is _BUSY:
            return {**base, "engine_state": "unknown", "source": None,
                    "detail": f"not looked up: {MAX_SCANS} scans of the queues were running already"}
        if found is not None:
            queue, place, body, score, _rid = found
            options = body.get("options") if isinstance(body.get("options"), dict) else {}
            if place == "dead":
                finished = (datetime.fromtimestamp(float(score) / 1000, tz=timezone.utc).isoformat()
                            if score is not None else None)
                return {**base, "engine_state": "failure", "finished_at": finished,
                        "exception": _excerpt(options.get("traceback")) or "dead-lettered", "source": "broker",
                        "queue": queue}
            retries = options.get("retries")
            if place == "delayed" and isinstance(retries, int) and retries > 0:
                return {**base, "engine_state": "unknown", "source": "broker", "queue": queue, "place": "retry",
                        "detail": f"retry {retries} of it waits its backoff in the delay queue"}
            if place in ("fetched", "held"):
                return {**base, "engine_state": "unknown", "source": "broker", "queue": queue, "place": place,
                        "detail": "a worker process has taken it (prefetched or running) and has not acknowledged "
                                  "it; which of the two is known to that process only"}
            return {**base, "engine_state": "pending", "source": "broker", "queue": queue, "place": place}
        outcome = self._from_results(task_id, kept)
        if outcome is not None:
            return outcome
        return {**base, "engine_state": "unknown", "source": None,
                "detail": "no worker process here runs it, no queue holds it (waiting, delayed or dead), and "
                          "the broker has no Results backend that knows it"}

    def _from_results(self, task_id: str, kept: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        try:
            from dramatiq.results import Results
            from dramatiq.results.errors import ResultMissing
        except Exception:  # pragma: no cover - part of dramatiq
            return None
        results = next((m for m in self.broker.middleware if isinstance(m, Results)), None)
        if results is None or not kept.get("task_name"):
            return None
        from dramatiq.message import Message

        message = Message(queue_name=kept["queue"], actor_name=kept["task_name"], args=(), kwargs={}, options={},
                          message_id=task_id)
        try:
            value = results.backend.get_result(message)
        except ResultMissing:
            return None
        except Exception as exc:
            return {"task_id": task_id, "engine_state": "failure", "finished_at": None,
                    "exception": scrub_text(f"{type(exc).__name__}: {exc}")[:EXCERPT_CHARS], "source": "results"}
        return {"task_id": task_id, "engine_state": "success", "finished_at": None, "exception": None,
                "source": "results", "result": event_value(value, MAX_RESULT_BYTES)}

    def list_dead_letters(self, command: Dict[str, Any]) -> Dict[str, Any]:
        """One page of dead letters, newest first (the brain's `dlq.list`)."""
        params = _params(command)
        target = _target(command)
        queue = _first(params.get("queue"), target.get("queue"), target.get("id") or None)
        if queue is not None and (not isinstance(queue, str) or not queue.strip()):
            queue = None
        limit = params.get("limit", DLQ_DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise BadCommand(f"dlq.list: parameters.limit must be a whole number >= 1, got {limit!r}")
        limit = min(limit, DLQ_MAX_LIMIT)
        cursor = params.get("cursor")
        if cursor in (None, ""):
            offset = 0
        elif isinstance(cursor, str) and cursor.isdigit():
            offset = int(cursor)
        else:
            raise BadCommand(f"dlq.list: parameters.cursor must be the next_cursor of the previous page, "
                             f"got {cursor!r}")
        try:
            rows, total = _broker.dead_letters(self.broker, queue.strip() if queue else None, limit, offset)
        except NotImplementedError as exc:
            raise CommandFailed(str(exc)) from None
        entries = []
        for row in rows:
            options = row.get("options") or {}
            attempts = options.get("retries")
            failed_at = row.get("failed_at_ms")
            entries.append({
                "task_id": str(row["task_id"])[:200] or "?",
                "task_name": scrub_text(str(row.get("task_name") or ""))[:500],
                "queue": str(row["queue"])[:200],
                "failed_at": (datetime.fromtimestamp(failed_at / 1000, tz=timezone.utc).isoformat()
                              .replace("+00:00", "Z") if failed_at is not None else None),
                "error_excerpt": _excerpt(options.get("traceback")),
                "attempts": attempts if isinstance(attempts, int) and not isinstance(attempts, bool)
                and attempts >= 0 else None,
            })
        end = offset + len(rows)
        return {"entries": entries, "next_cursor": str(end) if end < total else None, "total": total,
                "engine": ENGINE}


def _excerpt(text: Any) -> str:
    """The end of a stored traceback (where the error is), scrubbed."""
    if not isinstance(text, str) or not text:
        return ""
    return scrub_text(text.strip())[-EXCERPT_CHARS:]


__all__ = ["DramatiqCommands", "BadCommand", "CommandFailed", "capabilities", "ABORT_HOWTO"]
