"""Turning arbitrary Python values into what the daemon accepts.

The daemon refuses NaN and infinity, non-string keys and binary values, and
an event larger than one brain frame. Task arguments and results are
whatever the application passed, so everything that goes into an event's
`data` goes through `json_safe` first: containers are copied (the caller may
mutate them after `emit` returns), unknown types become their `repr()`, and
nothing here ever raises.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import json
import math
import uuid
from typing import Any

#: Containers nested deeper than this are cut (also stops reference cycles).
MAX_DEPTH = 32
#: A `repr()` fallback is cut to this many characters.
MAX_REPR_CHARS = 4096

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the caller
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    if len(text) > MAX_REPR_CHARS:
        text = text[:MAX_REPR_CHARS] + "..."
    return text


def _clean_str(text: str) -> str:
    """Lone surrogates cannot be encoded as UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` made of dict (string keys), list, str, int, finite
    float, bool and None only.

    * NaN and infinities become the strings `"nan"`, `"inf"`, `"-inf"`;
    * bytes become text (UTF-8, else their `repr()`);
    * tuples and sets become lists, non-string keys become strings;
    * datetimes, dates and times become ISO-8601 strings, UUIDs and
      Decimals strings, enums their value;
    * anything else becomes its `repr()` (cut to 4,096 characters);
    * integers outside 64 bits become strings.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, int):
        if _INT_MIN <= value <= _INT_MAX:
            return int(value)
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return repr(value)
    if _depth >= MAX_DEPTH:
        return _repr(value)
    if isinstance(value, dict):
        out = {}
        for key, item in list(value.items()):
            if isinstance(key, enum.Enum):
                key = key.value
            if not isinstance(key, str):
                simple = key is None or isinstance(key, (int, float))
                key = str(key) if simple else _repr(key)
            out[_clean_str(key)] = json_safe(item, _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(item, _depth + 1) for item in list(value)]
    if isinstance(value, (set, frozenset)):
        items = [json_safe(item, _depth + 1) for item in list(value)]
        try:
            items.sort()
        except TypeError:
            pass
        return items
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return _repr(raw)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value, _depth + 1)
    return _repr(value)


def bounded(value: Any, max_bytes: int = 65536) -> Any:
    """`json_safe(value)`, or, when that is longer than `max_bytes` as JSON,
    a string: its start and a note of how long it was. Keeps one large
    argument or result from making the whole event too large for the brain."""
    safe = json_safe(value)
    try:
        encoded = json.dumps(safe, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return _repr(value)
    size = len(encoded.encode("utf-8", "replace"))
    if size <= max_bytes:
        return safe
    keep = max(0, max_bytes - 64)
    return encoded[:keep] + f"... [truncated by z4j-agentd-client: {size} bytes]"
