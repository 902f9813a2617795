"""The records of a format-2 image besides its pages: the commit record and the snapshot table
(docs/FORMAT.md section 7.7). Plaintext only: cow.py seals them.

Invariants:
- A commit record is one 4096-byte block: little-endian header (COMMIT_FORMAT) then the snapshot
  table's page numbers (u32 each), then the count of listed pages (u16) and each listed page
  (WRITTEN_ENTRY: u32 page, 16-byte digest; commitcheck.py), zero padded; parse() returns None for
  anything else, so a slot that authenticates but does not parse counts as damaged. A record
  without a list has a zero count there, as every record written before lists existed.
- The snapshot table is u32 length + compact JSON, cut into 4096-byte pages (zero padded).
"""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import asdict, dataclass, field

from encfs.block.layout import MAX_DEPTH, SECTOR_SIZE

COMMIT_MAGIC = b"ENCVCOMM"
COMMIT_FORMAT = struct.Struct("<8sQQIB3xIH")  # magic, txg, table txg, root page, depth, pages, table pages
MAX_TABLE_PAGES = (SECTOR_SIZE - COMMIT_FORMAT.size) // 4
WRITTEN_COUNT = struct.Struct("<H")
WRITTEN_ENTRY = struct.Struct("<I16s")  # a listed page and the digest of its sealed bytes


@dataclass
class Snapshot:
    id: str
    root: int
    depth: int
    size: int  # bytes
    created: float
    txg: int  # the committed transaction it froze
    description: str = ""


@dataclass
class Commit:
    txg: int
    table_txg: int
    root: int
    depth: int
    pages: int
    table: list[int]
    written: list[tuple[int, bytes]] = field(default_factory=list)  # (page, digest): commitcheck.py

    def room(self) -> int:
        """How many pages the record can list beside its table."""
        return room_for(len(self.table))

    def pack(self) -> bytes:
        body = COMMIT_FORMAT.pack(COMMIT_MAGIC, self.txg, self.table_txg, self.root, self.depth, self.pages,
                            len(self.table))
        if len(self.written) > self.room():
            raise ValueError("more listed pages than a commit record holds")
        listed = b"".join(WRITTEN_ENTRY.pack(page, digest) for page, digest in self.written)
        if listed:
            listed = WRITTEN_COUNT.pack(len(self.written)) + listed
        return (body + array("I", self.table).tobytes() + listed).ljust(SECTOR_SIZE, b"\0")

    @classmethod
    def parse(cls, plain: bytes) -> Commit | None:
        if len(plain) != SECTOR_SIZE:
            return None
        magic, txg, table_txg, root, depth, pages, n = COMMIT_FORMAT.unpack_from(plain)
        if magic != COMMIT_MAGIC or n > MAX_TABLE_PAGES or not 1 <= depth <= MAX_DEPTH:
            return None
        table = array("I")
        at = COMMIT_FORMAT.size + 4 * n
        table.frombytes(plain[COMMIT_FORMAT.size:at])
        m, = WRITTEN_COUNT.unpack_from(plain, at)  # in every record: n <= MAX_TABLE_PAGES leaves it room
        if m > room_for(n):
            return None
        at += WRITTEN_COUNT.size
        written = [WRITTEN_ENTRY.unpack_from(plain, at + i * WRITTEN_ENTRY.size) for i in range(m)]
        return cls(txg, table_txg, root, depth, pages, list(table), written)


def room_for(table_pages: int) -> int:
    """Listed pages that fit in a commit record beside a table of ``table_pages`` pages."""
    return max(0, (SECTOR_SIZE - COMMIT_FORMAT.size - 4 * table_pages - WRITTEN_COUNT.size) // WRITTEN_ENTRY.size)




def pack_table(snapshots: list[Snapshot]) -> bytes:
    data = json.dumps([asdict(s) for s in snapshots], separators=(",", ":")).encode()
    return len(data).to_bytes(4, "little") + data


def parse_table(data: bytes | bytearray) -> list[Snapshot]:
    if not data:
        return []
    n = int.from_bytes(data[:4], "little")
    return [Snapshot(**s) for s in json.loads(data[4:4 + n])]
