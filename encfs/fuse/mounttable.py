"""The encfs mounts on this machine, from the mount table (fuseproto.mounting.mount_table; no
token, no mount machinery).

An encfs filesystem mount has type ``fuse.encfs`` and its CIPHERDIR as source
(the daemon mounts with ``fsname=<absolute CIPHERDIR>``); a volume's private
FUSE mount has type ``fuse.encfs-volume``. Invariant: reading the table never
touches a mounted filesystem (a hung daemon must not hang ``encfs status``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from encfs.fuseproto.mounting import MountInfo, mount_table

__all__ = ["FS_TYPE", "MountEntry", "MountInfo", "encfs_mounts", "mount_at", "mount_table"]

FS_TYPE = "fuse.encfs"


@dataclass(frozen=True)
class MountEntry:
    source: str  # the CIPHERDIR
    mountpoint: str
    read_only: bool


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
