"""The local socket: where it is, its two framings, one connection.

The first byte a client sends decides the framing of the whole connection
(`{`: JSON lines; anything else: a 4-byte big-endian length and one
MessagePack map). Replies come back in the same framing. The contract is
docs/local-protocol.md in the z4j-agentd repository.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import threading
import time
from typing import Any, List, Optional

try:  # optional: the `msgpack` extra
    import msgpack as _msgpack
except ImportError:  # pragma: no cover - depends on the environment
    _msgpack = None

#: Each thread's msgpack Packer (see MessagePack.encode_value).
_packers = threading.local()

#: The daemon closes a MessagePack connection whose length prefix exceeds this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


#: The host-wide daemon's socket, as the packages install it (z4j-agentd.socket).
SYSTEM_SOCKET_PATH = "/run/z4j-agentd/agent.sock"


def default_socket_path() -> str:
    """`Z4J_SOCKET_PATH`, else the host-wide daemon's socket
    `/run/z4j-agentd/agent.sock` when it exists, else
    `$XDG_RUNTIME_DIR/z4j/agent.sock`, else `$TMPDIR/z4j-<uid>/agent.sock`
    (`/tmp/z4j-<uid>/agent.sock`).
    """
    explicit = os.environ.get("Z4J_SOCKET_PATH")
    if explicit:
        return explicit
    if os.path.exists(SYSTEM_SOCKET_PATH):
        return SYSTEM_SOCKET_PATH
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "z4j", "agent.sock")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"z4j-{os.getuid()}", "agent.sock")


def msgpack_available() -> bool:
    return _msgpack is not None


class ProtocolError(Exception):
    """The daemon sent something this client cannot decode."""


class JsonLines:
    """One JSON object per line, `\\n` terminated."""

    name = "json"

    def encode(self, msg: dict) -> bytes:
        return self.encode_value(msg) + b"\n"

    @staticmethod
    def encode_value(value: Any) -> bytes:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")

    def encode_events(self, encoded_events: List[bytes], ack_id: int) -> bytes:
        """An `events` message around events already encoded one by one."""
        return (
            b'{"type":"events","ack_id":%d,"events":[' % ack_id
            + b",".join(encoded_events)
            + b"]}\n"
        )

    def decoder(self) -> "JsonLinesDecoder":
        return JsonLinesDecoder()


class JsonLinesDecoder:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[dict]:
        self._buf += data
        out = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            line = line.strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from None
            if isinstance(msg, dict):
                out.append(msg)


class MessagePack:
    """A 4-byte big-endian length, then one MessagePack map."""

    name = "msgpack"

    def __init__(self) -> None:
        if _msgpack is None:
            raise ValueError("framing 'msgpack' needs the msgpack package: pip install msgpack")

    def encode(self, msg: dict) -> bytes:
        body = self.encode_value(msg)
        return struct.pack(">I", len(body)) + body

    @staticmethod
    def encode_value(value: Any) -> bytes:
        # One Packer per thread: a third cheaper than packb, which makes
        # one per call (emit() encodes in the caller's thread).
        packer = getattr(_packers, "packer", None)
        if packer is None:
            packer = _packers.packer = _msgpack.Packer(use_bin_type=True)
        try:
            return packer.pack(value)
        except Exception:
            # A failed pack may leave the packer's buffer half written.
            _packers.packer = None
            raise

    def encode_events(self, encoded_events: List[bytes], ack_id: int) -> bytes:
        n = len(encoded_events)
        if n <= 15:
            array_header = bytes([0x90 | n])
        elif n <= 0xFFFF:
            array_header = b"\xdc" + struct.pack(">H", n)
        else:
            array_header = b"\xdd" + struct.pack(">I", n)
        packb = _msgpack.packb
        body = b"".join([
            b"\x83",  # a map of three entries
            packb("type"), packb("events"),
            packb("ack_id"), packb(ack_id),
            packb("events"), array_header,
            *encoded_events,
        ])
        return struct.pack(">I", len(body)) + body

    def decoder(self) -> "MessagePackDecoder":
        return MessagePackDecoder()


class MessagePackDecoder:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> List[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = struct.unpack(">I", self._buf[:4])
            if size > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"the daemon announced a {size}-byte message")
            if len(self._buf) < 4 + size:
                break
            body, self._buf = self._buf[4:4 + size], self._buf[4 + size:]
            try:
                msg = _msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception as exc:
                raise ProtocolError(f"the daemon sent undecodable MessagePack: {exc}") from None
            if isinstance(msg, dict):
                out.append(msg)
        return out


def codec_for(framing: str):
    """`auto` (MessagePack when the `msgpack` package imports, else JSON
    lines), `json` or `msgpack`."""
    if framing == "auto":
        return MessagePack() if _msgpack is not None else JsonLines()
    if framing in ("json", "jsonl", "json_lines"):
        return JsonLines()
    if framing == "msgpack":
        return MessagePack()
    raise ValueError(f"framing must be 'auto', 'json' or 'msgpack', got {framing!r}")


class Connection:
    """One connection to the daemon, in one framing.

    The socket stays non-blocking; reads and writes wait with `select`, so
    one thread may read while another writes (the command server answers
    from handler threads) without either changing the other's timeout.
    Writes from several threads need a lock of the caller's.
    """

    def __init__(self, path: str, codec, connect_timeout: float) -> None:
        self.path = path
        self.codec = codec
        self._decoder = codec.decoder()
        self._ready: List[dict] = []
        self._eof = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, connect_timeout))
            sock.connect(path)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock: Optional[socket.socket] = sock

    def send_bytes(self, data: bytes, timeout: float = 30.0) -> None:
        """Writes all of `data`; socket.timeout when the daemon does not
        read it within `timeout` seconds (the connection is then unusable:
        part of a message may have been written)."""
        sock = self._sock()
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("z4j-agentd did not read what this client wrote in time")
                select.select([], [sock], [], left)
                continue
            view = view[sent:]

    def send(self, msg: dict, timeout: float = 30.0) -> None:
        self.send_bytes(self.codec.encode(msg), timeout)

    def poll(self, timeout: float) -> List[dict]:
        """Every message that arrives within `timeout` seconds (`[]` when
        none came; returns as soon as something was read). Raises EOFError
        when the daemon closed the connection."""
        if self._ready:
            out, self._ready = self._ready, []
            return out
        sock = self._sock()
        readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        if not readable:
            return []
        out: List[dict] = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                if out:
                    # Hand over what came before the close; the next call raises.
                    self._eof = True
                    break
                raise EOFError("the daemon closed the connection")
            out.extend(self._decoder.feed(chunk))
        return out

    def recv(self, deadline: float) -> dict:
        """The next message; TimeoutError at `deadline` (time.monotonic())."""
        while True:
            if self._ready:
                return self._ready.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from z4j-agentd in time")
            self._ready = self.poll(left)

    def _sock(self) -> socket.socket:
        sock = self.sock
        if sock is None or self._eof:
            raise EOFError("the connection to the daemon is closed")
        return sock

    def interrupt(self) -> None:
        """Wakes a thread waiting on this connection (called from another
        thread of the same process; never after a fork, where the socket is
        shared with the parent)."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Closes this process's descriptor only (no shutdown): safe in a
        forked child whose parent still uses the same connection."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
