"""The Django app: configures z4j_agentd from `settings.Z4J_AGENTD`."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict

from django.apps import AppConfig

from .. import _engines

log = logging.getLogger("z4j_agentd.django")

#: Keys of settings.Z4J_AGENTD passed to z4j_agentd.Client.
CLIENT_KEYS = ("socket_path", "process", "framework", "engines", "capabilities", "worker_role",
               "queue_size", "framing", "connect_timeout")


def _celery_app() -> Any:
    if not _engines.installed("celery"):
        return None
    from celery import current_app  # a proxy: the app current when used
    return current_app


def _huey_app() -> Any:
    from django.apps import apps

    if not apps.is_installed("huey.contrib.djhuey"):
        return None
    from huey.contrib.djhuey import HUEY
    return HUEY


def _dramatiq_broker() -> Any:
    from django.apps import apps

    if not apps.is_installed("django_dramatiq"):
        return None
    import dramatiq.broker

    if getattr(dramatiq.broker, "global_broker", None) is None:
        log.warning("z4j_agentd: django_dramatiq has not set up its broker yet: put "
                    "'z4j_agentd.django' after 'django_dramatiq' in INSTALLED_APPS, or set "
                    "Z4J_AGENTD['dramatiq_broker']; Dramatiq is not wired")
        return None
    return dramatiq.get_broker()


def _rq_connection() -> Any:
    from django.apps import apps

    if not apps.is_installed("django_rq"):
        return None
    import django_rq

    return django_rq.get_connection()


#: Where Django projects keep an engine when the settings do not say.
AUTO = {"celery": _celery_app, "rq": _rq_connection, "huey": _huey_app, "dramatiq": _dramatiq_broker}


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
        _engines.install_targets(options, client, serve_commands=bool(options.get("serve_commands", True)),
                                 auto=AUTO)
