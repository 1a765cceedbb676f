"""One engine per run directory: an OS file lock held for the engine's whole life.

Two engines on one directory would kill each other's evaluations (resume sweeps the processes
of every evaluation in flight) and interleave their checkpoints. `RUN_DIR/engine.lock` is locked
with flock(2) by `evo run` and `evo resume` before they touch anything, and stays locked until
the engine exits. The kernel drops the lock when the holder dies, however it dies (kill -9
included), so a crashed run never needs its lock cleaned up by hand.

The file also says who holds it (pid, host, start time, command), for the message the second
engine prints. The file itself is never removed: removing a lock file races with the next
process opening it, while leaving it costs nothing (only the lock, not the file, means "in use").
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = "engine.lock"


class RunLocked(Exception):
    """Another live process holds the run directory; the message names it and says what to do."""


class RunLock:
    """`with RunLock(run_dir):` the directory is this process's until the block ends or it dies."""

    def __init__(self, run_dir: str | Path, command: str | None = None, create: bool = True):
        self.dir = Path(run_dir)
        self.create = create  # False: the directory must exist already (resume never makes one)
        self.path = self.dir / LOCK_NAME
        self.command = command if command is not None else " ".join(["evo", *sys.argv[1:]])
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock now or raise RunLocked; never waits. Creates the directory if needed, and changes
        nothing in it (not even the lock file's contents) when another process holds it."""
        if self.create:
            self.dir.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: the variants and evaluators the engine starts must not inherit the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(self._message(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _message(self, holder: dict) -> str:
        pid = holder.get("pid")
        if pid is None:  # it has only just locked and not yet written its name, or wrote none
            who = "another evo process (its pid is not recorded yet)"
            stop = "stop that process"
        else:
            who = f"evo process {pid}"
            if holder.get("host") and holder["host"] != socket.gethostname():
                who += f" on host {holder['host']}"
            if holder.get("started"):
                who += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
            if holder.get("command"):
                who += f" ({holder['command']})"
            stop = (f"stop it: `kill -INT {pid}` acts as Ctrl-C (checkpoint written), `kill {pid}` or "
                    f"`kill -9 {pid}` also lose nothing finished")
        return (f"{self.dir} is in use by {who}: two engines on one run directory would kill each other's "
                f"evaluations. Wait for it to finish, or {stop}; then run this command again.")


def holder(run_dir: str | Path) -> dict | None:
    """Who holds the run directory now (pid, host, started, command; {} if not written yet), or
    None when no live engine does. For `evo runs` and `evo status`: creates nothing, writes nothing.

    It asks with a shared, non-blocking lock dropped at once: an engine holding the lock never
    notices. (An `evo run` or `evo resume` starting in those microseconds is refused and can be
    run again; that is the whole cost.)"""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # never locked: a run from before locks, or one never started
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
