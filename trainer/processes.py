"""Process plumbing for the runner (Linux /proc): launch, watch, measure and kill a variant.

A variant may fork, start a daemon or call setsid. Two nets catch everything it starts: its
process group, and a per-run token in the environment, which every descendant inherits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# Runs in the child before it becomes `python train.py`: ask the kernel to SIGKILL it when the
# engine dies (even by kill -9), then exec the variant. PR_SET_PDEATHSIG is 1 on Linux.
LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() == 1:
    sys.exit(1)
os.execv(sys.executable, [sys.executable, sys.argv[1]])
"""

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from the 3rd on (after "pid (comm)")


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every live process in a process group, in MB."""
    total = 0
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            total += int(fields[21])
    return total * _PAGE_MB


def poll_with_peak(child: subprocess.Popen) -> tuple[int | None, float]:
    """Reap the child if it ended, without blocking: (exit code or None, its peak RSS in MB)."""
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid == 0:
        return None, 0.0
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pids_with_token(token: str) -> list[int]:
    needle = f"EVO_RUN_TOKEN={token}".encode()
    found = []
    for pid in _pids():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def kill_by_token(token: str, rounds: int = 5) -> int:
    """SIGKILL every process that carries the run's token; repeat while some keep forking."""
    killed = 0
    for _ in range(rounds):
        pids = [p for p in pids_with_token(token) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return killed
