"""End-to-end: example clients -> z4j-agentd -> a real z4j 1.13.0 brain.

Run from the repository root (tests/e2e/run.sh does all of it):

    tests/e2e/.state/venv/bin/python -m pytest tests/e2e -v

Each test mints its own agent token, so brain-side counts (agents, worker
slots, events) are filtered on an agent_id that only that test used. The
tests run in file order; the secrets and log-format checks come last
because they read every daemon log of the session.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import re
import socket

from harness import (
    SEND_JSONL,
    SEND_MSGPACK,
    Client,
    SockClient,
    brain_db,
    event_rows_by_task,
    hexid,
    log_lines,
    run_clients,
    secret_forms,
    task_events,
    verify_tasks,
    wait_for,
    wait_tasks_complete,
)

ENGINE = "celery"
WORKER = socket.gethostname()


def expected_failed(prefix: str, tasks: int, every: int) -> list:
    return [f"{prefix}{i}" for i in range(1, tasks + 1) if every and i % every == 0]


def check_summary(s: dict, prefix: str, tasks: int, every: int, durable: bool) -> None:
    assert s["tasks"] == [f"{prefix}{i}" for i in range(1, tasks + 1)], s
    assert s["failed_tasks"] == expected_failed(prefix, tasks, every), s
    assert s["sent"] == 3 * tasks, s
    assert s["acked"] == (3 * tasks if durable else 0), s


def assert_exactly_once(brain, agent: dict, summaries: list) -> None:
    """Brain DB: every task of this agent has exactly one row per lifecycle kind, nothing else."""
    rows = event_rows_by_task(brain, agent["agent_id"])
    want = {}
    for s in summaries:
        for tid in s["tasks"]:
            last = "task.failed" if tid in s["failed_tasks"] else "task.succeeded"
            want[tid] = {"task.received": 1, "task.started": 1, last: 1}
    wrong = {tid: rows.get(tid) for tid in want if rows.get(tid) != want[tid]}
    extra = sorted(set(rows) - set(want))
    assert not wrong and not extra, (
        f"brain events table (agent {agent['agent_id']}): {len(wrong)} tasks with missing or "
        f"duplicated rows {dict(list(wrong.items())[:20])}; unexpected task ids {extra[:20]}"
    )


def assert_one_worker_slot(brain, agent: dict) -> dict:
    """Brain DB: the daemon holds exactly one worker slot for its agent (stable worker_id)."""
    workers = brain_db(
        brain,
        "SELECT worker_id, state, pid, framework, role, last_connect_at FROM agent_workers WHERE agent_id = ?",
        (hexid(agent["agent_id"]),),
    )
    assert len(workers) == 1, f"expected exactly one worker slot for agent {agent['name']}, brain has {workers}"
    assert workers[0]["worker_id"], f"worker_id should be set (a stable slot), got {workers}"
    return workers[0]


def assert_clean_brain_log(brain, agent: dict) -> None:
    """No slot replacement (4002) and no refused signed frame for our agent in the brain log."""
    ours = [ln for ln in brain.log_text().splitlines() if agent["agent_id"] in ln]
    bad = [ln for ln in ours if _CODE_4002.search(ln) or "replac" in ln.lower() or "verification failed" in ln]
    assert not bad, "brain log shows slot replacement or refused frames for our agent:\n" + "\n".join(bad[:10])


_CODE_4002 = re.compile(r"(?<![\w/.-])4002(?![\w/.-])")


def close_4002_lines(text: str) -> list:
    """Log lines that mention 4002 as a number (not inside a path, id or name)."""
    return [ln for ln in log_lines(text) if _CODE_4002.search(ln)]


def wait_drained(daemon, min_acked: int, timeout: float = 120.0) -> dict:
    return daemon.wait_stats(
        lambda s: s["spool_depth"] == 0 and s["acked"] >= min_acked and s["uplink_state"] == "connected",
        timeout,
        f"daemon spool to drain (spool_depth 0, acked >= {min_acked}, uplink connected)",
    )


# --------------------------------------------------------------------------- 1


def test_three_clients_both_framings_reach_the_brain(brain, agent, daemon):
    """Three processes (JSON lines, msgpack, msgpack --batch --durable) -> every task right in the brain."""
    tag = os.urandom(3).hex()
    specs = [
        ("jsonl", SEND_JSONL, f"t1j-{tag}-", 5, 2, []),
        ("msgpack", SEND_MSGPACK, f"t1m-{tag}-", 5, 3, []),
        ("msgpack-batch-durable", SEND_MSGPACK, f"t1b-{tag}-", 6, 2, ["--batch", "--durable"]),
    ]
    clients = [
        Client(script, daemon.socket_path,
               ["--tasks", n, "--fail-every", k, "--prefix", prefix, "--engine", ENGINE, *extra],
               daemon.workdir, name)
        for name, script, prefix, n, k, extra in specs
    ]
    summaries = run_clients(clients, timeout=60)

    pids = {s["pid"] for s in summaries}
    assert len(pids) == 3 and os.getpid() not in pids, f"client pids {pids}"
    for s, (name, _script, prefix, n, k, extra) in zip(summaries, specs):
        check_summary(s, prefix, n, k, durable="--durable" in extra)
    total = sum(s["sent"] for s in summaries)
    task_ids = [t for s in summaries for t in s["tasks"]]

    wait_tasks_complete(brain, agent["project_slug"], ENGINE, task_ids, timeout=120)
    stats = wait_drained(daemon, total)
    verify_tasks(brain, agent["project_slug"], ENGINE, summaries, agent["agent_id"], WORKER)
    assert_exactly_once(brain, agent, summaries)
    assert_one_worker_slot(brain, agent)
    assert_clean_brain_log(brain, agent)

    assert stats["received"] == total and stats["stored"] == total, stats
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats

    rc = daemon.stop(timeout=30)
    assert rc == 0, f"daemon exited {rc} on SIGTERM; log tail:\n{daemon.log_tail()}"


# --------------------------------------------------------------------------- 2


def test_one_agent_one_worker_slot_no_slot_replacement(brain, agent, daemon):
    """Many local processes -> the brain sees ONE agent online and ONE worker slot, never a 4002."""
    tag = os.urandom(3).hex()
    clients = [
        Client(SEND_JSONL, daemon.socket_path, ["--tasks", 3, "--prefix", f"t2j-{tag}-"], daemon.workdir, "jsonl"),
        Client(SEND_MSGPACK, daemon.socket_path, ["--tasks", 3, "--prefix", f"t2m-{tag}-"], daemon.workdir, "msgpack"),
        Client(SEND_MSGPACK, daemon.socket_path, ["--tasks", 3, "--durable", "--prefix", f"t2d-{tag}-"],
               daemon.workdir, "msgpack-durable"),
    ]
    summaries = run_clients(clients, timeout=60)
    assert len({s["pid"] for s in summaries}) == 3
    task_ids = [t for s in summaries for t in s["tasks"]]
    wait_tasks_complete(brain, agent["project_slug"], ENGINE, task_ids, timeout=120)
    wait_drained(daemon, len(task_ids) * 3)

    slug = agent["project_slug"]

    def our_agent():
        status, agents = brain.api("GET", f"/api/v1/projects/{slug}/agents")
        assert status == 200, agents
        ours = [a for a in agents if a["id"] == agent["agent_id"]]
        assert len(ours) == 1, f"agent {agent['agent_id']} listed {len(ours)} times"
        return ours[0]["state"] == "online", ours[0]

    a = wait_for(our_agent, 30, f"agent {agent['name']} online")
    assert a["name"] == agent["name"]

    slot = assert_one_worker_slot(brain, agent)
    assert slot["state"] == "online", slot
    assert_clean_brain_log(brain, agent)
    dlog = close_4002_lines(daemon.log_text())
    assert not dlog, "daemon log mentions close code 4002:\n" + "\n".join(dlog[:10])


def test_connected_clients_engines_are_advertised_to_the_brain(brain, agent, daemon):
    """A client's hello registers engines; the brain learns them while the daemon stays connected.

    (Architecture: hello advertises the union of engines registered by local
    clients; when it changes while connected, the daemon re-handshakes, debounced.)
    """
    slug = agent["project_slug"]
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    with SockClient(daemon.socket_path) as held:
        # hello with an ack_id gets an answer, so we know it was processed.
        reply = held.request({"type": "hello", "process": "e2e-held", "pid": os.getpid(), "framework": "bare",
                              "engines": ["rq", ENGINE], "worker_role": "task", "ack_id": "h1"})
        # The reply type to a hello is not fixed by the contract; it must echo the ack_id and not be an error.
        assert reply.get("type") != "error" and reply.get("ack_id") == "h1", reply

        def engines():
            status, agents = brain.api("GET", f"/api/v1/projects/{slug}/agents")
            assert status == 200, agents
            a = next(a for a in agents if a["id"] == agent["agent_id"])
            return {"rq", ENGINE} <= set(a.get("engine_adapters") or []) and a["state"] == "online", a

        wait_for(engines, 60, "the brain's agent row to list engines rq and celery (engine_adapters)")
    assert_one_worker_slot(brain, agent)  # a re-handshake reuses the slot
    dlog = close_4002_lines(daemon.log_text())
    assert not dlog, "daemon log mentions close code 4002:\n" + "\n".join(dlog[:10])


# --------------------------------------------------------------------------- 3


def test_brain_restart_mid_stream_nothing_lost_nothing_twice(brain, agent, daemon):
    """A durable client keeps sending while the brain is stopped and started again."""
    prefix = f"t3-{os.urandom(3).hex()}-"
    n_tasks = 60
    client = Client(
        SEND_MSGPACK, daemon.socket_path,
        ["--durable", "--tasks", n_tasks, "--interval", 0.2, "--fail-every", 7, "--prefix", prefix],
        daemon.workdir, "durable-stream",
    )
    slug = agent["project_slug"]
    daemon_pid = daemon.pid
    try:
        # Mid-stream: the first task is in the brain, the client is still going.
        wait_for(lambda: (len(task_events(brain, slug, ENGINE, f"{prefix}1")) == 3, None), 60,
                 "the first task to reach the brain")
        assert client.proc.poll() is None, "client finished before the brain could be stopped"
        brain.stop()
        # Durable acks keep flowing while the brain is away: the spool grows.
        down = daemon.wait_stats(
            lambda s: s["uplink_state"] != "connected" and s["spool_depth"] >= 15,
            60, "uplink to notice the brain is gone and the spool to grow by >= 15 events",
        )
        assert client.proc.poll() is None, "client finished while the brain was down; stream too short"
        brain.start()
    finally:
        if not brain.running():
            brain.start()
    summary = client.wait(timeout=120)
    check_summary(summary, prefix, n_tasks, 7, durable=True)

    wait_tasks_complete(brain, slug, ENGINE, summary["tasks"], timeout=180)
    stats = wait_drained(daemon, summary["sent"], timeout=120)
    verify_tasks(brain, slug, ENGINE, [summary], agent["agent_id"], WORKER)
    assert_exactly_once(brain, agent, [summary])
    assert daemon.alive() and daemon.pid == daemon_pid, "daemon did not survive the brain restart"
    assert_one_worker_slot(brain, agent)  # the reconnect reused its slot
    assert_clean_brain_log(brain, agent)
    assert stats["received"] == summary["sent"] and stats["stored"] == summary["sent"], stats
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats
    print(f"spool while brain down: {down['spool_depth']} events; final stats {json.dumps(stats)}")


# --------------------------------------------------------------------------- 4


def test_sigkill_with_brain_down_then_restart_delivers_acked_events(brain, agent, daemon_factory):
    """Acked events live only in the spool (brain down); SIGKILL; restart on the same spool."""
    tag = os.urandom(3).hex()
    brain.stop()
    try:
        d = daemon_factory(agent)  # readiness must not wait for the brain
        summaries = run_clients([
            Client(SEND_MSGPACK, d.socket_path, ["--durable", "--tasks", 10, "--fail-every", 3,
                                                 "--prefix", f"t4m-{tag}-"], d.workdir, "msgpack-durable"),
            Client(SEND_JSONL, d.socket_path, ["--durable", "--batch", "--tasks", 4, "--fail-every", 2,
                                               "--prefix", f"t4j-{tag}-"], d.workdir, "jsonl-batch-durable"),
        ], timeout=60)
        total = sum(s["sent"] for s in summaries)
        assert all(s["acked"] == s["sent"] for s in summaries), summaries
        before = d.stats()
        assert before["spool_depth"] == total and before["stored"] == total, before
        assert before["acked"] == 0, before

        rc = d.kill()
        assert rc == -9, rc
        d.start()  # same HOME, spool and socket path (the stale socket file is still there)
        after = d.stats()
        assert after["spool_depth"] == total, f"spool after SIGKILL + restart: {after}, expected {total} events"
        brain.start()
    finally:
        if not brain.running():
            brain.start()

    task_ids = [t for s in summaries for t in s["tasks"]]
    wait_tasks_complete(brain, agent["project_slug"], ENGINE, task_ids, timeout=180)
    wait_drained(d, total, timeout=120)
    verify_tasks(brain, agent["project_slug"], ENGINE, summaries, agent["agent_id"], WORKER)
    assert_exactly_once(brain, agent, summaries)
    assert_one_worker_slot(brain, agent)  # the restarted daemon took over its own slot
    assert_clean_brain_log(brain, agent)


def test_sigkill_right_after_acks_with_brain_up(brain, agent, daemon_factory):
    """Kill -9 the moment the durable acks are in (frames may be in flight); restart; exactly once."""
    tag = os.urandom(3).hex()
    d = daemon_factory(agent)
    summaries = run_clients([
        Client(SEND_MSGPACK, d.socket_path, ["--durable", "--batch", "--tasks", 20, "--fail-every", 4,
                                             "--prefix", f"t4b-{tag}-"], d.workdir, "msgpack-batch-durable"),
        Client(SEND_JSONL, d.socket_path, ["--durable", "--tasks", 10, "--fail-every", 5,
                                           "--prefix", f"t4s-{tag}-"], d.workdir, "jsonl-durable"),
    ], timeout=60)
    assert all(s["acked"] == s["sent"] for s in summaries), summaries
    d.kill()
    d.start()
    total = sum(s["sent"] for s in summaries)
    task_ids = [t for s in summaries for t in s["tasks"]]
    wait_tasks_complete(brain, agent["project_slug"], ENGINE, task_ids, timeout=180)
    wait_drained(d, 0, timeout=120)
    verify_tasks(brain, agent["project_slug"], ENGINE, summaries, agent["agent_id"], WORKER)
    assert_exactly_once(brain, agent, summaries)
    assert_one_worker_slot(brain, agent)  # the restarted daemon took over its own slot
    assert_clean_brain_log(brain, agent)
    assert total == 90


# --------------------------------------------------------------------------- 5


def test_daemon_logs_never_contain_secrets(brain, agent, daemon, all_daemons, minted_agents):
    """Every daemon log of the session: no token, no hmac secret (in any encoding)."""
    s = Client(SEND_MSGPACK, daemon.socket_path, ["--durable", "--tasks", 2, "--prefix", f"t5-{os.urandom(3).hex()}-"],
               daemon.workdir, "durable").wait(60)
    wait_tasks_complete(brain, agent["project_slug"], ENGINE, s["tasks"], timeout=60)
    daemon.stop()

    logs = [(p, p.read_text(errors="replace")) for d in all_daemons for p in d.logs if p.exists()]
    assert logs and any(text.strip() for _, text in logs), "no daemon logs captured"
    leaks = []
    for a in minted_agents:
        for what, value in secret_forms(a):
            for path, text in logs:
                if value and value in text:
                    leaks.append(f"{what} of agent {a['name']} in {path}")
    assert not leaks, "secrets in daemon logs:\n" + "\n".join(leaks)


def test_daemon_logs_are_json_lines(daemon, all_daemons):
    """Z4J_LOG_FORMAT=json: every line a daemon wrote is one JSON object (no stray panics)."""
    sock_ping = daemon.stats()
    assert sock_ping["type"] == "stats"
    daemon.stop()
    bad = []
    n = 0
    for d in all_daemons:
        for p in d.logs:
            for ln in log_lines(p.read_text(errors="replace")) if p.exists() else []:
                n += 1
                try:
                    assert isinstance(json.loads(ln), dict)
                except (ValueError, AssertionError):
                    bad.append(f"{p.name} ({d.workdir.name}): {ln[:200]}")
    assert n > 0, "no daemon log lines captured"
    assert not bad, f"{len(bad)} non-JSON log lines:\n" + "\n".join(bad[:20])


def test_out_of_window_times_are_stored_once_however_often_the_spool_is_delivered(brain, agent, daemon_factory):
    """Events stamped where the brain would put its own clock instead (more
    than 60 s ahead, more than 400 days back) reach the brain three times,
    from three copies of one spool: each is stored once, at the time the
    daemon received it, with the client's time in `data`."""
    import datetime as dt
    import shutil

    from brain import free_port

    tag = os.urandom(3).hex()
    now = dt.datetime.now(dt.timezone.utc)
    stamps = {
        "ahead-2min": (now + dt.timedelta(seconds=120)).isoformat(),
        "ahead-1day": (now + dt.timedelta(days=1)).isoformat(),
        "year-2024": "2024-01-01T00:00:00+00:00",
        "year-1": "0001-01-01T00:00:00+00:00",
        "year-9999": "9999-12-31T00:00:00+00:00",
        "in-window": (now - dt.timedelta(seconds=5)).isoformat(),
    }
    events = [
        {"engine": ENGINE, "kind": "task.received", "task_id": f"oow-{tag}-{name}",
         "occurred_at": stamp, "data": {"task_name": "proj.clock"}}
        for name, stamp in stamps.items()
    ]
    # Stored while no brain answers: the events wait in the spool.
    a = daemon_factory(agent, Z4J_BRAIN_URL=f"http://127.0.0.1:{free_port()}")
    with SockClient(a.socket_path) as c:
        reply = c.request({"type": "events", "events": events, "ack_id": 1})
    assert reply.get("type") == "ack" and reply.get("stored") == len(events), reply
    assert a.stop() == 0
    copies = []
    for n in range(3):
        d = daemon_factory(agent, start=False)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(a.buffer_path) + suffix)
            if src.exists():
                shutil.copy2(src, str(d.buffer_path) + suffix)
        copies.append(d)
    received_rows = None
    for d in copies:
        d.start()
        wait_drained(d, len(events), timeout=60)
        assert d.stop() == 0
        rows = brain_db(
            brain,
            "SELECT task_id, occurred_at, payload FROM events WHERE agent_id = ? AND task_id LIKE ?",
            (hexid(agent["agent_id"]), f"oow-{tag}-%"),
        )
        by_task = {}
        for r in rows:
            by_task.setdefault(r["task_id"], []).append(r)
        dup = {t: len(v) for t, v in by_task.items() if len(v) != 1}
        assert not dup and len(by_task) == len(events), (
            f"one row per event after each delivery: {dup or sorted(by_task)}")
        if received_rows is None:
            received_rows = rows
    for r in received_rows:
        name = r["task_id"].split(f"oow-{tag}-", 1)[1]
        data = json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
        if name == "in-window":
            assert "occurred_at_original" not in data, r
        else:
            assert data.get("occurred_at_original", "")[:10] == stamps[name][:10], r


def test_events_the_brain_would_drop_are_refused_and_those_it_drops_are_counted(brain, agent, daemon):
    """Events whose `data` carries the brain's external schedule keys on a
    task event are refused at ingest (the brain would ack and drop them);
    an event the brain still does not store on its first delivery (here:
    the same task, kind and second as another) is counted (`brain_rejected`)
    with a warning, not reported as delivered."""
    tag = os.urandom(3).hex()
    import datetime as dt

    at = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=10)).replace(microsecond=250000).isoformat()
    ok = {"engine": ENGINE, "kind": "task.received", "task_id": f"bd-{tag}-ok", "data": {"task_name": "proj.ok"}}
    bad = [
        {"engine": ENGINE, "kind": "task.received", "task_id": f"bd-{tag}-p", "data": {"external_projection": "x"}},
        {"engine": ENGINE, "kind": "task.received", "task_id": f"bd-{tag}-f", "data": {"external_snapshot_frame": {}}},
        {"engine": ENGINE, "kind": "task.succeeded", "task_id": f"bd-{tag}-b",
         "data": {"external_projection": {}, "external_snapshot_frame": {}}},
    ]
    with SockClient(daemon.socket_path) as c:
        c.sock.sendall((json.dumps({"type": "events", "events": [ok] + bad, "ack_id": 1}) + "\n").encode())
        replies = [c.read() for _ in range(4)]
    errors = [r for r in replies if r.get("type") == "error"]
    acks = [r for r in replies if r.get("type") == "ack"]
    assert len(errors) == 3 and all("external schedule protocol" in e["message"] for e in errors), replies
    assert acks and acks[0]["stored"] == 1, replies

    # Two different events for one task, kind and second: the brain keeps one.
    twins = [
        {"engine": ENGINE, "kind": "task.started", "task_id": f"bd-{tag}-twin", "occurred_at": at,
         "data": {"task_name": "proj.twin", "n": n}}
        for n in (1, 2)
    ]
    with SockClient(daemon.socket_path) as c:
        reply = c.request({"type": "events", "events": twins, "ack_id": 2})
    assert reply.get("stored") == 2, reply
    s = daemon.wait_stats(lambda s: s["spool_depth"] == 0 and s["acked"] >= 3, 60, "the spool drained")
    assert s["brain_rejected"] == 1, s
    assert s["dropped"] == 0 and s["brain_duplicates"] == 0, s
    rows = event_rows_by_task(brain, agent["agent_id"])
    assert rows.get(f"bd-{tag}-ok") == {"task.received": 1}, rows
    assert rows.get(f"bd-{tag}-twin") == {"task.started": 1}, rows
    assert not any(t.startswith(f"bd-{tag}-") and t[len(f"bd-{tag}-"):] in ("p", "f", "b") for t in rows), rows
    warned = [ln for ln in daemon.log_text().splitlines() if "did not store some of its events" in ln]
    assert len(warned) == 1, warned
