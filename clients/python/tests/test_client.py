import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

import z4j_agentd
from z4j_agentd import _wire as wire_module
from z4j_agentd import client as client_module

FRAMINGS = ["json"] + (["msgpack"] if client_module.codec_for("auto").name == "msgpack" else [])
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def test_default_socket_path(monkeypatch, tmp_path):
    monkeypatch.setenv("Z4J_SOCKET_PATH", "/run/x/agent.sock")
    assert z4j_agentd.default_socket_path() == "/run/x/agent.sock"
    monkeypatch.delenv("Z4J_SOCKET_PATH")
    # The host-wide daemon's socket wins when it exists.
    system = tmp_path / "agent.sock"
    system.touch()
    monkeypatch.setattr(wire_module, "SYSTEM_SOCKET_PATH", str(system))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert z4j_agentd.default_socket_path() == str(system)
    system.unlink()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert z4j_agentd.default_socket_path() == "/run/user/1000/z4j/agent.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    assert z4j_agentd.default_socket_path() == f"/var/tmp/z4j-{os.getuid()}/agent.sock"
    monkeypatch.delenv("TMPDIR")
    assert z4j_agentd.default_socket_path() == f"/tmp/z4j-{os.getuid()}/agent.sock"
    monkeypatch.setenv("Z4J_SOCKET_PATH", "/elsewhere.sock")
    assert z4j_agentd.Client().socket_path == "/elsewhere.sock"
    assert z4j_agentd.Client("/given.sock").socket_path == "/given.sock"


def test_framing_choice():
    assert z4j_agentd.Client("/x", framing="json").framing == "json"
    expected = "msgpack" if client_module.codec_for("auto").name == "msgpack" else "json"
    assert z4j_agentd.Client("/x").framing == expected
    with pytest.raises(ValueError):
        z4j_agentd.Client("/x", framing="xml")


@pytest.mark.parametrize("framing", FRAMINGS)
def test_events_are_batched_and_acknowledged(standin, make_client, framing):
    c = make_client(framing=framing, process="unit test", engines=["celery"], worker_role="web")
    for i in range(250):
        assert c.emit("celery", "task.received", f"t-{i}", {"task_name": "app.add", "args": [i, 1.5]})
    assert c.flush(5)
    events = standin.events()
    assert [e["task_id"] for e in events] == [f"t-{i}" for i in range(250)]
    batches = [m for _, m in standin.all("events")]
    assert all(len(m["events"]) <= client_module.BATCH_MAX_EVENTS for m in batches)
    assert all("ack_id" in m for m in batches)
    assert len(batches) < 250  # batched, not one message per event
    first = events[0]
    assert first["engine"] == "celery" and first["kind"] == "task.received"
    assert first["data"] == {"task_name": "app.add", "args": [0, 1.5]}
    assert ISO_UTC.match(first["occurred_at"])
    assert uuid.UUID(first["id"]).version == 4
    peer, hello = standin.all("hello")[0]
    assert peer.framing == ("jsonl" if framing == "json" else "msgpack")
    assert hello["process"] == "unit test" and hello["engines"] == ["celery"]
    assert hello["pid"] == os.getpid() and hello["worker_role"] == "web"
    assert "capabilities" not in hello  # never on a connection that does not run commands
    stats = c.stats()
    assert stats["sent"] == 250 and stats["queued"] == 0 and stats["dropped"] == 0
    assert stats["accepted"] == 250 and stats["connected"] is True and stats["reconnects"] == 0


def test_a_batch_over_the_byte_bound_goes_as_several_messages_in_order(standin, make_client, monkeypatch):
    monkeypatch.setattr(client_module, "BATCH_MAX_BYTES", 2000)
    c = make_client(framing="json")
    for i in range(30):
        assert c.emit("celery", "task.received", f"t-{i}", {"blob": "x" * 300})
    assert c.flush(5)
    assert [e["task_id"] for e in standin.events()] == [f"t-{i}" for i in range(30)]
    batches = [m for _, m in standin.all("events")]
    # Each event takes over 400 bytes encoded: at most 4 fit in 2,000.
    assert all(1 <= len(m["events"]) <= 4 for m in batches) and len(batches) >= 8


def test_explicit_fields_and_record(standin, make_client):
    c = make_client()
    when = datetime(2026, 11, 22, 23, 29, 59, 500000, tzinfo=timezone.utc)
    event_id = str(uuid.uuid4())
    assert c.emit("rq", "task.succeeded", "t-1", {"result": float("nan")}, occurred_at=when, id=event_id)
    assert c.record({"engine": "rq", "kind": "worker.online", "data": {"b": b"bytes", "s": {3}},
                     "occurred_at": "2026-11-22T23:00:00Z", "ignored": 1})
    assert c.flush(5)
    first, second = standin.events()
    assert first["occurred_at"] == "2026-11-22T23:29:59.500000+00:00"
    assert first["id"] == event_id and first["data"] == {"result": "nan"}
    assert second["task_id"] == "" and second["occurred_at"] == "2026-11-22T23:00:00Z"
    assert second["data"] == {"b": "bytes", "s": [3]} and "ignored" not in second


def test_emit_never_blocks_or_raises_when_the_daemon_is_down(sock_path, make_client):
    c = make_client(queue_size=10)
    started = time.monotonic()
    results = [c.emit("celery", "task.received", f"t-{i}") for i in range(25)]
    assert time.monotonic() - started < 0.5
    assert results == [True] * 10 + [False] * 15
    assert c.emit("celery", "task.received", "x", data=object()) is False  # still full: no raise
    time.sleep(0.3)  # the sender tries to connect meanwhile
    stats = c.stats()
    assert stats["queued"] == 10
    assert stats["dropped_queue_full"] == 16 and stats["dropped"] == 16
    assert stats["dropped_unavailable"] == 0 and stats["refused"] == 0
    assert stats["connected"] is False and stats["connect_failures"] >= 1
    assert c.flush(0.2) is False
    c.close(timeout=0.2)
    stats = c.stats()
    assert stats["queued"] == 0 and stats["dropped_unavailable"] == 10 and stats["dropped"] == 26
    assert c.emit("celery", "task.received", "late") is False
    assert c.stats()["dropped_unavailable"] == 11


def test_queued_events_are_delivered_once_the_daemon_starts(sock_path, make_client):
    from standin import StandIn

    c = make_client()
    for i in range(5):
        c.emit("celery", "task.received", f"t-{i}")
    time.sleep(0.2)
    server = StandIn(sock_path)
    try:
        assert c.flush(5)
        assert [e["task_id"] for e in server.events()] == [f"t-{i}" for i in range(5)]
        assert c.stats()["reconnects"] == 0  # the first connection is not a reconnect
    finally:
        server.stop()


def test_reconnects_after_the_daemon_restarts(sock_path, standin, make_client):
    from standin import StandIn

    c = make_client()
    c.emit("celery", "task.received", "before")
    assert c.flush(5)
    standin.stop()
    standin.wait_for(lambda: not c.stats()["connected"], 5)
    for i in range(3):
        assert c.emit("celery", "task.received", f"during-{i}")
    assert c.stats()["queued"] == 3
    restarted = StandIn(sock_path)
    try:
        assert c.flush(8)
        assert [e["task_id"] for e in restarted.events()] == ["during-0", "during-1", "during-2"]
        assert restarted.all("hello")  # says hello again
        stats = c.stats()
        assert stats["reconnects"] == 1 and stats["connected"] is True
        assert stats["sent"] == 4 and stats["dropped"] == 0
    finally:
        restarted.stop()


def test_refused_events_are_counted(standin, make_client):
    standin.refuse_kinds["task.exploded"] = "unknown_kind"
    c = make_client()
    c.emit("celery", "task.received", "a")
    c.emit("celery", "task.exploded", "b")
    c.emit("celery", "task.succeeded", "c")
    assert c.flush(5)
    stats = c.stats()
    assert stats["sent"] == 2 and stats["refused"] == 1 and stats["dropped"] == 1
    assert stats["refused_by_code"] == {"unknown_kind": 1}


def test_a_message_refused_whole_counts_every_event(standin, make_client):
    standin.refuse_messages = "spool_error"
    c = make_client()
    for i in range(4):
        c.emit("celery", "task.received", f"t-{i}")
    assert c.flush(5)
    stats = c.stats()
    assert stats["sent"] == 0 and stats["refused"] == 4
    assert stats["refused_by_code"] == {"spool_error": 4}


def test_flush_waits_for_the_daemons_ack(standin, make_client):
    standin.hold_acks = True
    c = make_client()
    c.emit("celery", "task.received", "t")
    standin.wait_for(lambda: standin.events())
    assert c.flush(0.3) is False
    assert c.stats()["queued"] == 1 and c.stats()["sent"] == 0


def test_an_event_that_fails_to_queue_is_not_waited_for(standin, make_client):
    """An exception after the event was counted (here the queue itself fails) drops
    it as unavailable and takes it back out of what flush waits for."""
    c = make_client()
    assert c.emit("celery", "task.received", "first")
    assert c.flush(5)

    def broken(event):
        raise RuntimeError("queue broken")
    c._queue.put = broken
    assert c.emit("celery", "task.received", "lost") is False
    del c._queue.put
    stats = c.stats()
    assert stats["dropped_unavailable"] == 1 and stats["queued"] == 0, stats
    began = time.monotonic()
    assert c.flush(3) is True
    assert time.monotonic() - began < 1  # bound: it waited for nothing, not its 3 s


def test_emit_does_not_wait_for_the_sender(standin, make_client):
    """emit() takes no lock the background sender holds: with the client's
    lock held elsewhere (the sender settling a batch), it still queues."""
    c = make_client()
    assert c.emit("celery", "task.received", "warm-up")
    assert c.flush(5)
    done = []

    def emitter():
        for i in range(100):
            done.append(c.emit("celery", "task.received", f"t-{i}"))
    with c._lock:
        t = threading.Thread(target=emitter)
        t.start()
        t.join(5)
        assert not t.is_alive(), "emit() waited for the client's lock"
    assert done == [True] * 100
    assert c.flush(5)
    assert [e["task_id"] for e in standin.events()][1:] == [f"t-{i}" for i in range(100)]
    stats = c.stats()
    assert stats["accepted"] == 101 and stats["sent"] == 101 and stats["queued"] == 0, stats


def test_event_ids_do_not_follow_the_applications_random_seed():
    import random
    random.seed(1234)
    first = [client_module._new_event_id() for _ in range(5)]
    random.seed(1234)
    assert [client_module._new_event_id() for _ in range(5)] != first


def test_event_ids_are_uuid4_and_a_forked_child_draws_others():
    ids = {client_module._new_event_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(r)
        os.write(w, ",".join(client_module._new_event_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = set(f.read().split(","))
    os.waitpid(pid, 0)
    parent = {client_module._new_event_id() for _ in range(50)}
    assert len(child) == 50 and not child & parent


def test_the_timestamp_text_matches_the_clock_across_seconds():
    for _ in range(3):
        before = datetime.now(timezone.utc)
        text = client_module.utc_now_iso()
        after = datetime.now(timezone.utc)
        assert ISO_UTC.match(text), text
        assert before <= datetime.fromisoformat(text) <= after
        time.sleep(0.6)  # the next one is in another second at least once


def test_the_event_queue_wakes_a_waiting_sender_and_keeps_its_bound():
    q = client_module._EventQueue(3)
    got = []
    t = threading.Thread(target=lambda: got.append(q.take(10, 30.0)))
    t.start()
    time.sleep(0.1)  # the taker is waiting now
    began = time.monotonic()
    assert q.put("a")
    t.join(10)
    assert got == [["a"]]
    assert time.monotonic() - began < 5  # woken by the put, not by its 30 s wait
    assert [q.put(x) for x in "bcde"] == [True, True, True, False]
    assert len(q) == 3 and q.taken == 1
    assert q.take(2, 0) == ["b", "c"] and q.taken == 3
    assert q.drain() == ["d"] and q.taken == 4 and len(q) == 0
    assert q.take(5, 0) == [] and q.taken == 4


def test_unacknowledged_batches_are_sent_again_after_a_reconnect(sock_path, standin, make_client):
    from standin import StandIn

    standin.hold_acks = True
    c = make_client()
    c.emit("celery", "task.received", "t-1")
    standin.wait_for(lambda: standin.events())
    standin.stop()
    restarted = StandIn(sock_path)
    try:
        assert c.flush(8)
        assert [e["task_id"] for e in restarted.events()] == ["t-1"]
        assert c.stats()["sent"] == 1
    finally:
        restarted.stop()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_send_durable(standin, make_client, framing):
    c = make_client(framing=framing)
    events = [{"engine": "celery", "kind": "task.received", "task_id": f"d-{i}"} for i in range(3)]
    assert c.send_durable(events) == 3
    (peer, msg), = standin.all("events")
    assert msg["ack_id"] is not None and len(msg["events"]) == 3
    assert c.send_durable([]) == 0
    assert c.stats()["sent"] == 3


def test_send_durable_refused(standin, make_client):
    standin.refuse_kinds["task.exploded"] = "unknown_kind"
    c = make_client()
    events = [{"engine": "celery", "kind": "task.received", "task_id": "ok"},
              {"engine": "celery", "kind": "task.exploded", "task_id": "bad"}]
    with pytest.raises(z4j_agentd.EventRefused) as info:
        c.send_durable(events)
    assert info.value.code == "unknown_kind"
    assert "task.exploded" in info.value.message
    assert info.value.stored == 1
    assert info.value.errors[0]["index"] == 1
    assert c.stats()["refused"] == 1 and c.stats()["sent"] == 1


def test_send_durable_unavailable(sock_path, standin, make_client):
    c = make_client(socket_path=sock_path + ".missing")
    with pytest.raises(z4j_agentd.DaemonUnavailable):
        c.send_durable([{"engine": "celery", "kind": "task.received", "task_id": "x"}])
    standin.hold_acks = True
    c2 = make_client()
    started = time.monotonic()
    with pytest.raises(z4j_agentd.DaemonUnavailable):
        c2.send_durable([{"engine": "celery", "kind": "task.received", "task_id": "x"}], timeout=0.3)
    assert time.monotonic() - started < 2
    standin.hold_acks = False
    assert c2.send_durable([{"engine": "celery", "kind": "task.received", "task_id": "y"}]) == 1


FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"


@pytest.mark.filterwarnings(FORK_WARNING)
def test_fork_child_has_its_own_client(standin, make_client):
    c = make_client()
    c.emit("celery", "task.received", "parent-1")
    assert c.flush(5)
    parent_conn_pids = {p.pid for p in standin.peers}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_fd)
            fresh = c.stats()["sent"] == 0 and c.stats()["pid"] == os.getpid()
            queued = c.emit("celery", "task.started", "child-1", {"from": "child"})
            ok = c.flush(5)
            report = {"fresh": fresh, "queued": queued, "ok": ok, "stats": c.stats()}
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert report["fresh"] and report["queued"] and report["ok"], report
    assert report["stats"]["sent"] == 1
    child_events = [e for e in standin.events() if e["task_id"] == "child-1"]
    assert len(child_events) == 1 and child_events[0]["_pid"] == pid
    assert pid not in parent_conn_pids
    # the parent's connection survived the child's exit
    c.emit("celery", "task.received", "parent-2")
    assert c.flush(5)
    parent_events = [e for e in standin.events() if e["task_id"].startswith("parent")]
    assert [e["_pid"] for e in parent_events] == [os.getpid(), os.getpid()]
    stats = c.stats()
    assert stats["sent"] == 2 and stats["reconnects"] == 0


@pytest.mark.filterwarnings(FORK_WARNING)
def test_fork_while_the_sender_is_busy(standin, make_client):
    c = make_client()
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            c.emit("celery", "task.received", f"p-{i}")
            i += 1
            time.sleep(0.0005)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(0.05)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                c.emit("celery", "task.received", "from-child")
                code = 0 if c.flush(5) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        producer.join()
    assert c.flush(5)
    assert [e["_pid"] for e in standin.events() if e["task_id"] == "from-child"] == [pid]
    assert c.stats()["dropped"] == 0


def test_serve_answers_commands(standin, make_client):
    c = make_client(engines=["celery"], capabilities={"celery": ["retry_by_reference_v1"]})
    seen = []

    def cancel(command):
        seen.append(command)
        return {"task_id": command["parameters"]["task_id"], "revoked": True}

    def boom(command):
        raise RuntimeError("broker unreachable")

    c.serve({("celery", "cancel_task"): cancel, ("celery", "purge_queue"): boom,
             ("celery", "rate_limit"): lambda cmd: "not a dict", ("celery", "restart_worker"): lambda cmd: None})
    peer = standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
    assert peer.hello["capabilities"] == {
        "celery": ["cancel_task", "purge_queue", "rate_limit", "restart_worker", "retry_by_reference_v1"]}
    assert peer.hello["pid"] == os.getpid()
    standin.wait_for(lambda: c.stats()["commands_registered"])

    ok = standin.send_command("celery", "cancel_task", {"task_id": "t-9"})
    assert ok["status"] == "success" and ok["result"] == {"task_id": "t-9", "revoked": True}
    assert ok["error"] is None
    assert seen[0]["parameters"] == {"engine": "celery", "task_id": "t-9"}
    assert seen[0]["timeout_seconds"] == 9.0

    failed = standin.send_command("celery", "purge_queue")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: broker unreachable"
    assert failed["result"] is None
    wrong = standin.send_command("celery", "rate_limit")
    assert wrong["status"] == "failed" and "not a dict" in wrong["error"]
    none = standin.send_command("celery", "restart_worker")
    assert none["status"] == "success" and none["result"] is None

    stats = c.stats()
    assert stats["commands_received"] == 4
    assert stats["commands_succeeded"] == 2 and stats["commands_failed"] == 2
    # events still go on their own connection, which declares no capabilities
    c.emit("celery", "task.received", "t")
    assert c.flush(5)
    event_peers = {p.id for p, _ in standin.all("events")}
    assert peer.id not in event_peers


def test_serve_unknown_action_fails_and_bad_keys_raise(standin, make_client):
    c = make_client()
    with pytest.raises(TypeError):
        c.serve({"cancel_task": lambda cmd: None})
    c.serve({("celery", "cancel_task"): lambda cmd: None})
    peer = standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
    peer.send({"type": "command", "id": "c-1", "action": "purge_queue",
               "target": {"type": "queue", "id": "q", "engine": "celery"},
               "parameters": {"queue": "q"}, "timeout_seconds": 5})
    result = standin.wait_for(lambda: [m for _, m in standin.all("command_result") if m["id"] == "c-1"])[0]
    assert result["status"] == "failed" and "no handler" in result["error"]


def test_serve_says_hello_again_after_a_restart(sock_path, standin, make_client):
    from standin import StandIn

    c = make_client()
    c.serve({("celery", "cancel_task"): lambda cmd: {"ok": True}})
    standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
    standin.stop()
    restarted = StandIn(sock_path)
    try:
        result = restarted.send_command("celery", "cancel_task", {"task_id": "t"}, timeout=8)
        assert result["status"] == "success" and result["result"] == {"ok": True}
    finally:
        restarted.stop()


def test_serve_hello_names_workers_schedulers_and_features(standin, make_client):
    c = make_client(engines=["celery"])
    c.serve({("celery", "restart_worker"): lambda cmd: None}, workers=["celery@h1"])
    c.serve({}, capabilities={"celery-beat": ["list", "trigger_now"]}, schedulers=["celery-beat"],
            runtime_features=["external_schedule_protocol_v1"], workers=["celery@h1", "celery@h2"])
    with pytest.raises(TypeError):
        c.serve({}, workers=[""])

    def latest():
        peer = standin.command_peer("celery", "restart_worker")
        return peer if peer is not None and peer.hello.get("schedulers") else None

    hello = standin.wait_for(latest).hello
    assert hello["workers"] == ["celery@h1", "celery@h2"]
    assert hello["schedulers"] == ["celery-beat"]
    assert hello["runtime_features"] == ["external_schedule_protocol_v1"]
    # the scheduler's capabilities are keyed by its name, which is no engine
    assert hello["capabilities"]["celery-beat"] == ["list", "trigger_now"]
    assert hello["engines"] == ["celery"]


def test_report_health_sends_the_source_on_the_command_connection(standin, make_client):
    c = make_client(engines=["celery"])
    calls = []

    def source():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("broker away")
        return {"celery": {"queue_depths": {"default": len(calls)}}}

    with pytest.raises(ValueError):
        c.report_health(source, interval=0)
    c.report_health(source, interval=0.2)
    assert standin.all("health") == []  # nothing before the command connection says hello
    c.serve({("celery", "cancel_task"): lambda cmd: None})
    peer = standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
    reports = standin.wait_for(lambda: [m for p, m in standin.all("health") if len(standin.all("health")) >= 2])
    assert all(p.id == peer.id for p, _ in standin.all("health"))
    assert reports[0] == {"type": "health", "interval_seconds": 0.2,
                          "engines": {"celery": {"queue_depths": {"default": 1}}}}
    assert reports[1]["engines"]["celery"]["queue_depths"] == {"default": 3}  # the failed call was skipped
    stats = c.stats()
    assert stats["health_source_failures"] == 1 and stats["health_last_error"] == "RuntimeError: broker away"
    assert stats["health_reports_sent"] >= 2
    c.close(timeout=2)
    assert not c._health_thread.is_alive()


def test_close_stops_every_thread(standin, make_client):
    c = make_client()
    c.serve({("celery", "cancel_task"): lambda cmd: None})
    c.emit("celery", "task.received", "t")
    standin.wait_for(lambda: standin.command_peer("celery", "cancel_task"))
    c.close(timeout=2)
    assert standin.events()[0]["task_id"] == "t"  # flushed before closing
    assert not c._thread.is_alive() and not c._cmd_thread.is_alive()
    assert c.stats()["closed"] is True and c.stats()["dropped"] == 0
    c.close()  # twice is fine


def test_module_level_default_client(standin, sock_path):
    configured = z4j_agentd.configure(socket_path=sock_path, framework="bare", engines=["rq"])
    assert z4j_agentd.get_client() is configured
    assert z4j_agentd.emit("rq", "task.received", "m-1", {"task_name": "jobs.run"})
    assert z4j_agentd.record({"engine": "rq", "kind": "task.started", "task_id": "m-1"})
    assert configured.flush(5)
    assert [e["task_id"] for e in standin.events()] == ["m-1", "m-1"]
    replacement = z4j_agentd.configure(socket_path=sock_path)
    assert configured.stats()["closed"] and z4j_agentd.get_client() is replacement


def test_get_client_is_lazy(monkeypatch, sock_path):
    monkeypatch.setenv("Z4J_SOCKET_PATH", sock_path)
    c = z4j_agentd.get_client()
    assert c is z4j_agentd.get_client() and c.socket_path == sock_path
    assert c._thread is None  # nothing runs before the first event


def test_ping_and_daemon_stats(standin, make_client, sock_path):
    c = make_client()
    assert c.ping() is True
    assert c.daemon_stats()["version"] == "stand-in"
    missing = make_client(socket_path=sock_path + ".missing")
    assert missing.ping(timeout=0.2) is False
    with pytest.raises(z4j_agentd.DaemonUnavailable):
        missing.daemon_stats(timeout=0.2)


def test_cli(standin, sock_path):
    env = dict(os.environ)
    run = [sys.executable, "-m", "z4j_agentd"]
    ping = subprocess.run(run + ["ping", "--socket", sock_path], capture_output=True, text=True, env=env, timeout=30)
    assert ping.returncode == 0 and "pong" in ping.stdout
    stats = subprocess.run(run + ["stats", "--socket", sock_path], capture_output=True, text=True, env=env,
                           timeout=30)
    assert stats.returncode == 0 and json.loads(stats.stdout)["version"] == "stand-in"
    env["Z4J_SOCKET_PATH"] = sock_path + ".missing"
    down = subprocess.run(run + ["ping"], capture_output=True, text=True, env=env, timeout=30)
    assert down.returncode == 1 and "no z4j-agentd answers" in down.stderr


def test_json_safe():
    class Thing:
        def __repr__(self):
            return "<thing>"

    class Broken:
        def __repr__(self):
            raise ValueError("no")

    deep = []
    cur = deep
    for _ in range(50):
        nxt = []
        cur.append(nxt)
        cur = nxt
    safe = z4j_agentd.json_safe({
        "nan": float("nan"), "inf": float("-inf"), "b": b"\xff\x00", "t": (1, 2), "s": frozenset(["a"]),
        1: "int key", None: "none key", "obj": Thing(), "broken": Broken(), "big": 2**70,
        "when": datetime(2026, 1, 2, tzinfo=timezone.utc), "uuid": uuid.UUID(int=1), "deep": deep,
        "surrogate": "\ud800",
    })
    assert safe["nan"] == "nan" and safe["inf"] == "-inf" and safe["b"] == "b'\\xff\\x00'"
    assert safe["t"] == [1, 2] and safe["s"] == ["a"] and safe["1"] == "int key" and safe["None"] == "none key"
    assert safe["obj"] == "<thing>" and safe["broken"].startswith("<unrepresentable Broken")
    assert safe["big"] == str(2**70) and safe["when"] == "2026-01-02T00:00:00+00:00"
    assert safe["uuid"] == "00000000-0000-0000-0000-000000000001"
    assert safe["surrogate"] == "?"
    json.dumps(safe, allow_nan=False)  # encodable
    text = z4j_agentd.bounded("x" * 100000, max_bytes=1000)
    assert isinstance(text, str) and len(text) < 1100 and "truncated" in text
    assert z4j_agentd.bounded({"a": 1}) == {"a": 1}
