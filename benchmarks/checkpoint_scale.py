"""Checkpoint write and resume time, file size and memory for growing populations.

    python benchmarks/checkpoint_scale.py [--sizes 100 1000 10000] [--code-kb 20]

Each individual carries about 20 KB of code: the CPU seed padded with a comment block, with
its constants perturbed, so the codes are as alike as real variants. The code is written to
variants/<id>/train.py as the engine does at birth; the checkpoint holds the records.

Memory is measured in a fresh process that resumes the checkpoint and then does what the
engine does with code for 2,000 breeding rounds: a tournament parent per island plus a random
other individual (a relative for an LLM prompt, a guard re-run), each read through the store.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evo.population import Individual, normalized_hash
from evo.store import RunStore
from mutators.base import Parent
from mutators.constants import PerturbConstants

SEED = (Path(__file__).resolve().parents[1] / "trainer" / "train_cpu.py").read_text()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


RESUME_MEMORY = """
import random, sys, tempfile
from benchmarks.checkpoint_scale import rss_mb
from evo.population import Population
from evo.store import RunStore
import evo.engine  # what a resuming engine imports (torch included), before the population
with tempfile.TemporaryDirectory() as empty:  # pyarrow's first read sets up pools: not the population's
    RunStore(empty).save([], {})
    RunStore(empty).load()
before = rss_mb()
store = RunStore(sys.argv[1])
individuals, state = store.load()
population = Population(islands=4, size=16)
for individual in individuals:
    population.add(individual)
loaded = rss_mb() - before
rng = random.Random(0)
for _ in range(2000):
    for island in range(4):
        parent = population.tournament(island, 3, rng)
        store.code(parent.id, parent.code_hash)
    other = rng.choice(individuals)
    store.code(other.id, other.code_hash)
print(f"{loaded:.0f} {rss_mb() - before:.0f} {store.cached_codes()}")
"""


def resume_memory_mb(run_dir: str) -> tuple[float, float, int]:
    """Memory a fresh engine process gains by loading the checkpoint, then after breeding rounds."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", RESUME_MEMORY, run_dir], capture_output=True, text=True,
                         check=True, cwd=root)
    loaded, working, cached = out.stdout.split()
    return float(loaded), float(working), int(cached)


def make_population(n: int, code_kb: int, rng: random.Random, store: RunStore) -> list[Individual]:
    padding = "".join(f"# note {i}: {'x' * 60}\n" for i in range(max(0, code_kb * 1024 - len(SEED)) // 72))
    base = SEED + padding
    operator = PerturbConstants()
    codes = [base]
    for _ in range(min(n, 200) - 1):  # 200 distinct variants, reused: realistic and quick to build
        child = operator.propose([Parent("p", rng.choice(codes), None)], rng)
        codes.append(getattr(child, "code", base))
    hashes = [normalized_hash(code) for code in codes]
    individuals = []
    for i in range(n):
        individual = Individual(
            id=f"v{i:05d}", birth=i, island=i % 4, code_hash=hashes[i % len(codes)], operator="perturb",
            parents=[f"v{max(i - 1, 0):05d}"], status="ok", val_bpb=2.0 + rng.random(),
            metrics='{"val_bpb": 2.1, "eval_tokens": 32768}', created_at=time.time())
        store.write_code(individual.id, codes[i % len(codes)] + f"# {i}\n")
        individuals.append(individual)
    return individuals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--code-kb", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    state = {"counters": {"births": 0}, "rng": list(range(625)), "migrants": [[], [], [], []]}
    print(f"{'individuals':>11} {'code MB':>8} {'write s':>8} {'resume s':>9} {'file MB':>8} "
          f"{'RSS loaded MB':>14} {'RSS working MB':>15} {'codes cached':>13}")
    for n in args.sizes:
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            store = RunStore(tmp)
            individuals = make_population(n, args.code_kb, rng, store)
            code_mb = sum(f.stat().st_size for f in Path(tmp).glob("variants/*/train.py")) / 2**20
            writes, loads = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                store.save(individuals, state)
                writes.append(time.perf_counter() - t)
                t = time.perf_counter()
                loaded, _ = store.load()
                loads.append(time.perf_counter() - t)
                assert len(loaded) == n
                del loaded
            size = (Path(tmp) / "population.parquet").stat().st_size / 2**20
            loaded, working, cached = resume_memory_mb(tmp)
        print(f"{n:>11,} {code_mb:>8.1f} {statistics.median(writes):>8.2f} {statistics.median(loads):>9.2f} "
              f"{size:>8.2f} {loaded:>14.0f} {working:>15.0f} {cached:>13}")
        del individuals
    print("\nRSS: what a fresh engine process gains by loading the checkpoint (loaded), and after 2,000\n"
          "breeding rounds that read parents' and others' code through the store (working).")


if __name__ == "__main__":
    main()
