"""Directory ids on the backing store: two copies, sealed for the directory's place.

Every directory but the root has a 16-byte id (names.py puts it in the AD of its entries'
names). It is kept twice: the file ``encfs.dirid`` in the backing directory (mode 0444) and the backing directory's xattr ``user.encfs.dirid``
(where the backing filesystem has no user xattrs: the file ``encfs.dirid.next``).

Forms (docs/FORMAT.md §6.3):
- legacy: the 16 plain bytes, in both copies (filesystems without "bound-dirids");
- sealed: 60 bytes, names.NameCipher.seal_dirid, AAD = parent directory id || backing
  entry name. A copy authenticates only where it was sealed for.

Invariants:
- A rename moves a directory through the two copies one at a time: the second copy is
  sealed for the new place before the backing rename, the file copy after it. At every
  instant one copy authenticates for the directory's current place; the reader takes
  that one and rewrites the other ("the copy that authenticates wins").
- Two copies that authenticate for the place but disagree on the id, or none that
  authenticates (with bound ids), are tampering: EIO, logged, never a guess. The one
  exception is a directory that is empty in plaintext (an interrupted mkdir): it gets
  a new id.
- Legacy copies are accepted only while the filesystem lacks "bound-dirids".
- A new directory's sealed file copy is written without an fsync (a sync per mkdir cost
  more than the rest of the mkdir: benchmarks/HISTORY.md). A torn sealed copy never
  authenticates, and the second copy, the xattr, is metadata of the directory itself,
  which a backing filesystem that journals its metadata in order (ext4 with a journal,
  XFS) commits before anything created in the directory later; an fsync of the directory
  (FSYNCDIR) takes it along. So a crash that keeps an entry of the directory keeps an id
  copy that reads; the file copy it tore or lost is rewritten from the xattr at the next
  read (logged). Legacy (unsealed) copies, where the file copy wins a disagreement, and a
  second copy in the file ``encfs.dirid.next`` are written and synced as before. Every
  rewrite of an existing copy (a rename, a repair) stays write-fsync-rename.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable

from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.names import (
    DIRID_FILE,
    DIRID_LEN,
    DIRID_XATTR,
    SEALED_DIRID_LEN,
    NameAuthError,
    NameCipher,
    is_internal,
    is_longname_entry,
)
from encfs.fuseproto.wire import FuseError

log = logging.getLogger("encfs.fuse")

DIRID_NEXT = DIRID_FILE + b".next"  # the second copy where the backing filesystem has no user xattrs


def plain_empty(entries: Iterable[bytes]) -> bool:
    """Whether a backing directory's ``entries`` hold no plaintext entry, only encfs's bookkeeping."""
    return all(is_internal(n) and not is_longname_entry(n) for n in entries)


class DirIds:
    """Reads, repairs and writes the id copies of backing directories."""

    def __init__(self, names: NameCipher, *, accept_legacy: bool, write_sealed: bool, read_only: bool,
                 backing: BackingDirs) -> None:
        self.names = names
        self.bd = backing  # paths past PATH_MAX: every call through a directory fd
        self.accept_legacy = accept_legacy
        self.write_sealed = write_sealed
        self.read_only = read_only

    # -- the copies ---------------------------------------------------------------------

    def _read_file(self, path: bytes) -> bytes:
        try:
            return self.bd.read_file(path, SEALED_DIRID_LEN + 1)
        except (FileNotFoundError, NotADirectoryError):
            return b""

    def copies(self, path: bytes) -> list[tuple[str, bytes]]:
        """(copy, stored bytes) of each place the id of ``path`` is kept (b"": none there)."""
        return self._copies(path)

    def _copies(self, path: bytes) -> list[tuple[str, bytes]]:
        try:
            xattr = self.bd.getxattr(path, DIRID_XATTR)
        except OSError:
            xattr = b""
        return [("file", self._read_file(os.path.join(path, DIRID_FILE))), ("xattr", xattr),
                ("next", self._read_file(os.path.join(path, DIRID_NEXT)))]

    def _write_file(self, path: bytes, stored: bytes) -> None:
        self.bd.write_atomic(os.path.join(path, DIRID_FILE), stored, 0o444)

    def _write_second(self, path: bytes, stored: bytes) -> None:
        """The xattr copy, or (no user xattrs here) the file ``encfs.dirid.next``."""
        try:
            self.bd.setxattr(path, DIRID_XATTR, stored)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
            self.bd.write_atomic(os.path.join(path, DIRID_NEXT), stored, 0o444)

    def _drop_next(self, path: bytes) -> None:
        try:
            self.bd.unlink(os.path.join(path, DIRID_NEXT))
        except FileNotFoundError:
            pass

    def _stored(self, dirid: bytes, parent_dirid: bytes, entry: bytes) -> bytes:
        return self.names.seal_dirid(dirid, parent_dirid, entry) if self.write_sealed else dirid

    # -- reading ------------------------------------------------------------------------

    def sealed_copies(self, path: bytes, parent_dirid: bytes,
                      copies: list[tuple[str, bytes]] | None = None) -> dict[str, bytes]:
        """{copy: id} of the sealed copies of ``path``'s id that authenticate for its place."""
        entry = os.path.basename(path)
        sealed: dict[str, bytes] = {}
        for which, stored in self._copies(path) if copies is None else copies:
            if len(stored) == SEALED_DIRID_LEN:
                try:
                    sealed[which] = self.names.open_dirid(stored, parent_dirid, entry)
                except NameAuthError:
                    pass
        return sealed

    def read(self, path: bytes, parent_dirid: bytes) -> bytes:
        """The id of the backing directory ``path`` whose parent has ``parent_dirid``; repairs
        (read-write) a copy that does not authenticate here, or a legacy one once ids are sealed."""
        entry = os.path.basename(path)
        copies = self._copies(path)
        sealed = self.sealed_copies(path, parent_dirid, copies)
        if len(set(sealed.values())) > 1:
            log.error("directory %r: its id copies authenticate but disagree (%s): refused", path,
                      ", ".join(sorted(sealed)))
            raise FuseError(errno.EIO)
        if sealed:
            dirid = next(iter(sealed.values()))
            good = set(sealed)
            stored = next(stored for which, stored in copies if which in good)
        elif self.accept_legacy:
            legacy = {which: stored for which, stored in copies if len(stored) == DIRID_LEN}
            if len(set(legacy.values())) > 1:  # as before sealed ids: the file copy is the id
                legacy = {"file": legacy["file"]} if "file" in legacy else legacy
            if not legacy:
                return self._lost(path, parent_dirid)
            dirid = next(iter(legacy.values()))
            good = set(legacy) if not self.write_sealed else set()
            stored = self._stored(dirid, parent_dirid, entry)
        elif plain_empty(self.bd.listdir(path)):
            return self._lost(path, parent_dirid)  # an interrupted mkdir, or nothing left to protect
        else:
            if any(len(stored) == DIRID_LEN for _, stored in copies):
                log.error("directory %r: its id is in the legacy (unbound) form on a filesystem whose ids "
                          "are bound to their place: refused as tampering", path)
            else:
                log.error("directory %r: no copy of its id authenticates for this place (moved or copied "
                          "from elsewhere?): refused", path)
            raise FuseError(errno.EIO)
        if not self.read_only and ("file" not in good or ("xattr" not in good and "next" not in good)):
            try:
                self._repair(path, stored, good)
            except OSError as e:  # a good copy was read: the directory works; the next read tries again
                log.warning("directory %r: its other id copy could not be rewritten (%s)", path, e.strerror)
        return dirid

    def _repair(self, path: bytes, stored: bytes, good: set[str]) -> None:
        """Rewrite the copies not in ``good`` with ``stored`` (a good copy's bytes: no new seal)."""
        if "file" not in good:
            log.warning("directory %r: rewriting %r from its other id copy", path, DIRID_FILE)
            self._write_file(path, stored)
        if "xattr" not in good and "next" not in good:
            self._write_second(path, stored)
        if ("next" in good or self.bd.lexists(os.path.join(path, DIRID_NEXT))) \
                and ("xattr" in good or self._xattr_ok(path, stored)):
            self._drop_next(path)

    def _xattr_ok(self, path: bytes, stored: bytes) -> bool:
        try:
            return self.bd.getxattr(path, DIRID_XATTR) == stored
        except OSError:
            return False

    def _lost(self, path: bytes, parent_dirid: bytes) -> bytes:
        if not plain_empty(self.bd.listdir(path)):
            log.error("directory %r lost its id: its entries cannot be decrypted", path)
            raise FuseError(errno.EIO)
        if self.read_only:
            return os.urandom(DIRID_LEN)  # it has no entries to decrypt; a read-write mount gives it one
        return self.create(path, parent_dirid)  # an empty directory from an interrupted mkdir

    # -- writing ------------------------------------------------------------------------

    def create(self, path: bytes, parent_dirid: bytes, dirid: bytes | None = None, fresh: bool = False) -> bytes:
        """Give the backing directory ``path`` an id (a new random one unless ``dirid``).
        ``fresh``: the directory was just made (mkdir) and holds nothing, so a sealed file copy
        is written in place and not synced (see the invariants)."""
        dirid = dirid or os.urandom(DIRID_LEN)
        stored = self._stored(dirid, parent_dirid, os.path.basename(path))
        if fresh and self.write_sealed:
            self.bd.write_new(os.path.join(path, DIRID_FILE), stored, 0o444)
        else:
            self._write_file(path, stored)
        try:
            self._write_second(path, stored)
        except OSError:
            if self.write_sealed:
                raise
            # legacy: the file copy suffices where xattrs are unsupported
        return dirid

    def before_move(self, path: bytes, dirid: bytes, new_parent_dirid: bytes, new_entry: bytes) -> None:
        """Before the backing rename of ``path`` to ``new_entry`` in the directory ``new_parent_dirid``:
        the second copy is sealed for the new place (the file copy still authenticates here)."""
        if self.write_sealed:
            self._write_second(path, self.names.seal_dirid(dirid, new_parent_dirid, new_entry))

    def after_move(self, path: bytes, dirid: bytes, parent_dirid: bytes) -> None:
        """After the backing rename (``path`` is the new place), or after it failed (the old one):
        both copies sealed for ``path``."""
        if not self.write_sealed:
            return
        stored = self.names.seal_dirid(dirid, parent_dirid, os.path.basename(path))
        try:
            self._write_second(path, stored)  # already right after a rename; not after a failed one
            self._write_file(path, stored)
            if self.bd.lexists(os.path.join(path, DIRID_NEXT)) and self._xattr_ok(path, stored):
                self._drop_next(path)
        except OSError as e:
            # The rename itself is done (or undone): one copy authenticates for ``path``, and the
            # next read of the id rewrites the other one from it.
            log.warning("directory %r: an id copy could not be resealed for its place (%s); its next "
                        "read repairs it", path, e.strerror)
