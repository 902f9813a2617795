"""kill -9 during `encfs snapshot delete`: running the same command again completes.

Random delays rarely hit the short windows of a deletion, so a CLI that SIGKILLs itself at a
chosen point (a monkeypatched encfs in a subprocess) is killed there: right after the commit,
before the freed pages are given back, and right after the catalog has forgotten the snapshot;
and the temporary catalog a run killed while writing it leaves is swept by the next. The
image is examined with volume_tool.py (encfs's own reads, in a subprocess).
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

from encfs.block.header import COW_FORMAT

MiB = 1 << 20
SIZE = 16 * MiB


class Lab:
    """A detached image, the CLI in subprocesses, and the contents each state should have."""

    def __init__(self, tmp: Path, home: Path) -> None:
        self.tmp, self.home = tmp, home
        self.image = tmp / "vol.img"  # the home is in tmp too: no_tmp_left() looks at both
        self.env = dict(os.environ, ENCFS_HOME=str(home), ENCFS_RUN_DIR=str(tmp / "run"))
        self.env.pop("SOFTHSM2_CONF", None)
        self.scratch = tmp / "scratch"
        self.scratch.mkdir()

    def cmd(self, *args: str | Path) -> list[str]:
        return [sys.executable, "-m", "encfs", *map(str, args)]

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.cmd(*args), env=self.env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in p.stderr, p.stderr
        return p

    def ok(self, *args: str | Path) -> str:
        p = self.run(*args)
        assert p.returncode == 0, f"encfs {' '.join(map(str, args))}: {p.stderr.strip()}"
        return p.stdout

    # the image as its key holder sees it (volume_tool.py, in a subprocess)
    def write(self, chunks: dict[int, bytes], image: Path | None = None) -> dict[str, Any]:
        """Write and flush ``chunks``; digests of the live contents after it and of the snapshots."""
        return volume_tool.write(image or self.image, self.home, chunks, self.scratch)

    def digests(self, image: Path | None = None) -> dict[str, Any]:
        return volume_tool.digests(image or self.image, self.home)

    def no_tmp_left(self) -> None:
        left = [p.name for p in self.tmp.iterdir() if ".tmp" in p.name]
        left += [p.name for p in self.home.iterdir() if ".tmp" in p.name]
        assert left == [], f"left behind: {left}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home of its own (token, catalog, audit log) with a CMK aliased 'fs'."""
    home = tmp_path / "home"
    p = run_encfs("key", "create", "--alias", "fs", home=home)
    assert p.returncode == 0, p.stderr.decode()
    return home


# -- kills at chosen points of a deletion ------------------------------------------------------

# Runs `encfs ARGS` with SIGKILL sent to itself at POINT: "forgotten", right after the deletion
# has been committed and the catalog has forgotten the snapshot (so only the exit was left);
# "committed", right after the commit, before the freed pages are given back (punched).
KILLED_AT = r"""
import os, signal, sys
from encfs.block import snapshots
from encfs.block.cow import CowStore
from encfs.cli import main

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point, sys.argv = sys.argv[1], ["encfs", *sys.argv[2:]]
if point == "forgotten":
    remember = snapshots.remember
    def forgotten(home, image, volume_id, ids, forget=()):
        remember(home, image, volume_id, ids, forget)
        if forget:
            die()
    snapshots.remember = forgotten
else:
    rebuild = CowStore._rebuild
    def committed(self, pages, punch):
        if punch:
            die()
        rebuild(self, pages, punch)
    CowStore._rebuild = committed
raise SystemExit(main())
"""


@pytest.mark.parametrize(("point", "ref"), [("forgotten", "{sid}"), ("committed", "{image}@{sid}")])
def test_a_delete_killed_after_its_commit_completes_when_run_again(tmp_path: Path, home: Path, point: str,
                                                                   ref: str) -> None:
    lab = Lab(tmp_path, home)
    lab.ok("volume", "create", lab.image, "--size", str(SIZE), "--key", "fs")
    kept = lab.write({12 * MiB: os.urandom(64 * 1024)})["live"]
    keep = json.loads(lab.ok("snapshot", "create", lab.image, "--json"))["SnapshotId"]
    lab.write({0: os.urandom(8 * MiB)})
    sid = json.loads(lab.ok("snapshot", "create", lab.image, "--json"))["SnapshotId"]
    live = lab.write({0: os.urandom(8 * MiB)})["live"]  # the snapshot alone holds 8 MiB now
    held = os.stat(lab.image).st_blocks * 512
    args = ("snapshot", "delete", ref.format(sid=sid, image=lab.image))
    p = subprocess.run([sys.executable, "-c", KILLED_AT, point, *args], env=lab.env, capture_output=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    after = {"live": live, "format": COW_FORMAT, "snapshots": {keep: kept}}
    assert lab.digests() == after  # the deletion is committed
    assert lab.ok(*args).strip() == f"{sid} deleted"
    assert lab.digests() == after
    lab.no_tmp_left()
    freed = held - os.stat(lab.image).st_blocks * 512
    assert freed > 7 * MiB, f"the rerun gave back {freed} bytes of the 8 MiB only the snapshot held"
    assert lab.ok(*args).strip() == f"{sid} deleted"  # and says so whenever asked again
    assert "no snapshot" in lab.run("snapshot", "info", sid).stderr


def test_delete_refuses_an_id_the_volume_never_had_and_completes_one_it_had(tmp_path: Path, home: Path) -> None:
    lab = Lab(tmp_path, home)
    lab.ok("volume", "create", lab.image, "--size", str(SIZE), "--key", "fs")
    bogus = f"snap-{os.urandom(8).hex()}"
    for _ in range(2):  # and again: the refused run catalogued nothing
        p = lab.run("snapshot", "delete", f"{lab.image}@{bogus}")
        assert p.returncode != 0 and p.stderr == f"encfs: {lab.image} has no snapshot {bogus}\n", p.stderr
    assert "not known on this machine" in lab.run("snapshot", "info", bogus).stderr
    # a snapshot this machine never catalogued (the catalog is lost, or it was made elsewhere),
    # deleted by VOL@ID by a run killed after the commit: the rerun completes
    sid = json.loads(lab.ok("snapshot", "create", lab.image, "--json"))["SnapshotId"]
    (home / "snapshots.json").unlink()
    args = ("snapshot", "delete", f"{lab.image}@{sid}")
    p = subprocess.run([sys.executable, "-c", KILLED_AT, "committed", *args], env=lab.env, capture_output=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    assert lab.digests()["snapshots"] == {}
    assert lab.ok(*args).strip() == f"{sid} deleted"


def test_a_catalog_left_half_written_by_a_killed_run_is_swept(tmp_path: Path, home: Path) -> None:
    lab = Lab(tmp_path, home)
    lab.ok("volume", "create", lab.image, "--size", str(SIZE), "--key", "fs")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = home / f"snapshots.json.tmp.{int(gone.stdout)}"  # as write_atomic names it; its writer is dead
    dead.write_text('{"snap-')
    live = home / f"snapshots.json.tmp.{os.getpid()}"  # a live writer's: not ours to remove
    live.write_text("{}")
    lab.ok("snapshot", "create", lab.image)
    assert not dead.exists() and live.exists()
    live.unlink()
    lab.no_tmp_left()
