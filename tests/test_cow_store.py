"""Format-2 (copy-on-write) sector store, without a kernel mount: encfs/block/cow.py's invariants."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.block import cow as cow_mod
from encfs.block.budget import SealBudget
from encfs.block.cow import CowStore
from encfs.block.layout import SECTOR_SIZE, commit_offset, cow_image_bound, page_offset
from encfs.block.pages import FREE
from encfs.blocks import NONCE_LEN, SEALED_BLOCK, BlockAuthError
from encfs.keys.service import KeyService

KEY, VID = bytes(range(32)), bytes(range(16))
SECTORS = 16384  # 64 MiB


class Image:
    """A store over a temp file; reopen() is what a crash (kill -9) and a restart leave."""

    def __init__(self, path: Path, sectors: int = SECTORS, one_sync: bool = True) -> None:
        self.path, self.sectors, self.one_sync = path, sectors, one_sync  # one_sync: as new volumes are
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.persisted = 0  # the header's reservation, as budget.py persists it
        self.store = self._store()
        self.store.format()

    def _persist(self, n: int) -> None:
        self.persisted = n

    def _store(self) -> CowStore:
        return CowStore(self.fd, KEY, VID, self.sectors, SealBudget(self.persisted, self._persist, "t", counter=True),
                        one_sync=self.one_sync)

    def reopen(self, live: bool = True) -> CowStore:
        """Drop the store without flushing or closing (a crash), open it again (without ``live``:
        as `snapshot create` opens a detached volume, commit records and table only)."""
        self.store.stop_seal_worker()
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        self.store = self._store()
        self.store.load(live=live)
        return self.store

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Image]:
    img = Image(tmp_path / "img")
    img.store.load()
    yield img
    os.close(img.fd)


def sector(tag: int) -> bytes:
    return tag.to_bytes(4, "big") * (SECTOR_SIZE // 4)


def flip(fd: int, at: int) -> None:
    """Flip a bit of the byte at ``at`` (writing a fixed byte leaves it as it was 1 time in 256)."""
    os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)


def test_unwritten_sectors_read_zero_and_round_trip_any_alignment(image: Image) -> None:
    s = image.store
    assert s.read(0, 3 * SECTOR_SIZE) == bytes(3 * SECTOR_SIZE)
    data = os.urandom(3 * SECTOR_SIZE + 100)
    s.write(5000, data)
    assert s.read(5000, len(data)) == data
    s.flush()
    assert image.reopen().read(5000, len(data)) == data
    assert image.store.read(0, 5000) == bytes(5000)


def test_unflushed_writes_roll_back_to_the_old_contents_after_a_crash(image: Image) -> None:
    s = image.store
    s.write_sectors(10, sector(1) * 4)
    s.flush()
    s.write_sectors(10, sector(2) * 4)
    s.write_sectors(2000, sector(3))
    s = image.reopen()
    assert s.read_sectors(10, 4) == sector(1) * 4 and s.read_sectors(2000, 1) == bytes(SECTOR_SIZE)


def test_a_write_the_disk_refuses_changes_no_map(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    s = image.store
    s.write_sectors(7, sector(1))
    s.flush()

    def full(fd: int, data: bytes, offset: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cow_mod, "pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        s.write_sectors(7, sector(2))
    s.flush()  # nothing to commit: the map still names the old page
    monkeypatch.undo()
    assert s.read_sectors(7, 1) == sector(1)
    s.write_sectors(8, sector(3))
    s.flush()
    s = image.reopen()
    assert s.read_sectors(7, 2) == sector(1) + sector(3)


def test_a_torn_commit_falls_back_to_the_acknowledged_one(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    s = image.store
    s.write_sectors(1, sector(1))
    s.flush()
    s.write_sectors(1, sector(2))
    real = cow_mod.pwrite_all

    def torn(fd: int, data: bytes, offset: int) -> None:
        if offset in (commit_offset(0), commit_offset(1)):
            real(fd, bytes(data)[:100], offset)  # the first bytes land, then the crash
            raise SystemExit("crash")
        real(fd, data, offset)
    monkeypatch.setattr(cow_mod, "pwrite_all", torn)
    with pytest.raises(SystemExit):
        s.flush()
    monkeypatch.undo()
    assert image.reopen().read_sectors(1, 1) == sector(1)


def test_damage_to_one_commit_slot_at_rest_loses_nothing_and_is_repaired(image: Image,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    s = image.store
    s.write_sectors(3, sector(9))
    s.flush()
    s.sync_mirrors()
    slot = 1 - s._slot  # the slot the last commit went to
    os.pwrite(image.fd, b"\xff" * 64, commit_offset(slot) + 200)
    s = image.reopen()
    assert s.read_sectors(3, 1) == sector(9)
    assert "commit slot" in caplog.text and "damaged" in caplog.text
    s.sync_mirrors()
    assert image.reopen() is not None and "damaged" in caplog.text  # reopened cleanly after repair
    caplog.clear()
    image.reopen()
    assert "damaged" not in caplog.text


def test_both_commit_slots_damaged_is_an_error_not_an_empty_volume(image: Image) -> None:
    image.store.write_sectors(3, sector(9))
    image.store.flush()
    for slot in (0, 1):
        os.pwrite(image.fd, bytes(SEALED_BLOCK), commit_offset(slot))
    with pytest.raises(BlockAuthError):
        image.reopen()


def test_a_tampered_or_moved_sector_is_an_error_never_wrong_bytes(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1) + sector(2))
    s.flush()
    p0, p1 = s.tree.get(0), s.tree.get(1)
    one = os.pread(image.fd, SEALED_BLOCK, page_offset(p0))
    os.pwrite(image.fd, one, page_offset(p1))  # sector 0's page where sector 1's belongs
    with pytest.raises(BlockAuthError):
        s.read_sectors(1, 1)
    flip(image.fd, page_offset(p0) + 40)
    with pytest.raises(BlockAuthError):
        s.read_sectors(0, 1)


def test_a_one_sector_read_view_answers_as_a_run_of_sectors_does(image: Image) -> None:
    """read_view() opens a lone 4 KiB sector on its own path (a loop device's random reads): it
    must give what read_sectors() gives, zeros for an unwritten sector, and BlockAuthError for a
    tampered sector and for a sector under a map leaf that fails authentication (whose pages are
    unknown: never zeros)."""
    s = image.store
    s.write_sectors(0, sector(1) + sector(2))
    s.write_sectors(2048, sector(3))  # the third leaf (1,024 sectors a leaf)
    s.flush()
    one = SECTOR_SIZE
    assert [bytes(s.read_view(n * one, one)) for n in (0, 1, 2, 2048)] == \
        [sector(1), sector(2), bytes(one), sector(3)]
    flip(image.fd, page_offset(s.tree.get(1)) + 40)
    with pytest.raises(BlockAuthError):
        s.read_view(one, one)
    assert bytes(s.read_view(0, one)) == sector(1)
    leaf = s.tree.pages[(0, 2)]
    flip(image.fd, page_offset(leaf) + 40)
    s = image.reopen()
    for read in (lambda: s.read_view(2048 * one, one), lambda: s.read_view(2049 * one, one),
                 lambda: s.read_view(2048 * one, 2 * one)):
        with pytest.raises(BlockAuthError):
            read()
    assert bytes(s.read_view(0, one)) == sector(1)


def test_every_seal_takes_a_nonce_never_used_before_also_across_a_crash(image: Image) -> None:
    s = image.store
    for i in range(40):
        s.write_sectors(i % 7, sector(i))
        if i % 5 == 0:
            s.flush()
    s.flush()
    counters_before = image.persisted
    s = image.reopen()  # a crash: the counter goes on from the persisted reservation
    for i in range(10):
        s.write_sectors(100 + i, sector(i))
    s.flush()
    nonces = [os.pread(image.fd, NONCE_LEN, page_offset(p)) for p in range(1, s.pages + 1)
              if s.pool.state[p] != FREE]
    nonces += [os.pread(image.fd, NONCE_LEN, commit_offset(slot)) for slot in (0, 1)]
    assert len(set(nonces)) == len(nonces)
    after = [int.from_bytes(n[4:], "big") for n in nonces if n[:4] == s._prefix]
    assert after and min(after) >= counters_before  # the new session started past the reservation


def test_overwrites_reuse_freed_pages_within_the_space_bound(tmp_path: Path) -> None:
    img = Image(tmp_path / "img")
    s = img.store
    s.load()
    rnd = random.Random(7)
    written = 0
    for _pass in range(3):  # the whole volume, three times over, in random order
        order = list(range(0, SECTORS, 16))
        rnd.shuffle(order)
        for first in order:
            s.write_sectors(first, os.urandom(16 * SECTOR_SIZE))
            written += 16
            if written % 2048 == 0:  # a flush per 8 MiB, as a filesystem's journal commits
                s.flush()
    s.flush()
    bound = SECTORS * SECTOR_SIZE * 1.15
    assert img.allocated() <= bound, (img.allocated(), bound)
    assert os.fstat(img.fd).st_size <= cow_image_bound(SECTORS, s.pending_limit)
    os.close(img.fd)


def test_without_commits_the_freed_pages_are_capped_by_an_early_commit(tmp_path: Path) -> None:
    img = Image(tmp_path / "img")
    s = img.store
    s.load()
    for _pass in range(3):
        for first in range(0, SECTORS, 256):
            s.write_sectors(first, os.urandom(256 * SECTOR_SIZE))  # never flushed by the caller
    assert len(s.pool.pending) < s.pending_limit
    assert img.allocated() <= SECTORS * SECTOR_SIZE * 1.15
    os.close(img.fd)


def test_discard_reads_zero_and_gives_the_space_back(image: Image) -> None:
    s = image.store
    s.write_sectors(0, os.urandom(2048 * SECTOR_SIZE))
    s.flush()
    full = image.allocated()
    s.discard(0, 2048 * SECTOR_SIZE)
    s.flush()
    assert s.read_sectors(0, 2048) == bytes(2048 * SECTOR_SIZE)
    assert image.allocated() < full - 7 * (1 << 20)


def test_snapshots_hold_their_pages_and_deleting_one_frees_only_its_own(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1) * 512)
    a = s.snapshot("snap-000000000000000a", "a", 1.0)
    s.write_sectors(0, sector(2) * 256)  # half of it changes
    b = s.snapshot("snap-000000000000000b", "b", 2.0)
    s.write_sectors(256, sector(3) * 256)  # the other half changes
    s.flush()
    space = s.space()
    page = SEALED_BLOCK
    # a alone holds the first version of sectors 0-255; b shares the rest with a or with the live map
    assert 256 * page <= space[a.id]["exclusive"] <= 258 * page and space[b.id]["exclusive"] <= 2 * page
    assert space[a.id]["shared"] >= 256 * page and space[b.id]["shared"] >= 512 * page
    for snap, want in ((a, sector(1) * 512), (b, sector(2) * 256 + sector(1) * 256)):
        assert s.read_tree(s.snapshot_tree(snap), 0, 512) == want
    assert s.read_sectors(0, 512) == sector(2) * 256 + sector(3) * 256
    before = image.allocated()
    s.delete_snapshot(a.id)  # its exclusive half (sector(1) x 256) goes; the half b shares stays
    assert before - image.allocated() >= 250 * SECTOR_SIZE  # whole filesystem blocks only
    assert s.read_tree(s.snapshot_tree(b), 0, 512) == sector(2) * 256 + sector(1) * 256
    s = image.reopen()
    assert [x.id for x in s.snapshots] == [b.id]
    assert s.read_tree(s.snapshot_tree(s.snapshots[0]), 0, 512) == sector(2) * 256 + sector(1) * 256
    s.delete_snapshot(b.id)
    assert image.allocated() <= 600 * SEALED_BLOCK  # the live 512 sectors, their map, the commit slots


def test_a_snapshot_survives_a_crash_and_its_pages_are_never_reused(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1) * 64)
    snap = s.snapshot("snap-0000000000000001", "", 1.0)
    s = image.reopen()
    for i in range(5):
        s.write_sectors(0, sector(10 + i) * 64)
        s.flush()
    assert s.read_tree(s.snapshot_tree(s.find_snapshot(snap.id)), 0, 64) == sector(1) * 64


def test_rollback_makes_the_snapshot_the_live_contents(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1) * 8)
    snap = s.snapshot("snap-0000000000000001", "", 1.0)
    s.write_sectors(0, sector(2) * 8)
    s.write_sectors(5000, sector(3))
    s.rollback(snap.id)
    assert s.read_sectors(0, 8) == sector(1) * 8 and s.read_sectors(5000, 1) == bytes(SECTOR_SIZE)
    s = image.reopen()
    assert s.read_sectors(0, 8) == sector(1) * 8
    s.write_sectors(0, sector(4))
    s.flush()
    assert s.read_tree(s.snapshot_tree(snap), 0, 1) == sector(1)


def test_the_map_grows_a_level_for_a_grown_volume(tmp_path: Path) -> None:
    img = Image(tmp_path / "img", sectors=1024)  # one leaf: depth 1
    s = img.store
    s.load()
    s.write_sectors(1023, sector(1))
    s.flush()
    s.grow(4096)
    s.write_sectors(3000, sector(2))
    s.flush()
    img.sectors = 4096
    s = img.reopen()
    assert s.tree.depth == 2 and s.read_sectors(1023, 1) == sector(1) and s.read_sectors(3000, 1) == sector(2)
    os.close(img.fd)


def test_the_counter_goes_past_2_to_the_32_and_stops_at_its_own_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from encfs.block import budget

    persisted = []
    b = SealBudget((1 << 32) - 5, persisted.append, "t", counter=True)
    assert b.spend(10) == (1 << 32) - 5  # no random-nonce cap on a counter
    assert persisted[-1] > 1 << 32
    monkeypatch.setattr(budget, "COUNTER_REFUSE", (1 << 32) + 20)
    with pytest.raises(OSError, match="seal budget"):
        b.spend(20)


def test_a_snapshot_taken_right_after_an_open_holds_the_pages_it_shares(image: Image) -> None:
    s = image.store
    s.write_sectors(0, sector(1) * 64)
    s.flush()
    s = image.reopen()  # nothing is committed after this open before the snapshot
    snap = s.snapshot("snap-0000000000000001", "", 1.0)
    for i in range(3):
        s.write_sectors(0, sector(10 + i) * 64)  # overwrites free what the live map drops
        s.flush()
    assert s.read_tree(s.snapshot_tree(snap), 0, 64) == sector(1) * 64
    s = image.reopen()
    assert s.read_tree(s.snapshot_tree(s.find_snapshot(snap.id)), 0, 64) == sector(1) * 64


def test_a_volume_larger_than_the_map_reaches_is_refused(tmp_path: Path, service: KeyService) -> None:
    from encfs.block.layout import MAX_COW_SIZE
    from encfs.block.volume import VolumeError, create_volume, open_volume

    key = service.create_key()["KeyId"]
    with pytest.raises(VolumeError, match="at most 4 PiB"):
        create_volume(tmp_path / "huge.img", MAX_COW_SIZE + SECTOR_SIZE, service, key)
    assert not (tmp_path / "huge.img").exists()
    create_volume(tmp_path / "v.img", MAX_COW_SIZE, service, key)  # sparse: the largest is fine
    vol = open_volume(tmp_path / "v.img", service)
    try:
        vol.write(MAX_COW_SIZE - SECTOR_SIZE, sector(7))  # the last sector: a map four levels deep
        vol.flush()
        with pytest.raises(VolumeError, match="at most 4 PiB"):
            vol.grow(MAX_COW_SIZE + SECTOR_SIZE)
    finally:
        vol.close()
    vol = open_volume(tmp_path / "v.img", service)
    try:
        assert vol.read(MAX_COW_SIZE - SECTOR_SIZE, SECTOR_SIZE) == sector(7)
    finally:
        vol.close()


def test_transactions_past_2_to_the_32_keep_working(image: Image) -> None:
    """A commit per fsync: 2^32 of them is ~100 days of a database fsyncing 500 times a second
    (found by the review helper: births were u32)."""
    s = image.store
    s.write_sectors(0, sector(1))
    s.snapshot("snap-0000000000000001", "", 1.0)
    s.txg = (1 << 32) - 3  # as a long-lived volume's commits leave it
    for i in range(5):
        s.write_sectors(0, sector(10 + i))
        s.flush()
    s = image.reopen()
    s.write_sectors(1, sector(20))
    s.flush()
    assert s.read_sectors(0, 2) == sector(14) + sector(20)
    assert s.read_tree(s.snapshot_tree(s.snapshots[0]), 0, 1) == sector(1)


def test_a_large_write_stays_in_one_run_while_few_pages_lie_free(image: Image,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Filling scattered free pages first broke every 1 MiB write into pieces once a volume had been
    overwritten at random (bench: ten image writes per request); below the slack the pool grows."""
    s = image.store
    s.write_sectors(0, os.urandom(4096 * SECTOR_SIZE))
    s.flush()
    for sec in range(0, 4096, 97):  # a few scattered pages freed: fewer than the slack
        s.write_sectors(sec, sector(sec))
    s.flush()
    assert 0 < s.pool.free <= s.pool.slack
    writes = []
    real = cow_mod.pwrite_all
    monkeypatch.setattr(cow_mod, "pwrite_all", lambda fd, data, offset: (writes.append(offset), real(fd, data, offset)))
    s.write_sectors(8192, os.urandom(256 * SECTOR_SIZE))
    assert len(writes) == 1
