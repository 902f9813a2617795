"""A regular file's plaintext over its backing file: a header (fileheader.py), then sealed
blocks of the filesystem's block size in encfs.blocks' framing with scope = file id, so
blocks cannot move between positions or files.

One FileContent serves one inode, shared by all of its open handles.

FileContent takes its reads from contentread.py, its writes and truncation from contentwrite.py
and load()'s crash recovery from contentrecovery.py (mixins on contentfields.py, which declares
what they use of one another for the type checker); this module keeps the file's
header, its state and seal count, and its durability: fsync, the journal's checkpoint, close.

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

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import replace

from encfs.blocks import OVERHEAD, BlockCipher, sealed_offset
from encfs.diskio import pwrite_all
from encfs.fuse.backingtimes import keep_times, times_of
from encfs.fuse.contentread import ContentReads
from encfs.fuse.contentrecovery import ContentRecovery, plain_file_size
from encfs.fuse.contentwrite import HOLE_MIN, JOURNAL_MAX, ContentWrites, max_file_size, too_big, whole_blocks
from encfs.fuse.fileheader import (
    HEADER_LEN,
    NO_XATTRS,
    REKEY_AT,
    V1,
    V2,
    VERSION_OFFSET,
    FileHeader,
    FileState,
    state_file,
    write_state,
)
from encfs.fuse.holes import Holes
from encfs.fuse.journal import Journal, not_durable
from encfs.sealing import Sealer

log = logging.getLogger("encfs.fuse")
# The seal count is written to the state at least this often, so a crash (which loses what
# the state did not get) costs the count at most this many seals; one setxattr per 2^16 seals.
SEALS_PERSIST_EVERY = 1 << 16


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


def prefetch(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Start reading the pages of ``ranges`` (sorted (offset, length), merged where they touch)
    into the page cache, all at once, without waiting for them. A sealed block does not fill whole pages, so writing one
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


class FileContent(ContentRecovery, ContentReads, ContentWrites):
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
        # The synced size an fsync(defer_state=True) left for write_pending_state(): durable data,
        # not yet in the state (which may lag behind the data, never run ahead of it).
        self.pending_synced_size: int | None = None
        self.sync_failed: str | None = None  # why a sync of ``fd`` failed: none succeeds after it
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

    # -- the backing file, its header and state ------------------------------------------

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
        self.sync_backing()  # the version byte before any block written in place on its word
        self.header, self.v1 = replace(self.header, version=V2), False
        return True

    def refusing(self) -> str | None:
        """Why the content takes no more changes (None: it takes them): a sync of the file or its
        journal failed, or a cut that puts either back did. From then on what is on disk is
        unknown, so it acknowledges nothing until the file is loaded again (the next mount; its
        recovery starts from what the disk holds), as a volume refuses writes after a failed
        commit."""
        return self.sync_failed or (self.journal.failed and f"its journal: {self.journal.failed}")

    def check_durable(self) -> None:
        """EIO if the content is refusing changes (refusing())."""
        why = self.refusing()
        if why:
            raise not_durable(why)

    def stop_changes(self, why: str) -> None:
        """Refuse every change from now on (refusing()), logged once."""
        self.sync_failed = why
        log.error("file %s: %s: it takes no more changes until the next mount", self.header.file_id.hex(), why)

    def sync_backing(self, datasync: bool = True) -> None:
        """fdatasync (or fsync) the backing file. After one failed, every later one fails (EIO),
        as the journal's do (journal.py): Linux reports a failed writeback once, and a retry
        would acknowledge pages that never reached the disk."""
        self.check_durable()
        try:
            (os.fdatasync if datasync else os.fsync)(self.fd)
        except OSError as e:
            self.stop_changes(f"a sync failed: {e.strerror or e}")
            raise

    def count_seals(self, n: int) -> None:
        """Count ``n`` seals under the data key; the state gets the count when it lags by
        SEALS_PERSIST_EVERY (a version-1 file has no state: its count lives in memory only)."""
        self.seals += n
        if self.seals - self.state.seals >= SEALS_PERSIST_EVERY and not self.v1 and self.verified:
            self._write_state(self.state.synced_size)

    def _write_state(self, synced_size: int, holes: Holes | None = None) -> None:
        """Seal and write the state; ``holes`` default to the durable state's (whatever was
        written into them since is not known to be durable)."""
        self.seals += 1  # the state is sealed under the data key too
        state = FileState(synced_size, self.seals, self.state.holes if holes is None else holes.extents())
        write_state(self.fd, self.cipher, state, self.state_file)
        self.state = state
        if self.pending_synced_size is not None and synced_size >= self.pending_synced_size:
            self.pending_synced_size = None

    def _write_state_durably(self, synced_size: int, holes: Holes) -> None:
        """_write_state, then fsync for the xattr (a state file is written durably: write_atomic)."""
        self._write_state(synced_size, holes)
        if self.state_file is None:
            self.sync_backing(datasync=False)

    # -- durability ----------------------------------------------------------------------

    def fsync(self, datasync: bool, defer_state: bool = False) -> None:
        """Make everything written so far durable. An fdatasync of a file whose writes all went
        to the journal syncs only the journal (its blocks in place did not change). With
        ``defer_state`` a new synced size that needs no sync of its own is left pending for
        write_pending_state() (the owner's thread, about a second later; a truncate, close or
        re-key writes it first) instead of written now: an xattr written right after the sync
        opens a journal transaction on the backing filesystem, which the caller's next directory
        fsync (SQLite's, after syncing its journal) would have to commit."""
        self._bound_holes()  # again if a write's own bounding failed (ENOSPC): before the state
        self.journal.sync()
        if self.dirty or not datasync:
            self.sync_backing(datasync)
            self.dirty = False
        holes_changed = self.holes.extents() != self.state.holes
        if not self.v1 and not self.read_only and self.verified and (self.size != self.state.synced_size or holes_changed):
            if holes_changed:
                # Blocks written into holes were just acknowledged: the durable state must call them
                # data, or a crash reads them as zeros (and load() drops their journaled versions).
                self._write_state_durably(self.size, self.holes)
            elif defer_state:
                self.pending_synced_size = self.size
            else:
                # Not synced itself: if a crash loses it, the previous (smaller) synced size stays.
                self._write_state(self.size, self.holes)

    def write_pending_state(self) -> None:
        """Write the synced size an fsync left pending, unsynced as fsync() writes it (a crash
        that loses it leaves the previous, smaller one). The holes stay the durable state's."""
        size, self.pending_synced_size = self.pending_synced_size, None
        if size is not None and size > self.state.synced_size:  # (never lowers it)
            self._write_state(size)

    def checkpoint(self) -> None:
        """Copy the journaled blocks into place and remove the journal (see journal.py)."""
        if not self.read_only:
            self._bound_holes()
        if self.journal.fd is None and not self.index:
            if self.holes.extents() != self.state.holes and self.fd_writable and not (self.v1 or self.read_only):
                # holes written into in place: durable before the state that calls them data
                self.sync_backing()
                self.dirty = False
                self._write_state_durably(self.size, self.holes)
            return
        if self.read_only:
            return
        self.journal.sync()
        block = self.block
        pieces = in_place_runs(self.index, block + OVERHEAD)
        prefetch(self.fd, [(sealed_offset(k, HEADER_LEN, block), length) for k, _, length in pieces])
        # The span of the journal that holds them is read once (a checkpoint follows when the
        # journal passes JOURNAL_MAX, so it is at most about that), not once per piece.
        start = min((offset for _k, offset, _n in pieces), default=0)
        end = max((offset + length for _k, offset, length in pieces), default=0)
        span = memoryview(self.journal.read(start, end - start)) if end - start <= 2 * JOURNAL_MAX else None
        times = times_of(self.fd)
        for k, offset, length in pieces:
            data = span[offset - start:offset - start + length] if span is not None \
                else self.journal.read(offset, length)
            pwrite_all(self.fd, data, sealed_offset(k, HEADER_LEN, block))
        self.sync_backing()
        # Moving blocks into place changes no contents: the file keeps the times its writes and
        # the kernel (SETATTR, the writeback cache) gave it, which are the plaintext's (fs.py).
        keep_times(self.fd, times, "a checkpointed file")
        self.dirty = False
        if not self.v1 and self.holes.extents() != self.state.holes:
            self._write_state_durably(self.size, self.holes)  # filled holes: as in fsync()
        elif not self.v1 and (self.size != self.state.synced_size or self.seals != self.state.seals):
            self._write_state(self.size, self.holes)
        # The blocks are in place and durable. Until the journal is gone from the namespace its
        # records must stay indexed: a failed unlink keeps it (and reads from it, the same bytes),
        # and a block written in place meanwhile would meet its stale record at the next load.
        try:
            self.journal.remove()
        except BaseException:
            if self.journal.fd is None:  # unlinked, its directory not synced: reads from place
                self.index.clear()
            raise
        self.index.clear()
        self._journals.discard(self.header.file_id)

    def _try_checkpoint(self) -> list[str]:
        """checkpoint(), or a note if the disk cannot take it yet: the journal then stays (it
        is durable), reads go on taking blocks from it, and the next checkpoint tries again."""
        try:
            self.checkpoint()
        except OSError as e:
            return [f"journal checkpoint failed ({e.strerror}); the journal is kept"]
        return []

    def close(self, unlinked: bool = False) -> None:
        """Checkpoint (a file with no name left needs none: its journal just goes) and close.
        If the checkpoint fails (OSError), nothing is closed: the content still serves."""
        if unlinked and (self.holds_dropped or not self.read_only):  # (the file is gone now)
            self.index.clear()
            self.journal.remove(durable=False)
            self._journals.discard(self.header.file_id)
        else:
            self.checkpoint()
            try:
                self.write_pending_state()  # (a checkpoint of a journal wrote a state already)
            except OSError as e:  # the state keeps the older synced size: no reason to stay open
                log.warning("synced size not written at close (%s); the state keeps the older one", e.strerror)
            if self.seals != self.state.seals and not (self.v1 or self.fresh or self.read_only):
                # Each session's count must reach the state, or sessions could add up uncounted
                # (a file made by this session has no count to lose but this one, < 2^16).
                self._write_state(self.state.synced_size)
        self.release_fds()

    def release_fds(self) -> None:
        self.journal.close()
        os.close(self.fd)


# The helpers and limits that moved to the mixins' modules are still this module's to import.
__all__ = ["HOLE_MIN", "JOURNAL_MAX", "SEALS_PERSIST_EVERY", "FileContent", "in_place_runs", "max_file_size",
           "plain_file_size", "too_big", "whole_blocks"]
