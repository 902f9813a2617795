"""`encfs rekey --full` killed with -9 at random moments, then run again: the loop that the filesystem,
volume and export tests share (issue #21: "killed at 10 random points, resumed each time, every byte
verified"). Each test says what marks a run in progress and what to check after each kill and re-run.

The moments are calibrated on one whole run: from when the run's mark appears on disk to its end,
so that most kills land inside the copy however fast the machine is. ``killed_at`` kills a run at a
chosen point instead."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

Check = Callable[[str], None]  # given the destination CMK of the round


def _start(target: Path, dest: str, home: Path, marked: Callable[[], bool]) -> tuple[subprocess.Popen[bytes], float]:
    """`encfs rekey TARGET --full --key DEST`, and when ``marked()`` became true (bounded poll)."""
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    cmd = [sys.executable, "-m", "encfs", "rekey", str(target), "--full", "--key", dest]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while not marked() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return proc, time.monotonic()


def kill_and_rerun(target: Path, home: Path, wanted: int, marked: Callable[[], bool],
                   after_kill: Check, after_rerun: Check) -> tuple[int, str]:
    """Kill runs (alternating destination CMKs "b" and "a") until ``wanted`` kills interrupted one
    (``marked()`` after the kill); ``after_kill`` checks such a moment, ``after_rerun`` the state
    after the command ran again to the end. Returns (rounds, the last destination)."""
    proc, started = _start(target, "a", home, marked)  # a whole run: how long its mark lives
    assert proc.wait(timeout=300) == 0
    span = time.monotonic() - started
    rng = random.Random()
    interrupted = round_no = 0
    dest = "a"
    while interrupted < wanted:
        assert round_no < 5 * wanted, f"only {interrupted} of {round_no} kills interrupted a re-key"
        dest = "b" if round_no % 2 == 0 else "a"
        proc, started = _start(target, dest, home, marked)
        try:
            time.sleep(rng.uniform(0, 0.9 * span))
        finally:
            if proc.poll() is not None:  # it ended first: the calibration run was slower (a loaded
                span = min(span, time.monotonic() - started)  # machine); aim within this run's span
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        round_no += 1
        if marked():
            interrupted += 1
            after_kill(dest)
        after_rerun(dest)
    return round_no, dest


# Runs `encfs ARGS` and kills itself with SIGKILL at the NTH moment of POINT:
# "rekeyed": a file's re-key (rekeyfile.rekey) has returned, before anything after it;
# "copying": a re-keyed file's blocks and state are copied back, its new header not yet;
# "header": a re-wrap has written a file's new header in place (mid-batch), nothing after it.
KILLED_AT = r"""
import os, signal, sys
from encfs.cli import main
from encfs.fuse import rekeyfile, rewrap

point, nth, sys.argv = sys.argv[1], int(sys.argv[2]), ["encfs", *sys.argv[3:]]
calls = [0]

def after(fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return run

if point == "rekeyed":
    rekeyfile.rekey = after(rekeyfile.rekey)
elif point == "copying":
    rekeyfile._copy_state = after(rekeyfile._copy_state)
else:
    rewrap.pwrite_all = after(rewrap.pwrite_all)
raise SystemExit(main())
"""


def killed_at(home: Path, point: str, nth: int, *args: str | Path) -> None:
    """`encfs ARGS`, killed at the NTH moment of POINT (KILLED_AT)."""
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, "-c", KILLED_AT, point, str(nth), *map(str, args)], env=env,
                       capture_output=True, timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
