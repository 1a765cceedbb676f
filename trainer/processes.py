"""Process plumbing for the runner (Linux /proc): launch, watch, measure and kill a variant.

A variant may fork, start a daemon or call setsid. In the sandbox its processes share a PID
namespace, which dies with its first process: that is the net. Unsandboxed there are two weaker
nets: the process group, and a per-run token in the environment, which descendants inherit
unless they clean their environment. Memory is the sum of proportional set sizes (PSS: a page
shared by forks counts once in total) plus what the sandbox's private tmpfs holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

# Runs in the child before the variant: the kernel SIGKILLs it when the runner dies (even by
# kill -9); evo's imports are done here, so the clock starts when the variant's own code does.
# PR_SET_PDEATHSIG is 1 on Linux.
LAUNCHER = """\
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.environ.get("EVO_SANDBOX") == "none" and os.getppid() == 1:
    sys.exit(1)
import numpy, torch, prepare
from trainer import sealed
prepare.handover_channel().tell({"event": "started"})
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
"""

# Variables a child may inherit from the engine's environment. Everything else (API keys, cloud
# credentials, tokens, compile-cache locations shared between variants) is dropped.
ENV_ALLOW_LIST = (
    "PATH", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ",
    "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "NVIDIA_DRIVER_CAPABILITIES",
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
)


def base_environment(gpu: int | None, threads: int | None) -> dict[str, str]:
    """The allow-listed variables, the worker's GPU and its share of CPU threads."""
    env = {k: os.environ[k] for k in ENV_ALLOW_LIST if k in os.environ}
    env["PYTHONSAFEPATH"] = "1"  # a prepare.py or torch.py dropped in the cwd is never imported
    if gpu is not None:
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from the 3rd on (after "pid (comm)")


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def pss_mb(pid: int | str) -> float:
    """Proportional set size of one process in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    fields = _stat_fields(str(pid))  # kernels without smaps_rollup: resident set size
    return int(fields[21]) * _PAGE_MB if fields else 0.0


def _wait_until_stopped(pids: list[int], timeout: float = 2.0) -> None:
    """Until each of pids is stopped or gone (a process in an uninterruptible wait stops when it
    leaves it; the timeout only bounds a process that never does)."""
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if (fields := _stat_fields(str(pid))) and fields[0] not in "TtZX"]
        if waiting:
            time.sleep(0.001)


def _pid_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


class Family:
    """Every process of one run, found either by PID namespace (sandbox) or by group and token."""

    def __init__(self, leader: int, token: str, namespace_pid: int | None = None, tmpfs: tuple[str, ...] = ()):
        self.leader = leader  # our direct child (bwrap, or the python process when unsandboxed)
        self.token = token
        self.namespace = _pid_namespace(namespace_pid) if namespace_pid is not None else None
        self.namespace_pid = namespace_pid
        # The sandbox's private file systems (its /tmp, /dev/shm, work folder) hold memory too.
        self.tmpfs = [f"/proc/{namespace_pid}/root{path}" for path in ("/tmp", "/dev/shm", *tmpfs)] if namespace_pid else []

    def pids(self) -> list[int]:
        """The sandbox's processes: its PID namespace and every descendant of its first process
        (a nested namespace would hide from the first test, not the second). Unsandboxed: the
        process group, the leader's descendants and the carriers of the run token."""
        parents, groups = {}, {}
        for pid in _pids():
            fields = _stat_fields(pid)
            if fields and fields[0] != "Z":
                parents[int(pid)], groups[int(pid)] = int(fields[1]), int(fields[2])
        root = self.namespace_pid or self.leader
        found = {root} if root in parents else set()
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        frontier = [root]
        while frontier:
            frontier = [child for pid in frontier for child in children.get(pid, []) if child not in found]
            found.update(frontier)
        if self.namespace is not None:
            found.update(pid for pid in parents if _pid_namespace(pid) == self.namespace)
        else:
            found.update(pid for pid, group in groups.items() if group == self.leader)
            found.update(p for p in pids_with_token(self.token) if p in parents)
        found.discard(os.getpid())
        return sorted(found)

    def memory_mb(self) -> float:
        total = sum(pss_mb(pid) for pid in self.pids())
        for mount in self.tmpfs:  # files in the private /tmp and /dev/shm are memory too
            try:
                st = os.statvfs(mount)
                total += (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20
            except OSError:
                pass
        return total

    def signal_all(self, sig: int) -> None:
        """Send sig to every process, again until no new one appears (a stopped process cannot fork).

        kill() returns before the target has stopped, and a fork in flight when SIGSTOP arrives
        still finishes: so after each SIGSTOP round we wait until the targets are stopped, and
        only then look for children they made meanwhile."""
        done: set[int] = set()
        for _ in range(20):
            fresh = [pid for pid in self.pids() if pid not in done]
            if not fresh:
                return
            for pid in fresh:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            done.update(fresh)
            if sig == signal.SIGSTOP:
                _wait_until_stopped(fresh)

    def kill(self) -> None:
        """SIGKILL everything: the namespace's first process takes the rest with it."""
        for pid in [self.namespace_pid] if self.namespace_pid else []:
            _kill(pid)
        kill_group(self.leader)
        _kill(self.leader)
        if self.namespace is None:
            kill_by_token(self.token)
        else:
            for _ in range(5):  # the kernel tears the namespace down; wait until it has
                left = self.pids()
                if not left:
                    break
                for pid in left:
                    _kill(pid)
                time.sleep(0.05)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
            _kill(pid)
            killed += 1
        time.sleep(0.05)
    return killed


class LogCapture:
    """Copies a child's output into log.txt up to a cap, then keeps only a rolling tail in memory.

    The runner owns the file (outside the variant's reach in the sandbox), so a flood costs
    neither disk nor memory beyond the cap, and a variant cannot swap log.txt for a FIFO.
    """

    def __init__(self, pipe, path: Path, cap_bytes: int = 8 * 2**20, tail_bytes: int = 64 * 2**10):
        self.pipe = pipe
        self.path = path
        self.cap = cap_bytes
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.tail_limit = tail_bytes
        self.written = 0
        self.dropped = 0
        self.thread = threading.Thread(target=self._copy, name="evo-log", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        with open(self.path, "wb") as log:
            while chunk := self.pipe.read1(1 << 16):
                room = max(0, self.cap - self.written)
                if room:
                    log.write(chunk[:room])
                    log.flush()
                    self.written += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - room)
                self.tail.append(chunk)
                self.tail_size += len(chunk)
                while self.tail_size - len(self.tail[0]) >= self.tail_limit:
                    self.tail_size -= len(self.tail.popleft())
            if self.dropped:
                log.write(f"\n[evo: log capped at {self.cap} bytes; {self.dropped} bytes dropped; last lines:]\n".encode())
                log.write(b"".join(self.tail)[-self.tail_limit :])

    def finish(self, timeout: float = 10.0) -> str:
        """Wait for the pipe to close (every writer is dead by now); the last lines as text."""
        self.thread.join(timeout)
        return b"".join(self.tail)[-self.tail_limit :].decode("utf-8", "replace")


def spawn(argv: list[str], cwd: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start a child in its own session with stdout and stderr on one pipe."""
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds)
