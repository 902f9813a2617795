"""One-sync commits (encfs/block/commitcheck.py, FORMAT.md §7.6.7), kernel-free: a small transaction
commits with one fdatasync, and an open never takes a listed commit whose pages did not all reach the
disk, while it never gives up one that did."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cow_store import KEY, VID, Image, sector  # noqa: E402

from encfs.block.cow import StoreFailed  # noqa: E402
from encfs.block.fsckcow import check_cow  # noqa: E402
from encfs.block.header import new_header  # noqa: E402
from encfs.block.layout import SECTOR_SIZE, commit_offset, page_offset  # noqa: E402
from encfs.blocks import SEALED_BLOCK, BlockAuthError  # noqa: E402
from encfs.fsckreport import Report  # noqa: E402


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", counted)
    return calls


@pytest.mark.parametrize("one_sync, syncs", [(True, 1), (False, 2)])
def test_a_small_commit_takes_one_fdatasync_on_a_one_sync_volume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_sync: bool, syncs: int) -> None:
    img = Image(tmp_path / "img", one_sync=one_sync)
    img.store.load()
    s = img.store
    s.write_sectors(5, sector(1) * 3)
    calls = _count_syncs(monkeypatch)
    s.flush()
    assert len(calls) == syncs
    listed = s._mirror.written if s._mirror else []
    # three sector pages and the leaf (a one-level map: the leaf is the root)
    assert len(listed) == (4 if one_sync else 0)
    assert img.reopen().read_sectors(5, 3) == sector(1) * 3
    os.close(img.fd)


def test_a_transaction_past_the_record_commits_with_two_syncs(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image(tmp_path / "img")
    img.store.load()
    s = img.store
    s.write_sectors(0, sector(2) * 300)  # 300 pages and a leaf: more than the 202 a record lists
    calls = _count_syncs(monkeypatch)
    s.flush()
    assert len(calls) == 2 and s._mirror is not None and s._mirror.written == []
    assert img.reopen().read_sectors(0, 300) == sector(2) * 300
    os.close(img.fd)


class Torn:
    """An image as a crash during a one-sync commit can leave it: the bytes before the flush and after
    it, and the listed pages of the commit it made."""

    def __init__(self, img: Image) -> None:
        self.img = img
        s = img.store
        s.write_sectors(100, sector(1) * 4)
        s.flush()
        s.sync_mirrors()  # at rest: transaction N - 1 in both slots
        self.before = self._read()
        s.write_sectors(100, sector(2) * 2)  # N: sectors 100-101 change
        s.flush()
        assert s._mirror is not None
        self.commit = s._mirror
        self.slot = 1 - s._slot  # where N went; its mirror is in s._slot now
        self.after = self._read()

    def _read(self) -> bytes:
        return os.pread(self.img.fd, os.fstat(self.img.fd).st_size, 0)

    def leave(self, lost_pages: list[int], mirror: bool = False) -> None:
        """The image with N's record, without its mirror (unless ``mirror``), and with ``lost_pages``
        holding what they held before N."""
        os.ftruncate(self.img.fd, 0)
        os.pwrite(self.img.fd, self.after, 0)
        other = commit_offset(1 - self.slot)
        if not mirror:
            os.pwrite(self.img.fd, self.before[other:other + SEALED_BLOCK], other)
        for page in lost_pages:
            at = page_offset(page)
            os.pwrite(self.img.fd, self.before[at:at + SEALED_BLOCK].ljust(SEALED_BLOCK, b"\0"), at)


@pytest.fixture
def torn(tmp_path: Path) -> Any:
    img = Image(tmp_path / "img")
    img.store.load()
    yield Torn(img)
    os.close(img.fd)


def test_a_commit_whose_pages_all_reached_the_disk_is_taken(torn: Torn) -> None:
    torn.leave([])
    s = torn.img.reopen()
    assert s.read_sectors(100, 4) == sector(2) * 2 + sector(1) * 2
    assert s.txg == torn.commit.txg + 1


@pytest.mark.parametrize("which", [0, -1])  # a sector page, the map's root
def test_a_commit_with_a_page_missing_gives_way_to_the_one_before(
        torn: Torn, which: int, caplog: pytest.LogCaptureFixture) -> None:
    page = torn.commit.written[which][0]
    torn.leave([page])
    with caplog.at_level(logging.WARNING, logger="encfs.block"):
        s = torn.img.reopen()
    assert s.read_sectors(100, 4) == sector(1) * 4  # N - 1, whole: never wrong bytes, never EIO
    assert f"page {page} does not hold what it wrote" in caplog.text
    assert s.txg == torn.commit.txg + 1  # past N's number even so: its table pages are bound to it
    s.write_sectors(100, sector(3))  # and it goes on from there, over N's pages
    s.flush()
    s.sync_mirrors()
    assert torn.img.reopen().read_sectors(100, 4) == sector(3) + sector(1) * 3


def test_a_commit_passed_over_cannot_come_back_after_a_second_crash(torn: Torn,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The open that passes over N repairs N's slot with N - 1's record and syncs that before it
    serves anything: else a second power loss could leave N's record there, and an image that the
    writes after the open made long enough (or pages they did not reuse) could let a later open
    take N, changing sectors nobody wrote since."""
    torn.leave([torn.commit.written[0][0]])
    record = torn.after[commit_offset(torn.slot):commit_offset(torn.slot) + SEALED_BLOCK]
    durable: list[bytes] = []  # the slot's bytes at each sync: what a power loss keeps

    def sync_of(real: Any) -> Any:
        def sync(fd: int) -> None:
            real(fd)
            durable.append(os.pread(fd, SEALED_BLOCK, commit_offset(torn.slot)))
        return sync
    monkeypatch.setattr(os, "fdatasync", sync_of(os.fdatasync))
    monkeypatch.setattr(os, "fsync", sync_of(os.fsync))
    s = torn.img.reopen()
    assert s.read_sectors(100, 4) == sector(1) * 4
    assert durable and durable[-1] != record


def test_a_mirrored_commit_is_never_given_up_for_a_damaged_page(torn: Torn) -> None:
    """Both slots hold N: its sync returned before the mirror was written, so a page that does not
    match is damage (that sector reads EIO), not a commit that never completed."""
    page = torn.commit.written[0][0]
    torn.leave([page], mirror=True)
    s = torn.img.reopen()
    with pytest.raises(BlockAuthError):
        s.read_sectors(100, 1)
    assert s.read_sectors(101, 3) == sector(2) + sector(1) * 2


def test_an_image_cut_before_the_pool_of_an_unsynced_commit_gives_way(tmp_path: Path) -> None:
    img = Image(tmp_path / "img")
    img.store.load()
    s = img.store
    s.write_sectors(0, sector(1))
    s.flush()
    s.sync_mirrors()
    size = page_offset(s.pages + 1)  # the pool's end (zeros written ahead lie past it)
    slot_bytes = {k: os.pread(img.fd, SEALED_BLOCK, commit_offset(k)) for k in (0, 1)}
    s.write_sectors(1, sector(2) * 8)  # the pool grows
    s.flush()
    other = s._slot  # the mirror's slot: put the previous record back, and the pool's old end
    os.pwrite(img.fd, slot_bytes[other], commit_offset(other))
    os.ftruncate(img.fd, size)
    s = img.reopen()
    assert s.read_sectors(0, 2) == sector(1) + bytes(SECTOR_SIZE)
    os.close(img.fd)


def test_fsck_names_a_commit_that_did_not_reach_the_disk_whole(torn: Torn) -> None:
    page = torn.commit.written[0][0]
    torn.leave([page])
    header = new_header(torn.img.sectors * SECTOR_SIZE, b"", VID, seals=torn.img.persisted)
    report = Report(str(torn.img.path), "volume")
    check_cow(torn.img.fd, torn.img.path, header, KEY, report, data=True)
    found = [f for f in report.findings if f.kind == "commit-slot"]
    assert len(found) == 1 and found[0].repairable
    assert f"transaction {torn.commit.txg}, which did not reach the disk whole" in found[0].message
    # N - 1 is whole: no damaged sector or node; N's pages past its pool are reached by no commit
    assert {f.kind for f in report.findings} == {"commit-slot", "tail-pages"}


def test_a_failed_commit_sync_refuses_reads_until_the_volume_is_opened_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed sync the pages written since the last commit may be gone from the disk and the
    page cache, and such a page may hold an older genuine version of its sector."""
    img = Image(tmp_path / "img")
    img.store.load()
    s = img.store
    s.write_sectors(7, sector(1))
    s.flush()
    s.write_sectors(7, sector(2))

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", failing)
        with pytest.raises(StoreFailed):
            s.flush()
    for read in (lambda: s.read_sectors(7, 1), lambda: s.read(7 * SECTOR_SIZE, 10),
                 lambda: s.read_view(7 * SECTOR_SIZE, SECTOR_SIZE)):
        with pytest.raises(StoreFailed) as e:
            read()
        assert e.value.errno == errno.EIO
    assert img.reopen().read_sectors(7, 1) in (sector(1), sector(2))
    os.close(img.fd)


def test_new_volumes_commit_with_one_sync_and_older_ones_keep_two(
        tmp_path: Path, service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through create_volume/open_volume with a real key service: a new volume's header has
    ONE_SYNC_COMMITS and its commits take one fdatasync; a volume made before (the bit clear) still
    opens and reads, and keeps committing with two syncs (its header is never changed)."""
    from encfs.block.header import ONE_SYNC_COMMITS
    from encfs.block.volume import create_volume, open_volume

    key = service.create_key()["KeyId"]
    path = tmp_path / "v.img"
    create_volume(path, 64 << 20, service, key)
    for one_sync, syncs in ((True, 1), (False, 2)):
        vol = open_volume(path, service)
        try:
            assert vol.header.one_sync_commits is one_sync and vol.store.one_sync is one_sync
            vol.write(0, sector(4 + syncs))
            with monkeypatch.context() as m:
                calls = _count_syncs(m)
                vol.flush()
            assert len(calls) == syncs
            if one_sync:  # as a volume made before the flag existed has it
                vol.headers.update(flags=vol.header.flags & ~ONE_SYNC_COMMITS)
        finally:
            vol.close()
    vol = open_volume(path, service)
    try:
        assert not vol.header.one_sync_commits and vol.read(0, SECTOR_SIZE) == sector(6)
    finally:
        vol.close()


def test_with_the_other_slot_damaged_the_one_record_is_taken_and_a_mismatch_named(
        torn: Torn, caplog: pytest.LogCaptureFixture) -> None:
    page = torn.commit.written[0][0]
    torn.leave([page])
    other = commit_offset(1 - torn.slot)
    os.pwrite(torn.img.fd, bytes(64), other + 100)  # and the previous record is damaged too
    with caplog.at_level(logging.WARNING, logger="encfs.block"):
        s = torn.img.reopen()
    assert f"did not reach the disk whole (page {page} does not hold what it wrote)" in caplog.text
    assert s.read_sectors(102, 2) == sector(1) * 2  # what N did not change reads as it was


def test_fsck_names_a_listed_commit_not_whole_when_the_other_slot_is_damaged(torn: Torn) -> None:
    page = torn.commit.written[0][0]
    torn.leave([page])
    os.pwrite(torn.img.fd, bytes(64), commit_offset(1 - torn.slot) + 100)
    header = new_header(torn.img.sectors * SECTOR_SIZE, b"", VID, seals=torn.img.persisted)
    report = Report(str(torn.img.path), "volume")
    check_cow(torn.img.fd, torn.img.path, header, KEY, report, data=False)
    found = [f for f in report.findings if f.kind == "commit-slot"]
    assert len(found) == 1
    assert f"which did not reach the disk whole (page {page} does not hold what it wrote)" in found[0].message


def test_an_open_syncs_first_and_then_drops_the_image_from_the_page_cache(
        torn: Torn, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed writeback Linux keeps the unwritten bytes cached and clean, so a check there
    would pass; and a slot that looks mirrored may be an unsynced mirror a killed daemon left."""
    torn.leave([])
    events: list[tuple[str, int, int]] = []
    real_sync, real_advise = os.fdatasync, os.posix_fadvise
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append(("sync", 0, 0)), real_sync(fd))[1])

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            events.append(("drop", offset, length))
        real_advise(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    torn.img.reopen()
    assert events[:2] == [("sync", 0, 0), ("drop", 0, 0)]  # before anything is read; the whole file


def _cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) over a mapping of it)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:  # mapping faults nothing in
        view = ctypes.c_char.from_buffer(m)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), size, vec) == 0, ctypes.get_errno()
        finally:
            del view  # the mapping closes only without exported pointers
    return sum(b & 1 for b in vec.raw)


def test_the_drop_empties_the_cache_of_pages_written_as_a_flush_writes_them() -> None:
    """On a real filesystem (ext4 caches large folios): pages written by one multi-page pwrite, as
    a write's run is, and a commit record leave no page of the image cached after the open."""
    base = Path("/var/tmp")
    with open("/proc/self/mounts") as f:
        fstype = max(((ln.split()[1], ln.split()[2]) for ln in f if str(base).startswith(ln.split()[1])),
                     key=lambda m: len(m[0]))[1]
    if fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{base} is {fstype}: nothing there is ever dropped from the cache")
    import tempfile
    with tempfile.TemporaryDirectory(dir=base) as d:
        img = Image(Path(d) / "img")
        img.store.load()
        img.store.write_sectors(0, sector(1) * 64)
        img.store.flush()
        assert _cached_pages(img.path) > 60  # the writes are cached
        s = img.reopen()
        assert _cached_pages(img.path) <= 8  # only what the open read since: two records, the map's node
        os.close(img.fd)
