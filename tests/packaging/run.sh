#!/usr/bin/env bash
# The packaging tests, each timed:
#   1. deb.sh              build the .deb, install, check, reinstall, purge
#   2. rpm.sh              build the RPM, inspect it, run its scriptlets
#   3. check-manifests.py  static checks of packaging/kubernetes/*.yaml and
#                          packaging/container/Containerfile (PyYAML, in
#                          tests/packaging/.venv, made on first use)
# Runs all three, then exits non-zero if any failed. deb.sh needs root on a
# Debian 12 machine where z4j-agentd is not installed (see deb.sh).
#
#   tests/packaging/run.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYYAML_VERSION=6.0.3

results=()
status=0
run_step() {
    local name=$1
    shift
    echo
    echo "==> $name"
    local start=$SECONDS rc=0
    "$@" || rc=$?
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        results+=("PASS $name (${took} s)")
    else
        results+=("FAIL $name (${took} s, exit $rc)")
        status=1
    fi
}

# shellcheck disable=SC2317  # called through run_step
manifests() {
    local venv=$HERE/.venv
    if ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
        echo "creating $venv with PyYAML $PYYAML_VERSION"
        rm -rf "$venv"
        "${PYTHON:-python3}" -m venv "$venv" &&
            "$venv/bin/pip" install --quiet --disable-pip-version-check "PyYAML==$PYYAML_VERSION" || return 1
    fi
    "$venv/bin/python" "$HERE/check-manifests.py" "$ROOT"
}

total_start=$SECONDS
run_step "deb.sh" "$HERE/deb.sh"
run_step "rpm.sh" "$HERE/rpm.sh"
run_step "check-manifests.py" manifests

echo
echo "==> packaging tests"
for r in "${results[@]}"; do echo "$r"; done
npass=$(printf '%s\n' "${results[@]}" | grep -c '^PASS')
nfail=$(printf '%s\n' "${results[@]}" | grep -c '^FAIL')
echo "total $((SECONDS - total_start)) s"
echo "packaging: $npass passed, $nfail failed"
exit $status
