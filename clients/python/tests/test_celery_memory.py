"""The memory z4j_agentd.celery keeps for retry_task stays bounded whatever
the tasks' arguments: the main process keeps args and kwargs only up to
MAX_REMEMBERED_ARGS_BYTES per task and MAX_REMEMBERED_ARGS_TOTAL in all, a
pool child only task ids; a retry of a task whose arguments were left out
reads them from the result backend, or says what to change."""

import json
import tracemalloc
from types import SimpleNamespace

import pytest

import z4j_agentd.celery as z4j_celery
from z4j_agentd.celery import (MAX_REMEMBERED_ARGS_BYTES, MAX_REMEMBERED_ARGS_TOTAL, REMEMBERED_IDS_ONLY,
                               REMEMBERED_TASKS, _Hooks)
from test_celery import FakeApp, RecordingClient, fake_request

TASKS = 20_000
#: What one remembered entry may take besides its arguments (id, tuple,
#: map slots; measured about 0.3 KB), generously.
ENTRY_BYTES = 600


@pytest.fixture
def hooks():
    client = RecordingClient()
    yield _Hooks(FakeApp(), client, serve_commands=True)
    client.close(timeout=0)


def remember_many(hooks, make_args, limit):
    """Remembers TASKS tasks; fails as soon as the traced memory grows past
    `limit` (so a map without a bound fails early, not after gigabytes)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        peak_kept = 0
        for i in range(TASKS):
            args, kwargs = make_args(i)
            hooks._remember(f"task-{i:08d}", "proj.tasks.big", args, kwargs, "default", "application/json")
            del args, kwargs
            if i % 500 == 499 or i == TASKS - 1:
                kept = tracemalloc.get_traced_memory()[0] - base
                peak_kept = max(peak_kept, kept)
                assert kept < limit, f"after {i + 1} tasks the map takes {kept:,} bytes (bound {limit:,})"
        return peak_kept
    finally:
        tracemalloc.stop()


def test_large_arguments_are_not_kept_and_the_map_stays_small(hooks):
    def make_args(i):
        if i % 10:  # one 100 KB string (refused before encoding)
            return ["x" * 100_000 + str(i)], {}
        return [], {"rows": [f"{i:08d}" + "y" * 92] * 1000}  # 100 KB once encoded

    kept = remember_many(hooks, make_args, limit=REMEMBERED_TASKS * ENTRY_BYTES)
    assert len(hooks._remembered) == REMEMBERED_TASKS
    assert hooks._remembered_args_bytes == 0 and not hooks._remembered_args
    print(f"\n20,000 tasks with 100 KB arguments: the map keeps {kept:,} bytes")
    last = hooks.remembered(f"task-{TASKS - 1:08d}")
    assert last["task_name"] == "proj.tasks.big" and last["queue"] == "default" and "args" not in last
    assert "more than 4,096 bytes as JSON" in last["args_left_out"]
    encoded = hooks.remembered(f"task-{TASKS - 10:08d}")
    size = len(json.dumps([[], make_args(TASKS - 10)[1]], separators=(",", ":")))
    assert f"they take {size:,} bytes as JSON" in encoded["args_left_out"]  # measured, encoded


def test_small_arguments_are_kept_within_the_total(hooks):
    def make_args(i):  # just under the per-task bound: only the total limits them
        return [f"{i:08d}" + "z" * (MAX_REMEMBERED_ARGS_BYTES - 40)], {"n": i}

    kept = remember_many(hooks, make_args,
                         limit=MAX_REMEMBERED_ARGS_TOTAL + REMEMBERED_TASKS * (ENTRY_BYTES + 100))
    assert len(hooks._remembered) == REMEMBERED_TASKS
    assert 0 < hooks._remembered_args_bytes <= MAX_REMEMBERED_ARGS_TOTAL
    assert hooks._remembered_args_bytes == sum(len(e[2]) for e in hooks._remembered.values() if e[2])
    print(f"\n20,000 tasks with 4 KB arguments: the map keeps {kept:,} bytes, "
          f"{len(hooks._remembered_args):,} with their arguments")
    newest = hooks.remembered(f"task-{TASKS - 1:08d}")
    assert newest["args"][0].startswith(f"{TASKS - 1:08d}") and newest["kwargs"] == {"n": TASKS - 1}
    oldest = hooks.remembered(f"task-{TASKS - REMEMBERED_TASKS:08d}")
    assert oldest["task_name"] == "proj.tasks.big" and "args" not in oldest
    assert "at most 1 MiB of arguments" in oldest["args_left_out"]
    assert hooks.remembered(f"task-{TASKS - REMEMBERED_TASKS - 1:08d}") == {}  # forgotten


def test_a_forked_child_keeps_only_ids(hooks):
    hooks._after_fork_in_child()  # as in a pool child
    kept = remember_many(hooks, lambda i: (["x" * 100_000 + str(i)], {"k": list(range(50))}),
                         limit=REMEMBERED_IDS_ONLY * ENTRY_BYTES)
    assert len(hooks._remembered) == REMEMBERED_IDS_ONLY
    assert set(hooks._remembered.values()) == {None}
    print(f"\n20,000 tasks in a pool child: the id set keeps {kept:,} bytes")


def test_a_retry_after_arguments_were_left_out_reads_the_result_backend(hooks):
    big = {"blob": "b" * (MAX_REMEMBERED_ARGS_BYTES + 1)}
    hooks.on_task_received(sender=None, request=fake_request(
        id="t-big", args=[1], kwargs=big, delivery_info={"routing_key": "slow"}, content_type="application/json"))
    hooks.app.backend["t-big"] = {"name": "app.tasks.add", "args": [1], "kwargs": big}
    params = {"task_id": "t-big", "original_had_args": True}
    result = hooks.retry_task({"parameters": params})
    assert result["queue"] == "slow"  # the queue is still remembered
    assert hooks.app.sent[-1]["args"] == [1] and hooks.app.sent[-1]["kwargs"] == big

    del hooks.app.backend["t-big"]
    with pytest.raises(ValueError) as failed:
        hooks.retry_task({"parameters": params})
    text = str(failed.value)
    assert "this worker received it but did not keep them" in text and "more than 4,096 bytes as JSON" in text
    assert "result_extended=True" in text and "override_args" in text
    # The operator's overrides still go to the task's own queue.
    hooks.retry_task({"parameters": {**params, "override_args": [2], "override_kwargs": {}}})
    assert hooks.app.sent[-1] == {"name": "app.tasks.add", "args": [2], "kwargs": {}, "queue": "slow"}


def test_arguments_of_another_serializer_are_not_kept(hooks):
    # pickle could carry tuples, sets, dates: JSON would change them.
    hooks.on_task_received(sender=None, request=fake_request(
        id="t-pickle", args=[(1, 2)], kwargs={}, content_type="application/x-python-serialize"))
    kept = hooks.remembered("t-pickle")
    assert "args" not in kept and "not sent as JSON" in kept["args_left_out"]
    hooks.app.backend["t-pickle"] = {"name": "app.tasks.add", "args": [(1, 2)], "kwargs": {}}
    hooks.retry_task({"parameters": {"task_id": "t-pickle", "original_had_args": True}})
    assert hooks.app.sent[-1]["args"] == [(1, 2)]


def test_a_task_received_again_counts_its_arguments_once(hooks):
    for _ in range(3):  # a retried task comes back with the same id
        hooks._remember("t-same", "app.tasks.add", [1, 2], {"k": "v"}, "default")
    assert list(hooks._remembered_args) == ["t-same"]
    assert hooks._remembered_args_bytes == len(b'[[1,2],{"k":"v"}]')
    hooks._remember("t-same", "app.tasks.add", ["x" * 5000], {}, "default")
    assert hooks._remembered_args_bytes == 0 and "args_left_out" in hooks.remembered("t-same")


def test_a_process_that_serves_no_commands_keeps_only_ids():
    client = RecordingClient()
    try:
        hooks = _Hooks(FakeApp(), client, serve_commands=False)
        hooks.on_task_received(sender=None, request=SimpleNamespace(
            id="t-web", name="app.tasks.add", args=[1], kwargs={}, delivery_info=None, hostname=None))
        assert hooks._remembered == {"t-web": None} and hooks.remembered("t-web") == {}
    finally:
        client.close(timeout=0)


def test_install_keeps_the_bound_after_a_real_fork():
    z4j_celery.install(FakeApp(), RecordingClient())
    try:
        from test_celery_fork import run_in_child

        installed = z4j_celery.installed()

        def child():
            installed._remember("t-c", "app.tasks.add", [1], {}, "default")
            return installed._forked and installed._remembered == {"t-c": None}

        assert run_in_child(child) == 0
        assert not installed._forked
    finally:
        z4j_celery.uninstall()
