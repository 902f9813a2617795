"""`encfs snapshot` refusals found in review of issue #20, through the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_snapshots import fails, ok, snap, volume  # noqa: F401  (the fixture)
from volume_helpers import Rig, rig  # noqa: F401  (the fixture)

from encfs.blocks import SEALED_BLOCK


def test_deleting_a_snapshot_the_volume_never_had_is_an_error(volume: Path, fs_home: Path) -> None:  # noqa: F811
    snap(volume, fs_home)
    typo = "snap-0123456789abcdef"
    assert "has no snapshot" in fails("snapshot", "delete", f"{volume}@{typo}", home=fs_home)
    assert typo not in ok("snapshot", "list", home=fs_home)


def test_rollback_of_an_attached_volume_named_by_its_loop_device_says_detach_first(rig: Rig) -> None:  # noqa: F811
    image = rig.create(size="16M")
    loop = rig.attach(image)
    sid = json.loads(rig.ok("snapshot", "create", loop, "--json"))["SnapshotId"]
    assert "detach it first" in rig.fails("snapshot", "rollback", loop, sid)
    rig.detach(image)


def test_restoring_from_a_truncated_image_is_one_line(volume: Path, fs_home: Path, tmp_path: Path) -> None:  # noqa: F811
    sid = snap(volume, fs_home)
    os.truncate(volume, os.path.getsize(volume) - 3 * SEALED_BLOCK)  # a copy cut short
    assert "truncated" in fails("snapshot", "restore", sid, tmp_path / "r.img", home=fs_home)
    assert "truncated" in fails("snapshot", "export", sid, tmp_path / "ex", home=fs_home)


def test_a_description_is_one_line_of_printable_text(volume: Path, fs_home: Path) -> None:  # noqa: F811
    """A newline in --description broke the list's table (issue #20's audit); EBS caps it at 255."""
    for bad in ("two\nlines", "tab\there", "x" * 256):
        assert "--description must be one line" in fails("snapshot", "create", str(volume), "--description", bad,
                                                          home=fs_home)
    assert "snap-" not in ok("snapshot", "list", str(volume), home=fs_home)
    ok("snapshot", "create", str(volume), "--description", "before the upgrade: été", home=fs_home)
    assert "before the upgrade: été" in ok("snapshot", "list", str(volume), home=fs_home)
