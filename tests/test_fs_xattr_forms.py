"""Which backing form an xattr takes (FORMAT.md §6.3), without a mount: FIFOs, sockets and
devices keep theirs in trusted.*, known from their attributes; a regular file's non-user xattrs
cost no backing stat to choose the form."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_fs_api import CTX, create, new_fs

from encfs.fuse.fs import EncryptedFS
from encfs.fuseproto.wire import ROOT_ID
from encfs.keys.service import KeyService


@pytest.fixture
def fs(tmp_path: Path, service: KeyService) -> Iterator[EncryptedFS]:
    filesystem = new_fs(tmp_path, service)
    yield filesystem
    filesystem.close_all()


def _backing_xattrs(fs: EncryptedFS, name: bytes) -> list[str]:
    path = fs.names.backing_entry(fs.names.encrypt_name(name, fs._dirid(ROOT_ID)))[0]
    return os.listxattr(os.path.join(fs.root, path), follow_symlinks=False)


def test_a_fifo_keeps_security_xattrs_in_trusted_also_after_its_unlink(fs: EncryptedFS) -> None:
    inode = fs.mknod(ROOT_ID, b"fifo", stat.S_IFIFO | 0o600, 0, CTX).st_ino
    fs.setxattr(inode, b"security.test", b"one", CTX)
    assert [n for n in _backing_xattrs(fs, b"fifo") if not n.startswith("user.encfs.")] != []
    assert all(n.startswith("trusted.encfs.xp.") for n in _backing_xattrs(fs, b"fifo"))
    fs.unlink(ROOT_ID, b"fifo", CTX)  # the kernel still holds it (an fd): reached by the held fd
    fs.setxattr(inode, b"trusted.test", b"two", CTX)
    assert fs.getxattr(inode, b"security.test", CTX) == b"one"
    assert sorted(fs.listxattr(inode, CTX)) == [b"security.test", b"trusted.test"]


def test_a_regular_file_s_non_user_xattrs_take_no_backing_stat(fs: EncryptedFS,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    inode = create(fs, b"file", b"data")
    fs.setxattr(inode, b"security.test", b"v", CTX)
    calls = []
    lstat = fs.bd.lstat
    monkeypatch.setattr(fs.bd, "lstat", lambda target: calls.append(target) or lstat(target))
    for _ in range(10):
        assert fs.getxattr(inode, b"security.test", CTX) == b"v"
    assert calls == []
    assert all(n.startswith("user.encfs.") for n in _backing_xattrs(fs, b"file"))
