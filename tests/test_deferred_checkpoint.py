"""Checkpoints deferred past a file's last close (issue #25; openfiles.py's invariants).

A closed file's journal is checkpointed CHECKPOINT_DELAY later by the mount's checkpoint
thread; a file unlinked first (SQLite's -journal) needs none. Kernel-free tests call
EncryptedFS directly; the mount tests use a real mount and kill -9.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_encfs
from encfs.fuse import openfiles
from encfs.fuse.content import FileContent
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsconfig import DEFAULT_BLOCK_SIZE, open_config
from encfs.fuse.journal import file_ids
from encfs.fuseproto.wire import ROOT_ID, EntryAttributes, SetattrFields
from encfs.keys.service import KeyService
from fuse_helpers import Mount, cold_read, crash_during
from test_fs_api import CTX, new_fs

BLOCK = DEFAULT_BLOCK_SIZE


@pytest.fixture
def fs(tmp_path: Path, service: KeyService) -> Iterator[EncryptedFS]:
    filesystem = new_fs(tmp_path, service)
    filesystem.files.defer_checkpoints = True  # as mount.py does
    yield filesystem
    filesystem.close_all()


def journaled_file(fs: EncryptedFS, name: bytes) -> tuple[int, int]:
    """A file of two blocks whose first block was overwritten (so it is in the journal),
    still open: (inode, handle)."""
    fh, attrs = fs.create(ROOT_ID, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"a" * 2 * BLOCK)
    fs.fsync(fh, False)
    fs.write(fh, 100, b"new")
    return attrs.st_ino, fh


def journals(fs: EncryptedFS) -> set[bytes]:
    return file_ids(fs.root)


def read_all(fs: EncryptedFS, inode: int) -> bytes:
    fh = fs.open(inode, os.O_RDONLY, CTX)
    try:
        opened = fs.reader(fh)
        return b"" if opened is None else bytes(fs.read_open(opened, 0, 1 << 20))  # None: no header
    finally:
        fs.release(fh)


def run_due(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch, later: float) -> None:
    """run_deferred() as the mount's thread runs it, ``later`` seconds from now."""
    now = time.monotonic() + later
    with monkeypatch.context() as mp:
        mp.setattr("encfs.fuse.fs.time.monotonic", lambda: now)
        fs.run_deferred(lambda inode: contextlib.nullcontext())


def spy_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = FileContent.checkpoint

    def checkpoint(self: FileContent) -> None:
        calls.append(1)
        real(self)
    monkeypatch.setattr(FileContent, "checkpoint", checkpoint)
    return calls


def test_a_file_unlinked_before_its_checkpoint_never_gets_one(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"db-journal")
    fs.fsync(fh, False)
    fs.release(fh)
    assert inode in fs.files.contents and journals(fs), "closed, its checkpoint waits"
    fs.unlink(ROOT_ID, b"db-journal", CTX)
    assert not calls, "an unlinked file's journal is dropped, not copied into place"
    assert not journals(fs) and inode not in fs.files.contents and not fs.files.deferred
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 1)
    assert not calls


def test_a_file_unlinked_while_open_drops_its_journal_at_its_close(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELEASE may reach the daemon after the UNLINK of the file's last name (the kernel sends it
    in the background): nothing waits then, the journal goes at once."""
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.unlink(ROOT_ID, b"f", CTX)
    assert journals(fs)
    fs.release(fh)
    assert not fs.files.deferred and not journals(fs) and inode not in fs.files.contents and not calls


def test_a_closed_file_is_checkpointed_once_its_delay_is_over(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY / 2)
    assert not calls and journals(fs), "not yet due"
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 0.01)
    assert calls == [1] and not journals(fs) and inode not in fs.files.contents
    expected = b"a" * 100 + b"new" + b"a" * (2 * BLOCK - 103)
    assert read_all(fs, inode) == expected
    # and from the backing file alone, as the next mount reads it
    fs.close_all()
    opened = open_config(Path(os.fsdecode(fs.root)), fs.files.ks, writable=False)  # type: ignore[arg-type]
    again = EncryptedFS(fs.root, opened.config, opened.keys, fs.files.ks, read_only=True)
    try:
        assert read_all(again, again.lookup(ROOT_ID, b"f", CTX).st_ino) == expected
    finally:
        again.close_all()


def test_a_checkpoint_keeps_the_times_the_file_had(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying journaled blocks into place changes no contents: the mtime the kernel set (as tar
    and cp -p do, right before the close) is still there after the checkpoint, and after a remount."""
    inode, fh = journaled_file(fs, b"f")
    when = 1_600_000_000_123_456_789
    fs.setattr(inode, EntryAttributes(st_atime_ns=when, st_mtime_ns=when),
               SetattrFields(update_atime=True, update_mtime=True), fh, CTX)
    fs.release(fh)
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 0.01)
    assert not journals(fs), "checkpointed"
    assert fs.getattr(inode, CTX).st_mtime_ns == when
    assert os.stat(fs.inodes.path(inode)).st_mtime_ns == when  # the backing file, as a remount sees it


def test_a_file_opened_again_before_its_checkpoint_keeps_its_content(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    content = fs.files.contents[inode]
    fh = fs.open(inode, os.O_RDWR, CTX)
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 1)
    assert not calls, "open again: no checkpoint under its handle"
    fs.write(fh, 0, b"x")
    assert fs.files.contents[inode] is content
    fs.release(fh)
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 1)
    assert calls == [1] and not journals(fs)
    assert read_all(fs, inode)[:104] == b"x" + b"a" * 99 + b"new" + b"a"


def test_truncate_to_zero_of_a_waiting_file_drops_it(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    fh = fs.open(inode, os.O_RDWR | os.O_TRUNC, CTX)
    fs.release(fh)
    assert not fs.files.deferred and not journals(fs) and not calls
    assert read_all(fs, inode) == b""


def test_past_deferred_max_a_close_checkpoints_at_once(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openfiles, "DEFERRED_MAX", 2)
    calls = spy_checkpoints(monkeypatch)
    for name in (b"a", b"b", b"c"):
        _inode, fh = journaled_file(fs, name)
        fs.release(fh)
    assert len(fs.files.deferred) == 2 and calls == [1]


def test_unmount_checkpoints_what_waits(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    _inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    assert not calls and journals(fs)
    fs.close_all()
    assert calls == [1] and not journals(fs)


def test_a_waiting_file_with_another_name_keeps_its_journal(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    fs.link(inode, ROOT_ID, b"g", CTX)
    fs.unlink(ROOT_ID, b"f", CTX)
    assert journals(fs) and inode in fs.files.deferred, "g still names it: its overwrite must reach its place"
    run_due(fs, monkeypatch, openfiles.CHECKPOINT_DELAY + 1)
    assert calls == [1] and not journals(fs)
    assert read_all(fs, inode)[:104] == b"a" * 100 + b"new" + b"a"


def test_a_waiting_file_replaced_by_a_rename_drops_its_journal(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_checkpoints(monkeypatch)
    inode, fh = journaled_file(fs, b"f")
    fs.release(fh)
    fh, _attrs = fs.create(ROOT_ID, b"new", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.release(fh)
    calls.clear()  # (the close of "new")
    fs.rename(ROOT_ID, b"new", ROOT_ID, b"f", 0, CTX)
    assert not journals(fs) and inode not in fs.files.contents and not calls


# -- on a mount --------------------------------------------------------------------------------

def test_the_mount_checkpoints_a_closed_file_after_the_delay(tmp_path: Path, fs_home: Path) -> None:
    """The mount's checkpoint thread runs (that a mount defers at all: the kill -9 test below)."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    with Mount(cipher, plain, fs_home):
        (plain / "f").write_bytes(b"a" * 2 * BLOCK)
        with open(plain / "f", "r+b") as f:
            os.fsync(f.fileno())
            f.seek(100)
            f.write(b"new")
        deadline = time.monotonic() + 10 * openfiles.CHECKPOINT_DELAY
        while os.listdir(cipher / "encfs.journal") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.listdir(cipher / "encfs.journal"), "the checkpoint thread did not run"
        assert cold_read(plain / "f")[:104] == b"a" * 100 + b"new" + b"a"


CLOSER = r"""
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
for i in range(1 << 30):
    name = os.path.join(root, "f%d" % (i % count))
    fd = os.open(name, os.O_RDWR)
    os.pwrite(fd, b"%08d" % i, (i * 4096) % 60000)
    os.fsync(fd)
    os.close(fd)
    print("S", i, flush=True)
"""


def test_kill_9_while_closed_files_wait_keeps_what_was_fsynced(tmp_path: Path, fs_home: Path) -> None:
    """Overwrites (journaled), each fsync'd and closed: after kill -9 at a random moment, while
    closed files wait for their checkpoint, every acknowledged write reads back."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    count, size = 8, 64 << 10
    with Mount(cipher, plain, fs_home):
        for k in range(count):
            (plain / f"f{k}").write_bytes(b"." * size)
    rng = random.Random(25)
    waiting = []
    for rnd in range(3):
        m = Mount(cipher, plain, fs_home)
        try:
            out = crash_during(m, CLOSER, str(plain), str(count), when=lambda: time.sleep(rng.uniform(0.4, 1.2)))
        finally:
            m.stop()
        waiting.append(len(file_ids(os.fsencode(cipher))))
        acked = [int(line.split()[1]) for line in out[:out.rfind("\n") + 1].splitlines() if line.startswith("S ")]
        assert acked, "the writer acknowledged nothing"
        with Mount(cipher, plain, fs_home):
            files = {k: cold_read(plain / f"f{k}") for k in range(count)}
        last: dict[tuple[int, int], int] = {}
        for i in acked:
            last[(i % count, (i * 4096) % 60000)] = i
        for (k, off), i in last.items():
            assert files[k][off:off + 8] == b"%08d" % i, f"round {rnd}: write {i} to f{k} was fsync'd and lost"
    # Closed files were waiting for their checkpoint at the kill (one open file has a journal anyway).
    assert max(waiting) > 1, waiting
