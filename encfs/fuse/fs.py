"""The FUSE frontend: plaintext view of a CIPHERDIR (pyfuse3 Operations).

Design:
- FUSE inode numbers are the backing inode numbers (the backing root's
  number and 1 are swapped, since 1 is FUSE's root). Each known inode maps
  to its backing paths; hard links give one inode several paths.
- Every request runs to completion without awaiting, so requests are
  serialised: no two operations interleave on one file.
- Contents go through content.FileContent (per-file data key, sealed 4 KiB
  blocks); names, symlink targets and xattrs through names.NameCipher.
- Anything that fails authentication is logged with its path and answered
  with EIO; wrong bytes are never returned.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat as stat_m
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from encfs.blocks import BlockAuthError, BlockCipher
from encfs.errors import EncfsError
from encfs.fuse.content import HEADER_LEN, FILE_ID_LEN, FileContent, FileHeader, HeaderError
from encfs.fuse.fsconfig import FsConfig, FsKeys
from encfs.fuse.names import (
    DIRID_FILE,
    DIRID_LEN,
    DIRID_XATTR,
    NAME_MAX,
    XATTR_PREFIX,
    NameAuthError,
    NameCipher,
    b64d,
    is_internal,
    is_longname_entry,
    longname_side_file,
)
from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService

log = logging.getLogger("encfs.fuse")

ATTR_TIMEOUT = 1.0
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fuse_op(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a synchronous handler; map failures to errno without leaking details."""

    @functools.wraps(func)
    async def handler(self: EncryptedFS, *args: Any) -> Any:
        try:
            return func(self, *args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except (BlockAuthError, NameAuthError, HeaderError) as e:
            log.error("%s: integrity failure: %s", func.__name__, e)
            raise FUSEError(errno.EIO) from None
        except EncfsError as e:
            log.error("%s: %s", func.__name__, e.message)
            raise FUSEError(errno.EIO) from None

    return handler


@dataclass
class OpenFile:
    inode: int
    fd: int
    content: FileContent | None  # None for O_PATH-like opens of empty headerless files
    writable: bool
    path: bytes


@dataclass
class DirHandle:
    inode: int
    path: bytes
    entries: list[bytes] = field(default_factory=list)


class EncryptedFS(pyfuse3.Operations):
    """pyfuse3 operations over an encfs CIPHERDIR."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, cipherdir: bytes, config: FsConfig, keys: FsKeys, ks: KeyService,
                 read_only: bool = False) -> None:
        super().__init__()
        self.root = os.path.abspath(cipherdir)
        self.config = config
        self.names = NameCipher(keys.name_key, keys.meta_key)
        self.ks = ks
        self.read_only = read_only
        self.key_cache = DataKeyCache(max_age=3600, max_entries=65536)
        self._root_ino = os.lstat(self.root).st_ino
        self._paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {self.root}}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self._dirids: dict[int, bytes] = {pyfuse3.ROOT_INODE: bytes.fromhex(config.fs_id)[:DIRID_LEN]}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    # -- inode and path bookkeeping ---------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        if st.st_ino == self._root_ino:
            return pyfuse3.ROOT_INODE
        if st.st_ino == pyfuse3.ROOT_INODE:
            return self._root_ino
        return st.st_ino

    def _path(self, inode: int) -> bytes:
        paths = self._paths.get(inode)
        if not paths:
            raise FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _remember(self, inode: int, path: bytes, count: bool = True) -> None:
        self._paths.setdefault(inode, set()).add(path)
        if count:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def _forget_path(self, inode: int, path: bytes) -> None:
        paths = self._paths.get(inode)
        if paths is not None:
            paths.discard(path)

    def _rename_paths(self, old: bytes, new: bytes) -> None:
        prefix = old + b"/"
        for paths in self._paths.values():
            for p in list(paths):
                if p == old:
                    paths.discard(p)
                    paths.add(new)
                elif p.startswith(prefix):
                    paths.discard(p)
                    paths.add(new + p[len(old):])

    def _next_handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _check_writable(self) -> None:
        if self.read_only:
            raise FUSEError(errno.EROFS)

    # -- names --------------------------------------------------------------------

    def _dirid(self, inode: int) -> bytes:
        dirid = self._dirids.get(inode)
        if dirid is not None:
            return dirid
        path = self._path(inode)
        try:
            with open(os.path.join(path, DIRID_FILE), "rb") as f:
                dirid = f.read(DIRID_LEN + 1)
        except FileNotFoundError:
            dirid = b""
        if len(dirid) != DIRID_LEN:
            try:  # the copy in the backing directory's xattr
                dirid = os.getxattr(path, DIRID_XATTR)
            except OSError:
                dirid = b""
        if len(dirid) != DIRID_LEN:
            if any(not is_internal(n) or is_longname_entry(n) for n in os.listdir(path)):
                log.error("directory %r lost its id: its entries cannot be decrypted", path)
                raise FUSEError(errno.EIO)
            dirid = self._write_dirid(path)  # an empty directory from an interrupted mkdir
        self._dirids[inode] = dirid
        return dirid

    def _write_dirid(self, path: bytes) -> bytes:
        dirid = os.urandom(DIRID_LEN)
        tmp = os.path.join(path, DIRID_FILE + b".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            os.write(fd, dirid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(path, DIRID_FILE))
        try:
            os.setxattr(path, DIRID_XATTR, dirid)
        except OSError:
            pass  # the file copy suffices where xattrs are unsupported
        return dirid

    def _child(self, parent: int, name: bytes) -> tuple[bytes, bytes | None]:
        """(backing path, long-name side-file content or None) of ``name`` in ``parent``."""
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if name in (b".", b"..") or not name:
            raise FUSEError(errno.EINVAL)
        encoded = self.names.encrypt_name(name, self._dirid(parent))
        entry, side = self.names.backing_entry(encoded)
        return os.path.join(self._path(parent), entry), side

    def _write_side(self, path: bytes, side: bytes | None) -> None:
        if side is None:
            return
        side_path = longname_side_file(path)
        fd = os.open(side_path + b".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        try:
            os.write(fd, side)
        finally:
            os.close(fd)
        os.replace(side_path + b".tmp", side_path)

    def _remove_side(self, path: bytes, side: bytes | None) -> None:
        if side is not None:
            try:
                os.unlink(longname_side_file(path))
            except FileNotFoundError:
                pass

    def _plain_name(self, dir_path: bytes, dirid: bytes, entry: bytes) -> bytes:
        encoded = entry
        if is_longname_entry(entry):
            with open(longname_side_file(os.path.join(dir_path, entry)), "rb") as f:
                encoded = f.read()
        return self.names.decrypt_name(encoded, dirid)

    # -- attributes -----------------------------------------------------------------

    def _attrs(self, st: os.stat_result, inode: int | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode if inode is not None else self._ino(st)
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        if stat_m.S_ISREG(st.st_mode):
            from encfs.fuse.content import plain_file_size

            e.st_size = plain_file_size(st.st_size)
        elif stat_m.S_ISLNK(st.st_mode):
            e.st_size = max(0, len(b64d(b"A" * st.st_size)) - 28)
        else:
            e.st_size = st.st_size
        e.st_blksize = 4096
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _entry(self, path: bytes, count: bool = True) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        inode = self._ino(st)
        self._remember(inode, path, count)
        return self._attrs(st, inode)

    # -- per-file keys --------------------------------------------------------------

    def _new_file_header(self) -> tuple[bytes, BlockCipher]:
        file_id = os.urandom(FILE_ID_LEN)
        dk = self.ks.generate_data_key(self.config.key_id, self.config.file_context(file_id))
        assert dk.plaintext is not None
        return FileHeader(file_id, dk.ciphertext_blob).pack(), BlockCipher(dk.plaintext, file_id)

    def _cipher_for(self, fd: int, path: bytes) -> BlockCipher | None:
        """The BlockCipher of an existing file, or None if it has no header yet."""
        raw = os.pread(fd, HEADER_LEN, 0)
        if not raw:
            return None
        header = FileHeader.parse(raw)
        key = self.ks.decrypt(header.wrapped_key, self.config.file_context(header.file_id),
                              key=self.config.key_id, cache=self.key_cache).plaintext
        return BlockCipher(key, header.file_id)

    def _content(self, fd: int, path: bytes, create_header: bool) -> FileContent | None:
        cipher = self._cipher_for(fd, path)
        if cipher is None:
            if not create_header:
                return None
            header, cipher = self._new_file_header()
            os.pwrite(fd, header, 0)

        def report(block_no: int) -> None:
            log.error("%r: block %d failed authentication", path, block_no)

        return FileContent(fd, cipher, report)

    # -- lookups and attributes ---------------------------------------------------------

    @fuse_op
    def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path, _side = self._child(parent_inode, name)
        try:
            return self._entry(path)
        except FileNotFoundError:
            raise FUSEError(errno.ENOENT) from None

    @fuse_op
    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            left = self._lookups.get(inode, 0) - nlookup
            if left > 0 or inode == pyfuse3.ROOT_INODE:
                self._lookups[inode] = max(left, 1 if inode == pyfuse3.ROOT_INODE else left)
                continue
            self._lookups.pop(inode, None)
            if not any(f.inode == inode for f in self._files.values()):
                self._paths.pop(inode, None)
                self._dirids.pop(inode, None)

    @fuse_op
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        for f in self._files.values():
            if f.inode == inode:  # works after unlink too
                return self._attrs(os.fstat(f.fd), inode)
        return self._attrs(os.lstat(self._path(inode)), inode)

    @fuse_op
    def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path = self._path(inode)
        if fields.update_size:
            if fh is not None and fh in self._files and self._files[fh].content is not None:
                self._files[fh].content.truncate(attr.st_size)  # type: ignore[union-attr]
            else:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    content = self._content(fd, path, create_header=attr.st_size > 0)
                    if content is not None:
                        content.truncate(attr.st_size)
                finally:
                    os.close(fd)
        if fields.update_mode:
            if not stat_m.S_ISLNK(os.lstat(path).st_mode):
                os.chmod(path, stat_m.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(os.lstat(path), inode)

    @fuse_op
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.names.decrypt_symlink(os.readlink(self._path(inode)))

    @fuse_op
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail"):
            setattr(out, name, getattr(sv, name))
        out.f_namemax = NAME_MAX
        return out

    # -- directories ------------------------------------------------------------------------

    @fuse_op
    def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        self._dirid(inode)
        entries = sorted(n for n in os.listdir(path) if not is_internal(n) or is_longname_entry(n))
        fh = self._next_handle()
        self._dirs[fh] = DirHandle(inode, path, entries)
        return fh

    @fuse_op
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        dirid = self._dirid(d.inode)
        for i in range(start_id, len(d.entries)):
            entry = d.entries[i]
            child = os.path.join(d.path, entry)
            try:
                name = self._plain_name(d.path, dirid, entry)
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed since opendir
            except (NameAuthError, OSError) as e:
                log.error("%r: skipping undecryptable entry: %s", child, e)
                continue
            inode = self._ino(st)
            if not pyfuse3.readdir_reply(token, name, self._attrs(st, inode), i + 1):
                return
            self._remember(inode, child)

    @fuse_op
    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_op
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._dirs[fh].path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @fuse_op
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        if os.path.lexists(path):
            raise FUSEError(errno.EEXIST)
        self._write_side(path, side)
        try:
            os.mkdir(path, stat_m.S_IMODE(mode))
        except BaseException:
            self._remove_side(path, side)
            raise
        self._write_dirid(path)
        os.chown(path, ctx.uid, ctx.gid)
        os.chmod(path, stat_m.S_IMODE(mode))
        return self._entry(path)

    def _is_plain_empty(self, path: bytes) -> bool:
        return all(is_internal(n) and not is_longname_entry(n) for n in os.listdir(path))

    @fuse_op
    def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        st = os.lstat(path)
        if not stat_m.S_ISDIR(st.st_mode):
            raise FUSEError(errno.ENOTDIR)
        if not self._is_plain_empty(path):
            raise FUSEError(errno.ENOTEMPTY)
        self._remove_internal(path)
        os.rmdir(path)
        self._remove_side(path, side)
        inode = self._ino(st)
        self._forget_path(inode, path)
        self._dirids.pop(inode, None)

    def _remove_internal(self, dir_path: bytes) -> None:
        for n in os.listdir(dir_path):
            if is_internal(n) and not is_longname_entry(n):
                os.unlink(os.path.join(dir_path, n))

    # -- entries ------------------------------------------------------------------------------

    @fuse_op
    def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        st = os.lstat(path)
        if stat_m.S_ISDIR(st.st_mode):
            raise FUSEError(errno.EISDIR)
        os.unlink(path)
        self._remove_side(path, side)
        self._forget_path(self._ino(st), path)

    @fuse_op
    def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        self._write_side(path, side)
        try:
            os.symlink(self.names.encrypt_symlink(target), path)
        except BaseException:
            if not os.path.lexists(path):
                self._remove_side(path, side)
            raise
        os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        return self._entry(path)

    @fuse_op
    def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path, side = self._child(new_parent_inode, new_name)
        self._write_side(path, side)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except BaseException:
            if not os.path.lexists(path):
                self._remove_side(path, side)
            raise
        return self._entry(path)

    @fuse_op
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        self._write_side(path, side)
        try:
            os.mknod(path, mode, rdev)
        except BaseException:
            if not os.path.lexists(path):
                self._remove_side(path, side)
            raise
        os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        return self._entry(path)

    @fuse_op
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
               flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        old, old_side = self._child(parent_inode_old, name_old)
        new, new_side = self._child(parent_inode_new, name_new)
        st_old = os.lstat(old)
        if flags & pyfuse3.RENAME_EXCHANGE:
            os.lstat(new)
            _renameat2(old, new, flags)  # names stay where they are; side files stay valid
            ino_new = self._ino(os.lstat(old))
            self._swap_paths(self._ino(st_old), ino_new, old, new)
            return
        if old == new:
            return
        replaced: os.stat_result | None = None
        try:
            replaced = os.lstat(new)
        except FileNotFoundError:
            pass
        if replaced is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if stat_m.S_ISDIR(replaced.st_mode):
                if not stat_m.S_ISDIR(st_old.st_mode):
                    raise FUSEError(errno.EISDIR)
                if not self._is_plain_empty(new):
                    raise FUSEError(errno.ENOTEMPTY)
            elif stat_m.S_ISDIR(st_old.st_mode):
                raise FUSEError(errno.ENOTDIR)
        if stat_m.S_ISDIR(st_old.st_mode) and (new + b"/").startswith(old + b"/"):
            raise FUSEError(errno.EINVAL)
        self._write_side(new, new_side)
        if replaced is not None and stat_m.S_ISDIR(replaced.st_mode):
            self._remove_internal(new)  # the target is empty in plaintext: drop its bookkeeping
        try:
            if flags & pyfuse3.RENAME_NOREPLACE:
                _renameat2(old, new, flags)
            else:
                os.rename(old, new)
        except BaseException:
            if replaced is not None and stat_m.S_ISDIR(replaced.st_mode) and os.path.isdir(new):
                self._write_dirid(new)
            raise
        self._remove_side(old, old_side)
        if replaced is not None:
            self._forget_path(self._ino(replaced), new)
        self._rename_paths(old, new)

    def _swap_paths(self, ino_a: int, ino_b: int, a: bytes, b: bytes) -> None:
        tmp = b"\0swap"
        self._rename_paths(a, tmp)
        self._rename_paths(b, a)
        self._rename_paths(tmp, b)
        del ino_a, ino_b

    # -- files --------------------------------------------------------------------------------

    def _open_handle(self, inode: int, path: bytes, fd: int, content: FileContent | None,
                     writable: bool) -> int:
        fh = self._next_handle()
        self._files[fh] = OpenFile(inode, fd, content, writable, path)
        return fh

    @fuse_op
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable()
        path, side = self._child(parent_inode, name)
        self._write_side(path, side)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         stat_m.S_IMODE(mode))
        except BaseException:
            if not os.path.lexists(path):
                self._remove_side(path, side)
            raise
        try:
            os.fchown(fd, ctx.uid, ctx.gid)
            content = self._content(fd, path, create_header=True)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            self._remove_side(path, side)
            raise
        attrs = self._entry(path)
        fh = self._open_handle(attrs.st_ino, path, fd, content, True)
        return pyfuse3.FileInfo(fh=fh), attrs

    @fuse_op
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        accmode = flags & os.O_ACCMODE
        writable = accmode != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._check_writable()
        path = self._path(inode)
        backing_flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, backing_flags)
        try:
            content = self._content(fd, path, create_header=writable)
            if flags & os.O_TRUNC and content is not None:
                content.truncate(0)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=self._open_handle(inode, path, fd, content, writable))

    @fuse_op
    def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files[fh]
        if f.content is None:
            return b""
        try:
            return f.content.read(off, size)
        except BlockAuthError:
            log.error("%r: read at %d failed authentication", f.path, off)
            raise FUSEError(errno.EIO) from None

    @fuse_op
    def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._files[fh]
        if f.content is None:
            raise FUSEError(errno.EBADF)
        return f.content.write(off, buf)

    @fuse_op
    def flush(self, fh: int) -> None:
        return None

    @fuse_op
    def fsync(self, fh: int, datasync: bool) -> None:
        f = self._files[fh]
        (os.fdatasync if datasync else os.fsync)(f.fd)

    @fuse_op
    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            os.close(f.fd)

    # -- xattrs ---------------------------------------------------------------------------------

    @fuse_op
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        backing = self.names.xattr_name(name)
        try:
            sealed = os.getxattr(self._path(inode), backing, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise
        return self.names.decrypt_xattr_value(backing, sealed)

    @fuse_op
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        backing = self.names.xattr_name(name)
        os.setxattr(self._path(inode), backing, self.names.encrypt_xattr_value(backing, value),
                    follow_symlinks=False)

    @fuse_op
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        out = []
        for n in os.listxattr(self._path(inode), follow_symlinks=False):
            raw = n.encode()
            if raw.startswith(XATTR_PREFIX):
                try:
                    out.append(self.names.xattr_plain_name(raw))
                except NameAuthError:
                    log.error("%r: undecryptable xattr name skipped", self._path(inode))
        return out

    @fuse_op
    def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_writable()
        try:
            os.removexattr(self._path(inode), self.names.xattr_name(name), follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise
