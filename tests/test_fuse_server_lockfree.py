"""The requests the filesystem server answers before its locks (server.py's and serverxattrs.py's
invariants), without a kernel: requests built by hand go through FsServer.handle, replies are read
back from a pipe in place of /dev/fuse, and another thread holds the lock they must not wait for."""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from test_fs_api import CTX, create, new_fs

from encfs.fuse.inomap import InodeMap
from encfs.fuse.server import FsServer
from encfs.fuseproto.wire import GETXATTR, GETXATTR_IN, OUT_HEADER, SETATTR, SETATTR_IN, Request
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


def answer(r: int, seconds: float = 10) -> tuple[int, int]:
    """(unique, error) of the next reply; fails if none comes within ``seconds``."""
    assert select.select([r], [], [], seconds)[0], "no reply"
    _length, error, unique = OUT_HEADER.unpack(os.read(r, 1 << 16)[:OUT_HEADER.size])
    return unique, error


def answered_while_locked(srv: FsServer, r: int, lock: Callable[[], AbstractContextManager[None]],
                          request: Request) -> tuple[int, int]:
    """(unique, error) of ``request``, handled while another thread holds ``lock()``; fails if the
    request waited for it."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock():
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    t2 = None
    try:
        assert held.wait(10)
        done = threading.Event()
        t2 = threading.Thread(target=lambda: (srv.handle(request), done.set()))
        t2.start()
        assert done.wait(5), "the request waited for the lock"
        got = answer(r)
    finally:
        release.set()
        t.join()
        if t2 is not None:
            t2.join()
    return got


def test_a_capability_known_absent_is_answered_while_the_inode_is_locked(server: tuple[FsServer, int]) -> None:
    """The kernel's question before a new file's first write needs no lock."""
    srv, r = server
    inode = create(srv.fs, b"new")  # a file this daemon made has no capability (known at once)
    assert srv.fs.lacks_capability(inode)
    got = answered_while_locked(srv, r, lambda: srv.locks.inode(inode), getxattr(inode, b"security.capability"))
    assert got == (7, -errno.ENODATA)


def setattr_ctime(node: int, unique: int = 7) -> Request:
    """The kernel's time flush after an unlink (FATTR_CTIME)."""
    body = SETATTR_IN.pack(1 << 10, 0, 0, 0, 0, 0, 0, 1_700_000_000, 0, 0, 5, 0, 0, 0, 0, 0)
    return Request(40 + len(body), SETATTR, unique, node, 0, 0, os.getpid(), 0, 0, memoryview(body))


def test_the_time_flush_after_an_unlink_is_answered_while_the_inode_is_locked(
        server: tuple[FsServer, int]) -> None:
    srv, r = server
    inode = create(srv.fs, b"gone")
    srv.fs.unlink(1, b"gone", CTX)
    assert srv.fs.unreachable(inode)
    assert answered_while_locked(srv, r, lambda: srv.locks.inode(inode), setattr_ctime(inode)) == (7, -errno.ENOENT)


def test_the_time_flush_waits_while_a_tree_change_runs(server: tuple[FsServer, int]) -> None:
    """Only an operation holding the namespace lock exclusively can give an unreachable inode a
    name back (a LOOKUP through another hard link, say): while one runs, the SETATTR takes the
    locks and is answered after it."""
    srv, r = server
    inode = create(srv.fs, b"gone")
    srv.fs.unlink(1, b"gone", CTX)
    t = None
    with srv.locks.tree():
        t = threading.Thread(target=srv.handle, args=(setattr_ctime(inode),))
        t.start()
        assert not select.select([r], [], [], 0.5)[0], "answered while a tree change ran"
    t.join(10)
    assert answer(r) == (7, -errno.ENOENT)


def test_a_rename_never_leaves_a_path_set_empty() -> None:
    """The lock-free reader above reads an inode's paths while a rename may change them."""
    emptied = []

    class Watched(set[bytes]):
        def discard(self, item: bytes) -> None:
            super().discard(item)
            if not self:
                emptied.append(item)

    inodes = InodeMap(b"/")
    inodes.paths[5] = Watched({b"d/a"})
    inodes.paths[6] = Watched({b"d"})
    inodes.rename_paths(b"d", b"e")
    inodes.swap_paths(b"e/a", b"x")
    assert emptied == [] and inodes.paths[5] == {b"x"} and inodes.paths[6] == {b"e"}


def test_a_number_seen_as_a_regular_file_is_no_longer_special(server: tuple[FsServer, int]) -> None:
    """A read-only mount beside another host's writer may see a FIFO's number come back as a
    regular file's: its xattrs are then in the user.* form again."""
    srv, _r = server
    inode = create(srv.fs, b"file")
    srv.fs._special_inodes.add(inode)  # as if the number had been a FIFO's
    srv.fs.getattr(inode, CTX)
    assert not srv.fs._special(inode)


def test_a_setattr_of_a_file_with_a_name_or_a_handle_takes_the_locked_path(server: tuple[FsServer, int]) -> None:
    srv, r = server
    named = create(srv.fs, b"named")
    srv.handle(setattr_ctime(named, 8))
    assert answer(r) == (8, 0)
    fh, attrs = srv.fs.create(1, b"open", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    srv.fs.unlink(1, b"open", CTX)  # unlinked while open: still reached through its handle
    assert not srv.fs.unreachable(attrs.st_ino)
    srv.handle(setattr_ctime(attrs.st_ino, 9))
    assert answer(r) == (9, 0)
    srv.fs.release(fh)
    assert srv.fs.unreachable(attrs.st_ino)


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
