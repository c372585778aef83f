"""celery beat's schedules through the external schedule protocol
(z4j_agentd._schedules and z4j_agentd.celery.beat): the canonical form and
digests (fixed vectors, and z4j_core's own functions when installed), the
stream's activation, snapshots, mutations and resync, and the rows built
from a real beat scheduler and from django-celery-beat's models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from z4j_agentd import _schedules as S
from z4j_agentd.client import DaemonUnavailable, EventRefused

OWNER = "celery-beat"
ACTIVATION = {"scheduler": OWNER, "owner": OWNER, "stream_id": "6f1c0e0a-1111-4222-8333-444455556666",
              "epoch_uuid": "7a2d1f0b-aaaa-4bbb-8ccc-ddddeeeeffff", "epoch_number": 3,
              "adapter_instance_id": "inst-1",
              "source_scope": '{"kind":"scheduler-owner","owner":"celery-beat","version":1}',
              "stable_source": True, "registry_owner_id": str(uuid.uuid4()), "session_generation": "g1"}
ROWS = [
    dict(source_key="static:b", name="b", task_name="proj.add", kind="interval", expression="15",
         args=[1, 2.5, "é"], kwargs={"z": None, "a": [True]}, total_runs=4, source="celery-beat:static",
         engine="celery", last_run_at=datetime(2026, 12, 7, 3, 0, tzinfo=timezone.utc)),
    dict(source_key="dcb:1", name="a", task_name="proj.mul", kind="cron", expression="*/5 * * * *",
         timezone="Europe/Paris", queue="q1", is_enabled=False, external_id="dcb:1",
         source="celery-beat:database", source_hash="ab" * 32),
]
SNAPSHOT_ID = "00000000-0000-4000-8000-000000000001"


def authority() -> S.Authority:
    return S.Authority.from_activation(ACTIVATION, OWNER)


# ---------------------------------------------------------------- canonical form


def test_canonical_json_sorts_keys_keeps_unicode_and_refuses_nan():
    assert S.canonical_json({"b": 1, "a": ["é", 1.5, None, True]}) == \
        '{"a":["é",1.5,null,true],"b":1}'.encode()
    with pytest.raises(S.ProtocolError, match="finite"):
        S.canonical_json({"x": float("nan")})
    with pytest.raises(S.ProtocolError, match="not a string"):
        S.canonical_json({"x": {1: 2}})
    assert S.source_scope(OWNER) == ACTIVATION["source_scope"]


def test_fixed_vectors():
    """Digests computed once with z4j_core 1.13.0 (the brain's own functions)."""
    a = authority()
    assert S.digest(S.projection_body(a, 5, ROWS)) == \
        "0c2e6a6c5665df0160343f123beb249ad3c1fa8c3e706d13ccd08a458e4e9f0c"
    events, summary = S.snapshot_events(a, 5, ROWS, reason="x", snapshot_id=SNAPSHOT_ID)
    assert [e["data"]["frame_digest"] for e in events] == [
        "a3663f0db5319338e534ec667dbe85d2e2cf91ef1c92f4ec7f2cd60546f9c248",
        "192ef1e8cb2a35819d5f82a43d605f0a0ebefe7696ba1bb5a0a6bcfb0f41313d",
    ]
    assert summary == {"scheduler": OWNER, "stream_id": a.stream_id, "epoch_uuid": a.epoch_uuid,
                       "epoch_number": 3, "sequence": 5, "adapter_instance_id": "inst-1",
                       "schedule_count": 2, "frame_count": 2}
    rows_frame = events[0]["data"]["external_snapshot_frame"]
    assert [r["source_key"] for r in rows_frame["schedules"]] == ["dcb:1", "static:b"]  # sorted
    assert rows_frame["schedules"][1]["last_run_at"] == "2026-12-07T03:00:00.000000+00:00"
    assert events[1]["data"]["external_snapshot_frame"]["schedules"] == []
    assert {e["kind"] for e in events} == {"schedule.snapshot"} and {e["engine"] for e in events} == {OWNER}


MORE_ROWS = ROWS + [dict(name="c", task_name="t", kind="solar", expression="sunset",
                         last_run_at="2026-01-01T01:00:00+01:00", args=[{"k": [1, {"x": 2}]}], total_runs=0)]


def test_more_fixed_vectors():
    """Computed once with z4j_core 1.13.0 (external_projection_digest,
    external_snapshot_frame_digest, normalize_external_schedule): an offset
    timestamp, nested args, and a snapshot split into one row a frame."""
    a = authority()
    assert S.digest(S.projection_body(a, 9, MORE_ROWS)) == \
        "e09ef4dc0b24e10c3e4549292e46d346220d5e9fe38f653919624631de23776e"
    events, _ = S.snapshot_events(a, 9, MORE_ROWS, reason="r", row_payload_bytes=600, snapshot_id=SNAPSHOT_ID)
    assert [e["data"]["frame_digest"] for e in events] == [
        "01a8dfe90bc8d50b76c5535e8e9126c914c5ab367f1c4f6ada96f484f5361a4a",
        "00f346008db0991d3db66ebf08d4e26636d1705ccd6275ede554db587c9489fb",
        "7cfd1319bd2df21162fc3cc110243924a200aa9a58617b0e95a28c99a7ff1806",
        "ff56ba259020eb4c48f74c388256ecc2e405540c7fe3f0b510f429d93ad87776",
    ]
    assert [S.digest(S.normalize_row(r, OWNER)) for r in MORE_ROWS] == [
        "c8e43ecd1bdc3900b2957dc0cf9c4de0a84e85df5f2728b0519ccd652809653b",
        "165482f862b23c7db6a97b0f26dce0930a56f60668428c0ecb71a898e5fee308",
        "d387a10d33bd7ebb075d519d501f299cfa01f0b7875e433f85ea25b4ec33a6c6",
    ]


def test_the_same_as_z4j_core_when_it_is_installed():
    """Skipped where z4j_core is not installed (the client's own test venv);
    runs in the e2e venv, which has the brain."""
    core = pytest.importorskip("z4j_core.schedule_external")
    a = authority()
    ids = {k: v for k, v in a.ids().items()}
    rows = MORE_ROWS
    assert S.projection_body(a, 9, rows) == core.external_projection_body(
        sequence=9, kind="snapshot", schedules=rows, complete=True, stable_source=True, **ids)
    events, _ = S.snapshot_events(a, 9, rows, reason="r", row_payload_bytes=600)
    assert len(events) > 2
    for event in events:
        frame = event["data"]["external_snapshot_frame"]
        rebuilt = core.external_snapshot_frame_body(
            sequence=9, snapshot_id=frame["snapshot_id"], frame_kind=frame["frame_kind"],
            frame_index=frame["frame_index"], frame_count=frame["frame_count"], row_count=frame["row_count"],
            snapshot_digest=frame["snapshot_digest"], stable_source=True, schedules=frame["schedules"], **ids)
        assert rebuilt == frame
        assert core.external_snapshot_frame_digest(rebuilt) == event["data"]["frame_digest"]
    for row in rows:
        assert S.normalize_row(row, OWNER) == core.normalize_external_schedule(row, owner=OWNER)


def test_rows_are_split_into_frames_within_the_limit():
    rows = [dict(name=f"s{i:02}", task_name="t", args=["x" * 100]) for i in range(10)]
    events, summary = S.snapshot_events(authority(), 1, rows, reason="r", row_payload_bytes=700)
    frames = [e["data"]["external_snapshot_frame"] for e in events]
    assert summary["frame_count"] == len(frames) and len(frames) > 3
    assert [f["frame_kind"] for f in frames] == ["rows"] * (len(frames) - 1) + ["terminal"]
    assert [f["frame_index"] for f in frames] == list(range(len(frames)))
    assert {f["frame_count"] for f in frames} == {len(frames) - 1} and {f["row_count"] for f in frames} == {10}
    assert sum(len(f["schedules"]) for f in frames) == 10
    assert all(len(S.canonical_json({"schedules": f["schedules"]})) <= 700 for f in frames)
    with pytest.raises(S.ProtocolError, match="larger than a snapshot frame"):
        S.snapshot_events(authority(), 1, [dict(name="big", task_name="t", args=["x" * 1000])],
                          reason="r", row_payload_bytes=700)


def test_bad_rows_and_activations_are_refused_with_the_reason():
    with pytest.raises(S.ProtocolError, match="name and a task_name"):
        S.normalize_row({"name": "x"}, OWNER)
    with pytest.raises(S.ProtocolError, match="share the source key"):
        S.projection_body(authority(), 1, [dict(name="a", task_name="t"), dict(name="a", task_name="u")])
    assert S.normalize_row(dict(name="a", task_name="t", next_run_at=datetime(2026, 1, 1)), OWNER)[
        "next_run_at"] == "2026-01-01T00:00:00.000000+00:00"  # no offset: UTC
    for change, reason in (({"owner": "apscheduler"}, "is for scheduler"), ({"epoch_number": 0}, "positive"),
                           ({"stable_source": False}, "stable source"), ({"stream_id": "x"}, "not a UUID")):
        with pytest.raises(S.ProtocolError, match=reason):
            S.Authority.from_activation({**ACTIVATION, **change}, OWNER)


# ---------------------------------------------------------------- the stream


class FakeSource(S.Source):
    def __init__(self, writable=False):
        self.list = [dict(source_key="static:a", name="a", task_name="proj.add", kind="interval",
                          expression="60", args=[1, 2])]
        self.triggered = []
        self.writable = writable
        self.mutations = []

    def rows(self):
        return [dict(r) for r in self.list]

    def capabilities(self):
        caps = [S.STABLE_SNAPSHOT, "list", "trigger_now"]
        return caps + ["create", S.MUTATION] if self.writable else caps

    def trigger(self, row):
        self.triggered.append(row["source_key"])
        self.list[0]["total_runs"] = self.list[0].get("total_runs", 0) + 1
        return {"task_id": "t-1"}

    def mutate(self, operation, source_key, expected, definition):
        self.mutations.append((operation, source_key, definition))
        row = dict(source_key="dcb:9", name=definition["name"], task_name=definition["task_name"])
        self.list.append(row)
        return row


class Sender:
    def __init__(self):
        self.batches = []
        self.fail = None

    def __call__(self, events):
        if self.fail is not None:
            raise self.fail
        self.batches.append(events)
        return len(events)

    def sequences(self):
        return [b[0]["data"]["external_snapshot_frame"]["sequence"] for b in self.batches]


def command(action, **params):
    return {"id": str(uuid.uuid4()), "action": action, "target": {"type": "scheduler", "id": OWNER,
                                                                  "scheduler": OWNER}, "parameters": params}


def stream(source=None):
    sender = Sender()
    return S.ExternalScheduler(OWNER, source or FakeSource(), sender), sender


def test_activation_publishes_sequence_one_and_a_new_epoch_starts_over():
    s, sender = stream()
    assert s.publish("change") is None  # nothing before an activation
    summary = s.activate(command("schedule.external.activate", **ACTIVATION))
    assert summary["sequence"] == 1 and summary["frame_count"] == 2 and sender.sequences() == [1]
    assert s.activate(command("schedule.external.activate", **ACTIVATION)) == summary  # the same one again
    assert len(sender.batches) == 1
    with pytest.raises(S.ProtocolError, match="not newer"):
        s.activate(command("schedule.external.activate", **{**ACTIVATION, "epoch_number": 2,
                                                            "epoch_uuid": str(uuid.uuid4())}))
    assert s.publish("change") is None  # unchanged rows: nothing new
    s.source.list[0]["total_runs"] = 1
    assert s.publish("change")["sequence"] == 2
    newer = {**ACTIVATION, "epoch_number": 4, "epoch_uuid": str(uuid.uuid4())}
    assert s.activate(command("schedule.external.activate", **newer))["sequence"] == 1
    frame = sender.batches[-1][0]["data"]["external_snapshot_frame"]
    assert (frame["epoch_number"], frame["sequence"]) == (4, 1)


def test_a_snapshot_not_handed_over_is_sent_again_unchanged_before_the_next():
    s, sender = stream()
    s.activate(command("schedule.external.activate", **ACTIVATION))
    s.source.list[0]["total_runs"] = 1
    sender.fail = DaemonUnavailable("daemon away")
    with pytest.raises(DaemonUnavailable):
        s.publish("change")
    assert s.stats()["snapshot_pending"] and s.stats()["snapshot_failures"] == 1
    sender.fail = None
    s.source.list[0]["total_runs"] = 2
    s.publish("change")
    assert sender.sequences() == [1, 2, 3]
    retried = sender.batches[1][0]["data"]["external_snapshot_frame"]["schedules"][0]
    assert retried["total_runs"] == 1  # the unsent snapshot as it was built
    # A refusal by the daemon is not retried: the next snapshot takes the sequence.
    s.source.list[0]["total_runs"] = 3
    sender.fail = EventRefused("invalid_event", "no")
    with pytest.raises(EventRefused):
        s.publish("change")
    sender.fail = None
    assert not s.stats()["snapshot_pending"]
    assert s.publish("change")["sequence"] == 4


def mutate_params(s, sender, **extra):
    params = {"scheduler": OWNER, "owner": OWNER, "operation_id": str(uuid.uuid4()),
              "operation": "trigger", "schedule_id": "static:a", "definition": {},
              "expected": S.normalize_row(FakeSource().list[0], OWNER),
              "expected_accepted_sequence": 1, "stable_source": True,
              **{k: ACTIVATION[k] for k in S.Authority.IDS}}
    params.update(extra)
    return params


def test_trigger_now_sends_publishes_and_answers_the_receipt_once():
    s, sender = stream()
    s.activate(command("schedule.external.activate", **ACTIVATION))
    params = mutate_params(s, sender)
    receipt = s.mutate(command("schedule.external.mutate", **params))
    assert s.source.triggered == ["static:a"] and receipt["sequence"] == 2
    assert receipt["operation_id"] == params["operation_id"] and receipt["source_key"] == "static:a"
    assert receipt["observed_configuration"] == S.configuration(params["expected"])
    assert receipt["trigger_result"] == {"status": "success", "result": {"task_id": "t-1"}, "error": None}
    published = sender.batches[-1][0]["data"]["external_snapshot_frame"]["schedules"][0]
    assert published["total_runs"] == 1
    # The brain delivers it again: the same receipt, no second send.
    assert s.mutate(command("schedule.external.mutate", **params)) == receipt
    assert s.source.triggered == ["static:a"]
    with pytest.raises(S.ProtocolError, match="other parameters"):
        s.mutate(command("schedule.external.mutate", **{**params, "schedule_id": "static:b"}))


def test_trigger_refuses_a_stale_epoch_or_a_changed_schedule():
    s, sender = stream()
    s.activate(command("schedule.external.activate", **ACTIVATION))
    with pytest.raises(S.ProtocolError, match="not this process's current"):
        s.mutate(command("schedule.external.mutate", **mutate_params(s, sender, epoch_number=2)))
    changed = {**S.normalize_row(FakeSource().list[0], OWNER), "args": [9]}
    with pytest.raises(S.Conflict, match="changed"):
        s.mutate(command("schedule.external.mutate", **mutate_params(s, sender, expected=changed)))
    with pytest.raises(S.Conflict, match="not in celery-beat"):
        s.mutate(command("schedule.external.mutate", **mutate_params(s, sender, schedule_id="static:zz")))
    assert s.source.triggered == []


def test_writes_need_a_writable_source():
    s, sender = stream()
    s.activate(command("schedule.external.activate", **ACTIVATION))
    create = mutate_params(s, sender, operation="create", schedule_id=None, expected=None,
                           definition={"name": "n", "task_name": "t"})
    with pytest.raises(S.Conflict, match="read-only"):
        s.mutate(command("schedule.external.mutate", **create))
    s2, sender2 = stream(FakeSource(writable=True))
    s2.activate(command("schedule.external.activate", **ACTIVATION))
    receipt = s2.mutate(command("schedule.external.mutate", **create))
    assert receipt["source_key"] == "dcb:9" and receipt["sequence"] == 2
    assert receipt["observed_configuration"]["name"] == "n"
    with pytest.raises(S.ProtocolError, match="definition may set only"):
        s2.mutate(command("schedule.external.mutate", **{**create, "operation_id": str(uuid.uuid4()),
                                                          "definition": {"priority": "high"}}))


def test_resync_publishes_a_fresh_snapshot():
    s, sender = stream()
    with pytest.raises(S.ProtocolError, match="no active stream"):
        s.resync(command("schedule.resync"))
    s.activate(command("schedule.external.activate", **ACTIVATION))
    answer = s.resync(command("schedule.resync"))
    assert answer["schedulers_drained"] == 1 and answer["sequence"] == 2 and sender.sequences() == [1, 2]


def test_serve_declares_the_scheduler_its_capabilities_and_the_feature():
    served = []
    client = SimpleNamespace(serve=lambda handlers, **kw: served.append((handlers, kw)))
    s, _ = stream()
    s.serve(client)
    s.stop()
    handlers, kw = served[0]
    assert set(handlers) == {(OWNER, "schedule.external.activate"), (OWNER, "schedule.external.mutate"),
                             (OWNER, "schedule.resync")}
    assert kw == {"capabilities": {OWNER: sorted(FakeSource().capabilities())}, "schedulers": [OWNER],
                  "runtime_features": ["external_schedule_protocol_v1"]}


# ---------------------------------------------------------------- celery beat


class Dusk:
    """Shaped as celery.schedules.solar (which needs the ephem package)."""

    event, lat, lon = "sunset", 48.85, 2.35

    def now(self):
        return datetime.now(timezone.utc)

    def remaining_estimate(self, last_run_at):
        return timedelta(hours=1)

    def is_due(self, last_run_at):
        return False, 3600.0


def beat_scheduler(sent):
    from celery import Celery
    from celery.beat import Scheduler
    from celery.schedules import crontab

    app = Celery("t", broker="memory://", set_as_current=False)
    app.conf.timezone = "UTC"

    @app.task(name="proj.routed", expires=300, shared=False)
    def routed(x):
        return x

    app.conf.beat_schedule = {
        "routed": {"task": "proj.routed", "schedule": 60.0, "args": (5,)},
        "every-15": {"task": "proj.add", "schedule": 15.0, "args": (1, 2), "options": {"queue": "q1"}},
        "half-second": {"task": "proj.add", "schedule": timedelta(milliseconds=500)},
        "nightly": {"task": "proj.report", "schedule": crontab(minute=30, hour=2), "kwargs": {"full": True}},
        "dusk": {"task": "proj.lights", "schedule": Dusk()},
    }

    def send_task(name, args=None, kwargs=None, **options):
        sent.append((name, args, kwargs, options))
        return SimpleNamespace(id=f"id-{len(sent)}")

    app.send_task = send_task
    return app, Scheduler(app)


def test_beat_rows_from_a_real_scheduler_and_its_sends_are_runs():
    from z4j_agentd.celery import beat

    sent = []
    app, scheduler = beat_scheduler(sent)
    source = beat.source_for(app, scheduler)
    assert isinstance(source, beat.EntriesSource)
    assert source.capabilities() == [S.STABLE_SNAPSHOT, "list", "trigger_now"]
    rows = {r["name"]: S.normalize_row(r, OWNER) for r in source.rows()}
    assert set(rows) == {"every-15", "half-second", "nightly", "dusk", "routed"}
    every = rows["every-15"]
    assert (every["kind"], every["expression"], every["queue"], every["args"], every["source"]) == \
        ("interval", "15", "q1", [1, 2], "celery-beat:static")
    assert every["source_key"] == "static:" + __import__("hashlib").sha256(b"every-15").hexdigest()
    assert every["total_runs"] == 0 and every["last_run_at"] is None and every["next_run_at"] is not None
    assert rows["half-second"]["expression"] == "0.5"
    assert (rows["nightly"]["kind"], rows["nightly"]["expression"], rows["nightly"]["kwargs"]) == \
        ("cron", "30 2 * * *", {"full": True})
    assert (rows["dusk"]["kind"], rows["dusk"]["expression"]) == ("solar", "sunset")

    # A send by beat: the stream is asked for a snapshot, and the row counts the run.
    woken = []
    beat._watch_sends(scheduler, SimpleNamespace(changed=lambda: woken.append(1)), source)
    scheduler.apply_async(scheduler.schedule["every-15"])
    assert woken == [1] and sent[-1][0] == "proj.add"
    row = next(S.normalize_row(r, OWNER) for r in source.rows() if r["name"] == "every-15")
    assert row["total_runs"] == 1 and row["last_run_at"] is not None

    # Trigger now: the entry's task, arguments and options; counted as a run.
    result = source.trigger(every)
    name, args, kwargs, options = sent[-1]
    assert (name, args, kwargs, options["queue"], options["headers"]) == \
        ("proj.add", [1, 2], {}, "q1", {"celery_beat_task": True})
    assert result == {"task_id": f"id-{len(sent)}", "task_name": "proj.add"}
    row = next(S.normalize_row(r, OWNER) for r in source.rows() if r["name"] == "every-15")
    assert row["total_runs"] == 2

    # A registered task goes through its apply_async, as beat sends it: its own options apply.
    source.trigger(rows["routed"])
    name, args, kwargs, options = sent[-1]
    assert (name, list(args), options.get("expires"), options["headers"]) == \
        ("proj.routed", [5], 300, {"celery_beat_task": True})


def test_beat_init_serves_the_scheduler_once(monkeypatch, tmp_path):
    from z4j_agentd.celery import _Hooks, beat

    sent = []
    app, scheduler = beat_scheduler(sent)
    served = []
    client = SimpleNamespace(serve=lambda handlers, **kw: served.append(kw), send_durable=lambda e, timeout: 0,
                             _engines=["celery"])
    hooks = _Hooks(app, client, serve_commands=True)
    monkeypatch.setattr(beat, "_active", None)
    receiver = beat.receiver(hooks)
    service = SimpleNamespace(scheduler=scheduler, schedule_filename=str(tmp_path / "celerybeat-schedule"))
    receiver(sender=service)
    receiver(sender=service)
    try:
        assert len(served) == 1 and served[0]["schedulers"] == [OWNER]
        assert getattr(scheduler.apply_async, "_z4j_watched", False)
        assert beat.active().state_path == str(tmp_path / "celerybeat-schedule") + ".z4j-agentd.json"
    finally:
        beat.active().stop()
    monkeypatch.setattr(beat, "_active", None)
    quiet = _Hooks(app, client, serve_commands=False)
    beat.receiver(quiet)(sender=service)
    assert len(served) == 1 and beat.active() is None


DCB_SCRIPT = textwrap.dedent('''
    import json, sys
    from types import SimpleNamespace
    import django
    from django.conf import settings
    settings.configure(INSTALLED_APPS=["django_celery_beat"], USE_TZ=True, TIME_ZONE="UTC",
                       DEFAULT_AUTO_FIELD="django.db.models.AutoField",
                       DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[1]}})
    django.setup()
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
    from z4j_agentd import _schedules as S
    from z4j_agentd.celery import beat
    every = IntervalSchedule.objects.create(every=90, period="seconds")
    cron = CrontabSchedule.objects.create(minute="0", hour="4", timezone="Europe/Paris")
    PeriodicTask.objects.create(name="ninety", task="proj.add", interval=every, args="[1, 2]", queue="q1")
    PeriodicTask.objects.create(name="four", task="proj.report", crontab=cron, kwargs='{"a": 1}', enabled=False)
    class DatabaseScheduler:  # what is_database_scheduler looks for
        _schedule = {}
    DatabaseScheduler.__module__ = "django_celery_beat.schedulers"
    sent = []
    app = SimpleNamespace(send_task=lambda name, args, kwargs, **o: sent.append([name, args, kwargs, o])
                          or SimpleNamespace(id="tid-1"), tasks={})
    source = beat.source_for(app, DatabaseScheduler())
    out = {"type": type(source).__name__, "caps": source.capabilities()}
    rows = {r["name"]: S.normalize_row(r, "celery-beat") for r in source.rows()}
    out["rows"] = rows
    out["trigger"] = source.trigger(rows["ninety"])
    out["sent"] = sent
    out["after_trigger"] = [r["total_runs"] for r in source.rows() if r["name"] == "ninety"]
    created = S.normalize_row(source.mutate("create", None, None, {"name": "new", "task_name": "proj.add",
        "kind": "cron", "expression": "*/5 * * * *", "timezone": "UTC", "args": [3], "kwargs": {},
        "is_enabled": True, "queue": None}), "celery-beat")
    out["created"] = created
    updated = S.normalize_row(source.mutate("update", created["source_key"], created,
        {"kind": "interval", "expression": "0.25", "is_enabled": False}), "celery-beat")
    model = PeriodicTask.objects.get(name="new")
    out["updated"] = updated
    out["model"] = [model.enabled, model.crontab_id, model.interval.every, model.interval.period]
    try:
        source.mutate("update", created["source_key"], created, {"args": [4]})
    except S.Conflict as exc:
        out["stale"] = str(exc)
    try:
        source.mutate("create", None, None, {"name": "sun", "task_name": "t", "kind": "solar",
                                             "expression": "sunset"})
    except ValueError as exc:
        out["solar"] = str(exc)
    out["deleted"] = source.mutate("delete", updated["source_key"], updated, {})
    out["left"] = sorted(PeriodicTask.objects.values_list("name", flat=True))

    # What beat could not run, or the brain could not list, is refused and rolled back.
    def refused(operation, key, expected, definition):
        try:
            source.mutate(operation, key, expected, definition)
        except ValueError as exc:
            return str(exc)
        PeriodicTask.objects.filter(name="bad").delete()
        return "applied"
    base = {"name": "bad", "task_name": "proj.add", "kind": "interval", "expression": "60"}
    out["refused"] = {
        "huge_interval": refused("create", None, None, {**base, "expression": "100000000000000"}),
        "bad_cron": refused("create", None, None, {**base, "kind": "cron", "expression": "99 foo * * *"}),
        "huge_args": refused("create", None, None, {**base, "args": ["x" * 800000]}),
        "empty_name": refused("create", None, None, {**base, "name": " "}),
        "enabled_text": refused("create", None, None, {**base, "is_enabled": "false"}),
        "interval_tz": refused("create", None, None, {**base, "timezone": "Europe/Paris"}),
        "unknown_tz": refused("create", None, None, {**base, "kind": "cron", "expression": "0 4 * * *",
                                                      "timezone": "Mars/Olympus"}),
    }
    four = rows["four"]
    out["refused"]["update_bad_cron"] = refused("update", four["source_key"], four, {"expression": "0 25 * * *"})
    out["left_after_refusals"] = sorted(PeriodicTask.objects.values_list("name", flat=True))
    out["four_after"] = S.normalize_row(next(r for r in source.rows() if r["name"] == "four"), "celery-beat")
    out["intervals"] = sorted(IntervalSchedule.objects.values_list("every", flat=True))

    # Enable or disable writes is_enabled only: args that are not a list stay as they are.
    odd = PeriodicTask.objects.create(name="odd", task="proj.add", interval=every, args='{"a": 1}', kwargs="[1]")
    odd_row = S.normalize_row(next(r for r in source.rows() if r["name"] == "odd"), "celery-beat")
    source.mutate("update", odd_row["source_key"], odd_row, {"is_enabled": False})
    odd.refresh_from_db()
    out["odd"] = [odd.args, odd.kwargs, odd.enabled]

    # A look at unchanged rows costs one query; a save is seen at once, a bulk update within FULL_READ_SECONDS.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    source.rows()
    with CaptureQueriesContext(connection) as queries:
        source.rows()
    out["queries_unchanged"] = [q["sql"] for q in queries]
    odd.queue = "q9"
    odd.save()
    out["seen_after_save"] = [r["queue"] for r in source.rows() if r["name"] == "odd"]
    PeriodicTask.objects.filter(name="odd").update(queue="q10")
    out["bulk_at_once"] = [r["queue"] for r in source.rows() if r["name"] == "odd"]
    beat.FULL_READ_SECONDS = 0.0
    out["bulk_later"] = [r["queue"] for r in source.rows() if r["name"] == "odd"]

    # Args too large for a frame: the page shows a note, and the dashboard sends it back with every update.
    big_args = json.dumps(["x" * 800000])
    PeriodicTask.objects.create(name="big", task="proj.add", interval=every, args=big_args, kwargs='{"k": 1}')
    shown = S.fit_row(S.normalize_row(next(r for r in source.rows() if r["name"] == "big"), "celery-beat"))
    page = {k: shown[k] for k in ("name", "task_name", "kind", "expression", "timezone", "queue", "args",
                                  "kwargs")}
    try:
        source.mutate("update", shown["source_key"], shown, {**page, "args": ["other"]})
    except ValueError as exc:
        out["big_changed"] = str(exc)
    source.mutate("update", shown["source_key"], shown, {**page, "is_enabled": False})
    big = PeriodicTask.objects.get(name="big")
    out["big"] = [big.args == big_args, big.kwargs, big.enabled, shown["args"][0][:9]]
    print(json.dumps(out["refused"]), file=sys.stderr)
    print(json.dumps(out))
''')


def test_django_celery_beat_rows_and_writes(tmp_path):
    pytest.importorskip("django_celery_beat")
    script = tmp_path / "dcb.py"
    script.write_text(DCB_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "db.sqlite3")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["type"] == "DatabaseSource"
    assert set(out["caps"]) == {S.STABLE_SNAPSHOT, "list", "trigger_now", "create", "update", "delete",
                                "enable", "disable", S.MUTATION}
    ninety, four = out["rows"]["ninety"], out["rows"]["four"]
    assert ninety["source_key"].startswith("dcb:") and ninety["external_id"] == ninety["source_key"]
    assert (ninety["kind"], ninety["expression"], ninety["args"], ninety["queue"], ninety["is_enabled"],
            ninety["source"]) == ("interval", "90", [1, 2], "q1", True, "celery-beat:database")
    assert (four["kind"], four["expression"], four["timezone"], four["kwargs"], four["is_enabled"]) == \
        ("cron", "0 4 * * *", "Europe/Paris", {"a": 1}, False)
    assert out["trigger"] == {"task_id": "tid-1", "task_name": "proj.add"}
    assert out["sent"] == [["proj.add", [1, 2], {}, {"queue": "q1", "headers": {"periodic_task_name": "ninety"}}]]
    assert out["after_trigger"] == [1]
    assert (out["created"]["kind"], out["created"]["expression"], out["created"]["args"]) == \
        ("cron", "*/5 * * * *", [3])
    assert (out["updated"]["kind"], out["updated"]["expression"], out["updated"]["is_enabled"]) == \
        ("interval", "0.25", False)
    assert out["model"] == [False, None, 250000, "microseconds"]
    assert "changed in the database" in out["stale"]
    assert "latitude" in out["solar"]
    assert out["deleted"] is None and out["left"] == ["four", "ninety"]
    # A row beat has no entry for yet (as django-celery-beat 2.7+ leaves most cron rows) has a next run.
    assert ninety["next_run_at"] is not None and out["created"]["next_run_at"] is not None
    refused = out["refused"]
    assert "at most 2147483647 seconds" in refused["huge_interval"]
    assert "celery beat cannot run schedule 'bad'" in refused["bad_cron"]
    assert "more than a snapshot frame holds" in refused["huge_args"]
    assert "name must be a non-empty string" in refused["empty_name"]
    assert "is_enabled must be true or false" in refused["enabled_text"]
    assert "only a cron schedule has a timezone; interval schedules run in UTC" in refused["interval_tz"]
    assert "unknown timezone 'Mars/Olympus'" in refused["unknown_tz"]
    assert "celery beat cannot run schedule 'four'" in refused["update_bad_cron"]
    assert out["left_after_refusals"] == ["four", "ninety"]
    assert out["four_after"]["expression"] == "0 4 * * *"
    assert 100000000000000 not in out["intervals"]
    assert out["odd"] == ['{"a": 1}', "[1]", False]
    assert len(out["queries_unchanged"]) == 1 and "periodictasks" in out["queries_unchanged"][0]
    assert (out["seen_after_save"], out["bulk_at_once"], out["bulk_later"]) == (["q9"], ["q9"], ["q10"])
    # The real args of a row shown without them are kept by an update that sends the page's note back.
    assert "too large to show" in out["big_changed"]
    assert out["big"] == [True, '{"k": 1}', False, "<left out"]


def test_the_background_thread_publishes_changes_when_told_and_when_it_looks():
    import time

    sender = Sender()
    source = FakeSource()
    s = S.ExternalScheduler(OWNER, source, sender, poll_interval=0.2, min_interval=0.0)
    s.start()
    try:
        s.activate(command("schedule.external.activate", **ACTIVATION))
        source.list[0]["total_runs"] = 1
        s.changed()
        deadline = time.monotonic() + 5
        while sender.sequences() != [1, 2] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sender.sequences() == [1, 2]
        source.list[0]["args"] = [7]  # changed behind its back: found by the next look
        while len(sender.batches) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sender.sequences() == [1, 2, 3]
        time.sleep(0.5)
        assert len(sender.batches) == 3  # nothing changed: nothing sent
        # The daemon away: the thread retries the same snapshot until it is taken.
        sender.fail = DaemonUnavailable("away")
        source.list[0]["total_runs"] = 2
        s.changed()
        while s.stats()["snapshot_failures"] == 0 and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        sender.fail = None
        while len(sender.batches) < 4 and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert sender.sequences() == [1, 2, 3, 4] and s.stats()["last_error"] is None
    finally:
        s.stop()


def snapshot_rows(batch):
    return [r["source_key"] for e in batch for r in e["data"]["external_snapshot_frame"]["schedules"]]


def test_a_schedule_removed_between_epochs_is_carried_into_the_new_epoch_then_removed(tmp_path):
    """The brain refuses a new epoch's snapshot that drops a row of an earlier epoch."""
    state = str(tmp_path / "beat.z4j-agentd.json")
    source = FakeSource()
    source.list.append(dict(source_key="static:b", name="b", task_name="proj.add"))
    first = S.ExternalScheduler(OWNER, source, Sender(), state_path=state)
    first.activate(command("schedule.external.activate", **ACTIVATION))
    # beat restarts without b; a new process, a new epoch
    source.list.pop()
    sender = Sender()
    second = S.ExternalScheduler(OWNER, source, sender, state_path=state)
    newer = {**ACTIVATION, "epoch_number": 4, "epoch_uuid": str(uuid.uuid4())}
    summary = second.activate(command("schedule.external.activate", **newer))
    assert [snapshot_rows(b) for b in sender.batches] == [["static:a", "static:b"], ["static:a"]]
    assert sender.sequences() == [1, 2] and summary["sequence"] == 2
    # Later snapshots of the epoch drop rows at once.
    source.list[0]["args"] = [5]
    second.publish("change")
    assert sender.sequences() == [1, 2, 3]
    with open(state, encoding="utf-8") as f:
        assert [r["args"] for r in json.load(f)["rows"]] == [[5]]


def test_a_row_taking_over_a_name_comes_one_snapshot_after_the_old_row_leaves():
    source = FakeSource()  # static:a named "a"
    s, sender = stream(source)
    s.activate(command("schedule.external.activate", **ACTIVATION))
    source.list = [dict(source_key="dcb:7", name="a", task_name="proj.add"),
                   dict(source_key="static:c", name="c", task_name="proj.add")]
    s.publish("change")
    assert [snapshot_rows(b) for b in sender.batches[1:]] == [["static:c"], ["dcb:7", "static:c"]]


def test_an_unreadable_state_file_is_ignored(tmp_path, caplog):
    state = tmp_path / "bad.json"
    state.write_text("{not json")
    s = S.ExternalScheduler(OWNER, FakeSource(), Sender(), state_path=str(state))
    assert s._published == [] and "ignoring" in caplog.text
    s.activate(command("schedule.external.activate", **ACTIVATION))
    assert json.loads(state.read_text())["rows"][0]["source_key"] == "static:a"


def activate_epoch(s, number):
    params = {**ACTIVATION, "epoch_number": number, "epoch_uuid": str(uuid.uuid4())}
    return s.activate(command("schedule.external.activate", **params))


def test_a_removal_the_brain_never_applied_is_carried_into_every_new_epoch(tmp_path):
    """b is removed while the uplink is down: the snapshot removing it is in
    the daemon's spool and reaches the brain under an epoch it has left, so
    the brain still holds b. The next epoch's first snapshot must carry b,
    with or without a process restart in between."""
    state = str(tmp_path / "beat.z4j-agentd.json")
    source = FakeSource()
    source.list.append(dict(source_key="static:b", name="b", task_name="proj.add"))
    sender = Sender()
    s = S.ExternalScheduler(OWNER, source, sender, state_path=state)
    s.activate(command("schedule.external.activate", **ACTIVATION))
    source.list.pop()
    s.publish("change")  # handed to the spool, never applied by the brain
    activate_epoch(s, 4)
    assert [snapshot_rows(b) for b in sender.batches] == [
        ["static:a", "static:b"], ["static:a"], ["static:a", "static:b"], ["static:a"]]
    assert s.stats()["rows_carried"] == 1
    # Still carried in the epoch after (the brain may have thrown that one away too) ...
    activate_epoch(s, 5)
    assert [snapshot_rows(b) for b in sender.batches[4:]] == [["static:a", "static:b"], ["static:a"]]
    # ... and by a new process reading the file.
    sender2 = Sender()
    again = S.ExternalScheduler(OWNER, source, sender2, state_path=state)
    activate_epoch(again, 6)
    assert [snapshot_rows(b) for b in sender2.batches] == [["static:a", "static:b"], ["static:a"]]
    assert os.stat(state).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["beat.z4j-agentd.json"]  # no temporary file left


def test_a_carried_row_whose_name_a_current_row_holds_stays_out():
    source = FakeSource()
    source.list.append(dict(source_key="static:b", name="b", task_name="proj.add"))
    s, sender = stream(source)
    s.activate(command("schedule.external.activate", **ACTIVATION))
    source.list.pop()
    s.publish("change")
    source.list.append(dict(source_key="dcb:3", name="b", task_name="proj.add"))  # the name taken over
    s.publish("change")
    activate_epoch(s, 4)
    # static:b and dcb:3 in one snapshot would share a name; the brain took dcb:3, so it took the removal.
    assert [snapshot_rows(b) for b in sender.batches[3:]] == [["dcb:3", "static:a"]]


def test_carried_rows_are_bounded_by_count_and_age(monkeypatch, tmp_path):
    state = str(tmp_path / "state.json")
    source = FakeSource()
    source.list += [dict(source_key=f"static:r{i}", name=f"r{i}", task_name="t") for i in range(5)]
    s = S.ExternalScheduler(OWNER, source, Sender(), state_path=state)
    s.activate(command("schedule.external.activate", **ACTIVATION))
    monkeypatch.setattr(S, "MAX_CARRIED_ROWS", 3)
    clock = [1_000_000.0]
    monkeypatch.setattr(S.time, "time", lambda: clock[0])
    for i in range(5):
        source.list.pop()
        clock[0] += 10
        s.publish("change")
    assert sorted(s._removed) == ["static:r0", "static:r1", "static:r2"]  # the latest three removed
    clock[0] += S.CARRY_SECONDS - 15  # r4 and r3 removed more than CARRY_SECONDS ago: already out
    source.list.append(dict(source_key="static:x", name="x", task_name="t"))
    s.publish("change")
    assert sorted(s._removed) == ["static:r0", "static:r1"]
    assert sorted(i["row"]["source_key"] for i in json.load(open(state))["removed"]) == ["static:r0", "static:r1"]


def test_a_state_file_of_another_stream_is_not_carried(tmp_path):
    state = str(tmp_path / "state.json")
    source = FakeSource()
    source.list.append(dict(source_key="static:b", name="b", task_name="proj.add"))
    S.ExternalScheduler(OWNER, source, Sender(), state_path=state).activate(
        command("schedule.external.activate", **ACTIVATION))
    assert json.load(open(state))["stream_id"] == ACTIVATION["stream_id"]
    source.list.pop()
    sender = Sender()
    other = S.ExternalScheduler(OWNER, source, sender, state_path=state)
    other.activate(command("schedule.external.activate", **{**ACTIVATION, "stream_id": str(uuid.uuid4())}))
    assert [snapshot_rows(b) for b in sender.batches] == [["static:a"]]


def test_a_bad_row_is_left_out_and_counted_and_a_huge_one_shortened(caplog):
    source = FakeSource()
    source.list += [dict(source_key="static:empty", name="", task_name="t"),
                    dict(source_key="static:big", name="big", task_name="t", args=["x" * 3000])]
    s = S.ExternalScheduler(OWNER, source, Sender(), row_payload_bytes=2000)
    summary = s.activate(command("schedule.external.activate", **ACTIVATION))
    assert summary["schedule_count"] == 2
    assert s.stats()["rows_skipped"] == 1 and s.stats()["rows_shortened"] == 1
    frame = s._send.batches[0][0]["data"]["external_snapshot_frame"]
    big = next(r for r in frame["schedules"] if r["source_key"] == "static:big")
    assert big["kwargs"] == {} and "left out: the args and kwargs are" in big["args"][0]
    assert "static:empty" in caplog.text and "name and a task_name" in caplog.text
    caplog.clear()
    source.list[0]["total_runs"] = 1
    assert s.publish("change")["sequence"] == 2
    assert "static:empty" not in caplog.text  # logged once, not at every snapshot
    # Trigger now on the shortened row compares its page form, and sends the real args.
    receipt = s.mutate(command("schedule.external.mutate", **mutate_params(
        s, None, schedule_id="static:big", expected=big)))
    assert receipt["source_key"] == "static:big" and source.triggered == ["static:big"]


def test_a_row_too_large_for_a_frame_is_refused_wherever_it_comes_in_the_chunk():
    small = dict(name="a", task_name="t")
    big = dict(name="b", task_name="t", args=["x" * 1000])
    with pytest.raises(S.ProtocolError, match="larger than a snapshot frame"):
        S.snapshot_events(authority(), 1, [small, big], reason="r", row_payload_bytes=700)
    # Rows of every size up to the limit, in any order: every frame within it.
    rows = [dict(name=f"s{i:02}", task_name="t", args=["x" * ((i * 37) % 280)]) for i in range(40)]
    events, _ = S.snapshot_events(authority(), 1, rows, reason="r", row_payload_bytes=700)
    frames = [e["data"]["external_snapshot_frame"]["schedules"] for e in events]
    assert sum(len(f) for f in frames) == 40
    assert all(len(S.canonical_json({"schedules": f})) <= 700 for f in frames)


def test_beat_is_never_held_up_by_a_snapshot_that_cannot_be_handed_over():
    """The daemon takes nothing (its socket hangs): beat's sends still return
    at once, since snapshots go from the stream's own thread and the command
    thread, never from beat's."""
    import threading
    import time

    from z4j_agentd.celery import beat

    sent = []
    app, scheduler = beat_scheduler(sent)
    source = beat.source_for(app, scheduler)
    hang = threading.Event()
    calls = []

    def send(events):
        calls.append(len(events))
        hang.wait(30)
        raise DaemonUnavailable("no answer")

    s = S.ExternalScheduler(OWNER, source, send, poll_interval=0.05, min_interval=0.0)
    beat._watch_sends(scheduler, s, source)
    s.start()
    activation = threading.Thread(target=lambda: pytest.raises(
        RuntimeError, s.activate, command("schedule.external.activate", **ACTIVATION)), daemon=True)
    activation.start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls, "the activation snapshot never reached the daemon's socket"
        started = time.monotonic()
        for _ in range(20):
            scheduler.apply_async(scheduler.schedule["every-15"])
        elapsed = time.monotonic() - started
        assert len(sent) == 20
        assert elapsed < 2.0, f"20 sends by beat took {elapsed:.2f} s while the daemon hung"
    finally:
        s.stop()
        hang.set()
        activation.join(10)
