"""The runner: one variant, one isolated child process, one plain result record."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.procs import alive, run_processes
from trainer import processes
from trainer.runner import PrepareChanged, RunSettings, run_variant

# A variant that trains nothing: a bigram table, scored by the real evaluate_bpb.
TINY_MODEL = """
import torch, prepare
tok = prepare.get_tokenizer()
class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(tok.vocab_size, tok.vocab_size)
    def forward(self, idx):
        return self.table(idx)
model = Bigram()
"""


def settings(data_dir, **overrides) -> RunSettings:
    base = dict(time_budget=1.0, data_dir=str(data_dir), seq_len=32, eval_tokens=1024,
                startup_grace=30.0, eval_grace=30.0)
    return RunSettings(**{**base, **overrides})


def test_ok_run_records_metrics_log_and_files(small_data, tmp_path):
    code = TINY_MODEL + "print(f'val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}')\n"
    result = run_variant(code, settings(small_data), run_dir=tmp_path / "v1")
    assert result.status == "ok", result.log_tail
    assert result.val_bpb == pytest.approx(result.printed_val_bpb, abs=1e-6)
    assert result.metrics["eval_tokens"] > 900 and result.metrics["seq_len"] == 32
    assert result.wall_seconds > 0 and result.peak_memory_mb > 50
    assert "val_bpb:" in result.log_tail
    for name in ("train.py", "log.txt", "metrics.json", "result.json"):
        assert (tmp_path / "v1" / name).is_file()
    assert json.loads((tmp_path / "v1" / "result.json").read_text())["status"] == "ok"


def test_printed_val_bpb_that_disagrees_is_tampered(small_data):
    code = TINY_MODEL + "prepare.evaluate_bpb(model, tok, 8)\nprint('val_bpb: 0.123456')\n"
    result = run_variant(code, settings(small_data))
    assert result.status == "tampered" and "printed val_bpb 0.123456" in result.reason


def test_non_causal_model_is_tampered(small_data):
    code = TINY_MODEL + textwrap.dedent("""
        class Peek(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.table = torch.nn.Embedding(tok.vocab_size, tok.vocab_size)
            def forward(self, idx):
                return self.table(torch.roll(idx, -1, dims=1))
        prepare.evaluate_bpb(Peek(), tok, 8)
    """)
    result = run_variant(code, settings(small_data))
    assert result.status == "tampered" and "non-causal" in result.reason


@pytest.mark.parametrize(
    "code, status, reason",
    [
        ("def f(:\n", "syntax", "line 1"),
        ("import numpy_that_does_not_exist\n", "import", "ModuleNotFoundError"),
        ("raise ValueError('boom')\n", "crash", "ValueError"),
        ("import sys\nprint('FAIL: loss nan at step 3')\nsys.exit(1)\n", "nan", "NaN"),
        ("print('trained, but forgot to evaluate')\n", "no_metrics", "without prepare.evaluate_bpb"),
        ("open('/x/heldout.bin')\n", "tampered", "held-out"),
    ],
)
def test_failures_are_statuses_not_exceptions(small_data, code, status, reason):
    result = run_variant(code, settings(small_data))
    assert result.status == status
    assert reason in result.reason


@pytest.mark.parametrize("vandalism", ["open(__file__, 'w').write('X = 1\\n')", "import os; os.remove(__file__)"])
def test_a_variant_that_rewrites_its_own_code_is_tampered_and_the_code_restored(small_data, tmp_path, vandalism):
    """The engine keeps each variant's code in its train.py, so the file must outlive the run."""
    code = TINY_MODEL + vandalism + "\nprint(f'val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}')\n"
    result = run_variant(code, settings(small_data), run_dir=tmp_path / "v")
    assert result.status == "tampered" and "its own train.py" in result.reason
    assert (tmp_path / "v" / "train.py").read_text() == code


def test_precheck_refusal_runs_nothing(small_data, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nopen('prepare.py', 'w')\n"
    result = run_variant(code, settings(small_data), run_dir=tmp_path / "v")
    assert result.status == "tampered" and result.returncode is None
    assert not marker.exists()


def test_secrets_never_reach_the_variant(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    code = "import os, json\nprint(json.dumps(dict(os.environ)))\n"
    result = run_variant(code, settings(small_data, seed=7, gpu=3, threads=1), run_dir=tmp_path / "v")
    env = json.loads((tmp_path / "v" / "log.txt").read_text().splitlines()[0])
    for secret in ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert secret not in env
    assert "secret" not in (tmp_path / "v" / "log.txt").read_text()
    assert env["EVO_SEED"] == "7" and env["EVO_DATA_DIR"] == str(small_data)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["OMP_NUM_THREADS"] == "1"
    assert float(env["EVO_TIME_BUDGET"]) == 1.0 and env["EVO_HELDOUT"] == "0"
    assert not env["EVO_METRICS_PATH"].startswith(str(tmp_path))  # outside the variant's folder
    assert result.status == "no_metrics"


FORKER = """
import os, subprocess, sys, time
# A grandchild in the same process group, and one that leaves it with setsid.
if os.fork() == 0:
    time.sleep(1000)
    os._exit(0)
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True)
with open(PIDS, "w") as f:
    f.write(f"{os.getpid()} {daemon.pid}")
time.sleep(WAIT)
"""


def _grandchildren(pid_file: Path) -> list[int]:
    """The variant's children: the forked sleeper and the setsid daemon."""
    me, daemon = map(int, pid_file.read_text().split())
    kids = {int(p) for p in os.listdir("/proc") if p.isdigit() and alive(int(p))
            and (processes._stat_fields(p) or [None, None])[1] == str(me)}
    assert daemon in kids
    return sorted(kids)


def test_timeout_kills_the_whole_family(small_data, tmp_path):
    pid_file = tmp_path / "pids"
    code = FORKER.replace("PIDS", repr(str(pid_file))).replace("WAIT", "1000")
    # Note the family before the deadline so the test knows whom to look for afterwards.
    result_holder = {}
    thread = threading.Thread(target=lambda: result_holder.update(
        r=run_variant(code, settings(small_data, time_budget=2.0, startup_grace=1.0, eval_grace=0.0))))
    thread.start()
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    family = _grandchildren(pid_file)
    assert len(family) == 2 and all(alive(p) for p in family)
    thread.join(timeout=30)
    result = result_holder["r"]
    assert result.status == "timeout" and "still running after 3s" in result.reason
    time.sleep(0.2)
    assert not any(alive(p) for p in family)
    assert not run_processes()


def test_leftovers_die_even_when_the_variant_exits_cleanly(small_data, tmp_path):
    pid_file = tmp_path / "pids"
    code = FORKER.replace("PIDS", repr(str(pid_file))).replace("WAIT", "0.5")
    result = run_variant(code, settings(small_data))
    assert result.status == "no_metrics"
    _, daemon = map(int, pid_file.read_text().split())
    time.sleep(0.2)
    assert not alive(daemon)
    assert not run_processes()


def test_memory_limit_gives_oom(small_data):
    code = "import time\nblock = bytearray(600 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\ntime.sleep(30)\n"
    result = run_variant(code, settings(small_data, memory_limit_mb=300))
    assert result.status == "oom" and "300 MB" in result.reason
    assert result.peak_memory_mb > 300 and result.wall_seconds < 20


def test_changed_prepare_stops_the_engine_not_the_variant(small_data):
    with pytest.raises(PrepareChanged, match="changed since the run started"):
        run_variant("print(1)\n", settings(small_data, expected_prepare_hash="0" * 64))
