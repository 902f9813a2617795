"""A full backing store: ENOSPC reaches the writer, nothing already written is lost."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount


@pytest.fixture
def small_backing(tmp_path: Path):
    backing = tmp_path / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(backing)], check=True, timeout=30)
    try:
        yield backing
    finally:
        subprocess.run(["umount", str(backing)], capture_output=True, timeout=30)
        if os.path.ismount(backing):
            subprocess.run(["umount", "-l", str(backing)], capture_output=True, timeout=30)


def test_enospc_reaches_the_writer_and_nothing_is_lost(tmp_path: Path, fs_home: Path, small_backing: Path) -> None:
    cipher, plain = small_backing / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    keep = os.urandom(1 << 20)
    with Mount(cipher, plain, fs_home) as m:
        with open(plain / "keep.bin", "wb") as f:
            f.write(keep)
            os.fsync(f.fileno())
        with pytest.raises(OSError) as info:
            with open(plain / "huge.bin", "wb") as f:
                for _ in range(16):  # 16 MiB into an 8 MiB store
                    f.write(os.urandom(1 << 20))
                os.fsync(f.fileno())  # with the writeback cache, the error may surface here
        assert info.value.errno in (errno.ENOSPC, errno.EIO), info.value
        assert m.proc.poll() is None, "the daemon must survive a full disk"
        assert (plain / "keep.bin").read_bytes() == keep
        os.unlink(plain / "huge.bin")
        (plain / "after.txt").write_text("space again")
    with Mount(cipher, plain, fs_home):
        assert (plain / "keep.bin").read_bytes() == keep
        assert (plain / "after.txt").read_text() == "space again"
        assert sorted(os.listdir(plain)) == ["after.txt", "keep.bin"]
