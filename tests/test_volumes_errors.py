"""Refusals of the volume commands, through the real CLI and real loop devices, each in one line
and with nothing left attached: a second attach (also from another registry), a disabled or another
CMK, truncated or non-volume images, detach of a volume in use or not attached, create over an
existing file.

The ``Rig`` (tests/volume_helpers.py) undoes whatever a test set up, also when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from procs import running
from volume_helpers import (
    MiB,
    Rig,
    dd_write,
    patterns,
    pytestmark,  # noqa: F401 - root, /dev/fuse, loop devices, the tools
    rig,
    sh,
    sha256,
)

__all__ = ["rig"]  # the fixture, used by name

# -- attach ----------------------------------------------------------------------------------------


def test_attach_twice_is_refused(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    msg = rig.fails("volume", "attach", image)
    assert "already attached" in msg and loop in msg
    assert len(rig.entries()) == 1 and len(rig.fuse_mounts()) == 1 and len(rig.loops()) == 1
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_one_image_is_served_by_one_daemon_whatever_the_registry(rig: Rig) -> None:
    """A second registry (another ENCFS_RUN_DIR), or a race between two attaches, must not start a
    second daemon on the same image: two sector stores would overwrite each other's maps."""
    image = rig.create()
    loop = rig.attach(image)
    (rig.tmp / "other").mkdir()
    other = Rig(rig.tmp / "other", rig.home)
    try:
        msg = other.fails("volume", "attach", image)
        assert "in use" in msg, msg
        other.assert_nothing_attached()
        assert "in use" in other.fails("volume", "resize", image, "--size", "128M")
        assert rig.info(image)["Size"] == 64 * MiB
    finally:
        other.cleanup()
    [row] = rig.listed()
    assert row["Device"] == loop and row["State"] == "attached"
    rig.detach(loop)
    loop = other.attach(image)  # free again once detached
    other.detach(loop)
    other.assert_nothing_attached()


def test_a_dead_mount_left_without_an_entry_does_not_block_the_next_attach(rig: Rig) -> None:
    """A daemon killed during attach, after its FUSE mount and before its registry entry: its dead
    mount (stat() of it fails: ENOTCONN) is detached by the next attach, which then works."""
    image = rig.create()
    loop = rig.attach(image)
    [entry] = rig.entries()
    rig.kill_daemon(loop)
    sh("losetup", "-d", loop)
    (rig.run_dir / "volumes" / f"{entry['volume_id']}.json").unlink()
    assert rig.fuse_mounts() == [entry["mountpoint"]]  # dead, and named by no entry
    loop = rig.attach(image)
    assert len(rig.fuse_mounts()) == 1
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_two_attaches_of_one_volume_at_once_leave_one_attached(rig: Rig) -> None:
    """The loser of two simultaneous attaches must not take the winner's mount, not yet registered,
    for a dead daemon's and detach it, nor remove the winner's entry (attach.py's lock)."""
    image = rig.create()
    for _round in range(3):
        cmd = [sys.executable, "-m", "encfs", "volume", "attach", str(image)]
        env = dict(os.environ, ENCFS_HOME=str(rig.home), **rig.env)
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        won = [out.strip() for out, _err, rc in results if rc == 0]
        lost = [err.strip() for _out, err, rc in results if rc != 0]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].startswith("encfs: ") and len(lost[0].splitlines()) == 1, lost
        [row] = rig.listed()
        assert row["Device"] == won[0] and row["State"] == "attached"
        assert len(rig.fuse_mounts()) == 1
        dd_write(won[0], 0, patterns(0, 16, _round), rig.tmp)  # the winner's device works
        rig.detach(won[0])
        rig.assert_nothing_attached()


def test_attach_with_disabled_cmk_fails_cleanly(rig: Rig) -> None:
    home = rig.new_home("vk")
    image = rig.create(home=home, key="vk")
    rig.ok("key", "disable", "vk", home=home)
    msg = rig.fails("volume", "attach", image, home=home)
    assert "disabled" in msg.lower(), msg
    rig.assert_nothing_attached()
    rig.ok("key", "enable", "vk", home=home)
    loop = rig.attach(image, home=home)
    rig.detach(loop)


def test_attach_with_another_expected_key_is_refused_in_one_line(rig: Rig) -> None:
    """--key pins the CMK (as the filesystem pins its own): a volume under another key is refused
    before anything is attached; the right key, by alias or id, attaches."""
    home = rig.new_home("pin")
    image = rig.create(home=home, key="pin")
    other = rig.ok("key", "create", "--alias", "other", home=home).strip()
    key_id = rig.info(image)["KeyId"]
    msg = rig.fails("volume", "attach", image, "--key", "other", home=home)
    assert f"is encrypted under key {key_id}, not other" in msg, msg
    rig.assert_nothing_attached()
    assert f"not {other}" in rig.fails("volume", "info", image, "--key", other, home=home)
    assert rig.fails("volume", "resize", image, "--size", "128M", "--key", "other", home=home)
    assert rig.info(image)["Size"] == 64 * MiB
    loop = rig.attach_with(image, "--key", "pin", home=home)
    rig.detach(loop)
    loop = rig.attach_with(image, "--key", key_id, home=home)
    rig.detach(loop)


def test_attach_truncated_image_fails_cleanly(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 4096, 1), rig.tmp)  # 16 MiB: the image holds them
    rig.detach(loop)
    os.truncate(image, 8 * MiB)
    msg = rig.fails("volume", "attach", image)
    assert "truncated" in msg, msg
    rig.assert_nothing_attached()
    os.truncate(image, 1000)  # not even a header left
    msg = rig.fails("volume", "attach", image)
    assert "not an encfs volume" in msg, msg
    rig.assert_nothing_attached()


def test_attach_non_volume_files_fails_cleanly(rig: Rig) -> None:
    junk = rig.tmp / "junk.img"
    junk.write_bytes(os.urandom(2 * MiB))
    assert "not an encfs volume" in rig.fails("volume", "attach", junk)
    empty = rig.tmp / "empty.img"
    empty.write_bytes(b"")
    assert "not an encfs volume" in rig.fails("volume", "attach", empty)
    rig.fails("volume", "attach", rig.tmp / "missing.img")
    rig.fails("volume", "info", junk)
    for cmd in (["attach"], ["info"], ["resize", "--size", "128M"]):
        assert "Is a directory" in rig.fails("volume", *cmd, rig.tmp)
    rig.assert_nothing_attached()


# -- detach and create -----------------------------------------------------------------------------


def test_detach_errors(rig: Rig) -> None:
    image = rig.create()
    assert "not an attached encfs volume" in rig.fails("volume", "detach", image)
    assert "not an attached encfs volume" in rig.fails("volume", "detach", "/dev/loop7")
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    (mnt / "f").write_bytes(b"still here")
    msg = rig.fails("volume", "detach", loop)
    assert "in use" in msg and str(mnt) in msg, msg
    assert "in use" in rig.fails("volume", "detach", image)
    assert (mnt / "f").read_bytes() == b"still here"
    [row] = rig.listed()
    assert row["State"] == "attached"
    rig.umount(mnt)
    # open but not mounted: refused too, quickly, instead of killing the daemon under the opener
    with open(loop, "rb") as dev:
        holder = subprocess.Popen(["sleep", "60"], stdin=dev)
    try:
        t0 = time.monotonic()
        msg = rig.fails("volume", "detach", loop)
        assert "in use" in msg and f"pid {holder.pid}" in msg, msg
        assert time.monotonic() - t0 < 20
        assert running(rig.listed()[0]["Pid"])
    finally:
        holder.kill()
        holder.wait(timeout=10)
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_create_refuses_to_overwrite(rig: Rig) -> None:
    existing = rig.tmp / "existing.img"
    existing.write_bytes(b"precious")
    assert "already exists" in rig.fails("volume", "create", existing, "--size", "64M", "--key", "fs")
    assert existing.read_bytes() == b"precious"
    image = rig.create()
    before = sha256(image)
    rig.fails("volume", "create", image, "--size", "64M", "--key", "fs")
    assert sha256(image) == before
    rig.fails("volume", "create", rig.tmp / "bad.img", "--size", "12345", "--key", "fs")
    assert not (rig.tmp / "bad.img").exists()
