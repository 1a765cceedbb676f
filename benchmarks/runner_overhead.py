"""What sealing and the sandbox cost per evaluation, on the CPU seed (or any train.py).

    python benchmarks/runner_overhead.py [--repeats 5] [--budget 10] [--data-dir DIR] [--device cpu] [--seed-file F]

Each configuration evaluates the same seed `repeats` times (seeds 0..repeats-1, interleaved so a
busy machine hurts all of them alike), with one warm evaluator per configuration as a worker has:
  sealed+sandbox     the default: export, hand-over, a separate evaluator scores
  in_process+sandbox the model scored inside the variant's process (the old, unsealed path)
  sealed+no sandbox  the same as the default without bubblewrap
Sealing's cost is the difference of median wall times between the first two; the sandbox's, between
the first and the last. The training itself is time-based, so it costs the same in all three.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import prepare
from trainer import sandbox
from trainer.evaluator import Evaluator
from trainer.runner import RunSettings, run_variant

CONFIGURATIONS = [("sealed+sandbox", "sealed", "bubblewrap"), ("in_process+sandbox", "in_process", "bubblewrap"),
                  ("sealed+no sandbox", "sealed", "none")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=10.0, help="training seconds")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=prepare.DEFAULT_SEQ_LEN)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seed-file", default=str(Path(__file__).resolve().parents[1] / "trainer" / "train_cpu.py"))
    args = parser.parse_args()
    prepare.verify(args.data_dir)
    configurations = CONFIGURATIONS if sandbox.probe() is None else [c for c in CONFIGURATIONS if c[2] == "none"]
    if sandbox.probe() is not None:
        print(f"(no sandbox here: {sandbox.probe()}; measuring unsandboxed only)")
    code = Path(args.seed_file).read_text()
    evaluators = {name: Evaluator(args.device, sandboxed=box == "bubblewrap") if mode == "sealed" else None
                  for name, mode, box in configurations}
    rows = {name: [] for name, _, _ in configurations}
    try:
        for seed in range(args.repeats):
            for name, mode, box in configurations:
                settings = RunSettings(time_budget=args.budget, seed=seed, data_dir=args.data_dir, device=args.device,
                                       seq_len=args.seq_len, eval_tokens=args.eval_tokens, evaluation=mode, sandbox=box,
                                       startup_grace=120, eval_grace=120)
                result = run_variant(code, settings, evaluator=evaluators[name])
                if result.status != "ok":
                    raise SystemExit(f"{name}: {result.status} {result.reason}\n{result.log_tail}")
                own = re.search(r"^training_seconds:\s+(\S+)", result.log_tail, re.MULTILINE)
                rows[name].append({"wall": result.wall_seconds, "train": result.train_seconds,
                                   "own": float(own.group(1)) if own else float("nan"),
                                   "score": result.metrics.get("eval_seconds", float("nan")) + result.metrics.get("load_seconds", 0.0),
                                   "bpb": result.val_bpb})
    finally:
        for evaluator in evaluators.values():
            if evaluator is not None:
                evaluator.close()

    print(f"{args.seed_file} on {args.device}, budget {args.budget:g} s, {args.eval_tokens} eval tokens, "
          f"median of {args.repeats}\n")
    print(f"{'configuration':<20} {'wall s':>8} {'runner train s':>15} {'variant train s':>16} "
          f"{'evaluator s':>12} {'val_bpb':>8}")
    medians = {}
    for name, runs in rows.items():
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        medians[name] = m
        print(f"{name:<20} {m['wall']:>8.2f} {m['train']:>15.2f} {m['own']:>16.2f} {m['score']:>12.2f} {m['bpb']:>8.4f}")
    if "in_process+sandbox" in medians:
        print(f"\nsealing adds {medians['sealed+sandbox']['wall'] - medians['in_process+sandbox']['wall']:+.2f} s per "
              "evaluation (export and save inside the variant's clock, transfer, load and score in the evaluator)")
    if "sealed+sandbox" in medians:
        print(f"the sandbox adds {medians['sealed+sandbox']['wall'] - medians['sealed+no sandbox']['wall']:+.2f} s per evaluation")


if __name__ == "__main__":
    main()
