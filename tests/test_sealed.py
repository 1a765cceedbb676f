"""The sealed model format: what a variant hands over, and what the evaluator agrees to run."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import sealed

TRAINER = Path(__file__).resolve().parents[1] / "trainer"


def seed_model(name: str, vocab: int = 512, seq_len: int = 64, **constants) -> torch.nn.Module:
    """A seed's GPT class at toy size, without running its training."""
    source = (TRAINER / name).read_text().split("# ---- training ----")[0]
    source = source.replace("import prepare", f"import types\nprepare = types.SimpleNamespace(MAX_SEQ_LEN={seq_len}, DEVICE='cpu')")
    for key, value in constants.items():
        source = re.sub(rf"^{key} = .*$", f"{key} = {value}", source, flags=re.MULTILINE)
    namespace: dict = {}
    exec(compile(source, name, "exec"), namespace)
    model = namespace["GPT"](vocab, namespace["MODEL_DIM"], namespace["DEPTH"], namespace["N_HEAD"], namespace["MLP_RATIO"], seq_len)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


@pytest.mark.parametrize("name, constants", [("train_cpu.py", {}), ("train_gpu.py", {"DEPTH": 2, "HEAD_DIM": 16})])
def test_the_seeds_models_round_trip_with_identical_logits(name, constants):
    model = seed_model(name, **constants)
    blob = io.BytesIO()
    sealed.write_model(model, 4, 64, "cpu", blob)
    loaded = sealed.read_model(blob.getvalue(), "cpu")
    x = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x).float())


def test_a_fresh_evaluator_process_allows_the_operators_the_seeds_use():
    """torch.ops.aten is filled lazily, so the allow-list must not depend on what a process has used.
    (A first version listed dir(torch.ops.aten) and refused rms_norm in a fresh evaluator.)"""
    probe = ("import torch; from trainer import sealed; a = torch.ops.aten\n"
             "print(all(sealed.is_allowed(o) for o in [a.rms_norm.default, a.linear.default, "
             "a.scaled_dot_product_attention.default, a.embedding.default]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr


def test_in_place_activations_are_fine_and_self_modifying_state_is_refused():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.act = torch.nn.Embedding(50, 50), torch.nn.ReLU(inplace=True)

        def forward(self, idx):
            h = self.act(self.embed(idx))
            return h.mul_(2)

    class Counting(InPlace):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx):
            self.calls.add_(1)
            return self.embed(idx) + 0 * self.calls

    model, blob = InPlace().eval(), io.BytesIO()
    sealed.write_model(model, 2, 8, "cpu", blob)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(sealed.read_model(blob.getvalue(), "cpu")(x), model(x))
    with pytest.raises(sealed.ExportError, match="stateless"):
        sealed.write_model(Counting(), 2, 8, "cpu", io.BytesIO())


def test_uninitialised_allocations_come_back_zeroed():
    header = {"batch_size": 1, "seq_len": 4, "tensors": {}, "graph": {
        "nodes": [{"op": "empty.memory_format", "args": [[1, 4, 8]], "kwargs": {"dtype": {"dtype": "float32"}}}],
        "output": {"node": 0}}}
    import json

    text = json.dumps(header).encode()
    model = sealed.read_model(sealed.MAGIC + len(text).to_bytes(8, "little") + text, "cpu")
    for _ in range(3):
        assert not model(torch.zeros(1, 4, dtype=torch.long)).any()
