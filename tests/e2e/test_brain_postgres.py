"""The smoke set against a z4j 1.13.0 brain on PostgreSQL.

The rest of the suite runs the brain on SQLite (what `z4j serve` picks on its
own); production brains run on PostgreSQL, with another driver (asyncpg),
another agent registry (LISTEN/NOTIFY) and no secrets minted for them. This
module starts a throwaway PostgreSQL cluster (Debian's `postgresql`, see
`harness.PostgresServer`), a brain of its own on it (z4j 1.13.0 + asyncpg in
the venv `brain.postgres_venv()`, `Z4J_DATABASE_URL=postgresql+asyncpg://...`
and the secrets set in its environment), and one daemon against that brain,
and checks: task lifecycles land in the right states, a command goes round
trip, `doctor` passes, and both ends see each other's version.

Everything about the brain is read through its REST API (there is no SQLite
file to query).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import sys
import time

import pytest

import brain as brainmod
from control import LocalClient, agent_row, issue_cancel, wait_brain_knows, wait_command_done
from harness import (
    running_brain,
    SEND_JSONL,
    SEND_MSGPACK,
    Client,
    PostgresServer,
    postgres_bindir,
    run_agentd,
    run_clients,
    verify_tasks,
    wait_for,
    wait_tasks_complete,
)

ENGINE = "celery"
WORKER = socket.gethostname()


@pytest.fixture(scope="module")
def postgres(run_dir):
    bindir = postgres_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: the brain-on-PostgreSQL tests need its server programs "
                    "(Debian/Ubuntu: apt-get install postgresql; .ci/run installs it)")
    t0 = time.monotonic()
    server = PostgresServer(bindir, run_dir / "postgres", brainmod.free_port(), run_dir)
    atexit.register(server.stop)
    try:
        server.wait_ready()
    except AssertionError:
        server.stop()
        raise
    print(f"[e2e] PostgreSQL ({bindir}) on 127.0.0.1:{server.port} ready after {time.monotonic() - t0:.1f}s "
          f"(initdb {server.initdb_seconds:.1f}s)", file=sys.stderr)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_brain(postgres, run_dir):
    """A brain of its own on `postgres`. `z4j serve` mints no secrets for a PostgreSQL
    brain and gives it none of the dev defaults it gives a SQLite one, so both come
    from here: dev posture (plain http on loopback, no TLS to the database)."""
    port = brainmod.free_port()
    env = {
        "Z4J_DATABASE_URL": postgres.create_database("z4j"),
        "Z4J_ENVIRONMENT": "dev",
        "Z4J_BIND_HOST": "127.0.0.1",
        "Z4J_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "Z4J_ALLOWED_HOSTS": json.dumps(["127.0.0.1", "localhost"]),
        "Z4J_SECRET": secrets.token_urlsafe(48),
        "Z4J_SESSION_SECRET": secrets.token_urlsafe(48),
        "Z4J_AUDIT_CHAIN_SECRET": secrets.token_urlsafe(48),
        "Z4J_METRICS_AUTH_TOKEN": secrets.token_urlsafe(32),
    }
    b = brainmod.Brain(run_dir / "brain-postgres", port=port, venv=brainmod.postgres_venv(), env=env)
    with running_brain(b, "brain on PostgreSQL"):
        yield b


@pytest.fixture(scope="module")
def pg_pair(pg_brain, agent_daemon):
    return agent_daemon(pg_brain, "brain-postgres")


@pytest.fixture(scope="module")
def pg_agent(pg_pair):
    return pg_pair[0]


@pytest.fixture(scope="module")
def pg_daemon(pg_pair):
    d = pg_pair[1]
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_the_brain_runs_on_postgresql(pg_brain, postgres):
    """The brain's tables are in the cluster, not in a SQLite file of its HOME."""
    tables = postgres.psql("\\c z4j\nSELECT tablename FROM pg_tables WHERE tableowner = 'z4j';\n").split()
    assert {"agents", "events", "tasks", "commands"} <= set(tables), tables
    assert not pg_brain.db_path.exists(), f"the brain made a SQLite database at {pg_brain.db_path}"


def test_task_lifecycles_reach_the_brain_in_their_states(pg_brain, pg_agent, pg_daemon):
    pg_daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    tag = os.urandom(3).hex()
    clients = [
        Client(SEND_JSONL, pg_daemon.socket_path, ["--tasks", 6, "--fail-every", 3, "--prefix", f"pgj-{tag}-"],
               pg_daemon.workdir, "pg-jsonl"),
        Client(SEND_MSGPACK, pg_daemon.socket_path,
               ["--durable", "--batch", "--tasks", 8, "--fail-every", 4, "--prefix", f"pgm-{tag}-"],
               pg_daemon.workdir, "pg-msgpack"),
    ]
    summaries = run_clients(clients, timeout=60)
    ids = [tid for s in summaries for tid in s["tasks"]]
    assert len(ids) == 14 and sum(len(s["failed_tasks"]) for s in summaries) == 4, summaries
    wait_tasks_complete(pg_brain, pg_agent["project_slug"], ENGINE, ids, timeout=60)
    assert verify_tasks(pg_brain, pg_agent["project_slug"], ENGINE, summaries, pg_agent["agent_id"], WORKER) == 14


def test_a_cancel_command_goes_round_trip(pg_brain, pg_agent, pg_daemon):
    pg_daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    before = pg_daemon.stats()["commands"]
    client = LocalClient(pg_daemon.socket_path,
                         answer=lambda cmd: ("success", {"cancelled": cmd["parameters"]["task_id"]}, None))
    try:
        client.hello(process="e2e-pg-worker", engines=[ENGINE], capabilities={ENGINE: ["cancel_task"]})
        wait_brain_knows(pg_brain, pg_agent, {ENGINE: ["cancel_task"]})
        task_id = f"e2e-pg-{os.urandom(4).hex()}"
        cmd = issue_cancel(pg_brain, pg_agent, ENGINE, task_id)
        done = wait_command_done(pg_brain, pg_agent, cmd["id"], 20)
        assert done["status"] == "completed", done
        assert done["result"] == {"cancelled": task_id}, done
        assert [c["id"] for c in client.commands] == [cmd["id"]], client.commands
        got = client.commands[0]
        assert got["action"] == "cancel_task" and got["parameters"] == {"engine": ENGINE, "task_id": task_id}, got
    finally:
        client.close()
    after = pg_daemon.stats()["commands"]
    assert (after["received"] - before["received"], after["succeeded"] - before["succeeded"],
            after["failed"] - before["failed"]) == (1, 1, 0), (before, after)


def test_doctor_passes(pg_brain, pg_agent, pg_daemon):
    r = run_agentd(pg_daemon.binary, ["doctor", "--json"], pg_daemon.env(), cwd=pg_daemon.workdir)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"doctor --json printed no JSON (exit {r.returncode}): "
                             f"stdout={r.stdout!r} stderr={r.stderr!r}") from None
    probes = {p["name"]: p for p in report["probes"]}
    shown = "\n".join(f"  {p['status']:<4} {p['name']:<11} {p['message']}" for p in report["probes"])
    assert r.returncode == 0 and report["ok"] is True, f"exit {r.returncode}\n{shown}"
    assert not [n for n, p in probes.items() if p["status"] == "fail"], shown
    assert probes["websocket"]["status"] == "ok", shown
    assert "token accepted and HMAC secret verified" in probes["websocket"]["message"], shown
    assert probes["longpoll"]["status"] == "ok", shown
    assert "signed upload taken over HTTPS long-poll" in probes["longpoll"]["message"], shown
    assert probes["websocket"]["details"]["agent_id"].replace("-", "") == pg_agent["agent_id"].replace("-", ""), \
        probes["websocket"]["details"]
    assert report["config"]["brain_url"].rstrip("/") == pg_brain.url.rstrip("/"), report["config"]


def test_both_ends_see_each_others_version(pg_brain, pg_agent, pg_daemon):
    stats = pg_daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "uplink connected")
    assert stats["brain_version"] == "1.13.0", stats
    assert stats["contract_line"] == "1.13.0", stats

    def row_current():
        a = agent_row(pg_brain, pg_agent)
        return a.get("state") == "online" and a.get("version_status") == "current", {
            k: a.get(k) for k in ("state", "agent_version", "version_status", "framework_adapter")}

    row = wait_for(row_current, 30, "the brain's agent row to say online and current")
    assert row["agent_version"] == "1.13.0" and row["framework_adapter"] == "z4j-agentd", row
