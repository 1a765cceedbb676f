"""The seed variants train for real through the runner (slow: each is a real training run)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import prepare
from trainer.runner import RunSettings, run_variant

TRAINER = Path(__file__).resolve().parents[1] / "trainer"


def untrained_bpb(data_dir) -> float:
    """A model that knows nothing spreads probability evenly: log2(V) bits per token."""
    meta = prepare.read_meta(str(data_dir))
    val = meta["splits"]["val"]
    return math.log2(meta["vocab_size"]) * val["tokens"] / val["bytes"]


@pytest.mark.slow
def test_cpu_seed_learns_in_30_seconds(default_data):
    code = (TRAINER / "train_cpu.py").read_text()
    result = run_variant(code, RunSettings(time_budget=30, data_dir=str(default_data), seed=1))
    assert result.status == "ok", result.log_tail
    # About 2.3-2.5 against an untrained 3.7 on an idle machine; a busy one takes fewer steps in the
    # 30 s, so the bound only asks for clear learning (3.0 was seen with CI and another run beside it).
    assert result.val_bpb < 0.9 * untrained_bpb(default_data)
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", result.log_tail, re.MULTILINE))
    assert float(summary["training_seconds"]) >= 30
    assert int(summary["num_steps"]) > 10
    assert {"total_seconds", "peak_memory_mb", "total_tokens_M", "num_params_M"} <= set(summary)


@pytest.mark.slow
def test_gpu_seed_runs_end_to_end_on_cpu_at_toy_size(small_data):
    """The GPU seed's code path without CUDA: same file, constants shrunk as a mutator would."""
    code = (TRAINER / "train_gpu.py").read_text()
    for name, value in {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 4,
                        "TOTAL_BATCH_TOKENS": 256, "UNTIMED_STEPS": 1}.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, count=1, flags=re.MULTILINE)
        assert n == 1, name
    result = run_variant(code, RunSettings(time_budget=4, data_dir=str(small_data), seq_len=32, eval_tokens=1024))
    assert result.status == "ok", result.log_tail
    assert "tokens_per_sec:" in result.log_tail and result.val_bpb < untrained_bpb(small_data)


@pytest.mark.slow
def test_cpu_seed_runs_at_the_narrowest_width_its_constants_reach(small_data):
    """DEPTH 1 at ASPECT_RATIO 24 with HEAD_DIM 32 is 32 channels wide, fewer than the value gate's
    largest choice (64): a child evolution reached in run 10 of the benchmark, which crashed until
    the gate learned to read at most the model's width."""
    code = (TRAINER / "train_cpu.py").read_text()
    for name, value in {"DEPTH": 1, "ASPECT_RATIO": 24, "HEAD_DIM": 32, "VALUE_GATE_CHANNELS": 64}.items():
        code, n = re.subn(rf"^{name} = \S+", f"{name} = {value}", code, count=1, flags=re.MULTILINE)
        assert n == 1, name
    result = run_variant(code, RunSettings(time_budget=3, data_dir=str(small_data), seq_len=32, eval_tokens=1024))
    assert result.status == "ok", result.log_tail
    assert result.val_bpb < untrained_bpb(small_data)
