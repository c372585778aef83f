"""Python client for z4j-agentd, the per-host z4j daemon.

Applications hand task events to the daemon's local Unix socket; the daemon
spools them and forwards them to the z4j brain. This package never blocks
or raises into the application on the fire-and-forget path:

    import z4j_agentd

    z4j_agentd.emit("celery", "task.succeeded", task_id,
                    {"task_name": "app.tasks.add", "result": 3, "runtime_ms": 12})

Framework integrations: `z4j_agentd.celery.install(app)`, the Django app
`"z4j_agentd.django"`, `z4j_agentd.flask.Z4JAgentd`, and
`z4j_agentd.fastapi.lifespan`. Reference: docs/python-client.md in the
z4j-agentd repository.
"""

from ._jsonsafe import bounded, json_safe
from ._wire import default_socket_path
from .client import (
    Client,
    DaemonUnavailable,
    EventRefused,
    build_event,
    configure,
    emit,
    get_client,
    record,
    utc_now_iso,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DaemonUnavailable",
    "EventRefused",
    "__version__",
    "bounded",
    "build_event",
    "configure",
    "default_socket_path",
    "emit",
    "get_client",
    "json_safe",
    "record",
    "utc_now_iso",
]
