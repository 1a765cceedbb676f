"""Runs of the stand-in on the fake executor: the engine's decisions without a single process."""

from __future__ import annotations

import random
import re

from evo.config import load_config
from evo.guard import Guard
from evo.runs import start_run
from trainer.runner import RunResult


def quality(code: str) -> float:
    """QUALITY as the stand-in would see it: the last assignment wins (an LLM edit may add one)."""
    return float(re.findall(r"^QUALITY = ([\d.e+-]+)", code, re.MULTILINE)[-1])


def scored(job, val_bpb: float, heldout_gap: float = 0.05) -> RunResult:
    """An ok result as the runner reports it: held-out scored only on the guard's runs."""
    metrics = {"val_bpb": val_bpb}
    if job.settings.heldout:
        metrics["heldout_bpb"] = val_bpb + heldout_gap
    return RunResult(status="ok", metrics=metrics)


def by_quality(job, noise: float = 0.0) -> RunResult:
    """The stand-in's score without running it: best at QUALITY 1.0, plus seed noise if asked."""
    jitter = noise * random.Random(job.settings.seed).gauss(0, 1) if noise else 0.0
    return scored(job, 2.0 + abs(1.0 - quality(job.code)) + jitter)


def engine_with(setup_run, executor, ops=None, **sections):
    """A new run of the stand-in on `executor`; `ops` replaces the configured operators."""
    config_path, run_dir, _ = setup_run(**sections)
    config = load_config(config_path)
    engine = start_run(config, config_path, log=lambda line: None)
    engine.executor = executor
    if ops is not None:
        from evo.engine import Engine

        engine = Engine(config, engine.store, log=lambda line: None, executor=executor, operators=ops)
    return engine, run_dir


def feed(guard: Guard, values: dict[str, list[tuple[float, float]]]):
    """Complete every queued job for the given individuals with (val, held-out) pairs."""
    while guard.queue:
        job = guard.take()
        val, held = values[job.individual].pop(0)
        for candidate, value in guard.record(job, "ok", {"val_bpb": val, "heldout_bpb": held}):
            guard.consider(candidate, value)
