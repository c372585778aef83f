"""Flask: the extension, in the usual two shapes.

    from z4j_agentd.flask import Z4JAgentd

    z4j = Z4JAgentd(app)              # or: z4j = Z4JAgentd(); z4j.init_app(app)

`init_app` configures the process's default client (so
`z4j_agentd.emit(...)` works anywhere) from the extension's keyword
arguments, overridden by `app.config["Z4J_AGENTD_<ARGUMENT>"]`
(`Z4J_AGENTD_SOCKET_PATH`, `Z4J_AGENTD_PROCESS`, `Z4J_AGENTD_ENGINES`,
`Z4J_AGENTD_CAPABILITIES`, `Z4J_AGENTD_WORKER_ROLE`,
`Z4J_AGENTD_QUEUE_SIZE`, `Z4J_AGENTD_FRAMING`,
`Z4J_AGENTD_CONNECT_TIMEOUT`; `framework` defaults to `flask`), and stores
it in `app.extensions["z4j_agentd"]`. One argument per engine wires that
engine through its `install` (the object, or its import path
`package.module:attribute`): `celery_app` (a Celery app), `rq_connection`
(RQ's Redis connection), `dramatiq_broker`, `huey_app` (the Huey
instance), `arq_settings` (the worker settings class), `taskiq_broker`;
each also as `app.config["Z4J_AGENTD_<ARGUMENT>"]`. A web process only
sends events (what it enqueues, where the engine lets it see that);
commands are served by the engine's workers. Nothing connects to the
daemon until the first event.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import _engines
from .client import Client, configure

#: Client arguments, and the app.config key that sets each.
CONFIG_KEYS = {name: "Z4J_AGENTD_" + name.upper() for name in (
    "socket_path", "process", "framework", "engines", "capabilities", "worker_role",
    "queue_size", "framing", "connect_timeout", "serve_commands", *_engines.TARGETS.values())}


class Z4JAgentd:
    """The Flask extension. `client` is the configured `z4j_agentd.Client`."""

    def __init__(self, app: Any = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(CONFIG_KEYS)
        if unknown:
            raise TypeError(f"unknown Z4JAgentd arguments: {', '.join(sorted(unknown))}")
        self.defaults: Dict[str, Any] = kwargs
        self.client: Optional[Client] = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        options = dict(self.defaults)
        for name, key in CONFIG_KEYS.items():
            if key in app.config:
                options[name] = app.config[key]
        targets = {key: options.pop(key) for key in _engines.TARGETS.values() if key in options}
        serve_commands = options.pop("serve_commands", True)
        options.setdefault("framework", "flask")
        client = configure(**options)
        _engines.install_targets(targets, client, serve_commands=bool(serve_commands))
        app.extensions["z4j_agentd"] = client
        self.client = client
