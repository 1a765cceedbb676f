"""Helpers for tests that check which processes are still alive."""

from __future__ import annotations

import json
import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def run_processes(tokens) -> list[int]:
    """Live processes of the given evaluations: their environment holds EVO_RUN_TOKEN=<one of tokens>.

    Only the test's own tokens: another evo run on the same machine is none of the test's business.
    No tokens is a mistake in the test (the answer would always be "none"), so it raises.
    """
    needles = {f"EVO_RUN_TOKEN={t}".encode() for t in tokens if t}
    if not needles:
        raise ValueError("run_processes needs the run tokens of the test's own evaluations")
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needles.intersection(environ) and alive(int(pid)):
            found.append(int(pid))
    return found


def run_tokens(run_dir: Path) -> set[str]:
    """Every run token a run directory knows: evaluations in flight or queued (the checkpoint)
    and finished ones (each result.json, guard re-runs' and smoke runs' included)."""
    from evo.store import RunStore, StoreError

    tokens = set()
    try:
        individuals, state = RunStore(run_dir).load()
        tokens |= {i.run_token for i in individuals}
        tokens |= {job.get("token", "") for job in state.get("guard", {}).get("queue", [])}
    except (StoreError, OSError):
        pass
    for path in Path(run_dir).rglob("result.json"):
        try:
            tokens.add(json.loads(path.read_text()).get("run_token", ""))
        except (OSError, ValueError):
            pass
    return tokens - {""}


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
