"""The runner: one variant, a sandboxed training process, a hand-over, a score from the evaluator."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.procs import marked_processes, run_processes
from trainer import sandbox
from trainer.runner import PrepareChanged, RunSettings, run_variant

# A variant that trains nothing: a bigram table, scored by the real evaluator.
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
SCORE = "print(f'val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}')\n"



def settings(data_dir, **overrides) -> RunSettings:
    base = dict(time_budget=1.0, data_dir=str(data_dir), seq_len=32, eval_tokens=1024,
                startup_grace=30.0, eval_grace=30.0)
    return RunSettings(**{**base, **overrides})


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_ok_run_records_metrics_log_and_files(small_data, tmp_path, mode):
    result = run_variant(TINY_MODEL + SCORE, settings(small_data, sandbox=mode), run_dir=tmp_path / "v1")
    assert result.status == "ok", result.log_tail
    assert result.sealed and result.metrics["sealed"] is True
    assert result.sandbox == ("none" if mode == "none" else ("bubblewrap" if sandbox.probe() is None else "none"))
    assert result.metrics["eval_tokens"] > 900 and result.metrics["seq_len"] == 32
    assert result.metrics["probed_rows"] >= 1
    assert f"val_bpb: {result.val_bpb:.6f}" in result.log_tail  # the variant got the evaluator's number back
    assert 0 < result.train_seconds < result.wall_seconds and result.peak_memory_mb > 50
    for name in ("train.py", "log.txt", "metrics.json", "result.json"):
        assert (tmp_path / "v1" / name).is_file(), name
    assert not (tmp_path / "v1" / "work").exists()  # the handed-over model is gone once scored
    record = json.loads((tmp_path / "v1" / "result.json").read_text())
    assert record["status"] == "ok" and record["run_token"] and record["code_sha256"]


def test_in_process_evaluation_is_marked_unsealed(small_data, tmp_path):
    sealed = run_variant(TINY_MODEL + SCORE, settings(small_data), run_dir=tmp_path / "a")
    unsealed = run_variant(TINY_MODEL + SCORE, settings(small_data, evaluation="in_process", heldout=True), run_dir=tmp_path / "b")
    assert unsealed.status == "ok", unsealed.log_tail
    assert not unsealed.sealed and unsealed.metrics["sealed"] is False
    assert unsealed.val_bpb == pytest.approx(sealed.val_bpb, rel=1e-6)  # same rules, same number
    assert "heldout_bpb" in unsealed.metrics


def handing_over(forward_body: str) -> str:
    """A variant that hands over the bigram table with another forward."""
    body = textwrap.indent(textwrap.dedent(forward_body).strip() + "\n", " " * 8)
    return TINY_MODEL + "class Table(Bigram):\n    def forward(self, idx):\n" + body + "prepare.evaluate_bpb(Table(), tok, 8)\n"


def test_a_model_that_cannot_be_exported_is_export_failed_with_a_short_reason(small_data):
    code = handing_over("""
        if self.table(idx).sum() > 0:  # data-dependent Python control flow
            return self.table(idx)
        return -self.table(idx)
    """)
    result = run_variant(code, settings(small_data))
    assert result.status == "export_failed", (result.status, result.reason)
    assert 0 < len(result.reason) < 1500 and "\n\n\n" not in result.reason


def test_non_causal_model_is_tampered(small_data):
    code = handing_over("return self.table(torch.roll(idx, -1, dims=1))\n")
    result = run_variant(code, settings(small_data))
    assert result.status == "tampered" and "non-causal" in result.reason


@pytest.mark.parametrize(
    "code, status, reason",
    [
        ("def f(:\n", "syntax", "line 1"),
        ("import numpy_that_does_not_exist\n", "import", "ModuleNotFoundError"),
        ("raise ValueError('boom')\n", "crash", "ValueError"),
        ("import sys\nprint('FAIL: loss nan at step 3')\nsys.exit(1)\n", "nan", "NaN"),
        ("print('trained, but forgot to evaluate')\n", "no_metrics", "without handing a model over"),
        ("open('/x/heldout.bin')\n", "tampered", "held-out"),
    ],
)
def test_failures_are_statuses_not_exceptions(small_data, code, status, reason):
    result = run_variant(code, settings(small_data))
    assert result.status == status
    assert reason in result.reason


def test_rewriting_its_working_copy_is_harmless_and_the_engines_copy_stays(small_data, tmp_path):
    code = TINY_MODEL + "open(__file__, 'w').write('X = 1\\n')\n" + SCORE
    result = run_variant(code, settings(small_data), run_dir=tmp_path / "v")
    assert result.status == "ok", result.reason
    assert (tmp_path / "v" / "train.py").read_text() == code


def test_unsandboxed_a_variant_that_rewrites_the_engines_copy_is_tampered_and_it_is_restored(small_data, tmp_path):
    code = TINY_MODEL + "open('../' + 'train.py', 'w').write('X = 1\\n')\n" + SCORE
    result = run_variant(code, settings(small_data, sandbox="none"), run_dir=tmp_path / "v")
    assert result.status == "tampered" and "its own train.py" in result.reason
    assert (tmp_path / "v" / "train.py").read_text() == code


def test_precheck_refusal_runs_nothing(small_data, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nopen('prepare.py', 'w')\n"
    result = run_variant(code, settings(small_data, sandbox="none"), run_dir=tmp_path / "v")
    assert result.status == "tampered" and result.returncode is None
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_secrets_never_reach_the_variant(small_data, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    code = "import os, json\nprint(json.dumps(dict(os.environ)))\n"
    result = run_variant(code, settings(small_data, seed=7, gpu=3, threads=1, sandbox=mode), run_dir=tmp_path / "v")
    env = json.loads((tmp_path / "v" / "log.txt").read_text().splitlines()[0])
    for secret in ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert secret not in env
    log = (tmp_path / "v" / "log.txt").read_text()
    assert not any(value in log for value in ("sk-test-secret", "aws-secret", "hf-secret"))
    assert env["EVO_SEED"] == "7" and env["EVO_DATA_DIR"] == str(small_data)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["OMP_NUM_THREADS"] == "1"
    assert float(env["EVO_TIME_BUDGET"]) == 1.0
    assert result.status == "no_metrics"


# A fork in the variant's process group and a daemon in a new session; both carry MARKER in
# their command line, so the test can find them from outside whatever PID namespace they are in.
FAMILY = """
import os, subprocess, sys, time
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)", "MARKER"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", "MARKER"], start_new_session=True, env=ENV)
time.sleep(WAIT)
"""


def _family_code(marker: str, wait: float, clean_env: bool) -> str:
    return FAMILY.replace("MARKER", marker).replace("WAIT", str(wait)).replace("ENV", "{}" if clean_env else "None")


def _wait_for(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_over_budget_kills_the_whole_family(small_data, tmp_path, mode):
    marker = f"evo-test-family-{tmp_path.name}"
    code = _family_code(marker, 1000, clean_env=False)
    holder = {}
    thread = threading.Thread(target=lambda: holder.update(
        r=run_variant(code, settings(small_data, time_budget=2.0, startup_grace=1.0, sandbox=mode))))
    thread.start()
    assert _wait_for(lambda: len(marked_processes(marker)) == 2), "the variant's children never appeared"
    thread.join(timeout=60)
    result = holder["r"]
    assert result.status == "over_budget" and "budget + allowance" in result.reason
    assert _wait_for(lambda: not marked_processes(marker), 5)
    assert not run_processes([result.run_token])


def test_a_daemon_with_a_clean_environment_dies_with_the_sandbox(small_data, tmp_path, sandboxed):
    marker = f"evo-test-daemon-{tmp_path.name}"
    result = run_variant(_family_code(marker, 0.5, clean_env=True), settings(small_data))
    assert result.status == "no_metrics" and result.sandbox == "bubblewrap"
    assert _wait_for(lambda: not marked_processes(marker), 5), marked_processes(marker)


def test_leftovers_die_even_when_the_variant_exits_cleanly_unsandboxed(small_data, tmp_path):
    marker = f"evo-test-leftover-{tmp_path.name}"
    result = run_variant(_family_code(marker, 0.5, clean_env=False), settings(small_data, sandbox="none"))
    assert result.status == "no_metrics"
    assert _wait_for(lambda: not marked_processes(marker), 5)
    assert not run_processes([result.run_token])


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_memory_limit_gives_oom(small_data, mode):
    code = "import time\nblock = bytearray(600 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\ntime.sleep(30)\n"
    result = run_variant(code, settings(small_data, memory_limit_mb=300, sandbox=mode))
    assert result.status == "oom" and "300 MB" in result.reason
    assert result.peak_memory_mb > 300 and result.wall_seconds < 25


def test_changed_prepare_stops_the_engine_not_the_variant(small_data):
    with pytest.raises(PrepareChanged, match="changed since the run started"):
        run_variant("print(1)\n", settings(small_data, expected_prepare_hash="0" * 64))


def test_a_second_hand_over_gets_the_same_answer(small_data):
    code = TINY_MODEL + "a = prepare.evaluate_bpb(model, tok, 8)\nb = prepare.evaluate_bpb(model, tok, 8)\nassert a == b, (a, b)\n"
    result = run_variant(code, settings(small_data))
    assert result.status == "ok" and result.returncode == 0, result.log_tail


def test_the_variant_folder_is_the_only_one_written(small_data, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    run_variant(TINY_MODEL + SCORE, settings(small_data), run_dir=tmp_path / "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["v"])
    assert Path(small_data, "meta.json").is_file()


def test_an_evaluator_that_cannot_start_stops_the_caller_instead_of_blaming_the_variant(small_data, tmp_path, monkeypatch):
    from trainer import evaluator as evaluator_module
    from trainer.runner import EvaluatorFailed

    monkeypatch.setattr(evaluator_module, "READY_SECONDS", 60.0)
    broken = evaluator_module.Evaluator("cpu", sandboxed=False, log_path=tmp_path / "evaluator.log")
    monkeypatch.setattr(broken, "_command", lambda data_dir: ([sys.executable, "-c", "raise SystemExit('no torch here')"], None))
    with pytest.raises(EvaluatorFailed, match="did not start"):
        run_variant(TINY_MODEL + SCORE, settings(small_data), run_dir=tmp_path / "v", evaluator=broken)
    assert "no torch here" in (tmp_path / "evaluator.log").read_text()


def test_relative_run_and_data_folders_work(small_data, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(small_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # as `evo run` with run.dir: runs and data.dir: data does
    result = run_variant(TINY_MODEL + SCORE, settings("data"), run_dir="runs/v")
    assert result.status == "ok", (result.status, result.reason, result.log_tail)
    assert (tmp_path / "runs" / "v" / "result.json").is_file()
