"""The local executor: this machine's worker slots, each running one job at a time in a thread.

Each slot keeps a warm evaluator (torch already imported), so sealing a model costs little.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from typing import Callable

from evo.jobs import Job, run_job
from evo.workers import WorkerSlot
from trainer.evaluator import Evaluator


class LocalExecutor:
    def __init__(self, slots: list[WorkerSlot], sandboxed: bool, evaluation_mode: str, log_dir: str | Path,
                 run: Callable = run_job):
        self.run = run  # what runs a job on a slot: the runner (benchmarks pass a stand-in)
        self.slots = list(slots)
        self.sandboxed = sandboxed
        self.evaluation_mode = evaluation_mode
        self.log_dir = Path(log_dir)
        self._free = list(slots)
        self._lock = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self._evaluators: dict[str, Evaluator] = {}
        self._pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="evo-worker")

    def capacity(self) -> int:
        return len(self.slots)

    def submit(self, job: Job) -> Future:
        with self._lock:
            if not self._free:
                raise RuntimeError("LocalExecutor.submit: every slot is busy (the engine keeps at most capacity() jobs)")
            slot = self._free.pop(0)
            cancel = self._cancels[job.token] = threading.Event()
        return self._pool.submit(self._run, job, slot, cancel)

    def _run(self, job: Job, slot: WorkerSlot, cancel: threading.Event):
        try:
            result = self.run(job, slot.device, slot.gpu, slot.threads, self._evaluator(slot), cancel)
            result.worker = slot.label
            return result
        finally:
            with self._lock:
                self._free.append(slot)
                self._cancels.pop(job.token, None)

    def _evaluator(self, slot: WorkerSlot) -> Evaluator | None:
        """The slot's warm evaluator (a slot runs one job at a time, so it is never shared)."""
        if self.evaluation_mode != "sealed":
            return None
        with self._lock:
            if slot.label not in self._evaluators:
                log = self.log_dir / f"evaluator-{slot.label.replace('#', '').replace(':', '')}.log"
                self._evaluators[slot.label] = Evaluator(slot.device, slot.gpu, slot.threads, self.sandboxed, log)
            return self._evaluators[slot.label]

    def cancel(self, job: Job) -> None:
        with self._lock:
            event = self._cancels.get(job.token)
        if event is not None:
            event.set()

    def close(self) -> None:
        with self._lock:
            for event in self._cancels.values():
                event.set()
        self._pool.shutdown(wait=True)
        for evaluator in self._evaluators.values():
            evaluator.close()
