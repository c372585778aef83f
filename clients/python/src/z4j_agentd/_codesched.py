"""What the schedulers whose schedules are defined in code share (Huey's
periodic tasks, arq's cron jobs): cron text for the brain, the timezone's
name, the runs this process saw, and the hand-over of snapshots.

The brain reads a schedule's expression with croniter: five fields
`minute hour day-of-month month day-of-week` (0 = Sunday), and a sixth,
seconds, last. The engines keep their fields as sets of numbers; `field`
writes one set back as cron text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("z4j_agentd.schedules")

#: Seconds a snapshot may take to reach the daemon's spool.
SEND_TIMEOUT = 10.0


def field(values: Iterable[int], full: Sequence[int]) -> str:
    """One cron field: `*`, `*/n`, ranges `a-b` and lists, for the values
    of `full` (every value the field can take, in order) in `values`."""
    chosen = sorted(set(int(v) for v in values))
    if not chosen:
        raise ValueError("a cron field matches no value")
    outside = [v for v in chosen if v not in full]
    if outside:
        raise ValueError(f"{outside[0]} is outside {full[0]}-{full[-1]}")
    full = list(full)
    if chosen == full:
        return "*"
    if len(chosen) > 2 and chosen[0] == full[0]:
        step = chosen[1] - chosen[0]
        if step > 1 and chosen == full[::step]:
            return f"*/{step}"
    parts: List[str] = []
    start = prev = chosen[0]
    for v in chosen[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}" if prev > start + 1
                     else f"{start},{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


MINUTES = range(60)
HOURS = range(24)
DAYS = range(1, 32)
MONTHS = range(1, 13)
WEEKDAYS = range(7)  # cron: 0 = Sunday
SECONDS = range(60)


def expression(minutes: Iterable[int], hours: Iterable[int], days: Iterable[int], months: Iterable[int],
               weekdays: Iterable[int], seconds: Optional[Iterable[int]] = None) -> str:
    """The brain's cron text; `weekdays` as cron numbers them (0 = Sunday).
    Seconds other than just 0 make a sixth field, last (croniter's order)."""
    text = " ".join((field(minutes, MINUTES), field(hours, HOURS), field(days, DAYS), field(months, MONTHS),
                     field(weekdays, WEEKDAYS)))
    if seconds is not None and sorted(set(seconds)) != [0]:
        text += " " + field(seconds, SECONDS)
    return text


def timezone_name(tz: Optional[tzinfo]) -> str:
    """An IANA name for `tz`, as the brain needs one: a zoneinfo or pytz
    zone's own key; a fixed offset of whole hours as `Etc/GMT-h` (whose
    sign is inverted by convention); UTC for none."""
    if tz is None:
        return "UTC"
    for attr in ("key", "zone"):
        name = getattr(tz, attr, None)
        if isinstance(name, str) and name:
            return name
    offset = datetime.now(tz).utcoffset()
    if offset is None or offset == timedelta(0):
        return "UTC"
    seconds = int(offset.total_seconds())
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return f"Etc/GMT{-hours:+d}"
    name = tz.tzname(datetime.now(tz)) or ""
    log.warning("z4j-agentd: the timezone %r (UTC%+.2f h) has no IANA name; schedules show it as %r",
                name, seconds / 3600, name or "UTC")
    return name or "UTC"


def local_timezone() -> tzinfo:
    """The system's timezone, as a zone with a name when `TZ` or
    /etc/localtime names one, else as a fixed offset."""
    name = os.environ.get("TZ", "").lstrip(":")
    if not name:
        try:
            target = os.path.realpath("/etc/localtime")
            if "zoneinfo/" in target:
                name = target.split("zoneinfo/", 1)[1]
        except OSError:
            name = ""
    if name:
        try:
            from zoneinfo import ZoneInfo

            return ZoneInfo(name)
        except Exception:
            pass
    return datetime.now().astimezone().tzinfo or timezone.utc


def to_second(when: Optional[datetime]) -> Optional[datetime]:
    """Aware (naive read as UTC), to the nearest second: the same time reads
    the same in every snapshot (a changed row gets a new control token)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when + timedelta(microseconds=500_000)).replace(microsecond=0)


def source_hash(native: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(native, sort_keys=True, default=str).encode()).hexdigest()


class Runs:
    """The runs of each schedule this process saw: the scheduler's own
    (`fired`) and the brain's "Trigger now" (`triggered`), by source key.
    Thread-safe: the scheduler's thread or loop and the command thread
    both count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: Dict[str, Tuple[int, Optional[datetime]]] = {}

    def count(self, key: str, when: Optional[datetime] = None) -> None:
        when = when or datetime.now(timezone.utc)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        with self._lock:
            n, last = self._runs.get(key, (0, None))
            self._runs[key] = (n + 1, when if last is None or when > last else last)

    def get(self, key: str) -> Tuple[int, Optional[datetime]]:
        with self._lock:
            return self._runs.get(key, (0, None))


def sender(client: Any) -> Callable[[List[Dict[str, Any]]], Any]:
    """`send_durable`, tried twice: after a daemon restart the first try
    finds the old connection closed, the second opens a new one (the brain
    takes a frame it already has as a replay)."""
    from .client import DaemonUnavailable

    def send(events: List[Dict[str, Any]]) -> Any:
        try:
            return client.send_durable(events, timeout=SEND_TIMEOUT)
        except DaemonUnavailable:
            return client.send_durable(events, timeout=SEND_TIMEOUT)

    return send


def state_file(owner: str, instance: str, directory: Optional[str] = None) -> str:
    """Where a scheduler keeps the rows it last published (see
    `ExternalScheduler`'s `state_path`): `.z4j-agentd-<owner>-<instance>.json`
    in `directory` (the working directory by default)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", instance).strip("._") or "default"
    return os.path.join(os.path.abspath(directory or os.getcwd()), f".z4j-agentd-{owner}-{safe}.json")


def has_published(state_path: str) -> bool:
    """Does the state file hold rows this scheduler published (or removed
    since) on this host? A process with nothing to list serves the
    scheduler only then, to take those rows off the page: otherwise it
    would hold the scheduler (one process per scheduler on a daemon) in
    place of a process that has schedules, and publish none."""
    try:
        with open(state_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and bool(saved.get("rows") or saved.get("removed"))


__all__ = ["Runs", "has_published", "expression", "field", "local_timezone", "sender", "source_hash", "state_file",
           "timezone_name", "to_second"]
