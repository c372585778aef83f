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
# Without arguments the suite runs as two pytest sessions at once, each with
# its own brain, daemons and brokers (sessions never share a port, socket or
# run directory): the engine modules (ENGINE_MODULES below: RQ, Dramatiq,
# Huey, arq, TaskIQ, their schedulers, the stock z4j agents through the
# gateway, and the smoke set on a brain backed by PostgreSQL) in one,
# everything else in the other. Their tests mostly wait on brokers, workers
# and the brain, so two sessions on two cores take little
# more than the longer one. The engine session's output is printed when both
# are done (and kept in $Z4J_TEST_LOG_DIR/e2e-engines.out when that is set).
# Z4J_E2E_SHARDS=1 runs one session; any pytest argument does too (test
# files among them: only those files, e.g. tests/e2e/run.sh
# tests/e2e/test_gateway.py -x).
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

ENGINE_MODULES=(test_rq test_dramatiq test_huey test_arq test_taskiq test_apscheduler test_gateway
                test_brain_versions test_brain_postgres)
if [[ $# -gt 0 || "${Z4J_E2E_SHARDS:-2}" == 1 ]]; then
  # Test files named among the arguments (tests/e2e/test_x.py, ...::test_y) are what runs;
  # otherwise the whole directory, narrowed by the other arguments (-k, -x, ...).
  targets=(tests/e2e)
  for arg in "$@"; do
    if [[ "$arg" == *.py || "$arg" == *.py::* ]]; then
      targets=()
      break
    fi
  done
  exec "$VENV/bin/python" -m pytest ${targets[@]+"${targets[@]}"} -v "$@"
fi
engines=() ignore=()
for prefix in "${ENGINE_MODULES[@]}"; do
  for f in tests/e2e/"$prefix"*.py; do
    [[ -e "$f" ]] && engines+=("$f") && ignore+=("--ignore=$f")
  done
done
if [[ ${#engines[@]} -eq 0 ]]; then
  exec "$VENV/bin/python" -m pytest tests/e2e -v
fi
out="${Z4J_TEST_LOG_DIR:-$(mktemp -d)}/e2e-engines.out"
mkdir -p "$(dirname "$out")"
echo "[e2e] two sessions: ${#engines[@]} engine modules (output: $out) beside the rest" >&2
"$VENV/bin/python" -m pytest -v -p no:cacheprovider "${engines[@]}" >"$out" 2>&1 &
engine_pid=$!
trap 'kill -TERM "$engine_pid" 2>/dev/null || true' INT TERM
set +e
"$VENV/bin/python" -m pytest tests/e2e -v "${ignore[@]}"
rest=$?
wait "$engine_pid"
engine_status=$?
set -e
echo "==> e2e, the engine modules' session (exit status $engine_status):"
cat "$out"
echo "[e2e] sessions: the rest exited $rest, the engine modules $engine_status" >&2
[[ $rest -eq 0 && $engine_status -eq 0 ]]
