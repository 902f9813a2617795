"""Format-2 store against a model, under random crashes, power losses, full disks and failed syncs.

Random writes, discards, flushes, snapshots, deletions and rollbacks run on a CowStore
(kernel-free, as tests/test_cow_store.py) while the I/O cow.py does is wrapped: any call may be
the last before a crash (kill -9), a write may fail with ENOSPC and an fdatasync with EIO (the
writes it covered are then lost, as Linux drops them). A power loss undoes a random part of the
writes since the last sync, some of them torn. After each, the image is opened again and must
hold exactly the state of the last durable commit, or of the commit under way, with every
snapshot reading as it was taken; the store in memory must always read as the model.
"""

from __future__ import annotations

import errno
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cow_store import Image  # noqa: E402

from encfs.block import cow as cow_mod  # noqa: E402
from encfs.block import pages as pages_mod  # noqa: E402
from encfs.block.cow import CowStore, StoreFailed  # noqa: E402
from encfs.block.layout import SECTOR_SIZE, commit_offset  # noqa: E402
from encfs.blocks import BlockAuthError  # noqa: E402

SECTORS = 8192  # the map grows from one level to two as sectors past 1023 are written
COMPACTION_COMMITS = 3  # after a deletion or rollback, CowStore.compact(): two passes of moves, the shorter pool
State = tuple[dict[int, bytes], dict[str, dict[int, bytes]]]  # live sectors, snapshots' sectors


class Crash(BaseException):
    """kill -9: nothing after it runs."""


class Mismatch(Exception):
    """The store does not read as a state. Not an assert: reopen() tries each state a crash may
    have left, and pytest explains a failed assert between two sectors with a whole difflib diff
    when the CI variable is set, minutes per sector (it hung CI twice)."""


class Disk:
    """The image's I/O as cow.py does it, with faults armed per operation and a journal of the
    writes not yet synced (their old bytes) for power losses."""

    def __init__(self, rnd: random.Random, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rnd = rnd
        self.journal: list[tuple[int, int, bytes]] = []
        self.crash_in = self.enospc_in = self.eio_in = -1
        self._pwrite, self._sync, self._punch = cow_mod.pwrite_all, os.fdatasync, pages_mod.punch_hole
        monkeypatch.setattr(cow_mod, "pwrite_all", self.pwrite_all)
        monkeypatch.setattr(os, "fdatasync", self.sync)
        monkeypatch.setattr(os, "fsync", self.sync)
        monkeypatch.setattr(pages_mod, "punch_hole", self.punch)

    def disarm(self) -> None:
        self.crash_in = self.enospc_in = self.eio_in = -1

    def arm(self) -> None:
        fault = self.rnd.random()
        self.disarm()
        if fault < 0.08:
            self.crash_in = self.rnd.randrange(12)
        elif fault < 0.14:
            self.enospc_in = self.rnd.randrange(6)
        elif fault < 0.16:
            self.eio_in = self.rnd.randrange(3)

    def _tick(self) -> None:
        if self.crash_in == 0:
            self.disarm()
            raise Crash()
        self.crash_in -= self.crash_in > 0

    def pwrite_all(self, fd: int, data: Any, offset: int) -> None:
        self._tick()
        if self.enospc_in == 0:
            self.enospc_in = -1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.enospc_in -= self.enospc_in > 0
        data = bytes(data)
        self.journal.append((fd, offset, os.pread(fd, len(data), offset).ljust(len(data), b"\0")))
        self._pwrite(fd, data, offset)

    def sync(self, fd: int) -> None:
        self._tick()
        if self.eio_in == 0:
            self.eio_in = -1
            self.lose(1.0)  # a writeback error: those writes never reach the disk
            raise OSError(errno.EIO, "Input/output error")
        self.eio_in -= self.eio_in > 0
        self._sync(fd)
        self.journal.clear()

    def punch(self, fd: int, offset: int, length: int) -> None:
        self._tick()
        self._punch(fd, offset, length)

    def lose(self, p: float) -> None:
        """Undo each unsynced write with probability ``p`` (a tenth of them torn instead)."""
        for fd, offset, old in reversed(self.journal):
            r = self.rnd.random()
            if r < p:
                os.pwrite(fd, old, offset)
            elif r < p + 0.1 and len(old) > 512:
                cut = self.rnd.randrange(1, len(old) // 512) * 512
                os.pwrite(fd, old[cut:], offset + cut)
        self.journal.clear()


def sector(tag: int, s: int) -> bytes:
    return (tag.to_bytes(4, "big") + s.to_bytes(4, "big")) * (SECTOR_SIZE // 8)


def copy(state: State) -> State:
    return dict(state[0]), {k: dict(v) for k, v in state[1].items()}


class Model:
    """What the store should read as, and what each commit of the running operation makes durable
    (the commits are counted through CowStore._committed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: dict[int, bytes] = {}
        self.snaps: dict[str, dict[int, bytes]] = {}
        self.durable: State = ({}, {})
        self.plan: list[State] = []
        self.k = 0
        real = CowStore._committed

        def committed(store: CowStore, *args: Any) -> None:
            real(store, *args)
            assert self.k < len(self.plan), "a commit the operation should not make"
            self.durable = self.plan[self.k]
            self.k += 1
        monkeypatch.setattr(CowStore, "_committed", committed)

    def expect(self, *commits: State) -> None:
        self.plan, self.k = [copy(c) for c in commits], 0

    def candidates(self) -> list[State]:
        """After a crash: the last durable commit, or the one under way (its record written)."""
        return [self.durable] + self.plan[self.k:self.k + 1]


def accounting(s: CowStore, where: str) -> None:
    """The page accounting (pages.py) agrees with its counters, and no page a tree reaches (the
    live map in memory, a snapshot, the table) is free: alloc() would hand it out."""
    if s._failed:
        return
    pool, state = s.pool, s.pool.state
    counted = (state.count(pages_mod.FREE, 1) + state.count(pages_mod.HOLE, 1), state.count(pages_mod.HOLE, 1))
    assert (pool.free, pool.holes) == counted, f"{where}: free, holes {pool.free, pool.holes} != {counted}"
    reached = s.tree.page_set() | set(s._table)
    for snap in s.snapshots:
        reached |= s.snapshot_tree(snap).page_set()
    free = [p for p in reached if p >= len(state) or state[p] in (pages_mod.FREE, pages_mod.HOLE)]
    assert not free, f"{where}: pages {sorted(free)[:5]} are free, and a tree reaches them"


def busy(s: CowStore) -> bool:
    """Whether flush() would commit (else snapshot() and rollback() make one commit fewer)."""
    return bool(s.tree.dirty or s._table_dirty or s.pool.pending or s._root_changed)


def run(seed: int, ops: int, tmp: Path, monkeypatch: pytest.MonkeyPatch, detached: bool = False,
        one_sync: bool = True, closes: bool = False) -> None:
    rnd = random.Random(seed)
    img = Image(tmp / "img", sectors=SECTORS, one_sync=one_sync)
    img.store.load()
    disk, m = Disk(rnd, monkeypatch), Model(monkeypatch)
    hot = [rnd.randrange(SECTORS - 16) for _ in range(6)] + [0, 1020, 2040]
    limits = [8, 64, 1 << 20]  # freed pages before an early commit

    def check(s: CowStore, state: State, where: str, snapshots: bool = True) -> None:
        live, snaps = state
        for base in set(live) | set(hot):
            if s.read_sectors(base, 1) != live.get(base, bytes(SECTOR_SIZE)):
                raise Mismatch(f"{where}: sector {base}")
        if {x.id for x in s.snapshots} != set(snaps):
            raise Mismatch(f"{where}: snapshots {sorted(x.id for x in s.snapshots)} != {sorted(snaps)}")
        if not snapshots:
            return
        accounting(s, where)
        for sid, contents in snaps.items():
            tree = s.snapshot_tree(s.find_snapshot(sid))
            for base in set(contents) | set(hot):
                if s.read_tree(tree, base, 1) != contents.get(base, bytes(SECTOR_SIZE)):
                    raise Mismatch(f"{where}: {sid} sector {base}")

    def reopen(where: str) -> CowStore:
        disk.disarm()
        if rnd.random() < 0.7:
            disk.lose(0.4)
        # Without a power loss the writes a kill -9 left unsynced stay in the journal: the page cache
        # still holds them, and a power loss after the next open can lose them.
        cands = m.candidates()
        m.expect()
        s = img.reopen()
        s.pending_limit = rnd.choice(limits)
        errors = []
        for state in cands:
            try:
                check(s, state, where)
            except (Mismatch, BlockAuthError) as e:
                errors.append(repr(e))
                continue
            m.live, m.snaps = copy(state)
            m.durable = copy(state)
            return s
        raise AssertionError(f"seed {seed}: {where}: matches no state it may hold: {errors}")

    s = img.store
    s.pending_limit = rnd.choice(limits)
    tag = nsnap = 0
    for step in range(ops):
        op = rnd.choices(["write", "discard", "flush", "snap", "delete", "rollback", "crash", "damage", "detached",
                          "close"], [40, 5, 12, 5, 4, 2, 3, 2, 5 if detached else 0, 4 if closes else 0])[0]
        where = f"seed {seed} step {step} {op}"
        live, snaps = m.live, m.snaps
        disk.arm()
        try:
            if op == "write":
                base = rnd.choice(hot) + rnd.randrange(8)
                n, tag = rnd.randrange(1, 9), tag + 1
                m.expect((live, snaps))  # an early commit comes before the write
                s.write_sectors(base, b"".join(sector(tag, base + i) for i in range(n)))
                live.update((base + i, sector(tag, base + i)) for i in range(n))
            elif op == "discard":
                base, n = rnd.choice(hot), rnd.randrange(1, 6)
                m.expect()
                s.forget_sectors(base, base + n)
                for i in range(n):
                    live.pop(base + i, None)
            elif op == "flush":
                m.expect((live, snaps))
                s.flush()
            elif op == "snap":
                nsnap += 1
                sid = f"snap-{nsnap:016x}"
                m.expect(*([(live, snaps)] if busy(s) else []), (live, {**snaps, sid: live}))
                s.snapshot(sid, "", 1.0)
                snaps[sid] = dict(live)
            elif op == "delete" and snaps:
                sid = rnd.choice(sorted(snaps))
                after = (live, {k: v for k, v in snaps.items() if k != sid})
                m.expect(*[after] * (1 + COMPACTION_COMMITS))
                s.delete_snapshot(sid)
                del snaps[sid]
            elif op == "rollback" and snaps:
                sid = rnd.choice(sorted(snaps))
                m.expect(*([(live, snaps)] if busy(s) else []), *[(snaps[sid], snaps)] * (1 + COMPACTION_COMMITS))
                s.rollback(sid)
                m.live = dict(snaps[sid])
            elif op == "detached":  # `snapshot create` of the detached volume: its map is not read
                disk.disarm()
                m.expect((live, snaps))
                s.flush()
                s.sync_mirrors()
                s = img.reopen(live=False)
                nsnap += 1
                sid = f"snap-{nsnap:016x}"
                m.expect((live, {**snaps, sid: live}))  # not counted by _committed: see below
                disk.arm()
                try:
                    s.snapshot_unloaded(sid, "", 1.0)
                except OSError as e:  # the command fails and exits: what is on disk counts
                    assert e.errno in (errno.ENOSPC, errno.EIO), e
                    s = reopen(where)
                    continue
                m.durable = copy(m.plan[0])
                snaps[sid] = dict(live)
                s = reopen(where)  # and a power loss, maybe, before the next attach
                continue
            elif op == "damage":  # one commit slot damaged at rest
                disk.disarm()
                m.expect()
                s.sync_mirrors()
                os.pwrite(img.fd, os.urandom(64), commit_offset(rnd.randrange(2)) + rnd.randrange(4000))
                s = reopen(where)
                continue
            elif op == "crash":
                m.expect()
                s = reopen(where)
                continue
            elif op == "close":  # OpenVolume.close(): the mirrors synced, then the zeros ahead cut off
                m.expect()
                try:
                    s.sync_mirrors()
                except OSError:
                    pass
                else:
                    s.cut_zeros_ahead()
                s = reopen(where)
                continue
        except Crash:
            s = reopen(where)
            continue
        except OSError as e:
            if isinstance(e, StoreFailed) or s._failed:
                s = reopen(where)  # detach and attach again
                continue
            # a refused operation changes nothing but what it committed (EIO: a mirror's fsync)
            assert e.errno in (errno.ENOSPC, errno.EIO), e
        disk.disarm()
        if s._failed:  # a commit's sync failed, and a compaction logs that and goes on: attach again
            s = reopen(where)
            continue
        m.expect()
        check(s, (m.live, m.snaps), where, snapshots=step % 10 == 0)
    disk.disarm()
    m.expect((m.live, m.snaps))
    s.flush()
    m.expect()
    check(img.reopen(), (m.live, m.snaps), f"seed {seed} at the end")
    os.close(img.fd)


@pytest.mark.parametrize("seed", [0, 2, 6, 10, 12, 181, 188, 1001, 1002])
def test_every_crash_leaves_a_committed_state_and_every_snapshot_intact(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(seed, 300, tmp_path, monkeypatch)


@pytest.mark.parametrize("seed", [0, 6, 181])
def test_two_sync_commits_of_older_volumes_under_crashes(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on a volume made before one-sync commits (no ONE_SYNC_COMMITS in its header)."""
    run(seed, 300, tmp_path, monkeypatch, one_sync=False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_detached_snapshots_under_crashes_hold_what_they_froze(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with `snapshot create` of a detached volume (CowStore.snapshot_unloaded: the new
    table past the committed pool, the old one found free at the next open) among the steps."""
    run(seed, 300, tmp_path, monkeypatch, detached=True)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clean_closes_among_crashes_keep_the_committed_pool(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with clean closes among the steps (the zeros written ahead of the pool are cut
    off, never below the pool a durable commit names, even after a compaction whose commit failed)."""
    run(seed, 300, tmp_path, monkeypatch, closes=True)
