"""POSIX semantics of a real encfs mount, entries used after their last name is gone: an open FIFO
that was unlinked, a directory removed while open or while it is a cwd, a socket held by an O_PATH
fd, each answering fstat, fchmod, fchown and futimens as on ext4 (nlink 0).

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in
tests/semantics_helpers.py); the whole module runs once per FUSE server. The kernel opens a FIFO
itself and sends no OPEN for it, so the daemon has no handle to answer from: it keeps an O_PATH fd
of the backing entry from its removal until the kernel forgets the inode (inomap.py).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from fuse_helpers import Mount
from semantics_helpers import bind_unix_socket, d_fixture, mnt_fixture, server_fixture  # noqa: F401  (the fixtures)


def _deleted_backing_fds(m: Mount) -> list[str]:
    """The daemon's fds of backing entries that have no name left."""
    out = []
    for fd in os.listdir(f"/proc/{m.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{m.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(str(m.cipherdir)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def _wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _changes_through_fd(fd: int, kind: int) -> None:
    """fstat, fchmod, fchown and futimens of ``fd``, whose file has no name left."""
    st = os.fstat(fd)
    assert stat.S_IFMT(st.st_mode) == kind and st.st_nlink == 0
    os.fchmod(fd, 0o640)
    os.fchown(fd, 65534, 65534)
    os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
    st = os.fstat(fd)
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (65534, 65534)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)


def test_unlinked_fifo_answers_through_its_fd(mnt: Mount, d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p, 0o600)
    fd = os.open(p, os.O_RDWR)  # a FIFO opened read-write does not wait for a peer
    try:
        os.write(fd, b"x")
        os.unlink(p)
        for i in range(50):  # new backing inodes meanwhile: the number must not be reused for one
            (d / f"new{i}").write_bytes(b"")
        _changes_through_fd(fd, stat.S_IFIFO)
        assert os.read(fd, 1) == b"x"
        os.setxattr(fd, "trusted.t", b"t")  # kept in trusted.* (xattrops.py), through the O_PATH fd
        assert os.getxattr(fd, "trusted.t") == b"t" and os.listxattr(fd) == ["trusted.t"]
    finally:
        os.close(fd)
    # The daemon's fd of the backing FIFO goes when the kernel forgets the inode.
    assert _wait_for(lambda: not _deleted_backing_fds(mnt)), _deleted_backing_fds(mnt)


def test_fifo_replaced_by_a_rename_answers_through_its_fd(d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p, 0o600)
    fd = os.open(p, os.O_RDWR)
    try:
        (d / "other").write_bytes(b"y")
        os.rename(d / "other", p)
        _changes_through_fd(fd, stat.S_IFIFO)
        assert (d / "fifo").read_bytes() == b"y"
    finally:
        os.close(fd)


def test_socket_held_by_o_path_answers_fstat_after_unlink(d: Path) -> None:
    p = d / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        bind_unix_socket(s, d, "sock")
        fd = os.open(p, os.O_PATH)
        try:
            os.unlink(p)
            st = os.fstat(fd)
            assert stat.S_ISSOCK(st.st_mode) and st.st_nlink == 0
        finally:
            os.close(fd)


def test_removed_directory_answers_through_its_fd(mnt: Mount, d: Path) -> None:
    p = d / "dir"
    p.mkdir()
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(p)
        _changes_through_fd(fd, stat.S_IFDIR)
        os.fsync(fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)
    assert _wait_for(lambda: not _deleted_backing_fds(mnt)), _deleted_backing_fds(mnt)


def test_removed_cwd_answers_stat_and_lists_empty(d: Path) -> None:
    p = d / "cwd"
    p.mkdir()
    old = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(p)
        os.rmdir(p)
        st = os.stat(".")
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        os.chmod(".", 0o700)
        assert stat.S_IMODE(os.stat(".").st_mode) == 0o700
        assert os.listdir(".") == []
    finally:
        os.fchdir(old)
        os.close(old)
