"""The evo command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = """
import torch, prepare
tok = prepare.get_tokenizer()
model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, tok.vocab_size))
print(f"val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}")
"""


def evo(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "evo.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_eval_prints_the_result_record(small_data, tmp_path):
    variant = tmp_path / "train.py"
    variant.write_text(TINY)
    proc = evo("eval", str(variant), "--data-dir", str(small_data), "--budget", "1", "--seq-len", "32",
               "--eval-tokens", "512", "--json", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["metrics"]["val_bpb"] > 0
    proc = evo("eval", str(variant), "--data-dir", str(small_data), "--seq-len", "32", "--eval-tokens", "512")
    assert proc.returncode == 0 and "status" in proc.stdout and "val_bpb" in proc.stdout


def test_eval_of_a_failing_variant_exits_1_with_the_log_tail(small_data, tmp_path):
    variant = tmp_path / "train.py"
    variant.write_text("raise RuntimeError('deliberate')\n")
    proc = evo("eval", str(variant), "--data-dir", str(small_data))
    assert proc.returncode == 1
    assert "crash" in proc.stdout and "deliberate" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/train.py"], "no such file"),
    (["eval", __file__, "--data-dir", "/nonexistent/data"], "python prepare.py"),
])
def test_eval_bad_input(args, message):
    proc = evo(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_every_command_has_help():
    for command in (["--help"], ["eval", "--help"], ["prepare", "--help"]):
        proc = evo(*command)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower()
