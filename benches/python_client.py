#!/usr/bin/env python3
"""Cost of the Python client's emit() and its throughput into a daemon.

    python benches/python_client.py SOCKET [msgpack|json] [N]

Emits N (default 100,000) task events of about 200 bytes of data from one
thread, timing each call, then waits until the daemon has committed all of
them (flush). Run it against a daemon whose brain is unreachable, so the
figures are the client's and the socket's, not the brain's. Needs the
client installed (pip install ./clients/python[msgpack]).
"""

import sys
import time

import z4j_agentd


def main() -> None:
    socket_path = sys.argv[1]
    framing = sys.argv[2] if len(sys.argv) > 2 else "msgpack"
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
    c = z4j_agentd.Client(socket_path, framing=framing, queue_size=n * 2)
    data = {"task_name": "proj.tasks.add", "queue": "default", "worker": "celery@web-1",
            "args": [1, 2], "kwargs": {}}
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        c.emit("celery", "task.received", f"t-{i}", data)
        lat.append(time.perf_counter() - a)
    t1 = time.perf_counter()
    flushed = c.flush(120)
    t2 = time.perf_counter()
    lat.sort()
    s = c.stats()
    c.close()
    print(f"{framing}: {n} emits: mean {(t1 - t0) / n * 1e6:.1f} us, p50 {lat[n // 2] * 1e6:.1f} us, "
          f"p99 {lat[int(n * 0.99)] * 1e6:.1f} us, p99.9 {lat[int(n * 0.999)] * 1e6:.1f} us; "
          f"committed by the daemon after {t2 - t0:.2f} s = {n / (t2 - t0):,.0f} events/s; "
          f"flushed={flushed} sent={s['sent']} dropped={s['dropped']}")
    sys.exit(0 if flushed and s["sent"] == n else 1)


if __name__ == "__main__":
    main()
