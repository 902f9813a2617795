"""The filesystem served through pyfuse3 (libfuse 3) on trio: ``encfs mount --server pyfuse3``.

The second server for the same EncryptedFS, next to encfs.fuse.server.FsServer (the default,
our own /dev/fuse protocol server). It exists so that the choice between the two stays a
measured one (``encfs bench`` targets encfs-pyfuse3 and encfs-pyfuse3-null; README), and
for anyone who would rather run the filesystem on the maintained libfuse code.

Invariants:
- Mounting, the mount lock, daemonizing, readiness, signals and unmounting are
  encfs.fuse.mount.serve()'s, as for FsServer: libfuse is handed the /dev/fuse descriptor
  that serve() mounted (libfuse's "/dev/fd/N" mountpoint, a duplicate that libfuse closes
  itself) and never mounts or unmounts anything.
- Operations run one at a time: every handler is synchronous Python inside a trio task that
  never awaits, so no other request interleaves with it; ``lock`` is still taken (shared by
  reads, exclusive by everything else) because serve()'s crash-recovery thread runs
  alongside the server under it, exactly as with FsServer.
- Every failure is an errno reply: FuseError becomes pyfuse3.FUSEError, and anything
  unexpected is logged and answered EIO (pyfuse3 would otherwise end its main loop, and
  with it the mount).
- Replies carry EntryAttributes' cache lifetimes; files are opened with keep_cache and
  the writeback cache is negotiated; the mount's read-ahead is raised as FsServer's is,
  right after INIT is answered.
- READDIRPLUS counts an entry as looked up only if it went into the reply
  (readdir_reply returned True). Directory offsets 1 and 2 are "." and ".."; offset n > 2
  is EncryptedFS's n - 2, as with FsServer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fuseerrors import failures_as_errno
from encfs.fuse.names import NAME_MAX
from encfs.fuse.server import READ_AHEAD_KIB
from encfs.fuseproto.keepawake import KeepAwake
from encfs.fuseproto.mounting import set_read_ahead
from encfs.fuseproto.rwlock import SharedExclusiveLock
from encfs.fuseproto.wire import EntryAttributes, FuseError, RequestContext, SetattrFields

log = logging.getLogger("encfs.fuse")
trace = logging.getLogger("encfs.fuse.trace")

T = TypeVar("T")
_ATTRS = ("st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink", "st_uid", "st_gid",
          "st_rdev", "st_size", "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


def _to_pyfuse3(a: EntryAttributes) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    for name in _ATTRS:
        setattr(e, name, getattr(a, name))
    return e


def _ctx(c: pyfuse3.RequestContext) -> RequestContext:
    return RequestContext(c.uid, c.gid, c.pid, c.umask)


class _Operations(pyfuse3.Operations):
    """pyfuse3's callbacks, each one EncryptedFS call under the server's lock."""

    enable_writeback_cache = True

    def __init__(self, server: Pyfuse3Server) -> None:
        super().__init__()
        self.server = server
        self.fs = server.fs
        self._dir_inodes: dict[int, int] = {}  # directory handle -> its inode, for "." in readdir

    def _forget_stale_names(self) -> None:
        """Names a failed change left the kernel holding wrongly (stalenames.py): pyfuse3 sends
        them from its own thread, once the kernel lets go of the directory."""
        for parent, name in self.fs.stale_names.drain():
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    def _run(self, op: str, call: Callable[..., T], *args: Any, shared: bool = False) -> T:
        server = self.server
        if server.trace:
            trace.debug("%s %s", op.upper(), " ".join(str(a) for a in args if isinstance(a, int)))
        lock = server.lock
        (lock.acquire_shared if shared else lock.acquire_exclusive)()
        try:
            return call(*args)
        except FuseError as e:
            if server.trace:
                trace.debug("  %s -> %s", op.upper(), errno.errorcode.get(e.errno, e.errno))
            self._forget_stale_names()
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:  # one bad request must not end the mount
            log.exception("FUSE request %s failed", op.upper())
            self._forget_stale_names()
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            (lock.release_shared if shared else lock.release_exclusive)()

    def init(self) -> None:
        # Called before INIT is answered, and the kernel sets the read-ahead from that reply:
        # raise it in a task that runs once this one has replied.
        mountpoint = self.server.mountpoint
        if mountpoint is not None:
            trio.lowlevel.spawn_system_task(self._set_read_ahead, mountpoint)

    @staticmethod
    async def _set_read_ahead(mountpoint: str) -> None:
        if not set_read_ahead(mountpoint, READ_AHEAD_KIB):
            log.debug("%s: read-ahead left at the kernel's default (not root?)", mountpoint)

    # -- entries -----------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # an absent name is st_ino 0, which libfuse sends as a negative entry
        return _to_pyfuse3(self._run("lookup", self.fs.lookup_or_absent, parent_inode, name, _ctx(ctx)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self._run("forget", self.fs.forget, list(inode_list))
        except pyfuse3.FUSEError:
            pass  # FORGET has no reply

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _to_pyfuse3(self._run("getattr", self.fs.getattr, inode, _ctx(ctx)))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # pyfuse3 has already put the time of day into attr for *_NOW
        ours = EntryAttributes(st_mode=attr.st_mode, st_uid=attr.st_uid, st_gid=attr.st_gid, st_size=attr.st_size,
                               st_atime_ns=attr.st_atime_ns, st_mtime_ns=attr.st_mtime_ns)
        wanted = SetattrFields(update_mode=fields.update_mode, update_uid=fields.update_uid,
                               update_gid=fields.update_gid, update_size=fields.update_size,
                               update_atime=fields.update_atime, update_mtime=fields.update_mtime)
        return _to_pyfuse3(self._run("setattr", self.fs.setattr, inode, ours, wanted, fh, _ctx(ctx)))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target: bytes = self._run("readlink", self.fs.readlink, inode, _ctx(ctx))
        return target

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _to_pyfuse3(self._run("symlink", self.fs.symlink, parent_inode, name, target, _ctx(ctx)))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _to_pyfuse3(self._run("mknod", self.fs.mknod, parent_inode, name, mode, rdev, _ctx(ctx)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _to_pyfuse3(self._run("mkdir", self.fs.mkdir, parent_inode, name, mode, _ctx(ctx)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._run("unlink", self.fs.unlink, parent_inode, name, _ctx(ctx))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._run("rmdir", self.fs.rmdir, parent_inode, name, _ctx(ctx))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._run("rename", self.fs.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                  _ctx(ctx))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _to_pyfuse3(self._run("link", self.fs.link, inode, new_parent_inode, new_name, _ctx(ctx)))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self._run("statfs", self.fs.statfs, _ctx(ctx))
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize, out.f_blocks = sv.f_bsize, sv.f_frsize, sv.f_blocks
        out.f_bfree, out.f_bavail, out.f_files = sv.f_bfree, sv.f_bavail, sv.f_files
        out.f_ffree, out.f_favail, out.f_namemax = sv.f_ffree, sv.f_favail, NAME_MAX
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._run("access", self.fs.access, inode, mode, _ctx(ctx))  # EACCES is raised
        return True

    # -- files --------------------------------------------------------------------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attrs = self._run("create", self.fs.create, parent_inode, name, mode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), _to_pyfuse3(attrs)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self._run("open", self.fs.open, inode, flags, _ctx(ctx)), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        # pyfuse3 takes any buffer (its stub says bytes) and copies the reply out before any other
        # task runs, so a view of the sealing worker's arena (read_open) is still valid when sent.
        return self._run("read", self._read, fh, off, size, shared=True)

    def _read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        opened = self.fs.reader(fh)
        return b"" if opened is None else self.fs.read_open(opened, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written: int = self._run("write", self.fs.write, fh, off, buf, None)
        return written

    async def flush(self, fh: int) -> None:
        # As FsServer: nothing to flush at close(2); ENOSYS makes the kernel stop sending FLUSH.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        self._run("release", self.fs.release, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._run("fsync", self.fs.fsync, fh, datasync)

    # -- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh: int = self._run("opendir", self.fs.opendir, inode, _ctx(ctx))
        self._dir_inodes[fh] = inode
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._run("readdir", self._readdir, fh, start_id, token)

    def _readdir(self, fh: int, offset: int, token: pyfuse3.ReaddirToken) -> None:
        # "." and "..": the kernel does not instantiate them from READDIRPLUS, nor count their lookups.
        dot = pyfuse3.EntryAttributes()
        dot.st_ino = self._dir_inodes.get(fh, pyfuse3.ROOT_INODE)
        dot.st_mode = 0o040000
        for i, name in enumerate((b".", b".."), start=1):
            if offset < i and not pyfuse3.readdir_reply(token, name, dot, i):
                return
        with failures_as_errno("readdir"):
            entries = self.fs.readdir(fh, max(offset - 2, 0), True)
            try:
                for name, attrs, next_offset in entries:
                    if not pyfuse3.readdir_reply(token, name, _to_pyfuse3(attrs), next_offset + 2):
                        break
            finally:
                entries.close()  # entries that did not fit are not counted as looked up

    async def releasedir(self, fh: int) -> None:
        self._dir_inodes.pop(fh, None)
        self._run("releasedir", self.fs.releasedir, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._run("fsyncdir", self.fs.fsyncdir, fh, datasync)

    # -- xattrs -----------------------------------------------------------------------------
    # pyfuse3 checks XATTR_CREATE / XATTR_REPLACE itself with a getxattr first; both calls run
    # without another request in between (neither awaits).

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._run("setxattr", self.fs.setxattr, inode, name, value, _ctx(ctx))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value: bytes = self._run("getxattr", self.fs.getxattr, inode, name, _ctx(ctx))
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self._run("listxattr", self.fs.listxattr, inode, _ctx(ctx))

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._run("removexattr", self.fs.removexattr, inode, name, _ctx(ctx))


class Pyfuse3Server:
    """Serves one EncryptedFS through pyfuse3 over a /dev/fuse descriptor that is already
    mounted; the same interface to encfs.fuse.mount.serve() as FsServer (lock, serve, stop,
    unmounted, stopped_cleanly). libfuse 3.14 has no FUSE over io_uring, and libfuse's loop
    does not tell the keep-awake helper of requests: mount() refuses ``io_uring`` and
    ``keep_cpu_awake`` with this server before it gets here."""

    def __init__(self, fd: int, fs: EncryptedFS, mountpoint: str | None = None, trace: bool = False,
                 io_uring: bool = False, awake: KeepAwake | None = None) -> None:
        if io_uring or awake is not None:
            raise ValueError("the pyfuse3 server has neither FUSE over io_uring nor a keep-awake helper")
        self.fd = fd
        self.fs = fs
        self.mountpoint = mountpoint
        self.trace = trace
        self.lock = SharedExclusiveLock()
        self.unmounted = False  # the kernel ended the connection (the loop ended without stop())
        self.stopped_cleanly = True  # nothing answers requests once serve() returned
        self._stopped = False
        self._token: trio.lowlevel.TrioToken | None = None

    def file_lock(self, inode: int) -> contextlib.AbstractContextManager[None]:
        """FsServer's: here every operation holds the one lock."""
        del inode
        return self.lock.exclusive()

    def serve(self, threads: int = 1) -> None:
        """Serve until unmounted or stop(). ``threads`` is FsServer's; requests run in trio's thread."""
        del threads
        # libfuse owns (and at the end closes) its own duplicate of the descriptor
        pyfuse3.init(_Operations(self), f"/dev/fd/{os.dup(self.fd)}", set())
        try:
            trio.run(self._main)
        finally:
            pyfuse3.close(unmount=False)  # serve() unmounts, as for FsServer
        self.unmounted = not self._stopped

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if not self._stopped:  # a signal before the loop started
            await pyfuse3.main()

    def stop(self) -> None:
        """Make serve() return. Meant for a signal handler (run_sync_soon is safe to call from one)."""
        self._stopped = True
        token = self._token
        if token is not None:
            token.run_sync_soon(pyfuse3.terminate)
