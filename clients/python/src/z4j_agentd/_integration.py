"""What every engine integration's command handlers and health reports
share: the two errors a handler raises, reading a command's parameters and
target, and the health interval from the environment.

A handler raises `BadCommand` when the command's parameters cannot work
(the message says what to change) and `CommandFailed` when the engine or
its broker did not do what the command asked; either answers the brain
`failed` with the message at once.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Dict, Mapping


class BadCommand(ValueError):
    """The command's parameters cannot work; the message says what to change."""


class CommandFailed(RuntimeError):
    """The engine or its broker did not do what the command asked."""


def params(command: Mapping[str, Any]) -> Dict[str, Any]:
    """The command's `parameters` (an empty dict when it has none)."""
    value = command.get("parameters")
    return value if isinstance(value, dict) else {}


def target(command: Mapping[str, Any]) -> Dict[str, Any]:
    """The command's `target` (an empty dict when it has none)."""
    value = command.get("target")
    return value if isinstance(value, dict) else {}


def target_task_id(command: Mapping[str, Any], engine: str) -> Any:
    """The task id of the command's target: the brain's task targets are
    `<engine>:<task id>` (plain for reconcile_task)."""
    ident = target(command).get("id")
    if isinstance(ident, str) and ident.startswith(f"{engine}:"):
        return ident[len(engine) + 1:]
    return ident


def task_id(command: Mapping[str, Any], engine: str, action: str, what: str) -> str:
    """`parameters.task_id`, else the target's task id; `what` names it in
    the error (e.g. "the Huey task id")."""
    value = params(command).get("task_id") or target_task_id(command, engine)
    if not isinstance(value, str) or not value.strip():
        raise BadCommand(f"{action} needs parameters.task_id ({what})")
    return value.strip()


def first(*values: Any) -> Any:
    """The first value that is not None."""
    for value in values:
        if value is not None:
            return value
    return None


def bulk_filter(command: Mapping[str, Any], ids_of: str, id_word: str) -> tuple:
    """bulk_retry's `(filter, task_ids)`: `parameters.filter` and its
    non-empty list of ids; `ids_of` and `id_word` name them in the error
    (e.g. "Celery task ids", "task ids")."""
    filt = params(command).get("filter")
    if not isinstance(filt, dict):
        raise BadCommand(f"bulk_retry needs parameters.filter with task_ids (a list of {ids_of})")
    ids = filt.get("task_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, str) and t for t in ids):
        raise BadCommand(f"bulk_retry needs parameters.filter.task_ids, a non-empty list of {id_word}, "
                         f"got {ids!r}")
    return filt, ids


#: How far in the past an `eta` may be (a clock a little behind): then it runs now.
ETA_MAX_PAST_SECONDS = 60
#: How far in the future an `eta` may be, unless the engine allows less.
ETA_MAX_FUTURE_SECONDS = 365 * 24 * 3600


def eta_from_unix(eta: Any, max_future: float = ETA_MAX_FUTURE_SECONDS,
                  limit_text: str = "at most 365 days") -> datetime:
    """The brain's `eta` (a unix time in seconds) as a UTC datetime; a value
    that is not a time, more than a minute past, or more than `max_future`
    seconds ahead (`limit_text` says the limit) is a BadCommand saying so."""
    if isinstance(eta, bool):
        raise BadCommand(f"eta must be a unix time in seconds, got {eta!r}")
    try:
        when = datetime.fromtimestamp(float(eta), tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        raise BadCommand(f"eta must be a unix time in seconds, got {eta!r}") from None
    delta = (when - datetime.now(timezone.utc)).total_seconds()
    if delta < -ETA_MAX_PAST_SECONDS:
        raise BadCommand(f"eta is {-delta:.0f} s in the past; give a time from now on")
    if delta > max_future:
        raise BadCommand(f"eta is {delta:.0f} s in the future ({limit_text})")
    return when


def interval_from_env(env: str, default: float, documented: float) -> float:
    """`$<env>` in seconds (> 0, at most 300), else `default`; a bad value
    is a ValueError saying what to set (`documented`: the default the
    message names)."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a number: set seconds between health reports, "
                         f"> 0 and at most 300 (default {documented:.0f})") from None
    if not 0 < value <= 300:
        raise ValueError(f"{env}={raw!r} is out of range: set seconds > 0 and at most 300 "
                         f"(default {documented:.0f})")
    return value
