"""The filesystem's operations without a mount (issue #22, as S3QL's t3_fs_api.py): EncryptedFS is
called directly with a caller context, on a CIPHERDIR in a temporary directory and the session's
real SoftHSM2 token. No kernel, no FUSE: what the kernel would cache or check is not tested here
(tests/test_fuse_semantics.py does that on real mounts)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsconfig import init_filesystem, open_config
from encfs.fuseproto.wire import ROOT_ID, EntryAttributes, FuseError, RequestContext, SetattrFields
from encfs.keys.service import KeyService

CTX = RequestContext(uid=0, gid=0, pid=os.getpid(), umask=0o022)


@pytest.fixture
def fs(tmp_path: Path, service: KeyService) -> Iterator[EncryptedFS]:
    key = service.create_key()["KeyId"]
    cipher = tmp_path / "cipher"
    init_filesystem(cipher, service, key)
    opened = open_config(cipher, service, writable=True)
    filesystem = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service)
    yield filesystem
    filesystem.close_all()


def create(fs: EncryptedFS, name: bytes, data: bytes = b"", parent: int = ROOT_ID) -> int:
    fh, attrs = fs.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    if data:
        assert fs.write(fh, 0, data) == len(data)
    fs.release(fh)
    return attrs.st_ino


def read(fs: EncryptedFS, inode: int, size: int = 1 << 20) -> bytes:
    fh = fs.open(inode, os.O_RDONLY, CTX)
    try:
        opened = fs.reader(fh)
        assert opened is not None
        return bytes(fs.read_open(opened, 0, size))
    finally:
        fs.release(fh)


def names(fs: EncryptedFS, inode: int = ROOT_ID) -> list[bytes]:
    fh = fs.opendir(inode, CTX)
    try:
        entries = fs.readdir(fh, 0, False)
        try:
            return sorted(name for name, _attrs, _next in entries)
        finally:
            entries.close()
    finally:
        fs.releasedir(fh)


def test_files_directories_and_names_round_trip(fs: EncryptedFS) -> None:
    ino = create(fs, b"hello", b"world" * 1000)
    assert fs.lookup(ROOT_ID, b"hello", CTX).st_ino == ino
    assert fs.getattr(ino, CTX).st_size == 5000 and read(fs, ino) == b"world" * 1000
    d = fs.mkdir(ROOT_ID, b"dir", 0o755, CTX).st_ino
    create(fs, b"x" * 255, b"long name", parent=d)
    assert names(fs) == [b"dir", b"hello"] and names(fs, d) == [b"x" * 255]
    assert not any(b"hello" in n or b"dir" == n for n in os.listdir(fs.root))  # names are sealed


def test_rename_unlink_rmdir_and_their_errors(fs: EncryptedFS) -> None:
    create(fs, b"a", b"A")
    d = fs.mkdir(ROOT_ID, b"d", 0o755, CTX).st_ino
    fs.rename(ROOT_ID, b"a", d, b"b", 0, CTX)
    assert names(fs) == [b"d"] and read(fs, fs.lookup(d, b"b", CTX).st_ino) == b"A"
    with pytest.raises(FuseError) as e:
        fs.rmdir(ROOT_ID, b"d", CTX)
    assert e.value.errno == errno.ENOTEMPTY
    fs.unlink(d, b"b", CTX)
    fs.rmdir(ROOT_ID, b"d", CTX)
    with pytest.raises(FuseError) as e:
        fs.lookup(ROOT_ID, b"d", CTX)
    assert e.value.errno == errno.ENOENT


def test_symlinks_xattrs_and_truncate(fs: EncryptedFS) -> None:
    link = fs.symlink(ROOT_ID, b"l", b"/some/target", CTX).st_ino
    assert fs.readlink(link, CTX) == b"/some/target"
    ino = create(fs, b"f", b"0123456789")
    fs.setxattr(ino, b"user.k", b"v", CTX)
    assert fs.getxattr(ino, b"user.k", CTX) == b"v" and b"user.k" in fs.listxattr(ino, CTX)
    fs.setattr(ino, EntryAttributes(st_size=4), SetattrFields(update_size=True), None, CTX)
    assert read(fs, ino) == b"0123"


def test_fsync_and_fsyncdir_reach_the_backing_store(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel turns an ENOSYS answer to FSYNC into success, so a mount cannot tell; here the
    backing calls are seen."""
    synced: list[str] = []
    real_fsync, real_fdatasync, real_dir = os.fsync, os.fdatasync, fs.bd.fsync_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(fs.bd, "fsync_dir", lambda path: (synced.append("dir"), real_dir(path))[1])
    fh, _attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"durable")
    synced.clear()
    fs.fsync(fh, False)
    assert synced and set(synced) <= {"fsync", "fdatasync"}
    fs.release(fh)
    dh = fs.opendir(ROOT_ID, CTX)
    synced.clear()
    fs.fsyncdir(dh, False)
    fs.releasedir(dh)
    assert synced[:1] == ["dir"]  # (fsync_dir itself then fsyncs the directory)
