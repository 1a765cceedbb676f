"""The test helpers that find leftover processes: only the test's own, never another run's."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.procs import alive, run_processes


def _sleeper(token: str) -> subprocess.Popen:
    env = {**os.environ, "EVO_RUN_TOKEN": token}
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)


def test_run_processes_finds_the_tests_own_tokens_and_ignores_other_runs():
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    own, foreign = _sleeper(mine), _sleeper(other)  # `foreign` stands for another evo run on the machine
    try:
        assert run_processes([mine]) == [own.pid]
        assert run_processes([mine[:-1]]) == []  # a whole token, not a prefix
        assert sorted(run_processes([mine, other, ""])) == sorted([own.pid, foreign.pid])
        own.kill()
        own.wait()
        assert not alive(own.pid) and run_processes([mine]) == []
    finally:
        for proc in (own, foreign):
            proc.kill()
            proc.wait()


def test_run_processes_without_tokens_is_a_mistake_not_an_empty_answer():
    with pytest.raises(ValueError, match="run tokens"):
        run_processes([])
    with pytest.raises(ValueError):
        run_processes([""])
