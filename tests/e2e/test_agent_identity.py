"""What the real z4j 1.13.0 brain makes of the daemon: a current agent, its own version kept.

The brain reads `hello.agent_version` as the z4j contract line the agent speaks: a daemon that
named its own 0.1.0 was `incompatible` with a version-skew warning on every connect. The daemon
names the contract line of the brain it talks to (learnt from `hello_ack` and kept in the spool:
on first contact it says the brain's silent `0.0.0`, then hello again at once with the line) and
puts its own version in `hello.host`. The health timeline carries `telemetry_loss`, whose
`buffer_id` belongs to the spool file (kept across restarts) and `runtime_id` to one daemon run.
"""

from __future__ import annotations

import json
import re

from control import agent_row
from harness import brain_db, hexid, wait_for

SKEW = "supported version skew"
_CODE_4002 = re.compile(r"(?<![\w/.-])4002(?![\w/.-])")


def health_rows(brain, agent: dict) -> list:
    """The brain's agent health timeline, newest first."""
    status, rows = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/agents/{agent['agent_id']}/health")
    assert status == 200, f"GET agents/{{id}}/health: HTTP {status} {rows}"
    return rows


def wait_health_row_of_run(brain, agent: dict, runtime_hint=None, timeout: float = 30.0) -> dict:
    """Until the timeline has a row with telemetry_loss (of a run other than `runtime_hint`'s)."""

    def check():
        rows = health_rows(brain, agent)
        for r in rows:
            loss = r.get("telemetry_loss")
            if loss and loss.get("runtime_id") != runtime_hint:
                return True, r
        return False, rows[:3]

    return wait_for(check, timeout, "a health timeline row with telemetry_loss of this daemon run")


def brain_log_lines_of(brain, agent: dict) -> list:
    return [ln for ln in brain.log_text().splitlines() if agent["agent_id"] in ln]


def host_metadata(brain, agent: dict) -> dict:
    rows = brain_db(brain, "SELECT metadata FROM agents WHERE id = ?", (hexid(agent["agent_id"]),))
    assert len(rows) == 1, rows
    meta = rows[0]["metadata"]
    return (json.loads(meta) if isinstance(meta, str) else meta).get("host") or {}


def test_the_agent_is_current_with_its_own_version_visible_and_a_restart_says_hello_once(
        brain, agent, daemon):
    first = daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    # Fresh spool: 0.0.0, then hello again with the brain's line; one session counted.
    assert first["contract_line"] == "1.13.0", first
    assert first["brain_version"] == "1.13.0", first
    assert (first["connects"], first["contract_rehellos"]) == (1, 1), first
    assert not first["failures_by_class"], first

    def row_current():
        a = agent_row(brain, agent)
        return a.get("version_status") == "current", {k: a.get(k) for k in (
            "agent_version", "version_status", "framework_adapter", "state")}

    row = wait_for(row_current, 30, "the brain's agent row to say current")
    assert row["agent_version"] == "1.13.0" and row["framework_adapter"] == "z4j-agentd", row

    host = host_metadata(brain, agent)
    assert host.get("agentd_version") == first["version"], host
    assert host.get("agent") == "z4j-agentd" and host.get("z4j_contract") == "1.13.0", host
    assert host.get("name") == agent["name"], host

    r1 = wait_health_row_of_run(brain, agent)
    loss1 = r1["telemetry_loss"]
    assert re.fullmatch(r"[0-9a-f]{32}", loss1["buffer_id"]), loss1
    assert re.fullmatch(r"[0-9a-f]{32}:\d+", loss1["runtime_id"]), loss1
    assert loss1["runtime_id"].endswith(f":{daemon.pid}"), (loss1, daemon.pid)
    assert loss1["capacity_evicted_frames"] == 0 and loss1["content_rejected_frames"] == 0, loss1

    # Restart, the spool kept: the brain's version is known, one hello, no second.
    assert daemon.stop() == 0
    daemon.start()
    second = daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected again")
    assert (second["connects"], second["contract_rehellos"]) == (1, 0), second
    assert second["contract_line"] == "1.13.0", second
    r2 = wait_health_row_of_run(brain, agent, runtime_hint=loss1["runtime_id"])
    loss2 = r2["telemetry_loss"]
    assert loss2["buffer_id"] == loss1["buffer_id"], (loss1, loss2)
    assert loss2["runtime_id"] != loss1["runtime_id"] and loss2["runtime_id"].endswith(f":{daemon.pid}"), loss2
    a = agent_row(brain, agent)
    assert (a["agent_version"], a["version_status"]) == ("1.13.0", "current"), a

    # The brain said nothing about versions, slots or frames for this agent; the connection
    # was never closed by the brain (a bad telemetry_loss is a 1011 on every heartbeat).
    ours = brain_log_lines_of(brain, agent)
    skew = [ln for ln in ours if SKEW in ln]
    assert not skew, "brain log warns of version skew for our agent:\n" + "\n".join(skew[:5])
    bad = [ln for ln in ours if _CODE_4002.search(ln) or "replac" in ln.lower()
           or "verification failed" in ln or "telemetry loss" in ln]
    assert not bad, "brain log shows slot replacement or refused frames for our agent:\n" + "\n".join(bad[:10])
    assert "invalid telemetry loss counters" not in brain.log_text()
    final = daemon.stats()
    assert final["connects"] == 1 and not final["failures_by_class"], final
