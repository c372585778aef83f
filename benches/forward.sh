#!/usr/bin/env bash
# The daemon's whole cost per event, from the local socket to a signed
# brain frame and back to an acknowledged, deleted spool row. A stand-in
# brain (examples/ack_brain.rs: verifies every frame, acks at once) takes
# the brain's own time out; the load generator sends N durable events with
# 8 clients; the clock and the daemon's CPU (utime+stime from /proc) run
# until the brain has acknowledged every event and the spool is empty.
# Prints one JSON line per run and the medians.
# Usage: benches/forward.sh [RUNS] [EVENTS]   (defaults 3 and 400000)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
EVENTS="${2:-400000}"
cargo build --release --quiet --bin z4j-agentd --example loadgen --example ack_brain
# Z4J_AGENTD_BIN: another daemon binary to measure (e.g. an earlier build).
BIN="${Z4J_AGENTD_BIN:-target/release/z4j-agentd}"
GEN=target/release/examples/loadgen
BRAIN=target/release/examples/ack_brain
WORK="$(mktemp -d /tmp/z4j-forward.XXXXXX)"
trap 'kill "${PID:-}" "${BPID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
TICKS=$(getconf CLK_TCK)

cpu_s() { awk -v t="$TICKS" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
stat_of() { "$BIN" status --json --socket-path "$WORK/agent.sock" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }

RESULTS="$WORK/results.jsonl"
for i in $(seq "$RUNS"); do
  "$BRAIN" >"$WORK/brain.out" 2>"$WORK/brain.log" &
  BPID=$!
  for _ in $(seq 100); do grep -q '^url=' "$WORK/brain.out" 2>/dev/null && break; sleep 0.05; done
  read -r URL TOKEN SECRET < <(sed -n '1s/url=\(.*\) token=\(.*\) secret=\(.*\)/\1 \2 \3/p' "$WORK/brain.out")
  rm -rf "$WORK/home"; mkdir -p "$WORK/home"
  HOME="$WORK/home" Z4J_BRAIN_URL="$URL" Z4J_TOKEN="$TOKEN" Z4J_HMAC_SECRET="$SECRET" \
  Z4J_SOCKET_PATH="$WORK/agent.sock" Z4J_LOG_LEVEL=warn \
    env ${EXTRA_ENV:-} "$BIN" run 2>>"$WORK/daemon.log" &
  PID=$!
  for _ in $(seq 200); do
    [ -S "$WORK/agent.sock" ] && [ "$(stat_of "['uplink_state']" || true)" = connected ] && break
    sleep 0.05
  done
  sleep 1
  idle_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$PID/status")
  cpu0=$(cpu_s "$PID"); t0=$(date +%s.%N)
  gen=$("$GEN" --socket "$WORK/agent.sock" --clients 8 --events "$EVENTS" --durable --batch 100 --json)
  # One stats request per poll: done once the brain acked everything.
  until [ "$(stat_of "['acked'] >= $EVENTS and d['spool_depth'] == 0")" = True ]; do sleep 0.02; done
  t1=$(date +%s.%N); cpu1=$(cpu_s "$PID")
  hwm_kb=$(awk '/^VmHWM/ {print $2}' "/proc/$PID/status")
  python3 - "$EVENTS" "$cpu0" "$cpu1" "$t0" "$t1" "$idle_kb" "$hwm_kb" "$gen" <<'PY' | tee -a "$RESULTS"
import json, sys
n, c0, c1, t0, t1, idle, hwm, gen = sys.argv[1:]
n = int(n); g = json.loads(gen)
print(json.dumps({
    "events": n,
    "ingest_events_per_s": g["events_per_s"],
    "forwarded_events_per_s": n / (float(t1) - float(t0)),
    "daemon_cpu_us_per_event": (float(c1) - float(c0)) * 1e6 / n,
    "idle_rss_kb": int(idle), "hwm_kb": int(hwm),
}))
PY
  kill "$PID"; wait "$PID" || true
  kill "$BPID"; wait "$BPID" 2>/dev/null || true
  if grep -q 'verify_failures=[1-9]' "$WORK/brain.log"; then
    echo "the stand-in brain refused frames:"; tail -3 "$WORK/brain.log"; exit 1
  fi
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
m = lambda k: statistics.median(r[k] for r in rows)
print()
print("| events | ingest events/s | socket-to-ack events/s | daemon CPU µs/event | RSS idle / peak (MB) |")
print("|---|---|---|---|---|")
print(f"| {rows[0]['events']:,} | {m('ingest_events_per_s'):,.0f} | {m('forwarded_events_per_s'):,.0f} "
      f"| {m('daemon_cpu_us_per_event'):.2f} | {m('idle_rss_kb')/1024:.1f} / {max(r['hwm_kb'] for r in rows)/1024:.1f} |")
print("runs:", [round(r['daemon_cpu_us_per_event'], 2) for r in rows])
PY
