"""Writing files so that a crash at any instant leaves the old file or the new one, never half.

Every file that resume relies on (checkpoints, config.yaml, run.json, each variant's train.py,
result.json and metrics.json, llm_usage.json) is written by write_atomic. (prepare.py keeps its
own few lines for the same thing: variants import it standalone.)
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Temp file beside it, fsync, os.replace, fsync of the folder: a reader sees the whole old
    file or the whole new one, and after a power cut the new one is there once this returned.

    The temp file has a name of its own (two writers of one path never share it) and is created
    exclusively, so nothing already at that name (a symlink, say) is followed. On an error it is
    removed; only a kill at the wrong instant can leave one behind (`.NAME.*.tmp`, safe to delete).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # 0o666 & ~umask, as open()
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable. File systems that cannot sync a folder are skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
