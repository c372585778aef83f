#!/usr/bin/env bash
# Every test of z4j-agentd, in the order a failure is cheapest to read:
#   1. cargo fmt --check and cargo clippy --all-targets -D warnings
#   2. cargo test (unit tests, the fake-brain uplink tests, the binary tests),
#      then systemd-analyze verify/security on the units in systemd/
#   3. the Python client's unit tests (clients/python/run-tests.sh, which
#      creates its own venv on first use)
#   4. the end-to-end tests against a real z4j 1.13.0 brain (tests/e2e/run.sh,
#      which creates its own venv with z4j from PyPI on first use)
#   5. the packages (tests/packaging/run.sh): build the .deb, install it with
#      dpkg -i, check it, purge it; build and inspect the RPM; check the
#      container and Kubernetes definitions. Needs root on Debian (CI is).
#      Installs cargo-deb and cargo-generate-rpm with cargo on first use.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --all-targets
echo "==> systemd units: systemd-analyze verify and security"
tests/systemd/check-units.sh
echo "==> Python client unit tests"
clients/python/run-tests.sh -q
echo "==> end-to-end tests against a real z4j brain"
tests/e2e/run.sh
echo "==> packages: .deb, RPM, container and Kubernetes definitions"
tests/packaging/run.sh
