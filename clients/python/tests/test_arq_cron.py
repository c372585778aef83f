"""arq's cron jobs through the external schedule protocol
(z4j_agentd.arq.cron): the cron text (field order, arq's Monday-first
weekdays, seconds), the rows, the runs seen through arq's own cron loop
(`Worker.run_cron`), and "Trigger now" enqueueing through the worker's pool
on the worker's event loop, from the command thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

pytest.importorskip("arq")

from arq import Worker, cron  # noqa: E402

from z4j_agentd import _schedules as S  # noqa: E402
from z4j_agentd.arq import cron as zcron  # noqa: E402

OWNER = "arq-cron"
ACTIVATION = {"scheduler": OWNER, "owner": OWNER, "stream_id": "6f1c0e0a-1111-4222-8333-444455556666",
              "epoch_uuid": "7a2d1f0b-aaaa-4bbb-8ccc-ddddeeeeffff", "epoch_number": 1,
              "adapter_instance_id": "inst-1", "source_scope": S.source_scope(OWNER), "stable_source": True}


async def tick(ctx):
    return "tick"


async def report(ctx):
    return "report"


def command(action, **params):
    return {"id": str(uuid.uuid4()), "action": action, "target": {"type": "scheduler", "id": OWNER,
                                                                  "scheduler": OWNER}, "parameters": params}


class FakeClient:
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


class FakePool:
    """ArqRedis's enqueue_job, recording the thread it ran on."""

    def __init__(self, delay=0.0):
        self.calls = []
        self.delay = delay

    async def enqueue_job(self, function, *args, _job_id=None, _queue_name=None, _defer_until=None, **kw):
        self.calls.append((function, _job_id, _queue_name, threading.get_ident()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return SimpleNamespace(job_id=_job_id or uuid.uuid4().hex)


class Loop:
    """An event loop in a thread of its own, standing for the worker's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=5):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.mark.parametrize("kwargs, text", [
    ({}, "* * * * *"),                                       # arq's default: second 0, every minute
    ({"minute": {0, 30}}, "0,30 * * * *"),
    ({"hour": 2, "minute": 30, "weekday": "sun"}, "30 2 * * 0"),  # arq 6 = Sunday = cron 0
    ({"hour": 9, "minute": 0, "weekday": {0, 1, 2, 3, 4}}, "0 9 * * 1-5"),  # Monday-Friday
    ({"weekday": "mon", "minute": 0, "hour": 0}, "0 0 * * 1"),
    ({"day": 1, "month": {1, 7}, "hour": 3, "minute": 15}, "15 3 1 1,7 *"),
    ({"second": {0, 30}}, "* * * * * 0,30"),                 # seconds last, as croniter reads six fields
    ({"second": None, "minute": 5}, "5 * * * * *"),
    ({"minute": set(range(0, 60, 10))}, "*/10 * * * *"),
])
def test_cron_text_in_the_brains_field_order_and_weekday_numbering(kwargs, text):
    assert zcron.expression_of(cron(tick, **kwargs)) == text


def test_rows_name_function_queue_timezone_and_next_run(loop, tmp_path):
    jobs = [cron(tick, second={0, 30}), cron(report, name="nightly", hour=2, minute=30, weekday="sun")]
    client, pool = FakeClient(), FakePool()
    settings = {"cron_jobs": jobs, "queue_name": "q-rows", "timezone": timezone.utc}

    async def startup():
        return zcron.serve({"redis": pool}, settings, client, state_dir=str(tmp_path))

    stream = loop.run(startup())
    try:
        rows = {r["name"]: r for r in stream.source.rows()}
        t, n = rows["cron:tick"], rows["nightly"]
        assert t["source_key"] == t["external_id"] == "cron:tick" and t["task_name"] == f"{__name__}.tick"
        assert (t["kind"], t["expression"], t["timezone"], t["queue"], t["engine"], t["source"]) == \
            ("cron", "* * * * * 0,30", "UTC", "q-rows", "arq", "arq-cron:code")
        assert (n["task_name"], n["expression"]) == (f"{__name__}.report", "30 2 * * 0")
        now = datetime.now(timezone.utc)
        assert now < t["next_run_at"] <= now + timedelta(seconds=31)
        assert n["next_run_at"].weekday() == 6 and (n["next_run_at"].hour, n["next_run_at"].minute) == (2, 30)
        assert all(r["total_runs"] == 0 and r["last_run_at"] is None for r in rows.values())
        for row in rows.values():
            S.normalize_row(row, OWNER)
        assert client.served[0][1]["capabilities"] == {
            OWNER: sorted([S.STABLE_SNAPSHOT, S.MUTATION, "list", "read", "trigger_now"])}
    finally:
        stream.stop()


def test_arqs_own_cron_loop_counts_each_due_time_once(loop, tmp_path):
    job = cron(tick, second=None, microsecond=0)  # due every second
    pool = FakePool()
    worker = Worker(functions=[], cron_jobs=[job], redis_pool=pool, queue_name="q-runs",
                    timezone=timezone.utc)
    client = FakeClient()

    async def startup_and_two_polls():
        stream = zcron.serve({"redis": pool}, {"cron_jobs": worker.cron_jobs, "queue_name": "q-runs",
                                               "timezone": timezone.utc}, client, state_dir=str(tmp_path))
        start = datetime.now(timezone.utc)
        await worker.run_cron(start, 0.5)          # first poll: computes the first due time
        first_due = job.next_run
        await worker.run_cron(first_due + timedelta(seconds=0.2), 0.5)  # due: enqueued
        return stream, first_due

    stream, due = loop.run(startup_and_two_polls())
    try:
        assert [c[0] for c in pool.calls] == ["cron:tick"] and pool.calls[0][1].startswith("cron:tick:")
        row = stream.source.rows()[0]
        assert row["total_runs"] == 1 and row["last_run_at"] == due.replace(microsecond=0)
        # serve() again (a second on_startup in this process): bound again, not wrapped twice.
        loop.run(asyncio.sleep(0))

        async def again():
            return zcron.serve({"redis": pool}, {"cron_jobs": [job], "queue_name": "q-runs",
                                                 "timezone": timezone.utc}, client, state_dir=str(tmp_path))

        assert loop.run(again()) is stream and len(client.served) == 1
        loop.run(worker.run_cron(job.next_run + timedelta(seconds=0.2), 0.5))
        assert stream.source.rows()[0]["total_runs"] == 2
    finally:
        stream.stop()


def test_trigger_now_enqueues_on_the_workers_loop_from_the_command_thread(loop, tmp_path):
    jobs = [cron(report, name="nightly", hour=2, minute=30)]
    client, pool = FakeClient(), FakePool()

    async def startup():
        return zcron.serve({"redis": pool}, jobs, client, queue_name="q-trig", timezone=timezone.utc,
                           state_dir=str(tmp_path))

    stream = loop.run(startup())
    try:
        summary = client.handler("schedule.external.activate")(
            command("schedule.external.activate", **ACTIVATION))
        assert summary["schedule_count"] == 1
        row = client.last_rows()["nightly"]
        params = {"scheduler": OWNER, "owner": OWNER, "operation_id": str(uuid.uuid4()), "operation": "trigger",
                  "schedule_id": "nightly", "definition": {}, "expected": row, "stable_source": True,
                  **{k: ACTIVATION[k] for k in S.Authority.IDS}}
        receipt = client.handler("schedule.external.mutate")(command("schedule.external.mutate", **params))
        job_id = receipt["trigger_result"]["result"]["task_id"]
        (function, sent_id, queue, thread), = pool.calls
        assert (function, queue, thread) == ("nightly", "q-trig", loop.thread.ident)
        assert job_id and sent_id is None  # a new id: arq makes it, a cron run due meanwhile still runs
        assert client.last_rows()["nightly"]["total_runs"] == 1

        update = {**params, "operation_id": str(uuid.uuid4()), "operation": "delete"}
        with pytest.raises(S.Conflict, match="cannot be changed from the brain"):
            client.handler("schedule.external.mutate")(command("schedule.external.mutate", **update))
    finally:
        stream.stop()


def test_a_trigger_the_loop_does_not_confirm_in_time_fails_saying_it_may_be_queued(loop, tmp_path, monkeypatch):
    monkeypatch.setattr(zcron, "TRIGGER_TIMEOUT", 0.2)
    pool = FakePool(delay=2.0)

    async def startup():
        return zcron.serve({"redis": pool}, [cron(tick)], FakeClient(), queue_name="q-slow",
                           timezone=timezone.utc, state_dir=str(tmp_path))

    stream = loop.run(startup())
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="may still be queued"):
            stream.source.trigger({"source_key": "cron:tick", "name": "cron:tick"})
        assert time.monotonic() - t0 < 1.5
        # The loop itself was not blocked meanwhile.
        assert loop.run(asyncio.sleep(0, result="free"), timeout=1) == "free"
        assert stream.source.rows()[0]["total_runs"] == 0
    finally:
        stream.stop()


def test_serve_outside_the_workers_loop_or_without_its_pool_says_what_to_do():
    with pytest.raises(RuntimeError, match="on_startup"):
        zcron.serve({"redis": FakePool()}, [cron(tick)], FakeClient())
    with pytest.raises(ValueError, match="redis"):
        zcron.serve({}, [cron(tick)], FakeClient())


def test_a_job_with_an_impossible_field_is_left_out_and_counted(loop, tmp_path, caplog):
    bad = cron(tick, name="bad", weekday=9)

    async def startup():
        return zcron.serve({"redis": FakePool()}, [cron(report), bad], FakeClient(), queue_name="q-bad",
                           timezone=timezone.utc, state_dir=str(tmp_path))

    stream = loop.run(startup())
    try:
        assert [r["name"] for r in stream.source.rows()] == ["cron:report"]
        assert zcron.stats("q-bad")["rows_unlisted"] == 1 and "bad is not on the Schedules page" in caplog.text
    finally:
        stream.stop()


def test_a_worker_without_cron_jobs_serves_nothing(loop, tmp_path):
    client = FakeClient()

    async def startup():
        return zcron.serve({"redis": FakePool()}, {"cron_jobs": [], "queue_name": "q-none"}, client,
                           state_dir=str(tmp_path))

    assert loop.run(startup()) is None and client.served == []


# Day and weekday both set: arq runs a day when both match, the brain's
# croniter when either does. The text published must run exactly when arq
# does, or the job must be left out.
SAME_DAYS = [  # (cron arguments, the text published)
    ({"day": set(range(1, 8)), "weekday": 0}, "0 0 * * 1#1"),                 # the first Monday
    ({"day": set(range(1, 8)), "weekday": {0, 4}}, "0 0 * * 1#1,5#1"),
    ({"day": set(range(8, 15)), "weekday": "sun"}, "0 0 * * 0#2"),
    ({"day": set(range(22, 32)), "weekday": 4, "month": {1, 7}}, "0 0 * 1,7 5#4,5#5"),
    ({"day": set(range(29, 32)), "weekday": 5, "second": {0, 30}}, "0 0 * * 6#5 0,30"),
    ({"day": 1}, "0 0 1 * *"),
    ({"weekday": {0, 1, 2, 3, 4}}, "0 0 * * 1-5"),
]
NOT_CRON = [{"day": 13, "weekday": 4}, {"day": set(range(1, 11)), "weekday": 0}, {"day": 1, "weekday": "sun"}]


def arq_runs(job, after, count):
    """arq's own next runs (next_cron, as its cron loop computes them)."""
    from arq.cron import next_cron

    found, when = [], after
    for _ in range(count):
        when = next_cron(when, month=job.month, day=job.day, weekday=job.weekday, hour=job.hour,
                         minute=job.minute, second=job.second, microsecond=0)
        found.append(when)
    return found


def test_day_and_weekday_both_set_are_published_as_arq_runs_them_or_left_out(caplog):
    from cronmatch import next_runs

    source = zcron.CronSource(zcron.cs.Runs())
    jobs = [cron(tick, name=f"same{i}", hour=0, minute=0, **kw) for i, (kw, _) in enumerate(SAME_DAYS)]
    source.jobs = jobs + [cron(tick, name=f"either{i}", hour=0, minute=0, **kw) for i, kw in enumerate(NOT_CRON)]
    source.tz = timezone.utc
    rows = {r["name"]: r for r in source.rows()}
    assert set(rows) == {j.name for j in jobs} and source.rows_unlisted == len(NOT_CRON)
    assert "either0 is not on the Schedules page: it runs only on days matching both its day of month (13) " \
           "and its day of week (5)" in caplog.text
    for job, (kwargs, text) in zip(jobs, SAME_DAYS):
        assert rows[job.name]["expression"] == text, kwargs
        for start in (datetime(2026, 1, 1), datetime(2027, 2, 28, 12), datetime(2028, 2, 29)):
            assert list(next_runs(text, start, 24)) == arq_runs(job, start, 24), (kwargs, start)


def test_the_default_timezone_is_arqs_the_offset_when_the_worker_starts(loop, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        worker_tz = Worker(functions=[], cron_jobs=[cron(tick)], redis_pool=FakePool()).timezone
        hours = int(worker_tz.utcoffset(None).total_seconds()) // 3600
        assert hours in (1, 2)  # a fixed offset, CET or CEST, whichever holds now

        async def startup():
            return zcron.serve({"redis": FakePool()}, [cron(tick)], FakeClient(), queue_name="q-tz",
                               state_dir=str(tmp_path))

        stream = loop.run(startup())
        try:
            assert stream.source.rows()[0]["timezone"] == f"Etc/GMT-{hours}"  # not Europe/Paris: no DST move
            assert stream.source.tz.utcoffset(None) == worker_tz.utcoffset(None)
        finally:
            stream.stop()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_restarted_worker_carries_on_from_the_counters_it_published(loop, tmp_path):
    import os

    client = FakeClient()
    due = datetime(2026, 12, 7, 2, 30, tzinfo=timezone.utc)

    async def startup():
        return zcron.serve({"redis": FakePool()}, [cron(report, name="nightly", hour=2, minute=30)], client,
                           queue_name="q-carry", timezone=timezone.utc, state_dir=str(tmp_path))

    stream = loop.run(startup())
    stream.source.runs.count("nightly", due)
    stream.source.runs.count("nightly", due + timedelta(days=1))
    client.handler("schedule.external.activate")(command("schedule.external.activate", **ACTIVATION))
    stream.stop()
    assert client.last_rows()["nightly"]["total_runs"] == 2
    del zcron._streams[(os.getpid(), "q-carry")]  # as if the worker restarted

    restarted = loop.run(startup())
    try:
        assert restarted is not stream
        row = restarted.source.rows()[0]
        assert (row["total_runs"], row["last_run_at"]) == (2, due + timedelta(days=1))
        restarted.source.runs.count("nightly", due + timedelta(days=2))
        row = restarted.source.rows()[0]
        assert (row["total_runs"], row["last_run_at"]) == (3, due + timedelta(days=2))
    finally:
        restarted.stop()


def test_jobs_arq_cannot_match_are_left_out_counted_and_the_others_listed(caplog):
    source = zcron.CronSource(zcron.cs.Runs())
    source.tz = timezone.utc
    source.jobs = [cron(report), cron(tick, name="none-in-set", minute={0, None}),
                   cron(tick, name="named-set", weekday={"mon"}), cron(tick, name="text-in-set", hour={"5"})]
    done = []
    thread = threading.Thread(target=lambda: done.append(source.rows()), daemon=True)
    thread.start()
    thread.join(10)  # arq's next_cron would search for a {"mon"} day without end
    assert done, "rows() did not return"
    assert [r["name"] for r in done[0]] == ["cron:report"] and source.rows_unlisted == 3
    assert "none-in-set is not on the Schedules page: its minute holds None: arq compares" in caplog.text
    assert "named-set is not on the Schedules page: its weekday is {'mon'}: arq reads a name only on its own" \
        in caplog.text


def test_a_failing_snapshot_request_never_reaches_arqs_cron_loop():
    class Broken:
        source = SimpleNamespace(runs=zcron.cs.Runs())

        def changed(self):
            raise RuntimeError("boom")

    job = cron(tick, second=None, microsecond=0)
    zcron._watch(job, Broken())
    start = datetime(2026, 12, 7, 10, 0, 0, 500000, tzinfo=timezone.utc)
    job.calculate_next(start)  # arq's first call, at start
    due = job.next_run
    job.calculate_next(due)  # the run: counted, then changed() raises
    assert job.next_run == due + timedelta(seconds=1)
    assert Broken.source.runs.get("cron:tick") == (1, due)
