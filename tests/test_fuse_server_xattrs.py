"""The filesystem server's xattr requests without a kernel (serverxattrs.py): requests built by
hand go through FsServer.handle, replies are read back from a pipe in place of /dev/fuse."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_fs_api import CTX, create, new_fs

from encfs.fuse.server import FsServer
from encfs.fuseproto.wire import GETXATTR, GETXATTR_IN, OUT_HEADER, Request
from encfs.keys.service import KeyService


@pytest.fixture
def server(tmp_path: Path, service: KeyService) -> Iterator[tuple[FsServer, int]]:
    fs = new_fs(tmp_path, service)
    r, w = os.pipe()
    try:
        yield FsServer(w, fs), r
    finally:
        fs.close_all()
        os.close(r)
        os.close(w)


def getxattr(node: int, name: bytes, unique: int = 7) -> Request:
    body = GETXATTR_IN.pack(0, 0) + name + b"\0"
    return Request(40 + len(body), GETXATTR, unique, node, 0, 0, os.getpid(), 0, 0, memoryview(body))


def answer(r: int) -> tuple[int, int]:
    """(unique, error) of the next reply."""
    _length, error, unique = OUT_HEADER.unpack(os.read(r, 1 << 16)[:OUT_HEADER.size])
    return unique, error


def test_a_capability_known_absent_is_answered_while_the_inode_is_locked(server: tuple[FsServer, int]) -> None:
    """The kernel's question before a new file's first write needs no lock: answered even while
    another request holds the inode (here a thread holding its lock for the test's length)."""
    srv, r = server
    inode = create(srv.fs, b"new")  # a file this daemon made has no capability (known at once)
    assert srv.fs.lacks_capability(inode)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with srv.locks.inode(inode):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        done = threading.Event()
        t2 = threading.Thread(target=lambda: (srv.handle(getxattr(inode, b"security.capability")), done.set()))
        t2.start()
        assert done.wait(5), "GETXATTR(security.capability) waited for the inode's lock"
        assert answer(r) == (7, -errno.ENODATA)
    finally:
        release.set()
        t.join()
    t2.join()


def test_other_names_and_unknown_inodes_take_the_locked_path(server: tuple[FsServer, int]) -> None:
    srv, r = server
    inode = create(srv.fs, b"file")
    srv.fs.setxattr(inode, b"security.capabilityX", b"v", CTX)
    srv.handle(getxattr(inode, b"security.capabilityX", 8))  # not the capability: read from the backing file
    assert answer(r) == (8, 0)
    other = srv.fs.mknod(1, b"fifo", stat.S_IFIFO | 0o600, 0, CTX).st_ino
    assert not srv.fs.lacks_capability(other)
    srv.handle(getxattr(other, b"security.capability", 9))  # asked of the backing store, then known
    assert answer(r) == (9, -errno.ENODATA) and srv.fs.lacks_capability(other)
