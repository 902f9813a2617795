"""The ``encfs`` CLI on real mounts, as test_fuse_cli*.py and the other mount tests drive it: process
and mount bookkeeping, the one-line error check, fresh filesystems, and the fixtures and helpers for
--allow-other and mount(8) (``public_dir``, ``mount_helper``, ``fstab_line``).

Every test that mounts something runs inside ``guard(cipherdir, mountpoint)``:
on the way out it unmounts (fusermount3 -u), waits a bounded time for the
daemons serving that CIPHERDIR (found by PID with `pgrep -f` on the unique
cipherdir path), kills only those PIDs if they linger, and lazy-unmounts as
a last resort (docs/dev/testing.md). Every wait is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_encfs

from encfs.fuse.mount import is_mounted

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
MINIMAL_ENV = ["env", "-i", "PATH=/usr/bin:/bin"]
HELPER = Path("/sbin/mount.fuse.encfs")
HELPER_LOCK = "/run/lock/encfs-test-mount-helper.lock"


# -- process and mount bookkeeping ------------------------------------------------------------

def daemon_pids(cipherdir: Path) -> list[int]:
    """PIDs of processes whose command line names ``cipherdir`` (followed by a space: not a prefix)."""
    proc = subprocess.run(["pgrep", "-f", f"{cipherdir} "], capture_output=True, text=True, timeout=10)
    return [int(p) for p in proc.stdout.split() if int(p) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a reparented daemon may linger as a zombie of pid 1: it has exited


def wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mount_count(mountpoint: Path) -> int:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.split()[1:2] == [target])


def force_cleanup(mountpoint: Path, pids: list[int]) -> None:
    """Unmount, let the daemons exit, kill only ``pids`` if they do not, lazy-unmount last."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
    if not wait_gone(pids, 15):
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            for pid in pids:
                if _alive(pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if wait_gone(pids, wait):
                break
    while is_mounted(mountpoint):
        if subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
            break


@contextmanager
def guard(cipherdir: Path, mountpoint: Path) -> Iterator[None]:
    """Whatever happens inside, leave nothing mounted at ``mountpoint`` and no daemon of ``cipherdir``."""
    try:
        yield
    finally:
        force_cleanup(mountpoint, daemon_pids(cipherdir))


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"expected a failure, got exit 0: stdout={out!r} stderr={err!r}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs: "), f"expected one 'encfs: ' line, got {err!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def encfs_ok(*args: str, home: Path, env: dict[str, str] | None = None) -> str:
    proc = run_encfs(*args, home=home, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def new_fs(base: Path, home: Path, key: str = "fs", name: str = "cipher") -> tuple[Path, Path]:
    cipherdir, mountpoint = base / name, base / f"{name}-plain"
    mountpoint.mkdir(parents=True)
    encfs_ok("init", str(cipherdir), "--key", key, home=home)
    return cipherdir, mountpoint


def backing_subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and "." not in p.name)


def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"


def _mount_options(mp: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return next(line.split()[3] for line in f if line.split()[1] == str(mp)).split(",")


# -- --allow-other ----------------------------------------------------------------------------------------

@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="encfs-cli-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for mp in d.iterdir():
            if is_mounted(mp):
                force_cleanup(mp, [])
        shutil.rmtree(d, ignore_errors=True)


# -- fstab and mount(8) ------------------------------------------------------------------------------------

@pytest.fixture
def mount_helper(fs_home: Path) -> Iterator[Path]:
    # One test at a time holds /sbin/mount.fuse.encfs (xdist workers share it): otherwise one
    # worker puts back the file it saved while another's test still runs mount(8) through it.
    lock = os.open(HELPER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 240
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{HELPER_LOCK} held for 240 s"
            time.sleep(0.1)
    saved = HELPER.read_bytes() if HELPER.exists() else None
    try:
        # --force: a helper of another checkout may be there; it is put back below
        encfs_ok("install-mount-helper", "--force", "--path", str(HELPER), home=fs_home)
        assert os.access(HELPER, os.X_OK)
        yield HELPER
    finally:
        if saved is None:
            HELPER.unlink(missing_ok=True)
        else:
            HELPER.write_bytes(saved)
        os.close(lock)  # releases the flock


@contextmanager
def fstab_line(line: str) -> Iterator[None]:
    fstab = Path("/etc/fstab")
    saved = fstab.read_bytes()
    try:
        with open(fstab, "ab") as f:
            f.write(b"" if saved.endswith(b"\n") or not saved else b"\n")
            f.write(line.encode() + b"\n")
        yield
    finally:
        fstab.write_bytes(saved)
        assert fstab.read_bytes() == saved


def _system_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MINIMAL_ENV, *args], capture_output=True, text=True, timeout=60, cwd="/")
