"""Volume snapshots: create, list, delete and roll back, attached or detached; and a snapshot's
contents as a read-only source for restore, copy and export.

A snapshot is referred to as ``VOL@ID`` or, once this machine has seen it, by its id alone
(``snap-`` and 16 hex digits, as EBS names them): the catalog ``<ENCFS_HOME>/snapshots.json``
maps ids to images. The catalog is only an index: the image's snapshot table is the truth,
and a stale entry (an image moved or a snapshot deleted elsewhere) is reported, never trusted.
It also keeps the ids of the last KEEP_DELETED snapshots deleted here, marked "deleted", so
that deleting one again says it is deleted: a deletion killed at any point, even after it
committed and forgot the snapshot, completes when the same command runs again.

Invariants:
- An attached volume's snapshots are created, listed and deleted by its daemon (extended
  attributes on its private FUSE file, fuseserver.CONTROL_*), which takes the server's
  exclusive lock: the snapshot is the state after every write acknowledged before it, as a
  crash at that moment would leave it. A filesystem mounted from the loop device is frozen
  around it (FIFREEZE, as LVM does), so that it is also clean: a snapshot of a frozen ext4
  passes e2fsck -fn with no journal recovery. A detached volume is opened (and locked) instead.
- Reading a snapshot's sectors (restore, copy, export) needs no lock: its pages do not change
  while it exists, so it is read beside a running daemon; each read is checked afterwards
  against the table on disk, so a snapshot deleted meanwhile is an error, never other bytes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encfs.atomicfile import remove_dead_temporaries, write_atomic
from encfs.block.attach import Attachment, live_attachment, mounts_of, refuse_attached
from encfs.block.cow import CowStore, Snapshot
from encfs.block.fuseserver import (
    CONTROL_CREATE,
    CONTROL_DELETE,
    CONTROL_LIST_PAGE,
    LIST_PAGE_HEAD,
)
from encfs.block.layout import SECTOR_SIZE
from encfs.block.maptree import MapTree
from encfs.block.volume import (
    OpenVolume,
    VolumeError,
    open_snapshots,
    open_volume,
    read_volume_header,
)
from encfs.blocks import BlockAuthError
from encfs.keys.service import KeyService

_ID = re.compile(r"snap-[0-9a-f]{16}")
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878  # linux/fs.h


def new_snapshot_id() -> str:
    return "snap-" + os.urandom(8).hex()


def check_id(text: str) -> str:
    if not _ID.fullmatch(text):
        raise VolumeError(f"{text!r} is not a snapshot id (snap- and 16 hex digits)")
    return text


# -- the catalog ---------------------------------------------------------------------------

def _catalog_path(home: Path) -> Path:
    return home / "snapshots.json"


KEEP_DELETED = 256  # deleted ids the catalog keeps (each a line of JSON)


def catalog(home: Path) -> dict[str, dict[str, Any]]:
    """Snapshot id -> {"image", "volume_id"}, and "deleted" (a time) for a deleted snapshot."""
    try:
        data = json.loads(_catalog_path(home).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # an index only: rebuilt as snapshots are seen
    return data if isinstance(data, dict) else {}


def remember(home: Path, image: Path, volume_id: str, ids: list[str], forget: tuple[str, ...] | list[str] = ()) -> None:
    """Record ``ids`` as snapshots of ``image``, and ``forget`` as deleted ones."""
    cat = catalog(home)
    for i in ids:
        cat[i] = {"image": str(image.absolute()), "volume_id": volume_id}
    now = time.time()
    for i in forget:
        cat[i] = {"image": str(image.absolute()), "volume_id": volume_id, "deleted": now}
    deleted = sorted((e["deleted"], i) for i, e in cat.items() if e.get("deleted"))
    for _t, i in deleted[:max(0, len(deleted) - KEEP_DELETED)]:
        del cat[i]
    _save(home, cat)


def _put_back(home: Path, sid: str, entry: dict[str, Any] | None) -> None:
    """Make ``sid``'s catalog entry ``entry`` again (None: no entry)."""
    cat = catalog(home)
    if entry is None:
        cat.pop(sid, None)
    else:
        cat[sid] = entry
    _save(home, cat)


def _save(home: Path, cat: dict[str, dict[str, Any]]) -> None:
    try:
        home.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(_catalog_path(home))  # the catalogs of commands killed mid-write
        write_atomic(_catalog_path(home), json.dumps(cat, indent=1, sort_keys=True).encode())
    except OSError:
        pass  # the catalog is a convenience; VOL@ID always works


def resolve(ref: str, home: Path) -> tuple[Path, str]:
    """``VOL@ID`` or ``ID`` -> (image, snapshot id); a deleted snapshot's id gives its image
    (where it is not found)."""
    if "@" in ref:
        image, _, sid = ref.rpartition("@")
        return Path(image), check_id(sid)
    sid = check_id(ref)
    entry = catalog(home).get(sid)
    if entry is None:
        raise VolumeError(f"snapshot {sid} is not known on this machine: name it as VOL@{sid}")
    return Path(entry["image"]), sid


# -- operations --------------------------------------------------------------------------

def _attachment(image: Path) -> Attachment | None:
    """The live attachment of ``image`` itself: a byte copy of an attached image has its volume
    id, and must not have its snapshots taken or deleted in the attached one."""
    header, _w = read_volume_header(image)
    a = live_attachment(header.volume_id.hex())
    try:
        return a if a is not None and os.path.samefile(a.image, image) else None
    except OSError:  # the attached image is gone or unreadable: not this file
        return None


def _attached_control(image: Path) -> str | None:
    """The daemon's private file of an attached volume, or None if it is detached."""
    a = _attachment(image)
    return None if a is None else f"{a.mountpoint}/volume"


@contextmanager
def frozen(device: str) -> Iterator[list[str]]:
    """Freeze the filesystems mounted from ``device`` (FIFREEZE, as LVM does for its snapshots)
    and thaw them after, also on an error: a frozen ext4 has flushed its journal and marked
    itself clean, so a snapshot of it needs no journal recovery. Yields the mountpoints."""
    done: list[tuple[str, int]] = []
    try:
        for mountpoint in mounts_of(device):
            fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    continue  # a filesystem that cannot freeze: the snapshot is crash-consistent only
                raise VolumeError(f"cannot freeze {mountpoint} for the snapshot: {e.strerror}") from None
            done.append((mountpoint, fd))
        yield [m for m, _fd in done]
    finally:
        for mountpoint, fd in reversed(done):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as e:
                print(f"encfs: warning: {mountpoint} could not be thawed ({e.strerror}): run `fsfreeze -u "
                      f"{mountpoint}`", file=sys.stderr)
            os.close(fd)


def _control_error(image: Path, what: str, e: OSError) -> VolumeError:
    if e.errno == errno.ENOENT:
        return VolumeError(f"{image}: no such snapshot")
    if e.errno == errno.EOPNOTSUPP:
        return VolumeError(f"{image} is served by an encfs daemon without snapshots: detach and attach it again")
    return VolumeError(f"{image}: {what} failed: {e.strerror} (see the daemon log)")


def create(image: Path, ks: KeyService, description: str, home: Path) -> str:
    """Snapshot ``image``; its id. Attached, only the daemon's commits take time; detached, the
    map is not read (CowStore.snapshot_unloaded); nothing is read back (the list walks every
    tree). Neither grows with the data."""
    sid, created = new_snapshot_id(), time.time()
    a = _attachment(image)
    if a is not None:
        control = f"{a.mountpoint}/volume"
        request = json.dumps({"id": sid, "description": description, "created": created}).encode()
        with frozen(a.loop):
            try:
                os.setxattr(control, CONTROL_CREATE, request)
            except OSError as e:
                raise _control_error(image, "snapshot", e) from None
    else:
        vol = _open_cow(image, ks, map_unread=True)
        try:
            cow_store(vol).snapshot_unloaded(sid, description, created)
        except OSError as e:
            raise VolumeError(f"cannot snapshot {image}: {e.strerror}") from None
        finally:
            vol.close()
    remember(home, image, read_volume_header(image)[0].volume_id.hex(), [sid])
    return sid


def _open_cow(image: Path, ks: KeyService, map_unread: bool = False) -> OpenVolume:
    vol = open_volume(image, ks, map_unread=map_unread)
    if not isinstance(vol.store, CowStore):
        vol.close()
        raise VolumeError(f"volume {image} has format 1, which has no snapshots: "
                          f"`encfs volume upgrade {image}` converts it")
    return vol


def cow_store(vol: OpenVolume) -> CowStore:
    assert isinstance(vol.store, CowStore)
    return vol.store


def list_attached(control: str) -> list[dict[str, Any]]:
    """The daemon's snapshot list, read in pages (an xattr holds at most 64 KiB, ~350 snapshots):
    page 0 makes it, the others are cut from the same list; another generation means another
    reader's page 0 came in between, so the read starts again."""
    for _ in range(5):
        try:
            parts: list[bytes] = []
            pages, generation = 1, None
            while len(parts) < pages:
                value = os.getxattr(control, CONTROL_LIST_PAGE + str(len(parts)).encode())
                pages, gen = LIST_PAGE_HEAD.unpack_from(value)
                if generation not in (None, gen):
                    break
                generation = gen
                parts.append(value[LIST_PAGE_HEAD.size:])
            else:
                listed: list[dict[str, Any]] = json.loads(b"".join(parts))
                return listed
        except OSError as e:
            if e.errno not in (errno.ERANGE, errno.ENODATA):  # the list changed between calls
                raise VolumeError(f"listing the snapshots failed: {e.strerror}") from None
    raise VolumeError("listing the snapshots failed: the list kept changing")


def list_snapshots(image: Path, ks: KeyService, home: Path) -> list[dict[str, Any]]:
    control = _attached_control(image)
    if control is not None:
        rows = list_attached(control)
    else:
        vol = _open_cow(image, ks)
        try:
            rows = cow_store(vol).snapshot_rows()
        finally:
            vol.close()
    header, _w = read_volume_header(image)
    for r in rows:
        r["volume"] = str(image.absolute())
    remember(home, image, header.volume_id.hex(), [r["id"] for r in rows])
    return rows


def delete(image: Path, sid: str, ks: KeyService, home: Path) -> None:
    """Delete a snapshot; a snapshot already gone (a deletion killed after its commit) is
    only forgotten and its space given back, so running the same command again completes."""
    control = _attached_control(image)
    header, _w = read_volume_header(image)
    known = catalog(home).get(sid)  # as this run found it: what a killed run catalogued counts
    # Catalogued first: a rerun after a deletion killed past its commit finds it and completes.
    remember(home, image, header.volume_id.hex(), [sid])
    if control is not None:
        try:
            os.setxattr(control, CONTROL_DELETE, sid.encode())
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise _control_error(image, "snapshot delete", e) from None
            _gone(image, sid, home, header.volume_id.hex(), known)
    else:
        vol = _open_cow(image, ks)
        try:
            cow_store(vol).delete_snapshot(sid)
        except KeyError:
            _gone(image, sid, home, header.volume_id.hex(), known)
            cow_store(vol).punch_free()  # the killed run may have committed but not given the space back
        except OSError as e:
            raise VolumeError(f"cannot delete {sid}: {e.strerror}") from None
        finally:
            vol.close()
    remember(home, image, header.volume_id.hex(), [], forget=[sid])


def _gone(image: Path, sid: str, home: Path, volume_id: str, known: dict[str, Any] | None) -> None:
    """``sid`` is not in ``image``'s table: fine if the catalog knew it as one of its snapshots
    before this run (deleted by a run that was killed, or deleted already); otherwise an error,
    and the entry this run made goes (an id the volume never had is not catalogued)."""
    if known is None or known.get("volume_id") != volume_id:
        _put_back(home, sid, known)
        raise VolumeError(f"{image} has no snapshot {sid}")


def rollback(image: Path, sid: str, ks: KeyService) -> Snapshot:
    refuse_attached(image, read_volume_header(image)[0].volume_id.hex())
    vol = _open_cow(image, ks)
    try:
        return cow_store(vol).rollback(sid)
    except KeyError:
        raise VolumeError(f"{image} has no snapshot {sid}") from None
    except OSError as e:
        raise VolumeError(f"cannot roll {image} back: {e.strerror}") from None
    finally:
        vol.close()


@dataclass
class SnapshotSource:
    """A snapshot's contents, read-only (export.SnapshotSource; restore and copy read it too)."""

    volume: OpenVolume
    snapshot: Snapshot
    tree: MapTree

    @property
    def volume_id(self) -> bytes:
        return self.volume.header.volume_id

    @property
    def snapshot_id(self) -> str:
        return self.snapshot.id

    @property
    def size(self) -> int:
        return self.snapshot.size

    @property
    def description(self) -> str:
        return self.snapshot.description

    @property
    def created(self) -> float:
        return self.snapshot.created

    @property
    def key_id(self) -> str:
        return self.volume.header.key_id

    def written_runs(self) -> Iterator[tuple[int, int]]:
        """VolumeError if a node of its map fails authentication: the sectors under it cannot be
        listed, and a copy, restore or export without them would read zeros, not errors."""
        sector = self.tree.first_damaged()
        if sector is not None:
            raise VolumeError(f"snapshot {self.snapshot.id}: its map fails authentication at sector {sector}, "
                              f"so its sectors there cannot be listed (`encfs fsck` the volume)")
        return self.tree.written_runs(self.size // SECTOR_SIZE)

    def written_bytes(self) -> int:
        return sum(n for _s, n in self.written_runs()) * SECTOR_SIZE

    def read_sectors(self, first: int, count: int) -> bytearray:
        """Its sectors; VolumeError if it was deleted meanwhile (the daemon may reuse a deleted
        snapshot's pages at once, and a page reused for the same sector authenticates). Ids are
        never reused, so a snapshot still in the table after the read was there throughout it."""
        store = cow_store(self.volume)
        data = store.read_tree(self.tree, first, count)
        for attempt in range(3):  # as open_snapshots(): the daemon may replace the table as it is read
            try:
                if store.has_snapshot(self.snapshot.id):
                    return data
                raise VolumeError(f"snapshot {self.snapshot.id} was deleted while it was read")
            except BlockAuthError:
                time.sleep(0.05)
        raise VolumeError(f"snapshot {self.snapshot.id}: the volume's commit records or snapshot table fail "
                          "authentication (tampered or damaged)")

    def close(self) -> None:
        self.volume.close()


@dataclass
class VolumeTarget:
    """export.ImportTarget over a new volume."""

    volume: OpenVolume

    def write_sectors(self, first: int, data: bytes) -> None:
        self.volume.store.write_sectors(first, data)

    def flush(self) -> None:
        self.volume.flush()


def volume_id_of(image: Path) -> str:
    return read_volume_header(image)[0].volume_id.hex()


def open_source(image: Path, sid: str, ks: KeyService) -> SnapshotSource:
    vol = open_snapshots(image, ks)
    try:
        store = cow_store(vol)
        snap = store.find_snapshot(sid)
        return SnapshotSource(vol, snap, store.snapshot_tree(snap))
    except KeyError:
        vol.close()
        raise VolumeError(f"{image} has no snapshot {sid}") from None
    except BaseException:
        vol.close()
        raise
