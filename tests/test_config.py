"""Run configuration: typed, strict, one source of defaults."""

from pathlib import Path

import pytest

from evo.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    assert isinstance(load_config(path), Config)


def test_default_config_is_the_offline_cpu_setting():
    config = load_config(CONFIGS[[p.name for p in CONFIGS].index("default.yaml")])
    assert config.workers.device == "cpu" and config.stopping.max_evaluations >= 12


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, words", [
    ("budget:\n  secs: 30\n", ["budget.secs", "unknown key", "allowed here", "seconds"]),
    ("colour: red\n", ["colour", "unknown key", "population"]),
    ("budget:\n  seconds: fast\n", ["budget.seconds", "valid number", "'fast'"]),
    ("budget:\n  seconds: -5\n", ["budget.seconds", "greater than 0"]),
    ("population:\n  size: 0\n", ["population.size", "greater than or equal to 1"]),
    ("operators:\n  telepathy: 1.0\n", ["operators", "unknown operator telepathy", "perturb"]),
    ("stopping:\n  max_evaluations: null\n  max_hours: null\n", ["stopping", "never ends"]),
    ("workers:\n  device: tpu\n", ["workers.device", "'cpu'"]),
    ("- a\n- b\n", ["mapping"]),
    ("budget: [unclosed\n", ["not valid YAML"]),
])
def test_bad_configs_are_rejected_with_the_path(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    for word in words:
        assert word in str(error.value)


def test_overrides_apply_on_top_and_are_validated(tmp_path):
    path = write(tmp_path, "budget:\n  seconds: 30\n")
    config = load_config(path, ["budget.seconds=60", "population.islands=3", "data.dir=/x"])
    assert config.budget.seconds == 60 and config.population.islands == 3 and config.data.dir == "/x"
    with pytest.raises(ConfigError, match="budget.seconds"):
        load_config(path, ["budget.seconds=zero"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["budget.seconds"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
