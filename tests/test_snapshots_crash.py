"""kill -9 during `encfs snapshot create`, `encfs snapshot delete` and `encfs volume upgrade`.

Each command runs as a real CLI subprocess on a detached image and is killed with SIGKILL after a
random delay drawn over the whole of its measured run time (start-up included: most kills land
there, some in the commit). Afterwards nothing is lost: the live contents are what was written and
flushed before, every snapshot the image lists holds the contents of the moment it was taken, and
running the same command again completes (exit 0; delete says "deleted" even when the killed run
had committed; upgrade leaves format 2 with the same contents) and leaves no ``*.tmp`` behind.

CI runs a bounded number of rounds; ENCFS_STRESS=1 runs many more (marked slow). The seed of
each run is printed, so that a failure can be replayed with ENCFS_CRASH_SEED.

Random delays rarely hit the short windows of a deletion, so a CLI that SIGKILLs itself at a
chosen point (a monkeypatched encfs in a subprocess) covers them too: right after the commit,
before the freed pages are given back, and right after the catalog has forgotten the snapshot;
and the temporary catalog a run killed while writing it leaves is swept by the next. The
image is examined with volume_tool.py (encfs's own reads, in a subprocess).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import volume_tool
from conftest import init_home, run_encfs

from encfs.block.header import COW_FORMAT

STRESS = os.environ.get("ENCFS_STRESS") == "1"
MiB = 1 << 20
SIZE = 16 * MiB
CI_ROUNDS, STRESS_ROUNDS = 5, 60
# The CI run and, with ENCFS_STRESS=1, the long one (marked slow) of each crash loop below.
ROUNDS = pytest.mark.parametrize("rounds", [
    pytest.param(CI_ROUNDS, id="ci"),
    pytest.param(STRESS_ROUNDS, id="stress", marks=[pytest.mark.slow, pytest.mark.skipif(
        not STRESS, reason="long crash loop; set ENCFS_STRESS=1 to run it")])])


class Lab:
    """A detached image, the CLI in subprocesses, and the contents each state should have."""

    def __init__(self, tmp: Path, home: Path, rounds: int = 0) -> None:
        self.tmp, self.home, self.rounds = tmp, home, rounds
        self.image = tmp / "vol.img"  # the home is in tmp too: no_tmp_left() looks at both
        self.env = dict(os.environ, ENCFS_HOME=str(home), ENCFS_RUN_DIR=str(tmp / "run"))
        self.env.pop("SOFTHSM2_CONF", None)
        seed = int(os.environ.get("ENCFS_CRASH_SEED", "0")) or random.randrange(1, 1 << 30)
        print(f"crash seed {seed} (ENCFS_CRASH_SEED={seed} replays it)")
        self.rng = random.Random(seed)
        self.landed = {"killed": 0, "had exited": 0}  # how the kills fell
        self.outcomes: dict[str, int] = {}  # what the killed runs had done
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

    def timed(self, *args: str | Path) -> tuple[float, str]:
        start = time.monotonic()
        out = self.ok(*args)
        return time.monotonic() - start, out

    def killed(self, span: float, *args: str | Path) -> bool:
        """Run the command, SIGKILL it after a random delay in [0, span]; True if it was still running."""
        delay = self.rng.uniform(0, span)
        p = subprocess.Popen(self.cmd(*args), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        _out, err = p.communicate(timeout=60)
        if p.returncode == -signal.SIGKILL:
            self.landed["killed"] += 1
            return True
        assert p.returncode == 0, f"encfs {' '.join(map(str, args))} failed unkilled: {err.decode()}"
        self.landed["had exited"] += 1
        return False

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    # the image as its key holder sees it (volume_tool.py, in a subprocess)
    def write(self, chunks: dict[int, bytes], image: Path | None = None) -> dict[str, Any]:
        """Write and flush ``chunks``; digests of the live contents after it and of the snapshots."""
        return volume_tool.write(image or self.image, self.home, chunks, self.scratch)

    def digests(self, image: Path | None = None) -> dict[str, Any]:
        return volume_tool.digests(image or self.image, self.home)

    def random_chunks(self) -> dict[int, bytes]:
        return {self.rng.randrange(SIZE // 4096 - 256) * 4096 + self.rng.randrange(4096):
                os.urandom(self.rng.randrange(1, 256 * 1024)) for _ in range(3)}

    def no_tmp_left(self) -> None:
        left = [p.name for p in self.tmp.iterdir() if ".tmp" in p.name]
        left += [p.name for p in self.home.iterdir() if ".tmp" in p.name]
        assert left == [], f"left behind: {left}"

    def report(self, what: str) -> None:
        print(f"{what}: {self.rounds} rounds; runs {self.landed}; afterwards {self.outcomes}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home of its own (token, catalog, audit log) with a CMK aliased 'fs'."""
    home = init_home(tmp_path / "home")
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
else:  # "committed": the deletion's commit is durable; nothing is given back yet
    def committed(self):
        die()
    CowStore.punch_free = committed
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


# -- kills at random moments -------------------------------------------------------------------


def _restore(lab: Lab, want: dict[str, str], killed: set[str]) -> None:
    """`encfs snapshot list` shows exactly ``want``'s snapshots; `encfs snapshot restore` of each
    (in CI: of the first, the last and those the killed runs made) gives its contents. The image
    is checked for every snapshot in every round already (digests, read as restore reads)."""
    listed = json.loads(lab.ok("snapshot", "list", lab.image, "--json"))["Snapshots"]
    assert [s["SnapshotId"] for s in listed] == list(want)
    ids = list(want)
    for sid in ids if STRESS else [i for n, i in enumerate(ids) if n in (0, len(ids) - 1) or i in killed]:
        out = lab.tmp / f"restored-{sid}.img"
        lab.ok("snapshot", "restore", f"{lab.image}@{sid}", out)
        assert lab.digests(out)["live"] == want[sid], f"{sid} restores to other contents"
        out.unlink()


# -- snapshot create ---------------------------------------------------------------------------


def _crash_create(tmp: Path, home: Path, n: int) -> None:
    lab = Lab(tmp, home, n)
    lab.ok("volume", "create", lab.image, "--size", str(SIZE), "--key", "fs")
    state = lab.write(lab.random_chunks())["live"]
    want: dict[str, str] = {}  # snapshot id -> the contents it froze
    made_by_killed: set[str] = set()
    span, out = lab.timed("snapshot", "create", lab.image, "--json")
    want[json.loads(out)["SnapshotId"]] = state
    span *= 1.2
    for _ in range(n):
        now = lab.write(lab.random_chunks())
        assert now["snapshots"] == want, "a snapshot was lost or changed"
        state = now["live"]
        lab.killed(span, "snapshot", "create", lab.image, "--json", "--description", "killed")
        after = lab.digests()
        assert after["live"] == state, "the live contents changed"
        for sid, d in after["snapshots"].items():  # one the killed run committed froze this state
            if sid not in want:
                want[sid] = state
                made_by_killed.add(sid)
                lab.outcome("snapshot made")
            assert d == want[sid], f"snapshot {sid} holds other contents"
        assert list(after["snapshots"]) == list(want), "a snapshot was lost"
        again = json.loads(lab.ok("snapshot", "create", lab.image, "--json"))["SnapshotId"]
        assert again not in want
        want[again] = state
        lab.no_tmp_left()
    assert lab.digests()["snapshots"] == want
    _restore(lab, want, made_by_killed)
    lab.report("snapshot create")


@ROUNDS
def test_kill_9_during_snapshot_create(tmp_path: Path, home: Path, rounds: int) -> None:
    _crash_create(tmp_path, home, rounds)


# -- snapshot delete ---------------------------------------------------------------------------


def _crash_delete(tmp: Path, home: Path, n: int) -> None:
    lab = Lab(tmp, home, n)
    lab.ok("volume", "create", lab.image, "--size", str(SIZE), "--key", "fs")
    want = volume_tool.make_snapshots(lab.image, home, n + 3)["snapshots"]  # each of other contents
    assert len(set(want.values())) == n + 3
    lab.ok("snapshot", "list", lab.image)  # the catalog knows them now: they can be named by id
    live = lab.write(lab.random_chunks())["live"]
    victims = lab.rng.sample(list(want), n + 1)  # two are left at the end
    span, out = lab.timed("snapshot", "delete", victims[0])
    assert out.strip() == f"{victims[0]} deleted"
    del want[victims[0]]
    span *= 1.2
    for i, sid in enumerate(victims[1:]):
        ref = sid if i % 2 else f"{lab.image}@{sid}"  # by id (the catalog) and by VOL@ID
        lab.killed(span, "snapshot", "delete", ref)
        after = lab.digests()
        assert after["live"] == live, "the live contents changed"
        assert {k: v for k, v in after["snapshots"].items() if k != sid} == \
            {k: v for k, v in want.items() if k != sid}, "another snapshot was lost or changed"
        if sid in after["snapshots"]:
            assert after["snapshots"][sid] == want[sid]
        lab.outcome("still there" if sid in after["snapshots"] else "deleted")
        assert lab.ok("snapshot", "delete", ref).strip() == f"{sid} deleted"
        del want[sid]
        lab.no_tmp_left()
    assert lab.digests() == {"live": live, "format": COW_FORMAT, "snapshots": want}
    _restore(lab, want, set())
    lab.report("snapshot delete")


@ROUNDS
def test_kill_9_during_snapshot_delete(tmp_path: Path, home: Path, rounds: int) -> None:
    _crash_delete(tmp_path, home, rounds)


# -- volume upgrade ----------------------------------------------------------------------------


def _old_volume(lab: Lab, image: Path) -> str:
    lab.ok("volume", "create", image, "--size", str(SIZE), "--key", "fs", "--format", "1")
    state = lab.write({**lab.random_chunks(), 0: os.urandom(2 * MiB)}, image)
    assert state["format"] == 1
    return state["live"]


def _crash_upgrade(tmp: Path, home: Path, n: int) -> None:
    lab = Lab(tmp, home, n)
    first = tmp / "first.img"
    state = _old_volume(lab, first)
    span, _out = lab.timed("volume", "upgrade", first)
    assert lab.digests(first) == {"live": state, "format": COW_FORMAT, "snapshots": {}}
    span *= 1.2
    for i in range(n):
        image = tmp / f"old-{i}.img"
        state = _old_volume(lab, image)
        lab.killed(span, "volume", "upgrade", image)
        after = lab.digests(image)
        assert after["live"] == state, f"the contents changed (format {after['format']})"
        lab.outcome(f"format {after['format']}")
        out = lab.ok("volume", "upgrade", image)
        assert ("upgraded to format 2" in out) == (after["format"] == 1), out
        assert lab.digests(image) == {"live": state, "format": COW_FORMAT, "snapshots": {}}
        lab.no_tmp_left()
        image.unlink()
    lab.report("volume upgrade")


@ROUNDS
def test_kill_9_during_volume_upgrade(tmp_path: Path, home: Path, rounds: int) -> None:
    _crash_upgrade(tmp_path, home, rounds)
