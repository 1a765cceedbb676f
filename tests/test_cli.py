"""The evo command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from evo.config import load_config
from evo.runs import start_run
from evo.store import RunStore
from tests.procs import run_processes, run_tokens

TINY = """
import torch, prepare
tok = prepare.get_tokenizer()
model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, tok.vocab_size))
print(f"val_bpb: {prepare.evaluate_bpb(model, tok, 8):.6f}")
"""


def evo(*args, timeout=300):  # generous: a loaded machine takes minutes to start torch, sandbox and evaluator
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


def test_a_run_whose_seed_fails_says_why_points_at_its_log_and_exits_1(setup_run):
    config_path, run_dir, _ = setup_run(max_evaluations=3, before_sleep="import evo_no_such_module\n")
    proc = evo("run", str(config_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = run_dir / "variants" / "v00001" / "log.txt"
    assert "the seed (v00001) failed with status import: ModuleNotFoundError" in proc.stderr
    assert "No module named 'evo_no_such_module'" in proc.stderr and f"its log: {log}" in proc.stderr
    assert "evo_no_such_module" in log.read_text() and "Traceback" not in proc.stderr


def _evo_into_a_closed_pipe(*args) -> subprocess.CompletedProcess:
    """evo writing into a pipe whose reader is already gone, as `head` is once it has its lines.
    (Its read end is closed before evo starts, so evo's first write surely finds no reader.)"""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "evo.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    return proc


def test_output_cut_short_ends_quietly(setup_run, tmp_path):
    config_path, run_dir, _ = setup_run(max_evaluations=1)
    start_run(load_config(config_path), config_path, log=lambda line: None).run()
    for args in (["status", str(run_dir)], ["export", str(run_dir), "--out", str(tmp_path / "out")]):
        proc = _evo_into_a_closed_pipe(*args)
        assert proc.returncode == 141, (args, proc.stderr)  # 128 + SIGPIPE, as a shell reports `yes | head`
        assert proc.stderr == "", (args, proc.stderr)  # no traceback, no "Exception ignored"
    proc = _evo_into_a_closed_pipe("status", "--help")  # argparse itself ignores the error: exit 0
    assert proc.returncode in (0, 141) and proc.stderr == ""


def test_a_run_whose_reader_stops_after_one_line_stops_cleanly(held_seed):
    # The seed waits for the flag, so the engine is surely running when the reader goes away.
    config_path, run_dir, ledger, flag = held_seed(max_evaluations=3)
    engine = subprocess.Popen([sys.executable, "-m", "evo.cli", "run", str(config_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert engine.stdout.readline().startswith("run directory:")
        engine.stdout.close()  # as `evo run ... | head -1` does
        flag.unlink()
        _, stderr = engine.communicate(timeout=180)
    finally:
        engine.kill()
    assert engine.returncode == 141, stderr
    assert "Traceback" not in stderr and f"Continue with: evo resume {run_dir}" in stderr
    individuals, state = RunStore(run_dir).load()  # a good checkpoint, nothing running
    assert state["counters"]["evaluations"] < 3 and individuals
    assert not run_processes(run_tokens(run_dir))


# ---- small things a new user met (issue 12) ----

def test_version_prog_names_and_run_dir_help():
    from importlib.metadata import version

    proc = evo("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"evo {version('evo')}"
    assert evo("prepare", "--help").stdout.startswith("usage: evo prepare")
    for command in ("resume", "status", "export"):
        assert "a run directory" in evo(command, "--help").stdout, command


def test_eval_defaults_are_the_default_runs_settings():
    """`evo eval FILE` scores a file as `evo run configs/default.yaml` would, from the config itself."""
    from evo.cli import build_parser
    from evo.runs import PACKAGE_ROOT

    config = load_config(PACKAGE_ROOT / "configs" / "default.yaml")
    args = build_parser().parse_args(["eval", "x.py"])
    assert (args.budget, args.eval_tokens, args.seq_len) == (config.budget.seconds, config.data.eval_tokens, config.data.seq_len)
    assert (args.startup_grace, args.eval_grace) == (config.budget.startup_grace, config.budget.eval_grace)


def test_eval_leaves_no_temporary_folder_behind_ok_failed_or_interrupted(small_data, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    ok, failing, slow = (tmp_path / name for name in ("ok.py", "fail.py", "slow.py"))
    ok.write_text(TINY)
    failing.write_text("raise RuntimeError('deliberate')\n")
    slow.write_text("import time\ntime.sleep(120)\n")
    common = ["--data-dir", str(small_data), "--seq-len", "32", "--eval-tokens", "512", "--budget", "1"]
    for variant, code in ((ok, 0), (failing, 1)):
        proc = subprocess.run([sys.executable, "-m", "evo.cli", "eval", str(variant), *common], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert "--run-dir" in proc.stdout  # says where the files went, and how to keep them
        assert not list(tmp.glob("evo-*")), list(tmp.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "evo.cli", "eval", str(slow), *common], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp.glob("evo-eval-*/log.txt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert not list(tmp.glob("evo-*")), list(tmp.iterdir())


def test_a_bad_set_override_is_blamed_on_the_override_not_the_file(setup_run):
    config_path, _, _ = setup_run()
    proc = evo("run", str(config_path), "--set", "budget.secs=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "budget.secs: unknown key; allowed here: seconds" in proc.stderr
    assert "override --set budget.secs=3, not the file" in proc.stderr


def test_a_missing_seed_file_names_each_place_it_looked_once(small_data, tmp_path):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(f"seed_file: nope.py\ndata:\n  dir: {small_data}\nrun:\n  dir: {tmp_path / 'runs'}\n")
    proc = subprocess.run([sys.executable, "-m", "evo.cli", "run", str(config)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2, proc.stderr
    # The cwd and the config's folder's parent are the same folder here: it is named once.
    assert proc.stderr.count(str(tmp_path / "nope.py")) == 1 and "seed_file" in proc.stderr
