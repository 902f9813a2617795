"""A regular file's plaintext over its backing file: a header (fileheader.py), then sealed
blocks of the filesystem's block size in encfs.blocks' framing with scope = file id, so
blocks cannot move between positions or files.

One FileContent serves one inode, shared by all of its open handles.

Invariants:
- No block that exists is ever overwritten in place by a write: its new version goes to
  the file's journal (journal.py) and is read from there until a checkpoint copies it
  into place. After a crash (kill -9, power loss) at any moment every block reads its old
  or its new contents, and everything fsync'd its new contents.
- Blocks past the end of a version-2 file are written in place ("direct"): there is no
  old version to lose. A crash may tear the last of them; recovery (load()) cuts off
  blocks past the state's synced size that fail authentication, and logs it. Blocks
  below the synced size never get that treatment: one that fails is damage (EIO).
  While the journal holds records not yet synced (an overwrite since the last fsync) and
  nothing written in place is unsynced, blocks past the end go to the journal too, so
  that the next fsync syncs one file instead of two (SQLite overwrites pages, then
  appends, then fsyncs); the journal's recovery restores them past the backing file's
  end as it does for version-1 files. Not while the backing file has unsynced blocks in
  place: a power loss could keep the journaled blocks and lose those below them, leaving
  a gap that reads EIO instead of a torn append cut off. (Blocks appended in place and then
  written again go to the journal: if a power loss keeps that journal and loses the blocks
  in place, recovery drops the journaled ones past the lost block, all unacknowledged. If
  the checkpoint after such a drop fails, the journal on disk still holds what was dropped:
  the file then takes no writes, and stays loaded, until a later mount recovers it again.)
  Before a direct write that follows a block with an unsynced journaled version, the
  journal is made durable, so the new block never reaches the disk ahead of it (the old
  version in place may be a short last block, followed by a hole until the checkpoint).
- Version-1 files (no synced size) send every write through the journal; a filesystem of
  format 2 turns them into version 2 at their first write (upgrade()).
- Every write to a backing file is checked (diskio.pwrite_all): a full disk fails the
  write with ENOSPC and leaves no partial record or block behind.
- The plaintext size is kept in memory while the content is loaded; a backing file that
  is shorter than that (cut behind encfs's back) reads EIO for what is missing, never
  zeros. A version-2 file's synced size also catches a cut made while it was closed.
- A block reads as zeros without being opened only if the file's holes (holes.py, kept in
  its authenticated state) name it; any other block that is zeroed or punched reads EIO.
  On a filesystem with "sparse-files" a truncate up, and a write that leaves a gap of
  HOLE_MIN or more, leave holes (sparse.py); without it they write sealed zero blocks.
- The durable state never names as data a block that is not durable, nor as a hole a
  block whose durable version someone relies on. A write into a hole goes in place and
  the state calling it data follows an fdatasync and is durable before fsync() or
  checkpoint() returns; a new hole (extend, punch) is in a durable state before the
  backing file changes (commit_holes).
- The holes in memory never exceed HOLES_MAX extents, so every state sealed from them
  loads again: a write that splits a hole past it writes the smallest as sealed zeros.
- A hole never consumes a seal: only sealed blocks and states are counted.
- ``seals`` counts every seal under the data key (blocks, the state) and reaches the
  state at least every SEALS_PERSIST_EVERY seals: a crash can lose only that much of the
  count. The caller gives the file a fresh key (rekeyfile.py) before it reaches the
  data key's budget (docs/FORMAT.md §6.4).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from encfs import daemonlog
from encfs.blocks import (
    OVERHEAD,
    BlockAuthError,
    BlockCipher,
    blocks_touched,
    plain_size,
    run_blocks,
    sealed_offset,
    sealed_size,
)
from encfs.diskio import pwrite_all
from encfs.fuse.fileheader import (
    HEADER_LEN,
    NO_XATTRS,
    REKEY_AT,
    SPENT,
    V1,
    V2,
    VERSION_OFFSET,
    FileHeader,
    FileState,
    read_state,
    state_file,
    write_state,
)
from encfs.fuse.holes import HOLES_MAX, Holes
from encfs.fuse.journal import HEAD_LEN, Journal, Run
from encfs.sealing import Sealer

log = logging.getLogger("encfs.fuse")
_ZERO_CHUNK = 1 << 20  # fill gaps 1 MiB at a time (at least one block)
# A journal this long is checkpointed at once: it bounds the journal's disk space and the
# work a recovery replays, and a checkpoint costs only two fdatasyncs (benchmarks/HISTORY.md, dfabbb4).
JOURNAL_MAX = 16 << 20
# The seal count is written to the state at least this often, so a crash (which loses what
# the state did not get) costs the count at most this many seals; one setxattr per 2^16 seals.
SEALS_PERSIST_EVERY = 1 << 16
# A write past the end leaves a hole only if the gap is this long: a smaller gap (writeback out
# of order, a record appended with padding) is cheaper filled with sealed zeros than with a
# durable state (two syncs) and an extent out of HOLES_MAX.
HOLE_MIN = 1 << 20
_MAX_BACKING = (1 << 63) - 1  # offsets are signed 64-bit (off_t, FUSE, lseek)


def in_place_runs(index: dict[int, tuple[int, int]], step: int) -> list[tuple[int, int, int]]:
    """The journaled blocks of ``index`` (block -> (journal offset, sealed length)) as pieces
    (first block, journal offset, length) to copy into place, in block order: consecutive
    blocks whose sealed versions lie end to end in the journal (a run written at once) make
    one piece, so that a checkpoint copies them with one read and one write."""
    pieces: list[tuple[int, int, int]] = []
    for k in sorted(index):
        offset, length = index[k]
        if pieces:
            first, start, total = pieces[-1]
            if k == first + total // step and total % step == 0 and offset == start + total:
                pieces[-1] = (first, start, total + length)
                continue
        pieces.append((k, offset, length))
    return pieces


def _prefetch(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Start reading the pages of ``ranges`` (sorted (offset, length), merged where they touch)
    into the page cache, all at once. A sealed block does not fill whole pages, so writing one
    in place first reads the pages it shares with its neighbours; without this a checkpoint of
    blocks whose pages were not cached read them one at a time (benchmarks/HISTORY.md)."""
    merged: list[tuple[int, int]] = []
    start = end = -1
    for offset, length in ranges:
        if offset > end:
            if end > start:
                merged.append((start, end - start))
            start = offset
        end = max(end, offset + length)
    if end > start:
        merged.append((start, end - start))
    try:
        for offset, length in merged:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # only advice: the writes read what they need anyway


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


def plain_file_size(backing_size: int, block: int) -> int:
    """Plaintext size implied by a backing file of ``backing_size`` bytes (0 if no header yet);
    a torn last block counts as one byte, so that reading it fails rather than vanishes."""
    if backing_size <= HEADER_LEN:
        return 0
    try:
        return plain_size(backing_size, HEADER_LEN, block)
    except ValueError:
        whole = backing_size - (backing_size - HEADER_LEN) % (block + OVERHEAD)
        return plain_size(whole, HEADER_LEN, block) + 1


class FileContent:
    """Plaintext read/write/truncate/fsync of one inode. The caller serialises everything but
    read(), which may run alongside other reads. ``on_auth_error(block_no)`` is called before
    BlockAuthError propagates."""

    def __init__(self, fd: int, header: FileHeader, cipher: BlockCipher, root: bytes,
                 journals: set[bytes], on_auth_error: Callable[[int], None] | None = None,
                 state_in_file: bool = False) -> None:
        self.fd = fd
        self.header = header
        self.sealer = Sealer(cipher)  # in process; the owner swaps in one that may use the worker
        self.block = cipher.block_size
        self.v1 = header.version == V1
        self.journal = Journal(root, header.file_id)
        self.root = root
        self.state_in_file = state_in_file  # the backing store keeps no user xattrs: see state_file
        self._journals = journals  # file ids with a journal on disk (shared by the filesystem)
        self.index: dict[int, tuple[int, int]] = {}  # block -> (journal offset, sealed length)
        self.size = 0
        self.state = FileState()
        self.holes = Holes()  # blocks with no sealed version: they read as zeros (this session's truth)
        self.sparse = False  # holes may be made (the filesystem has "sparse-files", the file a state)
        self.seals = 0  # seals under the data key, this session's included (>= state.seals)
        self.rekey_at = REKEY_AT  # the seal count at which the next write first re-keys the file
        self.fresh = False  # made by this daemon: its key cannot belong to another file
        self.verified = False  # its key opened one of its blocks (see check_key)
        self.read_only = False  # recovered in memory only: nothing may be written
        self.fd_writable = True  # else ``fd`` is read-only (the caller swaps in a writable one)
        self.noatime = False  # ``fd`` is O_NOATIME (a write-only handle's): reads through it keep atime
        self.recovered_in_memory = False  # load() could not write what recovery changed
        # load() dropped journaled blocks and could not checkpoint: the journal on disk still holds
        # them, so the content must stay loaded (and read-only) until unmount (OpenFiles._close)
        self.holds_dropped = False
        self.dirty = False  # the backing file was written since its last fsync
        self._on_auth_error = on_auth_error
        self._bounding = False  # _bound_holes is writing zeros (its writes must not recurse into it)

    @property
    def cipher(self) -> BlockCipher:
        return self.sealer.cipher

    @cipher.setter
    def cipher(self, cipher: BlockCipher) -> None:
        """A new data key (a re-key): sealed in process until the owner gives it a worker's sealer."""
        self.sealer.close()
        self.sealer = Sealer(cipher)

    # -- loading and recovery --------------------------------------------------------------

    def use_fd(self, fd: int, writable: bool) -> None:
        """Serve through ``fd`` (the caller closes the one before): whether it may write, and
        whether it is O_NOATIME (a write-only handle's: reads through it leave atime alone)."""
        self.fd, self.fd_writable = fd, writable
        self.noatime = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NOATIME)

    @property
    def state_file(self) -> bytes | None:
        """Where the state lives if the backing store keeps no user xattrs (else None: the xattr)."""
        return state_file(self.root, self.header.file_id) if self.state_in_file else None

    @classmethod
    def create(cls, fd: int, header: FileHeader, cipher: BlockCipher, root: bytes, journals: set[bytes],
               on_auth_error: Callable[[int], None] | None = None, state_in_file: bool = False) -> FileContent:
        """A new, empty file: write its header to the empty backing file (no state yet: a
        missing state is "nothing synced", which is what a new file has)."""
        c = cls(fd, header, cipher, root, journals, on_auth_error, state_in_file)
        pwrite_all(fd, header.pack(), 0)
        c.fresh = c.verified = c.dirty = True
        return c

    def upgrade(self) -> bool:
        """Make a version-1 file version 2 (state first, then the version byte); False if the
        state cannot be written for lack of xattrs (the file then stays version 1; a store known
        to lack them keeps the state in a file instead: state_file)."""
        if not self.v1:
            return True
        try:
            write_state(self.fd, self.cipher, FileState(), self.state_file)
        except OSError as e:
            if e.errno in NO_XATTRS:
                return False
            raise
        pwrite_all(self.fd, bytes([V2]), VERSION_OFFSET)
        os.fdatasync(self.fd)  # the version byte before any block written in place on its word
        self.header, self.v1 = replace(self.header, version=V2), False
        return True

    def load(self, writable: bool, known_size: int | None = None, after_crash: bool = False) -> list[str]:
        """Take over an existing backing file: its size, state and journal, recovering from a
        crash if one happened. Returns notes for the log. JournalDamaged if a durable journal
        record is bad. ``writable``: recovery may change the backing file and journal (else
        the journal is only read, and a torn tail is cut off in memory). ``known_size``: a
        size the kernel may hold for the file; a backing file found shorter than that was cut
        behind our back, and reads past its end fail rather than return zeros.
        ``after_crash``: the last mount did not end cleanly, so a torn last block may be a
        write that a crash cut short (after a clean unmount it can only be damage: EIO)."""
        notes: list[str] = []
        backing = os.fstat(self.fd).st_size
        state_opens = True
        dropped = 0  # journaled blocks left out of the index (recovery in memory until a checkpoint)
        if not self.v1:
            state = read_state(self.fd, self.cipher, self.state_file)
            state_opens = state is not None
            if state is None:
                notes.append("its state fails authentication: nothing counts as synced, and its "
                             "data key's budget as spent (its next write gives it a fresh key)")
            self.state = state or SPENT
            self.seals = self.state.seals
            self.holes = Holes(self.state.holes)
        if self.header.file_id in self._journals and self.journal.open_existing():
            runs, end, torn = self.journal.scan(self.cipher)
            notes += torn
            if writable:
                if torn and end >= HEAD_LEN:
                    self.journal.cut(end)
                # A crash may have left the journal (even its name) in the page cache only:
                # it must be durable before recovery changes the backing file on its word.
                self.journal.unsynced = self.journal.new = True
                self.journal.sync()
            self._index_runs(runs)
            for k in [k for k in self.index if k in self.holes]:
                del self.index[k]  # written before the state that made it a hole (see punch)
                dropped += 1
            if runs:
                notes.append(f"replaying {len(self.index)} journaled blocks after a crash")
            if after_crash and not self.v1 and state_opens and self.index:
                before = len(self.index)
                notes += self._drop_past_lost_tail(backing)
                dropped += before - len(self.index)
            backing = self._journal_end(backing, writable)
        floor = max(self.state.synced_size, self._index_end())
        self.size = plain_file_size(backing, self.block)
        if after_crash and not self.v1 and self.size > floor:
            notes += self._cut_torn_tail(backing, floor, writable)
        self.size = max(self.size, self._index_end())
        self.holes.clip(-(-self.size // self.block))
        expected = max(self.state.synced_size, known_size or 0)
        if self.size < expected:
            notes.append(f"backing file holds {self.size} of the file's {expected} bytes: "
                         f"it was cut; reads past its end fail")
            self.size = expected
        if self.journal.fd is not None:
            if writable:
                failed = self._try_checkpoint()
                notes += failed
                if dropped and failed:
                    # The journal on disk still holds the blocks dropped from the index: a write now
                    # could be undone by their replay after the next crash. Nothing is written to
                    # the file this session, and the next mount recovers it again.
                    self.read_only = self.holds_dropped = True
            else:
                self.read_only = True
        self.recovered_in_memory = self.read_only or \
            (not writable and self.size != plain_file_size(backing, self.block))
        return notes

    def _try_checkpoint(self) -> list[str]:
        """checkpoint(), or a note if the disk cannot take it yet: the journal then stays (it
        is durable), reads go on taking blocks from it, and the next checkpoint tries again."""
        try:
            self.checkpoint()
        except OSError as e:
            return [f"journal checkpoint failed ({e.strerror}); the journal is kept"]
        return []

    def _index_runs(self, runs: list[Run]) -> None:
        step = self.block + OVERHEAD
        for run in runs:
            for k in range(run.count):
                at = k * step
                self.index[run.first + k] = (run.offset + at, min(step, run.length - at))

    def _journal_end(self, backing: int, writable: bool) -> int:
        """If the newest version of the highest journaled block is short, the file ends there (a
        write that ended in it, or a truncate to inside it): blocks past it in the backing file
        are what an unfinished truncate left. Returns the backing length that remains."""
        if not self.index:
            return backing
        top = max(self.index)
        if self.index[top][1] == self.block + OVERHEAD:
            return backing
        cut = sealed_offset(top, HEADER_LEN, self.block)
        if backing > cut:
            if writable:
                os.ftruncate(self.fd, cut)
            return cut
        return backing

    def _drop_past_lost_tail(self, backing: int) -> list[str]:
        """Journaled blocks above a block at or past the synced size that the backing file
        lacks (whole or in part) and that is neither journaled nor a hole: an append written in
        place and never synced, whose tail a power loss lost while the journal, which a later
        write into the appended blocks grew, reached the disk. Nothing from that block on was
        acknowledged: drop those journaled blocks, so that the append is cut off as torn
        instead of leaving a gap that reads EIO. Below the synced size it is damage (EIO)."""
        whole = max(0, (backing - HEADER_LEN) // (self.block + OVERHEAD))
        for k in range(whole, max(self.index)):
            if k in self.index or k in self.holes:
                continue
            if k * self.block < self.state.synced_size:
                return []
            dropped = [j for j in self.index if j > k]
            for j in dropped:
                del self.index[j]
            return [(f"{len(dropped)} journaled blocks past block {k}, which a crash lost before "
                     f"any fsync, are cut off with it")]
        return []

    def _index_end(self) -> int:
        """The plaintext end of the highest journaled block (0 if none)."""
        if not self.index:
            return 0
        last = max(self.index)
        return last * self.block + self.index[last][1] - OVERHEAD

    def _cut_torn_tail(self, backing: int, floor: int, writable: bool) -> list[str]:
        """A last block past ``floor`` (never acknowledged by an fsync) that is shorter than a
        full block and fails authentication, while the block before it opens or is a hole, is
        what a crash tore from an append (a write cut short ends the file early): cut it off.
        Anything else that fails is damage, left to read EIO."""
        block, step = self.block, self.block + OVERHEAD
        last = (backing - HEADER_LEN - 1) // step
        at = sealed_offset(last, HEADER_LEN, block)
        if backing - at == step or last * block < floor or last in self.holes:
            return []
        try:
            self.cipher.open(last, os.pread(self.fd, backing - at, at))
            return []
        except BlockAuthError:
            pass
        # The key must be the file's own: the block before opens (its newest version), or is a
        # hole, named by a state that opened under this key (a hole never opens: it has no seal).
        if last and last - 1 not in self.holes:
            try:
                self.cipher.open(last - 1, self._sealed_block(last - 1, last * block))
            except BlockAuthError:
                return []
        if writable:
            os.ftruncate(self.fd, at)
            self.dirty = True
        self.size = last * block
        return [(f"its last block ({backing - at} bytes, past the last fsync) was torn by a crash "
                 f"and is cut off: size now {self.size}")]

    # -- reading -------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Plaintext [offset, offset+length) clipped to the file's size. A read the sealer
        opens in the worker (Sealer.arena) comes back as a view of this thread's slot of the
        worker's arena, valid until this thread's next job for the worker."""
        size = self.size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        block = self.block
        blocks = blocks_touched(offset, length, block)
        if self.holes and self.holes.overlaps(blocks.start, blocks.stop):
            plain: bytes | bytearray | memoryview = self._read_with_holes(blocks, size)
        else:
            plain = self._read_blocks(blocks, size)
        skip = offset - blocks.start * block
        return plain if skip == 0 and len(plain) == length else plain[skip:skip + length]

    def _read_with_holes(self, blocks: range, size: int) -> bytearray:
        """The plaintext of ``blocks``, holes as zeros (never opened)."""
        out = bytearray()
        for a, b, hole in self.holes.segments(blocks.start, blocks.stop):
            if hole:
                out += bytes(min(b * self.block, size) - a * self.block)
            else:
                out += self._read_blocks(range(a, b), size)  # copied at once: the arena is reused
        return out

    def _read_blocks(self, blocks: range, size: int) -> bytes | bytearray | memoryview:
        """The plaintext of ``blocks`` (none of them a hole)."""
        block = self.block
        start, want = self._span(blocks, size)
        if self.index and any(b in self.index for b in blocks):
            plain: bytes | bytearray | memoryview = self._read_journaled(blocks, size)
        else:
            areas = self.sealer.arena(len(blocks) * block, want)
            if areas is None:
                sealed = os.pread(self.fd, want, start)
                if len(sealed) != want:
                    self._failed(blocks.start + (len(sealed) // (block + OVERHEAD)))
                plain = self._open_blocks(blocks.start, sealed)
            else:
                plain = self._open_in_arena(blocks.start, start, want, areas)
        return plain

    def _span(self, blocks: range, size: int) -> tuple[int, int]:
        """Where ``blocks`` start in the backing file and how many sealed bytes they take, for
        a file of ``size`` plaintext bytes (only its last block may be short)."""
        start = sealed_offset(blocks.start, HEADER_LEN, self.block)
        return start, sealed_size(min(blocks.stop * self.block, size), HEADER_LEN, self.block) - start

    def _failed(self, block_no: int) -> NoReturn:
        e = BlockAuthError(block_no)
        if self._on_auth_error:
            self._on_auth_error(block_no)  # the one log line, with the path
            daemonlog.mark_reported(e)
        raise e

    def _sealed_block(self, k: int, size: int) -> bytes:
        """Block ``k``'s sealed bytes, from the journal if it holds the newest version."""
        if k in self.index:
            offset, length = self.index[k]
            return self.journal.read(offset, length)
        start, want = self._span(range(k, k + 1), size)
        sealed = os.pread(self.fd, want, start)
        if len(sealed) != want:
            self._failed(k)
        return sealed

    def _read_journaled(self, blocks: range, size: int) -> bytearray:
        out = bytearray()
        for k in blocks:
            try:
                out += self.cipher.open(k, self._sealed_block(k, size))
            except BlockAuthError as e:
                self._failed(e.block_no)
        return out

    def _open_blocks(self, first: int, sealed: bytes) -> bytearray:
        try:
            return self.cipher.open_run(first, sealed)
        except BlockAuthError as e:
            self._failed(e.block_no)

    def _open_in_arena(self, first: int, start: int, want: int, areas: tuple[memoryview, memoryview]) -> memoryview:
        """Blocks from ``first`` on, ``want`` sealed bytes at ``start``, read into the sealer's
        arena and opened there."""
        plain_area, sealed_area = areas
        sealed = sealed_area[:os.preadv(self.fd, [sealed_area[:want]], start)]
        if len(sealed) != want:
            self._failed(first + len(sealed) // (self.block + OVERHEAD))
        try:
            numbers, plain_len = run_blocks(first, len(sealed), self.block)
            out = plain_area[:plain_len]
            if numbers:
                self.sealer.open_jobs([(numbers, sealed, out)])
        except BlockAuthError as e:
            self._failed(e.block_no)
        return out

    # -- writing -------------------------------------------------------------------------

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
        too_big(offset + length, self.block)
        if offset > self.size:
            self._extend(offset, gap_hole=True)
        self.count_seals(-(-length // self.block))
        self._place(offset // self.block, sealed, max(self.size, offset + length))
        return length

    def count_seals(self, n: int) -> None:
        """Count ``n`` seals under the data key; the state gets the count when it lags by
        SEALS_PERSIST_EVERY (a version-1 file has no state: its count lives in memory only)."""
        self.seals += n
        if self.seals - self.state.seals >= SEALS_PERSIST_EVERY and not self.v1 and self.verified:
            self._write_state(self.state.synced_size)

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
            if old_len is not None and os.fstat(self.fd).st_size > old_len:
                os.ftruncate(self.fd, old_len)
            if undo is not None:
                self._undo_journal(*undo)
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
        self.journal.cut(length)
        if self.journal.fd is not None:
            os.fdatasync(self.journal.fd)  # what replaces the cut records must not meet a stale sync record
        for k, v in old.items():
            if v is None:
                self.index.pop(k, None)
            else:
                self.index[k] = v

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
            os.fdatasync(self.fd)
            self.dirty = False
        self._write_state(self.state.synced_size, holes)
        if self.state_file is None:
            os.fsync(self.fd)  # the xattr (a state file is written durably: write_atomic)
        self.holes = holes  # only now: a state that could not be made durable changes nothing
        return True

    def truncate(self, new_size: int) -> None:
        """Change the size to ``new_size`` > 0 (truncating to 0 drops the header: the caller's job)."""
        too_big(new_size, self.block)
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
                os.fsync(self.fd)
        if rest:  # the new last block is an overwrite of an existing block: journaled
            keep = self.read(last * block, rest)
            self.count_seals(1)
            self._place(last, self.cipher.seal(last, bytes(keep)), size)
            self.journal.sync()
        os.ftruncate(self.fd, sealed_offset(last, HEADER_LEN, block) if rest else sealed_size(new_size, HEADER_LEN, block))
        self.holes.clip(-(-new_size // block))
        self.size, self.dirty = new_size, True

    # -- durability ----------------------------------------------------------------------

    def fsync(self, datasync: bool) -> None:
        """Make everything written so far durable. An fdatasync of a file whose writes all went
        to the journal syncs only the journal (its blocks in place did not change)."""
        self._bound_holes()  # again if a write's own bounding failed (ENOSPC): before the state
        self.journal.sync()
        if self.dirty or not datasync:
            (os.fdatasync if datasync else os.fsync)(self.fd)
            self.dirty = False
        if not self.v1 and not self.read_only and self.verified and \
                (self.size != self.state.synced_size or self.holes.extents() != self.state.holes):
            if self.holes.extents() != self.state.holes:
                # Blocks written into holes were just acknowledged: the durable state must call them
                # data, or a crash reads them as zeros (and load() drops their journaled versions).
                self._write_state_durably(self.size, self.holes)
            else:
                # Not synced itself: if a crash loses it, the previous (smaller) synced size stays.
                self._write_state(self.size, self.holes)

    def _write_state(self, synced_size: int, holes: Holes | None = None) -> None:
        """Seal and write the state; ``holes`` default to the durable state's (whatever was
        written into them since is not known to be durable)."""
        self.seals += 1  # the state is sealed under the data key too
        state = FileState(synced_size, self.seals, self.state.holes if holes is None else holes.extents())
        write_state(self.fd, self.cipher, state, self.state_file)
        self.state = state

    def _write_state_durably(self, synced_size: int, holes: Holes) -> None:
        """_write_state, then fsync for the xattr (a state file is written durably: write_atomic)."""
        self._write_state(synced_size, holes)
        if self.state_file is None:
            os.fsync(self.fd)

    def checkpoint(self) -> None:
        """Copy the journaled blocks into place and remove the journal (see journal.py)."""
        if not self.read_only:
            self._bound_holes()
        if self.journal.fd is None and not self.index:
            if self.holes.extents() != self.state.holes and self.fd_writable and not (self.v1 or self.read_only):
                # holes written into in place: durable before the state that calls them data
                os.fdatasync(self.fd)
                self.dirty = False
                self._write_state_durably(self.size, self.holes)
            return
        if self.read_only:
            return
        self.journal.sync()
        block = self.block
        pieces = in_place_runs(self.index, block + OVERHEAD)
        _prefetch(self.fd, [(sealed_offset(k, HEADER_LEN, block), length) for k, _, length in pieces])
        # The span of the journal that holds them is read once (a checkpoint follows when the
        # journal passes JOURNAL_MAX, so it is at most about that), not once per piece.
        start = min((offset for _k, offset, _n in pieces), default=0)
        end = max((offset + length for _k, offset, length in pieces), default=0)
        span = memoryview(self.journal.read(start, end - start)) if end - start <= 2 * JOURNAL_MAX else None
        for k, offset, length in pieces:
            data = span[offset - start:offset - start + length] if span is not None \
                else self.journal.read(offset, length)
            pwrite_all(self.fd, data, sealed_offset(k, HEADER_LEN, block))
        os.fdatasync(self.fd)
        self.dirty = False
        if not self.v1 and self.holes.extents() != self.state.holes:
            self._write_state_durably(self.size, self.holes)  # filled holes: as in fsync()
        elif not self.v1 and (self.size != self.state.synced_size or self.seals != self.state.seals):
            self._write_state(self.size, self.holes)
        # The blocks are in place and durable: reads take them from there even if removing the
        # journal fails part way (its fd already closed).
        self.index.clear()
        self.journal.remove()
        self._journals.discard(self.header.file_id)

    def close(self, unlinked: bool = False) -> None:
        """Checkpoint (a file with no name left needs none: its journal just goes) and close.
        If the checkpoint fails (OSError), nothing is closed: the content still serves."""
        if unlinked and (self.holds_dropped or not self.read_only):  # (the file is gone now)
            self.index.clear()
            self.journal.remove(durable=False)
            self._journals.discard(self.header.file_id)
        else:
            self.checkpoint()
            if self.seals != self.state.seals and not (self.v1 or self.fresh or self.read_only):
                # Each session's count must reach the state, or sessions could add up uncounted
                # (a file made by this session has no count to lose but this one, < 2^16).
                self._write_state(self.state.synced_size)
        self.release_fds()

    def release_fds(self) -> None:
        self.journal.close()
        os.close(self.fd)
