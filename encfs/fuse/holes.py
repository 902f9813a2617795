"""A file's holes: the blocks it has no sealed version of, which read as zeros (FORMAT.md §6.4).

Holes are kept as a sorted list of disjoint, non-adjacent extents ``(first block, count)``
and travel in the file's authenticated state (fileheader.FileState), so a block is a hole
only because the state says so: an all-zero or punched block that the state calls data
fails authentication (EIO), unlike gocryptfs's "an all-zero block is a hole".

Invariants:
- Extents are sorted, disjoint, non-empty and never touch (add() merges neighbours), so
  two equal sets of blocks have one representation.
- At most HOLES_MAX extents are ever sealed into a state (the state must fit an ext4 xattr
  value next to the file's other xattrs); content.py materialises the smallest extents as
  sealed zero blocks when a change would exceed it.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator

# 64 extents of 16 bytes keep the sealed state under 1.1 KiB (the xattr block of an ext4 inode
# is 4 KiB, shared with the file's own encrypted xattrs).
HOLES_MAX = 64
EXTENT = struct.Struct(">QQ")  # first block, block count


class Holes:
    """A set of block numbers kept as extents."""

    __slots__ = ("_ext",)

    def __init__(self, extents: Iterable[tuple[int, int]] = ()) -> None:
        self._ext: list[tuple[int, int]] = []  # (first, stop)
        for first, count in extents:
            self.add(first, first + count)

    def __len__(self) -> int:
        return len(self._ext)

    def __bool__(self) -> bool:
        return bool(self._ext)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Holes) and self._ext == other._ext

    def __repr__(self) -> str:
        return f"Holes({self.extents()!r})"

    def copy(self) -> Holes:
        h = Holes()
        h._ext = list(self._ext)
        return h

    def extents(self) -> tuple[tuple[int, int], ...]:
        """``(first, count)`` of each extent, in order (the form sealed into the state)."""
        return tuple((a, b - a) for a, b in self._ext)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """``(first, stop)`` of each extent, in order."""
        return iter(self._ext)

    def _index(self, k: int) -> int:
        """Index of the last extent starting at or before ``k`` (-1 if none)."""
        return bisect.bisect_right(self._ext, (k, 1 << 66)) - 1

    def __contains__(self, k: object) -> bool:
        if not isinstance(k, int):
            return False
        i = self._index(k)
        return i >= 0 and k < self._ext[i][1]

    def overlaps(self, first: int, stop: int) -> bool:
        i = self._index(first)
        if i >= 0 and first < self._ext[i][1]:
            return True
        return i + 1 < len(self._ext) and self._ext[i + 1][0] < stop

    def add(self, first: int, stop: int) -> None:
        """Make blocks [first, stop) holes."""
        if first >= stop:
            return
        lo = bisect.bisect_left(self._ext, (first, 0))
        if lo and self._ext[lo - 1][1] >= first:
            lo -= 1
        hi = lo
        while hi < len(self._ext) and self._ext[hi][0] <= stop:
            hi += 1
        if lo < hi:
            first, stop = min(first, self._ext[lo][0]), max(stop, self._ext[hi - 1][1])
        self._ext[lo:hi] = [(first, stop)]

    def remove(self, first: int, stop: int) -> None:
        """Make blocks [first, stop) data."""
        if first >= stop or not self.overlaps(first, stop):
            return
        out: list[tuple[int, int]] = []
        for a, b in self._ext:
            if b <= first or a >= stop:
                out.append((a, b))
                continue
            if a < first:
                out.append((a, first))
            if b > stop:
                out.append((stop, b))
        self._ext = out

    def clip(self, stop: int) -> None:
        """Forget every hole at or past block ``stop`` (the file ends before it)."""
        self.remove(stop, max(stop, self._ext[-1][1]) if self._ext else stop)

    def segments(self, first: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """[first, stop) cut into maximal ``(a, b, is_hole)`` pieces, in order."""
        pos = first
        i = max(self._index(first), 0)
        while pos < stop:
            while i < len(self._ext) and self._ext[i][1] <= pos:
                i += 1
            if i < len(self._ext) and self._ext[i][0] <= pos:
                end = min(self._ext[i][1], stop)
                yield pos, end, True
            else:
                end = min(self._ext[i][0], stop) if i < len(self._ext) else stop
                yield pos, end, False
            pos = end

    def smallest(self) -> tuple[int, int]:
        """``(first, stop)`` of the shortest extent (the first of equals)."""
        return min(self._ext, key=lambda e: e[1] - e[0])

    def last_data_before(self, stop: int) -> int | None:
        """The highest block below ``stop`` that is not a hole (None if all of them are)."""
        k = stop - 1
        while k >= 0:
            i = self._index(k)
            if i < 0 or k >= self._ext[i][1]:
                return k
            k = self._ext[i][0] - 1
        return None

    def next_data(self, k: int) -> int:
        """The first block at or after ``k`` that is not a hole."""
        i = self._index(k)
        return self._ext[i][1] if i >= 0 and k < self._ext[i][1] else k

    def next_hole(self, k: int) -> int | None:
        """The first hole block at or after ``k`` (None if there is none)."""
        i = self._index(k)
        if i >= 0 and k < self._ext[i][1]:
            return k
        return self._ext[i + 1][0] if i + 1 < len(self._ext) else None


def pack_extents(extents: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(EXTENT.pack(a, n) for a, n in extents)


def unpack_extents(data: bytes, count: int) -> tuple[tuple[int, int], ...]:
    """``count`` extents from ``data``; ValueError unless they are exactly that, sorted,
    disjoint, non-empty, non-adjacent and at most HOLES_MAX."""
    if count > HOLES_MAX or len(data) != count * EXTENT.size:
        raise ValueError("hole list of the wrong length")
    out = tuple(EXTENT.unpack_from(data, i * EXTENT.size) for i in range(count))
    end = -1
    for a, n in out:
        if n <= 0 or a <= end or a + n >= 1 << 64:
            raise ValueError("hole list not sorted, disjoint and non-empty")
        end = a + n
    return out
