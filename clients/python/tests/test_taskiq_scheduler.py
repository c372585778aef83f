"""z4j_agentd.taskiq.scheduler: a TaskiqScheduler's sources on the brain's
Schedules page, with real taskiq sources on a real event loop (the redis
sources against a throwaway redis-server, skipped without one)."""

import asyncio
import os
import threading
import time
import uuid
from decimal import Decimal
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

pytest.importorskip("taskiq")

import pycron  # noqa: E402
from taskiq import InMemoryBroker, ScheduledTask, ScheduleSource, TaskiqMiddleware, TaskiqScheduler  # noqa: E402
from taskiq.schedule_sources import LabelScheduleSource  # noqa: E402

from z4j_agentd import _schedules as S  # noqa: E402
from z4j_agentd.taskiq import scheduler as T  # noqa: E402
from redis_server import unix_redis

UTC = timezone.utc


# ---------------------------------------------------------------- helpers


@pytest.fixture
def loop():
    """An event loop running in its own thread, as `taskiq scheduler`'s."""
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, daemon=True)
    thread.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(5)
    lp.close()


def run(lp, coro):
    return asyncio.run_coroutine_threadsafe(coro, lp).result(10)


class Sent(TaskiqMiddleware):
    """Every message the broker sends: (task name, labels, args, kwargs)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def pre_send(self, message):
        self.messages.append((message.task_name, dict(message.labels), list(message.args), dict(message.kwargs)))
        return message


def app():
    broker = InMemoryBroker(await_inplace=True)
    sent = Sent()
    broker.add_middlewares(sent)
    ran = []

    @broker.task(task_name="app:add", schedule=[
        {"cron": "*/5 * * * *", "args": [1, 2], "schedule_id": "every-five"},
        {"interval": 30, "args": [3, 4]},
        {"interval": 30, "args": [3, 4]},  # the same again: the scheduler runs both
        {"cron": "0 4 * * *", "cron_offset": "Europe/Paris", "kwargs": {"x": 1}},
    ], team="ops")
    async def add(a=0, b=0, x=0):
        ran.append((a, b, x))
        return a + b + x

    @broker.task(task_name="app:other")
    async def other():
        ran.append("other")

    return broker, sent, ran


def label_rows(lp, broker):
    source = LabelScheduleSource(broker)
    run(lp, source.startup())
    scheduler = TaskiqScheduler(broker, sources=[source])
    src = T.SchedulerSource(scheduler, lp)
    return src, {r["source_key"]: r for r in src.rows()}


# ---------------------------------------------------------------- pure parts


def brute_next(expression, zone, now):
    t = now.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(60 * 24 * 40):
        if pycron.is_now(expression, t.astimezone(zone)):
            return t
        t += timedelta(minutes=1)
    return None


@pytest.mark.parametrize("expression,offset", [
    ("*/5 * * * *", None), ("0 4 * * *", "Europe/Paris"), ("30 2 * * 1", None), ("15 10 1 * *", "Asia/Kolkata"),
    ("0 0 * * sun", timedelta(hours=-5)), ("59 23 31 12 *", None),
])
def test_next_run_of_a_cron_schedule_is_the_minute_pycron_fires_next(expression, offset):
    now = datetime(2026, 3, 28, 22, 17, 31, tzinfo=UTC)  # across Paris's DST change
    got = T.next_cron(expression, offset, now)
    if expression == "59 23 31 12 *":
        assert got == datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
        return
    assert got == brute_next(expression, T._zone(offset), now)


def test_describe_gives_kind_expression_and_timezone():
    d = ScheduledTask(task_name="t", labels={}, args=[], kwargs={}, cron="0 4 * * *", cron_offset="Europe/Paris")
    assert T.describe(d) == ("cron", "0 4 * * *", "Europe/Paris")
    d = ScheduledTask(task_name="t", labels={}, args=[], kwargs={}, cron="* * * * *", cron_offset=timedelta(hours=2))
    assert T.describe(d) == ("cron", "* * * * *", "UTC+02:00")
    d = ScheduledTask(task_name="t", labels={}, args=[], kwargs={}, interval=timedelta(minutes=2))
    assert T.describe(d) == ("interval", "120", "UTC")
    d = ScheduledTask(task_name="t", labels={}, args=[], kwargs={}, time=datetime(2030, 1, 2, 3, 4, 5))
    assert T.describe(d) == ("clocked", "2030-01-02T03:04:05+00:00", "UTC")


@pytest.mark.parametrize("bad,why", [
    ("99 foo * * *", "minute field"), ("* * *", "five fields"), ("*/0 * * * *", "step of 0"),
    ("* 24 * * *", "hour field"), ("* * * 13 *", "month field"), ("* * * * funday", "weekday field"),
])
def test_a_cron_expression_the_scheduler_would_skip_is_refused_with_the_field(bad, why):
    with pytest.raises(ValueError, match=why):
        T.check_cron(bad)


def test_cron_expressions_taskiq_runs_are_accepted_and_fire():
    now = datetime(2026, 3, 28, 22, 17, tzinfo=UTC)
    for good in ("*/5 * * * *", "0 4 * * mon-fri", "0,30 9-17/2 1 1,7 0", "0 0 * * sun", "0 9 * * Monday",
                 "0 0 * * 1-5/2", "0 0 * * 1-fri/2", "*/7 2-4 */2 * *"):
        assert T.check_cron(good) == good
        assert T.next_cron(good, None, now) is not None, good  # pycron fires it within the year


@pytest.mark.parametrize("bad,why,probe,never", [
    # (expression, what the refusal says, a minute it means that pycron does not fire at, fires never)
    ("0 4 1 jan *", "reads no month names", datetime(2027, 1, 1, 4, 0), True),
    ("0 0 * * 7", "never matches 7", datetime(2026, 3, 29, 0, 0), True),  # a Sunday
    ("5/15 * * * *", "a step needs `\\*` or a range", datetime(2026, 3, 29, 0, 5), True),
    ("0 4 * * mon-fri/2", "starts with a number", datetime(2026, 3, 30, 4, 0), True),  # a Monday
    ("0 4 * * fri-mon", "runs backwards", datetime(2026, 3, 30, 4, 0), False),  # a Monday (Fri, Sat fire)
])
def test_a_cron_expression_pycron_does_not_fire_as_written_is_refused_and_costs_little_to_plan(
        bad, why, probe, never, monkeypatch):
    """What pycron (taskiq's matcher) does not fire as written is refused,
    and next_cron plans any expression in a bounded number of checks, None
    for one that never fires (it scanned a year of minutes, some 500 000
    checks and seconds of the scheduler's loop, for `5/15 * * * *`)."""
    assert not pycron.is_now(bad, probe)  # a minute it means: pycron does not fire
    with pytest.raises(ValueError, match=why):
        T.check_cron(bad)
    calls = []
    real = pycron.is_now
    monkeypatch.setattr(pycron, "is_now", lambda *a: calls.append(1) or real(*a))
    planned = T.next_cron(bad, None, datetime(2026, 3, 28, 22, 17, 31, 7, tzinfo=UTC))
    assert (planned is None) == never and len(calls) < 1000
    if not never:  # a schedule listed from the code may hold it: its next run is where pycron fires
        assert planned == brute_next(bad, UTC, datetime(2026, 3, 28, 22, 17, tzinfo=UTC))
    # An expression of valid fields that no day matches (February 31st) costs a bounded scan too.
    calls.clear()
    assert T.next_cron("0 0 31 2 *", None, datetime(2026, 3, 28, 22, 17, 31, 9, tzinfo=UTC)) is None
    assert len(calls) < 1000


# ---------------------------------------------------------------- the label source


def test_label_schedules_are_listed_with_keys_that_survive_a_restart(loop):
    broker, _, _ = app()
    _, rows = label_rows(loop, broker)
    _, again = label_rows(loop, broker)  # a new start: new random ids for the entries without one
    assert set(rows) == set(again) and len(rows) == 4
    five = rows["every-five"]
    assert (five["name"], five["task_name"], five["kind"], five["expression"], five["timezone"]) == \
        ("app:add [every-five]", "app:add", "cron", "*/5 * * * *", "UTC")
    assert (five["args"], five["kwargs"], five["source"], five["is_enabled"]) == \
        ([1, 2], {}, "taskiq-scheduler:label", True)
    assert five["total_runs"] == 0 and five["last_run_at"] is None and five["next_run_at"] is not None
    hashed = sorted(k for k in rows if k.startswith("label:"))
    twice = [k for k in hashed if k + ":2" in hashed]  # the two identical entries keep apart
    assert len(hashed) == 3 and len(twice) == 1
    paris = next(r for r in rows.values() if r["timezone"] == "Europe/Paris")
    assert (paris["kind"], paris["expression"], paris["kwargs"]) == ("cron", "0 4 * * *", {"x": 1})
    interval = rows[twice[0]]
    assert (interval["kind"], interval["expression"], interval["args"]) == ("interval", "30", [3, 4])
    assert interval["next_run_at"] is None  # not sent yet: the scheduler sends it when it sees it
    assert all(S.normalize_row(r, T.SCHEDULER) for r in rows.values())


def test_label_keys_are_those_of_z4j_taskiqscheduler():
    """The key of a label schedule without an id is the one
    z4j-taskiqscheduler 1.13.0 gives it (so the row keeps its identity when
    a project moves over). The keys below were computed with that package,
    its own code (`canonical_external_json` over the entries of a
    LabelScheduleSource of this same task), not with this module's."""
    broker = InMemoryBroker()

    @broker.task(task_name="tqapp:sched", schedule=[
        {"interval": 5, "args": [3, 4]},
        {"cron": "0 4 * * *", "cron_offset": "Europe/Paris", "kwargs": {"x": 1, "\u00e9": "\u00fc"}},
        {"time": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), "args": [1.5]},
    ], a=1)
    async def sched(*args, **kwargs):
        return None

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        _, rows = label_rows(loop, broker)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    by_kind = {r["kind"]: r["source_key"] for r in rows.values()}
    assert by_kind == {
        "interval": "label:842974037374b385c89f69bb2d1ec7794ca41f753d102a622d75eb850b20de49",
        "cron": "label:a849e756eae810e3c8e8b046e940f0e8cacc411b78a8e79d30be63d9283f41c6",
        "clocked": "label:3415ac2c5e6becaac99cfdb78da34ea42f2fa79199f81fe6ee4d0f75ce97b16c",
    }


def test_trigger_now_kicks_the_task_with_the_schedules_labels_and_arguments(loop):
    broker, sent, ran = app()
    src, rows = label_rows(loop, broker)
    result = src.trigger(rows["every-five"])
    assert result["task_name"] == "app:add" and result["task_id"]
    name, labels, args, kwargs = sent.messages[-1]
    assert (name, args, kwargs) == ("app:add", [1, 2], {}) and ran == [(1, 2, 0)]
    assert labels["team"] == "ops" and labels["schedule_id"] == "every-five"
    row = {r["source_key"]: r for r in src.rows()}["every-five"]
    assert row["total_runs"] == 1 and row["last_run_at"] is not None


def test_the_label_source_is_read_only_and_its_refusals_are_conflicts(loop, tmp_path):
    """A scheduler with only read-only sources still declares the mutation
    protocol (without it the brain sends enable/disable as the older
    `schedule.external.control`, whose refusal stalls the stream): every
    write, a disable included, is refused as a conflict (HTTP 409)."""
    broker, _, _ = app()
    src, rows = label_rows(loop, broker)
    assert src.capabilities() == ["external_schedule_stable_snapshot_v1", "external_schedule_mutation_v1",
                                  "list", "trigger_now"]
    expected = S.normalize_row(rows["every-five"], T.SCHEDULER)
    with pytest.raises(S.Conflict, match="read-only"):
        src.mutate("delete", "every-five", expected, {})
    with pytest.raises(S.Conflict, match="read-only"):
        src.mutate("update", "every-five", expected, {"is_enabled": False})
    with pytest.raises(S.Conflict, match="no writable schedule source"):
        src.mutate("create", None, None, {"name": "n", "task_name": "app:add", "kind": "interval",
                                          "expression": "60"})
    # Through the stream: the brain's disable reaches the source and is refused as a conflict.
    stream = S.ExternalScheduler(T.SCHEDULER, src, lambda events: 0, state_path=str(tmp_path / "s.json"))
    authority = dict(stream_id=str(uuid.uuid4()), epoch_uuid=str(uuid.uuid4()), epoch_number=1,
                     adapter_instance_id="a", source_scope=S.source_scope(T.SCHEDULER))
    stream.activate({"parameters": {"owner": T.SCHEDULER, "stable_source": True, **authority}})
    with pytest.raises(S.Conflict, match="read-only"):
        stream.mutate({"parameters": {"scheduler": T.SCHEDULER, "operation_id": str(uuid.uuid4()),
                                      "operation": "update", "schedule_id": "every-five", "expected": expected,
                                      "definition": {"is_enabled": False}, **authority}})


def test_the_schedulers_sends_count_as_runs_and_ask_for_a_snapshot(loop):
    broker, sent, ran = app()
    source = LabelScheduleSource(broker)
    run(loop, source.startup())
    scheduler = TaskiqScheduler(broker, sources=[source])
    src = T.SchedulerSource(scheduler, loop)
    asked = []
    src.changed = lambda: asked.append(1)
    src.watch()
    live = run(loop, source.get_schedules())
    five = next(t for t in live if t.schedule_id == "every-five")
    run(loop, scheduler.on_ready(source, five))  # what the scheduler loop does when it is due
    run(loop, scheduler.on_ready(source, five))
    row = {r["source_key"]: r for r in src.rows()}["every-five"]
    assert row["total_runs"] == 2 and asked == [1, 1] and ran == [(1, 2, 0), (1, 2, 0)]


def test_a_time_schedule_leaves_the_page_once_the_scheduler_sent_it(loop):
    broker = InMemoryBroker(await_inplace=True)
    when = datetime.now(UTC) + timedelta(hours=1)

    @broker.task(task_name="app:once", schedule=[{"time": when, "schedule_id": "once"}])
    async def once():
        return 1

    source = LabelScheduleSource(broker)
    run(loop, source.startup())
    scheduler = TaskiqScheduler(broker, sources=[source])
    src = T.SchedulerSource(scheduler, loop)
    src.watch()
    row = src.rows()[0]
    assert (row["kind"], row["expression"], row["next_run_at"]) == ("clocked", when.isoformat(), when)
    run(loop, scheduler.on_ready(source, source.schedules["once"]))
    assert src.rows() == []


# ---------------------------------------------------------------- install


def test_install_serves_only_in_a_scheduler_process_on_its_loop(loop, monkeypatch, tmp_path):
    broker, _, _ = app()
    scheduler = TaskiqScheduler(broker, sources=[LabelScheduleSource(broker)])
    served = []
    client = SimpleNamespace(serve=lambda handlers, **kw: served.append((handlers, kw)),
                             send_durable=lambda events, timeout: 0)
    monkeypatch.setattr(T, "_active", None)
    assert T.install(scheduler, client, state_path=str(tmp_path / "state.json")) is client
    assert T.install(scheduler, client, state_path=str(tmp_path / "state.json")) is client  # once
    run(loop, scheduler.startup())  # a worker, a web app: not a scheduler process
    assert served == [] and T.active() is None
    broker.is_scheduler_process = True  # what `taskiq scheduler` sets, then starts the sources
    run(loop, scheduler.sources[0].startup())
    run(loop, scheduler.startup())
    try:
        assert len(served) == 1
        handlers, kw = served[0]
        assert kw["schedulers"] == ["taskiq-scheduler"] and kw["runtime_features"] == [S.RUNTIME_FEATURE]
        assert kw["capabilities"] == {"taskiq-scheduler": ["external_schedule_mutation_v1",
                                                           "external_schedule_stable_snapshot_v1", "list",
                                                           "trigger_now"]}
        stream = T.active()
        assert stream.source.loop is loop and stream.state_path == str(tmp_path / "state.json")
        assert {r["name"] for r in stream.source.rows()} >= {"app:add [every-five]"}
    finally:
        run(loop, scheduler.shutdown())
        T.active().stop()
    monkeypatch.setattr(T, "_active", None)


def test_install_refuses_what_is_not_a_scheduler():
    with pytest.raises(TypeError, match="TaskiqScheduler"):
        T.install(object())


# ---------------------------------------------------------------- writable redis sources


@pytest.fixture(scope="module")
def redis_url():
    with unix_redis() as sock:
        yield f"unix://{sock}"


def redis_app(lp, url, kind, prefix):
    import warnings

    from taskiq_redis import ListRedisScheduleSource, RedisScheduleSource

    broker, sent, ran = app()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        source = (ListRedisScheduleSource if kind == "list" else RedisScheduleSource)(url, prefix=prefix)
    label = LabelScheduleSource(broker)
    run(lp, label.startup())
    run(lp, source.startup())
    scheduler = TaskiqScheduler(broker, sources=[label, source])
    src = T.SchedulerSource(scheduler, lp)
    src.watch()
    return broker, source, src, sent


def by_key(src):
    return {r["source_key"]: r for r in src.rows()}


@pytest.mark.parametrize("kind", ["list", "plain"])
def test_redis_schedules_are_all_listed_and_written_from_the_brain(loop, redis_url, kind):
    broker, source, src, sent = redis_app(loop, redis_url, kind, f"z4j-{kind}-{os.urandom(3).hex()}")
    add = broker.find_task("app:add")
    later = datetime.now(UTC) + timedelta(days=2)
    run(loop, add.kicker().with_schedule_id("nightly").schedule_by_cron(source, "30 2 * * *", 5, b=6))
    run(loop, add.kicker().with_schedule_id("soon").schedule_by_time(source, later, 7))
    run(loop, add.kicker().with_schedule_id("often").schedule_by_interval(source, 45))
    live = run(loop, source.get_schedules())  # the list the scheduler runs from (held, as the loop does)
    assert "nightly" in {t.schedule_id for t in live}
    rows = by_key(src)
    # ListRedisScheduleSource's own get_schedules leaves out `soon` (it is due in two days): listed anyway.
    assert {"nightly", "soon", "often"} <= set(rows) and "every-five" in rows
    nightly = rows["nightly"]
    assert (nightly["name"], nightly["kind"], nightly["expression"], nightly["args"], nightly["kwargs"],
            nightly["source"]) == ("nightly", "cron", "30 2 * * *", [5], {"b": 6}, "taskiq-scheduler:redis")
    assert rows["soon"]["kind"] == "clocked" and rows["often"]["expression"] == "45"
    assert src.capabilities() == ["external_schedule_stable_snapshot_v1", "external_schedule_mutation_v1", "list",
                                  "trigger_now", "create", "update", "delete"]

    # create: the name is the schedule_id; the running scheduler has it at once.
    created = src.mutate("create", None, None, {"name": "e2e-made", "task_name": "app:add", "kind": "interval",
                                                "expression": "3600", "args": [1, 1]})
    assert (created["source_key"], created["name"], created["expression"]) == ("e2e-made", "e2e-made", "3600")
    stored = {t.schedule_id: t for t in run(loop, src.views[1].read())}["e2e-made"]
    assert (stored.interval, stored.args, stored.labels["team"]) == (3600, [1, 1], "ops")
    assert "e2e-made" in {t.schedule_id for t in live}

    # update: delete + add under the same id, the running scheduler's copy replaced.
    expected = S.normalize_row(by_key(src)["e2e-made"], T.SCHEDULER)
    updated = src.mutate("update", "e2e-made", expected, {"kind": "cron", "expression": "*/10 * * * *",
                                                          "timezone": "Europe/Paris", "kwargs": {"x": 2}})
    assert (updated["kind"], updated["expression"], updated["timezone"], updated["args"], updated["kwargs"]) == \
        ("cron", "*/10 * * * *", "Europe/Paris", [1, 1], {"x": 2})
    stored = {t.schedule_id: t for t in run(loop, src.views[1].read())}["e2e-made"]
    assert (stored.cron, stored.cron_offset, stored.interval) == ("*/10 * * * *", "Europe/Paris", None)
    assert [t.cron for t in live if t.schedule_id == "e2e-made"] == ["*/10 * * * *"]

    # a stale expectation is refused, and nothing is written.
    with pytest.raises(S.Conflict, match="changed in its taskiq source"):
        src.mutate("update", "e2e-made", expected, {"args": [9]})
    with pytest.raises(S.Conflict, match="exists already"):
        src.mutate("create", None, None, {"name": "nightly", "task_name": "app:add", "kind": "interval",
                                          "expression": "60"})

    # trigger now from the redis source.
    result = src.trigger(by_key(src)["nightly"])
    assert result["task_id"] and sent.messages[-1][1]["schedule_id"] == "nightly"
    assert sent.messages[-1][2:] == ([5], {"b": 6})

    # delete: gone from redis and from the running scheduler.
    expected = S.normalize_row(by_key(src)["e2e-made"], T.SCHEDULER)
    assert src.mutate("delete", "e2e-made", expected, {}) is None
    assert "e2e-made" not in by_key(src) and "e2e-made" not in {t.schedule_id for t in live}
    assert "e2e-made" not in {t.schedule_id for t in run(loop, source.get_schedules())}


@pytest.mark.parametrize("definition,why", [
    ({"kind": "interval", "expression": "1.5"}, "whole positive number of seconds"),
    ({"kind": "interval", "expression": "0"}, "whole positive number of seconds"),
    ({"kind": "cron", "expression": "99 foo * * *"}, "minute field"),
    ({"kind": "cron", "expression": "* * * * *", "timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"kind": "interval", "expression": "60", "timezone": "Europe/Paris"}, "only a cron schedule"),
    ({"kind": "clocked", "expression": "2030-01-01T00:00:00"}, "needs an offset"),
    ({"kind": "solar", "expression": "sunset"}, "cron, interval or clocked"),
    ({"kind": "interval", "expression": "60", "task_name": "app:nope"}, "not registered"),
    ({"kind": "interval", "expression": "60", "queue": "q1"}, "queue must be empty"),
    ({"kind": "interval", "expression": "60", "is_enabled": False}, "no disabled state"),
    ({"kind": "interval", "expression": "60", "is_enabled": "false"}, "is_enabled must be true or false"),
    ({"kind": "interval", "expression": "60", "args": {"a": 1}}, "args must be a list"),
    ({"kind": "interval", "expression": "60", "args": ["x" * (800 * 1024)]}, "more than a snapshot frame"),
])
def test_a_create_taskiq_could_not_run_is_refused_with_the_reason_and_written_nowhere(
        loop, redis_url, definition, why):
    _, source, src, _ = redis_app(loop, redis_url, "list", f"z4j-bad-{os.urandom(3).hex()}")
    spec = {"name": "refused", "task_name": "app:add", **definition}
    with pytest.raises(ValueError, match=why):
        src.mutate("create", None, None, spec)
    assert "refused" not in by_key(src)


def test_an_update_may_not_rename_a_redis_schedule(loop, redis_url):
    broker, source, src, _ = redis_app(loop, redis_url, "list", f"z4j-ren-{os.urandom(3).hex()}")
    run(loop, broker.find_task("app:add").kicker().with_schedule_id("keep").schedule_by_interval(source, 60))
    expected = S.normalize_row(by_key(src)["keep"], T.SCHEDULER)
    with pytest.raises(ValueError, match="schedule_id"):
        src.mutate("update", "keep", expected, {"name": "other"})
    assert "keep" in by_key(src)


class MemorySource(ScheduleSource):
    """A source of the application's own that can add and delete."""

    def __init__(self):
        self.items = {}

    async def get_schedules(self):
        return list(self.items.values())

    async def add_schedule(self, schedule):
        self.items[schedule.schedule_id] = schedule

    async def delete_schedule(self, schedule_id):
        self.items.pop(schedule_id, None)


def test_a_source_that_can_add_and_delete_is_written_and_keeps_what_the_brain_does_not_name(loop):
    broker, _, _ = app()
    memory = MemorySource()
    memory.items["m1"] = ScheduledTask(task_name="app:add", labels={"team": "ops"}, args=[Decimal("1.5")],
                                       kwargs={}, schedule_id="m1", interval=60)
    src = T.SchedulerSource(TaskiqScheduler(broker, sources=[memory]), loop)
    row = by_key(src)["m1"]
    assert (row["name"], row["source"], row["args"]) == ("m1", "taskiq-scheduler:MemorySource", ["1.5"])
    assert "update" in src.capabilities()
    src.mutate("update", "m1", S.normalize_row(row, T.SCHEDULER), {"kwargs": {"x": 1}})
    stored = memory.items["m1"]
    assert (stored.args, stored.kwargs, stored.labels, stored.interval) == ([Decimal("1.5")], {"x": 1},
                                                                          {"team": "ops"}, 60)


def test_a_source_that_cannot_be_read_fails_the_snapshot_instead_of_emptying_it(loop):
    broker, _, _ = app()

    class Broken(LabelScheduleSource):
        async def get_schedules(self):
            raise ConnectionError("redis is down")

    scheduler = TaskiqScheduler(broker, sources=[Broken(broker)])
    src = T.SchedulerSource(scheduler, loop)
    with pytest.raises(RuntimeError, match="could not be read: ConnectionError: redis is down"):
        src.rows()


# ---------------------------------------------------------------- writes that fail, or take long


class FlakySource(MemorySource):
    """A writable source whose next `fails` adds raise `fail`, or whose adds
    take `slow` seconds."""

    def __init__(self):
        super().__init__()
        self.fail = None
        self.fails = 0
        self.slow = 0.0

    async def add_schedule(self, schedule):
        if self.slow:
            await asyncio.sleep(self.slow)
        if self.fails > 0:
            self.fails -= 1
            raise self.fail
        await super().add_schedule(schedule)


def memory_app(loop, source=None, **kw):
    broker, sent, _ = app()
    source = source or FlakySource()
    source.items["keep"] = ScheduledTask(task_name="app:add", labels={}, args=[1], kwargs={}, schedule_id="keep",
                                         interval=60)
    src = T.SchedulerSource(TaskiqScheduler(broker, sources=[source]), loop, **kw)
    return source, src, sent


def test_an_update_whose_add_fails_puts_the_schedule_back(loop):
    """An update is delete then add: when the add fails, the schedule is
    added back as it was (it was lost), and the error says so, scrubbed."""
    source, src, _ = memory_app(loop)
    expected = S.normalize_row(by_key(src)["keep"], T.SCHEDULER)
    source.fail, source.fails = ConnectionError("redis://:hunter2@cache:6379 went away"), 1
    with pytest.raises(RuntimeError, match="not applied .* as it was") as raised:
        src.mutate("update", "keep", expected, {"expression": "120"})
    assert "hunter2" not in str(raised.value)
    assert source.items["keep"].interval == 60 and source.items["keep"].args == [1]
    assert by_key(src)["keep"]["expression"] == "60"
    # The put-back failing too: the answer says the schedule is gone.
    source.fails = 2
    with pytest.raises(RuntimeError, match="putting it back failed too.*create it again"):
        src.mutate("update", "keep", expected, {"expression": "120"})
    assert "keep" not in source.items


def test_an_update_the_loop_is_slow_to_finish_is_not_cut_between_delete_and_add(loop, monkeypatch):
    """A write that outlasts SOURCE_TIMEOUT is not cancelled (it was, after
    the delete and before the add: the schedule was gone): the answer says
    it may have been applied, and the write completes."""
    monkeypatch.setattr(T, "SOURCE_TIMEOUT", 0.2)
    source, src, _ = memory_app(loop)
    expected = S.normalize_row(by_key(src)["keep"], T.SCHEDULER)
    source.slow = 0.6
    with pytest.raises(TimeoutError, match="may have been applied"):
        src.mutate("update", "keep", expected, {"expression": "120"})
    deadline = time.monotonic() + 10
    while "keep" not in source.items:
        assert time.monotonic() < deadline, "the update's add never ran"
        time.sleep(0.05)
    assert source.items["keep"].interval == 120


def test_a_write_is_shielded_from_the_cancellation_of_its_call(loop):
    """The write itself runs shielded: cancelling the call (as the loop's
    shutdown cancels its tasks) does not stop it between delete and add."""
    source, src, _ = memory_app(loop)
    expected = S.normalize_row(by_key(src)["keep"], T.SCHEDULER)
    source.slow = 0.3
    done = threading.Event()
    real_call = src._call

    def call_and_cancel(work, write=False):
        coroutine = work()
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        time.sleep(0.1)  # inside the add now
        future.cancel()
        done.set()
        with pytest.raises(Exception):
            future.result(5)

    src._call = call_and_cancel
    src.mutate("update", "keep", expected, {"expression": "120"})
    src._call = real_call
    assert done.is_set()
    deadline = time.monotonic() + 10
    while "keep" not in source.items:
        assert time.monotonic() < deadline, "the cancelled update's add never ran"
        time.sleep(0.05)
    assert source.items["keep"].interval == 120


# ---------------------------------------------------------------- arguments too large for a frame


def test_an_update_keeps_the_real_args_of_a_row_shown_without_them(loop):
    """A row whose args were left out to fit a frame shows a note in their
    place, and the dashboard sends that note back as the args of every
    update: the real ones are kept (they were overwritten with the note);
    an update that changes them is refused."""
    source, src, _ = memory_app(loop)
    big = ["x" * (800 * 1024)]
    source.items["big"] = ScheduledTask(task_name="app:add", labels={}, args=big, kwargs={"k": 1},
                                        schedule_id="big", interval=60)
    stream = S.ExternalScheduler(T.SCHEDULER, src, lambda events: 0)
    rows, _ = stream._observe()
    shown = next(r for r in rows if r["source_key"] == "big")
    assert shown["args"][0].startswith("<left out") and shown["kwargs"] == {}
    page = {"kind": "interval", "expression": "120", "task_name": "app:add", "timezone": "UTC", "queue": None,
            "args": shown["args"], "kwargs": shown["kwargs"], "is_enabled": True}
    with pytest.raises(ValueError, match="too large to show"):
        src.mutate("update", "big", shown, {**page, "args": ["other"]})
    assert source.items["big"].args == big and source.items["big"].interval == 60
    src.mutate("update", "big", shown, page)
    assert (source.items["big"].args, source.items["big"].kwargs, source.items["big"].interval) == \
        (big, {"k": 1}, 120)


# ---------------------------------------------------------------- the scheduler's loop


def test_a_change_computes_no_next_run_on_the_schedulers_loop(loop, monkeypatch):
    """next_run_at is worked out off the loop (the loop runs the scheduler)."""
    loop_thread = run(loop, _thread_of_loop())
    on_loop = []
    real = T.next_cron

    def watched(*a):
        on_loop.append(threading.current_thread() is loop_thread)
        return real(*a)

    monkeypatch.setattr(T, "next_cron", watched)
    source, src, _ = memory_app(loop)
    created = src.mutate("create", None, None, {"name": "c", "task_name": "app:add", "kind": "cron",
                                                "expression": "0 4 * * *"})
    expected = S.normalize_row(by_key(src)["c"], T.SCHEDULER)
    updated = src.mutate("update", "c", expected, {"expression": "0 5 * * *"})
    assert created["next_run_at"] is not None and updated["next_run_at"] is not None
    assert on_loop and not any(on_loop)


async def _thread_of_loop():
    return threading.current_thread()


# ---------------------------------------------------------------- reading the Redis source


def test_the_redis_source_is_read_in_full_only_when_due_with_large_scans_each_key_once(
        loop, redis_url, monkeypatch, caplog):
    from redis.asyncio import Redis

    broker, source, src, _ = redis_app(loop, redis_url, "list", f"z4j-scan-{os.urandom(3).hex()}")
    add = broker.find_task("app:add")
    run(loop, add.kicker().with_schedule_id("a").schedule_by_interval(source, 60))
    scans = []
    real_scan = Redis.scan_iter

    def scan_iter(self, match=None, count=None, **kw):
        scans.append(count)

        async def twice():  # SCAN may give a key twice
            async for key in real_scan(self, match=match, count=count, **kw):
                yield key
                yield key

        return twice()

    monkeypatch.setattr(Redis, "scan_iter", scan_iter)
    assert "a" in by_key(src) and scans == [T.SCAN_COUNT]
    assert not [r for r in caplog.records if "two taskiq schedules" in r.getMessage()]
    for _ in range(3):  # the looks every POLL_SECONDS: the last full read
        by_key(src)
    assert len(scans) == 1
    run(loop, add.kicker().with_schedule_id("b").schedule_by_interval(source, 60))  # behind our back
    assert "b" not in by_key(src)
    src.read_interval = 0.0  # ... until READ_INTERVAL has passed
    assert "b" in by_key(src) and len(scans) == 2
    src.read_interval = 3600.0
    expected = S.normalize_row(by_key(src)["b"], T.SCHEDULER)
    before = len(scans)
    src.mutate("delete", "b", expected, {})  # a write from the brain: read again now
    assert "b" not in by_key(src) and len(scans) > before


def test_an_undecodable_schedule_is_left_out_counted_and_logged_once(loop, redis_url, caplog):
    import redis as redis_sync

    prefix = f"z4j-bad-{os.urandom(3).hex()}"
    broker, source, src, _ = redis_app(loop, redis_url, "list", prefix)
    run(loop, broker.find_task("app:add").kicker().with_schedule_id("good").schedule_by_interval(source, 60))
    client = redis_sync.Redis.from_url(redis_url)
    client.set(f"{prefix}:data:broken", b"\x00 not a schedule")
    src.read_interval = 0.0
    for _ in range(2):
        rows = by_key(src)
        assert "good" in rows and "broken" not in rows
    assert src.stats() == {"schedules_unreadable": 1}
    stream = S.ExternalScheduler(T.SCHEDULER, src, lambda events: 0)
    assert stream.stats()["schedules_unreadable"] == 1
    logged = [r for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(logged) == 1 and f"{prefix}:data:broken" in logged[0].getMessage()
    client.delete(f"{prefix}:data:broken")
    by_key(src)
    assert src.stats() == {"schedules_unreadable": 0}
    client.close()


# ---------------------------------------------------------------- counters, names, texts


def test_stats_answer_while_a_publish_holds_the_streams_lock(loop):
    _, src, _ = memory_app(loop)
    stream = S.ExternalScheduler(T.SCHEDULER, src, lambda events: 0)
    held, release = threading.Event(), threading.Event()

    def hold():
        with stream._lock:  # as publish() holds it while it waits for the loop
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    answered = []
    reader = threading.Thread(target=lambda: answered.append(stream.stats()))
    reader.start()
    reader.join(5)
    got = list(answered)  # before the lock is let go
    release.set()
    holder.join(5)
    reader.join(5)
    assert got and got[0]["scheduler"] == T.SCHEDULER, "stats() waited for the stream's lock"


def test_the_run_counts_of_schedules_gone_from_the_sources_are_dropped(loop):
    source, src, _ = memory_app(loop)
    for sid in ("keep", "gone"):
        src._count(sid, by_scheduler=True)
    src.read_interval = 0.0
    rows = by_key(src)
    assert rows["keep"]["total_runs"] == 1 and set(src._runs) == {"keep"}


def test_long_or_padded_schedule_ids_get_capped_names_and_keys_the_brain_takes(loop):
    source, src, _ = memory_app(loop)
    long_id, padded = "x" * 300, " padded "
    for sid in (long_id, long_id + "y", padded):
        source.items[sid] = ScheduledTask(task_name="app:add", labels={}, args=[], kwargs={}, schedule_id=sid,
                                          interval=60)
    rows = by_key(src)
    normalized = [S.normalize_row(r, T.SCHEDULER) for r in rows.values()]
    assert all(len(r["name"]) <= T.MAX_NAME and len(r["source_key"]) <= T.MAX_NAME for r in normalized)
    assert len({r["name"] for r in normalized}) == len({r["source_key"] for r in normalized}) == 4
    assert all(r["source_key"] == r["source_key"].strip() for r in rows.values())
    key = next(k for k in rows if k.startswith("padded"))
    src.mutate("update", key, S.normalize_row(rows[key], T.SCHEDULER), {"expression": "90"})
    assert source.items[padded].interval == 90
    long_key = next(k for k, r in rows.items() if r["name"].startswith("xxx") and len(r["name"]) < 300)
    src.mutate("delete", long_key, S.normalize_row(rows[long_key], T.SCHEDULER), {})
    assert len([s for s in source.items if s.startswith("xxx")]) == 1


def test_a_source_errors_text_is_scrubbed_before_it_reaches_the_brain(loop):
    broker, _, _ = app()

    class Broken(LabelScheduleSource):
        async def get_schedules(self):
            raise ConnectionError("Error connecting to redis://user:hunter2@cache:6379")

    src = T.SchedulerSource(TaskiqScheduler(broker, sources=[Broken(broker)]), loop)
    with pytest.raises(RuntimeError, match="could not be read") as raised:
        src.rows()
    assert "hunter2" not in str(raised.value) and "cache:6379" in str(raised.value)
    # A snapshot the daemon refused: its error (stats' last_error) is scrubbed too.
    stream = S.ExternalScheduler(T.SCHEDULER, memory_app(loop)[1], lambda events: 0)
    stream._authority = S.Authority(T.SCHEDULER, str(uuid.uuid4()), str(uuid.uuid4()), 1, "a",
                                    S.source_scope(T.SCHEDULER))
    stream._send = lambda events: (_ for _ in ()).throw(OSError("redis://:hunter2@x refused"))
    with pytest.raises(OSError):
        stream.publish("x", force=True)
    assert stream.last_error and "hunter2" not in stream.last_error


def test_a_trigger_is_a_run_but_does_not_move_an_interval_schedules_next_run(loop, monkeypatch):
    class Clock(datetime):
        at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

        @classmethod
        def now(cls, tz=None):
            return cls.at

    monkeypatch.setattr(T, "datetime", Clock)
    source, src, _ = memory_app(loop)
    src._sent(source.items["keep"])  # the scheduler's send, at 12:00
    Clock.at += timedelta(seconds=25)  # "trigger now", at 12:00:25
    before = by_key(src)["keep"]
    assert before["next_run_at"] == datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    assert before["total_runs"] == 1 and before["next_run_at"] is not None
    src.trigger(before)
    after = by_key(src)["keep"]
    assert after["total_runs"] == 2 and after["last_run_at"] >= before["last_run_at"]
    assert after["next_run_at"] == before["next_run_at"]
