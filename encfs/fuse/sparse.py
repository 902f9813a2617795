"""fallocate(2) and SEEK_DATA/SEEK_HOLE over a file's holes (FORMAT.md §6.4, "Holes").

Invariants:
- A range is punched (PUNCH_HOLE, ZERO_RANGE) in this order: its partial edge blocks are
  rewritten with zeros through the normal write path (journaled), the journal is
  checkpointed, the state naming the whole blocks holes is made durable, and only then
  is the backing file punched: a crash at any point leaves every block reading its old
  contents or zeros, never EIO.
- A file that cannot have holes (no "sparse-files", a version-1 file) gets sealed zero
  blocks instead: the same contents, at the cost of space.
"""

from __future__ import annotations

import errno
import os

from encfs.blocks import sealed_offset, sealed_size
from encfs.diskio import fallocate
from encfs.fuse.content import FileContent, too_big
from encfs.fuse.fileheader import HEADER_LEN

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
_CHUNK = 1 << 20
SEEK_DATA, SEEK_HOLE = 3, 4


def _zeros(c: FileContent, start: int, end: int) -> None:
    for at in range(start, end, _CHUNK):
        c.write(at, bytes(min(_CHUNK, end - at)))


def _backing(c: FileContent, first: int, stop: int) -> tuple[int, int]:
    """Offset and length of blocks [first, stop) in the backing file (the last one may be short)."""
    start = sealed_offset(first, HEADER_LEN, c.block)
    return start, sealed_size(min(stop * c.block, c.size), HEADER_LEN, c.block) - start


def fallocate_content(c: FileContent, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on the file: plain and KEEP_SIZE reserve backing space for the range,
    PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE make it read zeros. EOPNOTSUPP for other modes."""
    if mode & ~_MODES or (mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    c.check_durable()
    end = offset + length
    keep = bool(mode & FALLOC_FL_KEEP_SIZE)
    too_big(end if not keep else offset, c.block)
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        if offset < c.size:
            punch(c, offset, min(end, c.size), zero_range=bool(mode & FALLOC_FL_ZERO_RANGE))
        if not keep and end > c.size:
            c.truncate(end)
        return
    if not keep and end > c.size:
        c.truncate(end)
    _reserve(c, offset, end)


def _reserve(c: FileContent, offset: int, end: int) -> None:
    """Backing space for the blocks of [offset, end) that are holes or past the end, so that
    writes into them (which go in place) do not meet ENOSPC."""
    block = c.block
    first, stop = offset // block, -(-end // block)
    start = sealed_offset(first, HEADER_LEN, block)
    fallocate(c.fd, FALLOC_FL_KEEP_SIZE, start, sealed_offset(stop, HEADER_LEN, block) - start)


def punch(c: FileContent, start: int, end: int, zero_range: bool = False) -> None:
    """Make plaintext [start, end) (inside the file) read zeros (see the invariants)."""
    block = c.block
    first, stop = -(-start // block), end // block
    if end == c.size:
        stop = -(-end // block)  # the file's short last block is whole for this purpose
    if first >= stop or not c.sparse or c.v1:
        _zeros(c, start, end)
        return
    if start < first * block and start // block not in c.holes:
        _zeros(c, start, first * block)
    if end > stop * block and stop not in c.holes:
        _zeros(c, stop * block, end)
    c.checkpoint()  # no journaled version of a block outlives it becoming a hole
    holes = c.holes.copy()
    holes.add(first, stop)
    if not c.commit_holes(holes, first, stop):
        _zeros(c, first * block, min(stop * block, c.size))
        return
    at, length = _backing(c, first, stop)
    try:
        fallocate(c.fd, (FALLOC_FL_ZERO_RANGE if zero_range else FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE,
                  at, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # The state already calls them holes (never opened): the old ciphertext only stays allocated.


def seek(c: FileContent | None, offset: int, whence: int) -> int:
    """SEEK_DATA / SEEK_HOLE at block granularity (a file without content has no data)."""
    size = 0 if c is None else c.size
    if offset < 0 or whence not in (SEEK_DATA, SEEK_HOLE):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if offset >= size or c is None:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
    k = offset // c.block
    if whence == SEEK_DATA:
        data = c.holes.next_data(k)
        if data == k:
            return offset
        if data * c.block >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return data * c.block
    hole = c.holes.next_hole(k)
    if hole is None or hole * c.block >= size:
        return size
    return offset if hole == k else hole * c.block
