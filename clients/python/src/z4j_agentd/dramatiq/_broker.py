"""What the commands and the health report read from, and do to, a
Dramatiq broker, per broker kind.

Redis (`dramatiq.brokers.redis.RedisBroker`, keys under its namespace,
`dramatiq` by default):

* `<ns>:<q>` a list of the waiting messages' Redis ids (not those a
  worker already fetched), `<ns>:<q>.msgs` a hash of every message enqueued and
  not yet acknowledged (waiting, fetched by a worker, or running), by its
  Redis id (one per enqueue: a retry gets a new one);
* `<ns>:<q>.DQ` and `<ns>:<q>.DQ.msgs` the delayed messages (an eta, or a
  retry's backoff);
* `<ns>:<q>.XQ` (a sorted set, scored by the time in ms) and
  `<ns>:<q>.XQ.msgs` the dead letters: messages that failed for good.

A queue's depth is `HLEN <ns>:<q>.msgs`. Everything here uses plain
commands on `broker.client`, never the broker's Lua dispatch, which would
register this process as a consumer in `__heartbeats__`.

The StubBroker (tests) keeps its queues and dead letters in memory;
RabbitMQ gives its depths (`get_queue_message_counts`, the ready count).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

from dramatiq.common import q_name

#: Purges the waiting messages of a queue (the ids in the list `<ns>:<q>`,
#: and their bodies in `<ns>:<q>.msgs`) when the depth (HLEN of the hash)
#: is ARGV[1] (or ARGV[2] is "1": forced), atomically. Messages a worker
#: already fetched (prefetched or running: in the hash, not in the list)
#: stay, so the worker that holds them runs and acknowledges them as usual.
#: Returns {purged (0/1), depth, waiting messages removed}.
_PURGE_LUA = """
local depth = redis.call('hlen', KEYS[2])
if ARGV[2] ~= '1' and depth ~= tonumber(ARGV[1]) then
  return {0, depth, 0}
end
local ids = redis.call('lrange', KEYS[1], 0, -1)
for i = 1, #ids, 1000 do
  redis.call('hdel', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
end
redis.call('del', KEYS[1])
return {1, depth, #ids}
"""

#: Dead letters read per queue at most for one page.
SCAN_COUNT = 500


def kind(broker: Any) -> str:
    """`redis`, `rabbitmq`, `stub` or `unknown` (a subclass counts as its base)."""
    for klass in type(broker).__mro__:
        name = klass.__name__.lower()
        if "redis" in name:
            return "redis"
        if "rabbit" in name or "amqp" in name:
            return "rabbitmq"
        if "stub" in name:
            return "stub"
    return "unknown"


def namespace(broker: Any) -> str:
    return str(getattr(broker, "namespace", None) or "dramatiq")


def queue_names(broker: Any) -> List[str]:
    """The canonical names of the broker's declared queues and its actors' queues."""
    names = set()
    try:
        names.update(broker.get_declared_queues())
    except Exception:
        pass
    try:
        for actor in list(broker.actors.values()):
            names.add(actor.queue_name)
    except Exception:
        pass
    return sorted({q_name(n) for n in names if isinstance(n, str) and n})


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode(raw: Any) -> Optional[Dict[str, Any]]:
    """A stored message body as a dict (JSON only: never anything else a
    broker may hold), or None."""
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


# ---------------------------------------------------------------- depths


def depths(broker: Any, queues: Iterable[str]) -> Optional[Dict[str, int]]:
    """{queue: depth} for `queues`, or None for a broker whose depths are not read."""
    names = list(dict.fromkeys(queues))
    k = kind(broker)
    if k == "redis":
        ns = namespace(broker)
        pipe = broker.client.pipeline(transaction=False)
        for name in names:
            pipe.hlen(f"{ns}:{name}.msgs")
        return {name: int(n) for name, n in zip(names, pipe.execute())}
    if k == "stub":
        return {name: int(broker.queues[name].qsize()) if name in broker.queues else 0 for name in names}
    if k == "rabbitmq":
        out = {}
        for name in names:
            counts = broker.get_queue_message_counts(name)
            out[name] = int(counts[0]) if isinstance(counts, (tuple, list)) and counts else 0
        return out
    return None


def depth(broker: Any, queue: str) -> Optional[int]:
    got = depths(broker, [queue])
    return None if got is None else got.get(queue)


def purge(broker: Any, queue: str, expected: Optional[int], force: bool) -> Tuple[bool, int, int]:
    """Purges the queue's waiting messages when its depth is `expected`
    (or `force`): (purged, depth when purged or refused, waiting messages
    deleted). Raises NotImplementedError for a broker it cannot purge."""
    k = kind(broker)
    if k == "redis":
        ns = namespace(broker)
        done, found, waiting = broker.client.eval(
            _PURGE_LUA, 2, f"{ns}:{queue}", f"{ns}:{queue}.msgs",
            str(expected if expected is not None else -1), "1" if force else "0")
        return bool(done), int(found), int(waiting)
    if k == "stub":
        found = int(broker.queues[queue].qsize()) if queue in broker.queues else 0
        if not force and found != expected:
            return False, found, None
        if queue in broker.queues:
            broker.flush(queue)
        return True, found, found
    raise NotImplementedError(f"purge_queue is served for Redis and the StubBroker, not for a "
                              f"{type(broker).__name__}")


# ---------------------------------------------------------------- dead letters


def dead_letters(broker: Any, queue: Optional[str], limit: int, offset: int) -> Tuple[List[Dict[str, Any]], int]:
    """The newest dead letters first: (page of {task_id, task_name, queue,
    failed_at_ms, options}, total)."""
    names = [q_name(queue)] if queue else queue_names(broker)
    k = kind(broker)
    if k == "stub":
        rows = []
        for name in names:
            for message in reversed(list(broker.dead_letters_by_queue.get(name, ()))):
                rows.append({"task_id": message.message_id, "task_name": message.actor_name, "queue": name,
                             "failed_at_ms": None, "options": dict(message.options)})
        return rows[offset:offset + limit], len(rows)
    if k != "redis":
        raise NotImplementedError(f"dead letters are read from Redis and the StubBroker, not from a "
                                  f"{type(broker).__name__}")
    ns, client = namespace(broker), broker.client
    total = 0
    candidates: List[Tuple[float, str, str]] = []
    for name in names:
        key = f"{ns}:{name}.XQ"
        total += int(client.zcard(key))
        for member, score in client.zrevrange(key, 0, offset + limit - 1, withscores=True):
            candidates.append((float(score), _text(member), name))
    candidates.sort(key=lambda c: (-c[0], c[2], c[1]))
    window = candidates[offset:offset + limit]
    by_queue: Dict[str, List[str]] = {}
    for _score, redis_id, name in window:
        by_queue.setdefault(name, []).append(redis_id)
    bodies: Dict[Tuple[str, str], Optional[Dict[str, Any]]] = {}
    for name, ids in by_queue.items():
        for redis_id, raw in zip(ids, client.hmget(f"{ns}:{name}.XQ.msgs", ids)):
            bodies[(name, redis_id)] = decode(raw)
    rows = []
    for score, redis_id, name in window:
        body = bodies.get((name, redis_id)) or {}
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        rows.append({"task_id": str(body.get("message_id") or redis_id), "task_name": body.get("actor_name") or "",
                     "queue": name, "failed_at_ms": score, "options": options, "body": body})
    return rows, total


#: Where a message is: `waiting` (in its queue's list), `fetched` (taken
#: by a worker process, prefetched or running, not acknowledged), `held`
#: (one of the two: this Redis has no LPOS), `delayed` or `dead`.
Found = Tuple[str, str, Dict[str, Any], Any, str]


def _waiting_or_fetched(client: Any, ns: str, name: str, redis_id: str) -> str:
    try:
        return "waiting" if client.lpos(f"{ns}:{name}", redis_id) is not None else "fetched"
    except Exception:  # LPOS came in Redis 6.0.6
        return "held"


def locate(broker: Any, queue: str, redis_id: str) -> Optional[Found]:
    """Where the message enqueued as `redis_id` on `queue` (`q` or its
    delay queue `q.DQ`) is now: (queue, place, body, dead-letter score,
    redis id), or None when Redis no longer holds it under that id (done,
    or moved from its delay queue by a worker, which gives it a new id).
    A few reads of that one id, in one MULTI."""
    if kind(broker) != "redis":
        return None
    ns, client, name = namespace(broker), broker.client, q_name(queue)
    pipe = client.pipeline(transaction=True)
    pipe.hget(f"{ns}:{name}.XQ.msgs", redis_id)
    pipe.zscore(f"{ns}:{name}.XQ", redis_id)
    pipe.hget(f"{ns}:{name}.msgs", redis_id)
    pipe.lpos(f"{ns}:{name}", redis_id)
    pipe.hget(f"{ns}:{name}.DQ.msgs", redis_id)
    dead, score, body, position, delayed = pipe.execute(raise_on_error=False)
    for place, raw in (("dead", dead), ("queued", body), ("delayed", delayed)):
        if raw is None or isinstance(raw, Exception):
            continue
        if place == "queued":
            place = ("held" if isinstance(position, Exception) else
                     "waiting" if position is not None else "fetched")
        return name, place, decode(raw) or {}, score if place == "dead" else None, redis_id
    return None


def find(broker: Any, task_id: str, queues: Iterable[str]) -> Optional[Found]:
    """Where a message is on Redis by its message id (see `locate`): None
    when no queue holds it. Scans the hashes (HSCAN), so it costs a pass
    over the queues' messages: callers bound how many run at once."""
    if kind(broker) != "redis":
        return None
    ns, client = namespace(broker), broker.client
    needle = task_id.encode("utf-8")
    for name in dict.fromkeys(queues):
        for place, key in (("dead", f"{ns}:{name}.XQ.msgs"), ("queued", f"{ns}:{name}.msgs"),
                           ("delayed", f"{ns}:{name}.DQ.msgs")):
            for redis_id, raw in client.hscan_iter(key, count=SCAN_COUNT):
                data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
                if needle not in data:
                    continue
                body = decode(raw)
                if body and body.get("message_id") == task_id:
                    rid = _text(redis_id)
                    score = client.zscore(f"{ns}:{name}.XQ", rid) if place == "dead" else None
                    if place == "queued":
                        place = _waiting_or_fetched(client, ns, name, rid)
                    return name, place, body, score, rid
    return None


__all__ = ["kind", "namespace", "queue_names", "depths", "depth", "purge", "dead_letters", "find", "locate", "decode"]
