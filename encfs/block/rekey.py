"""``encfs volume rekey`` and ``encfs volume upgrade``: copy a detached volume to a fresh volume
key, in the same format (rekey) or in format 2 (upgrade).

Every sector of a format-1 volume is sealed under one volume key with a random nonce, so the
key may make only so many seals (docs/FORMAT.md §7.5); past 2^30 encfs warns, and writes stop
before 2^32. A fresh key cannot be mixed into a format-1 image, so the way out is a copy:

1. ``VOL.rekey.tmp`` (left by an interrupted run: removed, unless it can be carried on, below)
   is created as a new volume of the same size with a fresh volume id and data key, wrapped by
   KEY (default: VOL's own CMK);
2. every written sector of VOL is read (authenticated) and written to it, unwritten ones stay
   holes; it is flushed and closed (fsync);
3. it is renamed over VOL, and the directory is fsync'd.

The copy gets VOL's mode and owner before it replaces it. A format-2 volume with snapshots is
copied snapshot by snapshot, oldest first, each step writing only what changed since the one
before and then taking the snapshot again, with the same id and metadata (rekeysnap.py); a
copy an interrupted run left with some of the snapshots taken is carried on from there, any
other is started again. The catalog (snapshots.json) then names the new volume id
(rekeycli.py).

A volume with a recovery key (recovery.py) is re-keyed only with its recovery key file: VOL is
then opened with it (so a volume whose CMK is lost can be moved to a new one) and the copy's
new volume key is wrapped under the same recovery key. Without the file it is refused: the
record would go on opening only the old key.

Invariants:
- VOL's contents are not changed until the rename (it stays open and locked, so nothing
  attaches it meanwhile; opening it may upgrade its header and maps as any open does): a
  crash or a failure (a full disk, a sector that fails authentication) leaves VOL as it was,
  and at most a ``.rekey.tmp`` that the next run removes or carries on. A failure that is
  reported (not a kill) removes the ``.rekey.tmp``.
- Nothing is lost: a sector that fails authentication stops the copy (VolumeError naming
  it), since the copy could only turn it into something else.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from encfs.block.cow import CowStore
from encfs.block.layout import SECTOR_SIZE
from encfs.block.volume import OpenVolume, VolumeError, create_volume, open_volume
from encfs.blocks import BlockAuthError
from encfs.diskio import fsync_dir
from encfs.errors import EncfsError
from encfs.keys.service import KeyService
from encfs.progress import progress

_CHUNK = 256  # sectors per copy step (1 MiB)
_AHEAD = 4  # chunks read ahead of the writes


@dataclass(frozen=True)
class Rekeyed:
    volume_id: str
    key_id: str
    sectors: int  # written sectors copied
    seconds: float
    snapshots: list[str] = field(default_factory=list)  # the ids of the snapshots copied with it
    resumed: bool = False  # an interrupted run's copy was carried on


def tmp_path(path: Path, what: str = "rekey") -> Path:
    return path.with_name(f"{path.name}.{what}.tmp")


def copy_sectors(read: Callable[[int, int], bytes | bytearray | memoryview], runs: Iterable[tuple[int, int]],
                 new: OpenVolume, total: int, desc: str, failed: Callable[[int], str]) -> int:
    """Copy the written runs through ``read(first, count)`` into ``new``, with a progress bar of
    ``total`` bytes; a sector that fails authentication stops it (VolumeError ``failed(sector)``).

    A thread reads (and opens) the next chunks while this one seals and writes: a copy is a read,
    an open, a seal and a write per chunk, and with the two volumes' sealing workers doing the
    crypto the reads and writes of one thread left both workers waiting half the time (1 GiB
    re-keyed at 298 MB/s in one thread; see benchmarks/HISTORY.md for the two)."""
    chunks = [(at, min(_CHUNK, first + count - at)) for first, count in runs
              for at in range(first, first + count, _CHUNK)]
    ready: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=_AHEAD)
    stop = threading.Event()
    problem: list[BaseException] = []

    def reader() -> None:
        try:
            for at, n in chunks:
                if stop.is_set():
                    return
                ready.put((at, bytes(read(at, n))))  # a copy: read() may reuse its buffer
        except BaseException as e:  # noqa: BLE001 - raised again in the copying thread
            problem.append(e)
        finally:
            ready.put(None)

    thread = threading.Thread(target=reader, name="encfs-copy-reader", daemon=True)
    thread.start()
    copied = 0
    try:
        with progress(total, desc) as bar:
            while (item := ready.get()) is not None:
                at, data = item
                new.store.write_sectors(at, data)
                n = len(data) // SECTOR_SIZE
                copied += n
                bar.update(n * SECTOR_SIZE)
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting for room, then let it end
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()
    if problem:
        if isinstance(problem[0], BlockAuthError):
            raise VolumeError(failed(problem[0].block_no)) from None
        raise problem[0]
    new.flush()
    return copied


def _same_recovery(vol: OpenVolume, recovery_key: bytes | None) -> bool:
    """Whether an interrupted run's copy has the recovery record this run gives it."""
    from encfs.block.recovery import open_record

    if recovery_key is None or not vol.header.has_recovery_key:
        return recovery_key is None and not vol.header.has_recovery_key
    try:
        open_record(vol.header, recovery_key, vol.path)
        return True
    except EncfsError:
        return False


def rekey_volume(path: Path, ks: KeyService, key: str | None = None, expected_key: str | None = None,
                 version: int | None = None, recovery_key: bytes | None = None) -> Rekeyed:
    """Copy the volume at ``path`` (not attached) under a fresh data key wrapped by ``key``
    (default: its current CMK), in format ``version`` (default: its own), in place of the
    original, snapshots and all (see the module docstring). ``recovery_key``: VOL is opened with
    it (its CMK is not needed) and the copy's new key is wrapped under it too; a volume with a
    recovery key is refused without it (the record would open only the old key)."""
    from encfs.block.rekeysnap import refuse_damaged, replay, resumable

    start = time.monotonic()
    old = open_volume(path, ks if recovery_key is None else None, seal_worker=True, expected_key=expected_key,
                      recovery_key=recovery_key)
    if old.header.has_recovery_key and recovery_key is None:
        old.close()
        raise VolumeError(f"{path} has a recovery key, which can open only its current volume key: give "
                          "--recovery-key FILE to wrap the new volume key under it too, or remove it first "
                          f"(`encfs recovery-key remove {path}`)")
    what = "rekey" if version is None else "upgrade"
    tmp = tmp_path(path, what)
    # The copy reads the image in order: let the kernel read ahead (stores open it for random I/O).
    os.posix_fadvise(old.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    snapshots = old.store.snapshots if isinstance(old.store, CowStore) else []
    try:
        dest = str(ks.describe_key(key)["KeyId"]) if key else old.header.key_id
        new = resumable(tmp, ks, dest, old.size, snapshots) if snapshots else None
        if new is not None and not _same_recovery(new, recovery_key):
            new.close()
            new = None
        resumed = new is not None
        if new is None:
            tmp.unlink(missing_ok=True)  # an interrupted run's: VOL is locked, so no other run owns it
            create_volume(tmp, old.size, ks, dest, version=version or old.header.version, recovery_key=recovery_key)
            new = open_volume(tmp, ks, seal_worker=True)
        header = new.header
        scale = 1 if old.header.copy_on_write else 2  # format 1 numbers two blocks per sector

        def failed(b: int) -> str:
            return f"{path}: sector {b // scale} fails authentication; not copied (the volume is unchanged)"

        try:
            if snapshots:
                assert isinstance(old.store, CowStore)
                copied = replay(old.store, new, f"{what} {path.name}", failed)
            else:
                if isinstance(old.store, CowStore):
                    refuse_damaged(old.store.tree, failed)
                runs = list(old.store.written_runs())
                copied = copy_sectors(lambda at, n: old.store.read_view(at * SECTOR_SIZE, n * SECTOR_SIZE), runs,
                                      new, sum(n for _f, n in runs) * SECTOR_SIZE, f"{what} {path.name}", failed)
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
        raise VolumeError(f"cannot {'re-key' if what == 'rekey' else 'upgrade'} {path}: {e.strerror} "
                          "(the volume is unchanged)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        old.close()
        raise
    old.close()  # the replaced image (its lock too; the copy is complete and synced before the rename)
    try:
        fsync_dir(path.parent)
    except OSError as e:
        done = "re-keyed" if what == "rekey" else "upgraded"
        raise VolumeError(f"{path} was {done}, but its directory could not be synced: {e.strerror}") from None
    return Rekeyed(header.volume_id.hex(), header.key_id, copied, time.monotonic() - start,
                   [s.id for s in snapshots], resumed)
