#!/usr/bin/env bash
# Durable-ingest benchmark of z4j-agentd: the daemon runs with its brain
# unreachable (so only socket -> validation -> spool commit is measured),
# the load generator (examples/loadgen.rs) drives it, and the daemon's CPU
# and RSS are read from /proc. Prints one JSON line per run and a summary
# with medians. Usage: benches/ingest.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
cargo build --release --quiet --bin z4j-agentd --example loadgen
BIN=target/release/z4j-agentd
GEN=target/release/examples/loadgen
WORK="$(mktemp -d /tmp/z4j-bench.XXXXXX)"
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_daemon() {  # $1 = synchronous mode
  rm -rf "$WORK/home"; mkdir -p "$WORK/home"
  HOME="$WORK/home" Z4J_BRAIN_URL=http://127.0.0.1:9 Z4J_TOKEN=bench \
  Z4J_HMAC_SECRET=mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU= \
  Z4J_SOCKET_PATH="$WORK/agent.sock" Z4J_SHUTDOWN_GRACE_SECONDS=0 \
  Z4J_BUFFER_SYNCHRONOUS="$1" Z4J_LOG_LEVEL=warn \
    "$BIN" run 2>>"$WORK/daemon.log" &
  PID=$!
  for _ in $(seq 100); do [ -S "$WORK/agent.sock" ] && break; sleep 0.05; done
}
stop_daemon() { kill "$PID"; wait "$PID" || true; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

RESULTS="$WORK/results.jsonl"
run_case() {  # name sync loadgen-args...
  local name="$1" sync="$2"; shift 2
  for i in $(seq "$RUNS"); do
    start_daemon "$sync"
    sleep 2
    local idle; idle=$(rss_kb "$PID")
    "$GEN" --socket "$WORK/agent.sock" --daemon-pid "$PID" --json "$@" \
      | python3 -c "import json,sys; d=json.load(sys.stdin); d['case']='$name'; d['sync']='$sync'; d['idle_rss_kb']=$idle; print(json.dumps(d))" \
      | tee -a "$RESULTS"
    stop_daemon
  done
}

run_case "1 client, batch 100"           normal --clients 1 --events 200000 --durable --batch 100
run_case "8 clients, batch 100"          normal --clients 8 --events 400000 --durable --batch 100
run_case "8 clients, batch 100, FULL"    full   --clients 8 --events 400000 --durable --batch 100
run_case "8 clients, 1 event/msg"        normal --clients 8 --events 200000 --durable --batch 1 --pipeline 16
run_case "8 clients, 1 event/msg, steady 20,000/s" normal --clients 8 --events 300000 --durable --batch 1 --pipeline 1 --rate 20000
run_case "8 clients, batch 100, 4.7 KB"  normal --clients 8 --events 100000 --durable --batch 100 --blob 4200
run_case "8 clients, jsonl, batch 100"   normal --clients 8 --events 400000 --durable --batch 100 --framing jsonl

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
print()
print("| case | events/s (median) | ack p50 / p99 / p99.9 (ms) | daemon CPU µs/event | RSS idle / peak (MB) |")
print("|---|---|---|---|---|")
for c in cases:
    rs = [r for r in rows if r["case"] == c]
    m = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {c} | {m('events_per_s'):,.0f} | {m('ack_p50_us')/1000:.1f} / {m('ack_p99_us')/1000:.1f} / {m('ack_p999_us')/1000:.1f} "
          f"| {m('daemon_cpu_us_per_event'):.2f} | {m('idle_rss_kb')/1024:.1f} / {max(r['daemon_hwm_kb'] for r in rs)/1024:.1f} |")
PY
