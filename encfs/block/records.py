"""The records of a format-2 image besides its pages: the commit record and the snapshot table
(docs/FORMAT.md section 7.7). Plaintext only: cow.py seals them.

Invariants:
- A commit record is one 4096-byte block: little-endian header (COMMIT_FORMAT) then the snapshot
  table's page numbers (u32 each), zero padded; parse() returns None for anything else, so
  a slot that authenticates but does not parse counts as damaged.
- The snapshot table is u32 length + compact JSON, cut into 4096-byte pages (zero padded).
"""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import asdict, dataclass

from encfs.block.layout import MAX_DEPTH, SECTOR_SIZE

COMMIT_MAGIC = b"ENCVCOMM"
COMMIT_FORMAT = struct.Struct("<8sQQIB3xIH")  # magic, txg, table txg, root page, depth, pages, table pages
MAX_TABLE_PAGES = (SECTOR_SIZE - COMMIT_FORMAT.size) // 4


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

    def pack(self) -> bytes:
        body = COMMIT_FORMAT.pack(COMMIT_MAGIC, self.txg, self.table_txg, self.root, self.depth, self.pages,
                            len(self.table))
        return (body + array("I", self.table).tobytes()).ljust(SECTOR_SIZE, b"\0")

    @classmethod
    def parse(cls, plain: bytes) -> Commit | None:
        if len(plain) != SECTOR_SIZE:
            return None
        magic, txg, table_txg, root, depth, pages, n = COMMIT_FORMAT.unpack_from(plain)
        if magic != COMMIT_MAGIC or n > MAX_TABLE_PAGES or not 1 <= depth <= MAX_DEPTH:
            return None
        table = array("I")
        table.frombytes(plain[COMMIT_FORMAT.size:COMMIT_FORMAT.size + 4 * n])
        return cls(txg, table_txg, root, depth, pages, list(table))




def pack_table(snapshots: list[Snapshot]) -> bytes:
    data = json.dumps([asdict(s) for s in snapshots], separators=(",", ":")).encode()
    return len(data).to_bytes(4, "little") + data


def parse_table(data: bytes | bytearray) -> list[Snapshot]:
    if not data:
        return []
    n = int.from_bytes(data[:4], "little")
    return [Snapshot(**s) for s in json.loads(data[4:4 + n])]
