"""rq-scheduler through the external schedule protocol
(z4j_agentd.rq.scheduler), against a real rq-scheduler on a throwaway
redis-server: the rows of cron, interval and one-off jobs, trigger now,
the transactional enqueue of due jobs (a paused job is not run), the
brain's create, update, disable, enable and delete, what they refuse, and
the `python -m z4j_agentd.rq.scheduler` entry point."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("rq_scheduler")

from redis import Redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq_scheduler import Scheduler  # noqa: E402

from z4j_agentd import _schedules as S  # noqa: E402
from z4j_agentd.rq import scheduler as rs  # noqa: E402
from redis_server import unix_redis

OWNER = "rq-scheduler"


@pytest.fixture(scope="module")
def redis_socket():
    with unix_redis() as sock:
        yield sock


@pytest.fixture
def conn(redis_socket):
    r = Redis(unix_socket_path=redis_socket)
    r.flushall()
    return r


def add(a, b):  # the jobs' function (a worker would import tests.test_rq_scheduler.add)
    return a + b


def fill(scheduler):
    """One job of each kind, in the registry."""
    cron = scheduler.cron("*/5 * * * *", func=add, args=[1, 2], id="cron-add", queue_name="q1")
    every = scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[3],
                               kwargs={"b": 4}, interval=30, repeat=5, id="every-30")
    once = scheduler.enqueue_at(datetime(2030, 1, 2, 3, 4, 5), add, 5, 6, job_id="once")
    return cron, every, once


def by_key(rows):
    return {r["source_key"]: r for r in rows}


def test_rows_list_cron_interval_and_one_off_jobs(conn):
    scheduler = Scheduler(connection=conn)
    fill(scheduler)
    source = rs.RQSchedulerSource(scheduler)
    rows = by_key(S.normalize_row(r, OWNER) for r in source.rows())
    assert set(rows) == {"cron-add", "every-30", "once"}
    cron, every, once = rows["cron-add"], rows["every-30"], rows["once"]
    assert (cron["kind"], cron["expression"], cron["timezone"], cron["queue"], cron["args"]) == \
        ("cron", "*/5 * * * *", rs.local_zone(), "q1", [1, 2]), cron
    assert cron["name"] == "tests.test_rq_scheduler.add [cron-add]" or cron["name"].endswith(" [cron-add]")
    assert cron["task_name"].endswith("test_rq_scheduler.add") and cron["engine"] == "rq"
    assert cron["next_run_at"] and int(cron["next_run_at"][14:16]) % 5 == 0, cron
    assert (every["kind"], every["expression"], every["args"], every["kwargs"], every["queue"]) == \
        ("interval", "30", [3], {"b": 4}, "default"), every
    assert (once["kind"], once["expression"]) == ("clocked", "2030-01-02T03:04:05+00:00"), once
    assert once["next_run_at"] == "2030-01-02T03:04:05.000000+00:00"
    assert all(r["is_enabled"] and r["total_runs"] == 0 and r["source"] == "rq-scheduler:redis" for r in rows.values())
    assert source.capabilities() == list(rs.CAPABILITIES)


def test_trigger_now_enqueues_a_new_job_and_counts_a_run(conn):
    scheduler = Scheduler(connection=conn)
    fill(scheduler)
    source = rs.RQSchedulerSource(scheduler)
    before = conn.zscore(scheduler.scheduled_jobs_key, "every-30")
    result = source.trigger(by_key(source.rows())["every-30"])
    assert result["queue"] == "default" and result["task_id"] != "every-30"
    queued = Queue("default", connection=conn).jobs
    assert [(j.id, list(j.args), j.kwargs) for j in queued] == [(result["task_id"], [3], {"b": 4})]
    assert conn.zscore(scheduler.scheduled_jobs_key, "every-30") == before
    row = by_key(source.rows())["every-30"]
    assert row["total_runs"] == 1 and row["last_run_at"] is not None
    with pytest.raises(S.Conflict):
        source.trigger({"source_key": "gone", "name": "gone"})


def test_due_jobs_are_enqueued_in_a_transaction_and_paused_ones_wait(conn, tmp_path):
    scheduler = Scheduler(connection=conn)
    due = scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1],
                             interval=60, repeat=2, id="due")
    held = scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[2, 2],
                              interval=60, id="held")
    served = []
    client = type("C", (), {"serve": lambda self, h, **kw: served.append(kw)})()
    rs.install(scheduler, client, state_path=str(tmp_path / "state.json"))
    assert served[0]["schedulers"] == [OWNER]
    assert sorted(served[0]["capabilities"][OWNER]) == sorted(rs.CAPABILITIES)
    source = rs.active(scheduler).source
    rows = by_key(source.rows())
    source.mutate("update", "held", S.normalize_row(rows["held"], OWNER), {"is_enabled": False})
    scheduler.enqueue_jobs()
    rs.active(scheduler).stop()
    queue = Queue("default", connection=conn)
    assert queue.job_ids == ["due"]
    assert due.id in queue.job_ids
    rows = by_key(source.rows())
    assert rows["due"]["total_runs"] == 1 and rows["due"]["next_run_at"] is not None
    assert conn.zscore(scheduler.scheduled_jobs_key, "due") > time.time() + 50
    assert scheduler.job_class.fetch("due", connection=conn).meta["repeat"] == 1
    assert rows["held"]["is_enabled"] is False and rows["held"]["total_runs"] == 0
    assert held.id not in queue.job_ids


def test_the_brains_writes_change_the_registry(conn):
    scheduler = Scheduler(connection=conn, queue_name="default")
    fill(scheduler)
    source = rs.RQSchedulerSource(scheduler)

    def row(key):
        return S.normalize_row(by_key(source.rows())[key], OWNER)

    created = source.mutate("create", None, None, {
        "name": "nightly", "task_name": "tests.test_rq_scheduler:add", "kind": "interval",
        "expression": "3600", "timezone": "UTC", "queue": "q2", "args": [7, 8], "kwargs": {},
        "is_enabled": True})
    key = created["source_key"]
    job = scheduler.job_class.fetch(key, connection=conn)
    assert (job.func_name, list(job.args), job.origin, job.meta["interval"]) == \
        ("tests.test_rq_scheduler.add", [7, 8], "q2", 3600)
    assert row(key)["name"] == "nightly" and row(key)["queue"] == "q2"
    assert row(source.mutate("create", None, None, {"name": "n2", "task_name": "m.f", "kind": "interval",
                                                "expression": "9", "queue": None})["source_key"])["queue"] is None
    assert time.time() + 3500 < conn.zscore(scheduler.scheduled_jobs_key, key) <= time.time() + 3600

    # update: a cron cadence and new arguments
    source.mutate("update", key, row(key), {"kind": "cron", "expression": "0 3 * * *",
                                            "timezone": rs.local_zone(), "args": [1, 1]})
    updated = row(key)
    assert (updated["kind"], updated["expression"], updated["args"]) == ("cron", "0 3 * * *", [1, 1])
    assert "interval" not in scheduler.job_class.fetch(key, connection=conn).meta

    # disable: out of rq-scheduler's registry, into the paused set; enable: back
    score = conn.zscore(scheduler.scheduled_jobs_key, key)
    source.mutate("update", key, row(key), {"is_enabled": False})
    assert conn.zscore(scheduler.scheduled_jobs_key, key) is None
    assert conn.zscore(scheduler.scheduled_jobs_key + rs.PAUSED_SUFFIX, key) == score
    assert row(key)["is_enabled"] is False and row(key)["next_run_at"] is None
    source.mutate("update", key, row(key), {"is_enabled": True})
    assert conn.zscore(scheduler.scheduled_jobs_key, key) == score and row(key)["is_enabled"] is True

    # compare-and-set: a row that changed since the brain saw it is refused
    stale = {**row(key), "args": [9]}
    with pytest.raises(S.Conflict, match="changed in rq-scheduler"):
        source.mutate("update", key, stale, {"is_enabled": False})

    # rename, then delete (rq-scheduler's cancel)
    source.mutate("update", key, row(key), {"name": "renamed"})
    assert row(key)["name"] == "renamed"
    with pytest.raises(S.Conflict, match="exists already"):
        source.mutate("create", None, None, {"name": "renamed", "task_name": "m.f", "kind": "interval",
                                             "expression": "5"})
    source.mutate("delete", key, row(key), {})
    assert key not in by_key(source.rows())
    assert conn.zscore(scheduler.scheduled_jobs_key, key) is None


@pytest.mark.parametrize("definition, message", [
    ({"kind": "interval", "expression": "1.5"}, "whole number of seconds"),
    ({"kind": "interval", "expression": "0"}, "whole number of seconds"),
    ({"kind": "interval", "expression": "60", "timezone": "Europe/Paris"}, "only a cron schedule"),
    ({"kind": "cron", "expression": "99 * * * *"}, "cannot run the cron expression"),
    ({"kind": "cron", "expression": "* * * *"}, "five fields"),
    ({"kind": "clocked", "expression": "2030-01-01T00:00:00"}, "needs an offset"),
    ({"kind": "solar", "expression": "sunset"}, "not 'solar'"),
    ({"kind": "interval", "expression": "60", "task_name": "add"}, "import path"),
    ({"kind": "interval", "expression": "60", "args": {"a": 1}}, "args must be a list"),
    ({"kind": "interval", "expression": "60", "is_enabled": "false"}, "true or false"),
])
def test_what_the_brain_cannot_write_is_refused_with_the_reason(conn, definition, message):
    scheduler = Scheduler(connection=conn)
    source = rs.RQSchedulerSource(scheduler)
    spec = {"name": "bad", "task_name": "tests.test_rq_scheduler.add", "timezone": "UTC", **definition}
    if definition.get("kind") == "cron" and "timezone" not in definition:
        spec["timezone"] = rs.local_zone()
    with pytest.raises(ValueError, match=message):
        source.mutate("create", None, None, spec)
    assert source.rows() == [] and conn.zcard(scheduler.scheduled_jobs_key) == 0


def test_source_keys_are_the_job_ids_and_stay_across_processes(conn):
    fill(Scheduler(connection=conn))
    first = [r["source_key"] for r in rs.RQSchedulerSource(Scheduler(connection=conn)).rows()]
    again = [r["source_key"] for r in rs.RQSchedulerSource(Scheduler(connection=conn)).rows()]
    assert first == again == ["cron-add", "every-30", "once"]


def test_the_entry_point_runs_rq_scheduler_with_the_integration(redis_socket, conn, standin, sock_path,
                                                                 monkeypatch, tmp_path):
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 2], interval=60,
                       id="tick")
    monkeypatch.setenv("Z4J_SOCKET_PATH", sock_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = rs.parser().parse_args(["-u", f"unix://{redis_socket}", "-i", "1", "-b"])
    assert (args.url, args.interval, args.burst) == (f"unix://{redis_socket}", 1.0, True)
    rs.main(["-u", f"unix://{redis_socket}", "-i", "1", "-b"])
    assert Queue("default", connection=conn).job_ids == ["tick"]
    assert conn.hget(scheduler.scheduled_jobs_key + rs.RUNS_SUFFIX, "tick") == b"1"
    hello = standin.wait_for(lambda: [m for _, m in standin.all("hello") if m.get("schedulers")])
    assert hello[0]["schedulers"] == [OWNER] and "external_schedule_protocol_v1" in hello[0]["runtime_features"]
    assert (tmp_path / ".z4j").is_dir()
    for stream in list(rs._installed.values()):
        stream.stop()
    rs._installed.clear()


def test_a_change_landing_as_the_job_comes_due_is_not_overwritten_by_the_run(conn, tmp_path):
    """rq-scheduler reads the due jobs, then saves each one as it enqueues
    it: a change the brain made in between would be written over with the
    copy read before it (rq-scheduler's own enqueue_job does that)."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    stale = next(iter(scheduler.get_jobs_to_queue()))  # read by the scheduler's tick ...
    source = rs.RQSchedulerSource(scheduler)
    row = S.normalize_row(by_key(source.rows())["due"], OWNER)
    source.mutate("update", "due", row, {"args": [2, 2]})  # ... the brain's change lands ...
    source.enqueue_due(stale, scheduler.enqueue_job)  # ... then the tick enqueues it
    job = scheduler.job_class.fetch("due", connection=conn)
    assert list(job.args) == [2, 2] and Queue("default", connection=conn).job_ids == ["due"]
    # rq-scheduler's own enqueue_job writes the stale copy back: what the test guards against
    scheduler2 = Scheduler(connection=conn)
    source.mutate("update", "due", S.normalize_row(by_key(source.rows())["due"], OWNER), {"args": [3, 3]})
    conn.zadd(scheduler2.scheduled_jobs_key, {"due": time.time() - 1})
    scheduler2.enqueue_job(stale)
    assert list(scheduler2.job_class.fetch("due", connection=conn).args) == [1, 1]


def test_a_job_disabled_as_it_comes_due_does_not_run(conn):
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    stale = next(iter(scheduler.get_jobs_to_queue()))
    source = rs.RQSchedulerSource(scheduler)
    source.mutate("update", "due", S.normalize_row(by_key(source.rows())["due"], OWNER), {"is_enabled": False})
    source.enqueue_due(stale, scheduler.enqueue_job)
    assert Queue("default", connection=conn).job_ids == []
    assert conn.zscore(scheduler.scheduled_jobs_key, "due") is None
    assert conn.zscore(scheduler.scheduled_jobs_key + rs.PAUSED_SUFFIX, "due") is not None


def test_a_cron_job_on_a_host_outside_utc_names_the_hosts_zone(conn, monkeypatch):
    """rq-scheduler reads cron expressions in local time: the row says so,
    and its next run is 03:00 in that zone."""
    from zoneinfo import ZoneInfo

    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        scheduler = Scheduler(connection=conn)
        scheduler.cron("0 3 * * *", func=add, args=[1, 1], id="paris")
        source = rs.RQSchedulerSource(scheduler)
        row = S.normalize_row(source.rows()[0], OWNER)
        assert row["timezone"] == "Europe/Paris"
        when = datetime.fromisoformat(row["next_run_at"]).astimezone(ZoneInfo("Europe/Paris"))
        assert (when.hour, when.minute) == (3, 0), row
        with pytest.raises(ValueError, match="host's time zone"):
            source.mutate("update", "paris", row, {"timezone": "UTC"})
        source.mutate("update", "paris", row, {"expression": "30 4 * * *"})
        when = datetime.fromisoformat(S.normalize_row(source.rows()[0], OWNER)["next_run_at"])
        assert when.astimezone(ZoneInfo("Europe/Paris")).strftime("%H:%M") == "04:30"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_job_whose_run_is_on_a_worker_keeps_its_data_until_the_run_ends(conn):
    """rq-scheduler runs every run under the job's id, and the worker saves the
    job it ran when the run ends: new arguments written meanwhile would be
    lost, so they are refused; the switch (registry only) still works."""
    from rq.job import JobStatus

    scheduler = Scheduler(connection=conn)
    job = scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[1, 1], interval=60,
                             id="busy")
    job.set_status(JobStatus.STARTED)
    source = rs.RQSchedulerSource(scheduler)
    row = S.normalize_row(source.rows()[0], OWNER)
    with pytest.raises(S.Conflict, match="on a worker now"):
        source.mutate("update", "busy", row, {"args": [2, 2]})
    source.mutate("update", "busy", row, {"is_enabled": False})
    stored = scheduler.job_class.fetch("busy", connection=conn)
    assert list(stored.args) == [1, 1] and stored.get_status() == JobStatus.STARTED
    assert S.normalize_row(source.rows()[0], OWNER)["is_enabled"] is False


def test_an_update_writes_back_only_the_arguments_it_changes(conn):
    """The page shows arguments in their JSON form and the brain sends them
    back with every update: an interval change must leave a datetime, a
    Decimal, a tuple and an integer key as they are, and a change to such
    arguments is refused (writing their text form would change them)."""
    from decimal import Decimal

    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add,
                       args=[when, Decimal("1.50"), (1, 2)], kwargs={1: "a"}, interval=60, id="native")
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[1, 2], interval=60,
                       id="plain")
    source = rs.RQSchedulerSource(scheduler)
    row = S.normalize_row(by_key(source.rows())["native"], OWNER)
    assert row["args"] == [when.isoformat(), "1.50", [1, 2]] and row["kwargs"] == {"1": "a"}
    source.mutate("update", "native", row, {**{k: row[k] for k in S.EDITABLE}, "expression": "120"})
    job = scheduler.job_class.fetch("native", connection=conn)
    assert list(job.args) == [when, Decimal("1.50"), (1, 2)] and job.kwargs == {1: "a"}
    assert job.meta["interval"] == 120
    row = S.normalize_row(by_key(source.rows())["native"], OWNER)
    with pytest.raises(ValueError, match="no exact form"):
        source.mutate("update", "native", row, {"args": [when.isoformat(), "2.50", [1, 2]]})
    with pytest.raises(ValueError, match="no exact form"):
        source.mutate("update", "native", row, {"kwargs": {"1": "b"}})
    assert list(scheduler.job_class.fetch("native", connection=conn).args) == [when, Decimal("1.50"), (1, 2)]
    # arguments that are JSON as they are still change
    row = S.normalize_row(by_key(source.rows())["plain"], OWNER)
    source.mutate("update", "plain", row, {"args": [5, 6], "kwargs": {}})
    assert list(scheduler.job_class.fetch("plain", connection=conn).args) == [5, 6]


def test_arguments_cut_from_the_row_are_kept_and_cannot_be_changed(conn):
    scheduler = Scheduler(connection=conn)
    big = "x" * (S.ROW_PAYLOAD_BYTES + 1000)
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[big, 1], interval=60,
                       id="big")
    source = rs.RQSchedulerSource(scheduler)
    row = S.fit_row(S.normalize_row(source.rows()[0], OWNER))
    assert row["args"][0].startswith("<left out")
    source.mutate("update", "big", row, {"args": row["args"], "kwargs": row["kwargs"], "expression": "90"})
    assert list(scheduler.job_class.fetch("big", connection=conn).args) == [big, 1]
    row = S.fit_row(S.normalize_row(source.rows()[0], OWNER))
    with pytest.raises(ValueError, match="without its arguments"):
        source.mutate("update", "big", row, {"args": ["small"]})
    assert list(scheduler.job_class.fetch("big", connection=conn).args) == [big, 1]


class Elsewhere:  # pickled as a class of a module this process cannot import
    pass


def _unreadable_job(scheduler, job_id):
    import sys
    import types

    module = types.ModuleType("z4j_gone_module")
    Elsewhere.__module__ = "z4j_gone_module"
    module.Elsewhere = Elsewhere
    sys.modules["z4j_gone_module"] = module
    try:
        return scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add,
                                  args=[Elsewhere(), 1], interval=60, id=job_id)
    finally:
        del sys.modules["z4j_gone_module"]
        Elsewhere.__module__ = __name__


def test_a_job_whose_arguments_cannot_be_read_here_is_listed_and_kept(conn):
    """Its arguments need a module this process cannot import: the other
    jobs are still listed, it is listed with a note and its function's name,
    its schedule and switch still change, its data is left as it was."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[1, 2], interval=60,
                       id="fine")
    _unreadable_job(scheduler, "opaque")
    stored = conn.hget(scheduler.job_class.key_for("opaque"), "data")
    source = rs.RQSchedulerSource(scheduler)
    rows = by_key(S.normalize_row(r, OWNER) for r in source.rows())
    assert set(rows) == {"fine", "opaque"}
    opaque = rows["opaque"]
    assert opaque["task_name"] == f"{add.__module__}.add", opaque
    assert opaque["args"] == ["<not readable here: DeserializationError>"] and opaque["kwargs"] == {}
    source.mutate("update", "opaque", opaque, {**{k: opaque[k] for k in S.EDITABLE}, "expression": "300",
                                               "is_enabled": False})
    assert conn.hget(scheduler.job_class.key_for("opaque"), "data") == stored
    opaque = S.normalize_row(by_key(source.rows())["opaque"], OWNER)
    assert (opaque["expression"], opaque["is_enabled"]) == ("300", False)
    with pytest.raises(ValueError, match="cannot be read in this process"):
        source.mutate("update", "opaque", opaque, {"args": [1, 1]})
    with pytest.raises(ValueError, match="cannot change its function"):
        source.mutate("update", "opaque", opaque, {"task_name": "tests.test_rq_scheduler.other"})
    with pytest.raises(RuntimeError, match="nothing was sent"):
        source.trigger(opaque)
    assert conn.hget(scheduler.job_class.key_for("opaque"), "data") == stored


def test_producers_adding_jobs_do_not_stop_reads_writes_or_due_runs(conn):
    """Each read of a job lets a producer add another one to the registry
    (as busy producers do): the rows are still read, the brain's write
    still lands, and a due job is enqueued at its tick."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    source = rs.RQSchedulerSource(scheduler)
    fetch = source._fetch
    added = []

    def busy_fetch(job_id):
        added.append(f"other-{len(added)}")
        conn.zadd(scheduler.scheduled_jobs_key, {added[-1]: time.time() + 3600})
        return fetch(job_id)

    source._fetch = busy_fetch
    row = S.normalize_row(by_key(source.rows())["due"], OWNER)
    source.mutate("update", "due", row, {"args": [2, 2]})
    stale = scheduler.job_class.fetch("due", connection=conn)
    source.enqueue_due(stale, scheduler.enqueue_job)
    assert Queue("default", connection=conn).job_ids == ["due"]
    assert list(scheduler.job_class.fetch("due", connection=conn).args) == [2, 2]
    assert conn.zscore(scheduler.scheduled_jobs_key, "due") > time.time() + 50
    assert len(added) >= 3


def test_a_due_job_is_enqueued_at_its_tick_while_producers_add_jobs(conn):
    """Only the due run: a producer adds a job to the registry between its
    read and its transaction, every time. It is enqueued at once (it used
    to give up after 5 tries and wait for a later tick)."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    source = rs.RQSchedulerSource(scheduler)
    fetch = source._fetch

    def busy_fetch(job_id):
        conn.zadd(scheduler.scheduled_jobs_key, {f"other-{time.monotonic_ns()}": time.time() + 3600})
        return fetch(job_id)

    source._fetch = busy_fetch
    source.enqueue_due(scheduler.job_class.fetch("due", connection=conn), scheduler.enqueue_job)
    assert Queue("default", connection=conn).job_ids == ["due"]
    assert conn.zscore(scheduler.scheduled_jobs_key, "due") > time.time() + 50
    assert conn.hget(scheduler.scheduled_jobs_key + rs.RUNS_SUFFIX, "due") == b"1"


def test_a_due_job_that_keeps_changing_goes_through_rq_schedulers_own_enqueue(conn):
    """Its own hash changes between every read and transaction (a worker
    writing a run back, say): after 5 tries it is enqueued by
    rq-scheduler's own enqueue_job, never skipped."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    source = rs.RQSchedulerSource(scheduler)
    fetch = source._fetch
    original = []

    def changing_fetch(job_id):
        job = fetch(job_id)
        conn.hset(scheduler.job_class.key_for(job_id), "description", f"changed {time.monotonic_ns()}")
        return job

    def own_enqueue(job):
        original.append(job.id)
        return scheduler.enqueue_job(job)

    source._fetch = changing_fetch
    source.enqueue_due(scheduler.job_class.fetch("due", connection=conn), own_enqueue)
    assert original == ["due"] and Queue("default", connection=conn).job_ids == ["due"]
    assert conn.hget(scheduler.scheduled_jobs_key + rs.RUNS_SUFFIX, "due") == b"1"


def test_a_due_run_never_writes_back_a_change_made_as_it_is_enqueued(conn):
    """The brain's write lands between the tick's read and its transaction:
    the transaction (watching the job) fails, the job is read again and
    enqueued with the change, the disabled one not at all."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="due")
    source = rs.RQSchedulerSource(scheduler)
    fetch = source._fetch
    calls = []

    def racing_fetch(job_id):
        job = fetch(job_id)
        if not calls:
            calls.append(job_id)
            source.mutate("update", "due", S.normalize_row(by_key(source.rows())["due"], OWNER),
                          {"is_enabled": False})
        return job

    source._fetch = racing_fetch
    source.enqueue_due(scheduler.job_class.fetch("due", connection=conn), scheduler.enqueue_job)
    assert Queue("default", connection=conn).job_ids == []
    assert conn.zscore(scheduler.scheduled_jobs_key + rs.PAUSED_SUFFIX, "due") is not None
    assert conn.zscore(scheduler.scheduled_jobs_key, "due") is None


def test_a_job_registered_again_while_paused_is_enabled_and_runs(conn):
    """The application schedules a fixed id again at boot while the page had
    it paused: it is in both sets. The registration wins: it shows enabled,
    and it runs (and leaves the paused set)."""
    scheduler = Scheduler(connection=conn)
    scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[1, 1], interval=60,
                       id="boot")
    source = rs.RQSchedulerSource(scheduler)
    source.mutate("update", "boot", S.normalize_row(source.rows()[0], OWNER), {"is_enabled": False})
    scheduler.schedule(datetime.now(timezone.utc) - timedelta(seconds=1), func=add, args=[1, 1], interval=60,
                       id="boot")  # the application's boot
    row = S.normalize_row(source.rows()[0], OWNER)
    assert row["is_enabled"] is True and row["next_run_at"] is not None
    due = list(scheduler.get_jobs_to_queue())
    assert [j.id for j in due] == ["boot"]
    source.enqueue_due(due[0], scheduler.enqueue_job)
    assert Queue("default", connection=conn).job_ids == ["boot"]
    assert conn.zscore(scheduler.scheduled_jobs_key + rs.PAUSED_SUFFIX, "boot") is None
    assert conn.zscore(scheduler.scheduled_jobs_key, "boot") > time.time() + 50


def test_long_job_ids_give_bounded_distinct_keys_and_names(conn):
    scheduler = Scheduler(connection=conn)
    stem = "j" * 120
    for tail in ("-first" * 30, "-second" * 30):
        scheduler.schedule(datetime.now(timezone.utc) + timedelta(hours=1), func=add, args=[1, 1], interval=60,
                           id=stem + tail)
    source = rs.RQSchedulerSource(scheduler)
    rows = [S.normalize_row(r, OWNER) for r in source.rows()]
    assert all(len(r["source_key"]) <= 200 and len(r["external_id"]) <= 200 and len(r["name"]) <= 200
               for r in rows), [len(r["source_key"]) for r in rows]
    assert len({r["source_key"] for r in rows}) == 2 and len({r["name"] for r in rows}) == 2
    row = rows[0]
    source.mutate("update", row["source_key"], row, {"expression": "90"})
    job_id = next(i for i in (stem + "-first" * 30, stem + "-second" * 30) if source.key(i) == row["source_key"])
    assert scheduler.job_class.fetch(job_id, connection=conn).meta["interval"] == 90
    assert source.trigger(row)["queue"] == "default"


def test_a_one_off_job_enabled_after_its_time_runs_at_once(conn):
    """As the quick start says: an interval or cron job enabled again after
    its time passed runs next from now on; a one-off keeps its time, which
    has passed, so it runs at the next tick."""
    scheduler = Scheduler(connection=conn)
    past = datetime.now(timezone.utc) + timedelta(seconds=1)
    scheduler.enqueue_at(past, add, 1, 1, job_id="once")
    scheduler.schedule(past, func=add, args=[1, 1], interval=3600, id="hourly")
    source = rs.RQSchedulerSource(scheduler)
    for key in ("once", "hourly"):
        source.mutate("update", key, S.normalize_row(by_key(source.rows())[key], OWNER), {"is_enabled": False})
    time.sleep(1.1)
    for key in ("once", "hourly"):
        source.mutate("update", key, S.normalize_row(by_key(source.rows())[key], OWNER), {"is_enabled": True})
    assert [j.id for j in scheduler.get_jobs_to_queue()] == ["once"]
    assert conn.zscore(scheduler.scheduled_jobs_key, "hourly") > time.time() + 3500


def test_a_commands_error_text_keeps_no_password(conn):
    from redis.exceptions import ConnectionError as RedisConnectionError

    scheduler = Scheduler(connection=conn)
    fill(scheduler)
    source = rs.RQSchedulerSource(scheduler)
    row = S.normalize_row(by_key(source.rows())["every-30"], OWNER)

    def down(*args, **kwargs):
        raise RedisConnectionError("Error 111 connecting to redis://:hunter2secret@cache:6379/0")

    source.rows = down
    source._fetch = down
    for call in (lambda: source.mutate("update", "every-30", row, {"expression": "90"}),
                 lambda: source.trigger(row)):
        with pytest.raises(Exception) as caught:
            call()
        assert "hunter2secret" not in str(caught.value) and "connecting to redis://" in str(caught.value)
