"""Which commit record a format-2 open takes, and the page list that lets a commit need one fdatasync.

A volume whose header has ONE_SYNC_COMMITS (docs/FORMAT.md §7.6.7) commits a transaction of up to
some two hundred pages with one fdatasync: its commit record lists every page the transaction wrote
and the commit reaches (the pages the previous commit does not), each with the first 16 bytes of the
SHA-256 of its sealed bytes, and goes to the disk in the same sync as those pages. Two syncs, pages
then record, cost an SQLite commit on a volume twice the disk's flush latency (docs/dev/block-layer.md).

Invariants:
- A record whose transaction is in both slots is taken as it is: the mirror is written only after
  the commit's sync has returned, so every page the commit reaches is on the disk.
- A record with a list, in one slot only, may have reached the disk without some of its pages (a
  crash during the sync, which then was never acknowledged). It is taken only if every listed page
  holds the bytes its digest names and the image is as long as its pool; otherwise the other slot's
  record is taken: the previous commit, whose sync returned before this transaction wrote a page
  (and a page is never written while a durable commit reaches it), so it is whole.
- A record with no list was written after an fdatasync of everything it reaches: taken as it is.
- The open that chooses syncs first when it may write (cow.py load()), so that a slot that looks
  mirrored is not a mirror a killed process left unsynced, and then drops the image's page cache
  (drop_cached()): after a failed writeback the cache holds bytes the disk lacks, and a check there
  would pass. A reader beside a serving daemon drops the slots only (the daemon's cache is the truth
  while it runs).
- With the other slot damaged there is no previous commit to fall back to: the one record is taken,
  and if it has a list its pages are checked all the same, so that a mismatch is logged (a crash
  during that commit together with damage to the other slot, which the commit never writes).
- The list is read back from the image at the flush (the page cache holds what the sync will write),
  from the pool's NEW pages, not noted by each writer of pages, so no writer can be left out. A
  transaction with more pages than the record holds commits with two syncs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from encfs.block.layout import page_offset
from encfs.block.pages import NEW, PagePool
from encfs.block.records import Commit
from encfs.blocks import SEALED_BLOCK

DIGEST = 16  # bytes of SHA-256 kept per page: a torn or missing write matches with probability 2^-128


def page_digest(sealed: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(sealed).digest()[:DIGEST]


def list_new_pages(fd: int, pool: PagePool, room: int) -> list[tuple[int, bytes]]:
    """The pages written in the open transaction that its commit reaches (NEW), with their digests
    read back from the image; [] if there are none or more than ``room``."""
    if not 0 < sum(k for _p, k in pool.new) <= 4 * room:  # dropped pages count here: a cheap bound
        return []
    state, end = pool.state, len(pool.state)
    pages = list(dict.fromkeys(p for first, k in pool.new for p in range(first, min(first + k, end))
                               if state[p] == NEW))
    if not pages or len(pages) > room:
        return []
    return [(p, page_digest(os.pread(fd, SEALED_BLOCK, page_offset(p)))) for p in pages]


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the image's clean cached pages in a range (length 0: to the end), so that what is read
    next comes from the disk. After a failed writeback Linux keeps the unwritten bytes in the page
    cache, clean: a record or a page checked there would pass and be lost once evicted (dirty pages
    stay: a writable open syncs first). Only cached pages (folios: ext4 caches large ones) wholly
    inside the range are dropped, so a pool page's own range usually drops nothing; on tmpfs
    nothing is dropped, and there is no writeback to fail."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def unwritten(fd: int, commit: Commit) -> str | None:
    """Why ``commit`` is not whole on the disk (a listed page that does not hold what it wrote, or
    an image shorter than its pool), or None."""
    if os.fstat(fd).st_size < page_offset(commit.pages + 1):
        return f"the image ends before its last page ({commit.pages})"
    for page, digest in commit.written:
        if page_digest(os.pread(fd, SEALED_BLOCK, page_offset(page))) != digest:
            return f"page {page} does not hold what it wrote"
    return None


@dataclass
class Choice:
    """The commit an open takes, from ``slot``; ``newest`` is the highest transaction that
    authenticates (the next one is above it even when that one is passed over)."""

    slot: int
    commit: Commit
    newest: int
    mirrored: bool  # both slots hold it
    note: str = ""  # why a slot is not the volume's state (damaged, or a commit not written whole)


def choose_commit(fd: int, slots: list[Commit | None]) -> Choice | None:
    """The commit record an open takes from the two slots (the module invariants); None if
    neither authenticates."""
    found = sorted(((c.txg, slot, c) for slot, c in enumerate(slots) if c is not None), reverse=True,
                   key=lambda f: (f[0], f[1]))
    if not found:
        return None
    txg, slot, commit = found[0]
    if len(found) == 2 and found[1][0] == txg:
        return Choice(slot, commit, txg, True)
    why = (unwritten(fd, commit) if commit.written else None) or ""
    if len(found) < 2:
        return Choice(slot, commit, txg, False, f"commit slot {1 - slot} is damaged; using slot {slot} "
                                                f"(transaction {txg})" + (f", which did not reach the disk "
                                                f"whole ({why}): sectors it wrote may read as I/O errors "
                                                f"or as they were before" if why else ""))
    if not why:
        return Choice(slot, commit, txg, False)
    other_txg, other_slot, other = found[1]
    return Choice(other_slot, other, txg, False,
                  f"commit slot {slot} holds transaction {txg}, which did not reach the disk whole ({why}: "
                  f"a crash during its commit, never acknowledged); using slot {other_slot} (transaction "
                  f"{other_txg})")
