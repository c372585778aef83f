"""Queue depths and purges on Celery's broker, through kombu.

A passive `queue_declare` answers with the number of messages waiting, on
every transport kombu has: on RabbitMQ the broker counts them; on Redis kombu
adds up the list of each priority step (`queue`, `queue\\x06\\x163`, ...), so
priority queues are counted whole. A Redis list disappears when it is
empty, so a Redis queue nobody has sent to yet is 0; on AMQP a queue that
was never declared has no depth (None).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

#: Seconds to reach the broker before a measure or a purge gives up.
BROKER_TIMEOUT = 5.0


def _vanishes_when_empty(conn: Any) -> bool:
    # Key-value transports (redis, sentinel) drop an empty queue's key.
    return getattr(conn.transport, "driver_type", "") in ("redis",)


def _not_found(exc: BaseException) -> bool:
    """Is this the broker's "no such queue" (404 NOT_FOUND)?"""
    for attr in ("reply_code", "code"):
        code = getattr(exc, attr, None)
        if code in (404, "404"):
            return True
    return "404" in [str(a) for a in getattr(exc, "args", ())] or "NOT_FOUND" in str(exc)


def _io_timeouts(timeout: float) -> Dict[str, Any]:
    """Connection arguments that bound every broker call, not only the
    connect: kombu's Redis channel has no socket timeout and py-amqp no
    read timeout of their own, so a frozen broker would hold the caller."""
    return {"connect_timeout": timeout,
            "transport_options": {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                  "read_timeout": timeout, "write_timeout": timeout}}


def _close(channel: Any) -> None:
    try:
        channel.close()
    except Exception:
        pass


class Measurer:
    """A broker connection and channel kept from one measure to the next, so
    that a worker reporting every few seconds does not open a connection
    (and, on Redis, a channel's connection pool) each time. Any error other
    than a missing queue closes both; the next measure connects again. Not
    for concurrent use: one measure at a time."""

    def __init__(self, app: Any, timeout: float = BROKER_TIMEOUT) -> None:
        self.app = app
        self.timeout = timeout
        self._conn: Any = None
        self._channel: Any = None
        #: Connections opened so far (the first, then one after each error).
        self.connects = 0

    def depths(self, queues: Iterable[str]) -> Dict[str, int]:
        """The number of messages waiting in each queue the broker knows.
        Queues the broker does not know are left out (on Redis, where an
        empty queue has no key, they are 0). Raises when the broker cannot
        be reached (the caller skips the report)."""
        names = sorted({q for q in queues if isinstance(q, str) and q})
        out: Dict[str, int] = {}
        if not names:
            return out
        try:
            if self._conn is None:
                self._conn = self.app.connection_for_read(**_io_timeouts(self.timeout))
                self.connects += 1
            conn = self._conn
            conn.ensure_connection(max_retries=1, timeout=self.timeout)
            vanishes = _vanishes_when_empty(conn)
            for name in names:
                if self._channel is None:
                    self._channel = conn.channel()
                try:
                    ok = self._channel.queue_declare(queue=name, passive=True)
                except conn.channel_errors as exc:
                    if vanishes and _not_found(exc):
                        # An empty Redis queue; the channel stays usable (a new
                        # one would cost a new connection for every empty queue).
                        out[name] = 0
                        continue
                    # AMQP closes the channel on an error: the next queue gets a new one.
                    _close(self._channel)
                    self._channel = None
                    continue
                count = ok[1] if isinstance(ok, tuple) else getattr(ok, "message_count", None)
                if count is not None:
                    out[name] = int(count)
        except BaseException:
            self.close()
            raise
        return out

    def close(self) -> None:
        channel, conn = self._channel, self._conn
        self._channel = self._conn = None
        if channel is not None:
            _close(channel)
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass


def depths(app: Any, queues: Iterable[str], timeout: float = BROKER_TIMEOUT) -> Dict[str, int]:
    """`Measurer.depths` over a connection of its own, closed after."""
    measurer = Measurer(app, timeout)
    try:
        return measurer.depths(queues)
    finally:
        measurer.close()


def depth(app: Any, queue: str, timeout: float = BROKER_TIMEOUT) -> Optional[int]:
    """One queue's depth, or None when the broker does not know the queue."""
    return depths(app, [queue], timeout).get(queue)


def purge(app: Any, queue: str, timeout: float = BROKER_TIMEOUT) -> int:
    """Removes every message waiting in `queue` (all priority steps on
    Redis); returns how many there were. The queue itself stays."""
    with app.connection_for_write(**_io_timeouts(timeout)) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        channel = conn.channel()
        try:
            return int(channel.queue_purge(queue) or 0)
        finally:
            try:
                channel.close()
            except Exception:
                pass
