"""A full backing store: ENOSPC reaches the writer, nothing already acknowledged is lost.

Each case fills a small tmpfs that holds the CIPHERDIR, has a write fail, then remounts
(with the disk still full) and checks byte for byte everything acknowledged before.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount, cold_read


@pytest.fixture
def small_backing(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(backing)], check=True, timeout=30)
    try:
        yield backing
    finally:
        subprocess.run(["umount", str(backing)], capture_output=True, timeout=30)
        if os.path.ismount(backing):
            subprocess.run(["umount", "-l", str(backing)], capture_output=True, timeout=30)


@pytest.fixture
def cipher(small_backing: Path, fs_home: Path) -> Path:
    cipher = small_backing / "cipher"
    proc = run_encfs("init", str(cipher), "--key", "fs", home=fs_home)
    assert proc.returncode == 0, proc.stderr
    return cipher


def fill(backing: Path) -> None:
    """Fill the backing store from outside the mount, to the last byte."""
    fd = os.open(backing / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\xff" * size) == size:
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free(backing: Path) -> None:
    (backing / "filler").unlink()


def write_expecting_enospc(path: Path, mode: str, data: bytes, offset: int | None = None) -> None:
    """write + fsync + close through the mount; one of them must fail with ENOSPC."""
    with pytest.raises(OSError) as info:
        with open(path, mode) as f:
            if offset is not None:
                f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC, info.value


def test_append_on_a_full_disk_fails_and_keeps_the_synced_bytes(tmp_path: Path, fs_home: Path,
                                                                 small_backing: Path, cipher: Path) -> None:
    """The issue's case: 1,000 fsync'd bytes, a full store, an append of 10,000 bytes."""
    plain = tmp_path / "plain"
    plain.mkdir()
    keep = os.urandom(1000)
    with Mount(cipher, plain, fs_home) as m:
        with open(plain / "keep.bin", "wb") as f:
            f.write(keep)
            os.fsync(f.fileno())
        fill(small_backing)
        write_expecting_enospc(plain / "keep.bin", "ab", os.urandom(10_000))
        assert m.proc.poll() is None, "the daemon must survive a full disk"
    with Mount(cipher, plain, fs_home):  # the disk is still full
        assert cold_read(plain / "keep.bin") == keep
    free(small_backing)
    with Mount(cipher, plain, fs_home):
        with open(plain / "keep.bin", "ab") as f:
            f.write(b"more")
        assert cold_read(plain / "keep.bin") == keep + b"more"


def test_overwrite_on_a_full_disk_fails_and_keeps_the_old_blocks(tmp_path: Path, fs_home: Path,
                                                                  small_backing: Path, cipher: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    old = os.urandom(2 << 20)
    with Mount(cipher, plain, fs_home) as m:
        with open(plain / "data.bin", "wb") as f:
            f.write(old)
            os.fsync(f.fileno())
        fill(small_backing)
        # Unaligned and partial-block overwrites need the journal: the full disk refuses them.
        write_expecting_enospc(plain / "data.bin", "r+b", os.urandom(300_000), offset=123_457)
        assert m.proc.poll() is None
    with Mount(cipher, plain, fs_home):
        assert cold_read(plain / "data.bin") == old


def test_creates_on_a_full_disk_fail_and_keep_earlier_files(tmp_path: Path, fs_home: Path,
                                                             small_backing: Path, cipher: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    written: dict[str, bytes] = {}
    with Mount(cipher, plain, fs_home) as m:
        failed = None
        for i in range(200):  # 200 x 128 KiB = 25 MiB into a 20 MiB store
            data = os.urandom(128 << 10)
            try:
                with open(plain / f"f{i}", "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                failed = f"f{i}"
                break
            written[f"f{i}"] = data
        assert failed is not None, "the store never filled up"
        assert m.proc.poll() is None
    with Mount(cipher, plain, fs_home):
        for name, data in written.items():
            assert cold_read(plain / name) == data, name
        if (plain / failed).exists():
            cold_read(plain / failed)  # readable (what it holds was never acknowledged), never EIO


def test_an_unbounded_writer_gets_enospc_and_the_daemon_does_not_spin(tmp_path: Path, fs_home: Path,
                                                                        small_backing: Path, cipher: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    log = tmp_path / "daemon.log"
    with Mount(cipher, plain, fs_home, log=log) as m:
        started = time.monotonic()
        proc = subprocess.run(["dd", "if=/dev/zero", f"of={plain / 'big'}", "bs=1M", "count=200", "conv=fsync"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr
        assert time.monotonic() - started < 60
        assert m.proc.poll() is None
        os.unlink(plain / "big")
        (plain / "after.txt").write_text("space again")
    assert log.read_text().count("\n") < 100, "the daemon logged a flood of lines"
    with Mount(cipher, plain, fs_home):
        assert sorted(os.listdir(plain)) == ["after.txt"]
        assert (plain / "after.txt").read_text() == "space again"


@pytest.mark.parametrize("server", ["encfs", "pyfuse3", "encfs --io-uring"])
def test_a_mkdir_that_fails_part_way_leaves_the_kernel_no_stale_name(tmp_path: Path, fs_home: Path,
                                                                    small_backing: Path, cipher: Path,
                                                                    server: str, request: pytest.FixtureRequest) -> None:
    """On a full store the backing mkdir succeeds (tmpfs directories take no pages) and writing
    the directory's id fails: ENOSPC, with the directory there. The kernel looked the name up
    first (absent: a negative entry it keeps for an hour), so the daemon has it forget the name,
    and stat agrees with the backing directory. (No listing before the stat: READDIRPLUS would
    refresh the entry by itself.) Over io_uring the invalidation has to wait for the reply's
    commit: sent before it, it waited for the directory lock the kernel holds until the reply."""
    plain = tmp_path / "plain"
    plain.mkdir()
    name, *extra = server.split()
    trace = tmp_path / "trace.log"
    if extra:
        request.getfixturevalue("uring_enabled")
        extra += ["--debug", "--log-file", str(trace)]
    with Mount(cipher, plain, fs_home, "--server", name, *extra) as m:
        entries = len(os.listdir(cipher))
        fill(small_backing)
        with pytest.raises(OSError) as info:
            os.mkdir(plain / "d")
        assert info.value.errno == errno.ENOSPC, info.value
        made = len(os.listdir(cipher)) > entries
        deadline = time.monotonic() + 3  # the invalidation is sent just after the error reply
        while (plain / "d").exists() != made and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (plain / "d").exists() == made, f"backing directory made: {made}"
        assert ("d" in os.listdir(plain)) == made
        free(small_backing)
        assert m.proc.poll() is None
    if extra:
        assert re.search(r"MKDIR .* queue=\d", trace.read_text()), "the MKDIR did not come over a ring"
        assert made, "no backing directory: no invalidation was sent, the case tested nothing"
