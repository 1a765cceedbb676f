"""How often the guard promotes a child, by its true gain, and what that costs: a simulation.

    python benchmarks/guard_power.py [--pair-sd 0.026] [--seed-sd 0.018] [--trials 2000]
                                     [--reruns 3 4 5] [--z 1 2]

No training runs: the real evo.guard.Guard decides on numbers drawn from a noise model whose two
figures were measured on the CPU seed (BENCHMARKS.md, "The guard's power"):
- a variant's val_bpb on seed s is its quality plus a seed effect shared by every variant
  (sd --seed-sd across seeds: what the guard's noise runs measure as sigma);
- a child differs from the champion on the same seed by its gain plus noise of sd --pair-sd
  (the spread of paired differences: run-to-run noise and how differently the two react to a seed).
Held-out moves with val (both score the same trained model), so held-out never refuses here.

Each trial is one child of the champion: its first draw on the evaluation seed decides whether it
becomes a candidate (the bar z * sigma), then the guard re-runs it on the champion's seeds and
decides. The table gives, per true gain, the share of children promoted and the guard runs spent
per child. Gain 0 is the false promotion rate among all children, not among candidates.
"""

from __future__ import annotations

import argparse
import random

from evo.config import GuardSection
from evo.guard import Guard

GAINS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06)
QUALITY = 2.5  # the champion's val_bpb; only differences matter


class NoiseModel:
    def __init__(self, pair_sd: float, seed_sd: float, rng: random.Random):
        self.pair_sd, self.seed_sd, self.rng = pair_sd, seed_sd, rng
        self.seed_effects: dict[int, float] = {}

    def champion(self, seed: int) -> float:
        if seed not in self.seed_effects:
            self.seed_effects[seed] = self.rng.gauss(0.0, self.seed_sd)
        return QUALITY + self.seed_effects[seed]

    def child(self, seed: int, gain: float) -> float:
        return self.champion(seed) - gain + self.rng.gauss(0.0, self.pair_sd)


def one_child(settings: GuardSection, gain: float, noise: NoiseModel) -> tuple[bool, int]:
    """(promoted, guard runs the child cost) for one child of the seed champion."""
    guard = Guard(settings, log=lambda line: None, evaluation_seed=0)
    guard.start("champion", noise.champion(0))
    _drain(guard, noise, gain)
    if not guard.consider("child", noise.child(0, gain)):
        return False, 0
    runs = _drain(guard, noise, gain)
    return guard.records["child"].verdict == "promoted", runs


def _drain(guard: Guard, noise: NoiseModel, gain: float) -> int:
    runs = 0
    while (job := guard.take()) is not None:
        val = noise.child(job.seed, gain) if job.individual == "child" else noise.champion(job.seed)
        guard.record(job, "ok", {"val_bpb": val, "heldout_bpb": val - 0.4})
        runs += job.individual == "child"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair-sd", type=float, default=0.026, help="sd of a child's difference from the champion on one seed")
    parser.add_argument("--seed-sd", type=float, default=0.018, help="sd of a variant's val_bpb across seeds (sigma)")
    parser.add_argument("--trials", type=int, default=2000, help="children simulated per gain and setting")
    parser.add_argument("--reruns", type=int, nargs="+", default=[3, 4, 5], help="guard.reruns (and noise_runs) to compare")
    parser.add_argument("--z", type=float, nargs="+", default=[1.0, 2.0], help="guard.z values to compare")
    args = parser.parse_args()
    print(f"paired-difference sd {args.pair_sd}, seed sd {args.seed_sd}, {args.trials} children per cell; "
          "each cell: share promoted / guard runs per child\n")
    print("| reruns | z | " + " | ".join(f"gain {g:g}" for g in GAINS) + " |")
    print("|---|---|" + "---|" * len(GAINS))
    for reruns in args.reruns:
        for z in args.z:
            settings = GuardSection(noise_runs=reruns, reruns=reruns, z=z, audit_runs=0)
            cells = []
            for i, gain in enumerate(GAINS):
                rng = random.Random(1000 * reruns + i)  # the same draws for every z: the settings differ, not the luck
                outcomes = [one_child(settings, gain, NoiseModel(args.pair_sd, args.seed_sd, rng)) for _ in range(args.trials)]
                promoted = sum(p for p, _ in outcomes) / args.trials
                runs = sum(r for _, r in outcomes) / args.trials
                cells.append(f"{promoted:.3f} / {runs:.2f}")
            print(f"| {reruns} | {z:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
