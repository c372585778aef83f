"""Fixtures for the end-to-end tests against a real z4j 1.13.0 brain.

* `brain` (session): a throwaway brain on a free 127.0.0.1 port, own HOME
  under the run directory; tests may stop and start it again (same HOME,
  same port). Stopped at the end of the session, and at exit if pytest dies.
* `agent` (function): a freshly minted agent token (+ per-project hmac secret).
* `daemon_factory` (function): builds `z4j-agentd run` processes with their
  own HOME and spool (`<home>/.z4j/agentd.sqlite`), socket and log file;
  every daemon it made is stopped at teardown. `daemon` is one started daemon.
* `all_daemons` (session): every daemon of the session, for log checks.
* `redis_server` (session): a throwaway `redis-server` on a free 127.0.0.1
  port, no persistence, for the Celery tests; `redis-server` missing fails
  those tests (CI installs it). Stopped at the end of the session and at exit.
* `rabbitmq_server` (session): a throwaway RabbitMQ node (AMQP on a free
  127.0.0.1 port, its own epmd, node name, cookie and data directory), for
  the queue depth tests on AMQP; `rabbitmq-server` missing fails those tests
  (CI installs it). Stopped at the end of the session and at exit.
* `background` (function): starts long-running processes (a Celery worker,
  gunicorn) in their own process groups; every one is stopped at teardown.

Run directory: tests/e2e/.state/runs/<stamp>/ (brain HOME and log, daemon
homes and logs, client stderr); the last few runs are kept for inspection.
The daemon binary: $Z4J_AGENTD_BIN, default target/debug/z4j-agentd.

With $Z4J_TEST_LOG_DIR set (tests/run-all.sh sets it), the session leaves
its logs and every minted agent's credentials there at the end, for
tests/check_secrets.py (see pytest_sessionfinish below).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain as brainmod  # noqa: E402
from harness import (  # noqa: E402
    REPO,
    Background,
    Daemon,
    RabbitMQServer,
    RedisServer,
    reap_marked,
    reap_stale_daemon,
    secret_forms,
)

KEEP_RUNS = 5
# What pytest_sessionfinish needs of the session's fixtures.
_SESSION: dict = {"run_dir": None, "minted_agents": []}
# The run directory's log files: daemons (daemon-N.log, activated.log,
# nobody.log), one-shot CLI runs (agentd-cli.log), the example clients and
# services (*.stderr), Celery workers, gunicorn, redis, and the brain's
# brain.log (z4j 1.13.0 does not log the agent credentials it mints, so its
# log is checked too). Not the brain's HOME (its database and secret.env
# hold credentials by design) nor brain.json (the admin login).
LOG_SUFFIXES = {".log", ".stderr"}


def pytest_configure(config):
    # SIGTERM (CI cancel, timeout) -> KeyboardInterrupt: pytest unwinds and the
    # atexit hooks below stop the brain and every daemon.
    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)


def _proc_start_time(pid: int) -> str:
    """Kernel start time of a process (field 22 of /proc/<pid>/stat), "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(run: Path) -> bool:
    """Is the pytest session that made this run directory still running?

    Several sessions may run at once (different brains, ports, sockets); only
    the leftovers of a session that is gone may be reaped or deleted.
    """
    try:
        pid_s, started = (run / "owner").read_text().split()
        return _proc_start_time(int(pid_s)) == started
    except (OSError, ValueError):
        pass
    # No owner file (yet): the directory name ends with the session's pid.
    try:
        pid = int(run.name.rsplit("-", 1)[1])
        return b"pytest" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False


def _reap_and_prune(root: Path) -> None:
    """Stop what an earlier, killed session left behind; keep the last few runs' files."""
    runs = sorted(p for p in root.glob("*") if p.is_dir())
    dead = [run for run in runs if not _owner_alive(run)]
    for run in dead:
        for meta in run.glob("brain*/brain.json"):  # the session's brain and any a module started
            brainmod.Brain(meta.parent).stop()
        for pidfile in run.glob("daemons/*/daemon.pid"):
            reap_stale_daemon(pidfile)
        reap_marked(run)  # redis-server, Celery workers, gunicorn, postgres (and their children)
        for marker in run.glob("*/tmp_dir"):  # a PostgreSQL cluster's files (harness.PostgresServer)
            try:
                tmp = Path(marker.read_text().strip())
            except OSError:
                continue
            if tmp.name.startswith("z4je2e-pg-"):
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            sock_dir = Path((run / "sock_dir").read_text().strip())
            if sock_dir.name.startswith("z4je2e-"):
                shutil.rmtree(sock_dir, ignore_errors=True)
        except OSError:
            pass
    for old in dead[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def run_dir() -> Path:
    root = brainmod.STATE_ROOT / "runs"
    root.mkdir(parents=True, exist_ok=True)
    _reap_and_prune(root)
    d = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    d.mkdir()
    (d / "owner").write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")
    print(f"\n[e2e] run directory: {d}", file=sys.stderr)
    _SESSION["run_dir"] = d
    return d


@pytest.fixture(scope="session")
def sock_dir(run_dir):
    # Unix socket paths are limited to 107 bytes: keep sockets under a short tmp dir.
    d = Path(tempfile.mkdtemp(prefix="z4je2e-"))
    (run_dir / "sock_dir").write_text(f"{d}\n")  # so a later session can clean up after a killed one
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _venv_for_brain() -> Path:
    # Running under a venv that already has the z4j CLI (normally the
    # harness's own): use it. Otherwise create/check the harness venv.
    here = Path(sys.prefix)
    if (here / "bin" / "z4j").exists():
        return here
    return brainmod.ensure_venv()


@pytest.fixture(scope="session")
def brain(run_dir):
    b = brainmod.Brain(run_dir / "brain", venv=_venv_for_brain())
    atexit.register(b.stop)  # in case pytest itself is killed by an exception path
    took = b.start()
    print(f"[e2e] brain on {b.url} healthy after {took:.1f}s", file=sys.stderr)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(autouse=True)
def _brain_running(request):
    """A test that stops the brain and fails midway must not break the next one."""
    if "brain" in request.fixturenames:
        b = request.getfixturevalue("brain")
        if not b.running():
            b.start()
    yield


@pytest.fixture(scope="session")
def daemon_bin() -> Path:
    p = Path(os.environ.get("Z4J_AGENTD_BIN") or (REPO / "target" / "debug" / "z4j-agentd"))
    if not p.is_absolute():
        p = REPO / p
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"daemon binary {p} missing: run `cargo build --bin z4j-agentd` or set Z4J_AGENTD_BIN")
    return p


@pytest.fixture(scope="session")
def all_daemons():
    return []


@pytest.fixture(scope="session")
def minted_agents():
    """Every agent minted this session (token + secret), for the secrets test."""
    return _SESSION["minted_agents"]


@pytest.fixture
def agent(brain, request, minted_agents):
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    a = brain.mint_agent(f"e2e-{slug}-{os.urandom(3).hex()}")
    minted_agents.append(a)
    return a


@pytest.fixture
def daemon_factory(brain, daemon_bin, run_dir, sock_dir, request, all_daemons):
    made = []
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]

    def make(agent: dict, start: bool = True, **extra_env) -> Daemon:
        n = len(made) + 1
        d = Daemon(
            daemon_bin,
            workdir=run_dir / "daemons" / f"{test}-{n}",
            socket_path=sock_dir / f"{len(all_daemons) + 1}.sock",
            brain_url=brain.url,
            agent=agent,
            extra_env=extra_env,
        )
        made.append(d)
        all_daemons.append(d)
        if start:
            d.start()
        return d

    atexit.register(lambda: [d.kill() for d in made])
    yield make
    for d in made:
        d.stop()


@pytest.fixture
def daemon(daemon_factory, agent) -> Daemon:
    return daemon_factory(agent)


@pytest.fixture(scope="session")
def agent_daemon(daemon_bin, run_dir, sock_dir, all_daemons, minted_agents):
    """`make(brain, name, project)` -> (agent, Daemon): a fresh agent token of `brain` (in
    its project `project`, created when new; its secrets searched for in every log) and a
    daemon for it (not started, working in `daemons/<name>`), for a module that keeps one
    daemon across its tests; stopped with every daemon at the session's end."""
    def make(b, name: str, project: str = "default"):
        agent = b.mint_agent(f"e2e-{name}-{os.urandom(3).hex()}", project=project)
        minted_agents.append(agent)
        daemon = Daemon(daemon_bin, workdir=run_dir / "daemons" / name, brain_url=b.url, agent=agent,
                        socket_path=sock_dir / f"{len(all_daemons) + 1}.sock")
        all_daemons.append(daemon)
        return agent, daemon

    return make


@pytest.fixture(scope="session")
def module_daemon(brain, agent_daemon):
    """`agent_daemon` on the session's brain: `make(name, project)` -> (agent, Daemon)."""
    return lambda name, project="default": agent_daemon(brain, name, project)


@pytest.fixture(scope="session")
def redis_server(run_dir):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: the Celery tests need a real Redis broker "
                    "(Debian/Ubuntu: apt-get install redis-server; .ci/run installs it)")
    r = RedisServer(binary, run_dir / "redis", brainmod.free_port(), run_dir)
    atexit.register(r.stop)
    try:
        r.wait_ready()
    except AssertionError:
        r.stop()
        raise
    print(f"[e2e] redis-server on 127.0.0.1:{r.port}", file=sys.stderr)
    try:
        yield r
    finally:
        r.stop()


def _rabbitmq_server_binary():
    found = shutil.which("rabbitmq-server")
    if found is None and os.access("/usr/sbin/rabbitmq-server", os.X_OK):
        found = "/usr/sbin/rabbitmq-server"  # not on a non-root PATH
    return found


@pytest.fixture(scope="session")
def rabbitmq_server(run_dir):
    binary = _rabbitmq_server_binary()
    if binary is None:
        pytest.fail("rabbitmq-server is not installed: the queue depth tests on AMQP need a real RabbitMQ "
                    "broker (Debian/Ubuntu: apt-get install rabbitmq-server; .ci/run installs it)")
    ports = set()
    while len(ports) < 3:  # AMQP, epmd, Erlang distribution
        ports.add(brainmod.free_port())
    port, epmd_port, dist_port = sorted(ports)
    r = RabbitMQServer(binary, run_dir / "rabbitmq", port, epmd_port, dist_port, run_dir)
    atexit.register(r.stop)
    try:
        r.wait_ready()
    except AssertionError:
        r.stop()
        raise
    print(f"[e2e] rabbitmq-server on 127.0.0.1:{r.port}", file=sys.stderr)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def background(run_dir):
    """start(argv, workdir, name, env, cwd=None, stop_timeout=10.0) -> Background; all stopped at teardown."""
    started = []

    def start(argv, workdir, name, env, cwd=None, stop_timeout=10.0):
        proc = Background(argv, workdir, name, env, run_dir=run_dir, cwd=cwd)
        proc.stop_timeout = stop_timeout
        started.append(proc)
        return proc

    atexit.register(lambda: [p.stop(timeout=0) for p in started])
    yield start
    for proc in reversed(started):
        proc.stop(timeout=proc.stop_timeout)


def pytest_sessionfinish(session, exitstatus):
    """With $Z4J_TEST_LOG_DIR set: copy the run directory's logs to
    `$Z4J_TEST_LOG_DIR/e2e/<run>/` and write every minted agent's
    credentials, in every form a log could show them, to
    `$Z4J_TEST_LOG_DIR/e2e.secrets`, for tests/check_secrets.py.

    Runs after every fixture's teardown: the brain and the daemons have
    stopped and their logs are complete.
    """
    out, run = os.environ.get("Z4J_TEST_LOG_DIR"), _SESSION["run_dir"]
    if not out or run is None:
        return
    dest = Path(out) / "e2e" / run.name
    for p in sorted(run.rglob("*")):
        if p.suffix in LOG_SUFFIXES and p.is_file():
            target = dest / p.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
    with open(Path(out) / "e2e.secrets", "a") as f:
        for a in _SESSION["minted_agents"]:
            for what, value in secret_forms(a):
                f.write(f"agent {a['name']}: {what}\t{value}\n")
