#!/usr/bin/env bash
# Side-by-side comparison on this machine, in one run: the stock Python agent
# (z4j-bare 1.13.0 from PyPI) and z4j-agentd (release build of this checkout).
#
#   benches/compare/run.sh [RUNS] [compare.py options]     (RUNS default 3)
#
# A. hot path with the brain unreachable (a closed loopback port):
#    z4j-bare record_event x 20,000 in one thread, vs z4j-agentd durable ingest
#    driven by examples/loadgen.rs (1 client x 1 event/msg; 8 clients x 100/msg)
# B. end to end into one real z4j 1.13.0 brain (tests/e2e/brain.py): events/s
#    until the brain's SQLite holds every event, for z4j-bare, z4j-agentd with
#    one local client, and a direct protocol client batching 100 events/frame
#    with one frame in flight (the brain's ceiling).
#
# Creates two venvs under benches/compare/.state/ (z4j-bare==1.13.0;
# z4j==1.13.0 + msgpack) from PyPI on first use, builds the daemon and the
# load generator, prints the tables and writes
# benches/compare/results/<UTC timestamp>.json and .md. Takes about 5 minutes
# with RUNS=3 on a 2-core machine (plus ~1 min for the venvs the first time);
# run it on an otherwise idle machine (it records CPU used by other processes).
# Development example: benches/compare/run.sh 1 --hot-n 2000 --ingest-n 20000 --e2e-n 300 --e2e-stock-n 150
#
#   benches/compare/run.sh --freshness [freshness.py options]
#
# instead measures freshness (freshness.py): application call -> row in the
# real brain, z4j-agentd's emit() and z4j-bare's record_event, 300 events at
# 5/s each (about 3 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
FRESHNESS=0
if [ "${1:-}" = --freshness ]; then FRESHNESS=1; shift; fi
RUNS="${1:-3}"
[ "$FRESHNESS" = 0 ] && [ $# -gt 0 ] && shift
HERE=benches/compare
STATE="$HERE/.state"
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "run.sh: needs Python >= 3.11 (z4j 1.13.0); set PYTHON=..." >&2; exit 1; }

ensure_venv() {  # dir requirement... ; reinstalls when the requirement list changes
  local dir="$1"; shift
  local want="$*"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.requirements" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "[compare] creating $dir: pip install $want" >&2
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install --disable-pip-version-check -q "$@"
  echo "$want" >"$dir/.requirements"
}
mkdir -p "$STATE"
ensure_venv "$STATE/venv-bare" "z4j-bare==1.13.0"
ensure_venv "$STATE/venv-brain" "z4j==1.13.0" "msgpack"

echo "[compare] cargo build --release (z4j-agentd, examples/loadgen)" >&2
cargo build --release --quiet --bin z4j-agentd --example loadgen

if [ "$FRESHNESS" = 1 ]; then
  exec "$STATE/venv-brain/bin/python" "$HERE/freshness.py" \
    --bare-python "$STATE/venv-bare/bin/python" --agentd target/release/z4j-agentd "$@"
fi
exec "$STATE/venv-brain/bin/python" "$HERE/compare.py" --runs "$RUNS" \
  --bare-python "$STATE/venv-bare/bin/python" \
  --agentd target/release/z4j-agentd --loadgen target/release/examples/loadgen \
  --out "$HERE/results" "$@"
