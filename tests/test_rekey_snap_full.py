"""`encfs rekey --full VOL` of a format-2 volume with snapshots (issue #21), through the real CLI:
the copy holds every snapshot (same ids, descriptions, creation times, sizes and contents) and
the live contents under a fresh volume key, shares what the original shares, and survives a
kill -9 at random moments (the same command again finishes it). ENCFS_STRESS=1 runs more kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from rekey_kills import kill_and_rerun
from test_rekey_rewrap import fails, home, key_id, ok  # noqa: F401  (the fixture)
from volume_tool import _run, digests, make_snapshots, run, write

from encfs.block.rekey import tmp_path as copy_of
from encfs.block.volume import read_volume_header

MiB = 1 << 20
STRESS = bool(os.environ.get("ENCFS_STRESS"))
KILLS_WANTED = 10 if STRESS else 3  # rounds whose kill left the re-key unfinished


def snapshot_rows(home: Path, image: Path) -> list[tuple[Any, ...]]:
    """(id, creation time, description, size) of each snapshot in the image's table, oldest first."""
    return [(r["id"], r["created"], r["description"], r["size"]) for r in run(home, "snapshots", image)]


def wrapped_key(image: Path) -> bytes:
    return read_volume_header(image)[0].wrapped_key


def info(home: Path, image: Path) -> dict[str, Any]:
    return json.loads(ok(home, "volume", "info", image, "--json"))


def history(home: Path, image: Path, scratch: Path) -> None:
    """Three snapshots with descriptions, one taken before a grow, one after a discard; then live
    changes."""
    ok(home, "volume", "create", image, "--size", "16M", "--key", "a")
    write(image, home, {0: os.urandom(3 * MiB), 10 * MiB: os.urandom(MiB)}, scratch)
    ok(home, "snapshot", "create", image, "--description", "first")
    write(image, home, {MiB + 5: os.urandom(MiB // 2)}, scratch)
    _run(home, "discard", image, str(10 * MiB), str(MiB))  # the next snapshot no longer maps them
    ok(home, "snapshot", "create", image, "--description", "second, after a discard")
    ok(home, "volume", "resize", image, "--size", "24M")
    write(image, home, {20 * MiB: os.urandom(MiB)}, scratch)
    ok(home, "snapshot", "create", image, "--description", "third, grown")
    write(image, home, {0: os.urandom(4096)}, scratch)
    _run(home, "discard", image, str(20 * MiB), str(64 * 1024))


def test_full_keeps_every_snapshot_under_a_fresh_key_and_the_old_cmk_can_go(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    history(home, image, tmp_path)
    before, rows, size = digests(image, home), snapshot_rows(home, image), os.path.getsize(image)
    assert len(rows) == 3 and len(set(before["snapshots"].values())) == 3 and rows[0][3] != rows[2][3]
    old, old_key = info(home, image), wrapped_key(image)
    assert "every snapshot" in ok(home, "rekey", image, "--full", "--key", "b", "--dry-run")
    assert digests(image, home) == before and info(home, image) == old
    out = json.loads(ok(home, "rekey", image, "--full", "--key", "b", "--json"))
    assert out["Snapshots"] == [r[0] for r in rows] and not out["Resumed"]
    new = info(home, image)
    assert out["VolumeId"] == new["VolumeId"] != old["VolumeId"]  # a fresh volume and data key
    assert out["KeyId"] == key_id(home, "b") == new["KeyId"] and wrapped_key(image) != old_key
    assert not copy_of(image).exists()
    assert snapshot_rows(home, image) == rows  # ids, creation times, descriptions, sizes
    assert digests(image, home) == before  # the live volume and every snapshot, byte for byte
    assert os.path.getsize(image) <= 1.1 * size
    ok(home, "key", "disable", "a")
    assert digests(image, home) == before
    catalog = json.loads((home / "snapshots.json").read_text())
    assert all(catalog[r[0]]["volume_id"] == new["VolumeId"] for r in rows)  # the index names the copy
    ok(home, "snapshot", "delete", rows[1][0])  # by its id alone
    assert [r[0] for r in snapshot_rows(home, image)] == [rows[0][0], rows[2][0]]


def test_volume_rekey_keeps_the_snapshots_too(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    history(home, image, tmp_path)
    before, rows = digests(image, home), snapshot_rows(home, image)
    assert "re-keyed as volume" in ok(home, "volume", "rekey", image, "--key", "b")
    assert snapshot_rows(home, image) == rows and digests(image, home) == before
    vid = info(home, image)["VolumeId"]
    catalog = json.loads((home / "snapshots.json").read_text())
    assert all(catalog[r[0]]["volume_id"] == vid for r in rows)


def test_a_copy_of_snapshots_sharing_most_pages_is_about_the_original_size(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "64M", "--key", "a")
    write(image, home, {0: os.urandom(24 * MiB)}, tmp_path)
    made = make_snapshots(image, home, 6)  # each changes up to 768 KiB, then is taken
    size = os.path.getsize(image)
    ok(home, "rekey", image, "--full")
    after = os.path.getsize(image)
    assert after <= 1.1 * size, (after, size)  # seven copies of 24 MiB would be 168 MiB
    assert digests(image, home) == made


_DIES = textwrap.dedent("""
    # `encfs rekey --full` that dies as a kill -9 would (os._exit: no cleanup) in copy step N,
    # after writing half of that step's chunks.
    import os, sys
    import encfs.block.rekey as rekey
    from encfs.cli import main
    step, real = int(os.environ["DIE_IN_STEP"]), rekey.copy_sectors
    calls = []
    def copy_sectors(read, runs, new, total, desc, failed):
        calls.append(desc)
        if len(calls) < step:
            return real(read, runs, new, total, desc, failed)
        runs = list(runs)
        real(read, runs[:len(runs) // 2], new, total, desc, failed)
        os._exit(137)
    rekey.copy_sectors = copy_sectors
    sys.argv = ["encfs", *sys.argv[1:]]
    raise SystemExit(main())
""")


def die_in_step(home: Path, step: int, *args: str | Path) -> None:
    env = dict(os.environ, ENCFS_HOME=str(home), DIE_IN_STEP=str(step))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, "-c", _DIES, *map(str, args)], env=env, capture_output=True, timeout=120)
    assert p.returncode == 137, p.stderr.decode()


def test_a_run_killed_after_some_snapshots_is_carried_on_and_one_killed_before_them_starts_again(
        home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    history(home, image, tmp_path)
    before, rows = digests(image, home), snapshot_rows(home, image)
    die_in_step(home, 3, "rekey", image, "--full", "--key", "b")  # two snapshots taken, the third cut
    assert copy_of(image).exists() and digests(image, home) == before  # the original is untouched
    out = json.loads(ok(home, "rekey", image, "--full", "--key", "b", "--json"))
    assert out["Resumed"] and not copy_of(image).exists()
    assert snapshot_rows(home, image) == rows and digests(image, home) == before
    die_in_step(home, 1, "rekey", image, "--full", "--key", "a")  # cut in the first snapshot's step
    out = json.loads(ok(home, "rekey", image, "--full", "--key", "a", "--json"))
    assert not out["Resumed"] and snapshot_rows(home, image) == rows and digests(image, home) == before
    die_in_step(home, 4, "rekey", image, "--full", "--key", "a")  # every snapshot taken, the live step cut
    out = json.loads(ok(home, "rekey", image, "--full", "--key", "b", "--json"))  # another CMK: start again
    assert not out["Resumed"] and out["KeyId"] == key_id(home, "b")
    assert snapshot_rows(home, image) == rows and digests(image, home) == before


def test_a_run_carried_on_after_the_original_changed_copies_it_as_it_is_now(home: Path, tmp_path: Path) -> None:
    """Cut in the live step, then the original rolled back to its newest snapshot: the next run
    carries the copy on, and must not keep what the cut run copied of the live contents before."""
    image = tmp_path / "vol.img"
    history(home, image, tmp_path)
    die_in_step(home, 4, "rekey", image, "--full", "--key", "b")  # every snapshot taken, the live step cut
    newest = snapshot_rows(home, image)[-1][0]
    ok(home, "snapshot", "rollback", image, newest)
    before, rows = digests(image, home), snapshot_rows(home, image)
    out = json.loads(ok(home, "rekey", image, "--full", "--key", "b", "--json"))
    assert out["Resumed"]
    assert snapshot_rows(home, image) == rows and digests(image, home) == before


def test_full_killed_at_random_moments_is_finished_by_running_it_again(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    ok(home, "volume", "create", image, "--size", "64M", "--key", "a")
    write(image, home, {0: os.urandom(32 * MiB)}, tmp_path)
    for i in range(3):
        ok(home, "snapshot", "create", image, "--description", f"step {i}")
        write(image, home, {(4 + 9 * i) * MiB: os.urandom(6 * MiB)}, tmp_path)
    before, rows = digests(image, home), snapshot_rows(home, image)
    tmp = copy_of(image)
    resumed = 0

    def after_kill(dest: str) -> None:
        assert digests(image, home) == before  # the original stays whole until the rename

    def after_rerun(dest: str) -> None:
        nonlocal resumed
        out = json.loads(ok(home, "rekey", image, "--full", "--key", dest, "--json"))
        resumed += out["Resumed"]
        assert out["KeyId"] == key_id(home, dest) and not tmp.exists()
        assert snapshot_rows(home, image) == rows and digests(image, home) == before

    round_no, dest = kill_and_rerun(image, home, KILLS_WANTED, tmp.exists, after_kill, after_rerun)
    ok(home, "key", "disable", "b" if dest == "a" else "a")
    assert digests(image, home) == before
    print(f"{KILLS_WANTED} of {round_no} kills interrupted a re-key; {resumed} re-runs carried a copy on")
