#!/usr/bin/env bash
# End-to-end tests of z4j-agentd against a real z4j 1.13.0 brain.
#
#   tests/e2e/run.sh [pytest args...]      e.g. tests/e2e/run.sh -k restart -x
#
# 1. creates/reuses the test venv (tests/e2e/.state/venv, or $Z4J_E2E_VENV)
#    with z4j==1.13.0, websockets, msgpack, pytest, celery[redis], redis,
#    gunicorn, flask and clients/python (editable)
# 2. builds the daemon (`cargo build --bin z4j-agentd`) unless $Z4J_AGENTD_BIN
#    names a binary to test
# 3. runs pytest on tests/e2e from the repository root; exits with its status
#
# Needs: python3 (3.9+) with venv/pip, cargo (unless Z4J_AGENTD_BIN is set),
# network access to PyPI on the first run, redis-server (test_celery.py).
# Binds 127.0.0.1 only.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

VENV="$("${PYTHON:-python3}" "$HERE/brain.py" venv)"

if [[ -z "${Z4J_AGENTD_BIN:-}" ]]; then
  echo "[e2e] cargo build --bin z4j-agentd" >&2
  cargo build --bin z4j-agentd
  Z4J_AGENTD_BIN="$ROOT/target/debug/z4j-agentd"
fi
export Z4J_AGENTD_BIN
echo "[e2e] daemon: $Z4J_AGENTD_BIN" >&2

exec "$VENV/bin/python" -m pytest tests/e2e -v "$@"
