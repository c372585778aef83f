#!/usr/bin/env bash
# Throwaway real z4j brain for end-to-end tests; see brain.py for details.
#
#   tests/e2e/brain.sh venv                          create/check tests/e2e/.state/venv
#   tests/e2e/brain.sh start [--state DIR] [--port P] start (or warm-restart) the brain;
#                                                    first boot prints agent env lines
#   tests/e2e/brain.sh stop|restart|status [--state DIR]
#   tests/e2e/brain.sh mint [--state DIR] [--name N] [--api-key]
#
# Default state dir: tests/e2e/.state/brain. Needs only python3 (3.9+) to begin with.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$HERE/brain.py" "$@"
