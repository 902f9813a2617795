"""The FUSE kernel protocol's wire format (linux/fuse.h, protocol 7.PROTOCOL_MINOR).

Every opcode is in OPS with its name, the size of the fixed part of its body and the names
that follow, and whether it gets a reply; requests come as Request, fuse_in_header by name.

Invariants:
- The struct layouts are those of protocol 7.31; a kernel offering more is answered with 7.31.
- OPS is the one place an opcode's sizes live: the server checks a body against them
  (``malformed``) before any handler unpacks it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import NamedTuple

ROOT_ID = 1
MAX_WRITE = 1 << 20
BUFFER_SIZE = MAX_WRITE + 4096  # the kernel wants room for one maximal WRITE plus its headers
PROTOCOL_MINOR = 31  # the struct layouts below are those of 7.31

# opcodes (linux/fuse.h); OPS below names them and gives their sizes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK = 27, 28, 29, 30, 31, 32
SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS = 45, 46, 47, 48, 49, 50
TMPFILE, STATX = 51, 52

# INIT flags
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
# The server clears set-id bits and security.capability on write, truncate and chown (encfs.fuse.server)
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_INIT_EXT = 1 << 30  # init_in/init_out carry flags2, the flags' upper 32 bits
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36  # shared mmap of a FOPEN_DIRECT_IO file (kernels from 6.6)

# open_out flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6  # honoured by kernels from 6.2; older ones ignore it

# write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0  # a delayed write of the page cache (writeback), not a write(2) in progress
FUSE_WRITE_KILL_SUIDGID = 1 << 2  # the writer lacks CAP_FSETID (sent by the kernel since 7.31)

# open_in.open_flags
FUSE_OPEN_KILL_SUIDGID = 1 << 0  # an O_TRUNC open by a caller without CAP_FSETID (HANDLE_KILLPRIV_V2)

# setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256
FATTR_KILL_SUIDGID = 1 << 11  # truncate without CAP_FSETID, or chown (HANDLE_KILLPRIV_V2)

FSYNC_FDATASYNC = 1
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
# Times are signed (the kernel reads them as time64_t): before 1970 they are negative.
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (88 bytes)
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_IN_FLAGS2 = struct.Struct("<I")  # flags2, after INIT_IN when flags has FUSE_INIT_EXT
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out (64 bytes)
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, their nsecs
ATTR_HEAD = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (+ lock_owner, flags, padding)
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # fuse_setattr_in (88 bytes); signed times as in ATTR
GETXATTR_IN = struct.Struct("<II")  # size, padding
ACCESS_IN = struct.Struct("<II")  # mask (R_OK | W_OK | X_OK, or 0 for existence), padding
GETXATTR_OUT = struct.Struct("<II")
SETXATTR_IN = struct.Struct("<II")  # size, flags (FUSE_SETXATTR_EXT is not negotiated)
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQI4x")  # fh, offset, length, mode
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs (80 bytes)
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
INVAL_INODE = struct.Struct("<Qqq")  # ino, off, len
INVAL_ENTRY = struct.Struct("<QII")  # parent, namelen, flags; then the name and a NUL
SYNCFS_IN = struct.Struct("<Q")  # padding
LSEEK_IN = struct.Struct("<QQI4x")  # fh, offset, whence
LSEEK_OUT = struct.Struct("<Q")  # offset


@dataclass(frozen=True, slots=True)
class Op:
    """One opcode: its name (for the debug trace), the size of the fixed part of its request
    body, the NUL-terminated names that follow it, and whether the kernel waits for a reply."""

    name: str
    size: int = 0
    names: int = 0
    reply: bool = True


OPS: dict[int, Op] = {
    LOOKUP: Op("LOOKUP", names=1), FORGET: Op("FORGET", FORGET_IN.size, reply=False),
    GETATTR: Op("GETATTR"), SETATTR: Op("SETATTR", SETATTR_IN.size), READLINK: Op("READLINK"),
    SYMLINK: Op("SYMLINK", names=2), MKNOD: Op("MKNOD", MKNOD_IN.size, 1), MKDIR: Op("MKDIR", MKDIR_IN.size, 1),
    UNLINK: Op("UNLINK", names=1), RMDIR: Op("RMDIR", names=1), RENAME: Op("RENAME", RENAME_IN.size, 2),
    LINK: Op("LINK", LINK_IN.size, 1), OPEN: Op("OPEN", OPEN_IN.size), READ: Op("READ", READ_IN.size),
    WRITE: Op("WRITE", WRITE_IN.size), STATFS: Op("STATFS"), RELEASE: Op("RELEASE", RELEASE_IN.size),
    FSYNC: Op("FSYNC", FSYNC_IN.size), SETXATTR: Op("SETXATTR", SETXATTR_IN.size, 1),
    GETXATTR: Op("GETXATTR", GETXATTR_IN.size, 1), LISTXATTR: Op("LISTXATTR", GETXATTR_IN.size),
    REMOVEXATTR: Op("REMOVEXATTR", names=1), FLUSH: Op("FLUSH"), INIT: Op("INIT", INIT_IN.size),
    OPENDIR: Op("OPENDIR", OPEN_IN.size), READDIR: Op("READDIR", READ_IN.size),
    RELEASEDIR: Op("RELEASEDIR", RELEASE_IN.size), FSYNCDIR: Op("FSYNCDIR", FSYNC_IN.size),
    GETLK: Op("GETLK"), SETLK: Op("SETLK"), SETLKW: Op("SETLKW"), ACCESS: Op("ACCESS", ACCESS_IN.size),
    CREATE: Op("CREATE", CREATE_IN.size, 1), INTERRUPT: Op("INTERRUPT", reply=False), BMAP: Op("BMAP"),
    DESTROY: Op("DESTROY"), IOCTL: Op("IOCTL"), POLL: Op("POLL"), NOTIFY_REPLY: Op("NOTIFY_REPLY", reply=False),
    BATCH_FORGET: Op("BATCH_FORGET", BATCH_FORGET_IN.size, reply=False),
    FALLOCATE: Op("FALLOCATE", FALLOCATE_IN.size), READDIRPLUS: Op("READDIRPLUS", READ_IN.size),
    RENAME2: Op("RENAME2", RENAME2_IN.size, 2), LSEEK: Op("LSEEK", LSEEK_IN.size),
    COPY_FILE_RANGE: Op("COPY_FILE_RANGE"), SETUPMAPPING: Op("SETUPMAPPING"),
    REMOVEMAPPING: Op("REMOVEMAPPING"), SYNCFS: Op("SYNCFS", SYNCFS_IN.size), TMPFILE: Op("TMPFILE"),
    STATX: Op("STATX"),
}
UNKNOWN_OP = Op("UNKNOWN")


class Request(NamedTuple):
    """One request: fuse_in_header's fields by name, then the body after it."""

    length: int
    opcode: int
    unique: int
    node: int
    uid: int
    gid: int
    pid: int
    total_extlen: int
    padding: int
    body: memoryview

    def context(self) -> RequestContext:
        return RequestContext(self.uid, self.gid, self.pid)


def malformed(op: Op, body: memoryview) -> str | None:
    """Why a request body is too short for its opcode (None: it is not)."""
    if len(body) < op.size:
        return f"{len(body)} bytes, {op.name} needs {op.size}"
    if op.names and bytes(body[op.size:]).count(b"\0") < op.names:
        return f"{op.name} needs {op.names} NUL-terminated name(s)"
    return None


class FuseError(Exception):
    """Answer the current request with ``errno``."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_)
        self.errno = errno_


@dataclass(slots=True)
class RequestContext:
    """Who asked: the caller's ids and, for requests that create entries, its umask."""

    uid: int
    gid: int
    pid: int
    umask: int = 0


@dataclass(slots=True)
class EntryAttributes:
    """Attributes of one inode as the kernel caches them (fuse_attr plus cache lifetimes)."""

    st_ino: int = 0
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    st_mode: int = 0
    st_nlink: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0

    def pack_attr(self) -> bytes:
        a, m, c = self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns
        return ATTR.pack(self.st_ino, self.st_size, self.st_blocks, a // 10**9, m // 10**9, c // 10**9,
                         a % 10**9, m % 10**9, c % 10**9, self.st_mode, self.st_nlink, self.st_uid,
                         self.st_gid, self.st_rdev & 0xFFFFFFFF, self.st_blksize, 0)

    def pack_entry(self) -> bytes:
        """fuse_entry_out."""
        ev, av = _split_seconds(self.entry_timeout), _split_seconds(self.attr_timeout)
        return ENTRY_HEAD.pack(self.st_ino, self.generation, ev[0], av[0], ev[1], av[1]) + self.pack_attr()

    def pack_attr_out(self) -> bytes:
        """fuse_attr_out."""
        av = _split_seconds(self.attr_timeout)
        return ATTR_HEAD.pack(av[0], av[1], 0) + self.pack_attr()


@dataclass(slots=True)
class SetattrFields:
    """Which attributes a SETATTR changes (the new values are in an EntryAttributes)."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    kill_suidgid: bool = False  # drop S_ISUID, and S_ISGID with group execute (FATTR_KILL_SUIDGID)


def _split_seconds(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


def request_names(body: memoryview, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of a request body."""
    return bytes(body).split(b"\0", count)[:count]


def setxattr_request(body: memoryview) -> tuple[bytes, bytes, int]:
    """(name, value, flags) of a SETXATTR request's body."""
    size, flags = SETXATTR_IN.unpack_from(body)
    name, _, rest = bytes(body[SETXATTR_IN.size:]).partition(b"\0")
    return name, rest[:size], flags


def xattr_reply(data: bytes, size: int) -> tuple[bytes, int]:
    """(payload, errno) for GETXATTR/LISTXATTR: the length if ``size`` is 0, else the data if it fits."""
    if size == 0:
        return GETXATTR_OUT.pack(len(data), 0), 0
    if len(data) > size:
        return b"", errno.ERANGE
    return data, 0


def pack_dirent(ino: int, next_offset: int, name: bytes, mode: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    rec = DIRENT.pack(ino, next_offset, len(name), (mode & 0o170000) >> 12) + name
    return rec + b"\0" * (-len(rec) % 8)
