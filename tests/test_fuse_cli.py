"""`encfs mount` and `umount`, driven as a user would, on real mounts: a daemonized mount usable on
return, umount, SIGTERM, --allow-other and the mount options, a PIN asked for before forking.

Mount and init failures are in test_fuse_cli_failures.py, lost metadata, `info` and the content
block size in test_fuse_cli_metadata.py, the fstab helper in test_fuse_cli_fstab.py.

Every test that mounts something runs inside ``guard(cipherdir, mountpoint)``
(fuse_cli_helpers.py): on the way out it unmounts (fusermount3 -u), waits a
bounded time for the daemons serving that CIPHERDIR (found by PID with
`pgrep -f` on the unique cipherdir path), kills only those PIDs if they
linger, and lazy-unmounts as a last resort (docs/dev/testing.md). Every wait
is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_cli_helpers import (
    NOBODY,
    _mount_options,
    assert_one_line_error,
    daemon_pids,
    encfs_ok,
    expect_errno,
    guard,
    new_fs,
    public_dir,
    wait_gone,
)
from fuse_helpers import Mount
from procs import run_on_terminal

from encfs.fuse import mountlock
from encfs.fuse.mount import is_mounted
from encfs.fuse.server import READ_AHEAD_KIB

__all__ = ["public_dir"]  # the fixture, used by name


# -- daemonized mount and umount -------------------------------------------------------------------

def test_daemonized_mount_is_usable_on_return_and_umount_flushes(tmp_path: Path, fs_home: Path) -> None:
    cipher = tmp_path / "cipher"
    mp = tmp_path / "mnt é x"  # mountinfo escapes the spaces; the name is not ASCII
    mp.mkdir()
    encfs_ok("init", str(cipher), "--key", "fs", home=fs_home)
    data = os.urandom(300_000)
    with guard(cipher, mp):
        proc = run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b""
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        # no sleep, no polling: the mount must be there when `encfs mount` returns
        (mp / "big").write_bytes(data)
        (mp / "dir").mkdir()
        (mp / "dir" / "small").write_text("hello")
        assert (mp / "big").read_bytes() == data
        assert set(os.listdir(mp)) == {"big", "dir"}
        # a root mount gets encfs's read-ahead (found through mountinfo, despite the spaces)
        dev = mp.stat().st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        assert int(ra) == READ_AHEAD_KIB

        busy = run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=30)
        assert_one_line_error(busy, "busy")

        proc = run_encfs("umount", str(mp), home=fs_home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(pids, 30), "the daemon did not exit after `encfs umount`"
        assert daemon_pids(cipher) == []
        assert os.listdir(mp) == []

    with guard(cipher, mp), Mount(cipher, mp, fs_home):  # a new daemon: nothing served from a cache
        assert (mp / "big").read_bytes() == data
        assert (mp / "dir" / "small").read_text() == "hello"


def test_umount_of_something_not_mounted_is_one_line(tmp_path: Path, fs_home: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run_encfs("umount", str(tmp_path / "plain"), home=fs_home), "not mounted")
    assert_one_line_error(run_encfs("umount", str(tmp_path / "missing"), home=fs_home), "not mounted")


def test_umount_refuses_a_mount_that_is_not_encfs(tmp_path: Path, fs_home: Path) -> None:
    """As root, fusermount3 -u unmounts anything: `encfs umount` must only touch encfs mounts."""
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True, timeout=30)
    try:
        assert_one_line_error(run_encfs("umount", str(mp), home=fs_home), "tmpfs", "not an encfs")
        assert is_mounted(mp)
    finally:
        subprocess.run(["umount", str(mp)], capture_output=True, timeout=30)
    assert not is_mounted(mp)


def test_a_mount_right_after_umount_finds_the_cipherdir_free(tmp_path: Path, fs_home: Path) -> None:
    """`encfs umount` returns once the daemon has let go of the CIPHERDIR's lock."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        for i in range(5):
            encfs_ok("mount", str(cipher), str(mp), home=fs_home)
            (mp / f"f{i}").write_text(str(i))
            encfs_ok("umount", str(mp), home=fs_home)
            assert not mountlock.serves_read_write(cipher, str(mp))  # at once: the daemon has let go
            encfs_ok("mount", "--read-only", str(cipher), str(mp), home=fs_home)
            assert sorted(p.name for p in mp.iterdir()) == [f"f{j}" for j in range(i + 1)]
            encfs_ok("umount", str(mp), home=fs_home)


@pytest.mark.parametrize("engine, direct", [("libaio", 1), ("io_uring", 0), ("mmap", 0)])
def test_umount_after_heavy_fio_never_finds_the_mount_busy(engine: str, direct: int, tmp_path: Path,
                                                            fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        proc = subprocess.run(["fio", "--name=t", f"--directory={mp}", "--rw=randrw", "--bs=4k", "--size=16m",
                               "--numjobs=2", f"--ioengine={engine}", "--iodepth=16", f"--direct={direct}",
                               "--runtime=2", "--time_based"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        encfs_ok("umount", str(mp), home=fs_home)  # at once, not EBUSY
        assert not is_mounted(mp)


def test_daemonized_mount_prompts_for_the_pin_before_forking(tmp_path: Path) -> None:
    """A vendor token with no PIN source: the parent asks on the terminal, the daemon uses it."""
    from encfs.keys.softhsm import EmbeddedSoftHSM

    emb = EmbeddedSoftHSM(tmp_path / "vendor")
    emb.provision()
    pin = emb.user_pin.read_text()
    env = dict(os.environ, SOFTHSM2_CONF=str(emb.conf), ENCFS_HOME=str(tmp_path / "home"))
    flags = ["--pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so", "--token", "encfs"]
    cmd = [sys.executable, "-m", "encfs"]
    for args in (["hsm", "init"], ["key", "create", "--alias", "v"], ["init", str(tmp_path / "c"), "--key", "v"]):
        r = subprocess.run(cmd + args + flags + ["--pin-file", str(emb.user_pin)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        code, out, prompts = run_on_terminal(cmd + ["mount", str(tmp_path / "c"), str(mnt)] + flags, env,
                                             {b"PIN for token": pin}, timeout=60)
        assert prompts == 1, out
        assert code == 0, out
        (mnt / "x").write_text("hello")
        assert (mnt / "x").read_text() == "hello"
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)


# -- SIGTERM --------------------------------------------------------------------------------------

def _write_sample(mp: Path) -> dict[str, bytes]:
    files = {"a": os.urandom(50_000), "sub/b": b"x" * 10_000, "sub/" + "L" * 220: b"long name"}
    (mp / "sub").mkdir()
    for name, data in files.items():
        (mp / name).write_bytes(data)
    os.rename(mp / "a", mp / "renamed")
    files["renamed"] = files.pop("a")
    return files


def _check_sample(mp: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mp / name).read_bytes() == data, name
    assert not (mp / "a").exists()


def test_sigterm_to_foreground_daemon_unmounts_cleanly(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        m = Mount(cipher, mp, fs_home)
        try:
            files = _write_sample(mp)
            os.kill(m.pid, signal.SIGTERM)
            assert m.proc.wait(timeout=30) == 0
            assert not is_mounted(mp)
        finally:
            m.stop()
        with Mount(cipher, mp, fs_home):
            _check_sample(mp, files)


def test_sigterm_to_background_daemon_unmounts_cleanly(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        files = _write_sample(mp)
        os.kill(pids[0], signal.SIGTERM)
        assert wait_gone(pids, 30), "the daemon ignored SIGTERM"
        assert not is_mounted(mp)
        with Mount(cipher, mp, fs_home):
            _check_sample(mp, files)


# -- --allow-other and the mount options ----------------------------------------------------------------

def _as_nobody_cat(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, "cat", str(path)], capture_output=True, text=True, timeout=30)


def test_allow_other_lets_the_kernel_check_modes(public_dir: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(public_dir, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", "--allow-other", str(cipher), str(mp), home=fs_home)
        assert "default_permissions" in _mount_options(mp)
        os.chmod(mp, 0o755)
        (mp / "public").write_text("for everyone")
        (mp / "public").chmod(0o644)
        (mp / "private").write_text("root only")
        (mp / "private").chmod(0o600)
        ok = _as_nobody_cat(mp / "public")
        assert ok.returncode == 0 and ok.stdout == "for everyone", ok.stderr
        denied = _as_nobody_cat(mp / "private")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        encfs_ok("umount", str(mp), home=fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        denied = _as_nobody_cat(mp / "public")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        assert (mp / "public").read_text() == "for everyone"  # root still can: it mounted it
        assert "default_permissions" not in _mount_options(mp)  # the mounting user alone: the daemon checks


def test_locks_hold_between_processes_of_different_users(public_dir: Path, fs_home: Path) -> None:
    """fcntl and flock locks taken through an --allow-other mount hold against another user's
    process (the kernel keeps them: the daemon answers no lock requests)."""
    cipher, mp = new_fs(public_dir, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", "--allow-other", str(cipher), str(mp), home=fs_home)
        os.chmod(mp, 0o755)
        target = mp / "locked"
        target.write_text("x")
        target.chmod(0o666)
        probe = ("import fcntl, sys\nf = open(sys.argv[1], 'r+')\n"
                 "for take in (lambda: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB),\n"
                 "             lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)):\n"
                 "    try:\n        take(); print('got')\n    except BlockingIOError:\n        print('blocked')\n")

        def other_user() -> list[str]:
            proc = subprocess.run([*NOBODY, sys.executable, "-c", probe, str(target)], capture_output=True,
                                  text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split()

        assert other_user() == ["got", "got"]  # free: the probe takes both and lets go on exit
        with open(target, "r+") as posix, open(target, "r+") as whole:
            fcntl.lockf(posix, fcntl.LOCK_EX)
            fcntl.flock(whole, fcntl.LOCK_EX)
            assert other_user() == ["blocked", "blocked"]
        assert other_user() == ["got", "got"]
        encfs_ok("umount", str(mp), home=fs_home)


@pytest.mark.parametrize("allow, extra, kernel_checks", [
    (False, [], False), (True, [], True), (False, ["allow_other"], True), (False, ["allow_root"], True),
    (False, ["default_permissions"], True), (True, ["default_permissions,noexec"], True),
])
def test_kernel_checks_modes_whenever_other_users_get_in(allow: bool, extra: list[str],
                                                          kernel_checks: bool) -> None:
    from encfs.fuse.mount import MountOptions, _fuse_options

    options = _fuse_options(Path("/c"), MountOptions(allow_other=allow, extra=extra))
    assert options.count("default_permissions") == int(kernel_checks), options
    assert len(options) == len(set(options)) and "fsname=/c" in options


def test_a_root_mount_is_nodev_nosuid_unless_asked(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        os.mknod(mp / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        assert {"nodev", "nosuid"} <= set(_mount_options(mp))
        expect_errno(errno.EACCES, (mp / "null").write_bytes, b"x")  # nodev: device nodes do not open
        encfs_ok("umount", str(mp), home=fs_home)
        encfs_ok("mount", "-o", "dev,suid", str(cipher), str(mp), home=fs_home)
        assert not {"nodev", "nosuid"} & set(_mount_options(mp))
        (mp / "null").write_bytes(b"x")  # /dev/null's device: the write vanishes
        encfs_ok("umount", str(mp), home=fs_home)
