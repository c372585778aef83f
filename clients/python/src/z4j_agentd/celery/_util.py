"""Small helpers the Celery modules share."""

from __future__ import annotations

from typing import Any


def attr(obj: Any, name: str, default: Any = None) -> Any:
    """`obj[name]` of a dict, else `obj.name`; `default` when it is missing,
    `obj` is None, or reading it raises (Celery's objects differ between
    versions and pools)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    try:
        return getattr(obj, name, default)
    except Exception:
        return default
