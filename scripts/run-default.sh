#!/usr/bin/env bash
# The README's main-job command: set up, prepare the embedded corpus, then evolve the CPU seed
# with configs/default.yaml (about 10-15 minutes on 2 cores; no GPU, no internet, no API key).
# Extra arguments go to `evo run`, e.g. --set stopping.max_evaluations=30
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/evo prepare
.venv/bin/evo run configs/default.yaml --set "run.name=default-$(date +%Y%m%d-%H%M%S)" "$@"
