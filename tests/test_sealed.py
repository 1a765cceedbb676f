"""The sealed model format: what a variant hands over, and what the evaluator agrees to run."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import pytest
import torch

import prepare
from trainer import sealed
from trainer.seed_model import load_seed_model


def seed_model(name: str, vocab: int = 512, seq_len: int = 64, **constants) -> torch.nn.Module:
    """A seed's model at toy size, without running its training, its weights all made non-zero."""
    model = load_seed_model(name, vocab, seq_len, **constants)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


@pytest.mark.parametrize("name, constants", [("train_cpu.py", {}), ("train_gpu.py", {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32})])
def test_the_seeds_models_round_trip_with_identical_logits(name, constants):
    model = seed_model(name, **constants)
    blob = io.BytesIO()
    sealed.write_model(model, 4, 64, "cpu", blob)
    loaded = sealed.read_model(blob.getvalue(), "cpu")
    x = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x).float())


@pytest.mark.parametrize("name", ["train_cpu.py", "train_gpu.py"])
def test_the_seeds_sliding_windows_survive_the_hand_over_and_stay_causal(name):
    """A short window hides what lies further back, in the sealed graph too, and the probe finds nothing."""
    model = seed_model(name, DEPTH=1, ASPECT_RATIO=32, HEAD_DIM=32)
    model.windows = [8]  # the one layer sees itself and the 8 tokens before it
    blob = io.BytesIO()
    sealed.write_model(model, 2, 64, "cpu", blob)
    loaded = sealed.read_model(blob.getvalue(), "cpu")
    x = torch.randint(0, 512, (2, 64))
    changed = x.clone()
    changed[:, 10] = (x[:, 10] + 1) % 512
    with torch.no_grad():
        before, after = loaded(x), loaded(changed)
    moved = (before - after).abs().amax(dim=(0, 2))
    assert moved[:10].max() == 0  # causal: earlier positions never move
    assert moved[10:19].min() > 0  # positions 10..18 have token 10 in their window
    assert moved[19:].max() == 0  # later ones do not, with one layer there is no other path
    rows = torch.randint(0, 512, (8, 65))
    donors = torch.randint(0, 512, (4096,)).numpy()
    with torch.no_grad():
        scored = prepare.score_rows(loaded, rows, 2, torch.ones(512, dtype=torch.long), 512, "cpu", donors, random.Random(0))
    assert scored["probed_rows"] >= 63


def test_a_fresh_evaluator_process_allows_the_operators_the_seeds_use():
    """torch.ops.aten is filled lazily, so the allow-list must not depend on what a process has used.
    (A first version listed dir(torch.ops.aten) and refused rms_norm in a fresh evaluator.)"""
    probe = ("import torch; from trainer import sealed; a = torch.ops.aten\n"
             "print(all(sealed.is_allowed(o) for o in [a.rms_norm.default, a.linear.default, "
             "a.scaled_dot_product_attention.default, a.embedding.default, a.arange.start_step, "
             "a.logical_and.default, a.sigmoid.default]))")
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
