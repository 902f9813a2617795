"""The filesystem's FUSE server: kernel requests decoded into EncryptedFS calls. The directory
requests (OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR) are serverdirs.py's and the xattr
requests serverxattrs.py's, mixins of FsServer registered in its handler table with the others;
this module keeps the rest, the handler table and the locks every request runs under.

Invariants:
- Locks (encfs.fuseproto.rwlock.FsLocks): an operation that changes the tree, or
  reads it in a way a change could tear (LOOKUP, READDIR, FORGET, ...), holds the
  namespace lock exclusively and runs alone. An operation on the data or attributes
  of one inode (DATA_OPS: READ, WRITE, FSYNC, SETATTR, GETATTR, GETXATTR, OPEN,
  RELEASE, FALLOCATE, LSEEK) holds the namespace lock shared and then that inode's lock: exclusively,
  or shared for READ and LSEEK (SHARED_OPS: they only read the content, which OpenFiles loads
  under a lock of its own; a read-only handle's load, at its first READ, may write the backing
  file, a journal's checkpoint or an interrupted re-key's end, while the other readers wait on
  that lock). So operations on different files run side by side, and a file
  is never read while it changes. The inode is the request's node: the kernel sends a
  handle's requests with the node it opened.
- Lock order: the namespace lock, then at most one inode lock; nothing takes a lock
  while it holds an inode lock (FsLocks raises LockOrderError instead of deadlocking).
  EncryptedFS's own tables that data operations on different inodes share (OpenFiles'
  handle table, each Sealer's key hand-off, the sealing worker's slots and keys) have
  locks of their own, taken last and held only for the table update; the inode map
  is only read by them (inomap.py).
- Reads overlap the backing pread and the reply's copy (no GIL) with decryption
  (whose per-call work holds the GIL; AES-GCM itself releases it).
- A WRITE of whole blocks is sealed before the locks (EncryptedFS.seal_ahead: a large one
  in the sealing worker, from the request buffer it lies in; a small one in this thread),
  so sealing one request overlaps writing another; only placing it runs under the locks.
- Replies carry the kernel's cache lifetimes from EntryAttributes; files are
  opened with FOPEN_KEEP_CACHE and the writeback cache is negotiated; an O_DIRECT
  open bypasses the page cache (FOPEN_DIRECT_IO, open_reply_flags).
- A LOOKUP of an absent name is a negative entry (node 0, EncryptedFS.lookup_or_absent) the kernel
  caches like a positive one; it drops it when the name is created through the mount.
- FUSE_HANDLE_KILLPRIV_V2 is negotiated, so the kernel stops asking for security.capability
  before each write(2) of a file it saw without privileges (S_NOSEC), and the daemon keeps the
  contract (linux/fuse.h) instead: on a WRITE with FUSE_WRITE_KILL_SUIDGID, a SETATTR with
  FATTR_KILL_SUIDGID (a truncate by a caller without CAP_FSETID, or any chown of a non-directory)
  and an OPEN with FUSE_OPEN_KILL_SUIDGID (O_TRUNC without CAP_FSETID), S_ISUID goes, and S_ISGID
  if the file has group execute; security.capability goes on every write, truncate (SETATTR of
  the size, O_TRUNC open) and chown, root's included (EncryptedFS.write, xattrops.py).
- A SETATTR of an inode that has no name, no open handle and no held fd left (the time flush the
  kernel sends after each unlink, with the writeback cache) is answered ENOENT before any lock, as
  it would be under them: only operations holding the namespace lock exclusively give an inode a
  name or a held fd back (a handle needs one of them first), and the answer is given only if no
  exclusive holder ran while the three were read (SharedExclusiveLock.quiet_mark); else the
  request takes the locks. Neither answer given before the locks drains the stale names
  (reply_error's), which belong to the reply of the failed change that left them.
- Anything unexpected is logged and answered with EIO; the mount stays up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable

from encfs.fuse.fs import EncryptedFS
from encfs.fuse.names import NAME_MAX
from encfs.fuse.serverdirs import DirRequests
from encfs.fuse.serverxattrs import XattrRequests
from encfs.fuseproto.keepawake import KeepAwake
from encfs.fuseproto.mounting import set_read_ahead
from encfs.fuseproto.rwlock import FsLocks
from encfs.fuseproto.server import FuseServer, Handler
from encfs.fuseproto.wire import (
    ACCESS,
    ACCESS_IN,
    BATCH_FORGET,
    BATCH_FORGET_IN,
    CREATE,
    CREATE_IN,
    DESTROY,
    FALLOCATE,
    FALLOCATE_IN,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FLUSH,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_PARALLEL_DIRECT_WRITES,
    FORGET,
    FORGET_IN,
    FORGET_ONE,
    FSYNC,
    FSYNC_FDATASYNC,
    FSYNC_IN,
    FSYNCDIR,
    FUSE_ASYNC_DIO,
    FUSE_ASYNC_READ,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_AUTO_INVAL_DATA,
    FUSE_BIG_WRITES,
    FUSE_CACHE_SYMLINKS,
    FUSE_DIRECT_IO_ALLOW_MMAP,
    FUSE_DO_READDIRPLUS,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_MAX_PAGES,
    FUSE_OPEN_KILL_SUIDGID,
    FUSE_PARALLEL_DIROPS,
    FUSE_WRITE_CACHE,
    FUSE_WRITE_KILL_SUIDGID,
    FUSE_WRITEBACK_CACHE,
    GETATTR,
    GETXATTR,
    INIT,
    INTERRUPT,
    INVAL_ENTRY,
    INVAL_INODE,
    LINK,
    LINK_IN,
    LISTXATTR,
    LOOKUP,
    LSEEK,
    LSEEK_IN,
    LSEEK_OUT,
    MKDIR,
    MKDIR_IN,
    MKNOD,
    MKNOD_IN,
    NOTIFY_INVAL_ENTRY,
    NOTIFY_INVAL_INODE,
    OPEN,
    OPEN_IN,
    OPEN_OUT,
    OPENDIR,
    READ,
    READ_IN,
    READDIR,
    READDIRPLUS,
    READLINK,
    RELEASE,
    RELEASE_IN,
    RELEASEDIR,
    REMOVEXATTR,
    RENAME,
    RENAME2,
    RENAME2_IN,
    RENAME_IN,
    RMDIR,
    SETATTR,
    SETATTR_IN,
    SETXATTR,
    STATFS,
    STATFS_OUT,
    SYMLINK,
    UNLINK,
    WRITE,
    WRITE_IN,
    WRITE_OUT,
    EntryAttributes,
    FuseError,
    Request,
    RequestContext,
    SetattrFields,
    request_names,
)

log = logging.getLogger("encfs.fuse")
# Read-ahead of the mount (root mounts only: sysfs). The kernel's 128 KiB default cuts a
# sequential read into 128 KiB requests, one or two in flight, each waiting on its own
# decryption. 2 MiB keeps two 1 MiB requests (the largest, FUSE_MAX_PAGES) in flight, so one is
# opened in the sealing worker while the next is read from disk; 4 MiB was slower
# (benchmarks/HISTORY.md, f64f31f and ff7bc78).
READ_AHEAD_KIB = 2048

WANTED_FLAGS = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA
                | FUSE_DO_READDIRPLUS | FUSE_ASYNC_DIO | FUSE_WRITEBACK_CACHE | FUSE_PARALLEL_DIROPS
                | FUSE_MAX_PAGES | FUSE_CACHE_SYMLINKS | FUSE_DIRECT_IO_ALLOW_MMAP | FUSE_HANDLE_KILLPRIV_V2)

Operation = Callable[[int, int, RequestContext, memoryview], None]  # (unique, node, caller, body)
# Operations on one inode's data or attributes: they hold the namespace lock shared and the inode's
# lock exclusively (READ: shared; see the invariants). Every other operation holds the namespace
# lock exclusively.
DATA_OPS = frozenset({READ, WRITE, FSYNC, SETATTR, GETATTR, GETXATTR, OPEN, RELEASE, FALLOCATE, LSEEK})
SHARED_OPS = frozenset({LSEEK})  # READ too, by its own handler (_read_shared)


def open_reply_flags(flags: int, direct_io: bool) -> int:
    """OPEN and CREATE reply flags: the page cache is kept across opens; an O_DIRECT open gets
    FOPEN_DIRECT_IO, as libfuse's passthrough_hp does. The kernel then sends its reads and
    writes as they come, up to the caller's queue depth, and concurrently
    (FOPEN_PARALLEL_DIRECT_WRITES), with no GETATTR and GETXATTR(security.capability) before
    each write as its cached path needs (benchmarks/HISTORY.md, 2026-12-06). Such a write
    clears set-id bits itself (FUSE_WRITE_KILL_SUIDGID, EncryptedFS.write); shared mmap of
    it stays allowed (FUSE_DIRECT_IO_ALLOW_MMAP). ``direct_io``: the kernel agreed to that flag;
    an older one (before 6.6) would not write another handle's dirty pages back before a direct
    read or write of the same file, so O_DIRECT then keeps the cached path."""
    if flags & os.O_DIRECT and direct_io:
        return FOPEN_KEEP_CACHE | FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
    return FOPEN_KEEP_CACHE


class FsServer(DirRequests, XattrRequests, FuseServer):
    """Serves one EncryptedFS over an open /dev/fuse descriptor."""

    def __init__(self, fd: int, fs: EncryptedFS, mountpoint: str | None = None, trace: bool = False,
                 io_uring: bool = False, awake: KeepAwake | None = None, follow_caller: bool = True) -> None:
        super().__init__(fd, trace, io_uring=io_uring, awake=awake, follow_caller=follow_caller)
        self.fs = fs
        self._absent = fs.negative_entry.pack_entry()  # the same reply for every absent name
        self.mountpoint = mountpoint
        self.locks = FsLocks()
        self.lock = self.locks.namespace  # held exclusively: nothing else runs (mount.py's shutdown, recovery)
        operations: dict[int, Operation] = {
            LOOKUP: self._lookup, GETATTR: self._getattr, SETATTR: self._setattr, READLINK: self._readlink,
            SYMLINK: self._symlink, MKNOD: self._mknod, MKDIR: self._mkdir, UNLINK: self._unlink,
            RMDIR: self._rmdir, RENAME: self._rename, RENAME2: self._rename2, LINK: self._link,
            OPEN: self._open, STATFS: self._statfs,
            RELEASE: self._release, FSYNC: self._fsync, SETXATTR: self._setxattr, GETXATTR: self._getxattr,
            LISTXATTR: self._listxattr, REMOVEXATTR: self._removexattr,
            OPENDIR: self._opendir, READDIR: self._readdir, READDIRPLUS: self._readdirplus,
            RELEASEDIR: self._releasedir, FSYNCDIR: self._fsyncdir, ACCESS: self._access, CREATE: self._create,
            FORGET: self._forget, BATCH_FORGET: self._batch_forget, FALLOCATE: self._fallocate, LSEEK: self._lseek,
        }
        self.handlers = {opcode: self._on_inode(operation, exclusive=opcode not in SHARED_OPS)
                         if opcode in DATA_OPS else self._exclusive(operation)
                         for opcode, operation in operations.items()}
        # Reads run alongside each other, and a write is sealed before it takes the locks.
        self.handlers.update({READ: self._read_shared, WRITE: self._write, INIT: self._init,
                              DESTROY: self._destroy, INTERRUPT: self._interrupt, FLUSH: self._flush,
                              LSEEK: self._seek_written(self.handlers[LSEEK]),
                              GETXATTR: self._capability_known(self.handlers[GETXATTR]),
                              SETATTR: self._gone_first(self.handlers[SETATTR])})

    def overlaps(self, req: Request) -> bool:
        """LSEEK too (SEEK_DATA/SEEK_HOLE) when it will wait for writes the kernel sends meanwhile
        (_seek_written), which another thread must read."""
        return super().overlaps(req) or (req.opcode == LSEEK and self._flushes_first(req.node))

    def _flushes_first(self, inode: int) -> bool:
        """Whether an LSEEK of ``inode`` first has the kernel write its dirty pages back (_seek_written)."""
        return (self.uring is None and bool(self.agreed_flags & FUSE_WRITEBACK_CACHE)
                and self.fs.files.open_for_writing(inode))

    def _seek_written(self, locked: Handler) -> Handler:
        """SEEK_DATA and SEEK_HOLE answer from the file's blocks and holes as the daemon knows them;
        with the writeback cache the kernel may hold written pages it has not sent yet (it sends
        them at the close, not before an LSEEK), so `cp` of a file still being written would skip
        them as holes and copy zeros. So while the file is open for writing, the kernel is first
        told to drop its pages from the offset on (FUSE_NOTIFY_INVAL_INODE), which writes the
        dirty ones back (WRITEs another thread answers) before the notice returns; then the
        seek takes the inode's lock. Over io_uring the notice would go only after the reply:
        not done there (README)."""
        def run(req: Request) -> None:
            if self._flushes_first(req.node):
                _fh, offset, _whence = LSEEK_IN.unpack_from(req.body)
                self.notify(NOTIFY_INVAL_INODE, INVAL_INODE.pack(req.node, max(offset, 0), 0))
            locked(req)
        return run

    def reply_error(self, unique: int, error: int, drain: bool = True) -> None:
        """The error reply, then (``drain``) the names a failed change left the kernel holding
        wrongly (stalenames.py): only now, since the kernel holds the directory's lock until the
        reply. The answers given before the locks do not drain (see the invariants)."""
        super().reply_error(unique, error)
        if not drain:
            return
        for parent, name in self.fs.stale_names.drain():
            try:
                self.notify(NOTIFY_INVAL_ENTRY, INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0")
            except OSError as e:  # ENOENT (the kernel had no such entry) is ignored in _send
                log.warning("could not have the kernel forget a name after a failed change: %s", e.strerror)

    def _exclusive(self, operation: Operation) -> Handler:
        locks = self.locks

        def run(req: Request) -> None:
            ctx = RequestContext(req.uid, req.gid, req.pid)
            locks.acquire_tree()
            try:
                operation(req.unique, req.node, ctx, req.body)
            finally:
                locks.release_tree()
        return run

    def _on_inode(self, operation: Operation, exclusive: bool = True) -> Handler:
        locks = self.locks

        def run(req: Request) -> None:
            ctx = RequestContext(req.uid, req.gid, req.pid)
            held = locks.acquire_inode(req.node, exclusive)
            try:
                operation(req.unique, req.node, ctx, req.body)
            finally:
                locks.release_inode(req.node, held, exclusive)
        return run

    def file_lock(self, inode: int) -> contextlib.AbstractContextManager[None]:
        """What a data operation on ``inode`` holds (for work outside a request: mount.py)."""
        return self.locks.inode(inode)

    def request_buffer(self) -> memoryview:
        """A slot of the sealing worker's arena if one runs, so WRITE bodies reach it uncopied."""
        buf = self.fs.sealing.request_buffer()
        return super().request_buffer() if buf is None else buf

    @property
    def _direct_io(self) -> bool:
        """Whether O_DIRECT opens get FOPEN_DIRECT_IO (open_reply_flags)."""
        return bool(self.agreed_flags & FUSE_DIRECT_IO_ALLOW_MMAP)

    def _init(self, req: Request) -> bool:
        if not self.init_reply(req, WANTED_FLAGS):
            return False
        if self.mountpoint is not None and not set_read_ahead(self.mountpoint, READ_AHEAD_KIB):
            log.debug("%s: read-ahead left at the kernel's default (not root?)", self.mountpoint)
        return True

    def _destroy(self, req: Request) -> bool:
        self.reply(req.unique)
        return False

    def _interrupt(self, req: Request) -> None:
        """Requests are answered quickly; an interrupt needs no action."""

    def _flush(self, req: Request) -> None:
        """close(2) has nothing to flush here (writes reach the backing file as they arrive, and
        fsync is separate), and ENOSYS makes the kernel stop sending FLUSH."""
        raise FuseError(errno.ENOSYS)

    def _read_shared(self, req: Request) -> None:
        fh, offset, size, _flags = READ_IN.unpack_from(req.body)
        held = self.locks.acquire_inode(req.node, exclusive=False)
        try:
            f = self.fs.reader(fh)
            data = b"" if f is None else self.fs.read_open(f, offset, size)
        finally:
            self.locks.release_inode(req.node, held, exclusive=False)
        self.reply(req.unique, data)

    # -- entries -----------------------------------------------------------------------

    def _lookup(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        (name,) = request_names(body, 1)
        attrs = self.fs.lookup_or_absent(node, name, ctx)
        self.reply(unique, self._absent if attrs is self.fs.negative_entry else attrs.pack_entry())

    def _forget(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        (nlookup,) = FORGET_IN.unpack_from(body)
        self.fs.forget([(node, nlookup)])

    def _batch_forget(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        count, _ = BATCH_FORGET_IN.unpack_from(body)
        self.fs.forget([FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size)
                        for i in range(count)])

    def _getattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.reply(unique, self.fs.getattr(node, ctx).pack_attr_out())

    def _gone_first(self, locked: Handler) -> Handler:
        """SETATTR of an inode with nothing left to reach it by is answered ENOENT without the
        locks (see the invariants); anything else goes to ``locked``."""
        unreachable, namespace = self.fs.unreachable, self.locks.namespace

        def run(req: Request) -> bool | None:
            mark = namespace.quiet_mark()
            if mark is not None and unreachable(req.node) and namespace.still_quiet(mark):
                self.reply_error(req.unique, errno.ENOENT, drain=False)
                return None
            return locked(req)
        return run

    def _setattr(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        (valid, _pad, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec, mode, _u4,
         uid, gid, _u5) = SETATTR_IN.unpack_from(body)
        now = time.time_ns()
        attr = EntryAttributes(
            st_mode=mode, st_uid=uid, st_gid=gid, st_size=size,
            st_atime_ns=now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimensec,
            st_mtime_ns=now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimensec)
        fields = SetattrFields(
            update_mode=bool(valid & FATTR_MODE), update_uid=bool(valid & FATTR_UID),
            update_gid=bool(valid & FATTR_GID), update_size=bool(valid & FATTR_SIZE),
            update_atime=bool(valid & (FATTR_ATIME | FATTR_ATIME_NOW)),
            update_mtime=bool(valid & (FATTR_MTIME | FATTR_MTIME_NOW)),
            kill_suidgid=bool(valid & FATTR_KILL_SUIDGID))
        attrs = self.fs.setattr(node, attr, fields, fh if valid & FATTR_FH else None, ctx)
        self.reply(unique, attrs.pack_attr_out())

    def _readlink(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.reply(unique, self.fs.readlink(node, ctx))

    def _symlink(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        name, target = request_names(body, 2)
        self.reply(unique, self.fs.symlink(node, name, target, ctx).pack_entry())

    def _mknod(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        mode, rdev, ctx.umask, _pad = MKNOD_IN.unpack_from(body)
        (name,) = request_names(body[MKNOD_IN.size:], 1)
        self.reply(unique, self.fs.mknod(node, name, mode, rdev, ctx).pack_entry())

    def _mkdir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        mode, ctx.umask = MKDIR_IN.unpack_from(body)
        (name,) = request_names(body[MKDIR_IN.size:], 1)
        self.reply(unique, self.fs.mkdir(node, name, mode, ctx).pack_entry())

    def _unlink(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.fs.unlink(node, request_names(body, 1)[0], ctx)
        self.reply(unique)

    def _rmdir(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        self.fs.rmdir(node, request_names(body, 1)[0], ctx)
        self.reply(unique)

    def _rename(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        (newdir,) = RENAME_IN.unpack_from(body)
        old, new = request_names(body[RENAME_IN.size:], 2)
        self.fs.rename(node, old, newdir, new, 0, ctx)
        self.reply(unique)

    def _rename2(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        newdir, flags, _pad = RENAME2_IN.unpack_from(body)
        old, new = request_names(body[RENAME2_IN.size:], 2)
        self.fs.rename(node, old, newdir, new, flags, ctx)
        self.reply(unique)

    def _link(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        (old_node,) = LINK_IN.unpack_from(body)
        (name,) = request_names(body[LINK_IN.size:], 1)
        self.reply(unique, self.fs.link(old_node, node, name, ctx).pack_entry())

    def _statfs(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        sv = self.fs.statfs(ctx)
        self.reply(unique, STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                                           sv.f_bsize, NAME_MAX, sv.f_frsize, 0))

    def _access(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        # Sent only without default_permissions (access(2), chdir); see mount._fuse_options.
        (mask, _pad) = ACCESS_IN.unpack_from(body)
        self.fs.access(node, mask, ctx)
        self.reply(unique)

    # -- files --------------------------------------------------------------------------

    def _create(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        flags, mode, ctx.umask, _open_flags = CREATE_IN.unpack_from(body)
        (name,) = request_names(body[CREATE_IN.size:], 1)
        fh, attrs = self.fs.create(node, name, mode, flags, ctx)
        self.reply(unique, attrs.pack_entry(), OPEN_OUT.pack(fh, open_reply_flags(flags, self._direct_io), 0))

    def _open(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        flags, open_flags = OPEN_IN.unpack_from(body)
        fh = self.fs.open(node, flags, ctx, bool(open_flags & FUSE_OPEN_KILL_SUIDGID))
        self.reply(unique, OPEN_OUT.pack(fh, open_reply_flags(flags, self._direct_io), 0))

    def _write(self, req: Request) -> None:
        fh, offset, size, wflags, _owner, _flags, _pad = WRITE_IN.unpack_from(req.body)
        data = req.body[WRITE_IN.size:WRITE_IN.size + size]  # this thread's buffer: valid until it reads again
        sealed = self.fs.seal_ahead(fh, offset, data)
        held = self.locks.acquire_inode(req.node)
        try:
            # (the kernel refetches attributes after a write with FUSE_WRITE_KILL_SUIDGID)
            written = self.fs.write(fh, offset, data, sealed, bool(wflags & FUSE_WRITE_KILL_SUIDGID),
                                    not wflags & FUSE_WRITE_CACHE)
        finally:
            self.locks.release_inode(req.node, held)
        self.reply(req.unique, WRITE_OUT.pack(written, 0))

    def _release(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, _flags, _rflags, _owner = RELEASE_IN.unpack_from(body)
        self.fs.release(fh)
        self.reply(unique)

    def _fsync(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, flags, _pad = FSYNC_IN.unpack_from(body)
        self.fs.fsync(fh, bool(flags & FSYNC_FDATASYNC))
        self.reply(unique)

    def _fallocate(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, offset, length, mode = FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(fh, offset, length, mode)
        self.reply(unique)

    def _lseek(self, unique: int, node: int, ctx: RequestContext, body: memoryview) -> None:
        fh, offset, whence = LSEEK_IN.unpack_from(body)
        self.reply(unique, LSEEK_OUT.pack(self.fs.lseek(fh, offset, whence)))

    # -- xattrs -----------------------------------------------------------------------------
