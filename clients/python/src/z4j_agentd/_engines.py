"""The engines the Django, Flask and FastAPI integrations wire, and how.

Each engine integration is a module `z4j_agentd.<engine>` with
`install(target, client, *, serve_commands=True)`. A framework integration
takes one option per engine naming its target (`TARGETS`): the object
itself, or where to import it from (`package.module:attribute` or
`package.module.attribute`). The engine's own `install` decides what to do
in the process it runs in: web processes only send events; commands are
served only where the engine runs tasks (a worker), whatever
`serve_commands` says.

The Django app also finds an engine by itself where Django projects keep it
in a standard place (`auto_target`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

log = logging.getLogger("z4j_agentd")

#: engine -> the option naming its target (a Django setting key, a Flask
#: extension argument, a FastAPI lifespan argument).
TARGETS: Dict[str, str] = {
    "celery": "celery_app",
    "rq": "rq_connection",
    "dramatiq": "dramatiq_broker",
    "huey": "huey_app",
    "arq": "arq_settings",
    "taskiq": "taskiq_broker",
}


def load(path: str) -> Any:
    """`package.module:attribute` or `package.module.attribute`."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"an import path is 'package.module:attribute', got {path!r}")
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"an import path is 'package.module:attribute', got {path!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def install(engine: str, target: Any, client: Any, *, serve_commands: bool = True) -> Any:
    """`z4j_agentd.<engine>.install(target, client, serve_commands=...)`, with
    `target` imported first when it is a path."""
    if engine not in TARGETS:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(TARGETS)}")
    if isinstance(target, str):
        target = load(target)
    module = importlib.import_module(f"z4j_agentd.{engine}")
    return module.install(target, client, serve_commands=bool(serve_commands))


def install_targets(options: Mapping[str, Any], client: Any, *, serve_commands: bool = True,
                    auto: Optional[Mapping[str, Callable[[], Any]]] = None) -> List[str]:
    """Installs every engine whose target option is set in `options` (or,
    when it is not and the engine is not switched off with `<engine>:
    False`, whose `auto` finder returns a target). Returns the engines
    installed, in `TARGETS` order."""
    done = []
    for engine, key in TARGETS.items():
        if options.get(engine, True) is False:
            continue
        target = options.get(key)
        if target is None and auto and engine in auto:
            target = auto[engine]()
        if target is None:
            continue
        install(engine, target, client, serve_commands=serve_commands)
        done.append(engine)
    return done


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
