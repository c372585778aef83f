"""APScheduler 3 through the external schedule protocol
(z4j_agentd.apscheduler), with real schedulers: the rows of cron, interval
and date jobs (crontab weekday numbering), trigger now in the job's own
executor, the brain's create, update, pause/resume and delete, what they
refuse, runs counted from the scheduler's events, and an AsyncIOScheduler
whose operations run on its event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("apscheduler")

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # noqa: E402
from apscheduler.schedulers.background import BackgroundScheduler  # noqa: E402
from apscheduler.triggers.cron import CronTrigger  # noqa: E402

from z4j_agentd import _schedules as S  # noqa: E402
from z4j_agentd import apscheduler as aps  # noqa: E402

OWNER = "apscheduler"
CALLS: list = []


def record(*args, **kwargs):
    CALLS.append((args, kwargs))


def other(*args, **kwargs):
    CALLS.append(("other", args, kwargs))


@pytest.fixture
def scheduler():
    CALLS.clear()
    s = BackgroundScheduler(timezone="UTC")
    s.start()
    yield s
    s.shutdown(wait=False)


def rows_of(source):
    return {r["source_key"]: S.normalize_row(r, OWNER) for r in source.rows()}


def test_rows_list_cron_interval_and_date_jobs(scheduler):
    scheduler.add_job(record, "cron", day_of_week="mon-fri", hour=3, minute=30, args=[1], id="weekdays")
    scheduler.add_job(record, "interval", seconds=90, kwargs={"k": "v"}, id="every-90")
    scheduler.add_job(record, "date", run_date=datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc), id="once")
    scheduler.add_job(record, "cron", second="*/10", id="seconds")
    scheduler.add_job(record, "interval", hours=1, id="paused").pause()
    rows = rows_of(aps.APSchedulerSource(scheduler))
    assert set(rows) == {"weekdays", "every-90", "once", "seconds", "paused"}
    weekdays = rows["weekdays"]
    assert (weekdays["kind"], weekdays["expression"], weekdays["timezone"], weekdays["args"]) == \
        ("cron", "30 3 * * 1-5", "UTC", [1]), weekdays
    assert weekdays["task_name"] == f"{__name__}:record" and weekdays["name"] == "weekdays"
    assert weekdays["engine"] == "apscheduler" and weekdays["queue"] is None and weekdays["next_run_at"]
    assert (rows["every-90"]["kind"], rows["every-90"]["expression"], rows["every-90"]["kwargs"]) == \
        ("interval", "90", {"k": "v"})
    assert (rows["once"]["kind"], rows["once"]["expression"]) == ("clocked", "2030-01-02T03:04:05+00:00")
    assert rows["seconds"]["kind"] == "cron" and "second='*/10'" in rows["seconds"]["expression"]
    assert rows["paused"]["is_enabled"] is False and rows["paused"]["next_run_at"] is None
    assert all(r["source"] == "apscheduler:jobstore" for r in rows.values())


@pytest.mark.parametrize("crontab, days", [("*", set(range(7))), ("0", {0}), ("7", {0}), ("1-5", {1, 2, 3, 4, 5}),
                                           ("sat,sun", {6, 0}), ("*/2", {0, 2, 4, 6}), ("mon-wed/2", {1, 3})])
def test_crontab_weekdays_keep_their_meaning_in_apscheduler(crontab, days):
    assert aps.crontab_weekdays(crontab) == days
    trigger = aps.APSchedulerSource._trigger("cron", f"0 12 * * {crontab}", "UTC")
    assert aps._trigger_weekdays([f for f in trigger.fields if f.name == "day_of_week"][0]) == days
    # APScheduler's own from_crontab reads 0 as Monday: not what the brain means.
    if crontab == "0":
        naive = CronTrigger.from_crontab("0 12 * * 0")
        assert aps._trigger_weekdays([f for f in naive.fields if f.name == "day_of_week"][0]) == {1}


def test_trigger_now_runs_the_job_in_its_executor_and_keeps_its_next_run(scheduler):
    job = scheduler.add_job(record, "interval", hours=1, args=[7], id="hourly")
    source = aps.APSchedulerSource(scheduler)
    before = job.next_run_time
    result = source.trigger(rows_of(source)["hourly"])
    assert result["job_id"] == "hourly" and result["executor"] == "default"
    deadline = time.monotonic() + 5
    while not CALLS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert CALLS == [((7,), {})]
    assert scheduler.get_job("hourly").next_run_time == before
    row = rows_of(source)["hourly"]
    assert row["total_runs"] == 1 and row["last_run_at"]
    with pytest.raises(S.Conflict):
        source.trigger({"source_key": "gone"})


def test_the_brains_writes_change_the_jobs(scheduler):
    scheduler.add_job(record, "interval", hours=1, id="existing")
    source = aps.APSchedulerSource(scheduler)

    def row(key):
        return rows_of(source)[key]

    source.mutate("create", None, None, {"name": "made", "task_name": f"{__name__}:other",
                                         "kind": "cron", "expression": "15 4 * * 0", "timezone": "Europe/Paris",
                                         "queue": None, "args": [1, 2], "kwargs": {"x": 1}, "is_enabled": True})
    job = scheduler.get_job("made")
    assert job.func is other and job.args == (1, 2) and job.kwargs == {"x": 1}
    assert job.next_run_time.weekday() == 6 and str(job.trigger.timezone) == "Europe/Paris"  # a Sunday
    assert (row("made")["expression"], row("made")["timezone"]) == ("15 4 * * 0", "Europe/Paris")

    source.mutate("update", "made", row("made"), {"kind": "interval", "expression": "45", "timezone": "UTC",
                                                  "args": [3], "task_name": f"{__name__}:record"})
    job = scheduler.get_job("made")
    assert job.func is record and job.args == (3,) and job.trigger.interval == timedelta(seconds=45)
    assert (row("made")["kind"], row("made")["expression"]) == ("interval", "45")

    source.mutate("update", "made", row("made"), {"is_enabled": False})
    assert scheduler.get_job("made").next_run_time is None and row("made")["is_enabled"] is False
    source.mutate("update", "made", row("made"), {"is_enabled": True})
    assert scheduler.get_job("made").next_run_time is not None and row("made")["is_enabled"] is True

    with pytest.raises(S.Conflict, match="changed in APScheduler"):
        source.mutate("update", "made", {**row("made"), "args": [9]}, {"is_enabled": False})
    with pytest.raises(ValueError, match="cannot change"):
        source.mutate("update", "made", row("made"), {"name": "other-name"})
    with pytest.raises(S.Conflict, match="exists already"):
        source.mutate("create", None, None, {"name": "existing", "task_name": f"{__name__}:record",
                                             "kind": "interval", "expression": "5"})
    source.mutate("delete", "made", row("made"), {})
    assert scheduler.get_job("made") is None and "made" not in rows_of(source)


@pytest.mark.parametrize("definition, message", [
    ({"kind": "interval", "expression": "-1"}, "positive number"),
    ({"kind": "interval", "expression": "abc"}, "number of seconds"),
    ({"kind": "cron", "expression": "99 * * * *"}, "cannot run the cron expression"),
    ({"kind": "cron", "expression": "* * * * 9"}, "day-of-week"),
    ({"kind": "cron", "expression": "* * * *"}, "five fields"),
    ({"kind": "cron", "expression": "0 0 * * *", "timezone": "Mars/Base"}, "unknown timezone"),
    ({"kind": "clocked", "expression": "2030-01-01T00:00:00"}, "needs an offset"),
    ({"kind": "clocked", "expression": "2001-01-01T00:00:00+00:00"}, "never run"),
    ({"kind": "solar", "expression": "sunset"}, "not 'solar'"),
    ({"kind": "interval", "expression": "60", "task_name": "nosuch"}, "module:function"),
    ({"kind": "interval", "expression": "60", "task_name": "nosuch.module:f"}, "cannot import"),
    ({"kind": "interval", "expression": "60", "queue": "q1"}, "queue must be"),
    ({"kind": "interval", "expression": "60", "kwargs": []}, "kwargs must be an object"),
])
def test_what_the_brain_cannot_write_is_refused_with_the_reason(scheduler, definition, message):
    source = aps.APSchedulerSource(scheduler)
    spec = {"name": "bad", "task_name": f"{__name__}:record", "timezone": "UTC", **definition}
    with pytest.raises(ValueError, match=message):
        source.mutate("create", None, None, spec)
    assert scheduler.get_jobs() == []


def test_install_serves_the_scheduler_and_counts_its_runs(tmp_path):
    CALLS.clear()
    served = []
    client = type("C", (), {"serve": lambda self, h, **kw: served.append((h, kw))})()
    s = BackgroundScheduler(timezone="UTC")
    source_rows = aps.APSchedulerSource(s)
    with pytest.raises(RuntimeError, match="not started"):
        source_rows.rows()
    s.add_job(record, "interval", seconds=0.2, id="fast")
    assert aps.install(s, client, state_path=str(tmp_path / "state.json")) is client
    aps.install(s, client, state_path=str(tmp_path / "state.json"))  # once
    s.start()
    try:
        handlers, kw = served[0]
        assert len(served) == 1 and kw["schedulers"] == [OWNER]
        assert sorted(kw["capabilities"][OWNER]) == sorted(aps.CAPABILITIES)
        stream = aps.active(s)
        deadline = time.monotonic() + 5
        while stream.source.rows()[0]["total_runs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stream.source.rows()[0]["total_runs"] >= 2 and len(CALLS) >= 1
        stream.stop()
    finally:
        s.shutdown(wait=False)
    with pytest.raises(TypeError, match="APScheduler 3"):
        aps.install(object(), client)


def test_an_asyncio_scheduler_is_read_and_written_on_its_event_loop():
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    def run():
        asyncio.set_event_loop(loop)
        s = AsyncIOScheduler(event_loop=loop, timezone="UTC")
        s.add_job(record, "interval", hours=1, args=[5], id="async-job")
        s.start()
        holder["s"] = s
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    s = holder["s"]
    CALLS.clear()
    try:
        source = aps.APSchedulerSource(s)
        idents = []
        jobs = source._jobs

        def recording_jobs():
            idents.append(threading.get_ident())
            return jobs()

        source._jobs = recording_jobs
        row = rows_of(source)["async-job"]
        source.trigger(row)
        deadline = time.monotonic() + 5
        while not CALLS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert CALLS == [((5,), {})]
        source.mutate("update", "async-job", row, {"is_enabled": False})
        assert rows_of(source)["async-job"]["is_enabled"] is False
        # the reads (rows), the trigger and the write all touched the jobs on the loop's thread
        assert len(idents) >= 4 and set(idents) == {thread.ident}, (idents, thread.ident)
    finally:
        loop.call_soon_threadsafe(lambda: (s.shutdown(wait=False), loop.stop()))
        thread.join(5)


def test_a_job_sending_a_dramatiq_actor_is_listed_under_the_actor_and_created_by_its_name(scheduler):
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name="reports", broker=broker)
    def send_report(day):
        return day

    scheduler.add_job(send_report.send, "interval", hours=1, args=["mon"], id="report")
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["report"]
    # z4j-apscheduler 1.13 lists every such job as "dramatiq.actor:Actor.send"
    assert (row["engine"], row["task_name"], row["queue"]) == ("dramatiq", "send_report", "reports"), row
    source.trigger(row)
    deadline = time.monotonic() + 5  # the job runs in the executor's thread
    while broker.queues["reports"].qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.queues["reports"].qsize() == 1
    source.mutate("create", None, None, {"name": "report-2", "task_name": "send_report", "kind": "interval",
                                         "expression": "60", "queue": "reports", "args": ["tue"]})
    assert scheduler.get_job("report-2").func == send_report.send
    with pytest.raises(ValueError, match="its own queue"):
        source.mutate("create", None, None, {"name": "report-3", "task_name": "send_report",
                                             "kind": "interval", "expression": "60", "queue": "other"})


RELEASE = threading.Event()


def blocking():
    RELEASE.wait(5)


def test_trigger_now_keeps_max_instances(scheduler):
    RELEASE.clear()
    scheduler.add_job(blocking, "interval", hours=1, id="slow", max_instances=1)
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["slow"]
    source.trigger(row)
    try:
        with pytest.raises(RuntimeError, match="max_instances"):
            source.trigger(row)
    finally:
        RELEASE.set()
    assert rows_of(source)["slow"]["total_runs"] == 1


class Conn:  # an argument JSON has no form for (shown as its repr)
    def __repr__(self):
        return "<Conn>"


def test_an_update_writes_back_only_the_arguments_it_changes(scheduler):
    conn = Conn()
    scheduler.add_job(record, "interval", hours=1, args=[conn, 1], kwargs={"at": datetime(2030, 1, 1)}, id="native")
    scheduler.add_job(record, "interval", hours=1, args=[1, 2], id="plain")
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["native"]
    assert row["args"] == ["<Conn>", 1] and row["kwargs"] == {"at": "2030-01-01T00:00:00"}
    source.mutate("update", "native", row, {**{k: row[k] for k in S.EDITABLE}, "expression": "120"})
    job = scheduler.get_job("native")
    assert job.args == (conn, 1) and job.kwargs == {"at": datetime(2030, 1, 1)}
    assert job.trigger.interval == timedelta(seconds=120)
    row = rows_of(source)["native"]
    with pytest.raises(ValueError, match="no exact form"):
        source.mutate("update", "native", row, {"args": ["<Conn>", 2]})
    assert scheduler.get_job("native").args == (conn, 1)
    row = rows_of(source)["plain"]
    source.mutate("update", "plain", row, {"args": [5, 6], "kwargs": {"k": 1}})
    assert scheduler.get_job("plain").args == (5, 6) and scheduler.get_job("plain").kwargs == {"k": 1}


def test_a_refused_update_writes_nothing(scheduler):
    """The trigger is built and checked before anything is written: a new
    function with a time in the past changes neither."""
    scheduler.add_job(record, "interval", hours=1, args=[1], id="job")
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["job"]
    with pytest.raises(ValueError, match="never run"):
        source.mutate("update", "job", row, {"task_name": f"{__name__}:other", "args": [2], "kind": "clocked",
                                             "expression": "2001-01-01T00:00:00+00:00", "timezone": "UTC"})
    job = scheduler.get_job("job")
    assert job.func is record and job.args == (1,) and job.trigger.interval == timedelta(hours=1)


def test_enabling_a_job_with_no_run_left_is_refused_and_keeps_it(scheduler):
    """APScheduler's resume_job deletes a job whose trigger has no next run."""
    ended = datetime.now(timezone.utc) - timedelta(hours=1)
    scheduler.add_job(record, "interval", seconds=60, start_date=ended - timedelta(hours=1), end_date=ended,
                      id="ended", next_run_time=None)
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["ended"]
    assert row["is_enabled"] is False
    with pytest.raises(ValueError, match="no run left"):
        source.mutate("update", "ended", row, {"is_enabled": True})
    assert scheduler.get_job("ended") is not None


def test_functions_are_imported_before_the_schedulers_lock_is_taken(scheduler, monkeypatch):
    import apscheduler.util

    held = []
    real = apscheduler.util.ref_to_obj

    def watching(ref):
        held.append(scheduler._jobstores_lock._is_owned())
        return real(ref)

    monkeypatch.setattr(apscheduler.util, "ref_to_obj", watching)
    source = aps.APSchedulerSource(scheduler)
    source.mutate("create", None, None, {"name": "made", "task_name": f"{__name__}:other", "kind": "interval",
                                         "expression": "60"})
    assert held == [False] and scheduler.get_job("made").func is other


def test_work_the_event_loop_does_not_take_in_time_never_runs(monkeypatch):
    """A mutation that timed out waiting for a busy loop is reported as not
    done and never runs later (a retry from the brain would do it twice)."""
    monkeypatch.setattr(aps, "LOOP_TIMEOUT", 0.2)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    def run():
        asyncio.set_event_loop(loop)
        s = AsyncIOScheduler(event_loop=loop, timezone="UTC")
        s.add_job(record, "interval", hours=1, id="async-job")
        s.start()
        holder["s"] = s
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    s = holder["s"]
    try:
        source = aps.APSchedulerSource(s)
        row = rows_of(source)["async-job"]
        loop.call_soon_threadsafe(time.sleep, 0.6)  # the loop is blocked a while
        try:
            source.mutate("update", "async-job", row, {"is_enabled": False})
            outcome = "done"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        time.sleep(0.6)
        assert rows_of(source)["async-job"]["is_enabled"] is True  # it did not run once the loop was free
        assert "nothing was done" in outcome, outcome
    finally:
        loop.call_soon_threadsafe(lambda: (s.shutdown(wait=False), loop.stop()))
        thread.join(5)


def test_a_commands_error_text_keeps_no_password(scheduler):
    scheduler.add_job(record, "interval", hours=1, id="job")
    source = aps.APSchedulerSource(scheduler)
    row = rows_of(source)["job"]

    def down(*args, **kwargs):
        raise OSError("cannot reach postgresql://z4j:hunter2secret@db/jobs")

    source._find = down
    for call in (lambda: source.mutate("update", "job", row, {"expression": "90"}), lambda: source.trigger(row)):
        with pytest.raises(Exception) as caught:
            call()
        assert "hunter2secret" not in str(caught.value) and "postgresql://" in str(caught.value)
