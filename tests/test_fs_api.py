"""The filesystem's operations without a mount (issue #22, as S3QL's t3_fs_api.py): EncryptedFS is
called directly with a caller context, on a CIPHERDIR in a temporary directory and the session's
real SoftHSM2 token. No kernel, no FUSE: what the kernel would cache or check is not tested here
(tests/test_fuse_semantics_*.py do that on real mounts)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs.fuse.cli import cmd_info
from encfs.blocks import OVERHEAD, SEALED_BLOCK
from encfs.fuse.fileheader import HEADER_LEN, user_xattrs_supported
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsck import check_filesystem
from encfs.fuse.rewrap import rewrap_filesystem
from encfs.fuse.fsconfig import init_filesystem, open_config
from encfs.fuseproto.wire import ROOT_ID, EntryAttributes, FuseError, RequestContext, SetattrFields
from encfs.keys.service import KeyService

CTX = RequestContext(uid=0, gid=0, pid=os.getpid(), umask=0o022)


def new_fs(tmp_path: Path, service: KeyService, wrapped_file_keys: bool = False) -> EncryptedFS:
    """A new filesystem in ``tmp_path``/cipher, opened read-write without a mount."""
    key = service.create_key()["KeyId"]
    cipher = tmp_path / "cipher"
    init_filesystem(cipher, service, key, wrapped_file_keys=wrapped_file_keys)
    opened = open_config(cipher, service, writable=True)
    return EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service)


@pytest.fixture
def fs(tmp_path: Path, service: KeyService) -> Iterator[EncryptedFS]:
    filesystem = new_fs(tmp_path, service)
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


def test_mkdir_syncs_nothing_and_a_torn_id_file_is_rebuilt_from_the_xattr(fs: EncryptedFS, service: KeyService,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A new directory's id file is not synced (its xattr copy, which the backing filesystem
    orders before the directory's entries, covers a crash); a crash that tears or loses it
    leaves the directory and its entries readable, and the next read rewrites the file."""
    if not user_xattrs_supported(fs.root):
        pytest.skip("the backing store keeps no user xattrs: the second copy is a synced file")
    synced: list[int] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd))[1])
    d = fs.mkdir(ROOT_ID, b"d", 0o755, CTX).st_ino
    assert synced == []
    monkeypatch.undo()
    create(fs, b"f", b"inside", parent=d)
    backing = Path(os.fsdecode(fs.inodes.path(d)))
    stored = (backing / "encfs.dirid").read_bytes()
    fs.close_all()
    cipher = Path(os.fsdecode(fs.root))
    for tear in (b"", stored[:20], None):  # emptied, cut short, lost
        if tear is None:
            (backing / "encfs.dirid").unlink()
        else:
            (backing / "encfs.dirid").chmod(0o644)
            (backing / "encfs.dirid").write_bytes(tear)
        opened = open_config(cipher, service, writable=True)
        again = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, recovering=True)
        try:
            d = walk(again, [b"d"])
            assert names(again, d) == [b"f"] and read(again, walk(again, [b"f"], d)) == b"inside"
        finally:
            again.close_all()
        assert (backing / "encfs.dirid").read_bytes() == stored


def test_a_legacy_directory_id_file_is_still_synced_at_mkdir(fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsealed (legacy) copies: the file copy wins a disagreement, and a torn one would be taken
    for the id, so mkdir writes it with write-fsync-rename as before."""
    if not user_xattrs_supported(fs.root):
        pytest.skip("the backing store keeps no user xattrs: its second copy is synced either way")
    monkeypatch.setattr(fs.dirids, "write_sealed", False)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    fs.mkdir(ROOT_ID, b"legacy", 0o755, CTX)
    assert synced


def test_a_file_recovered_in_memory_only_stays_so_until_unmount(fs: EncryptedFS, service: KeyService,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash recovery that dropped journaled blocks (an append a power loss cut, FileContent.load)
    and could not checkpoint (a full disk) keeps the file read-only and its content loaded: a
    reload once the crash scan is over would take the dropped blocks back."""
    from encfs.fuse.content import FileContent
    b = 4096
    fh, attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    base = os.urandom(2 * b)
    fs.write(fh, 0, base)
    fs.fsync(fh, False)
    fs.write(fh, 2 * b, os.urandom(b + b // 2))  # in place, never synced
    fs.write(fh, 3 * b + b // 2, os.urandom(b // 4))  # block 3 exists: journaled
    c = fs.files.contents[attrs.st_ino]
    c.journal.sync()
    backing = fs.inodes.path(attrs.st_ino)
    c.release_fds()  # the daemon dies; the power loss takes block 2 from the backing file
    del fs.files.contents[attrs.st_ino]
    os.truncate(backing, 128 + 2 * (b + 28))
    real_checkpoint, calls = FileContent.checkpoint, []

    def full_once(self: FileContent) -> None:  # the disk is full at the recovery, not later
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_checkpoint(self)
    monkeypatch.setattr(FileContent, "checkpoint", full_once)
    cipher = Path(os.fsdecode(fs.root))
    opened = open_config(cipher, service, writable=True)
    again = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, recovering=True)
    try:
        ino = walk(again, [b"f"])
        assert again.getattr(ino, CTX).st_size == 2 * b
        again.recover_all(contextlib.nullcontext)  # the scan is over: a reload would not drop again
        for _ in range(2):
            assert read(again, ino) == base
            fh = again.open(ino, os.O_RDWR, CTX)
            assert fuse_errno(lambda: again.write(fh, 0, b"x")) == errno.EROFS
            again.release(fh)
        journals = cipher / "encfs.journal"
        assert any(len(n) == 32 for n in os.listdir(journals))
        again.unlink(ROOT_ID, b"f", CTX)  # the file is gone: so is its journal, not left as an orphan
        assert not any(len(n) == 32 for n in os.listdir(journals))
    finally:
        again.close_all()


# -- paths up to PATH_MAX (issue #22): backing paths far past it ----------------------------------

# 159-byte names have the longest backing names kept inline (235 bytes): 24 of them make a 3,840-byte
# plaintext path whose backing path passes 5,600 bytes. A 255-byte leaf brings the plaintext to 4,095.
DEEP = [b"%03d" % i + b"d" * 156 for i in range(24)]
LEAF = b"f" * (4095 - sum(len(n) + 1 for n in DEEP))


def deep_dir(fs: EncryptedFS, parent: int = ROOT_ID) -> int:
    for n in DEEP:
        parent = fs.mkdir(parent, n, 0o755, CTX).st_ino
    assert len(fs.inodes.path(parent)) > 5600  # well past PATH_MAX: no single backing call could take it
    return parent


def walk(fs: EncryptedFS, names: list[bytes], parent: int = ROOT_ID) -> int:
    for n in names:
        parent = fs.lookup(parent, n, CTX).st_ino
    return parent


def fuse_errno(call: Callable[[], object]) -> int:
    with pytest.raises(FuseError) as e:
        call()
    return e.value.errno


def test_every_operation_works_at_a_4095_byte_plaintext_path(fs: EncryptedFS) -> None:
    assert len(LEAF) == 255
    deep = deep_dir(fs)
    fh, attrs = fs.create(deep, LEAF, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"deep data")
    fs.release(fh)
    ino = attrs.st_ino
    assert fs.lookup(deep, LEAF, CTX).st_ino == ino and read(fs, ino) == b"deep data"
    assert names(fs, deep) == [LEAF] and fs.getattr(ino, CTX).st_size == 9
    fields = SetattrFields(update_mode=True, update_uid=True, update_gid=True, update_size=True)
    a = fs.setattr(ino, EntryAttributes(st_mode=0o600, st_uid=1, st_gid=2, st_size=4), fields, None, CTX)
    assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid, a.st_size) == (0o600, 1, 2, 4)
    assert read(fs, ino) == b"deep"
    fs.setxattr(ino, b"user.k", b"v", CTX)
    assert fs.getxattr(ino, b"user.k", CTX) == b"v" and fs.listxattr(ino, CTX) == [b"user.k"]
    fs.removexattr(ino, b"user.k", CTX)
    assert fs.listxattr(ino, CTX) == []
    fs.access(ino, os.R_OK | os.W_OK, CTX)
    fs.mkdir(deep, b"s" * 255, 0o700, CTX)
    fs.rmdir(deep, b"s" * 255, CTX)
    fs.link(ino, ROOT_ID, b"top", CTX)  # a deep source
    fs.link(ino, deep, b"h" * 255, CTX)  # a deep destination
    assert fs.getattr(ino, CTX).st_nlink == 3
    fs.rename(deep, LEAF, ROOT_ID, b"moved", 0, CTX)
    fs.rename(ROOT_ID, b"moved", deep, LEAF, 0, CTX)
    target = b"/" + b"t" * 4094  # SYMLINK_MAX
    link = fs.symlink(deep, b"l" * 255, target, CTX)
    assert fs.readlink(link.st_ino, CTX) == target and link.st_size == 4095
    assert stat.S_ISFIFO(fs.mknod(deep, b"p" * 255, stat.S_IFIFO | 0o644, 0, CTX).st_mode)
    assert names(fs, deep) == sorted([LEAF, b"h" * 255, b"l" * 255, b"p" * 255])
    for n in (LEAF, b"h" * 255, b"l" * 255, b"p" * 255):
        fs.unlink(deep, n, CTX)
    fs.unlink(ROOT_ID, b"top", CTX)
    assert names(fs, deep) == [] and names(fs) == [DEEP[0]]


def test_past_the_limits_is_enametoolong_at_any_depth(fs: EncryptedFS) -> None:
    deep = deep_dir(fs)
    ino = create(fs, b"f", parent=deep)
    long = b"n" * 256
    assert fuse_errno(lambda: fs.create(deep, long, stat.S_IFREG | 0o644, os.O_RDWR, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.mkdir(deep, long, 0o755, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.mknod(deep, long, stat.S_IFIFO | 0o644, 0, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.symlink(deep, long, b"t", CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.link(ino, deep, long, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.rename(deep, b"f", deep, long, 0, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.lookup(deep, long, CTX)) == errno.ENAMETOOLONG
    assert fuse_errno(lambda: fs.symlink(deep, b"l", b"t" * 4096, CTX)) == errno.ENAMETOOLONG
    assert names(fs, deep) == [b"f"]


def test_a_renamed_deep_tree_stays_usable_and_survives_remount(fs: EncryptedFS, service: KeyService) -> None:
    deep = deep_dir(fs)
    ino = create(fs, LEAF, b"leaf", parent=deep)
    fs.setxattr(ino, b"user.k", b"v", CTX)
    fs.symlink(deep, b"l" * 200, b"t" * 4000, CTX)
    fs.rename(ROOT_ID, DEEP[0], ROOT_ID, b"R" * 159, 0, CTX)  # the top of the tree, renamed
    mid = walk(fs, [b"R" * 159, *DEEP[1:12]])
    fs.rename(mid, DEEP[12], ROOT_ID, b"M" * 159, 0, CTX)  # its middle, moved up (directory ids reseal)
    path = [b"M" * 159, *DEEP[13:]]
    assert read(fs, walk(fs, path + [LEAF])) == b"leaf"
    create(fs, b"new", b"after the renames", parent=walk(fs, path))
    fs.close_all()
    cipher = Path(os.fsdecode(fs.root))
    opened = open_config(cipher, service, writable=True)
    again = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, recovering=True)
    try:
        checked, unrecovered = again.recover_all(contextlib.nullcontext)
        assert checked == 2 and unrecovered == []
        deep = walk(again, path)
        assert names(again, deep) == sorted([LEAF, b"l" * 200, b"new"])
        leaf = walk(again, [LEAF], deep)
        assert read(again, leaf) == b"leaf" and again.getxattr(leaf, b"user.k", CTX) == b"v"
        assert read(again, walk(again, [b"new"], deep)) == b"after the renames"
        assert again.readlink(walk(again, [b"l" * 200], deep), CTX) == b"t" * 4000
        assert names(again, walk(again, [b"R" * 159, *DEEP[1:12]])) == []
    finally:
        again.close_all()


def test_fsck_checks_a_tree_past_path_max(fs: EncryptedFS, service: KeyService) -> None:
    deep = deep_dir(fs)
    ino = create(fs, LEAF, b"leaf", parent=deep)
    fs.setxattr(ino, b"user.k", b"v", CTX)
    fs.symlink(deep, b"l" * 200, b"t" * 4000, CTX)
    fs.close_all()
    report = check_filesystem(Path(os.fsdecode(fs.root)), service)
    assert report.findings == []
    assert (report.counts["files"], report.counts["symlinks"], report.counts["xattrs"]) == (1, 1, 1)
    assert report.counts["directories"] == len(DEEP) + 1


def test_rekey_reaches_files_past_path_max(tmp_path: Path, service: KeyService) -> None:
    """The re-key scan once walked by full paths, and os.walk skips what it cannot list: the deep
    file kept its old wrapped key without a word. (Wrapped keys: derived ones have no header to move.)"""
    fs = new_fs(tmp_path, service, wrapped_file_keys=True)
    create(fs, LEAF, b"deep", parent=deep_dir(fs))
    create(fs, b"top", b"top")
    fs.close_all()
    cipher = Path(os.fsdecode(fs.root))
    done = rewrap_filesystem(cipher, service, service.create_key()["KeyId"])
    assert (done.files, done.damaged) == (2, [])
    assert rewrap_filesystem(cipher, service, None, full=True).fresh == 2
    opened = open_config(cipher, service, writable=False)
    again = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, read_only=True)
    try:
        assert read(again, walk(again, [*DEEP, LEAF])) == b"deep"
    finally:
        again.close_all()


def test_info_counts_entries_past_path_max(fs: EncryptedFS, capsys: pytest.CaptureFixture[str]) -> None:
    create(fs, LEAF, b"x", parent=deep_dir(fs))
    fs.close_all()
    assert cmd_info(argparse.Namespace(cipherdir=os.fsdecode(fs.root), json=True)) == 0
    counts = json.loads(capsys.readouterr().out)["Counts"]
    assert (counts["Files"], counts["Directories"], counts["LongNames"]) == (1, len(DEEP), 1)


def test_create_without_o_excl_of_an_existing_name_opens_it(fs: EncryptedFS) -> None:
    """The kernel sends CREATE for a name it caches as absent (a negative entry) even if the name
    was made meanwhile: without O_EXCL that opens the file, as open(2) would; with O_EXCL, EEXIST."""
    ino = create(fs, b"f", b"kept")
    fh, attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, CTX)
    try:
        assert attrs.st_ino == ino and attrs.st_size == 4
    finally:
        fs.release(fh)
    assert read(fs, ino) == b"kept"
    fh, attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
    fs.release(fh)
    assert attrs.st_size == 0 and fs.getattr(ino, CTX).st_size == 0
    with pytest.raises((FuseError, FileExistsError)):
        fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL, CTX)
    d = fs.mkdir(ROOT_ID, b"d", 0o755, CTX).st_ino
    assert d
    with pytest.raises(FuseError) as e:
        fs.create(ROOT_ID, b"d", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, CTX)
    assert e.value.errno == errno.EISDIR


def test_small_whole_block_writes_are_sealed_ahead_and_a_stale_seal_is_not_used(fs: EncryptedFS) -> None:
    """seal_ahead seals a small whole-block write before the server takes the file's lock;
    write() uses what it sealed only while the file's sealer is the one that sealed it."""
    from encfs.blocks import BlockCipher
    from encfs.sealing import Sealer
    fh, _attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    try:
        block = fs.block_size
        data = os.urandom(2 * block)
        assert fs.write(fh, 0, data) == len(data)
        new = os.urandom(block)
        assert fs.seal_ahead(fh, 1, memoryview(new)) is None  # not whole blocks: sealed under the lock
        ahead = fs.seal_ahead(fh, block, memoryview(new))
        assert ahead is not None
        sealer, sealed = ahead
        assert sealer.cipher.open(1, sealed) == new  # block 1, under the file's key
        assert fs.write(fh, block, new, ahead) == block
        other = os.urandom(block)  # sealed by another sealer (as before a re-key): written afresh
        stale = Sealer(BlockCipher(os.urandom(32), b"elsewhere", block))
        assert fs.write(fh, 0, other, (stale, memoryview(stale.seal_run(0, other)))) == block
    finally:
        fs.release(fh)
    ino = fs.lookup(ROOT_ID, b"f", CTX).st_ino
    assert read(fs, ino) == other + new
    ro = fs.open(ino, os.O_RDONLY, CTX)
    try:  # a handle that may not write gets nothing sealed (write() answers it EBADF)
        assert fs.seal_ahead(ro, 0, memoryview(new)) is None
    finally:
        fs.release(ro)


def test_a_read_only_open_leaves_the_header_to_the_first_read(fs: EncryptedFS,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A read-only open does not load the file (the disk reads its header meanwhile): a damaged
    header fails the first read with EIO, as gocryptfs's does, and never returns bytes; that
    handle's later reads fail without loading or logging again, a new open tries afresh; a
    writable open still fails at once."""
    ino = create(fs, b"f", b"plain" * 1000)
    fh = fs.open(ino, os.O_RDONLY, CTX)
    try:
        assert ino not in fs.files.contents
        assert read(fs, ino) == b"plain" * 1000
    finally:
        fs.release(fh)
    assert ino not in fs.files.contents
    backing = fs.inodes.path(ino)
    with open(backing, "r+b") as f:
        magic = f.read(1)
        f.seek(0)
        f.write(b"X")  # the header's magic
    fh = fs.open(ino, os.O_RDONLY, CTX)
    try:
        assert fuse_errno(lambda: fs.reader(fh)) == errno.EIO
        logged = len(caplog.records)
        assert logged > 0
        with open(backing, "r+b") as f:
            f.write(magic)  # mended: this handle still fails, as it did, and says nothing more
        assert fuse_errno(lambda: fs.reader(fh)) == errno.EIO
        assert fuse_errno(lambda: fs.lseek(fh, 0, os.SEEK_DATA)) == errno.EIO
        assert len(caplog.records) == logged
    finally:
        fs.release(fh)
    assert read(fs, ino) == b"plain" * 1000  # a new open loads afresh
    with open(backing, "r+b") as f:
        f.write(b"X")
    assert fuse_errno(lambda: fs.open(ino, os.O_RDWR, CTX)) == errno.EIO


def test_a_file_cut_before_its_first_read_reads_eio_past_its_end(fs: EncryptedFS) -> None:
    """The size the kernel held at a read-only open is kept for the load at the first read: a
    GETATTR in between learns the shorter backing file, which a writeback-cache kernel ignores,
    so the bytes past the cut must fail, not read as zeros (or as a short read)."""
    ino = create(fs, b"f", b"x" * 10_000)
    fs.lookup(ROOT_ID, b"f", CTX)
    fh = fs.open(ino, os.O_RDONLY, CTX)
    try:
        os.truncate(fs.inodes.path(ino), HEADER_LEN + SEALED_BLOCK)  # one block left
        fs.getattr(ino, CTX)
        opened = fs.reader(fh)
        assert opened is not None
        assert bytes(fs.read_open(opened, 0, 4096)) == b"x" * 4096
        assert fuse_errno(lambda: fs.read_open(opened, 4096, 4096)) == errno.EIO
    finally:
        fs.release(fh)


def test_a_read_within_one_block_is_checked_as_a_longer_read_is(fs: EncryptedFS) -> None:
    """A read that falls in one block takes its own path (ContentReads._open_block): it must read
    a journaled block as its newest version, the short last block, and a tampered block as EIO,
    as a read across blocks does (holes: test_sparse_content.py; a file cut short: the test
    above)."""
    b = fs.block_size
    ino = create(fs, b"f", b"a" * (3 * b))
    fh = fs.open(ino, os.O_RDWR, CTX)
    try:
        fs.fsync(fh, False)
        fs.write(fh, b, b"b" * b)  # a block in place: journaled
        fs.write(fh, 5 * b, b"c" * 100)  # zeros in block 4 (a hole if the filesystem is sparse), block 5 short
        assert 1 in fs.files.contents[ino].index
        model = b"a" * b + b"b" * b + b"a" * b + bytes(2 * b) + b"c" * 100
        opened = fs.reader(fh)
        assert opened is not None
        for off, n in ((0, 10), (b + 5, 100), (2 * b, b), (3 * b + 1, 10), (4 * b, b), (5 * b + 7, 200)):
            assert bytes(fs.read_open(opened, off, n)) == model[off:off + n], (off, n)
        fd = os.open(fs.inodes.path(ino), os.O_RDWR)
        try:
            at = HEADER_LEN + 2 * (b + OVERHEAD) + 40  # inside block 2's ciphertext
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
            assert fuse_errno(lambda: fs.read_open(opened, 2 * b + 7, 10)) == errno.EIO
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)  # mended
            assert bytes(fs.read_open(opened, 2 * b + 7, 10)) == b"a" * 10
        finally:
            os.close(fd)
    finally:
        fs.release(fh)


def test_a_cipherdir_reached_through_a_symlink(tmp_path: Path, service: KeyService) -> None:
    """Every backing call names the resolved CIPHERDIR: the root's attributes (read through its
    fd) are the ones its setattr changed."""
    key = service.create_key()["KeyId"]
    init_filesystem(tmp_path / "cipher", service, key)
    (tmp_path / "link").symlink_to(tmp_path / "cipher")
    opened = open_config(tmp_path / "link", service, writable=True)
    fs = EncryptedFS(os.fsencode(tmp_path / "link"), opened.config, opened.keys, service)
    try:
        assert stat.S_ISDIR(fs.getattr(ROOT_ID, CTX).st_mode)
        attrs = EntryAttributes()
        attrs.st_mtime_ns = 1_000_000_000 * 1_000_000
        after = fs.setattr(ROOT_ID, attrs, SetattrFields(update_mtime=True), None, CTX)
        assert after.st_mtime_ns == fs.getattr(ROOT_ID, CTX).st_mtime_ns == attrs.st_mtime_ns
        assert read(fs, create(fs, b"f", b"through the link")) == b"through the link"
    finally:
        fs.close_all()


def test_a_file_whose_sync_failed_refuses_changes_and_the_unmount_is_not_clean(
        fs: EncryptedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fdatasync what is on disk is unknown (Linux reports it once): the file's
    later writes and fsyncs fail with EIO, other files go on, and close_all() says the unmount
    must not be recorded as clean, so that the next mount recovers as after a crash."""
    fh, _attrs = fs.create(ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"durable")
    fs.fsync(fh, False)
    fs.write(fh, 4096, b"lost?")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(FuseError) as e:
        fs.fsync(fh, True)
    monkeypatch.undo()
    for call in (lambda: fs.fsync(fh, True), lambda: fs.write(fh, 0, b"x")):
        with pytest.raises(FuseError) as e:
            call()
        assert e.value.errno == errno.EIO
    other, _attrs = fs.create(ROOT_ID, b"g", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    fs.write(other, 0, b"fine")
    fs.fsync(other, False)
    fs.release(other)
    fs.release(fh)
    assert fs.close_all() is False
