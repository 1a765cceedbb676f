"""A seed's model without its training run: for tests and benchmarks that export or time it.

A seed is a standalone script that imports `prepare` for its settings; its model part (the file
above `# ---- training ----`) is run here against a stand-in `prepare` that carries only the
settings given, so no data directory is needed, and its `make_model` is called.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

SEEDS = Path(__file__).resolve().parent
TRAINING_MARK = "# ---- training ----"


def load_seed_model(name: str, vocab_size: int, seq_len: int, device: str = "cpu", **constants) -> torch.nn.Module:
    """The model of trainer/<name>, with module-level constants replaced as a mutator would."""
    source = (SEEDS / name).read_text().split(TRAINING_MARK)[0]
    for key, value in constants.items():
        source, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", source, count=1, flags=re.MULTILINE)
        if n != 1:
            raise KeyError(f"{name} has no module-level constant {key}")
    stand_in = types.ModuleType("prepare")
    stand_in.__dict__.update(MAX_SEQ_LEN=seq_len, DEVICE=device, TIME_BUDGET=1.0, Tokenizer=None,
                             evaluate_bpb=None, make_dataloader=None, get_tokenizer=None)
    real = sys.modules.get("prepare")
    sys.modules["prepare"] = stand_in
    try:
        namespace: dict = {"__name__": "seed_model"}
        exec(compile(source, name, "exec"), namespace)
    finally:
        if real is None:
            del sys.modules["prepare"]
        else:
            sys.modules["prepare"] = real
    return namespace["make_model"](vocab_size, seq_len)
