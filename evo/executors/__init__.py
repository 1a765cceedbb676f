"""Executors run jobs: `submit(job) -> Future[RunResult]`, `cancel(job)`, `close()`, `capacity()`.

- local: this machine's worker slots (one per GPU, or shares of the CPU), the subprocess runner;
- ray: each job a Ray task on a node with the device it asks for (evo/executors/ray_cluster.py);
- fake: scripted results at once, for engine tests that need no processes.

A future that raises JobLost means the machine went away, not that the variant failed: the
engine re-queues the job. Any other exception is a fault of evo's own set-up (say, a node whose
data differs from the run's) and stops the run with its message.
"""

from __future__ import annotations

from typing import Callable, Protocol
from concurrent.futures import Future

from evo.jobs import Job


class ExecutorUnavailable(RuntimeError):
    """The executor cannot start (Ray missing, no cluster, jobs no node can hold); the message says what to do."""


class Executor(Protocol):
    def capacity(self) -> int:
        """Jobs it can run at once right now (the engine keeps this many in flight)."""

    def submit(self, job: Job) -> Future: ...

    def cancel(self, job: Job) -> None:
        """Stop a job in flight; its future then raises trainer.runner.RunCancelled (or JobLost)."""

    def close(self) -> None: ...


def make_executor(config, sandboxed: bool | None, log_dir, log: Callable[[str], None]) -> Executor:
    kind = config.executor.kind
    if kind == "local":
        from evo.executors.local import LocalExecutor
        from evo.workers import worker_slots

        return LocalExecutor(worker_slots(config), bool(sandboxed), config.evaluation.mode, log_dir)
    if kind == "ray":
        from evo.executors.ray_cluster import RayExecutor

        return RayExecutor(config, log=log)
    raise ValueError(f"unknown executor kind {kind!r}")
