"""Does the guard keep noise out and let a real gain in?

    python benchmarks/guard_evidence.py [--runs 20] [--budget 20] [--improvement BATCH_SIZE=4]

1. Pure noise: the unchanged CPU seed runs `--runs` times with different seeds (held-out
   scored). The first k runs are the champion's noise floor; every other run is treated as a
   candidate with that run as its first draw. The greedy rule keeps a candidate when its first
   draw beats the champion's first draw; the gate re-runs it (n further runs drawn from the other
   noise runs, all the same script) and applies the test, the minimum effect and the held-out
   check of evo.guard.
2. A real change: the seed with `--improvement` applied runs 1 + n times with new seeds and
   goes through the same gate against the same champion.

Every run here has a seed of its own, so no candidate shares a seed with the champion: this
measures the guard's unpaired fallback (Welch's test), not the paired test evo uses when a
candidate's re-runs share the champion's seeds. A paired version needs neutral code changes run
on the champion's own seeds; it is not written yet.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import prepare
from evo.config import GuardSection
from evo.guard import NOISE, RERUN, Guard, GuardRun
from trainer.runner import RunSettings, run_variant

SEED = (Path(__file__).resolve().parents[1] / "trainer" / "train_cpu.py").read_text()


def run(code: str, seed: int, budget: float, data_dir: str) -> tuple[float, float]:
    result = run_variant(code, RunSettings(time_budget=budget, seed=seed, heldout=True, data_dir=data_dir))
    if result.status != "ok":
        raise SystemExit(f"run failed: {result.status} {result.reason}\n{result.log_tail}")
    return result.metrics["val_bpb"], result.metrics["heldout_bpb"]


def verdict(settings: GuardSection, floor: list, first: float, reruns: list) -> str:
    guard = Guard(settings, log=lambda line: None)
    guard.start("seed", floor[0][0])
    for job_seed, (val, held) in enumerate(floor):
        guard.record(GuardRun("seed", job_seed, NOISE), "ok", {"val_bpb": val, "heldout_bpb": held})
    guard.queue.clear()
    if not guard.consider("candidate", first):
        return "not a candidate"
    guard.queue.clear()
    for job_seed, (val, held) in enumerate(reruns):
        guard.record(GuardRun("candidate", 100 + job_seed, RERUN), "ok", {"val_bpb": val, "heldout_bpb": held})
    return guard.records["candidate"].verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--improvement", default="BATCH_SIZE=4", help="NAME=VALUE applied to the seed")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    args = parser.parse_args()
    settings = GuardSection()  # the defaults: k=3, n=3, z=1, min_delta=0.002, alpha=0.05
    k, n = settings.noise_runs, settings.reruns

    samples = []
    for seed in range(args.runs):
        samples.append(run(SEED, seed, args.budget, args.data_dir))
        print(f"noise run {seed:2d}: val_bpb {samples[-1][0]:.4f}", flush=True)
    floor, pool = samples[:k], samples[k:]
    vals = [v for v, _ in samples]
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    rng = random.Random(0)
    greedy = sum(v < floor[0][0] for v, _ in pool)
    verdicts = []
    for i, (first, _) in enumerate(pool):
        others = [s for j, s in enumerate(pool) if j != i]
        verdicts.append(verdict(settings, floor, first, rng.sample(others, n)))
    promoted = verdicts.count("promoted")
    print(f"\npure noise: {args.runs} runs of the unchanged seed, val_bpb {mean:.4f} ± {sd:.4f}")
    print(f"  greedy rule (keep if first draw < champion's first draw): keeps {greedy} of {len(pool)}")
    print(f"  evo's gate: promotes {promoted} of {len(pool)}  "
          f"(candidates re-run: {sum(v != 'not a candidate' for v in verdicts)}; verdicts: "
          + ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts))) + ")")

    name, value = args.improvement.split("=")
    better, count = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value}", SEED, count=1, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"no constant {name} in the seed")
    runs = [run(better, 1000 + s, args.budget, args.data_dir) for s in range(1 + n)]
    result = verdict(settings, floor, runs[0][0], runs[1:])
    print(f"\nreal change {args.improvement}: first draw {runs[0][0]:.4f}, re-runs "
          + ", ".join(f"{v:.4f}" for v, _ in runs[1:]) + f" against champion mean "
          f"{sum(v for v, _ in floor) / k:.4f}: {result}")


if __name__ == "__main__":
    main()
