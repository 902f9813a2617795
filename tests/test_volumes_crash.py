"""kill -9 of a volume's daemon under load, through the real CLI and real loop devices: an ext4
writer keeps every file it fsync'd and e2fsck finds the filesystem clean; raw O_DIRECT writes leave
every sector whole, holding a generation it may hold. Re-attached after each crash by attach, by
detach then attach, or by hand. ENCFS_STRESS=1 runs the long versions.

The ``Rig`` (tests/volume_helpers.py) undoes whatever a test set up, also when it fails.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from volume_helpers import (
    PATTERN,
    STRESS,
    WRITE_FILES,
    MiB,
    Rig,
    dd_read,
    dd_write,
    mounted_at,
    pattern,
    patterns,
    pytestmark,  # noqa: F401 - root, /dev/fuse, loop devices, the tools
    read_ok,
    rig,
    sh,
    shas,
    write_files,
)

__all__ = ["rig"]  # the fixture, used by name

# Passes over sectors [0, N) of DEV with O_DIRECT, generation after generation (starting at
# FIRST_GEN), writing runs of 1-16 sectors; after every fsync it appends "gen upto" to LOG:
# sectors [0, upto) of gen and all of gen - 1 are durable.
RAW_WRITER = PATTERN + r"""
import mmap, os, random, sys
dev, n, first_gen, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
buf = mmap.mmap(-1, 16 * 4096)
rng = random.Random()
gen = first_gen
while True:
    s = 0
    runs = 0
    while s < n:
        k = min(rng.randint(1, 16), n - s)
        buf[:k * 4096] = b"".join(pattern(x, gen) for x in range(s, s + k))
        os.pwrite(fd, memoryview(buf)[:k * 4096], s * 4096)
        s += k
        runs += 1
        if runs % 8 == 0 or s == n:
            os.fsync(fd)
            os.write(logfd, f"{gen} {s}\n".encode())
    gen += 1
"""


# -- kill -9 under ext4 and under raw writes -------------------------------------------------------


def _after_crash_reattach(rig: Rig, image: Path, old_loop: str, mnt: Path | None, how: str) -> str:
    """The daemon was killed: loop I/O fails; unmount, then re-attach (via ``how``)."""
    r = dd_read(old_loop, 0, 4096, timeout=30)
    assert r.returncode != 0, "a loop device over a dead FUSE daemon must not return data"
    [row] = rig.listed()
    assert row["State"] == "dead"
    assert rig.info(image)["Attached"] is None
    if mnt is not None and mounted_at(mnt):
        rig.umount(mnt, lazy_fallback=True)
    if how == "detach":
        rig.detach(old_loop)  # detach copes with a dead daemon
        rig.assert_nothing_attached()
    elif how == "manual":
        sh("losetup", "-d", old_loop)
        for mp in rig.fuse_mounts():
            sh("umount", "-l", mp)
    # how == "attach": attach itself cleans up the dead daemon's loop device, mount and entry
    loop = rig.attach(image)
    assert len(rig.entries()) == 1 and rig.entries()[0]["loop"] == loop
    assert len(rig.fuse_mounts()) == 1
    assert [name for name, _ in rig.loops()] == [loop]
    return loop


def _crash_ext4(rig: Rig, rounds: int) -> None:
    image = rig.create(size="128M")
    loop = rig.attach(image)
    rig.mkfs(loop)
    mnt = rig.mount(loop)
    log = rig.tmp / "fsynced.log"
    hows = ["attach", "detach", "manual"]
    rng = random.Random(1234)
    for rnd in range(rounds):
        write_files(mnt, f"r{rnd}-pre-", 3, 300_000, log)
        writer = subprocess.Popen([sys.executable, "-c", WRITE_FILES, str(mnt), f"r{rnd}-w-", "-1",
                                   str(rng.choice([64 * 1024, 400_000, 2 * MiB])), str(log)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            start = len(log.read_text().splitlines())
            while len(log.read_text().splitlines()) < start + 2 and time.monotonic() < deadline:
                assert writer.poll() is None, "the writer died before the crash"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            assert writer.poll() is None, "the writer must still be running at the crash"
            rig.kill_daemon(loop)
        finally:
            writer.kill()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the writer is stuck after the daemon was killed")
        loop = _after_crash_reattach(rig, image, loop, mnt, hows[rnd % len(hows)])
        # As after a power cut on a real disk: mounting replays the journal, and then
        # e2fsck -f must find the filesystem clean (no repairs needed).
        rig.umount(rig.mount(loop))
        rig.fsck_clean(loop)
        mnt = rig.mount(loop)
        expected = dict(line.split() for line in log.read_text().splitlines())
        assert len(expected) >= 3 * (rnd + 1) + 2
        assert shas(mnt, sorted(expected)) == expected
        # keep the filesystem from filling up over many rounds: drop this round's writer files
        for name in [n for n in expected if n.startswith(f"r{rnd}-w-")]:
            (mnt / name).unlink()
            del expected[name]
        log.write_text("".join(f"{n} {h}\n" for n, h in expected.items()))
    rig.umount(mnt)
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_kill_9_daemon_under_ext4_writer_keeps_fsynced_files(rig: Rig) -> None:
    _crash_ext4(rig, rounds=3)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="long crash loop; set ENCFS_STRESS=1 to run it "
                                       "(test_kill_9_daemon_under_ext4_writer_keeps_fsynced_files is the bounded version)")
def test_kill_9_daemon_under_ext4_writer_stress(rig: Rig) -> None:
    _crash_ext4(rig, rounds=25)


def _raw_log(log: Path) -> tuple[int, int]:
    lines = log.read_text().split("\n")
    complete = [line for line in lines[:-1] if line]  # the last element is "" or a torn line
    gen, upto = map(int, complete[-1].split())
    return gen, upto


def _allowed_generations(gen: int, upto: int, first_gen: int, n: int, before: list[int]) -> list[set[int]]:
    """What each sector may hold after a crash, given the writer's last log line "gen upto".

    Pass ``gen`` is durable below ``upto``; earlier passes of this round are durable everywhere.
    A sector the writer may have rewritten without an fsync may hold either generation, nothing
    else (``before`` is what the sectors held when the round started).
    """
    out = []
    for s in range(n):
        if upto == n:
            out.append({gen, gen + 1})  # pass gen is complete; pass gen + 1 may have begun
        elif s < upto:
            out.append({gen})
        elif gen > first_gen:
            out.append({gen - 1, gen})
        else:
            out.append({before[s], gen})
    return out


def _crash_raw(rig: Rig, rounds: int) -> None:
    image = rig.create()
    loop = rig.attach(image)
    n = 4096  # 16 MiB of 4 KiB sectors
    dd_write(loop, 0, patterns(0, n, 0), rig.tmp)
    held = [0] * n  # the generation each sector holds (known exactly after each round's check)
    rng = random.Random(99)
    first_gen = 1
    for rnd in range(rounds):
        log = rig.tmp / f"raw-{rnd}.log"
        writer = subprocess.Popen([sys.executable, "-c", RAW_WRITER, loop, str(n), str(first_gen), str(log)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while (not log.exists() or log.read_text().count("\n") < 3) and time.monotonic() < deadline:
                assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            assert writer.poll() is None, "the writer must still be running at the crash"
            rig.kill_daemon(loop)
        finally:
            writer.kill()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the raw writer is stuck after the daemon was killed")
        gen, upto = _raw_log(log)
        allowed = _allowed_generations(gen, upto, first_gen, n, held)
        loop = _after_crash_reattach(rig, image, loop, None, ["attach", "detach"][rnd % 2])
        data = read_ok(loop, 0, n * 4096)  # never an I/O error
        for s in range(n):
            chunk = data[s * 4096:(s + 1) * 4096]
            assert chunk[:8] == b"ENCFSPAT", f"sector {s} holds no pattern at all"
            sector, g = int.from_bytes(chunk[8:16], "big"), int.from_bytes(chunk[16:24], "big")
            assert sector == s, f"sector {s} holds sector {sector}'s data"
            assert chunk == pattern(s, g), f"sector {s} is torn"
            assert g in allowed[s], (f"sector {s} holds generation {g}, not one of {sorted(allowed[s])} "
                                     f"(writer log: pass {gen} fsync'd up to sector {upto})")
            held[s] = g
        first_gen = gen + 2
    rig.detach(loop)


def test_kill_9_daemon_during_raw_o_direct_writes(rig: Rig) -> None:
    _crash_raw(rig, rounds=3)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="long crash loop; set ENCFS_STRESS=1 to run it "
                                       "(test_kill_9_daemon_during_raw_o_direct_writes is the bounded version)")
def test_kill_9_daemon_during_raw_o_direct_writes_stress(rig: Rig) -> None:
    _crash_raw(rig, rounds=30)
