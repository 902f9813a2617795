"""The fsync probe of `encfs bench` (bench.py): whether a target's fsync(2) survives its daemon.

A daemon that answers fsync from memory runs the rows that wait for fsync (SQLite's commits, the
writes that end in fsync) faster than one that writes to its store first, and loses acknowledged data
when it dies: its numbers there are not a durable rate. So before the repetitions each target served
by a daemon is set up once and probed: a file is written, fsync'd and its directory fsync'd (the file left
open), the daemon's process group is killed with SIGKILL at once, the group checked gone and the mount
checked dead, the dead mount detached, the same daemon started again over the same store, and the
file read back. A store the daemon then refuses to mount fails the probe as well; what leaves no
verdict (a daemon that is not in the foreground, a mount that outlives the kill, a slow mount or
read) raises ProbeInconclusive, and the run records that instead.

What it catches and what not: SIGKILL loses only what the daemon's memory held. A daemon that writes
its store but never fsyncs it passes (the page cache survives the kill); power loss would catch it,
which a harness cannot cause. Measured on this machine (benchmarks/HISTORY.md, fourteenth round):
CryFS 0.11 fails it, and makes no fsync or fdatasync call at all during SQLite's commits.

bench_report.py leaves a target whose probe failed out of the "best peer" column on DURABLE_ROWS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_util import is_mounted, unmount

from encfs.diskio import fsync_dir, pwrite_all
from encfs.fuseproto.mounting import topmost_mount

if TYPE_CHECKING:
    from bench_targets import Target

PROBE_NAME = "fsync-probe"
PROBE_BYTES = 1 << 20
GONE_SECONDS = 10  # how long the killed daemon's process group may take to be gone
READ_SECONDS = 60  # how long the read-back may take (a daemon that mounts and never answers)


class ProbeInconclusive(Exception):
    """No verdict: the probe could not tell whether the fsync'd file survived (the message says why)."""


def write_durably(path: Path, data: bytes) -> int:
    """``data`` into a new file, fsync'd, and its directory fsync'd, as an application makes a
    file durable; the file stays open (its fd returned), as a database's stays open across its
    fsyncs: a daemon that writes out only at FLUSH or RELEASE does not pass for it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def kill_daemon(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """SIGKILL to the daemon's process group (the targets start each daemon in a session of its
    own, so whatever it forked without leaving the group goes too), then make sure it is gone:
    the group empty and a FUSE mount no longer answering (ProbeInconclusive otherwise: a server
    that outlived the kill could still write the file out)."""
    if proc.poll() is not None:
        raise ProbeInconclusive("its daemon had exited before the kill (it does not run in the foreground)")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + GONE_SECONDS
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            raise ProbeInconclusive(f"processes of its daemon's group outlived SIGKILL by {GONE_SECONDS} s")
        time.sleep(0.05)
    mount = topmost_mount(mountpoint)
    if mount is None or not mount.fstype.startswith("fuse"):
        return  # a kernel filesystem outlives its mounter (the tests' stand-ins)
    try:  # in a child: a mount still served by a process outside the group could hang us
        probe = subprocess.run(["stat", "-c", "%i", str(mountpoint)], check=False, capture_output=True,
                               timeout=10)
    except subprocess.TimeoutExpired:
        raise ProbeInconclusive("its mount hung after the kill instead of failing") from None
    if probe.returncode == 0:
        raise ProbeInconclusive("its mount still answered after the kill (another process serves it)")


def read_back(path: Path) -> bytes | str:
    """The file's bytes, or what reading it said; in a child, bounded by READ_SECONDS."""
    try:
        proc = subprocess.run(["cat", "--", str(path)], check=False, capture_output=True, timeout=READ_SECONDS)
    except subprocess.TimeoutExpired:
        raise ProbeInconclusive(f"reading the file back took over {READ_SECONDS} s") from None
    if proc.returncode == 0:
        return proc.stdout
    said = proc.stderr.decode(errors="replace").strip().splitlines()
    return said[-1] if said else f"cat exited with {proc.returncode}"


def fsync_probe(target: Target) -> tuple[bool, str] | None:
    """Probe ``target`` (set up and torn down here): (durable, what was read back), or None if no
    daemon of its serves it (nothing to kill: the native directory, kernel fscrypt). Raises
    ProbeInconclusive, or the harness's own errors, when it cannot tell."""
    mnt = target.setup()
    try:
        if not target.procs or target.daemon_call is None:
            return None
        mountpoint = target.daemon_call.mountpoint
        proc = target.procs[-1]
        data = os.urandom(PROBE_BYTES)
        fd = write_durably(mnt / PROBE_NAME, data)
        try:
            kill_daemon(proc, mountpoint)
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
                os.close(fd)
        target.procs.remove(proc)
        unmount(mountpoint)
        if is_mounted(mountpoint):
            raise ProbeInconclusive("the dead mount could not be detached")
        target.mounts.remove(mountpoint)
        try:
            target.remount()
        except RuntimeError as e:
            if target.procs[-1].poll() is None:  # still starting: slow, not a verdict
                raise ProbeInconclusive(f"it did not mount again in time ({e})") from None
            errors = [line.strip() for line in str(e).splitlines() if "error" in line.lower()]
            return False, "it would not mount again" + (f" ({errors[-1][:160]})" if errors else "")
        back = read_back(mnt / PROBE_NAME)
        if isinstance(back, str):
            return False, "the file was gone" if "No such file" in back else f"reading it back failed ({back})"
        if back != data:
            return False, f"it read back different ({len(back):,} of {len(data):,} bytes)"
        return True, "read back whole"
    finally:
        target.teardown()
