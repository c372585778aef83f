"""z4j_agentd.celery._commands with a fake Celery app: parameter checks,
result shapes, the purge's depth check, the cancel variants, worker
controls for this worker only, reconcile states, and the worker.online /
worker.offline events."""

import signal
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

import z4j_agentd
from z4j_agentd.celery import _commands, _Hooks
from z4j_agentd.celery._commands import BadCommand, CommandFailed

from test_celery import RecordingClient

OWN = "wA@host-1"


class Recording(RecordingClient):
    def serve(self, handlers, *, capabilities=None, workers=(), schedulers=(), runtime_features=()):
        self.served.append((dict(handlers), capabilities, list(workers)))

    def flush(self, timeout=2.0):
        return True


class FakeInspect:
    def __init__(self, control, timeout, destination=None):
        self.control = control
        self.timeout = timeout
        self.destination = destination

    def query_task(self, *ids):
        self.control.calls.append(("query_task", ids, self.timeout))
        return self.control.held

    def stats(self):
        # control.stats: {node: [answer, answer, ...]}, one per call, the last one repeated
        self.control.calls.append(("stats", self.destination))
        out = {}
        for node, seq in self.control.stats.items():
            if self.destination is None or node in self.destination:
                out[node] = seq.pop(0) if len(seq) > 1 else seq[0]
        return out


class FakeControl:
    """Answers remote-control commands as workers would; `replies` maps a
    command to {node: reply} (missing: no worker answers)."""

    def __init__(self):
        self.calls = []
        self.replies = {}
        self.held = {}  # query_task answers: {node: {task_id: [state, info]}}
        self.stats = {}  # inspect stats answers, see FakeInspect.stats
        self.fail = None
        self.fail_unawaited_revoke = None

    def broadcast(self, command, arguments=None, destination=None, reply=False, timeout=1.0, limit=None, **kw):
        self.calls.append(("broadcast", command, arguments, destination, reply, timeout, limit))
        if self.fail:
            raise self.fail
        answers = self.replies.get(command, {})
        return [{node: a} for node, a in answers.items() if destination is None or node in destination]

    def revoke(self, task_id, destination=None, terminate=False, signal=None, reply=False, timeout=1.0, **kw):
        self.calls.append(("revoke", task_id, destination, terminate, signal, reply, timeout))
        if self.fail:
            raise self.fail
        if self.fail_unawaited_revoke and not reply:
            raise self.fail_unawaited_revoke
        if not reply:
            return None
        return [{node: a} for node, a in self.replies.get("revoke", {}).items()
                if destination is None or node in destination]

    def inspect(self, timeout=1.0, destination=None):
        return FakeInspect(self, timeout, destination)


class FakeApp:
    def __init__(self):
        self.control = FakeControl()
        self.sent = []
        self.results = {}
        self.conf = SimpleNamespace(worker_pool_restarts=True)
        self.backend = SimpleNamespace()

    def send_task(self, name, args=None, kwargs=None, **options):
        self.sent.append({"name": name, "args": args, "kwargs": kwargs, **options})
        return SimpleNamespace(id=f"new-{len(self.sent)}")

    def AsyncResult(self, task_id):
        return SimpleNamespace(**{"state": "PENDING", **self.results.get(task_id, {})})


class Req:
    """A worker request (hashable, as Celery's are)."""

    def __init__(self, id, time_start=None, worker_pid=None):
        self.id, self.time_start, self.worker_pid = id, time_start, worker_pid


class FakePool:
    def __init__(self, n):
        self.num_processes = n
        self.pids = [102, 101, 103][:n]

    def _get_info(self):
        return {"max-concurrency": self.num_processes, "processes": list(self.pids)}


@pytest.fixture
def hooks(monkeypatch):
    monkeypatch.delenv(_commands.CANCEL_SIGNAL_ENV, raising=False)
    monkeypatch.setattr(_commands, "_local_requests", lambda: ({}, set(), set()))
    h = _Hooks(FakeApp(), Recording(), serve_commands=True)
    h.hostname = OWN
    h.worker = SimpleNamespace(hostname=OWN, pool=FakePool(2), concurrency=2, pool_cls="prefork")
    return h


def cmd(action, params=None, target=None):
    return {"id": "c-1", "action": action, "parameters": params or {}, "target": target or {}}


def worker_cmd(action, worker=OWN, **params):
    return cmd(action, {"worker_name": worker, "engine": "celery", **params},
               {"type": "worker", "id": worker, "engine": "celery"})


# ---------------------------------------------------------------- served


def test_every_action_is_served_and_declared(hooks):
    hooks.start_serving()
    (handlers, capabilities, workers), = hooks.client.served
    assert {a for _, a in handlers} == {
        "add_consumer", "bulk_retry", "cancel_consumer", "cancel_task", "pool_grow", "pool_shrink",
        "purge_queue", "rate_limit", "reconcile_task", "restart_worker", "retry_task", "submit_task"}
    assert all(e == "celery" for e, _ in handlers)
    assert capabilities == {"celery": ["retry_by_reference_v1"]}
    assert workers == [OWN]


def test_worker_ready_sends_worker_online_once_and_shutdown_worker_offline(hooks, monkeypatch):
    app = hooks.app
    app.amqp = SimpleNamespace(queues=SimpleNamespace(consume_from={"celery": 1, "slow": 1}))

    class Consumer:
        controller = hooks.worker

    hooks.hostname, hooks.worker = None, None
    consumer = Consumer()
    hooks.on_worker_ready(sender=consumer)
    hooks.on_worker_ready(sender=consumer)
    hooks.on_worker_shutdown(sender=consumer.controller)
    kinds = [e["kind"] for e in hooks.client.emitted]
    assert kinds == ["worker.online", "worker.offline"]
    online, offline = (e["data"] for e in hooks.client.emitted)
    assert online["worker"] == OWN and isinstance(online["pid"], int) and online["hostname"]
    assert online["concurrency"] == 2 and online["queues"] == ["celery", "slow"] and online["pool"] == "prefork"
    assert offline == {"worker": OWN, "hostname": online["hostname"], "pid": online["pid"]}
    assert all(e["engine"] == "celery" and e["task_id"] == "" for e in hooks.client.emitted)


def test_a_process_without_a_worker_sends_no_worker_event(hooks):
    hooks.hostname, hooks.worker = None, None
    hooks.serve_commands = False
    hooks.on_worker_ready(sender=None)
    hooks.on_worker_shutdown(sender=None)
    assert hooks.client.emitted == []


# ---------------------------------------------------------------- cancel


def test_cancel_signal_default_keyword_and_environment(monkeypatch):
    monkeypatch.delenv(_commands.CANCEL_SIGNAL_ENV, raising=False)
    monkeypatch.setattr(_commands, "_remapped_sigterm", lambda: None)
    assert _commands.cancel_signal_from() == "SIGTERM"
    assert _commands.cancel_signal_from("kill") == "SIGKILL"
    assert _commands.cancel_signal_from(signal.SIGQUIT) == "SIGQUIT"
    assert _commands.cancel_signal_from(int(signal.SIGHUP)) == "SIGHUP"
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, "9")  # a number in the environment, as the docs allow
    assert _commands.cancel_signal_from() == "SIGKILL"
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, "abrt")
    assert _commands.cancel_signal_from() == "SIGABRT"
    assert _commands.cancel_signal_from("SIGKILL") == "SIGKILL"  # the keyword wins
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, "SIGNOPE")
    with pytest.raises(ValueError, match="Z4J_CELERY_CANCEL_SIGNAL.*SIGNOPE.*SIGTERM, SIGKILL"):
        _commands.cancel_signal_from()
    with pytest.raises(ValueError, match="not a signal"):
        _commands.cancel_signal_from("SIG_DFL")


@pytest.mark.parametrize("value", ["SIGINT", "SIGUSR1", "stop", "SIGCONT", "SIGCHLD", "SIGWINCH",
                                   int(signal.SIGINT), "2"])
def test_a_signal_that_would_not_end_the_task_process_is_refused(monkeypatch, value):
    """Celery's pool processes ignore SIGINT; the others do not end a process."""
    monkeypatch.setattr(_commands, "_remapped_sigterm", lambda: None)
    with pytest.raises(ValueError, match="would not end the process running the task.*SIGTERM, SIGKILL"):
        _commands.cancel_signal_from(value)
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, str(value))
    with pytest.raises(ValueError, match="Z4J_CELERY_CANCEL_SIGNAL.*would not end"):
        _commands.cancel_signal_from()
    # install refuses it too, before the worker serves anything
    with pytest.raises(ValueError, match="would not end"):
        _Hooks(FakeApp(), Recording(), serve_commands=True, cancel_signal=value)


def test_with_remap_sigterm_the_default_is_sigquit_and_sigterm_is_refused(monkeypatch):
    """REMAP_SIGTERM makes the pool processes ignore SIGTERM."""
    monkeypatch.delenv(_commands.CANCEL_SIGNAL_ENV, raising=False)
    monkeypatch.setattr(_commands, "_remapped_sigterm", lambda: "SIGQUIT")
    assert _commands.cancel_signal_from() == "SIGQUIT"
    assert _commands.cancel_signal_from("SIGKILL") == "SIGKILL"
    with pytest.raises(ValueError, match="cancel_signal: SIGTERM would not end.*REMAP_SIGTERM=SIGQUIT.*SIGQUIT or"):
        _commands.cancel_signal_from("TERM")
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, "15")
    with pytest.raises(ValueError, match="Z4J_CELERY_CANCEL_SIGNAL: SIGTERM would not end"):
        _commands.cancel_signal_from()


def running_on(control, node, task_id, pid, pools, main_pid=4000):
    """`node` runs `task_id` in process `pid`; its pool lists `pools` in turn."""
    control.held = {node: {task_id: ["active", {"id": task_id, "worker_pid": pid}]}}
    control.stats[node] = [{"pid": main_pid, "pool": {"implementation": "celery.concurrency.prefork:TaskPool",
                                                       "processes": p}} for p in pools]


def test_cancel_a_running_task_terminates_it_and_waits_for_its_process_to_go(hooks):
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-1", 201, [[201, 202], [201, 202], [203, 202]])
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-1"}, OWN: {"ok": "terminate: tasks unknown"}}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"engine": "celery", "task_id": "t-1"}))
    assert result == {"task_id": "t-1", "revoked": True, "terminated": True, "signal": "SIGTERM",
                      "worker": "wB@host-1", "state_before": "running", "workers_answered": 1,
                      "processes": {"wB@host-1": 201}}
    revoke = [c for c in control.calls if c[0] == "revoke"]
    # The holder first, awaiting its answer; then every worker, without waiting.
    assert revoke == [("revoke", "t-1", ["wB@host-1"], True, "SIGTERM", True, _commands.CONTROL_TIMEOUT),
                      ("revoke", "t-1", None, True, "SIGTERM", False, 1.0)]
    # Its pool was read until pid 201 had left it.
    assert [c for c in control.calls if c[0] == "stats"] == [("stats", ["wB@host-1"])] * 3


def test_cancel_fails_when_the_process_survives_the_signal(hooks, monkeypatch):
    """Celery answers "terminate: <id>" once it sent the signal: a process that ignores or catches
    it still runs the task. That is a failed cancel, not terminated."""
    monkeypatch.setattr(_commands, "TERMINATE_WAIT", 0.5)
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-1", 201, [[201, 202]])
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-1"}}
    hooks.app.results["t-1"] = {"state": "SUCCESS"}
    with pytest.raises(CommandFailed, match=r"SIGTERM was sent, but the process running the task is still alive "
                                            r"after 0 s: pid 201 on worker 'wB@host-1'.*result backend says "
                                            r"SUCCESS.*may still be running"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"}))


def test_cancel_a_running_task_on_this_worker_checks_its_own_pool(monkeypatch):
    monkeypatch.setenv(_commands.CANCEL_SIGNAL_ENV, "SIGKILL")
    req = Req("t-2", time_start=1.0, worker_pid=102)
    monkeypatch.setattr(_commands, "_local_requests", lambda: ({"t-2": req}, {req}, set()))
    h = _Hooks(FakeApp(), Recording(), serve_commands=True)
    h.hostname = OWN
    pool = FakePool(2)
    h.worker = SimpleNamespace(hostname=OWN, pool=pool)
    h.app.control.replies["revoke"] = {OWN: {"ok": "terminate: t-2"}}
    monkeypatch.setattr(_commands, "TERMINATE_WAIT", 0.5)
    with pytest.raises(CommandFailed, match="still alive.*pid 102 on worker 'wA@host-1'"):
        h.commands.cancel_task(cmd("cancel_task", target={"type": "task", "id": "celery:t-2"}))
    pool.pids = [101, 104]  # 102 left the pool, a new process took its place
    result = h.commands.cancel_task(cmd("cancel_task", target={"type": "task", "id": "celery:t-2"}))
    assert (result["state_before"], result["terminated"], result["signal"], result["worker"], result["processes"]) == (
        "running", True, "SIGKILL", OWN, {OWN: 102})
    assert not [c for c in h.app.control.calls if c[0] == "stats"]  # its own pool is read in-process


def test_cancel_where_the_task_has_no_process_of_its_own_says_it_was_not_checked(hooks):
    """threads, gevent, eventlet: the task runs in the worker's own process."""
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-1", 4000, [[]], main_pid=4000)
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-1"}}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"}))
    assert (result["state_before"], result["terminated"], result["signal_sent"]) == ("running", False, True)
    assert "runs tasks in the worker's own process (pid 4000)" in result["detail"], result


def test_cancel_on_this_worker_with_a_greenlet_pool_says_it_was_not_checked(monkeypatch):
    """gevent's worker_pid is a greenlet's id, and its pool lists no processes."""
    req = Req("t-2", time_start=1.0, worker_pid=140234567891234)
    monkeypatch.setattr(_commands, "_local_requests", lambda: ({"t-2": req}, {req}, set()))
    h = _Hooks(FakeApp(), Recording(), serve_commands=True)
    h.hostname = OWN
    h.worker = SimpleNamespace(hostname=OWN, pool=SimpleNamespace(_get_info=lambda: {"max-concurrency": 100}))
    h.app.control.replies["revoke"] = {OWN: {"ok": "terminate: t-2"}}
    result = h.commands.cancel_task(cmd("cancel_task", {"task_id": "t-2"}))
    assert (result["state_before"], result["terminated"], result["signal_sent"]) == ("running", False, True)
    assert "lists no processes" in result["detail"], result


def test_cancel_a_task_running_on_two_workers_needs_both(hooks):
    """Redis redelivers an unacknowledged task after its visibility timeout: two workers run it."""
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-1", 201, [[201], [205]])
    running_on(control, "wC@host-2", "t-1", 301, [[301], [306]])
    control.held = {"wB@host-1": {"t-1": ["active", {"worker_pid": 201}]},
                    "wC@host-2": {"t-1": ["active", {"worker_pid": 301}]}}
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-1"}}
    with pytest.raises(CommandFailed, match="running on worker\\(s\\) 'wC@host-2', which did not confirm"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"}))
    control.replies["revoke"]["wC@host-2"] = {"ok": "terminate: t-0, t-1"}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"}))
    assert (result["terminated"], result["worker"], result["workers"], result["processes"]) == (
        True, "wB@host-1", ["wB@host-1", "wC@host-2"], {"wB@host-1": 201, "wC@host-2": 301})


def test_cancel_a_running_task_that_is_not_confirmed_fails(hooks):
    control = hooks.app.control
    control.held = {"wB@host-1": {"t-3": ["active", {}]}}
    with pytest.raises(CommandFailed, match="running on worker.*'wB@host-1'.*did not answer.*may still be running"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-3"}))
    # A pool that cannot terminate (solo) answers with an error.
    control.replies["revoke"] = {"wB@host-1": {"error": "does not implement kill_job"}}
    with pytest.raises(CommandFailed, match="kill_job"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-3"}))


def test_cancel_of_a_task_that_finished_meanwhile_says_finished(hooks):
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-8", 201, [[201]])
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: tasks unknown"}}
    hooks.app.results["t-8"] = {"state": "SUCCESS"}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-8"}))
    assert (result["state_before"], result["celery_state"], result["terminated"], result["worker"]) == (
        "finished", "SUCCESS", False, "wB@host-1")
    assert "finished on 'wB@host-1' before the revoke" in result["detail"]


def test_cancel_a_queued_task_revokes_it_without_terminating(hooks):
    control = hooks.app.control
    control.held = {OWN: {"t-4": ["scheduled", {}]}}
    control.replies["revoke"] = {OWN: {"ok": "terminate: t-4"}}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-4"}))
    assert (result["state_before"], result["terminated"], result["revoked"], result["worker"]) == (
        "queued", False, True, OWN)


def test_cancel_a_task_nobody_holds_says_whether_it_finished(hooks):
    control = hooks.app.control
    control.replies["revoke"] = {OWN: {"ok": "terminate: tasks unknown"}}
    hooks.app.results["t-5"] = {"state": "SUCCESS"}
    done = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-5"}))
    assert (done["state_before"], done["celery_state"], done["terminated"]) == ("finished", "SUCCESS", False)
    waiting = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-6"}))
    assert (waiting["state_before"], waiting["terminated"], waiting["worker"]) == ("unknown", False, None)
    # Nobody held it: one revoke to every worker, waiting QUERY_WAIT for their answers.
    assert control.calls[-1] == ("revoke", "t-6", None, True, "SIGTERM", True, _commands.QUERY_WAIT)


def test_cancel_names_a_worker_that_answers_the_revoke_for_a_task_it_did_not_report(hooks):
    """A worker too slow for the query still answers the revoke: its answer is used, not counted."""
    control = hooks.app.control
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-9"}, OWN: {"ok": "terminate: tasks unknown"}}
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-9"}))
    assert (result["worker"], result["signal_sent"], result["terminated"], result["workers_answered"]) == (
        "wB@host-1", True, False, 2)
    assert "held the task" in result["detail"] and "not checked" in result["detail"]


def test_cancel_confirmed_by_the_holder_is_not_reported_uncancelled_when_the_broadcast_fails(hooks):
    control = hooks.app.control
    running_on(control, "wB@host-1", "t-1", 201, [[202]])
    control.replies["revoke"] = {"wB@host-1": {"ok": "terminate: t-1"}}
    control.fail_unawaited_revoke = ConnectionError("broker went away")
    result = hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"}))
    assert (result["state_before"], result["terminated"]) == ("running", True)
    assert "the others did not (ConnectionError: broker went away)" in result["note"]


def test_cancel_bad_parameters_and_broker_failure(hooks):
    with pytest.raises(BadCommand, match="cancel_task needs parameters.task_id"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": ""}))
    hooks.app.control.fail = ConnectionError("broker down")
    with pytest.raises(CommandFailed, match="could not be sent through the broker.*broker down.*not cancelled"):
        hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-7"}))


def test_without_remote_control_worker_commands_fail_at_once_saying_why(hooks):
    hooks.app.conf.worker_enable_remote_control = False
    for call in (lambda: hooks.commands.cancel_task(cmd("cancel_task", {"task_id": "t-1"})),
                 lambda: hooks.commands.pool_grow(worker_cmd("pool_grow", delta=1)),
                 lambda: hooks.commands.rate_limit(cmd("rate_limit", {"task_name": "p.a", "rate": "1/s"}))):
        with pytest.raises(CommandFailed, match="worker_enable_remote_control = False.*set it to True"):
            call()
    assert hooks.app.control.calls == []


# ---------------------------------------------------------------- worker controls


def test_worker_controls_go_to_this_worker_only_and_wait_for_its_reply(hooks):
    control = hooks.app.control
    control.replies = {"pool_grow": {OWN: {"ok": "pool will grow"}},
                       "pool_shrink": {OWN: {"ok": "pool will shrink"}},
                       "add_consumer": {OWN: {"ok": "add consumer q2"}},
                       "cancel_consumer": {OWN: {"ok": "no longer consuming from q2"}},
                       "pool_restart": {OWN: {"ok": "reload started"}}}
    grow = hooks.commands.pool_grow(worker_cmd("pool_grow", delta=2))
    assert grow == {"worker": OWN, "delta": 2, "reply": "pool will grow", "concurrency_before": 2,
                    "concurrency_after": 2}
    assert control.calls[-1] == ("broadcast", "pool_grow", {"n": 2}, [OWN], True, _commands.CONTROL_TIMEOUT, 1)
    assert hooks.commands.pool_shrink(worker_cmd("pool_shrink", delta=1))["reply"] == "pool will shrink"
    add = hooks.commands.add_consumer(worker_cmd("add_consumer", queue="q2"))
    assert add == {"worker": OWN, "queue": "q2", "reply": "add consumer q2"}
    assert control.calls[-1][1:4] == ("add_consumer", {"queue": "q2"}, [OWN])
    assert hooks.commands.cancel_consumer(worker_cmd("cancel_consumer", queue="q2"))["queue"] == "q2"
    restart = hooks.commands.restart_worker(worker_cmd("restart_worker"))
    assert restart.pop("how").startswith("each pool process exits when it next looks for work")
    assert restart == {"worker": OWN, "restarted": "pool", "reply": "reload started", "concurrency": 2,
                       "processes_before": [101, 102]}
    assert control.calls[-1][1:4] == ("pool_restart", {"reload": False}, [OWN])


def test_worker_controls_refuse_another_worker_and_bad_parameters(hooks):
    c = hooks.commands
    with pytest.raises(BadCommand, match="for worker 'wB@host-1' reached pid .* which hosts worker 'wA@host-1'"):
        c.pool_grow(worker_cmd("pool_grow", worker="wB@host-1"))
    with pytest.raises(BadCommand, match="names no worker: parameters.worker_name is required"):
        c.restart_worker(cmd("restart_worker", {"engine": "celery"}))
    for bad in (0, -1, 1.5, "x", True):
        with pytest.raises(BadCommand, match="delta must be a whole number >= 1"):
            c.pool_grow(worker_cmd("pool_grow", delta=bad))
    with pytest.raises(BadCommand, match="would leave worker .* with no pool process .* at most 1"):
        c.pool_shrink(worker_cmd("pool_shrink", delta=2))
    with pytest.raises(BadCommand, match="add_consumer needs parameters.queue"):
        c.add_consumer(worker_cmd("add_consumer", queue=" "))
    assert hooks.app.control.calls == []  # nothing reached the broker


def test_worker_controls_fail_on_an_error_reply_or_none(hooks):
    control = hooks.app.control
    with pytest.raises(CommandFailed, match="did not answer pool_grow within 5 s"):
        hooks.commands.pool_grow(worker_cmd("pool_grow", delta=1))
    control.replies["pool_grow"] = {OWN: {"error": "pool_grow is not supported with autoscale."}}
    with pytest.raises(CommandFailed, match="refused pool_grow: pool_grow is not supported with autoscale"):
        hooks.commands.pool_grow(worker_cmd("pool_grow", delta=1))
    control.fail = OSError("connection refused")
    with pytest.raises(CommandFailed, match="could not be sent to worker .* connection refused"):
        hooks.commands.add_consumer(worker_cmd("add_consumer", queue="q"))


def test_restart_worker_without_pool_restarts_says_how_to_enable_them(hooks):
    hooks.app.conf.worker_pool_restarts = False
    with pytest.raises(CommandFailed, match="worker_pool_restarts off.*set worker_pool_restarts = True"):
        hooks.commands.restart_worker(worker_cmd("restart_worker"))
    assert hooks.app.control.calls == []


def test_rate_limit_for_this_worker_or_every_worker(hooks):
    control = hooks.app.control
    control.replies["rate_limit"] = {OWN: {"ok": "new rate limit set successfully"},
                                     "wB@host-1": {"error": "unknown task"}}
    one = hooks.commands.rate_limit(cmd("rate_limit", {"task_name": "proj.add", "rate": "10/m",
                                                       "worker_name": OWN}, {"type": "task", "id": "proj.add"}))
    assert one == {"task_name": "proj.add", "rate": "10/m", "worker": OWN,
                   "reply": "new rate limit set successfully"}
    assert control.calls[-1][1:4] == ("rate_limit", {"task_name": "proj.add", "rate_limit": "10/m"}, [OWN])
    every = hooks.commands.rate_limit(cmd("rate_limit", {"task_name": "proj.add", "rate": "0",
                                                         "worker_name": None}))
    assert every == {"task_name": "proj.add", "rate": "0", "worker": None, "applied_by": [OWN],
                     "refused_by": {"wB@host-1": "unknown task"}}
    assert control.calls[-1][3] is None  # broadcast to every worker
    for rate in ("fast", "10/d", "-1", "", None, "01"):
        with pytest.raises(BadCommand, match="invalid rate"):
            hooks.commands.rate_limit(cmd("rate_limit", {"task_name": "proj.add", "rate": rate}))
    with pytest.raises(BadCommand, match="rate_limit needs parameters.task_name"):
        hooks.commands.rate_limit(cmd("rate_limit", {"rate": "1/s"}))
    control.replies["rate_limit"] = {"wB@host-1": {"error": "unknown task"}}
    with pytest.raises(CommandFailed, match="no worker applied it.*unknown task"):
        hooks.commands.rate_limit(cmd("rate_limit", {"task_name": "proj.nope", "rate": "1/s"}))


# ---------------------------------------------------------------- purge


@pytest.fixture
def broker_queue(monkeypatch):
    state = {"depth": 3, "purged": []}

    def depth(app, queue, timeout=5.0):
        return state["depth"] if queue != "nowhere" else None

    def purge(app, queue, timeout=5.0):
        state["purged"].append(queue)
        n, state["depth"] = state["depth"] + state.get("arriving", 0), 0
        return n

    monkeypatch.setattr(_commands._queues, "depth", depth)
    monkeypatch.setattr(_commands._queues, "purge", purge)
    return state


def purge_cmd(**params):
    return cmd("purge_queue", {"queue": "default", "force": False, "engine": "celery", **params},
               {"type": "queue", "id": "default", "engine": "celery"})


def test_purge_at_the_confirmed_depth(hooks, broker_queue):
    assert hooks.commands.purge_queue(purge_cmd(expected_depth=3)) == {
        "queue": "default", "depth_before": 3, "purged": 3, "force": False}
    assert broker_queue["purged"] == ["default"]


def test_purge_says_when_messages_arrived_between_the_measure_and_the_purge(hooks, broker_queue):
    broker_queue["arriving"] = 2
    result = hooks.commands.purge_queue(purge_cmd(expected_depth=3))
    assert (result["depth_before"], result["purged"]) == (3, 5)
    assert result["note"] == "2 message(s) arrived between the measure and the purge and were purged too"


def test_purge_refuses_when_the_depth_changed(hooks, broker_queue):
    with pytest.raises(CommandFailed, match="holds 3 messages now, the purge was confirmed at 2; nothing was purged"):
        hooks.commands.purge_queue(purge_cmd(expected_depth=2))
    assert broker_queue["purged"] == []
    forced = hooks.commands.purge_queue(purge_cmd(force=True))
    assert forced == {"queue": "default", "depth_before": 3, "purged": 3, "force": True}


def test_purge_bad_parameters_and_unknown_queue(hooks, broker_queue):
    with pytest.raises(BadCommand, match="no expected_depth, so the purge is not confirmed"):
        hooks.commands.purge_queue(purge_cmd())
    for bad in (-1, "3", True, 2.5):
        with pytest.raises(BadCommand, match="expected_depth must be a whole number >= 0"):
            hooks.commands.purge_queue(purge_cmd(expected_depth=bad))
    with pytest.raises(BadCommand, match="force must be true or false"):
        hooks.commands.purge_queue(purge_cmd(force="yes", expected_depth=3))
    with pytest.raises(CommandFailed, match="does not know queue 'nowhere'"):
        hooks.commands.purge_queue(cmd("purge_queue", {"queue": "nowhere", "expected_depth": 0}))
    assert broker_queue["purged"] == []


# ---------------------------------------------------------------- submit, bulk retry


def test_submit_task_enqueues_by_name(hooks):
    eta = datetime.now(timezone.utc).timestamp() + 30
    result = hooks.commands.submit_task(cmd("submit_task", {
        "name": "proj.add", "args": [1, 2], "kwargs": {"z": 3}, "queue": "slow", "filter": {"engine": "celery"},
        "schedule_id": "s-1", "priority": "high", "eta": eta}, {"type": "schedule", "id": "s-1", "engine": "celery"}))
    assert result == {"task_id": "new-1", "engine": "celery", "task_name": "proj.add", "queue": "slow",
                      "priority": 6}
    sent = hooks.app.sent[-1]
    assert (sent["name"], sent["args"], sent["kwargs"], sent["queue"], sent["priority"]) == (
        "proj.add", [1, 2], {"z": 3}, "slow", 6)
    assert abs(sent["eta"].timestamp() - eta) < 0.001
    plain = hooks.commands.submit_task(cmd("submit_task", {"name": "proj.ping", "args": None, "queue": None}))
    assert plain["queue"] is None and hooks.app.sent[-1] == {"name": "proj.ping", "args": [], "kwargs": {}}
    # An empty queue is the task's own routing, as null is.
    blank = hooks.commands.submit_task(cmd("submit_task", {"name": "proj.ping", "queue": " "}))
    assert blank["queue"] is None and hooks.app.sent[-1] == {"name": "proj.ping", "args": [], "kwargs": {}}


def test_priority_labels_follow_the_transport(hooks):
    assert [_commands.priority_of(p) for p in ("critical", "high", "normal", "low", 7, 300, True)] == [
        9, 6, None, 0, 7, None, None]
    # On Redis a message without a priority runs with the first (step 0): nothing runs ahead of it.
    assert [_commands.priority_of(p, "redis") for p in ("critical", "high", "normal", "low", 7)] == [
        0, 0, None, 9, 7]

    class Conn:
        transport = SimpleNamespace(driver_type="redis")

        def release(self):
            pass

    hooks.app.connection_for_write = Conn
    hooks.commands.submit_task(cmd("submit_task", {"name": "p.a", "priority": "low"}))
    assert hooks.app.sent[-1]["priority"] == 9
    # "normal", the label of an ordinary task, sets none: a retried task queues as a fresh one does.
    hooks.commands.submit_task(cmd("submit_task", {"name": "p.a", "priority": "normal"}))
    assert "priority" not in hooks.app.sent[-1]


def test_submit_task_bad_parameters(hooks):
    c = hooks.commands
    with pytest.raises(BadCommand, match="submit_task needs parameters.name"):
        c.submit_task(cmd("submit_task", {"args": []}))
    with pytest.raises(BadCommand, match="args must be a list"):
        c.submit_task(cmd("submit_task", {"name": "p.a", "args": "1,2"}))
    with pytest.raises(BadCommand, match="kwargs must be a map"):
        c.submit_task(cmd("submit_task", {"name": "p.a", "kwargs": [1]}))
    with pytest.raises(BadCommand, match="queue must be"):
        c.submit_task(cmd("submit_task", {"name": "p.a", "queue": 5}))
    with pytest.raises(BadCommand, match="queue must be"):
        c.submit_task(cmd("submit_task", {"name": "p.a", "queue": ["q"]}))
    with pytest.raises(BadCommand, match="in the past"):
        c.submit_task(cmd("submit_task", {"name": "p.a", "eta": 1.0}))
    assert hooks.app.sent == []


def test_bulk_retry_counts_each_outcome(hooks):
    hooks.on_task_received(sender=None, request=SimpleNamespace(
        id="b-1", name="proj.add", args=[1, 2], kwargs={}, delivery_info={"routing_key": "slow"},
        hostname=OWN, parent_id=None, root_id=None))
    hooks.app.results["b-2"] = {"name": "proj.mul", "args": [3, 4], "kwargs": {}, "queue": None}
    result = hooks.commands.bulk_retry(cmd("bulk_retry", {
        "filter": {"engine": "celery", "task_ids": ["b-1", "b-2", "b-3", "b-1"],
                   "task_names": {"b-1": "proj.add", "b-3": "proj.gone"}, "task_priorities": {"b-1": "critical"}},
        "max": 10}, {"type": "bulk", "id": None, "engine": "celery"}))
    assert result["new_task_ids"] == {"b-1": "new-1", "b-2": "new-2"}
    assert {k: result[k] for k in ("requested", "attempted", "succeeded", "failed", "capped", "max")} == {
        "requested": 4, "attempted": 3, "succeeded": 2, "failed": 1, "capped": False, "max": 10}
    assert "original arguments are not known" in result["failures"]["b-3"]
    assert hooks.app.sent[0] == {"name": "proj.add", "args": [1, 2], "kwargs": {}, "queue": "slow", "priority": 9}
    assert hooks.app.sent[1] == {"name": "proj.mul", "args": [3, 4], "kwargs": {}}


def test_bulk_retry_caps_and_bad_parameters(hooks):
    for n in range(3):
        hooks.app.results[f"c-{n}"] = {"name": "proj.add", "args": [n], "kwargs": {}}
    capped = hooks.commands.bulk_retry(cmd("bulk_retry", {"filter": {"task_ids": ["c-0", "c-1", "c-2"]}, "max": 2}))
    assert (capped["attempted"], capped["succeeded"], capped["capped"]) == (2, 2, True)
    for params, words in (({}, "needs parameters.filter"), ({"filter": {"task_ids": []}}, "non-empty list"),
                          ({"filter": {"task_ids": [1]}}, "non-empty list"),
                          ({"filter": {"task_ids": ["c-0"]}, "max": 0}, "max must be a whole number")):
        with pytest.raises(BadCommand, match=words):
            hooks.commands.bulk_retry(cmd("bulk_retry", params))
    with pytest.raises(CommandFailed, match="retried none of the 1 tasks: x-1: BadCommand: cannot retry x-1"):
        hooks.commands.bulk_retry(cmd("bulk_retry", {"filter": {"task_ids": ["x-1"]}}))


# ---------------------------------------------------------------- reconcile


def test_reconcile_from_this_worker(hooks, monkeypatch):
    running = Req("r-1", time_start=12.0)
    waiting = Req("r-2")
    monkeypatch.setattr(_commands, "_local_requests",
                        lambda: ({"r-1": running, "r-2": waiting}, {running}, {waiting}))
    got = hooks.commands.reconcile_task(cmd("reconcile_task", {"task_id": "r-1", "engine": "celery"}))
    assert got == {"task_id": "r-1", "engine_state": "started", "finished_at": None, "exception": None,
                   "source": "worker", "worker": OWN}
    assert hooks.commands.reconcile_task(cmd("reconcile_task", {"task_id": "r-2"}))["engine_state"] == "pending"


def test_reconcile_from_another_worker(hooks):
    hooks.app.control.held = {"wB@host-1": {"r-3": ["active", {}]}, "wC@host-1": {"r-4": ["reserved", {}]}}
    hooks.app.results["r-3"] = {"state": "PENDING"}  # no task_track_started: the backend knows nothing
    got = hooks.commands.reconcile_task(cmd("reconcile_task", {"task_id": "r-3"}))
    assert got == {"task_id": "r-3", "engine_state": "started", "finished_at": None, "exception": None,
                   "source": "worker", "worker": "wB@host-1"}
    assert hooks.commands.reconcile_task(cmd("reconcile_task", {"task_id": "r-4"}))["engine_state"] == "pending"


def test_reconcile_from_the_result_backend(hooks):
    done = datetime(2026, 12, 7, 3, 0, 0)
    hooks.app.results = {
        "s": {"state": "SUCCESS", "date_done": done},
        "f": {"state": "FAILURE", "date_done": done.replace(tzinfo=timezone.utc), "result": ValueError("boom")},
        "v": {"state": "REVOKED", "date_done": done},
        "st": {"state": "STARTED"},
        "re": {"state": "RETRY"},
        "pw": {"state": "FAILURE", "result": ConnectionError("redis://app:hunter2@db:6379/0 refused")},
    }
    get = lambda tid: hooks.commands.reconcile_task(cmd("reconcile_task", target={"type": "task", "id": tid}))
    assert get("s") == {"task_id": "s", "engine_state": "success", "finished_at": "2026-12-07T03:00:00+00:00",
                        "exception": None, "source": "result_backend", "celery_state": "SUCCESS"}
    assert (get("f")["engine_state"], get("f")["exception"]) == ("failure", "ValueError: boom")
    assert get("pw")["exception"] == "ConnectionError: redis://app:[REDACTED]@db:6379/0 refused"
    assert (get("v")["engine_state"], get("v")["exception"], get("v")["celery_state"]) == (
        "failure", "revoked", "REVOKED")
    assert (get("st")["engine_state"], get("st")["finished_at"]) == ("started", None)
    assert get("re")["engine_state"] == "pending"
    # Celery's PENDING is "no record": unknown, not pending.
    unknown = get("nobody")
    assert (unknown["engine_state"], unknown["celery_state"]) == ("unknown", "PENDING")
    assert "no record" in unknown["detail"]


def test_reconcile_without_a_result_backend_or_task_id(hooks):
    class DisabledBackend:
        pass

    hooks.app.backend = DisabledBackend()
    got = hooks.commands.reconcile_task(cmd("reconcile_task", {"task_id": "x"}))
    assert got["engine_state"] == "unknown" and "no result backend" in got["detail"]
    with pytest.raises(BadCommand, match="reconcile_task needs parameters.task_id"):
        hooks.commands.reconcile_task(cmd("reconcile_task", {}))


# ---------------------------------------------------------------- broker secrets


BROKER_PW, BACKEND_PW, ALT_PW = "s3cr3t-Pw", "b4ckend-Pw", "f4ilover-Pw"


@pytest.fixture
def secret_hooks(monkeypatch):
    """Hooks on a real Celery app whose broker (with a failover URL) and result backend have
    passwords; nothing here connects."""
    from celery import Celery

    monkeypatch.delenv(_commands.CANCEL_SIGNAL_ENV, raising=False)
    app = Celery("secrets", broker=f"redis://:{BROKER_PW}@127.0.0.1:1/0;redis://u:{ALT_PW}@127.0.0.1:2/0",
                 backend=f"redis://:{BACKEND_PW}@127.0.0.1:1/1", set_as_current=False)
    app.conf.worker_pool_restarts = True
    h = _Hooks(app, Recording(), serve_commands=True)
    h.hostname = OWN
    h.worker = SimpleNamespace(hostname=OWN, pool=FakePool(2), concurrency=2, pool_cls="prefork")
    return h


def broker_error(*_, **__):
    # What a broker client may say: its URL, and the password on its own.
    raise ConnectionError(f"Error connecting to redis://:{BROKER_PW}@127.0.0.1:1/0 (AUTH {BROKER_PW} refused; "
                          f"backend redis://:{BACKEND_PW}@127.0.0.1:1/1, failover {ALT_PW})")


def assert_masked(text):
    for secret in (BROKER_PW, BACKEND_PW, ALT_PW):
        assert secret not in text, text
    # The rest stays: where it connected, what failed.
    assert "redis://**@127.0.0.1:1/0" in text and "AUTH ** refused" in text, text


def test_command_errors_from_the_broker_never_carry_its_passwords(secret_hooks, monkeypatch):
    served = secret_hooks.handlers()
    monkeypatch.setattr(_commands._queues, "depth", broker_error)
    monkeypatch.setattr(_commands._queues, "purge", broker_error)
    monkeypatch.setattr(secret_hooks.app, "send_task", broker_error)
    monkeypatch.setattr(secret_hooks.app.control, "broadcast", broker_error)
    monkeypatch.setattr(secret_hooks.app.control, "revoke", broker_error)
    monkeypatch.setattr(_commands, "_local_requests", broker_error)  # an exception no handler expects
    cases = [
        ("purge_queue", purge_cmd(expected_depth=3), CommandFailed, "its depth could not be measured"),
        ("submit_task", cmd("submit_task", {"name": "proj.add"}), CommandFailed, "the task could not be sent"),
        ("retry_task", cmd("retry_task", {"task_id": "t-1", "task_name": "proj.add", "override_args": [1],
                                          "override_kwargs": {}}), CommandFailed, "proj.add could not be sent"),
        ("pool_grow", worker_cmd("pool_grow", delta=1), CommandFailed, "could not be sent to worker"),
        ("rate_limit", cmd("rate_limit", {"task_name": "proj.add", "rate": "1/s"}), CommandFailed,
         "rate_limit could not be sent"),
        ("reconcile_task", cmd("reconcile_task", {"task_id": "t-1"}), CommandFailed,
         "reconcile_task failed: ConnectionError: Error connecting"),
    ]
    for action, command, kind, what in cases:
        with pytest.raises(kind, match=what) as raised:
            served[("celery", action)](command)
        assert_masked(str(raised.value))
    # The handlers mask their own texts too, for a caller that bypasses the served wrapper.
    with pytest.raises(CommandFailed) as direct:
        secret_hooks.commands.purge_queue(purge_cmd(expected_depth=3))
    assert_masked(str(direct.value))
    # A purge that measured, then failed.
    monkeypatch.setattr(_commands._queues, "depth", lambda app, queue, timeout=5.0: 3)
    with pytest.raises(CommandFailed, match="purge_queue for queue 'default' failed") as purge:
        served[("celery", "purge_queue")](purge_cmd(expected_depth=3))
    assert_masked(str(purge.value))


def test_bulk_retry_failures_and_the_client_answer_are_masked(secret_hooks, monkeypatch):
    monkeypatch.setattr(secret_hooks.app, "send_task", broker_error)
    monkeypatch.setattr(_commands, "from_result_backend", lambda app, task_id: {"args": [1], "kwargs": {}})
    bulk = cmd("bulk_retry", {"filter": {"engine": "celery", "task_ids": ["t-1"],
                                         "task_names": {"t-1": "proj.add"}}})
    with pytest.raises(CommandFailed, match="retried none of the 1 tasks") as raised:
        secret_hooks.handlers()[("celery", "bulk_retry")](bulk)
    assert_masked(str(raised.value))

    # What the brain gets: the client's command_result for the served handler.
    sent = []
    client = z4j_agentd.Client(socket_path="/nonexistent/agent.sock")
    client._handlers = secret_hooks.handlers()
    client._run_command(SimpleNamespace(send=lambda msg, timeout=None: sent.append(msg)),
                        {"id": "c-9", "action": "submit_task", "target": {"engine": "celery"},
                         "parameters": {"name": "proj.add"}})
    (answer,) = sent
    assert answer["status"] == "failed" and answer["error"].startswith("CommandFailed: submit_task proj.add"), answer
    assert_masked(answer["error"])


def test_broker_secrets_lists_every_password_without_connecting(secret_hooks):
    from z4j_agentd.celery import _health

    assert sorted(_health.broker_secrets(secret_hooks.app)) == sorted([BROKER_PW, ALT_PW, BACKEND_PW])
    assert _health.broker_secrets(SimpleNamespace()) == []
