"""Zeros written ahead of a format-2 image's pool (encfs/block/cowcommit.py, FORMAT.md §7.6.1):
small commits land in them and leave the image's size alone, a full disk gives them up and not
the commit, a crash leaves nothing fsck reports, and a clean close cuts them off."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cow_snapshot_space import fill_then_overwrite_under_a_snapshot  # noqa: E402
from test_cow_store import KEY, SECTORS, VID, Image, image, sector  # noqa: E402,F401

from encfs.block.cow import CowStore  # noqa: E402
from encfs.block.cowcommit import ZEROS_AHEAD_SMALL  # noqa: E402
from encfs.block.fsckcow import check_cow  # noqa: E402
from encfs.block.header import new_header  # noqa: E402
from encfs.block.layout import SECTOR_SIZE, page_offset  # noqa: E402
from encfs.fsckreport import Report  # noqa: E402
from encfs.keys.service import KeyService  # noqa: E402


def _size(img: Image) -> int:
    return os.fstat(img.fd).st_size


def _end(s: CowStore) -> int:
    return page_offset(s.pages + 1)


def test_small_commits_land_in_the_zeros_and_leave_the_size_alone(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1))
    s.flush()
    size = _size(image)
    assert size >= _end(s) + ZEROS_AHEAD_SMALL // 2 and not any(os.pread(image.fd, size, _end(s)))
    pages = s.pages
    for i in range(1, 5):  # an SQLite commit on ext4: a few pages each
        s.write_sectors(i, sector(i + 1))
        s.flush()
        assert _size(image) == size, f"commit {i} grew the image: its fdatasync commits the size too"
    assert s.pages > pages
    s = image.reopen()  # a crash: the zeros left are cut off by the next open for writing
    assert _size(image) == _end(s)
    assert s.read_sectors(0, 5) == b"".join(sector(i + 1) for i in range(5))


def test_a_full_disk_gives_up_the_zeros_not_the_commit(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: CowStore, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length // 2), offset)  # part of it fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CowStore, "_write_zeros", full)
    s = image.store
    s.write_sectors(0, sector(1))
    s.flush()
    assert _size(image) == _end(s)  # cut back to the pool
    assert image.reopen().read_sectors(0, 1) == sector(1)


def test_fsck_passes_a_zero_tail_and_a_clean_close_cuts_it(tmp_path: Path, service: KeyService) -> None:
    from encfs.block.volume import create_volume, open_volume

    img = Image(tmp_path / "img")
    img.store.load()
    img.store.write_sectors(0, sector(1))
    img.store.flush()
    assert _size(img) > _end(img.store)
    header = new_header(img.sectors * SECTOR_SIZE, b"", VID, seals=img.persisted)
    report = Report(str(img.path), "volume")
    check_cow(img.fd, img.path, header, KEY, report, data=True)  # a daemon killed now leaves this
    assert report.findings == []
    os.pwrite(img.fd, b"\1", _size(img) - 1)  # not zeros: what a killed writer's pages leave
    report = Report(str(img.path), "volume")
    check_cow(img.fd, img.path, header, KEY, report, data=True)
    assert [f.kind for f in report.findings] == ["tail-pages"]
    os.close(img.fd)

    path = tmp_path / "vol.img"
    create_volume(path, 64 << 20, service, service.create_key()["KeyId"])
    vol = open_volume(path, service)
    vol.write(0, sector(2))
    vol.flush()
    store = vol.store
    assert isinstance(store, CowStore)
    end = _end(store)
    assert path.stat().st_size > end
    vol.close()
    assert path.stat().st_size == end  # at rest the image ends with its pool


def test_a_close_after_a_failed_compaction_commit_keeps_the_committed_pool(
        image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction trims the pool in memory, then commits the shorter one; if that commit fails
    (logged: nothing is lost) the slots still name the longer pool, and the close must not cut the
    image below it (found by review: the volume then no longer opened, "truncated")."""
    s, live = fill_then_overwrite_under_a_snapshot(image, 0.3)
    real_trim, real_commit = s.pool.trim, CowStore._write_commit
    armed = [False]

    def trim() -> int:
        n = real_trim()
        armed[0] = n > 0
        return n

    def write_commit(self: CowStore, slot: int, commit: object) -> None:
        if armed[0]:
            armed[0] = False
            raise OSError(errno.EIO, "Input/output error")
        real_commit(self, slot, commit)  # type: ignore[arg-type]

    monkeypatch.setattr(s.pool, "trim", trim)
    monkeypatch.setattr(CowStore, "_write_commit", write_commit)
    s.delete_snapshot(s.snapshots[0].id)  # its compaction fails: logged, not raised
    monkeypatch.undo()
    assert not armed[0] and not s._failed
    s.sync_mirrors()
    s.cut_zeros_ahead()  # what a clean close does
    assert image.reopen().read_sectors(0, SECTORS) == live
