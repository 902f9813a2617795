"""The sector map of a format-2 volume: a radix tree of 1024-way nodes, held in memory.

A node is one 4 KiB page of 1024 little-endian u32 page numbers (layout.FANOUT):
a leaf (level 0) names the pool page holding each of its 1024 sectors' current
sealed contents, an inner node names its children's pages; 0 means "none"
(unwritten sectors, or no subtree). Node ``index`` of ``level`` covers sectors
[index * 1024^(level+1), (index+1) * 1024^(level+1)); the root is node 0 of
level depth - 1. A tree is copy-on-write (cow.py writes a changed node to a
fresh page at commit), so trees of snapshots share every node and sector
they have in common with the live map and with each other.

Invariants:
- ``nodes`` holds every node of the tree (a volume's map is 1/1024 of its
  written data); ``pages`` holds the page each node was last committed at;
  a node changed since is in ``dirty``, and so is every node on its path up
  to the root once a commit has run (commit_order() yields children first).
- A node that fails authentication is ``damaged``: every sector under it
  reads and writes as EIO (check()), never as zeros.
- Node keys are (level, index): the same for a node in every tree, so a
  node's AEAD block number (layout.node_block_number) binds its place in
  the tree whichever tree reaches it.
"""

from __future__ import annotations

import builtins
import errno
import sys
from array import array
from collections.abc import Callable, Iterator

from encfs.block.layout import FANOUT, MAX_DEPTH
from encfs.blocks import BlockAuthError

assert sys.byteorder == "little", "map nodes are stored as little-endian u32 arrays"

NodeKey = tuple[int, int]
_SHIFT = 10  # log2(FANOUT)
_EMPTY = bytes(4 * FANOUT)


def empty_node() -> array[int]:
    return array("I", _EMPTY)


def node_from_bytes(data: bytes | bytearray) -> array[int]:
    node = array("I")
    node.frombytes(bytes(data))
    if len(node) != FANOUT:
        raise ValueError("a map node is 4096 bytes")
    return node


class MapTree:
    """One map: live (changed in place in memory, committed by cow.py) or a snapshot's (read only)."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self.nodes: dict[NodeKey, array[int]] = {}
        self.pages: dict[NodeKey, int] = {}
        self.dirty: set[NodeKey] = set()
        self.damaged: set[NodeKey] = set()  # nodes that failed authentication: their sectors are EIO

    @classmethod
    def load(cls, root: int, depth: int, read_node: Callable[[int, int, int], array[int]]) -> MapTree:
        """The tree under ``root`` (0: empty); ``read_node(level, index, page)`` reads and
        authenticates one node, raising BlockAuthError if it fails: that node is ``damaged``
        (kept at its page, so that its page is never reused and its parent keeps naming it)."""
        tree = cls(depth)
        if root:
            stack = [(depth - 1, 0, root)]
            while stack:
                level, index, page = stack.pop()
                tree.pages[(level, index)] = page
                try:
                    node = read_node(level, index, page)
                except BlockAuthError:
                    tree.damaged.add((level, index))
                    continue
                tree.nodes[(level, index)] = node
                if level:
                    stack.extend((level - 1, (index << _SHIFT) + i, child) for i, child in enumerate(node) if child)
        return tree

    def check(self, first: int, count: int) -> None:
        """BlockAuthError if a sector in [first, first + count) lies under a damaged node."""
        if not self.damaged:
            return
        for level, index in self.damaged:
            shift = _SHIFT * (level + 1)
            lo, hi = index << shift, (index + 1) << shift
            if first < hi and lo < first + count:
                raise BlockAuthError(max(first, lo))

    @property
    def root_key(self) -> NodeKey:
        return (self.depth - 1, 0)

    @property
    def root_page(self) -> int:
        """The root's committed page (0: the committed tree is empty)."""
        return self.pages.get(self.root_key, 0)

    def leaf(self, sector: int) -> array[int] | None:
        return self.nodes.get((0, sector >> _SHIFT))

    def get(self, sector: int) -> int:
        leaf = self.nodes.get((0, sector >> _SHIFT))
        return 0 if leaf is None else leaf[sector & (FANOUT - 1)]

    def set(self, sector: int, page: int) -> int:
        """Point ``sector`` at ``page`` (0: unwritten); return the page it pointed at."""
        key = (0, sector >> _SHIFT)
        leaf = self.nodes.get(key)
        if leaf is None:
            if not page:
                return 0
            while sector >= FANOUT ** self.depth:
                if self.depth >= MAX_DEPTH:
                    raise OSError(errno.ENOSPC, "sector beyond what a format-2 map reaches")
                self._grow()
            leaf = self.nodes[key] = empty_node()
        i = sector & (FANOUT - 1)
        old, leaf[i] = leaf[i], page
        self.dirty.add(key)
        return old

    def _grow(self) -> None:
        """One more level: the old root becomes child 0 of a new root."""
        old = self.root_key
        self.depth += 1
        root = self.nodes[self.root_key] = empty_node()
        root[0] = self.pages.get(old, 0)  # an old root not committed yet is dirty: set_child() fills it in
        self.dirty.add(self.root_key)

    def commit_order(self) -> Iterator[NodeKey]:
        """The dirty nodes, children before parents, each once. The caller writes each and calls
        set_child(), which makes its parent dirty before the parent's level comes."""
        for level in range(self.depth):
            yield from sorted(k for k in self.dirty if k[0] == level)

    def set_child(self, key: NodeKey, page: int) -> None:
        """Record that node ``key`` is written at ``page`` in its parent (made dirty)."""
        level, index = key
        if level + 1 >= self.depth:
            return
        parent = (level + 1, index >> _SHIFT)
        node = self.nodes.get(parent)
        if node is None:
            node = self.nodes[parent] = empty_node()
        node[index & (FANOUT - 1)] = page
        self.dirty.add(parent)

    def data_pages(self) -> Iterator[int]:
        """Every sector's page (nonzero), leaf by leaf."""
        for (level, _i), node in self.nodes.items():
            if level == 0:
                yield from (p for p in node if p)

    def page_set(self) -> builtins.set[int]:
        """Every page the tree reaches: its nodes' and its sectors' (built by set.update, in C)."""
        pages = set(self.pages.values())
        for (level, _i), node in self.nodes.items():
            if level == 0:
                pages.update(node)
        pages.discard(0)
        return pages

    def page_runs(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(first sector, sector count, first page) for the runs making up [first, first + count):
        consecutive sectors on consecutive pages, or unwritten (page 0). No run crosses a leaf."""
        s, end = first, first + count
        while s < end:
            stop = min(end, ((s >> _SHIFT) + 1) << _SHIFT)
            leaf = self.nodes.get((0, s >> _SHIFT))
            if leaf is None:
                yield s, stop - s, 0
                s = stop
                continue
            base = s & ~(FANOUT - 1)
            i, j = s - base, stop - base
            start, page = i, leaf[i]
            for k in range(i + 1, j):
                p = leaf[k]
                if p != (page + k - start if page else 0):
                    yield base + start, k - start, page
                    start, page = k, p
            yield base + start, j - start, page
            s = stop

    def first_damaged(self) -> int | None:
        """The first sector under a node that failed authentication (None: none did). Such a
        node's written sectors cannot be listed: a copy of the tree must refuse, not skip them."""
        if not self.damaged:
            return None
        level, index = min(self.damaged)
        return index << (_SHIFT * (level + 1))

    def written_runs(self, sectors: int) -> Iterator[tuple[int, int]]:
        """(first sector, count) of the runs of written sectors below ``sectors``, in order."""
        run_start, run_end = -1, -1
        for (level, index) in sorted(k for k in self.nodes if k[0] == 0):
            base = index << _SHIFT
            if base >= sectors:
                break
            for s, n, page in self.page_runs(base, min(FANOUT, sectors - base)):
                if not page:
                    continue
                if s == run_end:
                    run_end += n
                else:
                    if run_start >= 0:
                        yield run_start, run_end - run_start
                    run_start, run_end = s, s + n
        if run_start >= 0:
            yield run_start, run_end - run_start

    def diff_runs(self, other: MapTree) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """How ``other`` differs from this tree, as (first sector, count) runs in order: the
        sectors ``other`` maps to another page (to copy from it), and the sectors only this tree
        maps (to discard). A leaf at the same committed page in both is skipped unread: pages are
        never rewritten while a tree reaches them, so the same page means the same contents."""
        copy: list[tuple[int, int]] = []
        drop: list[tuple[int, int]] = []

        def add(runs: list[tuple[int, int]], first: int, count: int) -> None:
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((first, count))

        leaves = sorted({i for (level, i) in self.nodes if level == 0}
                        | {i for (level, i) in other.nodes if level == 0})
        for i in leaves:
            key = (0, i)
            page = self.pages.get(key)
            if page and page == other.pages.get(key) and key not in self.dirty and key not in other.dirty:
                continue
            a, b = self.nodes.get(key), other.nodes.get(key)
            base = i << _SHIFT
            for j in range(FANOUT):
                was, now = (a[j] if a is not None else 0), (b[j] if b is not None else 0)
                if was != now:
                    add(copy if now else drop, base + j, 1)
        return copy, drop
