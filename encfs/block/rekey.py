"""``encfs volume rekey``: move a detached volume to a fresh volume key, by a copy.

Every sector of a format-1 volume is sealed under one volume key with a random nonce, so the
key may make only so many seals (docs/FORMAT.md §7.5); past 2^30 encfs warns, and writes stop
before 2^32. A fresh key cannot be mixed into a format-1 image, so the way out is a copy:

1. ``VOL.rekey.tmp`` (left by an interrupted run: removed) is created as a new volume of the
   same size with a fresh volume id and data key, wrapped by KEY (default: VOL's own CMK);
2. every written sector of VOL is read (authenticated) and written to it, unwritten ones stay
   holes; it is flushed and closed (fsync);
3. it is renamed over VOL, and the directory is fsync'd.

The copy gets VOL's mode and owner before it replaces it.

Invariants:
- VOL's contents are not changed until the rename (it stays open and locked, so nothing
  attaches it meanwhile; opening it may upgrade its header and maps as any open does): a
  crash or a failure (a full disk, a sector that fails authentication) leaves VOL as it was,
  and at most a ``.rekey.tmp`` that the next run removes.
- Nothing is lost: a sector that fails authentication stops the copy (VolumeError naming
  it), since the copy could only turn it into something else.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from encfs.block.layout import SECTOR_SIZE
from encfs.block.volume import VolumeError, create_volume, open_volume
from encfs.blocks import BlockAuthError
from encfs.diskio import fsync_dir
from encfs.keys.service import KeyService

_CHUNK = 256  # sectors per copy step (1 MiB)


@dataclass(frozen=True)
class Rekeyed:
    volume_id: str
    key_id: str
    sectors: int  # written sectors copied
    seconds: float


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".rekey.tmp")


def rekey_volume(path: Path, ks: KeyService, key: str | None = None, expected_key: str | None = None) -> Rekeyed:
    """Copy the volume at ``path`` (not attached) under a fresh data key wrapped by ``key``
    (default: its current CMK), in place of the original (see the module docstring)."""
    start = time.monotonic()
    old = open_volume(path, ks, expected_key=expected_key)
    tmp = tmp_path(path)
    try:
        tmp.unlink(missing_ok=True)  # an interrupted run's: VOL is locked, so no other run owns it
        header = create_volume(tmp, old.size, ks, key or old.header.key_id)
        new = open_volume(tmp, ks)
        copied = 0
        try:
            for first, count in old.store.written_runs():
                for at in range(first, first + count, _CHUNK):
                    n = min(_CHUNK, first + count - at)
                    try:
                        data = old.store.read_sectors(at, n)
                    except BlockAuthError as e:
                        raise VolumeError(f"{path}: sector {e.block_no // 2} fails authentication; not re-keyed "
                                          f"(the volume is unchanged)") from None
                    new.store.write(at * SECTOR_SIZE, bytes(data))
                    copied += n
            new.flush()
        finally:
            new.close()
        st = os.stat(path)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, st.st_mode & 0o7777)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)  # the switch: VOL is the copy from here on
    except OSError as e:
        tmp.unlink(missing_ok=True)
        old.close()
        raise VolumeError(f"cannot re-key {path}: {e.strerror} (the volume is unchanged)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        old.close()
        raise
    old.close()  # the replaced image (its lock too; the copy is complete and synced before the rename)
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise VolumeError(f"{path} was re-keyed, but its directory could not be synced: {e.strerror}") from None
    return Rekeyed(header.volume_id.hex(), header.key_id, copied, time.monotonic() - start)
