"""Open files: the handles the kernel holds, and the per-inode contents they share.

OpenFiles takes the loading of contents (and their crash recovery at load, and at a file's
first lookup) from openload.py's ContentLoading, which keeps the invariants about it, and
OpenFile from there; this module keeps the handle table, the closing and deferred work of
contents, and the writes' side: fresh headers and data keys, re-keys, truncation to 0.

Invariants:
- One FileContent per inode while any handle of it is open: every handle reads and writes
  through it, so a block journaled through one handle is read back through another, and
  the plaintext size is one number.
- A content is closed (checkpointed: see content.py) when the last handle of its inode is
  released, or dropped when the file is truncated to 0: the header goes first, and the
  next write gives the file a new header and data key (never the old key of a file that
  was emptied, nor a header someone copied in: header poisoning). A content whose
  checkpoint fails (a full disk) stays loaded without handles ("pinned"), so that its
  journaled blocks and size keep being served; the next release or unmount tries again.
- Where the server runs run_deferred() (``defer_checkpoints``), a content with a journal
  is checkpointed CHECKPOINT_DELAY after its last handle goes instead (pinned meanwhile, at
  most DEFERRED_MAX of them): a file unlinked first (SQLite's -journal, a temporary file)
  needs no checkpoint at all, its journal just goes. A close never made anything durable
  (fsync does); a crash meanwhile recovers the journal as for a file still open.
- Where it runs them, an fsync also leaves the new synced size it needs to write (unsynced)
  pending, and the same thread writes it STATE_DELAY after the first such fsync (later only
  while the file's lock is held; a truncate, close or re-key writes it first; a state only
  ever lags the data): so an fsync leaves no metadata change behind for the caller's next
  directory fsync to commit (content.py, fsync()).
- A handle keeps its own backing fd: the backing open() checked the caller's access, and a
  file with no name left is still reached through it. A content has its own fd, a
  duplicate of a handle's, replaced by a writable one when a writable handle writes.
- The server runs operations on different inodes side by side (server.py's lock order), one
  inode's changes one at a time: so the handle table (handles, their count per inode, the
  next number) is changed and walked under ``_table``, held for that alone; a content is used
  only under its inode's lock.
- With a recovery root every new data key is derived from it and the new file id
  (recoverykeys.py); without a key service (a mount by the recovery key) the mount is
  read-only, every key is derived, and none is ever new.
- A data key reaches the sealing worker at its file's first large read or write and is
  dropped when the content closes (or the file gets a fresh key).
- No write seals under a data key past fileheader.REKEY_AT seals: the file first gets a
  fresh one (rekeyfile.py); if that fails, writes go on under the old key until SEAL_LIMIT,
  then fail. (A re-key a crash interrupted: openload.py.)
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from encfs.blocks import BlockCipher
from encfs.fuse import rekeyfile
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import (
    HEADER_LEN,
    SEAL_LIMIT,
    V1,
    V2,
    FileHeader,
    HeaderError,
    remove_state,
    state_file,
    user_xattrs_supported,
)
from encfs.fuse.filekeys import FileKeys
from encfs.fuse.fsconfig import SPARSE_FEATURE, FsConfig, FsKeys
from encfs.fuse.journal import file_ids
from encfs.fuse.openload import ContentLoading, OpenFile
from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService
from encfs.sealing import Sealers

log = logging.getLogger("encfs.fuse")
REKEY_RETRY = 1 << 20  # seals between tries to re-key a file that could not be (a full disk)
CHECKPOINT_DELAY = 1.0  # seconds from a file's last close to its deferred checkpoint
DEFERRED_MAX = 64  # closed files waiting for their checkpoint (each keeps two fds open)
STATE_DELAY = 1.0  # seconds from an fsync to the write of the synced size it left pending


class OpenFiles(ContentLoading):
    """Handles by number, and each open inode's content."""

    def __init__(self, root: bytes, config: FsConfig, ks: KeyService | None, cipher_class: type[BlockCipher],
                 read_only: bool, sealers: Sealers, recovering: bool = True,
                 open_path: Callable[[bytes, int], int] = os.open, recovery_root: bytes | None = None,
                 fs_keys: FsKeys | None = None, check_derived: bool = False) -> None:
        """``check_derived``: warn of each loaded wrapped key that is not the one the recovery root
        derives (a mount with a recovery root and the key service; not the re-key converting them)."""
        self.root = root
        self._open_path = open_path  # fs.py's: through directory fds, for backing paths past PATH_MAX
        self.describe: Callable[[bytes], str] = os.fsdecode  # a backing path's plaintext path (fs.py's)
        self.config = config
        self.block_size = config.block_size
        self.ks = ks
        self.cipher_class = cipher_class
        self.read_only = read_only
        self.sealers = sealers
        self.key_cache = DataKeyCache(max_entries=65536)  # the default lifetime (cache.MAX_AGE, 5 minutes)
        # New files' keys, and the key of each file loaded (filekeys.py): derived, or wrapped by the
        # CMK (a batch per pass through the key service; with a recovery root derived from it).
        self.keys = FileKeys(config, fs_keys, ks, recovery_root, cache=self.key_cache)
        self.check_derived = check_derived
        self._handles: dict[int, OpenFile] = {}
        self._per_inode: dict[int, int] = {}
        self._table = threading.Lock()  # guards _handles, _per_inode, _next and deferred (see the invariants)
        self.contents: dict[int, FileContent] = {}
        # Closed files whose checkpoint waits: inode -> (monotonic time it is due, backing path).
        self.defer_checkpoints = False
        self.deferred: dict[int, tuple[float, bytes]] = {}
        # Open files whose synced size an fsync left pending: inode -> (when it is written, backing path).
        self.pending_states: dict[int, tuple[float, bytes]] = {}
        self.load_lock = threading.Lock()
        self.recovering = recovering
        self.checked: set[int] = set()  # inodes whose recovery was done (or not due) in this mount
        self.unrecovered: list[bytes] = []  # files whose recovery failed or stayed in memory
        self.seen_ids: set[bytes] = set()  # file ids met by recoveries (journals of others are orphans)
        self.scan_incomplete = False  # a file's id could not be read: no journal is an orphan then
        self._xattrs = True  # False once the backing store refused the file state
        # A backing store without user xattrs keeps each file's state in a file (fileheader.py).
        self.state_in_file = not read_only and not user_xattrs_supported(root)
        self._next = 1
        self.journals = file_ids(root)  # files whose journal a crash left behind: recovered when next loaded
        self.rekeys = rekeyfile.pending(root, read_only)  # files whose re-key a crash interrupted
        # Files of a format-1 filesystem stay version 1 (format-1 encfs cannot read version 2).
        self.version = V2 if config.format >= 2 else V1
        # Holes are recorded only once every encfs that may open the filesystem knows them.
        self.sparse = SPARSE_FEATURE in config.features and not read_only

    # -- handles ----------------------------------------------------------------------

    def add(self, f: OpenFile) -> int:
        with self._table:
            fh, self._next = self._next, self._next + 1
            self._handles[fh] = f
            self._per_inode[f.inode] = self._per_inode.get(f.inode, 0) + 1
        return fh

    def __getitem__(self, fh: int) -> OpenFile:
        return self._handles[fh]

    def get(self, fh: int) -> OpenFile | None:
        return self._handles.get(fh)

    def is_open(self, inode: int) -> bool:
        return inode in self._per_inode

    def open_for_writing(self, inode: int) -> bool:
        """Whether a writable handle of ``inode`` is open: only then can the kernel hold pages of
        it that it has not written back (its writeback cache writes them at the close)."""
        if inode not in self._per_inode:  # no handle at all (most seeks): no scan of the table
            return False
        with self._table:
            return any(f.inode == inode and f.writable for f in self._handles.values())

    def fd_of(self, inode: int) -> int | None:
        """A backing fd of ``inode`` from one of its handles."""
        with self._table:
            for f in self._handles.values():
                if f.inode == inode:
                    return f.fd
        return None

    def release(self, fh: int) -> None:
        """Forget handle ``fh``; its inode's content closes with its last handle."""
        with self._table:
            f = self._handles.pop(fh, None)
            if f is None:
                return
            left = self._per_inode[f.inode] - 1
            if left:
                self._per_inode[f.inode] = left
            else:
                del self._per_inode[f.inode]
        os.close(f.fd)
        if left:
            return
        content = self.contents.get(f.inode)
        if content is None:
            return
        # (RELEASE may come after the UNLINK of the file's last name: then its journal just goes.)
        unlinked = None  # not asked yet: _close asks if it needs to
        if self.defer_checkpoints and content.journal.fd is not None:
            unlinked = os.fstat(content.fd).st_nlink == 0
            if not unlinked:
                with self._table:
                    if f.inode in self.deferred or len(self.deferred) < DEFERRED_MAX:
                        self.deferred[f.inode] = (time.monotonic() + CHECKPOINT_DELAY, f.path)
                        return
        if self._close(content, f.path, unlinked):
            del self.contents[f.inode]

    def _due(self, table: dict[int, tuple[float, bytes]], now: float) -> tuple[list[int], float | None]:
        """The inodes of ``table`` (inode -> (when, path)) due at ``now``, and when the next one is."""
        with self._table:
            due = [inode for inode, (when, _) in table.items() if when <= now]
            later = min((when for when, _ in table.values() if when > now), default=None)
        return due, later

    def closed_due(self, now: float) -> tuple[list[int], float | None]:
        """The closed files whose checkpoint is due at ``now``, and when the next one is (or None)."""
        return self._due(self.deferred, now)

    def state_pending(self, inode: int, path: bytes) -> None:
        """An fsync of ``inode`` left its synced size pending: written STATE_DELAY from the first
        such fsync (not the last, or a file synced more often than that would never get it)."""
        with self._table:
            self.pending_states.setdefault(inode, (time.monotonic() + STATE_DELAY, path))

    def states_due(self, now: float) -> tuple[list[int], float | None]:
        """The files whose pending synced size is due at ``now``, and when the next one is."""
        return self._due(self.pending_states, now)

    def write_pending_state(self, inode: int) -> None:
        """Write the synced size an fsync of ``inode`` left pending (under its lock), unless a
        close, truncate or later state wrote it already. A failure is logged, not retried: the
        state then keeps the older synced size, as after a crash that lost the write."""
        with self._table:
            entry = self.pending_states.pop(inode, None)
        content = self.contents.get(inode)
        if entry is None or content is None:
            return
        try:
            content.write_pending_state()
        except OSError as e:
            log.warning("%r: synced size not written (%s); the state keeps the older one", entry[1], e.strerror)

    def checkpoint_closed(self, inode: int) -> None:
        """The deferred checkpoint of ``inode`` (under its lock): none if it was opened again
        meanwhile (its next release defers it again), or dropped (unlinked, emptied)."""
        with self._table:
            entry = self.deferred.pop(inode, None)
            if entry is None or inode in self._per_inode:
                return
        content = self.contents.get(inode)
        if content is not None and self._close(content, entry[1]):
            del self.contents[inode]

    def _close(self, content: FileContent, path: bytes, unlinked: bool | None = None) -> bool:
        """Checkpoint and close a content; False (it stays open, pinned) if the checkpoint fails,
        or if the content was recovered in memory only because its journal on disk still holds
        blocks its load dropped (FileContent.load): reloaded later, it would take them back."""
        if content.holds_dropped:
            return False
        try:
            if unlinked is None and content.journal.fd is None and not content.index:
                unlinked = False  # nothing to checkpoint or drop: no need to ask
            elif unlinked is None:
                unlinked = os.fstat(content.fd).st_nlink == 0
            content.close(unlinked)
        except OSError as e:  # its journal stays on disk: the next load replays it
            log.error("%r: checkpoint failed (%s); its journal is kept", path, e.strerror)
            return False
        content.sealer.close()
        return True

    def close_all(self) -> bool:
        """Close every content and handle (unmount); a journal that cannot be checkpointed
        stays on disk for the next mount. False if a content refused changes (a sync failed):
        what its file holds on disk is unknown, so the next mount must recover as after a crash."""
        durable = True
        for inode, content in list(self.contents.items()):
            durable = durable and not content.refusing()
            if not self._close(content, b"<inode %d>" % inode):
                content.release_fds()
        with self._table:
            for f in self._handles.values():
                os.close(f.fd)
            self._handles.clear()
            self._per_inode.clear()
            self.deferred.clear()
        self.contents.clear()
        return durable

    # -- contents ---------------------------------------------------------------------

    def unlinked(self, inode: int, path: bytes) -> None:
        """The file's last name is gone: a pinned content (no handles) drops its journal and
        lets the file's space go."""
        with self._table:
            self.deferred.pop(inode, None)
        c = self.contents.get(inode)
        if c is not None and not self.is_open(inode):
            del self.contents[inode]
            self._discard(c, path)

    def _discard(self, c: FileContent, path: bytes) -> None:
        """Close a content whose file is gone or emptied: its journal goes, never into place."""
        try:
            c.close(unlinked=True)
        except OSError as e:
            log.error("%r: dropping its journal failed: %s", path, e.strerror)
            c.release_fds()
        c.sealer.close()

    def writable_content(self, f: OpenFile) -> FileContent:
        """The content a write through ``f`` goes to: a new header and data key if the file
        has none or is empty and not made by this daemon (see the invariants), a file of
        this filesystem's content version, and an fd open for writing."""
        c = self.content(f)
        if c is None or (c.size == 0 and not c.fresh):
            return self.renew(f)
        if c.read_only:
            raise OSError(errno.EROFS, "its journal could not be recovered read-write")
        if not c.fd_writable:
            fd = os.dup(f.fd)
            os.close(c.fd)
            c.use_fd(fd, True)
        c.check_key()  # before anything is written under the key
        if c.v1 and self.version == V2 and self._xattrs:
            self._xattrs = c.upgrade()
        if c.seals >= c.rekey_at or c.seals >= SEAL_LIMIT:
            self.rekey(c, f.path)
        return c

    def rekey(self, c: FileContent, path: bytes) -> None:
        """Give ``c``'s file a fresh file id and data key (see the invariants)."""
        fresh, key = self.keys.new(c.header.version)
        file_id = fresh.file_id
        old_id, seals = c.header.file_id, c.seals
        try:
            rekeyfile.rekey(c, fresh, self.cipher_class(key, file_id, self.block_size))
        except OSError as e:
            if isinstance(e, rekeyfile.SideFilePending):  # ``c`` is under the new key, read-only
                self.rekeys.add(old_id)  # a later load of the file finishes the job
                c.sealer = self.sealers.sealer(c.cipher, key, file_id)
            if c.read_only or c.seals >= SEAL_LIMIT:
                log.error("%r: its data key's budget is spent and it cannot get a fresh one (%s): "
                          "writes fail", path, e.strerror)
                raise OSError(e.errno if e.errno == errno.ENOSPC else errno.EIO, e.strerror) from None
            c.rekey_at = c.seals + REKEY_RETRY
            log.error("%r: cannot give it a fresh data key yet (%s); tried again after %d more seals",
                      path, e.strerror, REKEY_RETRY)
            return
        log.warning("%r: gave it a fresh data key after %d seals under the old one", path, seals)
        c.sealer = self.sealers.sealer(c.cipher, key, file_id)  # the old one was closed with its cipher

    def renew(self, f: OpenFile, new_file: bool = False) -> FileContent:
        """Empty ``f``'s file and give it a new header and data key (``new_file``: it was just
        created, and is empty)."""
        if not new_file:
            self.drop(f.inode, f.fd, f.path)
        fd = os.dup(f.fd)
        try:
            header, key = self.keys.new(self.version)
            file_id = header.file_id
            c = FileContent.create(fd, header, self.cipher_class(key, file_id, self.block_size),
                                   self.root, self.journals, self._reporter(f.path), self.state_in_file)
        except BaseException:
            os.close(fd)
            raise
        c.use_fd(fd, True)
        c.sealer = self.sealers.sealer(c.cipher, key, file_id)
        c.sparse = self.sparse
        self.contents[f.inode] = c
        self.checked.add(f.inode)
        return c

    def drop(self, inode: int, fd: int, path: bytes) -> None:
        """Truncate the file to 0 through ``fd``: the header goes first, durably if a journal
        holds blocks of it, then its content and journal (a crash in between leaves an empty
        file and an orphaned journal, never the old blocks without their journaled versions)."""
        side = self.state_file_of(fd)
        os.ftruncate(fd, 0)
        try:
            remove_state(fd, side)  # sealed under the old key: the next one starts afresh
        except OSError:
            pass
        with self._table:
            self.deferred.pop(inode, None)
        c = self.contents.pop(inode, None)
        if c is not None:
            if c.journal.fd is not None:
                os.fsync(fd)
            self._discard(c, path)

    def state_file_of(self, fd: int) -> bytes | None:
        """The state file of the backing file open as ``fd``, on a store without user xattrs."""
        if not self.state_in_file:
            return None
        try:
            return state_file(self.root, FileHeader.parse(os.pread(fd, HEADER_LEN, 0)).file_id)
        except HeaderError:
            return None

    def handles(self) -> Iterator[OpenFile]:
        with self._table:
            return iter(list(self._handles.values()))


__all__ = ["CHECKPOINT_DELAY", "DEFERRED_MAX", "REKEY_RETRY", "STATE_DELAY", "OpenFile", "OpenFiles"]
