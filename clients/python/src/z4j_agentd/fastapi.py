"""FastAPI (any ASGI app with a lifespan): the client lives as long as the
application.

    from fastapi import FastAPI
    import z4j_agentd.fastapi

    app = FastAPI(lifespan=z4j_agentd.fastapi.lifespan)

or, inside a lifespan of your own:

    @asynccontextmanager
    async def lifespan(app):
        async with z4j_agentd.fastapi.Z4JAgentd(app, socket_path=...) as client:
            yield

Both configure the process's default client (`framework` defaults to
`fastapi`; other keyword arguments are `z4j_agentd.Client`'s), wire the
engines named by `celery_app`, `rq_connection`, `dramatiq_broker`,
`huey_app`, `arq_settings`, `taskiq_broker` (the object or its import path
`package.module:attribute`) through each engine's `install` (the web
process sends events; workers serve commands), set
`app.state.z4j_agentd`, and on exit flush and close it without blocking the
event loop. Pass arguments to `lifespan` with `functools.partial`.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from . import _engines
from .client import Client, configure


class Z4JAgentd:
    """An async context manager yielding the configured client."""

    def __init__(self, app: Any = None, *, close_timeout: float = 2.0, **kwargs: Any) -> None:
        self.app = app
        self.close_timeout = close_timeout
        self.kwargs = kwargs
        self.client: Optional[Client] = None

    async def __aenter__(self) -> Client:
        options = dict(self.kwargs)
        targets = {key: options.pop(key) for key in _engines.TARGETS.values() if key in options}
        serve_commands = options.pop("serve_commands", True)
        options.setdefault("framework", "fastapi")
        self.client = configure(**options)
        _engines.install_targets(targets, self.client, serve_commands=bool(serve_commands))
        if self.app is not None:
            self.app.state.z4j_agentd = self.client
        return self.client

    async def __aexit__(self, *exc_info: Any) -> None:
        client = self.client
        if client is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, client.close, self.close_timeout)


@asynccontextmanager
async def lifespan(app: Any, **kwargs: Any) -> AsyncIterator[None]:
    """`FastAPI(lifespan=z4j_agentd.fastapi.lifespan)`."""
    async with Z4JAgentd(app, **kwargs):
        yield
