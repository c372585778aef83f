"""The client: hands task events to the local z4j-agentd without ever
holding up, or raising into, the application.

Three paths, each on its own connection to the daemon's socket:

* events (`emit`, `record`): the caller's thread only builds the event and
  puts it in a bounded queue; one background thread per process takes up to
  100 events at a time, sends them as one `events` message with an
  `ack_id`, and counts them `sent` when the daemon answers that it committed
  them to its spool. A full queue drops the newest event and counts it.
* durable (`send_durable`): the caller waits for the daemon's `ack`.
* commands (`serve`): a thread says `hello` with the actions it runs (and
  the workers and schedulers it hosts) and answers the `command` messages
  the daemon routes to it. `report_health` adds a thread that sends a
  `health` report on that connection at a fixed interval.

Invariants:

* `emit` and `record` never block on I/O and never raise;
* every event accepted by `emit` ends counted exactly once: `sent`,
  `refused`, or `dropped_unavailable` (while it waits, it is `queued`);
  every event not accepted is counted `dropped_queue_full` (or
  `dropped_unavailable` after `close()`);
* after a fork the child starts with an empty queue, zeroed counters, no
  connections and no command server; the parent is not touched.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import random
import weakref
from collections import OrderedDict, deque
from itertools import repeat
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Tuple

from ._jsonsafe import json_safe
from ._wire import Connection, ProtocolError, codec_for, default_socket_path

log = logging.getLogger("z4j_agentd")

#: Events per `events` message from the background thread.
BATCH_MAX_EVENTS = 100
#: Encoded bytes per `events` message (an event larger than this goes alone).
BATCH_MAX_BYTES = 1024 * 1024
#: After sending a full batch with less than one more waiting, the sender
#: sleeps this long (seconds) for the next one to fill: under a burst it
#: takes the GIL from the application's threads once per batch, not once
#: per few events. Never when the batch was not full, so an event emitted
#: at a quiet moment is not delayed.
BUSY_LINGER = 0.002
#: `events` messages sent and not yet acknowledged, per connection.
MAX_INFLIGHT_BATCHES = 4
#: Reconnect backoff: first delay and ceiling, in seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: A batch whose connection broke this many times before its ack is dropped.
MAX_SEND_ATTEMPTS = 3
#: How long the background threads wait for work before looking around.
IDLE_POLL = 0.25
#: A write the daemon does not read within this time ends the connection.
SEND_TIMEOUT = 30.0
#: Events per message in `send_durable`.
DURABLE_CHUNK_EVENTS = 500
#: `error` of a command_result is cut to this many characters (the daemon's limit).
MAX_COMMAND_ERROR_CHARS = 8192
#: Default seconds between two `health` reports (the daemon's default too).
HEALTH_INTERVAL = 30.0
#: The daemon reads an interval above this as this.
HEALTH_INTERVAL_MAX = 300.0

Handler = Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]


class DaemonUnavailable(Exception):
    """The daemon could not be reached, or did not answer in time."""


class EventRefused(Exception):
    """The daemon answered an `error` for events sent with `send_durable`.

    `code` and `message` are those of the first error; `stored` is how many
    events of the call were committed anyway; `errors` holds every `error`
    reply (each a dict with `code`, `message` and, for one event of a batch,
    `index`, its position in the list passed to `send_durable`).
    """

    def __init__(self, code: str, message: str, *, stored: int = 0,
                 errors: Iterable[dict] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.stored = stored
        self.errors = list(errors)


#: (whole second, its text up to the seconds) of the last `utc_now_iso`:
#: formatting a date costs more than the rest of it (one tuple, replaced
#: whole, so threads never see half of it).
_second_text: Tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now, as the daemon stores it: `2026-11-22T23:29:59.500000+00:00`."""
    global _second_text
    micros = time.time_ns() // 1000
    second, fraction = divmod(micros, 1_000_000)
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{fraction:06d}+00:00"


#: The client's own generator for event ids, seeded from the OS: an
#: application that seeds the `random` module (tests, ML training) must not
#: make two runs or two workers draw the same ids, which the brain would
#: take for one event. Seeded again from the OS in a forked child.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def _new_event_id() -> str:
    """A random UUID (version 4) as text: an event id must be unique, not
    secret, and `uuid.uuid4()` (a system call for 16 bytes) costs four
    times as much."""
    n = (_ids.getrandbits(128) & ~(0xF000 << 64) & ~(0xC << 60)) | (0x4000 << 64) | (0x8 << 60)
    h = "%032x" % n
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _iso(occurred_at: Any) -> Any:
    if occurred_at is None:
        return utc_now_iso()
    if isinstance(occurred_at, datetime):
        if occurred_at.tzinfo is None:  # the daemon's rule: no offset means UTC
            occurred_at = occurred_at.replace(tzinfo=timezone.utc)
        return occurred_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return occurred_at  # an ISO-8601 string or a unix time: the daemon checks it


def build_event(engine: Any, kind: Any, task_id: Any = "", data: Any = None,
                occurred_at: Any = None, id: Any = None) -> Dict[str, Any]:
    """The event as sent: `occurred_at` now (UTC) and `id` a new UUID v4
    unless given, `data` made JSON-safe (a copy)."""
    return {
        "engine": engine if isinstance(engine, str) else json_safe(engine),
        "kind": kind if isinstance(kind, str) else json_safe(kind),
        "task_id": "" if task_id is None else task_id if isinstance(task_id, str) else str(task_id),
        "occurred_at": json_safe(_iso(occurred_at)),
        "id": str(id) if id is not None else _new_event_id(),
        "data": {} if data is None else json_safe(data),
    }


def _event_from_dict(event: Mapping[str, Any]) -> Dict[str, Any]:
    return build_event(event.get("engine"), event.get("kind"), event.get("task_id", ""),
                       event.get("data"), event.get("occurred_at"), event.get("id"))


def _default_process_name() -> str:
    argv = [a for a in sys.argv if a]
    if not argv:
        return "python"
    name = os.path.basename(argv[0])
    if name == "__main__.py":  # python -m package
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        parent = getattr(spec, "parent", None) or getattr(spec, "name", None)
        name = f"python -m {parent}" if parent else "python"
    elif name in ("-c", "-m"):
        name = "python"
    return " ".join([name] + argv[1:])[:120]


class _Batch:
    """Events taken from the queue together, sent as one `events` message."""

    __slots__ = ("encoded", "attempts", "indexed_codes", "other_codes")

    def __init__(self, encoded: List[bytes]) -> None:
        self.encoded = encoded
        self.attempts = 0
        self.indexed_codes: List[str] = []  # one per refused event (`index` given)
        self.other_codes: List[str] = []  # message-level (`spool_full`)

    def __len__(self) -> int:
        return len(self.encoded)


class _EventQueue:
    """The events `emit()` hands to the background sender: a bounded FIFO
    the application thread appends to without taking a lock (a deque's
    append and popleft are atomic), waking the sender only when it sleeps
    for lack of events. A busy sender is not woken at all, and the
    application thread never waits for it.

    The bound is checked before the append, so several threads emitting at
    once may go past it by at most one event each."""

    def __init__(self, maxsize: int) -> None:
        self._items: Deque[Any] = deque()
        self.maxsize = maxsize
        #: Items taken out so far (by the one consumer). Counted before each
        #: pop, so `taken + len(queue)` never misses an item in hand.
        self.taken = 0
        self._sleeping = False
        self._wake = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> bool:
        """Appends `item`; False (nothing appended) when the queue is full."""
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        if self._sleeping:
            self._sleeping = False
            self._wake.set()
        return True

    def take(self, most: int, wait: float) -> List[Any]:
        """Up to `most` items, oldest first; waits up to `wait` s for the first."""
        items = self._items
        if not items and wait > 0:
            # Said before looking again: an append after the look sees it.
            self._sleeping = True
            if not items:
                self._wake.wait(wait)
            self._sleeping = False
            self._wake.clear()
        n = min(most, len(items))
        if n <= 0:
            return []
        # Only this consumer pops, so the n items are there. Counted before
        # they leave the queue, so `taken + len(queue)` may count them twice
        # for a moment, never miss them. Popped in one call in C: the
        # sender's time with the GIL, which an emitting thread may have to
        # wait out, holds no Python step per event.
        self.taken += n
        return list(map(deque.popleft, repeat(items, n)))

    def wake(self) -> None:
        """Ends the sender's wait at once (close)."""
        self._wake.set()

    def drain(self) -> List[Any]:
        return self.take(len(self._items) + 1, 0)


class Client:
    """A connection manager for one process. See the module documentation."""

    def __init__(
        self,
        socket_path: Optional[str] = None,
        *,
        process: Optional[str] = None,
        framework: str = "bare",
        engines: Iterable[str] = (),
        capabilities: Optional[Mapping[str, Iterable[str]]] = None,
        worker_role: Optional[str] = None,
        queue_size: int = 10000,
        framing: str = "auto",
        connect_timeout: float = 1.0,
    ) -> None:
        #: The daemon's socket.
        self.socket_path: str = socket_path or default_socket_path()
        #: Shown by the daemon's `stats`/`status` and in the brain's errors.
        self.process: str = process or _default_process_name()
        self.framework: str = framework
        self.worker_role: Optional[str] = worker_role
        self.queue_size: int = max(1, int(queue_size))
        self.connect_timeout: float = float(connect_timeout)
        self._codec = codec_for(framing)
        #: `json` or `msgpack`: what "auto" resolved to.
        self.framing: str = self._codec.name
        self._engines: List[str] = []
        for name in engines:
            self._add_engine(name)
        self._static_capabilities: Dict[str, List[str]] = {}
        for engine, actions in (capabilities or {}).items():
            actions = [actions] if isinstance(actions, str) else actions
            self._static_capabilities[engine] = sorted(set(actions))
        self._closed = False
        self._init_state()
        _live_clients.add(self)

    # ------------------------------------------------------------------
    # state (also what a forked child starts from)

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue = _EventQueue(self.queue_size)
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._conn: Optional[Connection] = None
        self._inflight: "OrderedDict[int, _Batch]" = OrderedDict()
        self._retry: Deque[_Batch] = deque()
        self._next_ack = 0
        self._hello_due = False
        # counters (stats)
        # Events settled (sent, refused or dropped after being accepted):
        # with what the queue holds and gave out, `accepted` and `queued`
        # come without emit() counting anything.
        self._settled = 0
        self._sent = 0
        self._refused = 0
        self._refused_by_code: Dict[str, int] = {}
        self._dropped_queue_full = 0
        self._dropped_unavailable = 0
        self._connected = False
        self._ever_connected = False
        self._reconnects = 0
        self._connect_failures = 0
        self._last_error: Optional[str] = None
        self._logged_codes: Dict[str, int] = {}
        # send_durable
        self._durable_lock = threading.Lock()
        self._durable_conn: Optional[Connection] = None
        self._durable_next = 0
        # commands
        self._handlers: Dict[Tuple[str, str], Handler] = {}
        self._serve_capabilities: Dict[str, List[str]] = {}
        self._cmd_thread: Optional[threading.Thread] = None
        self._cmd_stop = threading.Event()
        self._cmd_conn: Optional[Connection] = None
        self._cmd_send_lock = threading.Lock()
        self._cmd_hello_due = False
        self._cmd_next_ack = 0
        self._cmd_registered = False
        self._commands_received = 0
        self._commands_succeeded = 0
        self._commands_failed = 0
        self._serve_workers: List[str] = []
        self._serve_schedulers: List[str] = []
        self._serve_features: List[str] = []
        self._cmd_errors_seen: Dict[str, int] = {}
        # health
        self._health_source: Optional[Callable[[], Mapping[str, Any]]] = None
        self._health_interval = HEALTH_INTERVAL
        self._health_thread: Optional[threading.Thread] = None
        self._health_kick = threading.Event()
        self._health_sent = 0
        self._health_failures = 0
        self._health_last_error: Optional[str] = None

    def _after_fork_in_child(self) -> None:
        # Only this process's descriptors are closed: the parent's
        # connections are the same sockets and must keep working.
        for conn in (self._conn, self._durable_conn, self._cmd_conn):
            if conn is not None:
                conn.close()
        self._init_state()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked without the at-fork hook
            self._after_fork_in_child()

    # ------------------------------------------------------------------
    # fire and forget

    def emit(self, engine: str, kind: str, task_id: str = "", data: Optional[Mapping[str, Any]] = None,
             occurred_at: Any = None, id: Optional[str] = None) -> bool:
        """Queues one event; True if queued, False if dropped (counted).
        Never blocks on I/O, never raises."""
        try:
            event = build_event(engine, kind, task_id, data, occurred_at, id)
        except Exception:  # pragma: no cover - build_event is total
            return self._refuse_here("unbuildable")
        return self._enqueue(event)

    def record(self, event: Mapping[str, Any]) -> bool:
        """`emit` for a prebuilt event dict (`engine`, `kind`, `task_id`,
        `data`, `occurred_at`, `id`; other keys are ignored)."""
        try:
            built = _event_from_dict(event)
        except Exception:
            return self._refuse_here("unbuildable")
        return self._enqueue(built)

    def _refuse_here(self, code: str) -> bool:
        """Counts one event this process could not hand over (`refused`, by
        `code`); returns False for `emit` to return."""
        try:
            with self._lock:
                self._refused += 1
                self._bump_code(code, 1)
        except Exception:  # pragma: no cover
            pass
        return False

    def _enqueue(self, event: Dict[str, Any]) -> bool:
        try:
            self._check_pid()
            if self._closed:
                with self._lock:
                    self._dropped_unavailable += 1
                return False
            if self._thread is None:
                self._start_sender()
            # Encoded here, in the caller's thread (about a microsecond):
            # the sender then holds the GIL only to join and send bytes, so
            # it keeps an emitting thread waiting for tens of microseconds,
            # not hundreds.
            data = self._encode(event)
            if data is None:
                return self._refuse_here("unencodable")
            if self._queue.put(data):
                return True
            with self._lock:
                self._dropped_queue_full += 1
            return False
        except Exception:  # e.g. no thread can start during interpreter shutdown
            log.debug("z4j-agentd: could not queue an event", exc_info=True)
            try:
                with self._lock:
                    self._dropped_unavailable += 1
            except Exception:  # pragma: no cover
                pass
            return False

    def _start_sender(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            thread = threading.Thread(target=self._run_sender, name="z4j-agentd-events", daemon=True)
            self._thread = thread
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._thread = None
            raise

    def flush(self, timeout: float = 2.0) -> bool:
        """Waits until every queued event is sent (committed by the daemon),
        refused or dropped; False if some still wait after `timeout` s."""
        self._check_pid()
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queued() > 0:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._changed.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Flushes (up to `timeout` s), then stops the background threads and
        closes every connection. Events still waiting are counted
        `dropped_unavailable`; later `emit` calls return False."""
        self._check_pid()
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self.flush(timeout)
        self._closed = True
        self._stop.set()
        self._cmd_stop.set()
        self._queue.wake()
        for conn in (self._conn, self._cmd_conn):
            if conn is not None:
                conn.interrupt()
        self._health_kick.set()
        for thread in (self._thread, self._cmd_thread, self._health_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.1, deadline - time.monotonic()))
        with self._durable_lock:
            if self._durable_conn is not None:
                self._durable_conn.close()
                self._durable_conn = None
        if self._thread is None:
            self._abandon_all()

    def stats(self) -> Dict[str, Any]:
        """This process's counters (see docs/python-client.md)."""
        self._check_pid()
        with self._lock:
            return {
                "queued": self._queued(),
                "accepted": self._queued() + self._settled,
                "sent": self._sent,
                "dropped": self._dropped_queue_full + self._dropped_unavailable + self._refused,
                "dropped_queue_full": self._dropped_queue_full,
                "dropped_unavailable": self._dropped_unavailable,
                "refused": self._refused,
                "refused_by_code": dict(self._refused_by_code),
                "connected": self._connected,
                "reconnects": self._reconnects,
                "connect_failures": self._connect_failures,
                "last_error": self._last_error,
                "commands_serving": self._cmd_thread is not None and not self._cmd_stop.is_set(),
                "commands_registered": self._cmd_registered,
                "commands_received": self._commands_received,
                "commands_succeeded": self._commands_succeeded,
                "commands_failed": self._commands_failed,
                "health_reports_sent": self._health_sent,
                "health_source_failures": self._health_failures,
                "health_last_error": self._health_last_error,
                "pid": self._pid,
                "socket_path": self.socket_path,
                "framing": self.framing,
                "queue_size": self.queue_size,
                "closed": self._closed,
            }

    # ------------------------------------------------------------------
    # engines and hello

    @property
    def engines(self) -> List[str]:
        return list(self._engines)

    def _add_engine(self, name: str) -> None:
        """Declares one more engine; connected threads say hello again."""
        if isinstance(name, str) and name.strip() and name.strip() not in self._engines:
            self._engines.append(name.strip())
            self._hello_due = True
            self._cmd_hello_due = True

    def _hello(self, capabilities: Optional[Dict[str, List[str]]] = None) -> Dict[str, Any]:
        msg: Dict[str, Any] = {
            "type": "hello",
            "process": self.process,
            "pid": os.getpid(),
            "framework": self.framework,
            "engines": list(self._engines),
        }
        if capabilities is not None:
            msg["capabilities"] = capabilities
            # A scheduler's capabilities are keyed by its name: not an engine.
            with self._lock:
                schedulers = set(self._serve_schedulers)
            msg["engines"] = sorted((set(self._engines) | set(capabilities)) - schedulers)
        if self.worker_role is not None:
            msg["worker_role"] = self.worker_role
        return msg

    # ------------------------------------------------------------------
    # the background sender

    def _run_sender(self) -> None:
        backoff = BACKOFF_FIRST
        next_attempt = 0.0
        failing = False
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    now = time.monotonic()
                    if now < next_attempt:
                        self._stop.wait(min(next_attempt - now, IDLE_POLL))
                        continue
                    try:
                        conn = Connection(self.socket_path, self._codec, self.connect_timeout)
                        self._hello_due = False
                        conn.send(self._hello(), timeout=max(1.0, self.connect_timeout))
                    except (OSError, EOFError) as exc:
                        with self._lock:
                            self._connect_failures += 1
                            self._last_error = f"{type(exc).__name__}: {exc}"
                        if not failing:
                            log.warning(
                                "z4j-agentd: cannot reach the daemon at %s (%s); events wait in this "
                                "process's queue (at most %d, then the newest are dropped) and the "
                                "client retries every %.1f-%.0f s",
                                self.socket_path, exc, self.queue_size, BACKOFF_FIRST, BACKOFF_MAX)
                        failing = True
                        next_attempt = time.monotonic() + backoff
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        continue
                    with self._lock:
                        self._conn = conn
                        self._connected = True
                        if self._ever_connected:
                            self._reconnects += 1
                        self._ever_connected = True
                        self._last_error = None
                    if failing:
                        log.info("z4j-agentd: connected to the daemon at %s", self.socket_path)
                    failing = False
                    backoff = BACKOFF_FIRST
                self._pump(self._conn)
            except (OSError, EOFError, ProtocolError) as exc:
                self._lost_connection(exc)
                next_attempt = time.monotonic() + backoff
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception:  # a bug here must not kill the sender
                log.exception("z4j-agentd: unexpected error in the event sender")
                if self._conn is not None:
                    self._lost_connection(RuntimeError("internal error"))
                self._stop.wait(IDLE_POLL)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        with self._lock:
            self._connected = False
        self._abandon_all()

    def _pump(self, conn: Connection) -> None:
        """One round: read replies, send what may be sent, wait a little."""
        if self._hello_due:
            self._hello_due = False
            conn.send(self._hello(), timeout=SEND_TIMEOUT)
        self._on_replies(conn.poll(0))
        sent = False
        while len(self._inflight) < MAX_INFLIGHT_BATCHES and not self._stop.is_set():
            wait = 0.0 if (sent or self._inflight) else IDLE_POLL
            batch = self._take_batch(wait)
            if batch is None:
                break
            self._send_batch(conn, batch)
            sent = True
            if len(batch) >= BATCH_MAX_EVENTS and len(self._queue) < BATCH_MAX_EVENTS:
                # Busy: let the next batch fill while the application's
                # threads run, instead of taking the GIL back for a few events.
                time.sleep(BUSY_LINGER)
        if not sent:
            self._on_replies(conn.poll(IDLE_POLL if self._inflight else 0))

    def _take_batch(self, wait: float) -> Optional[_Batch]:
        if self._retry:
            return self._retry.popleft()
        events = self._queue.take(BATCH_MAX_EVENTS, wait)
        if not events:
            return None
        if sum(map(len, events)) <= BATCH_MAX_BYTES:  # the usual case, in C
            return _Batch(events)
        batches: List[List[bytes]] = []
        current: List[bytes] = []
        size = 0
        for data in events:  # encoded by emit()
            if current and size + len(data) > BATCH_MAX_BYTES:
                batches.append(current)
                current, size = [], 0
            current.append(data)
            size += len(data)
        batches.append(current)
        # Too big for one message: the rest go right after, in order.
        self._retry.extend(_Batch(more) for more in batches[1:])
        return _Batch(batches[0])

    def _encode(self, event: Dict[str, Any]) -> Optional[bytes]:
        try:
            return self._codec.encode_value(event)
        except Exception:
            try:
                return self._codec.encode_value(json_safe(event))
            except Exception:
                log.warning("z4j-agentd: an event could not be encoded and was dropped", exc_info=True)
                return None

    def _send_batch(self, conn: Connection, batch: _Batch) -> None:
        self._next_ack += 1
        ack_id = self._next_ack
        batch.indexed_codes.clear()
        batch.other_codes.clear()
        self._inflight[ack_id] = batch  # before writing: a failed write puts it back
        conn.send_bytes(self._codec.encode_events(batch.encoded, ack_id), timeout=SEND_TIMEOUT)

    def _on_replies(self, replies: List[dict]) -> None:
        for msg in replies:
            kind = msg.get("type")
            ack_id = msg.get("ack_id")
            batch = self._inflight.get(ack_id) if isinstance(ack_id, int) else None
            if kind == "ack" and batch is not None:
                del self._inflight[ack_id]
                stored = msg.get("stored")
                n = len(batch)
                stored = min(n, max(0, stored)) if isinstance(stored, int) else 0
                self._settle(batch, stored)
            elif kind == "error":
                code = str(msg.get("code") or "unknown")
                self._log_refusal(code, msg.get("message"))
                if batch is None:
                    continue
                if "index" in msg:
                    batch.indexed_codes.append(code)
                elif code == "spool_full":  # an ack with the stored count follows
                    batch.other_codes.append(code)
                else:  # the whole message was refused; no ack follows
                    del self._inflight[ack_id]
                    batch.other_codes.append(code)
                    self._settle(batch, 0)

    def _settle(self, batch: _Batch, stored: int) -> None:
        n = len(batch)
        refused = n - stored
        with self._lock:
            self._sent += stored
            if refused:
                self._refused += refused
                counted = 0
                for code in batch.indexed_codes[:refused]:
                    self._bump_code(code, 1)
                    counted += 1
                if refused > counted:
                    rest = batch.other_codes[0] if batch.other_codes else "unknown"
                    self._bump_code(rest, refused - counted)
            self._resolved(n)

    def _resolved(self, n: int) -> None:
        """Call with the lock held: n accepted events are settled."""
        self._settled += n
        self._changed.notify_all()

    def _queued(self) -> int:
        """Accepted events not yet settled: in the queue or with the sender."""
        # The length first: an item the sender takes between the two reads
        # is then counted twice (flush waits a little longer), never missed.
        queued = len(self._queue)
        return self._queue.taken + queued - self._settled

    def _bump_code(self, code: str, n: int) -> None:
        self._refused_by_code[code] = self._refused_by_code.get(code, 0) + n

    def _log_refusal(self, code: str, message: Any) -> None:
        seen = self._logged_codes.get(code, 0)
        self._logged_codes[code] = seen + 1
        if seen == 0 or seen % 1000 == 0:
            log.warning("z4j-agentd refused events (%s, %d so far): %s", code, seen + 1, message)

    def _lost_connection(self, exc: BaseException) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        batches = list(self._inflight.values())
        self._inflight.clear()
        dropped = 0
        for batch in reversed(batches):
            batch.attempts += 1
            if batch.attempts >= MAX_SEND_ATTEMPTS:
                dropped += len(batch)
            else:
                self._retry.appendleft(batch)
        with self._lock:
            self._connected = False
            self._last_error = f"{type(exc).__name__}: {exc}"
            if dropped:
                self._dropped_unavailable += dropped
                self._resolved(dropped)
        if not self._stop.is_set():
            log.warning("z4j-agentd: lost the connection to the daemon at %s (%s); reconnecting",
                        self.socket_path, exc)

    def _abandon_all(self) -> None:
        """At stop: whatever is still here will not be handed over."""
        n = sum(len(b) for b in self._inflight.values()) + sum(len(b) for b in self._retry)
        self._inflight.clear()
        self._retry.clear()
        n += len(self._queue.drain())
        if n:
            with self._lock:
                self._dropped_unavailable += n
                self._resolved(n)
            log.warning("z4j-agentd: %d events were not handed to the daemon at %s before close",
                        n, self.socket_path)

    # ------------------------------------------------------------------
    # durable

    def send_durable(self, events: List[Mapping[str, Any]], timeout: float = 5.0) -> int:
        """Sends `events` (dicts as for `record`) and waits until the daemon
        committed them to its spool. Returns how many were stored.

        Raises DaemonUnavailable when the daemon cannot be reached or does
        not answer within `timeout` seconds (nothing is known to be stored:
        retry with the same event ids and timestamps), and EventRefused when
        the daemon refused one or more of them (`.stored` were committed).
        """
        self._check_pid()
        built = [_event_from_dict(e) for e in events]
        if not built:
            return 0
        deadline = time.monotonic() + timeout
        with self._durable_lock:
            try:
                return self._durable(built, deadline)
            except (OSError, EOFError, ProtocolError, TimeoutError) as exc:
                if self._durable_conn is not None:
                    self._durable_conn.close()
                    self._durable_conn = None
                if isinstance(exc, TimeoutError):
                    raise DaemonUnavailable(
                        f"z4j-agentd at {self.socket_path} did not acknowledge within {timeout:g} s"
                    ) from None
                raise DaemonUnavailable(f"z4j-agentd at {self.socket_path}: {exc}") from None

    def _durable(self, built: List[Dict[str, Any]], deadline: float) -> int:
        conn = self._durable_conn
        if conn is None:
            connect_timeout = min(self.connect_timeout, max(0.001, deadline - time.monotonic()))
            conn = Connection(self.socket_path, self._codec, connect_timeout)
            self._durable_conn = conn
            conn.send(self._hello(), timeout=max(0.001, deadline - time.monotonic()))
        # Chunks, so no message nears the daemon's 16 MiB limit.
        chunks: List[Tuple[int, int, List[bytes]]] = []  # (ack_id, first index, encoded)
        start = 0
        while start < len(built):
            encoded: List[bytes] = []
            size = 0
            i = start
            while i < len(built) and len(encoded) < DURABLE_CHUNK_EVENTS:
                data = self._encode(built[i])
                if data is None:
                    data = self._codec.encode_value({"engine": None, "kind": None})  # refused by the daemon
                if encoded and size + len(data) > 4 * BATCH_MAX_BYTES:
                    break
                encoded.append(data)
                size += len(data)
                i += 1
            self._durable_next += 1
            chunks.append((self._durable_next, start, encoded))
            start = i
        for ack_id, _, encoded in chunks:
            conn.send_bytes(self._codec.encode_events(encoded, ack_id),
                            timeout=max(0.001, deadline - time.monotonic()))
        waiting = {ack_id: (first, len(encoded)) for ack_id, first, encoded in chunks}
        stored_total = 0
        errors: List[dict] = []
        while waiting:
            msg = conn.recv(deadline)
            ack_id = msg.get("ack_id")
            if not isinstance(ack_id, int) or ack_id not in waiting:
                continue
            first, n = waiting[ack_id]
            if msg.get("type") == "ack":
                stored = msg.get("stored")
                stored_total += min(n, max(0, stored)) if isinstance(stored, int) else 0
                del waiting[ack_id]
            elif msg.get("type") == "error":
                err = {"code": str(msg.get("code") or "unknown"), "message": str(msg.get("message") or "")}
                if isinstance(msg.get("index"), int):
                    err["index"] = first + msg["index"]
                errors.append(err)
                if "index" not in msg and err["code"] != "spool_full":
                    del waiting[ack_id]  # the whole message was refused
        refused = len(built) - stored_total
        with self._lock:
            self._sent += stored_total
            if refused:
                self._refused += refused
                for err in errors[:refused]:
                    self._bump_code(err["code"], 1)
                if refused > len(errors):
                    self._bump_code(errors[0]["code"] if errors else "unknown", refused - len(errors))
        if errors:
            first_error = errors[0]
            raise EventRefused(first_error["code"], first_error["message"], stored=stored_total, errors=errors)
        return stored_total

    # ------------------------------------------------------------------
    # one-off requests

    def _request(self, msg: Dict[str, Any], expect: str, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            conn = Connection(self.socket_path, self._codec, min(self.connect_timeout, timeout))
        except OSError as exc:
            raise DaemonUnavailable(f"z4j-agentd at {self.socket_path}: {exc}") from None
        try:
            conn.send({**msg, "ack_id": 1}, timeout=timeout)
            while True:
                reply = conn.recv(deadline)
                if reply.get("type") == expect:
                    return reply
        except (OSError, EOFError, ProtocolError, TimeoutError) as exc:
            raise DaemonUnavailable(f"z4j-agentd at {self.socket_path}: {str(exc) or type(exc).__name__}") from None
        finally:
            conn.close()

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the daemon answers a `ping` within `timeout` seconds."""
        try:
            self._request({"type": "ping"}, "pong", timeout)
            return True
        except DaemonUnavailable:
            return False

    def daemon_stats(self, timeout: float = 2.0) -> Dict[str, Any]:
        """The daemon's `stats` map; DaemonUnavailable when it does not answer."""
        reply = self._request({"type": "stats"}, "stats", timeout)
        reply.pop("ack_id", None)
        return reply

    # ------------------------------------------------------------------
    # commands

    def serve(self, handlers: Mapping[Tuple[str, str], Handler], *,
              capabilities: Optional[Mapping[str, Iterable[str]]] = None,
              workers: Iterable[str] = (), schedulers: Iterable[str] = (),
              runtime_features: Iterable[str] = ()) -> None:
        """Runs the brain's commands in this process, from now on.

        `handlers` maps `(engine, action)` to a callable taking the command
        (the daemon's `command` message: `id`, `action`, `target`,
        `parameters`, `timeout_seconds`) and returning a dict or None (the
        result). An exception answers `failed` with its text. `capabilities`
        adds tokens that are not actions (e.g. `retry_by_reference_v1`), and
        the capabilities of a scheduler, keyed by its name.

        `workers` are the worker names this process hosts, exactly as its
        events name them in `data.worker` (e.g. `celery@web-1`): the daemon
        hands it the commands for those workers (`restart_worker`,
        `pool_grow`, ...). `schedulers` are the schedulers it runs (e.g.
        `celery-beat`), `runtime_features` the protocol features it
        implements (e.g. `external_schedule_protocol_v1`).

        Returns at once: a thread on its own connection says `hello` with
        the engines and actions of every handler (plus the constructor's
        `capabilities`), answers commands, and reconnects and says hello
        again when the daemon restarts. Calling it again adds handlers
        (and workers, schedulers, features).
        """
        self._check_pid()
        checked: Dict[Tuple[str, str], Handler] = {}
        for key, handler in handlers.items():
            if (not isinstance(key, tuple) or len(key) != 2
                    or not all(isinstance(k, str) and k.strip() for k in key)):
                raise TypeError(f"handler keys are (engine, action) pairs of strings, got {key!r}")
            if not callable(handler):
                raise TypeError(f"the handler for {key!r} is not callable")
            checked[(key[0].strip(), key[1].strip())] = handler
        names = {}
        for field, values in (("workers", workers), ("schedulers", schedulers),
                              ("runtime_features", runtime_features)):
            values = [values] if isinstance(values, str) else list(values or ())
            if not all(isinstance(v, str) and v.strip() for v in values):
                raise TypeError(f"{field} are non-empty strings, got {values!r}")
            names[field] = [v.strip() for v in values]
        with self._lock:
            if self._closed:
                raise RuntimeError("this z4j_agentd.Client is closed")
            self._handlers.update(checked)
            for engine, tokens in (capabilities or {}).items():
                tokens = [tokens] if isinstance(tokens, str) else tokens
                merged = set(self._serve_capabilities.get(engine, ())) | set(tokens)
                self._serve_capabilities[engine] = sorted(merged)
            for field, kept in (("workers", self._serve_workers), ("schedulers", self._serve_schedulers),
                                ("runtime_features", self._serve_features)):
                kept.extend(v for v in names[field] if v not in kept)
            self._cmd_hello_due = True
            if self._cmd_thread is not None:
                return
            self._cmd_stop.clear()
            thread = threading.Thread(target=self._run_commands, name="z4j-agentd-commands", daemon=True)
            self._cmd_thread = thread
        thread.start()

    def _command_capabilities(self) -> Dict[str, List[str]]:
        caps: Dict[str, set] = {}
        for engine, actions in self._static_capabilities.items():
            caps.setdefault(engine, set()).update(actions)
        for engine, action in list(self._handlers):
            caps.setdefault(engine, set()).add(action)
        for engine, tokens in self._serve_capabilities.items():
            caps.setdefault(engine, set()).update(tokens)
        return {engine: sorted(actions) for engine, actions in sorted(caps.items())}

    def _served_names(self) -> Dict[str, List[str]]:
        """`workers`, `schedulers` and `runtime_features` of the command hello."""
        with self._lock:
            out = {"workers": list(self._serve_workers), "schedulers": list(self._serve_schedulers),
                   "runtime_features": list(self._serve_features)}
        return {k: v for k, v in out.items() if v}

    def _run_commands(self) -> None:
        backoff = BACKOFF_FIRST
        failing = False
        while not self._cmd_stop.is_set():
            conn = None
            try:
                conn = Connection(self.socket_path, self._codec, self.connect_timeout)
                with self._lock:
                    self._cmd_conn = conn
                self._cmd_hello_due = True
                while not self._cmd_stop.is_set():
                    if self._cmd_hello_due:
                        self._cmd_hello_due = False
                        self._cmd_next_ack += 1
                        hello = {**self._hello(self._command_capabilities()), **self._served_names(),
                                 "ack_id": self._cmd_next_ack}
                        with self._cmd_send_lock:
                            conn.send(hello, timeout=SEND_TIMEOUT)
                    for msg in conn.poll(IDLE_POLL):
                        kind = msg.get("type")
                        if kind == "command":
                            self._start_command(conn, msg)
                        elif kind == "hello_ack":
                            with self._lock:
                                self._cmd_registered = True
                            self._health_kick.set()
                            if failing or backoff != BACKOFF_FIRST:
                                log.info("z4j-agentd: serving commands again through %s", self.socket_path)
                            failing = False
                            backoff = BACKOFF_FIRST
                        elif kind == "error":
                            self._log_command_error(msg)
            except (OSError, EOFError, ProtocolError) as exc:
                if not failing and not self._cmd_stop.is_set():
                    log.warning("z4j-agentd: no command connection to %s (%s); retrying",
                                self.socket_path, exc)
                failing = True
            except Exception:
                log.exception("z4j-agentd: unexpected error in the command server")
            finally:
                with self._lock:
                    self._cmd_conn = None
                    self._cmd_registered = False
                if conn is not None:
                    conn.close()
            if self._cmd_stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _log_command_error(self, msg: Mapping[str, Any]) -> None:
        # A refused health report comes back at every interval: the first
        # of each code is a warning, the rest go to debug.
        code = str(msg.get("code"))
        with self._lock:
            seen = self._cmd_errors_seen.get(code, 0)
            self._cmd_errors_seen[code] = seen + 1
        level = logging.WARNING if seen == 0 else logging.DEBUG
        log.log(level, "z4j-agentd answered the command connection with %s: %s", code, msg.get("message"))

    # ------------------------------------------------------------------
    # health reports

    def report_health(self, source: Callable[[], Mapping[str, Any]], *,
                      interval: float = HEALTH_INTERVAL) -> None:
        """Sends the daemon a `health` report every `interval` seconds, and at
        once each time the command connection says hello (see `serve`,
        which must run first or later in this process: the report goes on
        its connection, so the workers it names are this process's).

        `source()` runs on a background thread and returns the report's
        `engines` map: per engine `queue_depths`, `workers` and scalar facts
        (docs/local-protocol.md, "health"). It may take its time (a broker
        round trip); an exception skips that report and is counted in
        `stats()["health_source_failures"]`. Calling it again replaces the
        source and the interval.
        """
        self._check_pid()
        if not callable(source):
            raise TypeError("report_health needs a callable returning the engines map")
        interval = float(interval)
        if not 0 < interval <= HEALTH_INTERVAL_MAX:
            raise ValueError(f"report_health interval must be > 0 and at most {HEALTH_INTERVAL_MAX:.0f} s, "
                             f"got {interval}")
        with self._lock:
            if self._closed:
                raise RuntimeError("this z4j_agentd.Client is closed")
            self._health_source = source
            self._health_interval = interval
            self._health_kick.set()
            if self._health_thread is not None:
                return
            thread = threading.Thread(target=self._run_health, name="z4j-agentd-health", daemon=True)
            self._health_thread = thread
        thread.start()

    def _run_health(self) -> None:
        while not self._cmd_stop.is_set():
            self._health_kick.wait(self._health_interval)
            self._health_kick.clear()
            if self._cmd_stop.is_set():
                break
            with self._lock:
                conn = self._cmd_conn if self._cmd_registered else None
                source, interval = self._health_source, self._health_interval
            if conn is None or source is None:
                continue  # the next hello_ack kicks it
            try:
                engines = json_safe(dict(source()))
            except Exception as exc:
                with self._lock:
                    self._health_failures += 1
                    first = self._health_last_error is None
                    self._health_last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.log(logging.WARNING if first else logging.DEBUG,
                        "z4j-agentd: the health report was not built", exc_info=True)
                continue
            msg = {"type": "health", "interval_seconds": interval, "engines": engines}
            try:
                with self._cmd_send_lock:
                    conn.send(msg, timeout=SEND_TIMEOUT)
                with self._lock:
                    self._health_sent += 1
            except (OSError, EOFError) as exc:
                log.debug("z4j-agentd: health report not sent: %s", exc)

    def _start_command(self, conn: Connection, msg: Dict[str, Any]) -> None:
        with self._lock:
            self._commands_received += 1
        thread = threading.Thread(target=self._run_command, args=(conn, msg),
                                  name="z4j-agentd-command", daemon=True)
        thread.start()

    def _find_handler(self, engine: Optional[str], action: Any) -> Optional[Handler]:
        handler = self._handlers.get((engine, action)) if engine else None
        if handler is None and not engine:
            for (_, act), candidate in list(self._handlers.items()):
                if act == action:
                    return candidate
        return handler

    def _run_command(self, conn: Connection, msg: Dict[str, Any]) -> None:
        target = msg.get("target") if isinstance(msg.get("target"), dict) else {}
        params = msg.get("parameters") if isinstance(msg.get("parameters"), dict) else {}
        filt = params.get("filter") if isinstance(params.get("filter"), dict) else {}
        engine = target.get("engine") or params.get("engine") or filt.get("engine")
        action = msg.get("action")
        handler = self._find_handler(engine, action)
        status, result, error = "failed", None, None
        if handler is None:
            error = (f"pid {os.getpid()} ({self.process}) has no handler for action {action!r} "
                     f"of engine {engine!r}")
        else:
            try:
                out = handler(msg)
                if out is None or isinstance(out, dict):
                    status, result = "success", (None if out is None else json_safe(out))
                else:
                    error = (f"the handler for {action!r} returned {type(out).__name__}, "
                             f"not a dict or None")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None and len(error) > MAX_COMMAND_ERROR_CHARS:
            error = error[:MAX_COMMAND_ERROR_CHARS]
        answer = {"type": "command_result", "id": msg.get("id"), "status": status,
                  "result": result, "error": error}
        with self._lock:
            if status == "success":
                self._commands_succeeded += 1
            else:
                self._commands_failed += 1
        try:
            with self._cmd_send_lock:
                conn.send(answer, timeout=SEND_TIMEOUT)
        except (OSError, EOFError) as exc:
            # The daemon has already told the brain the command failed.
            log.warning("z4j-agentd: the answer to command %s (%s) was not sent: %s",
                        msg.get("id"), action, exc)


# ----------------------------------------------------------------------
# every client of the process: fork and exit


_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for client in list(_live_clients):
        try:
            client._after_fork_in_child()
        except Exception:  # pragma: no cover - never break the child
            pass


#: How long the interpreter's exit waits for each client to hand its events
#: over; much less when the daemon was already unreachable.
EXIT_FLUSH_SECONDS = 2.0
EXIT_FLUSH_UNREACHABLE_SECONDS = 0.2


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + 2 * EXIT_FLUSH_SECONDS
    for client in list(_live_clients):
        if client._pid != os.getpid() or client._closed:
            continue
        unreachable = not client._connected and client._connect_failures > 0
        budget = EXIT_FLUSH_UNREACHABLE_SECONDS if unreachable else EXIT_FLUSH_SECONDS
        try:
            client.close(timeout=max(0.1, min(budget, deadline - time.monotonic())))
        except Exception:  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


# ----------------------------------------------------------------------
# the process's default client

_default: Optional[Client] = None
_default_lock = threading.Lock()


def configure(**kwargs: Any) -> Client:
    """Makes a new default client with these `Client` arguments and returns
    it; the previous default, if any, is closed (it hands over what it has)."""
    global _default
    client = Client(**kwargs)
    with _default_lock:
        old, _default = _default, client
    if old is not None and old is not client:
        old.close(timeout=1.0)
    return client


def get_client() -> Client:
    """The default client (created with default arguments on first use, or
    again after it was closed)."""
    global _default
    client = _default
    if client is not None and not client._closed:
        return client
    with _default_lock:
        if _default is None or _default._closed:
            _default = Client()
        return _default


def emit(engine: str, kind: str, task_id: str = "", data: Optional[Mapping[str, Any]] = None,
         occurred_at: Any = None, id: Optional[str] = None) -> bool:
    """`get_client().emit(...)`; never raises."""
    try:
        return get_client().emit(engine, kind, task_id, data, occurred_at, id)
    except Exception:
        return False


def record(event: Mapping[str, Any]) -> bool:
    """`get_client().record(event)`; never raises."""
    try:
        return get_client().record(event)
    except Exception:
        return False
