"""The mounts on this machine, and the encfs ones, from /proc/self/mountinfo (no token, no mount
machinery).

An encfs filesystem mount has type ``fuse.encfs`` and its CIPHERDIR as source
(the daemon mounts with ``fsname=<absolute CIPHERDIR>``); a volume's private
FUSE mount has type ``fuse.encfs-volume``. Invariant: reading the table never
touches a mounted filesystem (a hung daemon must not hang ``encfs status``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FS_TYPE = "fuse.encfs"


@dataclass(frozen=True)
class MountEntry:
    source: str  # the CIPHERDIR
    mountpoint: str
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as 3-digit octal escapes."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), os.fsencode(field))
    return os.fsdecode(raw)


@dataclass(frozen=True)
class MountInfo:
    """One line of mountinfo."""

    device: str  # "major:minor" of the filesystem
    mountpoint: str
    fstype: str
    source: str
    read_only: bool


def mount_table(table: str | os.PathLike[str] = "/proc/self/mountinfo") -> list[MountInfo]:
    """Every mount, in mount order. OSError if the table cannot be read."""
    out = []
    with open(table, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 6 or len(tail) < 2:
                continue
            out.append(MountInfo(fields[2], _unescape(fields[4]), tail[0], _unescape(tail[1]),
                                 "ro" in fields[5].split(",")))
    return out


def encfs_mounts(table: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every ``fuse.encfs`` mount, in mount order."""
    return [MountEntry(m.source, m.mountpoint, m.read_only) for m in mount_table(table) if m.fstype == FS_TYPE]


def mount_at(path: Path) -> MountEntry | None:
    """The topmost encfs mount at ``path`` (resolved without stat()ing the mount), or None."""
    where = os.path.realpath(path)
    found = None
    for m in encfs_mounts():
        if m.mountpoint == where:
            found = m
    return found
