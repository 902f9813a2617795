"""`encfs snapshot restore` (as copy and import, which build a new volume the same way) run twice
at once to the same NEWIMG, through the real CLI: the run that owns NEWIMG.restore.tmp makes the
volume, the other is refused in one line (exit 75, busy) and touches nothing; a temporary left by a
killed run does not block the next one. Real token, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_snapshots import contents, ok, snap, volume  # noqa: F401  (volume: the fixture)
from volume_tool import write

MiB = 1 << 20

# `encfs ARGS` whose restore, once its new volume exists, writes READY and waits for GO (files
# named by the first two arguments) before it copies a sector: a run caught in the middle.
PAUSED = r"""
import os, sys, time
from encfs.block import snapcli
from encfs.cli import main

ready, go, sys.argv = sys.argv[1], sys.argv[2], ["encfs", *sys.argv[3:]]
copier = snapcli._copier

def paused(src, what):
    fill = copier(src, what)
    def run(vol):
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
        return fill(vol)
    return run

snapcli._copier = paused
raise SystemExit(main())
"""


def env(home: Path) -> dict[str, str]:
    e = dict(os.environ, ENCFS_HOME=str(home))
    e.pop("SOFTHSM2_CONF", None)
    return e


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1].decode()
        time.sleep(0.01)


def paused_restore(home: Path, tmp_path: Path, sid: str, new: Path) -> subprocess.Popen[bytes]:
    """A restore of ``sid`` to ``new`` that holds its temporary, waiting for tmp_path/go."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, str(tmp_path / "ready"), str(tmp_path / "go"),
                             "snapshot", "restore", sid, str(new)], env=env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(tmp_path / "ready", proc)
    return proc


def refused_busy(home: Path, *args: str | Path) -> str:
    p = subprocess.run([sys.executable, "-m", "encfs", *map(str, args)], env=env(home), capture_output=True,
                       timeout=120, check=False)
    err = p.stderr.decode()
    assert p.returncode == 75 and err.count("\n") == 1 and err.startswith("encfs: "), (p.returncode, err)
    assert "Traceback" not in err
    return err


@pytest.fixture
def snapshot(volume: Path, fs_home: Path, tmp_path: Path) -> tuple[str, bytes]:  # noqa: F811
    write(volume, fs_home, {0: os.urandom(8 * MiB), 20 * MiB + 5: os.urandom(MiB)}, tmp_path)
    data = contents(volume, fs_home)
    return snap(volume, fs_home), data


def test_a_second_restore_to_the_same_newimg_is_refused_while_the_first_runs(
        fs_home: Path, tmp_path: Path, snapshot: tuple[str, bytes]) -> None:
    sid, data = snapshot
    new = tmp_path / "new.img"
    first = paused_restore(fs_home, tmp_path, sid, new)
    try:
        line = refused_busy(fs_home, "snapshot", "restore", sid, new)
        assert "being made by another encfs run" in line, line
        assert not new.exists() and (tmp_path / "new.img.restore.tmp").exists()  # the first's, untouched
    finally:
        (tmp_path / "go").touch()
        _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode()
    assert contents(new, fs_home) == data and not (tmp_path / "new.img.restore.tmp").exists()


def test_a_temporary_left_by_a_killed_restore_is_taken_over(
        fs_home: Path, tmp_path: Path, snapshot: tuple[str, bytes]) -> None:
    """Its lock died with it: the next run makes the volume in its place (as cryptsetup's lock and
    an AWS CLI download's temporary file go with a killed run) and says nothing of it."""
    sid, data = snapshot
    new = tmp_path / "new.img"
    killed = paused_restore(fs_home, tmp_path, sid, new)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert (tmp_path / "new.img.restore.tmp").exists() and not new.exists()
    ok("snapshot", "restore", sid, new, home=fs_home)
    assert contents(new, fs_home) == data and not (tmp_path / "new.img.restore.tmp").exists()


def test_two_restores_started_together_make_one_whole_volume(
        fs_home: Path, tmp_path: Path, snapshot: tuple[str, bytes]) -> None:
    """No pause: whichever claims the temporary first makes the volume; the other is refused in one
    line (busy while the first runs, or "already exists" after it), never reports a success."""
    sid, data = snapshot
    for round_no in range(3):
        new = tmp_path / f"new{round_no}.img"
        procs = [subprocess.Popen([sys.executable, "-m", "encfs", "snapshot", "restore", sid, str(new)],
                                  env=env(fs_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        results = [(p.wait(timeout=120), p.communicate()[1].decode()) for p in procs]
        assert sorted(code for code, _err in results) in ([0, 1], [0, 75]), results
        for code, err in results:
            assert code == 0 or (err.count("\n") == 1 and ("being made" in err or "already exists" in err)), err
        assert contents(new, fs_home) == data and not Path(f"{new}.restore.tmp").exists()


def test_a_temporary_that_is_another_name_of_a_volume_is_not_truncated(
        fs_home: Path, tmp_path: Path, snapshot: tuple[str, bytes]) -> None:
    """A kill between the link and the unlink of the fallback rename (no RENAME_NOREPLACE) leaves
    NEWIMG.restore.tmp as a second name of the finished volume: a later run to that NEWIMG (the
    volume renamed away meanwhile) drops that name and makes its own file, never empties the volume."""
    sid, data = snapshot
    kept = tmp_path / "kept.img"
    ok("snapshot", "restore", sid, kept, home=fs_home)
    new = tmp_path / "new.img"
    os.link(kept, tmp_path / "new.img.restore.tmp")
    ok("snapshot", "restore", sid, new, home=fs_home)
    assert contents(kept, fs_home) == data and contents(new, fs_home) == data
    assert os.stat(kept).st_nlink == 1 and not (tmp_path / "new.img.restore.tmp").exists()
