"""A fake executor for engine tests and benchmarks: results come from a script, and no process starts.

With `seconds=0` each future is done when submit returns; otherwise a timer finishes it after
that long (cancel finishes it at once with RunCancelled), which is enough to play a slow GPU.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from typing import Callable

from evo.jobs import Job
from trainer.runner import RunCancelled, RunResult, code_sha256


def ok(val_bpb: float, **metrics) -> RunResult:
    return RunResult(status="ok", metrics={"val_bpb": val_bpb, "heldout_bpb": val_bpb, **metrics})


class FakeExecutor:
    """`score(job)` decides each result; it may raise JobLost to play a node that died."""

    def __init__(self, score: Callable[[Job], RunResult], slots: int = 1, seconds: float | Callable[[Job], float] = 0.0):
        self.score = score
        self.slots = slots
        self.seconds = seconds
        self.jobs: list[Job] = []  # every job submitted, in order
        self.cancelled: list[str] = []
        self.busy_seconds = 0.0  # summed run time of finished jobs (for busy-fraction figures)
        self._timers: dict[str, tuple[threading.Timer, Future]] = {}
        self._lock = threading.Lock()

    def capacity(self) -> int:
        return self.slots

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        with self._lock:
            self.jobs.append(job)
        seconds = self.seconds(job) if callable(self.seconds) else self.seconds
        if seconds <= 0:
            self._finish(job, future, 0.0)
            return future
        timer = threading.Timer(seconds, self._finish, (job, future, seconds))
        timer.daemon = True
        with self._lock:
            self._timers[job.token] = (timer, future)
        timer.start()
        return future

    def _finish(self, job: Job, future: Future, seconds: float) -> None:
        with self._lock:
            self._timers.pop(job.token, None)
            self.busy_seconds += seconds
        if future.done():
            return
        try:
            result = self.score(job)
            result.run_token, result.code_sha256, result.worker = job.token, code_sha256(job.code), "fake"
            future.set_result(result)
        except InvalidStateError:
            pass  # cancelled meanwhile: the cancel's outcome stands
        except Exception as e:  # noqa: BLE001 - whatever the script raises is the job's outcome
            try:
                future.set_exception(e)
            except InvalidStateError:
                pass

    def cancel(self, job: Job) -> None:
        with self._lock:
            timer, future = self._timers.pop(job.token, (None, None))
        self.cancelled.append(job.key)
        if timer is not None:
            timer.cancel()
            try:
                future.set_exception(RunCancelled(job.key))
            except InvalidStateError:
                pass  # it finished first

    def close(self) -> None:
        with self._lock:
            timers = list(self._timers.values())
        for timer, future in timers:
            timer.cancel()
            try:
                future.set_exception(RunCancelled("executor closed"))
            except InvalidStateError:
                pass
