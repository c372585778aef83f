"""`z4j-agentd doctor` against the real z4j 1.13.0 brain.

The doctor runs with the environment a daemon of the harness would get
(`Daemon.env()`), so it checks exactly what `run` would use. Probes, in
order: config, buffer_path, socket, dns, tcp, tls, websocket, clock. The
brain is plain http:// on loopback, so `tls` is always `skip` here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets

from brain import free_port
from harness import SEND_JSONL, Client, brain_db, hexid, run_agentd, wait_for

PROBES = ["config", "buffer_path", "socket", "gateway", "dns", "tcp", "tls", "websocket", "longpoll", "clock"]
STATUSES = {"ok", "warn", "fail", "skip"}
CONFIG_KEYS = {"brain_url", "project_id", "agent_name", "worker_id", "buffer_path", "socket_path", "transport"}
_CODE_4002 = re.compile(r"(?<![\w/.-])4002(?![\w/.-])")


def doctor(d, *flags, env=None, timeout=60.0):
    """Run `z4j-agentd doctor <flags>` with the daemon's environment plus `env` (None removes a key)."""
    e = d.env()
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return run_agentd(d.binary, ["doctor", *flags], e, cwd=d.workdir, timeout=timeout)


def doctor_json(d, *flags, env=None):
    """-> (exit code, report, {name: probe}); asserts the output is one JSON object."""
    r = doctor(d, "--json", *flags, env=env)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"doctor --json printed no JSON (exit {r.returncode}): "
                             f"stdout={r.stdout!r} stderr={r.stderr!r}") from None
    assert isinstance(report, dict), report
    return r.returncode, report, {p["name"]: p for p in report.get("probes", [])}


def show(report) -> str:
    return "\n".join(f"  {p['status']:<4} {p['name']:<11} {p['message']}  (fix: {p['fix']})"
                     for p in report.get("probes", []))


def statuses(report) -> dict:
    return {p["name"]: p["status"] for p in report["probes"]}


def assert_schema(report) -> None:
    assert set(report) >= {"ok", "version", "config", "probes"}, report.keys()
    assert isinstance(report["ok"], bool)
    assert isinstance(report["version"], str) and report["version"], report["version"]
    assert set(report["config"]) == CONFIG_KEYS, report["config"]
    for k, v in report["config"].items():
        assert v is None or isinstance(v, str), (k, v)
    assert [p["name"] for p in report["probes"]] == PROBES, show(report)
    for p in report["probes"]:
        assert set(p) == {"name", "status", "message", "fix", "details"}, p
        assert p["status"] in STATUSES, p
        assert isinstance(p["message"], str) and p["message"], p
        assert p["fix"] is None or (isinstance(p["fix"], str) and p["fix"]), p
        assert isinstance(p["details"], dict), p
    assert report["ok"] == all(p["status"] != "fail" for p in report["probes"]), show(report)


def assert_skipped_after(report, failed: str) -> None:
    """Every probe after `failed` is skip, naming the probe that failed."""
    after = PROBES[PROBES.index(failed) + 1:]
    for name in after:
        p = next(p for p in report["probes"] if p["name"] == name)
        assert p["status"] == "skip" and f"`{failed}` failed" in p["message"], show(report)


# --------------------------------------------------------------------------- 1


def test_doctor_right_credentials_passes(brain, agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    rc, report, by = doctor_json(d)
    assert rc == 0, f"exit {rc}\n{show(report)}"
    assert report["ok"] is True
    assert all(s != "fail" for s in statuses(report).values()), show(report)
    for name in ("config", "dns", "tcp", "websocket", "longpoll", "clock"):
        assert by[name]["status"] == "ok", show(report)
    # The brain's long-poll endpoints take the same credentials.
    lp = by["longpoll"]
    assert "signed upload taken over HTTPS long-poll" in lp["message"], lp
    assert lp["details"]["agent_id"].replace("-", "") == hexid(agent["agent_id"]), lp["details"]
    assert by["buffer_path"]["status"] in ("ok", "warn"), show(report)
    assert by["socket"]["status"] == "warn" and "no daemon is running" in by["socket"]["message"], show(report)
    assert by["tls"]["status"] == "skip" and "plain ws://" in by["tls"]["message"], show(report)
    ws = by["websocket"]
    assert "token accepted and HMAC secret verified" in ws["message"], ws
    assert ws["details"]["agent_id"].replace("-", "") == hexid(agent["agent_id"]), ws["details"]
    assert ws["details"]["worker_id"] == report["config"]["worker_id"] + "-doctor", ws["details"]
    assert isinstance(by["clock"]["details"]["skew_seconds"], (int, float)), by["clock"]
    assert abs(by["clock"]["details"]["skew_seconds"]) < 30, by["clock"]
    # hello_ack's project id replaces the configured slug in the header.
    assert report["config"]["brain_url"].rstrip("/") == brain.url.rstrip("/"), report["config"]

    # The text form says the same.
    r = doctor(d)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "all checks passed" in r.stdout, r.stdout
    for tag, name in [("[OK]", "config"), ("[OK]", "websocket"), ("[OK]", "clock"), ("[SKIP]", "tls")]:
        assert re.search(rf"^\s*{re.escape(tag)}\s+{name}\s", r.stdout, re.M), f"{tag} {name} missing:\n{r.stdout}"
    assert "[FAIL]" not in r.stdout, r.stdout


# --------------------------------------------------------------------------- 2


def test_doctor_wrong_token_fails_websocket_with_4401(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    wrong = secrets.token_urlsafe(32)
    assert len(wrong) == 43 and wrong != agent["token"]
    rc, report, by = doctor_json(d, env={"Z4J_TOKEN": wrong})
    assert rc == 1, f"exit {rc}\n{show(report)}"
    assert report["ok"] is False
    assert [n for n, s in statuses(report).items() if s == "fail"] == ["websocket"], show(report)
    ws = by["websocket"]
    assert "4401" in ws["message"] and "token" in ws["message"], ws
    assert ws["details"].get("close_code") == 4401, ws
    assert "Z4J_TOKEN" in ws["fix"], ws
    assert by["clock"]["status"] == "skip", show(report)
    assert_skipped_after(report, "websocket")
    # The wrong token is not echoed anywhere.
    assert wrong not in json.dumps(report)


# --------------------------------------------------------------------------- 3


def test_doctor_wrong_hmac_secret_fails_websocket_with_4403(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    wrong = base64.urlsafe_b64encode(os.urandom(32)).decode()
    rc, report, by = doctor_json(d, env={"Z4J_HMAC_SECRET": wrong})
    assert rc == 1, f"exit {rc}\n{show(report)}"
    assert [n for n, s in statuses(report).items() if s == "fail"] == ["websocket"], show(report)
    ws = by["websocket"]
    assert "4403" in ws["message"] and "HMAC secret" in ws["message"], ws
    assert ws["details"].get("close_code") == 4403, ws
    assert "Z4J_HMAC_SECRET" in ws["fix"], ws
    # The handshake itself worked (the token is right): the session facts are there.
    assert ws["details"]["agent_id"].replace("-", "") == hexid(agent["agent_id"]), ws["details"]
    assert by["clock"]["status"] == "skip", show(report)
    assert wrong not in json.dumps(report)


# --------------------------------------------------------------------------- 4


def test_doctor_brain_down_fails_tcp_and_skips_the_rest(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    port = free_port()  # bound and released: nothing listens there
    rc, report, by = doctor_json(d, env={"Z4J_BRAIN_URL": f"http://127.0.0.1:{port}"})
    assert rc == 1, f"exit {rc}\n{show(report)}"
    assert report["ok"] is False
    st = statuses(report)
    assert st["config"] == "ok" and st["dns"] == "ok", show(report)
    assert st["tcp"] == "fail", show(report)
    assert f"127.0.0.1:{port}" in by["tcp"]["message"], by["tcp"]
    assert str(port) in by["tcp"]["fix"], by["tcp"]
    assert by["tcp"]["details"]["port"] == port, by["tcp"]
    assert (st["tls"], st["websocket"], st["clock"]) == ("skip", "skip", "skip"), show(report)
    assert_skipped_after(report, "tcp")


# --------------------------------------------------------------------------- 5


def test_doctor_unwritable_buffer_dir_fails_buffer_path_with_exact_fix(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    bad = d.spool_dir / "foreign"
    bad.mkdir(mode=0o700)
    uid = os.getuid()
    try:
        if uid == 0:
            os.chown(bad, 65534, 65534)  # someone else's directory
        else:
            os.chmod(bad, 0o500)  # ours, but not writable
        spool = bad / "agentd.sqlite"
        rc, report, by = doctor_json(d, "--no-websocket", env={"Z4J_BUFFER_PATH": str(spool)})
    finally:
        if uid == 0:
            os.chown(bad, 0, 0)
        os.chmod(bad, 0o700)
    assert rc == 1, f"exit {rc}\n{show(report)}"
    bp = by["buffer_path"]
    assert bp["status"] == "fail", show(report)
    real = os.path.realpath(bad)
    assert real in bp["message"] or str(bad) in bp["message"], bp
    if uid == 0:
        assert "owned by uid 65534" in bp["message"], bp
        assert f"chown {uid} {real}" in bp["fix"], bp
    else:
        assert ("chmod" in bp["fix"] or "chown" in bp["fix"]) and real in bp["fix"], bp
    assert "Z4J_BUFFER_PATH" in bp["fix"], bp
    assert bp["details"].get("uid") == uid, bp
    assert statuses(report)["config"] == "ok", show(report)
    assert_skipped_after(report, "buffer_path")
    assert not spool.exists(), "the doctor must not create the spool"


# --------------------------------------------------------------------------- 6


def test_doctor_leaves_the_running_daemons_slot_alone(brain, agent, daemon_factory):
    # Static engines: a short-lived sender registering `celery` changes nothing the daemon
    # advertises, so no engine-change re-handshake can move `connects` during the test.
    daemon = daemon_factory(agent, Z4J_ENGINES="celery")
    before = daemon.wait_stats(lambda s: s["uplink_state"] == "connected" and s["advertised_engines"] == ["celery"],
                               60, "uplink connected, advertising celery")
    connects = before["connects"]
    worker_id = before["worker_id"]

    rc, report, by = doctor_json(daemon)  # the SAME environment as the daemon
    assert rc == 0, f"exit {rc}\n{show(report)}"
    sock = by["socket"]
    assert sock["status"] == "ok", show(report)
    assert f"(pid {daemon.pid})" in sock["message"], sock
    assert sock["details"]["daemon_pid"] == daemon.pid and sock["details"]["uplink_state"] == "connected", sock
    assert by["buffer_path"]["details"].get("locked_by_pid") == daemon.pid, by["buffer_path"]
    assert f"in use by the running daemon (pid {daemon.pid})" in by["buffer_path"]["message"], by["buffer_path"]
    assert by["websocket"]["status"] == "ok" and by["clock"]["status"] == "ok", show(report)
    assert report["config"]["worker_id"] == worker_id, report["config"]
    assert by["websocket"]["details"]["worker_id"] == f"{worker_id}-doctor", by["websocket"]
    # The doctor advertises what the daemon advertises (every hello overwrites the agent's engines).
    assert by["websocket"]["details"]["engines"] == ["celery"], by["websocket"]

    # The daemon still works on its own session: events flow and are acked.
    prefix = f"doc6-{os.urandom(3).hex()}-"
    s = Client(SEND_JSONL, daemon.socket_path, ["--durable", "--tasks", 3, "--prefix", prefix],
               daemon.workdir, "after-doctor").wait(60)
    assert s["acked"] == 9, s
    after = daemon.wait_stats(
        lambda st: st["acked"] >= before["acked"] + 9 and st["spool_depth"] == 0,
        60, "the 9 events sent after the doctor to be acked by the brain",
    )
    assert after["uplink_state"] == "connected", after
    assert after["connects"] == connects, f"the daemon reconnected while the doctor ran: {connects} -> {after}"
    assert after["session_id"] == before["session_id"], (before["session_id"], after["session_id"])
    bad = [ln for ln in daemon.log_text().splitlines() if _CODE_4002.search(ln)]
    assert not bad, "daemon log mentions close code 4002:\n" + "\n".join(bad[:10])

    # The brain holds one slot per worker_id: the daemon's (online) and the doctor's.
    def slots():
        rows = brain_db(brain, "SELECT worker_id, state FROM agent_workers WHERE agent_id = ?",
                        (hexid(agent["agent_id"]),))
        by_id = {r["worker_id"]: r["state"] for r in rows}
        return set(by_id) == {worker_id, f"{worker_id}-doctor"} and by_id[worker_id] == "online", rows

    wait_for(slots, 30, "agent_workers rows for the daemon (online) and the doctor")

    # A doctor run with another worker_id than the daemon's says so, without failing.
    rc, other, oby = doctor_json(daemon, "--no-websocket", env={"Z4J_WORKER_ID": "agentd-someone-else"})
    assert rc == 0 and oby["socket"]["status"] == "warn", show(other)
    assert f"as worker_id {worker_id}" in oby["socket"]["message"] and "agentd-someone-else" in oby["socket"]["message"], \
        oby["socket"]

    status, agents = brain.api("GET", f"/api/v1/projects/{agent['project_slug']}/agents")
    assert status == 200, agents
    ours = next(a for a in agents if a["id"] == agent["agent_id"])
    assert "celery" in (ours.get("engine_adapters") or []) and ours["state"] == "online", ours


# --------------------------------------------------------------------------- 7


def test_doctor_json_follows_the_schema(brain, agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    rc, report, _ = doctor_json(d)
    assert rc == 0, show(report)
    assert_schema(report)
    assert report["ok"] is True
    c = report["config"]
    assert c["brain_url"].rstrip("/") == brain.url.rstrip("/"), c
    assert c["agent_name"] == agent["name"], c
    assert c["socket_path"] == str(d.socket_path), c
    assert c["buffer_path"] == os.path.realpath(d.buffer_path), c
    assert c["transport"].startswith(f"websocket ws://127.0.0.1:{brain.port}/"), c
    # Z4J_TRANSPORT=auto (the default) names the long-poll endpoints it would fall back to.
    assert f"longpoll http://127.0.0.1:{brain.port}/api/v1/agent/" in c["transport"], c
    assert c["worker_id"], c

    # A failing run keeps the schema: every probe listed, the rest skipped.
    rc, down, _ = doctor_json(d, env={"Z4J_BRAIN_URL": f"http://127.0.0.1:{free_port()}"})
    assert rc == 1, show(down)
    assert_schema(down)
    assert down["ok"] is False
    assert [p["status"] for p in down["probes"]][5:] == ["fail", "skip", "skip", "skip", "skip"], show(down)
    assert down["probes"][5]["fix"], down["probes"][5]
    assert all(p["fix"] is None for p in down["probes"][6:]), show(down)


# --------------------------------------------------------------------------- 8


def test_doctor_no_websocket_skips_websocket_and_clock(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    rc, report, by = doctor_json(d, "--no-websocket")
    assert rc == 0, f"exit {rc}\n{show(report)}"
    assert report["ok"] is True
    assert by["websocket"]["status"] == "skip" and "--no-websocket" in by["websocket"]["message"], show(report)
    assert by["clock"]["status"] == "skip" and "--no-websocket" in by["clock"]["message"], show(report)
    assert by["tcp"]["status"] == "ok" and by["config"]["status"] == "ok", show(report)
    # Even a wrong token passes when the websocket is not checked: only the round trip proves it.
    rc, report, by = doctor_json(d, "--no-websocket", env={"Z4J_TOKEN": secrets.token_urlsafe(32)})
    assert rc == 0 and by["websocket"]["status"] == "skip", show(report)


# --------------------------------------------------------------------------- 9


def test_doctor_config_error_and_usage_error(agent, daemon_factory):
    d = daemon_factory(agent, start=False)
    for env in ({"Z4J_TOKEN": ""}, {"Z4J_TOKEN": None}):
        rc, report, by = doctor_json(d, env=env)
        assert rc == 1, f"{env}: exit {rc}\n{show(report)}"
        assert_schema(report)
        cfg = by["config"]
        assert cfg["status"] == "fail" and "Z4J_TOKEN" in cfg["message"], show(report)
        assert "Z4J_TOKEN" in cfg["fix"] and cfg["details"].get("key") == "Z4J_TOKEN", cfg
        assert all(p["status"] == "skip" for p in report["probes"][1:]), show(report)
        assert_skipped_after(report, "config")
        # What could be read is still shown.
        assert report["config"]["brain_url"] == d.brain_url, report["config"]

    r = doctor(d, "--no-such-flag")
    assert r.returncode == 64, (r.returncode, r.stdout, r.stderr)
    assert "--no-such-flag" in r.stderr, r.stderr
    r = doctor(d, "--json", "--no-websocket", "extra-argument")
    assert r.returncode == 64, (r.returncode, r.stdout, r.stderr)
