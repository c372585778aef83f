# shellcheck shell=bash
# Shared by deb.sh and rpm.sh (sourced): PASS/FAIL counting.
#   check "description" command...   PASS when the command succeeds
#   summary                           prints the counts; fails if any failed
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
check() {
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}
summary() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}
