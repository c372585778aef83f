"""Huey's periodic tasks through the external schedule protocol
(z4j_agentd.huey.periodic): the rows (cron text, keys, timezone, next run)
from real `@huey.periodic_task(crontab(...))` tasks, the runs seen through
Huey's own consumer Scheduler, "Trigger now" enqueueing the task,
enable/disable through Huey's revoke switch, and serve() declaring the
scheduler once per process."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest

huey_api = pytest.importorskip("huey")

from huey import MemoryHuey, crontab  # noqa: E402
from huey.consumer import Scheduler  # noqa: E402

from z4j_agentd import _codesched as cs  # noqa: E402
from z4j_agentd import _schedules as S  # noqa: E402
from z4j_agentd.huey import periodic  # noqa: E402

OWNER = "huey-periodic"
ACTIVATION = {"scheduler": OWNER, "owner": OWNER, "stream_id": "6f1c0e0a-1111-4222-8333-444455556666",
              "epoch_uuid": "7a2d1f0b-aaaa-4bbb-8ccc-ddddeeeeffff", "epoch_number": 1,
              "adapter_instance_id": "inst-1", "source_scope": S.source_scope(OWNER), "stable_source": True}


def command(action, **params):
    return {"id": str(uuid.uuid4()), "action": action, "target": {"type": "scheduler", "id": OWNER,
                                                                  "scheduler": OWNER}, "parameters": params}


class FakeClient:
    """What serve() uses of a Client: serve() and send_durable()."""

    def __init__(self):
        self.served = []
        self.batches = []

    def serve(self, handlers, **kwargs):
        self.served.append((handlers, kwargs))

    def send_durable(self, events, timeout=5.0):
        self.batches.append(events)
        return len(events)

    def handler(self, action):
        return self.served[-1][0][(OWNER, action)]

    def last_rows(self):
        return {r["name"]: r for r in self.batches[-1][0]["data"]["external_snapshot_frame"]["schedules"]}


# report's hours: twelve hours from now, so that it never falls due on its
# own while the tests run (they expect only every_minute to be due).
REPORT_HOURS = str((datetime.now(timezone.utc).hour + 12) % 24)


def make_huey(name=None, **kw):
    h = MemoryHuey(name or f"hp-{uuid.uuid4().hex[:6]}", **kw)

    @h.periodic_task(crontab(minute="*/5", hour=REPORT_HOURS, day_of_week="1-5"))
    def report():
        return "report"

    @h.periodic_task(crontab())
    def every_minute():
        return "tick"

    @h.periodic_task(crontab(minute="30", hour="2", day="1", month="1,7"))
    def twice_a_year():
        return "half"

    @h.task()
    def plain():
        return "not periodic"

    return h


@pytest.fixture
def served(tmp_path):
    h = make_huey()
    client = FakeClient()
    stream = periodic.serve(h, client, state_dir=str(tmp_path))
    yield h, client, stream
    stream.stop()


def test_rows_list_each_periodic_task_with_cron_text_keys_timezone_and_next_run():
    h = make_huey()
    source = periodic.PeriodicSource(h, cs.Runs())
    rows = {r["name"]: r for r in source.rows()}
    assert set(rows) == {"report", "every_minute", "twice_a_year"}  # not the plain task
    report = rows["report"]
    assert report["source_key"] == report["external_id"] == report["task_name"] == f"{__name__}.report"
    assert (report["kind"], report["expression"], report["timezone"]) == ("cron", f"*/5 {REPORT_HOURS} * * 1-5", "UTC")
    assert (report["engine"], report["scheduler"], report["source"], report["queue"]) == \
        ("huey", OWNER, "huey-periodic:code", h.name)
    assert rows["every_minute"]["expression"] == "* * * * *"  # Huey's "*" weekday is 0-7
    assert rows["twice_a_year"]["expression"] == "30 2 1 1,7 *"
    assert all(r["total_runs"] == 0 and r["last_run_at"] is None for r in rows.values())
    nxt = rows["every_minute"]["next_run_at"]
    now = datetime.now(timezone.utc)
    assert now < nxt <= now + timedelta(seconds=61) and nxt.second == 0
    # The same rows (and keys) from a second, fresh instance: keys are the code's.
    again = {r["source_key"]: r["source_hash"] for r in periodic.PeriodicSource(make_huey(), cs.Runs()).rows()}
    assert again == {r["source_key"]: r["source_hash"] for r in rows.values()}
    for row in rows.values():
        S.normalize_row(row, OWNER)  # the brain's vocabulary


def test_next_run_is_the_first_minute_huey_itself_would_run():
    cases = [crontab(), crontab(minute="*/7"), crontab(minute="15", hour="*/3"),
             crontab(minute="0", hour="9", day_of_week="0,6"), crontab(minute="5", hour="4", day="31"),
             crontab(minute="0", hour="0", day="13", day_of_week="5")]
    start = datetime(2026, 12, 7, 5, 46, 30)
    for validate in cases:
        settings = periodic.cron_settings(type("T", (), {"validate_datetime": staticmethod(validate)})())
        assert settings is not None
        found = periodic.next_run(settings, start)
        assert found is not None and found > start and validate(found), (settings, found)
        # No minute in between matches (checked minute by minute up to 40 days).
        probe = start.replace(second=0) + timedelta(minutes=1)
        limit = min(found, start + timedelta(days=40))
        while probe < limit:
            assert not validate(probe), (settings, probe, found)
            probe += timedelta(minutes=1)


def test_local_time_huey_names_the_system_timezone(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Paris")
    rows = periodic.PeriodicSource(make_huey(utc=False), cs.Runs()).rows()
    assert {r["timezone"] for r in rows} == {"Europe/Paris"}


def test_a_task_with_another_validator_is_left_out_counted_and_logged(caplog):
    h = make_huey()

    @h.periodic_task(lambda dt: dt.minute == 3)
    def odd():
        return None

    source = periodic.PeriodicSource(h, cs.Runs())
    names = {r["name"] for r in source.rows()}
    assert names == {"report", "every_minute", "twice_a_year"} and source.rows_unlisted == 1
    assert "odd is not on the Schedules page" in caplog.text


def test_the_consumer_schedulers_enqueues_count_as_runs(served):
    h, client, stream = served
    before = datetime.now(timezone.utc)
    scheduler = Scheduler(h, threading.Event(), 1, True)
    scheduler.loop()  # its first periodic check: every_minute is due
    assert [t.name for t in h.pending()] == ["every_minute"]
    rows = {r["name"]: r for r in stream.source.rows()}
    assert rows["every_minute"]["total_runs"] == 1 and rows["report"]["total_runs"] == 0
    assert before - timedelta(seconds=1) <= rows["every_minute"]["last_run_at"] <= \
        datetime.now(timezone.utc) + timedelta(seconds=1)


def test_serve_declares_the_scheduler_once_and_trigger_now_enqueues(served, tmp_path):
    h, client, stream = served
    assert periodic.serve(h, client, state_dir=str(tmp_path)) is stream  # a second worker's on_startup
    assert len(client.served) == 1
    handlers, kwargs = client.served[0]
    assert set(handlers) == {(OWNER, "schedule.external.activate"), (OWNER, "schedule.external.mutate"),
                             (OWNER, "schedule.resync")}
    assert kwargs["schedulers"] == [OWNER] and kwargs["runtime_features"] == [S.RUNTIME_FEATURE]
    assert kwargs["capabilities"] == {OWNER: sorted([S.STABLE_SNAPSHOT, S.MUTATION, "list", "read", "trigger_now",
                                                     "enable", "disable"])}

    summary = client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    assert summary["schedule_count"] == 3 and summary["sequence"] == 1
    row = client.last_rows()["twice_a_year"]
    params = {"scheduler": OWNER, "owner": OWNER, "operation_id": str(uuid.uuid4()), "operation": "trigger",
              "schedule_id": row["source_key"], "definition": {}, "expected": row, "stable_source": True,
              **{k: ACTIVATION[k] for k in S.Authority.IDS}}
    receipt = client.handler("schedule.external.mutate")(command("schedule.external.mutate", **params))
    task_id = receipt["trigger_result"]["result"]["task_id"]
    assert [(t.name, t.id) for t in h.pending()] == [("twice_a_year", task_id)]
    assert client.last_rows()["twice_a_year"]["total_runs"] == 1  # the snapshot after the trigger

    assert periodic.stats(h)["rows_unlisted"] == 0


def mutate(client, operation, row, definition):
    params = {"scheduler": OWNER, "owner": OWNER, "operation_id": str(uuid.uuid4()), "operation": operation,
              "schedule_id": row["source_key"], "definition": definition, "expected": row, "stable_source": True,
              **{k: ACTIVATION[k] for k in S.Authority.IDS}}
    return client.handler("schedule.external.mutate")(command("schedule.external.mutate", **params))


def task_class(h, name):
    return next(c for c in h._registry._periodic_tasks if c.__name__ == name)


def test_disable_revokes_the_task_in_huey_and_enable_restores_it(served):
    h, client, stream = served
    client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    row = client.last_rows()["every_minute"]
    assert row["is_enabled"] is True and row["next_run_at"] is not None
    cls = task_class(h, "every_minute")

    receipt = mutate(client, "update", row, {"is_enabled": False})
    assert h.is_revoked(cls) is True
    assert receipt["observed_configuration"]["is_enabled"] is False
    disabled = client.last_rows()["every_minute"]  # the snapshot published with the receipt
    assert receipt["sequence"] == 2 and disabled["is_enabled"] is False and disabled["next_run_at"] is None
    assert client.last_rows()["report"]["is_enabled"] is True  # the others stay as they are

    # Huey's consumer skips it: the Scheduler's pick of it is no run.
    Scheduler(h, threading.Event(), 1, True).loop()
    assert [t.name for t in h.pending()] == ["every_minute"]
    assert h.execute(h.dequeue()) is None  # skipped ("tick" when run)
    assert h.is_revoked(cls) is True  # revoke_all holds until restored
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 0

    # Trigger now of a disabled task would be skipped as well: refused.
    with pytest.raises(S.Conflict, match="disabled .*enable it first"):
        mutate(client, "trigger", disabled, {})
    assert h.pending_count() == 0

    # A stale row (the brain's view before the disable) is a conflict.
    with pytest.raises(S.Conflict, match="changed since the brain saw it"):
        mutate(client, "update", row, {"is_enabled": False})

    receipt = mutate(client, "update", disabled, {"is_enabled": True})
    assert h.is_revoked(cls) is False
    enabled = client.last_rows()["every_minute"]
    assert receipt["sequence"] == 3 and enabled["is_enabled"] is True and enabled["next_run_at"] is not None
    Scheduler(h, threading.Event(), 1, True).loop()
    assert h.execute(h.dequeue()) == "tick"
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 1


def test_a_revoke_made_by_the_application_shows_disabled_and_is_not_consumed(served):
    h, client, stream = served
    cls = task_class(h, "report")
    h.revoke_all(cls, revoke_once=True)
    for _ in range(2):  # peeked: reading the rows leaves the one-time revoke in place
        assert {r["name"]: r for r in stream.source.rows()}["report"]["is_enabled"] is False
    assert h.is_revoked(cls) is True
    h.restore_all(cls)
    h.revoke_all(cls, revoke_until=datetime.now(timezone.utc) + timedelta(hours=1))
    assert {r["name"]: r for r in stream.source.rows()}["report"]["is_enabled"] is False
    h.restore_all(cls)
    h.revoke_all(cls, revoke_until=datetime.now(timezone.utc) - timedelta(hours=1))  # over already
    assert {r["name"]: r for r in stream.source.rows()}["report"]["is_enabled"] is True


def test_the_brain_changes_nothing_but_is_enabled_of_a_code_defined_task(served):
    h, client, stream = served
    client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    row = client.last_rows()["twice_a_year"]
    cls = task_class(h, "twice_a_year")
    with pytest.raises(ValueError, match="defined in code .*change expression in the code"):
        mutate(client, "update", row, {"expression": "0 3 1 1,7 *", "is_enabled": False})
    assert h.is_revoked(cls) is False  # nothing applied
    for operation in ("delete",):
        with pytest.raises(S.Conflict, match="cannot delete periodic tasks: they are defined in code"):
            mutate(client, operation, row, {})
    # Values the row already has are no change: a full definition that only disables is applied.
    full = {k: row[k] for k in ("name", "task_name", "kind", "expression", "timezone", "queue", "args", "kwargs")}
    mutate(client, "update", row, {**full, "is_enabled": False})
    assert h.is_revoked(cls) is True


def test_trigger_of_a_task_gone_from_the_code_is_a_conflict():
    h = make_huey()
    source = periodic.PeriodicSource(h, cs.Runs())
    with pytest.raises(S.Conflict, match="not in this Huey instance"):
        source.trigger({"source_key": "gone.task", "name": "task"})


def test_cron_fields_and_timezone_names_the_brain_reads():
    assert cs.field(range(0, 60, 15), cs.MINUTES) == "*/15"
    assert cs.field([0, 1], cs.MINUTES) == "0,1"
    assert cs.field([1, 2, 3, 7, 9, 10, 11], cs.HOURS) == "1-3,7,9-11"
    assert cs.field([5], cs.DAYS) == "5" and cs.field(range(1, 32), cs.DAYS) == "*"
    with pytest.raises(ValueError, match="outside"):
        cs.field([7], cs.WEEKDAYS)
    assert cs.expression([0], [2], cs.DAYS, cs.MONTHS, [0], seconds=[0]) == "0 2 * * 0"
    assert cs.expression([0], [2], cs.DAYS, cs.MONTHS, [0], seconds=[0, 30]) == "0 2 * * 0 0,30"
    from zoneinfo import ZoneInfo

    assert cs.timezone_name(ZoneInfo("Europe/Paris")) == "Europe/Paris"
    assert cs.timezone_name(timezone(timedelta(hours=1))) == "Etc/GMT-1"  # the Etc sign is inverted
    assert cs.timezone_name(timezone(timedelta(hours=-5))) == "Etc/GMT+5"
    assert cs.timezone_name(timezone.utc) == cs.timezone_name(None) == "UTC"


def test_a_consumer_without_periodic_tasks_serves_nothing_unless_its_rows_are_on_the_page(tmp_path):
    client = FakeClient()
    assert periodic.serve(MemoryHuey("shop"), client, state_dir=str(tmp_path)) is None
    assert client.served == []  # it does not take the scheduler from a consumer that has tasks

    # A consumer that published rows, then restarted with its periodic tasks removed from the code.
    with_tasks = periodic.serve(make_huey("shop"), client, state_dir=str(tmp_path))
    client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    with_tasks.stop()
    assert len(client.last_rows()) == 3
    emptied = periodic.serve(MemoryHuey("shop"), client, state_dir=str(tmp_path))
    assert emptied is not None
    second = {**ACTIVATION, "epoch_number": 2, "epoch_uuid": str(uuid.uuid4())}
    client.handler("schedule.external.activate")(command("schedule.external.activate", **second))
    emptied.stop()
    assert client.last_rows() == {}  # the rows leave the page


def check(h):
    """The consumer Scheduler's periodic check, as its loop makes it each
    minute (without the loop's sleep)."""
    Scheduler(h, threading.Event(), 1, True).enqueue_periodic_tasks(None)


# Day of month and day of week both restricted: Huey runs a day when both
# match, the brain's croniter when either does. The cron text published
# must run exactly when Huey does, or the row must be left out.
SAME_DAYS = [  # (crontab arguments, the text published)
    ({"day": "1-7", "day_of_week": "1"}, "0 0 * * 1#1"),                 # the first Monday
    ({"day": "1-7", "day_of_week": "1,5"}, "0 0 * * 1#1,5#1"),           # the first Monday and Friday
    ({"day": "8-14", "day_of_week": "0"}, "0 0 * * 0#2"),
    ({"day": "15-21", "day_of_week": "3", "month": "1,7"}, "0 0 * 1,7 3#3"),
    ({"day": "22-31", "day_of_week": "5"}, "0 0 * * 5#4,5#5"),           # the last two Fridays (or one)
    ({"day": "29-31", "day_of_week": "6"}, "0 0 * * 6#5"),
    ({"day": "1-14", "day_of_week": "7"}, "0 0 * * 0#1,0#2"),             # Huey's 7 is Sunday
    ({"day": "1"}, "0 0 1 * *"),                                            # only one restricted: as before
    ({"day_of_week": "1-5"}, "0 0 * * 1-5"),
    ({"day": "1-7", "day_of_week": "*"}, "0 0 1-7 * *"),
]
NOT_CRON = [{"day": "13", "day_of_week": "5"}, {"day": "1-10", "day_of_week": "1"},
            {"day": "1", "day_of_week": "0"}, {"day": "*/2", "day_of_week": "1"}]


def huey_runs(validate, after, count):
    """Huey's own next runs of a crontab(minute=0, hour=0, ...): day by day."""
    found, day = [], after.date()
    while len(found) < count:
        when = datetime(day.year, day.month, day.day)
        if when > after and validate(when):
            found.append(when)
        day += timedelta(days=1)
    return found


def test_day_and_weekday_both_set_are_published_as_huey_runs_them_or_left_out(caplog):
    from cronmatch import next_runs

    h = MemoryHuey(f"hp-{uuid.uuid4().hex[:6]}")
    for i, (kwargs, _) in enumerate(SAME_DAYS):
        h.periodic_task(crontab(minute="0", hour="0", **kwargs), name=f"same{i}")(lambda: None)
    for i, kwargs in enumerate(NOT_CRON):
        h.periodic_task(crontab(minute="0", hour="0", **kwargs), name=f"either{i}")(lambda: None)
    source = periodic.PeriodicSource(h, cs.Runs())
    rows = {r["name"]: r for r in source.rows()}
    assert source.rows_unlisted == len(NOT_CRON) and set(rows) == {f"same{i}" for i in range(len(SAME_DAYS))}
    assert "either0 is not on the Schedules page: it runs only on days matching both its day of month (13) " \
           "and its day of week (5)" in caplog.text
    tasks = {cls.__name__: cls for cls in h._registry._periodic_tasks}
    for i, (kwargs, text) in enumerate(SAME_DAYS):
        assert rows[f"same{i}"]["expression"] == text, kwargs
        validate = tasks[f"same{i}"]().validate_datetime
        for start in (datetime(2026, 1, 1), datetime(2027, 2, 28, 12), datetime(2028, 2, 29)):
            assert list(next_runs(text, start, 24)) == huey_runs(validate, start, 24), (kwargs, start)


def test_a_restarted_consumer_carries_on_from_the_counters_it_published(tmp_path):
    h = make_huey("carry")
    client = FakeClient()
    stream = periodic.serve(h, client, state_dir=str(tmp_path))
    check(h)  # every_minute runs
    stream.source.runs.count(f"{__name__}.report", datetime(2026, 12, 7, 9, 5, tzinfo=timezone.utc))
    client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    stream.stop()
    before = client.last_rows()
    assert (before["every_minute"]["total_runs"], before["report"]["total_runs"]) == (1, 1)

    again = make_huey("carry")  # the consumer restarted: the same code, a new process's counters
    restarted = periodic.serve(again, client, state_dir=str(tmp_path))
    try:
        rows = {r["name"]: r for r in restarted.source.rows()}
        for name in ("every_minute", "report"):
            assert rows[name]["total_runs"] == 1
            assert S.iso_utc(rows[name]["last_run_at"]) == before[name]["last_run_at"]
        assert rows["twice_a_year"]["total_runs"] == 0 and rows["twice_a_year"]["last_run_at"] is None
        check(again)
        assert {r["name"]: r for r in restarted.source.rows()}["every_minute"]["total_runs"] == 2
    finally:
        restarted.stop()


def test_an_enqueue_that_fails_is_no_run(served, monkeypatch):
    h, client, stream = served

    def broken(data, priority=None):
        raise ConnectionError("storage is down")

    monkeypatch.setattr(h.storage, "enqueue", broken)
    check(h)  # Huey logs the failed enqueue and goes on
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 0
    monkeypatch.undo()
    check(h)
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 1
    h.enqueue(h._registry.string_to_task(f"{__name__}.every_minute")())  # not picked by a check: no run
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 1


def test_a_failing_snapshot_request_never_reaches_hueys_scheduler(served):
    h, client, stream = served

    class Broken:
        def changed(self):
            raise RuntimeError("boom")

    h.__dict__[periodic._WATCHED].streams.insert(0, Broken())
    check(h)  # raises nothing
    assert [t.name for t in h.pending()] == ["every_minute"]
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 1


def test_next_run_includes_the_seconds_past_the_minute_the_scheduler_checks_at(served, monkeypatch):
    h, client, stream = served
    check(h)
    offset = h.__dict__[periodic._WATCHED].check_offset
    assert offset is not None and 0 <= offset < 60
    # A Scheduler that checks at 37 s past each minute; now is 10:05:20 (a Monday).
    monkeypatch.setattr(h, "_get_timestamp", lambda: datetime(2026, 12, 7, 10, 5, 20))
    source = periodic.PeriodicSource(h, cs.Runs(), lambda: 37.0)
    rows = {r["name"]: r for r in source.rows()}
    at = datetime(2026, 12, 7, 10, 5, 37, tzinfo=timezone.utc)  # this minute's check is still to come
    assert rows["every_minute"]["next_run_at"] == at
    # report (*/5 at REPORT_HOURS on weekdays): that check too, at its own hour.
    hour = int(REPORT_HOURS)
    report_at = at if hour == 10 else datetime(2026, 12, 7 if hour > 10 else 8, hour, 0, 37, tzinfo=timezone.utc)
    assert rows["report"]["next_run_at"] == report_at
    monkeypatch.setattr(h, "_get_timestamp", lambda: datetime(2026, 12, 7, 10, 5, 40))
    assert {r["name"]: r for r in source.rows()}["every_minute"]["next_run_at"] == at + timedelta(minutes=1)


def test_a_forked_scheduler_hands_its_runs_to_the_serving_process_and_never_waits_on_its_locks(served):
    """`huey_consumer -k process` forks its Scheduler after the consumer serves: the child's runs and
    check times reach the serving process; a lock held by another thread at the fork holds nothing."""
    import os

    h, client, stream = served
    watched = h.__dict__[periodic._WATCHED]
    key = f"{__name__}.every_minute"
    with watched.runs._lock, watched._lock:  # held by "another thread" at the fork
        pid = os.fork()
        if pid == 0:  # the child: the Scheduler process
            code = 1
            try:
                check(h)
                if watched.streams == [] and watched.runs.get(key)[0] == 0 and watched.relay_dropped == 0:
                    code = 0
            finally:
                os._exit(code)
    deadline = datetime.now() + timedelta(seconds=10)
    while datetime.now() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        threading.Event().wait(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked Scheduler hung on a lock held at the fork")
    assert os.waitstatus_to_exitcode(status) == 0
    assert watched.streams == [stream]
    deadline = datetime.now() + timedelta(seconds=5)
    while watched.runs.get(key)[0] == 0 and datetime.now() < deadline:
        threading.Event().wait(0.02)
    count, last = watched.runs.get(key)
    assert count == 1 and datetime.now(timezone.utc) - last < timedelta(seconds=15)
    assert watched.check_offset is not None and 0 <= watched.check_offset < 60
    assert {r["name"]: r for r in stream.source.rows()}["every_minute"]["total_runs"] == 1


KPROC_APP = '''
import os, sys, time, threading, json
from huey import SqliteHuey, crontab
from z4j_agentd.huey import periodic

huey = SqliteHuey("kproc", filename=sys.argv[1], utc=True)
periodic.watch(huey)

@huey.periodic_task(crontab())
def every_minute():
    return 1

class Client:
    def serve(self, handlers, **kw): pass
    def send_durable(self, events, timeout=5.0): return len(events)

stream = periodic.serve(huey, Client(), state_dir=os.path.dirname(sys.argv[1]))
consumer = huey.create_consumer(workers=1, worker_type="process", periodic=True, scheduler_interval=1)
consumer.start()
watched = huey.__dict__[periodic._WATCHED]
deadline = time.time() + 15
while time.time() < deadline and watched.runs.get(f"{__name__}.every_minute")[0] == 0:
    time.sleep(0.05)
row = {r["name"]: r for r in stream.source.rows()}["every_minute"]
print(json.dumps({"pid": os.getpid(), "total_runs": row["total_runs"], "offset": watched.check_offset}))
sys.stdout.flush()
consumer.stop(graceful=False)
os._exit(0)
'''


def test_a_real_k_process_consumers_scheduler_runs_reach_the_serving_process(tmp_path):
    """`huey.create_consumer(worker_type="process")` (as `huey_consumer -k process`): the Scheduler
    process's first check (every_minute is due) counts in the process that serves the page."""
    import json
    import subprocess
    import sys

    (tmp_path / "kproc_app.py").write_text(KPROC_APP)
    done = subprocess.run([sys.executable, str(tmp_path / "kproc_app.py"), str(tmp_path / "huey.db")],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["total_runs"] == 1 and 0 <= seen["offset"] < 60, (seen, done.stderr[-2000:])


def test_a_fixed_offset_of_part_of_an_hour_is_named_by_a_zone_that_keeps_it_and_warned_once(caplog):
    from zoneinfo import ZoneInfo

    cs._offset_names.clear()
    india = timezone(timedelta(hours=5, minutes=30), "IST")
    name = cs.timezone_name(india)
    assert "/" in name  # an IANA zone name the brain can look up
    for when in (datetime(2027, 1, 15, 12), datetime(2027, 7, 15, 12), datetime(2028, 3, 30, 1)):
        assert when.replace(tzinfo=ZoneInfo(name)).utcoffset() == timedelta(hours=5, minutes=30), name
    unknown = timezone(timedelta(minutes=17), "ODD")  # no zone keeps +00:17
    for _ in range(3):
        assert cs.timezone_name(unknown) == "UTC" and cs.timezone_name(india) == name
    assert caplog.text.count("has no IANA name") == 1
    assert "schedules show it as UTC, and the brain computes their times in UTC" in caplog.text
