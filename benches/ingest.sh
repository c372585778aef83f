#!/usr/bin/env bash
# Durable-ingest benchmark of z4j-agentd: the daemon runs with its brain
# unreachable (so only socket -> validation -> spool commit is measured),
# the load generator (examples/loadgen.rs) drives it, and the daemon's CPU
# and RSS are read from /proc. Prints one JSON line per run and a summary
# with medians (and, for the fairness cases, each run).
# Usage: benches/ingest.sh [RUNS] [CASES]   (default 3, all)
#   CASES: throughput (the durable-ingest table), fairness (a probe's
#   round trips with and without a flooding client, and 1,000 connections
#   at once), tails (the steady-rate ack and the probe beside one flooder:
#   what the WAL checkpoint sets), or all.
#   Z4J_AGENTD_BIN=path measures another daemon binary (an earlier build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
CASES="${2:-all}"
cargo build --release --quiet --bin z4j-agentd --example loadgen
# Z4J_AGENTD_BIN: another daemon binary to measure (e.g. an earlier build).
BIN="${Z4J_AGENTD_BIN:-target/release/z4j-agentd}"
GEN=target/release/examples/loadgen
WORK="$(mktemp -d /tmp/z4j-bench.XXXXXX)"
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_daemon() {  # $1 = synchronous mode, then VAR=value settings
  local sync="$1"; shift
  rm -rf "$WORK/home"; mkdir -p "$WORK/home"
  env "$@" HOME="$WORK/home" Z4J_BRAIN_URL=http://127.0.0.1:9 Z4J_TOKEN=bench \
  Z4J_HMAC_SECRET=mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU= \
  Z4J_SOCKET_PATH="$WORK/agent.sock" Z4J_SHUTDOWN_GRACE_SECONDS=0 \
  Z4J_BUFFER_SYNCHRONOUS="$sync" Z4J_LOG_LEVEL=warn \
    "$BIN" run 2>>"$WORK/daemon.log" &
  PID=$!
  for _ in $(seq 100); do [ -S "$WORK/agent.sock" ] && break; sleep 0.05; done
}
stop_daemon() { kill "$PID"; wait "$PID" || true; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

RESULTS="$WORK/results.jsonl"
DAEMON_ENV=()
run_case() {  # name sync loadgen-args...
  local name="$1" sync="$2"; shift 2
  for i in $(seq "$RUNS"); do
    start_daemon "$sync" "${DAEMON_ENV[@]}"
    sleep 2
    local idle; idle=$(rss_kb "$PID")
    "$GEN" --socket "$WORK/agent.sock" --daemon-pid "$PID" --json "$@" \
      | python3 -c "import json,sys; d=json.load(sys.stdin); d['case']='$name'; d['sync']='$sync'; d['idle_rss_kb']=$idle; print(json.dumps(d))" \
      | tee -a "$RESULTS"
    stop_daemon
  done
}

if [ "$CASES" = all ] || [ "$CASES" = throughput ]; then
run_case "1 client, batch 100"           normal --clients 1 --events 200000 --durable --batch 100
run_case "8 clients, batch 100"          normal --clients 8 --events 400000 --durable --batch 100
run_case "8 clients, batch 100, FULL"    full   --clients 8 --events 400000 --durable --batch 100
run_case "8 clients, 1 event/msg"        normal --clients 8 --events 200000 --durable --batch 1 --pipeline 16
run_case "8 clients, 1 event/msg, steady 20,000/s" normal --clients 8 --events 300000 --durable --batch 1 --pipeline 1 --rate 20000
run_case "8 clients, batch 100, 4.7 KB"  normal --clients 8 --events 100000 --durable --batch 100 --blob 4200
run_case "8 clients, jsonl, batch 100"   normal --clients 8 --events 400000 --durable --batch 100 --framing jsonl
fi

if [ "$CASES" = tails ]; then
# The two tails the WAL checkpoint sets: the durable ack at a steady rate,
# and a probe's round trip beside one flooding client.
run_case "8 clients, 1 event/msg, steady 20,000/s" normal --clients 8 --events 300000 --durable --batch 1 --pipeline 1 --rate 20000
DAEMON_ENV=(Z4J_BUFFER_MAX_EVENTS=1000000000 Z4J_BUFFER_MAX_BYTES=1000000000000)
run_case "probe + 1 flooder, 1,000 events/msg"           normal --clients 1 --events 100000 --batch 1000 --probe 300
DAEMON_ENV=()
fi

if [ "$CASES" = all ] || [ "$CASES" = fairness ]; then
# A probe sends 300 events one at a time (10 ms apart), each awaiting its
# durable ack, alone and while flooding clients send fire-and-forget
# messages as fast as they can until the probe is done. The spool bound is
# raised so that the flood never evicts.
DAEMON_ENV=(Z4J_BUFFER_MAX_EVENTS=1000000000 Z4J_BUFFER_MAX_BYTES=1000000000000)
run_case "probe alone"                                   normal --clients 0 --probe 300
run_case "probe + 1 flooder, 100 events/msg"             normal --clients 1 --events 100000 --batch 100 --probe 300
run_case "probe + 1 flooder, 1,000 events/msg"           normal --clients 1 --events 100000 --batch 1000 --probe 300
run_case "probe + 1 flooder, 10,000 events/msg"          normal --clients 1 --events 100000 --batch 10000 --probe 300
run_case "probe + 4 flooders, 1,000 events/msg"          normal --clients 4 --events 400000 --batch 1000 --probe 300
DAEMON_ENV=()
# 1,000 connections, each sending one durable event; the daemon's RSS is
# read while all of them are still open.
run_case "1,000 connections, 1 durable event each"       normal --clients 1000 --events 1000 --batch 1 --durable --pipeline 1
fi

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
def num(v):
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"
def runs(rs, key, scale):
    return ", ".join(num(r[key] / scale) for r in rs)
throughput = [c for c in cases if not c.startswith(("probe", "1,000 connections"))]
fairness = [c for c in cases if c.startswith("probe")]
crowd = [c for c in cases if c.startswith("1,000 connections")]
if throughput:
    print()
    print("| case | events/s (median) | ack p50 / p99 / p99.9 (ms) | daemon CPU µs/event | RSS idle / peak (MB) |")
    print("|---|---|---|---|---|")
for c in throughput:
    rs = [r for r in rows if r["case"] == c]
    m = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {c} | {m('events_per_s'):,.0f} | {m('ack_p50_us')/1000:.1f} / {m('ack_p99_us')/1000:.1f} / {m('ack_p999_us')/1000:.1f} "
          f"| {m('daemon_cpu_us_per_event'):.2f} | {m('idle_rss_kb')/1024:.1f} / {max(r['daemon_hwm_kb'] for r in rs)/1024:.1f} |")
if fairness:
    print()
    print("| case | probe p50 (ms) [runs] | probe p99 (ms) [runs] | probe max (ms) [runs] | flood events/s [runs] |")
    print("|---|---|---|---|---|")
for c in fairness:
    rs = [r for r in rows if r["case"] == c]
    m = lambda k: statistics.median(r[k] for r in rs)
    if rs[0]["clients"] == 0:
        flood = "-"
    else:
        each = ", ".join(f"{r['events_per_s']:,.0f}" for r in rs)
        flood = f"{m('events_per_s'):,.0f} [{each}]"
    print(f"| {c} | {num(m('probe_p50_us')/1000)} [{runs(rs, 'probe_p50_us', 1000)}] "
          f"| {num(m('probe_p99_us')/1000)} [{runs(rs, 'probe_p99_us', 1000)}] "
          f"| {num(m('probe_max_us')/1000)} [{runs(rs, 'probe_max_us', 1000)}] | {flood} |")
for c in crowd:
    rs = [r for r in rows if r["case"] == c]
    m = lambda k: statistics.median(r[k] for r in rs)
    print()
    print(f"{c}: daemon RSS with them open {m('daemon_rss_kb')/1024:.1f} MB "
          f"[{runs(rs, 'daemon_rss_kb', 1024)}], idle before {m('idle_rss_kb')/1024:.1f} MB, "
          f"ack p50 / p99 {m('ack_p50_us')/1000:.1f} / {m('ack_p99_us')/1000:.1f} ms")
PY
