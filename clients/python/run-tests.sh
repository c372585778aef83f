#!/usr/bin/env bash
# Unit tests of the Python client: creates the venvs here on first use,
# installs the package (editable) with the engines' extras and pytest, runs
# pytest in each (see below); fails if either run fails.
# Extra arguments go to pytest:  ./run-tests.sh -k fork -x
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
# Two venvs: .venv has every extra but two whose dependencies clash with the
# others (arq needs redis < 6; rq-scheduler's `crontab` module shadows the one
# django-celery-beat imports); .venv-alt has those two (with rq) and runs
# only their tests (tests/alt_tests.txt), which .venv skips.
install() {  # venv, stamp source, pip arguments...
    local venv="$1" src="$2"; shift 2
    if [ ! -x "$venv/bin/python" ]; then
        echo "==> creating clients/python/$venv"
        "$PYTHON" -m venv "$venv"
    fi
    # Reinstall only when the file naming what to install changed since the last install.
    if [ ! -f "$venv/.z4j-installed" ] || [ "$src" -nt "$venv/.z4j-installed" ] \
            || [ pyproject.toml -nt "$venv/.z4j-installed" ]; then
        echo "==> installing into $venv: $*"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
        touch "$venv/.z4j-installed"
    fi
}
install .venv run-tests.sh \
    -e '.[msgpack,celery,flask,fastapi,django,django-celery-beat,rq,dramatiq,apscheduler,huey,taskiq]' \
    'dramatiq[redis]' dramatiq-abort taskiq-redis pytest
install .venv-alt run-tests.sh -e '.[msgpack,rq,rq-scheduler,arq]' pytest

mapfile -t alt < <(grep -v '^#' tests/alt_tests.txt | sed '/^$/d')
set +e
.venv/bin/python -m pytest "$@"
main=$?
alt_status=0
if [ "${#alt[@]}" -gt 0 ]; then
    echo "==> the tests of arq and rq-scheduler, in .venv-alt"
    .venv-alt/bin/python -m pytest "$@" "${alt[@]}"
    alt_status=$?
    [ "$alt_status" -eq 5 ] && alt_status=0  # "-k" matched none of them
fi
[ "$main" -eq 0 ] && [ "$alt_status" -eq 0 ]
