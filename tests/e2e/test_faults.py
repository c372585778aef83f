"""Faults against the real brain: the daemon killed at random points while
clients send and the uplink forwards, and the brain frozen past the ack
timeout.

The promise under test (RELIABILITY.md): every event a client got a durable
ack for is stored by the brain exactly once; an event whose ack never came
(the daemon died first) is stored at most once, whole message or nothing;
the daemon recovers by itself.

The kill points are random. The seed is printed; set Z4J_E2E_SEED to replay
a run.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import threading
import time
from typing import Dict, List, Set

from harness import SEND_MSGPACK, event_rows_by_task, hexid, brain_db, wait_for
from test_end_to_end import assert_clean_brain_log, assert_one_worker_slot, wait_drained

ENGINE = "celery"
WORKER = socket.gethostname()
KINDS_OK = {"task.received", "task.started", "task.succeeded"}


def _load_sender():
    spec = importlib.util.spec_from_file_location("send_msgpack", SEND_MSGPACK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sender = _load_sender()


class Producer(threading.Thread):
    """A durable client that never gives up: one task (3 events) per message,
    an ack awaited for each, a new connection whenever the daemon goes away.

    `acked` holds the tasks the daemon confirmed; `unconfirmed` those sent
    (in part or whole) without an ack coming back."""

    def __init__(self, socket_path, prefix: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"producer-{prefix}")
        self.socket_path = str(socket_path)
        self.prefix = prefix
        self.interval = interval
        self.stop = threading.Event()
        self.acked: List[str] = []
        self.unconfirmed: List[str] = []
        self.errors: List[dict] = []
        self.reconnects = 0
        self.lock = threading.Lock()

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def events(self, i: int, task_id: str, clock) -> list:
        """The events of message `i`: one task's lifecycle."""
        return sender.lifecycle(ENGINE, task_id, False, clock, WORKER)

    def _connect(self):
        conn = sender.Conn(self.socket_path)
        conn.send({"type": "hello", "process": "test_faults", "pid": os.getpid(), "framework": "bare",
                   "engines": [ENGINE], "worker_role": "task"})
        return conn

    def run(self) -> None:
        clock = sender.Clock()
        conn = None
        i = 0
        while not self.stop.is_set():
            if conn is None:
                try:
                    conn = self._connect()
                except OSError:
                    time.sleep(0.02)  # the daemon is down or starting
                    continue
            i += 1
            task_id = f"{self.prefix}{i}"
            msg = {"type": "events", "ack_id": i, "events": self.events(i, task_id, clock)}
            try:
                conn.send(msg)
                reply = conn.recv(time.monotonic() + 10.0)
            except (OSError, EOFError, TimeoutError):
                with self.lock:
                    self.unconfirmed.append(task_id)
                    self.reconnects += 1
                conn.close()
                conn = None
                continue
            with self.lock:
                if reply.get("type") == "ack" and reply.get("ack_id") == i and reply.get("stored") == 3:
                    self.acked.append(task_id)
                else:
                    self.errors.append(reply)
                    self.unconfirmed.append(task_id)
            time.sleep(self.interval)
        if conn is not None:
            conn.close()


def start_producers(socket_path, tag: str, n: int, interval: float) -> List[Producer]:
    producers = [Producer(socket_path, f"{tag}-p{k}-", interval) for k in range(n)]
    for p in producers:
        p.start()
    return producers


def stop_producers(producers: List[Producer]) -> None:
    for p in producers:
        p.stop.set()
    for p in producers:
        p.join(30)
        assert not p.is_alive(), f"{p.name} did not stop"


def wait_acked_growth(producers: List[Producer], above: int, timeout: float, what: str) -> int:
    def check():
        n = sum(p.acked_count() for p in producers)
        return n > above, n
    return wait_for(check, timeout, what, interval=0.02)


def check_stored_once(brain, agent: dict, producers: List[Producer]) -> Dict[str, int]:
    """Acked tasks: exactly one row per kind. Unconfirmed: all three once, or none."""
    acked: Set[str] = {t for p in producers for t in p.acked}
    unconfirmed: Set[str] = {t for p in producers for t in p.unconfirmed}
    return check_tasks_stored_once(brain, agent, acked, unconfirmed)


def check_tasks_stored_once(brain, agent: dict, acked: Set[str], unconfirmed: Set[str]) -> Dict[str, int]:
    """The brain's rows for the agent: every acked task once per kind (received, started,
    succeeded), every unconfirmed one all three once or not at all, no other task id."""
    rows = event_rows_by_task(brain, agent["agent_id"])
    want = {k: 1 for k in KINDS_OK}
    wrong_acked = {t: rows.get(t) for t in acked if rows.get(t) != want}
    wrong_unconfirmed = {t: rows[t] for t in unconfirmed if t in rows and rows[t] != want}
    extra = sorted(set(rows) - acked - unconfirmed)
    assert not wrong_acked, (
        f"{len(wrong_acked)} of {len(acked)} acked tasks missing or stored twice in the brain: "
        f"{dict(list(wrong_acked.items())[:20])}"
    )
    assert not wrong_unconfirmed, f"unconfirmed tasks stored partly or twice: {dict(list(wrong_unconfirmed.items())[:20])}"
    assert not extra, f"task ids the producers never sent: {extra[:20]}"
    return {
        "acked": len(acked),
        "unconfirmed": len(unconfirmed),
        "unconfirmed_stored": sum(1 for t in unconfirmed if t in rows),
    }


def wait_in_brain(brain, agent: dict, tasks: Set[str], timeout: float) -> None:
    def check():
        rows = event_rows_by_task(brain, agent["agent_id"])
        missing = [t for t in tasks if len(rows.get(t, {})) < 3]
        return not missing, f"{len(missing)} of {len(tasks)} acked tasks not complete in the brain yet"
    wait_for(check, timeout, "every acked task to reach the brain", interval=0.5)


def wait_session_settled(d, quiet: float = 3.0, timeout: float = 30.0) -> dict:
    """Until one session has stayed up for `quiet` seconds (a client's first
    hello makes the daemon re-handshake to advertise its engines)."""
    seen = {"id": None, "since": time.monotonic()}

    def check():
        s = d.stats()
        sid = s["session_id"] if s["uplink_state"] == "connected" else None
        if sid is None or sid != seen["id"]:
            seen["id"], seen["since"] = sid, time.monotonic()
            return False, s
        return time.monotonic() - seen["since"] >= quiet, s
    return wait_for(check, timeout, f"one brain session to stay up for {quiet:.0f}s", interval=0.25)


def brain_events(brain, agent: dict) -> int:
    return brain_db(brain, "SELECT COUNT(*) AS n FROM events WHERE agent_id = ?", (hexid(agent["agent_id"]),))[0]["n"]


# --------------------------------------------------------------------------- 1


def test_twenty_random_sigkills_while_clients_send_and_the_uplink_forwards(brain, agent, daemon_factory):
    """20 rounds: SIGKILL at a random moment, restart on the same spool; every acked event once in the brain."""
    seed = int(os.environ.get("Z4J_E2E_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    print(f"Z4J_E2E_SEED={seed}")
    rounds = 20
    d = daemon_factory(agent)
    # About 60 events/s: well below what the brain stores on a loaded CI
    # machine, so the kills land while it keeps up, not behind a backlog.
    producers = start_producers(d.socket_path, f"k{os.urandom(3).hex()}", n=2, interval=0.1)
    at_kill = []
    try:
        for r in range(rounds):
            before = sum(p.acked_count() for p in producers)
            # The restarted daemon takes clients again before the kill is picked.
            wait_acked_growth(producers, before, 30, f"round {r + 1}: producers to get a durable ack")
            time.sleep(rng.uniform(0.0, 1.5))
            s = d.stats()
            at_kill.append((s["uplink_state"], s["spool_depth"], brain_events(brain, agent)))
            d.kill()
            d.start()
    finally:
        stop_producers(producers)

    acked = {t for p in producers for t in p.acked}
    wait_in_brain(brain, agent, acked, timeout=240)
    stats = wait_drained(d, 0, timeout=120)
    counts = check_stored_once(brain, agent, producers)
    errors = [e for p in producers for e in p.errors]
    assert not errors, f"the daemon answered with errors: {errors[:5]}"
    assert len(d.exit_codes) == rounds and all(rc == -signal.SIGKILL for rc in d.exit_codes), d.exit_codes
    # The kills landed while the uplink was forwarding, not only between sessions.
    connected = sum(1 for state, _, _ in at_kill if state == "connected")
    forwarded_between = sum(1 for a, b in zip(at_kill, at_kill[1:]) if b[2] > a[2])
    assert connected >= rounds // 2, f"only {connected} of {rounds} kills hit a live session: {at_kill}"
    assert forwarded_between >= rounds // 4, f"the brain stored events between only {forwarded_between} kills: {at_kill}"
    assert counts["acked"] >= 100, counts
    assert_one_worker_slot(brain, agent)
    assert "panicked" not in d.log_text()
    print(f"seed {seed}: {counts}; kills on a live session {connected}/{rounds}; "
          f"reconnects {sum(p.reconnects for p in producers)}; final stats acked={stats['acked']}")


# --------------------------------------------------------------------------- 2


def test_brain_frozen_past_the_ack_timeout_then_resumed(brain, agent, daemon_factory):
    """SIGSTOP the brain for 3 ack timeouts while a durable client sends; SIGCONT; nothing lost, nothing twice."""
    ack_timeout = 2
    d = daemon_factory(agent, Z4J_ACK_TIMEOUT_SECONDS=str(ack_timeout))
    producers = start_producers(d.socket_path, f"f{os.urandom(3).hex()}", n=1, interval=0.05)
    brain_pid = brain.pid()
    assert brain_pid, "brain not running"
    frozen = False
    try:
        wait_for(lambda: (brain_events(brain, agent) >= 30, None), 60, "the first events to reach the brain")
        wait_session_settled(d)
        os.killpg(brain_pid, signal.SIGSTOP)
        frozen = True
        t0 = time.monotonic()
        acked_at_freeze = sum(p.acked_count() for p in producers)
        # The daemon gives up on the session by itself; clients are still acked meanwhile.
        # Heartbeats (every 10 s) carry a ping; no answer within the ack timeout ends the session.
        down = d.wait_stats(lambda s: s["uplink_state"] != "connected" and s["last_error"], 10 + 3 * ack_timeout + 10,
                            "the daemon to end the session with the frozen brain")
        waited = time.monotonic() - t0
        time.sleep(max(0.0, 3 * ack_timeout - waited))
        grown = wait_acked_growth(producers, acked_at_freeze + 20, 30, "durable acks to go on while the brain is frozen")
        os.killpg(brain_pid, signal.SIGCONT)
        frozen = False
    finally:
        if frozen:
            os.killpg(brain_pid, signal.SIGCONT)
    # Keep sending a little after the thaw, then stop.
    wait_acked_growth(producers, grown + 20, 60, "acks after the brain resumed")
    stop_producers(producers)

    acked = {t for p in producers for t in p.acked}
    wait_in_brain(brain, agent, acked, timeout=180)
    stats = wait_drained(d, 0, timeout=120)
    counts = check_stored_once(brain, agent, producers)
    assert counts["unconfirmed"] == 0, f"the daemon never went away, yet acks were missing: {counts}"
    assert d.alive() and not d.exit_codes, "the daemon did not survive the frozen brain"
    assert stats["connects"] >= 2, f"expected a new session after the thaw: {stats}"
    assert "answered nothing" in down["last_error"] or "took no data" in down["last_error"], down
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats
    assert_one_worker_slot(brain, agent)
    assert_clean_brain_log(brain, agent)
    print(f"frozen: session ended after {waited:.1f}s ({down['uplink_state']}, last_error {down['last_error']!r}); "
          f"{counts}; connects {stats['connects']}, resent {stats['resent']}")
