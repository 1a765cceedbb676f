"""The static pre-check: what is refused before any process starts."""

from pathlib import Path

import pytest

from trainer.precheck import precheck

SEEDS = sorted((Path(__file__).resolve().parents[1] / "trainer").glob("train_*.py"))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_the_seeds_pass(seed):
    assert precheck(seed.read_text()) is None


def test_syntax_error_names_the_line():
    refusal = precheck("x = 1\ndef broken(:\n    pass\n")
    assert refusal.status == "syntax" and "line 2" in refusal.reason


def test_docstrings_may_mention_anything():
    assert precheck('"""Run python prepare.py first; heldout is never read."""\nx = 1\n') is None


@pytest.mark.parametrize(
    "code, words",
    [
        ("open('/data/heldout.bin', 'rb')", "held-out"),
        ("import numpy\nnumpy.fromfile(DATA + '/HELDOUT.bin')", "held-out"),
        ("open('prepare.py', 'w').write('')", "prepare.py"),
        ("import os\nos.environ['EVO_TIME_BUDGET'] = '9999'", "EVO_"),
        ("import os\nos.environ.update({'EVO_SEED': '1'})", "EVO_"),
        ("import os\nos.environ.setdefault('EVO_DEVICE', 'cpu')", "EVO_"),
        ("import os\nos.putenv('EVO_SEED', '1')", "EVO_"),
        ("import os\nos.environ.update(EVO_SEED='3')", "EVO_"),
        ("import prepare\nprepare.evaluate_bpb = lambda *a: 0.5", "prepare.evaluate_bpb"),
        ("import prepare\nsetattr(prepare, 'evaluate_bpb', None)", "setattr"),
        ("import prepare\nprepare.score_rows.__code__ = (lambda: 0).__code__", "__code__"),
        ("import prepare\nprint(prepare.__file__)", "__file__"),
    ],
)
def test_cheats_are_refused_with_a_reason(code, words):
    refusal = precheck(code)
    assert refusal is not None and refusal.status == "tampered"
    assert words in refusal.reason and "line" in refusal.reason


def test_reading_settings_is_allowed():
    assert precheck("import os\nbudget = float(os.environ.get('EVO_TIME_BUDGET', 60))\n") is None
