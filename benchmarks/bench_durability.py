"""The fsync probe of `encfs bench` (bench.py): whether a target's fsync(2) survives its daemon.

A daemon that answers fsync from memory runs the rows that wait for fsync or sync (SQLite's commits,
the writes that end in fsync, the small-file and untar rows that end in sync) faster than one that
writes to its store first, and loses acknowledged data when it dies: its numbers are not a durable
rate. So before the repetitions each target served by a daemon is set up once and probed: a file is
written, fsync'd and its directory fsync'd, the daemon's process group is killed with SIGKILL at
once, the dead mount is detached, the same daemon is started again over the same store, and the file
is read back. A store the daemon then refuses to mount fails the probe as well.

What it catches and what not: SIGKILL loses only what the daemon's memory held. A daemon that writes
its store but never fsyncs it passes (the page cache survives the kill); power loss would catch it,
which a harness cannot cause. Measured on this machine (benchmarks/HISTORY.md, fourteenth round):
CryFS 0.11 fails it, and makes no fsync or fdatasync call at all during SQLite's commits.

bench_report.py leaves a target whose probe failed out of the "best peer" column on DURABLE_ROWS.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING

from bench_util import unmount

if TYPE_CHECKING:
    from bench_targets import Target

PROBE_NAME = "fsync-probe"
PROBE_BYTES = 1 << 20


def write_durably(path: os.PathLike[str], data: bytes) -> None:
    """``data`` into a new file, fsync'd, and its directory fsync'd: what an application does to
    make a file durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    dirfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def kill_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the daemon's process group (the targets start each daemon in a session of its
    own, so its helpers go too), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def fsync_probe(target: Target) -> tuple[bool, str] | None:
    """Probe ``target`` (set up and torn down here): (durable, what was read back), or None if no
    daemon of its serves it (nothing to kill: the native directory, kernel fscrypt)."""
    mnt = target.setup()
    try:
        if not target.procs:
            return None
        data = os.urandom(PROBE_BYTES)
        write_durably(mnt / PROBE_NAME, data)
        proc = target.procs[-1]
        kill_daemon(proc)
        target.procs.remove(proc)
        unmount(mnt)
        target.mounts.remove(mnt)
        try:
            mnt = target.remount()
        except RuntimeError as e:  # its daemon exited or never mounted: what it left is unreadable
            errors = [line.strip() for line in str(e).splitlines() if "error" in line.lower()]
            return False, "it would not mount again" + (f" ({errors[-1][:160]})" if errors else "")
        try:
            back = (mnt / PROBE_NAME).read_bytes()
        except FileNotFoundError:
            return False, "the file was gone"
        except OSError as e:
            return False, f"reading it back failed ({e.strerror})"
        if back != data:
            return False, f"it read back different ({len(back):,} of {len(data):,} bytes)"
        return True, "read back whole"
    finally:
        target.teardown()
