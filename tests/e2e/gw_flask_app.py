"""A Flask app watched by the stock z4j-flask agent (PyPI 1.13.0, on the z4j-bare runtime), pointed
at the daemon's gateway (or at the brain itself) with `Z4J_BRAIN_URL`. Runs from
`brain.gateway_venv()`; a web process of the same project as gw_celery_proj.py, which it
enqueues to:

    flask --app gw_flask_app run --port <port> --no-reload
    GET  /health              -> {"ok": true, "z4j": <agent runtime started>}
    POST /add?x=1&y=2         -> {"task_id": ...}  (gw_celery_proj.add, through the broker)
    POST /sleepy?seconds=20   -> {"task_id": ...}

`Z4J(app)` reads the agent's settings from the environment (Z4J_BRAIN_URL, Z4J_TOKEN,
Z4J_HMAC_SECRET, Z4J_PROJECT_ID, Z4J_AGENT_NAME; Z4J_HOME for its buffer) and starts the runtime
in this process, role "web". With `CELERY_APP` in the app's config it also runs the Celery engine
here: its commands (cancel, purge, retry) can be served by the web process, and it watches
Celery's event exchange like the worker does. Set Z4J_CELERY_LOCAL_HOSTNAME to a node name no
worker has (e.g. web@nowhere) to keep it from reporting the workers' task events a second time.
"""

from __future__ import annotations

from flask import Flask, jsonify, request
from z4j_flask import Z4J

import gw_celery_proj

app = Flask(__name__)
app.config["CELERY_APP"] = gw_celery_proj.app
z4j = Z4J(app)


@app.get("/health")
def health():
    return jsonify(ok=True, z4j=z4j.runtime is not None)


@app.post("/add")
def add():
    res = gw_celery_proj.add.delay(int(request.args.get("x", 1)), int(request.args.get("y", 2)))
    return jsonify(task_id=res.id)


@app.post("/sleepy")
def sleepy():
    res = gw_celery_proj.sleepy.delay(float(request.args.get("seconds", 20)))
    return jsonify(task_id=res.id)
