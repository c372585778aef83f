"""The Workers page and queue depths: a Celery worker's main process
reports itself to the daemon (`health`, docs/local-protocol.md).

Everything about the worker is read inside the process, from the running
WorkController and Celery's own in-process state (what `celery inspect`
would ask every worker of the cluster for over the broker, with no
broadcast round trip):

* `stats`: pid, uptime, clock, tasks run per name (`total`), the pool
  (implementation, `max-concurrency`, processes...), prefetch count,
  rusage and load average, the broker's address without credentials;
* `active`: the tasks running now (arguments cut short);
* `active_queues`: the queues the worker consumes, as `inspect
  active_queues` gives them;
* `registered`: the task names the worker knows (not Celery's own
  `celery.*`);
* `conf`: the settings the brain lints, with Celery's defaults filled in
  and the worker's effective values where its command line overrides them;
  nothing else of the configuration (no URL, password or key) ever leaves.

Queue depths take one broker round trip (a passive `queue_declare` per
queue, over one connection; see `_queues`) for the queues the worker
consumes and the queues the app declares (`task_default_queue`,
`task_queues`, the queues named in static `task_routes`), so a queue with
messages waiting and nobody consuming it shows too. The round trip runs on
the client's health thread with a deadline; when the broker cannot be
reached the report goes without depths (`broker_connected` false,
`depth_failures` counts it) and the worker's own details still go.

Each report also sends a `worker.heartbeat` event for the worker, which
keeps its row on the brain's Workers page fresh.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set

from .. import _integration
from .._jsonsafe import json_safe
from .._redact import event_value
from . import _queues

log = logging.getLogger("z4j_agentd.celery")

ENGINE = "celery"

#: Seconds between two reports unless $Z4J_CELERY_HEALTH_INTERVAL says
#: otherwise: the brain's heartbeat interval, so each heartbeat carries
#: fresh details.
DEFAULT_INTERVAL = 10.0
#: At most one `worker.heartbeat` event per this many seconds (each is a row
#: in the brain's events; the Worker row's last heartbeat needs no more).
HEARTBEAT_EVENT_SECONDS = 30.0
INTERVAL_ENV = "Z4J_CELERY_HEALTH_INTERVAL"
#: The longest a report waits for the broker's queue depths.
DEPTH_DEADLINE = 10.0
#: A running task's args and kwargs in `active` are cut to this many bytes each.
ACTIVE_ARGS_BYTES = 512
#: Queues measured per report (the daemon keeps at most 1,024): the consumed
#: ones first, then those the app declares (kombu adds a queue to
#: app.amqp.queues whenever the process sends to a new one).
MAX_QUEUES = 1024
#: A fact (a string) is cut to this many characters (the daemon's limit is 1,024).
MAX_FACT_CHARS = 500

#: The settings the brain keeps and lints (its allowlist); nothing else is sent.
CONF_KEYS = (
    "task_serializer", "result_serializer", "accept_content", "task_default_queue",
    "worker_concurrency", "worker_prefetch_multiplier", "worker_max_tasks_per_child",
    "worker_max_memory_per_child", "task_acks_late", "task_reject_on_worker_lost",
    "task_time_limit", "task_soft_time_limit", "broker_pool_limit", "broker_heartbeat",
    "timezone", "enable_utc",
)
#: Settings the worker's command line can override: (conf key, WorkController attribute).
_EFFECTIVE = (
    ("worker_concurrency", "concurrency"),
    ("worker_prefetch_multiplier", "prefetch_multiplier"),
    ("worker_max_tasks_per_child", "max_tasks_per_child"),
    ("worker_max_memory_per_child", "max_memory_per_child"),
    ("task_time_limit", "time_limit"),
    ("task_soft_time_limit", "soft_time_limit"),
)
#: What of the broker connection goes into `stats.broker` (never the
#: password, nor transport_options, which may carry credentials).
_BROKER_KEYS = ("hostname", "userid", "virtual_host", "port", "insist", "ssl", "transport",
                "connect_timeout", "heartbeat", "login_method", "failover_strategy", "uri_prefix")
_INT_MAX = 2**31 - 1
# The credentials run to the LAST "@" before the path, as kombu reads a URL
# (a password may hold "@").
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/\s;]*)@")


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """$Z4J_CELERY_HEALTH_INTERVAL in seconds, else `default`; a bad value is an error
    saying what to set."""
    return _integration.interval_from_env(INTERVAL_ENV, default, DEFAULT_INTERVAL)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    try:
        return getattr(obj, name, default)
    except Exception:
        return default


def _snapshot(collection: Any) -> List[Any]:
    """A list copy of a set another thread may be changing."""
    for _ in range(5):
        try:
            return list(collection)
        except RuntimeError:  # changed size during iteration: try again
            continue
    return []


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without URL credentials (`scheme://user:pass@` -> `scheme://user:**@`)
    and without any of `secrets`."""
    def mask(m: "re.Match[str]") -> str:
        auth = m.group("auth")
        user = auth.split(":", 1)[0] if ":" in auth else ""
        return f"{m.group('scheme')}{user}:**@" if user else f"{m.group('scheme')}**@"

    out = text
    for secret in secrets:  # the exact secrets first: masking URLs could split one
        if isinstance(secret, str) and len(secret) >= 3:
            out = out.replace(secret, "**")
    return _URL_CREDENTIALS.sub(mask, out)


def broker_secrets(app: Any) -> List[str]:
    """The passwords an error from the broker or the result backend may
    quote: of the read and write broker connections (and their failover
    URLs) and of the result backend's URL. Built without connecting."""
    found: List[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str) and value and value not in found:
            found.append(value)

    def from_url(url: Any) -> None:
        if isinstance(url, str) and "://" in url:
            try:
                from kombu.utils.url import url_to_parts

                add(url_to_parts(url).password)
            except Exception:
                pass

    # From the URLs themselves first: building a connection needs the
    # transport's library (redis-py, ...), which a process may lack.
    for key in ("broker_url", "broker_read_url", "broker_write_url"):
        try:
            value = app.conf.get(key)
        except Exception:
            continue
        urls = value if isinstance(value, (list, tuple)) else str(value or "").split(";")
        for url in urls:
            from_url(str(url).strip())
    for opener in ("connection_for_read", "connection_for_write"):
        try:
            with getattr(app, opener)() as conn:
                add(conn.password)
                for alt in conn.alt or ():
                    from_url(alt)
        except Exception:
            continue
    try:
        backend = app.conf.result_backend
    except Exception:
        backend = None
    for url in (backend.split(";") if isinstance(backend, str) else ()):
        from_url(url.strip())
    return found


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(0, min(int(value), _INT_MAX))


# ---------------------------------------------------------------- the worker


def worker_ready(worker: Any) -> bool:
    """Has the worker started consuming (so its pool and queues exist)?"""
    consumer = _get(worker, "consumer")
    return _get(consumer, "task_consumer") is not None and _get(worker, "pool") is not None


def broker_info(connection: Any) -> Dict[str, Any]:
    """The broker connection's address, as `inspect stats` shows it, without credentials."""
    try:
        info = dict(connection.info())
    except Exception:
        return {}
    password = info.get("password")
    out = {k: info[k] for k in _BROKER_KEYS if k in info}
    secrets = [password] if isinstance(password, str) else []
    for key in ("hostname", "uri_prefix", "transport"):
        if isinstance(out.get(key), str):
            out[key] = scrub(out[key], secrets)
        elif key == "transport" and out.get(key) is not None:
            out[key] = _get(out[key], "__name__") or str(out[key])
    if not isinstance(out.get("ssl"), bool) and "ssl" in out:
        out["ssl"] = bool(out["ssl"])  # a dict of options may hold a key's password
    alternates = info.get("alternates")
    if isinstance(alternates, (list, tuple)):
        out["alternates"] = [scrub(str(a), secrets) for a in alternates]
    return json_safe(out)


def stats_of(worker: Any) -> Dict[str, Any]:
    """`inspect stats` of this worker, read in-process."""
    stats: Dict[str, Any] = {}
    for _ in range(2):  # a second try when a part raced with the worker
        try:
            stats = dict(worker.stats())  # Celery's own, as `inspect stats` answers
            break
        except Exception:
            continue
    if not stats:
        # A part raced with the worker (the pool replacing a child): the parts one by one.
        for part in (lambda: worker.info(), lambda: {"pool": worker.pool.info},
                     lambda: {"rusage": worker.rusage()}):
            try:
                stats.update(part())
            except Exception:
                pass
    consumer = _get(worker, "consumer")
    connection = _get(consumer, "connection")
    stats.pop("broker", None)
    if connection is not None:
        stats["broker"] = broker_info(connection)
    if "prefetch_count" not in stats:
        qos = _get(consumer, "qos")
        if qos is not None and isinstance(_get(qos, "value"), int):
            stats["prefetch_count"] = qos.value
    if "pid" not in stats:
        stats["pid"] = os.getpid()
    try:
        stats["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    pool = stats.get("pool")
    if not isinstance(pool, dict):
        pool = {}
    # The brain reads the concurrency from pool.max-concurrency: always an int.
    limit = _as_int(pool.get("max-concurrency"))
    if limit is None:
        processes = pool.get("processes")
        limit = (_as_int(_get(worker, "concurrency"))
                 or (len(processes) if isinstance(processes, list) else None))
    if limit is not None:
        pool["max-concurrency"] = limit
    else:
        pool.pop("max-concurrency", None)
    stats["pool"] = pool
    return json_safe(stats)


def active_of(state: Any) -> List[Dict[str, Any]]:
    """`inspect active`: the requests running now, arguments cut short."""
    out = []
    for request in _snapshot(_get(state, "active_requests") or ()):
        try:
            info = dict(request.info(safe=False))
        except Exception:
            continue
        for key in ("args", "kwargs"):
            if key in info:
                info[key] = event_value(info[key], ACTIVE_ARGS_BYTES)
        out.append(json_safe(info))
    out.sort(key=lambda i: (str(i.get("time_start")), str(i.get("id"))))
    return out


def active_queues_of(worker: Any) -> List[Dict[str, Any]]:
    """`inspect active_queues`: the queues the worker consumes now."""
    task_consumer = _get(_get(worker, "consumer"), "task_consumer")
    out = []
    for queue in _snapshot(_get(task_consumer, "queues") or ()):
        try:
            out.append(json_safe(dict(queue.as_dict(recurse=True))))
        except Exception:
            name = _get(queue, "name")
            if isinstance(name, str):
                out.append({"name": name})
    return out


def registered_of(app: Any) -> List[str]:
    """`inspect registered`: task names, without Celery's own (`celery.*`)."""
    try:
        names = _snapshot(app.tasks.keys())
    except Exception:
        return []
    return sorted(n for n in names if isinstance(n, str) and not n.startswith("celery."))


def conf_of(app: Any, worker: Any = None) -> Dict[str, Any]:
    """The settings the brain lints, defaults included (as `inspect conf
    with_defaults=True`), with the worker's effective values for what its
    command line may override. Only `CONF_KEYS`: never a URL or a secret."""
    conf: Dict[str, Any] = {}
    settings = _get(app, "conf")
    for key in CONF_KEYS:
        try:
            conf[key] = settings[key]
        except Exception:
            try:
                conf[key] = settings.get(key)
            except Exception:
                continue
    if worker is not None:
        for key, attr in _EFFECTIVE:
            value = _get(worker, attr)
            if value is not None and not callable(value):
                conf[key] = value
    return json_safe({k: v for k, v in conf.items() if k in CONF_KEYS})


def declared_queues(app: Any) -> Set[str]:
    """The queues the app declares: `task_default_queue`, `task_queues`,
    and the queues named in static `task_routes`."""
    names: Set[str] = set()
    settings = _get(app, "conf")

    def add(value: Any) -> None:
        name = value if isinstance(value, str) else _get(value, "name")
        if isinstance(name, str) and name:
            names.add(name)

    try:
        add(settings.get("task_default_queue"))
    except Exception:
        pass
    try:
        queues = settings.get("task_queues")
        if isinstance(queues, Mapping):
            for name in queues:
                add(name)
        elif queues:
            for queue in queues:
                add(queue)
    except Exception:
        pass
    try:
        for name in _snapshot(app.amqp.queues.keys()):
            add(name)
    except Exception:
        pass
    try:
        routes = settings.get("task_routes")
        for table in (routes if isinstance(routes, (list, tuple)) else [routes]):
            items = (table.items() if isinstance(table, Mapping)
                     else table if isinstance(table, (list, tuple)) else ())
            for item in items:
                if not (isinstance(item, (list, tuple)) and len(item) == 2):
                    continue
                route = item[1]
                add(route.get("queue") if isinstance(route, Mapping) else route)
    except Exception:
        pass
    return names


def broker_type(app: Any) -> str:
    """`redis`, `amqp`, ... (kombu's driver type of the broker's transport)."""
    try:
        with app.connection_for_read() as conn:  # no I/O: only the transport class
            kind = conn.transport.driver_type
            return kind if isinstance(kind, str) and kind else "unknown"
    except Exception:
        return "unknown"


# ---------------------------------------------------------------- the source


class _Deadline:
    """Runs a broker round trip on a thread of its own and waits at most
    `timeout` for it: a broker that hangs holds up that thread, never the
    health thread. While one is still stuck, the next is not started."""

    def __init__(self) -> None:
        self._stuck: Optional[threading.Thread] = None

    def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        if self._stuck is not None and self._stuck.is_alive():
            raise TimeoutError("the previous broker round trip has not finished yet")
        box: Dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=target, name="z4j-agentd-celery-depths", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self._stuck = thread
            raise TimeoutError(f"the broker did not answer within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")


class HealthSource:
    """`source()` for `Client.report_health`: the `engines` map of one
    Celery worker's `health` report. Called on the client's health thread;
    never raises for a broker outage (the depths are skipped and counted)."""

    def __init__(self, hooks: Any, *, depth_deadline: float = DEPTH_DEADLINE,
                 broker_timeout: float = _queues.BROKER_TIMEOUT) -> None:
        self.hooks = hooks
        self.depth_deadline = depth_deadline
        self.broker_timeout = broker_timeout
        self.reports = 0
        self.depth_failures = 0
        self.last_depth_error: Optional[str] = None
        self.interval = DEFAULT_INTERVAL
        self._deadline = _Deadline()
        self._broker_type: Optional[str] = None
        # The depth thread's broker connection, kept between reports.
        self._measurer = _queues.Measurer(hooks.app, broker_timeout)
        self._last_heartbeat_event: Dict[str, float] = {}

    # -- parts

    def worker_details(self) -> Dict[str, Dict[str, Any]]:
        """{worker name: details} once the worker consumes; {} before."""
        worker, name = self.hooks.worker, self.hooks.hostname
        if worker is None or not name or not worker_ready(worker):
            return {}
        from celery.worker import state

        details: Dict[str, Any] = {"stats": stats_of(worker)}
        for key, part in (("active", lambda: active_of(state)),
                          ("active_queues", lambda: active_queues_of(worker)),
                          ("registered", lambda: registered_of(self.hooks.app)),
                          ("conf", lambda: conf_of(self.hooks.app, worker))):
            try:
                details[key] = part()
            except Exception:
                log.debug("z4j-agentd: worker %s not read", key, exc_info=True)
        return {name: details}

    def queue_names(self, details: Mapping[str, Mapping[str, Any]]) -> List[str]:
        """The consumed queues, then the declared ones, at most MAX_QUEUES."""
        consumed: Set[str] = set()
        for worker in details.values():
            for queue in worker.get("active_queues") or ():
                if isinstance(queue, dict) and isinstance(queue.get("name"), str):
                    consumed.add(queue["name"])
        names = sorted(consumed) + sorted(declared_queues(self.hooks.app) - consumed)
        return names[:MAX_QUEUES]

    def queue_depths(self, names: Iterable[str]) -> Optional[Dict[str, int]]:
        """Depths of `names`, or None (counted) when the broker could not answer."""
        wanted = list(dict.fromkeys(names))
        measurer = self._measurer
        try:
            got = self._deadline.run(lambda: measurer.depths(wanted), self.depth_deadline)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and self._deadline._stuck is not None:
                # The stuck round trip keeps that connection: the next measure,
                # once it ended, starts from a new one.
                self._measurer = _queues.Measurer(self.hooks.app, self.broker_timeout)
            self.depth_failures += 1
            self.last_depth_error = scrub(f"{type(exc).__name__}: {exc}", self._broker_secrets())[:MAX_FACT_CHARS]
            if self.depth_failures == 1:
                log.warning("z4j-agentd: queue depths skipped, the broker did not answer: %s",
                            self.last_depth_error)
            return None
        self.last_depth_error = None
        return {name: max(0, min(int(depth), _INT_MAX)) for name, depth in got.items()}

    def _broker_secrets(self) -> List[str]:
        return broker_secrets(self.hooks.app)

    # -- the report

    def __call__(self) -> Dict[str, Any]:
        details = self.worker_details()
        depths = self.queue_depths(self.queue_names(details))
        if self._broker_type is None:
            self._broker_type = broker_type(self.hooks.app)
        report: Dict[str, Any] = {
            "workers": details,
            "broker_type": self._broker_type,
            "broker_connected": depths is not None,
            "depth_failures": self.depth_failures,
        }
        if depths is not None:
            report["queue_depths"] = depths
        elif self.last_depth_error:
            report["broker_error"] = self.last_depth_error
        self.reports += 1
        now = time.monotonic()
        for name, worker in details.items():
            last = self._last_heartbeat_event.get(name)
            if last is None or now - last >= HEARTBEAT_EVENT_SECONDS:
                self._last_heartbeat_event[name] = now
                self._heartbeat(name, worker)
        return {ENGINE: report}

    def _heartbeat(self, name: str, details: Mapping[str, Any]) -> None:
        """A `worker.heartbeat` event: the brain's Worker row stays fresh."""
        stats = details.get("stats") or {}
        pool = stats.get("pool") or {}
        total = stats.get("total")
        data = {
            "worker": name,
            "hostname": name,
            "pid": stats.get("pid"),
            "concurrency": pool.get("max-concurrency"),
            "active": len(details.get("active") or ()),
            "processed": sum(v for v in total.values() if isinstance(v, int)) if isinstance(total, dict) else None,
            "queues": [q.get("name") for q in details.get("active_queues") or () if isinstance(q, dict)],
            "loadavg": stats.get("loadavg"),
            # Seconds to the next heartbeat event, as Celery's own heartbeat says.
            "freq": max(self.interval, HEARTBEAT_EVENT_SECONDS),
        }
        try:
            from celery.worker import state

            data["reserved"] = len(_snapshot(state.reserved_requests))
        except Exception:
            pass
        try:
            self.hooks.client.emit(ENGINE, "worker.heartbeat", "",
                                   {k: v for k, v in data.items() if v is not None}, occurred_at=time.time())
        except Exception:  # pragma: no cover - emit never raises
            pass


def start(hooks: Any, interval: Optional[float] = None) -> HealthSource:
    """Starts the health reports of this worker process (on `serve`'s
    connection), and sends one again as soon as the worker is ready."""
    source = HealthSource(hooks)
    try:
        source.interval = float(interval) if interval is not None else interval_from_env()
    except ValueError as exc:  # never raise into Celery: say what to change, use the default
        log.error("z4j-agentd: %s; reporting every %.0f s", exc, DEFAULT_INTERVAL)
    client = hooks.client
    client.report_health(source, interval=source.interval)

    from celery import signals

    def on_ready(**_: Any) -> None:
        # The first report went at the hello, before the worker consumed:
        # send the full one now rather than an interval later.
        try:
            client.report_health(source, interval=source.interval)
        except Exception:
            log.debug("z4j-agentd: health report not kicked", exc_info=True)

    signals.worker_ready.connect(on_ready, weak=False)
    source._on_ready = on_ready  # type: ignore[attr-defined]  # keeps it reachable
    return source


__all__ = ["HealthSource", "start", "interval_from_env", "declared_queues", "conf_of", "stats_of",
           "DEFAULT_INTERVAL", "INTERVAL_ENV", "CONF_KEYS"]
