"""Checkpoint write and resume time, file size and memory for growing populations.

    python benchmarks/checkpoint_scale.py [--sizes 100 1000 10000] [--code-kb 20]

Each individual carries about 20 KB of code: the CPU seed padded with a comment block, with
its constants perturbed, so the codes are as alike (and as compressible) as real variants.
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
import sys
from benchmarks.checkpoint_scale import rss_mb
from evo.store import RunStore
import evo.engine  # what a resuming engine imports (torch included), before the population
before = rss_mb()
individuals, state = RunStore(sys.argv[1]).load()
print(f"{rss_mb() - before:.0f}")
"""


def resume_memory_mb(run_dir: str) -> float:
    """Memory a fresh engine process gains by loading the checkpoint."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", RESUME_MEMORY, run_dir], capture_output=True, text=True,
                         check=True, cwd=root)
    return float(out.stdout.strip())


def make_population(n: int, code_kb: int, rng: random.Random) -> list[Individual]:
    padding = "".join(f"# note {i}: {'x' * 60}\n" for i in range(max(0, code_kb * 1024 - len(SEED)) // 72))
    base = SEED + padding
    operator = PerturbConstants()
    codes = [base]
    for _ in range(min(n, 200) - 1):  # 200 distinct variants, reused: realistic and quick to build
        child = operator.propose([Parent("p", rng.choice(codes), None)], rng)
        codes.append(getattr(child, "code", base))
    return [
        Individual(id=f"v{i:05d}", birth=i, island=i % 4, code=codes[i % len(codes)] + f"# {i}\n",
                   code_hash=normalized_hash(codes[i % len(codes)]), operator="perturb",
                   parents=[f"v{max(i - 1, 0):05d}"], status="ok", val_bpb=2.0 + rng.random(),
                   metrics='{"val_bpb": 2.1, "eval_tokens": 32768}', created_at=time.time())
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--code-kb", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    state = {"counters": {"births": 0}, "rng": list(range(625)), "migrants": [[], [], [], []]}
    print(f"{'individuals':>11} {'code MB':>8} {'write s':>8} {'resume s':>9} {'file MB':>8} {'resume RSS MB':>14}")
    for n in args.sizes:
        gc.collect()
        individuals = make_population(n, args.code_kb, rng)
        code_mb = sum(len(i.code) for i in individuals) / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            store = RunStore(tmp)
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
            memory = resume_memory_mb(tmp)
        print(f"{n:>11,} {code_mb:>8.1f} {statistics.median(writes):>8.2f} {statistics.median(loads):>9.2f} "
              f"{size:>8.2f} {memory:>14.0f}")
        del individuals
    print("\nresume RSS: what a fresh engine process gains by loading the checkpoint")


if __name__ == "__main__":
    main()
