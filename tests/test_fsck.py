"""`encfs fsck` on volume images of both formats and their snapshots, through the real CLI (a real
SoftHSM2 token; volumes written by tests/volume_tool.py in a subprocess, never attached, except
for the refusal of an attached volume). Damage is made by flipping bits at offsets found from the
layout and the maps; fsck must find exactly it, repair what has a good mirror, and leave every
sector that reads as it read before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import volume_tool
from conftest import run_encfs
from test_snapshots_crash import KILLED_AT
from volume_helpers import Rig, flip, pytestmark as needs_loop_devices, rig  # noqa: F401 (rig: a fixture)

from encfs.block.layout import SLOT_A, commit_offset, header_offset, map_offset, page_offset, sector_offset

MiB = 1 << 20


def fsck(image: Path, home: Path, *options: str) -> tuple[int, dict[str, Any]]:
    p = run_encfs("fsck", str(image), "--json", *options, home=home)
    assert p.returncode in (0, 1, 4), p.stderr.decode()
    assert b"Traceback" not in p.stderr
    report = json.loads(p.stdout)
    assert report["ExitCode"] == p.returncode and report["Kind"] in ("volume", "export")
    return p.returncode, report


def found(report: dict[str, Any]) -> set[tuple[Any, ...]]:
    """(kind, snapshot, first sector, count) of each finding (sector and count only for sectors)."""
    return {(d["Kind"], d.get("Snapshot"), d.get("Sector"), d.get("Count")) if d["Kind"] == "sector"
            else (d["Kind"],) for d in report["Damage"]}


def fails(target: Path | str, home: Path, *options: str) -> str:
    """fsck's operational error: exit 8, one line, no traceback."""
    p = run_encfs("fsck", str(target), *options, home=home)
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 8, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("encfs: ") and "Traceback" not in lines[0], p.stderr.decode()
    assert p.stdout == b""
    return lines[0]


def create(home: Path, image: Path, size: str = "32M", fmt: int = 2) -> Path:
    p = run_encfs("volume", "create", str(image), "--size", size, "--key", "fs", "--format", str(fmt), home=home)
    assert p.returncode == 0, p.stderr.decode()
    return image


def snapshot(image: Path, home: Path) -> str:
    p = run_encfs("snapshot", "create", str(image), "--json", home=home)
    assert p.returncode == 0, p.stderr.decode()
    return str(json.loads(p.stdout)["SnapshotId"])


def still_reads(before: dict[str, Any], after: dict[str, Any], damaged: dict[str | None, set[int]]) -> None:
    """Every sector reads as before except the damaged ones, which fail (None)."""
    trees = [(None, before["live"], after["live"])]
    trees += [(sid, tree, after["snapshots"][sid]) for sid, tree in before["snapshots"].items()]
    assert set(after["snapshots"]) == set(before["snapshots"])
    for sid, old, new in trees:
        bad = {s for s, h in enumerate(new["sha"]) if h is None}
        assert bad == damaged.get(sid, set()), sid
        assert [h for s, h in enumerate(old["sha"]) if s not in bad] == \
               [h for s, h in enumerate(new["sha"]) if s not in bad], sid


# -- clean volumes ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [1, 2])
def test_a_clean_volume_with_data_and_snapshots_is_clean(fs_home: Path, tmp_path: Path, fmt: int) -> None:
    image = create(fs_home, tmp_path / "vol.img", fmt=fmt)
    volume_tool.write(image, fs_home, {5: os.urandom(3 * MiB), 20 * MiB + 7: os.urandom(MiB)}, tmp_path)
    snaps = 0
    if fmt == 2:
        volume_tool.make_snapshots(image, fs_home, 2)  # each over fresh overwrites: pages of their own
        snaps = 2
    code, report = fsck(image, fs_home)
    assert (code, report["Damage"], report["Format"]) == (0, [], fmt)
    counts = report["Counts"]
    assert counts["Errors"] == counts["Warnings"] == counts["DamagedSectors"] == 0
    assert counts["SectorsChecked"] >= 4 * MiB // 4096 and counts.get("Snapshots", 0) == snaps
    p = run_encfs("fsck", str(image), home=fs_home)
    assert p.returncode == 0 and p.stdout.decode().count("\n") == 1 and "clean (exit 0)" in p.stdout.decode()
    assert fsck(image, fs_home, "--repair")[0] == 0  # nothing to repair: nothing changed


# -- damage -------------------------------------------------------------------------------------

def test_format_2_damage_is_found_exactly_and_repaired_where_a_mirror_holds_it(fs_home: Path,
                                                                               tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img")
    volume_tool.write(image, fs_home, {0: os.urandom(2 * MiB), 8 * MiB: os.urandom(MiB)}, tmp_path)
    sid = snapshot(image, fs_home)
    volume_tool.write(image, fs_home, {0: os.urandom(MiB)}, tmp_path)  # sectors 0-255: new pages live
    before = volume_tool.sectors(image, fs_home)
    live, snap = before["live"]["at"], before["snapshots"][sid]["at"]
    assert live[10] != snap[10] and live[2100] == snap[2100] and live[300] == snap[300]
    # live-only pages (10, 11), a page both reach (2100), a snapshot-only page (100)
    for page in (live[10], live[11], live[2100], snap[100]):
        flip(image, page_offset(page) + 100)
    flip(image, header_offset(1) + 200)
    flip(image, commit_offset(0) + 100)
    expected = {("header-copy",), ("commit-slot",), ("sector", None, 10, 2), ("sector", None, 2100, 1),
                ("sector", sid, 100, 1), ("sector", sid, 2100, 1)}
    code, report = fsck(image, fs_home)
    assert code == 4 and found(report) == expected
    assert report["Counts"]["Snapshots"] == 1 and report["Counts"]["DamagedSectors"] == 5

    code, report = fsck(image, fs_home, "--repair")
    assert code == 4 and found(report) == expected
    assert {d["Kind"] for d in report["Damage"] if d["Repaired"]} == {"header-copy", "commit-slot"}
    code, report = fsck(image, fs_home)
    assert code == 4 and found(report) == expected - {("header-copy",), ("commit-slot",)}
    still_reads(before, volume_tool.sectors(image, fs_home), {None: {10, 11, 2100}, sid: {100, 2100}})


def test_format_1_damage_is_found_exactly_and_repaired_where_a_mirror_holds_it(fs_home: Path,
                                                                               tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img", size="64M", fmt=1)  # two extents
    volume_tool.write(image, fs_home, {0: os.urandom(MiB), 9000 * 4096: os.urandom(64 * 1024)}, tmp_path)
    before = volume_tool.sectors(image, fs_home)
    assert before["live"]["at"][3] == SLOT_A  # written once: in slot A
    for sector in (3, 4, 200, 9001):
        flip(image, sector_offset(sector, SLOT_A) + 100)
    flip(image, header_offset(0) + 300)
    flip(image, map_offset(1, 1) + 100)  # extent 1 (sectors 8192-16383), map slot 1
    expected = {("header-copy",), ("map-slot",), ("sector", None, 3, 2), ("sector", None, 200, 1),
                ("sector", None, 9001, 1)}
    code, report = fsck(image, fs_home)
    assert code == 4 and found(report) == expected
    [slot] = [d["Message"] for d in report["Damage"] if d["Kind"] == "map-slot"]
    assert "extent 1 " in slot and "slot 1 " in slot

    code, report = fsck(image, fs_home, "--repair")
    assert code == 4 and {d["Kind"] for d in report["Damage"] if d["Repaired"]} == {"header-copy", "map-slot"}
    code, report = fsck(image, fs_home)
    assert code == 4 and found(report) == expected - {("header-copy",), ("map-slot",)}
    still_reads(before, volume_tool.sectors(image, fs_home), {None: {3, 4, 200, 9001}})


@pytest.mark.parametrize(("fmt", "where"), [(2, header_offset(0) + 10), (2, commit_offset(1) + 10),
                                           (1, header_offset(1) + 10), (1, map_offset(0, 0) + 10)])
def test_repairable_damage_alone_ends_in_exit_1_then_0(fs_home: Path, tmp_path: Path, fmt: int, where: int) -> None:
    image = create(fs_home, tmp_path / "vol.img", fmt=fmt)
    volume_tool.write(image, fs_home, {0: os.urandom(MiB)}, tmp_path)
    before = volume_tool.sectors(image, fs_home)
    flip(image, where)
    code, report = fsck(image, fs_home)
    assert code == 4 and len(report["Damage"]) == 1 and report["Damage"][0]["Repairable"]
    code, report = fsck(image, fs_home, "--repair")
    assert code == 1 and len(report["Damage"]) == 1 and report["Damage"][0]["Repaired"]
    code, report = fsck(image, fs_home)
    assert code == 0 and report["Damage"] == []
    still_reads(before, volume_tool.sectors(image, fs_home), {})


# -- leaked space -------------------------------------------------------------------------------

def test_pages_past_the_last_commit_are_a_warning_cut_off_by_repair(fs_home: Path, tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img")
    volume_tool.write(image, fs_home, {0: os.urandom(MiB)}, tmp_path)
    before, size = volume_tool.sectors(image, fs_home), os.path.getsize(image)
    with open(image, "ab") as f:
        f.write(os.urandom(3 * 4124))  # what a writer killed before its commit leaves
    code, report = fsck(image, fs_home)
    assert code == 0 and [(d["Kind"], d["Severity"]) for d in report["Damage"]] == [("tail-pages", "warning")]
    assert fsck(image, fs_home, "--repair")[0] == 1
    assert os.path.getsize(image) == size
    assert fsck(image, fs_home)[1]["Damage"] == []
    still_reads(before, volume_tool.sectors(image, fs_home), {})


def test_free_pages_a_killed_deletion_left_are_given_back_by_repair(fs_home: Path, tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img")
    volume_tool.write(image, fs_home, {0: os.urandom(8 * MiB)}, tmp_path)
    sid = snapshot(image, fs_home)
    volume_tool.write(image, fs_home, {0: os.urandom(8 * MiB)}, tmp_path)  # the snapshot alone holds 8 MiB
    env = dict(os.environ, ENCFS_HOME=str(fs_home))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, "-c", KILLED_AT, "committed", "snapshot", "delete", f"{image}@{sid}"],
                       env=env, capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    before, held = volume_tool.sectors(image, fs_home), os.stat(image).st_blocks * 512
    assert before["snapshots"] == {}
    code, report = fsck(image, fs_home)
    assert code == 0 and [(d["Kind"], d["Severity"]) for d in report["Damage"]] == [("free-pages", "warning")]
    assert report["Counts"]["FreeBytesHeld"] > 7 * MiB
    assert fsck(image, fs_home, "--repair")[0] == 1
    assert held - os.stat(image).st_blocks * 512 > 7 * MiB
    code, report = fsck(image, fs_home)
    assert code == 0 and report["Damage"] == [] and report["Counts"]["FreeBytesHeld"] < MiB
    still_reads(before, volume_tool.sectors(image, fs_home), {})


# -- snapshot exports ---------------------------------------------------------------------------

def test_an_export_is_checked_object_by_object(fs_home: Path, tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img")
    volume_tool.write(image, fs_home, {0: os.urandom(3 * MiB)}, tmp_path)
    first = snapshot(image, fs_home)
    volume_tool.write(image, fs_home, {8 * MiB: os.urandom(2 * MiB)}, tmp_path)
    second = snapshot(image, fs_home)
    out = tmp_path / "export"
    for sid in (first, second):
        assert run_encfs("snapshot", "export", f"{image}@{sid}", str(out), home=fs_home).returncode == 0
    code, report = fsck(out, fs_home)
    assert (code, report["Damage"], report["Counts"]["Snapshots"], report["Counts"]["Objects"]) == (0, [], 2, 5)
    objects = out / "objects"
    shared, only_second = _object_of(out, fs_home, first, 1), _object_of(out, fs_home, second, 8)
    flip(objects / shared[:2] / shared, 100)  # a chunk both snapshots name
    (objects / only_second[:2] / only_second).unlink()
    (objects / "ab").mkdir(exist_ok=True)
    (objects / "ab" / ("ab" + "0" * 62)).write_bytes(b"x" * 1000)  # an object no manifest names
    (out / "tmp" / "left").write_bytes(b"y")
    expected = {("sector", first, 256, 256), ("sector", second, 256, 256), ("sector", second, 2048, 256),
                ("unnamed-objects",), ("tmp-files",)}
    code, report = fsck(out, fs_home)
    assert code == 4 and {(d["Kind"], *_where(d)) for d in report["Damage"]} == \
        {("object", *w[1:]) if w[0] == "sector" else w for w in expected}
    code, report = fsck(out, fs_home, "--repair")
    assert code == 4 and {d["Kind"] for d in report["Damage"] if d["Repaired"]} == {"unnamed-objects", "tmp-files"}
    # the planted object is gone (objects/ab may hold a real object too: 5 random names, 1 in 256 each)
    assert not (objects / "ab" / ("ab" + "0" * 62)).exists()
    assert not any((out / "tmp").iterdir())
    code, report = fsck(out, fs_home)
    assert code == 4 and {d["Kind"] for d in report["Damage"]} == {"object"} and len(report["Damage"]) == 3


def _where(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["Snapshot"], d["Sector"], d["Count"]) if "Sector" in d else ()


def _object_of(out: Path, home: Path, sid: str, chunk: int) -> str:
    """The object name of ``chunk`` in ``sid``'s manifest (opened in a subprocess: its own token)."""
    code = ("import sys; from pathlib import Path; from encfs.keys.service import KeyService; "
            "from encfs.block.export import read_manifest; "
            "ks = KeyService.open(); print(read_manifest(Path(sys.argv[1]), ks, sys.argv[2]).chunks[int(sys.argv[3])])")
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, "-c", code, str(out), sid, str(chunk)], env=env, capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode().strip()


# -- what fsck cannot check: one line, exit 8 ---------------------------------------------------

def test_bad_targets_are_one_line_and_exit_8(fs_home: Path, tmp_path: Path, fs: tuple[Path, Path]) -> None:
    assert "no such file" in fails(tmp_path / "missing.img", fs_home)
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(300 * 1024))
    assert "not an encfs volume image, snapshot export or CIPHERDIR" in fails(junk, fs_home)
    p = run_encfs("fsck", str(fs[0]), home=fs_home)  # a CIPHERDIR is checked (tests/test_fsck_fs.py)
    assert p.returncode == 0 and b"filesystem" in p.stdout and b"clean (exit 0)" in p.stdout, p.stdout
    image = create(fs_home, tmp_path / "vol.img")
    for copy in (0, 1):  # both header copies gone: damage, but nothing can be checked
        flip(image, header_offset(copy) + 100)
    code, report = fsck(image, fs_home)
    assert code == 4 and found(report) == {("header",)}


def test_a_wrong_pin_or_a_disabled_key_is_one_line_and_exit_8(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_encfs("hsm", "init", home=home).returncode == 0
    assert run_encfs("key", "create", "--alias", "fs", home=home).returncode == 0
    image = create(home, tmp_path / "vol.img")
    assert run_encfs("key", "disable", "fs", home=home).returncode == 0
    assert "disabled" in fails(image, home).lower()
    assert run_encfs("key", "enable", "fs", home=home).returncode == 0
    pin = home / "softhsm" / "user.pin"
    good = pin.read_text()
    pin.write_text("not-the-pin")
    assert "wrong PIN" in fails(image, home)
    pin.write_text(good)
    assert fsck(image, home)[0] == 0


@needs_loop_devices[0]
@needs_loop_devices[1]
def test_an_attached_volume_is_refused_in_one_line(rig: Rig) -> None:  # noqa: F811
    image = rig.create(size="16M")
    loop = rig.attach(image)
    p = rig.encfs("fsck", image)
    assert p.returncode == 8 and p.stderr.strip() == f"encfs: {image} is attached at {loop}: detach it first " \
                                                      f"(`encfs volume detach {loop}`)", p.stderr
    p = rig.encfs("fsck", loop)
    assert p.returncode == 8 and p.stderr.strip() == f"encfs: {loop} is the attached volume {image}: detach it " \
                                                      f"first (`encfs volume detach {loop}`), then check {image}"
    rig.detach(image)
    assert rig.encfs("fsck", image).returncode == 0
    assert "not an attached encfs volume" in rig.fails("fsck", loop)


def test_the_progress_bar_is_on_stderr_and_only_when_asked_for(fs_home: Path, tmp_path: Path) -> None:
    image = create(fs_home, tmp_path / "vol.img")
    volume_tool.write(image, fs_home, {0: os.urandom(4 * MiB)}, tmp_path)
    p = run_encfs("fsck", str(image), "--json", home=fs_home, env={"ENCFS_PROGRESS": "1"})
    assert p.returncode == 0 and json.loads(p.stdout)["Damage"] == [] and b"fsck vol.img" in p.stderr
    p = run_encfs("fsck", str(image), home=fs_home)  # stderr is no terminal here: no bar
    assert p.returncode == 0 and p.stderr == b""
