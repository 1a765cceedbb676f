"""The OS sandbox around a variant's training process and around the evaluator (bubblewrap).

Inside, a process sees only what is bound in: the system (/usr, /etc, ...) and the Python
environment read-only, a private /tmp and /dev/shm (size-capped tmpfs), its own /proc (a new PID
namespace: everything it starts dies with it, and the engine's processes and their environments
are out of sight), no network (a new network namespace: even 127.0.0.1 is its own), no
capabilities and no nested user namespaces. What each role adds:

- a variant: its work folder, a size-capped tmpfs (so it fills memory that is counted, never the
  disk) holding a copy of its train.py; prepare.py and the trainer package (evo's hand-over code)
  read-only; and from the data directory only the tokenizer, meta.json and train.bin (plus
  val/heldout when `evaluation: in_process` scores inside the variant);
- the evaluator: the whole data directory read-only; nothing writable but its private /tmp.

The user's home, the run directory, other variants, most of /etc and every other path on the
machine are simply not there. Where bubblewrap is missing or refused, `probe()` says why, in plain words.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import prepare
import trainer

SYSTEM_DIRS = ("/usr", "/sys")
# From /etc only what the dynamic linker, Python and CUDA read: not shadow files, keys or secrets.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
             "nsswitch.conf", "hosts", "alternatives", "mime.types", "os-release", "debian_version", "nvidia")
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """None when bubblewrap can build evo's sandbox here; otherwise why not, with the fix."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}"
    argv = command([sys.executable, "-I", "-c", "import torch"])
    try:
        done = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap could not start ({e})"
    if done.returncode != 0:
        said = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return (f"bubblewrap is installed but refused to build the sandbox ({said}); unprivileged user "
                "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, or run as root)")
    return None


def command(argv: list[str], readable: tuple[Path, ...] = (), workdir: Path | None = None,
            files: tuple[tuple[int, str], ...] = (), gpu: int | None = None, cuda: bool = False,
            tmp_mb: int = 4096, info_fd: int | None = None, hidden: tuple[str, ...] = (),
            stub: Path | None = None) -> list[str]:
    """The bwrap command line that runs argv in the sandbox.

    `readable` paths are bound read-only where they are. `workdir` becomes a size-capped tmpfs
    (memory, counted and gone with the sandbox, so it can fill no disk) and the cwd, holding
    `files` copied in from open descriptors (fd, name). Each `hidden` file (evaluation text of
    the embedded corpus) and its cached bytecode are covered by `stub`.
    """
    size = ["--size", str(tmp_mb * 2**20)]
    # --disable-userns: no nested user namespace, so no nested PID namespace to hide processes in.
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "evo-sandbox", "--proc", "/proc", "--dev", "/dev",
            *size, "--tmpfs", "/tmp", *size, "--tmpfs", "/dev/shm"]
    for link in ROOT_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    for path in SYSTEM_DIRS:
        args += ["--ro-bind-try", path, path]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for other in _other_stdlibs():  # another Python's copy of the standard library, e.g. the system's
        args += ["--tmpfs", other]
    for path in _python_paths():
        args += _bind("--ro-bind", path)
    for path in hidden if stub is not None else ():
        for target in [path, *glob.glob(os.path.join(os.path.dirname(path), "__pycache__",
                                                      os.path.basename(path)[:-3] + ".*.pyc"))]:
            args += ["--ro-bind-try", str(stub), target]
    for path in readable:
        args += _bind("--ro-bind", Path(path))
    if cuda:
        args += _gpu_nodes(gpu)
    if workdir is not None:
        args += [*size, "--tmpfs", str(workdir), "--chdir", str(workdir)]
        for fd, name in files:
            args += ["--file", str(fd), str(Path(workdir) / name)]
    # Nothing else is writable: the root and /dev are tmpfs that bwrap made, and a file there
    # would be memory that no limit counts.
    args += ["--remount-ro", "/dev", "--remount-ro", "/"]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    return args + ["--", *argv]


def inside(namespace_pid: int, path: Path) -> Path:
    """A path as the sandbox sees it, reached from outside through its first process's root."""
    return Path(f"/proc/{namespace_pid}/root") / Path(path).relative_to("/")


def child_pid(info_fd: int) -> int | None:
    """The sandbox's first process as the host numbers it (bwrap writes it to --info-fd, then closes it)."""
    with os.fdopen(info_fd, "rb") as f:
        raw = f.read(4096)
    try:
        return int(json.loads(raw)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _bind(flag: str, path: Path) -> list[str]:
    """Bind a path where the process expects it, and at its real location if a link leads there."""
    real = os.path.realpath(path)
    pairs = [(real, real)] + ([(real, str(path))] if str(path) != real else [])
    return [part for source, dest in pairs for part in (flag, source, dest)]


def visible_roots() -> list[str]:
    """Folders a sandboxed process can read beyond its own (other Pythons' standard libraries aside)."""
    return [d for d in SYSTEM_DIRS if os.path.isdir(d)] + [str(p) for p in _python_paths() if p.is_dir()]


def _python_paths() -> list[Path]:
    """The interpreter, its standard library and site-packages, and evo's hand-over code."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
    user_site = site.getusersitepackages()
    if isinstance(user_site, str) and os.path.isdir(user_site):
        paths.add(user_site)
    paths.update({prepare.__file__, os.path.dirname(trainer.__file__)})  # an editable install lives in the checkout
    return [Path(p) for p in sorted(paths) if not _under_system(p)]


@functools.lru_cache(maxsize=1)
def _other_stdlibs() -> tuple[str, ...]:
    """Standard-library folders of Pythons other than this one (the system's, one bundled with a
    cloud SDK, ...) under /usr: each holds copies of the embedded corpus's evaluation text."""
    ours = os.path.realpath(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk("/usr"):
        if {"os.py", "abc.py", "codecs.py"} <= set(filenames) and "encodings" in dirnames:
            if os.path.realpath(dirpath) != ours:
                found.append(dirpath)
            dirnames[:] = []
    return tuple(sorted(found))


def _under_system(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d + "/") for d in SYSTEM_DIRS)


def _gpu_nodes(gpu: int | None) -> list[str]:
    """The NVIDIA control nodes and the worker's GPU (all GPUs when it was given none)."""
    nodes = list(NVIDIA_CONTROL)
    minors = _gpu_minors()
    if gpu is not None and gpu < len(minors):
        nodes.append(f"/dev/nvidia{minors[gpu]}")
    else:
        nodes += [f"/dev/nvidia{m}" for m in minors]
    return [part for node in nodes for part in ("--dev-bind-try", node, node)]


def _gpu_minors() -> list[int]:
    """Device minor numbers in PCI bus order, the order CUDA_DEVICE_ORDER=PCI_BUS_ID numbers GPUs."""
    root = Path("/proc/driver/nvidia/gpus")
    minors = []
    for bus in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            for line in (bus / "information").read_text().splitlines():
                if line.startswith("Device Minor:"):
                    minors.append(int(line.split(":")[1]))
        except (OSError, ValueError):
            continue
    if not minors:  # no driver information: number the device nodes instead
        minors = sorted(int(p.name[6:]) for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit())
    return minors
