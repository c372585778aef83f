#!/usr/bin/env bash
# Quick start: a throwaway local z4j brain, z4j-agentd in front of it, demo
# task events from three processes, and where to look.
#
#   examples/quickstart.sh            runs until Ctrl-C, then stops everything
#   examples/quickstart.sh --demo     sends the demo, prints the result, stops
#
# Everything lives under .quickstart/ in the repository (the brain's SQLite,
# its venv with z4j==1.13.0 from PyPI, the daemon's spool and socket).
# Needs: cargo, python3 (3.9+) with venv. Binds 127.0.0.1 only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.quickstart"
PORT="${Z4J_QUICKSTART_PORT:-7711}"
mkdir -p "$STATE"
chmod 700 "$STATE"
export Z4J_E2E_VENV="$STATE/venv"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building z4j-agentd (release)"
cargo build --release --quiet --bin z4j-agentd

say "starting a local z4j brain on 127.0.0.1:$PORT (first run installs z4j==1.13.0, ~30 s)"
python3 tests/e2e/brain.py venv >/dev/null
python3 tests/e2e/brain.py start --state "$STATE/brain" --port "$PORT" >/dev/null
if [[ ! -s "$STATE/agent.env" ]]; then
  python3 tests/e2e/brain.py mint --state "$STATE/brain" --name "quickstart-$(hostname -s 2>/dev/null || echo host)" --api-key \
    > "$STATE/agent.env"
  chmod 600 "$STATE/agent.env"
fi
set -a
# shellcheck disable=SC1091
source "$STATE/agent.env"
set +a
ADMIN_JSON="$STATE/brain/brain.json"

mkdir -p "$STATE/home/.z4j"
chmod 700 "$STATE/home" "$STATE/home/.z4j"
printf '%s' "$Z4J_TOKEN" > "$STATE/token" && chmod 600 "$STATE/token"
printf '%s' "$Z4J_HMAC_SECRET" > "$STATE/hmac_secret" && chmod 600 "$STATE/hmac_secret"
export Z4J_SOCKET_PATH="$STATE/agent.sock"
DAEMON_PID=""
cleanup() {
  [[ -n "$DAEMON_PID" ]] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  python3 tests/e2e/brain.py stop --state "$STATE/brain" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

# The daemon's environment: secrets from files, as under systemd. An array,
# not a function, so `$!` below is the daemon's own pid (env execs it).
AGENTD=(env -u Z4J_TOKEN -u Z4J_HMAC_SECRET HOME="$STATE/home"
  Z4J_TOKEN_FILE="$STATE/token" Z4J_HMAC_SECRET_FILE="$STATE/hmac_secret"
  Z4J_PROJECT_ID="$Z4J_PROJECT_SLUG" "$ROOT/target/release/z4j-agentd")

say "starting z4j-agentd (socket $Z4J_SOCKET_PATH)"
"${AGENTD[@]}" run 2> >(tee "$STATE/agentd.log" >&2) &
DAEMON_PID=$!
for _ in $(seq 100); do [[ -S "$Z4J_SOCKET_PATH" ]] && break; sleep 0.1; done

say "z4j-agentd doctor: config, spool, socket, network, a signed round trip with the brain, clock"
"${AGENTD[@]}" doctor || true

say "three application processes send task lifecycles (JSON lines and MessagePack)"
VPY="$Z4J_E2E_VENV/bin/python"
python3 examples/send_jsonl.py --tasks 3 --durable --prefix "qs-jsonl-$$-"
"$VPY" examples/send_msgpack.py --tasks 3 --durable --prefix "qs-msgpack-$$-"
"$VPY" examples/send_msgpack.py --tasks 3 --durable --batch --fail-every 2 --prefix "qs-batch-$$-"

say "what the brain stored (REST API, after the daemon forwarded the batches)"
"$VPY" - <<PY
import json, time, urllib.request
url, key, slug = "$Z4J_BRAIN_URL", "$Z4J_API_KEY", "$Z4J_PROJECT_SLUG"
def get(path):
    req = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + key})
    return json.load(urllib.request.urlopen(req, timeout=10))
deadline = time.time() + 60
while True:
    items = [t for t in get(f"/api/v1/projects/{slug}/tasks?limit=100")["items"] if t["task_id"].startswith("qs-") and "-$$-" in t["task_id"]]
    if (len(items) == 9 and all(t["state"] in ("success", "failure") for t in items)) or time.time() > deadline:
        break
    time.sleep(0.5)
for t in sorted(items, key=lambda t: t["task_id"]):
    print(f"  {t['task_id']:<28} {t['state']:<8} result={json.dumps(t.get('result'), ensure_ascii=False)} exception={t.get('exception')}")
agents = [a for a in get(f"/api/v1/projects/{slug}/agents") if a["name"] == "$Z4J_AGENT_NAME"]
print(f"  agent {agents[0]['name']}: {agents[0]['state']}" if agents else "  agent not found")
PY

say "z4j-agentd status"
"${AGENTD[@]}" status

ADMIN_EMAIL=$(python3 -c "import json; print(json.load(open('$ADMIN_JSON'))['email'])" 2>/dev/null || echo "see $ADMIN_JSON")
cat <<MSG

  Brain dashboard:  $Z4J_BRAIN_URL   (log in as $ADMIN_EMAIL; the password is in $ADMIN_JSON)
  Daemon socket:    $Z4J_SOCKET_PATH  (send more: python3 examples/send_jsonl.py --socket $Z4J_SOCKET_PATH)
  Daemon log:       $STATE/agentd.log
MSG

if [[ "${1:-}" == "--demo" ]]; then
  say "demo done; stopping"
  exit 0
fi
say "running; press Ctrl-C to stop the daemon and the brain"
wait "$DAEMON_PID"
