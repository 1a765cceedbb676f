"""Shared fixtures: real data directories built by prepare itself, small enough to be quick."""

from __future__ import annotations

import pytest

import prepare


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

    def point(data_dir, seq_len=64, eval_tokens=4096, heldout=False):
        metrics_path = tmp_path / "metrics.json"
        monkeypatch.setattr(prepare, "DATA_DIR", str(data_dir))
        monkeypatch.setattr(prepare, "MAX_SEQ_LEN", seq_len)
        monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
        monkeypatch.setattr(prepare, "HELDOUT", heldout)
        monkeypatch.setattr(prepare, "METRICS_PATH", str(metrics_path))
        monkeypatch.setattr(prepare, "DEVICE", "cpu")
        return metrics_path

    return point
