"""Helpers for tests that check which processes are still alive."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def run_processes() -> list[int]:
    """Every live process that belongs to some evaluation (carries a run token)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if b"EVO_RUN_TOKEN=" in Path(f"/proc/{pid}/environ").read_bytes() and alive(int(pid)):
                found.append(int(pid))
        except OSError:
            pass
    return found


def marked_processes(marker: str) -> list[int]:
    """Live processes with `marker` as an argument: found from outside any PID namespace."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args and alive(int(pid)):
            found.append(int(pid))
    return found
