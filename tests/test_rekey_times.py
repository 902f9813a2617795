"""A re-key changes no contents, so every file keeps its atime and mtime (the plaintext's are the
backing file's) even when `encfs rekey` (a re-wrap or --full) or `encfs recovery-key add` is killed
with -9 at a chosen point and then run again: kills land where a file's backing file was written
and its times not yet put back. Real token, real CLI processes, real mounts."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
import test_rekey_rewrap
from fuse_helpers import Mount
from rekey_kills import killed_at
from test_rekey_rewrap import ok

from encfs.fuse.names import is_internal
from encfs.fuse.rewrap import MARKER, parse_redo

home = test_rekey_rewrap.home  # the fixture: a home with CMKs "a" and "b"
OLD = 1_600_000_000_000_000_000  # 2020: relatime moves an atime this old at any read


def backing_times(cipher: Path) -> dict[str, tuple[int, int]]:
    """(atime, mtime) of every user backing file, by lstat only: reading would move the atimes."""
    out = {}
    for dirpath, dirs, names in os.walk(cipher):
        dirs[:] = [d for d in dirs if not is_internal(os.fsencode(d))]
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if not is_internal(os.fsencode(n)) and st.st_size:
                out[os.path.relpath(os.path.join(dirpath, n), cipher)] = (st.st_atime_ns, st.st_mtime_ns)
    return out


def make(tmp_path: Path, home: Path) -> tuple[Path, Path, dict[str, bytes], dict[str, tuple[int, int]]]:
    """A filesystem of a few files with random (wrapped) keys, each with old times of its own."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a", "--wrapped-file-keys")
    files = {f"f{i}": os.urandom(size) for i, size in enumerate((1, 5000, 300_000, 70_000, 1_000_003, 9))}
    with Mount(cipher, plain, home):
        for name, data in files.items():
            (plain / name).write_bytes(data)
    for i, name in enumerate(sorted(backing_times(cipher))):
        os.utime(cipher / name, ns=(OLD + i * 10**9 + 7, OLD - 86_400 * 10**9 + i))  # atime after mtime
    return cipher, plain, files, backing_times(cipher)


def check(cipher: Path, plain: Path, home: Path, files: dict[str, bytes], times: dict[str, tuple[int, int]]) -> None:
    assert not (cipher / MARKER).exists()
    assert backing_times(cipher) == times  # before any mount: its reads move atimes, as they should
    with Mount(cipher, plain, home, "-o", "ro"):  # the user sees them (names differ: compared as a set)
        mtimes = {n: (plain / n).stat().st_mtime_ns for n in files}
        for name, data in files.items():
            assert (plain / name).read_bytes() == data, name
    assert sorted(mtimes.values()) == sorted(m for _a, m in times.values())


@pytest.mark.parametrize("point", ["rekeyed", "copying"])
def test_full_killed_after_a_file_was_written_keeps_every_files_times(
        tmp_path: Path, home: Path, point: str) -> None:
    cipher, plain, files, times = make(tmp_path, home)
    killed_at(home, point, 3, "rekey", cipher, "--full", "--key", "b")
    assert (cipher / MARKER).exists()
    ok(home, "rekey", cipher, "--full", "--key", "b")
    check(cipher, plain, home, files, times)


def test_recovery_key_add_killed_after_a_files_rekey_keeps_every_files_times(tmp_path: Path, home: Path) -> None:
    cipher, plain, files, times = make(tmp_path, home)
    rk = tmp_path / "fs.rk"
    killed_at(home, "rekeyed", 2, "recovery-key", "add", cipher, "--new-recovery-key", rk)
    assert (cipher / MARKER).exists()
    ok(home, "recovery-key", "add", cipher, "--new-recovery-key", rk)  # takes the key file the kill left
    check(cipher, plain, home, files, times)


def test_a_rewrap_killed_mid_batch_keeps_every_files_times(tmp_path: Path, home: Path) -> None:
    """The kill lands after the third header of the batch was written and before its times were
    put back; the rerun's replay writes the other headers and must give all of them their times."""
    cipher, plain, files, times = make(tmp_path, home)
    killed_at(home, "header", 3, "rekey", cipher, "--key", "b")
    assert (cipher / MARKER).exists()
    ok(home, "rekey", cipher, "--key", "b")
    check(cipher, plain, home, files, times)


def test_a_version_1_redo_log_of_an_older_encfs_is_still_read() -> None:
    """Its records hold no times: the replay keeps the file's own (None here)."""
    body = struct.pack(">4sB3xI", b"ENCW", 1, 1) + struct.pack(">H", 3) + b"a/b" + bytes(range(128))
    assert parse_redo(body + hashlib.sha256(body).digest(), "log") == [(b"a/b", bytes(range(128)), None)]
