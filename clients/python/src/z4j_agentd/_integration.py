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
