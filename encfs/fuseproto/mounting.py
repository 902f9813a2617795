"""Mounting a FUSE filesystem: mount(2) as root, fusermount3 otherwise, the mount's
read-ahead, and the machine's mount table (the one reader of /proc/self/mountinfo).

Invariants:
- Every mount is nosuid, nodev and noexec when encfs mounts it directly (mount_direct).
- A failure is an OSError whose message is one line (fusermount3's own complaint, or strerror).
- Reading the mount table never touches a mounted filesystem (no stat of a mountpoint: a
  hung daemon, or the serving daemon itself, would have to answer it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from encfs.fuseproto.wire import MAX_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bits (ST_*) that a remount must restate, with the mount(2) flag of each
_KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
MNT_DETACH = 2


def mount_direct(mountpoint: str, fsname: str, fstype: str) -> int:
    """Open /dev/fuse and mount it at ``mountpoint`` with mount(2) (root only); return the fd."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,max_read={MAX_WRITE}".encode()
    if _libc.mount(fsname.encode(), mountpoint.encode(), fstype.encode(),
                   MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount of {mountpoint}: {os.strerror(e)}")
    return fd


@dataclass(frozen=True)
class MountInfo:
    """One line of mountinfo."""

    device: str  # "major:minor" of the filesystem
    mountpoint: str
    fstype: str
    source: str
    read_only: bool
    mount_id: int = 0
    parent_id: int = 0


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as 3-digit octal escapes."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), os.fsencode(field))
    return os.fsdecode(raw)


def mount_table(table: str | os.PathLike[str] = "/proc/self/mountinfo") -> list[MountInfo]:
    """Every mount, in mount order (the last at a mountpoint is the one on top). OSError if the
    table cannot be read."""
    out = []
    with open(table, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 6 or len(tail) < 2:
                continue
            out.append(MountInfo(fields[2], _unescape(fields[4]), tail[0], _unescape(tail[1]),
                                 "ro" in fields[5].split(","), int(fields[0]), int(fields[1])))
    return out


def _on_top(mounts: list[MountInfo], where: str) -> MountInfo | None:
    """Of the mounts at ``where``, the one no other is mounted on. Not simply the last line:
    since Linux 6.8 mountinfo lists mounts by id, and a moved mount (or one put beneath) may
    be on top with a lower id."""
    here = [m for m in mounts if m.mountpoint == where]
    covered = {m.parent_id for m in here}
    top = [m for m in here if m.mount_id not in covered] or here
    return top[-1] if top else None


def topmost_mount(path: str | os.PathLike[str],
                  table: str | os.PathLike[str] = "/proc/self/mountinfo") -> MountInfo | None:
    """The mount on top at ``path``, or None if nothing is mounted there. OSError if the table
    cannot be read. Only ``path``'s parent is resolved: a stat of the mountpoint itself would
    reach the mounted filesystem (a hung daemon hangs it), unless ``path`` names a symlink."""
    mounts = mount_table(table)
    head, tail = os.path.split(os.path.abspath(path))
    where = os.path.join(os.path.realpath(head), tail) if tail else head
    found = _on_top(mounts, where)
    if found is None and os.path.islink(where):  # not a mountpoint, so this lstat reaches no mount's root
        found = _on_top(mounts, os.path.realpath(where))
    return found


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Give the FUSE mount at ``mountpoint`` a read-ahead of ``kib`` KiB (its backing device
    info in sysfs); False if that is not ours to change (not root) or not there.

    Call it only after INIT is answered: the kernel lowers the read-ahead to the INIT
    reply's max_readahead. The device number comes from mountinfo, never from a stat of
    the mountpoint, which the serving daemon would have to answer itself.
    """
    try:
        mount = topmost_mount(mountpoint)
        if mount is None:
            return False
        with open(f"/sys/class/bdi/{mount.device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(f"{kib}\n")
        return True
    except OSError:
        return False


def escape_option(value: str) -> str:
    """Escape a value for a comma-separated mount option list (as libfuse does)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_fusermount(mountpoint: str, options: Sequence[str]) -> int:
    """Mount through fusermount3 (any user); return the /dev/fuse fd it passes back.

    fusermount3 opens the device and mounts with its own privileges, then
    sends the descriptor over the socket named by _FUSE_COMMFD, exactly as
    libfuse's fallback path does. Its own one-line complaint becomes the
    OSError's message.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(["fusermount3", "-o", ",".join(options), "--", mountpoint],
                                env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        _out, err = proc.communicate()
    finally:
        ours.close()
        theirs.close()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        lines = err.decode(errors="replace").strip().splitlines()
        raise OSError(errno.EIO, lines[-1] if lines else f"fusermount3 exited with {proc.returncode}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def remount_direct(mountpoint: str, read_only: bool) -> None:
    """Flip a mount's read-only flag with mount(2) MS_REMOUNT (root only), keeping its other flags
    (a remount clears the flags it does not name)."""
    kept = os.statvfs(mountpoint).f_flag
    flags = MS_REMOUNT | (MS_RDONLY if read_only else 0)
    for st, ms in _KEPT_FLAGS:
        if kept & st:
            flags |= ms
    if _libc.mount(None, mountpoint.encode(), None, flags, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"remount of {mountpoint}: {os.strerror(e)}")


def unmount_direct(mountpoint: str, lazy: bool = False) -> None:
    if _libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unmount of {mountpoint}: {os.strerror(e)}")


def unmount_fusermount(mountpoint: str, lazy: bool = False) -> None:
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", mountpoint]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise OSError(errno.EBUSY, lines[-1] if lines else f"fusermount3 -u exited with {proc.returncode}")
