#!/usr/bin/env python3
"""The brain's own ceiling: a minimal client speaking protocol v2 directly.

    ceiling.py N PREFIX BATCH WINDOW   (env: Z4J_BRAIN_URL, Z4J_TOKEN, Z4J_HMAC_SECRET)

WebSocket to <brain>/ws/agent with the bearer token, `hello`, then signed
`event_batch` frames of exactly BATCH events (the last one smaller if N is
not a multiple), at most WINDOW frames awaiting their `event_batch_ack`: the
next frame is sent when an ack arrives. BATCH 100 with WINDOW 1 is the
batching the protocol doc (section 12) found best for this brain; BATCH 250
with WINDOW 2 is what z4j-agentd does by default. A heartbeat goes out every
`heartbeat_interval_seconds`. Inbound frames are not HMAC-verified (a load
client; the acks are matched by `acked_id`).

Protocol with the driver: prints {"ready": ...} after `hello_ack`, waits for
a line on stdin, runs, prints one JSON result line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import secrets
import sys
import time
from datetime import datetime, timezone

import websockets

from common import emit, lifecycle_events, percentile, wait_go


def signing_key(secret: str) -> bytes:
    secret = secret.strip()
    key = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    if len(key) < 32:
        raise SystemExit("Z4J_HMAC_SECRET decodes to fewer than 32 bytes")
    return key


class Session:
    def __init__(self, ws, hello_ack: dict, key: bytes) -> None:
        p = hello_ack["payload"]
        self.ws = ws
        self.key = key
        self.binding = {"agent_id": p["agent_id"], "project_id": p["project_id"], "session_id": p["session_id"]}
        self.heartbeat_s = p["heartbeat_interval_seconds"]
        self.seq = 0
        self.waiting: dict = {}
        self.lock = asyncio.Lock()

    async def send_signed(self, ftype: str, fid: str, payload: dict) -> None:
        async with self.lock:  # seq must reach the brain in increasing order
            self.seq += 1
            frame = {"v": 2, "type": ftype, "id": fid, "ts": datetime.now(timezone.utc).isoformat(),
                     "nonce": secrets.token_urlsafe(16), "seq": self.seq, "payload": payload}
            signed = dict(frame, **self.binding)  # the HMAC covers the session binding too
            canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False).encode()
            frame["hmac"] = hmac.new(self.key, canonical, hashlib.sha256).hexdigest()
            await self.ws.send(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))

    async def read_loop(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame.get("type") == "event_batch_ack":
                fut = self.waiting.pop(frame["payload"].get("acked_id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame["payload"])
            elif frame.get("type") == "error":
                print(f"brain error frame: {frame.get('payload')}", file=sys.stderr)

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.send_signed("heartbeat", "hb_" + secrets.token_hex(8), {})

    async def batch(self, events: list) -> dict:
        fid = "ev_" + secrets.token_hex(16)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[fid] = fut
        await self.send_signed("event_batch", fid, {"events": events})
        return await asyncio.wait_for(fut, timeout=120)


async def run(n: int, prefix: str, batch: int, window: int) -> None:
    events = lifecycle_events(n, prefix)
    key = signing_key(os.environ["Z4J_HMAC_SECRET"])
    base = os.environ["Z4J_BRAIN_URL"].rstrip("/")
    url = ("wss://" + base[8:] if base.startswith("https://") else "ws://" + base[7:]) + "/ws/agent"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {os.environ['Z4J_TOKEN']}"},
                                  max_size=2 ** 20, ping_interval=60, ping_timeout=60) as ws:
        now = datetime.now(timezone.utc).isoformat()
        await ws.send(json.dumps({"v": 2, "type": "hello", "id": "hello_" + secrets.token_hex(8), "ts": now,
                                  "payload": {"protocol_version": "2", "agent_version": "0.0.0",
                                              "framework": "bare", "engines": [], "host": {"name": "compare-ceiling"},
                                              "worker_id": f"ceiling-{os.getpid()}", "worker_role": "other",
                                              "worker_pid": os.getpid(), "worker_started_at": now}}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        if ack.get("type") != "hello_ack":
            raise SystemExit(f"expected hello_ack, got {ack}")
        s = Session(ws, ack, key)
        reader = asyncio.create_task(s.read_loop())
        beats = asyncio.create_task(s.heartbeats())
        emit({"ready": True, "session_id": s.binding["session_id"]})
        await asyncio.get_running_loop().run_in_executor(None, wait_go)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        lat, acks = [], []
        slots = asyncio.Semaphore(window)

        async def one(chunk: list) -> None:
            try:
                a = time.monotonic()
                acks.append(await s.batch(chunk))
                lat.append(time.monotonic() - a)
            finally:
                slots.release()

        sending = []
        for i in range(0, n, batch):
            await slots.acquire()
            sending.append(asyncio.create_task(one(events[i:i + batch])))
        await asyncio.gather(*sending)
        t_drained = time.monotonic()
        accepted, frames = sum(p.get("accepted", 0) for p in acks), len(acks)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        beats.cancel()
        reader.cancel()
    lat.sort()
    emit({"t0": t0, "t_written": t_drained, "t_drained": t_drained, "frames": frames, "accepted": accepted,
          "ack_ms_p50": 1000 * percentile(lat, 0.5), "ack_ms_max": 1000 * lat[-1],
          "client_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)})


def main() -> None:
    asyncio.run(run(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))


if __name__ == "__main__":
    main()
