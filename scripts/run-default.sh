#!/usr/bin/env bash
# The README's main-job command: set up, prepare the embedded corpus, then run the embedded
# CPU default. No GPU, no internet, no API key.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/evo prepare
run_dir="runs/seed-eval-$(date +%Y%m%d-%H%M%S)"
.venv/bin/evo eval trainer/train_cpu.py --budget 60 --run-dir "$run_dir"
echo
echo "results: $run_dir (train.py, log.txt, metrics.json, result.json)"
