"""Shared fixtures: real data directories built by prepare itself, small enough to be quick."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import prepare

STANDIN = Path(__file__).resolve().parent / "variants" / "standin.py"


@pytest.fixture
def sandboxed():
    """Skip where bubblewrap cannot build the sandbox; fail instead where it must (CI sets EVO_REQUIRE_SANDBOX=1)."""
    from trainer import sandbox

    problem = sandbox.probe()
    if problem is not None:
        if os.environ.get("EVO_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"EVO_REQUIRE_SANDBOX=1, but the sandbox cannot be built: {problem}")
        pytest.skip(f"bubblewrap is not usable here: {problem}")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The embedded corpus capped at 2 MB with a 512-token vocabulary: builds in about a second."""
    data_dir = tmp_path_factory.mktemp("data-small")
    prepare.build(prepare.PrepareSettings(vocab_size=512, max_bytes=2_000_000), data_dir)
    return data_dir


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """The embedded default exactly as `python prepare.py` builds it (about 10 s)."""
    data_dir = tmp_path_factory.mktemp("data-default")
    prepare.build(prepare.PrepareSettings(), data_dir)
    return data_dir


@pytest.fixture
def use_data(monkeypatch, tmp_path):
    """Point prepare's runtime settings at a data directory, as the EVO_ environment would."""

    def point(data_dir, seq_len=64, eval_tokens=4096):
        monkeypatch.setattr(prepare, "DATA_DIR", str(data_dir))
        monkeypatch.setattr(prepare, "MAX_SEQ_LEN", seq_len)
        monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
        monkeypatch.setattr(prepare, "DEVICE", "cpu")

    return point


@pytest.fixture
def setup_run(tmp_path, small_data):
    """Writes a stand-in seed (with a ledger) and a config for it; returns the config path."""

    def make(max_evaluations=6, workers=1, sleep=0.2, extra_code="", before_sleep="", **sections):
        ledger = tmp_path / "ledger.txt"
        code = STANDIN.read_text().replace('LEDGER = ""', f"LEDGER = {str(ledger)!r}")
        code = code.replace("SLEEP = 0.2", f"SLEEP = {sleep}") + extra_code
        code = code.replace("\ntime.sleep(SLEEP)", "\n" + before_sleep + "time.sleep(SLEEP)")
        seed = tmp_path / "seed.py"
        seed.write_text(code)
        config = {
            "run": {"name": "r", "dir": str(tmp_path / "runs")},
            "seed_file": str(seed),
            "data": {"dir": str(small_data), "seq_len": 32, "eval_tokens": 512},
            "budget": {"seconds": 1, "startup_grace": 30, "eval_grace": 30},
            "population": {"size": 4, "islands": 2, "migration_interval": 3},
            "stopping": {"max_evaluations": max_evaluations},
            "workers": {"count": workers, "device": "cpu", "threads_per_worker": 1},
        }
        config["guard"] = {"enabled": False}  # the guard's own tests switch it on
        # The ledger lives outside the variant's folder, which the sandbox hides: engine tests that
        # count runs by it go unsandboxed. The sandbox has its own tests (test_runner, test_redteam).
        config["evaluation"] = {"sandbox": "none"}
        for key, value in sections.items():
            config.setdefault(key, {}).update(value)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path, tmp_path / "runs" / "r", ledger

    return make


@pytest.fixture
def held_seed(setup_run, tmp_path):
    """Like setup_run, for a run whose seed waits while a flag file exists: the engine is surely
    mid-evaluation until the test lets it go with `flag.unlink()`. Returns (config, run dir,
    ledger, flag)."""
    flag = tmp_path / "hold-the-seed"
    flag.touch()
    wait = f"import os\nwhile os.path.exists({str(flag)!r}):\n    time.sleep(0.05)\n"

    def make(**settings):
        config_path, run_dir, ledger = setup_run(before_sleep=wait, **settings)
        return config_path, run_dir, ledger, flag

    return make
