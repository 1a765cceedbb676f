"""Sealed evaluation on a GPU: what it costs and whether it holds, for the GPU seed.

    python benchmarks/gpu_sealing.py --data-dir DIR [--budget 20]
    (prepare DIR first with: evo prepare --vocab-size 8192 --data-dir DIR)

1. The GPU seed's model (random weights), exported under bf16 autocast and read back by the
   sealed reader: largest logit difference to eager, forward time of both, export and load time,
   and the causality probe on it (a bf16 model must not trip it).
2. The GPU seed through the runner, sandboxed where bubblewrap works: sealed, in_process, sealed
   again (warm evaluator), with the runner's phases.
3. A non-causal model on the GPU must come back tampered.
"""

import argparse
import io
import json
import random
import re
import time
from pathlib import Path

import torch

import prepare
from trainer import sandbox, sealed
from trainer.evaluator import Evaluator
from trainer.runner import RunSettings, run_variant
from trainer.seed_model import load_seed_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data-dir", default=prepare.DATA_DIR)
parser.add_argument("--budget", type=float, default=20.0)
args = parser.parse_args()
DATA = str(Path(args.data_dir).resolve())
ROOT = Path(__file__).resolve().parents[1]
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
print("sandbox:", sandbox.probe() or "bubblewrap works", flush=True)

# ---- 1. round trip of the GPU seed's model ----
model = load_seed_model("train_gpu.py", 8192, 2048, "cuda")
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.eval()
x = torch.randint(0, 8192, (32, 2048), device="cuda")
buf = io.BytesIO()
t = time.perf_counter()
header = sealed.write_model(model, 32, 2048, "cuda", buf)
torch.cuda.synchronize()
export_s = time.perf_counter() - t
t = time.perf_counter()
loaded = sealed.read_model(bytearray(buf.getvalue()), "cuda")
torch.cuda.synchronize()
load_s = time.perf_counter() - t
with torch.no_grad():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x).float()
    got = loaded(x)
    for _ in range(3):
        loaded(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        loaded(x)
    torch.cuda.synchronize()
    sealed_fwd = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    torch.cuda.synchronize()
    eager_fwd = (time.perf_counter() - t) / 5
ops = sorted({n["op"] for n in header["graph"]["nodes"]} | {m["op"] for n in header["graph"]["nodes"] if "graph" in n for m in n["graph"]["nodes"]})
print(json.dumps({"export_s": round(export_s, 2), "file_mb": round(len(buf.getvalue()) / 2**20, 1), "load_s": round(load_s, 2),
                  "max_abs_logit_diff_vs_eager": (got - eager).abs().max().item(), "sealed_forward_ms": round(1000 * sealed_fwd, 1),
                  "eager_forward_ms": round(1000 * eager_fwd, 1), "ops": ops}), flush=True)
tok = prepare.get_tokenizer(DATA)
rows = prepare.eval_rows(prepare._tokens("val", DATA), 10_485_760, 2048)
t = time.perf_counter()
with torch.no_grad():
    scored = prepare.score_rows(loaded, rows, 32, tok.token_bytes, tok.vocab_size, "cuda", prepare._tokens("train", DATA), random.Random(1))
torch.cuda.synchronize()
print("probe on bf16 GPU model:", json.dumps({**scored, "seconds": round(time.perf_counter() - t, 2), "rows": rows.shape[0]}), flush=True)
del model, loaded
torch.cuda.empty_cache()

# ---- 2. the GPU seed through the runner ----
code = (ROOT / "trainer" / "train_gpu.py").read_text()
budget = args.budget
mode_sandbox = "auto"
rows_out = []
evaluator = Evaluator("cuda", gpu=0, threads=8, sandboxed=sandbox.probe() is None)
try:
    for i, mode in enumerate(["sealed", "in_process", "sealed"]):
        settings = RunSettings(time_budget=budget, seed=i, data_dir=DATA, device="cuda", gpu=0, threads=8, seq_len=2048,
                               eval_tokens=10_485_760, startup_grace=240, eval_grace=240, evaluation=mode, sandbox=mode_sandbox)
        t = time.perf_counter()
        r = run_variant(code, settings, evaluator=evaluator if mode == "sealed" else None)
        own = dict(re.findall(r"^(\w+):\s+(\S+)$", r.log_tail, re.MULTILINE))
        row = {"mode": mode, "status": r.status, "reason": r.reason[:300], "sandbox": r.sandbox, "wall_s": r.wall_seconds,
               "runner_train_s": r.train_seconds, "variant_train_s": own.get("training_seconds"), "steps": own.get("num_steps"),
               "val_bpb": r.val_bpb, "load_s": r.metrics.get("load_seconds"), "eval_s": r.metrics.get("eval_seconds"),
               "probed_rows": r.metrics.get("probed_rows"), "peak_mb": r.peak_memory_mb}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if r.status != "ok":
            print(r.log_tail[-3000:], flush=True)

    # ---- 3. a non-causal model on the GPU ----
    peek = """
import torch, prepare
tok = prepare.get_tokenizer()
class Peek(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(tok.vocab_size, 64)
        self.h = torch.nn.Linear(64, tok.vocab_size)
    def forward(self, idx):
        return self.h(self.e(torch.roll(idx, -1, dims=1)))
print(prepare.evaluate_bpb(Peek().to("cuda"), tok, 32))
"""
    r = run_variant(peek, RunSettings(time_budget=5, data_dir=DATA, device="cuda", gpu=0, seq_len=2048, eval_tokens=262144,
                                      startup_grace=120, eval_grace=120), evaluator=evaluator)
    print(json.dumps({"peek_status": r.status, "reason": r.reason[:200]}), flush=True)
finally:
    evaluator.close()
