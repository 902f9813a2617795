"""A minimal FUSE server, speaking /dev/fuse directly, that serves one file.

pyfuse3 has no FALLOCATE handler, and discard from a loop device reaches the
backing file as fallocate(PUNCH_HOLE); so volumes use this small server of
their own: a root directory holding exactly one regular file, ``volume``,
whose reads, writes, fsyncs and hole punches go to a ``SectorStore``.

Invariants:
- Requests are handled one at a time, in arrival order, on one thread.
- The file is opened with FOPEN_DIRECT_IO: the page cache never holds
  volume data, so a loop device on top does not cache it twice (the
  deadlock hazard in ../shared/notes/block.md) and every flush from the
  loop device reaches SectorStore.flush().
- An authentication failure answers EIO for that request only.
- DESTROY, a vanished mount (ENODEV) or stop() flushes the store and ends serve().
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Callable

from encfs.blocks import BlockAuthError
from encfs.errors import EncfsError

log = logging.getLogger("encfs.block")

ROOT_ID = 1
FILE_ID = 2
FILE_NAME = b"volume"
MAX_WRITE = 1 << 20
_BUF = MAX_WRITE + 4096

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, FLUSH, INIT = 21, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS = 27, 28, 29, 30, 34
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, LSEEK, SYNCFS = 36, 38, 42, 43, 46, 50

FOPEN_DIRECT_IO = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_MAX_PAGES = 1 << 22
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header (40)
_OUT = struct.Struct("<IiQ")  # fuse_out_header (16)
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88)
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out (64)
_READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (+ lock_owner, flags...)
_WRITE_IN = struct.Struct("<QQIIQII")  # 40 bytes, then data
_FALLOC_IN = struct.Struct("<QQQI4x")
_ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs
_ATTR_HEAD = struct.Struct("<QII")  # attr_valid, nsec, dummy
_OPEN_OUT = struct.Struct("<QII")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs (80)
_DIRENT = struct.Struct("<QQII")
_SETXATTR_IN = struct.Struct("<II")  # size, flags (no FUSE_SETXATTR_EXT negotiated)
_INVAL_INODE = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out: ino, off, len
NOTIFY_INVAL_INODE = 2
RESIZE_XATTR = b"user.encfs.resize"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


class VolumeFile:
    """What the server needs from the volume: size, I/O and durability."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> int: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def grow(self, new_size: int) -> None: ...


def fuse_mount(mountpoint: str, fsname: str) -> int:
    """Open /dev/fuse and mount it at ``mountpoint`` (root only); return the fd."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,max_read={MAX_WRITE}".encode()
    if _libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.encfs-volume",
                   MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount of {mountpoint}: {os.strerror(e)}")
    return fd


def fuse_unmount(mountpoint: str, lazy: bool = False) -> None:
    if _libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unmount of {mountpoint}: {os.strerror(e)}")


class StopServing(Exception):
    """Raised by stop() (from a signal handler) to end a wait for the next request."""


class VolumeServer:
    """Serves ``volume`` from one VolumeFile over an open /dev/fuse descriptor."""

    def __init__(self, fd: int, volume: VolumeFile, on_error: Callable[[str], None] | None = None) -> None:
        self.fd = fd
        self.volume = volume
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time()
        self._running = True
        self._idle = False
        self._on_error = on_error

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self.fd, _OUT.pack(_OUT.size + len(payload), -error, unique) + payload)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                raise

    def _attr(self, node: int) -> bytes:
        t = int(self.started)
        if node == ROOT_ID:
            return _ATTR.pack(ROOT_ID, 0, 0, t, t, t, 0, 0, 0, stat.S_IFDIR | 0o700, 2, self.uid, self.gid,
                              0, 4096, 0)
        size = self.volume.size
        return _ATTR.pack(FILE_ID, size, size // 512, t, t, t, 0, 0, 0, stat.S_IFREG | 0o600, 1, self.uid,
                          self.gid, 0, 4096, 0)

    def _resize(self, unique: int, value: bytes) -> None:
        """Online grow, asked for with setxattr(RESIZE_XATTR, decimal size) on the file."""
        try:
            new_size = int(value.decode())
        except ValueError:
            self._reply(unique, error=errno.EINVAL)
            return
        try:
            self.volume.grow(new_size)
        except EncfsError as e:
            log.error("online resize to %d failed: %s", new_size, e.message)
            self._reply(unique, error=errno.EINVAL if "shrink" in e.message else errno.ENOSPC)
            return
        self._reply(unique)
        # The kernel caches the file's size: tell it to ask again.
        os.write(self.fd, _OUT.pack(_OUT.size + _INVAL_INODE.size, NOTIFY_INVAL_INODE, 0)
                 + _INVAL_INODE.pack(FILE_ID, 0, -1))

    def stop(self) -> None:
        """Make serve() return after the current request. Meant for a signal handler:
        if serve() is waiting for a request, it is interrupted at once."""
        self._running = False
        if self._idle:
            raise StopServing

    def serve(self) -> None:
        """Handle requests until the filesystem is unmounted or stop() is called."""
        buf = bytearray(_BUF)
        view = memoryview(buf)
        while self._running:
            try:
                self._idle = True
                try:
                    n = os.readv(self.fd, [buf])
                finally:
                    self._idle = False
            except StopServing:
                break
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if e.errno == errno.ENODEV:  # unmounted
                    break
                raise
            length, opcode, unique, node, _uid, _gid, _pid, _ext, _pad = _IN.unpack_from(buf)
            body = view[_IN.size:n]
            try:
                if not self._dispatch(opcode, unique, node, body):
                    break
            except BlockAuthError as e:
                log.error("volume sector failed authentication: %s", e)
                if self._on_error:
                    self._on_error(str(e))
                self._reply(unique, error=errno.EIO)
            except OSError as e:
                log.error("volume I/O error: %s", e)
                self._reply(unique, error=e.errno or errno.EIO)
        self.volume.flush()

    def _dispatch(self, opcode: int, unique: int, node: int, body: memoryview) -> bool:
        if opcode == INIT:
            major, minor, max_readahead, flags = _INIT_IN.unpack_from(body)
            if major != 7:
                self._reply(unique, error=errno.EPROTO)
                return False
            want = flags & (FUSE_BIG_WRITES | FUSE_MAX_PAGES)
            self._reply(unique, _INIT_OUT.pack(7, min(minor, 38), max_readahead, want, 16, 12, MAX_WRITE, 1,
                                               MAX_WRITE // 4096, 0, 0))
        elif opcode == READ:
            _fh, offset, size, _flags = _READ_IN.unpack_from(body)
            end = min(offset + size, self.volume.size)
            data = self.volume.read(offset, max(0, end - offset)) if offset < end else b""
            self._reply(unique, data)
        elif opcode == WRITE:
            _fh, offset, size, _wflags, _owner, _flags, _pad = _WRITE_IN.unpack_from(body)
            data = bytes(body[_WRITE_IN.size:_WRITE_IN.size + size])
            if offset + len(data) > self.volume.size:
                self._reply(unique, error=errno.ENOSPC)
            else:
                self._reply(unique, struct.pack("<II", self.volume.write(offset, data), 0))
        elif opcode in (FSYNC, FLUSH, FSYNCDIR, SYNCFS):
            if opcode != FLUSH:
                self.volume.flush()
            self._reply(unique)
        elif opcode == FALLOCATE:
            _fh, offset, length, mode = _FALLOC_IN.unpack_from(body)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and offset < self.volume.size:
                self.volume.discard(offset, min(length, self.volume.size - offset))
                self._reply(unique)
            elif mode == 0 and offset + length <= self.volume.size:
                self._reply(unique)  # preallocation inside the volume: nothing to do
            else:
                self._reply(unique, error=errno.EOPNOTSUPP)
        elif opcode == GETATTR or opcode == SETATTR:
            # SETATTR: the volume's size and modes are fixed; report them unchanged.
            self._reply(unique, _ATTR_HEAD.pack(3600, 0, 0) + self._attr(node))
        elif opcode == LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            if node == ROOT_ID and name == FILE_NAME:
                self._reply(unique, _ENTRY_HEAD.pack(FILE_ID, 0, 3600, 3600, 0, 0) + self._attr(FILE_ID))
            else:
                self._reply(unique, error=errno.ENOENT)
        elif opcode == OPEN:
            self._reply(unique, _OPEN_OUT.pack(0, FOPEN_DIRECT_IO, 0))
        elif opcode == OPENDIR:
            self._reply(unique, _OPEN_OUT.pack(0, 0, 0))
        elif opcode == READDIR:
            _fh, offset, size, _flags = _READ_IN.unpack_from(body)
            entries = [(ROOT_ID, b".", 4), (ROOT_ID, b"..", 4), (FILE_ID, FILE_NAME, 8)]
            out = bytearray()
            for i, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
                rec = _DIRENT.pack(ino, i, len(name), kind) + name
                rec += b"\0" * (-len(rec) % 8)
                if len(out) + len(rec) > size:
                    break
                out += rec
            self._reply(unique, bytes(out))
        elif opcode == SETXATTR:
            size_len, _flags = _SETXATTR_IN.unpack_from(body)
            name, _, rest = bytes(body[_SETXATTR_IN.size:]).partition(b"\0")
            if node != FILE_ID or name != RESIZE_XATTR:
                self._reply(unique, error=errno.EOPNOTSUPP)
                return True
            self._resize(unique, rest[:size_len])
        elif opcode in (GETXATTR, LISTXATTR):
            self._reply(unique, error=errno.EOPNOTSUPP)
        elif opcode in (RELEASE, RELEASEDIR, ACCESS):
            self._reply(unique)
        elif opcode == STATFS:
            blocks = self.volume.size // 4096
            self._reply(unique, _STATFS_OUT.pack(blocks, 0, 0, 1, 0, 4096, 255, 4096, 0))
        elif opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            pass  # no reply expected
        elif opcode == DESTROY:
            self.volume.flush()
            self._reply(unique)
            return False
        else:
            self._reply(unique, error=errno.ENOSYS)
        return True
