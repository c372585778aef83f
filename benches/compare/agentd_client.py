#!/usr/bin/env python3
"""One local application process writing events to z4j-agentd (end-to-end case).

    agentd_client.py SOCKET N PREFIX

Natively framed (u32 big-endian length + MessagePack map, see
docs/local-protocol.md). Sends the N events one `event` message each, each
with an `ack_id`, and waits for every ack before the next message: the same
call pattern as z4j-bare's synchronous `record_event`, and every event is in
the daemon's spool (committed) when its ack comes back. Then it polls the
daemon's `stats` until the brain has acknowledged all N (`acked`) and the
spool is empty.

Protocol with the driver: prints {"ready": ...}, waits for a line on stdin,
runs, prints one JSON result line.
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import sys
import time

import msgpack

from common import emit, lifecycle_events, wait_go


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def send(self, msg: dict) -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("z4j-agentd closed the connection")
            self.buf += chunk

    def recv(self) -> dict:
        self._fill(4)
        (size,) = struct.unpack(">I", self.buf[:4])
        self._fill(4 + size)
        body, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
        return msgpack.unpackb(body, raw=False)

    def request(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    path, n, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    events = lifecycle_events(n, prefix)
    conn = Conn(path)
    ctl = Conn(path)
    before = ctl.request({"type": "stats"})
    emit({"ready": True, "uplink_state": before.get("uplink_state")})
    wait_go()
    c0 = cpu_s()
    t0 = time.monotonic()
    for i, ev in enumerate(events, 1):
        conn.send({"type": "event", **ev, "ack_id": i})
        reply = conn.recv()
        if reply.get("type") != "ack" or reply.get("ack_id") != i or reply.get("stored") != 1:
            raise SystemExit(f"unexpected reply to event {i}: {json.dumps(reply)}")
    t_written = time.monotonic()
    cpu = cpu_s() - c0
    target = before.get("acked", 0) + n
    while True:
        st = ctl.request({"type": "stats"})
        if st.get("acked", 0) >= target and st.get("spool_depth", 1) == 0:
            break
        if time.monotonic() - t0 > 1800:
            raise SystemExit(f"not drained after 30 min: {json.dumps(st)}")
        time.sleep(0.02)
    t_drained = time.monotonic()
    emit({"t0": t0, "t_written": t_written, "t_drained": t_drained, "client_cpu_s": cpu,
          "daemon_acked": st.get("acked", 0) - before.get("acked", 0), "daemon_resent": st.get("resent"),
          "daemon_connects": st.get("connects")})


if __name__ == "__main__":
    main()
