"""Regressions found in review of format 2 (issue #20): page reuse, failed commits and mirrors,
rollback, snapshots read while deleted, transaction numbers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cow_store import KEY, SECTORS, VID, Image, image, sector  # noqa: F401  (image: the fixture)

from encfs.block import cow as cow_mod
from encfs.block.budget import SealBudget
from encfs.block.cow import CowStore, StoreFailed
from encfs.block.layout import commit_offset
from encfs.block.snapshots import SnapshotSource
from encfs.block.volume import VolumeError, _no_seals
from encfs.blocks import SEALED_BLOCK


@pytest.mark.parametrize("before", ["open", "delete"])
def test_a_snapshot_with_nothing_to_commit_first_still_holds_the_live_pages(image: Image, before: str) -> None:
    """The page accounting is rebuilt at open and after a delete; a snapshot taken right after,
    with nothing written (the CLI's `snapshot create` on a detached volume), must hold every page
    the live map reaches, or overwrites reuse them and the snapshot reads the new bytes."""
    s = image.store
    s.write_sectors(0, sector(1))
    s.flush()
    if before == "open":
        s = image.reopen()
    else:
        s.snapshot("snap-00000000000000aa", "", 1.0)
        s.delete_snapshot("snap-00000000000000aa")
    snap = s.snapshot("snap-0000000000000001", "", 2.0)
    for i in range(4):  # overwrites that reuse whatever page is free
        s.write_sectors(0, sector(10 + i))
        s.flush()
    assert s.read_tree(s.snapshot_tree(snap), 0, 1) == sector(1)


def test_a_failed_data_fdatasync_fails_the_store_as_a_failed_commit_does(image: Image,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error to one fdatasync and marks the pages clean: a retry
    succeeds without the lost writes. A later flush must not commit a map naming them."""
    s = image.store
    s.write_sectors(0, sector(1))
    real, calls = os.fdatasync, []

    def eio_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(fd)
    monkeypatch.setattr(cow_mod.os, "fdatasync", eio_once)
    with pytest.raises(OSError):
        s.flush()
    with pytest.raises(StoreFailed):
        s.flush()
    with pytest.raises(StoreFailed):
        s.write_sectors(1, sector(2))


def test_a_snapshot_deleted_while_it_is_read_is_an_error_never_the_live_bytes(image: Image) -> None:
    """restore, copy and export read a snapshot beside the daemon (open_snapshots, no lock). If the
    daemon deletes it meanwhile, its pages are reused: a page reused for the same sector opens
    (AAD = the sector number) to the live contents, which must not pass as the snapshot's."""
    s = image.store
    s.write_sectors(0, sector(1) * 8)
    snap = s.snapshot("snap-0000000000000001", "", 1.0)
    fd = os.open(image.path, os.O_RDONLY)
    try:
        reader = CowStore(fd, KEY, VID, SECTORS, SealBudget(image.persisted, _no_seals, "r", counter=True))
        reader.load(live=False)
        src = SnapshotSource(SimpleNamespace(store=reader), reader.find_snapshot(snap.id),  # type: ignore[arg-type]
                             reader.snapshot_tree(reader.find_snapshot(snap.id)))
        assert src.read_sectors(0, 8) == sector(1) * 8
        s.delete_snapshot(snap.id)
        for i in range(3):  # the freed pages go to new versions of the same sectors
            s.write_sectors(0, sector(10 + i) * 8)
            s.flush()
        # the pages were reused: what a read gets without checking that the snapshot is still there
        assert reader.read_tree(src.tree, 0, 8) in [sector(10 + i) * 8 for i in range(3)]
        with pytest.raises(VolumeError, match="deleted"):
            src.read_sectors(0, 8)
    finally:
        os.close(fd)


def test_a_rollback_the_disk_refuses_changes_nothing(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """As snapshot() and delete_snapshot() do, a failed rollback leaves the store as it was: not
    the snapshot's map in memory over the old commit on disk, for the next flush to commit."""
    s = image.store
    s.write_sectors(0, sector(1))
    snap = s.snapshot("snap-0000000000000001", "", 1.0)
    s.write_sectors(0, sector(2))
    s.flush()
    real = cow_mod.pwrite_all

    def full_at_commit(fd: int, data: bytes, offset: int) -> None:
        if offset in (commit_offset(0), commit_offset(1)):
            raise OSError(28, "No space left on device")
        real(fd, data, offset)
    monkeypatch.setattr(cow_mod, "pwrite_all", full_at_commit)
    with pytest.raises(OSError, match="No space"):
        s.rollback(snap.id)
    monkeypatch.undo()
    assert s.read_sectors(0, 1) == sector(2)
    s.write_sectors(1, sector(3))
    s.flush()
    assert image.reopen().read_sectors(0, 2) == sector(2) + sector(3)


@pytest.mark.parametrize("fault", ["mirror write", "mirror sync"])
def test_a_failed_mirror_is_written_again_before_the_volume_is_at_rest(
        image: Image, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """At rest both commit slots hold the newest commit, so damage to one loses nothing. When the
    mirror's write (ENOSPC, EIO) or its sync fails, the other slot keeps the previous commit, whose
    freed pages are already being reused: the close must write the mirror again."""
    s = image.store
    s.write_sectors(0, sector(1))
    s.flush()
    s.write_sectors(0, sector(2))  # the commit below frees sector(1)'s page
    real_write, writes = cow_mod.pwrite_all, []

    def mirror_refused(fd: int, data: bytes, offset: int) -> None:
        if offset in (commit_offset(0), commit_offset(1)):
            writes.append(offset)
            if len(writes) == 2:  # the commit's own record goes first, then its mirror
                raise OSError(28, "No space left on device")
        real_write(fd, data, offset)

    def lost(fd: int) -> None:  # Linux drops the mirror's write and reports it once
        os.pwrite(fd, bytes(SEALED_BLOCK), commit_offset(s._slot))  # the slot the mirror went to
        raise OSError(5, "Input/output error")
    if fault == "mirror write":
        monkeypatch.setattr(cow_mod, "pwrite_all", mirror_refused)
        s.flush()
    else:
        s.flush()
        monkeypatch.setattr(os, "fsync", lost)
        with pytest.raises(OSError):
            s.sync_mirrors()
    monkeypatch.undo()
    s.write_sectors(0, sector(3))  # not flushed: may take sector(1)'s old page
    s.sync_mirrors()  # at rest (a clean close)
    newest = 1 - s._slot
    os.pwrite(image.fd, b"\xff" * 64, commit_offset(newest) + 100)  # damage to the newest's slot
    assert image.reopen().read_sectors(0, 1) == sector(2)


def test_a_retried_commit_seals_its_snapshot_table_under_a_new_transaction(
        image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """Table pages are bound to the transaction that wrote them (AAD); a failed commit's table pages
    stay on disk, so the retry must not reuse its number, or they could be mixed into the retry's."""
    s = image.store
    s.write_sectors(0, sector(1))
    s.flush()
    real = cow_mod.CowStore._write_commit
    failing = {"left": 1}

    committed: list[int] = []

    def refuse_once(self: CowStore, slot: int, commit: cow_mod.Commit) -> None:
        if failing["left"] and commit.table:
            failing["left"] -= 1
            failing["txg"] = commit.table_txg
            raise OSError(28, "No space left on device")
        real(self, slot, commit)
        committed.append(commit.table_txg)
    monkeypatch.setattr(cow_mod.CowStore, "_write_commit", refuse_once)
    with pytest.raises(OSError):
        s.snapshot("snap-0000000000000001", "", 1.0)
    s.snapshot("snap-0000000000000002", "", 2.0)
    assert committed and failing["txg"] not in committed
