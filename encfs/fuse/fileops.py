"""Operations on regular files and their contents: create, open, read (reader, then read_open),
seal_ahead, write, fallocate, lseek, fsync and release, and the truncation of a SETATTR. A mixin
of EncryptedFS (fs.py, whose design notes hold for these too): the operations only, over its
open files (``files``, openfiles.py), its backing store (``bd``) and its inode targets.

Invariants:
- A backing file is opened read-write for any write access (a partial-block write reads and
  reseals), never through a symlink; one with no name left is reopened through the fd of an
  open handle.
- A writable open loads the file's content, so a damaged header, key or journal fails the open;
  a read-only one checks the CMK and leaves the rest to the first read (openload.py); an O_TRUNC
  open drops the content instead.
- A create that fails leaves neither its backing entry nor its long-name side file behind, and
  its name is forgotten by the kernel (``changes_names``, stalenames.py).
- A read that fails authentication is logged with the plaintext path and answered with EIO.
- seal_ahead changes nothing; write uses what it sealed only while the file's sealer is still
  the one that sealed it.
- security.capability and the set-id bits go as the VFS removes them (xattrops.py): on a
  truncate, and on a write when the kernel leaves that to the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_m
from typing import TYPE_CHECKING

from encfs import daemonlog
from encfs.blocks import OVERHEAD, BlockAuthError
from encfs.fuse import sparse
from encfs.fuse.backingtimes import open_quiet
from encfs.fuse.content import FileContent, prefetch, whole_blocks
from encfs.fuse.fileheader import HEADER_LEN
from encfs.fuse.fuseerrors import fuse_op, reraise_as_errno
from encfs.fuse.openfiles import OpenFile
from encfs.fuse.stalenames import changes_names
from encfs.fuseproto.wire import EntryAttributes, FuseError, RequestContext
from encfs.sealing import Sealer
from encfs.sealworker import WORKER_MIN_BYTES

if TYPE_CHECKING:
    from encfs.fuse.backingdirs import BackingDirs
    from encfs.fuse.inomap import InodeMap
    from encfs.fuse.openfiles import OpenFiles

log = logging.getLogger("encfs.fuse")


class FileOps:
    """create, open, read, write, fallocate, lseek, fsync and release of EncryptedFS."""

    if TYPE_CHECKING:  # defined by EncryptedFS (fs.py) and its other mixins
        files: OpenFiles
        bd: BackingDirs
        inodes: InodeMap
        block_size: int
        _sizes: dict[int, int]
        _no_capability: set[int]
        _euid: int
        _egid: int
        _umask: int

        def _check_writable(self) -> None: ...
        def _target(self, inode: int) -> bytes | int: ...
        def _ino(self, st: os.stat_result) -> int: ...
        def _child(self, parent: int, name: bytes) -> tuple[bytes, bytes | None]: ...
        def _write_side(self, path: bytes, side: bytes | None) -> None: ...
        def _remove_side(self, path: bytes, side: bytes | None) -> None: ...
        def _entry(self, path: bytes, count: bool = True, st: os.stat_result | None = None) -> EntryAttributes: ...
        def _owner(self, path: bytes, ctx: RequestContext) -> tuple[int, int, int]: ...
        def drop_capability(self, inode: int) -> None: ...
        def plain_path(self, backing: bytes) -> str: ...

    def _open_backing(self, target: bytes | int, writable: bool, noatime: bool, extra: int = 0,
                      mode: int = 0o600) -> int:
        """Open a backing file (a path, or the fd of a handle whose file has no name left).

        Backing files are opened read-write for any write access, because
        partial-block writes read and reseal. ``noatime`` (the user asked for
        write-only access) keeps those internal reads from updating atime.
        """
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | extra
        if isinstance(target, bytes):
            flags |= os.O_NOFOLLOW
        if noatime:
            return open_quiet(lambda f: self.bd.open(target, f, mode), flags)
        return self.bd.open(target, flags, mode)

    def _describe(self, target: bytes | int) -> bytes:
        return target if isinstance(target, bytes) else b"<unlinked fd %d>" % target

    @changes_names((0, 1))
    @fuse_op
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: RequestContext) -> tuple[int, EntryAttributes]:
        """(file handle, attributes) of a new, open, empty file."""
        self._check_writable()
        path, side = self._child(parent_inode, name)
        self._write_side(path, side)
        try:
            fd = self._open_backing(path, writable=True, noatime=flags & os.O_ACCMODE == os.O_WRONLY,
                                    extra=os.O_CREAT | os.O_EXCL, mode=stat_m.S_IMODE(mode))
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            return self._open_existing(path, flags, ctx)
        except BaseException:
            if not self.bd.lexists(path):
                self._remove_side(path, side)
            raise
        fh = None
        try:
            uid, gid, sgid = self._owner(path, ctx)
            if uid != self._euid or not (sgid or gid == self._egid):  # else open() gave it that owner
                os.fchown(fd, uid, gid)
            if stat_m.S_IMODE(mode) & (self._umask | 0o7000):  # the daemon's umask must not apply
                os.fchmod(fd, stat_m.S_IMODE(mode))
            inode = self._ino(os.fstat(fd))
            fh = self.files.add(OpenFile(inode, fd, True, path))
            self.files.renew(self.files[fh], new_file=True)
        except BaseException:
            if fh is not None:
                self.files.release(fh)
            else:
                os.close(fd)
            self.bd.unlink(path)
            self._remove_side(path, side)
            raise
        attrs = self._entry(path, st=os.fstat(fd))  # the header is written: as lstat(path) would say
        self._no_capability.add(attrs.st_ino)
        return fh, attrs

    def _open_existing(self, path: bytes, flags: int, ctx: RequestContext) -> tuple[int, EntryAttributes]:
        """CREATE without O_EXCL of a name that exists after all (the kernel took it for absent: a
        negative entry it keeps, and the name made meanwhile behind the mount or by an operation
        that failed half-way): open(2) opens that file, as on a local filesystem."""
        attrs = self._entry(path, count=False)
        if stat_m.S_ISDIR(attrs.st_mode):
            raise FuseError(errno.EISDIR)
        if not stat_m.S_ISREG(attrs.st_mode):
            raise FuseError(errno.EEXIST)
        fh = self.open(attrs.st_ino, flags & ~os.O_CREAT, ctx)
        self.inodes.remember(attrs.st_ino, path, True)  # CREATE's reply is a lookup
        if flags & os.O_TRUNC:
            attrs = self._entry(path, count=False)
        return fh, attrs

    @fuse_op
    def open(self, inode: int, flags: int, ctx: RequestContext, kill_suidgid: bool = False) -> int:
        """A handle of ``inode``. An O_TRUNC open truncates, and so drops security.capability, and
        with ``kill_suidgid`` (FUSE_OPEN_KILL_SUIDGID) S_ISUID, and S_ISGID with group execute."""
        accmode = flags & os.O_ACCMODE
        writable = accmode != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._check_writable()
        target = self._target(inode)
        # open(O_RDONLY | O_TRUNC) truncates on Linux (the kernel checked write access for it): the
        # backing file is opened for writing then, the handle stays read-only.
        fd = self._open_backing(target, writable or bool(flags & os.O_TRUNC), noatime=accmode == os.O_WRONLY)
        f = OpenFile(inode, fd, writable, self._describe(target))
        fh = self.files.add(f)
        try:
            if flags & os.O_TRUNC:
                self.files.drop(inode, fd, self._describe(target))
                if kill_suidgid:
                    self._kill_suidgid(fd)
                self.drop_capability(inode)
            elif writable or inode in self.files.contents or not self.files.defer_load(f, self._sizes.get(inode)):
                self.files.content(f, self._sizes.get(inode))  # a damaged file fails the open
            else:
                # Loaded at the first read (which reports a damaged header, as gocryptfs's does);
                # the disk reads the header meanwhile, while the kernel takes this reply and
                # sends the READ (benchmarks/HISTORY.md, #25 round 13).
                prefetch(fd, [(0, HEADER_LEN + self.files.block_size + OVERHEAD)])
        except BaseException:
            self.files.release(fh)
            raise
        return fh

    def _truncate(self, inode: int, target: bytes | int, size: int, f: OpenFile | None) -> None:
        """Truncate through handle ``f`` if it is writable, else through a backing fd of our own."""
        if f is None or not f.writable:
            fd = self._open_backing(target, writable=True, noatime=True)
            f = OpenFile(inode, fd, True, self._describe(target))
            fh = self.files.add(f)
        else:
            fh = None
        try:
            if size == 0:
                self.files.drop(inode, f.fd, f.path)
            else:
                self.files.writable_content(f).truncate(size)
        finally:
            if fh is not None:
                self.files.release(fh)

    @fuse_op
    def reader(self, fh: int) -> tuple[OpenFile, FileContent] | None:
        """The open file behind ``fh`` and its content, ready to read; None if it has none yet.

        Reading is split in two (reader, then read_open) so that the server can hold
        its lock shared while it decrypts."""
        f = self.files[fh]
        content = self.files.content(f, self._sizes.get(f.inode))
        return None if content is None else (f, content)

    def read_open(self, opened: tuple[OpenFile, FileContent], off: int, size: int) -> bytes | bytearray | memoryview:
        """Read from a file that reader() returned. Safe to run alongside other reads, but not
        alongside operations that change the file or close it. A large read may come back as a
        view of the sealing worker's arena: valid until this thread's next request."""
        f, content = opened
        try:  # not failures_as_errno: entering it took 0.7 us per READ
            if content.noatime or content.index:
                # Served through a write-only handle's O_NOATIME fd or from the journal: a read of
                # the backing file through this handle gives the file its atime (relatime) as usual.
                os.pread(f.fd, 1, 0)
            return content.read(off, size)
        except BlockAuthError as e:
            if not daemonlog.reported(e):
                daemonlog.report_integrity(log, self.plain_path(f.path), f"read at {off}", e)
            raise FuseError(errno.EIO) from None
        except Exception as e:  # noqa: BLE001 - mapped or raised again unchanged
            reraise_as_errno("read", e)

    def seal_ahead(self, fh: int, off: int, buf: memoryview) -> tuple[Sealer, memoryview] | None:
        """``buf`` sealed for a write at ``off``, as (the file's sealer, the sealed bytes), or
        None (then write() seals it). Changes nothing, so it runs without the server's locks:
        the kernel keeps a handle open while a write on it is in flight; write() uses the
        result only if the file's sealer is still that one.

        Only writes of whole blocks (content.whole_blocks) qualify: what they seal does not
        depend on what the file holds. Large ones are sealed by the sealing worker once it
        holds the file's key (the result stays valid until this thread seals again); small
        ones here, so that writes to one file wait for its lock only while they are placed
        (benchmarks/HISTORY.md)."""
        f = self.files.get(fh)
        content = None if f is None or not f.writable else self.files.contents.get(f.inode)
        blocks = whole_blocks(off, len(buf), self.block_size)
        if content is None or blocks is None:
            return None
        sealer = content.sealer
        if len(buf) < WORKER_MIN_BYTES:
            return sealer, memoryview(sealer.seal_run(blocks.start, buf))
        sealed = sealer.seal_in_worker([(blocks, buf)])
        return None if sealed is None else (sealer, sealed[0])

    @fuse_op
    def write(self, fh: int, off: int, buf: bytes | bytearray | memoryview,
              sealed: tuple[Sealer, memoryview] | None = None, kill_suidgid: bool = False,
              drop_capability: bool = False) -> int:
        """Write ``buf`` at ``off``; ``sealed``: what seal_ahead() returned for this write.

        First, what the kernel leaves to us (FUSE_HANDLE_KILLPRIV_V2, or a direct-I/O write):
        with ``drop_capability`` security.capability goes, and with ``kill_suidgid`` (a caller
        who may not keep set-id bits) S_ISUID, and S_ISGID with group execute, as write(2) and
        the kernel's file_remove_privs do. A delayed write of the page cache drops no capability:
        the kernel checked at write(2), and a capability set since (rpm: write, then
        cap_set_fd, then close) must stay."""
        f = self.files[fh]
        if not f.writable:
            raise FuseError(errno.EBADF)
        if drop_capability:
            self.drop_capability(f.inode)
        if kill_suidgid:
            self._kill_suidgid(f.fd)
        content = self.files.writable_content(f)
        if sealed is not None and sealed[0] is content.sealer:
            return content.write_sealed(off, len(buf), sealed[1])
        if len(buf) >= WORKER_MIN_BYTES:
            content.sealer.send_key()  # from the next large write on, this file's are sealed ahead
        return content.write(off, buf)

    def _kill_suidgid(self, target: bytes | int) -> None:
        """Drop S_ISUID, and S_ISGID with group execute, from a backing file (a symlink or a
        directory keeps them); the backing file holds the plaintext mode."""
        mode = self.bd.lstat(target).st_mode
        kill = stat_m.S_ISUID | (stat_m.S_ISGID if mode & stat_m.S_IXGRP else 0)
        if mode & kill and not (stat_m.S_ISLNK(mode) or stat_m.S_ISDIR(mode)):
            self.bd.chmod(target, stat_m.S_IMODE(mode) & ~kill)

    @fuse_op
    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2) through a writable handle (sparse.py)."""
        f = self.files[fh]
        if not f.writable:
            raise FuseError(errno.EBADF)
        sparse.fallocate_content(self.files.writable_content(f), mode, offset, length)

    @fuse_op
    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (sparse.py)."""
        f = self.files[fh]
        return sparse.seek(self.files.content(f, self._sizes.get(f.inode)), offset, whence)

    @fuse_op
    def fsync(self, fh: int, datasync: bool) -> None:
        f = self.files[fh]
        content = self.files.contents.get(f.inode)
        if content is not None:
            content.fsync(datasync, defer_state=self.files.defer_checkpoints)
            if content.pending_synced_size is not None:
                self.files.state_pending(f.inode, f.path)
        else:
            (os.fdatasync if datasync else os.fsync)(f.fd)

    @fuse_op
    def release(self, fh: int) -> None:
        self.files.release(fh)
