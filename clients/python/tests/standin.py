"""A stand-in for z4j-agentd's local socket, standard library only.

A thread accepts connections on a Unix socket; each connection gets a
thread that tells the framing from the first byte (`{`: JSON lines, else
4-byte length + MessagePack, decoded here by a small codec of its own so the
client's encoding is checked independently of the msgpack package), records
every message with the peer's pid, and answers as the daemon does: `ack`
with `stored` after `event`/`events` with an `ack_id` (and an `error` with
`index` before it for each refused event), `hello_ack`, `pong`, `stats`,
`ack` for `command_result`. Knobs change that: refuse some kinds, refuse
whole messages, withhold acks. `send_command` writes a `command` to the
connection that declared the action.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional

# ---------------------------------------------------------------------------
# a minimal MessagePack codec (the subset the protocol uses)


def mp_pack(value: Any) -> bytes:
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes([value])
        if -32 <= value < 0:
            return struct.pack(">b", value)
        if value >= 0:
            return b"\xcf" + struct.pack(">Q", value)
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode("utf-8")
        if len(raw) < 32:
            return bytes([0xA0 | len(raw)]) + raw
        return b"\xdb" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, (list, tuple)):
        return b"\xdd" + struct.pack(">I", len(value)) + b"".join(mp_pack(v) for v in value)
    if isinstance(value, dict):
        return b"\xdf" + struct.pack(">I", len(value)) + b"".join(
            mp_pack(k) + mp_pack(v) for k, v in value.items())
    raise TypeError(f"cannot pack {type(value).__name__}")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated MessagePack")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]


def mp_unpack(data: bytes) -> Any:
    reader = _Reader(data)
    value = _mp_read(reader)
    if reader.pos != len(data):
        raise ValueError("trailing bytes after MessagePack value")
    return value


def _mp_read(r: _Reader) -> Any:
    b = r.take(1)[0]
    if b <= 0x7F:
        return b
    if b >= 0xE0:
        return b - 0x100
    if 0x80 <= b <= 0x8F:
        return _mp_map(r, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return [_mp_read(r) for _ in range(b & 0x0F)]
    if 0xA0 <= b <= 0xBF:
        return r.take(b & 0x1F).decode("utf-8")
    simple = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in simple:
        return simple[b]
    if b in (0xC4, 0xC5, 0xC6):
        raise ValueError("binary values are not allowed")
    ints = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if b in ints:
        return r.unpack(ints[b])
    if b == 0xCA:
        return r.unpack(">f")
    if b == 0xCB:
        return r.unpack(">d")
    if b in (0xD9, 0xDA, 0xDB):
        n = r.unpack({0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}[b])
        return r.take(n).decode("utf-8")
    if b in (0xDC, 0xDD):
        n = r.unpack(">H" if b == 0xDC else ">I")
        return [_mp_read(r) for _ in range(n)]
    if b in (0xDE, 0xDF):
        return _mp_map(r, r.unpack(">H" if b == 0xDE else ">I"))
    raise ValueError(f"unsupported MessagePack type byte 0x{b:02x}")


def _mp_map(r: _Reader, n: int) -> dict:
    out = {}
    for _ in range(n):
        key = _mp_read(r)
        if not isinstance(key, str):
            raise ValueError("non-string key")
        out[key] = _mp_read(r)
    return out


# ---------------------------------------------------------------------------


class Peer:
    """One client connection as the stand-in sees it."""

    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock = sock
        self.id = conn_id
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.framing: Optional[str] = None
        self.hello: Optional[dict] = None
        self.write_lock = threading.Lock()
        self.closed = False

    def send(self, msg: dict) -> None:
        if self.framing == "msgpack":
            body = mp_pack(msg)
            data = struct.pack(">I", len(body)) + body
        else:
            data = json.dumps(msg).encode("utf-8") + b"\n"
        with self.write_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass


class StandIn:
    """See the module documentation. `messages` holds (peer, message)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.messages: List[tuple] = []
        self.peers: List[Peer] = []
        #: kind -> error code: events of that kind are refused (with `index`).
        self.refuse_kinds: Dict[str, str] = {}
        #: when set, every events message is refused whole with this code.
        self.refuse_messages: Optional[str] = None
        #: when True, no ack is sent for events.
        self.hold_acks = False
        self.on_message: Optional[Callable[[Peer, dict], None]] = None
        self._next_id = 0
        if os.path.exists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    # -- serving ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self._next_id += 1
                peer = Peer(sock, self._next_id)
                self.peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: Peer) -> None:
        buf = b""
        try:
            while True:
                chunk = peer.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if peer.framing is None:
                    peer.framing = "jsonl" if buf[:1] == b"{" else "msgpack"
                while True:
                    msg, buf = self._next_message(peer, buf)
                    if msg is None:
                        break
                    self._handle(peer, msg)
        except OSError:
            pass
        finally:
            peer.closed = True
            try:
                peer.sock.close()
            except OSError:
                pass

    @staticmethod
    def _next_message(peer: Peer, buf: bytes):
        if peer.framing == "jsonl":
            nl = buf.find(b"\n")
            if nl < 0:
                return None, buf
            return json.loads(buf[:nl]), buf[nl + 1:]
        if len(buf) < 4:
            return None, buf
        (size,) = struct.unpack(">I", buf[:4])
        if len(buf) < 4 + size:
            return None, buf
        return mp_unpack(buf[4:4 + size]), buf[4 + size:]

    def _handle(self, peer: Peer, msg: dict) -> None:
        with self.lock:
            self.messages.append((peer, msg))
        if self.on_message is not None:
            self.on_message(peer, msg)
        kind = msg.get("type")
        ack_id = msg.get("ack_id")
        if kind in ("event", "events"):
            events = msg.get("events") if kind == "events" else [msg]
            if self.refuse_messages:
                peer.send({"type": "error", "code": self.refuse_messages, "message": "refused whole",
                           "ack_id": ack_id})
                return
            stored = 0
            for i, event in enumerate(events):
                code = self.refuse_kinds.get(event.get("kind"))
                if code:
                    err = {"type": "error", "code": code, "message": f"kind {event.get('kind')} refused"}
                    if ack_id is not None:
                        err["ack_id"] = ack_id
                    if kind == "events":
                        err["index"] = i
                    peer.send(err)
                else:
                    stored += 1
            if ack_id is not None and not self.hold_acks:
                peer.send({"type": "ack", "ack_id": ack_id, "stored": stored})
        elif kind == "hello":
            peer.hello = msg
            if ack_id is not None:
                peer.send({"type": "hello_ack", "ack_id": ack_id, "version": "stand-in"})
        elif kind == "ping":
            reply = {"type": "pong"}
            if ack_id is not None:
                reply["ack_id"] = ack_id
            peer.send(reply)
        elif kind == "stats":
            reply = {"type": "stats", "version": "stand-in", "clients": len(self.peers)}
            if ack_id is not None:
                reply["ack_id"] = ack_id
            peer.send(reply)
        elif kind == "command_result":
            if ack_id is not None:
                peer.send({"type": "ack", "ack_id": ack_id})

    # -- looking ----------------------------------------------------------

    def all(self, kind: Optional[str] = None) -> List[tuple]:
        with self.lock:
            return [(p, m) for p, m in self.messages if kind is None or m.get("type") == kind]

    def events(self) -> List[dict]:
        """Every event received, in order, each with `_pid` (the sender's)."""
        out = []
        for peer, msg in self.all():
            if msg.get("type") == "events":
                out.extend({**e, "_pid": peer.pid} for e in msg["events"])
            elif msg.get("type") == "event":
                out.append({**msg, "_pid": peer.pid})
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.01)
        raise AssertionError(f"condition not met within {timeout} s")

    def command_peer(self, engine: str, action: str) -> Optional[Peer]:
        with self.lock:
            for peer in reversed(self.peers):
                caps = (peer.hello or {}).get("capabilities") or {}
                if not peer.closed and action in caps.get(engine, []):
                    return peer
        return None

    def send_command(self, engine: str, action: str, parameters: Optional[dict] = None,
                     command_id: Optional[str] = None, timeout: float = 5.0) -> dict:
        """Sends a command to the process that declared it; returns its
        command_result."""
        peer = self.wait_for(lambda: self.command_peer(engine, action), timeout)
        command_id = command_id or f"cmd-{time.monotonic_ns()}"
        peer.send({"type": "command", "id": command_id, "action": action,
                   "target": {"type": "task", "id": f"{engine}:x", "engine": engine},
                   "parameters": {"engine": engine, **(parameters or {})},
                   "timeout_seconds": 9.0})

        def result():
            for _, msg in self.all("command_result"):
                if msg.get("id") == command_id:
                    return msg
            return None

        return self.wait_for(result, timeout)

    # -- stopping ---------------------------------------------------------

    def stop(self) -> None:
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            peers = list(self.peers)
        for peer in peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
