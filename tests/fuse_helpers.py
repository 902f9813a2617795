"""Real FUSE mounts for tests: start `encfs mount --foreground` by PID, always clean up.

Cleanup order (docs/dev/testing.md): unmount with fusermount3 -u, wait
for the daemon, kill it by PID if it lingers, lazy-unmount as a last resort.
Every wait is bounded.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs.fuse.mount import is_mounted


class Mount:
    """One running `encfs mount --foreground` daemon."""

    def __init__(self, cipherdir: Path, mountpoint: Path, home: Path, *extra: str,
                 log: Path | None = None) -> None:
        self.cipherdir, self.mountpoint, self.home = cipherdir, mountpoint, home
        self.log = log or (home.parent / f"mount-{mountpoint.name}.log")
        env = dict(os.environ, ENCFS_HOME=str(home))
        env.pop("SOFTHSM2_CONF", None)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "encfs", "mount", "--foreground", str(cipherdir), str(mountpoint), *extra],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf, env=env)
        deadline = time.monotonic() + 60
        while not is_mounted(mountpoint):
            if self.proc.poll() is not None:
                self._logf.close()
                raise RuntimeError(f"mount failed: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mount did not become ready in 60 s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        """Kill the daemon hard (crash test), then remove the dead mount."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._cleanup_mount()

    def _cleanup_mount(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=30)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, timeout=30)

    def stop(self) -> None:
        """Unmount cleanly; escalate only if the clean path fails."""
        try:
            if self.proc.poll() is None and is_mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=30)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self._cleanup_mount()
        finally:
            self._logf.close()

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def crash_during(m: Mount, script: str, *args: str, when: Callable[[], object]) -> str:
    """Run ``script`` (Python source) with ``args`` in a process working through the mount,
    kill -9 the daemon of ``m`` once ``when()`` returns, then end the process (before the dead
    mount goes: its paths would then name the bare mountpoint) and remove the dead mount.
    Returns what the process printed."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        when()
        m.proc.kill()
        m.proc.wait(timeout=30)
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        m.kill9()
    return out or ""


def expect_errno(code: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"
    return ei.value


def cold_read(path: Path) -> bytes:
    """Whole-file read that the daemon has to serve."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = []
        while chunk := os.read(fd, 1 << 20):
            out.append(chunk)
        return b"".join(out)
    finally:
        os.close(fd)


def cold_pread(path: Path, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
