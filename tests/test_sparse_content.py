"""Sparse files without a mount (issue #22 part 2): holes recorded in the authenticated state,
EFBIG, fallocate modes, SEEK_DATA/SEEK_HOLE, and the crash orders of a punch, on FileContent
directly (docs/FORMAT.md §6.4 "Holes"). A crash is a content dropped where the daemon would have
died (test_content_recovery.py's model: the page cache keeps what was written)."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from content_files import FILE_ID, BackingFile

from encfs.blocks import BlockAuthError, BlockCipher, sealed_offset, sealed_size
from encfs.diskio import fallocate
from encfs.fuse import content as content_mod
from encfs.fuse import contentwrite, rekeyfile, sparse
from encfs.fuse.content import FileContent, max_file_size
from encfs.fuse.fileheader import STATE_XATTR, V2, FileHeader, read_state
from encfs.fuse.fsckcontent import read_blocks
from encfs.fuse.holes import HOLES_MAX, Holes

B = 32768
STEP = B + 28
GIB = 1 << 30
PUNCH_KEEP = sparse.FALLOC_FL_PUNCH_HOLE | sparse.FALLOC_FL_KEEP_SIZE


class Files(BackingFile):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, B, sparse=True)

    def load(self, after_crash: bool = True, check_key: bool = True) -> FileContent:
        c, _notes = self.open(after_crash=after_crash)
        if check_key:
            c.check_key()  # as the daemon does before a write (openfiles.writable_content)
        return c


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.fixture
def shm_files() -> Iterator[Files]:
    """On tmpfs, which takes files up to 2^63 - 1 bytes (ext4 stops at 16 TiB)."""
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="encfs-sparse-"))
    yield Files(d)
    for p in sorted(d.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    d.rmdir()


def crash(c: FileContent) -> None:
    c.release_fds()


def test_truncate_up_leaves_holes_that_read_zeros(files: Files) -> None:
    c = files.create()
    c.write(0, b"a" * 100)
    start = time.monotonic()
    c.truncate(2 * GIB)
    assert time.monotonic() - start < 1
    assert files.allocated() < 1 << 20 and os.path.getsize(files.path) == sealed_size(2 * GIB, 128, B)
    assert bytes(c.read(GIB, 10)) == bytes(10) and bytes(c.read(0, 200)) == b"a" * 100 + bytes(100)
    c.close()
    c = files.load(after_crash=False)  # the holes are in the state
    assert c.size == 2 * GIB and bytes(c.read(2 * GIB - 5, 10)) == bytes(5)
    assert read_state(c.fd, c.cipher).holes == ((1, 2 * GIB // B - 1),)  # type: ignore[union-attr]
    c.close()


def test_a_write_far_past_the_end_leaves_a_hole(files: Files) -> None:
    c = files.create()
    c.write(GIB + 7, b"hello")
    assert files.allocated() < 1 << 20
    assert bytes(c.read(GIB, 20)) == bytes(7) + b"hello" + bytes(0)
    c.fsync(False)
    crash(c)
    c = files.load()
    assert bytes(c.read(GIB + 5, 9)) == b"\0\0hello" and bytes(c.read(12345, 3)) == bytes(3)
    c.close()


def test_a_small_gap_is_filled_with_sealed_zeros(files: Files) -> None:
    c = files.create()
    c.write(0, b"x")
    c.write(3 * B, b"y")  # a gap under HOLE_MIN: no state write, no extent
    assert not c.holes and bytes(c.read(0, 3 * B + 1)) == b"x" + bytes(3 * B - 1) + b"y"
    c.close()


def test_zeroed_or_punched_data_blocks_read_eio_holes_read_zeros(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(4 * B))
    c.truncate(64 * B)  # blocks 4.. are holes
    c.close()
    fd = os.open(files.path, os.O_RDWR)
    os.pwrite(fd, bytes(STEP), sealed_offset(1, 128, B))  # zero a data block
    fallocate(fd, PUNCH_KEEP, sealed_offset(2, 128, B), STEP)  # punch another
    os.close(fd)
    c = files.load(after_crash=False)
    for k in (1, 2):
        with pytest.raises(BlockAuthError):
            c.read(k * B, 1)
    assert bytes(c.read(10 * B, B)) == bytes(B)
    c.close()


def test_efbig_past_the_largest_file_returns_at_once(files: Files) -> None:
    c = files.create()
    top = max_file_size(B)
    assert sealed_size(top, 128, B) <= (1 << 63) - 1 < sealed_size(top + 1, 128, B)
    start = time.monotonic()
    for op in (lambda: c.truncate((1 << 63) - 1), lambda: c.truncate(top + 1), lambda: c.write(top, b"xy"),
               lambda: sparse.fallocate_content(c, 0, top, 2)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EFBIG
    assert time.monotonic() - start < 1 and c.size == 0
    c.close()


def test_far_writes_and_truncates_return_at_once_on_tmpfs(shm_files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = shm_files.create()
    written = [0]
    real = content_mod.pwrite_all

    def bounded(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        written[0] += len(data)  # a regression fails here instead of filling the machine's memory
        assert written[0] < 64 << 20, "writes zeros instead of leaving holes"
        real(fd, data, offset)

    for module in (content_mod, contentwrite):  # the checkpoint's writes, and every block a write places
        monkeypatch.setattr(module, "pwrite_all", bounded)
    start = time.monotonic()
    c.write(16 << 40, b"far")
    c.truncate(1 << 50)  # 1 PiB
    c.truncate(max_file_size(B))
    assert time.monotonic() - start < 2 and shm_files.allocated() < 1 << 20
    assert bytes(c.read(16 << 40, 4)) == b"far\0"
    c.truncate(5)
    c.close()


def test_a_backing_store_that_refuses_the_size_gives_efbig_and_changes_nothing(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    c.write(0, b"keep")

    real = os.ftruncate

    def refuse(fd: int, length: int) -> None:  # as ext4 does past 16 TiB
        if length > 1 << 44:
            raise OSError(errno.EFBIG, "File too large")
        real(fd, length)

    monkeypatch.setattr(os, "ftruncate", refuse)
    with pytest.raises(OSError) as e:
        c.truncate(17 << 40)
    monkeypatch.undo()
    assert e.value.errno == errno.EFBIG and c.size == 4 and not c.holes
    assert bytes(c.read(0, 10)) == b"keep"
    c.close()
    c = files.load(after_crash=False)
    assert bytes(c.read(0, 10)) == b"keep"
    c.close()


def test_the_hole_list_is_bounded_by_materialising_the_smallest(files: Files) -> None:
    c = files.create()
    c.truncate(4 * (HOLES_MAX + 20) * B)
    data = {}
    for i in range(HOLES_MAX + 10):  # one data block every 4: as many extents as data blocks
        at = (4 * i + 2) * B
        data[at] = os.urandom(10)
        c.write(at, data[at])
    c.fsync(False)
    # a punch of 3 blocks each time: every one would be a new extent
    for i in range(HOLES_MAX + 10):
        sparse.punch(c, (4 * i + 2) * B, (4 * i + 3) * B)
        assert len(c.holes) <= HOLES_MAX and len(read_state(c.fd, c.cipher).holes) <= HOLES_MAX  # type: ignore[union-attr]
    assert len(os.getxattr(files.path, STATE_XATTR)) < 1200
    assert bytes(c.read(0, c.size)) == bytes(c.size)
    c.close()
    c = files.load(after_crash=False)
    assert bytes(c.read(0, c.size)) == bytes(c.size)
    c.close()


def test_fallocate_modes(files: Files) -> None:
    c = files.create()
    data = os.urandom(6 * B)
    c.write(0, data)
    c.fsync(False)
    sparse.fallocate_content(c, PUNCH_KEEP, 100, 3 * B)  # partial edges rewritten, blocks 1, 2 holes
    want = data[:100] + bytes(3 * B) + data[100 + 3 * B:]
    assert bytes(c.read(0, 6 * B)) == want and 1 in c.holes and 2 in c.holes and 0 not in c.holes
    sparse.fallocate_content(c, sparse.FALLOC_FL_ZERO_RANGE, 5 * B, 3 * B)  # extends the size
    want = want[:5 * B] + bytes(3 * B)
    assert c.size == 8 * B and bytes(c.read(0, 8 * B)) == want
    before = files.allocated()
    sparse.fallocate_content(c, sparse.FALLOC_FL_KEEP_SIZE, 0, 20 * B)  # space for the holes and past the end
    assert c.size == 8 * B and files.allocated() >= before + 14 * STEP
    sparse.fallocate_content(c, 0, 0, 20 * B)  # plain: extends (holes, allocated above)
    assert c.size == 20 * B
    assert bytes(c.read(0, 20 * B)) == want + bytes(12 * B)
    for mode in (0x08, 0x20, 0x40, sparse.FALLOC_FL_PUNCH_HOLE | sparse.FALLOC_FL_ZERO_RANGE):
        with pytest.raises(OSError) as e:
            sparse.fallocate_content(c, mode, 0, B)
        assert e.value.errno == errno.EOPNOTSUPP
    c.close()
    c = files.load(after_crash=False)
    assert bytes(c.read(0, 20 * B)) == want + bytes(12 * B)
    c.close()


def test_seek_data_and_seek_hole(files: Files) -> None:
    c = files.create()
    c.write(0, b"x" * (2 * B))
    c.truncate(10 * B)
    c.write(6 * B + 5, b"y")
    c.truncate(10 * B + 7)
    D, H = sparse.SEEK_DATA, sparse.SEEK_HOLE
    assert sparse.seek(c, 0, D) == 0 and sparse.seek(c, 0, H) == 2 * B
    assert sparse.seek(c, 2 * B + 3, D) == 6 * B and sparse.seek(c, 6 * B + 1, H) == 7 * B
    with pytest.raises(OSError) as e:
        sparse.seek(c, 7 * B, D)  # holes to the end
    assert e.value.errno == errno.ENXIO
    assert sparse.seek(c, 9 * B, H) == 9 * B
    with pytest.raises(OSError) as e:
        sparse.seek(c, 10 * B + 7, H)
    assert e.value.errno == errno.ENXIO
    c.close()


def test_a_write_into_a_hole_goes_in_place_and_counts_once_synced(files: Files) -> None:
    c = files.create()
    c.write(0, b"a")
    c.truncate(64 * B)
    c.write(10 * B, b"new")
    assert 10 not in c.index  # no old version to keep: in place, not journaled
    crash(c)  # not fsync'd: the durable state still calls it a hole
    c = files.load()
    assert bytes(c.read(10 * B, 3)) == bytes(3)
    c.write(10 * B, b"new")
    c.fsync(True)
    crash(c)
    c = files.load()
    assert bytes(c.read(10 * B, 3)) == b"new"
    c.close()


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["state", "punch"])
def test_a_punch_makes_its_hole_durable_before_punching(files: Files, monkeypatch: pytest.MonkeyPatch,
                                                        where: str) -> None:
    """A crash before the state names the hole leaves the old (fsync'd) blocks readable; one
    after it, zeros. Punching first would leave blocks the state calls data punched: EIO."""
    c = files.create()
    data = os.urandom(8 * B)
    c.write(0, data)
    c.fsync(False)
    def die(*args: object) -> None:
        raise Crash

    monkeypatch.setattr(content_mod if where == "state" else sparse, "write_state" if where == "state" else "fallocate",
                        die)
    with pytest.raises(Crash):
        sparse.fallocate_content(c, PUNCH_KEEP, 2 * B, 4 * B)
    monkeypatch.undo()
    crash(c)
    c = files.load()
    got = bytes(c.read(0, 8 * B))
    assert got[:2 * B] == data[:2 * B] and got[6 * B:] == data[6 * B:]
    assert got[2 * B:6 * B] == (data[2 * B:6 * B] if where == "state" else bytes(4 * B))
    c.close()


def test_truncate_down_then_up_reads_zeros_after_a_crash(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(8 * B))
    c.fsync(False)
    c.truncate(B + 10)
    c.truncate(8 * B)
    crash(c)
    c = files.load()
    assert bytes(c.read(B + 10, 7 * B)) == bytes(7 * B - 10)
    c.close()


def test_holes_extents() -> None:
    h = Holes()
    h.add(5, 10)
    h.add(10, 12)
    h.add(0, 2)
    assert h.extents() == ((0, 2), (5, 7))
    h.remove(6, 8)
    assert h.extents() == ((0, 2), (5, 1), (8, 4))
    assert list(h.segments(1, 10)) == [(1, 2, True), (2, 5, False), (5, 6, True), (6, 8, False), (8, 10, True)]
    assert h.last_data_before(12) == 7 and h.next_data(8) == 12 and h.next_hole(2) == 5
    h.clip(9)
    assert h.extents() == ((0, 2), (5, 1), (8, 1))


def test_a_rekey_keeps_holes_as_holes(files: Files) -> None:
    c = files.create()
    data = os.urandom(3 * B)
    c.write(0, data)
    c.truncate(GIB)
    c.write(GIB - 10, b"end")
    c.fsync(False)
    new_id, new_key = bytes(range(16, 32)), bytes(range(1, 33))
    rekeyfile.rekey(c, FileHeader(new_id, bytes(93), V2), BlockCipher(new_key, new_id, B))
    assert c.header.file_id == new_id and files.allocated() < 1 << 20
    assert bytes(c.read(0, 3 * B + 10)) == data + bytes(10) and bytes(c.read(GIB - 12, 12)) == b"\0\0end" + bytes(7)
    c.close()
    fd = os.open(files.path, os.O_RDWR)
    c = FileContent(fd, FileHeader.parse(os.pread(fd, 128, 0)), BlockCipher(new_key, new_id, B), files.root, set())
    c.load(True)
    assert c.holes.extents() == ((3, GIB // B - 4),) and bytes(c.read(GIB - 10, 3)) == b"end"
    c.close()


def test_fsck_reads_data_blocks_and_skips_holes(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.truncate(100 * B)
    c.write(50 * B, b"x" * B)
    c.close()
    fd = os.open(files.path, os.O_RDWR)
    os.pwrite(fd, bytes(STEP), sealed_offset(50, 128, B))  # a data block zeroed: damage
    os.close(fd)
    c = files.load(after_crash=False, check_key=False)
    assert list(read_blocks(c, None)) == [50]  # the holes around it are not opened
    c.close()


def test_a_write_into_a_hole_survives_a_clean_close_without_fsync(files: Files) -> None:
    c = files.create()
    c.truncate(64 * B)
    c.write(10 * B, b"kept")
    c.close()
    c = files.load(after_crash=False)
    assert bytes(c.read(10 * B, 4)) == b"kept" and 10 not in c.holes
    c.close()


def test_scattered_writes_into_a_hole_keep_the_state_within_holes_max(files: Files) -> None:
    """Writes into the middle of a hole split it: the state sealed at close must still load
    (more than HOLES_MAX extents fail like a damaged state, and every hole then reads EIO)."""
    c = files.create()
    c.write(0, b"H" * 100)
    c.truncate(1000 * B)  # `truncate -s`: one extent
    for i in range(70):  # scattered small writes (mkfs, a VM image)
        c.write((10 + 10 * i) * B + 5, b"data")
    assert len(c.holes) <= HOLES_MAX
    c.close()
    assert len(c.state.holes) <= HOLES_MAX
    c = files.load(after_crash=False)
    assert len(c.holes) == HOLES_MAX
    for i in range(70):
        assert bytes(c.read((10 + 10 * i) * B, 10)) == bytes(5) + b"data" + bytes(1)
        assert bytes(c.read((11 + 10 * i) * B, 10)) == bytes(10)  # a hole or written zeros
    assert bytes(c.read(0, 101)) == b"H" * 100 + bytes(1) and c.size == 1000 * B
    c.close()


def _power_loss_keeps_fsynced_xattr(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytes]:
    """Record the state xattr at each fsync of a file: what a power loss keeps (an fdatasync
    need not write an xattr, and nothing else does)."""
    durable: dict[int, bytes] = {}
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        try:
            durable[fd] = os.getxattr(fd, STATE_XATTR)
        except OSError:
            pass
    monkeypatch.setattr(os, "fsync", fsync)
    return durable


def test_a_write_into_a_hole_that_fsync_acknowledged_survives_a_power_loss(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    c.write(0, b"A" * B)
    c.truncate(10 * B)
    c.fsync(False)
    durable = _power_loss_keeps_fsynced_xattr(monkeypatch)
    c.write(5 * B, b"Z" * 100)  # fills a hole, in place
    c.fsync(False)  # acknowledged
    c.write(5 * B, b"Y" * 10)  # an overwrite of it: journaled
    c.fsync(True)  # acknowledged (only the journal is synced)
    os.setxattr(c.fd, STATE_XATTR, durable[c.fd])  # the power loss
    crash(c)
    c = files.load()
    assert bytes(c.read(5 * B, 101)) == b"Y" * 10 + b"Z" * 90 + bytes(1)
    assert 5 not in c.holes and bytes(c.read(4 * B, 10)) == bytes(10)
    c.close()


def test_a_crash_inside_a_truncate_down_keeps_the_old_tails_holes(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    c.write(0, b"A" * B)
    c.truncate(40 * B)  # holes 1..39
    c.write(39 * B, b"T" * B)  # a data block at the end
    c.fsync(False)

    def die(fd: int, length: int) -> None:
        raise KeyboardInterrupt("killed before the ftruncate")
    monkeypatch.setattr(os, "ftruncate", die)
    with pytest.raises(KeyboardInterrupt):
        c.truncate(2 * B)
    monkeypatch.undo()
    crash(c)
    c = files.load()  # the old length: its holes read zeros, its data its old contents
    assert c.size == 40 * B and bytes(c.read(10 * B, 10)) == bytes(10)
    assert bytes(c.read(39 * B - 1, 3)) == b"\0TT"
    c.truncate(2 * B)  # and the truncate, done again, drops them
    c.fsync(False)
    assert read_state(c.fd, c.cipher).holes == ((1, 1),)  # type: ignore[union-attr]
    c.close()


def test_a_rekey_killed_before_its_new_state_keeps_a_sparse_files_holes(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 inside step 2 of a re-key: the header keeps the old id until the new state is
    durable, so the side file stays pending and the next load copies it back again (a new
    header over the old state lost the state, and the holes read EIO for good)."""
    c = files.create()
    c.write(0, b"A" * B)
    c.truncate(10 * B)
    c.write(9 * B, b"B" * B)
    c.fsync(False)
    new_id, new_key = bytes(range(16, 32)), bytes(range(32, 64))
    target = c.fd
    real_setxattr = os.setxattr

    def setxattr(fd: int, name: str, value: bytes, *a: int) -> None:
        if fd == target:
            raise KeyboardInterrupt("killed before the state")
        real_setxattr(fd, name, value, *a)
    monkeypatch.setattr(os, "setxattr", setxattr)
    with pytest.raises(KeyboardInterrupt):
        rekeyfile.rekey(c, FileHeader(new_id, bytes(93), V2), BlockCipher(new_key, new_id, B))
    monkeypatch.undo()
    crash(c)
    fd = os.open(files.path, os.O_RDWR)
    assert FileHeader.parse(os.pread(fd, 128, 0)).file_id == FILE_ID  # the old id: still pending
    assert rekeyfile.pending(files.root, False) == {FILE_ID}
    rekeyfile.complete(files.root, FILE_ID, fd)  # what the next load does (openload._finish_rekey)
    h = FileHeader.parse(os.pread(fd, 128, 0))
    assert h.file_id == new_id
    c = FileContent(fd, h, BlockCipher(new_key, new_id, B), files.root, files.journals)
    assert c.load(True, after_crash=True) == []
    assert c.holes.extents() == ((1, 8),)
    assert bytes(c.read(0, 2)) == b"AA" and bytes(c.read(3 * B, 4)) == bytes(4)
    assert bytes(c.read(9 * B, 2)) == b"BB"
    c.close()


def test_recovery_cuts_off_a_torn_append_that_follows_a_hole(files: Files) -> None:
    c = files.create()
    c.write(0, b"A" * B)
    c.fsync(False)
    c.write(64 * B, b"X" * 100)  # a 2 MiB gap: holes 1..63, block 64 in place
    assert c.holes.extents() == ((1, 63),)
    os.pwrite(c.fd, bytes(128), sealed_offset(64, 128, B))  # torn by a power loss: the size got there
    crash(c)
    c = files.load()
    assert c.size == 64 * B and bytes(c.read(63 * B, 10)) == bytes(10)
    assert os.path.getsize(files.path) == sealed_offset(64, 128, B)
    c.write(c.size, b"more")  # and the file takes appends again
    assert bytes(c.read(64 * B - 2, 10)) == bytes(2) + b"more"
    c.close()
