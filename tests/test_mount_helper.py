"""mount(8)'s own flags and options through the real `mount -t fuse.encfs` and /sbin/mount.fuse.encfs
(issue #23): -f (fake), -n, -v, -s (sloppy); user, users, nofail, _netdev; a legacy EncFS directory.

The helper is installed by fuse_cli_helpers' ``mount_helper`` fixture (the file put back afterwards);
every mount runs inside ``guard``, which leaves nothing mounted and no daemon behind.
"""

from __future__ import annotations

from pathlib import Path

from fuse_cli_helpers import (
    _mount_options,
    _system_mount,
    daemon_pids,
    guard,
    is_mounted,
    mount_helper,
    new_fs,
    wait_gone,
)

__all__ = ["mount_helper"]  # the fixture, used by name


def test_fake_verbose_and_no_mtab_flags(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        # -f: every check, no mount (it used to mean --foreground here, and hung mount(8))
        proc = _system_mount("mount", "-fnv", "-t", "fuse.encfs", "-o", f"home={fs_home}", str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert f"{cipher} would be mounted on {mp} (fake)" in proc.stdout, proc.stdout
        assert not is_mounted(mp) and daemon_pids(cipher) == []
        # -f still checks: a CIPHERDIR that is not one fails, mounting nothing
        proc = _system_mount("mount", "-f", "-t", "fuse.encfs", "-o", f"home={fs_home}", str(tmp_path), str(mp))
        assert proc.returncode != 0 and "is not an encfs filesystem" in proc.stderr, proc.stderr

        # -s drops what FUSE does not know; mount(8)'s options never reach FUSE; users implies noexec
        opts = f"users,nofail,_netdev,no-such-option,home={fs_home}"
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", opts, str(cipher), str(mp))
        assert proc.returncode != 0 and "no-such-option" in proc.stderr and not is_mounted(mp), proc.stderr
        proc = _system_mount("mount", "-s", "-v", "-t", "fuse.encfs", "-o", opts, str(cipher), str(mp))
        assert proc.returncode == 0, proc.stderr
        assert "ignored (sloppy): no-such-option" in proc.stderr and f"is mounted on {mp}" in proc.stdout
        assert {"noexec", "nosuid", "nodev"} <= set(_mount_options(mp))
        (mp / "f").write_text("sloppy")
        pids = daemon_pids(cipher)
        assert _system_mount("umount", str(mp)).returncode == 0
        assert wait_gone(pids, 30)


def test_nofail_forgives_only_what_is_missing(mount_helper: Path, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / ".encfs6.xml").write_text("<boost_serialization/>")
    with guard(cipher, mp):
        for source, target in ((tmp_path / "unplugged", mp), (cipher, tmp_path / "no-mountpoint")):
            proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"nofail,home={fs_home}", str(source), str(target))
            assert proc.returncode == 0, proc.stderr
            assert proc.stderr.startswith("encfs: warning: ") and "does not exist: not mounted (nofail)" in proc.stderr
            assert proc.stderr.count("\n") == 1, proc.stderr
        assert not is_mounted(mp)
        # anything else still fails under nofail: here a legacy EncFS directory, named as such
        proc = _system_mount("mount", "-t", "fuse.encfs", "-o", f"nofail,home={fs_home}", str(legacy), str(mp))
        assert proc.returncode != 0 and not is_mounted(mp)
        assert proc.stderr.strip() == (f"encfs: {legacy} is a legacy EncFS directory (.encfs6.xml), not an encfs "
                                       "filesystem: mount it with the legacy encfs (/usr/bin/encfs)"), proc.stderr


def test_mount8_s_own_options_are_told_from_fuse_s() -> None:
    """What mount(8) and systemd hand a helper for themselves (`user=NAME` comes with a non-root
    user's mount of a `user`/`users` line) never reaches FUSE; FUSE's options do."""
    from encfs.fuse.mounthelper import is_mount8_option

    for option in ("user", "users", "user=alice", "noauto", "nofail", "_netdev", "x-systemd.requires=a",
                   "comment=x"):
        assert is_mount8_option(option), option
    for option in ("ro", "allow_other", "default_permissions", "username=x"):
        assert not is_mount8_option(option), option
