"""An unprivileged user mounts through fusermount3 (uid 65534, real mount, real token)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.fuse.mount import is_mounted

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can use, holding a copy of encfs and its dependencies if needed."""
    root = Path(tempfile.mkdtemp(prefix="encfs-nobody-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fuse_device_for_users() -> Iterator[None]:
    """Debian's /dev/fuse is 0666; some machines ship 0600. Open it up for the test, then restore."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def _user_python(world: Path) -> tuple[str, dict[str, str]]:
    """An interpreter and PYTHONPATH that uid 65534 can read (copying the packages if it cannot)."""
    site = sysconfig.get_paths()["purelib"]
    repo = str(Path(__file__).resolve().parents[1])
    for python in (sys.executable, "/usr/bin/python3"):
        # The daemon re-executes sys.executable (SoftHSM2 provisioning): probe exactly that.
        spawn = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"
        ok = subprocess.run([*SETPRIV, python, "-c", spawn], capture_output=True).returncode == 0
        if ok:
            break
    else:
        pytest.fail("no Python interpreter is executable by uid 65534")
    probe = subprocess.run([*SETPRIV, python, "-c", "import encfs.fuse.fs"], capture_output=True,
                           env=dict(os.environ, PYTHONPATH=f"{repo}:{site}"))
    if probe.returncode != 0:  # the checkout or the venv is private to root: give nobody a copy
        shutil.copytree(site, world / "site", symlinks=True)
        shutil.copytree(Path(repo) / "encfs", world / "src" / "encfs")
        repo, site = str(world / "src"), str(world / "site")
    return python, {"PYTHONPATH": f"{repo}:{site}"}


def test_unprivileged_user_mounts_with_fusermount3(world: Path, fuse_device_for_users: None) -> None:
    python, pyenv = _user_python(world)
    home = world / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    env = dict(os.environ, HOME=str(home), ENCFS_HOME=str(home / "encfs"), **pyenv)
    env.pop("SOFTHSM2_CONF", None)

    def encfs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SETPRIV, python, "-m", "encfs", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    cipher, plain = home / "cipher", home / "plain"
    assert encfs("hsm", "init").returncode == 0
    assert encfs("key", "create", "--alias", "mine").returncode == 0
    r = encfs("init", str(cipher), "--key", "mine")
    assert r.returncode == 0, r.stderr
    subprocess.run([*SETPRIV, "mkdir", str(plain)], check=True)
    daemon = subprocess.Popen([*SETPRIV, python, "-m", "encfs", "mount", "--foreground", str(cipher), str(plain)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(plain):
            assert daemon.poll() is None, daemon.stderr.read().decode() if daemon.stderr else ""
            assert time.monotonic() < deadline, "mount not ready in 60 s"
            time.sleep(0.05)
        with open("/proc/self/mounts") as f:
            line = next(x for x in f if f" {plain} " in x)
        assert "user_id=65534" in line  # mounted by the user, through fusermount3
        w = subprocess.run([*SETPRIV, "sh", "-c", f"echo private > {plain}/note && cat {plain}/note"],
                           capture_output=True, text=True)
        assert w.stdout == "private\n", w.stderr
        owner = subprocess.run([*SETPRIV, "stat", "-c", "%u:%g", str(plain / "note")], capture_output=True, text=True)
        assert owner.stdout.strip() == f"{NOBODY}:{NOBODY}", owner.stderr
        with pytest.raises(PermissionError):  # without allow_other, even root stays out
            os.stat(plain / "note")
        # No default_permissions without allow_other: modes hold because the daemon, running as
        # the user, meets them on the backing store (and answers access(2) from it).
        modes = subprocess.run([*SETPRIV, "sh", "-c", f"""
            cd {plain} && chmod 0400 note && mkdir box && chmod 0 box
            test -r note && echo readable; test -w note || echo not-writable; test -x note || echo not-executable
            (echo more >> note) 2>/dev/null || echo append-denied
            (ls box) 2>/dev/null || echo list-denied; (cd box) 2>/dev/null || echo chdir-denied
            chmod 0700 box && cd box && echo inside > f && cat f"""], capture_output=True, text=True)
        assert modes.stdout.split() == ["readable", "not-writable", "not-executable", "append-denied",
                                        "list-denied", "chdir-denied", "inside"], modes
        assert b"private" not in b"".join(p.read_bytes() for p in cipher.iterdir() if p.is_file())
        r = encfs("umount", str(plain))
        assert r.returncode == 0, r.stderr
        daemon.wait(timeout=30)
        assert not is_mounted(plain)
    finally:
        if is_mounted(plain):
            subprocess.run(["fusermount3", "-uz", str(plain)], capture_output=True)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
