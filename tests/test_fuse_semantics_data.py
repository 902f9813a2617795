"""POSIX semantics of a real encfs mount, file contents: offsets, sparse files, append, truncate, mmap, open files.

Part of the semantics suite (tests/test_fuse_semantics_*.py, its fixtures in tests/semantics_helpers.py),
checked the way a local-filesystem conformance suite would. The tests share one module-wide mount and
work in their own fresh subdirectory; those taking ``bd`` do so on a filesystem of each content block
size. The whole module runs once per FUSE server (``encfs mount --server``): our own protocol server,
the default, and pyfuse3. Reads that must reach the daemon (not the kernel page cache) go through a
fresh open() (FUSE drops the file's cached pages on open) after POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fuse_helpers import cold_pread, cold_read, expect_errno
from semantics_helpers import bd_fixture, block_mnt_fixture, d_fixture, mnt_fixture, server_fixture  # noqa: F401

# -- data: offsets, sparse files, append, truncate ---------------------------------------------


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
    p.write_bytes(os.urandom(block + 5))
    fd = os.open(p, os.O_RDONLY | os.O_TRUNC)  # undefined in POSIX; Linux truncates (open(2))
    try:
        assert os.fstat(fd).st_size == 0 and os.read(fd, 10) == b""
    finally:
        os.close(fd)
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


# -- open files: unlinked, read while written, O_DIRECT, shared, locked, synced ----------------


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
