"""`encfs mount --server pyfuse3`: what the semantics suite (run on both servers) does not cover.

The mount path around the server is shared (encfs.fuse.mount.serve): these tests check that it
is, with the pyfuse3 server selected from the command line and from fstab (-o server=pyfuse3).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import run_encfs
from fuse_cli_helpers import (
    NOBODY,
    _mount_options,
    _system_mount,
    assert_one_line_error,
    daemon_pids,
    encfs_ok,
    fstab_line,
    guard,
    mount_helper,  # noqa: F401 - a fixture
    new_fs,
    public_dir,  # noqa: F401 - a fixture
    wait_gone,
)
from fuse_helpers import Mount

from encfs.fuse.mount import is_mounted
from encfs.fuse.server import READ_AHEAD_KIB


def _serves_with_libfuse(pid: int) -> bool:
    """Whether daemon ``pid`` runs libfuse (pyfuse3); our own server does not load it."""
    with open(f"/proc/{pid}/maps") as f:
        return "libfuse3.so" in f.read()


def test_unknown_server_is_one_line(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        assert_one_line_error(run_encfs("mount", "--server", "fuse2", str(cipher), str(mp), home=fs_home),
                              "unknown server 'fuse2'")
        assert_one_line_error(run_encfs("mount", "-o", "server=nope", str(cipher), str(mp), home=fs_home),
                              "unknown server 'nope'")
        assert not is_mounted(mp)


def test_sigterm_to_foreground_pyfuse3_daemon_unmounts_cleanly(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    data = os.urandom(3 << 20)
    with guard(cipher, mp):
        m = Mount(cipher, mp, fs_home, "--server", "pyfuse3", log=tmp_path / "daemon.log")  # this daemon's alone
        try:
            assert _serves_with_libfuse(m.pid)
            (mp / "big").write_bytes(data)
            os.kill(m.pid, signal.SIGTERM)
            assert m.proc.wait(timeout=30) == 0
            assert not is_mounted(mp)
        finally:
            m.stop()
        assert "Traceback" not in m.log.read_text()
        with Mount(cipher, mp, fs_home) as m2:  # the default server reads what pyfuse3 wrote
            assert not _serves_with_libfuse(m2.pid)
            assert (mp / "big").read_bytes() == data


def test_fstab_server_option_mounts_a_daemonized_pyfuse3_server(mount_helper: Path, public_dir: Path,  # noqa: F811
                                                                 fs_home: Path) -> None:
    """mount(8) with `server=pyfuse3,allow_other` in -o: daemonized, usable on return, allow_other
    with the kernel checking modes, the read-ahead set, and `encfs umount` ends the daemon."""
    cipher, mp = new_fs(public_dir, fs_home)
    with guard(cipher, mp):
        with fstab_line(f"{cipher} {mp} fuse.encfs noauto,allow_other,server=pyfuse3,home={fs_home} 0 0"):
            proc = _system_mount("mount", str(mp))
            assert proc.returncode == 0, proc.stderr
        pids = daemon_pids(cipher)
        assert len(pids) == 1 and _serves_with_libfuse(pids[0]), pids
        options = _mount_options(mp)
        assert "default_permissions" in options and "allow_other" in options
        assert not any(o.startswith("server") for o in options)
        os.chmod(mp, 0o755)
        (mp / "public").write_text("for everyone")
        (mp / "public").chmod(0o644)
        (mp / "private").write_text("root only")
        (mp / "private").chmod(0o600)
        ok = subprocess.run([*NOBODY, "cat", str(mp / "public")], capture_output=True, text=True, timeout=30,
                            check=False)
        assert ok.returncode == 0 and ok.stdout == "for everyone", ok.stderr
        denied = subprocess.run([*NOBODY, "cat", str(mp / "private")], capture_output=True, text=True,
                                timeout=30, check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
        dev = mp.stat().st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()
        assert int(ra) == READ_AHEAD_KIB
        encfs_ok("umount", str(mp), home=fs_home)
        assert not is_mounted(mp)
        assert wait_gone(pids, 30), "the daemon did not exit after `encfs umount`"
