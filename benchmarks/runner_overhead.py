"""Runner overhead: wall time of an evaluation minus its training time minus its evaluation time.

    python benchmarks/runner_overhead.py [--repeats 5] [--budget 10] [--data-dir DIR]

For a near no-op variant (imports torch and prepare, scores an untrained bigram table) and for
the CPU seed. The overhead still contains the variant's own start-up (Python, `import torch`,
building the model), so the last column subtracts a bare `python -c "import torch, prepare"`
measured the same way, leaving what the runner itself adds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import prepare
from trainer.runner import RunSettings, run_variant

NOOP = """
import torch, prepare
tok = prepare.get_tokenizer()
model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, tok.vocab_size))
print(f"val_bpb: {prepare.evaluate_bpb(model, tok, 16):.6f}")
"""


def bare_import_seconds(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, prepare"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(code: str, settings: RunSettings, repeats: int) -> dict:
    walls, overheads = [], []
    for i in range(repeats):
        settings.seed = i
        result = run_variant(code, settings)
        if result.status != "ok":
            raise SystemExit(f"benchmark variant failed: {result.status} {result.reason}\n{result.log_tail}")
        trained = re.search(r"^training_seconds:\s+(\S+)", result.log_tail, re.MULTILINE)
        training = float(trained.group(1)) if trained else 0.0
        walls.append(result.wall_seconds)
        overheads.append(result.wall_seconds - training - result.metrics["eval_seconds"])
    return {"wall": statistics.median(walls), "overhead": statistics.median(overheads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0, help="CPU seed training seconds")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    args = parser.parse_args()
    prepare.read_meta(args.data_dir)

    imports = bare_import_seconds(args.repeats)
    seed = (Path(__file__).resolve().parents[1] / "trainer" / "train_cpu.py").read_text()
    rows = [
        ("no-op variant", measure(NOOP, RunSettings(time_budget=args.budget, data_dir=args.data_dir), args.repeats)),
        (f"CPU seed, {args.budget:.0f} s budget", measure(seed, RunSettings(time_budget=args.budget, data_dir=args.data_dir), args.repeats)),
    ]
    print(f"median of {args.repeats}; bare `python -c 'import torch, prepare'`: {imports:.2f} s\n")
    print(f"{'variant':<24} {'wall s':>8} {'overhead s':>11} {'minus imports s':>16} {'% of 300 s':>11}")
    for name, m in rows:
        print(f"{name:<24} {m['wall']:>8.2f} {m['overhead']:>11.2f} {m['overhead'] - imports:>16.2f} "
              f"{100 * m['overhead'] / 300:>10.2f}%")


if __name__ == "__main__":
    main()
