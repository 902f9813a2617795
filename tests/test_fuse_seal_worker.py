"""The filesystem daemon's sealing worker (encfs.sealworker), on real mounts.

Large writes of whole blocks are sealed in the worker before the server's lock; what it
seals must read back through a fresh mount, and the worker must end with its daemon."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from fuse_helpers import Mount, cold_pread, cold_read, expect_errno
from procs import children, running, voluntary_switches

from encfs.fuse.fsconfig import DEFAULT_BLOCK_SIZE

MiB = 1 << 20


def _worker_of(m: Mount) -> int:
    workers = children(m.pid)
    assert len(workers) == 1, workers  # the daemon's sealing worker
    assert b"encfs.sealworker" in Path(f"/proc/{workers[0]}/cmdline").read_bytes()
    return workers[0]


def _write(path: Path, chunks: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for offset, data in chunks:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_large_writes_are_sealed_by_the_worker_and_read_back(encfs_mount: Mount) -> None:
    m = encfs_mount
    worker = _worker_of(m)
    before = voluntary_switches(worker)
    body = os.urandom(64 * MiB)
    _write(m.mountpoint / "big.bin", [(0, body)])
    # The worker sleeps while it has no job. 64 requests of 1 MiB woke it 19-29 times here (jobs
    # that arrive while it seals are taken without sleeping); sealing in process, twice.
    assert voluntary_switches(worker) - before >= 8
    # Unaligned and short writes are sealed in process, around and over what the worker sealed.
    patches = [(5 * MiB + 123, os.urandom(300_000)), (64 * MiB - 10, os.urandom(MiB)), (70 * MiB, b"tail")]
    _write(m.mountpoint / "big.bin", patches)
    expected = bytearray(body)
    for offset, data in patches:
        expected[len(expected):offset] = bytes(max(0, offset - len(expected)))
        expected[offset:offset + len(data)] = data
    m.stop()
    with Mount(m.cipherdir, m.mountpoint, m.home) as again:
        worker = _worker_of(again)
        before = voluntary_switches(worker)
        assert cold_read(again.mountpoint / "big.bin") == bytes(expected)
        assert voluntary_switches(worker) - before >= 8  # large reads are opened by the worker


def test_the_worker_ends_with_its_daemon(encfs_mount: Mount) -> None:
    worker = _worker_of(encfs_mount)
    encfs_mount.stop()
    deadline = time.monotonic() + 10
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running(worker), "the sealing worker outlived an unmount"
    with Mount(encfs_mount.cipherdir, encfs_mount.mountpoint, encfs_mount.home) as again:
        worker = _worker_of(again)
        _write(again.mountpoint / "f", [(0, os.urandom(4 * MiB))])
        again.kill9()
        deadline = time.monotonic() + 10
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running(worker), "the sealing worker outlived its killed daemon"


def test_a_read_only_mount_has_no_worker(encfs_mount: Mount) -> None:
    encfs_mount.stop()
    with Mount(encfs_mount.cipherdir, encfs_mount.mountpoint, encfs_mount.home, "--read-only") as ro:
        assert children(ro.pid) == []


def _good_prefix_or_eio(path: Path, length: int, offset: int, body: bytes, bad_from: int) -> None:
    """A read that reaches a bad block fails with EIO, or (the kernel's fallback after a failed
    read-ahead) returns fewer bytes, all of them right and all before the bad block."""
    try:
        got = cold_pread(path, length, offset)
    except OSError as e:
        assert e.errno == errno.EIO, e
        return
    assert offset + len(got) <= bad_from and got == body[offset:offset + len(got)]


def test_a_tampered_block_in_a_large_read_is_eio(encfs_mount: Mount) -> None:
    """Blocks opened by the worker fail as those opened in process do: EIO for the reads that
    reach a flipped byte or a torn last block, the right bytes elsewhere, the worker still in use."""
    m = encfs_mount
    before = {p.name for p in m.cipherdir.iterdir()}
    body = os.urandom(4 * MiB + 1000)
    _write(m.mountpoint / "victim", [(0, body)])
    [backing] = [p for p in m.cipherdir.iterdir() if p.name not in before and "." not in p.name]
    m.stop()
    block, header = DEFAULT_BLOCK_SIZE, 128
    bad = (MiB + MiB // 4) // block  # a block inside the second MiB
    raw = bytearray(backing.read_bytes())
    raw[header + bad * (block + 28) + 500] ^= 1
    del raw[len(raw) - 600:]  # tears the last block (1000 bytes of plaintext)
    backing.write_bytes(raw)
    with Mount(m.cipherdir, m.mountpoint, m.home) as again:
        p = again.mountpoint / "victim"
        _good_prefix_or_eio(p, MiB, MiB, body, bad * block)
        expect_errno(errno.EIO, cold_pread, p, MiB, bad * block)
        _good_prefix_or_eio(p, MiB, 4 * MiB - MiB // 2, body, 4 * MiB)
        expect_errno(errno.EIO, cold_pread, p, MiB, 4 * MiB)
        expect_errno(errno.EIO, cold_read, p)
        failed = [line for line in again.log.read_text().splitlines() if "integrity failure (tampered)" in line]
        assert failed, "no failed read in the daemon's log"
        worker = _worker_of(again)
        before_reads = voluntary_switches(worker)
        assert cold_pread(p, MiB, 0) == body[:MiB]
        assert cold_pread(p, 2 * MiB, 2 * MiB) == body[2 * MiB:4 * MiB]
        assert voluntary_switches(worker) > before_reads  # the worker opened them: still in use
        assert again.proc.poll() is None


def _core_limit(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"no core limit for {pid}")


def test_the_daemon_and_its_worker_dump_no_core(encfs_mount: Mount) -> None:
    """Key material in Python memory cannot be wiped: no core files (soft and hard limit 0) and
    not dumpable (encfs.daemon.keep_secrets_in_memory), in the daemon and in its worker."""
    assert _core_limit(encfs_mount.pid) == ["0", "0"]
    assert _core_limit(_worker_of(encfs_mount)) == ["0", "0"]


def test_keep_secrets_in_memory_makes_the_process_undumpable() -> None:
    """In a forked child (as the daemons are): PR_GET_DUMPABLE reads 0 afterwards, and the
    core limit is 0, soft and hard."""
    import ctypes
    import resource

    from encfs.daemon import keep_secrets_in_memory

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            before = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
            keep_secrets_in_memory()
            after = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
            limits = b"0" if resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) else b"1"
            os.write(wfd, bytes([before, after]) + limits)
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        report = os.read(rfd, 3)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    assert report == bytes([1, 0]) + b"0", report
