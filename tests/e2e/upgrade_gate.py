"""A TCP proxy in front of a brain that can refuse WebSocket upgrades, as an ingress
or corporate proxy that does not pass them does.

`UpgradeGate(upstream_port)` listens on a free 127.0.0.1 port (`url`). On each
client connection it reads every HTTP/1.1 request head:

* in "refuse" mode, a head with an `Upgrade:` header is answered
  `HTTP/1.1 400 Bad Request` (Connection: close) and the connection is closed;
  the brain never sees it;
* otherwise the head and its body (Content-Length) go to the brain on one
  upstream connection per client connection, and the brain's answers come back
  as they are (keep-alive connections carry request after request, and a
  long-poll GET the brain holds for up to 10 s is just a slow answer);
* once an upgrade is passed, or a body is chunked, the rest of the connection
  is piped both ways without looking at it.

`pass_upgrades()` and `refuse_upgrades()` switch the mode at run time; a
connection already upgraded stays open (as through a real proxy that is
reconfigured). Counters say what went through: `refused`, `passed`,
`requests` (plain HTTP requests forwarded), `connections`.

Threads, stdlib only; `close()` stops the listener and every connection.
"""

from __future__ import annotations

import socket
import threading
from typing import List, Optional, Tuple

REFUSE = "refuse"
PASS = "pass"

MAX_HEAD_BYTES = 64 << 10
REFUSAL_BODY = b"WebSocket upgrades are not passed here\n"
REFUSAL = (b"HTTP/1.1 400 Bad Request\r\n"
           b"Content-Type: text/plain\r\n"
           b"Content-Length: " + str(len(REFUSAL_BODY)).encode() + b"\r\n"
           b"Connection: close\r\n\r\n" + REFUSAL_BODY)


class UpgradeGate:
    """See the module documentation."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", mode: str = REFUSE) -> None:
        assert mode in (REFUSE, PASS), mode
        self.upstream = (upstream_host, upstream_port)
        self.mode = mode
        self.refused = 0
        self.passed = 0
        self.requests = 0
        self.connections = 0
        self.held = 0
        self._hold_after: Optional[int] = None
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._socks: List[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"upgrade-gate-{self.port}")
        self._thread.start()

    # -- control

    def pass_upgrades(self) -> None:
        with self._lock:
            self.mode = PASS

    def refuse_upgrades(self) -> None:
        with self._lock:
            self.mode = REFUSE

    def hold_upgrades(self, after: int) -> None:
        """Passed upgrades after the first `after` (counted since the start) wait at the gate,
        unanswered, until `release()`: a path that is slow to carry a WebSocket."""
        with self._lock:
            self._hold_after = after
            self._release.clear()

    def release(self) -> None:
        """Forwards the held upgrades, and holds no more."""
        with self._lock:
            self._hold_after = None
        self._release.set()

    def counts(self) -> dict:
        with self._lock:
            return {"mode": self.mode, "connections": self.connections, "requests": self.requests,
                    "refused": self.refused, "passed": self.passed, "held": self.held}

    def close(self) -> None:
        self._closed.set()
        self._release.set()
        try:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _shut(s)
        self._thread.join(5)

    def __enter__(self) -> "UpgradeGate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections

    def _track(self, s: socket.socket) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._socks.append(s)
            return True

    def _untrack(self, s: socket.socket) -> None:
        with self._lock:
            if s in self._socks:
                self._socks.remove(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._track(client):
                _shut(client)
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name=f"upgrade-gate-{self.port}-conn").start()

    def _serve(self, client: socket.socket) -> None:
        """Client to brain, one request head at a time; a second thread pipes the answers back."""
        upstream: Optional[socket.socket] = None
        back: Optional[threading.Thread] = None
        buf = b""
        try:
            while True:
                head, buf = _read_head(client, buf)
                if head is None:
                    return
                upgrade = _header(head, b"upgrade") is not None
                with self._lock:
                    refuse = upgrade and self.mode == REFUSE
                    hold = False
                    if refuse:
                        self.refused += 1
                    elif upgrade:
                        self.passed += 1
                        hold = self._hold_after is not None and self.passed > self._hold_after
                        self.held += hold
                    else:
                        self.requests += 1
                if refuse:
                    client.sendall(REFUSAL)
                    return
                if hold:
                    self._release.wait()
                    if self._closed.is_set():
                        return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=10)
                    upstream.settimeout(None)
                    if not self._track(upstream):
                        return
                    back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True,
                                            name=f"upgrade-gate-{self.port}-back")
                    back.start()
                upstream.sendall(head)
                chunked = b"chunked" in (_header(head, b"transfer-encoding") or b"").lower()
                if upgrade or chunked:
                    # No more request heads to look at on this connection.
                    if buf:
                        upstream.sendall(buf)
                    _pipe(client, upstream)
                    return
                length = int(_header(head, b"content-length") or b"0")
                body, buf = buf[:length], buf[length:]
                upstream.sendall(body)
                left = length - len(body)
                while left > 0:
                    chunk = client.recv(min(left, 65536))
                    if not chunk:
                        return
                    upstream.sendall(chunk)
                    left -= len(chunk)
        except OSError:
            return
        finally:
            if upstream is not None:
                # Let the brain finish what it is answering, then the back pipe closes the client.
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if back is not None:
                    back.join(60)
                self._untrack(upstream)
                _shut(upstream)
            self._untrack(client)
            _shut(client)


def _read_head(sock: socket.socket, buf: bytes) -> Tuple[Optional[bytes], bytes]:
    """(request head including its blank line, what follows it), or (None, b"") at EOF."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            raise OSError("request head too large")
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _header(head: bytes, name: bytes) -> Optional[bytes]:
    """The value of header `name` (lowercase) in a request head, None when absent."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copies src to dst until src ends, then ends dst's direction."""
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            dst.sendall(chunk)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
