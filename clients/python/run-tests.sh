#!/usr/bin/env bash
# Unit tests of the Python client: creates .venv here on first use, installs
# the package (editable) with every extra and pytest, runs pytest.
# Extra arguments go to pytest:  ./run-tests.sh -k fork -x
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating clients/python/.venv"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.z4j-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing z4j-agentd-client[msgpack,celery,flask,fastapi,django,django-celery-beat,rq,rq-scheduler,dramatiq,apscheduler,huey,taskiq] and pytest"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -e '.[msgpack,celery,flask,fastapi,django,django-celery-beat,rq,rq-scheduler,dramatiq,apscheduler,huey,taskiq]' \
        'dramatiq[redis]' taskiq-redis pytest
    touch "$stamp"
fi
exec .venv/bin/python -m pytest "$@"
