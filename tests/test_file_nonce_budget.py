"""A file's data-key nonce budget without a mount (docs/FORMAT.md §6.4): seals are counted
and reach the state, and a file past its budget is re-sealed under a fresh key, crash-safely
(encfs/fuse/rekeyfile.py). The mounted path is in test_fuse_rekey.py."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from content_files import FILE_ID, KEY, BackingFile

from encfs.blocks import BlockAuthError, BlockCipher
from encfs.fuse import content as content_mod
from encfs.fuse import rekeyfile
from encfs.fuse.content import FileContent
from encfs.fuse.fileheader import HEADER_LEN, REKEY_AT, STATE_XATTR, FileHeader, HeaderError, read_state
from encfs.fuse.openfiles import OpenFile, OpenFiles
from encfs.keys.service import KeyService
from encfs.sealing import Sealers

B = 4096
STEP = B + 28
OLD_KEY, OLD_ID = KEY, FILE_ID
NEW_KEY, NEW_ID = bytes(range(1, 33)), bytes(range(1, 17))


class Files(BackingFile):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, B)

    def load(self, key: bytes = OLD_KEY) -> FileContent:
        return self.open(key, after_crash=False)[0]

    def side(self) -> Path:
        return Path(os.fsdecode(rekeyfile.side_file(self.root, OLD_ID)))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def test_seals_are_counted_and_reach_the_state_when_a_session_ends(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(5 * B))  # 5 blocks
    c.fsync(False)  # + the state
    assert c.seals == 6 and c.state.seals == 6
    c.close()
    c = files.load()
    assert c.seals == 6
    c.write(100, b"x")  # one block re-sealed, into the journal
    c.write(3 * B, b"y" * B)
    c.close()  # the checkpoint writes the state: 6 + 2 + 1
    assert files.load().seals == 9
    c = files.load()
    c.write(6 * B, b"z")  # appends in place (block 5 of zeros, block 6), no journal: close counts them
    c.close()
    assert files.load().seals == 12


def test_a_crash_loses_at_most_seals_persist_every_of_the_count(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(content_mod, "SEALS_PERSIST_EVERY", 8)
    c = files.create()
    c.write(0, os.urandom(B))
    c.close()
    c = files.load()
    c.check_key()  # as writable_content() does before a loaded file's first write
    for i in range(20):
        c.write(i * B, os.urandom(B))
    counted = c.seals
    c.release_fds()  # kill -9: no close
    assert counted - files.load().seals < 8


def test_a_state_that_fails_authentication_counts_as_a_spent_budget(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    c.close()
    sealed = bytearray(os.getxattr(files.path, STATE_XATTR))
    sealed[20] ^= 1
    os.setxattr(files.path, STATE_XATTR, bytes(sealed))
    assert files.load().seals >= REKEY_AT


def rekeyed(files: Files) -> tuple[FileHeader, BlockCipher]:
    return FileHeader(NEW_ID, bytes(95)), BlockCipher(NEW_KEY, NEW_ID, B)


def test_rekey_reseals_every_block_under_the_new_key_in_place(files: Files) -> None:
    c = files.create()
    data = bytearray(os.urandom(7 * B + 123))
    c.write(0, data)
    c.fsync(False)
    c.write(B + 5, b"journaled")  # the rekey checkpoints first
    data[B + 5:B + 14] = b"journaled"
    ino, nlink_path = os.stat(files.path).st_ino, files.path.with_name("link")
    os.link(files.path, nlink_path)
    c.seals = REKEY_AT
    rekeyfile.rekey(c, *rekeyed(files))
    assert c.header.file_id == NEW_ID and c.seals == c.state.seals < 20
    assert c.read(0, len(data)) == data
    c.write(2 * B, b"after")
    data[2 * B:2 * B + 5] = b"after"
    c.close()
    assert os.stat(nlink_path).st_ino == ino and not files.side().exists()
    assert not any(files.side().parent.iterdir())
    c = files.load(NEW_KEY)
    assert c.read(0, len(data)) == data and c.header.file_id == NEW_ID
    with pytest.raises(BlockAuthError):  # nothing is left under the old key
        BlockCipher(OLD_KEY, OLD_ID, B).open(0, os.pread(c.fd, STEP, 128))


def test_a_damaged_block_stays_damaged_and_the_rest_moves(files: Files) -> None:
    c = files.create()
    data = os.urandom(4 * B)
    c.write(0, data)
    c.close()
    with open(files.path, "r+b") as f:  # flipped: a written 0xff left one block in 256 intact
        f.seek(128 + 2 * STEP + 40)
        byte = f.read(1)[0]
        f.seek(128 + 2 * STEP + 40)
        f.write(bytes([byte ^ 0xFF]))
    c = files.load()
    rekeyfile.rekey(c, *rekeyed(files))
    assert c.read(0, 2 * B) == data[:2 * B] and c.read(3 * B, B) == data[3 * B:]
    with pytest.raises(BlockAuthError):
        c.read(2 * B, 1)


class Died(BaseException):
    """The daemon's process dies here."""


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3])
def test_a_rekey_cut_short_by_a_crash_is_finished_from_the_side_file(files: Files, monkeypatch: pytest.MonkeyPatch,
                                                                   stop_after: int) -> None:
    """The crash comes after the side file is complete, with ``stop_after`` chunks of the copy
    back done (3: the header too); loading the file then finishes the job."""
    c = files.create()
    data = os.urandom(40 * B + 7)
    c.write(0, data)
    c.close()
    c = files.load()
    real = os.pread
    calls = []

    def copy_back(src: int, dst: int) -> None:
        length = os.fstat(src).st_size
        chunk = 16 * STEP
        for i, at in enumerate(range(128, length, chunk)):
            if i == stop_after:
                raise Died
            os.pwrite(dst, real(src, min(chunk, length - at), at), at)
        os.pwrite(dst, real(src, 128, 0), 0)
        calls.append(1)
        raise Died

    monkeypatch.setattr(rekeyfile, "_copy_back", copy_back)
    with pytest.raises(Died):
        rekeyfile.rekey(c, *rekeyed(files))
    c.release_fds()
    monkeypatch.undo()
    assert files.side().exists()
    fd = os.open(files.path, os.O_RDWR)
    header = FileHeader.parse(os.pread(fd, 128, 0))
    assert rekeyfile.pending(files.root, read_only=False) == {OLD_ID}
    assert header.file_id == (NEW_ID if calls else OLD_ID)
    if not calls:  # the header still names the old id: that is what finds the side file
        rekeyfile.complete(files.root, OLD_ID, fd)
    os.close(fd)
    c = files.load(NEW_KEY)
    assert c.read(0, len(data)) == data
    assert read_state(c.fd, c.cipher) is not None


def test_a_side_file_still_being_written_is_dropped_and_the_file_is_untouched(files: Files,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    data = os.urandom(10 * B)
    c.write(0, data)
    c.close()
    c = files.load()

    def died(*_a: object) -> int:
        raise Died

    monkeypatch.setattr(rekeyfile.os, "rename", died)
    with pytest.raises(Died):
        rekeyfile.rekey(c, *rekeyed(files))
    c.release_fds()
    monkeypatch.undo()
    tmp = files.side().with_name(files.side().name + ".tmp")
    assert tmp.exists()
    assert rekeyfile.pending(files.root, read_only=False) == set() and not tmp.exists()
    assert files.load().read(0, len(data)) == data


def fs_config(service: KeyService) -> SimpleNamespace:
    """What OpenFiles reads of a filesystem's config, under a new CMK."""
    key = service.create_key()["KeyId"]
    fs_id = os.urandom(16).hex()
    return SimpleNamespace(block_size=B, key_id=key, format=2, features=(),
                           file_context=lambda fid: {"encfs:fs": fs_id, "encfs:file": fid.hex()})


def open_files(tmp_path: Path, config: SimpleNamespace, service: KeyService, read_only: bool = False) -> OpenFiles:
    return OpenFiles(os.fsencode(tmp_path), config, service, BlockCipher, read_only,  # type: ignore[arg-type]
                     Sealers(B), recovering=False)


def test_a_failed_copy_back_is_finished_by_the_next_load(tmp_path: Path, service: KeyService,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying the complete side file in fails (EIO) half-way: the content reads the side file,
    writes fail, and the next load of the file in the same mount finishes the re-key."""
    config = fs_config(service)
    files = open_files(tmp_path, config, service)
    path = os.fsencode(tmp_path / "f")

    def opened() -> tuple[OpenFile, int]:
        f = OpenFile(7, os.open(path, os.O_RDWR | os.O_CREAT, 0o600), True, path)
        return f, files.add(f)

    f, fh = opened()
    data = bytearray(os.urandom(300 * B))
    c = files.renew(f, new_file=True)
    c.write(0, data)
    c.fsync(False)
    c.seals = REKEY_AT
    real = rekeyfile._copy_back

    def fails_half_way(src: int, dst: int) -> None:
        os.pwrite(dst, os.pread(src, 1 << 20, 128), 128)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rekeyfile, "_copy_back", fails_half_way)
    with pytest.raises(OSError):
        files.writable_content(f)
    assert c.read_only and c.read(0, len(data)) == data  # from the side file, under the new key
    files.release(fh)
    monkeypatch.setattr(rekeyfile, "_copy_back", real)
    f, fh = opened()
    c = files.writable_content(f)  # the load finishes the re-key from the side file
    assert c.read(0, len(data)) == data and not c.read_only
    c.write(5, b"after")
    data[5:10] = b"after"
    files.release(fh)
    assert not os.listdir(tmp_path / "encfs.journal")
    f, fh = opened()
    assert files.content(f).read(0, len(data)) == data  # type: ignore[union-attr]
    files.release(fh)


def interrupted_rekey(tmp_path: Path, service: KeyService,
                      monkeypatch: pytest.MonkeyPatch) -> tuple[SimpleNamespace, bytes, bytes, bytes]:
    """A file whose re-key stopped with its side file complete (the copy-back failed), all closed:
    (config, backing path, the old file id whose side file is pending, the file's data)."""
    config = fs_config(service)
    files = open_files(tmp_path, config, service)
    path = os.fsencode(tmp_path / "f")
    f = OpenFile(7, os.open(path, os.O_RDWR | os.O_CREAT, 0o600), True, path)
    fh = files.add(f)
    c = files.renew(f, new_file=True)
    data = os.urandom(4 * B)
    c.write(0, data)
    c.fsync(False)
    c.seals = REKEY_AT

    def fails(src: int, dst: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rekeyfile, "_copy_back", fails)
    with pytest.raises(OSError):
        files.writable_content(f)
    monkeypatch.undo()
    files.release(fh)
    files.close_all()
    with open(path, "rb") as backing:
        old_id = FileHeader.parse(backing.read(HEADER_LEN)).file_id
    return config, path, old_id, data


def test_a_damaged_side_file_read_only_leaks_no_fd(tmp_path: Path, service: KeyService,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only load of a file whose re-key was interrupted reads its side file; a side file
    whose header is damaged fails the load and leaves no fd behind (nor closes one twice)."""
    config, path, old_id, _data = interrupted_rekey(tmp_path, service, monkeypatch)
    side = os.fsdecode(rekeyfile.side_file(os.fsencode(tmp_path), old_id))
    with open(side, "r+b") as damaged:
        damaged.write(b"X")  # its header's magic
    read_only = open_files(tmp_path, config, service, read_only=True)
    assert old_id in read_only.rekeys
    g = OpenFile(8, os.open(path, os.O_RDONLY), False, path)
    gh = read_only.add(g)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(HeaderError):
        read_only.content(g)
    assert len(os.listdir("/proc/self/fd")) == before
    os.fstat(g.fd)  # still this handle's
    read_only.release(gh)


def test_reading_a_pending_side_file_leaves_its_times(tmp_path: Path, service: KeyService,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The side file keeps the file's times for the copy-in (FORMAT.md §6.4): a read-only load
    (a read-only mount, fsck) reads it with O_NOATIME, or relatime would move an old atime and
    the copy-in would give the file the time of that read."""
    config, path, old_id, data = interrupted_rekey(tmp_path, service, monkeypatch)
    side = rekeyfile.side_file(os.fsencode(tmp_path), old_id)
    old = (1_600_000_000_000_000_000, 1_500_000_000_000_000_000)  # relatime moves an atime this old
    os.utime(side, ns=old)
    read_only = open_files(tmp_path, config, service, read_only=True)
    g = OpenFile(8, os.open(path, os.O_RDONLY), False, path)
    gh = read_only.add(g)
    assert read_only.content(g).read(0, len(data)) == data  # type: ignore[union-attr]
    read_only.release(gh)
    read_only.close_all()
    st = os.stat(side)
    assert (st.st_atime_ns, st.st_mtime_ns) == old
