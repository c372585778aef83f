"""Worker commands and purges from the real z4j 1.13.0 brain, routed by target.

Two in-test local processes each host one Celery worker (named in their
`hello` `workers` and announced with a `worker.online` event, which the
brain needs before it issues worker controls). The brain addresses the
agent only; the daemon hands `restart_worker` to the process hosting the
named worker. A `purge_queue` is confirmed by the daemon: its
`confirm_token` is checked against the depth a process reported in a
`health` message, under the project key that only the daemon holds.
"""

from __future__ import annotations

import os
import queue
import time

from control import LocalClient, wait_brain_knows, wait_command_done
from harness import wait_for

WORKER_ACTIONS = ["restart_worker", "pool_grow", "pool_shrink", "add_consumer", "cancel_consumer"]


# ---------------------------------------------------------------- helpers


def commands_path(agent: dict, what: str) -> str:
    return f"/api/v1/projects/{agent['project_slug']}/commands/{what}"


def wait_reply(client: LocalClient, ack_id: str, what: str, timeout: float = 10.0) -> dict:
    """The daemon's reply to the message sent with `ack_id`; fails on an error reply."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no reply to {what} within {timeout:.0f}s"
        try:
            reply = client.replies.get(timeout=left)
        except queue.Empty:
            continue
        if reply.get("ack_id") != ack_id:
            continue
        assert reply.get("type") != "error", f"{what} refused: {reply}"
        return reply


def announce_worker(client: LocalClient, worker: str) -> None:
    """A `worker.online` event for `worker` (engine celery), durably acknowledged."""
    ack_id = f"online-{worker}"
    client.send({"type": "event", "kind": "worker.online", "engine": "celery", "task_id": "",
                 "data": {"worker": worker}, "ack_id": ack_id})
    reply = wait_reply(client, ack_id, f"the worker.online event for {worker}")
    assert reply["type"] == "ack", reply


def report_health(client: LocalClient, worker: str, depths: dict) -> None:
    """A `health` message (the agreed local format): `depths` and one worker consuming them."""
    ack_id = f"health-{worker}"
    client.send({"type": "health", "ack_id": ack_id, "interval_seconds": 10,
                 "engines": {"celery": {
                     "queue_depths": depths,
                     "workers": {worker: {"stats": {"pid": os.getpid(), "pool": {"max-concurrency": 2}},
                                          "active": [], "active_queues": [{"name": q} for q in depths],
                                          "registered": [], "conf": {}}},
                     "broker_type": "redis", "broker_connected": True}}})
    wait_reply(client, ack_id, "the health report")


def hosting_process(daemon, worker: str, actions: list, answer=None) -> LocalClient:
    """A local process that runs `actions` for celery and hosts `worker`."""
    client = LocalClient(daemon.socket_path, answer=answer)
    client.hello(process=f"e2e-host-{worker}", engines=["celery"], capabilities={"celery": actions},
                 workers=[worker])
    announce_worker(client, worker)
    return client


def wait_brain_lists_workers(brain, agent: dict, names: set) -> None:
    path = f"/api/v1/projects/{agent['project_slug']}/workers"

    def check():
        status, body = brain.api("GET", path)
        assert status == 200, f"GET workers: HTTP {status} {body}"
        items = body if isinstance(body, list) else body.get("items", [])
        seen = {w.get("name") for w in items}
        return names <= seen, sorted(n for n in seen if n)

    wait_for(check, 30, f"the brain to list the workers {sorted(names)}")


def issue(brain, agent: dict, what: str, body: dict) -> dict:
    status, cmd = brain.api("POST", commands_path(agent, what), body={"agent_id": agent["agent_id"], **body})
    assert status == 202, f"POST {what} {body}: HTTP {status} {cmd}"
    return cmd


def answered_by(name: str):
    return lambda cmd: ("success", {"worker": cmd["parameters"].get("worker_name"), "handled_by": name}, None)


# --------------------------------------------------------------------------- a


def test_restart_worker_reaches_only_the_process_hosting_it(brain, agent, daemon):
    """Two processes, one Celery worker each: restart_worker for one reaches only its host and completes."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    tag = os.urandom(3).hex()
    w_a, w_b = f"wA-{tag}@e2e", f"wB-{tag}@e2e"
    a = hosting_process(daemon, w_a, WORKER_ACTIONS, answer=answered_by("a"))
    b = hosting_process(daemon, w_b, WORKER_ACTIONS, answer=answered_by("b"))
    try:
        wait_brain_knows(brain, agent, {"celery": WORKER_ACTIONS})
        wait_brain_lists_workers(brain, agent, {w_a, w_b})

        cmd = issue(brain, agent, "restart-worker", {"worker_name": w_b, "engine": "celery"})
        done = wait_command_done(brain, agent, cmd["id"], 20)
        assert done["status"] == "completed", done
        assert done["result"] == {"worker": w_b, "handled_by": "b"}, done
        assert [c["id"] for c in b.commands] == [cmd["id"]], b.commands
        got = b.commands[0]
        assert got["action"] == "restart_worker", got
        assert got["target"] == {"type": "worker", "id": w_b, "engine": "celery"}, got
        assert got["parameters"]["worker_name"] == w_b, got
        assert a.commands == [], f"the process hosting {w_a} got {a.commands}"

        # And the other way round: the older connection gets only its own worker's command.
        cmd2 = issue(brain, agent, "pool-resize", {"worker_name": w_a, "engine": "celery", "delta": 2})
        done2 = wait_command_done(brain, agent, cmd2["id"], 20)
        assert done2["status"] == "completed", done2
        assert [c["action"] for c in a.commands] == ["pool_grow"], a.commands
        assert len(b.commands) == 1, b.commands
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- b


def test_a_forged_purge_token_fails_with_the_reason_and_the_right_one_reaches_the_process(brain, agent, daemon):
    """The daemon checks confirm_token against the reported depth: forged -> failed, observed_depth -> runs."""
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    tag = os.urandom(3).hex()
    worker, queue = f"wP-{tag}@e2e", f"q-{tag}"
    depth = 7
    p = hosting_process(daemon, worker, ["purge_queue"],
                        answer=lambda cmd: ("success", {"queue": cmd["parameters"]["queue"],
                                                        "purged": cmd["parameters"].get("expected_depth")}, None))
    try:
        report_health(p, worker, {queue: depth})
        wait_brain_knows(brain, agent, {"celery": ["purge_queue"]})
        failed_before = daemon.stats()["commands"]["failed"]

        # A forged token: failed with the reason, nothing reaches the process.
        forged = issue(brain, agent, "purge-queue", {"queue": queue, "confirm_token": "ab" * 32})
        done = wait_command_done(brain, agent, forged["id"], 15)
        assert done["status"] == "failed", done
        error = done["error"] or ""
        for words in (agent["name"], f'confirm_token does not match the last reported depth {depth} of queue "{queue}"',
                      "Re-issue the purge"):
            assert words in error, f"{words!r} not in the error {error!r}"
        assert "ab" * 32 not in error, error

        # No token at all (no observed depth, no force): failed, saying so.
        bare = issue(brain, agent, "purge-queue", {"queue": queue})
        done_bare = wait_command_done(brain, agent, bare["id"], 15)
        assert done_bare["status"] == "failed", done_bare
        assert "no confirm_token" in (done_bare["error"] or ""), done_bare
        assert p.commands == [], f"a refused purge reached the process: {p.commands}"
        assert daemon.stats()["commands"]["failed"] == failed_before + 2, daemon.stats()["commands"]

        # The brain computes the token from the observed depth: the process gets the checked depth, no token.
        good = issue(brain, agent, "purge-queue", {"queue": queue, "observed_depth": depth})
        done_good = wait_command_done(brain, agent, good["id"], 20)
        assert done_good["status"] == "completed", done_good
        assert done_good["result"] == {"queue": queue, "purged": depth}, done_good
        assert [c["id"] for c in p.commands] == [good["id"]], p.commands
        got = p.commands[0]
        assert got["action"] == "purge_queue", got
        assert got["target"]["engine"] == "celery", got
        assert got["parameters"]["expected_depth"] == depth, got
        assert got["parameters"]["queue"] == queue, got
        assert "confirm_token" not in got["parameters"], got
    finally:
        p.close()
