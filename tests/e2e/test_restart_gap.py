"""A daemon restart does not empty the agent at the real z4j 1.13.0 brain.

The brain replaces an agent's engines and capabilities with what each
`hello` carries. z4j-agentd remembers the advertisement the brain
acknowledged (beside the spool) and its first `hello` after a start carries
it again, until the processes declare it again or
`Z4J_RESTART_GRACE_SECONDS` pass. The brain's agent row is polled all along
(`GET /api/v1/projects/{slug}/agents`, every 150 ms).
"""

from __future__ import annotations

import json
import sys
import threading
import time

from control import LocalClient, agent_row, issue_cancel, wait_brain_knows, wait_command_done
from harness import wait_for

CAPS = {"celery": ["cancel_task", "retry_task"]}
GRACE_S = 8
POLL_S = 0.15


class RowWatch:
    """Polls the brain's agent row in a thread; keeps (seconds, state, engines, capabilities)."""

    def __init__(self, brain, agent: dict) -> None:
        self.brain, self.agent = brain, agent
        self.samples: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                a = agent_row(self.brain, self.agent)
                self.samples.append((round(time.monotonic() - self._t0, 2), a.get("state"),
                                     list(a.get("engine_adapters") or []), dict(a.get("capabilities") or {})))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                self.errors.append(repr(exc))
            self._stop.wait(POLL_S)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def celery_worker(daemon) -> LocalClient:
    c = LocalClient(daemon.socket_path)
    c.hello(process="e2e-celery-worker", framework="celery", engines=["celery"], capabilities=CAPS)
    return c


def remembered_file(daemon):
    return daemon.buffer_path.with_name(daemon.buffer_path.name + ".advertisement.json")


def wait_remembered(daemon, engines: list) -> dict:
    """Until the file beside the spool holds an acknowledged advertisement with these engines."""

    def check():
        try:
            held = json.loads(remembered_file(daemon).read_text())
        except (OSError, ValueError) as exc:
            return False, repr(exc)
        return held.get("engines") == engines, held

    return wait_for(check, 15, f"the remembered advertisement to list {engines}", interval=0.1)


def lacks_celery(sample) -> bool:
    _, _, engines, caps = sample
    return "celery" not in engines or not set(CAPS["celery"]) <= set(caps.get("celery") or [])


def test_the_agent_row_keeps_its_engines_across_a_daemon_restart(brain, agent, daemon_factory):
    d = daemon_factory(agent, Z4J_RESTART_GRACE_SECONDS=str(GRACE_S))
    worker = celery_worker(d)
    wait_brain_knows(brain, agent, CAPS)
    wait_remembered(d, ["celery"])

    # 1. Restart (SIGTERM) while the worker reconnects 4 s later: the row
    #    never loses celery, online or not.
    watch = RowWatch(brain, agent)
    time.sleep(1.0)
    worker.close()
    assert d.stop() == 0
    d.start()
    restarted = time.monotonic()
    time.sleep(4.0)
    worker = celery_worker(d)
    stats = d.stats()
    assert stats["remembered"] is None, f"the worker declared it all again: {stats['remembered']}"
    # Past the grace and the re-handshake debounce: no reconnect was needed.
    time.sleep(max(0.0, restarted + GRACE_S + 4 - time.monotonic()))
    samples = watch.stop()
    assert not watch.errors, watch.errors[:3]
    assert len(samples) >= 40, f"too few samples of the agent row: {len(samples)}"
    gaps = [s for s in samples if lacks_celery(s)]
    assert not gaps, f"the agent row lost celery during the restart: {gaps[:5]} (of {len(samples)} samples)"
    online = [s for s in samples if s[1] == "online"]
    assert online, "the agent was never online while watched"
    assert d.stats()["connects"] == 1, "the returning worker caused no second session"
    print(f"[restart-gap] {len(samples)} samples of the agent row over {samples[-1][0]:.1f} s, "
          f"{len(online)} online, none without celery", file=sys.stderr)

    # 2. Restart with the worker gone for good: celery stays advertised for
    #    the grace (a command for it is refused at once, saying why), then
    #    the row ends up without it.
    worker.close()
    assert d.stop() == 0
    restarted = time.monotonic()
    d.start()
    stats = d.stats()
    assert stats["remembered"] is not None and stats["remembered"]["engines"] == ["celery"], stats["remembered"]
    wait_brain_knows(brain, agent, CAPS, timeout=GRACE_S)
    cmd = issue_cancel(brain, agent, "celery", "t-restart-gap")
    done = wait_command_done(brain, agent, cmd["id"], timeout=10)
    assert done["status"] == "failed", done
    error = done.get("error") or ""
    assert "has not reconnected yet" in error and '"celery"' in error and '"cancel_task"' in error, error

    def gone():
        a = agent_row(brain, agent)
        return "celery" not in (a.get("engine_adapters") or []) and "celery" not in (a.get("capabilities") or {}), \
            {k: a.get(k) for k in ("state", "engine_adapters", "capabilities")}

    wait_for(gone, GRACE_S + 20, "the agent row to drop celery once the grace is over", interval=0.2)
    took = time.monotonic() - restarted
    print(f"[restart-gap] with the worker gone, celery left the agent row {took:.1f} s after the start "
          f"(grace {GRACE_S} s)", file=sys.stderr)
    assert took >= GRACE_S, f"celery left after {took:.1f} s, before the {GRACE_S} s grace"
    stats = d.stats()
    assert stats["remembered"] is None and stats["advertised_engines"] == [], stats
    wait_remembered(d, [])
