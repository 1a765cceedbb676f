#!/usr/bin/env bash
# The README's test command: set up, then run the tests.
#   bash scripts/test.sh          fast tests (a few minutes)
#   bash scripts/test.sh --all    also the slow ones (real training runs); CI uses this
#   bash scripts/test.sh ARGS     any other arguments go to pytest as they are
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tests also cover the Ray executor on a local two-node cluster: install the extra (CPU only).
.venv/bin/python -m pip --quiet --disable-pip-version-check install -e ".[dev,ray]"
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/python -m pytest "$@"
elif [ $# -eq 0 ]; then
  exec .venv/bin/python -m pytest -m "not slow"
else
  exec .venv/bin/python -m pytest "$@"
fi
