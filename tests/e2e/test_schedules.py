"""Schedulers through z4j-agentd against the real z4j 1.13.0 brain.

A local process declares the scheduler `celery-beat` in its `hello` (with
the stable snapshot capability and `external_schedule_protocol_v1`); the
daemon says hello again with it, the brain activates the scheduler's
stream, and the daemon hands the activation to that process. The process
answers as z4j-celerybeat does: a stable snapshot (rows frame + terminal
frame, built and digested with `z4j_core.schedule_external`) sent as
`schedule.snapshot` events through the daemon. The row appears on the
Schedules page; "trigger now" reaches the process as
`schedule.external.mutate`, which publishes the next snapshot and a
receipt; the command completes and the native operation is APPLIED.

A legacy `schedule.snapshot` (no external protocol data) is still refused
by the daemon with the legacy_kind message.
"""

from __future__ import annotations

import urllib.request
import uuid
from datetime import datetime, timezone

import brain_bootstrap as bb
from control import LocalClient, agent_row, wait_command_done
from harness import wait_for
from z4j_core.schedule_external import (
    external_projection_body,
    external_projection_digest,
    external_schedule_configuration,
    external_snapshot_frame_body,
    external_snapshot_frame_digest,
    normalize_external_schedule,
)

OWNER = "celery-beat"
CAPABILITIES = ["external_schedule_stable_snapshot_v1", "list", "trigger_now"]
FEATURE = "external_schedule_protocol_v1"
# One static schedule. Kept the same across runs: a later snapshot without
# a row the brain saw triggered is refused by the brain.
ROW = {
    "name": "e2e-tick-every-15s", "task_name": "proj.add", "kind": "interval", "expression": "15.0",
    "args": [100, 1], "kwargs": {}, "engine": "celery", "scheduler": OWNER,
    "source": "celery-beat:static", "source_key": "static:e2e-tick", "external_id": "static:e2e-tick",
    "queue": None, "timezone": "UTC",
}
LEGACY_MESSAGE = (
    'kind "schedule.snapshot" is a legacy schedule event that z4j brains 1.13+ refuse '
    "(they stop acknowledging the whole batch); do not send it"
)


# ---------------------------------------------------------------- brain REST


def admin_key(brain) -> str:
    """An `admin:*` API key: the only one that may trigger a schedule (`schedules:write`)."""
    return bb.create_api_key(brain.rest(), scopes=["admin:*"])


def schedules_api(brain, key: str, method: str, path: str):
    return bb.Rest(brain.url).call(method, path, bearer=key)


def trigger_schedule(brain, key: str, slug: str, schedule_id: str):
    """POST .../schedules/{id}/trigger -> (HTTP status, Location header)."""
    req = urllib.request.Request(
        f"{brain.url}/api/v1/projects/{slug}/schedules/{schedule_id}/trigger", method="POST", data=b"")
    req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.headers.get("Location")


# ---------------------------------------------------------------- the scheduler process


class SchedulerProcess:
    """A celery-beat-like local process on the daemon's socket.

    Answers `schedule.external.activate` with a stable snapshot at sequence 1
    of the epoch it names, and a `trigger` mutation with the next snapshot
    and the receipt the brain confirms against.
    """

    def __init__(self, socket_path) -> None:
        self.authority = None
        self.triggered: list = []
        self.events_sent = 0
        self.client = LocalClient(socket_path, answer=self.answer)

    def hello(self) -> dict:
        return self.client.hello(process="e2e-celery-beat", schedulers=[OWNER],
                                 capabilities={OWNER: CAPABILITIES}, runtime_features=[FEATURE])

    def answer(self, cmd: dict) -> tuple:
        action, p = cmd["action"], cmd["parameters"]
        if action == "schedule.external.activate":
            self.authority = p
            frames = self.publish(1, "activation")
            return "success", self.summary(1, frames), None
        if action == "schedule.external.mutate" and p.get("operation") == "trigger":
            observed = normalize_external_schedule(ROW, owner=OWNER)
            if self.authority is None or p["epoch_uuid"] != self.authority["epoch_uuid"]:
                return "failed", None, "no current activation for this epoch"
            if p["schedule_id"] != observed["source_key"]:
                return "failed", None, f"unknown schedule {p['schedule_id']}"
            self.triggered.append(p["schedule_id"])
            sequence = p["expected_accepted_sequence"] + 1
            frames = self.publish(sequence, "native-mutation:" + p["operation_id"])
            receipt = {
                **self.summary(sequence, frames),
                "operation_id": p["operation_id"],
                "source_key": observed["source_key"],
                "observed_configuration": external_schedule_configuration(observed),
                "trigger_result": {"status": "success",
                                   "result": {"task_name": ROW["task_name"]}, "error": None},
            }
            return "success", receipt, None
        return "failed", None, f"this test process does not run {action}"

    def summary(self, sequence: int, frames: int) -> dict:
        a = self.authority
        return {"scheduler": OWNER, "stream_id": a["stream_id"], "epoch_uuid": a["epoch_uuid"],
                "epoch_number": a["epoch_number"], "sequence": sequence,
                "adapter_instance_id": a["adapter_instance_id"], "schedule_count": 1,
                "frame_count": frames}

    def publish(self, sequence: int, reason: str) -> int:
        """Sends one stable snapshot (rows + terminal frame) as schedule.snapshot events; returns its frame count."""
        a = self.authority
        ids = dict(stream_id=a["stream_id"], epoch_uuid=a["epoch_uuid"], epoch_number=a["epoch_number"],
                   sequence=sequence, owner=OWNER, source_scope=a["source_scope"],
                   adapter_instance_id=a["adapter_instance_id"])
        projection = external_projection_body(kind="snapshot", schedules=[ROW], complete=True,
                                              stable_source=True, **ids)
        digest = external_projection_digest(projection)
        snapshot_id = str(uuid.uuid4())
        events = []
        for kind, index, rows in (("rows", 0, projection["schedules"]), ("terminal", 1, [])):
            body = external_snapshot_frame_body(snapshot_id=snapshot_id, frame_kind=kind, frame_index=index,
                                                frame_count=1, row_count=len(projection["schedules"]),
                                                snapshot_digest=digest, stable_source=True,
                                                schedules=rows, **ids)
            events.append({"id": str(uuid.uuid4()), "kind": "schedule.snapshot", "engine": OWNER,
                           "task_id": "", "occurred_at": datetime.now(timezone.utc).isoformat(),
                           "data": {"external_snapshot_frame": body,
                                    "frame_digest": external_snapshot_frame_digest(body),
                                    "reason": reason}})
        self.events_sent += len(events)
        # From the reader thread: the daemon's ack lands in `replies`.
        self.client.send({"type": "events", "events": events, "ack_id": f"snapshot-{sequence}-{snapshot_id}"})
        return len(events)

    def close(self) -> None:
        self.client.close()


def wait_reply(client: LocalClient, ack_id: str, timeout: float = 10.0) -> dict:
    """The daemon's reply to the message with `ack_id` (other replies are dropped)."""

    def check():
        while not client.replies.empty():
            r = client.replies.get_nowait()
            if r.get("ack_id") == ack_id:
                return True, r
        return False, None

    return wait_for(check, timeout, f"the daemon's reply to {ack_id}", interval=0.05)


# --------------------------------------------------------------------------- tests


def test_a_scheduler_process_fills_the_schedules_page_and_trigger_now_reaches_it(brain, agent, daemon):
    slug = agent["project_slug"]
    key = admin_key(brain)
    beat = SchedulerProcess(daemon.socket_path)
    try:
        beat.hello()

        # The daemon says hello again with the scheduler; the brain stores it
        # and activates the stream; the activation reaches the process.
        wait_for(lambda: (OWNER in (agent_row(brain, agent).get("scheduler_adapters") or []), None),
                 30, "the brain's agent row to list the scheduler")
        activation = wait_for(
            lambda: (next((c for c in beat.client.commands
                           if c["action"] == "schedule.external.activate"), None) is not None,
                     next((c for c in beat.client.commands
                           if c["action"] == "schedule.external.activate"), None)),
            30, "the activation to reach the scheduler process")
        assert activation["target"]["scheduler"] == OWNER, activation

        def listed():
            status, body = schedules_api(brain, key, "GET", f"/api/v1/projects/{slug}/schedules?limit=50")
            assert status == 200, f"GET schedules: HTTP {status} {body}"
            row = next((s for s in body["items"] if s["scheduler"] == OWNER and s["name"] == ROW["name"]), None)
            return row is not None, row

        row = wait_for(listed, 30, "the scheduler's row on the Schedules page")
        assert row["task_name"] == ROW["task_name"] and row["engine"] == "celery", row
        status, caps = schedules_api(brain, key, "GET", f"/api/v1/projects/{slug}/schedules/native-capabilities")
        assert status == 200 and "trigger_now" in (caps.get(OWNER) or []), caps
        done = wait_command_done(brain, agent, activation["id"], 30)
        assert done["status"] == "completed", done

        # Trigger now: the brain sends schedule.external.mutate, the daemon
        # hands it to the scheduler's process, which answers with a receipt.
        status, location = trigger_schedule(brain, key, slug, row["id"])
        assert status == 200 and location, (status, location)
        command_id = location.rstrip("/").rsplit("/", 1)[-1]
        wait_for(lambda: (row_source_key() in beat.triggered, beat.triggered), 30,
                 "the trigger to reach the scheduler process")
        mutate = next(c for c in beat.client.commands if c["id"] == command_id)
        assert mutate["action"] == "schedule.external.mutate", mutate
        assert mutate["parameters"]["operation"] == "trigger", mutate
        done = wait_command_done(brain, agent, command_id, 30)
        assert done["status"] == "completed", done

        def applied():
            status, op = schedules_api(brain, key, "GET",
                                       f"/api/v1/projects/{slug}/schedules/native-operations/{command_id}")
            assert status == 200, f"GET native operation: HTTP {status} {op}"
            assert op["status"] != "UNCONFIRMED", op
            return op["status"] == "APPLIED", op

        op = wait_for(applied, 30, "the trigger's native operation to be APPLIED")
        assert op["schedule_id"] == row["id"], op

        # Every schedule event reached the brain: none refused, none left.
        stats = daemon.wait_stats(lambda s: s["spool_depth"] == 0, 30, "the spool to drain")
        assert "legacy_kind" not in (stats.get("refused_by_reason") or {}), stats
        assert beat.events_sent == 4
    finally:
        beat.close()


def row_source_key() -> str:
    return normalize_external_schedule(ROW, owner=OWNER)["source_key"]


def test_a_legacy_schedule_snapshot_is_still_refused_with_todays_message(daemon):
    client = LocalClient(daemon.socket_path)
    try:
        client.send({"type": "event", "engine": OWNER, "kind": "schedule.snapshot",
                     "data": {"schedules": [{"name": "tick"}]}, "ack_id": "legacy-1"})
        reply = wait_reply(client, "legacy-1")
        assert reply["type"] == "error" and reply["code"] == "legacy_kind", reply
        assert reply["message"] == LEGACY_MESSAGE, reply
        stats = daemon.stats()
        assert stats["refused_by_reason"].get("legacy_kind") == 1, stats
    finally:
        client.close()


def test_a_restarted_scheduler_process_gets_a_new_activation(brain, agent, daemon):
    """The daemon stays connected while the scheduler's process restarts: the brain activates the stream again."""
    slug = agent["project_slug"]
    key = admin_key(brain)

    def activations(p: SchedulerProcess) -> list:
        return [c for c in p.client.commands if c["action"] == "schedule.external.activate"]

    def native_trigger() -> tuple:
        status, caps = schedules_api(brain, key, "GET", f"/api/v1/projects/{slug}/schedules/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return "trigger_now" in (caps.get(OWNER) or []), caps

    first = SchedulerProcess(daemon.socket_path)
    first.hello()
    epoch = wait_for(lambda: (bool(activations(first)), activations(first)), 30,
                     "the first process's activation")[0]["parameters"]["epoch_number"]
    wait_for(native_trigger, 30, "the stream to be active")
    sessions = daemon.stats()["connects"]
    first.close()
    daemon.wait_stats(lambda s: s["clients"] == 1, 10, "the daemon to see the process go")

    second = SchedulerProcess(daemon.socket_path)
    try:
        second.hello()
        again = wait_for(lambda: (bool(activations(second)), activations(second)), 30,
                         "an activation for the restarted process")[0]
        assert again["parameters"]["epoch_number"] > epoch, (epoch, again)
        assert daemon.stats()["connects"] > sessions
        wait_for(native_trigger, 30, "the stream to be active again with the new epoch")
        status, body = schedules_api(brain, key, "GET", f"/api/v1/projects/{slug}/schedules?limit=50")
        assert status == 200
        assert [s for s in body["items"] if s["scheduler"] == OWNER and s["name"] == ROW["name"]], body
    finally:
        second.close()
