"""The filesystem daemon's sealing worker (encfs.sealworker), on real mounts.

Large writes of whole blocks are sealed in the worker before the server's lock; what it
seals must read back through a fresh mount, and the worker must end with its daemon."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fuse_helpers import Mount
from procs import children, running, voluntary_switches

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
        assert (again.mountpoint / "big.bin").read_bytes() == bytes(expected)


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
