"""Cron text read as the brain reads it (croniter), standard library only,
for the tests that check the text the code-defined schedulers publish
against the engines' own runs.

What croniter does with the fields these schedulers write: `*`, `*/n`,
`a-b`, lists; day of week 0-6 (0 = Sunday); `w#n` (weekday w, its n-th
time in the month); a sixth field, seconds, last. Day of month and day of
week both restricted (neither `*`): a day matching either runs (Vixie
cron's rule); else both must match. Checked against croniter 6.2.4 (the
brain's) for every expression the tests publish.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Iterator, List, Set


def values(text: str, lo: int, hi: int) -> Set[int]:
    found: Set[int] = set()
    for part in text.split(","):
        if part == "*":
            found.update(range(lo, hi + 1))
        elif part.startswith("*/"):
            found.update(range(lo, hi + 1, int(part[2:])))
        elif "-" in part:
            a, b = part.split("-")
            found.update(range(int(a), int(b) + 1))
        else:
            found.add(int(part))
    return found


def runs_on(expression: str, day: date) -> bool:
    """Does `expression` run on `day` (at some time of it)?"""
    fields = expression.split()
    dom, month, dow = fields[2], fields[3], fields[4]
    if day.month not in values(month, 1, 12):
        return False
    weekday = (day.weekday() + 1) % 7  # cron: 0 = Sunday
    if "#" in dow:
        nth = [tuple(int(x) for x in part.split("#")) for part in dow.split(",")]
        by_weekday = any(w == weekday and (day.day - 1) // 7 + 1 == n for w, n in nth)
        return by_weekday if dom == "*" else (by_weekday or day.day in values(dom, 1, 31))
    dom_ok, dow_ok = day.day in values(dom, 1, 31), weekday in values(dow, 0, 6)
    if dom != "*" and dow != "*":
        return dom_ok or dow_ok
    return dom_ok and dow_ok


def times(expression: str) -> List[tuple]:
    """(hour, minute, second) of each run in a day, in order."""
    fields = expression.split()
    seconds = values(fields[5], 0, 59) if len(fields) > 5 else {0}
    return [(h, m, s) for h in sorted(values(fields[1], 0, 23)) for m in sorted(values(fields[0], 0, 59))
            for s in sorted(seconds)]


def next_runs(expression: str, after: datetime, count: int, days: int = 30 * 366) -> Iterator[datetime]:
    """The first `count` runs strictly after `after` (naive, the schedule's
    own clock), searched over `days` days."""
    day, found = after.date(), 0
    for _ in range(days):
        if runs_on(expression, day):
            for h, m, s in times(expression):
                when = datetime(day.year, day.month, day.day, h, m, s)
                if when > after:
                    yield when
                    found += 1
                    if found == count:
                        return
        day += timedelta(days=1)
