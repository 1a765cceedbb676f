"""How busy the asynchronous scheduler keeps its workers.

    python benchmarks/scheduler_busy.py [--workers 1 2 4 8] [--per-worker 4]

Each worker runs a cheap stand-in variant that sleeps a random 1-5 s and then reports through
prepare's real metrics channel (evaluate_bpb). A worker's busy fraction is the time it had a
variant running over the span from its first start to its last finish: the gaps are what the
engine spends between one result and the next start (recording, checkpointing, breeding).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import prepare
from evo.config import Config
from evo.runs import start_run
from evo.store import RunStore

STANDIN = '''
import random, time
import torch
import prepare

SLEEP_SCALE = 1.0
time.sleep(random.Random().uniform(1.0, 5.0) * SLEEP_SCALE)
tok = prepare.get_tokenizer()
model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, tok.vocab_size))
print(f"val_bpb: {prepare.evaluate_bpb(model, tok, 4):.6f}")
'''


def busy_fractions(run_dir: Path) -> dict[str, float]:
    runs = defaultdict(list)
    individuals, _ = RunStore(run_dir).load()
    for individual in individuals:
        runs[individual.device].append((individual.created_at, individual.finished_at))
    fractions = {}
    for device, spans in runs.items():
        busy = sum(end - start for start, end in spans)
        fractions[device] = busy / (max(end for _, end in spans) - min(start for start, _ in spans))
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--per-worker", type=int, default=4, help="evaluations per worker")
    parser.add_argument("--data-dir", default=prepare.DATA_DIR)
    args = parser.parse_args()
    print(f"{'W':>3} {'evaluations':>12} {'min busy':>9} {'mean busy':>10}  per worker")
    with tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "standin.py"
        seed.write_text(STANDIN)
        for index, w in enumerate(args.workers):
            config = Config.model_validate({
                "run": {"name": f"w{w}-{index}", "dir": tmp}, "seed_file": str(seed),
                "data": {"dir": args.data_dir, "seq_len": 32, "eval_tokens": 256},
                "budget": {"seconds": 1, "startup_grace": 120},
                "stopping": {"max_evaluations": w * args.per_worker},
                "workers": {"count": w, "device": "cpu", "threads_per_worker": 1},
                "population": {"size": 64, "islands": 1},
                # Guard re-runs are not individuals, so their time would read as idle here.
                "guard": {"enabled": False},
            })
            engine = start_run(config, None, log=lambda line: None)
            engine.run()
            fractions = busy_fractions(engine.store.dir)
            values = list(fractions.values())
            detail = " ".join(f"{v:.3f}" for _, v in sorted(fractions.items()))
            print(f"{w:>3} {engine.counters.evaluations:>12} {min(values):>9.3f} {sum(values) / len(values):>10.3f}  {detail}",
                  flush=True)


if __name__ == "__main__":
    main()
