"""The synced size an fsync leaves pending on a mount (issue #25; content.py's fsync(),
openfiles.py's invariants).

An xattr written right after an fsync's fdatasync opens a journal transaction on the backing
filesystem, which the caller's next directory fsync then has to commit (SQLite syncs its
journal, then the directory). So on a mount the fsync leaves the new synced size pending and
the mount's thread writes it STATE_DELAY later, or the file's next fsync, truncate or close
does. The state may lag the data, never run ahead of it. Content tests call FileContent
directly, the fs tests EncryptedFS, the last one a real mount and kill -9.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path

import pytest
from content_files import BackingFile

from conftest import run_encfs
from encfs.fuse import openfiles
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import read_state
from encfs.fuse.fs import EncryptedFS
from encfs.fuseproto.wire import ROOT_ID
from fuse_helpers import Mount, cold_read
from test_deferred_checkpoint import fs, run_due  # noqa: F401 (fs: the fixture, deferring as a mount does)
from test_fs_api import CTX

B = 4096
STEP = B + 28  # a sealed block
HEADER = 128


def synced_on_disk(c: FileContent) -> int:
    state = read_state(c.fd, c.cipher, c.state_file)
    return 0 if state is None else state.synced_size


@pytest.fixture
def files(tmp_path: Path) -> BackingFile:
    return BackingFile(tmp_path, B)


def test_a_deferred_synced_size_reaches_the_state_only_when_written(files: BackingFile) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.fsync(False, defer_state=True)
    assert c.pending_synced_size == 3 * B and synced_on_disk(c) == 0
    c.write_pending_state()
    assert c.pending_synced_size is None and synced_on_disk(c) == 3 * B


def test_without_deferral_fsync_writes_the_state_at_once(files: BackingFile) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.fsync(False)
    assert c.pending_synced_size is None and synced_on_disk(c) == 3 * B


def test_a_later_fsync_raises_the_pending_size(files: BackingFile) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False, defer_state=True)
    c.write(2 * B, os.urandom(3 * B))
    c.fsync(False, defer_state=True)
    assert c.pending_synced_size == 5 * B
    c.write_pending_state()
    assert synced_on_disk(c) == 5 * B


def test_a_crash_before_the_state_keeps_what_was_fsynced(files: BackingFile) -> None:
    c = files.create()
    data = os.urandom(3 * B + 100)
    c.write(0, data)
    c.fsync(False, defer_state=True)
    c.release_fds()  # the process dies with the synced size still pending
    c, _notes = files.open(after_crash=True, writable=True)
    assert c.size == len(data) and c.read(0, 4 * B) == data


def test_a_truncate_never_leaves_a_pending_size_past_the_new_end(files: BackingFile) -> None:
    c = files.create()
    c.write(0, os.urandom(4 * B))
    c.fsync(False, defer_state=True)
    c.truncate(B)
    assert c.pending_synced_size is None and synced_on_disk(c) <= B
    c.write_pending_state()
    assert synced_on_disk(c) <= B


def test_blocks_written_into_holes_get_their_durable_state_at_once(tmp_path: Path) -> None:
    """Deferral is only for a synced size: a state that must call filled holes data is written
    and synced by the fsync itself (else a crash reads the acknowledged blocks as zeros)."""
    files = BackingFile(tmp_path, B, sparse=True)
    c = files.create()
    c.write(0, b"a" * B)
    c.truncate(8 * B)  # blocks 1-7: a hole
    c.fsync(False, defer_state=True)
    assert read_state(c.fd, c.cipher, c.state_file).holes == ((1, 7),)  # type: ignore[union-attr]
    data = os.urandom(B)
    c.write(3 * B, data)  # into the hole
    c.fsync(False, defer_state=True)
    state = read_state(c.fd, c.cipher, c.state_file)
    assert state is not None and state.holes == ((1, 2), (4, 4)) and state.synced_size == 8 * B
    assert c.pending_synced_size is None
    c.release_fds()  # a crash
    c, _notes = files.open(after_crash=True, writable=True)
    assert c.read(3 * B, B) == data


def test_close_writes_a_pending_synced_size(files: BackingFile) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B + 7))
    c.fsync(False, defer_state=True)
    c.close()
    c, _notes = files.open(after_crash=False, writable=True)
    assert synced_on_disk(c) == 2 * B + 7


# -- the filesystem: the mount's thread (run_deferred) -----------------------------------------

def test_the_mount_thread_writes_a_pending_size_after_its_delay(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [time.monotonic()]
    monkeypatch.setattr("encfs.fuse.openfiles.time.monotonic", lambda: clock[0])
    fh, attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    c = fs.files.contents[attrs.st_ino]
    fs.write(fh, 0, b"x" * (2 * B))
    fs.fsync(fh, False)
    assert synced_on_disk(c) == 0 and attrs.st_ino in fs.files.pending_states
    clock[0] += openfiles.STATE_DELAY / 2
    fs.run_deferred(lambda inode: contextlib.nullcontext())
    assert synced_on_disk(c) == 0, "not yet due"
    fs.write(fh, 2 * B, b"y" * B)
    fs.fsync(fh, False)  # a second fsync does not push the first one's due time back...
    clock[0] += openfiles.STATE_DELAY / 2 + 0.01
    fs.run_deferred(lambda inode: contextlib.nullcontext())
    assert synced_on_disk(c) == 3 * B and not fs.files.pending_states  # ...and its size is the one written
    fs.release(fh)


def test_a_pending_size_of_a_file_closed_meanwhile_is_written_by_the_close(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    fh, attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    c = fs.files.contents[attrs.st_ino]
    fs.write(fh, 0, b"x" * (2 * B))
    fs.fsync(fh, False)
    fs.release(fh)  # no journal: closed at once, and the close writes the state
    assert attrs.st_ino not in fs.files.contents
    run_due(fs, monkeypatch, openfiles.STATE_DELAY + 0.01)  # finds nothing to do
    assert not fs.files.pending_states
    assert c.state.synced_size == 2 * B


# -- on a mount --------------------------------------------------------------------------------

def test_a_mount_writes_the_synced_size_soon_after_an_fsync(tmp_path: Path, fs_home: Path) -> None:
    """Observed from the outside: after kill -9 a flipped byte in the short last block of an
    fsync'd file reads EIO (the block is below the synced size: damage). Had the state never
    been written, recovery would take that block for an append torn by the crash and cut it
    off, leaving a shorter file that reads without an error."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    data = os.urandom(2 * B + 1000)  # the last block short: what a torn append leaves
    m = Mount(cipher, plain, fs_home)
    fd = -1
    try:
        fd = os.open(plain / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        time.sleep(2 * openfiles.STATE_DELAY + 1.5)  # the thread sleeps up to a delay, then waits one
    finally:
        m.kill9()  # with the file still open: its close would write the state too
        if fd >= 0:
            with contextlib.suppress(OSError):  # ENOTCONN: its FLUSH finds no daemon
                os.close(fd)
    (backing,) = [p for p in cipher.iterdir() if "." not in p.name]
    with open(backing, "r+b") as f:
        at = HEADER + 2 * STEP + 100  # inside the last block's ciphertext
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    with Mount(cipher, plain, fs_home):
        with pytest.raises(OSError) as e:
            cold_read(plain / "f")
        assert e.value.errno == errno.EIO
