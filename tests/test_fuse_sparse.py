"""Sparse files on a real mount (issue #22 part 2): truncate and far writes leave holes in the
backing file, EFBIG past the largest file, fallocate in every mode the kernel passes through,
SEEK_DATA/SEEK_HOLE, and a kill -9 around a punch. Our own server only: pyfuse3 has no
fallocate or lseek operation (README, "pyfuse3")."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount, cold_pread, cold_read, crash_during, expect_errno
from releases import extract_release
from test_fuse_binding import _check_v2_tree, _features, v2  # noqa: F401  (v2: a fixture)

from encfs import daemonlog
from encfs.fuse.content import max_file_size
from encfs.fuse.fsconfig import DEFAULT_BLOCK_SIZE, SPARSE_FEATURE

B = DEFAULT_BLOCK_SIZE
GIB = 1 << 30
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _mount(base: Path, home: Path) -> Mount:
    cipher, plain = base / "cipher", base / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    if not cipher.exists():
        proc = run_encfs("init", str(cipher), "--key", "fs", home=home)
        assert proc.returncode == 0, proc.stderr
    return Mount(cipher, plain, home)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory, fs_home: Path) -> Iterator[Mount]:
    m = _mount(tmp_path_factory.mktemp("sparse"), fs_home)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def d(mnt: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    p = mnt.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    p.mkdir()
    yield p
    assert mnt.proc.poll() is None, "the encfs daemon died"


def backing(m: Mount, plain: Path) -> Path:
    """The backing file of ``plain`` (the same inode)."""
    want = os.stat(plain).st_ino
    for root, _dirs, files in os.walk(m.cipherdir):
        for name in files:
            p = Path(root) / name
            if os.lstat(p).st_ino == want:
                return p
    raise AssertionError(f"no backing file for {plain}")


def allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_truncate_2g_and_a_write_at_1g_stay_sparse(mnt: Mount, d: Path) -> None:
    p, q = d / "t", d / "w"
    p.write_bytes(b"head")
    start = time.monotonic()
    os.truncate(p, 2 * GIB)
    with open(q, "wb") as f:
        f.seek(GIB)
        f.write(b"tail")
    assert time.monotonic() - start < 5
    assert os.path.getsize(p) == 2 * GIB and os.path.getsize(q) == GIB + 4
    assert allocated(backing(mnt, p)) < 1 << 20 and allocated(backing(mnt, q)) < 1 << 20
    assert cold_pread(p, 8, 0) == b"head" + bytes(4) and cold_pread(p, 5, 2 * GIB - 5) == bytes(5)
    assert cold_pread(q, 8, GIB - 4) == bytes(4) + b"tail" and cold_pread(q, 3, 12345) == bytes(3)


def test_truncate_past_the_largest_file_is_efbig_at_once(d: Path) -> None:
    p = d / "f"
    p.write_bytes(b"x")
    start = time.monotonic()
    expect_errno(errno.EFBIG, os.truncate, p, (1 << 63) - 1)
    expect_errno(errno.EFBIG, os.truncate, p, max_file_size(B) + 1)
    # 1 PiB: the format takes it, ext4 (16 TiB per file) does not: EFBIG from the backing store
    expect_errno(errno.EFBIG, os.truncate, p, 1 << 50)
    assert time.monotonic() - start < 5 and os.path.getsize(p) == 1 and p.read_bytes() == b"x"


def _far_write(fd: int, src: int, how: str, off: int) -> str:
    """Where a write at ``off`` failed: "write" or "fsync" (with EFBIG), or "ok"."""
    try:
        if how == "pwrite":
            os.pwrite(fd, b"far", off)
        else:
            os.copy_file_range(src, fd, 3, 0, off)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        return "write"
    try:
        os.fsync(fd)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        return "fsync"
    return "ok"


@pytest.mark.parametrize(("how", "off"), [("pwrite", 16 << 40), ("pwrite", (1 << 63) - 100),
                                          ("copy_file_range", (1 << 63) - 10)])
def test_far_writes_return_at_once_with_efbig(mnt: Mount, d: Path, how: str, off: int) -> None:
    """On ext4 (16 TiB per file) each fails with EFBIG at once, and nothing fills the disk. The
    kernel's writeback cache takes a buffered write first: the EFBIG then comes from fsync (the
    kernel keeps the size it cached; FUSE has no way to tell it the largest file)."""
    p, q = d / "src", d / "dst"
    p.write_bytes(b"src")
    fd = os.open(q, os.O_RDWR | os.O_CREAT, 0o644)
    src = os.open(p, os.O_RDONLY)
    try:
        start = time.monotonic()
        assert _far_write(fd, src, how, off) in ("write", "fsync")
        assert time.monotonic() - start < 5
    finally:
        os.close(src)
        os.close(fd)
    assert allocated(backing(mnt, q)) < 1 << 20


def test_fallocate_modes(mnt: Mount, d: Path) -> None:
    p = d / "f"
    data = os.urandom(8 * B)
    p.write_bytes(data)
    b = backing(mnt, p)
    fd = os.open(p, os.O_RDWR)
    try:
        full = allocated(b)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 100, 5 * B)  # edges rewritten, blocks 1-4 punched
        os.fsync(fd)
        want = data[:100] + bytes(5 * B) + data[100 + 5 * B:]
        # 4 blocks, but for the 4 KiB pages they share with blocks 0 and 5 (at 4 KiB blocks they span 5
        # pages, and ext4 gave back 2 of them here)
        assert os.fstat(fd).st_size == 8 * B and allocated(b) <= full - (2 * 4096 if B == 4096 else 3 * B)
        fallocate(fd, ZERO_RANGE, 7 * B, 3 * B)  # extends the size
        want = want[:7 * B] + bytes(3 * B)
        assert os.fstat(fd).st_size == 10 * B
        fallocate(fd, KEEP_SIZE, 0, 20 * B)
        assert os.fstat(fd).st_size == 10 * B
        fallocate(fd, 0, 0, 12 * B)
        want += bytes(2 * B)
        assert os.fstat(fd).st_size == 12 * B
        for mode in (COLLAPSE_RANGE, INSERT_RANGE):
            expect_errno(errno.EOPNOTSUPP, fallocate, fd, mode, 0, B)
    finally:
        os.close(fd)
    assert cold_read(p) == want


def test_seek_data_and_seek_hole(d: Path) -> None:
    p = d / "f"
    with open(p, "wb") as f:
        f.write(b"x" * 2 * B)
        f.truncate(10 * B)
        f.seek(6 * B + 5)
        f.write(b"y")
        f.truncate(10 * B + 7)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) == 2 * B
        assert os.lseek(fd, 2 * B + 3, os.SEEK_DATA) == 6 * B
        assert os.lseek(fd, 6 * B + 1, os.SEEK_HOLE) == 7 * B
        expect_errno(errno.ENXIO, os.lseek, fd, 7 * B, os.SEEK_DATA)
        expect_errno(errno.ENXIO, os.lseek, fd, 10 * B + 7, os.SEEK_HOLE)
    finally:
        os.close(fd)


def test_seek_data_sees_writes_the_kernel_has_not_sent_yet(d: Path) -> None:
    """With the writeback cache a written page may still be only in the kernel: SEEK_DATA/SEEK_HOLE
    must count it as data, or `cp` (which copies sparse files by them) copies zeros in its place."""
    p = d / "w"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"s" * 3 * B)
        os.fsync(fd)
        os.write(fd, b"c" * 3 * B)  # cached: the file stays open, nothing flushes it
        os.pwrite(fd, b"h", 20 * B)  # past a gap: a hole in between, data again at the end
        reader = os.open(p, os.O_RDONLY)
        try:
            assert os.lseek(reader, 3 * B, os.SEEK_DATA) == 3 * B
            assert os.lseek(reader, 0, os.SEEK_HOLE) >= 6 * B
            assert os.lseek(reader, 19 * B, os.SEEK_DATA) <= 20 * B
        finally:
            os.close(reader)
        subprocess.run(["cp", str(p), str(d / "copy")], check=True, timeout=30)
        assert (d / "copy").read_bytes() == b"s" * 3 * B + b"c" * 3 * B + bytes(14 * B) + b"h"
    finally:
        os.close(fd)


def test_truncate_1p_on_tmpfs_is_quick_and_sparse(fs_home: Path) -> None:
    base = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="encfs-sparse-"))
    try:
        with _mount(base, fs_home) as m:
            p = m.mountpoint / "f"
            p.write_bytes(b"x")
            start = time.monotonic()
            # In a child with a deadline: a regression that writes zeros is killed (daemon too)
            # before it fills the machine's memory, instead of running until tmpfs is full.
            child = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(p)!r}, 1 << 50)"])
            try:
                assert child.wait(timeout=20) == 0
            except subprocess.TimeoutExpired:
                child.kill()
                m.kill9()
                child.wait()
                pytest.fail("truncate -s 1P did not return in 20 s")
            with open(p, "r+b") as f:
                f.seek(16 << 40)
                f.write(b"far")
                f.flush()
                os.fsync(f.fileno())
            assert time.monotonic() - start < 5
            assert os.path.getsize(p) == 1 << 50 and allocated(backing(m, p)) < 1 << 20
            assert cold_pread(p, 4, (16 << 40) - 1) == b"\0far"
            os.truncate(p, 1)
    finally:
        shutil.rmtree(base)


PUNCHER = r"""
import ctypes, os, random, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
path, seed, block, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR)
for i in range(10000):
    first = rng.randrange(count)
    length = rng.choice((1, 2, 5)) * block
    if libc.fallocate(fd, 3, first * block, length) != 0:
        print("E", ctypes.get_errno(), flush=True)
        break
    print("P", first, length // block, flush=True)
    if rng.random() < 0.3:
        off = rng.randrange(count * block - 100)
        print("W", off, flush=True)  # before it is made: a write in flight is known too
        os.pwrite(fd, os.urandom(100), off)
"""


@pytest.mark.parametrize("seed", range(4))
def test_kill_9_during_punches_never_reads_eio(tmp_path: Path, fs_home: Path, seed: int) -> None:
    """Punches (and a few writes) killed at a random moment: after the next mount every block reads
    its old contents or zeros, every punch that returned reads zeros (the state naming the hole is
    durable before the punch), and nothing reads EIO."""
    count = 64
    data = os.urandom(count * B)
    m = _mount(tmp_path, fs_home)
    f = m.mountpoint / "f"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    out = crash_during(m, PUNCHER, str(f), str(seed), str(B), str(count),
                       when=lambda: time.sleep(0.3 + 0.4 * seed))
    punched = [tuple(int(x) for x in line.split()[1:]) for line in out.splitlines() if line.startswith("P")]
    errors = [int(line.split()[1]) for line in out.splitlines() if line.startswith("E")]
    # Only the daemon's death: the kernel aborts the request in flight (EIO when it had dirty pages
    # of the small writes to flush first); the puncher stops at its first error.
    assert set(errors) <= {errno.ECONNABORTED, errno.ENOTCONN, errno.EIO}, out
    own = daemonlog.default_log_file(fs_home, daemonlog.log_id(m.mountpoint))  # this mount's alone
    ours = own.read_text().splitlines() if own.exists() else []
    assert not [line for line in ours if "integrity failure" in line], ours
    with Mount(m.cipherdir, m.mountpoint, fs_home) as m2:
        got = cold_read(m2.mountpoint / "f")  # EIO would raise here
    assert len(got) == len(data) and punched
    zero = set()
    for first, n in punched[:-1]:  # the last may have been in flight when its report was cut short
        zero |= set(range(first, min(first + n, count)))
    written = bytearray(len(data))  # bytes any write may have reached: they may hold anything
    for line in out.splitlines():
        if line.startswith("W"):
            off = int(line.split()[1])
            written[off:off + 100] = b"\1" * 100
    for k in range(count):
        span = range(k * B, (k + 1) * B)
        rest = bytes(got[i] for i in span if not written[i])
        old = bytes(data[i] for i in span if not written[i])
        assert rest == bytes(len(rest)) or (k not in zero and rest == old), k


def test_the_previous_release_s_filesystem_gets_sparse_files(v2: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """fs-v2.tar.gz (tests/data/README.md): a read-only mount leaves it as it is; the first read-write
    mount adds "sparse-files", and its files, written before holes existed, get holes."""
    cipher, home, mp = v2["cipher"], v2["home"], tmp_path / "plain"
    mp.mkdir()
    with Mount(cipher, mp, home, "--read-only"):
        _check_v2_tree(mp)
    assert SPARSE_FEATURE not in _features(cipher)
    with Mount(cipher, mp, home) as m:
        assert SPARSE_FEATURE in _features(cipher) and SPARSE_FEATURE in _features(cipher, "encfs.conf.bak")
        os.truncate(mp / "a" / "f.txt", GIB)
        assert allocated(backing(m, mp / "a" / "f.txt")) < 1 << 20
    with Mount(cipher, mp, home):
        assert cold_pread(mp / "a" / "f.txt", 4, 0) == b"f\n\0\0" and cold_pread(mp / "a" / "f.txt", 3, GIB - 3) == bytes(3)
        os.truncate(mp / "a" / "f.txt", 2)
        _check_v2_tree(mp)


def test_fsck_skips_holes_and_its_rescue_keeps_them(tmp_path: Path, fs_home: Path) -> None:
    """A sparse file is clean; with a damaged data block, --repair's copy in lost+found has the
    file's size (its trailing hole included) and zeros only where the damage was."""
    m = _mount(tmp_path, fs_home)
    try:
        data = os.urandom(3 * B)
        (m.mountpoint / "f").write_bytes(data)
        os.truncate(m.mountpoint / "f", GIB)
        b = backing(m, m.mountpoint / "f")
    finally:
        m.stop()
    p = run_encfs("fsck", str(m.cipherdir), home=fs_home)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(b, "r+b") as f:
        f.seek(128 + (B + 28) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    p = run_encfs("fsck", str(m.cipherdir), "--repair", home=fs_home)
    assert p.returncode == 1, p.stdout + p.stderr
    with Mount(m.cipherdir, m.mountpoint, fs_home):
        copy = m.mountpoint / "lost+found" / "f"
        assert os.path.getsize(copy) == GIB
        assert cold_pread(copy, 3 * B, 0) == data[:B] + bytes(B) + data[2 * B:]
        assert cold_pread(copy, 10, GIB - 10) == bytes(10)


@pytest.fixture
def v3(tmp_path: Path) -> dict[str, Path]:
    """The ENCFS_HOME and CIPHERDIR that the release before sparse files made (tests/data/README.md)."""
    root = tmp_path / "v3"
    extract_release("fs-v3.tar.gz", root)
    return {"home": root / "home", "cipher": root / "cipher"}


V3_BLOCKS = bytes((7 * i + 3) % 251 for i in range(100000))
V3_HELLO = b"hello from encfs before sparse files\n"


def test_the_current_release_s_files_get_holes_and_keep_their_bytes(v3: dict[str, Path], tmp_path: Path) -> None:
    """fs-v3.tar.gz: files written before sparse files (content version 2, a state without holes)
    read the same; after the first read-write mount adds "sparse-files" they take holes: a truncate
    up, a punch inside, and a far write, all read back after a remount."""
    cipher, home, mp = v3["cipher"], v3["home"], tmp_path / "plain"
    mp.mkdir()
    assert SPARSE_FEATURE not in _features(cipher)
    with Mount(cipher, mp, home, "--read-only"):
        assert cold_read(mp / "d" / "blocks.bin") == V3_BLOCKS and cold_read(mp / "hello.txt") == V3_HELLO
    with Mount(cipher, mp, home) as m:
        assert SPARSE_FEATURE in _features(cipher)
        f = mp / "d" / "blocks.bin"
        fd = os.open(f, os.O_RDWR)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, B, B)  # block 1 of 4 (the last one short)
            os.ftruncate(fd, GIB)
            os.pwrite(fd, b"far", 2 * GIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert allocated(backing(m, f)) < 1 << 20
    want = V3_BLOCKS[:B] + bytes(B) + V3_BLOCKS[2 * B:]
    with Mount(cipher, mp, home):
        f = mp / "d" / "blocks.bin"
        assert cold_pread(f, len(want) + 10, 0) == want + bytes(10)
        assert cold_pread(f, 5, 2 * GIB - 2) == b"\0\0far" and os.path.getsize(f) == 2 * GIB + 3
        assert cold_read(mp / "hello.txt") == V3_HELLO
