"""`encfs status` through the real CLI (issue #23): a real FUSE mount and a real attached volume
(loop device) are listed with their source, target, key id and state, daemon pid and liveness.
Other engineers' mounts may be listed too: the test looks only at its own rows."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path
from typing import Any

from fuse_cli_helpers import guard, new_fs
from fuse_helpers import Mount
from volume_helpers import Rig, dd_read, dd_write, flip, patterns, pytestmark, rig  # noqa: F401

from encfs.block.layout import SLOT_A, SLOT_B, sector_offset


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
                      "DaemonAlive": True, "Errors": 0}
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


def test_status_counts_a_volume_daemons_errors(rig: Rig) -> None:  # noqa: F811
    image = rig.create("err.img", "16M", fmt=1)  # format 1: a sector's slots are at fixed offsets
    loop = rig.attach(image)
    dd_write(loop, 10 * 4096, patterns(10, 1, 1), rig.tmp)
    rig.detach(loop)
    for slot in (SLOT_A, SLOT_B):
        flip(image, sector_offset(10, slot) + 100)
    loop = rig.attach(image)
    [vol] = _status(rig)["Volumes"]
    assert vol["Errors"] == 0
    for _ in range(2):
        r = dd_read(loop, 10 * 4096, 4096)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r.stderr
    deadline = time.monotonic() + 10  # the daemon publishes its count at most once a second
    while (errors := _status(rig)["Volumes"][0]["Errors"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert errors >= 1  # the kernel may retry a failed read: at least one failed request
    assert any(line.split()[0] == "volume" and line.split()[-1] == str(errors)
               for line in rig.ok("status").splitlines())
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_status_counts_a_filesystem_daemons_errors(rig: Rig) -> None:  # noqa: F811
    cipher, mp = new_fs(rig.tmp, rig.home)
    with guard(cipher, mp):
        with Mount(cipher, mp, rig.home):
            (mp / "f").write_bytes(b"x" * 100_000)
        backing = max((p for p in cipher.rglob("*") if p.is_file() and "." not in p.name),
                      key=lambda p: p.stat().st_size)
        flip(backing, backing.stat().st_size // 2)
        with Mount(cipher, mp, rig.home):
            [fs] = [r for r in _status(rig)["Mounts"] if r["Target"] == str(mp)]
            assert fs["Errors"] == 0
            try:
                (mp / "f").read_bytes()
                raise AssertionError("a tampered block was read")
            except OSError as e:
                assert e.errno == errno.EIO, e
            deadline = time.monotonic() + 10  # the record is rewritten within a second of a change
            while time.monotonic() < deadline:
                [fs] = [r for r in _status(rig)["Mounts"] if r["Target"] == str(mp)]
                if fs["Errors"]:
                    break
                time.sleep(0.2)
            assert fs["Errors"] >= 1
