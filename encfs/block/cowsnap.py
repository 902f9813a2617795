"""Snapshots of a format-2 store (cow.py): create, delete, rollback, their space, and the
compaction that gives a deletion's scattered pages back. CowStore takes these methods from
CowSnapshots, which builds on CowCommits (cowcommit.py). Invariants:

- Snapshots are of committed states only: snapshot() commits what is pending first, then
  records the committed root and transaction in the table and commits the table. Nothing is
  copied, so the time depends on what awaits the first commit, not on the data.
- A detached create (snapshot_unloaded) reads no map node: the new table goes to pages just
  past the committed pool, which no tree reaches, and the table it replaces is found free by
  the next open's rebuild.
- Deleting a snapshot or rolling back frees what no tree reaches any more, compacts, then
  punches what still lies free. Compaction: pages only the live map reaches move from the pool's end into the lowest free
  pages (punched or not), each to a free page, and what they leave is freed only by the commit
  that stops reaching it; a second pass moves the nodes and table that commit wrote, and a last
  commit records the shorter pool before the image is cut. A crash at
  any point leaves the last commit as it was. A page a snapshot holds is never moved.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from encfs.block.cowcommit import CowCommits
from encfs.block.layout import FANOUT, MAX_PAGES, SECTOR_SIZE, page_offset
from encfs.block.maptree import MapTree
from encfs.block.pages import USED
from encfs.block.records import Commit, Snapshot
from encfs.blocks import SEALED_BLOCK

log = logging.getLogger("encfs.block")


class CowSnapshots(CowCommits):
    """The snapshot operations of cow.CowStore (a mixin: the store's state, and its commits)."""

    if TYPE_CHECKING:  # defined by CowStore, besides what CowCommits declares
        sectors: int
        pending_limit: int
        _writable: bool
        _loaded: Commit | None
        _durable_pages: int

        def snapshot_tree(self, snapshot: Snapshot) -> MapTree: ...
        def _rebuild(self, pages: int, punch: bool) -> None: ...
        def _read_commit(self, slot: int) -> Commit | None: ...
        def load(self, live: bool = True) -> None: ...

    def snapshot(self, snapshot_id: str, description: str, created: float, size: int | None = None) -> Snapshot:
        """Freeze the map: commit, then record the committed root in the table and commit again.
        Copies nothing: the time depends on what awaits the first commit, not on the data.
        ``size`` (default: the volume's): a re-key replaying a snapshot taken before a grow."""
        self.flush()
        snap = Snapshot(snapshot_id, self.tree.root_page, self.tree.depth,
                        self.sectors * SECTOR_SIZE if size is None else size, created, self.txg - 1, description)
        self.snapshots.append(snap)
        self._table_dirty = True
        latest = self.pool.latest_snapshot
        self.pool.latest_snapshot = snap.txg
        try:
            self.flush()
        except BaseException:
            self.snapshots.remove(snap)
            self.pool.latest_snapshot = latest
            raise
        return snap

    def snapshot_unloaded(self, snapshot_id: str, description: str, created: float) -> Snapshot:
        """snapshot() of a detached image opened by load(live=False): the committed map is frozen
        without reading it. The new table goes past the committed pool, where no tree reaches, and
        the table it replaces is found free by the next load()'s rebuild; so nothing but the
        commit records and the table is read, however much the volume holds."""
        commit = self._loaded
        assert commit is not None and not self.tree.pages and self._writable
        snap = Snapshot(snapshot_id, commit.root, commit.depth, self.sectors * SECTOR_SIZE, created, commit.txg,
                        description)
        table: list[int] = []

        def past_the_pool() -> int:  # pages no tree reaches
            if commit.pages + len(table) + 1 > MAX_PAGES:
                raise OSError(errno.ENOSPC, "the volume image has reached its largest size")
            table.append(commit.pages + len(table) + 1)
            return table[-1]

        self._seal_table(self.snapshots + [snap], past_the_pool)
        os.ftruncate(self.fd, page_offset(table[-1] + 1))  # and no page a crash left past the pool
        new = Commit(self.txg, self.txg, commit.root, commit.depth, commit.pages + len(table), table)
        os.fdatasync(self.fd)
        self._write_commit(self._slot, new)
        os.fdatasync(self.fd)  # the commit
        self.snapshots.append(snap)
        self._loaded, self._table, self._table_txg = new, table, new.txg
        self._durable_pages = new.pages
        self.txg, self._slot, self._mirror = self.txg + 1, 1 - self._slot, new
        self._write_mirror()
        return snap

    def delete_snapshot(self, snapshot_id: str) -> Snapshot:
        snap = self.find_snapshot(snapshot_id)
        self.snapshots.remove(snap)
        self._table_dirty = True
        try:
            self.flush()
        except BaseException:
            self.snapshots.append(snap)
            raise
        self._give_back()  # what only it held
        return snap

    def _give_back(self) -> None:
        """After a deletion or a rollback: free what no tree reaches now, then give it back."""
        self._rebuild(self.pages, punch=False)
        self.punch_free()

    def punch_free(self) -> None:
        """Give back the space of the free pages: compact, then punch what still lies free (also
        what a deletion killed before it got here left). The change that freed them is
        committed: a compaction that fails is logged and leaves the space to a later one."""
        try:
            self.compact()
        except OSError as e:
            log.warning("volume compaction failed (nothing is lost; the space stays in use): %s", e.strerror)
        self.pool.punch_free()

    def compact(self) -> int:
        """Bring the image back within its bound once more than ``pending_limit`` pages lie free
        (after a snapshot is deleted or rolled back to, scattered freed pages keep their
        filesystem blocks: pages are 4124 bytes). Pages only the live map reaches are moved from
        the pool's end into the lowest free pages, as sealed bytes (a sector's AAD names its
        sector, not its page) or, for map nodes and the table, rewritten by the commit; then a
        second commit records the shorter pool and the image is cut. Copy-on-write as any
        write: a crash keeps the last commit. Stops at the first page a snapshot holds. The
        number of pages cut. The caller punches what then lies free (punch_free)."""
        pool, tree = self.pool, self.tree
        if pool.holding <= min(self.pending_limit, pool.allowance()) or tree.damaged or self._failed:
            return 0
        self.flush()
        end = len(pool.state) - pool.free  # no page at or past it stays once the pool is compact
        # Moves, map nodes and the table go to the lowest free pages, punched or not: alloc()
        # otherwise takes pages that hold bytes first, wherever they lie, and after a punch_free()
        # (a compaction that failed) those lay up to the pool's end, and so did the moves. The
        # commit of the moves writes the nodes and the table to the free pages left, which may
        # be at the end still: a second pass rewrites them into the pages the moves left.
        pool.lowest_first = True
        try:
            for _pass in range(2):
                self._move_down(end)
        finally:
            pool.lowest_first = False
        cut = pool.trim()
        if cut:
            self._root_changed = True  # a commit of the shorter pool, then the cut
            self.flush()
            # Both slots durable first: a slot still naming the longer pool would read as a
            # truncated image if the newest one were damaged.
            self.sync_mirrors()
            os.ftruncate(self.fd, page_offset(self.pages + 1))
        return cut

    def _move_down(self, end: int) -> None:
        """One pass of compact() (the pool takes the lowest free pages first): the moves of the
        pages from ``end`` on, then their commit."""
        pool, tree, state = self.pool, self.tree, self.pool.state
        pool.rewind()
        owners = {page: key for key, page in tree.pages.items()}
        table = set(self._table)
        sectors: dict[int, int] = {}
        for (level, index), node in tree.nodes.items():
            if level == 0:
                base = index * FANOUT
                sectors.update((p, base + i) for i, p in enumerate(node) if p >= end)
        top, room = len(state) - 1, pool.free
        while top > 0:
            if state[top] != USED:  # free, or NEW: a page this loop moved into
                top -= 1
                continue
            if not pool.movable(top) or room <= len(tree.dirty) * 2 + 2 * tree.depth + len(table) + 2:
                break
            if top in sectors:
                (dst, _k), = pool.alloc(1, self.txg)
                if dst >= top:
                    pool.unalloc([(dst, 1)])
                    break
                try:
                    self._write_page(os.pread(self.fd, SEALED_BLOCK, page_offset(top)), dst)
                except OSError:  # as a refused write (_place): the page goes back, no tree reaches it
                    pool.unalloc([(dst, 1)])
                    raise
                pool.drop(tree.set(sectors[top], dst))
            elif top in owners:
                tree.dirty.add(owners[top])  # the commit writes it to the lowest free page
            elif top in table:
                self._table_dirty = True
            else:
                break
            room -= 1
            top -= 1
        pool.rewind()  # the nodes and the table too
        self.flush()  # the moves: the pages they left are free now

    def rollback(self, snapshot_id: str) -> Snapshot:
        """Make the live map the snapshot's (the caller makes sure nothing serves the volume)."""
        snap = self.find_snapshot(snapshot_id)
        self.flush()
        before = self.tree, self.sectors
        self.tree = self.snapshot_tree(snap)
        self.sectors = max(self.sectors, snap.size // SECTOR_SIZE)
        self._root_changed = True
        try:
            self.flush()
        except BaseException:  # the last commit is the live map's: so is the store's
            (self.tree, self.sectors), self._root_changed = before, False
            raise
        self._give_back()
        return snap

    def has_snapshot(self, snapshot_id: str) -> bool:
        """Whether the newest commit on disk still lists the snapshot: for a reader beside the
        daemon (load(live=False)), which reads the table again only if a commit replaced it.
        BlockAuthError as load()."""
        found = [c for slot in (0, 1) if (c := self._read_commit(slot)) is not None]
        if not found or max(found, key=lambda c: c.txg).table_txg != self._table_txg:
            self.load(live=False)
        return any(s.id == snapshot_id for s in self.snapshots)

    def find_snapshot(self, snapshot_id: str) -> Snapshot:
        for snap in self.snapshots:
            if snap.id == snapshot_id:
                return snap
        raise KeyError(snapshot_id)

    def snapshot_rows(self) -> list[dict[str, object]]:
        """Each snapshot with its exclusive and shared bytes (see space()), oldest first."""
        space = self.space()
        return [dict(asdict(s), **space[s.id]) for s in self.snapshots]

    def space(self) -> dict[str, dict[str, int]]:
        """For each snapshot id (and "live"): bytes of pages only it reaches ("exclusive") and
        pages it shares with another tree ("shared"). Walks every tree."""
        trees = [("live", self.tree)] + [(s.id, self.snapshot_tree(s)) for s in self.snapshots]
        reach: dict[str, set[int]] = {}
        seen: set[int] = set()
        shared: set[int] = set()  # reached by two trees or more; set operations, not a loop per page
        for name, tree in trees:
            pages = reach[name] = tree.page_set()
            shared |= seen & pages
            seen |= pages
        return {name: {"exclusive": (len(pages) - len(pages & shared)) * SEALED_BLOCK,
                       "shared": len(pages & shared) * SEALED_BLOCK}
                for name, pages in reach.items()}
