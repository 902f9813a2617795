"""Many writers on one mount (issue #22 part 4): 8 processes create, write (random offsets and
sizes, small unaligned writes and large ones of whole blocks), truncate, rename and unlink
files of their own in two directories they all share, for a while, each checking what it reads
back against its own model (tests/churn_tool.py). Then every byte of every surviving file is
compared with its writer's model, through the mount and again after a remount (so the bytes
come from the backing files, not the page cache), and nothing else may be in the directories.

The daemon runs operations on different files side by side (server.py's locks), so a table that
they share without a lock, or a content reached outside its inode's lock, shows up here as a
wrong byte, a failed operation or a dead daemon. CI runs it for CI_SECONDS; the 60 s run is
marked slow (ENCFS_STRESS=1).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount

WRITERS = 8
CI_SECONDS, STRESS_SECONDS = 10, 60
TOOL = Path(__file__).with_name("churn_tool.py")
SECONDS = pytest.mark.parametrize("seconds", [
    pytest.param(CI_SECONDS, id="ci"),
    pytest.param(STRESS_SECONDS, id="stress", marks=[pytest.mark.slow, pytest.mark.skipif(
        os.environ.get("ENCFS_STRESS") != "1", reason="60 s run; set ENCFS_STRESS=1 to run it")])])


def _verify(mp: Path, models: Path) -> int:
    """Every file in the shared directories is some writer's, byte for byte; returns the count."""
    want = {}
    for model_dir in sorted(models.iterdir()):
        for f in model_dir.iterdir():
            want[f.name.replace("--", "/", 1)] = f
    have = sorted(f"{d}/{n}" for d in ("a", "b") for n in os.listdir(mp / d))
    assert have == sorted(want), "the directories hold other files than the writers' models"
    for name, model in want.items():
        got, expected = (mp / name).read_bytes(), model.read_bytes()
        assert len(got) == len(expected), f"{name}: {len(got)} bytes, {len(expected)} expected"
        assert got == expected, f"{name}: differs from its model at byte " \
            f"{next(i for i, (x, y) in enumerate(zip(got, expected)) if x != y)}"
    return len(want)


@SECONDS
def test_eight_writers_churning_one_directory(tmp_path: Path, fs_home: Path, seconds: int) -> None:
    cipher, mp, models = tmp_path / "cipher", tmp_path / "plain", tmp_path / "models"
    mp.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    seed = int(os.environ.get("ENCFS_CHURN_SEED", "0")) or random.randrange(1, 1 << 30)
    print(f"churn seed {seed} (ENCFS_CHURN_SEED={seed} replays the writers' choices)")
    log = tmp_path / "mount.log"  # this daemon's alone (Mount's default is shared by a home's mounts)
    with Mount(cipher, mp, fs_home, log=log) as m:
        (mp / "a").mkdir()
        (mp / "a" / "b").mkdir()
        os.rename(mp / "a" / "b", mp / "b")  # the two shared directories
        procs = [subprocess.Popen([sys.executable, str(TOOL), str(w), str(seed), str(seconds), str(mp / "a"),
                                   str(mp / "b"), str(models / f"w{w}")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for w in range(WRITERS)]
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=seconds + 240)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
        print("".join(outputs))
        failed = [out for p, out in zip(procs, outputs) if p.returncode != 0]
        assert not failed, f"{len(failed)} writers failed; first: {failed[0][-2000:]}"
        assert m.proc.poll() is None, "the daemon died"
        count = _verify(mp, models)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "failed" not in text, text[-3000:]
    with Mount(cipher, mp, fs_home, log=log):  # from the backing files now
        assert _verify(mp, models) == count
