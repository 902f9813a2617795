"""An unprivileged user mounts through `encfs keyd` without ever reading the PIN (issue #24).

Root runs the daemon (its home 0700, the PIN inside); test users create a key through the daemon,
`encfs init` and `encfs mount` with `--keyd` (fusermount3, a real FUSE mount), and a second user
mounts the same CIPHERDIR only once a grant allows it. A daemon restart while a mount is live:
the mount's next key request reconnects. Mounts are unmounted and daemons stopped by PID whatever
happens.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keyd_rig import home_with_key, keyd, stop
from keyd_users import UnixUser, UnixUsers, run_as, temporary_users, user_python_fixture  # noqa: F401

from encfs.fuse.mount import is_mounted

# What a read-write mount asks of its key (docs/keyd.md, "Mounting through the daemon"): Decrypt
# opens the config and the files (and lets derived keys be used), GenerateDataKey gives new files
# of a filesystem with wrapped keys their keys; every context carries encfs:fs, so a grant can
# be held to one filesystem.
MOUNT_OPERATIONS = "Decrypt,GenerateDataKey"


class World:
    """A root daemon on a socket every user reaches, two users, each with a home of its own."""

    def __init__(self, root: Path, home: Path, users: UnixUsers, python: Any) -> None:
        self.root, self.home, self.python = root, home, python
        self.sock = root / "keyd.sock"
        self.alice, self.bob = users.create(), users.create()
        self.mounts: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def user_home(self, user: UnixUser) -> Path:
        home = self.root / user.name
        if not home.exists():
            home.mkdir(mode=0o700)
            os.chown(home, user.uid, user.gid)
        return home

    def encfs(self, user: UnixUser, *args: str, keyd: bool = True) -> subprocess.CompletedProcess[str]:
        """`encfs ARGS [--keyd SOCK]` as ``user``, with a state directory of its own (for its mount
        logs: it holds no token)."""
        home = self.user_home(user)
        env = self.python.env(HOME=str(home), ENCFS_HOME=str(home / "encfs"))
        argv = [self.python.executable, "-m", "encfs", *args, *(["--keyd", str(self.sock)] if keyd else [])]
        return run_as(user, argv, env)

    def ok(self, user: UnixUser, *args: str, keyd: bool = True) -> str:
        proc = self.encfs(user, *args, keyd=keyd)
        assert proc.returncode == 0, (args, proc.stderr)
        return proc.stdout

    def mount(self, user: UnixUser, cipher: Path, name: str) -> Path:
        mnt = self.user_home(user) / name
        assert run_as(user, ["mkdir", "-p", str(mnt)]).returncode == 0
        self.mounts.append(mnt)
        self.ok(user, "mount", str(cipher), str(mnt))
        assert is_mounted(mnt)
        return mnt

    def sh(self, user: UnixUser, script: str) -> str:
        proc = run_as(user, ["sh", "-c", script])
        assert proc.returncode == 0, (script, proc.stderr)
        return proc.stdout

    def audit(self) -> list[dict[str, Any]]:
        """The trail, read by root (with no roles, root and the daemon's user read it)."""
        proc = subprocess.run([self.python.executable, "-m", "encfs", "key", "audit", "--json", "--keyd",
                               str(self.sock)], env=self.python.env(ENCFS_HOME=str(self.root / "none")),
                              capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["Records"])


@pytest.fixture
def fuse_device_for_users() -> Iterator[None]:
    """/dev/fuse may be 0600 here: open it for the test, then restore (as test_fuse_unprivileged)."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def world(tmp_path: Path, user_python: Any, fuse_device_for_users: None) -> Iterator[World]:
    home = tmp_path / "keyd-home"  # under pytest's 0700 directory, as a daemon's state should be
    home_with_key(home, "local")
    root = Path(tempfile.mkdtemp(prefix="encfs-keydmount-", dir="/tmp"))
    root.chmod(0o755)
    try:
        with temporary_users() as users:
            w = World(root, home, users, user_python)
            try:
                with keyd(home, w.sock) as proc:
                    w.proc = proc
                    yield w
            finally:
                for mnt in w.mounts:  # before the users (and their mount daemons) are removed
                    for flags in ("-u", "-uz"):
                        if is_mounted(mnt):
                            subprocess.run(["fusermount3", flags, str(mnt)], capture_output=True, check=False)
                if w.proc is not None:
                    stop(w.proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_user_mounts_through_the_daemon_and_a_grant_lets_another(world: World) -> None:
    w = world
    # The PIN stays the daemon's: its state directory is root's alone.
    st = os.stat(w.home)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert run_as(w.alice, ["ls", str(w.home)]).returncode != 0
    key = w.ok(w.alice, "key", "create", "--alias", "alice-fs").strip()
    cipher = w.root / "shared"
    cipher.mkdir(mode=0o777)
    cipher.chmod(0o1777)
    made = w.ok(w.alice, "init", str(cipher / "fs"), "--key", "alice-fs")
    fs_id = made.split()[2]  # "encrypted filesystem ID created in ..."
    mnt = w.mount(w.alice, cipher / "fs", "mnt")
    assert w.sh(w.alice, f"cd {mnt} && mkdir d && echo hello > d/a && cat d/a") == "hello\n"
    w.ok(w.alice, "umount", str(mnt), keyd=False)
    assert not is_mounted(mnt)
    # bob may read and write the directory (its modes are not what protects it), not use the key.
    subprocess.run(["chmod", "-R", "a+rwX", str(cipher / "fs")], check=True)
    bobs = w.user_home(w.bob) / "mnt"
    assert run_as(w.bob, ["mkdir", str(bobs)]).returncode == 0
    denied = w.encfs(w.bob, "mount", str(cipher / "fs"), str(bobs))
    assert denied.returncode == 77, denied.stderr
    assert denied.stderr == (f"encfs: uid {w.bob.uid} ({w.bob.name}) may not kms:Decrypt key {key}: "
                             "no policy statement or grant allows it\n")
    grant = w.ok(w.alice, "key", "grant", "create", "alice-fs", "--grantee", f"user:{w.bob.name}",
                 "--operations", MOUNT_OPERATIONS, "--context-subset", f"encfs:fs={fs_id}").strip()
    bobs = w.mount(w.bob, cipher / "fs", "mnt")
    assert w.sh(w.bob, f"cat {bobs}/d/a && echo from-bob > {bobs}/b && cat {bobs}/b") == "hello\nfrom-bob\n"
    trail = [r for r in w.audit() if r.get("KeyId") == key and r["Principal"].get("Uid") == w.bob.uid]
    # The secret's Decrypt; bob's new file has a derived key (no GenerateDataKey), whose use the
    # daemon allowed unaudited, as a cache hit (CachedKeyUsable).
    succeeded = {r["Operation"] for r in trail if r["Outcome"] == "success"}
    assert "Decrypt" in succeeded and "GenerateDataKey" not in succeeded, succeeded
    assert not [r for r in trail if r["Outcome"] == "denied" and r["Operation"] != "Decrypt"], trail  # its first mount
    # Revoked: bob's live mount makes no new file (each create asks the daemon), his next mount
    # is refused again, alice's goes on.
    w.ok(w.alice, "key", "grant", "revoke", "alice-fs", "--grant-id", grant)
    late = run_as(w.bob, ["sh", "-c", f"echo late > {bobs}/late"])
    assert late.returncode != 0 and "Input/output error" in late.stderr, late
    w.ok(w.bob, "umount", str(bobs), keyd=False)
    assert w.encfs(w.bob, "mount", str(cipher / "fs"), str(bobs)).returncode == 77
    mnt = w.mount(w.alice, cipher / "fs", "mnt")
    assert w.sh(w.alice, f"cat {mnt}/b") == "from-bob\n"


def test_a_live_mount_reconnects_after_a_daemon_restart(world: World) -> None:
    w = world
    w.ok(w.alice, "key", "create", "--alias", "restart")
    cipher = w.user_home(w.alice) / "cipher"
    w.ok(w.alice, "init", str(cipher), "--key", "restart")
    mnt = w.mount(w.alice, cipher, "mnt")
    w.sh(w.alice, f"echo before > {mnt}/before")
    assert w.proc is not None
    stop(w.proc)
    w.proc = None
    with keyd(w.home, w.sock) as proc:
        w.proc = proc
        time.sleep(0.2)
        # New files need new data keys (and may find the pool's older ones), the old file its key.
        out = w.sh(w.alice, f"for i in 1 2 3 4 5 6 7 8; do echo after$i > {mnt}/after$i; done; "
                            f"cat {mnt}/before {mnt}/after1 {mnt}/after8")
        assert out == "before\nafter1\nafter8\n"
        w.ok(w.alice, "umount", str(mnt), keyd=False)
        mnt = w.mount(w.alice, cipher, "mnt")  # what was written after the restart reads back
        assert w.sh(w.alice, f"cat {mnt}/after1 {mnt}/after8 {mnt}/before") == "after1\nafter8\nbefore\n"
        w.ok(w.alice, "umount", str(mnt), keyd=False)
