"""`encfs status` through the real CLI (issue #23): a real FUSE mount and a real attached volume
(loop device) are listed with their source, target, key id and state, daemon pid and liveness.
Other engineers' mounts may be listed too: the test looks only at its own rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fuse_helpers import Mount
from test_fuse_cli import guard, new_fs
from test_volumes import Rig, pytestmark, rig  # noqa: F401


def _status(rig: Rig) -> dict[str, Any]:  # noqa: F811
    return json.loads(rig.ok("status", "--json"))


def test_status_lists_a_mount_and_a_named_volume(rig: Rig) -> None:  # noqa: F811
    rig.env["ENCFS_DEV_DIR"] = str(rig.tmp / "dev-encfs")
    key_id = json.loads(rig.ok("key", "describe", "fs", "--json"))["KeyId"]
    image = rig.create("st.img", "16M")
    cipher, mp = new_fs(rig.tmp, rig.home)
    with guard(cipher, mp), Mount(cipher, mp, rig.home) as m:
        loop = rig.attach_with(image, "--name", "stvol")
        st = _status(rig)
        [fs] = [r for r in st["Mounts"] if r["Target"] == str(mp)]
        assert fs == {"Type": "filesystem", "Source": str(cipher), "Target": str(mp), "Name": None,
                      "ReadOnly": False, "KeyId": key_id, "KeyState": "Enabled", "Pid": m.pid,
                      "DaemonAlive": True, "Errors": None}
        [vol] = st["Volumes"]
        assert {k: vol[k] for k in ("Source", "Target", "Name", "KeyId", "KeyState", "DaemonAlive")} == \
            {"Source": str(image), "Target": loop, "Name": "stvol", "KeyId": key_id, "KeyState": "Enabled",
             "DaemonAlive": True}
        text = rig.ok("status").splitlines()
        assert text[0].split()[:3] == ["TYPE", "SOURCE", "TARGET"]
        assert any(line.split()[:4] == ["filesystem", str(cipher), str(mp), "-"] for line in text), text
        assert any(line.split()[:4] == ["volume", str(image), loop, "stvol"] for line in text), text
        pid = rig.kill_daemon(loop)
        [vol] = _status(rig)["Volumes"]
        assert (vol["Pid"], vol["DaemonAlive"]) == (pid, False)
        rig.detach("stvol")
    assert [r for r in _status(rig)["Mounts"] if r["Target"] == str(mp)] == []
