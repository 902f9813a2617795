"""The inode numbers the kernel holds, and the backing paths each names (as gocryptfs's inomap).

encfs reports a backing inode's own number (the backing root's and FUSE's root, 1, trade
places), so a number needs no table to be made; what needs one is the way back: a number
the kernel sends in a request to the backing paths it stands for. A number is remembered
at each lookup that counts (LOOKUP, CREATE, READDIRPLUS entries that went out) and
dropped when the kernel forgets it.

Invariants:
- ``paths[n]`` holds every backing path by which the kernel learnt ``n`` and that still
  names it; a rename rewrites the paths under it, an unlink drops the one path.
- ``lookups[n]`` counts the kernel's references as FUSE defines them; the root is never
  forgotten.
- A number whose backing inode was freed (or replaced) gets a new generation, so that the
  kernel takes a reuse of the number for a new inode.
- An alias is a number the kernel still holds for a symlink that a rename replaced with a
  new backing symlink (bound targets): it names the new one's path until looked up afresh.
- ``held[n]`` is an O_PATH fd of a FIFO, socket, device or directory that lost the last name
  the kernel knew it by while the kernel still held ``n`` (an fd, a cwd): the kernel asks
  about it until it forgets ``n`` (fstat of an unlinked FIFO, fchmod of a removed directory),
  and opens no handle of it that could answer (a FIFO's open is the kernel's own, and a
  directory may be a cwd). The fd also keeps the backing inode, so its number is not reused
  meanwhile. It is closed when the kernel forgets ``n`` (or at unmount).
- Only operations that hold FsServer's namespace lock exclusively (lookups, tree changes,
  FORGET) change the map; operations on one inode (namespace lock shared) only read it, so it
  needs no lock of its own (server.py's lock order).
"""

from __future__ import annotations

import errno
import os

from encfs.fuseproto.wire import ROOT_ID, FuseError


class InodeMap:
    """Numbers the kernel holds -> backing paths, lookup counts, generations, aliases."""

    def __init__(self, root: bytes) -> None:
        self.root_ino = os.lstat(root).st_ino
        self.paths: dict[int, set[bytes]] = {ROOT_ID: {root}}
        self.lookups: dict[int, int] = {ROOT_ID: 1}
        self.generations: dict[int, int] = {}  # inode number -> times it was freed
        self.aliases: set[int] = set()
        self.held: dict[int, int] = {}  # inode number -> O_PATH fd (see the invariants)

    def ino(self, st: os.stat_result) -> int:
        """The number the kernel knows the backing inode ``st`` by."""
        if st.st_ino == self.root_ino:
            return ROOT_ID
        if st.st_ino == ROOT_ID:
            return self.root_ino
        return st.st_ino

    def path(self, inode: int) -> bytes:
        """A backing path of ``inode``; ENOENT if it has none (any more)."""
        paths = self.paths.get(inode)
        if not paths:
            raise FuseError(errno.ENOENT)
        return next(iter(paths))

    def any_path(self, inode: int) -> bytes | None:
        paths = self.paths.get(inode)
        return next(iter(paths)) if paths else None

    def known(self, inode: int) -> bool:
        return inode in self.paths

    def remember(self, inode: int, path: bytes, count: bool = True) -> None:
        """The kernel learnt ``inode`` by ``path`` (``count``: a lookup it will forget)."""
        if inode in self.aliases:  # the number names a backing inode again: the alias is over
            self.aliases.discard(inode)
            self.paths[inode] = {path}  # replaced whole: a reader never sees it with no path
        self.paths.setdefault(inode, set()).add(path)
        if count:
            self.lookups[inode] = self.lookups.get(inode, 0) + 1

    def forget_path(self, inode: int, path: bytes) -> None:
        paths = self.paths.get(inode)
        if paths is not None:
            paths.discard(path)

    def rename_paths(self, old: bytes, new: bytes) -> None:
        """The backing entry ``old`` (and everything under it) is now ``new``."""
        prefix = old + b"/"
        for paths in self.paths.values():
            for p in list(paths):
                if p == old:  # the new path first: a reader never sees the set empty meanwhile
                    paths.add(new)
                    paths.discard(p)
                elif p.startswith(prefix):
                    paths.add(new + p[len(old):])
                    paths.discard(p)

    def swap_paths(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE: what was under ``a`` is under ``b`` and the other way round."""
        tmp = b"\0swap"
        self.rename_paths(a, tmp)
        self.rename_paths(b, a)
        self.rename_paths(tmp, b)

    def forget(self, inode: int, nlookup: int) -> bool:
        """The kernel dropped ``nlookup`` references; True if it holds the number no more."""
        left = self.lookups.get(inode, 0) - nlookup
        if left > 0 or inode == ROOT_ID:
            self.lookups[inode] = max(left, 1 if inode == ROOT_ID else left)
            return False
        self.lookups.pop(inode, None)
        self.aliases.discard(inode)
        return True

    def drop_paths(self, inode: int) -> None:
        self.paths.pop(inode, None)

    def hold(self, inode: int, fd: int) -> None:
        """Keep ``fd`` (O_PATH) to answer for ``inode`` once it has no name (see the invariants)."""
        old = self.held.pop(inode, None)
        if old is not None:
            os.close(old)
        self.held[inode] = fd

    def held_fd(self, inode: int) -> int | None:
        return self.held.get(inode)

    def release_held(self, inode: int) -> None:
        fd = self.held.pop(inode, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for inode in list(self.held):
            self.release_held(inode)

    def generation(self, inode: int) -> int:
        return self.generations.get(inode, 0)

    def new_generation(self, inode: int) -> None:
        """The backing inode behind ``inode`` was freed or replaced: the number may be reused."""
        self.generations[inode] = self.generations.get(inode, 0) + 1

    def alias(self, inode: int) -> None:
        """A rename replaced the symlink ``inode`` with a new backing symlink (see the module docstring)."""
        self.new_generation(inode)
        self.aliases.add(inode)
