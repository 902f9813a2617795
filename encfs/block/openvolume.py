"""An open volume, the object volume.py's open_volume() and open_snapshots() return: OpenVolume
(its fd, header and store; close() and grow()) and StoreFile, its base, which is what the FUSE
server (fuseserver.VolumeFile) calls: sector I/O on the SectorStore or CowStore, and on format 2
the snapshot create, delete and list requests that come as control attributes (the benchmark's
unencrypted volume is a StoreFile too).

Of volume.py's invariants it keeps:
- the lock: an OpenVolume from open_volume() holds its locked fd until close() closes it;
- the seal count: it seals nothing itself (every write and seal-ahead goes through the store,
  whose SealBudget counts it), changes the header only through volume.py's _Header, and a clean
  close() settles the reservation.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from encfs.block.budget import SealBudget
from encfs.block.cow import CowSealed, CowStore
from encfs.block.header import VolumeHeader
from encfs.block.layout import SECTOR_SIZE
from encfs.block.sectors import SealedSectors, SectorStore

if TYPE_CHECKING:  # volume.py imports this module; OpenVolume only holds a _Header
    from encfs.block.volume import _Header

log = logging.getLogger("encfs.block")  # volume.py's logger (the same name, so the same records)


class StoreFile:
    """The FUSE server's VolumeFile I/O, delegated to a SectorStore (``self.store``)."""

    store: SectorStore | CowStore
    _listing: tuple[int, list[bytes]] = (0, [])  # the snapshot list query() cut into pages, its generation

    @property
    def size(self) -> int:
        return self.store.sectors * SECTOR_SIZE

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Valid until this thread's next read or write (see SectorStore.read_view)."""
        return self.store.read_view(offset, length)

    def seal_ahead(self, offset: int, data: bytes | bytearray | memoryview) -> SealedSectors | CowSealed | None:
        return self.store.seal_ahead(offset, data)

    def request_buffer(self) -> memoryview | None:
        """A FUSE request buffer the sealing worker reads plaintext from uncopied, if one runs."""
        worker = self.store.seal_worker
        return None if worker is None else worker.request_buffer()

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              sealed: SealedSectors | CowSealed | None = None) -> int:
        if sealed is not None and self.store.write_sealed(sealed):  # type: ignore[arg-type]  # its own kind
            return len(data)
        return self.store.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self.store.discard(offset, length)

    def flush(self) -> None:
        self.store.flush()

    def _cow(self) -> CowStore:
        if not isinstance(self.store, CowStore):
            raise OSError(errno.EOPNOTSUPP, "format 1 has no snapshots")
        return self.store

    def control(self, name: bytes, value: bytes) -> None:
        """The daemon's side of snapshot create and delete (fuseserver.CONTROL_*)."""
        from encfs.block.fuseserver import CONTROL_CREATE

        store = self._cow()
        try:
            if name == CONTROL_CREATE:
                req = json.loads(value)
                snap = store.snapshot(str(req["id"]), str(req.get("description", "")), float(req["created"]))
                log.info("snapshot %s created (transaction %d)", snap.id, snap.txg)
            else:
                store.delete_snapshot(value.decode())
                log.info("snapshot %s deleted", value.decode())
        except KeyError:
            if name != CONTROL_CREATE:  # deleted already, maybe by a run killed before it punched
                store.punch_free()
            raise OSError(errno.ENOENT, "no such snapshot") from None
        except (ValueError, TypeError, UnicodeDecodeError):
            raise OSError(errno.EINVAL, "malformed snapshot request") from None

    def query(self, name: bytes) -> bytes:
        """The snapshot list (fuseserver.CONTROL_LIST), whole or in pages of LIST_PAGE bytes: page 0
        makes the list and keeps it, pages 1.. are cut from what page 0 kept. Each page starts
        with (pages, generation); a reader that sees another generation starts again."""
        from encfs.block.fuseserver import CONTROL_LIST, LIST_PAGE, LIST_PAGE_HEAD

        if name == CONTROL_LIST:  # whole (what encfs before paging asks; fails past 64 KiB)
            return json.dumps(self._cow().snapshot_rows()).encode()
        try:
            page = int(name.rpartition(b".")[2])
        except ValueError:
            raise OSError(errno.ENODATA, "no such attribute") from None
        if page == 0:
            blob = json.dumps(self._cow().snapshot_rows()).encode()
            self._listing = (self._listing[0] + 1,
                             [blob[i:i + LIST_PAGE] for i in range(0, len(blob), LIST_PAGE)] or [b""])
        generation, pages = self._listing
        if not 0 <= page < len(pages):
            raise OSError(errno.ENODATA, "no such page of the snapshot list (read page 0 again)")
        return LIST_PAGE_HEAD.pack(len(pages), generation) + pages[page]


@dataclass
class OpenVolume(StoreFile):
    """An open image: its fd, header and sector store (the data key is unwrapped)."""

    path: Path
    fd: int
    headers: _Header
    store: SectorStore | CowStore
    warnings: list[str]
    budget: SealBudget

    @property
    def header(self) -> VolumeHeader:
        return self.headers.current

    @property
    def size(self) -> int:
        return self.header.size  # what both header copies say, even if a grow failed half-way

    @property
    def seals(self) -> int:
        """Seals made under the volume key so far (an upper bound: see budget.py)."""
        return self.budget.used

    def close(self) -> None:
        self.store.stop_seal_worker()
        try:
            self.store.sync_mirrors()  # at rest, both map slots hold the newest map
        except OSError as e:
            log.warning("%s: sector map mirrors not synced: %s", self.path, e.strerror)
        else:
            try:
                self.store.cut_zeros_ahead()
            except OSError as e:
                log.warning("%s: zeros past the pool not cut off: %s", self.path, e.strerror)
        try:
            self.budget.settle()  # a clean close gives the unused reservation back
        except OSError as e:
            log.warning("%s: seal count not settled (the reservation stands): %s", self.path, e.strerror)
        os.close(self.fd)

    def grow(self, new_size: int) -> None:
        """Format the new extents' maps, then publish the new size in both header copies.

        Works attached (the daemon calls it) or detached; on failure the volume
        keeps its old size: no header copy names the new size before its maps exist.
        """
        # volume.py imports this module, so its errors and size check are taken at call time
        from encfs.block.volume import ShrinkRefused, VolumeError, _check_cow_size

        if new_size < self.header.size:
            raise ShrinkRefused()
        if new_size == self.header.size:
            return
        _check_cow_size(self.header.copy_on_write, new_size)
        try:
            self.store.grow(new_size // SECTOR_SIZE)
            self.headers.update(size=new_size)
        except OSError as e:
            raise VolumeError(f"cannot grow {self.path}: {e.strerror}") from None
