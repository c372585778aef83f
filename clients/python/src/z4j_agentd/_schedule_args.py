"""Which of a schedule's arguments the brain's update may write back.

A row shows a schedule's args and kwargs in their JSON form (`json_safe`: a
datetime becomes its ISO text, a tuple a list, a key 1 the key "1", an
object its `repr()`), and the brain sends both back with every update, even
when only the interval changed. Writing them back would turn the stored
values into their display form. `data_changes` says which of them the
update really changes, and refuses a change to arguments the page cannot
show exactly (cut from the row, not JSON as they are, or not readable in
this process), saying why.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional

from ._jsonsafe import json_safe

_FIELDS = ("args", "kwargs")


def exact_json(value: Any, depth: int = 0) -> bool:
    """Whether `value` is its own JSON form: dicts with string keys, lists,
    strings, 64-bit integers, finite floats, booleans and None only."""
    if depth > 32:
        return False
    if value is None or isinstance(value, bool):
        return True
    if type(value) is int:
        return -(2**63) <= value <= 2**64 - 1
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is str:
        return json_safe(value) == value  # no lone surrogates
    if type(value) is list:
        return all(exact_json(item, depth + 1) for item in value)
    if type(value) is dict:
        return all(type(k) is str and json_safe(k) == k and exact_json(v, depth + 1) for k, v in value.items())
    return False


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so 1, 1.0 and true differ)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def data_changes(definition: Mapping[str, Any], shown: Mapping[str, Any], native: Optional[Mapping[str, Any]],
                 *, cut: bool, unreadable: Optional[str], name: str, where: str) -> Dict[str, Any]:
    """The args and kwargs of `definition` that differ from the row the
    brain showed (`shown`, as sent), to be written; ValueError when one
    differs and the shown value is not exactly the stored one.

    `native` holds the stored `args` (a list) and `kwargs`; `cut`: the row
    went out without them (too large for a snapshot frame); `unreadable`:
    why this process cannot read them (None when it can)."""
    changes: Dict[str, Any] = {}
    for field in _FIELDS:
        if field not in definition or _same(definition[field], shown.get(field)):
            continue
        if unreadable is not None:
            raise ValueError(f"the arguments of schedule {name!r} cannot be read in this process ({unreadable}), "
                             f"so the page cannot change them; change them in the application, or delete the "
                             f"schedule and create it again")
        if cut:
            raise ValueError(f"the page shows schedule {name!r} without its arguments (too large for a snapshot), "
                             f"so it cannot change them; change them in the application")
        if native is None or not exact_json(native.get(field)):
            raise ValueError(f"the {field} of schedule {name!r} hold values JSON has no exact form for (a "
                             f"datetime, Decimal, tuple, object or non-string key): the page shows them as text, "
                             f"and writing that back would change them in {where}; change them in the "
                             f"application")
        changes[field] = definition[field]
    return changes


__all__ = ["data_changes", "exact_json"]
