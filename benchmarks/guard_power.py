"""How often the guard promotes a child, by its true gain, and what that costs: a simulation.

    python benchmarks/guard_power.py [--pair-sd 0.031] [--seed-sd 0.020] [--trials 2000]
                                     [--reruns 3 4 5] [--z 1 2]

No training runs: the real evo.guard.Guard decides on numbers drawn from a noise model whose two
figures were measured on the CPU seed (BENCHMARKS.md, "The guard's power"):
- the champion's val_bpb on seed s is its quality plus a seed effect (sd --seed-sd: what the
  guard's noise runs measure as sigma);
- a child differs from the champion on the same seed by its gain plus noise of sd --pair-sd (run-
  to-run noise, and how differently the two react to a seed).
Held-out moves with val (both score the same trained model), so held-out never refuses here.

Each trial is one child of the seed variant, the first champion: its first draw on the evaluation
seed decides whether it is a candidate (it must beat the champion's by max(min_delta, z * sigma)),
then the guard re-runs it on the champion's seeds and decides. The table gives, per true gain, the
share of children promoted and the guard runs each child cost. Gain 0 is the false promotion rate
among all children, not among candidates.

What it leaves out: every trial draws a champion of its own (noise runs and seed effects), so it
gives rates per child and cannot show one lucky champion run refusing several children in a row;
and champions after the seed variant, whose bar is a paired estimate, are not simulated.
Trial t draws the same numbers under every setting (they are keyed by trial and seed), so the rows
differ by the settings, not by luck.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evo.config import GuardSection  # noqa: E402
from evo.guard import Guard  # noqa: E402

GAINS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06)
QUALITY = 2.5  # the champion's val_bpb; only differences matter


class NoiseModel:
    """One trial's numbers, each fixed by (trial, seed) whatever order the guard asks in."""

    def __init__(self, trial: int, pair_sd: float, seed_sd: float):
        self.trial, self.pair_sd, self.seed_sd = trial, pair_sd, seed_sd

    def _draw(self, what: str, seed: int, sd: float) -> float:
        return random.Random(f"{self.trial}/{what}/{seed}").gauss(0.0, sd)

    def champion(self, seed: int) -> float:
        return QUALITY + self._draw("seed effect", seed, self.seed_sd)

    def child(self, seed: int, gain: float) -> float:
        return self.champion(seed) - gain + self._draw("paired noise", seed, self.pair_sd)


def one_child(settings: GuardSection, gain: float, noise: NoiseModel) -> tuple[bool, int]:
    """(promoted, guard runs the child cost) for one child of the seed variant."""
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
    parser.add_argument("--pair-sd", type=float, default=0.031, help="sd of a child's difference from the champion on one seed")
    parser.add_argument("--seed-sd", type=float, default=0.020, help="sd of one run's val_bpb across seeds (sigma)")
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
            for gain in GAINS:
                outcomes = [one_child(settings, gain, NoiseModel(trial, args.pair_sd, args.seed_sd))
                            for trial in range(args.trials)]
                promoted = sum(p for p, _ in outcomes) / args.trials
                runs = sum(r for _, r in outcomes) / args.trials
                cells.append(f"{promoted:.3f} / {runs:.2f}")
            print(f"| {reruns} | {z:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
