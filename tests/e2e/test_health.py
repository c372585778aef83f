"""Health reports from local processes reach the real z4j 1.13.0 brain.

Two in-test local processes on the daemon's socket each report one Celery
worker (stats with pid and pool concurrency, active queues, registered
tasks, conf) and queue depths with the `health` message. The daemon merges
them into every heartbeat's `adapter_health`; the brain's REST API then
shows both workers (Workers page and worker detail) and the depths
(`/stats`, the only place 1.13.0 shows them). A queue reported by both
carries the most recent report's depth. When one process leaves, its
worker leaves the daemon's report, and the brain hears only of the other:
that one's `last_heartbeat` keeps moving, even though the last event batch
is older (the heartbeat's `last_flush_at` is fresh while it carries
workers).
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from control import LocalClient
from harness import wait_for

HEARTBEAT = 10  # the brain's heartbeat_interval_seconds (default)


# ---------------------------------------------------------------- the local processes


@contextmanager
def celery_process(daemon, process: str, **hello):
    """A local process on the daemon's socket that said hello for Celery
    (with the `hello` fields given); closed on leaving."""
    c = LocalClient(daemon.socket_path)
    try:
        c.hello(process=process, engines=["celery"], **hello)
        yield c
    finally:
        c.close()


def health_message(worker: str, pid: int, concurrency: int, queue: str, depths: dict, ack_id: str) -> dict:
    """One Celery worker and queue depths, as the local `health` message carries them."""
    return {
        "type": "health", "ack_id": ack_id, "interval_seconds": 60,
        "engines": {"celery": {
            "queue_depths": depths,
            "workers": {worker: {
                "stats": {"pid": pid, "pool": {"implementation": "celery.concurrency.prefork:TaskPool",
                                               "max-concurrency": concurrency, "processes": [pid + 1]},
                          "prefetch_count": 4},
                "active": [],
                "active_queues": [{"name": queue, "routing_key": queue, "durable": True, "exclusive": False}],
                "registered": ["e2e.health.add", "e2e.health.mul"],
                "conf": {"task_acks_late": False, "worker_prefetch_multiplier": 4, "broker_url": "redis://secret@x"},
            }},
            "broker_type": "redis",
            "broker_connected": True,
        }},
    }


def report(client: LocalClient, msg: dict) -> dict:
    """Sends a health message; returns its ack, failing on any error reply."""
    client.send(msg)
    deadline = time.monotonic() + 5
    while True:
        reply = client.replies.get(timeout=max(0.01, deadline - time.monotonic()))
        assert reply.get("type") != "error", f"health refused: {reply}"
        if reply.get("type") == "ack" and reply.get("ack_id") == msg["ack_id"]:
            return reply


def reported_workers(daemon) -> dict:
    """Worker name -> its summary, over every connected client's health report (the daemon's `stats`)."""
    out = {}
    for c in daemon.stats()["client_list"]:
        for engine, e in ((c.get("health") or {}).get("engines") or {}).items():
            for w in e["workers"]:
                out[w["name"]] = {**w, "engine": engine, "process": c.get("process"),
                                  "queue_depths": e["queue_depths"]}
    return out


# ---------------------------------------------------------------- the brain


def brain_workers(brain, agent: dict) -> dict:
    status, rows = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/workers")
    assert status == 200, f"GET workers: HTTP {status} {rows}"
    return {w["name"]: w for w in rows}


def brain_depths(brain, agent: dict) -> dict:
    status, body = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/stats")
    assert status == 200, f"GET stats: HTTP {status} {body}"
    return {q["name"]: q["pending_count"] for q in body.get("queue_depths") or [] if q.get("engine") == "celery"}


def last_heartbeat(row: dict) -> datetime:
    t = datetime.fromisoformat(row["last_heartbeat"].replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- the test


def test_two_processes_workers_and_depths_reach_the_brain(brain, agent, daemon):
    tag = uuid.uuid4().hex[:6]
    wa, wb = f"celery@e2e-a-{tag}", f"celery@e2e-b-{tag}"
    qa, qb, shared = f"e2e-a-{tag}", f"e2e-b-{tag}", f"e2e-shared-{tag}"
    with celery_process(daemon, "e2e-health-a", framework="celery", worker_role="worker") as a, \
            celery_process(daemon, "e2e-health-b", framework="celery", worker_role="worker") as b:
        # One event: the daemon's last event batch, older than every later heartbeat.
        a.send({"type": "event", "engine": "celery", "kind": "task.received", "task_id": f"health-{tag}",
                "name": "e2e.health.add", "ack_id": "ev"})
        ack = report(a, health_message(wa, 4101, 3, qa, {qa: 7, shared: 1}, "ha"))
        assert ack == {"type": "ack", "ack_id": "ha", "engines": 1, "queues": 2, "workers": 1, "facts": 2}, ack
        report(b, health_message(wb, 4202, 5, qb, {qb: 11, shared: 5}, "hb"))

        # The daemon's own view: each process with what it reported.
        mine = reported_workers(daemon)
        assert mine[wa]["process"] == "e2e-health-a" and mine[wb]["process"] == "e2e-health-b", mine
        assert (mine[wa]["pid"], mine[wa]["concurrency"], mine[wa]["queues"]) == (4101, 3, [qa]), mine[wa]
        assert (mine[wb]["pid"], mine[wb]["concurrency"], mine[wb]["queues"]) == (4202, 5, [qb]), mine[wb]
        assert mine[wa]["queue_depths"] == {qa: 7, shared: 1} and mine[wb]["queue_depths"] == {qb: 11, shared: 5}

        # Workers page: hostname, pid, concurrency and queues of both.
        rows = wait_for(lambda: (lambda r: (wa in r and wb in r, r))(brain_workers(brain, agent)),
                        3 * HEARTBEAT, "the brain to list both reported workers")
        for name, pid, conc, queue in ((wa, 4101, 3, qa), (wb, 4202, 5, qb)):
            row = rows[name]
            assert (row["hostname"], row["pid"], row["concurrency"], row["queues"], row["engine"]) == \
                (name, pid, conc, [queue], "celery"), row
            # Worker detail: the metadata the brain stored from the merged report.
            status, detail = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/workers/{row['id']}")
            assert status == 200, f"GET worker: HTTP {status} {detail}"
            meta = detail["metadata"]
            assert meta["stats"]["pid"] == pid and meta["stats"]["pool"]["max-concurrency"] == conc, meta
            assert meta["conf"] == {"task_acks_late": False, "worker_prefetch_multiplier": 4}, meta
            assert meta["registered"] == ["e2e.health.add", "e2e.health.mul"], meta
            assert meta["active_queues"][0]["name"] == queue, meta

        # Queue depths (`/stats`): each process's, and the shared queue at the later report's depth.
        depths = wait_for(lambda: (lambda d: (qa in d and qb in d and shared in d, d))(brain_depths(brain, agent)),
                          3 * HEARTBEAT, "the brain to store the reported depths")
        assert (depths[qa], depths[qb], depths[shared]) == (7, 11, 5), depths

        # One process leaves: its worker leaves the daemon's report, the other's stays.
        a.close()
        wait_for(lambda: (lambda m: (wa not in m and wb in m, m))(reported_workers(daemon)),
                 10, f"{wa} to leave the daemon's report")
        left = datetime.now(timezone.utc)
        # The brain keeps both rows (it never deletes a worker), but only b's keeps being heard of:
        # its last_heartbeat moves past the departure, twice, while a's stays before it.
        first = wait_for(lambda: (lambda r: (last_heartbeat(r[wb]) > left, r))(brain_workers(brain, agent)),
                         3 * HEARTBEAT, f"{wb}'s last_heartbeat to move past {left}")
        then = wait_for(lambda: (lambda r: (last_heartbeat(r[wb]) > last_heartbeat(first[wb]), r))(
            brain_workers(brain, agent)), 3 * HEARTBEAT, f"{wb}'s last_heartbeat to move again")
        assert last_heartbeat(then[wa]) < left, (then[wa], left)
        assert last_heartbeat(then[wa]) == last_heartbeat(first[wa]), (first[wa], then[wa])

        stats = daemon.stats()
        assert stats["health"]["received"] == 2 and stats["health"]["refused"] == 0, stats["health"]
        assert stats["refused_by_reason"].get("invalid_health", 0) == 0, stats["refused_by_reason"]


def test_a_bad_part_is_refused_with_what_to_change_and_the_rest_reaches_the_brain(brain, agent, daemon):
    tag = uuid.uuid4().hex[:6]
    good, bad = f"celery@e2e-good-{tag}", f"celery@e2e-bad-{tag}"
    with celery_process(daemon, "e2e-health-mixed") as c:
        msg = health_message(good, 4303, 2, f"e2e-q-{tag}", {f"e2e-q-{tag}": 2, f"e2e-x-{tag}": "many"}, "h1")
        # A concurrency the brain cannot store would lose the worker's whole row there.
        msg["engines"]["celery"]["workers"][bad] = {"stats": {"pid": 1, "pool": {"processes": [2, 3]}}}
        c.send(msg)
        errors, ack = [], None
        deadline = time.monotonic() + 5
        while ack is None:
            reply = c.replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("type") == "error":
                errors.append(reply)
            elif reply.get("type") == "ack":
                ack = reply
        assert {e["code"] for e in errors} == {"invalid_health"}, errors
        text = "\n".join(e["message"] for e in errors)
        assert "the depth must be an int >= 0" in text and "stats.pool needs max-concurrency as an int" in text, text
        assert all(e.get("ack_id") == "h1" for e in errors), errors
        assert (ack["workers"], ack["queues"]) == (1, 1), ack
        assert daemon.stats()["refused_by_reason"]["invalid_health"] == 2

        rows = wait_for(lambda: (lambda r: (good in r, r))(brain_workers(brain, agent)),
                        3 * HEARTBEAT, "the brain to list the valid worker")
        assert rows[good]["concurrency"] == 2 and bad not in rows, rows.get(bad)


def test_a_report_larger_than_the_brains_frame_is_cut_not_refused(brain, agent, daemon):
    """A worker whose task list alone is over the brain's 1 MiB frame: sent without that list, counted."""
    tag = uuid.uuid4().hex[:6]
    big, small = f"celery@e2e-big-{tag}", f"celery@e2e-small-{tag}"
    with celery_process(daemon, "e2e-health-big") as c:
        # The session that advertises celery (a new engine makes the daemon reconnect once).
        connects = wait_for(lambda: (lambda s: (s["uplink_state"] == "connected" and "celery" in s["advertised_engines"],
                                                s["connects"]))(daemon.stats()),
                            30, "the daemon to advertise celery to the brain")
        msg = health_message(big, 4404, 8, f"e2e-big-{tag}", {f"e2e-big-{tag}": 1}, "big")
        # About 1.4 MB of task names, each quote escaped once more inside the heartbeat's string.
        msg["engines"]["celery"]["workers"][big]["registered"] = [f"e2e.health.generated.task_{i:06d}" for i in range(40_000)]
        small_msg = health_message(small, 4405, 2, f"e2e-small-{tag}", {}, "unused")
        msg["engines"]["celery"]["workers"][small] = small_msg["engines"]["celery"]["workers"][small]
        assert len(json.dumps(msg)) > 1_300_000
        report(c, msg)

        rows = wait_for(lambda: (lambda r: (big in r and small in r, r))(brain_workers(brain, agent)),
                        3 * HEARTBEAT, "the brain to list both workers of the oversized report")
        assert (rows[big]["pid"], rows[big]["concurrency"]) == (4404, 8), rows[big]
        status, detail = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/workers/{rows[big]['id']}")
        assert status == 200, detail
        assert "registered" not in detail["metadata"] and detail["metadata"]["conf"], detail["metadata"]
        status, detail = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/workers/{rows[small]['id']}")
        assert detail["metadata"]["registered"] == ["e2e.health.add", "e2e.health.mul"], detail["metadata"]

        stats = daemon.stats()
        assert stats["health"]["cut"]["registered"] >= 1, stats["health"]
        assert stats["health"]["cut"]["workers"] == 0, stats["health"]
        # Never a refused heartbeat: the session the report arrived in is still the one in use.
        assert stats["connects"] == connects and stats["uplink_state"] == "connected", \
            (stats["connects"], connects, stats["last_error"], stats["failures_by_class"])
