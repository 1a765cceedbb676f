"""One engine per run directory: a real lock held by a real process, refused, then freed by kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evo.config import load_config
from evo.lock import LOCK_NAME, RunLock, RunLocked
from evo.runs import start_run
from evo.store import RunStore
from tests.procs import alive, run_processes

HOLDER = """
import sys, time
from evo.lock import RunLock
with RunLock(sys.argv[1], command="test holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """A separate process that takes the run directory's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", "the holder never took the lock"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def evo(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evo.cli", *args], capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time: what 'nothing changed' means."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_held_lock_is_refused_with_the_holders_pid_and_freed_when_the_holder_is_killed_9(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold(run_dir)
    try:
        recorded = json.loads((run_dir / LOCK_NAME).read_text())
        assert recorded["pid"] == holder.pid and recorded["host"] and recorded["started"] <= time.time()
        before = snapshot(run_dir)
        with pytest.raises(RunLocked) as refused:
            RunLock(run_dir).acquire()
        message = str(refused.value)
        assert f"evo process {holder.pid}" in message and "test holder" in message
        assert "Wait for it to finish" in message and f"kill -INT {holder.pid}" in message
        assert snapshot(run_dir) == before  # the refused attempt wrote nothing, not even its name
    finally:
        kill_9(holder)
    # The kernel dropped the lock with its holder: nobody has to clean anything up.
    with RunLock(run_dir):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    with RunLock(run_dir):  # released on exit, so it can be taken again
        pass


def test_resume_and_run_refuse_a_directory_another_engine_holds_and_change_nothing(setup_run):
    config_path, run_dir, _ = setup_run(max_evaluations=1)
    start_run(load_config(config_path), config_path, log=lambda line: None).run()
    holder = hold(run_dir)
    try:
        before = snapshot(run_dir)
        for args in (["resume", str(run_dir)], ["resume", str(run_dir), "--set", "stopping.max_evaluations=3"],
                     ["run", str(config_path)]):
            proc = evo(*args)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert f"in use by evo process {holder.pid}" in proc.stderr and "Wait for it to finish" in proc.stderr
            assert "Traceback" not in proc.stderr
            assert snapshot(run_dir) == before, args
    finally:
        kill_9(holder)


def test_resume_of_a_folder_that_is_not_a_run_leaves_it_alone(tmp_path):
    proc = evo("resume", str(tmp_path))
    assert proc.returncode == 2 and "not an evo run directory" in proc.stderr
    assert list(tmp_path.iterdir()) == []
    proc = evo("resume", str(tmp_path / "typo"))
    assert proc.returncode == 2 and not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_resume_while_the_engine_runs_is_refused_and_its_evaluation_survives(held_seed):
    # The seed waits while the flag exists, so the engine is surely mid-evaluation when resume comes.
    config_path, run_dir, ledger, flag = held_seed(max_evaluations=2)
    engine = subprocess.Popen([sys.executable, "-m", "evo.cli", "run", str(config_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (ledger.exists() and ledger.read_text().startswith("start")):
            assert time.time() < deadline and engine.poll() is None, "the seed never started"
            time.sleep(0.1)
        (seed,), _ = RunStore(run_dir).load()
        running = run_processes([seed.run_token])
        assert running
        proc = evo("resume", str(run_dir))
        assert proc.returncode == 2 and f"in use by evo process {engine.pid}" in proc.stderr
        assert engine.poll() is None and all(alive(p) for p in running), "the refused resume touched the run"
    finally:
        kill_9(engine)
    flag.unlink()
    proc = evo("resume", str(run_dir))  # the dead engine's lock went with it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    individuals, state = RunStore(run_dir).load()
    assert state["counters"]["evaluations"] == 2 and all(i.status == "ok" for i in individuals)
