"""Jobs: every run of a variant, whatever it is for, and the one function that runs one.

A child's first evaluation, the seed's noise-floor runs and its anchor run, a candidate's re-runs, the fresh-seed
checks of a promotion and the transfer runs at a larger budget are all a Job; an executor runs it somewhere (a local worker slot, a Ray
node, or nowhere at all in tests) and hands back a RunResult. The job names no device: the
executor fills in the one it runs the job on.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

from trainer.evaluator import Evaluator
from trainer.runner import RunResult, RunSettings, run_variant

Result = RunResult  # what every executor's futures resolve to

CHILD, NOISE, RERUN, TRANSFER, AUDIT, ANCHOR = "child", "noise", "rerun", "transfer", "audit", "anchor"


@dataclass
class Job:
    kind: str  # child (first evaluation), noise (the seed's floor), anchor, rerun (a candidate), audit, transfer
    individual: str  # the variant's id
    code: str
    settings: RunSettings  # budget, seed, data, evaluation; device, gpu and threads are the executor's
    folder: str  # where its files end up on the machine that runs the engine
    token: str  # tags the run's processes; result.json carries it back
    smoke_seconds: float = 0.0  # child jobs: a short run that must succeed before the full one
    attempts: int = 0  # times an executor lost it (a node died): re-queued, never the variant's fault

    @property
    def key(self) -> str:
        return self.individual if self.kind == CHILD else f"{self.individual}/{self.kind}-{self.settings.seed}"


class JobLost(RuntimeError):
    """The machine running a job went away (node or worker died); the job should be re-queued."""


def run_job(job: Job, device: str, gpu: int | None, threads: int | None, evaluator: Evaluator | None,
            cancel: threading.Event | None = None, folder: str | Path | None = None) -> RunResult:
    """Run a job on this machine: the smoke stage first where asked, then the full run."""
    settings = dataclasses.replace(job.settings, device=device, gpu=gpu, threads=threads)
    folder = Path(folder or job.folder)
    if job.smoke_seconds:
        smoke = dataclasses.replace(settings, time_budget=job.smoke_seconds,
                                    eval_tokens=min(settings.eval_tokens, 4 * settings.seq_len))
        result = run_variant(job.code, smoke, folder / "smoke", job.token, cancel, evaluator)
        if result.status != "ok":
            result.reason = f"smoke run: {result.reason}"
            return result
    return run_variant(job.code, settings, folder, job.token, cancel, evaluator)
