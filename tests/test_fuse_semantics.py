"""POSIX semantics of a real encfs mount, checked the way a local-filesystem conformance suite would.

Most tests share one module-wide mount and work in their own fresh subdirectory;
remount, read-only and tamper tests start their own mounts. The whole module runs once per
FUSE server (``encfs mount --server``): our own protocol server, the default, and pyfuse3. Reads that must reach
the daemon (not the kernel page cache) go through a fresh open() (FUSE drops the
file's cached pages on open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_encfs
from fuse_helpers import Mount, cold_pread, cold_read, expect_errno

BLOCK_SIZES = (4096, 32768)  # every content block size a filesystem can have (FORMAT.md 6.4)
BLOCK = 32768  # the default, for tests that do not depend on it
HEADER = 128
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


SERVERS = ("encfs", "pyfuse3")
_server = SERVERS[0]  # the server every mount of the tests now running uses (the ``server`` fixture)


@pytest.fixture(scope="module", params=SERVERS, autouse=True)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the module once per server: module-scoped, so the tests are grouped by it."""
    global _server
    _server = request.param
    try:
        yield request.param
    finally:
        _server = SERVERS[0]


def serve(cipher: Path, plain: Path, home: Path, *extra: str) -> Mount:
    """``encfs mount --foreground`` with the server under test (only pyfuse3 loads libfuse)."""
    m = Mount(cipher, plain, home, "--server", _server, *extra)
    with open(f"/proc/{m.pid}/maps") as f:
        if ("libfuse3.so" in f.read()) != (_server == "pyfuse3"):
            m.stop()
            raise AssertionError(f"the daemon does not serve with {_server}")
    return m


def new_mount(base: Path, home: Path, *extra: str, block: int | None = None) -> Mount:
    cipher, plain = base / "cipher", base / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    if not cipher.exists():
        size = ["--block-size", str(block)] if block else []
        proc = run_encfs("init", str(cipher), "--key", "fs", *size, home=home)
        assert proc.returncode == 0, proc.stderr
    return serve(cipher, plain, home, *extra)


@pytest.fixture(scope="module")
def mnt(server: str, tmp_path_factory: pytest.TempPathFactory, fs_home: Path) -> Iterator[Mount]:
    m = new_mount(tmp_path_factory.mktemp("sem"), fs_home)
    try:
        yield m
    finally:
        m.stop()


def _fresh_dir(m: Mount, request: pytest.FixtureRequest) -> Path:
    p = m.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    p.mkdir()
    return p


@pytest.fixture
def d(mnt: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount; the daemon must survive every test."""
    yield _fresh_dir(mnt, request)
    assert mnt.proc.poll() is None, "the encfs daemon died"


@pytest.fixture(scope="module", params=BLOCK_SIZES, ids=lambda b: f"{b // 1024}k")
def block_mnt(server: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              fs_home: Path) -> Iterator[tuple[Mount, int]]:
    m = new_mount(tmp_path_factory.mktemp(f"sem{request.param}"), fs_home, block=request.param)
    try:
        yield m, request.param
    finally:
        m.stop()


@pytest.fixture
def bd(block_mnt: tuple[Mount, int], request: pytest.FixtureRequest) -> Iterator[tuple[Path, int]]:
    """``d`` on a filesystem of each content block size: (directory, block size)."""
    m, block = block_mnt
    yield _fresh_dir(m, request), block
    assert m.proc.poll() is None, "the encfs daemon died"


# -- data: offsets, sparse files, append, truncate -------------------------------------------


def test_writes_at_arbitrary_offsets_across_blocks(bd: tuple[Path, int]) -> None:
    d, block = bd
    p = d / "f"
    model = bytearray()
    rnd = random.Random(1)
    writes = [(0, 1), (1, 1), (4095, 1), (4095, 2), (4096, 1), (block - 10, 20), (3 * block - 1, block + 2),
              (100, 3 * block), (2 * block, block), (7, 1), (3000, 1 << 20), (block * 5 + 17, 9000),
              (0, block), ((1 << 20) + 3000 - 1, 1)]
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for off, n in writes:
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = data
            assert os.fstat(fd).st_size == len(model)
            assert os.pread(fd, n, off) == data
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(model)
    assert cold_read(p) == model
    for off, n in [(0, 1), (4095, 2), (4096, 4096), (4000, 10000), (block - 1, 2), (block, block),
                   (len(model) - 5, 100), (len(model), 10), (len(model) + 4096, 10), (123457, 1 << 20)]:
        assert cold_pread(p, n, off) == bytes(model[off:off + n]), (off, n)


def test_one_mib_write_and_one_byte_writes(bd: tuple[Path, int]) -> None:
    d, block = bd
    p = d / "big"
    big = os.urandom(1 << 20)
    with open(p, "wb", buffering=0) as f:
        assert f.write(big) == len(big)
    assert cold_read(p) == big
    with open(p, "r+b", buffering=0) as f:
        for off in (0, block - 1, block, 10 * block + 5, (1 << 20) - 1):
            f.seek(off)
            f.write(b"\xaa")
    expect = bytearray(big)
    for off in (0, block - 1, block, 10 * block + 5, (1 << 20) - 1):
        expect[off] = 0xAA
    assert cold_read(p) == expect


def test_sparse_write_beyond_eof_reads_zeros(bd: tuple[Path, int]) -> None:
    d, block = bd
    p = d / "sparse"
    p.write_bytes(b"head")
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"tail", 3 * block + 100)
    os.pwrite(fd, b"far", (2 << 20) + 5)
    os.close(fd)
    data = cold_read(p)
    assert len(data) == (2 << 20) + 8 == os.stat(p).st_size
    assert data[:4] == b"head"
    assert data[4:3 * block + 100] == bytes(3 * block + 96)
    assert data[3 * block + 100:3 * block + 104] == b"tail"
    assert data[3 * block + 104:(2 << 20) + 5] == bytes((2 << 20) + 5 - 3 * block - 104)
    assert data[-3:] == b"far"
    # seek past EOF with a plain write
    with open(d / "sparse2", "wb") as f:
        f.seek(10000)
        f.write(b"x")
    assert cold_read(d / "sparse2") == bytes(10000) + b"x"


def test_o_append_with_two_fds(d: Path) -> None:
    p = d / "log"
    p.write_bytes(b"start.")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    expect = b"start."
    try:
        for i in range(40):
            fd, chunk = (a, b"A" * (i * 97 % 5000 + 1)) if i % 2 else (b, b"b" * (i * 131 % 3000 + 1))
            os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the file position
            assert os.write(fd, chunk) == len(chunk)
            expect += chunk
            assert os.fstat(fd).st_size == len(expect)
    finally:
        os.close(a)
        os.close(b)
    assert cold_read(p) == expect


def test_o_trunc(bd: tuple[Path, int]) -> None:
    d, block = bd
    p = d / "t"
    p.write_bytes(os.urandom(3 * block + 5))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 3
    assert cold_read(p) == b"new"
    with open(p, "wb") as f:  # "wb" is O_TRUNC too
        f.write(b"")
    assert os.stat(p).st_size == 0 and cold_read(p) == b""


@pytest.mark.parametrize("via_fd", [False, True])
def test_truncate_up_and_down(bd: tuple[Path, int], via_fd: bool) -> None:
    d, block = bd
    p = d / "t"
    model = bytearray(os.urandom(3 * block + 123))
    p.write_bytes(model)
    fd = os.open(p, os.O_RDWR)
    try:
        for size in (5000, 5000 + 3 * block + 7, 2 * block, block - 1, 1, 0, 20000, 20000, 3 * block, 100):
            (os.ftruncate if via_fd else os.truncate)(fd if via_fd else p, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
            assert os.stat(p).st_size == size
            assert cold_read(p) == model, size
            # a write after the truncate lands where it should
            os.pwrite(fd, b"Z", max(0, size - 1))
            if size:
                model[size - 1:size] = b"Z"
            else:
                model[:] = b"Z"
        assert cold_read(p) == model
    finally:
        os.close(fd)


def test_fsx_style_random_ops_single_file(bd: tuple[Path, int]) -> None:
    d, block = bd
    """Seeded fsx loop on one file: writes, truncates, mapped writes, reads, reopen."""
    rnd = random.Random(20240601)
    p = d / "fsx"
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(400):
            op = rnd.random()
            if op < 0.4:
                off = rnd.randrange(0, 6 * block)
                data = rnd.randbytes(rnd.choice([1, 7, 100, block - 1, block, block + 1, 3 * block + 5]))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
            elif op < 0.55:
                size = rnd.randrange(0, 7 * block)
                os.ftruncate(fd, size)
                model = model[:size] + bytearray(max(0, size - len(model)))
            elif op < 0.65 and len(model) > 0:
                with mmap.mmap(fd, len(model)) as mm:
                    off = rnd.randrange(len(model))
                    data = rnd.randbytes(min(len(model) - off, rnd.randrange(1, 2 * block)))
                    mm[off:off + len(data)] = data
                    model[off:off + len(data)] = data
                    mm.flush()
            elif op < 0.9:
                off = rnd.randrange(0, 7 * block)
                n = rnd.randrange(1, 3 * block)
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), (step, off, n)
            else:
                os.close(fd)
                fd = os.open(p, os.O_RDWR)
                assert cold_read(p) == model, step
            assert os.fstat(fd).st_size == len(model), step
    finally:
        os.close(fd)
    assert cold_read(p) == model


# -- open files and names ------------------------------------------------------------------------


def test_unlink_while_open(d: Path) -> None:
    p = d / "gone"
    p.write_bytes(b"x" * 5000)
    fd = os.open(p, os.O_RDWR)
    ro = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        assert not p.exists() and os.listdir(d) == []
        st = os.fstat(fd)
        assert st.st_size == 5000 and st.st_nlink == 0 and stat.S_ISREG(st.st_mode)
        assert os.pread(fd, 10, 4995) == b"xxxxx"
        assert os.pwrite(fd, b"yy", 4999) == 2
        assert os.fstat(fd).st_size == 5001
        assert os.pread(ro, 10, 4995) == b"xxxxyy"
        os.ftruncate(fd, 4097)
        assert os.fstat(ro).st_size == 4097
        assert os.pread(ro, 10, 4090) == b"xxxxxxx"
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        os.setxattr(fd, "user.k", b"v")
        assert os.getxattr(fd, "user.k") == b"v" and os.listxattr(fd) == ["user.k"]
        os.utime(fd, ns=(10**9, 2 * 10**9))
        assert os.fstat(ro).st_mtime_ns == 2 * 10**9
        os.fsync(fd)
        # reopening through /proc/self/fd reaches the nameless file too
        with open(f"/proc/self/fd/{ro}", "rb") as again:
            assert again.read(7) == b"xxxxxxx"
    finally:
        os.close(fd)
        os.close(ro)
    # a new file may now reuse the backing inode; it must be a separate, empty file
    q = d / "new"
    q.write_bytes(b"fresh")
    assert cold_read(q) == b"fresh" and os.listdir(d) == ["new"]
    expect_errno(errno.ENODATA, os.getxattr, q, "user.k")


@pytest.mark.parametrize("make", ["create", "mknod"])
def test_reader_opened_on_empty_file_sees_later_writes(d: Path, make: str) -> None:
    p = d / "e"
    if make == "create":
        p.touch()
    else:  # a regular file without a content header yet
        os.mknod(p, stat.S_IFREG | 0o644)
    ro = os.open(p, os.O_RDONLY)
    try:
        assert os.read(ro, 10) == b""
        p.write_bytes(b"written later")
        os.posix_fadvise(ro, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(ro, 100, 0) == b"written later"
    finally:
        os.close(ro)


def test_create_honours_mode_with_umask_zero(d: Path) -> None:
    old = os.umask(0)
    try:
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(d / "dd", 0o777)
        os.mknod(d / "n", stat.S_IFREG | 0o666)
        os.mkfifo(d / "p", 0o666)
    finally:
        os.umask(old)
    for name, mode in (("f", 0o666), ("dd", 0o777), ("n", 0o666), ("p", 0o666)):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == mode, name
    old = os.umask(0o077)
    try:
        fd = os.open(d / "g", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d / "g").st_mode) == 0o600


def test_rename_over_existing_file(d: Path) -> None:
    (d / "a").write_bytes(b"AAA")
    (d / "b").write_bytes(b"BBBBBB")
    fd_b = os.open(d / "b", os.O_RDONLY)
    try:
        os.rename(d / "a", d / "b")
        assert sorted(os.listdir(d)) == ["b"]
        assert cold_read(d / "b") == b"AAA" and os.stat(d / "b").st_size == 3
        assert os.pread(fd_b, 10, 0) == b"BBBBBB"  # the replaced file lives on while open
        assert os.fstat(fd_b).st_size == 6  # and answers fstat, though it has no name left
        os.fchmod(fd_b, 0o640)
        assert stat.S_IMODE(os.fstat(fd_b).st_mode) == 0o640
        assert os.stat(d / "b").st_ino != os.fstat(fd_b).st_ino
    finally:
        os.close(fd_b)
    # rename onto a hard link of itself does nothing
    os.link(d / "b", d / "c")
    os.rename(d / "b", d / "c")
    assert sorted(os.listdir(d)) == ["b", "c"]
    assert cold_read(d / "b") == b"AAA" == cold_read(d / "c")


def test_rename_directories(d: Path) -> None:
    (d / "src").mkdir()
    (d / "src" / "sub").mkdir()
    (d / "src" / "f").write_bytes(b"child")
    (d / "src" / "sub" / "g").write_bytes(b"grandchild")
    os.symlink("f", d / "src" / "ln")
    (d / "empty").mkdir()
    (d / "full").mkdir()
    (d / "full" / "x").write_bytes(b"x")
    (d / "file").write_bytes(b"file")

    fd = os.open(d / "src" / "sub" / "g", os.O_RDWR)
    dfd = os.open(d / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        expect_errno(errno.ENOTEMPTY, os.rename, d / "src", d / "full")
        expect_errno(errno.ENOTDIR, os.rename, d / "src", d / "file")
        expect_errno(errno.EISDIR, os.rename, d / "file", d / "empty")
        expect_errno(errno.EINVAL, os.rename, d / "src", d / "src" / "sub" / "inside")
        os.rename(d / "src", d / "empty")  # over an empty directory
        assert sorted(os.listdir(d)) == ["empty", "file", "full"]
        assert sorted(os.listdir(d / "empty")) == ["f", "ln", "sub"]
        assert cold_read(d / "empty" / "f") == b"child"
        assert cold_read(d / "empty" / "sub" / "g") == b"grandchild"
        assert cold_read(d / "empty" / "ln") == b"child"
        # previously opened file and directory still work
        assert os.pread(fd, 100, 0) == b"grandchild"
        os.pwrite(fd, b"G", 0)
        assert cold_read(d / "empty" / "sub" / "g") == b"Grandchild"
        assert sorted(os.listdir(dfd)) == ["f", "ln", "sub"]
        with open(os.open("f", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            assert f.read() == b"child"
        os.mkdir("made-via-fd", dir_fd=dfd)
        assert (d / "empty" / "made-via-fd").is_dir()
        # across directories, and back
        os.rename(d / "empty", d / "full" / "moved")
        assert sorted(os.listdir(d / "full")) == ["moved", "x"]
        assert cold_read(d / "full" / "moved" / "sub" / "g") == b"Grandchild"
        os.rename(d / "full" / "moved" / "sub", d / "sub2")
        assert cold_read(d / "sub2" / "g") == b"Grandchild"
        os.fsync(dfd)
    finally:
        os.close(fd)
        os.close(dfd)


def test_open_directory_sees_changes_after_rewind(d: Path) -> None:
    (d / "a").touch()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(dfd) == ["a"]
        (d / "b").touch()
        os.unlink(d / "a")
        assert os.listdir(dfd) == ["b"]  # os.listdir(fd) rewinds the same open directory
    finally:
        os.close(dfd)


def test_posix_fallocate_and_copy_file_range(bd: tuple[Path, int]) -> None:
    d, block = bd
    p, q = d / "f", d / "g"
    data = os.urandom(3 * block + 10)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 5 * block)
        assert os.fstat(fd).st_size == 5 * block
    finally:
        os.close(fd)
    assert cold_read(p) == data + bytes(5 * block - len(data))
    with open(p, "rb") as src, open(q, "wb") as dst:
        n = os.copy_file_range(src.fileno(), dst.fileno(), 2 * block, 100)
        assert 0 < n <= 2 * block
        while n < 2 * block:
            n += os.copy_file_range(src.fileno(), dst.fileno(), 2 * block - n, 100 + n)
    assert cold_read(q) == (data + bytes(block * 5))[100:100 + 2 * block]


def test_rename_file_across_directories(d: Path) -> None:
    (d / "x").mkdir()
    (d / "y").mkdir()
    (d / "x" / "f").write_bytes(b"data" * 2000)
    os.rename(d / "x" / "f", d / "y" / "g")
    assert os.listdir(d / "x") == [] and os.listdir(d / "y") == ["g"]
    assert cold_read(d / "y" / "g") == b"data" * 2000
    os.rmdir(d / "x")


def test_renameat2_noreplace_and_exchange(d: Path) -> None:
    (d / "a").write_bytes(b"AAAA")
    (d / "b").write_bytes(b"BB")
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    assert cold_read(d / "a") == b"AAAA" and cold_read(d / "b") == b"BB"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(d)) == ["b", "c"]

    renameat2(d / "b", d / "c", RENAME_EXCHANGE)
    assert cold_read(d / "b") == b"AAAA" and cold_read(d / "c") == b"BB"
    assert os.stat(d / "b").st_size == 4 and os.stat(d / "c").st_size == 2
    expect_errno(errno.ENOENT, renameat2, d / "b", d / "missing", RENAME_EXCHANGE)

    # a file and a directory, in different directories, one of them with a long name
    long = "L" * 255
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_bytes(b"inner")
    (d / "other").mkdir()
    (d / "other" / long).write_bytes(b"longfile")
    fd = os.open(d / "dir" / "inner", os.O_RDONLY)
    try:
        renameat2(d / "dir", d / "other" / long, RENAME_EXCHANGE)
        assert cold_read(d / "dir") == b"longfile"
        assert os.listdir(d / "other" / long) == ["inner"]
        assert cold_read(d / "other" / long / "inner") == b"inner"
        assert os.pread(fd, 10, 0) == b"inner"
        assert sorted(os.listdir(d)) == ["b", "c", "dir", "other"]
        assert os.listdir(d / "other") == [long]
    finally:
        os.close(fd)


def _is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_renameat2_whiteout_leaves_a_whiteout_under_the_old_name(tmp_path: Path, fs_home: Path) -> None:
    """RENAME_WHITEOUT (what overlayfs asks of its upper layer) was taken for a plain rename."""
    names = [("f", "g"), ("L" * 255, "M" * 255)]  # a long name keeps its side file for the whiteout
    with new_mount(tmp_path, fs_home) as m:
        for old, new in names:
            (m.mountpoint / old).write_bytes(old.encode())
            renameat2(m.mountpoint / old, m.mountpoint / new, RENAME_WHITEOUT)
        os.symlink("target", m.mountpoint / "link")
        renameat2(m.mountpoint / "link", m.mountpoint / "link2", RENAME_WHITEOUT)
    with new_mount(tmp_path, fs_home) as m:
        for old, new in names:
            assert _is_whiteout(m.mountpoint / old) and cold_read(m.mountpoint / new) == old.encode()
        assert _is_whiteout(m.mountpoint / "link") and os.readlink(m.mountpoint / "link2") == "target"
        assert sorted(os.listdir(m.mountpoint)) == sorted(["link", "link2", *(n for pair in names for n in pair)])


def test_overlayfs_runs_with_its_upper_layer_on_encfs(tmp_path: Path, fs_home: Path) -> None:
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    lower.mkdir()
    merged.mkdir()
    (lower / "gone").write_bytes(b"lower")
    (lower / "kept").write_bytes(b"lower")
    with new_mount(tmp_path, fs_home) as m:
        upper, work = m.mountpoint / "upper", m.mountpoint / "work"
        upper.mkdir()
        work.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True, timeout=30)
        try:
            (merged / "gone").unlink()
            (merged / "new").write_bytes(b"upper")
            os.rename(merged / "kept", merged / "moved")  # copied up, the old name whited out
            assert sorted(os.listdir(merged)) == ["moved", "new"]
        finally:
            subprocess.run(["umount", str(merged)], check=True, timeout=30)
        assert _is_whiteout(upper / "gone") and _is_whiteout(upper / "kept")
        assert (upper / "moved").read_bytes() == b"lower" and (upper / "new").read_bytes() == b"upper"


def test_o_direct_behaves_as_on_ext4_and_buffered_readers_see_its_writes(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"a" * 3 * 4096)
    reader = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(reader, 3 * 4096, 0) == b"a" * 3 * 4096  # now in the page cache
        buf = mmap.mmap(-1, 2 * 4096)  # O_DIRECT wants aligned memory
        buf.write(b"b" * 2 * 4096)
        direct = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwrite(direct, buf, 4096) == 2 * 4096
            back = mmap.mmap(-1, 4096)
            assert os.preadv(direct, [back], 8192) == 4096 and back[:] == b"b" * 4096
        finally:
            os.close(direct)
        assert os.pread(reader, 3 * 4096, 0) == b"a" * 4096 + b"b" * 2 * 4096  # not the cached pages
        # asynchronous direct writes (libaio) under the same cached reader
        subprocess.run(["fio", "--name=t", f"--filename={p}", "--rw=write", "--bs=4k", "--size=12k",
                        "--ioengine=libaio", "--iodepth=4", "--direct=1", "--buffer_pattern=0x63"],
                       check=True, capture_output=True, timeout=60)
        assert os.pread(reader, 3 * 4096, 0) == b"c" * 3 * 4096
        # a shared mapping of an O_DIRECT descriptor, as on ext4
        direct = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            with mmap.mmap(direct, 4096) as shared:
                shared[:5] = b"mmap!"
                shared.flush()
        finally:
            os.close(direct)
        assert os.pread(reader, 6, 0) == b"mmap!c"
    finally:
        os.close(reader)
    assert cold_read(p) == b"mmap!" + b"c" * (3 * 4096 - 5)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_unprivileged_write_outside_the_group_keeps_set_gid_without_group_execute(server: str, fs_home: Path,
                                                                                 direct: bool) -> None:
    """write(2) by a caller without CAP_FSETID and outside the file's group drops S_ISGID only
    with group execute: FUSE's rule (FUSE_WRITE_KILL_SUIDGID for an O_DIRECT write, served as
    FOPEN_DIRECT_IO; the kernel's own for a buffered one), where Linux 6.x local filesystems drop
    it. The rest of the set-id rules, compared with a local directory, is test_fuse_killpriv's."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="encfs-setid-", dir="/tmp"))
    base.chmod(0o755)  # nobody must reach the mountpoint
    m = new_mount(base, fs_home, "--allow-other")
    try:
        (m.mountpoint).chmod(0o777)
        flag = ["oflag=direct"] if direct else []
        p = m.mountpoint / "g-nox"
        p.write_bytes(b"x" * 4096)
        p.chmod(0o2767)  # root's group: nobody is outside it
        subprocess.run(["dd", "if=/dev/zero", f"of={p}", "bs=4096", "count=1", "conv=notrunc", *flag],
                       user="nobody", check=True, capture_output=True, timeout=30)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o2767
        assert cold_read(p) == bytes(4096)
    finally:
        m.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_hard_links(d: Path) -> None:
    a, b, c = d / "a", d / "b", d / "c"
    a.write_bytes(b"shared" * 1000)
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_nlink == 2 == sb.st_nlink and sa.st_ino == sb.st_ino
    assert sa.st_size == 6000 == sb.st_size
    fd = os.open(b, os.O_RDWR)
    try:
        assert os.fstat(fd).st_nlink == 2 and os.fstat(fd).st_size == 6000
        os.pwrite(fd, b"CHANGED", 4090)
        assert cold_pread(a, 7, 4090) == b"CHANGED"
        with open(a, "ab") as f:
            f.write(b"+tail")
        assert os.fstat(fd).st_size == 6005
        assert os.pread(fd, 5, 6000) == b"+tail"
        os.link(b, c)
        assert os.stat(a).st_nlink == 3 and os.stat(c).st_size == 6005
        os.unlink(a)
        assert os.stat(b).st_nlink == 2 == os.fstat(fd).st_nlink
        os.unlink(c)
        assert os.stat(b).st_nlink == 1 and os.stat(b).st_size == 6005
        assert sorted(os.listdir(d)) == ["b"]
    finally:
        os.close(fd)
    assert cold_read(b)[4090:4097] == b"CHANGED"
    os.mkdir(d / "sub")
    expect_errno(errno.EPERM, os.link, d / "sub", d / "sublink")  # no hard links to directories


def test_symlinks(d: Path) -> None:
    (d / "target").write_bytes(b"pointed-to")
    os.symlink("target", d / "rel")
    os.symlink(str(d / "target"), d / "abs")
    os.symlink("nowhere/at/all", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert os.readlink(d / "abs") == str(d / "target")
    assert cold_read(d / "rel") == b"pointed-to" == cold_read(d / "abs")
    assert os.lstat(d / "rel").st_size == len("target")
    assert stat.S_ISLNK(os.lstat(d / "dangling").st_mode)
    assert not (d / "dangling").exists() and os.path.lexists(d / "dangling")
    expect_errno(errno.ENOENT, os.stat, d / "dangling")
    expect_errno(errno.EEXIST, os.symlink, "x", d / "rel")
    os.symlink("target", d / "chain1")
    os.symlink("chain1", d / "chain2")
    assert cold_read(d / "chain2") == b"pointed-to"
    os.symlink("loop", d / "loop")
    expect_errno(errno.ELOOP, os.stat, d / "loop")
    os.utime(d / "rel", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    assert os.lstat(d / "rel").st_mtime_ns == 2 * 10**9
    assert os.stat(d / "target").st_mtime_ns != 2 * 10**9
    os.unlink(d / "rel")
    assert cold_read(d / "target") == b"pointed-to"


def _stored_long_targets(m: Mount) -> int:
    store = m.cipherdir / "encfs.longlinks"
    return len(os.listdir(store)) if store.exists() else 0


@pytest.mark.parametrize("length", [1, 1000, 3000, 3100, 4095])
def test_symlink_long_targets(mnt: Mount, d: Path, length: int) -> None:
    stored0 = _stored_long_targets(mnt)
    target = ("t/" * length)[:length - 1] + "x"
    assert len(target) == length
    os.symlink(target, d / "victim")
    os.symlink(target, d / "ln")
    assert os.readlink(d / "ln") == target
    assert os.lstat(d / "ln").st_size == length
    os.rename(d / "ln", d / "ln2")
    os.link(d / "ln2", d / "ln3", follow_symlinks=False)
    os.unlink(d / "ln2")
    assert os.readlink(d / "ln3") == target
    expect_errno(errno.ENAMETOOLONG, os.symlink, "y" * 4096, d / "toolong")
    os.rename(d / "ln3", d / "victim")  # replaces the other symlink
    assert os.readlink(d / "victim") == target and os.lstat(d / "victim").st_size == length
    os.unlink(d / "victim")
    assert os.listdir(d) == []
    assert _stored_long_targets(mnt) == stored0, "stored long symlink targets leaked"


def test_long_symlink_targets_need_the_feature_flag(tmp_path: Path, fs_home: Path) -> None:
    """A filesystem created before "long-symlinks" keeps the old limit (its readers lack the feature)."""
    from fsconfig_tool import remac

    from encfs.fuse.fsconfig import features_for

    cipher = tmp_path / "cipher"
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    remac(cipher, fs_home, {"features": [f for f in features_for(32768) if f != "long-symlinks"]})
    with new_mount(tmp_path, fs_home) as m:
        os.symlink("y" * 3000, m.mountpoint / "fits")
        assert os.readlink(m.mountpoint / "fits") == "y" * 3000
        expect_errno(errno.ENAMETOOLONG, os.symlink, "y" * 3100, m.mountpoint / "too-long")
        assert not (cipher / "encfs.longlinks").exists()


def test_mknod_fifo(d: Path) -> None:
    p = d / "fifo"
    os.mkfifo(p, 0o640)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
    finally:
        os.close(w)
        os.close(r)
    assert os.listdir(d) == ["fifo"]
    os.unlink(p)


# -- attributes ----------------------------------------------------------------------------------


def test_chmod_chown_and_ctime(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    st0 = os.stat(p)
    time.sleep(0.02)
    os.chmod(p, 0o751)
    st1 = os.stat(p)
    assert stat.S_IMODE(st1.st_mode) == 0o751
    assert st1.st_ctime_ns > st0.st_ctime_ns
    assert st1.st_mtime_ns == st0.st_mtime_ns
    os.chown(p, 65534, 65534)
    st2 = os.stat(p)
    assert (st2.st_uid, st2.st_gid) == (65534, 65534)
    os.chown(p, -1, 0)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (65534, 0)
    (d / "dir").mkdir()
    os.chmod(d / "dir", 0o700)
    os.chown(d / "dir", 65534, 65534)
    st = os.stat(d / "dir")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 65534
    os.symlink("f", d / "ln")
    os.chown(d / "ln", 65534, 65534, follow_symlinks=False)
    assert os.lstat(d / "ln").st_uid == 65534 and os.stat(p).st_gid == 0
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755


def test_access_and_exec_checks(d: Path) -> None:
    """The mount has no default_permissions (no allow_other): access(2) and chdir reach the daemon,
    which answers for the mounting user (root here: read and write always, execute only with an
    x bit), also for a file whose last name is gone; exec still needs an x bit (the kernel checks)."""
    p = d / "tool"
    p.write_bytes(b"#!/bin/sh\necho ran\n")
    os.chmod(p, 0o644)
    assert os.access(p, os.R_OK | os.W_OK) and os.access(p, os.F_OK)
    assert not os.access(p, os.X_OK)
    expect_errno(errno.EACCES, subprocess.run, [str(p)])
    os.chmod(p, 0o744)
    assert os.access(p, os.X_OK)
    assert subprocess.run([str(p)], capture_output=True, text=True).stdout == "ran\n"
    assert not os.access(d / "missing", os.F_OK)
    (d / "sub").mkdir(mode=0o000)
    assert os.access(d / "sub", os.X_OK)  # root may search any directory
    os.symlink("tool", d / "ln")
    assert os.access(d / "ln", os.W_OK, follow_symlinks=False)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        os.fchmod(fd, 0o600)
        assert os.access(f"/proc/self/fd/{fd}", os.R_OK)
        assert not os.access(f"/proc/self/fd/{fd}", os.X_OK)
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["ln", "sub"]


def test_setgid_directory_passes_on_its_group(d: Path) -> None:
    sg = d / "sg"
    sg.mkdir()
    os.chown(sg, 0, 65534)
    os.chmod(sg, 0o2775)
    (sg / "f").write_bytes(b"")
    (sg / "sub").mkdir(0o755)
    os.symlink("f", sg / "ln")
    os.mkfifo(sg / "fifo")
    assert os.stat(sg / "f").st_gid == 65534 and os.lstat(sg / "ln").st_gid == 65534
    assert os.stat(sg / "fifo").st_gid == 65534
    st = os.stat(sg / "sub")
    assert st.st_gid == 65534 and st.st_mode & stat.S_ISGID
    (d / "plain").mkdir()
    os.chown(d / "plain", 0, 65534)
    (d / "plain" / "f").write_bytes(b"")
    assert os.stat(d / "plain" / "f").st_gid == 0  # no set-group-ID bit: the creator's group


def test_flock_and_fcntl_locks(d: Path) -> None:
    import fcntl

    p = d / "lock"
    p.write_bytes(b"x" * 100)
    with open(p, "rb") as a, open(p, "rb") as b:
        fcntl.flock(a, fcntl.LOCK_EX)
        expect_errno(errno.EWOULDBLOCK, fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(p, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        fcntl.lockf(f, fcntl.LOCK_UN, 10, 0)


def test_utimens_and_mtime_on_write(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"abc")
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(d, ns=(3_000_000_000, 4_000_000_789))
    assert os.stat(d).st_mtime_ns == 4_000_000_789
    before = time.time_ns()
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"Z", 1)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert st.st_mtime_ns >= before - 50_000_000
    # a write is not a read: atime stays (the read-modify-write of a partial block is internal)
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns and st.st_atime_ns == 1_000_000_123
    assert cold_read(p) == b"aZc"
    assert os.stat(p).st_atime_ns > 1_000_000_123  # a read is (relatime: atime was older than mtime)
    os.utime(p, ns=(5 * 10**9, 6 * 10**9))
    os.truncate(p, 10000)
    assert os.stat(p).st_mtime_ns > 6 * 10**9
    os.utime(p)  # UTIME_NOW
    assert abs(os.stat(p).st_mtime_ns - time.time_ns()) < 5 * 10**9
    m0 = os.stat(d).st_mtime_ns
    (d / "new").touch()
    assert os.stat(d).st_mtime_ns > m0  # creating an entry changes the directory's mtime


def test_times_before_1970_and_after_2038_round_trip(tmp_path: Path, fs_home: Path) -> None:
    """fuse_attr and fuse_setattr_in carry times the kernel reads as signed: a pre-1970 touch
    was EIO. Checked after a remount, so the times come from the backing store."""
    # 1960, and 2242 (an ext4 backing store's times end in 2446)
    times = {"old": (-315_619_200 * 10**9 + 5, -1), "far": (2**33 * 10**9, 2**33 * 10**9 + 999_999_999)}
    with new_mount(tmp_path, fs_home) as m:
        for name, ns in times.items():
            (m.mountpoint / name).touch()
            os.utime(m.mountpoint / name, ns=ns)
            st = os.stat(m.mountpoint / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == ns
    with new_mount(tmp_path, fs_home) as m:
        for name, ns in times.items():
            st = os.stat(m.mountpoint / name)
            assert (st.st_atime_ns, st.st_mtime_ns) == ns, name


def test_statfs(d: Path) -> None:
    sv = os.statvfs(d)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_bavail <= sv.f_blocks


def test_fsync_and_fdatasync(d: Path) -> None:
    p = d / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable" * 1000)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    ro = os.open(p, os.O_RDONLY)
    try:
        os.fsync(ro)
    finally:
        os.close(ro)


def test_xattrs(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    (d / "dir").mkdir()
    for target in (p, d / "dir"):
        assert os.listxattr(target) == []
        os.setxattr(target, "user.one", b"1")
        os.setxattr(target, "user.bin", b"\0\xff" * 1000)
        os.setxattr(target, "user.empty", b"")
        assert os.getxattr(target, "user.one") == b"1"
        assert os.getxattr(target, "user.bin") == b"\0\xff" * 1000
        assert os.getxattr(target, "user.empty") == b""
        assert sorted(os.listxattr(target)) == ["user.bin", "user.empty", "user.one"]
        expect_errno(errno.ENODATA, os.getxattr, target, "user.missing")
        expect_errno(errno.ENODATA, os.removexattr, target, "user.missing")
        expect_errno(errno.EEXIST, os.setxattr, target, "user.one", b"2", os.XATTR_CREATE)
        expect_errno(errno.ENODATA, os.setxattr, target, "user.nope", b"2", os.XATTR_REPLACE)
        os.setxattr(target, "user.one", b"replaced", os.XATTR_REPLACE)
        assert os.getxattr(target, "user.one") == b"replaced"
        os.removexattr(target, "user.one")
        expect_errno(errno.ENODATA, os.getxattr, target, "user.one")
        assert sorted(os.listxattr(target)) == ["user.bin", "user.empty"]
    # xattrs follow the inode through rename and hard link
    os.rename(p, d / "g")
    os.link(d / "g", d / "h")
    assert os.getxattr(d / "h", "user.bin") == b"\0\xff" * 1000
    os.setxattr(d / "h", "user.via-link", b"v")
    assert os.getxattr(d / "g", "user.via-link") == b"v"


def test_xattr_names_up_to_the_linux_limit(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"")
    name = "user." + "n" * 160
    os.setxattr(p, name, b"v160")
    assert os.getxattr(p, name) == b"v160" and os.listxattr(p) == [name]
    expect_errno(errno.ERANGE, os.setxattr, p, "user." + "n" * 251, b"v")  # 256 > XATTR_NAME_MAX


def test_xattr_255_byte_name(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"")
    name = "user." + "n" * 250
    os.setxattr(p, name, b"v")
    os.setxattr(p, "user.short", b"s")
    assert os.getxattr(p, name) == b"v"
    assert sorted(os.listxattr(p)) == sorted([name, "user.short"])
    os.setxattr(p, name, b"w" * 1000)  # replace the value
    assert os.getxattr(p, name) == b"w" * 1000
    os.removexattr(p, name)
    assert os.listxattr(p) == ["user.short"]
    expect_errno(errno.ENODATA, os.getxattr, p, name)


def test_mmap_read_and_write(bd: tuple[Path, int]) -> None:
    d, block = bd
    p = d / "m"
    data = bytearray(os.urandom(3 * block + 1000))
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(data)) as mm:
            assert mm[:] == data
            assert mm[block - 3:block + 3] == data[block - 3:block + 3]
            mm[block - 5:block + 5] = b"M" * 10
            mm[-7:] = b"THE-END"
            data[block - 5:block + 5] = b"M" * 10
            data[-7:] = b"THE-END"
            mm.flush()  # msync
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert cold_read(p) == data
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:] == data


def test_two_processes_write_disjoint_regions(d: Path) -> None:
    p = d / "shared"
    child = r"""
import os, sys, time, hashlib
path, start, end, fill, me, other = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode(), sys.argv[5], sys.argv[6]
while not os.path.exists(path + ".go"):
    time.sleep(0.001)
fd = os.open(path, os.O_WRONLY)
pos = start
while pos < end:
    n = min(301, end - pos)
    os.pwrite(fd, fill * n, pos)
    pos += n
os.close(fd)
open(path + "." + me, "w").close()
while not os.path.exists(path + "." + other):
    time.sleep(0.001)
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
data = b""
while chunk := os.read(fd, 1 << 20):
    data += chunk
os.close(fd)
print(hashlib.sha256(data).hexdigest(), len(data))
"""
    mid, end = 50_001, 100_003  # the shared block 12 is written by both
    p.touch()
    procs = [subprocess.Popen([sys.executable, "-c", child, str(p), "0", str(mid), "a", "A", "B"],
                              stdout=subprocess.PIPE),
             subprocess.Popen([sys.executable, "-c", child, str(p), str(mid), str(end), "b", "B", "A"],
                              stdout=subprocess.PIPE)]
    time.sleep(0.3)
    (d / "shared.go").touch()
    outs = [pr.communicate(timeout=120)[0].decode().split() for pr in procs]
    assert all(pr.returncode == 0 for pr in procs)
    expect = b"a" * mid + b"b" * (end - mid)
    assert cold_read(p) == expect
    for digest, size in outs:
        assert (digest, int(size)) == (hashlib.sha256(expect).hexdigest(), end)


# -- errno mapping -------------------------------------------------------------------------------


def test_errno_mapping(d: Path) -> None:
    (d / "dir").mkdir()
    (d / "dir" / "child").write_bytes(b"")
    (d / "file").write_bytes(b"f")
    expect_errno(errno.ENOENT, os.stat, d / "missing")
    expect_errno(errno.ENOENT, open, d / "missing", "rb")
    expect_errno(errno.ENOENT, os.unlink, d / "missing")
    expect_errno(errno.ENOENT, os.rmdir, d / "missing")
    expect_errno(errno.ENOENT, os.rename, d / "missing", d / "x")
    expect_errno(errno.ENOENT, os.mkdir, d / "missing" / "sub")
    expect_errno(errno.EEXIST, os.mkdir, d / "dir")
    expect_errno(errno.EEXIST, os.mkdir, d / "file")
    expect_errno(errno.EEXIST, os.open, d / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.link, d / "file", d / "dir" / "child")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "dir")
    expect_errno(errno.EISDIR, os.open, d / "dir", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, d / "dir", os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, d / "dir")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "file")
    expect_errno(errno.ENOTDIR, os.stat, d / "file" / "x")
    expect_errno(errno.ENOTDIR, os.open, d / "file" / "x", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENOTDIR, os.listdir, d / "file")
    expect_errno(errno.ENAMETOOLONG, os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.stat, d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.rename, d / "file", d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t", d / ("n" * 256))
    expect_errno(errno.ENAMETOOLONG, os.link, d / "file", d / ("n" * 256))
    assert sorted(os.listdir(d)) == ["dir", "file"]
    assert os.listdir(d / "dir") == ["child"]
    os.unlink(d / "dir" / "child")
    os.rmdir(d / "dir")
    expect_errno(errno.ENOENT, os.stat, d / "dir")


# -- names ---------------------------------------------------------------------------------------


def _side_files(cipherdir: Path) -> int:
    return sum(1 for _, _, files in os.walk(cipherdir) for f in files if f.startswith("encfs.ln."))


def test_255_byte_names(mnt: Mount, d: Path) -> None:
    side0 = _side_files(mnt.cipherdir)
    names = ["F" * 255, "é" * 127 + "a", "D" * 255, "S" * 255, "H" * 255]
    f, utf, dn, sn, hn = names
    assert all(len(n.encode()) == 255 for n in names)
    (d / f).write_bytes(b"long file")
    (d / utf).write_bytes(b"utf8")
    (d / dn).mkdir()
    (d / dn / f).write_bytes(b"nested long")
    os.symlink(f, d / sn)
    os.link(d / f, d / hn)
    assert sorted(os.listdir(d)) == sorted(names)
    assert sorted(subprocess.run(["ls", "-A", str(d)], capture_output=True, check=True).stdout.decode().split("\n")[:-1]) \
        == sorted(names)
    assert os.listdir(d / dn) == [f]
    assert cold_read(d / f) == b"long file" and cold_read(d / utf) == b"utf8"
    assert cold_read(d / sn) == b"long file" and os.readlink(d / sn) == f
    assert os.stat(d / hn).st_nlink == 2
    assert cold_read(d / dn / f) == b"nested long"
    # rename long -> long, long -> short, short -> long
    os.rename(d / f, d / ("G" * 255))
    os.rename(d / utf, d / "short")
    os.rename(d / "short", d / ("ü" * 127 + "b"))
    os.rename(d / dn, d / ("E" * 255))
    os.rename(d / sn, d / ("T" * 255))
    os.rename(d / hn, d / ("G" * 255))  # a hard link onto its other name: both stay
    listing = sorted(os.listdir(d))
    assert listing == sorted(["G" * 255, "ü" * 127 + "b", "E" * 255, "T" * 255, hn])
    assert cold_read(d / ("E" * 255) / f) == b"nested long"
    assert cold_read(d / ("ü" * 127 + "b")) == b"utf8"
    assert os.readlink(d / ("T" * 255)) == f  # dangling now: F... was renamed
    for n in ("G" * 255, "ü" * 127 + "b", "T" * 255, hn):
        os.unlink(d / n)
    os.unlink(d / ("E" * 255) / f)
    os.rmdir(d / ("E" * 255))
    assert os.listdir(d) == []
    assert _side_files(mnt.cipherdir) == side0, "long-name side files were left behind"
    raw = os.fsencode(d) + b"/" + b"\xff\xfe-not-utf8-" + b"\x80" * 243
    assert len(os.path.basename(raw)) == 255
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"raw")
    os.close(fd)
    assert os.listdir(os.fsencode(d)) == [os.path.basename(raw)]
    assert cold_read(Path(os.fsdecode(raw))) == b"raw"


def test_listing_hides_internal_entries(mnt: Mount, d: Path) -> None:
    (d / "a").write_bytes(b"")
    (d / "sub").mkdir()
    (d / ("L" * 200)).write_bytes(b"")
    out = subprocess.run(["ls", "-A", str(d)], capture_output=True, check=True).stdout.decode().split()
    assert sorted(out) == sorted(["a", "sub", "L" * 200])
    assert os.listdir(d / "sub") == []
    root = set(os.listdir(mnt.mountpoint))
    assert not any(n.startswith("encfs") for n in root)
    for name in ("encfs.dirid", "encfs.conf"):
        expect_errno(errno.ENOENT, os.stat, d / name)
        expect_errno(errno.ENOENT, os.stat, mnt.mountpoint / name)
    # a user file named like encfs's own bookkeeping is just a file
    (d / "encfs.dirid").write_bytes(b"mine")
    assert cold_read(d / "encfs.dirid") == b"mine"
    assert sorted(os.listdir(d)) == sorted(["a", "sub", "L" * 200, "encfs.dirid"])


# -- paths up to PATH_MAX (issue #22) ---------------------------------------------------------------

# 159-byte names have the longest backing names kept inline (235 bytes): 24 levels of them are a
# 3,840-byte plaintext path whose backing path passes 5,600 bytes; a 255-byte leaf makes 4,095.
DEEP_NAMES = ["%03d" % i + "d" * 156 for i in range(24)]
DEEP = "".join(n + "/" for n in DEEP_NAMES)
LEAF = DEEP + "f" * (4095 - len(DEEP))


def _make_deep(top: int) -> None:
    for i in range(1, len(DEEP_NAMES) + 1):
        os.mkdir("/".join(DEEP_NAMES[:i]), 0o755, dir_fd=top)


def _read_at(top: int, rel: str) -> bytes:
    fd = os.open(rel, os.O_RDONLY, dir_fd=top)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _write_at(top: int, rel: str, data: bytes) -> None:
    fd = os.open(rel, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=top)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_every_operation_at_a_4095_byte_path(d: Path) -> None:
    """Paths are given relative to a directory fd (the kernel takes at most 4,095 bytes per call);
    calls without a dir_fd form go through /proc/self/fd/<fd of the deep directory>."""
    assert len(LEAF.encode()) == 4095
    top = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    deep = -1
    try:
        _make_deep(top)
        deep = os.open(DEEP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
        here = f"/proc/self/fd/{deep}/"
        leaf = os.path.basename(LEAF)
        _write_at(top, LEAF, b"deep data")
        assert _read_at(top, LEAF) == b"deep data"
        os.truncate(here + leaf, 4)
        os.chmod(LEAF, 0o600, dir_fd=top)
        os.chown(LEAF, 1, 2, dir_fd=top)
        st = os.stat(LEAF, dir_fd=top)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 1, 2, 4)
        assert _read_at(top, LEAF) == b"deep"
        os.setxattr(here + leaf, "user.k", b"v")
        assert os.getxattr(here + leaf, "user.k") == b"v" and os.listxattr(here + leaf) == ["user.k"]
        os.removexattr(here + leaf, "user.k")
        assert os.listxattr(here + leaf) == []
        os.mkdir(DEEP + "s" * 255, dir_fd=top)
        os.rmdir(DEEP + "s" * 255, dir_fd=top)
        os.link(LEAF, "top", src_dir_fd=top, dst_dir_fd=top)  # a deep source
        os.link("top", DEEP + "h" * 255, src_dir_fd=top, dst_dir_fd=top)  # a deep destination
        assert os.stat(LEAF, dir_fd=top).st_nlink == 3
        os.rename(LEAF, "moved", src_dir_fd=top, dst_dir_fd=top)
        os.rename("moved", LEAF, src_dir_fd=top, dst_dir_fd=top)
        target = "/" + "t" * 4094
        os.symlink(target, DEEP + "l" * 255, dir_fd=top)
        assert os.readlink(DEEP + "l" * 255, dir_fd=top) == target
        expect_errno(errno.ENAMETOOLONG, os.symlink, target + "t", "l", dir_fd=top)
        os.mkfifo(DEEP + "p" * 255, dir_fd=top)
        os.mknod(DEEP + "n" * 255, stat.S_IFREG | 0o644, dir_fd=top)
        assert stat.S_ISFIFO(os.stat(DEEP + "p" * 255, dir_fd=top).st_mode)
        # exactly past the limits: a 256-byte name (the daemon's answer), a 4,096-byte path (the kernel's)
        expect_errno(errno.ENAMETOOLONG, os.open, DEEP + "x" * 256, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=top)
        os.mkdir(DEEP + "a" * 100, dir_fd=top)
        _write_at(top, DEEP + "a" * 100 + "/" + "b" * 154, b"4095")
        expect_errno(errno.ENAMETOOLONG, _write_at, top, DEEP + "a" * 100 + "/" + "b" * 155, b"")
        assert sorted(os.listdir(deep)) == sorted([leaf, "h" * 255, "l" * 255, "p" * 255, "n" * 255, "a" * 100])
        # a rename at the top keeps the subtree usable, by a fresh path and by the fd held on it
        os.rename(DEEP_NAMES[0], "R" * 159, src_dir_fd=top, dst_dir_fd=top)
        renamed = "R" * 159 + LEAF[len(DEEP_NAMES[0]):]
        assert _read_at(top, renamed) == b"deep" and os.readlink(here + "l" * 255) == target
        for n in (leaf, "h" * 255, "l" * 255, "p" * 255, "n" * 255, "a" * 100 + "/" + "b" * 154):
            os.unlink(here + n)
        os.rmdir(here + "a" * 100)
        os.unlink("top", dir_fd=top)
        names = ["R" * 159, *DEEP_NAMES[1:]]
        for i in range(len(names), 0, -1):
            os.rmdir("/".join(names[:i]), dir_fd=top)
        assert os.listdir(d) == []
    finally:
        if deep >= 0:
            os.close(deep)
        os.close(top)


def test_a_deep_tree_survives_remount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        top = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _make_deep(top)
            _write_at(top, LEAF, b"leaf")
            os.symlink("t" * 4000, DEEP + "l" * 200, dir_fd=top)
            os.rename("/".join(DEEP_NAMES[:13]), "M" * 159, src_dir_fd=top, dst_dir_fd=top)  # moved up
        finally:
            os.close(top)
    moved = "M" * 159 + "/" + LEAF[len("/".join(DEEP_NAMES[:13])) + 1:]
    with new_mount(tmp_path, fs_home) as m:
        top = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _read_at(top, moved) == b"leaf"
            assert os.readlink(os.path.dirname(moved) + "/" + "l" * 200, dir_fd=top) == "t" * 4000
            left = os.open("/".join(DEEP_NAMES[:12]), os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            try:
                assert os.listdir(left) == []
            finally:
                os.close(left)
        finally:
            os.close(top)


def _check_big_directory(d: Path, n: int) -> None:
    names = []
    for i in range(n):
        name = f"entry-{i:06d}" + ("-" + "x" * 200 if i % 97 == 0 else "")
        names.append(name)
        if i % 500 == 0:
            os.mkdir(d / name)
        else:
            os.mknod(d / name, stat.S_IFREG | 0o644)
    listed = os.listdir(d)
    assert len(listed) == n and sorted(listed) == sorted(names)
    # iterate in small steps while entries come and go: every untouched entry exactly once
    seen: list[str] = []
    removed, added = set(names[n // 2: n // 2 + 50]), {f"late-{i}" for i in range(50)}
    with os.scandir(d) as it:
        for k, e in enumerate(it):
            seen.append(e.name)
            if k == 100:
                for r in removed:
                    os.unlink(d / r) if not (d / r).is_dir() else os.rmdir(d / r)
                for a in added:
                    os.mknod(d / a, stat.S_IFREG | 0o644)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    stable = set(names) - removed
    assert stable <= set(seen), f"{len(stable - set(seen))} entries were skipped"
    assert set(seen) <= set(names) | added
    assert sorted(os.listdir(d)) == sorted(stable | added)


def test_directory_with_5000_entries(d: Path) -> None:
    _check_big_directory(d, 5000)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ENCFS_STRESS") != "1",
                    reason="100k-entry stress run; set ENCFS_STRESS=1 to run it (the 5000-entry test is the bounded version)")
def test_directory_with_100k_entries(d: Path) -> None:
    _check_big_directory(d, 100_000)


# -- mounts: read-only, remount, crash ---------------------------------------------------------------


def test_read_only_mount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        (mp / "f").write_bytes(b"content")
        (mp / "dir").mkdir()
        os.symlink("f", mp / "ln")
        os.setxattr(mp / "f", "user.k", b"v")
    with new_mount(tmp_path, fs_home, "--read-only") as m:
        mp = m.mountpoint
        assert cold_read(mp / "f") == b"content" and os.readlink(mp / "ln") == "f"
        assert os.getxattr(mp / "f", "user.k") == b"v"
        assert sorted(os.listdir(mp)) == ["dir", "f", "ln"]
        expect_errno(errno.EROFS, os.open, mp / "f", os.O_WRONLY)
        expect_errno(errno.EROFS, os.open, mp / "f", os.O_RDONLY | os.O_TRUNC)
        expect_errno(errno.EROFS, os.open, mp / "new", os.O_CREAT | os.O_WRONLY)
        expect_errno(errno.EROFS, os.mkdir, mp / "d2")
        expect_errno(errno.EROFS, os.unlink, mp / "f")
        expect_errno(errno.EROFS, os.rmdir, mp / "dir")
        expect_errno(errno.EROFS, os.rename, mp / "f", mp / "g")
        expect_errno(errno.EROFS, os.symlink, "x", mp / "ln2")
        expect_errno(errno.EROFS, os.link, mp / "f", mp / "hl")
        expect_errno(errno.EROFS, os.chmod, mp / "f", 0o600)
        expect_errno(errno.EROFS, os.truncate, mp / "f", 0)
        expect_errno(errno.EROFS, os.setxattr, mp / "f", "user.k", b"w")
        expect_errno(errno.EROFS, os.removexattr, mp / "f", "user.k")
        expect_errno(errno.EROFS, os.utime, mp / "f", ns=(1, 1))
        expect_errno(errno.EROFS, os.mkfifo, mp / "fifo")
        assert cold_read(mp / "f") == b"content"
        assert m.proc.poll() is None


def _populate(mp: Path) -> dict[str, bytes]:
    files = {"f": os.urandom(3 * BLOCK + 17), "dir/g": b"g" * 5000, "dir/" + "L" * 255: b"long",
             "empty": b""}
    (mp / "dir").mkdir()
    (mp / "other").mkdir()
    for name, data in files.items():
        with open(mp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.symlink("dir/g", mp / "ln")
    os.symlink("x" * 3500, mp / "longlink")
    os.link(mp / "f", mp / "other" / "f-link")
    os.setxattr(mp / "f", "user.key", b"value")
    (mp / "a").write_bytes(b"A")
    (mp / "other" / "b").mkdir()
    renameat2(mp / "a", mp / "other" / "b", RENAME_EXCHANGE)
    files["other/f-link"] = files["f"]
    for p in (mp, mp / "dir", mp / "other"):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    return files


def _verify(mp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert cold_read(mp / name) == data, name
        assert os.stat(mp / name).st_size == len(data)
    assert os.stat(mp / "f").st_nlink == 2
    assert os.readlink(mp / "ln") == "dir/g" and cold_read(mp / "ln") == files["dir/g"]
    assert os.readlink(mp / "longlink") == "x" * 3500
    assert os.getxattr(mp / "f", "user.key") == b"value"
    assert (mp / "a").is_dir() and cold_read(mp / "other" / "b") == b"A"
    assert sorted(os.listdir(mp)) == ["a", "dir", "empty", "f", "ln", "longlink", "other"]
    assert sorted(os.listdir(mp / "dir")) == sorted(["g", "L" * 255])


def test_data_survives_unmount_and_remount(tmp_path: Path, fs_home: Path) -> None:
    with new_mount(tmp_path, fs_home) as m:
        files = _populate(m.mountpoint)
        _verify(m.mountpoint, files)
    with new_mount(tmp_path, fs_home) as m:
        _verify(m.mountpoint, files)


def test_names_in_directories_reusing_freed_inodes_survive_remount(tmp_path: Path, fs_home: Path) -> None:
    """A directory replaced by rename frees its backing inode while the kernel still holds it (an
    open fd, like a shell's cwd); ext4 hands that number to the next new directory."""
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        for i in range(5):
            (mp / f"a{i}").mkdir()
            (mp / f"b{i}").mkdir()
            held = os.open(mp / f"b{i}", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.listdir(held)
                os.rename(mp / f"a{i}", mp / f"b{i}")
                for k in range(3):
                    (mp / f"c{i}-{k}").mkdir()
                    (mp / f"c{i}-{k}" / "f").write_bytes(b"%d" % i)
                    assert os.listdir(mp / f"c{i}-{k}") == ["f"]
            finally:
                os.close(held)
    with new_mount(tmp_path, fs_home) as m:
        mp = m.mountpoint
        for i in range(5):
            for k in range(3):
                assert os.listdir(mp / f"c{i}-{k}") == ["f"], (i, k)
                assert cold_read(mp / f"c{i}-{k}" / "f") == b"%d" % i


def test_fsynced_data_survives_kill9(tmp_path: Path, fs_home: Path) -> None:
    m = new_mount(tmp_path, fs_home)
    try:
        files = _populate(m.mountpoint)
        fd = os.open(m.mountpoint / "f", os.O_WRONLY)
        os.pwrite(fd, b"after", 10)
        os.fsync(fd)
        files["f"] = files["f"][:10] + b"after" + files["f"][15:]
        files["other/f-link"] = files["f"]
        m.kill9()  # the fd dies with the mount
        try:
            os.close(fd)
        except OSError:
            pass
    finally:
        m.stop()
    assert m.proc.returncode is not None
    with new_mount(tmp_path, fs_home) as m2:
        _verify(m2.mountpoint, files)
        (m2.mountpoint / "after-crash").write_bytes(b"ok")
        assert cold_read(m2.mountpoint / "after-crash") == b"ok"


# -- tampering with the backing store (through a fresh mount) ----------------------------------------


def _create_tracked(m: Mount, name: str, data: bytes) -> Path:
    """Create ``name`` in the mount root; returns its backing file."""
    before = {p.name for p in m.cipherdir.iterdir()}
    (m.mountpoint / name).write_bytes(data)
    new = [p for p in m.cipherdir.iterdir() if p.name not in before and "." not in p.name]
    assert len(new) == 1
    return new[0]


def _assert_eio(fn, *args) -> None:
    expect_errno(errno.EIO, fn, *args)


@pytest.fixture(params=BLOCK_SIZES, ids=lambda b: f"{b // 1024}k")
def tamper_setup(request: pytest.FixtureRequest, tmp_path: Path, fs_home: Path):
    """A victim of 4 blocks and a bystander, written through a mount that is then stopped.

    Returns (backing file, victim plaintext, remount(), healthy(mount), block size)."""
    block = request.param
    m = new_mount(tmp_path, fs_home, block=block)
    try:
        victim = os.urandom(4 * block)
        other = os.urandom(2 * block + 99)
        backing = _create_tracked(m, "victim", victim)
        _create_tracked(m, "other", other)
    finally:
        m.stop()

    def remount() -> Mount:
        return serve(m.cipherdir, m.mountpoint, fs_home)

    def healthy(m2: Mount, *more: str) -> None:
        assert m2.proc.poll() is None, "daemon died"
        assert cold_read(m2.mountpoint / "other") == other
        assert sorted(os.listdir(m2.mountpoint)) == sorted(["other", "victim", *more])

    return backing, victim, remount, healthy, block


def test_tamper_flipped_byte_fails_only_its_block(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    raw = bytearray(backing.read_bytes())
    raw[HEADER + 2 * sealed + 500] ^= 0x01
    backing.write_bytes(raw)
    with remount() as m:
        p = m.mountpoint / "victim"
        assert os.stat(p).st_size == len(victim)
        for blk in (0, 1, 3):
            assert cold_pread(p, block, blk * block) == victim[blk * block:(blk + 1) * block], blk
        _assert_eio(cold_pread, p, block, 2 * block)
        _assert_eio(cold_pread, p, 1, 3 * block - 1)
        _assert_eio(cold_read, p)
        healthy(m)


def test_tamper_swapped_blocks_fail(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    raw = bytearray(backing.read_bytes())
    b0 = raw[HEADER:HEADER + sealed]
    raw[HEADER:HEADER + sealed] = raw[HEADER + sealed:HEADER + 2 * sealed]
    raw[HEADER + sealed:HEADER + 2 * sealed] = b0
    backing.write_bytes(raw)
    with remount() as m:
        p = m.mountpoint / "victim"
        _assert_eio(cold_pread, p, block, 0)
        _assert_eio(cold_pread, p, block, block)
        assert cold_pread(p, 2 * block, 2 * block) == victim[2 * block:]
        healthy(m)


def test_tamper_swapped_headers_fail(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    # a third file to swap headers with
    with remount() as m:
        third = _create_tracked(m, "third", os.urandom(block * 2))
    a, b = bytearray(backing.read_bytes()), bytearray(third.read_bytes())
    a[:HEADER], b[:HEADER] = b[:HEADER], a[:HEADER]
    backing.write_bytes(a)
    third.write_bytes(b)
    with remount() as m:
        for name in ("victim", "third"):
            _assert_eio(cold_pread, m.mountpoint / name, 10, 0)
            _assert_eio(cold_read, m.mountpoint / name)
        healthy(m, "third")


@pytest.mark.parametrize("tail", [10, 2000])
def test_tamper_truncated_backing_file(tamper_setup, tail: int) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    sealed = block + 28
    os.truncate(backing, HEADER + 2 * sealed + tail)
    with remount() as m:
        p = m.mountpoint / "victim"
        assert cold_pread(p, 2 * block, 0) == victim[:2 * block]
        _assert_eio(cold_pread, p, 100, 2 * block)
        _assert_eio(cold_read, p)
        healthy(m)


def test_tamper_damaged_header_fails_open_or_read(tamper_setup) -> None:
    backing, victim, remount, healthy, block = tamper_setup
    raw = bytearray(backing.read_bytes())
    raw[5] ^= 0x80  # the key source (a derived key; a wrapped one's blob: test_fs_file_keys)
    backing.write_bytes(raw)
    with remount() as m:
        _assert_eio(cold_read, m.mountpoint / "victim")
        healthy(m)
