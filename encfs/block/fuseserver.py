"""A minimal FUSE server, speaking /dev/fuse directly, that serves one file.

Discard from a loop device reaches the backing file as fallocate(PUNCH_HOLE),
so volumes are served by this small server: a root directory holding exactly one regular file, ``volume``,
whose reads, writes, fsyncs and hole punches go to a ``SectorStore``.

Invariants:
- Four threads serve (encfs.fuseproto reads and answers requests): reads run
  alongside each other (the backing pread and the reply's copy need no
  GIL, so they overlap the other thread's decryption); every other request
  runs alone. A write is sealed before it takes its turn, while another
  write's image I/O runs (SectorStore.seal_ahead: a flush in between sends
  it back to be sealed afresh). The loop device uses direct I/O, so several
  requests are in flight at once.
- The file is opened with FOPEN_DIRECT_IO: the page cache never holds
  volume data, so a loop device on top does not cache it twice (the
  deadlock hazard in docs/dev/block-layer.md) and every flush from the
  loop device reaches SectorStore.flush().
- An authentication failure answers EIO for that request only.
- DESTROY, a vanished mount (ENODEV) or stop() flushes the store and ends serve().
"""

from __future__ import annotations

import errno
import logging
import stat
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from encfs import daemonlog
from encfs.block.volume import ShrinkRefused
from encfs.blocks import BlockAuthError
from encfs.errors import EncfsError
from encfs.fuseproto.mounting import mount_direct, unmount_direct
from encfs.fuseproto.rwlock import SharedExclusiveLock
from encfs.fuseproto.server import FuseServer, Handler, StopServing
from encfs.fuseproto.wire import (
    ACCESS,
    ATTR,
    ATTR_HEAD,
    DESTROY,
    ENTRY_HEAD,
    FALLOCATE,
    FALLOCATE_IN,
    FLUSH,
    FOPEN_DIRECT_IO,
    FSYNC,
    FSYNCDIR,
    FUSE_ASYNC_DIO,
    FUSE_BIG_WRITES,
    FUSE_MAX_PAGES,
    GETATTR,
    GETXATTR,
    GETXATTR_IN,
    INIT,
    INVAL_INODE,
    LISTXATTR,
    LOOKUP,
    NOTIFY_INVAL_INODE,
    OPEN,
    OPEN_OUT,
    OPENDIR,
    READ,
    READ_IN,
    READDIR,
    RELEASE,
    RELEASEDIR,
    ROOT_ID,
    SETATTR,
    SETXATTR,
    STATFS,
    STATFS_OUT,
    SYNCFS,
    WRITE,
    WRITE_IN,
    WRITE_OUT,
    FuseError,
    Request,
    pack_dirent,
    request_names,
    setxattr_request,
    xattr_reply,
)

log = logging.getLogger("encfs.block")

FILE_ID = 2
FILE_NAME = b"volume"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RESIZE_XATTR = b"user.encfs.resize"
# Snapshot control on an attached volume (snapshots.py): the daemon does them under its lock.
CONTROL_CREATE = b"user.encfs.snapshot.create"  # setxattr, value JSON {"id", "description", "created"}
CONTROL_DELETE = b"user.encfs.snapshot.delete"  # setxattr, value the snapshot id; ENOENT if none
CONTROL_LIST = b"user.encfs.snapshots"  # getxattr: JSON list of the snapshots with their space
# getxattr of CONTROL_LIST + b".N": page N of that list, for lists past an xattr's 64 KiB (volume.py)
CONTROL_LIST_PAGE = CONTROL_LIST + b"."
LIST_PAGE = 60_000  # bytes of the list per page: with its head, under XATTR_SIZE_MAX
LIST_PAGE_HEAD = struct.Struct(">II")  # (pages, generation) in front of each page
__all__ = ["CONTROL_CREATE", "CONTROL_DELETE", "CONTROL_LIST", "CONTROL_LIST_PAGE", "LIST_PAGE", "LIST_PAGE_HEAD", "RESIZE_XATTR", "StopServing", "VolumeFile", "VolumeServer", "fuse_mount", "fuse_unmount"]


class VolumeFile(Protocol):
    """What the server needs from the volume: size, I/O and durability."""

    @property
    def size(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...
    def seal_ahead(self, offset: int, data: bytes | bytearray | memoryview) -> Any: ...
    def request_buffer(self) -> memoryview | None: ...
    def write(self, offset: int, data: bytes | bytearray | memoryview, sealed: Any = None) -> int: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def grow(self, new_size: int) -> None: ...
    def control(self, name: bytes, value: bytes) -> None: ...  # snapshot create/delete; OSError
    def query(self, name: bytes) -> bytes: ...  # the snapshot list; OSError


def fuse_mount(mountpoint: str, fsname: str) -> int:
    """Mount the volume's private FUSE directory at ``mountpoint`` (root only); return the fd."""
    return mount_direct(mountpoint, fsname, "fuse.encfs-volume")


def fuse_unmount(mountpoint: str, lazy: bool = False) -> None:
    unmount_direct(mountpoint, lazy)


class VolumeServer(FuseServer):
    """Serves ``volume`` from one VolumeFile over an open /dev/fuse descriptor."""

    def __init__(self, fd: int, volume: VolumeFile, on_error: Callable[[str], None] | None = None,
                 trace: bool = False, name: str = "volume") -> None:
        super().__init__(fd, trace)
        self.volume, self.name = volume, name  # name: the image, in log lines
        self.started = time.time()
        self._on_error = on_error
        self.lock = SharedExclusiveLock()
        self.handlers = self._build_handlers()

    def _attr(self, node: int) -> bytes:
        t = int(self.started)
        if node == ROOT_ID:
            return ATTR.pack(ROOT_ID, 0, 0, t, t, t, 0, 0, 0, stat.S_IFDIR | 0o700, 2, self.uid, self.gid,
                             0, 4096, 0)
        size = self.volume.size
        return ATTR.pack(FILE_ID, size, size // 512, t, t, t, 0, 0, 0, stat.S_IFREG | 0o600, 1, self.uid,
                         self.gid, 0, 4096, 0)

    def _resize(self, unique: int, value: bytes) -> None:
        """Online grow, asked for with setxattr(RESIZE_XATTR, decimal size) on the file."""
        try:
            new_size = int(value.decode())
        except ValueError:
            self.reply_error(unique, errno.EINVAL)
            return
        try:
            self.volume.grow(new_size)
        except EncfsError as e:
            log.error("online resize to %d failed: %s", new_size, e.message)
            self.reply_error(unique, errno.EINVAL if isinstance(e, ShrinkRefused) else errno.ENOSPC)
            return
        self.reply(unique)
        # The kernel caches the file's size: tell it to ask again.
        self.notify(NOTIFY_INVAL_INODE, INVAL_INODE.pack(FILE_ID, 0, -1))

    def request_buffer(self) -> memoryview:
        """The volume's buffer for this thread if it offers one (its sealing worker's arena)."""
        buf = self.volume.request_buffer()
        return super().request_buffer() if buf is None else buf

    def serve(self, threads: int = 4) -> None:
        """Handle requests until unmounted or stopped, with ``threads`` threads: the loop device
        keeps several requests in flight (direct I/O). The caller then runs final_flush()."""
        super().serve(threads=threads)

    def final_flush(self) -> None:
        """Flush the store once serve() has returned, after any request still running (its caller
        reports a failure: voldaemon.py leaves it for detach)."""
        with self.lock.exclusive():
            self.volume.flush()

    def on_failure(self, req: Request, exc: Exception) -> None:
        if isinstance(exc, BlockAuthError):
            daemonlog.report_integrity(log, self.name, f"block {exc.block_no}", exc)
            if self._on_error:
                self._on_error(str(exc))
            self.reply_error(req.unique, errno.EIO)
        elif isinstance(exc, OSError):
            log.error("volume I/O error: %s", exc)
            self.reply_error(req.unique, exc.errno or errno.EIO)
        else:
            super().on_failure(req, exc)

    def _build_handlers(self) -> dict[int, Handler]:
        """Reads run alongside each other; a write is sealed before it takes the lock; every
        other request runs alone."""
        alone: dict[int, Handler] = {
            INIT: lambda req: self.init_reply(req, FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO),
            FSYNC: self._sync, FSYNCDIR: self._sync, SYNCFS: self._sync, FLUSH: self._ok,
            FALLOCATE: self._fallocate, GETATTR: self._getattr, SETATTR: self._getattr, LOOKUP: self._lookup,
            OPEN: lambda req: self.reply(req.unique, OPEN_OUT.pack(0, FOPEN_DIRECT_IO, 0)),
            OPENDIR: lambda req: self.reply(req.unique, OPEN_OUT.pack(0, 0, 0)),
            READDIR: self._readdir, SETXATTR: self._setxattr, GETXATTR: self._getxattr,
            LISTXATTR: self._unsupported, RELEASE: self._ok, RELEASEDIR: self._ok, ACCESS: self._ok,
            STATFS: self._statfs, DESTROY: self._destroy,
        }
        handlers = {opcode: self._exclusive(handler) for opcode, handler in alone.items()}
        handlers.update({READ: self._read, WRITE: self._write})
        return handlers

    def _exclusive(self, handler: Handler) -> Handler:
        def run(req: Request) -> bool | None:
            self.lock.acquire_exclusive()
            try:
                return handler(req)
            finally:
                self.lock.release_exclusive()
        return run

    def _read(self, req: Request) -> None:
        _fh, offset, size, _flags = READ_IN.unpack_from(req.body)
        self.lock.acquire_shared()
        try:
            end = min(offset + size, self.volume.size)
            data = self.volume.read(offset, max(0, end - offset)) if offset < end else b""
        finally:
            self.lock.release_shared()
        self.reply(req.unique, data)

    def _write(self, req: Request) -> None:
        _fh, offset, size, _wflags, _owner, _flags, _pad = WRITE_IN.unpack_from(req.body)
        data = req.body[WRITE_IN.size:WRITE_IN.size + size]  # this thread's buffer: valid until it reads again
        sealed = self.volume.seal_ahead(offset, data)  # before the lock, while another write is written
        self.lock.acquire_exclusive()
        try:
            if offset + len(data) > self.volume.size:
                raise FuseError(errno.ENOSPC)
            self.reply(req.unique, WRITE_OUT.pack(self.volume.write(offset, data, sealed), 0))
        finally:
            self.lock.release_exclusive()

    def _ok(self, req: Request) -> None:
        self.reply(req.unique)

    def _unsupported(self, req: Request) -> None:
        raise FuseError(errno.EOPNOTSUPP)

    def _sync(self, req: Request) -> None:
        self.volume.flush()
        self.reply(req.unique)

    def _fallocate(self, req: Request) -> None:
        _fh, offset, length, mode = FALLOCATE_IN.unpack_from(req.body)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and offset < self.volume.size:
            self.volume.discard(offset, min(length, self.volume.size - offset))
        elif not (mode == 0 and offset + length <= self.volume.size):  # preallocation inside: nothing to do
            raise FuseError(errno.EOPNOTSUPP)
        self.reply(req.unique)

    def _getattr(self, req: Request) -> None:
        # SETATTR too: the volume's size and modes are fixed; report them unchanged.
        self.reply(req.unique, ATTR_HEAD.pack(3600, 0, 0), self._attr(req.node))

    def _lookup(self, req: Request) -> None:
        (name,) = request_names(req.body, 1)
        if req.node != ROOT_ID or name != FILE_NAME:
            raise FuseError(errno.ENOENT)
        self.reply(req.unique, ENTRY_HEAD.pack(FILE_ID, 0, 3600, 3600, 0, 0), self._attr(FILE_ID))

    def _readdir(self, req: Request) -> None:
        _fh, offset, size, _flags = READ_IN.unpack_from(req.body)
        entries = [(ROOT_ID, b".", stat.S_IFDIR), (ROOT_ID, b"..", stat.S_IFDIR), (FILE_ID, FILE_NAME, stat.S_IFREG)]
        out = bytearray()
        for i, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
            rec = pack_dirent(ino, i, name, kind)
            if len(out) + len(rec) > size:
                break
            out += rec
        self.reply(req.unique, bytes(out))

    def _setxattr(self, req: Request) -> None:
        name, value, _flags = setxattr_request(req.body)
        if req.node == FILE_ID and name in (CONTROL_CREATE, CONTROL_DELETE):
            self.volume.control(name, value)  # an OSError answers its errno
            self.reply(req.unique)
        elif req.node == FILE_ID and name == RESIZE_XATTR:
            self._resize(req.unique, value)
        else:
            raise FuseError(errno.EOPNOTSUPP)

    def _getxattr(self, req: Request) -> None:
        size, _pad = GETXATTR_IN.unpack_from(req.body)
        (name,) = request_names(req.body[GETXATTR_IN.size:], 1)
        if req.node != FILE_ID or not (name == CONTROL_LIST or name.startswith(CONTROL_LIST_PAGE)):
            raise FuseError(errno.ENODATA)
        payload, error = xattr_reply(self.volume.query(name), size)
        if error:
            raise FuseError(error)
        self.reply(req.unique, payload)

    def _statfs(self, req: Request) -> None:
        blocks = self.volume.size // 4096
        self.reply(req.unique, STATFS_OUT.pack(blocks, 0, 0, 1, 0, 4096, 255, 4096, 0))

    def _destroy(self, req: Request) -> bool:
        self.volume.flush()
        self.reply(req.unique)
        return False
