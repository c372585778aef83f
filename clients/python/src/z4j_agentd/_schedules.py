"""z4j's external schedule protocol (version 1), for any scheduler.

A scheduler process (Celery beat, for one) fills the brain's Schedules page
through the daemon: the brain activates the scheduler's stream right after
the daemon's `hello` (`schedule.external.activate`, naming a stream and an
epoch), and the process answers with a complete, stable snapshot of its
schedules at `sequence` 1 of that epoch. Each later observation is a new
complete snapshot at the next sequence. A snapshot travels as
`schedule.snapshot` events: one or more `rows` frames, then one `terminal`
frame, each with `data.external_snapshot_frame` (the frame body) and
`data.frame_digest`.

The brain recomputes every digest from the values it receives, so the
bodies here follow its canonical form exactly: rows normalized to a closed
set of keys, sorted by `source_key`, and hashed as SHA-256 over JSON with
sorted keys, no spaces, UTF-8 (not ASCII-escaped), no NaN.

`ExternalScheduler` runs one scheduler's side of it: activation, the
snapshots (on request and whenever the source changes), and the brain's
`schedule.external.mutate` ("trigger now", and create/update/delete on a
scheduler that can write its schedules) and `schedule.resync` commands. What
the scheduler is stays behind the small `source` interface it is given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._redact import scrub_text

log = logging.getLogger("z4j_agentd.schedules")

PROTOCOL_VERSION = 1
#: The runtime feature a scheduler process declares in its `hello`.
RUNTIME_FEATURE = "external_schedule_protocol_v1"
#: Capability: the scheduler publishes complete stable snapshots (the brain
#: activates only schedulers that declare it).
STABLE_SNAPSHOT = "external_schedule_stable_snapshot_v1"
#: Capability: the scheduler applies the brain's create/update/delete.
MUTATION = "external_schedule_mutation_v1"
#: The counters a compare-and-set ignores (they move on their own).
LIVE_FIELDS = ("last_run_at", "next_run_at", "total_runs")
#: Canonical JSON of one rows frame's schedules stays under this (the brain
#: takes 1 MiB frames; the daemon's envelope and the frame's other fields fit
#: in the rest).
ROW_PAYLOAD_BYTES = 736 * 1024
#: Rows removed from the scheduler that the first snapshot of a new epoch
#: still carries (see `ExternalScheduler._steps`): at most this many, the
#: latest removed ...
MAX_CARRIED_ROWS = 1000
#: ... and none removed longer ago than this (seconds).
CARRY_SECONDS = 30 * 86400
#: Receipts remembered for a mutation the brain delivers again.
REMEMBERED_OPERATIONS = 256
#: Kinds the brain's rows take.
KINDS = ("cron", "interval", "clocked", "solar")
#: Fields of a schedule the brain's create/update may set.
EDITABLE = frozenset({"name", "task_name", "kind", "expression", "timezone", "queue", "args", "kwargs",
                      "is_enabled"})

_HEX = frozenset("0123456789abcdef")


class ProtocolError(ValueError):
    """A value cannot be put in the canonical form, or a command does not
    bind this scheduler's current stream."""


class Conflict(RuntimeError):
    """The schedule is not what the brain expected: refresh and try again."""


# ---------------------------------------------------------------------------
# canonical form


def _json_value(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{path} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for key in sorted(value):
            if not isinstance(key, str):
                raise ProtocolError(f"{path} has a key that is not a string: {key!r}")
            out[key] = _json_value(value[key], f"{path}.{key}")
        return out
    raise ProtocolError(f"{path} holds a {type(value).__name__}, which JSON has no form for")


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The bytes every digest of the protocol is taken over."""
    return json.dumps(_json_value(value, "$"), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest(value: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON, 64 lowercase hex digits."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def source_scope(owner: str) -> str:
    """The whole-owner source scope the brain gives an activation."""
    return canonical_json({"kind": "scheduler-owner", "owner": owner, "version": 1}).decode("utf-8")


def iso_utc(value: Any, field: str = "timestamp") -> Optional[str]:
    """A timestamp as the brain compares them: UTC, microseconds, `+00:00`.
    A datetime without an offset is read as UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except (TypeError, ValueError):
            raise ProtocolError(f"{field} is not an ISO-8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat(timespec="microseconds")


def normalize_row(raw: Mapping[str, Any], owner: str) -> Dict[str, Any]:
    """One schedule in the exact vocabulary of the brain's rows (20 keys).

    `raw` needs `name` and `task_name`; `source_key` (the scheduler's own,
    stable identity of the schedule) defaults to `external_id`, then to the
    name. The rest take the brain's defaults.
    """
    if not owner:
        raise ProtocolError("the scheduler's name is empty")
    inner = str(raw.get("scheduler") or owner)
    if inner != owner:
        raise ProtocolError(f"a row of scheduler {inner!r} in the snapshot of {owner!r}")
    name = str(raw.get("name") or "").strip()
    task_name = str(raw.get("task_name") or "").strip()
    if not name or not task_name:
        raise ProtocolError(f"a schedule needs a name and a task_name, got {name!r} and {task_name!r}")
    source_key = str(raw.get("source_key") or raw.get("external_id") or name).strip()
    args = raw.get("args", [])
    kwargs = raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ProtocolError(f"schedule {name!r}: args must be a list and kwargs a dict")
    total_runs = int(raw.get("total_runs", 0) or 0)
    if total_runs < 0:
        raise ProtocolError(f"schedule {name!r}: total_runs is negative")
    row = {
        "source_key": source_key,
        "engine": str(raw.get("engine") or owner.split("-", 1)[0] or owner),
        "scheduler": owner,
        "name": name,
        "task_name": task_name,
        "kind": str(raw.get("kind") or "interval"),
        "expression": str(raw.get("expression") or ""),
        "timezone": str(raw.get("timezone") or "UTC"),
        "queue": str(raw["queue"]) if raw.get("queue") is not None else None,
        "priority": str(raw.get("priority") or "normal"),
        "args": args,
        "kwargs": kwargs,
        "is_enabled": bool(raw.get("is_enabled", True)),
        "last_run_at": iso_utc(raw.get("last_run_at"), "last_run_at"),
        "next_run_at": iso_utc(raw.get("next_run_at"), "next_run_at"),
        "total_runs": total_runs,
        "external_id": str(raw["external_id"]) if raw.get("external_id") is not None else None,
        "catch_up": str(raw.get("catch_up") or "skip"),
        "source": str(raw.get("source") or "agent"),
        "source_hash": str(raw["source_hash"]) if raw.get("source_hash") is not None else None,
    }
    return _json_value(row, f"$.schedules[{source_key}]")


def configuration(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A row without its live counters: what a compare-and-set compares."""
    return {k: v for k, v in row.items() if k not in LIVE_FIELDS}


def _sorted_rows(rows: Iterable[Mapping[str, Any]], owner: str) -> List[Dict[str, Any]]:
    normalized = sorted((normalize_row(r, owner) for r in rows), key=lambda r: r["source_key"])
    keys = [r["source_key"] for r in normalized]
    if len(keys) != len(set(keys)):
        seen: set = set()
        twice = sorted({k for k in keys if k in seen or seen.add(k)})
        raise ProtocolError(f"two schedules share the source key {twice[0]!r}")
    return normalized


@dataclass(frozen=True)
class Authority:
    """The stream and epoch an activation gave: every frame names them."""

    owner: str
    stream_id: str
    epoch_uuid: str
    epoch_number: int
    adapter_instance_id: str
    source_scope: str

    IDS = ("stream_id", "epoch_uuid", "epoch_number", "adapter_instance_id", "source_scope")

    @classmethod
    def from_activation(cls, params: Mapping[str, Any], owner: str) -> "Authority":
        """Checks a `schedule.external.activate` command's parameters."""
        named = str(params.get("owner") or params.get("scheduler") or "")
        if named != owner:
            raise ProtocolError(f"the activation is for scheduler {named!r}, this process runs {owner!r}")
        epoch = params.get("epoch_number")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch <= 0:
            raise ProtocolError(f"the activation's epoch_number must be a positive integer, got {epoch!r}")
        values = {}
        for field in ("stream_id", "epoch_uuid", "adapter_instance_id", "source_scope"):
            value = params.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ProtocolError(f"the activation has no {field}")
            values[field] = value
        for field in ("stream_id", "epoch_uuid"):
            try:
                uuid.UUID(values[field])
            except ValueError:
                raise ProtocolError(f"the activation's {field} is not a UUID: {values[field]!r}") from None
        if params.get("stable_source") is not True:
            raise ProtocolError("the activation does not authorize a stable source (stable_source is not true)")
        return cls(owner=owner, epoch_number=epoch, **values)

    def binds(self, params: Mapping[str, Any]) -> bool:
        """Does a command name exactly this stream and epoch?"""
        return all(params.get(f) == getattr(self, f) for f in self.IDS)

    def ids(self) -> Dict[str, Any]:
        return {"stream_id": self.stream_id, "epoch_uuid": self.epoch_uuid, "epoch_number": self.epoch_number,
                "owner": self.owner, "source_scope": self.source_scope,
                "adapter_instance_id": self.adapter_instance_id}


def projection_body(authority: Authority, sequence: int, rows: Sequence[Mapping[str, Any]], *,
                    kind: str = "snapshot", complete: bool = True,
                    deleted_source_keys: Iterable[str] = (), operation_id: Optional[str] = None
                    ) -> Dict[str, Any]:
    """The projection a snapshot's digest is taken over (14 keys)."""
    if sequence <= 0:
        raise ProtocolError("a sequence is positive")
    normalized = _sorted_rows(rows, authority.owner)
    deleted = sorted({str(k).strip() for k in deleted_source_keys if str(k).strip()})
    if set(deleted) & {r["source_key"] for r in normalized}:
        raise ProtocolError("a projection both keeps and deletes one source key")
    return _json_value({
        "protocol_version": PROTOCOL_VERSION,
        **authority.ids(),
        "sequence": int(sequence),
        "kind": kind,
        "complete": bool(complete),
        "stable_source": True,
        "operation_id": operation_id,
        "schedules": normalized,
        "deleted_source_keys": deleted,
    }, "$")


def snapshot_frame_body(authority: Authority, sequence: int, *, snapshot_id: str, frame_kind: str,
                        frame_index: int, frame_count: int, row_count: int, snapshot_digest: str,
                        rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One frame of a stable snapshot (16 keys): `rows` frames are indexed
    0..frame_count-1, the `terminal` frame is frame_count and has no rows."""
    if len(snapshot_digest) != 64 or not set(snapshot_digest) <= _HEX:
        raise ProtocolError("a snapshot digest is 64 lowercase hex digits")
    normalized = _sorted_rows(rows, authority.owner)
    if frame_kind == "rows":
        if not normalized or not 0 <= frame_index < frame_count:
            raise ProtocolError("a rows frame has rows and an index below frame_count")
    elif frame_kind == "terminal":
        if normalized or frame_index != frame_count:
            raise ProtocolError("the terminal frame has no rows and the index frame_count")
    else:
        raise ProtocolError(f"frame_kind is rows or terminal, not {frame_kind!r}")
    return _json_value({
        "protocol_version": PROTOCOL_VERSION,
        **authority.ids(),
        "sequence": int(sequence),
        "snapshot_id": snapshot_id,
        "frame_kind": frame_kind,
        "frame_index": int(frame_index),
        "frame_count": int(frame_count),
        "row_count": int(row_count),
        "snapshot_digest": snapshot_digest,
        "stable_source": True,
        "schedules": normalized,
    }, "$")


def frame_bytes(row: Mapping[str, Any]) -> int:
    """Bytes of canonical JSON a rows frame holding only `row` takes."""
    return len(canonical_json({"schedules": [row]}))


def fit_row(row: Mapping[str, Any], limit: int = ROW_PAYLOAD_BYTES) -> Optional[Dict[str, Any]]:
    """A normalized row that fits a snapshot frame on its own: unchanged when
    it does; else with its args and kwargs replaced by a note saying they
    were left out (the schedule itself still runs with them); None when
    even that is too large (a name of several hundred KiB)."""
    if frame_bytes(row) <= limit:
        return dict(row)
    size = len(canonical_json({"args": row["args"], "kwargs": row["kwargs"]}))
    short = {**row, "args": [f"<left out: the args and kwargs are {size} bytes of JSON, more than a "
                             f"snapshot frame holds>"], "kwargs": {}}
    return short if frame_bytes(short) <= limit else None


def keep_left_out_arguments(definition: Mapping[str, Any], row: Mapping[str, Any],
                            limit: int = ROW_PAYLOAD_BYTES) -> Dict[str, Any]:
    """The brain's update `definition` of the schedule whose normalized row
    is `row`, made safe for a row whose args and kwargs were left out of the
    snapshot to fit a frame (`fit_row`): the page holds the note in their
    place, and the dashboard sends the args and kwargs it shows with every
    update. When the definition's args and kwargs are those the page shows,
    they are dropped from it (the schedule keeps its real ones); when they
    differ, the update is refused (ValueError): the real ones cannot be seen
    or edited from the page. A row that fits is returned as it came."""
    shown = fit_row(row, limit)
    if shown is None or shown == dict(row) or not ({"args", "kwargs"} & set(definition)):
        return dict(definition)
    if definition.get("args", shown["args"]) == shown["args"] and \
            definition.get("kwargs", shown["kwargs"]) == shown["kwargs"]:
        return {k: v for k, v in definition.items() if k not in ("args", "kwargs")}
    raise ValueError(f"schedule {row.get('name')!r} has args and kwargs too large to show on the page; they "
                     f"cannot be changed from the brain (change them where the schedule is defined), and an "
                     f"update from the brain must leave them as the page shows them")


def check_definition_types(spec: Mapping[str, Any]) -> None:
    """Refuses a field of the brain's definition (a create or update) of
    the wrong type, saying which: `name` and `task_name` non-empty strings,
    `kind` and `expression` strings, `args` a list, `kwargs` an object,
    `is_enabled` true or false, `queue` a string or null. What a scheduler
    checks beyond (its timezones, its cron dialect) it checks itself."""
    for field in ("name", "task_name"):
        if field in spec and (not isinstance(spec[field], str) or not spec[field].strip()):
            raise ValueError(f"{field} must be a non-empty string, got {spec[field]!r}")
    for field in ("kind", "expression"):
        if field in spec and not isinstance(spec[field], str):
            raise ValueError(f"{field} must be a string, got {spec[field]!r}")
    if "args" in spec and not isinstance(spec["args"], list):
        raise ValueError(f"args must be a list, got {spec['args']!r}")
    if "kwargs" in spec and not isinstance(spec["kwargs"], dict):
        raise ValueError(f"kwargs must be an object, got {spec['kwargs']!r}")
    if "is_enabled" in spec and not isinstance(spec["is_enabled"], bool):
        raise ValueError(f"is_enabled must be true or false, got {spec['is_enabled']!r}")
    if "queue" in spec and spec["queue"] is not None and not isinstance(spec["queue"], str):
        raise ValueError(f"queue must be a string or null, got {spec['queue']!r}")


def durable_sender(client: Any, timeout: float = 10.0) -> Callable[[List[Dict[str, Any]]], Any]:
    """What a scheduler hands its `ExternalScheduler` to send snapshot
    events: the client's `send_durable`, tried twice: after a daemon
    restart the first try finds the old connection closed, the second opens
    a new one (the brain takes a frame it already has as a replay)."""
    from .client import DaemonUnavailable

    def send(events: List[Dict[str, Any]]) -> Any:
        try:
            return client.send_durable(events, timeout=timeout)
        except DaemonUnavailable:
            return client.send_durable(events, timeout=timeout)

    return send


def _chunks(rows: List[Dict[str, Any]], limit: int) -> List[List[Dict[str, Any]]]:
    chunks: List[List[Dict[str, Any]]] = []
    current: List[Dict[str, Any]] = []
    size = len(canonical_json({"schedules": []}))
    for row in rows:
        alone = frame_bytes(row)
        if alone > limit:
            raise ProtocolError(f"schedule {row['name']!r} alone is larger than a snapshot frame "
                                f"({alone} bytes of canonical JSON, at most {limit}); "
                                f"shorten its args or kwargs")
        row_size = len(canonical_json(row)) + 1
        if current and size + row_size > limit:
            chunks.append(current)
            current, size = [], len(canonical_json({"schedules": []}))
        current.append(row)
        size += row_size
    if current:
        chunks.append(current)
    return chunks


def snapshot_events(authority: Authority, sequence: int, rows: Sequence[Mapping[str, Any]], *,
                    reason: str, snapshot_id: Optional[str] = None, occurred_at: Optional[str] = None,
                    row_payload_bytes: int = ROW_PAYLOAD_BYTES) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The `schedule.snapshot` events of one complete snapshot, and the
    summary the brain's commands are answered with."""
    projection = projection_body(authority, sequence, rows)
    snapshot_digest = digest(projection)
    normalized = projection["schedules"]
    chunks = _chunks(normalized, row_payload_bytes)
    snapshot_id = snapshot_id or str(uuid.uuid4())
    occurred_at = occurred_at or datetime.now(timezone.utc).isoformat(timespec="microseconds")
    frames = [("rows", i, chunk) for i, chunk in enumerate(chunks)] + [("terminal", len(chunks), [])]
    events = []
    for frame_kind, index, chunk in frames:
        body = snapshot_frame_body(authority, sequence, snapshot_id=snapshot_id, frame_kind=frame_kind,
                                   frame_index=index, frame_count=len(chunks), row_count=len(normalized),
                                   snapshot_digest=snapshot_digest, rows=chunk)
        events.append({"id": str(uuid.uuid4()), "kind": "schedule.snapshot", "engine": authority.owner,
                       "task_id": "", "occurred_at": occurred_at,
                       "data": {"external_snapshot_frame": body, "frame_digest": digest(body),
                                "reason": reason}})
    summary = {"scheduler": authority.owner, "stream_id": authority.stream_id,
               "epoch_uuid": authority.epoch_uuid, "epoch_number": authority.epoch_number,
               "sequence": sequence, "adapter_instance_id": authority.adapter_instance_id,
               "schedule_count": len(normalized), "frame_count": len(events)}
    return events, summary


# ---------------------------------------------------------------------------
# one scheduler's stream


class Source:
    """What `ExternalScheduler` needs of a scheduler. Subclass it.

    * `rows()`: every schedule now, as dicts for `normalize_row` (each with a
      stable `source_key`). Raise when the source cannot be read in full: a
      snapshot is complete, so a partial one would delete schedules.
    * `capabilities()`: `list`, `trigger_now`, `create`, ..., plus
      `STABLE_SNAPSHOT` and, for a source that can write, `MUTATION`.
    * `trigger(row)`: run the schedule's task now; returns what to report
      (e.g. the task id).
    * `mutate(operation, source_key, expected, definition)`: `create`,
      `update` or `delete` in the source, checking first (atomically, where
      the source can) that the schedule's configuration still equals
      `expected` (raise `Conflict` otherwise); returns the schedule's row
      afterwards (None after a delete).
    """

    def rows(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def capabilities(self) -> List[str]:
        raise NotImplementedError

    def trigger(self, row: Mapping[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def mutate(self, operation: str, source_key: Optional[str], expected: Optional[Mapping[str, Any]],
               definition: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        raise Conflict("this scheduler's schedules cannot be changed from the brain")


@dataclass
class _Pending:
    authority: Authority
    sequence: int
    events: List[Dict[str, Any]]
    key: Optional[bytes]  # None for an intermediate step (see ExternalScheduler._steps)
    summary: Dict[str, Any]
    rows: List[Dict[str, Any]]
    #: Source keys of rows the scheduler no longer has, carried in this
    #: snapshot only so the brain takes their removal (see `_steps`).
    carried: frozenset = frozenset()


class ExternalScheduler:
    """One scheduler's stream through the daemon.

    `send(events)` hands a snapshot's events to the daemon and returns once
    they are committed to its spool (`Client.send_durable`), raising
    otherwise: a snapshot's sequence counts only once its events are in, so
    the sequences the brain sees have no gap. A snapshot that could not be
    handed over is sent again, unchanged, before anything newer.

    `changed()` asks for a new snapshot (the background thread publishes one
    when the rows differ from the last published, live counters included,
    `next_run_at` aside); the thread also looks every `poll_interval`
    seconds, for changes made behind the scheduler's back.
    """

    def __init__(self, owner: str, source: Source, send: Callable[[List[Dict[str, Any]]], Any], *,
                 poll_interval: float = 5.0, min_interval: float = 1.0,
                 state_path: Optional[str] = None, row_payload_bytes: int = ROW_PAYLOAD_BYTES) -> None:
        self.owner = owner
        self.source = source
        self._send = send
        self.poll_interval = float(poll_interval)
        self.min_interval = float(min_interval)
        self.state_path = state_path
        self.row_payload_bytes = int(row_payload_bytes)
        self._lock = threading.RLock()
        self._authority: Optional[Authority] = None
        self._sequence = 0
        self._last_key: Optional[bytes] = None
        #: The scheduler's rows in the last snapshot handed over, in this
        #: epoch or an earlier one (then read from `state_path`).
        self._published: List[Dict[str, Any]] = []
        #: Rows the scheduler had and has no more, by source key, with the
        #: time (Unix seconds) they were first found gone: the brain may
        #: still hold them (a snapshot removing them may have reached it
        #: under an epoch it had left), so the first snapshot of each new
        #: epoch carries them (bounded by MAX_CARRIED_ROWS, CARRY_SECONDS).
        self._removed: Dict[str, Tuple[Dict[str, Any], float]] = {}
        #: The stream `state_path` was written under (None: not known).
        self._state_stream: Optional[str] = None
        self._load_state()
        #: True until the current epoch's first snapshot is handed over.
        self._epoch_fresh = False
        self._last_summary: Optional[Dict[str, Any]] = None
        self._pending: Optional[_Pending] = None
        self._receipts: "OrderedDict[str, Tuple[str, Dict[str, Any]]]" = OrderedDict()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        #: Counters for stats(): snapshots handed to the daemon, attempts that failed.
        self.snapshots_published = 0
        self.snapshot_failures = 0
        self.last_error: Optional[str] = None
        #: Rows of the source left out of the last snapshot (they cannot be
        #: put in the canonical form or do not fit a frame even shortened),
        #: and rows whose args and kwargs were left out to fit a frame.
        self.rows_skipped = 0
        self.rows_shortened = 0
        self._reported: Dict[str, str] = {}

    # -- what the process declares ---------------------------------------

    def handlers(self) -> Dict[Tuple[str, str], Callable[[Dict[str, Any]], Dict[str, Any]]]:
        return {(self.owner, "schedule.external.activate"): self.activate,
                (self.owner, "schedule.external.mutate"): self.mutate,
                (self.owner, "schedule.resync"): self.resync}

    def serve(self, client: Any) -> None:
        """Declares the scheduler on `client`'s command connection and
        starts the background publisher."""
        client.serve(self.handlers(), capabilities={self.owner: sorted(set(self.source.capabilities()))},
                     schedulers=[self.owner], runtime_features=[RUNTIME_FEATURE])
        self.start()

    def stats(self) -> Dict[str, Any]:
        """The stream's counters. Read without the stream's lock: a publish
        or a command holds it while it waits for the scheduler (up to the
        source's timeout), and stats() may be called from that scheduler's
        own thread or loop. Each value is read once (a consistent view of
        all of them is not promised)."""
        a = self._authority
        out = {"scheduler": self.owner, "active": a is not None,
               "epoch_number": a.epoch_number if a else None, "sequence": self._sequence,
               "snapshot_pending": self._pending is not None,
               "snapshots_published": self.snapshots_published,
               "snapshot_failures": self.snapshot_failures, "last_error": self.last_error,
               "rows_skipped": self.rows_skipped, "rows_shortened": self.rows_shortened,
               "rows_carried": len(self._removed)}
        extra = getattr(self.source, "stats", None)
        if callable(extra):
            try:
                out.update({k: v for k, v in (extra() or {}).items() if k not in out})
            except Exception:  # the stream's own counters still answer
                log.debug("z4j-agentd: %s source stats failed", self.owner, exc_info=True)
        return out

    # -- snapshots -------------------------------------------------------

    def _observe(self) -> Tuple[List[Dict[str, Any]], bytes]:
        """The source's rows, normalized and each fitting a frame. One bad
        row does not stop the snapshot: it is left out (a row the brain
        holds under its key then goes from the page), logged once and
        counted in `rows_skipped`; a row too large for a frame loses its
        args and kwargs on the page (`rows_shortened`)."""
        rows: Dict[str, Dict[str, Any]] = {}
        problems: Dict[str, str] = {}
        shortened = 0
        for raw in self.source.rows():
            label = str(raw.get("source_key") or raw.get("external_id") or raw.get("name") or "?")
            try:
                row = normalize_row(raw, self.owner)
            except (ProtocolError, TypeError, ValueError) as exc:
                problems[label] = f"left out of the snapshot: {exc}"
                continue
            fitted = fit_row(row, self.row_payload_bytes)
            if fitted is None:
                problems[label] = (f"left out of the snapshot: {frame_bytes(row)} bytes of JSON even "
                                   f"without its args and kwargs, at most {self.row_payload_bytes}")
                continue
            if fitted != row:
                shortened += 1
                problems[label] = (f"shown without its args and kwargs: {frame_bytes(row)} bytes of JSON, "
                                   f"more than a snapshot frame holds ({self.row_payload_bytes})")
            if row["source_key"] in rows:
                problems[label] = f"left out of the snapshot: another schedule has the source key {label!r}"
                continue
            rows[row["source_key"]] = fitted
        self.rows_skipped = sum(1 for p in problems.values() if p.startswith("left out"))
        self.rows_shortened = shortened
        for label, problem in problems.items():
            if self._reported.get(label) != problem:
                log.error("z4j-agentd: %s schedule %s is %s", self.owner, label, problem)
        self._reported = problems
        ordered = [rows[k] for k in sorted(rows)]
        key = canonical_json({"rows": [{k: v for k, v in r.items() if k != "next_run_at"} for r in ordered]})
        return ordered, key

    def publish(self, reason: str, *, force: bool = False) -> Optional[Dict[str, Any]]:
        """Hands a new snapshot to the daemon when the rows changed (always
        with `force`); returns its summary, or None when nothing was due or
        no activation was received yet. Raises when it could not be handed
        over (it is sent again first next time)."""
        with self._lock:
            authority = self._authority
            if authority is None:
                return None
            pending = self._pending
            if pending is not None and pending.authority == authority:
                self._hand_over(pending)
            rows, key = self._observe()
            if not force and key == self._last_key:
                return None
            for step, carried in self._steps(rows):
                self._hand_over(self._build(authority, step, reason, None, carried))
            pending = self._build(authority, rows, reason, key)
            self._hand_over(pending)
            return pending.summary

    def _build(self, authority: Authority, rows: List[Dict[str, Any]], reason: str,
               key: Optional[bytes], carried: Iterable[str] = ()) -> _Pending:
        sequence = self._sequence + 1
        events, summary = snapshot_events(authority, sequence, rows, reason=reason,
                                          row_payload_bytes=self.row_payload_bytes)
        return _Pending(authority, sequence, events, key, summary, rows, frozenset(carried))

    def _steps(self, rows: List[Dict[str, Any]]) -> List[Tuple[List[Dict[str, Any]], List[str]]]:
        """Snapshots to hand over before `rows`, so the brain takes the
        change, each with the keys of the rows it carries.

        The brain (1.13) refuses a snapshot that removes a row last written
        in an earlier epoch ("external schedule delete is not current"), and
        one that adds a row under the name of a row it removes in the same
        snapshot (its names are unique per scheduler, and it applies the
        changes in no fixed order); either refusal leaves the page stale
        for good, since every later sequence is then a gap.

        So the first snapshot of an epoch carries every row the brain may
        still hold: the rows of the last snapshot handed over and gone
        since, and the rows removed before that (`_removed`). A snapshot
        that removed them may have reached the brain under an epoch it had
        already left (it was in the daemon's spool when the uplink dropped)
        and been thrown away; carrying a row the brain has already deleted
        only shows it again until the next snapshot. A carried row whose
        name a current row holds stays out (the brain took that row, so it
        took the removal). Within an epoch, a row that takes over the name
        of another comes one snapshot after that other one is removed.
        """
        before = {r["source_key"]: r for r in self._published}
        keys = {r["source_key"] for r in rows}
        names_before = {r["name"]: r["source_key"] for r in before.values()}
        renamed = {r["source_key"] for r in rows
                   if names_before.get(r["name"], r["source_key"]) != r["source_key"]}
        kept = [r for r in rows if r["source_key"] not in renamed]
        steps: List[Tuple[List[Dict[str, Any]], List[str]]] = []
        if self._epoch_fresh:
            # Latest first: of two gone rows with one name, the latest one.
            gone = [(float("inf"), r) for k, r in before.items() if k not in keys]
            gone += sorted(((t, r) for k, (r, t) in self._removed.items() if k not in keys and k not in before),
                           key=lambda item: -item[0])
            names = {r["name"] for r in kept}
            carried: Dict[str, Dict[str, Any]] = {}
            for _, r in gone:
                if r["name"] not in names:
                    names.add(r["name"])
                    carried[r["source_key"]] = r
            if carried:
                steps.append((sorted(kept + list(carried.values()), key=lambda r: r["source_key"]),
                              sorted(carried)))
        if renamed:
            steps.append((kept, []))
        return steps

    def _hand_over(self, pending: _Pending) -> None:
        self._pending = pending
        try:
            self._send(pending.events)
        except Exception as exc:
            self.snapshot_failures += 1
            self.last_error = scrub_text(f"{type(exc).__name__}: {exc}")[:500]
            if type(exc).__name__ == "EventRefused":
                # Refused as such: sending the same events again cannot help.
                self._pending = None
            raise
        self._pending = None
        self._sequence = pending.sequence
        self._last_key = pending.key
        self._last_summary = pending.summary
        self._remember(pending)
        self._epoch_fresh = False
        self.snapshots_published += 1
        self.last_error = None
        self._save_state()

    def _remember(self, pending: _Pending) -> None:
        """After a snapshot is handed over: the rows it holds for the
        scheduler, and the ones gone since the last (into `_removed`)."""
        present = [r for r in pending.rows if r["source_key"] not in pending.carried]
        keys = {r["source_key"] for r in present}
        now = time.time()
        for row in self._published:
            if row["source_key"] not in keys and row["source_key"] not in self._removed:
                self._removed[row["source_key"]] = (row, now)
        for key in keys:
            self._removed.pop(key, None)
        self._published = present
        self._trim_removed(now)

    def _trim_removed(self, now: float) -> None:
        kept = sorted(((t, k) for k, (_, t) in self._removed.items() if now - t <= CARRY_SECONDS), reverse=True)
        keep = {k for _, k in kept[:MAX_CARRIED_ROWS]}
        self._removed = {k: v for k, v in self._removed.items() if k in keep}

    def _load_state(self) -> None:
        if not self.state_path:
            return
        try:
            with open(self.state_path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("scheduler") != self.owner:
                return
            rows = saved.get("rows")
            published = _sorted_rows(rows, self.owner) if isinstance(rows, list) else []
            removed: Dict[str, Tuple[Dict[str, Any], float]] = {}
            for item in saved.get("removed") or []:
                row = normalize_row(item["row"], self.owner)
                removed[row["source_key"]] = (row, float(item["removed_at"]))
            stream = saved.get("stream_id")
        except FileNotFoundError:
            return
        except Exception as exc:  # unreadable: start as without it
            log.warning("z4j-agentd: ignoring %s (%s): it is rewritten after the next snapshot",
                        self.state_path, exc)
            return
        self._published, self._removed = published, removed
        self._state_stream = stream if isinstance(stream, str) else None
        self._trim_removed(time.time())

    def _forget_other_stream(self, authority: Authority) -> None:
        """Rows kept for another stream (another brain, or the brain's
        stream started over) say nothing about what this one holds."""
        if self._state_stream is not None and self._state_stream != authority.stream_id:
            if self._published or self._removed:
                log.info("z4j-agentd: %s was written for another %s stream: its rows are not carried",
                         self.state_path, self.owner)
            self._published, self._removed = [], {}
        self._state_stream = authority.stream_id

    def _save_state(self) -> None:
        """Written to a new file beside it, then renamed over it (mode 0600:
        rows hold the schedules' arguments)."""
        if not self.state_path:
            return
        directory = os.path.dirname(os.path.abspath(self.state_path))
        state = {"version": 2, "scheduler": self.owner, "stream_id": self._state_stream,
                 "rows": self._published,
                 "removed": [{"removed_at": t, "row": r} for _, (r, t) in sorted(self._removed.items())]}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(self.state_path) + ".",
                                       suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.state_path)
            tmp = None
        except OSError as exc:
            if not self._state_warned:
                self._state_warned = True
                log.warning("z4j-agentd: cannot write %s (%s): a schedule removed while %s is stopped "
                            "may then stay on the brain's page", self.state_path, exc, self.owner)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    _state_warned = False

    def changed(self) -> None:
        """The schedules (or their counters) may have changed: publish soon."""
        self._wake.set()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"z4j-agentd-{self.owner}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        last = 0.0
        failing = False
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            if self._stop.is_set():
                break
            pause = self.min_interval - (time.monotonic() - last)
            if pause > 0 and self._stop.wait(pause):
                break
            self._wake.clear()
            try:
                if self.publish("change") is not None:
                    last = time.monotonic()
                if failing:
                    log.info("z4j-agentd: %s snapshots are handed to the daemon again", self.owner)
                failing = False
            except Exception as exc:
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "z4j-agentd: the %s snapshot was not published (%s); retrying", self.owner,
                        scrub_text(str(exc)),
                        exc_info=not isinstance(exc, (OSError, ProtocolError)) and not failing)
                failing = True
                if self._stop.wait(min(self.poll_interval, 5.0)):
                    break
                self._wake.set()  # try again, the unsent snapshot first

    # -- commands --------------------------------------------------------

    def activate(self, command: Mapping[str, Any]) -> Dict[str, Any]:
        """`schedule.external.activate`: take the epoch, publish sequence 1."""
        params = command.get("parameters") or {}
        authority = Authority.from_activation(params, self.owner)
        with self._lock:
            current = self._authority
            if current is not None and current.stream_id == authority.stream_id:
                if current == authority and self._last_summary is not None:
                    return dict(self._last_summary)  # the same activation again
                if authority.epoch_number <= current.epoch_number:
                    raise ProtocolError(
                        f"epoch {authority.epoch_number} of stream {authority.stream_id} is not newer than "
                        f"the active epoch {current.epoch_number}")
            # A new epoch starts over, even when its first snapshot fails:
            # nothing is published under the old one again.
            self._authority = authority
            self._forget_other_stream(authority)
            self._sequence = 0
            self._last_key = None
            self._last_summary = None
            self._pending = None
            self._epoch_fresh = True
            self._receipts.clear()
            try:
                summary = self.publish("activation", force=True)
            except Exception as exc:
                self._wake.set()  # the publisher thread sends it again
                raise RuntimeError(f"the {self.owner} activation snapshot was not handed to z4j-agentd: "
                                   f"{type(exc).__name__}: {scrub_text(str(exc))}") from None
        assert summary is not None
        log.info("z4j-agentd: %s activated (epoch %d), %d schedules published", self.owner,
                 authority.epoch_number, summary["schedule_count"])
        return summary

    def resync(self, command: Mapping[str, Any]) -> Dict[str, Any]:
        """`schedule.resync` (the brain's "Sync now"): a fresh snapshot now."""
        with self._lock:
            if self._authority is None:
                raise ProtocolError(f"{self.owner} has no active stream yet (no activation since it started)")
            summary = self.publish("resync", force=True)
        return {"schedulers_drained": 1, **(summary or {})}

    def mutate(self, command: Mapping[str, Any]) -> Dict[str, Any]:
        """`schedule.external.mutate`: trigger, create, update or delete, then
        a new snapshot; the receipt names the snapshot's sequence and the
        schedule's configuration as observed after the change."""
        target = command.get("target") or {}
        params = dict(command.get("parameters") or {})
        if params.get("scheduler") != self.owner or target.get("scheduler", self.owner) != self.owner:
            raise ProtocolError(f"the mutation names scheduler {params.get('scheduler')!r}, this process runs "
                                f"{self.owner!r}")
        try:
            operation_id = str(uuid.UUID(str(params.get("operation_id"))))
        except ValueError:
            raise ProtocolError(f"operation_id is not a UUID: {params.get('operation_id')!r}") from None
        operation = params.get("operation")
        if operation not in ("trigger", "create", "update", "delete"):
            raise ProtocolError(f"unknown operation {operation!r} (trigger, create, update, delete)")
        definition = params.get("definition") or {}
        if not isinstance(definition, dict) or set(definition) - EDITABLE:
            raise ProtocolError(f"definition may set only {sorted(EDITABLE)}")
        fingerprint = digest(params)
        with self._lock:
            authority = self._authority
            if authority is None or not authority.binds(params):
                raise ProtocolError(
                    f"the mutation names epoch {params.get('epoch_number')} of stream {params.get('stream_id')}, "
                    f"which is not this process's current {self.owner} stream; the brain re-activates it")
            seen = self._receipts.get(operation_id)
            if seen is not None:
                if not hmac.compare_digest(seen[0], fingerprint):
                    raise ProtocolError(f"operation {operation_id} was already applied with other parameters")
                return dict(seen[1])
            source_key = params.get("schedule_id")
            expected = params.get("expected")
            trigger_result = None
            if operation == "trigger":
                rows, _ = self._observe()
                row = next((r for r in rows if r["source_key"] == source_key), None)
                if row is None:
                    raise Conflict(f"schedule {source_key!r} is not in {self.owner} any more; refresh the page")
                if not isinstance(expected, dict) or configuration(row) != configuration(
                        normalize_row(expected, self.owner)):
                    raise Conflict(f"schedule {row['name']!r} changed in {self.owner} since the brain saw it; "
                                   f"refresh and trigger again")
                result = self.source.trigger(row)
                trigger_result = {"status": "success", "result": result, "error": None}
                observed: Optional[Dict[str, Any]] = row
            else:
                if MUTATION not in self.source.capabilities():
                    raise Conflict(f"{self.owner} cannot {operation} schedules here (its schedules are "
                                   f"read-only; use a scheduler with a database, e.g. django-celery-beat)")
                if operation == "create" and (source_key is not None or expected is not None):
                    raise ProtocolError("a create names no existing schedule")
                if operation != "create" and (not source_key or not isinstance(expected, dict)):
                    raise ProtocolError(f"{operation} needs schedule_id and expected")
                changed = self.source.mutate(
                    operation, source_key, normalize_row(expected, self.owner) if expected else None, definition)
                observed = normalize_row(changed, self.owner) if changed is not None else None
            try:
                summary = self.publish(f"native-mutation:{operation_id}", force=True)
            except Exception as exc:
                what = "the task was sent" if operation == "trigger" else f"the {operation} may have been applied"
                raise RuntimeError(f"{what}, but the snapshot confirming it was not handed to z4j-agentd "
                                   f"({type(exc).__name__}: {scrub_text(str(exc))}); the page shows it after the next "
                                   f"snapshot") from None
            assert summary is not None
            receipt = {**summary, "operation_id": operation_id,
                       "source_key": observed["source_key"] if observed else source_key,
                       "observed_configuration": configuration(observed) if observed else None}
            if trigger_result is not None:
                receipt["trigger_result"] = trigger_result
            self._receipts[operation_id] = (fingerprint, receipt)
            while len(self._receipts) > REMEMBERED_OPERATIONS:
                self._receipts.popitem(last=False)
        return dict(receipt)


__all__ = ["Authority", "Conflict", "EDITABLE", "ExternalScheduler", "KINDS", "MUTATION", "PROTOCOL_VERSION",
           "ProtocolError", "RUNTIME_FEATURE", "STABLE_SNAPSHOT", "Source", "canonical_json", "configuration",
           "digest", "fit_row", "frame_bytes", "iso_utc", "keep_left_out_arguments", "normalize_row",
           "projection_body", "snapshot_events",
           "snapshot_frame_body", "source_scope"]
