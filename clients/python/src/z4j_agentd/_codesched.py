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

from ._schedules import durable_sender

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


#: The days of the month on which a weekday falls for the n-th time in the
#: month (cron's `weekday#n`): its first week, second, ... fifth (29-31).
WEEKS_OF_MONTH = {1: range(1, 8), 2: range(8, 15), 3: range(15, 22), 4: range(22, 29), 5: range(29, 32)}


def nth_weekdays(days: Iterable[int], weekdays: Iterable[int]) -> str:
    """Day-of-week text for "these weekdays, on these days of the month",
    both required to match (as Huey and arq match them): `w#n` for each
    weekday `w` and week of the month `n` whose days `days` are, when
    `days` are whole weeks of the month (1-7, 8-14, 15-21, 22-28, 29-31);
    else a ValueError saying why."""
    chosen = set(int(d) for d in days)
    weeks = [n for n, week in WEEKS_OF_MONTH.items() if chosen.issuperset(week)]
    if chosen != {d for n in weeks for d in WEEKS_OF_MONTH[n]}:
        raise ValueError(
            f"it runs only on days matching both its day of month ({field(chosen, DAYS)}) and its day of week "
            f"({field(weekdays, WEEKDAYS)}); cron text (the brain's croniter) runs on days matching either, so "
            f"the brain would expect runs that never happen. Only days that are whole weeks of the month "
            f"(1-7, 8-14, 15-21, 22-28, 29-31: the weekday's first ... fifth time in the month) can be shown")
    return ",".join(f"{w}#{n}" for w in sorted(set(int(w) for w in weekdays)) for n in weeks)


def expression(minutes: Iterable[int], hours: Iterable[int], days: Iterable[int], months: Iterable[int],
               weekdays: Iterable[int], seconds: Optional[Iterable[int]] = None) -> str:
    """The brain's cron text; `weekdays` as cron numbers them (0 = Sunday).
    Seconds other than just 0 make a sixth field, last (croniter's order).

    The engines run a time when its day of month *and* its day of week
    match; cron (croniter) runs it when either does, if both are
    restricted. Both restricted are written as `* * w#n` (the weekday's
    n-th time in the month, which croniter reads) when the days are whole
    weeks of the month, and are a ValueError otherwise."""
    days, weekdays = list(days), list(weekdays)
    day_text, weekday_text = field(days, DAYS), field(weekdays, WEEKDAYS)
    if day_text != "*" and weekday_text != "*":
        day_text, weekday_text = "*", nth_weekdays(days, weekdays)
    text = " ".join((field(minutes, MINUTES), field(hours, HOURS), day_text, field(months, MONTHS), weekday_text))
    if seconds is not None and sorted(set(seconds)) != [0]:
        text += " " + field(seconds, SECONDS)
    return text


_tz_lock = threading.Lock()
#: Names found (and warnings given) for fixed offsets without a zone name, by offset in seconds.
_offset_names: Dict[int, str] = {}


def _after_fork_in_child() -> None:
    global _tz_lock
    _tz_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def fixed_zone(seconds: int) -> Optional[str]:
    """An IANA zone that is `seconds` east of UTC all year, this year and
    the next two (no daylight saving time), or None: what a fixed offset
    that is not a whole number of hours (India's +05:30, say) is called
    for the brain. The first such zone in alphabetical order, so that
    every process picks the same."""
    try:
        from zoneinfo import ZoneInfo, available_timezones
    except ImportError:  # pragma: no cover - Python < 3.9
        return None
    year = datetime.now(timezone.utc).year
    probes = [datetime(y, m, 15, 12, tzinfo=timezone.utc) for y in range(year, year + 3) for m in (1, 4, 7, 10)]
    want = timedelta(seconds=seconds)
    for name in sorted(available_timezones()):
        if name.startswith(("Etc/", "SystemV/")) or "/" not in name:
            continue
        try:
            zone = ZoneInfo(name)
            if all(p.astimezone(zone).utcoffset() == want for p in probes):
                return name
        except Exception:
            continue
    return None


def timezone_name(tz: Optional[tzinfo]) -> str:
    """An IANA name for `tz`, as the brain needs one: a zoneinfo or pytz
    zone's own key; a fixed offset of whole hours as `Etc/GMT-h` (whose
    sign is inverted by convention), of other offsets as a zone that keeps
    that offset all year (`fixed_zone`; else UTC, warned once per offset:
    the brain reads names it does not know as UTC); UTC for none."""
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
    with _tz_lock:
        if seconds in _offset_names:
            return _offset_names[seconds]
        name = fixed_zone(seconds)
        if name is None:
            log.warning("z4j-agentd: the timezone %r (UTC%+.2f h) has no IANA name and no zone keeps that offset "
                        "all year: schedules show it as UTC, and the brain computes their times in UTC",
                        tz.tzname(datetime.now(tz)), seconds / 3600)
            name = "UTC"
        _offset_names[seconds] = name
        return name


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
    """The runs of each schedule: the scheduler's own (`fired`) and the
    brain's "Trigger now" (`triggered`), by source key, this process's on
    top of those it was seeded with (`seed`: the counters last published,
    before this process started). Thread-safe: the scheduler's thread or
    loop and the command thread both count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: Dict[str, Tuple[int, Optional[datetime]]] = {}
        self._seeded: Dict[str, Tuple[int, Optional[datetime]]] = {}

    def after_fork(self) -> None:
        """In a forked child: a lock of its own (the parent's may have been
        held by another thread at the fork)."""
        self._lock = threading.Lock()

    def seed(self, key: str, n: int, last: Optional[datetime]) -> None:
        """Runs of `key` before this process: `n` of them, the last at
        `last`. Once per key (a second seed is ignored)."""
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=timezone.utc)
        with self._lock:
            self._seeded.setdefault(key, (max(int(n), 0), last))

    def count(self, key: str, when: Optional[datetime] = None) -> None:
        when = when or datetime.now(timezone.utc)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        with self._lock:
            n, last = self._runs.get(key, (0, None))
            self._runs[key] = (n + 1, when if last is None or when > last else last)

    def get(self, key: str) -> Tuple[int, Optional[datetime]]:
        with self._lock:
            n, last = self._runs.get(key, (0, None))
            seeded_n, seeded_last = self._seeded.get(key, (0, None))
        if last is None or (seeded_last is not None and seeded_last > last):
            last = seeded_last
        return n + seeded_n, last


def published_runs(state_path: str, owner: str) -> Dict[str, Tuple[int, Optional[datetime]]]:
    """The counters (`total_runs`, `last_run_at`) of the rows `owner` last
    published, by source key, from its state file (see `state_file`):
    empty when there is none or it cannot be read."""
    try:
        with open(state_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("scheduler") != owner or not isinstance(saved.get("rows"), list):
        return {}
    found: Dict[str, Tuple[int, Optional[datetime]]] = {}
    for row in saved["rows"]:
        try:
            key, n, last = str(row["source_key"]), int(row.get("total_runs") or 0), row.get("last_run_at")
            when = datetime.fromisoformat(str(last).replace("Z", "+00:00")) if last else None
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        found[key] = (n, when)
    return found


def seed_runs(runs: Runs, state_path: str, owner: str) -> None:
    """Seeds `runs` with the counters `owner` last published (a restarted
    process carries on from them: the brain anchors its misfire check on
    `last_run_at`)."""
    for key, (n, last) in published_runs(state_path, owner).items():
        runs.seed(key, n, last)


def sender(client: Any) -> Callable[[List[Dict[str, Any]]], Any]:
    """The snapshot sender of a code-defined scheduler (`_schedules.durable_sender`)."""
    return durable_sender(client, SEND_TIMEOUT)


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


__all__ = ["Runs", "expression", "field", "fixed_zone", "has_published", "local_timezone", "nth_weekdays",
           "published_runs", "seed_runs", "sender", "source_hash", "state_file", "timezone_name", "to_second"]
