"""A CIPHERDIR on a backing store without user xattrs (ramfs): each file's state lives in
encfs.journal/<file id>.state (docs/FORMAT.md §6.4), so fsync works, a file's seal count
lasts across mounts and a file past its budget gets a fresh key, as on any other store."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_encfs
from filestate_tool import set_seals
from fuse_helpers import Mount, cold_read

from encfs.fuse import openfiles
from encfs.fuse.fileheader import REKEY_AT, FileHeader


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "ramfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], check=True, timeout=30)
    try:
        try:
            os.setxattr(where, "user.probe", b"")
        except OSError:
            pass
        else:
            pytest.fail("ramfs kept a user xattr: this test needs a store without them")
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


def states(cipher: Path) -> list[str]:
    journal = cipher / "encfs.journal"
    return sorted(p.name for p in journal.iterdir() if p.name.endswith(".state")) if journal.exists() else []


def file_id(backing: Path) -> str:
    with open(backing, "rb") as f:
        return FileHeader.parse(f.read(128)).file_id.hex()


def test_fsync_counts_and_rekeys_without_user_xattrs(ramfs: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, plain = ramfs / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    data = bytearray(os.urandom(200_000))
    with Mount(cipher, plain, fs_home):
        with open(plain / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())  # it failed with EOPNOTSUPP: the state could not be written
        with open(plain / "f", "r+b") as f:
            f.seek(10)
            f.write(b"again")
            os.fsync(f.fileno())
        data[10:15] = b"again"
    (backing,) = [p for p in cipher.iterdir() if p.is_file() and "." not in p.name]
    assert states(cipher) == [file_id(backing) + ".state"]
    old_id = file_id(backing)
    set_seals(cipher, fs_home, backing, REKEY_AT)  # the count is kept across mounts, in the state file
    with Mount(cipher, plain, fs_home) as m:
        with open(plain / "f", "r+b") as f:
            f.seek(50_000)
            f.write(b"rekeyed")
            os.fsync(f.fileno())
        data[50_000:50_007] = b"rekeyed"
        assert cold_read(plain / "f") == data
    assert "gave it a fresh data key" in m.log.read_text()
    assert file_id(backing) != old_id and states(cipher) == [file_id(backing) + ".state"]
    with Mount(cipher, plain, fs_home):
        assert cold_read(plain / "f") == data
        os.truncate(plain / "f", 0)  # the emptied file's state goes with its key
        assert states(cipher) == []
        with open(plain / "f", "rb+") as f:
            f.write(b"x" * 5000)
            f.flush()
            os.fsync(f.fileno())
        # The fsync's synced size reaches the state about a second later (openfiles.STATE_DELAY)
        deadline = time.monotonic() + 10 * openfiles.STATE_DELAY
        while not states(cipher) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(states(cipher)) == 1
        os.unlink(plain / "f")  # and a file's last link takes its state file along
        assert states(cipher) == []
