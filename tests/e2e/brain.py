#!/usr/bin/env python3
"""A throwaway, real z4j 1.13.0 brain for the end-to-end tests.

Stdlib only: it runs under a bare `python3` (to create the test venv) and is
imported by `conftest.py` under the venv's interpreter.

Layout of a brain state directory (default `tests/e2e/.state/brain`):

    home/            HOME of the brain; SQLite at home/.z4j/z4j.db, secrets
                     persisted by `z4j serve` on first boot
    brain.json       port, URL and the bootstrap admin's credentials, so a
                     stop + start brings back the SAME brain (same HOME, same
                     port, same secrets: minted tokens stay valid)
    brain.pid        pid of the running `z4j serve` (its own process group)
    brain.log        stdout + stderr of every start, appended
    agent.env        (CLI `start`/`mint`) KEY=value lines for one agent

The brain runs under `env -i` with only PATH, HOME, LANG and the bootstrap
admin variables, so a caller's Z4J_* environment cannot leak into it, and
binds 127.0.0.1 only (dev posture).

The test venv (default `tests/e2e/.state/venv`, override with Z4J_E2E_VENV)
is created on first use with `pip install z4j==1.13.0 websockets msgpack
pytest celery[redis] redis gunicorn flask` plus the repository's Python client
as an editable install (`pip install -e clients/python[msgpack,celery]`), and
reused afterwards (celery for `examples/celery_commands.py` and the real
Celery worker of `test_celery.py`, gunicorn and flask for its web app). A venv
made before one of these was added, whose `z4j_agentd` is not this
repository's `clients/python`, or made before `clients/python/pyproject.toml`
last changed, is topped up on the next use.

CLI:
    brain.py venv                               create/check the venv, print its path
    brain.py start   [--state DIR] [--port P]   start (first boot or warm restart) and
                                                print agent env lines (minted on first boot)
    brain.py stop    [--state DIR]
    brain.py restart [--state DIR]
    brain.py mint    [--state DIR] [--name N] [--api-key]
    brain.py status  [--state DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_bootstrap as bb  # noqa: E402

HERE = Path(__file__).resolve().parent
STATE_ROOT = Path(os.environ.get("Z4J_E2E_STATE_ROOT", str(HERE / ".state")))
Z4J_VERSION = "1.13.0"
REQUIREMENTS = [f"z4j=={Z4J_VERSION}", "websockets", "msgpack", "pytest", "celery[redis]", "redis", "gunicorn",
                "flask", "django", "django-celery-beat",
                "rq", "dramatiq[redis]", "dramatiq-abort", "apscheduler<4", "huey", "taskiq", "taskiq-redis"]
# Engines whose dependencies clash with the test venv's (arq needs redis < 6;
# rq-scheduler's `crontab` module shadows the one django-celery-beat imports)
# run from a second venv: `alt_venv()`.
ALT_REQUIREMENTS = ["arq", "rq", "rq-scheduler", "msgpack"]
# The repository's Python client (import name z4j_agentd), installed editable
# so the tests always run the working tree's code.
CLIENT_DIR = HERE.parents[1] / "clients" / "python"
CLIENT_EXTRAS = "msgpack,celery"
_CHECK = (
    "import importlib.metadata as m, websockets, msgpack, pytest, celery, redis, gunicorn, flask, sys; "
    f"sys.exit(0 if m.version('z4j') == '{Z4J_VERSION}' else 3)"
)
# Run from / so that only an installed z4j_agentd can be imported.
_CHECK_CLIENT = (
    "import os, sys, z4j_agentd, z4j_agentd.celery, z4j_agentd.flask; "
    "sys.exit(0 if os.path.realpath(z4j_agentd.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 4)"
)


def log(msg: str) -> None:
    print(f"[e2e-brain] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- venv


def venv_path() -> Path:
    return Path(os.environ.get("Z4J_E2E_VENV") or (STATE_ROOT / "venv"))


def _client_project() -> Optional[Path]:
    """clients/python's project file, None when the working tree has no Python client."""
    for name in ("pyproject.toml", "setup.py"):
        if (CLIENT_DIR / name).is_file():
            return CLIENT_DIR / name
    return None


def _requirements() -> tuple:
    """(pip arguments, marker text): the marker changes whenever what to install does."""
    args = list(REQUIREMENTS)
    want = "\n".join(REQUIREMENTS) + "\n"
    project = _client_project()
    if project is not None:
        args += ["-e", f"{CLIENT_DIR}[{CLIENT_EXTRAS}]"]
        digest = hashlib.sha256(project.read_bytes()).hexdigest()[:16]
        want += f"-e {CLIENT_DIR}[{CLIENT_EXTRAS}] {project.name}:{digest}\n"
    return args, want


def _venv_ok(py: Path) -> bool:
    if subprocess.run([str(py), "-c", _CHECK], capture_output=True).returncode != 0:
        return False
    if _client_project() is None:
        return True
    return subprocess.run([str(py), "-c", _CHECK_CLIENT, str(CLIENT_DIR)], capture_output=True,
                          cwd="/").returncode == 0


def ensure_venv(path: Optional[Path] = None) -> Path:
    """Create (or repair) the test venv; return its directory. Idempotent."""
    path = Path(path or venv_path())
    py = path / "bin" / "python"
    marker = path / ".z4j-e2e-requirements"
    args, want = _requirements()
    if py.exists() and marker.exists() and marker.read_text() == want and _venv_ok(py):
        return path
    if not py.exists():
        base = os.environ.get("PYTHON") or _base_python()
        log(f"creating venv {path} with {base}")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([base, "-m", "venv", str(path)], check=True)
    if _client_project() is None:
        log(f"{CLIENT_DIR} has no pyproject.toml: the z4j_agentd client is not installed (test_celery.py fails)")
    log(f"pip install {' '.join(args)} into {path} (about 30 s)")
    t0 = time.monotonic()
    subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args],
        check=True,
    )
    if subprocess.run([str(py), "-c", _CHECK]).returncode != 0:
        raise SystemExit(f"venv {path} does not provide z4j=={Z4J_VERSION} after pip install")
    if not _venv_ok(py):
        raise SystemExit(f"venv {path}: z4j_agentd (with .celery and .flask) does not import from {CLIENT_DIR} "
                         "after pip install -e")
    marker.write_text(want)
    log(f"venv ready in {time.monotonic() - t0:.0f}s")
    return path


def engine_venv(name: str, requirements: List[str], check: str, client: bool = True) -> Path:
    """A venv of its own for an engine whose dependencies cannot live beside
    the others (arq needs redis < 6, taskiq-redis redis >= 8): beside the
    test venv, named `<test venv>-<name>`, with `requirements` and this
    repository's client (editable; not with `client=False`). `check` is
    Python that must run in it (e.g. `import arq`). Idempotent: reinstalls
    only when what to install changes or the check fails."""
    path = Path(f"{venv_path()}-{name}")
    py = path / "bin" / "python"
    marker = path / ".z4j-e2e-requirements"
    args = list(requirements)
    want = "\n".join(requirements) + "\n"
    project = _client_project() if client else None
    if project is not None:
        args += ["-e", str(CLIENT_DIR)]
        digest = hashlib.sha256(project.read_bytes()).hexdigest()[:16]
        want += f"-e {CLIENT_DIR} {project.name}:{digest}\n"
    checks = [check]
    if project is not None:
        checks.append(
            "import os, sys, z4j_agentd; sys.exit(0 if os.path.realpath(z4j_agentd.__file__)"
            f".startswith(os.path.realpath({str(CLIENT_DIR)!r}) + os.sep) else 4)")

    def ok() -> bool:
        return all(subprocess.run([str(py), "-c", c], capture_output=True, cwd="/").returncode == 0
                   for c in checks)

    if py.exists() and marker.exists() and marker.read_text() == want and ok():
        return path
    if not py.exists():
        log(f"creating venv {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([os.environ.get("PYTHON") or _base_python(), "-m", "venv", str(path)], check=True)
    log(f"pip install {' '.join(args)} into {path}")
    t0 = time.monotonic()
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)
    if not ok():
        raise SystemExit(f"venv {path}: {check!r} fails, or z4j_agentd is not the one in {CLIENT_DIR}, "
                         "after pip install")
    marker.write_text(want)
    log(f"venv {path} ready in {time.monotonic() - t0:.0f}s")
    return path


def alt_venv() -> Path:
    """The venv for arq and rq-scheduler processes (`ALT_REQUIREMENTS`)."""
    return engine_venv("alt", ALT_REQUIREMENTS, "import arq, rq, rq_scheduler, msgpack")


# The brain on PostgreSQL: z4j with the asyncpg driver (its `postgres` extra
# adds psycopg too, which the brain does not need to serve).
POSTGRES_REQUIREMENTS = [f"z4j=={Z4J_VERSION}", "asyncpg>=0.31"]


def postgres_venv() -> Path:
    """The venv of a brain on PostgreSQL (`POSTGRES_REQUIREMENTS`)."""
    return engine_venv(
        "postgres", POSTGRES_REQUIREMENTS,
        f"import importlib.metadata as m, sys, asyncpg, z4j_brain; sys.exit(0 if m.version('z4j') == {Z4J_VERSION!r} else 3)")


# The stock z4j agents from PyPI (each runs on the z4j-bare runtime), for the
# processes that talk protocol v2 themselves: to the brain directly, or to the
# daemon's gateway. No Django here: z4j-flask stands for the web agents.
GATEWAY_REQUIREMENTS = [f"z4j-bare=={Z4J_VERSION}", f"z4j-celery=={Z4J_VERSION}", f"z4j-celerybeat=={Z4J_VERSION}",
                        f"z4j-rq=={Z4J_VERSION}", f"z4j-flask=={Z4J_VERSION}", "celery[redis]", "rq", "flask", "redis"]


def gateway_venv() -> Path:
    """The venv for the stock z4j-celery / z4j-celerybeat / z4j-rq / z4j-flask agents
    (`GATEWAY_REQUIREMENTS`)."""
    return engine_venv(
        "gateway", GATEWAY_REQUIREMENTS,
        "import importlib.metadata as m, sys, celery, rq, flask, redis, z4j_bare, z4j_celery, z4j_celerybeat, "
        "z4j_rq, z4j_flask; "
        f"sys.exit(0 if all(m.version(d) == {Z4J_VERSION!r} "
        "for d in ('z4j-bare', 'z4j-celery', 'z4j-celerybeat', 'z4j-rq', 'z4j-flask')) else 3)")


# The oldest brain the daemon supports (docs/brain-protocol.md), installed as its
# users get a consistent one: z4j 1.9.1 asks for z4j-core >=1.9.1,<2 (its only
# z4j-* dependency), so without the pin pip pairs it with the newest core.
OLDEST_BRAIN_VERSION = "1.9.1"
OLDEST_BRAIN_REQUIREMENTS = [f"z4j=={OLDEST_BRAIN_VERSION}", f"z4j-core=={OLDEST_BRAIN_VERSION}"]


def oldest_brain_venv() -> Path:
    """The venv of the z4j 1.9.1 brain (`OLDEST_BRAIN_REQUIREMENTS`), for `Brain(venv=...)`.
    Only the brain: the tests' clients run from the test venv."""
    return engine_venv(
        f"brain-{OLDEST_BRAIN_VERSION}", OLDEST_BRAIN_REQUIREMENTS,
        "import importlib.metadata as m, sys; "
        f"sys.exit(0 if (m.version('z4j'), m.version('z4j-core')) == ({OLDEST_BRAIN_VERSION!r},) * 2 else 3)",
        client=False)


def _base_python() -> str:
    # Prefer the interpreter a venv was made from, so a venv is never nested
    # inside another venv's site-packages.
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if base and os.path.exists(base) else "python3"


# ---------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- brain


class Brain:
    """One brain state directory; start/stop/restart keep HOME and port."""

    def __init__(self, state: Path, port: Optional[int] = None, venv: Optional[Path] = None,
                 env: Optional[dict] = None) -> None:
        self.state = Path(state).resolve()
        # More environment for `z4j serve` (a database URL and the secrets it needs).
        self.extra_env = dict(env or {})
        self.home = self.state / "home"
        self.log_path = self.state / "brain.log"
        self.pid_path = self.state / "brain.pid"
        self.meta_path = self.state / "brain.json"
        self.venv = Path(venv) if venv else venv_path()
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        if self.meta_path.exists():
            self.meta = json.loads(self.meta_path.read_text())
            if port and port != self.meta["port"]:
                raise SystemExit(f"{self.state} belongs to a brain on port {self.meta['port']}, not {port}")
        else:
            self.meta = {
                "port": port or free_port(),
                "email": "e2e-admin@example.com",
                # policy: >= 12 chars, 3 of lower/upper/digit/symbol
                "password": f"E2e-{secrets.token_hex(12)}-Aa1!",
            }
        self.meta["url"] = f"http://127.0.0.1:{self.meta['port']}"
        self._rest: Optional[bb.Rest] = None
        self._api_key: Optional[str] = None

    # -- properties

    @property
    def url(self) -> str:
        return self.meta["url"]

    @property
    def port(self) -> int:
        return self.meta["port"]

    @property
    def db_path(self) -> Path:
        return self.home / ".z4j" / "z4j.db"

    # -- process control

    def pid(self) -> Optional[int]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_our_brain(pid, self.port) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 120.0) -> float:
        """Start `z4j serve`; return seconds until /api/v1/health answered."""
        if self.running():
            raise RuntimeError(f"brain already running (pid {self.pid()})")
        if bb.health_ok(self.url, timeout=1.0):
            raise RuntimeError(f"something else answers on {self.url}; pick another port")
        z4j = self.venv / "bin" / "z4j"
        if not z4j.exists():
            raise RuntimeError(f"{z4j} missing; run `brain.py venv` first")
        self.state.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        os.chmod(self.state, 0o700)
        os.chmod(self.home, 0o700)
        self.meta_path.write_text(json.dumps(self.meta, indent=1))
        os.chmod(self.meta_path, 0o600)
        env = {
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "Z4J_BOOTSTRAP_ADMIN_EMAIL": self.meta["email"],
            "Z4J_BOOTSTRAP_ADMIN_PASSWORD": self.meta["password"],
            **self.extra_env,
        }
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== e2e: start #{self.starts} at {time.strftime('%H:%M:%S')} ===\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                [str(z4j), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                cwd=str(self.home),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals only it
            )
        self.pid_path.write_text(str(self.proc.pid))
        try:
            took = bb.wait_healthy(self.url, timeout, alive=lambda: self.proc.poll() is None)
        except Exception:
            tail = self.log_tail(30)
            self.stop()
            raise RuntimeError(f"brain did not become healthy; log tail:\n{tail}")
        self._rest = None  # the next REST call logs in again
        return took

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return
        _signal_group(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            log(f"brain pid {pid} ignored SIGTERM for {timeout:.0f}s; SIGKILL")
            _signal_group(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self.proc = None
        self.pid_path.unlink(missing_ok=True)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL to the brain's process group (a crash; a frozen brain dies too) and wait
        until it is gone. A later start() brings back the same brain."""
        pid = self.pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return
        _signal_group(pid, signal.SIGKILL)
        if not self._wait_exit(pid, timeout):
            raise RuntimeError(f"brain pid {pid} still there {timeout:.0f}s after SIGKILL")
        self.proc = None
        self.pid_path.unlink(missing_ok=True)

    def restart(self, timeout: float = 120.0) -> float:
        self.stop()
        return self.start(timeout)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- REST

    def rest(self) -> bb.Rest:
        """A cookie session logged in as the bootstrap admin."""
        if self._rest is None:
            rest = bb.Rest(self.url)
            bb.login(rest, self.meta["email"], self.meta["password"])
            self._rest = rest
        return self._rest

    def api_key(self) -> str:
        if self._api_key is None:
            self._api_key = self.meta.get("api_key") or bb.create_api_key(self.rest())
            self.meta["api_key"] = self._api_key
            self.meta_path.write_text(json.dumps(self.meta, indent=1))
        return self._api_key

    def api(self, method: str, path: str, **kw):
        """REST call authenticated with the read/commands API key."""
        return bb.Rest(self.url).call(method, path, bearer=self.api_key(), **kw)

    def mint_agent(self, name: Optional[str] = None, project: str = "default") -> dict:
        proj = bb.ensure_project(self.rest(), project)
        agent = bb.mint_agent(self.rest(), proj["slug"], name)
        agent["project_slug"] = proj["slug"]
        agent["project_id"] = proj["id"]
        return agent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_our_brain(pid: int, port: int) -> bool:
    """Guard against a recycled pid: the process must be `z4j serve --port <port>`."""
    if not _pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in argv and str(port).encode() in argv and any(a.endswith(b"z4j") for a in argv)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


# ---------------------------------------------------------------- CLI


def _env_lines(brain: Brain, agent: dict, api_key: Optional[str]) -> str:
    lines = {
        "Z4J_BRAIN_URL": brain.url,
        "Z4J_TOKEN": agent["token"],
        "Z4J_HMAC_SECRET": agent["hmac_secret"],
        "Z4J_PROJECT_ID": agent["project_slug"],
        "Z4J_PROJECT_SLUG": agent["project_slug"],
        "Z4J_AGENT_ID": agent["agent_id"],
        "Z4J_AGENT_NAME": agent["name"],
        "Z4J_E2E_BRAIN_STATE": str(brain.state),
        "Z4J_E2E_BRAIN_DB": str(brain.db_path),
    }
    if api_key:
        lines["Z4J_API_KEY"] = api_key
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["venv", "start", "stop", "restart", "mint", "status"])
    ap.add_argument("--state", type=Path, default=STATE_ROOT / "brain")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--name", default=None, help="agent name for `mint`")
    ap.add_argument("--api-key", action="store_true", help="`mint`: also create an API key")
    args = ap.parse_args(argv)

    if args.cmd == "venv":
        print(ensure_venv())
        return 0
    brain = Brain(args.state, port=args.port)
    if args.cmd == "status":
        pid = brain.pid()
        print(f"{'running pid ' + str(pid) if pid else 'stopped'} {brain.url} state={brain.state}")
        return 0 if pid else 1
    if args.cmd == "stop":
        brain.stop()
        log("stopped")
        return 0
    if args.cmd in ("start", "restart"):
        ensure_venv(brain.venv)
        first_boot = not brain.db_path.exists()
        took = brain.restart() if args.cmd == "restart" else brain.start()
        log(f"brain pid {brain.pid()} healthy on {brain.url} after {took:.1f}s (state {brain.state})")
        env_file = brain.state / "agent.env"
        if first_boot or not env_file.exists():
            agent = brain.mint_agent(args.name or f"e2e-agent-{secrets.token_hex(3)}")
            env_file.write_text(_env_lines(brain, agent, brain.api_key()))
            os.chmod(env_file, 0o600)
        sys.stdout.write(env_file.read_text())  # same token after a warm restart
        return 0
    if args.cmd == "mint":
        agent = brain.mint_agent(args.name or f"e2e-{secrets.token_hex(4)}")
        sys.stdout.write(_env_lines(brain, agent, brain.api_key() if args.api_key else None))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
