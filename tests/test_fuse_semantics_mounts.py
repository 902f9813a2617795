"""POSIX semantics of a real encfs mount, across mounts: read-only, remount, kill -9, a tampered backing store.

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in tests/semantics_helpers.py).
Every test starts its own mounts of a fresh filesystem. The whole module runs once per FUSE server
(``encfs mount --server``): our own protocol server, the default, and pyfuse3. Reads that must reach
the daemon (not the kernel page cache) go through a fresh open() (FUSE drops the file's cached pages on
open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fuse_helpers import Mount, cold_pread, cold_read, expect_errno
from semantics_helpers import (  # noqa: F401  (server_fixture: runs the module once per server)
    BLOCK_SIZES,
    RENAME_EXCHANGE,
    new_mount,
    renameat2,
    serve,
    server_fixture,
)

BLOCK = 32768  # the default, for tests that do not depend on it
HEADER = 128


# -- mounts: read-only, remount, crash ---------------------------------------------------------------


def test_read_only_mount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        (mp / "f").write_bytes(b"content")
        (mp / "dir").mkdir()
        os.symlink("f", mp / "ln")
        os.setxattr(mp / "f", "user.k", b"v")
    with new_mount(tmp_path, fs_home, "--read-only") as m:
        mp = m.mountpoint
        assert cold_read(mp / "f") == b"content" and os.readlink(mp / "ln") == "f"
        assert os.getxattr(mp / "f", "user.k") == b"v"
        assert sorted(os.listdir(mp)) == ["dir", "f", "ln"]
        expect_errno(errno.EROFS, os.open, mp / "f", os.O_WRONLY)
        expect_errno(errno.EROFS, os.open, mp / "f", os.O_RDONLY | os.O_TRUNC)
        expect_errno(errno.EROFS, os.open, mp / "new", os.O_CREAT | os.O_WRONLY)
        expect_errno(errno.EROFS, os.mkdir, mp / "d2")
        expect_errno(errno.EROFS, os.unlink, mp / "f")
        expect_errno(errno.EROFS, os.rmdir, mp / "dir")
        expect_errno(errno.EROFS, os.rename, mp / "f", mp / "g")
        expect_errno(errno.EROFS, os.symlink, "x", mp / "ln2")
        expect_errno(errno.EROFS, os.link, mp / "f", mp / "hl")
        expect_errno(errno.EROFS, os.chmod, mp / "f", 0o600)
        expect_errno(errno.EROFS, os.truncate, mp / "f", 0)
        expect_errno(errno.EROFS, os.setxattr, mp / "f", "user.k", b"w")
        expect_errno(errno.EROFS, os.removexattr, mp / "f", "user.k")
        expect_errno(errno.EROFS, os.utime, mp / "f", ns=(1, 1))
        expect_errno(errno.EROFS, os.mkfifo, mp / "fifo")
        assert cold_read(mp / "f") == b"content"
        assert m.proc.poll() is None


def _populate(mp: Path) -> dict[str, bytes]:
    files = {"f": os.urandom(3 * BLOCK + 17), "dir/g": b"g" * 5000, "dir/" + "L" * 255: b"long",
             "empty": b""}
    (mp / "dir").mkdir()
    (mp / "other").mkdir()
    for name, data in files.items():
        with open(mp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.symlink("dir/g", mp / "ln")
    os.symlink("x" * 3500, mp / "longlink")
    os.link(mp / "f", mp / "other" / "f-link")
    os.setxattr(mp / "f", "user.key", b"value")
    (mp / "a").write_bytes(b"A")
    (mp / "other" / "b").mkdir()
    renameat2(mp / "a", mp / "other" / "b", RENAME_EXCHANGE)
    files["other/f-link"] = files["f"]
    for p in (mp, mp / "dir", mp / "other"):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    return files


def _verify(mp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert cold_read(mp / name) == data, name
        assert os.stat(mp / name).st_size == len(data)
    assert os.stat(mp / "f").st_nlink == 2
    assert os.readlink(mp / "ln") == "dir/g" and cold_read(mp / "ln") == files["dir/g"]
    assert os.readlink(mp / "longlink") == "x" * 3500
    assert os.getxattr(mp / "f", "user.key") == b"value"
    assert (mp / "a").is_dir() and cold_read(mp / "other" / "b") == b"A"
    assert sorted(os.listdir(mp)) == ["a", "dir", "empty", "f", "ln", "longlink", "other"]
    assert sorted(os.listdir(mp / "dir")) == sorted(["g", "L" * 255])


def test_data_survives_unmount_and_remount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        files = _populate(m.mountpoint)
        _verify(m.mountpoint, files)
    with new_mount(tmp_path, fs_home) as m:
        _verify(m.mountpoint, files)


def test_names_in_directories_reusing_freed_inodes_survive_remount(tmp_path: Path, fs_home: Path) -> None:
    """A directory replaced by rename frees its backing inode while the kernel still holds it (an
    open fd, like a shell's cwd); ext4 hands that number to the next new directory."""
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        for i in range(5):
            (mp / f"a{i}").mkdir()
            (mp / f"b{i}").mkdir()
            held = os.open(mp / f"b{i}", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.listdir(held)
                os.rename(mp / f"a{i}", mp / f"b{i}")
                for k in range(3):
                    (mp / f"c{i}-{k}").mkdir()
                    (mp / f"c{i}-{k}" / "f").write_bytes(b"%d" % i)
                    assert os.listdir(mp / f"c{i}-{k}") == ["f"]
            finally:
                os.close(held)
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        for i in range(5):
            for k in range(3):
                assert os.listdir(mp / f"c{i}-{k}") == ["f"], (i, k)
                assert cold_read(mp / f"c{i}-{k}" / "f") == b"%d" % i


def test_fsynced_data_survives_kill9(tmp_path: Path, fs_home: Path) -> None:
    m = new_mount(tmp_path, fs_home)
    try:
        files = _populate(m.mountpoint)
        fd = os.open(m.mountpoint / "f", os.O_WRONLY)
        os.pwrite(fd, b"after", 10)
        os.fsync(fd)
        files["f"] = files["f"][:10] + b"after" + files["f"][15:]
        files["other/f-link"] = files["f"]
        m.kill9()  # the fd dies with the mount
        try:
            os.close(fd)
        except OSError:
            pass
    finally:
        m.stop()
    assert m.proc.returncode is not None
    with new_mount(tmp_path, fs_home) as m2:
        _verify(m2.mountpoint, files)
        (m2.mountpoint / "after-crash").write_bytes(b"ok")
        assert cold_read(m2.mountpoint / "after-crash") == b"ok"


# -- tampering with the backing store (through a fresh mount) ----------------------------------------


def _create_tracked(m: Mount, name: str, data: bytes) -> Path:
    """Create ``name`` in the mount root; returns its backing file."""
    before = {p.name for p in m.cipherdir.iterdir()}
    (m.mountpoint / name).write_bytes(data)
    new = [p for p in m.cipherdir.iterdir() if p.name not in before and "." not in p.name]
    assert len(new) == 1
    return new[0]


def _assert_eio(fn, *args) -> None:
    expect_errno(errno.EIO, fn, *args)


@pytest.fixture(params=BLOCK_SIZES, ids=lambda b: f"{b // 1024}k")
def tamper_setup(request: pytest.FixtureRequest, tmp_path: Path, fs_home: Path):
    """A victim of 4 blocks and a bystander, written through a mount that is then stopped.

    Returns (backing file, victim plaintext, remount(), healthy(mount), block size)."""
    block = request.param
    m = new_mount(tmp_path, fs_home, block=block)
    try:
        victim = os.urandom(4 * block)
        other = os.urandom(2 * block + 99)
        backing = _create_tracked(m, "victim", victim)
        _create_tracked(m, "other", other)
    finally:
        m.stop()

    def remount() -> Mount:
        return serve(m.cipherdir, m.mountpoint, fs_home)

    def healthy(m2: Mount, *more: str) -> None:
        assert m2.proc.poll() is None, "daemon died"
        assert cold_read(m2.mountpoint / "other") == other
        assert sorted(os.listdir(m2.mountpoint)) == sorted(["other", "victim", *more])

    return backing, victim, remount, healthy, block


def test_tamper_flipped_byte_fails_only_its_block(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    raw = bytearray(backing.read_bytes())
    raw[HEADER + 2 * sealed + 500] ^= 0x01
    backing.write_bytes(raw)
    with remount() as m:
        p = m.mountpoint / "victim"
        assert os.stat(p).st_size == len(victim)
        for blk in (0, 1, 3):
            assert cold_pread(p, block, blk * block) == victim[blk * block:(blk + 1) * block], blk
        _assert_eio(cold_pread, p, block, 2 * block)
        _assert_eio(cold_pread, p, 1, 3 * block - 1)
        _assert_eio(cold_read, p)
        healthy(m)


def test_tamper_swapped_blocks_fail(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    raw = bytearray(backing.read_bytes())
    b0 = raw[HEADER:HEADER + sealed]
    raw[HEADER:HEADER + sealed] = raw[HEADER + sealed:HEADER + 2 * sealed]
    raw[HEADER + sealed:HEADER + 2 * sealed] = b0
    backing.write_bytes(raw)
    with remount() as m:
        p = m.mountpoint / "victim"
        _assert_eio(cold_pread, p, block, 0)
        _assert_eio(cold_pread, p, block, block)
        assert cold_pread(p, 2 * block, 2 * block) == victim[2 * block:]
        healthy(m)


def test_tamper_swapped_headers_fail(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    # a third file to swap headers with
    with remount() as m:
        third = _create_tracked(m, "third", os.urandom(block * 2))
    a, b = bytearray(backing.read_bytes()), bytearray(third.read_bytes())
    a[:HEADER], b[:HEADER] = b[:HEADER], a[:HEADER]
    backing.write_bytes(a)
    third.write_bytes(b)
    with remount() as m:
        for name in ("victim", "third"):
            _assert_eio(cold_pread, m.mountpoint / name, 10, 0)
            _assert_eio(cold_read, m.mountpoint / name)
        healthy(m, "third")


@pytest.mark.parametrize("tail", [10, 2000])
def test_tamper_truncated_backing_file(tamper_setup, tail: int) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    os.truncate(backing, HEADER + 2 * sealed + tail)
    with remount() as m:
        p = m.mountpoint / "victim"
        assert cold_pread(p, 2 * block, 0) == victim[:2 * block]
        _assert_eio(cold_pread, p, 100, 2 * block)
        _assert_eio(cold_read, p)
        healthy(m)


def test_tamper_damaged_header_fails_open_or_read(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    raw = bytearray(backing.read_bytes())
    raw[5] ^= 0x80  # the key source (a derived key; a wrapped one's blob: test_fs_file_keys)
    backing.write_bytes(raw)
    with remount() as m:
        _assert_eio(cold_read, m.mountpoint / "victim")
        healthy(m)
