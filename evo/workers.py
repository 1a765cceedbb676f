"""Worker slots: one per parallel evaluation, each pinned to a device (a GPU, or a share of the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from evo.config import Config


@dataclass(frozen=True)
class WorkerSlot:
    label: str  # e.g. "cuda:1" or "cpu#0"
    device: str  # EVO_DEVICE for the variant
    gpu: int | None  # CUDA_VISIBLE_DEVICES for the variant
    threads: int | None  # CPU threads for the variant


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_slots(config: Config) -> list[WorkerSlot]:
    w = config.workers
    device = w.device
    if device == "auto":
        device = "cuda" if _cuda_devices() else "cpu"
    if device == "cuda":
        gpus = w.gpus if w.gpus is not None else list(range(_cuda_devices()))
        if not gpus:
            raise ValueError("workers.device is cuda but no GPU is visible; set workers.device: cpu")
        count = len(gpus) if w.count == "auto" else w.count
        threads = w.threads_per_worker or max(1, (os.cpu_count() or 1) // count)
        return [WorkerSlot(f"cuda:{gpus[i % len(gpus)]}", "cuda", gpus[i % len(gpus)], threads) for i in range(count)]
    count = 1 if w.count == "auto" else w.count
    threads = w.threads_per_worker or max(1, (os.cpu_count() or 1) // count)
    return [WorkerSlot(f"{device}#{i}", device, None, threads) for i in range(count)]
