"""The crash-recovery scan after an unclean shutdown (EncryptedFS.recover_all), kernel-free.

The scan checks every regular file and then removes the journals no file owns: a file the scan
passes over without loading loses its journal, fsync'd blocks and all. A mount test with a real
kill -9 covers the same case end to end.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs
from fuse_helpers import Mount, cold_read
from test_deferred_checkpoint import fs
from test_fs_api import CTX, create, read, walk

from encfs.fuse.fileheader import HEADER_LEN
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsconfig import open_config
from encfs.fuse.journal import file_ids
from encfs.fuseproto.wire import EntryAttributes, SetattrFields
from encfs.keys.service import KeyService

__all__ = ["fs"]  # the fixture (a kernel-free filesystem as a mount runs it), used by name


def crash(fs: EncryptedFS, service: KeyService) -> EncryptedFS:
    """What kill -9 and the next mount's start do: every content dropped without a checkpoint, then
    a filesystem opened with ``recovering`` (its scan not run yet)."""
    for content in fs.files.contents.values():
        content.release_fds()
    fs.files.contents.clear()
    cipher = Path(os.fsdecode(fs.root))
    opened = open_config(cipher, service, writable=True)
    return EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, recovering=True)


def crash_and_scan(fs: EncryptedFS, service: KeyService) -> EncryptedFS:
    again = crash(fs, service)
    again.recover_all(contextlib.nullcontext)
    return again


def all_in_the_journal(fs: EncryptedFS) -> None:
    """A file "f" of 3,000 fsync'd bytes, all of them in its journal (its backing file is its
    header alone), left open."""
    ino = create(fs, b"f", b"A" * 10000)
    fh = fs.open(ino, os.O_RDWR, CTX)
    fs.setattr(ino, EntryAttributes(st_size=3000), SetattrFields(update_size=True), fh, CTX)
    fs.fsync(fh, False)
    assert os.stat(fs.inodes.path(ino)).st_size == HEADER_LEN and file_ids(fs.root)


def loads_fail(m: pytest.MonkeyPatch, fs: EncryptedFS) -> None:
    """Every load of a file's content fails, as on a disk that returns EIO."""
    def load(*_args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")
    m.setattr(fs.files, "_load", load)


def test_a_file_whose_blocks_are_all_in_its_journal_keeps_them(fs: EncryptedFS, service: KeyService) -> None:
    """A truncate into the first block journals that block and cuts the backing file to its header:
    the scan must still load the file, or its journal goes as an orphan's."""
    all_in_the_journal(fs)
    again = crash_and_scan(fs, service)
    try:
        ino = walk(again, [b"f"])
        assert again.getattr(ino, CTX).st_size == 3000
        assert read(again, ino) == b"A" * 3000
    finally:
        again.close_all()


def test_a_file_the_scan_cannot_check_keeps_its_journal_for_the_next_mount(
        fs: EncryptedFS, service: KeyService, monkeypatch: pytest.MonkeyPatch) -> None:
    all_in_the_journal(fs)
    again = crash(fs, service)
    with monkeypatch.context() as m:
        loads_fail(m, again)
        _checked, unrecovered = again.recover_all(contextlib.nullcontext)
    assert unrecovered and file_ids(again.root)  # failed, and the journal stays
    again.close_all()
    third = crash_and_scan(again, service)
    try:
        assert read(third, walk(third, [b"f"])) == b"A" * 3000
    finally:
        third.close_all()


def test_a_directory_the_scan_cannot_list_leaves_every_journal(
        fs: EncryptedFS, service: KeyService, monkeypatch: pytest.MonkeyPatch) -> None:
    all_in_the_journal(fs)
    again = crash(fs, service)
    real_fwalk = os.fwalk

    def fwalk(top: Any, *args: Any, onerror: Any = None, **kwargs: Any) -> Any:
        if onerror is not None:  # a directory below the root that cannot be listed
            onerror(PermissionError(errno.EACCES, "Permission denied", os.path.join(top, b"d")))
        return real_fwalk(top, *args, onerror=onerror, **kwargs)
    with monkeypatch.context() as m:
        loads_fail(m, again)
        m.setattr(again.files, "_keep_journal_of", lambda _path: None, raising=False)  # its id unknown
        m.setattr(os, "fwalk", fwalk)
        _checked, unrecovered = again.recover_all(contextlib.nullcontext)
    assert unrecovered and file_ids(again.root)
    again.close_all()


def test_kill_9_keeps_a_file_truncated_into_its_first_block(tmp_path: Path, fs_home: Path) -> None:
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    with Mount(cipher, plain, fs_home):
        (plain / "f").write_bytes(b"A" * 10000)
    m = Mount(cipher, plain, fs_home)
    try:
        fd = os.open(plain / "f", os.O_RDWR)
        try:
            os.ftruncate(fd, 3000)
            os.fsync(fd)
            m.kill9()
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    finally:
        m.stop()
    with Mount(cipher, plain, fs_home):
        assert cold_read(plain / "f") == b"A" * 3000
