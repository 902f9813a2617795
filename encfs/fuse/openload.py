"""Loading the contents of open files (openfiles.py's OpenFiles takes it from ContentLoading):
a handle's content loaded at its first use, its journal recovered (content.py's load()) and a
re-key a crash interrupted finished on the way; the size a lookup reports, the file recovered
first where a recovery may be due; the journals that no file owns after a recovery scan. And
OpenFile, the handle a content is loaded through (openfiles.py keeps the handle table).

Of openfiles.py's invariants, these are kept here:
- With the writeback cache the kernel trusts the size it learnt at lookup for as long as
  it caches the inode, so a crash recovery that changes a file's size must run before
  the kernel first sees the file: size_for_lookup() recovers a file at its first lookup
  when a recovery may be due (``recovering``: the last mount did not end cleanly; or the
  file has a journal on disk). So does the scan after an unclean shutdown, for every file
  with a header, also one of just its header (its blocks may all be in its journal); only
  then do journals that no file met go as orphans (remove_orphan_journals), and none if the
  scan could not read some file's id (a directory it could not list, a header it could not
  read): a file whose check failed keeps its journal for the next mount.
- Contents are loaded under ``load_lock``: reads load them too, and reads run side by side.
- A re-key a crash interrupted is finished before its file is first read.
- A read-only open does not load its file where the file keys are derived (or the mount is by
  the recovery key): fileops.py open() checks the CMK, as a load would, and starts the read of
  the header ahead; the first READ or SEEK_DATA/HOLE loads it, so a damaged header or journal
  fails that call with EIO, never returning bytes, and the load takes the larger of the sizes
  the kernel held at the open and since (a shorter backing file reads EIO past its end). A
  writable open, or any open where file keys are wrapped, loads at once. A handle whose load
  failed on a damaged file or a key the key service refused answers EIO to its later reads
  without loading or logging again (OpenFile.load_failed), until the file is loaded through
  another handle; an OSError, an unreachable key daemon or a failing token is tried again at
  the next read; a new open tries afresh.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from encfs import daemonlog
from encfs.blocks import BlockAuthError
from encfs.errors import IntegrityError, InvalidCiphertext, KeyNotFound, KeyStateError, TokenError
from encfs.fuse import rekeyfile
from encfs.fuse.content import FileContent, plain_file_size
from encfs.fuse.fileheader import HEADER_LEN, STATE_SUFFIX, FileHeader, state_file
from encfs.fuse.journal import file_ids, journal_path
from encfs.fuseproto.wire import FuseError

if TYPE_CHECKING:
    import threading

    from encfs.blocks import BlockCipher
    from encfs.fuse.filekeys import FileKeys
    from encfs.sealing import Sealers

log = logging.getLogger("encfs.fuse")

# What a handle's failed load remembers (OpenFile.load_failed): the file's bytes or the key
# service's verdict on its key. An OSError, an unreachable key daemon or a failing token may do
# better at the next read, so those are tried again.
LASTING_LOAD_FAILURES = (IntegrityError, KeyStateError, KeyNotFound, InvalidCiphertext)


@dataclass
class OpenFile:
    inode: int
    fd: int
    writable: bool
    path: bytes
    # The size the kernel held for the file at a read-only open that left the load to the first
    # read: a GETATTR meanwhile may have learnt a shorter backing file, which the kernel ignores.
    known_size: int | None = None
    # Its load failed on a damaged file or a key the key service refused (logged, and audited,
    # then): later reads through this handle fail the same way without loading or logging again,
    # unless another handle has loaded the file meanwhile (LASTING_LOAD_FAILURES).
    load_failed: bool = False


class ContentLoading:
    """content, size_for_lookup and remove_orphan_journals of OpenFiles."""

    if TYPE_CHECKING:  # defined by OpenFiles (openfiles.py)
        root: bytes
        _open_path: Callable[[bytes, int], int]
        describe: Callable[[bytes], str]
        block_size: int
        cipher_class: type[BlockCipher]
        read_only: bool
        sealers: Sealers
        keys: FileKeys
        check_derived: bool
        contents: dict[int, FileContent]
        load_lock: threading.Lock
        recovering: bool
        checked: set[int]
        unrecovered: list[bytes]
        seen_ids: set[bytes]
        scan_incomplete: bool
        state_in_file: bool
        journals: set[bytes]
        rekeys: set[bytes]
        sparse: bool

        def _close(self, content: FileContent, path: bytes, unlinked: bool | None = None) -> bool: ...

    def content(self, f: OpenFile, known_size: int | None = None) -> FileContent | None:
        """``f``'s content, loaded (and recovered) on first use; None while the file has no
        header (empty and never written)."""
        c = self.contents.get(f.inode)
        if c is not None:
            return c
        if f.known_size is not None:
            known_size = f.known_size if known_size is None else max(known_size, f.known_size)
        with self.load_lock:
            c = self.contents.get(f.inode)
            if c is None:
                if f.load_failed:  # under the lock: a read may have waited while another's load failed
                    raise FuseError(errno.EIO)
                try:
                    c = self._load(f, known_size)
                except LASTING_LOAD_FAILURES:
                    f.load_failed = True
                    raise
                if c is not None:
                    self.contents[f.inode] = c
        return c

    def defer_load(self, f: OpenFile, known_size: int | None) -> bool:
        """Whether read-only ``f`` may be loaded at its first use instead of at its open
        (fileops.py open()): where its key's CMK can be checked without the file's header, which
        is done here as a load would (derived keys), so that a disabled CMK or a revoked grant
        still fails the open, whose data the page cache may hold (FOPEN_KEEP_CACHE). A mount by
        the recovery key asks no CMK; wrapped keys are checked as they unwrap: loaded now."""
        if self.keys.ks is not None:
            if self.keys.derived_root is None:
                return False
            try:
                self.keys.check_usable()
            except (KeyStateError, KeyNotFound, TokenError, InvalidCiphertext) as e:
                daemonlog.report_integrity(log, self.describe(f.path), "file key", e)
                raise
        f.known_size = known_size
        return True

    def size_for_lookup(self, inode: int, path: bytes | None, backing_size: int) -> int:
        """The plaintext size to report for a regular file (see the invariants); ``path`` is
        None for a file reached through a handle's fd (its content loaded, or its file checked at its
        first lookup)."""
        c = self.contents.get(inode)
        if c is not None:
            return c.size
        # A backing file of just its header may have every block in its journal (a truncate into
        # the first block journals it): it is checked too, or its journal would go as an orphan's.
        if path is None or inode in self.checked or backing_size < HEADER_LEN \
                or not (self.recovering or self.journals or self.rekeys):
            return plain_file_size(backing_size, self.block_size)
        try:
            return self._recover(inode, path)
        except Exception as e:  # noqa: BLE001 - the open or first read reports it; a lookup shows what is there
            log.error("%r: cannot check it for crash recovery: %s", path, getattr(e, "message", e))
            self.unrecovered.append(path)
            self._keep_journal_of(path)
            return plain_file_size(backing_size, self.block_size)

    def _keep_journal_of(self, path: bytes) -> None:
        """A file whose check failed still owns its journal: its id counts as met, so that the
        scan's end does not take the journal for an orphan's (the next mount tries again). A
        file whose header cannot be read either leaves the scan incomplete: no journal goes."""
        try:
            fd = self._open_path(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                self.seen_ids.add(FileHeader.parse(os.pread(fd, HEADER_LEN, 0)).file_id)
            finally:
                os.close(fd)
        except Exception:  # noqa: BLE001 - whatever it is, that file's journal must stay
            self.scan_incomplete = True

    def _recover(self, inode: int, path: bytes) -> int:
        fd = self._open_path(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if not self.recovering:  # only a journal is due: is this file's on disk?
                raw = os.pread(fd, HEADER_LEN, 0)
                if len(raw) < HEADER_LEN or FileHeader.parse(raw).file_id not in self.journals | self.rekeys:
                    self.checked.add(inode)
                    return plain_file_size(os.fstat(fd).st_size, self.block_size)
            with self.load_lock:
                c = self._load(OpenFile(inode, fd, False, path), None)
        finally:
            os.close(fd)
        self.checked.add(inode)
        if c is None:
            return 0
        self.seen_ids.add(c.header.file_id)
        if c.recovered_in_memory:
            self.unrecovered.append(path)
        if c.journal.fd is not None or not self._close(c, path):
            self.contents[inode] = c  # a journal it could not checkpoint: pinned
        return c.size


    def remove_orphan_journals(self) -> list[bytes]:
        """After a recovery scan met every file: journals whose file no scan met and no loaded
        content owns belong to files that are gone (unlinked while open, then a crash). None go
        when the scan could not tell a file's id (``scan_incomplete``)."""
        if self.scan_incomplete:
            return []
        owned = self.seen_ids | {c.header.file_id for c in self.contents.values()}
        states = file_ids(self.root, STATE_SUFFIX) if self.state_in_file else set()
        orphans = [i for i in self.journals | self.rekeys | states if i not in owned]
        for file_id in orphans:
            for path in (journal_path(self.root, file_id), rekeyfile.side_file(self.root, file_id),
                         state_file(self.root, file_id)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self.journals.discard(file_id)
            self.rekeys.discard(file_id)
        return orphans

    def _reporter(self, path: bytes) -> Callable[[int], None]:
        def report(block_no: int) -> None:
            daemonlog.report_integrity(log, self.describe(path), f"block {block_no}", BlockAuthError(block_no))
        return report

    def _load(self, f: OpenFile, known_size: int | None) -> FileContent | None:
        raw = os.pread(f.fd, HEADER_LEN, 0)
        if not raw:
            return None
        header = FileHeader.parse(raw)
        fd, writable = self._content_fd(f, header.file_id)
        try:
            if header.file_id in self.rekeys:
                fd, header = self._finish_rekey(fd, writable, header, f.path)
            try:
                key = self.keys.key(header)
            except (KeyStateError, KeyNotFound, TokenError, InvalidCiphertext) as e:
                daemonlog.report_integrity(log, self.describe(f.path), "file key", e)
                raise
            if self.check_derived and self.keys.recovery_misses(header, key):
                # The CMK's key is the file's key; but the recovery key would not open this file (one
                # restored from a backup made before `encfs recovery-key add`, say).
                log.warning("%r: its data key is not derived from the recovery root: the recovery key does "
                            "not open it (`encfs rekey --full` gives it one that is)", self.describe(f.path))
            c = FileContent(fd, header, self.cipher_class(key, header.file_id, self.block_size), self.root,
                            self.journals, self._reporter(f.path), self.state_in_file)
            for note in c.load(writable, known_size, after_crash=self.recovering):
                log.warning("%r: %s", f.path, note)
        except BaseException:
            os.close(fd)
            raise
        c.use_fd(fd, writable)
        c.sealer = self.sealers.sealer(c.cipher, key, header.file_id)
        c.sparse = self.sparse
        return c

    def _finish_rekey(self, fd: int, writable: bool, header: FileHeader, path: bytes) -> tuple[int, FileHeader]:
        """A file whose re-key a crash interrupted: finish it (or, read-only, read its side
        file instead). Returns the fd and header to load the file from."""
        old = header.file_id
        if writable:
            rekeyfile.complete(self.root, old, fd)
            self.rekeys.discard(old)
            log.warning("%r: finished giving it a fresh data key (interrupted by a crash)", path)
        else:
            side = rekeyfile.open_side_file(self.root, old)
            try:
                header = FileHeader.parse(os.pread(side, HEADER_LEN, 0))
            except BaseException:
                os.close(side)  # the caller closes ``fd``
                raise
            os.close(fd)
            log.warning("%r: its re-key was interrupted by a crash: read from its side file "
                        "until a read-write mount finishes it", path)
            return side, header
        return fd, FileHeader.parse(os.pread(fd, HEADER_LEN, 0))

    def _content_fd(self, f: OpenFile, file_id: bytes) -> tuple[int, bool]:
        """A backing fd for a content: the handle's duplicated, or, for a read-only handle of a
        file that a recovery or a re-key may have to write, read-write where the mount and the
        file allow it. (Reopening through /proc for every cold read-only open cost more than
        the dup; a later write swaps in a writable fd: writable_content.)"""
        if f.writable:
            return os.dup(f.fd), True
        if not self.read_only and (self.recovering or file_id in self.journals or file_id in self.rekeys):
            try:
                return os.open(f"/proc/self/fd/{f.fd}", os.O_RDWR | os.O_CLOEXEC), True
            except OSError:
                pass
        return os.dup(f.fd), False

