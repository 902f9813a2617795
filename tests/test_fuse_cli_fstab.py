"""The fstab helper /sbin/mount.fuse.encfs through the real mount(8): `mount -t fuse.encfs`, an
fstab line, -o ro, remount ro and rw, and a failure as one line.

The helper is installed by fuse_cli_helpers' ``mount_helper`` fixture (the file put back
afterwards); every mount runs inside ``guard``, which leaves nothing mounted and no daemon behind.
mount(8)'s own flags are in test_mount_helper.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

from fuse_cli_helpers import (
    _mount_options,
    _system_mount,
    daemon_pids,
    encfs_ok,
    expect_errno,
    fstab_line,
    guard,
    mount_helper,
    new_fs,
    wait_gone,
)
from fuse_helpers import Mount

from encfs.fuse.mount import is_mounted

__all__ = ["mount_helper"]  # the fixture, used by name


# -- fstab and mount(8) ------------------------------------------------------------------------------------

def test_mount_helper_mounts_from_mount_8_and_fstab(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "file").write_text("from fstab")
        # mount -t: minimal environment, the home only from -o
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"home={fs_home}", str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mp)
        pids = daemon_pids(cipher)
        assert len(pids) == 1, pids
        assert (mp / "file").read_text() == "from fstab"
        (mp / "written").write_text("rw")
        proc = _system_mount("umount", str(mp))
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mp)
        assert wait_gone(pids, 30)

        # read-only through -o ro
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"ro,home={fs_home}", str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert (mp / "written").read_text() == "rw"
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        expect_errno(errno.EROFS, (mp / "written").write_text, "x")
        assert _system_mount("umount", str(mp)).returncode == 0
        assert not is_mounted(mp)

        # an fstab line: `mount MOUNTPOINT`
        with fstab_line(f"{cipher} {mp} fuse.encfs defaults,noauto,home={fs_home} 0 0"):
            proc = _system_mount("mount", str(mp))
            assert proc.returncode == 0, proc.stderr
            assert (mp / "file").read_text() == "from fstab"
            pids = daemon_pids(cipher)
            proc = _system_mount("umount", str(mp))
            assert proc.returncode == 0, proc.stderr
            assert not is_mounted(mp)
            assert wait_gone(pids, 30)


def test_remount_ro_and_rw_through_mount_8(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    """mount -o remount,ro|rw reaches `encfs CIPHERDIR MOUNTPOINT -o remount,...` through the helper:
    the kernel flag flips and the daemon goes on; a read-only daemon is not made writable."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        encfs_ok("mount", str(cipher), str(mp), home=fs_home)
        (mp / "before").write_text("rw")
        proc = _system_mount("mount", "-o", "remount,ro", str(mp))
        assert proc.returncode == 0, proc.stderr
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        assert (mp / "before").read_text() == "rw"
        assert "nosuid" in _mount_options(mp) and "nodev" in _mount_options(mp)  # the remount kept them
        proc = _system_mount("mount", "-o", "remount,rw", str(mp))
        assert proc.returncode == 0, proc.stderr
        (mp / "after").write_text("rw again")
        encfs_ok("umount", str(mp), home=fs_home)
        encfs_ok("mount", "--read-only", str(cipher), str(mp), home=fs_home)
        proc = _system_mount("mount", "-o", "remount,rw", str(mp))
        assert proc.returncode != 0 and "mounted read-only" in proc.stderr, proc.stderr
        expect_errno(errno.EROFS, (mp / "new").write_text, "x")
        assert (mp / "after").read_text() == "rw again"
        encfs_ok("umount", str(mp), home=fs_home)


def test_mount_helper_failure_is_one_line(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"home={tmp_path / 'nowhere'}", str(cipher),
                             str(mp))
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert "encfs: no key store at " in proc.stderr, proc.stderr
        assert not is_mounted(mp)
        assert daemon_pids(cipher) == []
