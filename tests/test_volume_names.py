"""Named and read-only attachments through the real CLI (issue #23): /dev/encfs/NAME links
(under a private ENCFS_DEV_DIR here), detach by name, dead-daemon cleanup of the link, and
``--read-only`` on a read-only bind mount."""

from __future__ import annotations

import os
from pathlib import Path

from volume_helpers import Rig, dd_write, patterns, pytestmark, read_ok, rig, sh, sha256  # noqa: F401

MiB = 1 << 20


def _with_dev_dir(rig: Rig) -> Path:  # noqa: F811
    dev = rig.tmp / "dev-encfs"
    rig.env["ENCFS_DEV_DIR"] = str(dev)
    return dev


def test_named_attach_link_detach_by_name_and_dead_daemon_cleanup(rig: Rig) -> None:  # noqa: F811
    dev = _with_dev_dir(rig)
    image = rig.create("a.img", "16M")
    other = rig.create("b.img", "16M")
    assert "bad volume name" in rig.fails("volume", "attach", image, "--name", "x/y")
    loop = rig.attach_with(image, "--name", "data")
    assert os.readlink(dev / "data") == loop
    assert [r["Name"] for r in rig.listed()] == ["data"]
    assert rig.fails("volume", "attach", other, "--name", "data") == \
        f"encfs: volume name data is in use by {image} ({loop})"
    assert rig.encfs("volume", "attach", other, "--name", "data").returncode == 75  # busy (EX_TEMPFAIL)
    rig.detach("data")
    assert not (dev / "data").exists() and not (dev / "data").is_symlink()
    rig.assert_nothing_attached()
    # a killed daemon's link goes with its entry (detach of a dead attachment), by the link's path
    loop = rig.attach_with(image, "--name", "data")
    rig.kill_daemon(loop)
    rig.detach(dev / "data")
    assert not (dev / "data").is_symlink()
    rig.assert_nothing_attached()


def test_read_only_attach_on_a_read_only_bind_mount(rig: Rig) -> None:  # noqa: F811
    media = rig.tmp / "media"
    media.mkdir()
    image = rig.create("ro.img", "16M", where=media)
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 256, 1), rig.tmp)
    rig.detach(loop)
    before = sha256(image)
    ro = rig.tmp / "ro"
    ro.mkdir()
    sh("mount", "--bind", media, ro)
    rig.tmpfs.append(ro)  # unmounted by the rig's cleanup
    sh("mount", "-o", "remount,bind,ro", ro)
    assert "Read-only file system" in rig.fails("volume", "attach", ro / "ro.img")
    loop = rig.attach_with(ro / "ro.img", "--read-only")
    assert read_ok(loop, 0, MiB) == patterns(0, 256, 1)
    r = sh("dd", "of=" + loop, "bs=4096", "count=1", "oflag=direct", "conv=fsync", input=b"\0" * 4096,
           check=False)
    assert r.returncode != 0 and ("Read-only" in r.stderr or "not permitted" in r.stderr), r.stderr
    assert [r["ReadOnly"] for r in rig.listed()] == [True]
    assert rig.fails("volume", "resize", ro / "ro.img", "--size", "32M") == \
        f"encfs: {ro / 'ro.img'} is attached read-only at {loop}: detach it to resize it"
    rig.detach(loop)
    rig.assert_nothing_attached()
    assert sha256(image) == before
