"""Integrity failures on a real mount reach the daemon's default log: one line each, with the
plaintext path, the block and the cause; repeats rate-limited (issue #23)."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

from conftest import run_encfs
from fuse_helpers import Mount, cold_pread, expect_errno

from encfs import daemonlog
from encfs.fuse.fsconfig import DEFAULT_BLOCK_SIZE
from encfs.fuse.mount import is_mounted

BLOCK, HEADER, OVERHEAD = DEFAULT_BLOCK_SIZE, 128, 28


def _default_log(m: Mount) -> Path:
    return daemonlog.default_log_file(m.home, daemonlog.log_id(m.mountpoint))


def _lines(m: Mount, word: str) -> list[str]:
    path = _default_log(m)
    return [line for line in path.read_text().splitlines() if word in line] if path.exists() else []


def test_a_tampered_block_is_logged_once_with_path_block_and_cause(encfs_mount: Mount) -> None:
    m = encfs_mount
    before = {p.name for p in m.cipherdir.iterdir()}
    body = os.urandom(3 * BLOCK)
    (m.mountpoint / "victim").write_bytes(body)
    [backing] = [p for p in m.cipherdir.iterdir() if p.name not in before and "." not in p.name]
    m.stop()
    raw = bytearray(backing.read_bytes())
    raw[HEADER + 1 * (BLOCK + OVERHEAD) + 500] ^= 1  # in block 1
    backing.write_bytes(raw)
    with Mount(m.cipherdir, m.mountpoint, m.home) as again:
        p = again.mountpoint / "victim"
        assert cold_pread(p, 4096, 0) == body[:4096]
        for _ in range(101):
            expect_errno(errno.EIO, cold_pread, p, 4096, BLOCK + 100)
        failures = _lines(again, "integrity failure")
        assert len(failures) == 1, failures
        assert "'/victim': block 1: integrity failure (tampered)" in failures[0]
        assert len([line for line in failures if "repeated" in line]) <= 1
        assert str(again.cipherdir) not in failures[0] and backing.name not in failures[0]
        assert stat_mode(_default_log(again)) == 0o600
    # the daemon's exit brings out the count of the repeats its window held back
    [repeated] = _lines(again, "repeated")
    assert "'/victim': block 1: integrity failure (tampered) (repeated" in repeated
    assert int(repeated.split("(repeated ")[1].split()[0]) >= 100


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_disabled_key_is_logged_when_a_file_is_opened(tmp_path: Path, fs_home: Path) -> None:
    alias = f"logtest-{uuid.uuid4().hex[:8]}"  # fs_home is shared: disable a key of our own
    assert run_encfs("key", "create", "--alias", alias, home=fs_home).returncode == 0
    cipherdir, mountpoint = tmp_path / "cipher", tmp_path / "plain"
    mountpoint.mkdir()
    assert run_encfs("init", str(cipherdir), "--key", alias, home=fs_home).returncode == 0
    with Mount(cipherdir, mountpoint, fs_home) as m:
        (m.mountpoint / "later").write_bytes(b"x" * 5000)
    with Mount(cipherdir, mountpoint, fs_home) as m:
        proc = run_encfs("key", "disable", alias, home=fs_home)
        assert proc.returncode == 0, proc.stderr
        expect_errno(errno.EIO, cold_pread, m.mountpoint / "later", 100, 0)
        failures = _lines(m, "integrity failure")
        assert failures and all("'/later': file key: integrity failure (key disabled)" in f for f in failures), failures
        assert "key" in failures[0] and "PIN" not in _default_log(m).read_text()


def test_a_daemonized_mount_logs_to_the_default_file(tmp_path: Path, fs_home: Path) -> None:
    """Without --foreground and --log-file the daemon's stdio is /dev/null: the log file is its only voice."""
    cipherdir, mountpoint = tmp_path / "cipher", tmp_path / "plain"
    mountpoint.mkdir()
    assert run_encfs("init", str(cipherdir), "--key", "fs", home=fs_home).returncode == 0
    with Mount(cipherdir, mountpoint, fs_home) as m:
        (m.mountpoint / "d").mkdir()
        (m.mountpoint / "d" / "f").write_bytes(os.urandom(2 * BLOCK))
    [backing] = [p for p in cipherdir.rglob("*") if p.is_file() and p.stat().st_size == HEADER + 2 * (BLOCK + OVERHEAD)]
    raw = bytearray(backing.read_bytes())
    raw[HEADER + 10] ^= 1  # in block 0
    backing.write_bytes(raw)
    proc = run_encfs("mount", str(cipherdir), str(mountpoint), home=fs_home)
    assert proc.returncode == 0, proc.stderr
    try:
        expect_errno(errno.EIO, cold_pread, mountpoint / "d" / "f", 100, 0)
    finally:
        run_encfs("umount", str(mountpoint), home=fs_home)  # waits for the daemon
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True, timeout=30)
    log = daemonlog.default_log_file(fs_home, daemonlog.log_id(mountpoint))
    assert "'/d/f': block 0: integrity failure (tampered)" in log.read_text()
