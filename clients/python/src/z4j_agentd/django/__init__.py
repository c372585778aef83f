"""Django: add `"z4j_agentd.django"` to INSTALLED_APPS.

    INSTALLED_APPS = [..., "z4j_agentd.django"]
    Z4J_AGENTD = {"socket_path": "/run/z4j-agentd/agent.sock"}   # optional

`ready()` configures the process's default client from
`settings.Z4J_AGENTD` (any `z4j_agentd.Client` argument: `socket_path`,
`process`, `engines`, `capabilities`, `worker_role`, `queue_size`,
`framing`, `connect_timeout`; `framework` defaults to `django`), and, when
Celery is installed, connects its signals with `z4j_agentd.celery.install`
(`celery_app`: the app as a dotted path, `proj.celery:app` or
`proj.celery.app`; by default `celery.current_app`, resolved when it is
used; `celery: False` to skip; `serve_commands: False` to never serve
commands). Nothing connects to the daemon until the first event.
`Z4J_AGENTD_DISABLED=1` in the environment skips all of it (test runs).
"""
