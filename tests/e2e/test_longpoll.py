"""The daemon on HTTPS long-poll (protocol §10) when the path to the brain refuses WebSocket
upgrades, against the real z4j 1.13.0 brain.

Between the daemon and a brain of the module's own sits `upgrade_gate.UpgradeGate`, a proxy that
answers any request carrying `Upgrade:` with HTTP 400 (as an ingress that does not pass upgrades
does) and forwards everything else; it can be switched to pass upgrades at run time. The daemon's
`Z4J_BRAIN_URL` is the proxy's URL.

One daemon (`Z4J_TRANSPORT` left at its default, `auto`) serves the first three tests, in file
order: it falls back to long-poll and delivers task lifecycles sent with the Python client; a
`cancel_task` issued through the brain's REST API reaches a local process and its answer the brain;
then, with events still coming, the proxy passes upgrades and the daemon goes back to the
WebSocket with every event in the brain once. That daemon has `Z4J_WS_RETRY_SECONDS=5` (the
minimum, default 300) for the third test; it also lets the first see the WebSocket refused again
without a second fallback being counted. The fourth test has a daemon of its own with
`Z4J_TRANSPORT=ws`, which must not fall back. A fifth issues a command while the daemon goes back
to the WebSocket: the brain hands pending commands to a long-poll request until it ends, so the
daemon leaves long-poll only once its last poll has returned and what it brought is acknowledged.

The brain's long-poll endpoints carry events, heartbeats and commands, but no `hello`: they
register no worker rows and deliver no external-schedule activation (z4j_brain/api/
agent_longpoll.py), so nothing here expects those. A brain of the module's own keeps the brain's
rate limit (600 agent requests a minute per address, long-poll requests included) to these tests.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

import brain as brainmod
import z4j_agentd
from control import LocalClient, agent_row, issue_cancel, wait_command_done
from harness import event_rows_by_task, get_task, run_agentd, running_brain, wait_for
from upgrade_gate import UpgradeGate

ENGINE = "celery"
TASK_NAME = "app.tasks.add"
QUEUE = "longpoll"
HOST = socket.gethostname()
WS_RETRY_SECONDS = 5
# The retry timer, the probe, the upload in flight settling, the dial and the hello take a few
# seconds; the rest leaves room for a daemon that lets its command poll (held up to 10 s by the
# brain) come back before it leaves long-poll.
BACK_ON_WS_WITHIN = WS_RETRY_SECONDS + 40
FALLBACK_LOGGED = "switched to HTTPS long-poll"
BACK_LOGGED = "back on the WebSocket from long-poll"


@pytest.fixture(scope="module")
def lp_brain(run_dir):
    here = Path(sys.prefix)
    venv = here if (here / "bin" / "z4j").exists() else brainmod.ensure_venv()
    b = brainmod.Brain(run_dir / "brain-longpoll", venv=venv)
    with running_brain(b, "long-poll brain"):
        yield b


@pytest.fixture(scope="module")
def gate(lp_brain):
    with UpgradeGate(lp_brain.port) as g:
        yield g


class LongPoll:
    """What the module's first three tests share: the brain, the proxy, the agent, the daemon and
    the Python client sending through it."""

    def __init__(self, brain, gate, agent, daemon) -> None:
        self.brain, self.gate, self.agent, self.daemon = brain, gate, agent, daemon
        self.slug = agent["project_slug"]
        self.client = z4j_agentd.configure(socket_path=str(daemon.socket_path), process="e2e-longpoll")
        self.emitted: dict = {}  # task_id -> the kinds emitted for it

    def lifecycle(self, fail: bool = False) -> str:
        """One task's three events through `z4j_agentd.emit`; returns its id."""
        tid = str(uuid.uuid4())
        base = {"task_name": TASK_NAME, "queue": QUEUE}
        last = ("task.failed", {**base, "exception": "ValueError", "exception_message": f"boom {tid}",
                                "traceback": f"Traceback (most recent call last):\nValueError: boom {tid}\n",
                                "runtime_ms": 2}) if fail else \
            ("task.succeeded", {**base, "result": {"sum": 3}, "runtime_ms": 2})
        steps = [("task.received", {**base, "args": [1, 2], "kwargs": {}}),
                 ("task.started", {**base, "worker": HOST}), last]
        queued = [z4j_agentd.emit(ENGINE, kind, tid, data) for kind, data in steps]
        assert all(queued), f"emit() dropped events of {tid}: {queued}; client {self.client.stats()}"
        self.emitted[tid] = {kind for kind, _ in steps}
        return tid

    def flush(self) -> None:
        assert self.client.flush(30), f"the Python client did not hand its events over: {self.client.stats()}"

    def states(self, want: dict):
        got = {tid: (get_task(self.brain, self.slug, ENGINE, tid) or {}).get("state") for tid in want}
        return got == want, {t: s for t, s in got.items() if s != want[t]}

    def kinds(self) -> dict:
        return event_rows_by_task(self.brain, self.agent["agent_id"])

    def every_event_once(self, tids) -> None:
        """Each kind emitted for each of `tids` has exactly one row in the brain's events table."""
        def all_in():
            rows = self.kinds()
            missing = {t: sorted(self.emitted[t] - set(rows.get(t, {}))) for t in tids
                       if not self.emitted[t] <= set(rows.get(t, {}))}
            return not missing, missing

        wait_for(all_in, 60, "every emitted event in the brain's database", interval=0.5)
        rows = self.kinds()
        wrong = {t: rows[t] for t in tids if rows[t] != dict.fromkeys(self.emitted[t], 1)}
        assert not wrong, f"{len(wrong)} of {len(tids)} tasks without each of their events exactly once: " \
                          f"{dict(list(wrong.items())[:10])}"

    def close(self) -> None:
        self.client.close(timeout=5)


@pytest.fixture(scope="module")
def lp(lp_brain, gate, agent_daemon):
    agent, daemon = agent_daemon(lp_brain, "longpoll")
    daemon.brain_url = gate.url
    daemon.extra_env["Z4J_WS_RETRY_SECONDS"] = str(WS_RETRY_SECONDS)
    daemon.start()
    shared = LongPoll(lp_brain, gate, agent, daemon)
    try:
        yield shared
    finally:
        shared.close()
        daemon.stop()


def status_text(daemon) -> str:
    r = run_agentd(daemon.binary, ["status"], daemon.env(), cwd=daemon.workdir, timeout=30)
    assert r.returncode == 0, f"status exited {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def logged(daemon, needle: str) -> list:
    return [ln for ln in daemon.log_text().splitlines() if needle in ln]


# --------------------------------------------------------------------------- 1


def test_refused_upgrade_falls_back_to_longpoll_and_delivers(lp):
    d = lp.daemon
    stats = d.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon connected to the brain")
    assert stats["transport"] == "longpoll", stats
    assert stats["transport_setting"] == "auto", stats
    assert "HTTP 400" in (stats["longpoll_reason"] or ""), stats
    assert stats["transport_fallbacks"] == 1, stats
    text = status_text(d)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("transport:")), None)
    assert line and line.startswith("transport: HTTPS long-poll, because the WebSocket upgrade was refused (") \
        and "HTTP 400" in line, f"`z4j-agentd status` has no long-poll transport line:\n{text}"

    tids = [lp.lifecycle(fail=i % 4 == 3) for i in range(12)]
    lp.flush()
    want = {t: "failure" if i % 4 == 3 else "success" for i, t in enumerate(tids)}
    wait_for(lambda: lp.states(want), 60, "the tasks in the brain in their states", interval=0.5)
    lp.every_event_once(tids)
    failed = get_task(lp.brain, lp.slug, ENGINE, tids[3])
    assert "ValueError" in (failed.get("exception") or ""), failed
    assert get_task(lp.brain, lp.slug, ENGINE, tids[0]).get("result") == {"sum": 3}

    def online():
        row = agent_row(lp.brain, lp.agent)
        return row["state"] == "online", {k: row.get(k) for k in ("state", "last_seen_at")}

    wait_for(online, 30, "the brain to show the agent online")

    # The WebSocket is tried again every 5 s and still refused: the daemon stays on long-poll,
    # with the one fallback counted and logged; nothing went through as a WebSocket.
    wait_for(lambda: (lp.gate.counts()["refused"] >= 2, lp.gate.counts()), 3 * WS_RETRY_SECONDS,
             "the daemon to try the WebSocket again")
    stats = d.wait_stats(lambda s: s["spool_depth"] == 0, 30, "the spool to drain")
    assert stats["transport"] == "longpoll" and stats["transport_fallbacks"] == 1, stats
    assert stats["dropped"] == 0 and stats["stored"] == stats["acked"] == 3 * len(tids), stats
    assert lp.gate.counts()["passed"] == 0, lp.gate.counts()
    fell_back = logged(d, FALLBACK_LOGGED)
    assert len(fell_back) == 1, f"the fallback logged {len(fell_back)} times:\n" + "\n".join(fell_back)


# --------------------------------------------------------------------------- 2


def test_command_round_trip_over_longpoll(lp):
    d = lp.daemon
    answered = {}

    def answer(cmd):
        answered[cmd["id"]] = cmd
        task_id = cmd["parameters"]["task_id"]
        return "success", {"task_id": task_id, "revoked": True, "answered_by": "e2e-longpoll-worker"}, None

    worker = LocalClient(d.socket_path, answer=answer)
    try:
        worker.hello(process="e2e-longpoll-worker", engines=[ENGINE], capabilities={ENGINE: ["cancel_task"]})

        def registered():
            mine = [c for c in d.stats()["client_list"] if c.get("process") == "e2e-longpoll-worker"]
            return bool(mine) and mine[0]["capabilities"] == {ENGINE: ["cancel_task"]}, mine

        wait_for(registered, 20, "the local worker registered with the daemon")
        task_id = f"e2e-lp-{os.urandom(4).hex()}"
        cmd = issue_cancel(lp.brain, lp.agent, ENGINE, task_id)
        done = wait_command_done(lp.brain, lp.agent, cmd["id"], 40)
        assert done["status"] == "completed", done
        assert done["result"] == {"task_id": task_id, "revoked": True, "answered_by": "e2e-longpoll-worker"}, done
        assert list(answered) == [cmd["id"]], answered
        got = answered[cmd["id"]]
        assert got["action"] == "cancel_task" and got["parameters"]["task_id"] == task_id, got
        stats = d.stats()
        assert stats["commands"] == {"received": 1, "succeeded": 1, "failed": 0}, stats
        assert stats["transport"] == "longpoll", stats
        assert lp.gate.counts()["passed"] == 0, lp.gate.counts()
    finally:
        worker.close()


# --------------------------------------------------------------------------- 3


def test_back_on_the_websocket_once_upgrades_pass(lp):
    d = lp.daemon
    assert d.stats()["transport"] == "longpoll", d.stats()
    before = len(lp.emitted)
    sent: list = []
    stop = threading.Event()
    errors: list = []

    def produce():
        i = 0
        while not stop.is_set():
            try:
                sent.append(lp.lifecycle(fail=i % 5 == 4))
            except Exception as exc:  # noqa: BLE001  (reported below)
                errors.append(repr(exc))
            i += 1
            stop.wait(0.25)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        acked = d.stats()["acked"]
        d.wait_stats(lambda s: s["acked"] >= acked + 15 and s["transport"] == "longpoll", 30,
                     "events acknowledged over long-poll while the producer runs")
        at_switch = len(sent)
        lp.gate.pass_upgrades()
        stats = d.wait_stats(lambda s: s["transport"] == "websocket" and s["uplink_state"] == "connected",
                             BACK_ON_WS_WITHIN, "the daemon back on the WebSocket")
        on_ws = len(sent)
        acked = stats["acked"]
        d.wait_stats(lambda s: s["acked"] >= acked + 15, 30, "events acknowledged over the WebSocket")
    finally:
        stop.set()
        producer.join(10)
    assert not errors, errors[:5]
    lp.flush()
    assert at_switch >= 5 and len(sent) > on_ws, (at_switch, on_ws, len(sent))

    stats = d.wait_stats(lambda s: s["spool_depth"] == 0 and s["acked"] == s["stored"], 60,
                         "the spool to drain to the brain")
    assert stats["transport"] == "websocket" and stats["longpoll_reason"] is None, stats
    assert stats["transport_fallbacks"] == 1, stats
    assert stats["dropped"] == 0, stats
    assert stats["stored"] == stats["acked"] == stats["received"] == 3 * len(lp.emitted), stats
    assert len(lp.emitted) == before + len(sent)
    lp.every_event_once(sent)
    want = {t: "failure" if i % 5 == 4 else "success" for i, t in enumerate(sent)}
    wait_for(lambda: lp.states(want), 30, "the tasks sent across the switch in their states", interval=0.5)

    counts = lp.gate.counts()
    assert counts["passed"] >= 1, counts
    assert len(logged(d, BACK_LOGGED)) == 1, d.log_tail()
    text = status_text(d)
    assert "transport: WebSocket (on long-poll 1 time(s) since start)" in text, text
    print(f"[longpoll] {at_switch} tasks sent before the proxy passed upgrades, {on_ws - at_switch} until "
          f"the daemon was on the WebSocket, {len(sent) - on_ws} after; gate {counts}; daemon "
          f"{ {k: stats[k] for k in ('received', 'stored', 'forwarded', 'resent', 'acked', 'connects')} }")


# --------------------------------------------------------------------------- 4


def test_transport_ws_does_not_fall_back(lp_brain, agent_daemon):
    with UpgradeGate(lp_brain.port) as gate:
        agent, d = agent_daemon(lp_brain, "longpoll-ws-only")
        d.brain_url = gate.url
        d.extra_env["Z4J_TRANSPORT"] = "ws"
        d.start()
        try:
            wait_for(lambda: (gate.counts()["refused"] >= 2, gate.counts()), 30,
                     "the daemon to dial the WebSocket twice")
            stats = d.wait_stats(lambda s: "HTTP 400" in (s["last_error"] or ""), 10,
                                 "the refused upgrade as the daemon's last error")
            assert stats["transport_setting"] == "ws", stats
            assert stats["transport"] == "websocket", stats
            assert stats["transport_fallbacks"] == 0 and stats["longpoll_reason"] is None, stats
            assert stats["uplink_state"] != "connected" and stats["connects"] == 0, stats
            err = stats["last_error"]
            assert "instead of a WebSocket upgrade" in err and "proxy" in err and "upgrade" in err, err
            assert gate.counts()["requests"] == 0, f"a plain HTTP request went to the brain: {gate.counts()}"
            assert not logged(d, FALLBACK_LOGGED), d.log_tail()
        finally:
            d.stop()


# --------------------------------------------------------------------------- 5


def test_a_command_issued_while_going_back_to_the_websocket_is_delivered(lp_brain, agent_daemon):
    """The proxy passes upgrades again but is slow to carry the WebSocket session (it holds the
    upgrade after the daemon's probe); a cancel_task issued meanwhile must reach the local process
    once the session is up."""
    with UpgradeGate(lp_brain.port) as gate:
        agent, d = agent_daemon(lp_brain, "longpoll-switch-command")
        d.brain_url = gate.url
        d.extra_env["Z4J_WS_RETRY_SECONDS"] = str(WS_RETRY_SECONDS)
        d.start()
        worker = LocalClient(d.socket_path, answer=lambda cmd: ("success", {"answered_by": "e2e-switch"}, None))
        try:
            worker.hello(process="e2e-switch-worker", engines=[ENGINE], capabilities={ENGINE: ["cancel_task"]})
            d.wait_stats(lambda s: s["transport"] == "longpoll" and s["uplink_state"] == "connected", 60,
                         "the daemon on long-poll")
            gate.hold_upgrades(after=gate.counts()["passed"] + 1)  # the probe passes, the session waits
            gate.pass_upgrades()
            wait_for(lambda: (gate.counts()["held"] >= 1, gate.counts()), WS_RETRY_SECONDS + 40,
                     "the daemon to dial its WebSocket session after a successful probe")
            cmd = issue_cancel(lp_brain, agent, ENGINE, f"e2e-switch-{os.urandom(4).hex()}")
            path = f"/api/v1/projects/{agent['project_slug']}/commands/{cmd['id']}"

            def left_pending():
                status, body = lp_brain.api("GET", path)
                return status == 200 and body["status"] != "pending", body.get("status")

            # What the brain does with it while the session is on its way (the abandoned poll
            # claims it within a quarter of a second); seen, not asserted.
            try:
                brain_said = wait_for(left_pending, 3, "the brain to hand the command out")
            except AssertionError:
                brain_said = "pending"
            gate.release()
            d.wait_stats(lambda s: s["transport"] == "websocket" and s["uplink_state"] == "connected", 30,
                         "the daemon on the WebSocket")
            try:
                done = wait_command_done(lp_brain, agent, cmd["id"], 15)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the brain had it {brain_said!r} while the session was held; "
                                     f"the daemon's commands: {d.stats()['commands']}") from None
            assert done["status"] == "completed" and done["result"] == {"answered_by": "e2e-switch"}, done
            assert [c["id"] for c in worker.commands] == [cmd["id"]], worker.commands
        finally:
            gate.release()
            worker.close()
            d.stop()
