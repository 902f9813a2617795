"""The volume sector store and header, on a plain image file (no FUSE): format and crash semantics."""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from encfs.block.header import VolumeFormatError, new_header, read_header, write_header
from encfs.block.layout import (
    EXTENT_SECTORS,
    GROUP_SECTORS,
    SECTOR_SIZE,
    SLOT_A,
    SLOT_B,
    image_size,
    map_block_number,
    map_offset,
    sector_offset,
)
from encfs.block.sectors import SectorStore
from encfs.blocks import SEALED_BLOCK, BlockAuthError, BlockCipher
from encfs.keys.blob import BlobHeader, CiphertextBlob

KEY = bytes(range(32))
VID = bytes(range(16))
SECTORS = EXTENT_SECTORS + 100  # two extents


@pytest.fixture
def image(tmp_path: Path):
    path = tmp_path / "vol.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, image_size(SECTORS))
    SectorStore(fd, KEY, VID, SECTORS).format_maps()
    yield fd
    os.close(fd)


def store(fd: int) -> SectorStore:
    """A fresh store on the image: what a restarted daemon sees."""
    return SectorStore(fd, KEY, VID, SECTORS)


def test_unwritten_sectors_read_zero_and_take_no_space(image: int) -> None:
    s = store(image)
    assert s.read(0, 3 * SECTOR_SIZE) == bytes(3 * SECTOR_SIZE)
    assert os.fstat(image).st_blocks * 512 < 256 * 1024  # only headers/maps are allocated


def test_round_trip_any_alignment_and_across_extents(image: int) -> None:
    s = store(image)
    model = bytearray(SECTORS * SECTOR_SIZE)
    rng = random.Random(1)
    for _ in range(60):
        off = rng.randrange(0, len(model) - 20000)
        data = rng.randbytes(rng.randrange(1, 20000))
        s.write(off, data)
        model[off:off + len(data)] = data
    edge = EXTENT_SECTORS * SECTOR_SIZE - 5000
    s.write(edge, b"x" * 10000)
    model[edge:edge + 10000] = b"x" * 10000
    for _ in range(40):
        off = rng.randrange(0, len(model) - 30000)
        assert s.read(off, 30000) == model[off:off + 30000]
    s.flush()
    s2 = store(image)
    assert s2.read(edge - 100, 10200) == model[edge - 100:edge + 10100]


def test_reads_across_mixed_slots_groups_and_extents(image: int) -> None:
    """Reads are served as runs of one slot state; every mix of states reads back right."""
    s = store(image)
    model = bytearray(SECTORS * SECTOR_SIZE)
    rng = random.Random(7)
    first = EXTENT_SECTORS - 450  # spans groups and the boundary between the two extents
    for sector in range(first, first + 540):
        if rng.random() < 0.7:
            data = rng.randbytes(SECTOR_SIZE)
            s.write(sector * SECTOR_SIZE, data)
            model[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] = data
    s.flush()
    for sector in range(first, first + 540, 3):  # these go to the other slot now
        data = rng.randbytes(SECTOR_SIZE)
        s.write(sector * SECTOR_SIZE, data)
        model[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] = data
    states = {s._state(n) for n in range(first, first + 540)}
    assert states == {0, SLOT_A, SLOT_B}
    for start, count in ((first, 540), (first + 1, 255), (EXTENT_SECTORS - 1, 2), (first + 17, 1)):
        assert s.read_sectors(start, count) == model[start * SECTOR_SIZE:(start + count) * SECTOR_SIZE]
    runs = list(s._slot_runs(first, 540))
    assert sum(n for _s, n, _state in runs) == 540
    assert all(s._state(start + k) == state for start, n, state in runs for k in range(n))


def test_a_write_contiguous_in_the_image_across_two_slots(image: int) -> None:
    """A group's slot-B chunk ends where the next group's slot-A chunk starts, so one contiguous
    run in the image can hold sectors of both slots: each must be sealed under its own slot's
    block number."""
    s = store(image)
    last = GROUP_SECTORS - 1  # the last sector of group 0
    s.write(last * SECTOR_SIZE, b"a" * SECTOR_SIZE)
    s.flush()  # persisted in slot A: its next write goes to slot B, sector GROUP_SECTORS to slot A
    assert sector_offset(last, SLOT_B) + SEALED_BLOCK == sector_offset(GROUP_SECTORS, SLOT_A)
    data = os.urandom(2 * SECTOR_SIZE)
    s.write(last * SECTOR_SIZE, data)
    assert s.read(last * SECTOR_SIZE, 2 * SECTOR_SIZE) == data
    s.flush()
    assert store(image).read(last * SECTOR_SIZE, 2 * SECTOR_SIZE) == data


def test_unflushed_writes_roll_back_to_old_contents(image: int) -> None:
    s = store(image)
    s.write(0, b"A" * SECTOR_SIZE)
    s.flush()
    s.write(0, b"B" * SECTOR_SIZE)  # not flushed: a crash now keeps the old contents
    s.write(0, b"C" * SECTOR_SIZE)
    assert s.read(0, 4) == b"CCCC"
    assert store(image).read(0, 4) == b"AAAA"
    s.flush()
    assert store(image).read(0, 4) == b"CCCC"


def test_failed_write_on_a_full_disk_keeps_old_contents(image: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC arrives as a short write, then an error: the map must not name the half-written slots."""
    s = store(image)
    s.write(0, b"old!" * 4 * 1024)  # 4 sectors
    s.flush()
    real_pwrite = os.pwrite
    calls = []

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_pwrite(fd, bytes(data)[:len(data) // 2], offset)  # a short write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError) as e:
        s.write(0, b"new!" * 4 * 1024)
    monkeypatch.undo()
    assert e.value.errno == 28 and len(calls) == 2
    assert s.read(0, 4 * SECTOR_SIZE) == b"old!" * 4 * 1024
    s.flush()
    assert store(image).read(0, 4 * SECTOR_SIZE) == b"old!" * 4 * 1024


def test_torn_write_of_the_inflight_slot_is_harmless(image: int) -> None:
    s = store(image)
    s.write(SECTOR_SIZE, b"old!" * 1024)
    s.flush()
    s.write(SECTOR_SIZE, b"new!" * 1024)
    target = sector_offset(1, SLOT_B)
    os.pwrite(image, b"\0" * 1000, target + 2000)  # the write was torn by a crash
    assert store(image).read(SECTOR_SIZE, 4) == b"old!"


class Crash(BaseException):
    """The process dies here (kill -9, power loss): nothing after it runs."""


def _crash_at_map_write(monkeypatch: pytest.MonkeyPatch, image: int, slot: int, torn: bool) -> None:
    """The next pwrite to map slot ``slot`` of extent 0 writes half its bytes (``torn``) or none, then the
    process dies."""
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if fd == image and offset == map_offset(0, slot):
            if torn:
                real(fd, bytes(data)[:len(data) // 2], offset)
            raise Crash
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def _seq(fd: int, extent: int, slot: int) -> int | None:
    """The sequence number in a map slot, None if it fails authentication."""
    try:
        plain = BlockCipher(KEY, VID + b"map").open(map_block_number(extent, slot),
                                                    os.pread(fd, SEALED_BLOCK, map_offset(extent, slot)))
    except BlockAuthError:
        return None
    return int.from_bytes(plain[:8], "big")


def _write_old_then_new(image: int) -> SectorStore:
    s = store(image)
    s.write(0, b"O" * SECTOR_SIZE)
    s.flush()
    s.write(0, b"N" * SECTOR_SIZE)
    s.flush()
    return s


def test_flush_commits_to_one_map_slot_and_mirrors_into_the_other(image: int) -> None:
    s = _write_old_then_new(image)
    assert _seq(image, 0, 0) == _seq(image, 0, 1) == s._maps[0].seq  # at rest: two copies of the newest
    committed = s._maps[0].slot
    s.write(0, b"3" * SECTOR_SIZE)
    s.flush()
    assert s._maps[0].slot == 1 - committed  # each flush commits to the slot the last one mirrored into
    assert _seq(image, 0, 0) == _seq(image, 0, 1)


@pytest.mark.parametrize("torn", [True, False], ids=["torn", "unwritten"])
def test_crash_during_the_commit_write_falls_back_to_the_acknowledged_map(
        image: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, torn: bool) -> None:
    s = _write_old_then_new(image)  # the flush of N was acknowledged
    s.write(0, b"X" * SECTOR_SIZE)
    _crash_at_map_write(monkeypatch, image, 1 - s._maps[0].slot, torn)
    with pytest.raises(Crash):
        s.flush()  # never acknowledged
    monkeypatch.undo()
    assert store(image).read(0, 1) == b"N"
    if torn:  # the torn slot fails authentication: logged, then rewritten from the other
        assert "damaged in slot" in caplog.text
        assert _seq(image, 0, 0) == _seq(image, 0, 1)


def test_crash_before_the_mirror_write_keeps_the_committed_map(
        image: int, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _write_old_then_new(image)
    s.write(0, b"X" * SECTOR_SIZE)
    committed = 1 - s._maps[0].slot
    _crash_at_map_write(monkeypatch, image, 1 - committed, torn=True)
    with pytest.raises(Crash):
        s.flush()  # the commit's fsync returned: acknowledged by the time a mirror write runs
    monkeypatch.undo()
    assert _seq(image, 0, 1 - committed) is None
    assert store(image).read(0, 1) == b"X"


DAMAGE = {
    "bit flip in slot 0": (0, lambda b: b[:700] + bytes([b[700] ^ 0x08]) + b[701:]),
    "bit flip in slot 1": (1, lambda b: b[:3000] + bytes([b[3000] ^ 0x01]) + b[3001:]),
    "zeroed slot 0": (0, lambda b: bytes(len(b))),
    "zeroed slot 1": (1, lambda b: bytes(len(b))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_map_slot_loses_nothing_is_logged_and_repaired(
        image: int, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    """At rest both map slots hold the newest map: either one damaged, NEW still reads back."""
    s = _write_old_then_new(image)
    seq = s._maps[0].seq
    slot, how = DAMAGE[damage]
    off = map_offset(0, slot)
    bad = how(os.pread(image, SEALED_BLOCK, off))
    os.pwrite(image, bad, off)
    assert _seq(image, 0, slot) is None
    s2 = store(image)
    assert s2.read(0, SECTOR_SIZE) == b"N" * SECTOR_SIZE
    assert f"sector map of extent 0 (plaintext bytes 0-{EXTENT_SECTORS * SECTOR_SIZE - 1}) is damaged in " \
           f"slot {slot}" in caplog.text
    assert _seq(image, 0, slot) == seq  # repaired from the other slot
    os.pwrite(image, bytes(SEALED_BLOCK), map_offset(0, 1 - slot))  # so the repaired copy alone now serves
    assert store(image).read(0, SECTOR_SIZE) == b"N" * SECTOR_SIZE
    assert store(image).read(EXTENT_SECTORS * SECTOR_SIZE, 1) == b"\0"  # the other extent was never involved


def test_both_map_slots_damaged_make_only_that_extent_eio(image: int) -> None:
    s = store(image)
    s.write(0, b"a" * SECTOR_SIZE)
    s.write(EXTENT_SECTORS * SECTOR_SIZE, b"b" * SECTOR_SIZE)
    s.flush()
    for slot in (0, 1):
        off = map_offset(0, slot) + 500
        os.pwrite(image, bytes([os.pread(image, 1, off)[0] ^ 0x10]), off)
    s2 = store(image)
    with pytest.raises(BlockAuthError):
        s2.read(0, 1)
    with pytest.raises(BlockAuthError):
        s2.read((EXTENT_SECTORS - 1) * SECTOR_SIZE, 1)
    assert s2.read(EXTENT_SECTORS * SECTOR_SIZE, 1) == b"b"


def test_a_read_only_image_is_read_but_not_repaired(image: int) -> None:
    _write_old_then_new(image)
    os.pwrite(image, bytes(SEALED_BLOCK), map_offset(0, 0))
    ro = os.open(f"/proc/self/fd/{image}", os.O_RDONLY)
    try:
        assert store(ro).read(0, 1) == b"N"
    finally:
        os.close(ro)
    assert _seq(image, 0, 0) is None


def test_tampering_is_an_error_never_wrong_bytes(image: int) -> None:
    s = store(image)
    s.write(0, os.urandom(4 * SECTOR_SIZE))
    s.flush()
    off = sector_offset(2, SLOT_A)
    sealed = bytearray(os.pread(image, SEALED_BLOCK, off))
    sealed[100] ^= 1
    os.pwrite(image, bytes(sealed), off)
    s2 = store(image)
    assert len(s2.read(0, 2 * SECTOR_SIZE)) == 2 * SECTOR_SIZE
    with pytest.raises(BlockAuthError):
        s2.read(2 * SECTOR_SIZE, 1)
    # swapping two sectors' ciphertext is caught as well
    a, b = sector_offset(0, SLOT_A), sector_offset(1, SLOT_A)
    sa, sb = os.pread(image, SEALED_BLOCK, a), os.pread(image, SEALED_BLOCK, b)
    os.pwrite(image, sb, a)
    os.pwrite(image, sa, b)
    with pytest.raises(BlockAuthError):
        store(image).read(0, 1)


def test_zeroed_map_is_an_error_not_zeros(image: int) -> None:
    s = store(image)
    s.write(0, b"z" * SECTOR_SIZE)
    s.flush()
    for slot in (0, 1):
        os.pwrite(image, bytes(SEALED_BLOCK), map_offset(0, slot))
    with pytest.raises(BlockAuthError):
        store(image).read(0, 1)


def test_discard_reads_zero_and_frees_space(image: int) -> None:
    s = store(image)
    s.write(0, os.urandom(256 * SECTOR_SIZE))
    s.flush()
    used = os.fstat(image).st_blocks
    s.discard(0, 256 * SECTOR_SIZE)
    assert s.read(0, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    assert store(image).read(0, 8) != bytes(8)  # not flushed yet: old contents survive a crash
    s.flush()
    assert store(image).read(0, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    assert os.fstat(image).st_blocks <= used - 2000  # ~1 MiB of sealed sectors was punched out


def test_out_of_range_io_fails(image: int) -> None:
    s = store(image)
    with pytest.raises(OSError):
        s.write(SECTORS * SECTOR_SIZE - 10, b"x" * 20)
    with pytest.raises(OSError):
        s.read(SECTORS * SECTOR_SIZE, 1)


def test_header_two_copies_newest_valid_wins(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "h", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(VolumeFormatError, match="not an encfs volume"):
            read_header(fd)
        blob = CiphertextBlob(BlobHeader(uuid.uuid4(), 1, bytes(8), bytes(12)), bytes(48)).pack()
        mac_key = bytes(32)  # read_header() checks no MAC: any key will do
        h = write_header(fd, new_header(1 << 30, blob, VID), mac_key)
        h2 = write_header(fd, replace(h, size=2 << 30), mac_key)
        got, warnings = read_header(fd)
        assert (got.size, got.seq, warnings) == (2 << 30, h2.seq, [])
        os.pwrite(fd, b"\xff" * 10, 100)  # tear copy 0
        got, warnings = read_header(fd)
        assert got.size == 2 << 30 and len(warnings) == 1
        os.pwrite(fd, b"\xff" * 10, 65536 + 100)  # and copy 1
        with pytest.raises(VolumeFormatError, match="damaged"):
            read_header(fd)
    finally:
        os.close(fd)


def _resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (mincore(2) over a read-only mapping)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_image_reads_fetch_what_the_map_names_and_no_more(tmp_path: Path) -> None:
    """The store reads whole runs itself, so kernel read-ahead on the image is off: it only
    filled the page cache with the other slot's chunk (zeros, for a fresh volume) and burnt
    the daemon's CPU (a fresh volume's first 1 GiB read: 3.9 s of kernel time, 400 MB/s)."""
    path = tmp_path / "vol.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, image_size(SECTORS))
        s = SectorStore(fd, KEY, VID, SECTORS)
        s.format_maps()
        s.write(0, os.urandom(8 << 20))
        s.flush()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _resident_bytes(path) < 64 * 1024
        s = store(fd)
        for sector in range(256):  # one sector at a time, in order: what read-ahead feeds on
            s.read(sector * SECTOR_SIZE, SECTOR_SIZE)
        assert _resident_bytes(path) < 256 * SEALED_BLOCK + 64 * 1024
    finally:
        os.close(fd)


def test_writes_sealed_ahead_are_refused_after_a_flush(image: int) -> None:
    """seal_ahead() picks slots without a lock; a flush in between must send the write back,
    since the slot it picked may now be the persisted one (the crash-safety invariant)."""
    s = store(image)
    old, new, newer = (os.urandom(2 * SECTOR_SIZE) for _ in range(3))
    s.write(0, old)
    s.flush()  # persisted: slot A
    early = s.seal_ahead(0, new)  # picks slot B
    assert early is not None
    s.write(0, newer)  # slot B, then ...
    s.flush()  # ... persisted: slot B, the one `early` was sealed for
    persisted = os.pread(image, 2 * SEALED_BLOCK, sector_offset(0, SLOT_B))
    assert not s.write_sealed(early)
    assert os.pread(image, 2 * SEALED_BLOCK, sector_offset(0, SLOT_B)) == persisted
    assert store(image).read(0, 2 * SECTOR_SIZE) == newer

    fresh = s.seal_ahead(0, new)  # no flush in between: written as sealed
    assert fresh is not None and s.write_sealed(fresh)
    assert s.read(0, 2 * SECTOR_SIZE) == new
    s.flush()
    assert store(image).read(0, 2 * SECTOR_SIZE) == new

    assert s.seal_ahead(100, new) is None  # not whole sectors
    assert s.seal_ahead(SECTORS * SECTOR_SIZE - SECTOR_SIZE, new) is None  # past the end
    assert store(image).seal_ahead(EXTENT_SECTORS * SECTOR_SIZE, new) is None  # its map is not loaded yet
