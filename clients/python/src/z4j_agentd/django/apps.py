"""The Django app: configures z4j_agentd from `settings.Z4J_AGENTD`."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any, Dict

from django.apps import AppConfig

log = logging.getLogger("z4j_agentd.django")

#: Keys of settings.Z4J_AGENTD passed to z4j_agentd.Client.
CLIENT_KEYS = ("socket_path", "process", "framework", "engines", "capabilities", "worker_role",
               "queue_size", "framing", "connect_timeout")


def _load(path: str) -> Any:
    """`package.module:attribute` or `package.module.attribute`."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Z4JAgentdConfig(AppConfig):
    name = "z4j_agentd.django"
    label = "z4j_agentd"
    verbose_name = "z4j-agentd"

    def ready(self) -> None:
        if os.environ.get("Z4J_AGENTD_DISABLED", "").lower() in ("1", "true", "yes"):
            return
        from django.conf import settings

        import z4j_agentd

        options: Dict[str, Any] = dict(getattr(settings, "Z4J_AGENTD", None) or {})
        kwargs = {k: options[k] for k in CLIENT_KEYS if k in options}
        kwargs.setdefault("framework", "django")
        client = z4j_agentd.configure(**kwargs)
        if options.get("celery", True) is False:
            return
        if importlib.util.find_spec("celery") is None:
            return
        import z4j_agentd.celery as z4j_celery

        app_path = options.get("celery_app")
        if app_path:
            app = _load(app_path) if isinstance(app_path, str) else app_path
        else:
            from celery import current_app as app  # a proxy: the app current when used
        z4j_celery.install(app, client, serve_commands=bool(options.get("serve_commands", True)))
