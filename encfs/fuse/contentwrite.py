"""Writes and truncation of a regular file's content (content.py's FileContent takes them from
ContentWrites): where each sealed block goes (the journal, or in place), gaps past the end (holes
or sealed zeros), the bound on the holes in memory; and the format's size limits.

Of content.py's invariants, these are kept here:
- A block that exists goes to the journal, never over itself in place (_place). Blocks written
  into holes go in place, and so do blocks past the end of a version-2 file, except while the
  journal holds unsynced records and the backing file none: then they go to the journal too.
  Before a block goes in place after one whose journaled version is unsynced, the journal is
  synced.
- A write that fails (ENOSPC from pwrite_all) leaves no partial record or block: the journal
  is cut back to its old length, and so is the backing file.
- A new hole is in a durable state before the backing file changes (commit_holes), and
  truncate lowers the synced size before it cuts the backing file. The holes in memory never
  exceed HOLES_MAX extents (_bound_holes).
- No file grows past max_file_size: EFBIG before anything changes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from encfs.blocks import OVERHEAD, blocks_touched, sealed_offset, sealed_size
from encfs.diskio import pwrite_all
from encfs.fuse.contentfields import ContentFields
from encfs.fuse.fileheader import HEADER_LEN
from encfs.fuse.holes import HOLES_MAX, Holes

log = logging.getLogger("encfs.fuse")
_ZERO_CHUNK = 1 << 20  # fill gaps 1 MiB at a time (at least one block)
# A journal this long is checkpointed at once: it bounds the journal's disk space and the
# work a recovery replays, and a checkpoint costs only two fdatasyncs (benchmarks/HISTORY.md, dfabbb4).
JOURNAL_MAX = 16 << 20
# A write past the end leaves a hole only if the gap is this long: a smaller gap (writeback out
# of order, a record appended with padding) is cheaper filled with sealed zeros than with a
# durable state (two syncs) and an extent out of HOLES_MAX.
HOLE_MIN = 1 << 20
_MAX_BACKING = (1 << 63) - 1  # offsets are signed 64-bit (off_t, FUSE, lseek)


def max_file_size(block: int) -> int:
    """The largest plaintext size whose backing file still ends below 2^63 bytes (FORMAT.md §6.4)."""
    full, rest = divmod(_MAX_BACKING - HEADER_LEN, block + OVERHEAD)
    return full * block + max(0, rest - OVERHEAD)


def too_big(end: int, block: int) -> None:
    """EFBIG if a file of ``end`` bytes is past what the format supports."""
    if end > max_file_size(block):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


def whole_blocks(offset: int, length: int, block: int) -> range | None:
    """The blocks a write of [offset, offset+length) replaces entirely, if it keeps no old byte
    of any block it touches (aligned at both ends); None otherwise. Such a write can be sealed
    before the file's state is known: nothing it seals depends on what the file holds."""
    if length <= 0 or offset % block or length % block:
        return None
    return range(offset // block, (offset + length) // block)


class ContentWrites(ContentFields):
    """The writes and truncation of content.FileContent (a mixin: the content's state)."""

    def check_key(self) -> None:
        """Before the first write to a file this daemon did not make: its key must open one of
        its blocks, or a header copied from another file would have us seal blocks under that
        file's key (header poisoning). BlockAuthError if it does not."""
        if self.verified or self.size == 0:
            self.verified = True
            return
        last = self.holes.last_data_before(-(-self.size // self.block))
        if last is not None:  # else every block is a hole: the state naming them opened under the key
            self.read(last * self.block, 1)
        self.verified = True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        self.check_durable()
        too_big(offset + len(data), self.block)
        if offset > self.size:
            self._extend(offset, gap_hole=True)
        if not data:
            return 0
        block, size = self.block, self.size
        blocks = blocks_touched(offset, len(data), block)
        first_start = blocks.start * block
        # Existing plaintext that the first and last touched blocks keep.
        end = offset + len(data)
        last_end = min(blocks.stop * block, size)
        if offset > first_start and last_end > end and len(blocks) == 1:
            old = self.read(first_start, last_end - first_start)  # open the one block once, not twice
            head, tail = old[:offset - first_start], old[end - first_start:]
        else:
            head = self.read(first_start, offset - first_start) if offset > first_start else b""
            tail = self.read(end, last_end - end) if last_end > end else b""
        # Whole-block writes (all of a sequential stream) are sealed straight from the request
        # buffer: a copy of each 1 MiB WRITE cost a quarter of its sealing (benchmarks/HISTORY.md, 8deaee7).
        plain = b"".join((head, data, tail)) if head or tail else data
        self.count_seals(len(blocks))
        self._place(blocks.start, self.sealer.seal_run(blocks.start, plain), max(size, end))
        return len(data)

    def write_sealed(self, offset: int, length: int, sealed: bytes | bytearray | memoryview) -> int:
        """Write ``sealed``: the whole_blocks(offset, length) sealed under this file's cipher
        (by a sealing worker, before the caller serialised this write)."""
        self.check_durable()
        too_big(offset + length, self.block)
        if offset > self.size:
            self._extend(offset, gap_hole=True)
        self.count_seals(-(-length // self.block))
        self._place(offset // self.block, sealed, max(self.size, offset + length))
        return length
    def _place(self, first: int, sealed: bytes | bytearray | memoryview, new_size: int) -> None:
        """Put the sealed run of blocks from ``first`` on where it belongs: blocks that exist go
        to the journal, holes in place, blocks past the end (version 2) in place or, while the
        journal holds unsynced records and the backing file none, to the journal (see the
        invariants); the size becomes ``new_size``."""
        step = self.block + OVERHEAD
        count = -(-len(sealed) // step)
        existing = -(-self.size // self.block)
        if self.v1:
            pieces = [(first, first + count, False)]
        else:
            pieces = self._pieces(first, min(first + count, existing))
            if first + count > existing:
                # See the invariants: past the end in place, unless the journal holds records the
                # next fsync must sync anyway (this write's, or earlier ones) and the backing file
                # has nothing unsynced in place: then there too.
                in_place = self.dirty or not (self.journal.unsynced or any(not d for _a, _b, d in pieces))
                pieces.append((max(first, existing), first + count, in_place))
        undo = None
        old_len = None
        try:
            for a, b, direct in pieces:
                part = sealed[(a - first) * step:(b - first) * step]
                if not direct:
                    before = (self.journal.length, {k: self.index.get(k) for k in range(first, first + count)})
                    at = self.journal.append(a, b - a, part)  # a failed append leaves nothing behind
                    undo = undo or before
                    self._journals.add(self.header.file_id)
                    for k in range(a, b):
                        self.index[k] = (at + (k - a) * step, min(step, len(sealed) - (k - first) * step))
                    continue
                if old_len is None:
                    old_len = os.fstat(self.fd).st_size
                if self.journal.unsynced and a - 1 in self.index:
                    # See the invariants: the journaled version of the block these follow reaches
                    # the disk first (its old version in place may be shorter than a full block).
                    self.journal.sync()
                self.dirty = True
                pwrite_all(self.fd, part, sealed_offset(a, HEADER_LEN, self.block))
        except BaseException:
            try:
                if undo is not None:
                    self._undo_journal(*undo)
            finally:
                if old_len is not None and os.fstat(self.fd).st_size > old_len:
                    try:
                        os.ftruncate(self.fd, old_len)
                    except OSError as e:
                        # Blocks of the failed write stay past the size: no close may call the file
                        # clean, so the next mount cuts them as a crash's torn append.
                        self.stop_changes(f"a failed write could not be cut back: {e.strerror}")
            raise
        self.holes.remove(first, first + count)  # in memory only: the state follows an fdatasync
        self.size = new_size
        if len(self.holes) > HOLES_MAX:  # a write into the middle of a hole split it
            self._bound_holes()
        if self.journal.length > JOURNAL_MAX:
            for note in self._try_checkpoint():  # the write itself is done: it is in the journal
                log.warning("%s", note)

    def _bound_holes(self) -> None:
        """Bring the holes in memory back to HOLES_MAX extents, the most a state may seal (each
        state written from them, at fsync, checkpoint or re-key, must load again): the smallest
        extents are written as sealed zeros, in place like any write into a hole, so they are
        durable (fdatasync) before a state that calls them data."""
        if self._bounding:
            return
        self._bounding = True
        try:
            while len(self.holes) > HOLES_MAX:
                a, b = self.holes.smallest()
                end = min(b * self.block, self.size)
                for at in range(a * self.block, end, _ZERO_CHUNK):
                    self.write(at, bytes(min(_ZERO_CHUNK, end - at)))
        finally:
            self._bounding = False

    def _pieces(self, first: int, stop: int) -> list[tuple[int, int, bool]]:
        """Blocks [first, stop) of the file cut into (a, b, in place): holes go in place, the
        rest to the journal. A hole with a journaled version (load() drops those) would have
        it checkpointed first, so that no stale record outlives the block written in place."""
        if not self.holes or not self.holes.overlaps(first, stop):
            return [(first, stop, False)] if stop > first else []
        if any(k in self.holes for k in self.index):
            self.checkpoint()
        return list(self.holes.segments(first, stop))

    def _undo_journal(self, length: int, old: dict[int, tuple[int, int] | None]) -> None:
        for k, v in old.items():  # first: whatever fails below, no entry points past the cut
            if v is None:
                self.index.pop(k, None)
            else:
                self.index[k] = v
        self.journal.cut(length, sync=True)

    def _extend(self, new_size: int, gap_hole: bool = False) -> None:
        """Grow the file to ``new_size``: the whole blocks past the end become holes (when it may
        have them and, for the gap before a write (``gap_hole``), at least HOLE_MIN of them);
        otherwise, and for the rest of a short last block, sealed zeros are written."""
        block, size = self.block, self.size
        first_new, stop_new = -(-size // block), -(-new_size // block)
        sparse = self.sparse and not self.v1 and (not gap_hole or (stop_new - first_new) * block >= HOLE_MIN)
        if not sparse:
            self._fill_zeros(new_size)
            return
        if size % block and first_new - 1 not in self.holes:
            self.write(size, bytes(min(new_size, first_new * block) - size))  # the short last block
        if stop_new > first_new:
            holes = self.holes.copy()
            holes.add(first_new, stop_new)
            if not self.commit_holes(holes, first_new, stop_new):
                self._fill_zeros(new_size)
                return
        old_len = os.fstat(self.fd).st_size
        try:  # a backing store that refuses the size (ext4: EFBIG past 16 TiB) changes nothing
            os.ftruncate(self.fd, max(old_len, sealed_size(new_size, HEADER_LEN, block)))
        except OSError:
            self.holes.clip(first_new)  # the durable state's extra holes lie past the end: unused
            if self.size != size:  # the short last block was padded: the file keeps its size
                self.truncate(size)
            raise
        self.size, self.dirty = new_size, True

    def _fill_zeros(self, new_size: int) -> None:
        """Write sealed zeros from the end to ``new_size``, at most 1 MiB at a time."""
        pos, block = self.size, self.block
        chunk = max(_ZERO_CHUNK, block)
        while pos < new_size:
            # Align chunks to block boundaries after the first partial block.
            stop = min(new_size, (pos // block) * block + chunk)
            self.write(pos, bytes(stop - pos))
            pos = stop

    def commit_holes(self, holes: Holes, first: int, stop: int) -> bool:
        """Make ``holes`` (this file's holes plus [first, stop)) its holes, durably, before the
        caller touches the backing file. Past HOLES_MAX extents the smallest others are written
        as sealed zeros first; False (nothing changed) if [first, stop) is itself the smallest:
        the caller then writes zeros instead of making it a hole."""
        while len(holes) > HOLES_MAX:
            a, b = holes.smallest()
            if a < stop and b > first:
                return False
            holes.remove(a, b)
            end = min(b * self.block, self.size)
            for at in range(a * self.block, end, _ZERO_CHUNK):  # holes in memory: written in place
                self.write(at, bytes(min(_ZERO_CHUNK, end - at)))
        self.journal.sync()
        if self.dirty:  # blocks the new state calls data (filled holes) are durable first
            self.sync_backing()
            self.dirty = False
        self._write_state(self.state.synced_size, holes)
        if self.state_file is None:
            self.sync_backing(datasync=False)  # the xattr (a state file is written durably: write_atomic)
        self.holes = holes  # only now: a state that could not be made durable changes nothing
        return True

    def truncate(self, new_size: int) -> None:
        """Change the size to ``new_size`` > 0 (truncating to 0 drops the header: the caller's job)."""
        self.check_durable()
        too_big(new_size, self.block)
        self.write_pending_state()  # a pending synced size past the new end would outlive the cut
        size = self.size
        if new_size >= size:
            self._extend(new_size)
            return
        self.checkpoint()
        block = self.block
        last, rest = divmod(new_size, block)
        if rest and last in self.holes:
            rest = 0  # a hole stays a hole, only shorter
        if not self.v1:  # first: never a backing file shorter than its durable state says
            # The holes past the new end stay in it (load() clips them): a crash before the
            # ftruncate keeps the old length, whose holes must still read zeros, not EIO.
            synced = min(self.state.synced_size, last * block if rest else new_size)
            if synced != self.state.synced_size:
                self._write_state(synced)
                self.sync_backing(datasync=False)
        if rest:  # the new last block is an overwrite of an existing block: journaled
            keep = self.read(last * block, rest)
            self.count_seals(1)
            undo = (self.journal.length, {last: self.index.get(last)})
            self._place(last, self.cipher.seal(last, bytes(keep)), size)
            try:
                self.journal.sync()
            except BaseException:
                # The size stays the old one, so reads keep the old last block. Whether the short
                # one reached the disk is unknown; nothing is acknowledged after (journal.py).
                with contextlib.suppress(OSError):
                    self._undo_journal(*undo)
                raise
        try:
            os.ftruncate(self.fd, sealed_offset(last, HEADER_LEN, block) if rest
                         else sealed_size(new_size, HEADER_LEN, block))
        except OSError as e:
            if rest:
                # The journal ends the file in its short last block, durably: so does the content.
                # The blocks past it stay in the backing file, where a checkpoint must not meet
                # them: no sync succeeds now, and the next load cuts them (an unfinished truncate).
                self.holes.clip(-(-new_size // block))
                self.size, self.dirty = new_size, True
                self.stop_changes(f"a truncate could not cut the backing file: {e.strerror}")
            raise
        self.holes.clip(-(-new_size // block))
        self.size, self.dirty = new_size, True
