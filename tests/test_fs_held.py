"""The O_PATH fds kept for removed FIFOs and directories (inomap.py's ``held``), without a mount:
every fd a removal takes is owned by the inode map, and so closed at FORGET, also when a step
after the backing removal fails (tests/test_fuse_semantics_removed.py has the mounted cases)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_fs_api import CTX, new_fs

from encfs.fuse.fs import EncryptedFS
from encfs.fuseproto.wire import ROOT_ID, FuseError
from encfs.keys.service import KeyService


@pytest.fixture
def fs(tmp_path: Path, service: KeyService) -> Iterator[EncryptedFS]:
    filesystem = new_fs(tmp_path, service)
    yield filesystem
    filesystem.close_all()


def _deleted_fds_under(cipher: Path) -> list[str]:
    """This process's fds that lead to a removed entry under ``cipher``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(cipher)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def _fail_after_removal(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step after every backing removal (the long-name side file's) fails."""
    def fail(*args: object) -> None:
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(fs, "_remove_side", fail)


def _removals(fs: EncryptedFS) -> list[tuple[str, Callable[[], int], Callable[[], None]]]:
    """(what, make it and return its inode, remove it)."""
    def fifo() -> int:
        return fs.mknod(ROOT_ID, b"fifo", stat.S_IFIFO | 0o600, 0, CTX).st_ino

    def directory() -> int:
        return fs.mkdir(ROOT_ID, b"dir", stat.S_IFDIR | 0o755, CTX).st_ino

    def replaced() -> int:
        fs.mknod(ROOT_ID, b"other", stat.S_IFIFO | 0o600, 0, CTX)
        return fs.mknod(ROOT_ID, b"target", stat.S_IFIFO | 0o600, 0, CTX).st_ino

    return [("unlink of a FIFO", fifo, lambda: fs.unlink(ROOT_ID, b"fifo", CTX)),
            ("rmdir", directory, lambda: fs.rmdir(ROOT_ID, b"dir", CTX)),
            ("rename over a FIFO", replaced, lambda: fs.rename(ROOT_ID, b"other", ROOT_ID, b"target", 0, CTX))]


@pytest.mark.parametrize("case", range(3), ids=["unlink", "rmdir", "rename"])
def test_a_removal_that_fails_after_the_backing_removal_leaves_no_fd(fs: EncryptedFS, case: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cipher = Path(os.fsdecode(fs.root))
    what, make, remove = _removals(fs)[case]
    inode = make()
    _fail_after_removal(fs, monkeypatch)
    with pytest.raises(FuseError) as failed:
        remove()
    assert failed.value.errno == errno.EIO, what
    assert fs.inodes.held_fd(inode) is not None, f"{what}: no fd held for the removed entry"
    assert _deleted_fds_under(cipher), what
    fs.forget([(inode, 1)])
    assert fs.inodes.held_fd(inode) is None
    assert _deleted_fds_under(cipher) == [], f"{what}: an fd outlived FORGET"
