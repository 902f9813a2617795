"""The commit of a format-2 store (cow.py): flush() and the mirror of each commit, the
snapshot table's pages, and the one-sync commits of commitcheck.py. CowStore takes these
methods from CowCommits. The protocol and its invariants are cow.py's module docstring
(docs/FORMAT.md §7.6.7); what this module adds:

- A commit's fdatasync that fails leaves the store failed (StoreFailed): what is on disk is
  unknown, so it takes no more writes and reads no more of its live map until opened again.
- A write or an ENOSPC before the record unallocates the transaction's pages and moves to the
  next transaction number, so that a retry seals its table afresh.
- After a durable commit the new pages are USED, the dropped ones freed, and the record is
  mirrored into the other slot unsynced; sync_mirrors() makes the mirror durable.
- Every page and record goes through the store's _write_page/_write_commit (cow.py's I/O, which
  the crash tests wrap).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from encfs.block.commitcheck import list_new_pages
from encfs.block.layout import SECTOR_SIZE, node_block_number, page_offset
from encfs.block.maptree import MapTree
from encfs.block.pages import NEVER_HELD, PagePool
from encfs.block.records import MAX_TABLE_PAGES, Commit, Snapshot, pack_table
from encfs.blocks import SEALED_BLOCK, BlockCipher

log = logging.getLogger("encfs.block")

# The most and the fewest bytes of zeros written past the pool's end (see _write_zeros_ahead).
ZEROS_AHEAD = 1 << 20
ZEROS_AHEAD_SMALL = 64 << 10
FS_BLOCK = 4096  # the zeros end on a block of the filesystem holding the image
_ZEROS_CHUNK = bytes(256 << 10)


class StoreFailed(OSError):
    """A commit's fdatasync failed: what is on disk is unknown, so the store takes no more writes."""


class CowCommits:
    """The commit operations of cow.CowStore (a mixin: the store's state)."""

    if TYPE_CHECKING:  # defined by CowStore
        fd: int
        txg: int
        one_sync: bool
        tree: MapTree
        pool: PagePool
        snapshots: list[Snapshot]
        _nodes: BlockCipher
        _table: list[int]
        _table_txg: int
        _table_dirty: bool
        _table_cipher: BlockCipher
        _root_changed: bool
        _slot: int
        _unsynced: bool
        _mirror: Commit | None
        _mirror_written: bool
        _failed: bool
        _zeros_from: int | None
        _durable_pages: int

        @property
        def pages(self) -> int: ...
        def _check_writable(self) -> None: ...
        def _seal_page(self, cipher: BlockCipher, block_no: int, plain: bytes, sectors: bool = False) -> bytes: ...
        def _write_page(self, data: bytes | bytearray | memoryview, page: int) -> None: ...
        def _write_commit(self, slot: int, commit: Commit) -> None: ...
        def _write_zeros(self, offset: int, length: int) -> None: ...
        def image_bound(self) -> int: ...

    def flush(self) -> None:
        """Make everything written so far durable: the commit (see the module invariants)."""
        self._check_writable()
        tree = self.tree
        if not (tree.dirty or self._table_dirty or self.pool.pending or self._root_changed):
            self.sync_mirrors()
            return
        allocated: list[tuple[int, int]] = []
        written: list[tuple[tuple[int, int], int]] = []
        try:
            for key in tree.commit_order():
                (page, _k), = runs = self.pool.alloc(1, self.txg)
                allocated += runs
                self._write_page(self._seal_page(self._nodes, node_block_number(*key), tree.nodes[key].tobytes()),
                                 page)
                tree.set_child(key, page)
                written.append((key, page))
            table, table_txg = self._table, self._table_txg
            if self._table_dirty:
                table, table_txg = self._write_table(allocated), self.txg
            root = dict(written).get(tree.root_key, tree.root_page)
            commit = Commit(self.txg, table_txg, root, tree.depth, self.pages, table)
            end, size = page_offset(self.pages + 1), os.fstat(self.fd).st_size
            if size < end:  # a pool grown by a failed write
                os.ftruncate(self.fd, end)
            self._write_zeros_ahead(end, size)
            if self.one_sync:
                commit.written = list_new_pages(self.fd, self.pool, commit.room())
            if not commit.written:
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    # Linux reports a lost write once and marks its pages clean: a retry would succeed
                    # and commit a map naming sectors that never reached the disk.
                    self._failed = True
                    raise
            self._write_commit(self._slot, commit)
        except OSError:
            self.pool.unalloc(allocated)
            # A retry seals the table afresh: under the next number, so that no page of this
            # attempt's table (bound to its transaction) can be mixed into the retry's.
            self.txg += 1
            raise
        try:
            os.fdatasync(self.fd)  # the commit
        except OSError as e:
            self._failed = True
            raise StoreFailed(e.errno or errno.EIO, f"volume commit not known to be durable: {e.strerror}") from None
        self._committed(commit, written)

    def _write_zeros_ahead(self, end: int, size: int) -> None:
        """Keep zeros written past the pool's ``end`` (the image is ``size`` bytes): a commit
        whose pages land there changes no allocation or size of the image, and its fdatasync then
        writes the pages alone (ext4 commits its journal as well for a file that grew: +300-400 us,
        docs/dev/block-layer.md). As many as 1/32 of the pages in use (from ZEROS_AHEAD_SMALL to
        ZEROS_AHEAD bytes, within the image's bound), written again when fewer than half are left
        and cut back when the data shrank, so that the image stays within 1.15 times its data.
        They are optional: a write that fails (a full disk) is cut back and the commit goes on."""
        ahead = min(ZEROS_AHEAD, max(ZEROS_AHEAD_SMALL, self.pool.used_pages() * SEALED_BLOCK // 32))
        target = min(-(-(end + ahead) // FS_BLOCK) * FS_BLOCK, max(end, self.image_bound()))
        if self._zeros_from is not None:
            # Past every pool end since they were written: a cut there takes no page that a
            # commit in either slot may name (a compaction's shorter pool is cut by its own step).
            self._zeros_from = zeros_from = max(self._zeros_from, end)
            if size > target + ahead and zeros_from < size:
                try:
                    os.ftruncate(self.fd, max(target, zeros_from))  # the pages in use fell: fewer zeros
                except OSError as e:  # optional too: the next commit tries again
                    log.debug("zeros ahead of the pool not cut back: %s", e.strerror)
                return
        if size - end >= ahead // 2:
            return
        start = max(size, end)
        if self._zeros_from is None:
            self._zeros_from = start
        try:
            while start < target:
                n = min(target - start, len(_ZEROS_CHUNK))
                self._write_zeros(start, n)
                start += n
        except OSError as e:
            log.debug("zeros ahead of the pool not written: %s", e.strerror)
            try:
                os.ftruncate(self.fd, max(size, end))
            except OSError:
                pass  # past the pool: nothing reaches them, and the next open for writing cuts them

    def cut_zeros_ahead(self) -> None:
        """At a clean close of a store that wrote zeros ahead: the image ends where its pool
        does, as at rest (FORMAT.md §7.6.1). Not after a failure, nor with a transaction open."""
        if self._zeros_from is None or self._failed or self.tree.dirty or self.pool.pending \
                or self._root_changed or self._table_dirty:
            return
        # Never before the pool the newest durable commit names: a compaction trims the pool in
        # memory before the commit of the shorter one, which may have failed.
        end = page_offset(max(self.pages, self._durable_pages) + 1)
        if os.fstat(self.fd).st_size > end:
            os.ftruncate(self.fd, end)

    def _committed(self, commit: Commit, written: list[tuple[tuple[int, int], int]]) -> None:
        """After a durable commit: the new pages are USED, the dropped ones freed; mirror it."""
        tree = self.tree
        for key, page in written:
            old = tree.pages.get(key, 0)
            tree.pages[key] = page
            if old:
                self.pool.release(old)
        tree.dirty.clear()
        punch: list[int] = []
        if self._table_dirty:
            for page in self._table:
                self.pool.release(page, punch)
            self._table, self._table_txg, self._table_dirty = commit.table, commit.table_txg, False
        self.pool.committed(punch)
        self._durable_pages = commit.pages
        self._root_changed = False
        self.txg += 1
        self._slot = 1 - self._slot
        self._mirror = commit
        self._write_mirror()

    def _write_mirror(self) -> None:
        """Write the newest commit into the other slot (``_slot``, where the next commit goes)."""
        assert self._mirror is not None
        try:
            self._write_commit(self._slot, self._mirror)
            self._unsynced = self._mirror_written = True
        except OSError as e:  # the commit is durable; sync_mirrors() writes the mirror again
            self._mirror_written = False
            log.warning("volume commit mirror write failed (the flush itself is durable): %s", e.strerror)

    def _write_table(self, allocated: list[tuple[int, int]]) -> list[int]:
        pages: list[int] = []

        def fresh_page() -> int:
            (page, _k), = runs = self.pool.alloc(1, self.txg)
            allocated.extend(runs)
            self.pool.birth[page] = NEVER_HELD
            pages.append(page)
            return page

        self._seal_table(self.snapshots, fresh_page)
        return pages

    def _seal_table(self, snapshots: list[Snapshot], next_page: Callable[[], int]) -> None:
        """Write ``snapshots`` as the table of the open transaction, a page at a time to the pages
        ``next_page()`` gives (ENOSPC past MAX_TABLE_PAGES, before any write)."""
        data = pack_table(snapshots)
        count = -(-len(data) // SECTOR_SIZE)
        if count > MAX_TABLE_PAGES:
            raise OSError(errno.ENOSPC, "the snapshot table is full")
        for i in range(count):
            chunk = data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE].ljust(SECTOR_SIZE, b"\0")
            self._write_page(self._seal_page(self._table_cipher, self.txg << 10 | i, chunk), next_page())

    def sync_mirrors(self) -> None:
        """Make the newest commit's mirror durable (at rest both slots hold it). A mirror whose
        write or sync failed is written again: until then the other slot holds the previous
        commit, whose freed pages are already reused."""
        if self._mirror is not None and not self._mirror_written:
            self._write_mirror()
        if self._unsynced:
            try:
                os.fsync(self.fd)
            except OSError:
                self._mirror_written = False  # Linux reports a lost write once: write it again next time
                raise
            self._unsynced = False
            if self._mirror_written:
                self._mirror = None
