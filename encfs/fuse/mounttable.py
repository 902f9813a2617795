"""The encfs mounts on this machine, from the mount table (fuseproto.mounting.mount_table; no
token, no mount machinery).

An encfs filesystem mount has type ``fuse.encfs`` and its CIPHERDIR as source
(the daemon mounts with ``fsname=<absolute CIPHERDIR>``); a volume's private
FUSE mount has type ``fuse.encfs-volume``. Invariant: reading the table never
touches a mounted filesystem (a hung daemon must not hang ``encfs status``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encfs.fuseproto.mounting import mount_table, topmost_mount

FS_TYPE = "fuse.encfs"


@dataclass(frozen=True)
class MountEntry:
    source: str  # the CIPHERDIR
    mountpoint: str
    read_only: bool


def encfs_mounts(table: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every ``fuse.encfs`` mount, in mount order."""
    return [MountEntry(m.source, m.mountpoint, m.read_only) for m in mount_table(table) if m.fstype == FS_TYPE]


def mount_at(path: Path, table: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The encfs mount on top at ``path`` (found without stat()ing the mount), or None: also when
    another filesystem is mounted over it."""
    m = topmost_mount(path, table)
    return MountEntry(m.source, m.mountpoint, m.read_only) if m is not None and m.fstype == FS_TYPE else None
