"""A cheap stand-in variant for engine tests: no training, a score that depends on its constants.

It predicts the unigram distribution of the train split, sharpened or flattened by QUALITY
(1.0 is best), so perturbing QUALITY moves val_bpb; NOISE adds seed noise. LEDGER, if set, records each run's start
and end so tests can prove no evaluation ran twice.
"""
import os
import time

import numpy as np
import torch

import prepare

QUALITY = 0.5
NOISE = 0.0  # seed-dependent jitter of QUALITY, so runs on other seeds differ like real ones
SLEEP = 0.2
LEDGER = ""

# The runner runs it in <variant folder>/work, a guard run in <variant folder>/<kind-seed>/work: the
# id is the job's key, "v00003" or "v00003/rerun-1000" (every variant's guard runs share seeds).
folder = os.path.dirname(os.getcwd())
run_id = os.path.basename(folder)
if not run_id.startswith("v"):
    run_id = os.path.basename(os.path.dirname(folder)) + "/" + run_id
if LEDGER:
    with open(LEDGER, "a") as f:
        f.write(f"start {run_id}\n")
time.sleep(SLEEP)
tok = prepare.get_tokenizer()
counts = np.bincount(np.fromfile(os.path.join(prepare.DATA_DIR, "train.bin"), dtype=np.uint16), minlength=tok.vocab_size)
log_freq = torch.tensor(np.log(counts + 1.0), dtype=torch.float32)


class Unigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        jitter = NOISE * torch.randn(()).item()  # prepare seeded torch from EVO_SEED
        self.w = torch.nn.Parameter(log_freq * (QUALITY + jitter))

    def forward(self, idx):
        return self.w.expand(*idx.shape, -1)


print(f"val_bpb: {prepare.evaluate_bpb(Unigram(), tok, 8):.6f}")
if LEDGER:
    with open(LEDGER, "a") as f:
        f.write(f"end {run_id}\n")
