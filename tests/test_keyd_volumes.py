"""Volumes, snapshots and re-keys as root through `encfs keyd` (issue #24): the client's home holds
no token, so every key operation is the daemon's, and the audit trail shows them.

Uses tests/volume_helpers.py's Rig, which undoes loop devices, mounts and volume daemons on failure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuse_helpers import Mount
from keyd_rig import home_with_key, keyd
from volume_helpers import Rig, pytestmark  # noqa: F401  (root, loop devices, mkfs.ext4)


class Remote(Rig):
    """The Rig's CLI with ``--keyd SOCK`` and a home without a token."""

    def __init__(self, tmp: Path, daemon_home: Path, sock: Path) -> None:
        super().__init__(tmp, tmp / "client-home")
        self.daemon_home, self.sock = daemon_home, sock

    def keyd(self, *args: str | Path) -> str:
        return self.ok(*args, "--keyd", self.sock)

    def audit(self) -> list[dict[str, Any]]:
        return list(json.loads(self.keyd("key", "audit", "--json"))["Records"])


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    home = tmp_path / "keyd-home"
    home_with_key(home, "local")
    sock = tmp_path / "keyd.sock"
    with keyd(home, sock):
        r = Remote(tmp_path, home, sock)
        try:
            yield r
        finally:
            r.cleanup()


def test_a_volume_is_created_attached_and_snapshotted_through_the_daemon(remote: Remote) -> None:
    r = remote
    assert "encfs hsm init" in r.fails("volume", "create", r.tmp / "x.img", "--size", "32M", "--key", "local")
    key = r.keyd("key", "create", "--alias", "vol").strip()
    image = r.tmp / "vol.img"
    r.keyd("volume", "create", image, "--size", "32M", "--key", "vol")
    loop = r.keyd("volume", "attach", image, "--log-file", r.tmp / "daemon.log").strip()
    r.mkfs(loop)
    mnt = r.mount(loop)
    (mnt / "note").write_text("through keyd\n")
    r.umount(mnt)
    snap = json.loads(r.keyd("snapshot", "create", loop, "--json"))
    r.ok("volume", "detach", image)
    loop = r.keyd("volume", "attach", image, "--log-file", r.tmp / "daemon.log").strip()
    mnt = r.mount(loop)
    assert (mnt / "note").read_text() == "through keyd\n"
    r.umount(mnt)
    r.ok("volume", "detach", image)
    assert snap["SnapshotId"] in r.keyd("snapshot", "list", image)
    ops = {x["Operation"] for x in r.audit() if x.get("KeyId") == key and x["Outcome"] == "success"}
    assert ops >= {"GenerateDataKey", "Decrypt"}, ops


def test_a_filesystem_is_rekeyed_through_the_daemon(remote: Remote) -> None:
    r = remote
    old = r.keyd("key", "create", "--alias", "old").strip()
    new = r.keyd("key", "create", "--alias", "new").strip()
    cipher, plain = r.tmp / "cipher", r.tmp / "plain"
    plain.mkdir()
    r.keyd("init", cipher, "--key", "old")
    keyd_args = ("--keyd", str(r.sock))
    with Mount(cipher, plain, r.home, *keyd_args):
        (plain / "f").write_text("kept\n")
    fs_id = json.loads(r.ok("info", cipher, "--json"))["FileSystemId"]
    assert used_by(r, "old") == [f"fs:{fs_id}"]
    r.keyd("rekey", cipher, "--key", "new")
    assert json.loads(r.ok("info", cipher, "--json"))["KeyId"] == new
    with Mount(cipher, plain, r.home, *keyd_args):
        assert (plain / "f").read_text() == "kept\n"
    # The re-key's last step, ForgetUsage, asked of the daemon: the old key no longer names the
    # filesystem, the new one does.
    assert (used_by(r, "old"), used_by(r, "new")) == ([], [f"fs:{fs_id}"])
    assert any(x["Operation"] == "ReEncrypt" and x["Outcome"] == "success" and x.get("KeyId") in (old, new)
               for x in r.audit())


def used_by(r: Remote, key: str) -> list[str]:
    versions = json.loads(r.keyd("key", "describe", key, "--json"))["KeyVersions"]
    return sorted(u for v in versions for u in v.get("UsedBy") or [])
