"""encfs/progress.py: a tqdm bar on a terminal's stderr, nothing on a pipe or a log, cleared on exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from procs import run_on_terminal

# Counts 3 MB in 1 MB steps, then finishes or raises inside the bar (mode "raise"); prints a marker after it.
SCRIPT = """
import fcntl, struct, sys, termios, time
from encfs.progress import progress
if sys.argv[1] == "sized":  # a terminal 100 columns wide (run_on_terminal's pty reports 0 x 0)
    fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
try:
    with progress(3_000_000, "copy snap-1") as bar:
        for _ in range(3):
            time.sleep(0.15)  # past tqdm's redraw interval (0.1 s), so every step is drawn
            bar.update(1_000_000)
        if sys.argv[1] == "raise":
            raise RuntimeError("boom")
except RuntimeError:
    pass
print("AFTER", file=sys.stderr)
"""


def _env(progress: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("ENCFS_PROGRESS", None)
    if progress is not None:
        env["ENCFS_PROGRESS"] = progress
    return env


def _piped(progress: str | None, mode: str = "ok") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, env=_env(progress), timeout=60)


def _on_terminal(progress: str | None, mode: str = "ok") -> bytes:
    code, out, _ = run_on_terminal([sys.executable, "-c", SCRIPT, mode], _env(progress), {}, timeout=60)
    assert code == 0, out
    return out


def test_quiet_when_stderr_is_not_a_terminal() -> None:
    proc = _piped(None)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"AFTER\n"
    proc = _piped("0")
    assert proc.stderr == b"AFTER\n"


def test_forced_on_for_a_pipe() -> None:
    proc = _piped("1")
    assert b"copy snap-1" in proc.stderr and b"3.00M/3.00M" in proc.stderr and proc.stdout == b""


@pytest.mark.parametrize("mode", ["ok", "raise", "sized"])
def test_shown_on_a_terminal_with_rate_and_eta_then_cleared(mode: str) -> None:
    out = _on_terminal(None, mode)
    before, sep, _ = out.partition(b"AFTER")
    assert sep
    text = before.decode(errors="replace")
    assert "copy snap-1" in text and "1.00M/3.00M" in text and "2.00M/3.00M" in text
    assert re.search(r"<00:0\d, +[\d.]+[kM]?B/s\]", text), text  # the time left and the rate
    # the bar's line is cleared before anything else is written (leave=False), also after an exception
    last_draw = before.rsplit(b"\r", 2)
    assert last_draw[-1] == b"" and last_draw[-2].strip() == b"", before[-200:]
    widest = max(len(line) for line in text.split("\r"))
    assert widest == (99 if mode == "sized" else 80), text  # tqdm leaves the last column free


def test_forced_off_on_a_terminal() -> None:
    out = _on_terminal("0")
    assert b"snap-1" not in out and b"AFTER" in out
