"""Symlink targets on the backing store: inline or long, legacy or bound to their link.

Forms (docs/FORMAT.md §6.3):
- legacy inline / long ("encfs.lt." reference): sealed with a constant AAD, so a target
  could be moved to another link; read only while the filesystem lacks "bound-symlinks".
- bound inline ("2." || base64url) / bound long ("encfs.lt2." reference): sealed with
  AAD = parent directory id || backing entry name (|| "/" || reference), under a key of
  its own (names.NameCipher._seal_bound).

Invariants:
- A bound target authenticates only at the place it was sealed for, so a symlink that
  changes place (rename, the upgrade of a legacy one, a hard link) is a new backing
  symlink: made under a temporary internal name (``encfs.tmp.*``), given the old one's
  owner and times, then renamed over the destination; only then is the old name removed.
  A crash leaves the old name, or both names (each valid where it is), plus at worst an
  invisible ``encfs.tmp.*`` entry or an unreferenced file in ``encfs.longlinks/``.
- A long target's file is removed only with the last backing link that refers to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from encfs.atomicfile import write_atomic
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.names import (
    LONGLINK_DIR,
    SYMLINK_MAX,
    NameAuthError,
    NameCipher,
    is_bound_symlink,
    is_long_symlink,
)

TMP_PREFIX = b"encfs.tmp."


class Symlinks:
    def __init__(self, names: NameCipher, backing: BackingDirs, *, long_targets: bool, accept_legacy: bool,
                 write_bound: bool) -> None:
        self.names = names
        self.bd = backing  # symlinks themselves through directory fds (paths past PATH_MAX)
        self.root = backing.root
        self.long_targets = long_targets
        self.accept_legacy = accept_legacy
        self.write_bound = write_bound

    def longlink_file(self, ref: bytes) -> bytes:
        return os.path.join(self.root, LONGLINK_DIR, ref)

    def read(self, path: bytes, parent_dirid: bytes) -> bytes:
        """The plaintext target of the backing symlink ``path`` in the directory ``parent_dirid``."""
        stored = self.bd.readlink(path)
        sealed = None
        if is_long_symlink(stored):
            if b"/" in stored:
                raise NameAuthError(f"bad long-target reference {stored!r}")
            try:
                with open(self.longlink_file(stored), "rb") as f:
                    sealed = f.read()
            except FileNotFoundError:
                raise NameAuthError(f"the stored target of a long symlink ({stored!r}) is missing") from None
        if is_bound_symlink(stored):
            return self.names.open_symlink(stored, parent_dirid, os.path.basename(path), sealed)
        if not self.accept_legacy:
            raise NameAuthError("symlink target in the legacy (unbound) form on a filesystem whose targets "
                                "are bound to their link")
        if sealed is not None:
            return self.names.open_long_symlink(stored, sealed)
        return self.names.decrypt_symlink(stored)

    def seal(self, target: bytes, parent_dirid: bytes, entry: bytes) -> bytes:
        """What a new backing symlink for ``target`` at (parent_dirid, entry) holds; a long target's
        file is written first. Raises ENAMETOOLONG (OSError) if it cannot be stored."""
        if self.write_bound:
            stored = self.names.seal_symlink(target, parent_dirid, entry)
        else:
            stored = self.names.encrypt_symlink(target)
        if len(stored) <= SYMLINK_MAX:
            return stored
        if not self.long_targets:
            raise OSError(36, os.strerror(36))  # ENAMETOOLONG
        if self.write_bound:
            stored, sealed = self.names.new_bound_long_symlink(target, parent_dirid, entry)
        else:
            stored, sealed = self.names.new_long_symlink(target)
        os.makedirs(os.path.join(self.root, LONGLINK_DIR), mode=0o700, exist_ok=True)
        write_atomic(self.longlink_file(stored), sealed, 0o444)
        return stored

    def drop(self, stored: bytes | None) -> None:
        """Remove a long target's file once the last backing link referring to it is gone."""
        if stored is not None and is_long_symlink(stored) and b"/" not in stored:
            try:
                os.unlink(self.longlink_file(stored))
            except FileNotFoundError:
                pass

    def place_copy(self, target: bytes, dest: bytes, parent_dirid: bytes, like: os.stat_result,
                   rename: Callable[[bytes, bytes], None]) -> None:
        """Make a backing symlink for ``target`` sealed for ``dest`` (in ``parent_dirid``) with the
        owner and times of ``like``, under a temporary name, then ``rename(tmp, dest)`` it into place."""
        stored = self.seal(target, parent_dirid, os.path.basename(dest))
        tmp = os.path.join(os.path.dirname(dest), TMP_PREFIX + os.urandom(8).hex().encode())
        try:
            self.bd.symlink(stored, tmp)
            self.bd.chown(tmp, like.st_uid, like.st_gid)
            self.bd.utime(tmp, (like.st_atime_ns, like.st_mtime_ns))
            rename(tmp, dest)
        except BaseException:
            try:
                self.bd.unlink(tmp)
            except FileNotFoundError:
                pass
            self.drop(stored)
            raise

    def needs_reseal(self, stored: bytes) -> bool:
        return self.write_bound and not is_bound_symlink(stored)

