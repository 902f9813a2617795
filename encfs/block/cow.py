"""Plaintext sector I/O over a format-2 (copy-on-write) volume image, with its commits
(cowcommit.py) and snapshots (their operations and the compaction after a deletion: cowsnap.py).

Sealed sectors go to free pages of the image's pool; the sector map
(maptree.py) says which page holds each sector's current contents; a commit
record, sealed in one of two slots, names the map's root and the snapshot
table. Writing a commit record at flush is the commit (the design of LVM thin
pools, qcow2 and ZFS). Invariants:

- Copy-on-write: a write never touches a page that the last commit, or a
  snapshot, reaches. A crash at any moment leaves the last commit's map and
  every page it reaches intact, so every sector reads its old contents or,
  after a flush, its new ones; a write that fails (ENOSPC) changes no map.
- flush() writes the changed map nodes and the snapshot table to fresh
  pages, fdatasyncs (sectors and nodes), writes the commit record with the
  next transaction number to the slot the previous commit mirrored into,
  and fdatasyncs: the commit. With ``one_sync`` (the header's
  ONE_SYNC_COMMITS) the record lists the pages the transaction wrote and
  the first fdatasync is left out when they fit in it (commitcheck.py). Then the same record goes to the other slot,
  unsynced (the next flush's first fdatasync makes it durable; a mirror whose
  write or sync failed is written again by sync_mirrors()): at rest both
  slots hold the newest commit, so damage to one loses nothing, and a torn
  commit write leaves the other slot's previous commit.
- Opening takes the newest commit that authenticates (equal numbers: the
  mirrored state) unless it is a listed one that did not reach the disk
  whole (commitcheck.choose_commit), and, if writable, repairs the other
  slot. An open that serves or writes the image syncs it first (if
  writable) and drops its page cache, so that it chooses from what is on
  the disk (commitcheck.py).
- Page accounting is rebuilt at open by walking every tree (snapshots, the
  live map): a page no tree reaches is free (and reused), and an open for
  writing cuts off pages past the committed pool, so a crash leaks no space. A page the live map stops
  reaching is free once the next commit is durable, unless a snapshot holds
  it: one does exactly when the page was born in a transaction at or before
  the newest snapshot's (ZFS's birth-time rule; snapshots are taken of
  committed states only). Snapshot-table pages are never held.
- While open for writing, the image may run on past the pool with zeros no commit reaches
  (cowcommit.py, written ahead so that a commit's fdatasync does not also commit the image's
  growth); the open for writing and a clean close cut them off.
- Freed pages are reused before the pool grows, those that still hold their
  bytes before punched ones (pages.py). At most PagePool.allowance() freed
  pages (1/32 of the pages in use, capped by ``pending_limit``) wait for a
  commit: past it a write commits first, so the image stays within 1.15
  times its data without snapshots (and within layout.cow_image_bound()).
- Nonces are unique by construction: every seal under the volume key
  (sectors, nodes, table pages, commit records) takes the next values of a
  64-bit counter (budget.SealBudget, reserved in the header before use, so
  a crash skips values and never repeats one) behind a 4-byte prefix drawn
  at random for each open. AAD binds each page to its place: sectors to
  (volume id, "data", sector), nodes to (level, index), table pages to the
  commit that wrote them, commit records to their slot.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from array import array
from collections.abc import Iterator

from encfs.block.budget import SealBudget
from encfs.block.commitcheck import choose_commit, drop_cached
from encfs.block.cowcommit import _ZEROS_CHUNK, StoreFailed
from encfs.block.cowsnap import CowSnapshots
from encfs.block.layout import (
    COMMIT_START,
    FANOUT,
    POOL_START,
    SECTOR_SIZE,
    commit_offset,
    cow_image_bound,
    node_block_number,
    page_offset,
)
from encfs.block.maptree import MapTree, node_from_bytes
from encfs.block.pages import PagePool
from encfs.block.records import (
    Commit,
    Snapshot,
    parse_table,
)
from encfs.block.sectorio import SectorIO
from encfs.blocks import NONCE_PREFIX_LEN, SEALED_BLOCK, BlockAuthError, BlockCipher
from encfs.diskio import pwrite_all
from encfs.sealing import Sealer
from encfs.sealworker import MAX_PLAIN

log = logging.getLogger("encfs.block")

DATA_SCOPE, NODE_SCOPE, TABLE_SCOPE, COMMIT_SCOPE = b"data", b"node", b"snapshots", b"commit"
_ZEROS = bytes(MAX_PLAIN)
_ZERO_SECTOR = bytes(SECTOR_SIZE)


class VolumeTruncated(Exception):
    """The image is shorter than its newest commit says."""


class CowSealed:
    """Sectors sealed by seal_ahead(): written by write_sealed() wherever free pages are."""

    __slots__ = ("blob", "count", "first")

    def __init__(self, first: int, count: int, blob: bytes | bytearray | memoryview) -> None:
        self.first, self.count, self.blob = first, count, blob


class CowStore(CowSnapshots, SectorIO):
    """Sector-granular plaintext access to one format-2 image. Reads may run alongside each
    other and alongside seal_ahead(); everything else runs alone (the server's lock)."""

    cipher_class: type[BlockCipher] = BlockCipher  # benchmarks/null_volume.py swaps in a null cipher

    def __init__(self, fd: int, key: bytes, volume_id: bytes, sectors: int, budget: SealBudget,
                 pending_limit: int | None = None, one_sync: bool = False) -> None:
        self.fd, self.sectors, self.budget = fd, sectors, budget
        self.one_sync = one_sync  # the header's ONE_SYNC_COMMITS: listed commits (commitcheck.py)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        prefix = os.urandom(NONCE_PREFIX_LEN)
        self._prefix = prefix
        cipher = self.cipher_class
        self._nodes = cipher(key, volume_id + NODE_SCOPE, nonce_prefix=prefix)
        self._table_cipher = cipher(key, volume_id + TABLE_SCOPE, nonce_prefix=prefix)
        self._commits = cipher(key, volume_id + COMMIT_SCOPE, nonce_prefix=prefix)
        self._volume_id = volume_id
        self._writable = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_WRONLY | os.O_RDWR) != 0
        self.pending_limit = self.default_pending_limit(sectors) if pending_limit is None else pending_limit
        # Sectors: the sealer's cipher is the one reads open them with (sectorio swaps in a sealer
        # that may use the worker, around the same cipher).
        self.sealer = Sealer(cipher(key, volume_id + DATA_SCOPE, nonce_prefix=prefix))
        self.tree = MapTree()
        self.snapshots: list[Snapshot] = []
        self.txg = 1  # the open transaction
        self._table: list[int] = []  # the committed snapshot table's pages
        self._table_txg = 0
        self._table_dirty = False
        self._root_changed = False
        self._slot = 0  # the slot the next commit goes to
        self._unsynced = False
        self._mirror: Commit | None = None  # the newest commit, until its mirror is synced
        self._mirror_written = False
        self._failed = False
        self._zeros_from: int | None = None  # where the zeros this open wrote past the pool began (cowcommit.py)
        self._durable_pages = 0  # the pool of the newest durable commit (load, commits)
        self.pool = PagePool(fd)
        self.pool.slack = self.pending_limit
        self._loaded: Commit | None = None  # the newest commit, as load() found it
        self._map_read = True  # False after load(live=False): no page accounting, so no writes

    @staticmethod
    def default_pending_limit(sectors: int) -> int:
        """The cap on freed pages waiting for a commit: 1/32 of the volume (at least 1 MiB). The
        pool's allowance() lowers it to 1/32 of the pages in use, so that the image stays within
        1.15 times the data however full the volume is."""
        return max(256, sectors // 32)

    def start_seal_worker(self, key: bytes) -> None:
        """Called by a serving daemon (open_volume(..., seal_worker=True)): see sectorio.py."""
        self._start_sealing(key, self._volume_id + DATA_SCOPE, self._prefix)

    # -- commit records ----------------------------------------------------------------

    def _seal_page(self, cipher: BlockCipher, block_no: int, plain: bytes, sectors: bool = False) -> bytes:
        return bytes(cipher.seal_range(range(block_no, block_no + 1), plain,
                                       counter=self.budget.spend(1, sectors=sectors)))

    def _write_page(self, data: bytes | bytearray | memoryview, page: int) -> None:
        pwrite_all(self.fd, data, page_offset(page))

    def _write_commit(self, slot: int, commit: Commit) -> None:
        pwrite_all(self.fd, self._seal_page(self._commits, slot, commit.pack()), commit_offset(slot))

    def _write_zeros(self, offset: int, length: int) -> None:
        pwrite_all(self.fd, memoryview(_ZEROS_CHUNK)[:length], offset)

    def image_bound(self) -> int:
        """The most bytes the image allocates without snapshots (layout.cow_image_bound)."""
        return cow_image_bound(self.sectors, self.pending_limit)

    def _read_commit(self, slot: int) -> Commit | None:
        sealed = os.pread(self.fd, SEALED_BLOCK, commit_offset(slot))
        try:
            return Commit.parse(self._commits.open(slot, sealed))
        except BlockAuthError:
            return None

    def format(self) -> None:
        """A new, empty volume: the first commit in both slots, synced."""
        commit = Commit(1, 0, 0, 1, 0, [])
        for slot in (0, 1):
            self._write_commit(slot, commit)
        os.ftruncate(self.fd, page_offset(1))
        os.fsync(self.fd)
        self.txg = 2

    def load(self, live: bool = True) -> None:
        """Read the newest commit, its map and snapshot table; rebuild the page accounting.
        Without ``live``, only the snapshot table (for a reader beside the serving daemon: the
        pages of snapshots do not change while they exist, the live map's do)."""
        if self._writable:
            # What a killed daemon left in the page cache reaches the disk before this open builds
            # on it: a slot that looks mirrored may hold an unsynced mirror, and the next commit
            # overwrites the other slot (a one-sync commit with no sync before it).
            os.fdatasync(self.fd)
        beside_daemon = not (self._writable or live)  # a reader beside the daemon serving the image
        if not beside_daemon:
            # The whole file: an advice over a range drops only the cached pages wholly inside it,
            # and a 4124-byte page seldom is one (commitcheck.drop_cached). Not beside a serving
            # daemon, whose cache this would empty: that reader drops the slots, afresh each time.
            drop_cached(self.fd, 0, 0)
        for attempt in range(3):
            if beside_daemon:
                drop_cached(self.fd, COMMIT_START, POOL_START - COMMIT_START)  # slots: whole pages, aligned
            found = choose_commit(self.fd, [self._read_commit(0), self._read_commit(1)])
            if found is None:
                raise BlockAuthError(node_block_number(0, 0))
            choice = found
            slot, commit = choice.slot, choice.commit
            whole = os.fstat(self.fd).st_size >= page_offset(commit.pages + 1)
            if whole and (live or attempt == 2 or choice.newest == commit.txg):
                break
            if live or attempt == 2:
                raise VolumeTruncated(f"the image ends before its last page ({commit.pages})")
            # A reader beside the daemon: a compaction (cowsnap.py) may have committed a shorter
            # pool and cut the image since the records were read (that commit is durable first),
            # or newer commits may have reused the pages of the one it checked: read them again.
        if choice.note:
            log.warning("volume %s", choice.note)
        # Past the newest record even when it is passed over (until the repair below overwrites it).
        self.txg, self._slot = choice.newest + 1, 1 - slot
        self._table, self._table_txg = commit.table, commit.table_txg
        self.snapshots = self._read_table(commit)
        self._loaded, self._map_read = commit, live
        self._durable_pages = commit.pages
        if not live:
            return
        self.tree = MapTree.load(commit.root, commit.depth, self._read_node)
        self._rebuild(commit.pages, punch=False)  # free pages are reused; deletions punch
        end = page_offset(commit.pages + 1)
        if self._writable and os.fstat(self.fd).st_size > end:
            os.ftruncate(self.fd, end)  # pages a crash left past the committed pool: never reached
        if self._writable and not choice.mirrored:
            # The repair is the newest commit's mirror: if its write or its sync fails,
            # sync_mirrors() writes it again, as after a commit.
            self._mirror = commit
            self._write_mirror()
            if choice.newest != commit.txg:
                # It overwrites a newer record passed over: durable before anything is served, or a
                # second crash could leave that record, and a later open (the image longer by then,
                # its pages not reused) take it, changing sectors nobody wrote since.
                self.sync_mirrors()

    def _read_node(self, level: int, index: int, page: int) -> array[int]:
        sealed = os.pread(self.fd, SEALED_BLOCK, page_offset(page))
        return node_from_bytes(self._nodes.open(node_block_number(level, index), sealed))

    def snapshot_tree(self, snapshot: Snapshot) -> MapTree:
        return MapTree.load(snapshot.root, snapshot.depth, self._read_node)

    def read_tree(self, tree: MapTree, first: int, count: int) -> bytearray:
        """Sectors [first, first + count) as ``tree`` (a snapshot's) has them."""
        out = bytearray(count * SECTOR_SIZE)
        read_tree_into(self.fd, self.sealer.cipher, tree, first, count, memoryview(out))
        return out

    def _read_table(self, commit: Commit) -> list[Snapshot]:
        data = bytearray()
        for i, page in enumerate(commit.table):
            sealed = os.pread(self.fd, SEALED_BLOCK, page_offset(page))
            data += self._table_cipher.open(commit.table_txg << 10 | i, sealed)
        return parse_table(data)

    # -- page accounting (pages.py) --------------------------------------------------

    def _rebuild(self, pages: int, punch: bool) -> None:
        """Page states of a pool of ``pages`` from the trees: see pages.py."""
        seen: set[int] = set()
        held = [p for snap in self.snapshots for p in self._tree_pages(snap.root, snap.depth, seen)]
        live = list(self.tree.pages.values()) + list(self.tree.data_pages())
        latest = max((snap.txg for snap in self.snapshots), default=0)
        self.pool.rebuild(pages, self.txg, latest, held, live, self._table, punch)

    def _tree_pages(self, root: int, depth: int, seen: set[int]) -> Iterator[int]:
        """Every page a snapshot's tree reaches, each shared node (and what is under it) once."""
        stack = [(depth - 1, 0, root)] if root else []
        while stack:
            level, index, page = stack.pop()
            if page in seen:
                continue
            seen.add(page)
            yield page
            try:
                node = self._read_node(level, index, page)
            except BlockAuthError:  # its sectors read as EIO in that snapshot; what it named may be reused
                log.warning("a snapshot's map node %d of level %d fails authentication", index, level)
                continue
            if level:
                stack.extend((level - 1, (index << 10) + i, c) for i, c in enumerate(node) if c)
            else:
                yield from (p for p in node if p)

    @property
    def pages(self) -> int:
        return self.pool.pages

    # -- I/O --------------------------------------------------------------------------

    def written_runs(self) -> Iterator[tuple[int, int]]:
        return self.tree.written_runs(self.sectors)

    def read_sectors(self, first: int, count: int) -> bytearray:
        self._check_readable()
        out = bytearray(count * SECTOR_SIZE)
        read_tree_into(self.fd, self.sealer.cipher, self.tree, first, count, memoryview(out))
        return out

    def _read_sector(self, sector: int) -> bytes:
        self._check_readable()
        tree = self.tree
        tree.check(sector, 1)
        page = tree.get(sector)
        if not page:
            return _ZERO_SECTOR
        sealed = os.pread(self.fd, SEALED_BLOCK, page_offset(page))
        if len(sealed) != SEALED_BLOCK:
            raise BlockAuthError(sector)
        return self.sealer.cipher.open(sector, sealed)

    def read_tree_view(self, tree: MapTree, first: int, count: int) -> memoryview | bytearray:
        """Sectors [first, first + count) as ``tree`` has them, opened as read_view() opens the live
        map's: with a sealing worker, in this thread's slot of its arena, valid until this thread's
        next read. A re-key copying snapshots ran at 140 MB/s opening them in its reading thread."""
        areas = self.sealer.arena(count * SECTOR_SIZE, count * SEALED_BLOCK)
        if areas is not None:
            plain = areas[0][:count * SECTOR_SIZE]
            self._open_in_arena(first, count, plain, areas[1], tree)
            return plain
        return self.read_tree(tree, first, count)

    def _open_in_arena(self, first: int, count: int, plain: memoryview, sealed_area: memoryview,
                       tree: MapTree | None = None) -> None:
        jobs: list[tuple[range, memoryview, memoryview]] = []
        at = 0
        if tree is None:
            self._check_readable()
            tree = self.tree
        tree.check(first, count)
        for s, n, page in tree.page_runs(first, count):
            part = plain[(s - first) * SECTOR_SIZE:(s - first + n) * SECTOR_SIZE]
            if not page:
                part[:] = _ZEROS[:len(part)]
                continue
            sealed = sealed_area[at:at + n * SEALED_BLOCK]
            at += n * SEALED_BLOCK
            if os.preadv(self.fd, [sealed], page_offset(page)) != n * SEALED_BLOCK:
                raise BlockAuthError(s)
            jobs.append((range(s, s + n), sealed, part))
        self.sealer.open_jobs(jobs)

    def _check_readable(self) -> None:
        """After a failed commit sync the pages written since the last commit may be lost from the
        disk and the page cache both, and such a page may hold an older genuine version of its
        sector: the live map is not read from until the volume is opened again."""
        if self._failed:
            raise StoreFailed(errno.EIO, "the volume store failed a commit; detach and re-attach it")

    def _check_writable(self) -> None:
        if not self._map_read:  # a commit would name an empty map; a write, pages in use
            raise OSError(errno.EROFS, "the volume was opened without its map")
        if self._failed:
            raise StoreFailed(errno.EIO, "the volume store failed a commit; detach and re-attach it")

    def _seal(self, first: int, data: bytes | bytearray | memoryview) -> CowSealed:
        count = len(data) // SECTOR_SIZE
        self._check_writable()
        counter = self.budget.spend(count)
        blocks = range(first, first + count)
        return CowSealed(first, count, self.sealer.seal_jobs([(blocks, data)], counters=[counter])[0])

    def seal_ahead(self, offset: int, data: bytes | bytearray | memoryview) -> CowSealed | None:
        """Seal a write of whole sectors, changing nothing: sealing depends only on the sectors'
        numbers, so write_sealed() always takes it."""
        if offset < 0 or offset % SECTOR_SIZE or len(data) % SECTOR_SIZE or not data \
                or offset + len(data) > self.sectors * SECTOR_SIZE:
            return None
        return self._seal(offset // SECTOR_SIZE, data)

    def write_sealed(self, sealed: CowSealed) -> bool:
        self._place(sealed)
        return True

    def write_sectors(self, first: int, data: bytes | bytearray | memoryview) -> None:
        self._place(self._seal(first, data))

    def _place(self, sealed: CowSealed) -> None:
        """Write sealed sectors to free pages, then point the map at them (module invariants)."""
        self.tree.check(sealed.first, sealed.count)
        if len(self.pool.pending) >= min(self.pending_limit, self.pool.allowance()):
            self.flush()
        runs = self.pool.alloc(sealed.count, self.txg)
        blob = memoryview(sealed.blob)
        try:
            at = 0
            for page, k in runs:
                pwrite_all(self.fd, blob[at * SEALED_BLOCK:(at + k) * SEALED_BLOCK], page_offset(page))
                at += k
        except OSError:
            self.pool.unalloc(runs)
            raise
        s = sealed.first
        for page, k in runs:
            for p in range(page, page + k):
                self.pool.drop(self.tree.set(s, p))
                s += 1

    def forget_sectors(self, first: int, end: int) -> None:
        """Discard whole sectors [first, end) (SectorIO.discard): see the module invariants."""
        now: list[int] = []
        self.tree.check(first, max(0, end - first))
        s = first
        while s < end:  # a leaf at a time: mkfs discards whole volumes, mostly never written
            stop = min(end, (s | (FANOUT - 1)) + 1)
            leaf = self.tree.leaf(s)
            if leaf is not None:
                base = s & ~(FANOUT - 1)
                for i in range(s - base, stop - base):
                    if leaf[i]:
                        self.pool.drop(self.tree.set(base + i, 0), now)
            s = stop
        self.pool.punch_pages(now)

    def grow(self, new_sectors: int) -> None:
        self.sectors = new_sectors  # the map grows a level when a write needs it


def read_tree_into(fd: int, cipher: BlockCipher, tree: MapTree, first: int, count: int, out: memoryview,
                   sealed_area: memoryview | None = None) -> None:
    """Sectors [first, first + count) of ``tree`` opened into ``out`` (unwritten ones left as
    they are); BlockAuthError naming the sector that fails. ``sealed_area`` (room for a leaf's
    1024 sealed sectors) is read into instead of a new buffer per run: fresh buffers of 4 MiB
    cost a page fault per 4 KiB, 0.5 s per GiB read."""
    tree.check(first, count)
    for s, n, page in tree.page_runs(first, count):
        if not page:
            continue
        if sealed_area is None:
            sealed: bytes | bytearray | memoryview = os.pread(fd, n * SEALED_BLOCK, page_offset(page))
            got = len(sealed)
        else:
            sealed = sealed_area[:n * SEALED_BLOCK]
            got = os.preadv(fd, [sealed], page_offset(page))
        if got != n * SEALED_BLOCK:
            raise BlockAuthError(s + got // SEALED_BLOCK)
        cipher.open_into(range(s, s + n), sealed, out[(s - first) * SECTOR_SIZE:(s - first + n) * SECTOR_SIZE])


__all__ = ["FANOUT", "CowSealed", "CowStore", "Snapshot", "StoreFailed", "VolumeTruncated", "read_tree_into"]
