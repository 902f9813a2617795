"""Which pages of a format-2 image's pool are free: the page accounting of cow.py.

Every page is FREE (free, still holding its bytes), HOLE (free, and punched:
its whole filesystem blocks were given back), USED (reached by the last
commit's live map or by a snapshot) or NEW (written in the open transaction,
reached only by the map in memory). Invariants:

- The accounting is never stored: rebuild() derives it from the trees at
  open and after a snapshot is deleted or rolled back to, so a crash can
  neither leak a page nor free one still reached. Which free pages are
  HOLE is read from the image (SEEK_HOLE); a page taken for FREE when it
  is punched costs only a less good choice in alloc().
- A NEW page the live map drops is free at once (no commit reached it); a
  USED one waits in ``pending`` for the next durable commit, then is freed
  unless a snapshot holds it. A snapshot holds a page exactly when the page
  was born in a transaction at or before the newest snapshot's (ZFS's
  birth-time rule: snapshots are taken of committed states, and a page
  born later cannot be in one). Pages born NEVER_HELD (the snapshot table)
  are never held.
- The bound: at most allowance() free pages hold their bytes (1/32 of the
  pages in use, at least SLACK_MIN, at most ``slack``), plus one write.
  alloc() reuses FREE pages before any other: a FREE run that fits
  (searched from where the last allocation ended, so sequential writes
  stay sequential); else, while more than the allowance of FREE pages lie
  elsewhere, scattered FREE pages; else a HOLE run that fits; else, while
  more than the allowance of free pages lie elsewhere, scattered HOLE
  pages; else the pool's end. Taking a punched run while freed pages still
  held their bytes let the image grow without bound once a discard had
  punched holes (8.2 times the data after eight overwrite passes); growing
  the pool for a write longer than every punched run did too (4.1 times
  the data after forty rounds of short discards and 1 MiB writes). Filling
  scattered pages first, always, broke 1 MiB writes into ~10 image writes
  each once a volume had been overwritten at random.
- Pages are 4124 bytes, so only runs of them free whole filesystem blocks:
  punch_pages() merges a run with the free pages beside it and punches the
  whole blocks it covers; a failed punch loses nothing (the pages stay free
  and are reused).
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from collections.abc import Iterable

from encfs.block.layout import MAX_PAGES, page_offset
from encfs.block.sectors import punch_hole
from encfs.blocks import SEALED_BLOCK

log = logging.getLogger("encfs.block")

FREE, USED, NEW, HOLE = 0, 1, 2, 3
SLACK_MIN, SLACK_SHARE = 64, 32  # allowance(): at least 256 KiB of pages, else 1/32 of those in use
NEVER_HELD = (1 << 64) - 1  # the birth of snapshot-table pages: no snapshot holds them
FS_BLOCK = 4096  # the image's filesystem block (ext4, xfs, tmpfs here): only whole ones are freed
_NEW_TO_USED = bytes(USED if b == NEW else b for b in range(256))
_FREE_TO_HOLE = bytes(HOLE if b == FREE else b for b in range(256))


class PagePool:
    """The page states of one open image. Not thread-safe (cow.py calls it under the server's lock)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.state = bytearray([USED])  # page 0 is "none", never allocated
        self.birth = array("Q", [0])
        self.free = 0  # FREE and HOLE pages
        self.holes = 0  # HOLE pages: free, and punched
        self._cursor = 1
        self.new: list[tuple[int, int]] = []  # runs (first page, count) allocated since the last commit
        self.pending: list[tuple[int, bool]] = []  # (page, punch once free): freed at the next commit
        self.latest_snapshot = 0  # the transaction of the newest snapshot
        self.slack = 0  # the most pages allowance() grants, whatever the pool holds (cow.py's pending limit)
        self.lowest_first = False  # compaction: alloc(1) takes the lowest free page, punched or not
        self._hints = {FREE: 1, HOLE: 1}  # no page of that kind below (while lowest_first; rewind())

    @property
    def pages(self) -> int:
        return len(self.state) - 1

    @property
    def holding(self) -> int:
        """Free pages that still hold their bytes (FREE, not HOLE)."""
        return self.free - self.holes

    def allowance(self) -> int:
        """How many pages may hold their bytes while free, and how many freed pages may wait for
        a commit: 1/32 of the pages in use (at least SLACK_MIN), at most ``slack``. Relative to
        the data, not to the volume's size, so that a half-full volume keeps the same bound."""
        return min(self.slack, max(SLACK_MIN, self.used_pages() // SLACK_SHARE))

    def used_pages(self) -> int:
        """Pages of the pool that are not free."""
        return len(self.state) - 1 - self.free

    def rebuild(self, pages: int, txg: int, latest_snapshot: int, held: Iterable[int], live: Iterable[int],
                never_held: Iterable[int], punch: bool) -> None:
        """States for a pool of ``pages`` at the start of transaction ``txg``: ``held`` pages are
        reached by snapshots (the newest of which froze ``latest_snapshot``), ``live`` by the
        committed live map, ``never_held`` by the snapshot table; the rest are free (and, with
        ``punch``, punched). A live page gets birth txg - 1, the committed state it is in: a
        snapshot taken before the next commit freezes that state, and must hold it."""
        state = bytearray(pages + 1)
        birth = array("Q", bytes(8 * (pages + 1)))
        state[0] = USED  # page 0 is "none", never allocated
        for page in held:
            state[page] = USED  # birth 0: at or before any snapshot
        for page in live:
            if not state[page]:
                state[page] = USED
                birth[page] = txg - 1
        for page in never_held:
            state[page] = USED
            birth[page] = NEVER_HELD
        self.state, self.birth = state, birth
        self.free, self.holes = state.count(FREE), 0
        self.latest_snapshot = latest_snapshot  # below txg - 1: a snapshot's table is committed after it
        self.new, self.pending = [], []
        if punch:
            self.punch_free()
        else:
            self._find_holes()

    def _find_holes(self) -> None:
        """Mark HOLE the free pages whose whole filesystem blocks a punch gave back (SEEK_HOLE),
        so that alloc() reuses the free pages that still hold bytes first."""
        state, fd = self.state, self.fd
        size = page_offset(len(state))
        at = page_offset(1)
        while at < size:
            try:
                hole = os.lseek(fd, at, os.SEEK_HOLE)
                if hole >= size:
                    return
                try:
                    data = os.lseek(fd, hole, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = size
            except OSError as e:  # no SEEK_HOLE here: every free page counts as holding its bytes
                log.warning("cannot find the image's holes: %s", e.strerror)
                return
            self._mark_holes(hole, data)
            at = data

    def _mark_holes(self, start: int, end: int) -> None:
        """The FREE pages whose bytes all lie in the punched range [start, end) are HOLE."""
        state = self.state
        lo = max(1, -(-(start - page_offset(1)) // SEALED_BLOCK) + 1)
        hi = min(len(state), (end - page_offset(1)) // SEALED_BLOCK + 1)
        if lo < hi:
            self.holes += state.count(FREE, lo, hi)
            state[lo:hi] = state[lo:hi].translate(_FREE_TO_HOLE)

    def punch_free(self) -> None:
        """Punch every free page that holds bytes (merged into runs): the space of a deletion
        whose process died between its commit and its punch is given back by the next deletion
        of the same snapshot."""
        if self.holding:
            state = self.state
            self.punch_pages([p for p in range(1, len(state)) if state[p] == FREE])

    def alloc(self, n: int, txg: int) -> list[tuple[int, int]]:
        """Runs (first page, count) of ``n`` free pages, marked NEW, born ``txg``: one run if a free
        run that long exists; else the pool grows, from its free tail, while at most ``slack``
        pages lie free elsewhere; past that, scattered free pages are taken (module invariants)."""
        state, runs = self.state, []
        p = -1
        if self.lowest_first and n == 1:
            p = self._lowest()
        elif self.holding >= n:  # a filling pool has none: no search of the whole pool per write
            p = self._find(bytes(n))  # FREE is 0
        if p >= 0:
            runs.append((p, n))
        else:
            tail = len(state)
            trailing = 0  # free pages ending the pool
            if self.free:
                trailing = tail - 1 - max(state.rfind(USED), state.rfind(NEW))
            allowance = self.allowance()
            holding = self.holding - state.count(FREE, tail - trailing)
            need = self._scattered(FREE, n, n, trailing, holding - allowance, runs)
            if need and self.holes >= need:  # a punched run that fits (new blocks either way)
                p = self._find(bytes([HOLE]) * need)
                if 0 <= p < tail - trailing:
                    runs.append((p, need))
                    need = 0
            # else punched pages wherever they are, while more than the allowance lie free
            need = self._scattered(HOLE, n, need, trailing, self.free - trailing - allowance, runs)
            if need:  # the free tail, grown by what it lacks
                grow = max(0, need - trailing)
                if tail - 1 + grow > MAX_PAGES:
                    raise OSError(errno.ENOSPC, "the volume image has reached its largest size")
                state.extend(bytes(grow))
                self.birth.extend(array("Q", bytes(8 * grow)))
                self.free += grow
                runs.append((tail - trailing, need))
        for p, k in runs:
            self.holes -= state.count(HOLE, p, p + k)
            state[p:p + k] = bytes([NEW]) * k
            self.birth[p:p + k] = array("Q", [txg]) * k
            self.new.append((p, k))
        self.free -= n
        self._cursor = runs[-1][0] + runs[-1][1]
        return runs

    def _find(self, run: bytes) -> int:
        """Where ``run`` (page states) first appears from where the last allocation ended, then
        from page 1; -1 if nowhere."""
        p = self.state.find(run, self._cursor)
        if p < 0 and self._cursor > 1:
            p = self.state.find(run, 1)
        return p

    def _scattered(self, kind: int, n: int, need: int, trailing: int, budget: int,
                   runs: list[tuple[int, int]]) -> int:
        """Add to ``runs`` pages of ``kind`` wherever they lie before the ``trailing`` free pages
        that end the pool, lowest first, while fewer than ``budget`` of the write's ``n`` pages
        are taken; the pages still needed."""
        state, end, pos = self.state, len(self.state) - trailing, 1
        while need > trailing and n - need < budget:
            p = state.find(kind, pos)
            if p < 0 or p >= end:
                break
            q = p + 1
            while q < end and q - p < need and state[q] == kind:
                q += 1
            runs.append((p, q - p))
            need, pos = need - (q - p), q
        return need

    def _lowest(self) -> int:
        """The lowest free page (-1: none). Pages are only taken while lowest_first holds (a
        commit's releases come after its allocations, and rewind() starts again), so each hint
        only moves up: one search of the pool per compaction pass, not one per page."""
        state, found = self.state, []
        for kind in (FREE, HOLE):
            h = self._hints[kind]
            if h >= 0:
                h = self._hints[kind] = state.find(kind, h)
            if h >= 0:
                found.append(h)
        return min(found, default=-1)

    def rewind(self) -> None:
        """The next allocations search from page 1: compaction fills the lowest free pages."""
        self._cursor = 1
        self._hints = {FREE: 1, HOLE: 1}

    def movable(self, page: int) -> bool:
        """Whether only the live map (or the snapshot table) reaches a USED page: no snapshot
        holds it, so compaction may move it."""
        birth = self.birth[page]
        return birth == NEVER_HELD or birth > self.latest_snapshot

    def trim(self) -> int:
        """Cut the free pages that end the pool (the caller commits the smaller pool, then cuts
        the image); the number cut."""
        state = self.state
        last = max(state.rfind(USED), state.rfind(NEW))
        cut = len(state) - 1 - last
        if cut > 0:
            self.holes -= state.count(HOLE, last + 1)
            del state[last + 1:]
            del self.birth[last + 1:]
            self.free -= cut
            self._cursor = min(self._cursor, last + 1)
        return cut

    def unalloc(self, runs: list[tuple[int, int]]) -> None:
        """Give back pages alloc() handed out for a write that failed."""
        for p, k in runs:
            self.state[p:p + k] = bytes(k)
            self.free += k

    def drop(self, page: int, punch: list[int] | None = None) -> None:
        """The live map no longer reaches ``page``; with ``punch``, its space is to be given back
        (the page joins that list once it is free, for punch_pages())."""
        if not page:
            return
        if self.state[page] == NEW:  # never committed: garbage at once
            self.state[page] = FREE
            self.free += 1
            if punch is not None:
                punch.append(page)
        else:
            self.pending.append((page, punch is not None))

    def release(self, page: int, punch: list[int] | None = None) -> None:
        """After a commit: free a page the live map dropped, unless a snapshot holds it."""
        birth = self.birth[page]
        if birth != NEVER_HELD and birth <= self.latest_snapshot:
            return
        self.state[page] = FREE
        self.free += 1
        if punch is not None:
            punch.append(page)

    def committed(self, punch: list[int]) -> None:
        """A commit is durable: NEW pages are USED, pending ones released; punch what is to be."""
        state = self.state
        for p, k in self.new:  # a run's pages dropped meanwhile are FREE: translate leaves them
            state[p:p + k] = state[p:p + k].translate(_NEW_TO_USED)
        for page, discarded in self.pending:
            self.release(page, punch if discarded else None)
        self.new, self.pending = [], []
        self.punch_pages(punch)

    def punch_pages(self, pages: list[int]) -> None:
        """Punch free pages, merged into runs with the free pages beside them, each run cut to
        the filesystem blocks it covers whole (see the module invariants): a run covering none is
        skipped, not zeroed. The FREE pages of a punched run become HOLE."""
        state = self.state
        pages.sort()
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            # Free pages beside the run join it; of punched ones, one on each side is enough to
            # reach the end of a block the run shares (a page is longer than a block), and a long
            # punched run beside it is not walked again.
            lo, hi = pages[i], pages[j - 1] + 1
            while lo > 1 and state[lo - 1] == FREE:
                lo -= 1
            if lo > 1 and state[lo - 1] == HOLE:
                lo -= 1
            while hi < len(state) and state[hi] == FREE:
                hi += 1
            if hi < len(state) and state[hi] == HOLE:
                hi += 1
            start, end = _whole_blocks(lo, hi)
            if end > start:
                try:
                    punch_hole(self.fd, start, end - start)
                except OSError as e:
                    log.warning("free pages %d-%d not punched: %s", lo, hi - 1, e.strerror)
                    return
                self._mark_holes(start, end)
            while j < len(pages) and pages[j] < hi:  # pages the merged run took in
                j += 1
            i = j


def _whole_blocks(lo: int, hi: int) -> tuple[int, int]:
    """The byte range of the filesystem blocks that pages [lo, hi) cover whole (empty: end <= start)."""
    return (-(-page_offset(lo) // FS_BLOCK) * FS_BLOCK,
            (page_offset(hi - 1) + SEALED_BLOCK) // FS_BLOCK * FS_BLOCK)

