"""The brain's Schedules REST API for the tests of one external scheduler
(rq-scheduler, APScheduler): its rows, native capabilities and native
operations, with an `admin:*` API key (schedule writes need it)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import brain_bootstrap as bb
from harness import Daemon, wait_for


def module_agent_daemon(brain, daemon_bin, run_dir, sock_dir, all_daemons, minted_agents, name: str):
    """A fresh agent in a project of its own (the brain keeps one stream per
    scheduler and project) and its daemon, started and connected."""
    project = f"{name}-{uuid.uuid4().hex[:8]}"
    agent = brain.mint_agent(f"e2e-{name}-{os.urandom(3).hex()}", project=project)
    minted_agents.append(agent)
    daemon = Daemon(daemon_bin, workdir=run_dir / "daemons" / name, brain_url=brain.url, agent=agent,
                    socket_path=sock_dir / f"{len(all_daemons) + 1}.sock")
    all_daemons.append(daemon)
    daemon.start()
    daemon.wait_stats(lambda s: s["uplink_state"] == "connected", 60, "the daemon's brain session")
    return agent, daemon


def client_env(daemon, path: Path, **extra) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(daemon.workdir),
           "PYTHONPATH": str(path), "Z4J_SOCKET_PATH": str(daemon.socket_path)}
    env.update(extra)
    return env


class Api:
    def __init__(self, brain, slug: str, owner: str) -> None:
        self.brain, self.slug, self.owner = brain, slug, owner
        self.key = bb.create_api_key(brain.rest(), scopes=["admin:*"])

    def call(self, method: str, path: str, body=None):
        """-> (HTTP status, Location header, decoded body)."""
        url = f"{self.brain.url}/api/v1/projects/{self.slug}/schedules{path}"
        req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None
                                     else (b"" if method == "POST" else None))
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, resp.headers.get("Location"), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location"), exc.read().decode(errors="replace")

    def rows(self) -> dict:
        status, _, body = self.call("GET", "?limit=100")
        assert status == 200, f"GET schedules: HTTP {status} {body}"
        return {s["name"]: s for s in body["items"] if s["scheduler"] == self.owner}

    def wait_rows(self, what: str, pred, timeout: float = 30.0) -> dict:
        def check():
            rows = self.rows()
            return bool(pred(rows)), rows

        return wait_for(check, timeout, what, interval=0.3)

    def capabilities(self) -> list:
        status, _, caps = self.call("GET", "/native-capabilities")
        assert status == 200, f"native-capabilities: HTTP {status} {caps}"
        return sorted(caps.get(self.owner) or [])

    def operation(self, location: str) -> dict:
        op_id = location.rstrip("/").rsplit("/", 1)[-1]
        status, _, op = self.call("GET", f"/native-operations/{op_id}")
        assert status == 200, f"native operation: HTTP {status} {op}"
        return op

    def wait_applied(self, location: str, timeout: float = 30.0) -> dict:
        def check():
            op = self.operation(location)
            assert op["status"] != "UNCONFIRMED", op
            return op["status"] == "APPLIED", op

        return wait_for(check, timeout, f"native operation {location} to be APPLIED", interval=0.3)

    def post(self, path_of, body_of=None):
        """A write as the page makes it, with the row as just read; read again
        and retried when the brain answers that the row changed since (a
        snapshot after a run gives the row a new control token)."""
        for _ in range(5):
            args = (path_of(),) + ((body_of(),) if body_of else ())
            status, location, answer = self.call("POST", *args)
            if status != 409 or "changed since it was displayed" not in str(answer):
                break
        return status, location, answer

    def native(self, operation: str, target=None, *, refused: bool = False, **definition):
        """A native operation on the row named `target` (none for a create):
        APPLIED (returns the operation), or with `refused` UNCONFIRMED
        (returns its error)."""
        def body():
            b = {"request_id": str(uuid.uuid4()), "scheduler": self.owner, "operation": operation,
                 "definition": definition}
            if target is not None:
                row = self.rows()[target]
                b.update(schedule_id=row["id"], observed_control_token=row["control_token"])
            return b

        status, location, answer = self.post(lambda: "/native-operations", body)
        assert status == 202 and location, (operation, status, answer)
        if not refused:
            return self.wait_applied(location)

        def check():
            op = self.operation(location)
            assert op["status"] != "APPLIED", op
            return op["status"] == "UNCONFIRMED", op

        return wait_for(check, 30, f"native operation {location} to be refused", interval=0.3)["error"] or ""

    def trigger(self, name: str) -> dict:
        """Trigger now: the command's receipt, once the operation is APPLIED."""
        status, location, answer = self.post(lambda: f"/{self.rows()[name]['id']}/trigger")
        assert status == 200 and location, (status, answer)
        self.wait_applied(location)
        status, cmd = self.brain.api("GET", f"/api/v1/projects/{self.slug}/commands/{location.rsplit('/', 1)[-1]}")
        assert status == 200 and cmd["status"] == "completed", cmd
        assert cmd["result"]["trigger_result"]["status"] == "success", cmd
        return cmd["result"]["trigger_result"]["result"]

    def toggle(self, name: str, action: str) -> dict:
        """The Schedules page's enable/disable switch."""
        status, location, answer = self.post(lambda: f"/{self.rows()[name]['id']}/{action}")
        assert status == 202 and location, (action, status, answer)
        return self.wait_applied(location)
