"""Extended attributes of the plaintext view: names and values sealed on the backing entry
(names.py, FORMAT.md §6.3). A mixin of EncryptedFS: the operations only, over its backing
store (``bd``), its name cipher and its inode targets.

Invariants:
- A plaintext xattr name has one backing form written (padded, once the filesystem has
  ``padded-xattr-names``) and may have a legacy one still read; a set stores the new form
  before it removes the legacy one, so a crash leaves both and the new one is read.
- XATTR_CREATE / XATTR_REPLACE apply to the plaintext name, whichever form holds it.
- security.capability, which the kernel asks for before a write(2), is answered from memory
  for inodes known to lack it (``_no_capability``); any set or removal forgets that.
- security.capability goes on any write, truncate (a SETATTR of the size or an O_TRUNC open)
  and chown of a regular file, root's included, as the VFS removes it
  (cap_inode_need_killpriv): with FUSE_HANDLE_KILLPRIV_V2 (encfs.fuse.server) the kernel stops
  asking once it saw a file without it (S_NOSEC), so the daemon removes it (``drop_capability``).
  Only an inode not in ``_no_capability`` costs a backing call; it is in the set afterwards.
- A FIFO, socket or device keeps its xattrs in the backing trusted.* namespace (names.py): Linux
  refuses user.* xattrs on it, and the kernel refuses plaintext user.* ones on it before asking,
  so only security.*, trusted.* and system.* names reach it, and only a root daemon can keep
  them (as ext4 lets root). A symlink keeps EPERM: a bound symlink is a new backing inode after
  each rename or link (symlinks.py), which would drop them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.fuseerrors import fuse_op
from encfs.fuse.names import NameAuthError, NameCipher
from encfs.fuseproto.wire import FuseError, RequestContext

log = logging.getLogger("encfs.fuse")

# The kernel asks for this before a write(2), to drop file capabilities; inodes known not to
# have it are answered from memory.
CAPABILITY_XATTR = b"security.capability"


class XattrOps:
    """getxattr, setxattr, listxattr and removexattr of EncryptedFS."""

    names: NameCipher
    bd: BackingDirs
    padded_xattrs: bool
    _no_capability: set[int]
    _special_inodes: set[int]

    def _target(self, inode: int) -> bytes | int:
        raise NotImplementedError

    def _check_writable(self) -> None:
        raise NotImplementedError

    def _xattr_names(self, name: bytes, inode: int | None = None) -> list[bytes]:
        """Backing names ``name`` may be stored under: the form this filesystem writes first,
        then (padded-xattr-names) the legacy unpadded one, still read (FORMAT.md §6.3). Given
        ``inode``, a FIFO, socket or device has its one trusted.* form (see the invariants)."""
        if inode is not None and not name.startswith(b"user.") and self._special(inode):
            return [self.names.xattr_name(name, special=True)]
        if self.padded_xattrs:
            return [self.names.xattr_name(name, padded=True), self.names.xattr_name(name)]
        return [self.names.xattr_name(name)]

    def _special(self, inode: int) -> bool:
        """A FIFO, socket or device: known from its attributes (fs.py), with no backing call."""
        return inode in self._special_inodes

    def lacks_capability(self, inode: int) -> bool:
        """Whether ``inode`` is known to have no security.capability (answered from memory)."""
        return inode in self._no_capability

    @fuse_op
    def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if name == CAPABILITY_XATTR and self.lacks_capability(inode):
            raise FuseError(errno.ENODATA)
        for backing in self._xattr_names(name, inode):
            try:
                sealed = self._xattr_call(self.bd.getxattr, inode, backing)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue
                raise
            return self.names.decrypt_xattr_value(backing, sealed)
        if name == CAPABILITY_XATTR:
            self._no_capability.add(inode)
        raise FuseError(errno.ENODATA)

    @fuse_op
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext, flags: int = 0) -> None:
        """``flags``: XATTR_CREATE or XATTR_REPLACE, applied to the plaintext name (either of its
        backing forms); a legacy entry is replaced by the padded one."""
        self._check_writable()
        backing, *legacy = self._xattr_names(name, inode)
        self._no_capability.discard(inode)
        if legacy and flags:
            exists = any(self._has_xattr(inode, b) for b in (backing, *legacy))
            if flags & os.XATTR_CREATE and exists:
                raise FuseError(errno.EEXIST)
            if flags & os.XATTR_REPLACE and not exists:
                raise FuseError(errno.ENODATA)
            flags = 0
        self._xattr_call(self.bd.setxattr, inode, backing, self.names.encrypt_xattr_value(backing, value, name),
                         flags)
        for old in legacy:  # after the new one is stored: a crash leaves both, and the new one is read
            self._remove_xattr(inode, old)

    def _has_xattr(self, inode: int, backing: bytes) -> bool:
        return self._xattr_if_present(self.bd.getxattr, inode, backing)

    def _remove_xattr(self, inode: int, backing: bytes) -> bool:
        return self._xattr_if_present(self.bd.removexattr, inode, backing)

    def _xattr_if_present(self, call: Callable[..., object], inode: int, backing: bytes) -> bool:
        """``call`` on the backing xattr ``backing``; False if it does not exist."""
        try:
            self._xattr_call(call, inode, backing)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return False
            raise
        return True

    def drop_capability(self, inode: int) -> None:
        """Remove security.capability (both backing forms) from the regular file ``inode`` before
        it is written, truncated or chowned; nothing to do for an inode known to lack it. A
        backing store without xattrs has none to remove."""
        if inode in self._no_capability:
            return
        for backing in self._xattr_names(CAPABILITY_XATTR):
            try:
                self._remove_xattr(inode, backing)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        self._no_capability.add(inode)

    @fuse_op
    def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        out = []
        for n in self._xattr_call(self.bd.listxattr, inode):
            raw = n.encode()
            if not self.names.is_xattr(raw):
                continue
            try:
                stored = self._xattr_call(self.bd.getxattr, inode, raw) if self.names.is_long_xattr(raw) else None
                plain = self.names.xattr_plain_name(raw, stored)
            except NameAuthError:
                log.error("inode %d: undecryptable xattr name skipped", inode)
                continue
            if plain not in out:  # a set interrupted before the legacy entry was removed: listed once
                out.append(plain)
        return out

    @fuse_op
    def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self._check_writable()
        self._no_capability.discard(inode)
        removed = [self._remove_xattr(inode, b) for b in self._xattr_names(name, inode)]
        if not any(removed):
            raise FuseError(errno.ENODATA)

    def _xattr_call(self, func: Callable[..., Any], inode: int, *args: Any) -> Any:
        return func(self._target(inode), *args)  # BackingDirs: a path is not followed, an fd is the file
