"""Chaos against the real brain: a brain slowed down to a tenth of its speed
while the daemon forwards a backlog, and a seeded random mix of daemon kills,
brain kills, brain freezes and slowed-brain periods while durable clients
send.

The promise under test (RELIABILITY.md, "The brain"): delivery goes on, and
completes, against a brain that acknowledges a frame only after the daemon
sent it again under a new frame id; every event a client got a durable ack
for is stored by the brain exactly once; an event whose ack never came is
stored whole or not at all, never twice; nothing else appears.

The chaos schedule comes from a seed, printed; set Z4J_E2E_SEED to replay a
run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Set

import pytest

from harness import BrainThrottle, brain_db, hexid, signal_brain
from test_end_to_end import assert_one_worker_slot, wait_drained
from test_faults import (
    ENGINE,
    WORKER,
    Producer,
    brain_events,
    check_stored_once,
    check_tasks_stored_once,
    sender,
    start_producers,
    stop_producers,
    wait_acked_growth,
    wait_in_brain,
    wait_session_settled,
)



@pytest.fixture(scope="module")
def brain(run_dir):
    """A brain of this module's own. Freezing a brain in the middle of its
    SQLite work can leave it holding a lock for good ("database is locked"
    on every later write, seen once in about ten runs): the brain's problem,
    not the daemon's, and it must not reach the tests that run after these."""
    import sys
    from pathlib import Path

    import brain as brainmod

    here = Path(sys.prefix)
    venv = here if (here / "bin" / "z4j").exists() else brainmod.ensure_venv()
    b = brainmod.Brain(run_dir / "brain-chaos", venv=venv)
    took = b.start()
    print(f"[e2e] chaos brain on {b.url} healthy after {took:.1f}s")
    try:
        yield b
    finally:
        signal_brain(b, signal.SIGCONT)
        b.stop()


# The brain runs 40 ms out of every 400 ms: about a tenth of its speed (on a
# 2-core machine some 15-25 stored events a second instead of 150-250), in slices
# short enough that it still answers a WebSocket ping well within the ack
# timeout, so the session stays up and only the acks come late.
SLOW_RUN_S = 0.04
SLOW_PERIOD_S = 0.4
FIRST_FREEZE_S = 3.0


def pause(seconds: float) -> None:
    """A step of a fault schedule (how long a fault lasts), never a wait for a result."""
    if seconds > 0:
        time.sleep(seconds)


def open_client(socket_path) -> "sender.Conn":
    """A msgpack connection to the daemon that has said hello (engine celery)."""
    conn = sender.Conn(str(socket_path))
    conn.send({"type": "hello", "process": "test_chaos", "pid": os.getpid(), "framework": "bare",
               "engines": [ENGINE], "worker_role": "task"})
    return conn


def send_backlog(conn, prefix: str, messages: List[int]) -> List[str]:
    """One message per entry of `messages`, holding that many whole task lifecycles
    (3 events each), each message durably acked before the next; returns the task ids."""
    clock = sender.Clock()
    sent: List[str] = []
    for n, size in enumerate(messages, start=1):
        ids = [f"{prefix}{len(sent) + k}" for k in range(size)]
        events = [e for t in ids for e in sender.lifecycle(ENGINE, t, False, clock, WORKER)]
        conn.send({"type": "events", "ack_id": n, "events": events})
        reply = conn.recv(time.monotonic() + 10.0)
        assert reply.get("type") == "ack" and reply.get("ack_id") == n \
            and reply.get("stored") == len(events), f"durable ack for {len(events)} events: {reply}"
        sent += ids
    return sent


def watch_delivery(d, brain, agent: dict, stall: float, timeout: float) -> List[dict]:
    """Poll until the daemon's spool is empty. Fails when no event has left the spool
    (acked by the brain) for `stall` seconds, or after `timeout`. Returns the changes
    seen: [{t, spool_depth, acked, resent, connects, brain_rows}]."""
    t0 = time.monotonic()
    last_progress = t0
    timeline: List[dict] = []
    last: Optional[dict] = None
    while True:
        s = d.stats()
        now = time.monotonic()
        snap = {"t": round(now - t0, 1), "spool_depth": s["spool_depth"], "acked": s["acked"],
                "resent": s["resent"], "connects": s["connects"], "brain_rows": brain_events(brain, agent)}
        if last is None or any(snap[k] != last[k] for k in snap if k != "t"):
            timeline.append(snap)
            if last is not None and snap["acked"] > last["acked"]:
                last_progress = now
            last = snap
        if snap["spool_depth"] == 0:
            return timeline
        assert now - last_progress < stall, (
            f"no event left the spool for {stall:.0f}s (the brain stored {snap['brain_rows']}, the daemon "
            f"re-sent {snap['resent']} events): delivery is stuck; changes seen: {timeline[-12:]}")
        assert now - t0 < timeout, f"the spool did not drain within {timeout:.0f}s; changes seen: {timeline[-12:]}"
        time.sleep(0.5)


# --------------------------------------------------------------------------- 1

SLOW_CONFIGS: Dict[str, Dict[str, str]] = {
    "ack5": {"Z4J_ACK_TIMEOUT_SECONDS": "5"},
    "ack5-batch1500-inflight4": {"Z4J_ACK_TIMEOUT_SECONDS": "5", "Z4J_BATCH_MAX_EVENTS": "1500",
                                 "Z4J_INFLIGHT_FRAMES": "4"},
}


@pytest.mark.parametrize("config", list(SLOW_CONFIGS))
def test_a_slowed_brain_keeps_delivering(brain, agent, daemon_factory, config):
    """A backlog goes out to a brain running a tenth of the time: frames go again before
    the brain acks them; its late acks still count; the spool drains; everything once."""
    # One large message, then small ones: the first frame holds 250 (default) or 300
    # events, and the small messages make frames of their own behind it while the window
    # has room (4 in flight: 300, 15, 15, 15; then the rest).
    messages = [100, 5, 5, 5, 5]
    tasks = sum(messages)
    # Z4J_ENGINES: the client's hello changes nothing, so no re-handshake comes mid-test.
    d = daemon_factory(agent, Z4J_ENGINES=ENGINE, **SLOW_CONFIGS[config])
    conn = open_client(d.socket_path)
    throttle = BrainThrottle(brain, SLOW_RUN_S, SLOW_PERIOD_S)
    try:
        wait_session_settled(d, quiet=1.0)
        # The slow spell begins with the brain frozen for 3 s (less than the ack timeout, so
        # its pings are still answered in time): the first frame cannot be acknowledged
        # within the ack timeout however fast this machine's brain is, so it goes again
        # and the brain's ack for its first copy comes late.
        assert signal_brain(brain, signal.SIGSTOP), "brain not running"
        t0 = time.monotonic()
        task_ids = send_backlog(conn, f"s{os.urandom(3).hex()}-", messages)
        pause(FIRST_FREEZE_S - (time.monotonic() - t0))
        throttle.start()
        # Stuck means no event acked for 60 s: at a tenth of its speed the brain needs
        # up to some 20 s for the first frame, and as long again for its copy.
        timeline = watch_delivery(d, brain, agent, stall=60, timeout=240)
        drained_after = time.monotonic() - t0
        throttle.stop()
        assert throttle.run_fraction() < 0.2, f"the brain was not slowed down: ran {throttle.run_fraction():.0%}"
    finally:
        throttle.stop()  # also resumes a brain frozen before the throttle started
        conn.close()

    stats = d.stats()
    # The scenario happened: frames went again before the slow brain acknowledged them.
    assert stats["resent"] > 0, f"no frame was re-sent; the brain was not slow enough to test anything: {stats}"
    wait_in_brain(brain, agent, set(task_ids), timeout=60)
    counts = check_tasks_stored_once(brain, agent, set(task_ids), set())
    assert brain_events(brain, agent) == 3 * tasks
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats
    assert d.alive() and not d.exit_codes, "the daemon did not survive the slow brain"
    assert "panicked" not in d.log_text()
    print(f"{config}: {3 * tasks} events drained in {drained_after:.1f}s with the brain running "
          f"{throttle.run_fraction():.1%} of the time; resent {stats['resent']}, connects {stats['connects']}, "
          f"{counts}; changes: {timeline}")


# --------------------------------------------------------------------------- 2

CHAOS_ACK_TIMEOUT = 3
CHAOS_STEPS = 14
FAULTS = ("daemon_kill", "brain_kill", "brain_freeze", "brain_slow")


class AheadProducer(Producer):
    """A durable client of which every 5th task is stamped 2 minutes ahead: outside the
    brain's window, where it would put its own clock at each delivery (so a copy sent
    again would be another row) unless the daemon stamps the event in-window at ingest."""

    def __init__(self, socket_path, prefix: str, interval: float) -> None:
        super().__init__(socket_path, prefix, interval)
        self.ahead: Set[str] = set()

    def events(self, i: int, task_id: str, clock) -> list:
        evs = super().events(i, task_id, clock)
        if i % 5 == 0:
            at = datetime.now(timezone.utc) + timedelta(minutes=2)
            for k, e in enumerate(evs):
                e["occurred_at"] = sender.iso(at + timedelta(milliseconds=k))
            with self.lock:
                self.ahead.add(task_id)
        return evs


def check_ahead_stored_in_window(brain, agent: dict, tasks: Set[str]) -> int:
    """The rows of the tasks stamped 2 minutes ahead: at a time within the brain's
    window, with the client's time kept in `occurred_at_original`. Returns the rows."""
    rows = brain_db(brain, "SELECT task_id, kind, occurred_at, payload FROM events WHERE agent_id = ?",
                    (hexid(agent["agent_id"]),))
    ours = [r for r in rows if r["task_id"] in tasks]
    bad = []
    for r in ours:
        data = json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"]
        original = (data or {}).get("occurred_at_original")
        stored = datetime.fromisoformat(str(r["occurred_at"])).replace(tzinfo=timezone.utc)
        if not original or datetime.fromisoformat(original) - stored < timedelta(seconds=90):
            bad.append((r["task_id"], r["kind"], r["occurred_at"], original))
    assert not bad, f"tasks stamped 2 min ahead not stored in the window with their original time: {bad[:5]}"
    return len(ours)


def chaos_plan(rng: random.Random, steps: int) -> List[dict]:
    """Every fault twice, the rest drawn at random, shuffled; each with its own timing."""
    kinds = [k for k in FAULTS for _ in range(2)]
    kinds += [rng.choice(FAULTS) for _ in range(steps - len(kinds))]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        step: Dict[str, object] = {"fault": kind, "calm": round(rng.uniform(0.3, 2.5), 2)}
        if kind == "brain_kill":
            # Half of the time the brain hangs first (frozen), as a supervisor would see it.
            step["frozen_first"] = round(rng.uniform(0.5, 2.0), 2) if rng.random() < 0.5 else 0.0
            step["down"] = round(rng.uniform(0.0, 3.0), 2)
        elif kind in ("brain_freeze", "brain_slow"):
            hold = CHAOS_ACK_TIMEOUT + rng.uniform(1.0, 4.0) if kind == "brain_freeze" else rng.uniform(6.0, 12.0)
            step["hold"] = round(hold, 2)
            # Sometimes the daemon dies in the middle of it too.
            step["daemon_kill_at"] = round(rng.uniform(0.2, 0.8) * hold, 2) if rng.random() < 0.35 else None
        plan.append(step)
    return plan


def restart_daemon(d) -> None:
    d.kill()
    d.start()


def hold_with_daemon_kill(d, hold: float, kill_at: Optional[float]) -> None:
    """Let a brain fault last `hold` seconds, killing and restarting the daemon at `kill_at`."""
    end = time.monotonic() + hold
    if kill_at is not None:
        pause(kill_at)
        restart_daemon(d)
    pause(end - time.monotonic())


def run_fault(step: dict, brain, d) -> None:
    kind = step["fault"]
    if kind == "daemon_kill":
        restart_daemon(d)
    elif kind == "brain_kill":
        if step["frozen_first"]:
            assert signal_brain(brain, signal.SIGSTOP), "brain not running"
            pause(step["frozen_first"])
        brain.kill()
        pause(step["down"])
        brain.start()
    elif kind == "brain_freeze":
        assert signal_brain(brain, signal.SIGSTOP), "brain not running"
        try:
            hold_with_daemon_kill(d, step["hold"], step["daemon_kill_at"])
        finally:
            signal_brain(brain, signal.SIGCONT)
    elif kind == "brain_slow":
        with BrainThrottle(brain, SLOW_RUN_S, SLOW_PERIOD_S):
            hold_with_daemon_kill(d, step["hold"], step["daemon_kill_at"])
    else:
        raise AssertionError(f"unknown fault {kind!r}")


def test_chaos_kills_freezes_and_a_slow_brain_while_clients_send(brain, agent, daemon_factory):
    """A seeded schedule of daemon SIGKILLs, brain SIGKILLs, brain freezes and slow-brain
    periods while durable clients send; then everything settles and the brain holds every
    acked event once, no unacked one twice or in part, nothing else."""
    seed = int(os.environ.get("Z4J_E2E_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    print(f"Z4J_E2E_SEED={seed}")
    plan = chaos_plan(rng, CHAOS_STEPS)
    # Large frames and a wide window: at full speed the brain needs longer than the ack
    # timeout for one frame of a backlog, so late acks happen even between the faults.
    d = daemon_factory(agent, Z4J_ENGINES=ENGINE, Z4J_ACK_TIMEOUT_SECONDS=str(CHAOS_ACK_TIMEOUT),
                       Z4J_BATCH_MAX_EVENTS="1500", Z4J_INFLIGHT_FRAMES="4")
    # About 30 events/s: the brain keeps up at full speed and falls behind while it is
    # slowed, frozen or down, so every fault meets a backlog.
    tag = os.urandom(3).hex()
    producers = start_producers(d.socket_path, f"c{tag}", n=2, interval=0.15)
    ahead_producer = AheadProducer(d.socket_path, f"c{tag}-ahead-", interval=0.5)
    ahead_producer.start()
    producers.append(ahead_producer)
    t0 = time.monotonic()
    done: List[str] = []
    try:
        for i, step in enumerate(plan):
            before = sum(p.acked_count() for p in producers)
            wait_acked_growth(producers, before, 60, f"step {i + 1}: the clients to get a durable ack")
            pause(step["calm"])
            s = d.stats()
            t = time.monotonic()
            run_fault(step, brain, d)
            done.append(f"{i + 1}:{step['fault']}@{t - t0:.0f}s({s['uplink_state']},spool {s['spool_depth']},"
                        f"{time.monotonic() - t:.1f}s)")
    finally:
        # Whatever happened, leave a running, unfrozen brain behind.
        signal_brain(brain, signal.SIGCONT)
        if not brain.running():
            brain.start()
        stop_producers(producers)
    chaos_s = time.monotonic() - t0

    acked: Set[str] = {t for p in producers for t in p.acked}
    wait_in_brain(brain, agent, acked, timeout=240)
    stats = wait_drained(d, 0, timeout=180)
    counts = check_stored_once(brain, agent, producers)
    ahead_acked = ahead_producer.ahead & acked
    ahead_rows = check_ahead_stored_in_window(brain, agent, ahead_producer.ahead)
    assert len(ahead_acked) >= 5 and ahead_rows >= 3 * len(ahead_acked), (len(ahead_acked), ahead_rows)
    settle_s = time.monotonic() - t0 - chaos_s
    errors = [e for p in producers for e in p.errors]
    assert not errors, f"the daemon answered with errors: {errors[:5]}"
    kills = sum(1 for s in plan if s["fault"] == "daemon_kill" or s.get("daemon_kill_at") is not None)
    assert len(d.exit_codes) == kills and all(rc == -signal.SIGKILL for rc in d.exit_codes), d.exit_codes
    assert d.alive(), "the daemon is not running after the chaos"
    assert counts["acked"] >= 200, counts
    assert stats["dropped"] == 0 and stats["refused"] == 0, stats
    assert_one_worker_slot(brain, agent)
    assert "panicked" not in d.log_text()
    faults = {k: sum(1 for s in plan if s["fault"] == k) for k in FAULTS}
    print(f"seed {seed}: {faults}, daemon kills {kills}; chaos {chaos_s:.0f}s, settled in {settle_s:.0f}s; "
          f"{counts}, of them stamped 2 min ahead: {len(ahead_acked)} acked; "
          f"reconnects {sum(p.reconnects for p in producers)}; resent {stats['resent']} (last daemon run); "
          f"steps: {' '.join(done)}")
