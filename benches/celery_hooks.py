#!/usr/bin/env python3
"""What one Celery signal receiver of `z4j_agentd.celery.install(app)` costs
the task that triggers it.

    python benches/celery_hooks.py [SOCKET] [N]

Calls the receivers the way Celery's signals do, N times each (default
20,000), on a real Celery app and Task (its request context pushed as the
worker does), timing every call:

* `task_received` (worker main process), with the request of a task that
  has args and kwargs;
* `task_prerun` in a pool child (a task it did not receive itself, so it
  queues task.received again and task.started), `task_success` and
  `task_postrun`: one task's path through a pool child;
* `task_failure` with a real exception, traceback and ExceptionInfo;
* `task_success` through Celery's own signal dispatch
  (`signals.task_success.send`), for the dispatcher's share.

With SOCKET (a running `z4j-agentd run`, best with its brain unreachable so
the figure is the client's), the client's sender thread hands events over
while the receivers run (a queue of 200,000, so none is dropped). Without it
the socket does not exist: the queue (10,000 events, the default) fills and
every further event takes the drop path (counted `dropped_queue_full`).
Either way a receiver only builds an event and puts it in the process's
queue: no network call, no wait. Prints one line per receiver: mean, p50,
p99, p99.9 in µs, and the client's counters.
"""

from __future__ import annotations

import statistics
import sys
import time
from types import SimpleNamespace

from celery import Celery, signals

import z4j_agentd
import z4j_agentd.celery as z4j_celery


def timed(label: str, n: int, call) -> dict:
    lat = []
    for i in range(n):
        a = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - a)
    lat.sort()
    return {"label": label, "mean": statistics.fmean(lat) * 1e6, "p50": lat[n // 2] * 1e6,
            "p99": lat[int(n * 0.99)] * 1e6, "p999": lat[int(n * 0.999)] * 1e6}


def main() -> None:
    socket_path = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].isdigit() else "/nonexistent/z4j-bench.sock"
    n = int(sys.argv[-1]) if sys.argv[-1].isdigit() else 20_000
    app = Celery("bench", broker="memory://")

    @app.task(name="bench.add", bind=True)
    def add(self, x, y, scale=1):
        return (x + y) * scale

    task = app.tasks["bench.add"]
    # With a daemon, a queue that holds the whole run: the figures are the receivers' and the
    # hand-over's, not the drop path's (this loop emits far faster than any worker runs tasks).
    daemon = not socket_path.startswith("/nonexistent/")
    client = z4j_agentd.Client(socket_path, process="celery-hooks-bench", queue_size=200_000 if daemon else 10_000)
    z4j_celery.install(app, client, serve_commands=False)
    hooks = z4j_celery.installed()
    delivery = {"routing_key": "celery", "exchange": ""}

    def request(tid: str) -> SimpleNamespace:
        return SimpleNamespace(id=tid, name="bench.add", args=[1, 2], kwargs={"scale": 3},
                               delivery_info=delivery, hostname="celery@bench", parent_id=None,
                               root_id=None, retries=0)

    def received(i: int) -> None:
        hooks.on_task_received(sender=None, request=request(f"r-{i}"))

    def in_child(i: int) -> None:
        tid = f"c-{i}"
        task.push_request(id=tid, hostname="celery@bench", delivery_info=delivery, args=[1, 2],
                          kwargs={"scale": 3}, retries=0)
        try:
            hooks.on_task_prerun(sender=task, task_id=tid, task=task, args=(1, 2), kwargs={"scale": 3})
            hooks.on_task_success(sender=task, result=9, runtime=0.0005)
            hooks.on_task_postrun(sender=task, task_id=tid, task=task, retval=9, state="SUCCESS")
        finally:
            task.pop_request()

    from billiard.einfo import ExceptionInfo

    try:
        raise ValueError("bench failure")
    except ValueError as exc:
        failure, einfo = exc, ExceptionInfo()

    def failed(i: int) -> None:
        tid = f"f-{i}"
        task.push_request(id=tid, hostname="celery@bench", delivery_info=delivery, args=[], kwargs={})
        try:
            hooks.on_task_failure(sender=task, task_id=tid, exception=failure, args=[], kwargs={},
                                  traceback=failure.__traceback__, einfo=einfo)
        finally:
            task.pop_request()

    def dispatched(i: int) -> None:
        task.push_request(id=f"d-{i}", hostname="celery@bench", delivery_info=delivery)
        try:
            signals.task_success.send(sender=task, result=9, runtime=0.0005)
        finally:
            task.pop_request()

    # Warm-up (imports, first connection attempt), not timed.
    for i in range(200):
        received(i)
        in_child(i)
    rows = [timed("task_received (main process)", n, received),
            timed("task_prerun + task_success + task_postrun (pool child, 3 receivers, 3 events)", n, in_child),
            timed("task_failure (traceback 1 frame)", n, failed),
            timed("task_success via signals.task_success.send", n, dispatched)]
    stats = client.stats()
    client.close(timeout=5)
    where = f"daemon at {socket_path}" if daemon else "no daemon"
    print(f"{where}; N={n} calls per line; Python {sys.version.split()[0]}")
    for r in rows:
        print(f"  {r['label']}: mean {r['mean']:.1f} us, p50 {r['p50']:.1f} us, p99 {r['p99']:.1f} us, "
              f"p99.9 {r['p999']:.1f} us")
    print(f"  client: accepted {stats['accepted']}, sent {stats['sent']}, queued {stats['queued']}, "
          f"dropped_queue_full {stats['dropped_queue_full']}, connect_failures {stats['connect_failures']}")


if __name__ == "__main__":
    main()
