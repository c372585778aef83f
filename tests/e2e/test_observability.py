"""`z4j-agentd status` and the metrics/health listener (`Z4J_METRICS_ADDR`)
against a real daemon and the real z4j 1.13.0 brain.

Every value is read back from the daemon after something made it move:
events sent and acked, an event refused at the socket, events evicted from
a full spool while the brain is away.
"""

from __future__ import annotations

import json
import os
import subprocess

from brain import free_port
from harness import (
    SEND_JSONL,
    Client,
    SockClient,
    http_get,
    metric,
    parse_metrics,
    run_agentd,
    wait_for,
)

STATUS_KEYS = {
    "version", "pid", "uptime_seconds", "brain_url", "worker_id", "agent_name", "spool_path", "socket_path",
    "spool_depth", "spool_bytes", "received", "stored", "forwarded", "resent", "acked", "dropped",
    "dropped_by_reason", "refused", "refused_by_reason", "rates", "uplink_state", "uplink_since",
    "connects", "clients", "client_list", "engines", "advertised_engines",
}
P = "z4j_agentd_"


def status(d, *flags, env=None):
    e = d.env()
    e.update(env or {})
    return run_agentd(d.binary, ["status", *flags], e, cwd=d.workdir, timeout=30)


def status_json(d, *flags, env=None) -> dict:
    r = status(d, "--json", *flags, env=env)
    assert r.returncode == 0, f"status --json exited {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


def send_tasks(d, n: int, name: str, *extra) -> dict:
    """n durable task lifecycles (3 events each) through the JSON-lines example."""
    s = Client(SEND_JSONL, d.socket_path,
               ["--durable", "--tasks", n, "--prefix", f"{name}-{os.urandom(3).hex()}-", *extra],
               d.workdir, name).wait(120)
    assert s["acked"] == 3 * n and s["errors"] == 0, s
    return s


def metrics_daemon(daemon_factory, agent, **env):
    port = free_port()
    d = daemon_factory(agent, Z4J_METRICS_ADDR=f"127.0.0.1:{port}", **env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: (http_get(base + "/healthz", timeout=2)[0] == 200, None), 15, f"{base}/healthz to answer")
    return d, base


def scrape(base: str) -> dict:
    code, headers, body = http_get(base + "/metrics")
    assert code == 200, (code, body[:500])
    assert headers.get("content-type", "").startswith("application/openmetrics-text"), headers
    assert body.rstrip().endswith("# EOF"), body[-200:]
    samples = parse_metrics(body)
    assert all(name.startswith(P) for name, _ in samples), sorted({n for n, _ in samples if not n.startswith(P)})
    return samples


def readyz(base: str):
    code, headers, body = http_get(base + "/readyz")
    assert headers.get("content-type", "").startswith("application/json"), headers
    return code, json.loads(body)


# --------------------------------------------------------------------------- 10


def test_status_shows_the_running_daemon_and_its_counters_move(brain, agent, daemon):
    st = daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")

    r = status(daemon)  # socket path from Z4J_SOCKET_PATH, as the daemon's environment has it
    assert r.returncode == 0, (r.stdout, r.stderr)
    text = r.stdout
    assert st["brain_url"].rstrip("/") == brain.url.rstrip("/"), st["brain_url"]
    assert brain.url.rstrip("/") in text, text
    assert f"(pid {daemon.pid})" in text, text
    assert "uplink:   connected since" in text, text
    assert "spool:    0 events" in text and str(daemon.buffer_path) in text, text
    assert f"worker_id {st['worker_id']}" in text, text

    # --json, socket path from the flag only; the status command's own connection is listed.
    env = {k: v for k, v in daemon.env().items() if k != "Z4J_SOCKET_PATH"}
    proc = subprocess.Popen([str(daemon.binary), "status", "--json", "--socket-path", str(daemon.socket_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    v0 = json.loads(out)
    assert STATUS_KEYS <= set(v0), sorted(STATUS_KEYS - set(v0))
    assert v0["pid"] == daemon.pid and v0["uplink_state"] == "connected", v0
    assert v0["socket_path"] == str(daemon.socket_path), v0
    assert set(v0["rates"]) >= {"window_seconds", "ingest_per_second", "forward_per_second", "acked_per_second"}
    assert isinstance(v0["client_list"], list) and isinstance(v0["engines"], list), v0
    assert proc.pid in [c.get("pid") for c in v0["client_list"]], v0["client_list"]

    # Events sent -> received and acked move.
    send_tasks(daemon, 4, "st-sent")
    daemon.wait_stats(lambda s: s["acked"] >= v0["acked"] + 12 and s["spool_depth"] == 0, 60,
                      "12 events acked by the brain")
    v1 = status_json(daemon)
    assert v1["received"] >= v0["received"] + 12, (v0["received"], v1["received"])
    assert v1["stored"] >= v0["stored"] + 12, (v0["stored"], v1["stored"])
    assert v1["acked"] >= v0["acked"] + 12, (v0["acked"], v1["acked"])
    assert v1["spool_depth"] == 0 and v1["last_ack_at"], v1
    assert v1["rates"]["window_seconds"] >= 0, v1["rates"]

    # A refused event (no "engine") is counted by reason; a held client with engines is listed.
    with SockClient(daemon.socket_path) as c:
        hello = c.request({"type": "hello", "process": "e2e-status-probe", "pid": os.getpid(),
                           "framework": "bare", "engines": ["rq"], "worker_role": "task", "ack_id": "h"})
        assert hello.get("type") == "hello_ack", hello
        err_reply = c.request({"type": "event", "kind": "task.received", "task_id": "st-bad-1", "ack_id": "bad"})
        assert err_reply.get("type") == "error" and err_reply.get("code") == "invalid_event", err_reply
        assert err_reply.get("ack_id") == "bad", err_reply
        # The refusal comes first, then the ack of the message: nothing of it was stored.
        assert c.read() == {"type": "ack", "ack_id": "bad", "stored": 0}
        v2 = status_json(daemon)
        mine = [x for x in v2["client_list"] if x.get("process") == "e2e-status-probe"]
        assert len(mine) == 1 and mine[0]["engines"] == ["rq"] and mine[0]["pid"] == os.getpid(), v2["client_list"]
        assert "rq" in v2["engines"], v2["engines"]
        text2 = status(daemon).stdout
    assert v2["refused_by_reason"].get("invalid_event") == 1, v2["refused_by_reason"]
    assert v2["refused"] == v1["refused"] + 1, (v1["refused"], v2["refused"])
    assert v2["received"] >= v1["received"] + 1, (v1["received"], v2["received"])
    assert "invalid_event 1" in text2 and "e2e-status-probe" in text2, text2


def test_status_without_a_daemon_exits_1(daemon_factory, agent, sock_dir):
    d = daemon_factory(agent, start=False)
    missing = sock_dir / "nobody-here.sock"
    r = status(d, "--socket-path", str(missing))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    assert "no z4j-agentd answers" in r.stderr and str(missing) in r.stderr, r.stderr
    r = status(d, "--json", env={"Z4J_SOCKET_PATH": str(missing)})
    assert r.returncode == 1 and "no z4j-agentd answers" in r.stderr, (r.returncode, r.stderr)
    r = status(d, "--no-such-flag")
    assert r.returncode == 64, (r.returncode, r.stderr)


# --------------------------------------------------------------------------- 11


def test_metrics_health_and_ready_with_brain_connected(brain, agent, daemon_factory):
    # Static engines: the sender's `celery` hello cannot trigger a re-handshake mid-test.
    d, base = metrics_daemon(daemon_factory, agent, Z4J_ENGINES="celery")
    d.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")

    code, _, body = http_get(base + "/healthz")
    assert code == 200, body
    h = json.loads(body)
    assert h["status"] == "alive" and h["version"], h

    def ready():
        code, v = readyz(base)
        return code == 200 and v["checks"]["brain"]["connected"] is True, (code, v)

    code, v = wait_for(ready, 30, "/readyz 200 with the brain connected")
    assert v["ready"] is True, v
    assert set(v["checks"]) == {"spool", "socket", "brain"}, v
    assert v["checks"]["spool"]["ok"] is True and v["checks"]["socket"]["ok"] is True, v
    assert v["checks"]["brain"]["required"] is False, v

    m0 = scrape(base)
    for name in ("events_received_total", "events_acked_total", "spool_depth_events", "brain_connected",
                 "brain_ack_latency_seconds_count", "brain_connects_total", "events_stored_total"):
        assert metric(m0, P + name) is not None, f"{P + name} missing: {sorted(n for n, _ in m0)}"
    for reason in ("oldest_evicted", "spool_full", "undeliverable"):
        assert metric(m0, P + "events_dropped_total", reason=reason) == 0, reason
    assert metric(m0, P + "brain_connected") == 1
    assert metric(m0, P + "brain_connection_state", state="connected") == 1

    send_tasks(d, 5, "metrics")
    s = d.wait_stats(lambda s: s["acked"] >= 15 and s["spool_depth"] == 0, 60, "15 events acked")
    m1 = scrape(base)
    assert metric(m1, P + "events_received_total") >= metric(m0, P + "events_received_total") + 15
    assert metric(m1, P + "events_acked_total") >= metric(m0, P + "events_acked_total") + 15
    assert metric(m1, P + "brain_ack_latency_seconds_count") > 0, m1
    assert metric(m1, P + "brain_ack_latency_seconds_sum") >= 0, m1
    assert metric(m1, P + "brain_ack_latency_seconds_bucket", le="+Inf") == \
        metric(m1, P + "brain_ack_latency_seconds_count")
    assert metric(m1, P + "spool_depth_events") == 0
    # Nothing moves between the stats above and this scrape: they agree.
    assert metric(m1, P + "events_received_total") == s["received"], s
    assert metric(m1, P + "events_acked_total") == s["acked"], s
    assert metric(m1, P + "brain_connects_total") == s["connects"], s

    # A refused event shows up under its reason.
    with SockClient(d.socket_path) as c:
        reply = c.request({"type": "event", "engine": "celery", "kind": "task.exploded", "task_id": "m-1",
                           "ack_id": 1})
        assert reply.get("type") == "error" and reply.get("code") == "unknown_kind", reply
    m2 = wait_for(lambda: (lambda m: (metric(m, P + "refused_total", reason="unknown_kind") == 1, m))(scrape(base)),
                  10, "refused_total{reason=unknown_kind} == 1")
    assert metric(m2, P + "events_received_total") == metric(m1, P + "events_received_total") + 1
    assert metric(m2, P + "events_stored_total") == metric(m1, P + "events_stored_total")


def test_metrics_and_status_count_evicted_events_while_brain_is_down(agent, daemon_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    d, base = metrics_daemon(daemon_factory, agent, Z4J_BRAIN_URL=dead, Z4J_BUFFER_MAX_EVENTS="1000",
                             Z4J_SHUTDOWN_GRACE_SECONDS="1")  # nothing to drain to at teardown
    send_tasks(d, 500, "evict", "--batch")  # 1500 events into a 1000-event spool (drop_oldest)
    s = d.stats()
    assert s["received"] == 1500 and s["spool_depth"] == 1000, s

    m = scrape(base)
    assert metric(m, P + "events_dropped_total", reason="oldest_evicted") == 500, \
        {k: v for k, v in m.items() if "dropped" in k[0]}
    assert metric(m, P + "events_received_total") == 1500
    assert metric(m, P + "spool_depth_events") == 1000
    assert metric(m, P + "events_acked_total") == 0
    assert metric(m, P + "brain_connected") == 0

    v = status_json(d)
    assert v["dropped_by_reason"]["oldest_evicted"] == 500, v["dropped_by_reason"]
    assert v["dropped"] == 500 and v["spool_depth"] == 1000, v
    assert v["uplink_state"] != "connected", v

    assert "dropped:  500 (oldest_evicted 500)" in status(d).stdout

    code, r = readyz(base)  # the brain is not required to be ready
    assert code == 200 and r["ready"] is True, r
    assert r["checks"]["brain"]["connected"] is False and r["checks"]["brain"]["required"] is False, r
    assert r["checks"]["brain"]["state"] in ("connecting", "backoff", "handshaking"), r
    # The readiness probe write does not touch the events of a full spool.
    after = d.stats()
    assert (after["spool_depth"], after["stored"], after["dropped"]) == (1000, 1500, 500), after


def test_readyz_503_when_the_socket_does_not_answer(agent, daemon_factory):
    d, base = metrics_daemon(daemon_factory, agent)
    code, v = readyz(base)
    assert code == 200 and v["ready"] is True, v
    os.unlink(d.socket_path)  # applications can no longer reach the daemon
    code, v = readyz(base)
    assert code == 503, (code, v)
    assert v["ready"] is False and v["checks"]["socket"]["ok"] is False, v
    assert str(d.socket_path) in v["checks"]["socket"]["message"], v
    assert v["checks"]["spool"]["ok"] is True, v
    code, _, _ = http_get(base + "/healthz")
    assert code == 200  # alive, just not ready


# --------------------------------------------------------------------------- 12


def test_metrics_addr_not_loopback_is_a_usage_error(agent, daemon_factory):
    d = daemon_factory(agent, start=False, Z4J_METRICS_ADDR="0.0.0.0:9")
    r = run_agentd(d.binary, ["run"], d.env(), cwd=d.workdir, timeout=30)
    assert r.returncode == 64, (r.returncode, r.stderr[-2000:])
    assert "Z4J_METRICS_ADDR" in r.stderr and "Z4J_METRICS_ALLOW_REMOTE" in r.stderr, r.stderr
    assert not d.socket_path.exists(), "a refused configuration must not bind the socket"
