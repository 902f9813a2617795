"""``encfs fsck VOL``: check a detached volume image (either format) and, in format 2, every
snapshot in it; repair what can be repaired without losing anything readable.

What is checked, reading the image only:
- both header copies: each must be byte for byte the newest header that authenticates
  (header.read_verified: its checksum, its MAC, its wrapped key unwrapping under the CMK it
  names); a damaged or stale copy is an error the repair rewrites (write_header writes both).
- format 1 (sectors.py): both sector-map slots of every extent (mirrors: equal sequence
  numbers), then every written sector's AEAD tag, in the slot its map names.
- format 2 (fsckcow.py): both commit slots (mirrors: the same transaction), the snapshot
  table, every map node of the live map and of each snapshot's map, every data page the live
  map reaches, then each snapshot's pages that no tree checked before it reaches (trees share
  pages: each page is opened once); and the pages no tree reaches (free space).
- Sectors are read in runs of up to CHUNK sectors through the stores' own read paths
  (SectorStore's slot runs, cow.read_tree_into), while a thread has the kernel read the next
  runs' image ranges (POSIX_FADV_WILLNEED), so that the disk reads ahead while sectors are opened.

What ``--repair`` does (it opens the volume as an attach does, open_volume(), which takes the
image's lock, so it may also upgrade a volume made by an older encfs, as any attach would):
- rewrites a damaged or stale header copy from the one that authenticates;
- rewrites a damaged or stale commit slot (format 2) or sector-map slot (format 1) from its
  mirror, which authenticates (the stores' own load and mirror logic);
- cuts off pages past a format-2 image's last commit (written after it: no commit reaches them)
  and, past the pool's usual slack, gives back the space of free pages no tree reaches.
What it never does: a sector, map node, snapshot table or the only good copy of anything that
fails authentication is left as it is and listed (exit 4); nothing is rewritten that could turn
into other bytes. Free pages are not given back while a map node is damaged: the sectors under
it may still lie in pages that look free, and are left for a recovery that rebuilds the node.
Findings after a repair come from a second check of everything but the sectors (which no
repair changes).

Invariants:
- Without ``repair`` the image is opened read-only and nothing is written.
- A volume attached or opened by another encfs process is refused (flock, and attach's
  registry in fsckcli), never checked under a running daemon.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from encfs.block.header import RECORD, VolumeFormatError, VolumeHeader, header_mac_key
from encfs.block.layout import (
    EXTENT_SECTORS,
    SECTOR_SIZE,
    extents_for,
    header_offset,
    image_size,
    sector_offset,
)
from encfs.block.sectors import SectorStore
from encfs.block.volume import VolumeError, _read_verified, open_locked, open_volume
from encfs.blocks import SEALED_BLOCK, BlockAuthError
from encfs.fsckreport import WARNING, Finding, Report, quiet, sector_runs
from encfs.keys.service import KeyService
from encfs.progress import Progress, progress

CHUNK = 2048  # sectors per read (8 MiB): large runs
AHEAD = 4  # chunks read into the page cache ahead of the one being opened


def check_volume(path: Path, ks: KeyService, repair: bool = False) -> Report:
    """Check the volume at ``path`` (detached) and, with ``repair``, repair what is repairable."""
    start = time.monotonic()
    with quiet("encfs.block"):
        report = _check(path, ks, data=True)
        if repair and any(f.repairable for f in report.findings):
            _repair(path, ks, report)
            again = _check(path, ks, data=False)
            still = {f.key for f in again.findings}
            known = {f.key for f in report.findings}
            for f in report.findings:
                f.repaired = f.repairable and f.key not in still
            report.findings += [f for f in again.findings if f.key not in known]
    report.repair = repair
    report.seconds = time.monotonic() - start
    return report


def _check(path: Path, ks: KeyService, data: bool) -> Report:
    fd = open_locked(path, writable=False, shared=True)
    try:
        try:
            header, key, problems = _read_verified(fd, path, ks, None)
        except VolumeFormatError as e:
            if e.message.startswith("not an encfs volume"):
                raise
            report = Report(str(path), "volume")
            report.add(Finding("header", f"header: {e.message}; nothing else can be checked"))
            return report
        report = Report(str(path), "volume", header.version,
                        counts={"sectors": header.sectors, "sectors_checked": 0, "damaged_sectors": 0})
        _check_headers(fd, header, key, problems, report)
        if header.copy_on_write:
            from encfs.block.fsckcow import check_cow

            check_cow(fd, path, header, key, report, data)
        else:
            _check_v1(fd, header, key, report, data)
        report.counts["damaged_sectors"] = sum(f.count for f in report.findings if f.kind == "sector")
        return report
    finally:
        os.close(fd)


def _check_headers(fd: int, header: VolumeHeader, key: bytes, problems: list[str], report: Report) -> None:
    """Each copy must hold exactly the newest header that authenticates (write_header writes both)."""
    good = header.pack(header_mac_key(key, header.volume_id) if header.authenticated else None)
    for copy in (0, 1):
        raw = os.pread(fd, RECORD, header_offset(copy))
        if raw == good:
            continue
        why = next((p.split(": ", 1)[1] for p in problems if p.startswith(f"header copy {copy}: ")), None)
        if why is None:
            try:
                why = f"holds an older header (sequence {VolumeHeader.parse(raw).seq}; the newest is {header.seq})"
            except VolumeFormatError as e:
                why = e.message
        report.add(Finding("header-copy", f"header copy {copy}: {why}; the other copy holds the header",
                           repairable=True, place=str(copy)))
    old = [what for flag, what in ((header.authenticated, "an authenticated header"),
                                   (header.maps_mirrored or header.copy_on_write, "mirrored sector maps")) if not flag]
    if old:
        report.add(Finding("upgrade", f"made by an older encfs (no {' and no '.join(old)}): the next attach "
                                      "upgrades it, as --repair does", WARNING, repairable=True, place="upgrade"))


class _Sectors(SectorStore):
    """A format-1 store with what fsck reads besides sectors."""

    def map_seqs(self, extent: int) -> list[int | None]:
        """The sequence number in each of ``extent``'s map slots; None where the slot fails."""
        return [None if (p := self._read_map(extent, slot)) is None else int.from_bytes(p[:8], "big")
                for slot in (0, 1)]

    def written_in(self, extent: int) -> Iterator[tuple[int, int]]:
        first = extent * EXTENT_SECTORS
        for s, n, state in self._slot_runs(first, min(EXTENT_SECTORS, self.sectors - first)):
            if state:
                yield s, n

    def read_into(self, first: int, count: int, out: memoryview) -> None:
        self._read_into(first, count, out, None)

    def ranges(self, first: int, count: int) -> list[tuple[int, int]]:
        """Where the slots that [first, first + count) read from lie in the image (only those: the
        page cache would fill the other slots' holes with zeros)."""
        return [(sector_offset(s, state), n * SEALED_BLOCK) for s, n, state in self._slot_runs(first, count) if state]


def _check_v1(fd: int, header: VolumeHeader, key: bytes, report: Report, data: bool) -> None:
    store = _Sectors(fd, key, header.volume_id, header.sectors)
    if os.fstat(fd).st_size < image_size(header.sectors):
        report.add(Finding("truncated", "the image is shorter than its header says: the sectors past its end "
                                        "read as I/O errors"))
    runs: list[tuple[int, int]] = []
    for extent in range(extents_for(header.sectors)):
        seqs = store.map_seqs(extent)
        lo, hi = extent * EXTENT_SECTORS, min((extent + 1) * EXTENT_SECTORS, header.sectors)
        where = f"extent {extent} (sectors {lo}-{hi - 1})"
        if seqs == [None, None]:
            report.add(Finding("map", f"{where}: both sector-map slots fail authentication: its written sectors "
                                      "read as I/O errors", sector=lo, count=hi - lo, place=str(extent)))
            continue
        for slot in (0, 1):
            other = seqs[1 - slot]
            assert other is not None or seqs[slot] is not None
            if seqs[slot] is None and header.maps_mirrored:
                report.add(Finding("map-slot", f"{where}: sector-map slot {slot} fails authentication; slot "
                                               f"{1 - slot} holds the map", repairable=True, place=f"{extent}/{slot}"))
            elif seqs[slot] is None:
                report.add(Finding("map-slot", f"{where}: sector-map slot {slot} fails authentication, and the "
                                               "other may hold an older map (the volume predates mirrored maps): "
                                               "`encfs volume attach --accept-rollback` uses it",
                                   place=f"{extent}/{slot}"))
            elif other is not None and (seqs[slot] or 0) < other and header.maps_mirrored:
                report.add(Finding("map-slot", f"{where}: sector-map slot {slot} holds an older map (sequence "
                                               f"{seqs[slot]}; the newest is {other}): the last flush's mirror was "
                                               "not written", repairable=True, place=f"{extent}/{slot}"))
        if data:
            runs += store.written_in(extent)
    if data:
        total = sum(n for _f, n in runs)
        with progress(total * SECTOR_SIZE, f"fsck {Path(report.target).name}") as bar:
            bad = verify(fd, runs, store.read_into, lambda e: e.block_no // 2, store.ranges, bar)
        report.counts["sectors_checked"] = total
        for first, n in sector_runs(bad):
            report.add(sector_finding(None, first, n))


def sector_finding(snapshot: str | None, first: int, n: int) -> Finding:
    what = "sector" if n == 1 else "sectors"
    where = f"{first}" if n == 1 else f"{first}-{first + n - 1}"
    owner = f"snapshot {snapshot}: " if snapshot else ""
    return Finding("sector", f"{owner}{what} {where} fail{'s' if n == 1 else ''} authentication (read as I/O "
                             "errors; not repairable)", snapshot=snapshot, sector=first, count=n)


def _read_ahead(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Have the kernel read ``ranges`` of the image into the page cache. POSIX_FADV_WILLNEED
    blocks while it queues the reads (0.18 s per GiB), so it runs on its own thread."""
    for offset, length in ranges:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def verify(fd: int, runs: Iterable[tuple[int, int]], read_into: Callable[[int, int, memoryview], None],
           sector_of: Callable[[BlockAuthError], int], ranges: Callable[[int, int], list[tuple[int, int]]],
           bar: Progress) -> list[int]:
    """Open every sector of ``runs`` with ``read_into(first, count, out)``, CHUNK sectors at a
    time; the sectors that fail authentication. A thread has the kernel read the image
    ``ranges(first, count)`` of the next AHEAD chunks meanwhile, so that the disk reads ahead
    while this thread opens sectors (twice as fast cold; benchmarks/HISTORY.md, 41e7eff)."""
    chunks = [(at, min(CHUNK, first + n - at)) for first, n in runs for at in range(first, first + n, CHUNK)]
    buf = memoryview(bytearray(CHUNK * SECTOR_SIZE))
    bad: list[int] = []
    with ThreadPoolExecutor(1, thread_name_prefix="fsck-read") as pool:
        ahead: deque[Future[None]] = deque()
        submitted = 0
        for first, n in chunks:
            while submitted < len(chunks) and len(ahead) <= AHEAD:
                ahead.append(pool.submit(_read_ahead, fd, ranges(*chunks[submitted])))
                submitted += 1
            ahead.popleft().result()  # this chunk's reads are queued
            at, end = first, first + n
            while at < end:
                try:
                    read_into(at, end - at, buf[:(end - at) * SECTOR_SIZE])
                    bar.update((end - at) * SECTOR_SIZE)
                    at = end
                except BlockAuthError as e:  # the sectors before it opened; go on after it
                    s = sector_of(e)
                    if not at <= s < end:
                        raise
                    bad.append(s)
                    bar.update((s + 1 - at) * SECTOR_SIZE)
                    at = s + 1
    return bad


def _repair(path: Path, ks: KeyService, report: Report) -> None:
    """Open the volume as an attach does (its load rewrites damaged or stale commit and map
    mirrors), then do what it leaves: both header copies, every map slot, free pages."""
    kinds = {f.kind for f in report.findings if f.repairable}
    try:
        vol = open_volume(path, ks)
    except VolumeError as e:
        report.add(Finding("repair", f"not repaired: {e.message}", place="open"))
        return
    try:
        if "header-copy" in kinds:
            vol.headers.update()
        if "map-slot" in kinds and isinstance(vol.store, SectorStore):
            vol.store.mirror_maps()
        if "free-pages" in kinds and not isinstance(vol.store, SectorStore):
            vol.store.punch_free()
        vol.store.sync_mirrors()
    except OSError as e:
        report.add(Finding("repair", f"repair failed: {e.strerror}", place="write"))
    finally:
        vol.close()

