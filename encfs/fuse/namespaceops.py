"""Operations that change the tree: mkdir, rmdir, unlink, symlink, link, mknod and rename
(with RENAME_EXCHANGE, RENAME_NOREPLACE and RENAME_WHITEOUT). A mixin of EncryptedFS (fs.py,
whose design notes hold for these too): the operations only, over its backing store
(``bd``), directory ids (``dirids``), symlink targets (``links``), inode map and open files.

Invariants:
- Each operation runs alone (the server holds its namespace lock exclusively).
- A long name's side file is written before its backing entry and removed after it; an
  operation that fails leaves neither behind, and its names are forgotten by the kernel
  (``changes_names``, stalenames.py).
- A directory moves through its two id copies one at a time (dirids.py): at every instant
  one copy authenticates for its current place.
- A removed or replaced backing inode gets a new generation (its number may be reused).
- A FIFO, socket, device or directory that loses the last name the kernel knows it by, while
  the kernel holds its number, is kept by an O_PATH fd taken before the removal (``_holding``,
  inomap.py's ``held``); a removal that fails closes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_m
from collections.abc import Iterator

from encfs.diskio import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from encfs.fuse.backingdirs import BackingDirs
from encfs.fuse.dirids import DirIds, plain_empty
from encfs.fuse.fuseerrors import fuse_op
from encfs.fuse.inomap import InodeMap
from encfs.fuse.names import SYMLINK_MAX, is_internal, is_longname_entry
from encfs.fuse.openfiles import OpenFiles
from encfs.fuse.stalenames import changes_names
from encfs.fuse.symlinks import Symlinks
from encfs.fuseproto.wire import EntryAttributes, FuseError, RequestContext


class NamespaceOps:
    """mkdir, rmdir, unlink, symlink, link, mknod and rename of EncryptedFS."""

    bd: BackingDirs
    dirids: DirIds
    _dirids: dict[int, bytes]
    inodes: InodeMap
    files: OpenFiles
    links: Symlinks
    _no_capability: set[int]

    def _check_writable(self) -> None:
        raise NotImplementedError

    def _child(self, parent: int, name: bytes) -> tuple[bytes, bytes | None]:
        raise NotImplementedError

    def _write_side(self, path: bytes, side: bytes | None) -> None:
        raise NotImplementedError

    def _remove_side(self, path: bytes, side: bytes | None) -> None:
        raise NotImplementedError

    def _dirid(self, inode: int) -> bytes:
        raise NotImplementedError

    def _dirid_at(self, path: bytes) -> bytes:
        raise NotImplementedError

    def _entry(self, path: bytes, count: bool = True) -> EntryAttributes:
        raise NotImplementedError

    def _ino(self, st: os.stat_result) -> int:
        raise NotImplementedError

    def _path(self, inode: int) -> bytes:
        raise NotImplementedError

    def _last_link_target(self, path: bytes, st: os.stat_result) -> bytes | None:
        """The backing target of ``path`` if it is the last link of a symlink."""
        if stat_m.S_ISLNK(st.st_mode) and st.st_nlink == 1:
            return self.bd.readlink(path)
        return None

    @changes_names((0, 1))
    @fuse_op
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        if self.bd.lexists(path):
            raise FuseError(errno.EEXIST)
        self._write_side(path, side)
        try:
            self.bd.mkdir(path, stat_m.S_IMODE(mode))
        except BaseException:
            self._remove_side(path, side)
            raise
        dirid = self.dirids.create(path, self._dirid(parent_inode), fresh=True)
        uid, gid, sgid = self._owner(path, ctx)
        self.bd.chown(path, uid, gid)
        self.bd.chmod(path, stat_m.S_IMODE(mode) | sgid)
        attrs = self._entry(path)
        self._dirids[attrs.st_ino] = dirid  # replaces whatever a freed inode of that number left
        return attrs

    def _owner(self, path: bytes, ctx: RequestContext) -> tuple[int, int, int]:
        """(uid, gid, extra directory mode bits) for the new entry ``path``: the caller's, but in a
        set-group-ID directory the directory's group (and S_ISGID for a new directory), as on a
        local filesystem."""
        parent = self.bd.lstat(os.path.dirname(path))
        if parent.st_mode & stat_m.S_ISGID:
            return ctx.uid, parent.st_gid, stat_m.S_ISGID
        return ctx.uid, ctx.gid, 0

    @changes_names((0, 1))
    @fuse_op
    def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        st = self.bd.lstat(path)
        if not stat_m.S_ISDIR(st.st_mode):
            raise FuseError(errno.ENOTDIR)
        if not plain_empty(self.bd.listdir(path)):
            raise FuseError(errno.ENOTEMPTY)
        self._remove_internal(path)
        with self._holding(path, st):
            self.bd.rmdir(path)
        self._remove_side(path, side)
        self._removed(st, path)

    @contextlib.contextmanager
    def _holding(self, path: bytes, st: os.stat_result | None) -> Iterator[None]:
        """Around the removal of ``path`` (stat ``st``; None: nothing is there to remove): takes the
        O_PATH fd to hold for it, if it needs one (see the invariants), and gives it to the inode map
        as soon as the removal is done, so that a later step that fails cannot leave it unowned;
        closed if the removal fails."""
        fd = None
        inode = self._ino(st) if st is not None else 0
        if (st is not None and not (stat_m.S_ISREG(st.st_mode) or stat_m.S_ISLNK(st.st_mode))
                and self.inodes.lookups.get(inode)
                and not self.inodes.paths.get(inode, set()) - {path}):
            fd = self.bd.at(path, lambda d, n: os.open(n, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d))
        try:
            yield
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self.inodes.hold(inode, fd)

    def _removed(self, st: os.stat_result, path: bytes) -> None:
        """Bookkeeping after the backing entry ``path`` (stat ``st``) was removed or replaced."""
        inode = self._ino(st)
        self.inodes.forget_path(inode, path)
        if stat_m.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            # The backing inode is freed (or will be, at its last close) and its number may be
            # reused: a new generation tells the kernel the number now names a new inode.
            self.inodes.new_generation(inode)
            self._dirids.pop(inode, None)
            self._no_capability.discard(inode)
            if stat_m.S_ISREG(st.st_mode):
                self.files.unlinked(inode, path)

    def _remove_internal(self, dir_path: bytes) -> None:
        for n in self.bd.listdir(dir_path):
            if is_internal(n) and not is_longname_entry(n):
                self.bd.unlink(os.path.join(dir_path, n))

    # -- entries ------------------------------------------------------------------------------

    @changes_names((0, 1))
    @fuse_op
    def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        st = self.bd.lstat(path)
        if stat_m.S_ISDIR(st.st_mode):
            raise FuseError(errno.EISDIR)
        last_target = self._last_link_target(path, st)
        state = self._last_link_state_file(path, st)
        with self._holding(path, st):
            self.bd.unlink(path)
        if state is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state)
        self._remove_side(path, side)
        self.links.drop(last_target)
        self._removed(st, path)

    @changes_names((0, 1))
    @fuse_op
    def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext) -> EntryAttributes:
        self._check_writable()
        if len(target) > SYMLINK_MAX:
            raise FuseError(errno.ENAMETOOLONG)
        path, side = self._child(parent_inode, name)
        stored = self.links.seal(target, self._dirid(parent_inode), os.path.basename(path))
        self._write_side(path, side)
        try:
            self.bd.symlink(stored, path)
        except BaseException:
            if not self.bd.lexists(path):
                self._remove_side(path, side)
            self.links.drop(stored)
            raise
        uid, gid, _ = self._owner(path, ctx)
        self.bd.chown(path, uid, gid)
        return self._entry(path)

    @changes_names((1, 2))
    @fuse_op
    def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext) -> EntryAttributes:
        self._check_writable()
        path, side = self._child(new_parent_inode, new_name)
        src = self._path(inode)
        st = self.bd.lstat(src)
        bound_link = stat_m.S_ISLNK(st.st_mode) and self.links.write_bound
        if bound_link and self.bd.lexists(path):
            raise FuseError(errno.EEXIST)
        self._write_side(path, side)
        try:
            if bound_link:
                # A bound target authenticates at one place only: the new name gets a symlink of
                # its own (FORMAT.md §6.3), with the same target, owner and times.
                target = self.links.read(src, self._dirid_at(os.path.dirname(src)))
                self.links.place_copy(target, path, self._dirid(new_parent_inode), st,
                                      lambda tmp, dest: self.bd.rename(tmp, dest, RENAME_NOREPLACE))
            else:
                self.bd.link(src, path)
        except BaseException:
            if not self.bd.lexists(path):
                self._remove_side(path, side)
            raise
        return self._entry(path)

    @changes_names((0, 1))
    @fuse_op
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext) -> EntryAttributes:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        self._write_side(path, side)
        try:
            self.bd.mknod(path, mode, rdev)
        except BaseException:
            if not self.bd.lexists(path):
                self._remove_side(path, side)
            raise
        uid, gid, _ = self._owner(path, ctx)
        self.bd.chown(path, uid, gid)
        self.bd.chmod(path, stat_m.S_IMODE(mode))  # the daemon's umask must not apply
        return self._entry(path)

    @changes_names((0, 1), (2, 3))
    @fuse_op
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
               flags: int, ctx: RequestContext) -> None:
        self._check_writable()
        old, old_side = self._child(parent_inode_old, name_old)
        new, new_side = self._child(parent_inode_new, name_new)
        st_old = self.bd.lstat(old)
        if flags & RENAME_EXCHANGE:
            self._exchange(old, new, st_old, parent_inode_old, parent_inode_new, flags)
            return
        if old == new:
            return
        replaced: os.stat_result | None = None
        try:
            replaced = self.bd.lstat(new)
        except FileNotFoundError:
            pass
        if replaced is not None:
            if flags & RENAME_NOREPLACE:
                raise FuseError(errno.EEXIST)
            if stat_m.S_ISDIR(replaced.st_mode):
                if not stat_m.S_ISDIR(st_old.st_mode):
                    raise FuseError(errno.EISDIR)
                if not plain_empty(self.bd.listdir(new)):
                    raise FuseError(errno.ENOTEMPTY)
            elif stat_m.S_ISDIR(st_old.st_mode):
                raise FuseError(errno.ENOTDIR)
        if stat_m.S_ISDIR(st_old.st_mode) and (new + b"/").startswith(old + b"/"):
            raise FuseError(errno.EINVAL)
        replaced_target = self._last_link_target(new, replaced) if replaced is not None else None
        old_dirid = self._dirid_at(old) if stat_m.S_ISDIR(st_old.st_mode) else None
        new_parent_dirid = self._dirid(parent_inode_new)
        moved_link = stat_m.S_ISLNK(st_old.st_mode) and self.links.write_bound
        link_target = self.links.read(old, self._dirid(parent_inode_old)) if moved_link else None
        old_stored = self.bd.readlink(old) if moved_link else None
        self._write_side(new, new_side)
        if replaced is not None and stat_m.S_ISDIR(replaced.st_mode):
            self._remove_internal(new)  # the target is empty in plaintext: drop its bookkeeping
        if old_dirid is not None:  # its second id copy is sealed for the new place first (dirids.py)
            self.dirids.before_move(old, old_dirid, new_parent_dirid, os.path.basename(new))

        def backing_rename(src: bytes, dest: bytes, whiteout: int = 0) -> None:
            self.bd.rename(src, dest, (flags & RENAME_NOREPLACE) | whiteout)

        # RENAME_WHITEOUT (overlayfs): the backing rename leaves the whiteout, a 0/0 character
        # device, under the old backing name, which the old plaintext name (and side file) names.
        whiteout = flags & RENAME_WHITEOUT
        # the replaced entry is kept while the kernel holds it (_holding)
        with self._holding(new, replaced):
            try:
                if link_target is not None:  # a new backing symlink sealed for the new place (symlinks.py)
                    self.links.place_copy(link_target, new, new_parent_dirid, st_old, backing_rename)
                    if whiteout:
                        self.bd.mknod(old + b".wh.tmp", stat_m.S_IFCHR, 0)
                        self.bd.rename(old + b".wh.tmp", old)
                    else:
                        self.bd.unlink(old)
                else:
                    backing_rename(old, new, whiteout)
            except BaseException:
                if replaced is not None and stat_m.S_ISDIR(replaced.st_mode) and self.bd.isdir(new):
                    self.dirids.create(new, new_parent_dirid)
                if old_dirid is not None and self.bd.isdir(old):
                    self.dirids.after_move(old, old_dirid, self._dirid(parent_inode_old))
                raise
        if old_dirid is not None:
            self.dirids.after_move(new, old_dirid, new_parent_dirid)
        if not whiteout:  # else the whiteout keeps the old name
            self._remove_side(old, old_side)
        if link_target is not None:
            if st_old.st_nlink <= 1:
                self.links.drop(old_stored)
            self._moved_link(st_old)
        if replaced is not None:
            self.links.drop(replaced_target)
            self._removed(replaced, new)
        self.inodes.rename_paths(old, new)

    def _last_link_state_file(self, path: bytes, st: os.stat_result) -> bytes | None:
        """On a backing store without user xattrs: the state file of the regular file ``path``
        if this is its last link and no handle holds it (else the file lives on: an open file's
        state file goes with the next recovery scan's orphans)."""
        if not (self.files.state_in_file and stat_m.S_ISREG(st.st_mode) and st.st_nlink == 1) \
                or self.files.is_open(self._ino(st)):
            return None
        fd = self.bd.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return self.files.state_file_of(fd)
        finally:
            os.close(fd)

    def _moved_link(self, st: os.stat_result) -> None:
        """A rename replaced the symlink ``st`` with a new backing symlink: the kernel keeps its
        old number for the new name until it looks the name up again (an alias, inomap.py);
        the backing filesystem may reuse the number, hence a new generation."""
        self.inodes.alias(self._ino(st))

    def _exchange(self, old: bytes, new: bytes, st_old: os.stat_result, parent_old: int, parent_new: int,
                  flags: int) -> None:
        """RENAME_EXCHANGE: names stay where they are (side files stay valid); directory ids are
        resealed around the exchange as for a rename. A bound symlink cannot move atomically with
        another entry (it is a new backing symlink at its new place): EINVAL, as a filesystem
        without RENAME_EXCHANGE answers, so callers fall back to a plain rename."""
        st_new = self.bd.lstat(new)
        if self.links.write_bound and (stat_m.S_ISLNK(st_old.st_mode) or stat_m.S_ISLNK(st_new.st_mode)):
            raise FuseError(errno.EINVAL)
        if old == new:
            return
        parent_old_id, parent_new_id = self._dirid(parent_old), self._dirid(parent_new)
        moves = []  # (path before, path after, dirid, parent id before, parent id after)
        if stat_m.S_ISDIR(st_old.st_mode):
            moves.append((old, new, self._dirid_at(old), parent_old_id, parent_new_id))
        if stat_m.S_ISDIR(st_new.st_mode):
            moves.append((new, old, self._dirid_at(new), parent_new_id, parent_old_id))
        for before, after, dirid, _, to_parent in moves:
            self.dirids.before_move(before, dirid, to_parent, os.path.basename(after))
        try:
            self.bd.rename(old, new, flags)
        except BaseException:
            for before, _, dirid, from_parent, _ in moves:
                self.dirids.after_move(before, dirid, from_parent)
            raise
        for _, after, dirid, _, to_parent in moves:
            self.dirids.after_move(after, dirid, to_parent)
        self.inodes.swap_paths(old, new)
