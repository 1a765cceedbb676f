"""How often the AST operators produce a usable child.

    python benchmarks/operator_validity.py [--proposals 200] [--smoke 20] [--data-dir DIR]

For each seed and AST operator: the fraction of proposals that are offered (not refused) and
compile, and, for a sample of them on the CPU seed, the fraction that also pass the smoke stage
(a 2-second run through the real runner that must finish with status ok). The GPU seed's smoke
stage needs a GPU at its size and is skipped without one.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import prepare
from mutators.base import Parent, Proposal
from mutators.constants import PerturbConstants
from mutators.crossover import Crossover
from trainer.runner import RunSettings, run_variant

ROOT = Path(__file__).resolve().parents[1]


def proposals(operator, code: str, n: int, rng: random.Random) -> list:
    other = code  # crossover needs a second parent that differs: a few perturbations away
    perturb = PerturbConstants(max_changes=3)
    for _ in range(4):
        child = perturb.propose([Parent("b", other, None)], rng)
        other = getattr(child, "code", other)
    parents = [Parent("a", code, 2.0), Parent("b", other, 2.1)][: operator.parents_needed]
    return [operator.propose(parents, rng) for _ in range(n)]


def compiles(p) -> bool:
    if not isinstance(p, Proposal):
        return False
    try:
        compile(p.code, "train.py", "exec")
        return True
    except SyntaxError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proposals", type=int, default=200)
    parser.add_argument("--smoke", type=int, default=20, help="proposals per operator run through the smoke stage")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'seed':<14} {'operator':<10} {'proposals':>9} {'compile':>8} {'smoke runs':>10} {'smoke ok':>9}")
    for seed_name in ("train_cpu.py", "train_gpu.py"):
        code = (ROOT / "trainer" / seed_name).read_text()
        for operator in (PerturbConstants(), Crossover()):
            rng = random.Random(0)
            made = proposals(operator, code, args.proposals, rng)
            valid = [p for p in made if compiles(p)]
            smoke_text = "-"
            if seed_name == "train_cpu.py" or device == "cuda":
                sample = valid[: args.smoke]
                settings = RunSettings(time_budget=2, data_dir=args.data_dir, device=device,
                                       eval_tokens=2048, startup_grace=60, eval_grace=60)
                ok = sum(run_variant(p.code, settings).status == "ok" for p in sample)
                smoke_text = f"{ok / max(len(sample), 1):>9.1%}"
                runs = len(sample)
            else:
                runs = 0
            print(f"{seed_name:<14} {operator.name:<10} {len(made):>9} {len(valid) / len(made):>8.1%} {runs:>10} {smoke_text:>9}",
                  flush=True)


if __name__ == "__main__":
    main()
