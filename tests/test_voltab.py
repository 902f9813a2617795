"""The volume table (/etc/encfs/volumes, crypttab style) and `encfs volume attach-all` (issue #23):
the parser on its own, then the real CLI attaching from a table (real loop devices)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from volume_helpers import Rig, rig  # noqa: F401

from encfs.block.voltab import VolumeLine, parse
from encfs.block.volume import VolumeError


def test_table_lines_and_options() -> None:
    text = """
# NAME  IMAGE            OPTIONS
data    /srv/data.img
media   /mnt/cd/m.img    ro,key=app   # read-only media
spare   /srv/spare.img   noauto,log-file=/var/log/spare.log
"""
    assert parse(text) == [
        VolumeLine("data", Path("/srv/data.img")),
        VolumeLine("media", Path("/mnt/cd/m.img"), read_only=True, key="app"),
        VolumeLine("spare", Path("/srv/spare.img"), log_file="/var/log/spare.log", auto=False),
    ]


@pytest.mark.parametrize(("line", "why"), [
    ("data", "expected NAME IMAGE [OPTIONS]"),
    ("a/b /srv/x.img", "bad volume name"),
    ("data srv/x.img", "not an absolute path"),
    ("data /srv/x.img rw", "unknown option 'rw'"),
    ("data /srv/x.img key=", "unknown option 'key='"),
    ("x /srv/x.img\nx /srv/y.img", "volume name x appears twice"),
])
def test_a_bad_line_is_refused_with_its_number(line: str, why: str) -> None:
    with pytest.raises(VolumeError) as e:
        parse("# table\n" + line, "T")
    assert e.value.message.startswith(f"T:{1 + line.count(chr(10)) + 1}: ") and why in e.value.message, e.value


@pytest.mark.skipif(os.geteuid() != 0, reason="volumes need root (loop devices, mount)")
def test_attach_all_attaches_the_table_once_and_reports_failures(rig: Rig) -> None:  # noqa: F811
    dev = rig.tmp / "dev-encfs"
    rig.env["ENCFS_DEV_DIR"] = str(dev)
    image = rig.create("t.img", "16M")
    table = rig.tmp / "volumes"
    table.write_text(f"one {image} ro\nlater {rig.tmp}/later.img noauto\n")
    out = rig.ok("volume", "attach-all", "--table", table)
    [row] = rig.listed()
    assert out == f"one: {row['Device']}\n" and row["ReadOnly"] and os.readlink(dev / "one") == row["Device"]
    assert rig.ok("volume", "attach-all", "--table", table) == f"one: already attached at {row['Device']}\n"
    table.write_text(f"one {image} ro\ngone {rig.tmp}/gone.img\n")
    assert rig.fails("volume", "attach-all", "--table", table) == \
        f"encfs: 1 volume(s) of {table} not attached: gone"
    table.write_text("one\n")
    assert rig.fails("volume", "attach-all", "--table", table) == f"encfs: {table}:1: expected NAME IMAGE [OPTIONS]"
    rig.detach("one")
    rig.assert_nothing_attached()
