"""The smoke set against the oldest supported brain, z4j 1.9.1 (the full suite runs on 1.13.0).

The brain runs from a venv of its own (`brain.oldest_brain_venv()`: z4j 1.9.1 with the z4j-core
1.9.1 it shipped with, as its users install it), with its own state directory and port under the
run directory; the clients run from the test venv. One agent and one daemon serve the whole
module, which checks, in this order: task lifecycles from a socket client reach the brain in the
right states; a cancel-task issued through the brain's REST API is served by a local process and
completes in the brain; `z4j-agentd doctor --json` passes against it; and what the brain makes of
the daemon's version: the daemon speaks the 1.9 contract line (docs/brain-protocol.md, "agent_version:
the z4j contract line"), the brain's agent row is `current`, and its log has no version-skew
warning, and the daemon said its hello with the wrong line once only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys

import pytest

import brain as brainmod
from control import agent_row, issue_cancel, wait_brain_knows, wait_command_done
from harness import (
    running_brain,
    CELERY_COMMANDS,
    SEND_JSONL,
    Client,
    Service,
    event_rows_by_task,
    run_agentd,
    run_clients,
    verify_tasks,
    wait_for,
    wait_tasks_complete,
)

VERSION = brainmod.OLDEST_BRAIN_VERSION
CONTRACT_LINE = "1.9.1"  # docs/brain-protocol.md: a 1.9.x brain is sent agent_version 1.9.1
ENGINE = "celery"
SKEW = "supported version skew"
_CODE_4002 = re.compile(r"(?<![\w/.-])4002(?![\w/.-])")


@pytest.fixture(scope="module")
def old_brain(run_dir):
    b = brainmod.Brain(run_dir / f"brain-{VERSION}", venv=brainmod.oldest_brain_venv())
    with running_brain(b, f"brain {VERSION}"):
        yield b


@pytest.fixture(scope="module")
def old_pair(old_brain, agent_daemon):
    return agent_daemon(old_brain, f"brain-{VERSION}")


@pytest.fixture(scope="module")
def old_agent(old_pair):
    return old_pair[0]


@pytest.fixture(scope="module")
def old_daemon(old_pair):
    d = old_pair[1]
    d.start()
    try:
        d.wait_stats(lambda s: s["uplink_state"] == "connected", 60, f"uplink connected to brain {VERSION}")
        yield d
    finally:
        d.stop()


def ours_in_brain_log(brain, agent: dict) -> list:
    return [ln for ln in brain.log_text().splitlines() if agent["agent_id"] in ln]


# --------------------------------------------------------------------------- a


def test_task_lifecycles_reach_the_old_brain_in_the_right_states(old_brain, old_agent, old_daemon):
    tag = os.urandom(3).hex()
    prefix, n, every = f"v191-{tag}-", 6, 3
    client = Client(SEND_JSONL, old_daemon.socket_path,
                    ["--tasks", n, "--fail-every", every, "--prefix", prefix, "--engine", ENGINE],
                    old_daemon.workdir, "jsonl-v191")
    [summary] = run_clients([client], timeout=60)
    assert summary["tasks"] == [f"{prefix}{i}" for i in range(1, n + 1)], summary
    assert summary["failed_tasks"] == [f"{prefix}{i}" for i in range(every, n + 1, every)], summary
    assert summary["sent"] == 3 * n, summary

    slug = old_agent["project_slug"]
    wait_tasks_complete(old_brain, slug, ENGINE, summary["tasks"], timeout=60)
    verify_tasks(old_brain, slug, ENGINE, [summary], old_agent["agent_id"], socket.gethostname())
    # Exactly one row per lifecycle event in the brain's database.
    rows = event_rows_by_task(old_brain, old_agent["agent_id"])
    want = {tid: {"task.received": 1, "task.started": 1,
                  "task.failed" if tid in summary["failed_tasks"] else "task.succeeded": 1}
            for tid in summary["tasks"]}
    assert rows == want, f"brain {VERSION} events table: {rows}"
    stats = old_daemon.wait_stats(lambda s: s["spool_depth"] == 0 and s["acked"] >= 3 * n, 30,
                                  "the spool to drain")
    assert stats["received"] == 3 * n and stats["dropped"] == 0 and stats["refused"] == 0, stats


# --------------------------------------------------------------------------- b


def test_cancel_task_round_trip_through_the_old_brain(old_brain, old_agent, old_daemon):
    assert importlib.util.find_spec("celery"), f"celery is not installed in {sys.prefix}"
    example = Service([sys.executable, CELERY_COMMANDS, "--socket", old_daemon.socket_path, "--broker", "memory://"],
                      old_daemon.workdir, "celery-commands-v191")
    try:
        wait_brain_knows(old_brain, old_agent, {ENGINE: ["cancel_task"]})
        task_id = f"e2e-v191-{os.urandom(4).hex()}"
        cmd = issue_cancel(old_brain, old_agent, ENGINE, task_id)
        handled = example.next_json(20, "the example to handle the cancel command")
        assert (handled["id"], handled["action"], handled["status"]) == (cmd["id"], "cancel_task", "success"), handled
        done = wait_command_done(old_brain, old_agent, cmd["id"], 20)
        assert done["status"] == "completed", done
        assert done["result"] == {"task_id": task_id, "revoked": True, "terminated": False}, done
        assert old_daemon.stats()["commands"] == {"received": 1, "succeeded": 1, "failed": 0}, old_daemon.stats()
    finally:
        example.stop()


# --------------------------------------------------------------------------- c


def test_doctor_passes_against_the_old_brain(old_brain, old_daemon):
    r = run_agentd(old_daemon.binary, ["doctor", "--json"], old_daemon.env(), cwd=old_daemon.workdir)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"doctor --json printed no JSON (exit {r.returncode}): stderr={r.stderr!r}") from None
    by = {p["name"]: p for p in report["probes"]}
    shown = "\n".join(f"  {p['status']:<4} {p['name']:<11} {p['message']}" for p in report["probes"])
    assert r.returncode == 0 and report["ok"] is True, f"exit {r.returncode}\n{shown}"
    assert not [p for p in report["probes"] if p["status"] == "fail"], shown
    for name in ("config", "tcp", "websocket", "longpoll", "clock"):
        assert by[name]["status"] == "ok", shown
    assert "token accepted and HMAC secret verified" in by["websocket"]["message"], shown
    assert "signed upload taken over HTTPS long-poll" in by["longpoll"]["message"], shown
    assert by["websocket"]["details"]["brain_version"] == VERSION, by["websocket"]
    assert abs(by["clock"]["details"]["skew_seconds"]) < 30, by["clock"]


# --------------------------------------------------------------------------- d


def test_the_old_brain_sees_a_current_agent_on_its_contract_line(old_brain, old_agent, old_daemon):
    stats = old_daemon.stats()
    assert stats["brain_version"] == VERSION, stats
    assert stats["contract_line"] == CONTRACT_LINE, stats
    # Fresh spool: hello with 0.0.0, then once more with the 1.9 line (a rehello, not a
    # connect); a second session only for the example's cancel_task capability (the daemon
    # reconnects so the brain learns it), which kept the line: no second rehello. Nothing failed.
    assert (stats["connects"], stats["contract_rehellos"]) == (2, 1), stats
    assert not stats["failures_by_class"], stats

    def row_current():
        a = agent_row(old_brain, old_agent)
        return a.get("version_status") == "current", {k: a.get(k) for k in (
            "agent_version", "version_status", "framework_adapter", "state")}

    row = wait_for(row_current, 30, f"brain {VERSION}'s agent row to say current")
    assert row["agent_version"] == CONTRACT_LINE and row["framework_adapter"] == "z4j-agentd", row
    assert row["state"] == "online", row

    ours = ours_in_brain_log(old_brain, old_agent)
    skew = [ln for ln in ours if SKEW in ln]
    assert not skew, f"brain {VERSION} log warns of version skew for our agent:\n" + "\n".join(skew[:5])
    bad = [ln for ln in ours if _CODE_4002.search(ln) or "replac" in ln.lower() or "verification failed" in ln]
    assert not bad, f"brain {VERSION} log shows slot replacement or refused frames:\n" + "\n".join(bad[:10])
