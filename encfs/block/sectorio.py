"""Plaintext I/O at any alignment over a store of 4 KiB sectors: the part both volume formats
share (sectors.py for format 1, cow.py for format 2).

Invariants:
- A write of part of a sector reads the sector, merges and writes it whole, so every sector
  write below is of whole sectors (and atomic in both formats).
- A discard forgets whole sectors (they read as zeros and give their space back) and zeroes
  the parts of sectors at its ends.
- I/O past the end of the volume fails: ENOSPC for a write or a read that reaches past it,
  EINVAL for a negative offset or length.
"""

from __future__ import annotations

import errno

from encfs.block.layout import SECTOR_SIZE
from encfs.blocks import SEALED_BLOCK, BlockCipher
from encfs.sealing import Sealer, Sealers
from encfs.sealworker import SealWorker


class SectorIO:
    """What a store supplies: ``sectors`` and the three whole-sector operations; and what it
    gets: the sealing of its data sectors (``sealer``: in process, or in a sealing worker from
    start_seal_worker() on)."""

    sectors: int
    sealer: Sealer
    cipher_class: type[BlockCipher]
    _sealing: Sealers | None = None

    def _start_sealing(self, key: bytes, scope: bytes, nonce_prefix: bytes | None = None) -> None:
        """Seal large writes and open large reads of data sectors in a sealing worker from now on
        (``key``, ``scope`` and ``nonce_prefix``: what ``sealer``'s cipher was made with)."""
        self._sealing = Sealers(SECTOR_SIZE, self.cipher_class)
        self._sealing.start()
        self.sealer = self._sealing.sealer(self.sealer.cipher, key, scope, nonce_prefix)

    def stop_seal_worker(self) -> None:
        if self._sealing is not None:
            self._sealing.stop()

    def cut_zeros_ahead(self) -> None:
        """At a clean close, cut what the store wrote past its image's end (format 2: cow.py)."""

    @property
    def seal_worker(self) -> SealWorker | None:
        return self.sealer.worker

    def read_sectors(self, first: int, count: int) -> bytearray:
        raise NotImplementedError

    def _read_sector(self, sector: int) -> bytes | bytearray:
        """One sector's plaintext, as read_sectors(sector, 1) (a store may do it faster). For
        read_view, which has checked the range."""
        return self.read_sectors(sector, 1)

    def write_sectors(self, first: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def forget_sectors(self, first: int, end: int) -> None:
        """Discard whole sectors [first, end)."""
        raise NotImplementedError

    def _open_in_arena(self, first: int, count: int, plain: memoryview, sealed: memoryview) -> None:
        """Sectors [first, first + count) into ``plain`` (unwritten ones as zeros), their sealed
        bytes read into ``sealed`` and opened there by the sealing worker (see read_view)."""
        raise NotImplementedError

    def read_view(self, offset: int, length: int) -> memoryview | bytes | bytearray:
        """As read(); with a sealing worker, a large read is read into this thread's slot of
        its arena and opened there by the worker, off this process's GIL. The view stays valid
        until this thread's next read_view() or write: a server replies with it at once."""
        if length == SECTOR_SIZE and not offset % SECTOR_SIZE:  # a 4 KiB random read: no run to lay out
            self._check_range(offset, length)
            return self._read_sector(offset // SECTOR_SIZE)
        count = -(-(offset % SECTOR_SIZE + length) // SECTOR_SIZE)
        areas = self.sealer.arena(count * SECTOR_SIZE, count * SEALED_BLOCK)
        if areas is None:
            return self.read(offset, length)
        self._check_range(offset, length)
        plain, sealed = areas
        first = offset // SECTOR_SIZE
        self._open_in_arena(first, count, plain[:count * SECTOR_SIZE], sealed)
        skip = offset - first * SECTOR_SIZE
        return plain[skip:skip + length]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.sectors * SECTOR_SIZE:
            raise OSError(errno.ENOSPC if offset + length > self.sectors * SECTOR_SIZE else errno.EINVAL,
                          "I/O beyond the end of the volume")

    def read(self, offset: int, length: int) -> bytearray:
        """Plaintext bytes [offset, offset+length), any alignment."""
        self._check_range(offset, length)
        if length == 0:
            return bytearray()
        first, last = offset // SECTOR_SIZE, (offset + length - 1) // SECTOR_SIZE
        data = self.read_sectors(first, last - first + 1)
        skip = offset - first * SECTOR_SIZE
        return data if skip == 0 and len(data) == length else data[skip:skip + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write plaintext at any alignment (partial sectors are read, merged, rewritten)."""
        self._check_range(offset, len(data))
        if not data:
            return 0
        first, last = offset // SECTOR_SIZE, (offset + len(data) - 1) // SECTOR_SIZE
        head = offset - first * SECTOR_SIZE
        tail = (last + 1) * SECTOR_SIZE - (offset + len(data))
        if head or tail:
            merged = self.read_sectors(first, last - first + 1)
            merged[head:head + len(data)] = data
            data = bytes(merged)
        self.write_sectors(first, data)
        return len(data) - head - tail

    def discard(self, offset: int, length: int) -> None:
        """Forget whole sectors in the range (they read as zeros); partial sectors are zeroed."""
        self._check_range(offset, length)
        first = -(-offset // SECTOR_SIZE)
        end = (offset + length) // SECTOR_SIZE
        if first * SECTOR_SIZE > offset:
            self.write(offset, bytes(min(first * SECTOR_SIZE, offset + length) - offset))
        if end * SECTOR_SIZE < offset + length and end >= first:
            self.write(end * SECTOR_SIZE, bytes(offset + length - end * SECTOR_SIZE))
        if end > first:
            self.forget_sectors(first, end)
