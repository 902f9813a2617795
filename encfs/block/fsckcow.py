"""The format-2 part of ``encfs fsck`` (fsck.py says what is checked and repaired): commit
slots, snapshot table, map trees, data pages of the live map and of every snapshot, free pages.

Trees share nodes and pages (copy-on-write): a map node is opened once per place it has
((level, index), page), a data page once, by the first tree that reaches it (the live map, then
the snapshots oldest first: each snapshot's leaves that an earlier tree reaches at the same page
hold only pages checked already, and are skipped whole). A page that fails is then reported for
every tree that reaches it, by sector number and snapshot id.

Free pages: the page accounting is rebuilt from the trees at every open (pages.py), so a page no
tree reaches is free space that later writes reuse, not lost space. Normal use leaves up to about
twice the pool's slack (CowStore.default_pending_limit) free between commits; more free pages
that still hold disk space (what a snapshot deletion stopped before its punch leaves) are a
warning, and --repair gives their space back (CowStore.punch_free).
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_right
from pathlib import Path

from encfs.block.budget import SealBudget
from encfs.block.commitcheck import choose_commit, drop_cached
from encfs.block.cow import CowStore, read_tree_into
from encfs.block.fsck import sector_finding, verify
from encfs.block.header import VolumeHeader
from encfs.block.layout import FANOUT, SECTOR_SIZE, page_offset
from encfs.block.maptree import MapTree
from encfs.block.records import Commit, Snapshot
from encfs.blocks import SEALED_BLOCK, BlockAuthError
from encfs.fsckreport import WARNING, Finding, Report, sector_runs
from encfs.progress import progress

_FS_BLOCK = 4096  # what a hole punch frees: whole blocks of the image's filesystem


def _no_seals(_n: int) -> None:
    raise OSError(30, "fsck opens the volume read-only")


class _Cow(CowStore):
    """A format-2 store with the records fsck reads one by one."""

    _sealed: memoryview | None = None

    def commit_slots(self) -> list[Commit | None]:
        return [self._read_commit(slot) for slot in (0, 1)]

    def table(self, commit: Commit) -> list[Snapshot]:
        return self._read_table(commit)

    def node(self, level: int, index: int, page: int) -> array[int]:
        return self._read_node(level, index, page)

    def read_into(self, tree: MapTree, first: int, count: int, out: memoryview) -> None:
        if self._sealed is None:
            self._sealed = memoryview(bytearray(FANOUT * SEALED_BLOCK))  # a run never crosses a leaf
        read_tree_into(self.fd, self.sealer.cipher, tree, first, count, out, self._sealed)


def zeros_only(fd: int, start: int, end: int) -> bool:
    """Whether bytes [start, end) of the image are all zeros: what a commit writes ahead of the
    pool (cowcommit.py), which an image attached when its daemon was killed still holds."""
    while start < end:
        chunk = os.pread(fd, min(end - start, 1 << 20), start)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def check_cow(fd: int, path: Path, header: VolumeHeader, key: bytes, report: Report, data: bool) -> None:
    store = _Cow(fd, key, header.volume_id, header.sectors, SealBudget(header.seals_reserved, _no_seals, str(path),
                                                                       counter=True))
    commit = _commit(store, report)
    if commit is None:
        return
    size, end = os.fstat(fd).st_size, page_offset(commit.pages + 1)
    if size < end:
        report.add(Finding("truncated", f"the image ends before its last page ({commit.pages}): the sectors in "
                                        "the pages cut off read as I/O errors"))
    elif size > end and not zeros_only(fd, end, size):
        n = -(-(size - end) // SEALED_BLOCK)
        report.add(Finding("tail-pages", f"{n} page{'s' if n > 1 else ''} past the last commit (written after "
                                         "it, reached by no commit): --repair cuts them off", WARNING,
                           repairable=True, place="tail"))
    snaps: list[Snapshot] = []
    table_ok = True
    try:
        snaps = store.table(commit)
    except (BlockAuthError, ValueError, TypeError, KeyError):
        table_ok = False
        report.add(Finding("snapshot-table", "the snapshot table fails authentication: the snapshots cannot be "
                                             "found or checked (not repairable)"))
    nodes: dict[tuple[int, int, int], array[int] | None] = {}

    def read_node(level: int, index: int, page: int) -> array[int]:
        if (level, index, page) not in nodes:
            try:
                nodes[(level, index, page)] = store.node(level, index, page)
            except BlockAuthError:
                nodes[(level, index, page)] = None
        node = nodes[(level, index, page)]
        if node is None:
            raise BlockAuthError(index)
        return node

    trees: list[tuple[str | None, MapTree, int]] = [(None, MapTree.load(commit.root, commit.depth, read_node),
                                                     header.sectors)]
    trees += [(s.id, MapTree.load(s.root, s.depth, read_node), s.size // SECTOR_SIZE) for s in snaps]
    report.counts.update(snapshots=len(snaps), map_nodes=len(nodes))
    for sid, tree, sectors in trees:
        for level, index in sorted(tree.damaged):
            shift = 10 * (level + 1)
            lo, hi = index << shift, min((index + 1) << shift, sectors)
            owner = f"snapshot {sid}: " if sid else ""
            report.add(Finding("map-node", f"{owner}map node {index} of level {level} (page "
                                           f"{tree.pages[(level, index)]}) fails authentication: sectors "
                                           f"{lo}-{hi - 1} read as I/O errors (not repairable)",
                               snapshot=sid, sector=lo, count=max(0, hi - lo), place=f"{level}/{index}"))
    if data:
        _check_pages(store, trees, report)
    if table_ok and not any(tree.damaged for _s, tree, _n in trees):
        _free_pages(fd, store, commit, [t for _s, t, _n in trees], report)


def _commit(store: _Cow, report: Report) -> Commit | None:
    """The commit CowStore.load takes (commitcheck.choose_commit); a finding for a damaged or stale
    slot, or for a newest commit that did not reach the disk whole."""
    drop_cached(store.fd, 0, 0)  # check what is on the disk, as the open does
    slots = store.commit_slots()
    choice = choose_commit(store.fd, slots)
    if choice is None:
        report.add(Finding("commit", "both commit records fail authentication: the volume's map cannot be found "
                                     "(not repairable)"))
        return None
    slot, txg, other = choice.slot, choice.commit.txg, slots[1 - choice.slot]
    if choice.note:  # the other slot damaged, or the newest commit passed over: the open's own words
        report.add(Finding("commit-slot", choice.note, repairable=True, place=str(1 - slot)))
    elif other is not None and other.txg != txg:
        report.add(Finding("commit-slot", f"commit slot {1 - slot} holds an older commit (transaction {other.txg}; "
                                          f"the newest is {txg}): the last commit's mirror was not written",
                           repairable=True, place=str(1 - slot)))
    return choice.commit


def _residual(tree: MapTree, checked_pages: set[int], checked_leaves: set[int]) -> MapTree:
    """The part of ``tree`` whose pages are not checked yet (the rest zeroed: read as unwritten)."""
    out = MapTree(tree.depth)
    for key, node in tree.nodes.items():
        if key[0] or tree.pages.get(key) in checked_leaves:
            continue
        if checked_pages.isdisjoint(node):
            out.nodes[key] = node
        else:
            rest = array("I", (0 if p in checked_pages else p for p in node))
            if any(rest):
                out.nodes[key] = rest
    return out


def _check_pages(store: _Cow, trees: list[tuple[str | None, MapTree, int]], report: Report) -> None:
    checked_pages: set[int] = set()
    checked_leaves: set[int] = set()
    work: list[tuple[MapTree, list[tuple[int, int]]]] = []
    for _sid, tree, sectors in trees:
        part = tree if not work else _residual(tree, checked_pages, checked_leaves)
        runs = list(part.written_runs(sectors))
        work.append((part, runs))
        if len(trees) > 1:  # what the trees after this one can skip
            checked_pages.update(part.data_pages())
            checked_leaves.update(p for (level, _i), p in tree.pages.items() if level == 0)
    total = sum(n for _t, runs in work for _f, n in runs)
    damaged: dict[int, int] = {}  # page -> its sector
    with progress(total * SECTOR_SIZE, f"fsck {Path(report.target).name}") as bar:
        for part, runs in work:
            def ranges(first: int, count: int, part: MapTree = part) -> list[tuple[int, int]]:
                return [(page_offset(page), n * SEALED_BLOCK) for _s, n, page in part.page_runs(first, count) if page]

            def read_into(first: int, count: int, out: memoryview, part: MapTree = part) -> None:
                store.read_into(part, first, count, out)

            for s in verify(store.fd, runs, read_into, lambda e: e.block_no, ranges, bar):
                damaged[part.get(s)] = s
    report.counts["sectors_checked"] = total
    if not damaged:
        return
    for sid, tree, sectors in trees:
        bad = []
        for (level, index), node in tree.nodes.items():
            if level == 0 and not damaged.keys().isdisjoint(node):
                bad += [index << 10 | i for i, p in enumerate(node) if p in damaged and index << 10 | i < sectors]
        for first, n in sector_runs(bad):
            report.add(sector_finding(sid, first, n))


def _free_pages(fd: int, store: _Cow, commit: Commit, trees: list[MapTree], report: Report) -> None:
    """Count the pool's pages no tree reaches, and the disk space they hold (module docstring)."""
    reached = bytearray(commit.pages + 1)
    reached[0] = 1
    for tree in trees:
        for page in tree.pages.values():
            if page <= commit.pages:
                reached[page] = 1
        for page in tree.data_pages():
            if page <= commit.pages:
                reached[page] = 1
    for page in commit.table:
        if page <= commit.pages:
            reached[page] = 1
    data = _data_segments(fd)
    free = held = 0
    p = reached.find(0, 1)
    while p >= 0:
        q = reached.find(1, p)
        q = len(reached) if q < 0 else q
        free += q - p
        held += _allocated(data, -(-page_offset(p) // _FS_BLOCK) * _FS_BLOCK,
                           page_offset(q) // _FS_BLOCK * _FS_BLOCK)
        p = reached.find(0, q)
    report.counts.update(free_pages=free, free_bytes_held=held)
    usual = (2 * CowStore.default_pending_limit(store.sectors) + 256) * SEALED_BLOCK
    if held > usual:
        report.add(Finding("free-pages", f"{free} free pages, which no tree reaches, hold {held >> 20} MiB of disk "
                                         f"(more than the {usual >> 20} MiB use leaves; a snapshot deletion "
                                         "stopped before it gave its space back?): --repair gives it back",
                           WARNING, repairable=True, place="free"))


def _data_segments(fd: int) -> list[tuple[int, int]]:
    """(start, end) of the image's allocated ranges (SEEK_DATA / SEEK_HOLE)."""
    out, pos, size = [], 0, os.fstat(fd).st_size
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def _allocated(segments: list[tuple[int, int]], start: int, end: int) -> int:
    """Bytes of [start, end) that lie in ``segments`` (sorted, disjoint)."""
    if end <= start:
        return 0
    total = 0
    i = max(0, bisect_right(segments, (start, start)) - 1)
    while i < len(segments) and segments[i][0] < end:
        a, b = segments[i]
        total += max(0, min(b, end) - max(a, start))
        i += 1
    return total
