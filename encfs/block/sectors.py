"""Plaintext sector I/O over a volume image, with atomic sector writes.

Every sector has two slots (layout.py). The sector map of each extent says
which slot is current, or that the sector was never written (it reads as
zeros and its slots are holes). Each extent has two map slots, kept as
mirrors: at rest both hold the newest map. Invariants:

- A write never touches the slot that the *persisted* map names: it goes to
  the other slot, so until the next flush persists the map, the persisted
  slot still holds the old contents intact. A crash (kill -9, power loss,
  torn write) at any moment therefore leaves every sector readable with
  either its old contents (persisted map) or, after a flush, its new ones.
- The map names a new slot only after the slot is fully written: a failed
  write (e.g. ENOSPC on the image's disk) never loses intact sectors.
- flush() = fdatasync the data; write each dirty map (sequence + 1) to the
  map slot its previous flush mirrored into (never the slot that flush
  committed to); fsync: the commit, after which the flush is acknowledged;
  then write the same map to the other slot, unsynced (the next flush's
  fdatasync, or sync_mirrors(), makes it durable). So a torn commit write
  leaves the other slot holding the previous map, whose flush was the last
  acknowledged one; a torn mirror write leaves the committed map; and
  damage to one slot at rest loses nothing.
- Loading an extent's map takes the slot that authenticates with the higher
  sequence (equal sequences are the mirrored state). One failing slot is
  logged as a warning and, on a writable image, rewritten from the other;
  an older sequence in the other slot is brought up to date the same way.
  Both failing: the extent's sectors are EIO (BlockAuthError).
- Every map slot of the volume is written at creation, so a zeroed or
  hole-punched map fails authentication instead of reading as "unwritten".
- Sectors are sealed with encfs.blocks (AES-256-GCM, fresh nonce per write)
  under the volume key, scope = volume id || b"sector", block number =
  2 * sector + slot index; maps under scope volume id || b"map". Modified,
  moved or swapped ciphertext fails authentication: BlockAuthError.
- Discard marks sectors unwritten and punches the non-persisted slot at
  once; the previously persisted slot is punched after the next flush.
- With a budget (budget.py), every seal is accounted for before it is made;
  a refusal (OSError) leaves nothing sealed or written.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
from collections.abc import Callable, Iterator

from encfs.block.budget import SealBudget
from encfs.block.layout import (
    EXTENT_SECTORS,
    GROUP_SECTORS,
    MAP_BYTES,
    SECTOR_SIZE,
    SLOT_A,
    SLOT_B,
    UNWRITTEN,
    extents_for,
    image_size,
    map_block_number,
    map_offset,
    sector_block_number,
    sector_offset,
)
from encfs.block.sectorio import SectorIO
from encfs.blocks import SEALED_BLOCK, BlockAuthError, BlockCipher
from encfs.diskio import pwrite_all
from encfs.sealing import Sealer
from encfs.sealworker import MAX_PLAIN

log = logging.getLogger("encfs.block")
_SEQ = struct.Struct(">Q")
SECTOR_SCOPE = b"sector"  # sectors are sealed under scope volume id || SECTOR_SCOPE
_ZEROS = bytes(MAX_PLAIN)  # what unwritten sectors read as
# A group's worth of map bytes whose four sectors each are all in one state.
_FILLED = {UNWRITTEN: bytes(GROUP_SECTORS // 4), SLOT_A: b"\x55" * (GROUP_SECTORS // 4),
           SLOT_B: b"\xaa" * (GROUP_SECTORS // 4)}
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _map_record(seq: int, bitmap: bytes) -> bytes:
    """A sector map as sealed: u64 sequence number, 2-bit states, zero padding to one block."""
    return (_SEQ.pack(seq) + bitmap).ljust(SECTOR_SIZE, b"\0")


def _get(m: bytearray, i: int) -> int:
    return (m[i >> 2] >> ((i & 3) * 2)) & 3


def _set(m: bytearray, i: int, v: int) -> None:
    shift = (i & 3) * 2
    m[i >> 2] = (m[i >> 2] & ~(3 << shift) & 0xFF) | (v << shift)


def extent_bytes(extent: int, sectors: int) -> str:
    """The plaintext byte range an extent's map covers, for messages: "first-last"."""
    first = extent * EXTENT_SECTORS * SECTOR_SIZE
    return f"{first}-{min(first + EXTENT_SECTORS * SECTOR_SIZE, sectors * SECTOR_SIZE) - 1}"


class _ExtentMap:
    __slots__ = ("current", "persisted", "seq", "slot")

    def __init__(self, persisted: bytearray, seq: int, slot: int) -> None:
        self.persisted = persisted
        self.current = bytearray(persisted)
        self.seq = seq  # sequence number of the persisted map
        self.slot = slot  # map slot that holds it durably; the next flush commits to the other


class SealedSectors:
    """Sectors sealed for the slots they go to: what write_sealed() writes."""

    __slots__ = ("first", "generation", "runs", "slots")

    def __init__(self, first: int, slots: list[int], runs: list[tuple[int, list[int], bytes | bytearray | memoryview]],
                 generation: int) -> None:
        self.first = first
        self.slots = slots  # the slot of sector first + k
        self.runs = runs  # (image offset, sectors, sealed bytes), contiguous in the image; a seal
        # worker's bytes stay valid until the sealing thread seals again
        self.generation = generation  # SectorStore._generation the slots were picked under


class SectorStore(SectorIO):
    """Sector-granular plaintext access to one volume image. Not thread-safe."""

    # Benchmark hook (benchmarks/null_volume.py swaps in a null cipher in its own
    # process to measure what encryption costs); no command or option reaches it.
    cipher_class: type[BlockCipher] = BlockCipher

    def __init__(self, fd: int, key: bytes, volume_id: bytes, sectors: int,
                 on_auth_error: Callable[[int], None] | None = None, budget: SealBudget | None = None) -> None:
        self.fd = fd
        self.budget = budget  # counts the seals under ``key`` (None: not counted, e.g. a test's store)
        self.sectors = sectors
        # No kernel read-ahead on the image: reads come as whole runs of one slot, and
        # read-ahead past a run only pulled in the other slot's chunk (mostly holes, so
        # zero-filled pages): 3.9 s of kernel time in a fresh volume's first 1 GiB read.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._volume_id = volume_id
        self.sealer = Sealer(self.cipher_class(key, volume_id + SECTOR_SCOPE))
        self._maps_cipher = self.cipher_class(key, volume_id + b"map")
        self._maps: dict[int, _ExtentMap] = {}
        self._generation = 0  # bumped after every change of a persisted map: see seal_ahead()
        self._dirty: set[int] = set()
        self._punch_later: list[tuple[int, int]] = []
        self._on_auth_error = on_auth_error
        self._writable = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_WRONLY | os.O_RDWR) != 0
        self._unsynced = False  # map writes since the last fsync: see sync_mirrors()

    def start_seal_worker(self, key: bytes) -> None:
        """Called by a serving daemon (open_volume(..., seal_worker=True)): see sectorio.py."""
        self._start_sealing(key, self._volume_id + SECTOR_SCOPE)

    # -- sector maps ----------------------------------------------------------------

    def format_maps(self, first_extent: int = 0, sectors: int | None = None) -> None:
        """Write fresh (all-unwritten) maps to both slots of every extent from
        ``first_extent`` up to the extent holding sector ``sectors`` - 1 (default: the end)."""
        fresh = {}
        plain = _map_record(0, bytes(MAP_BYTES))
        for extent in range(first_extent, extents_for(self.sectors if sectors is None else sectors)):
            for slot in (0, 1):
                self._write_map(extent, slot, plain)
            fresh[extent] = _ExtentMap(bytearray(MAP_BYTES), 0, 1)
        os.fsync(self.fd)
        self._unsynced = False
        self._maps.update(fresh)
        self._generation += 1

    def grow(self, new_sectors: int) -> None:
        """Extend the image to ``new_sectors`` and format the maps of the added extents.

        The store's size changes only once everything is written, so a failed
        grow (ENOSPC) leaves a store that still serves the old size.
        """
        os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, image_size(new_sectors)))
        self.format_maps(first_extent=extents_for(self.sectors), sectors=new_sectors)
        self.sectors = new_sectors

    def _spend(self, n: int, sectors: bool = True) -> None:
        if self.budget is not None:
            self.budget.spend(n, sectors)

    def _write_map(self, extent: int, slot: int, plain: bytes) -> None:
        self._spend(1, sectors=False)
        pwrite_all(self.fd, self._maps_cipher.seal(map_block_number(extent, slot), plain), map_offset(extent, slot))

    def _read_map(self, extent: int, slot: int) -> bytes | None:
        """The map record in one slot of ``extent``, or None if it fails authentication."""
        sealed = os.pread(self.fd, SEALED_BLOCK, map_offset(extent, slot))
        try:
            plain = self._maps_cipher.open(map_block_number(extent, slot), sealed)
        except BlockAuthError:
            return None
        return plain if len(plain) == SECTOR_SIZE else None

    def _map(self, extent: int) -> _ExtentMap:
        m = self._maps.get(extent)
        if m is None:
            m = self._maps[extent] = self._load(extent)
        return m

    def _load(self, extent: int) -> _ExtentMap:
        """Read ``extent``'s map by the module's rules, bringing its other slot up to date."""
        records = [self._read_map(extent, slot) for slot in (0, 1)]
        valid = [(_SEQ.unpack_from(plain)[0], slot) for slot, plain in enumerate(records) if plain is not None]
        if not valid:
            if self._on_auth_error:
                self._on_auth_error(extent * EXTENT_SECTORS)
            raise BlockAuthError(map_block_number(extent, 0))
        seq, slot = max(valid)  # equal sequences (mirrors): slot 1, and the next flush commits to slot 0
        plain, other = records[slot], records[1 - slot]
        assert plain is not None
        if other is None:
            log.warning("sector map of extent %d (plaintext bytes %s) is damaged in slot %d; using the copy "
                        "in slot %d (sequence %d)%s", extent, extent_bytes(extent, self.sectors), 1 - slot, slot,
                        seq, f" and rewriting slot {1 - slot} from it" if self._writable else "")
        if self._writable and (other is None or _SEQ.unpack_from(other)[0] != seq):
            try:
                self._write_map(extent, 1 - slot, plain)
                self._unsynced = True
            except OSError as e:  # the copy in ``slot`` still serves; the next flush commits over the other
                log.warning("sector map of extent %d: slot %d could not be rewritten: %s", extent, 1 - slot,
                            e.strerror)
        return _ExtentMap(bytearray(plain[_SEQ.size:_SEQ.size + MAP_BYTES]), seq, slot)

    def half_damaged_maps(self) -> list[tuple[int, int]]:
        """(extent, slot) for each extent one of whose two map slots fails authentication
        while the other does not: reads every map, writes nothing."""
        out = []
        for extent in range(extents_for(self.sectors)):
            failing = [slot for slot in (0, 1) if self._read_map(extent, slot) is None]
            if len(failing) == 1:
                out.append((extent, failing[0]))
        return out

    def mirror_maps(self) -> None:
        """Bring both map slots of every extent to its newest map (_load) and fsync; an extent
        whose map slots both fail stays as it is (EIO). Maps not loaded before stay unloaded."""
        for extent in range(extents_for(self.sectors)):
            if extent not in self._maps:
                try:
                    self._load(extent)
                except BlockAuthError:
                    continue
        self.sync_mirrors()

    def sync_mirrors(self) -> None:
        """fsync map writes not yet synced: a flush's mirror writes and repairs."""
        if self._unsynced:
            os.fsync(self.fd)
            self._unsynced = False

    def _state(self, sector: int) -> int:
        extent, i = divmod(sector, EXTENT_SECTORS)
        return _get(self._map(extent).current, i)

    # -- I/O ----------------------------------------------------------------------------

    @staticmethod
    def _runs(items: list[tuple[int, int]]) -> Iterator[tuple[int, list[int]]]:
        """Group (sector, offset) pairs into runs contiguous on disk: (first offset, sectors)."""
        run: list[int] = []
        start = prev = -1
        for sector, off in items:
            if run and off == prev + SEALED_BLOCK:
                run.append(sector)
            else:
                if run:
                    yield start, run
                run, start = [sector], off
            prev = off
        if run:
            yield start, run

    def _slot_runs(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(first sector, sector count, state) for the runs of one state that make up
        [first, first + count). No run crosses a group, so a run's slots are contiguous in
        the image."""
        s, end = first, first + count
        while s < end:
            extent, i = divmod(s, EXTENT_SECTORS)
            bitmap = self._map(extent).current
            stop = min(end, s - i % GROUP_SECTORS + GROUP_SECTORS)  # the end of s's group
            j = i + stop - s
            state = _get(bitmap, i)
            reach = bitmap[i >> 2:(j + 3) >> 2]  # the map bytes holding sectors i..j-1
            if reach == _FILLED.get(state, b"")[:len(reach)]:  # all of them in that state
                yield s, stop - s, state
                s = stop
                continue
            run = s
            for k in range(i + 1, j):
                state_k = _get(bitmap, k)
                if state_k != state:
                    yield run, s + k - i - run, state
                    run, state = s + k - i, state_k
            yield run, stop - run, state
            s = stop

    def written_runs(self) -> Iterator[tuple[int, int]]:
        """(first sector, count) of every run of written sectors, in order (unwritten and
        discarded sectors read as zeros and take no space)."""
        for first, count, state in self._slot_runs(0, self.sectors):
            if state:
                yield first, count

    def read_sectors(self, first: int, count: int) -> bytearray:
        """Plaintext of sectors [first, first + count); unwritten sectors read as zeros.
        BlockAuthError (after on_auth_error) if a written sector does not authenticate."""
        out = bytearray(count * SECTOR_SIZE)  # zeros: what unwritten sectors read as
        self._read_into(first, count, memoryview(out), None)
        return out

    def _open_in_arena(self, first: int, count: int, plain: memoryview, sealed: memoryview) -> None:
        self._read_into(first, count, plain, sealed, zero=True)

    def _read_into(self, first: int, count: int, out: memoryview, sealed_area: memoryview | None,
                   zero: bool = False) -> None:
        """Sectors [first, first + count) opened into ``out``; unwritten ones are left as they are
        unless ``zero``. With ``sealed_area`` (the worker's areas()), the sealed runs are read into
        it and the worker opens them all in one job."""
        jobs: list[tuple[range, bytes | bytearray | memoryview, memoryview]] = []
        at = 0
        try:
            for s, n, state in self._slot_runs(first, count):
                part = out[(s - first) * SECTOR_SIZE:(s - first + n) * SECTOR_SIZE]
                if state == UNWRITTEN:
                    if zero:
                        part[:] = _ZEROS[:len(part)]
                    continue
                blocks = range(sector_block_number(s, state), sector_block_number(s + n, state), 2)
                if sealed_area is None:
                    sealed: bytes | bytearray | memoryview = os.pread(self.fd, n * SEALED_BLOCK, sector_offset(s, state))
                    got = len(sealed)
                else:
                    sealed = sealed_area[at:at + n * SEALED_BLOCK]
                    got = os.preadv(self.fd, [sealed], sector_offset(s, state))
                    at += n * SEALED_BLOCK
                if got != n * SEALED_BLOCK:  # the image ends before sectors its map names
                    raise BlockAuthError(blocks[got // SEALED_BLOCK])
                if sealed_area is None:
                    self.sealer.cipher.open_into(blocks, sealed, part)
                else:
                    jobs.append((blocks, sealed, part))
            self.sealer.open_jobs(jobs)
        except BlockAuthError as e:
            if self._on_auth_error:
                self._on_auth_error(e.block_no // 2)
            raise

    def write_sectors(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Seal and write whole sectors; the map names a new slot only once it is fully written.

        If the image cannot take the write (ENOSPC, EIO, ...), the map keeps
        naming what it named before, so sectors intact before a failed write
        stay intact (a sector already rewritten since the last flush may then
        fail authentication: an I/O error, never wrong bytes).
        """
        count = len(data) // SECTOR_SIZE
        assert count * SECTOR_SIZE == len(data)
        for extent in range(first // EXTENT_SECTORS, (first + max(count, 1) - 1) // EXTENT_SECTORS + 1):
            self._map(extent)  # load (and authenticate) the maps first
        self._write_sealed(self._seal_sectors(first, data, self._generation))

    def seal_ahead(self, offset: int, data: bytes | bytearray | memoryview) -> SealedSectors | None:
        """Seal a write of whole sectors while changing nothing and taking no lock, so that a
        server can seal one request while another is being written; None if that cannot be
        done ahead (not whole sectors, out of range, or a map not loaded yet).

        The slots are picked from the persisted maps, which only flush() changes: a flush
        that ran meanwhile makes write_sealed() refuse, and the write is done afresh.
        """
        if offset < 0 or offset % SECTOR_SIZE or len(data) % SECTOR_SIZE or not data \
                or offset + len(data) > self.sectors * SECTOR_SIZE:
            return None
        first, last = offset // SECTOR_SIZE, (offset + len(data)) // SECTOR_SIZE - 1
        generation = self._generation  # read before the maps: see flush()
        if any(e not in self._maps for e in range(first // EXTENT_SECTORS, last // EXTENT_SECTORS + 1)):
            return None
        return self._seal_sectors(first, data, generation)

    def write_sealed(self, sealed: SealedSectors) -> bool:
        """Write what seal_ahead() sealed if no flush has run since; False (nothing written) if one has."""
        if sealed.generation != self._generation:
            return False
        self._write_sealed(sealed)
        return True

    def _seal_sectors(self, first: int, data: bytes | bytearray | memoryview, generation: int) -> SealedSectors:
        """Each sector sealed for the slot a write of it goes to, in runs contiguous in the image;
        ``generation`` is the number the caller read before the maps."""
        count = len(data) // SECTOR_SIZE
        self._spend(count)
        slots = [self._next_slot(s) for s in range(first, first + count)]
        placed = [(s, sector_offset(s, slot)) for s, slot in zip(range(first, first + count), slots)]
        view = memoryview(data)
        parts = []  # (image offset, sectors, block numbers, plaintext)
        for _start, contiguous in self._runs(placed):
            for run in self._one_slot_parts(contiguous, slots, first):
                slot = slots[run[0] - first]
                bn = sector_block_number(run[0], slot)
                parts.append((sector_offset(run[0], slot), run, range(bn, bn + 2 * len(run), 2),
                              view[(run[0] - first) * SECTOR_SIZE:(run[-1] - first + 1) * SECTOR_SIZE]))
        sealed = self.sealer.seal_jobs([(numbers, plain) for _o, _r, numbers, plain in parts])
        return SealedSectors(first, slots, [(offset, run, blob) for (offset, run, _n, _p), blob in zip(parts, sealed)],
                             generation)

    @staticmethod
    def _one_slot_parts(run: list[int], slots: list[int], first: int) -> list[list[int]]:
        """Split a run contiguous in the image into runs of consecutive sectors in one slot.

        A run is one slot's consecutive sectors except where a group's slot-B chunk meets the
        next group's slot-A chunk, which are adjacent in the image: there the slot changes,
        and with it every sector's block number."""
        if slots[run[0] - first] == slots[run[-1] - first]:  # the slot changes at most once (B to A)
            return [run]
        split = next(k for k, sector in enumerate(run) if slots[sector - first] != slots[run[0] - first])
        return [run[:split], run[split:]]

    def _write_sealed(self, sealed: SealedSectors) -> None:
        for start, run, blob in sealed.runs:
            pwrite_all(self.fd, blob, start)
            for s in run:
                extent, i = divmod(s, EXTENT_SECTORS)
                _set(self._maps[extent].current, i, sealed.slots[s - sealed.first])
                self._dirty.add(extent)

    def _next_slot(self, sector: int) -> int:
        """The slot a write of ``sector`` goes to: never the one the persisted map names."""
        extent, i = divmod(sector, EXTENT_SECTORS)
        return SLOT_B if _get(self._maps[extent].persisted, i) == SLOT_A else SLOT_A

    def forget_sectors(self, first: int, end: int) -> None:
        """Discard whole sectors [first, end) (SectorIO.discard): see the module invariants."""
        now = []
        for s in range(first, end):
            extent, i = divmod(s, EXTENT_SECTORS)
            m = self._map(extent)
            persisted = _get(m.persisted, i)
            current = _get(m.current, i)
            if current != UNWRITTEN and current != persisted:
                now.append((s, current))
            if persisted != UNWRITTEN:
                self._punch_later.append((s, persisted))
            _set(m.current, i, UNWRITTEN)
            self._dirty.add(extent)
        self._punch(now)

    def _punch(self, slots: list[tuple[int, int]]) -> None:
        """Punch sector slots, merged into runs: only whole filesystem blocks can be freed."""
        located = sorted((s, sector_offset(s, slot)) for s, slot in slots)
        located.sort(key=lambda item: item[1])
        for start, run in self._runs(located):
            punch_hole(self.fd, start, len(run) * SEALED_BLOCK)

    def flush(self) -> None:
        """Make everything written so far durable; see the module invariants."""
        if not self._dirty:
            os.fsync(self.fd)
            self._unsynced = False
            return
        os.fdatasync(self.fd)  # the sectors, and the previous flush's mirror writes
        records = []
        for extent in sorted(self._dirty):
            m = self._maps[extent]
            plain = _map_record(m.seq + 1, bytes(m.current))
            self._write_map(extent, 1 - m.slot, plain)
            records.append((extent, plain))
        os.fsync(self.fd)  # the commit
        for extent, _plain in records:
            m = self._maps[extent]
            m.seq, m.slot = m.seq + 1, 1 - m.slot
            m.persisted = bytearray(m.current)
        self._generation += 1  # after the maps: a seal_ahead() that read the old number is refused
        self._dirty.clear()
        self._unsynced = True
        try:
            for extent, plain in records:  # the mirrors: the next flush commits to these slots
                self._write_map(extent, 1 - self._maps[extent].slot, plain)
        except OSError as e:  # the flush is durable; the damaged mirror is what the next one overwrites
            log.warning("sector map mirror write failed (the flush itself is durable): %s", e.strerror)
        self._punch([(s, slot) for s, slot in self._punch_later if self._state(s) != slot])
        self._punch_later.clear()
