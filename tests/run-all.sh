#!/usr/bin/env bash
# Every test of z4j-agentd, in the order a failure is cheapest to read:
#   1. cargo fmt --check and cargo clippy --all-targets -D warnings, and the
#      secrets checker's self-test (tests/check_secrets.py --self-test)
#   2. cargo test (unit tests, then the integration tests of tests/it/ as one
#      binary: the fake-brain uplink tests, the binary tests),
#      then systemd-analyze verify/security on the units in systemd/
#   3. the Python client's unit tests (clients/python/run-tests.sh, which
#      creates its own venv on first use)
#   4. the end-to-end tests against a real z4j 1.13.0 brain (tests/e2e/run.sh,
#      which creates its own venv with z4j from PyPI on first use)
#   5. the packages (tests/packaging/run.sh): build the .deb, install it with
#      dpkg -i, check it, purge it; build and inspect the RPM; check the
#      container and Kubernetes definitions. Needs root on Debian (CI is).
#      Installs cargo-deb and cargo-generate-rpm with cargo on first use.
#   6. no token or HMAC secret in any log output of the suite
#      (tests/check_secrets.py on target/test-logs, below).
# Exits non-zero on the first failure.
#
# Logs: target/test-logs/ is emptied at the start and exported as
# Z4J_TEST_LOG_DIR. Each step's console output (stdout and stderr) is also
# written to target/test-logs/steps/<n>-<step>.log. With Z4J_TEST_LOG_DIR set:
#   - the Rust tests (tests/it/support) log the in-process daemons' code at
#     TRACE to rust/it-<pid>.log, keep the output of every z4j-agentd
#     process the binary tests run (rust/it-<pid>-<n>-*.log)
#     and list the credentials they hand out in rust.secrets;
#   - the end-to-end session copies its run directory's logs (daemons,
#     one-shot CLI runs, example clients, Celery workers, gunicorn, redis,
#     the brain) to e2e/<run>/ and lists every minted agent's token and HMAC
#     secret (as given, unpadded, the decoded key in hex and in standard
#     base64) in e2e.secrets;
#   - tests/packaging/deb.sh keeps the installed daemon's doctor output in
#     packaging/ and its token and HMAC secret in packaging.secrets.
# The last step searches every file there for every secret listed (see
# tests/check_secrets.py for its rules): a hit, a secret shorter than 16
# characters, or a source with logs but no secrets (or secrets but no logs)
# fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_DIR="$PWD/target/test-logs"
rm -rf "$LOG_DIR"
mkdir -p "$LOG_DIR/steps"
export Z4J_TEST_LOG_DIR="$LOG_DIR"

# step <name> <command...>: runs the command; its stdout and stderr go to the
# console and to $LOG_DIR/steps/<n>-<name>.log. A failing command fails the
# script (pipefail: the pipeline's status is the command's, not tee's).
n=0
step() {
    local name=$1
    shift
    n=$((n + 1))
    echo "==> $name: $*"
    "$@" 2>&1 | tee "$LOG_DIR/steps/$n-$name.log"
}

step cargo-fmt cargo fmt --all -- --check
step cargo-clippy cargo clippy --all-targets --quiet -- -D warnings
step check-secrets-self-test python3 tests/check_secrets.py --self-test
step cargo-test cargo test --all-targets
step systemd-units tests/systemd/check-units.sh
step python-client clients/python/run-tests.sh -q
step e2e tests/e2e/run.sh
step packaging tests/packaging/run.sh
echo "==> no token or HMAC secret in any log of the suite ($LOG_DIR)"
python3 tests/check_secrets.py "$LOG_DIR" --require steps --require rust --require e2e
