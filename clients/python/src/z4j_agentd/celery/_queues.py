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


def _passive_depth(conn: Any, queue: str) -> Optional[int]:
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
        count = ok[1] if isinstance(ok, tuple) else getattr(ok, "message_count", None)
        return int(count) if count is not None else None
    except conn.channel_errors:
        return 0 if _vanishes_when_empty(conn) else None
    finally:
        try:
            channel.close()
        except Exception:
            pass


def depths(app: Any, queues: Iterable[str], timeout: float = BROKER_TIMEOUT) -> Dict[str, int]:
    """The number of messages waiting in each queue the broker knows, over
    one broker connection. Queues the broker does not know are left out.
    Raises when the broker cannot be reached (the caller skips the report)."""
    names = sorted({q for q in queues if isinstance(q, str) and q})
    out: Dict[str, int] = {}
    if not names:
        return out
    with app.connection_for_read(connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        for name in names:
            depth = _passive_depth(conn, name)
            if depth is not None:
                out[name] = depth
    return out


def depth(app: Any, queue: str, timeout: float = BROKER_TIMEOUT) -> Optional[int]:
    """One queue's depth, or None when the broker does not know the queue."""
    return depths(app, [queue], timeout).get(queue)


def purge(app: Any, queue: str, timeout: float = BROKER_TIMEOUT) -> int:
    """Removes every message waiting in `queue` (all priority steps on
    Redis); returns how many there were. The queue itself stays."""
    with app.connection_for_write(connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        channel = conn.channel()
        try:
            return int(channel.queue_purge(queue) or 0)
        finally:
            try:
                channel.close()
            except Exception:
                pass
