"""Does a population find better train.py files than the alternatives, for the same evaluations?

    python benchmarks/search_quality.py [--evaluations 20] [--budget 10] [--repeats 2] [--first-repeat 0] [--reruns 5]
                                        [--gain 0.02] [--methods greedy random optuna evo] [--data-dir DIR]
                                        [--keep DIR]

On the CPU seed, with the same offline operators (perturb, optuna, crossover) and the real runner
(sealed evaluator, sandbox where available), each method gets `--evaluations` evaluations:
  greedy  autoresearch's rule: propose from the current best, keep the child if it is better;
  random  best of N proposals, each from the seed;
  optuna  Optuna TPE alone on the seed's constants;
  evo     the engine with configs/default.yaml's operators, population and guard (guard re-runs
          are extra runs, counted and shown).
For each method and repeat: the final champion's true quality (the mean of `--reruns` fresh runs
with new seeds, on val and on held-out), the evaluations it took to first reach `--gain` below
the seed's val_bpb, and the share of evaluations wasted (duplicates, failures, timeouts).
The table goes to stdout in Markdown, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
from evo.config import load_config  # noqa: E402
from evo.population import normalized_hash  # noqa: E402
from evo.runs import start_run  # noqa: E402
from evo.store import RunStore  # noqa: E402
from mutators.base import Parent, Refusal  # noqa: E402
from mutators.constants import PerturbConstants  # noqa: E402
from mutators.crossover import Crossover  # noqa: E402
from mutators.optuna_op import OptunaProposals  # noqa: E402
from trainer.evaluator import Evaluator  # noqa: E402
from trainer.runner import RunSettings, run_variant, use_sandbox  # noqa: E402

SEED_FILE = ROOT / "trainer" / "train_cpu.py"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
DEFAULT = load_config(DEFAULT_CONFIG)
RERUN_SEEDS = 5000  # fresh seeds for the final re-runs, never used during a search


class Evaluations:
    """The real runner with one warm evaluator; records every evaluation in order. Every search
    evaluation uses the repeat's one seed, as evo's first draws do, so in each repeat all methods
    compare their variants on the same seed (greedy's line always did: it runs on one seed)."""

    def __init__(self, args, folder: Path, evaluation_seed: int):
        self.args, self.folder, self.evaluation_seed = args, folder, evaluation_seed
        self.sandboxed = use_sandbox("auto")
        self.evaluator = Evaluator("cpu", None, None, self.sandboxed, folder / "evaluator.log")
        self.history: list[tuple[str, float | None]] = []  # (status, val_bpb)
        self.count = 0

    def run(self, code: str, seed: int | None = None, heldout: bool = False, record: bool = True):
        self.count += 1
        seed = self.evaluation_seed if seed is None else seed
        settings = RunSettings(time_budget=self.args.budget, seed=seed, data_dir=self.args.data_dir,
                               heldout=heldout, seq_len=prepare.DEFAULT_SEQ_LEN, eval_tokens=16384,
                               startup_grace=30.0, eval_grace=60.0, sandbox="bubblewrap" if self.sandboxed else "none")
        result = run_variant(code, settings, self.folder / f"e{self.count:05d}", evaluator=self.evaluator)
        if record:
            self.history.append((result.status, result.val_bpb))
        return result

    def close(self):
        self.evaluator.close()


def _offline_operators(folder: Path, seed: int):
    """The operators evo's default config uses, built the same way. Greedy and random never pass a
    parent's winning step, a child's losing one or the run's move counts, so perturb's pattern
    move, opposite probe and least-moved-first draw are evo's alone: they are the run's memory."""
    m = DEFAULT.mutators
    return {"perturb": PerturbConstants(m.perturb.max_changes),
            "optuna": OptunaProposals(folder / "optuna.journal", m.optuna.sampler, seed=seed, max_changes=m.optuna.max_changes),
            "crossover": Crossover(m.crossover.max_taken)}


def _search(method: str, evals: Evaluations, n: int, rng: random.Random, folder: Path) -> tuple[str, dict]:
    """A baseline's loop; returns the champion's code and its waste counts."""
    seed_code = SEED_FILE.read_text()
    seed_val = evals.run(seed_code).val_bpb
    ops = _offline_operators(folder, rng.getrandbits(32))
    best_code, best_val, earlier = seed_code, seed_val, [seed_code]
    seen, waste = {normalized_hash(seed_code)}, {"duplicates": 0, "refused": 0, "failed": 0}
    weights = {name: w for name, w in DEFAULT.operators.items() if name in ops and w > 0}  # the same mix as evo
    while len(evals.history) < n:
        name = "optuna" if method == "optuna" else rng.choices(list(weights), list(weights.values()))[0]
        base = best_code if method == "greedy" else seed_code
        parents = [Parent("a", base, best_val if method == "greedy" else seed_val)]
        if name == "crossover":
            others = [c for c in earlier if c != base]
            if not others:
                continue
            parents.append(Parent("b", rng.choice(others), None))
        proposal = ops[name].propose(parents, random.Random(rng.getrandbits(64)))
        if isinstance(proposal, Refusal):
            waste["refused"] += 1
            continue
        if normalized_hash(proposal.code) in seen:
            waste["duplicates"] += 1
            if hasattr(ops[name], "feedback"):
                ops[name].feedback(proposal.details, None, evaluated=False)
            continue
        seen.add(normalized_hash(proposal.code))
        result = evals.run(proposal.code)
        if hasattr(ops[name], "feedback"):
            ops[name].feedback(proposal.details, result.val_bpb, evaluated=True)
        if result.status != "ok":
            waste["failed"] += 1
            continue
        earlier.append(proposal.code)
        if result.val_bpb < best_val:
            best_code, best_val = proposal.code, result.val_bpb
    return best_code, waste


def _evo(evals: Evaluations, n: int, seed: int, folder: Path) -> tuple[str, dict]:
    config = load_config(DEFAULT_CONFIG, [
        f"run.dir={folder}", "run.name=evo", f"seed={seed}", f"data.dir={evals.args.data_dir}",
        f"budget.seconds={evals.args.budget}", f"stopping.max_evaluations={n}", "stopping.max_hours=null",
        "data.eval_tokens=16384"])
    engine = start_run(config, DEFAULT_CONFIG, log=lambda line: None)
    engine.run()
    individuals, state = RunStore(engine.store.dir).load()
    for i in sorted(individuals, key=lambda i: i.birth):
        evals.history.append((i.status, i.val_bpb))
    c = state["counters"]
    champion = state["guard"]["champions"][-1] if state["guard"]["champions"] else engine.population.best().id
    waste = {"duplicates": c["duplicates"], "refused": sum(sum(r.values()) for r in c["refusals"].values()),
             "failed": sum(v for k, v in c["by_status"].items() if k != "ok"), "guard_runs": c["guard_runs"]}
    return engine.store.code(champion), waste


def _first_reaching(history, level: float | None) -> int | None:
    """The 1-based evaluation at which the best first draw so far is at or below `level`."""
    best = float("inf")
    for index, (status, value) in enumerate(history, start=1):
        if status == "ok" and value is not None:
            best = min(best, value)
            if level is not None and best <= level:
                return index
    return None


def _best_first_draw(history) -> float | None:
    values = [value for status, value in history if status == "ok" and value is not None]
    return min(values) if values else None


def _mean(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.fmean(values) if values else float("nan")


def _run_method(method: str, repeat: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.keep:  # every method's evaluations (evo's whole run directory) stay for a look afterwards
            folder = Path(args.keep) / f"{method}-{repeat}"
            folder.mkdir(parents=True, exist_ok=False)
        evals = Evaluations(args, folder, evaluation_seed=repeat)
        try:
            rng = random.Random(1000 * repeat + 7)
            if method == "evo":
                code, waste = _evo(evals, args.evaluations, evals.evaluation_seed, folder)
            else:
                code, waste = _search(method, evals, args.evaluations, rng, folder)
            reruns = [evals.run(code, seed=RERUN_SEEDS + k, heldout=True, record=False)
                      for k in range(args.reruns)]
        finally:
            evals.close()
    ok = [r for r in reruns if r.status == "ok"]
    history = evals.history
    failed = sum(status != "ok" for status, _ in history)
    return {
        "method": method, "repeat": repeat, "history": history, "evaluations": len(history),
        "guard_runs": waste.get("guard_runs", 0),
        "val": _mean([r.val_bpb for r in ok]), "val_sd": statistics.stdev([r.val_bpb for r in ok]) if len(ok) > 1 else 0.0,
        "heldout": _mean([r.metrics["heldout_bpb"] for r in ok]),
        "reached": _first_reaching(history, history[0][1] - args.gain if history and history[0][1] else None),
        "wasted": (waste["duplicates"] + failed) / max(1, len(history) + waste["duplicates"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--budget", type=float, default=10.0, help="training seconds per evaluation")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="repeat r seeds every method's proposals and evaluations with r, so a run of repeats 0-3 "
                             "replays the same proposal streams as the last; start elsewhere for new ones")
    parser.add_argument("--reruns", type=int, default=5, help="fresh runs of each final champion")
    parser.add_argument("--gain", type=float, default=0.02, help="val_bpb below the seed's first draw to reach")
    parser.add_argument("--methods", nargs="+", default=["greedy", "random", "optuna", "evo"])
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    parser.add_argument("--keep", help="keep each method's folder under this directory (evo's is a run directory)")
    args = parser.parse_args()
    prepare.verify(args.data_dir)
    rows = []
    for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
        greedy_final = None  # greedy's best first draw after all its evaluations, in this repeat
        for method in args.methods:
            row = _run_method(method, repeat, args)
            if method == "greedy":
                greedy_final = _best_first_draw(row["history"])
            row["to_greedy"] = _first_reaching(row["history"], greedy_final)
            rows.append(row)
            print(f"# {method} repeat {repeat}: champion re-run val {row['val']:.4f} held-out {row['heldout']:.4f}, "
                  f"gain {args.gain} reached at {row['reached']}, greedy's final first draw reached at "
                  f"{row['to_greedy']}, wasted {row['wasted']:.0%}, guard re-runs {row['guard_runs']}", flush=True)
    print(f"\nCPU seed, {args.budget:g} s per evaluation, {args.evaluations} evaluations per method, "
          f"{args.reruns} fresh re-runs of each champion (val, and held-out)\n")
    print("| method | repeat | evaluations | guard re-runs | champion val (re-run mean ± sd) | champion held-out | "
          f"evaluations to -{args.gain} | evaluations to greedy's final | wasted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['repeat']} | {r['evaluations']} | {r['guard_runs']} | {r['val']:.4f} ± {r['val_sd']:.4f} | "
              f"{r['heldout']:.4f} | {r['reached'] or 'not reached'} | {r['to_greedy'] or 'not reached'} | {r['wasted']:.0%} |")
    print("\nMeans over repeats (\"not reached\" counts as evaluations + 1):\n")
    print("| method | champion val | champion held-out | evaluations to gain | evaluations to greedy's final | wasted | runs incl. guard |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        late = args.evaluations + 1
        print(f"| {method} | {_mean(r['val'] for r in mine):.4f} | {_mean(r['heldout'] for r in mine):.4f} | "
              f"{_mean(r['reached'] or late for r in mine):.1f} | {_mean(r['to_greedy'] or late for r in mine):.1f} | "
              f"{_mean(r['wasted'] for r in mine):.0%} | {_mean(r['evaluations'] + r['guard_runs'] for r in mine):.1f} |")
    _print_against_greedy(rows, args.methods)


def _print_against_greedy(rows: list[dict], methods: list[str]) -> None:
    """Each method's champion minus greedy's, repeat by repeat (they share the repeat's seed): how
    far apart the methods are, and whether the repeats can tell."""
    greedy = {r["repeat"]: r["val"] for r in rows if r["method"] == "greedy"}
    others = [m for m in methods if m != "greedy"]
    if not greedy or not others:
        return
    print("\nChampion val minus greedy's, repeat by repeat (negative: better than greedy):\n")
    for method in others:
        differences = [r["val"] - greedy[r["repeat"]] for r in rows if r["method"] == method and r["repeat"] in greedy]
        differences = [d for d in differences if not math.isnan(d)]  # a champion whose fresh re-runs all failed
        if not differences:
            continue
        spread = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
        wins = sum(d < 0 for d in differences)
        print(f"- {method}: {', '.join(f'{d:+.4f}' for d in differences)}; mean {statistics.fmean(differences):+.4f} "
              f"± {spread:.4f} (standard error), better in {wins} of {len(differences)}")


if __name__ == "__main__":
    main()
