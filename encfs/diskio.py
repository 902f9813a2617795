"""Checked writes to backing files, shared by the filesystem and the volumes.

Invariant: a write either completes or raises. ``os.pwrite`` may write less than it was
given (the backing filesystem filling up is how ENOSPC first shows), and a short write that
goes unnoticed leaves a torn block behind while the caller reports success. Every write of
encfs data to a backing file goes through ``pwrite_all``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

_libc = ctypes.CDLL(None, use_errno=True)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a short write is retried from where it stopped, so
    this returns only once everything is written, or raises (ENOSPC when the disk is full)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def pwritev_all(fd: int, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> int:
    """``pwrite_all`` of the concatenation of ``parts`` (without building it); returns its length."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    done = 0
    while views:
        n = os.pwritev(fd, views, offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return total


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE ...); OSError on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fsync_dir(path: bytes | str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: bytes | str) -> None:
    """Make everything written to the filesystem holding ``path`` durable (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4  # linux/fs.h
_AT_FDCWD = -100


def renameat2(src: bytes | str | os.PathLike[str], dst: bytes | str | os.PathLike[str], flags: int,
              src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD) -> None:
    """renameat2(2): RENAME_NOREPLACE (EEXIST if ``dst`` exists), RENAME_EXCHANGE (swap the two),
    RENAME_WHITEOUT; relative names from the directory fds given. OSError on failure (EINVAL where
    the filesystem does not support ``flags``)."""
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fsdecode(dst))
