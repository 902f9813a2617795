"""The mount table reader (encfs.fuseproto.mounting: mount_table, topmost_mount; and
encfs.fuse.mounttable.mount_at) on a mountinfo file written here: the kernel's escapes, mounts
stacked at one path, and a path whose last component is a symlink."""

from __future__ import annotations

import os
from pathlib import Path

from encfs.fuse.mounttable import mount_at
from encfs.fuseproto.mounting import mount_table, topmost_mount


def table(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_escapes_are_undone_and_the_fields_read(tmp_path: Path) -> None:
    t = table(tmp_path, [
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        r"100 22 0:50 / /m/a\040b\011c\012d\134e ro,nosuid - fuse.encfs /c/x\040y rw,user_id=0",
        "garbage without the separator",
    ])
    root, odd = mount_table(t)
    assert (root.device, root.mountpoint, root.fstype, root.source, root.read_only, root.mount_id,
            root.parent_id) == ("8:1", "/", "ext4", "/dev/vda", False, 22, 1)
    assert (odd.device, odd.mountpoint, odd.fstype, odd.source, odd.read_only) == \
        ("0:50", "/m/a b\tc\nd\\e", "fuse.encfs", "/c/x y", True)


def test_the_last_mount_at_a_path_is_on_top(tmp_path: Path) -> None:
    mp = tmp_path / "mnt x"
    mp.mkdir()
    escaped = str(mp).replace(" ", r"\040")
    t = table(tmp_path, [f"100 22 0:50 / {escaped} rw - fuse.encfs /cipher rw",
                         f"101 100 0:51 / {escaped} rw - tmpfs none rw"])
    top = topmost_mount(mp, t)
    assert top is not None and top.fstype == "tmpfs"
    assert mount_at(mp, str(t)) is None  # an encfs mount with something over it is not reached
    only = table(tmp_path, [f"100 22 0:50 / {escaped} rw - fuse.encfs /cipher rw"])
    entry = mount_at(mp, str(only))
    assert entry is not None and entry.source == "/cipher" and entry.mountpoint == str(mp)
    assert topmost_mount(tmp_path / "elsewhere", t) is None
    # Listed by id (Linux 6.8+): a mount moved on top may come first.
    moved = table(tmp_path, [f"90 101 0:51 / {escaped} rw - tmpfs none rw",
                             f"101 22 0:50 / {escaped} rw - fuse.encfs /cipher rw"])
    top = topmost_mount(mp, moved)
    assert top is not None and top.fstype == "tmpfs" and mount_at(mp, str(moved)) is None


def test_a_symlink_to_a_mountpoint_finds_it(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "dir", tmp_path / "dirlink")
    t = table(tmp_path, [f"100 22 0:50 / {real} rw - fuse.encfs /cipher rw"])
    for spelling in (tmp_path / "link", tmp_path / "dirlink" / ".." / "real", real):
        found = topmost_mount(spelling, t)
        assert found is not None and found.mountpoint == str(real), spelling
