"""write_atomic, the one way evo writes a file that resume relies on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SIZE = 1 << 20  # 1 MiB: each write takes many syscalls, so a plain write would be seen half done


def version(i: int) -> bytes:
    """Version i: one repeated letter, and a length that follows from the letter. A prefix of a
    version, or a mix of two, is no version (a plain write is seen that way mid-write)."""
    letter = i % 26
    return bytes([65 + letter]) * (SIZE + 4096 * letter)


def is_a_whole_version(data: bytes) -> bool:
    return bool(data) and 65 <= data[0] < 65 + 26 and data == version(data[0] - 65)


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "result.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode == plain.stat().st_mode  # the usual permissions (umask), not a temp file's 0600


def test_a_failed_write_atomic_keeps_nothing_half_done(tmp_path):
    target = tmp_path / "population.parquet"
    target.mkdir()  # os.replace cannot put a file over a folder: the write fails after the temp file exists
    (target / "keep").write_text("old")
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["population.parquet"]
    assert (target / "keep").read_text() == "old"
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no-such-folder" / "x", b"data")


def test_a_reader_never_sees_a_partial_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_atomic(target, version(0))
    # A separate process rewrites the file as fast as it can while this one reads it.
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from trainer.files import write_atomic
        from tests.test_files import version
        for i in range(1, 200):
            write_atomic(Path({str(target)!r}), version(i))
        """)])
    try:
        while writer.poll() is None:
            data = target.read_bytes()
            assert is_a_whole_version(data), f"read {len(data)} bytes, not a version the writer wrote"
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert target.read_bytes() == version(199)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
