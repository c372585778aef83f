"""Django: add `"z4j_agentd.django"` to INSTALLED_APPS.

    INSTALLED_APPS = [..., "z4j_agentd.django"]
    Z4J_AGENTD = {"socket_path": "/run/z4j-agentd/agent.sock"}   # optional

`ready()` configures the process's default client from
`settings.Z4J_AGENTD` (any `z4j_agentd.Client` argument: `socket_path`,
`process`, `engines`, `capabilities`, `worker_role`, `queue_size`,
`framing`, `connect_timeout`; `framework` defaults to `django`), and wires
each task engine the project uses through that engine's `install`:

| engine | setting naming it (object or `package.module:attribute`) | found without a setting |
|---|---|---|
| Celery | `celery_app` | `celery.current_app` when Celery is installed |
| RQ | `rq_connection` | django-rq's default connection (`django_rq` in INSTALLED_APPS) |
| Dramatiq | `dramatiq_broker` | django_dramatiq's broker (list `z4j_agentd.django` after `django_dramatiq`) |
| Huey | `huey_app` | django-huey's `HUEY` (`huey.contrib.djhuey` in INSTALLED_APPS) |
| arq | `arq_settings` | |
| TaskIQ | `taskiq_broker` | |

`<engine>: False` (e.g. `"celery": False`) skips one; `serve_commands:
False` never serves commands. A web process sends events; commands are
served by the engine's workers. Nothing connects to the daemon until the
first event.
`Z4J_AGENTD_DISABLED=1` in the environment skips all of it (test runs).
"""
