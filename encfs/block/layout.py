"""Where things live in a volume image: pure offset arithmetic.

Image layout (docs/FORMAT.md section 7)::

    [0, 64 KiB)        header copy 0
    [64 KiB, 128 KiB)  header copy 1
    [128 KiB, ...)     extents, each EXTENT_SECTORS sectors:
        map slot 0, map slot 1          (SEALED_BLOCK bytes each)
        GROUPS_PER_EXTENT groups, each:
            slot-A chunk: GROUP_SECTORS sealed sectors
            slot-B chunk: GROUP_SECTORS sealed sectors

Every sector has two slots; the extent's sector map says which slot holds
its current contents (or that it was never written). Slots of one group are
contiguous, so sequential I/O stays sequential within 1 MiB chunks; growing
a volume appends extents without moving anything.
"""

from __future__ import annotations

from encfs.blocks import PLAIN_BLOCK, SEALED_BLOCK

SECTOR_SIZE = PLAIN_BLOCK  # 4096
HEADER_SLOT = 64 * 1024
DATA_START = 2 * HEADER_SLOT
GROUP_SECTORS = 256
GROUPS_PER_EXTENT = 32
EXTENT_SECTORS = GROUP_SECTORS * GROUPS_PER_EXTENT  # 8192 sectors = 32 MiB of plaintext
MAP_BYTES = EXTENT_SECTORS * 2 // 8  # 2 bits per sector
GROUP_BYTES = 2 * GROUP_SECTORS * SEALED_BLOCK
EXTENT_BYTES = 2 * SEALED_BLOCK + GROUPS_PER_EXTENT * GROUP_BYTES

# Sector map states (2 bits per sector).
UNWRITTEN = 0
SLOT_A = 1
SLOT_B = 2


def header_offset(copy: int) -> int:
    return copy * HEADER_SLOT


def extent_offset(extent: int) -> int:
    return DATA_START + extent * EXTENT_BYTES


def map_offset(extent: int, slot: int) -> int:
    """Offset of one of an extent's two sector-map slots."""
    return extent_offset(extent) + slot * SEALED_BLOCK


def sector_offset(sector: int, slot: int) -> int:
    """Offset of slot ``slot`` (SLOT_A or SLOT_B) of ``sector``."""
    extent, within = divmod(sector, EXTENT_SECTORS)
    group, index = divmod(within, GROUP_SECTORS)
    chunk = 0 if slot == SLOT_A else 1
    return (extent_offset(extent) + 2 * SEALED_BLOCK + group * GROUP_BYTES
            + chunk * GROUP_SECTORS * SEALED_BLOCK + index * SEALED_BLOCK)


def extents_for(sectors: int) -> int:
    return -(-sectors // EXTENT_SECTORS)


def image_size(sectors: int) -> int:
    """Nominal (sparse) size of an image holding ``sectors`` sectors."""
    return extent_offset(extents_for(sectors))


def sector_block_number(sector: int, slot: int) -> int:
    """AEAD block number of a sector slot: binds the sector and the slot."""
    return sector * 2 + (slot - 1)


def map_block_number(extent: int, slot: int) -> int:
    """AEAD block number of a sector-map slot (a separate scope from sectors)."""
    return extent * 2 + slot


# -- Format 2: copy-on-write (cow.py; docs/FORMAT.md section 7.6) ----------------------------
#
#     [0, 128 KiB)        the two header copies, as in format 1
#     [128 KiB, 192 KiB)  commit slot 0 (one sealed block)
#     [192 KiB, 256 KiB)  commit slot 1
#     [256 KiB, ...)      the page pool: page p (p >= 1) is one sealed block, a data sector or a
#                         map node or a snapshot-table page; page number 0 means "none"

COMMIT_START = DATA_START
POOL_START = DATA_START + 2 * HEADER_SLOT
FANOUT = 1024  # u32 page numbers per map node (one 4 KiB page)
MAX_PAGES = (1 << 32) - 1  # page numbers are u32: the pool holds at most this many pages (~16 TiB)
MAX_DEPTH = 4  # map levels a commit record may name
MAX_COW_SIZE = FANOUT ** MAX_DEPTH * SECTOR_SIZE  # 4 PiB: the most sectors a map of MAX_DEPTH levels reaches


def commit_offset(slot: int) -> int:
    return COMMIT_START + slot * HEADER_SLOT


def page_offset(page: int) -> int:
    """Where page ``page`` (>= 1) of the pool starts."""
    return POOL_START + (page - 1) * SEALED_BLOCK


def node_block_number(level: int, index: int) -> int:
    """AEAD block number of map node ``index`` of ``level`` (0: the leaves): binds its place."""
    return level << 56 | index


def depth_for(sectors: int) -> int:
    """Levels of a map tree covering ``sectors`` sectors (at least 1: a lone leaf)."""
    depth, reach = 1, FANOUT
    while reach < sectors:
        depth, reach = depth + 1, reach * FANOUT
    return depth


def map_pages(sectors: int) -> int:
    """Map nodes of a fully written tree over ``sectors`` sectors."""
    total, level = 0, -(-sectors // FANOUT)
    while True:
        total += level
        if level == 1:
            return total
        level = -(-level // FANOUT)


def cow_image_bound(sectors: int, slack_pages: int) -> int:
    """The most bytes a format-2 image without snapshots allocates for ``sectors`` sectors: every
    sector written, its map written twice over (the committed and the next), ``slack_pages``
    pages freed by overwrites awaiting the next commit (cow.py commits before more pile up),
    and the snapshot table."""
    pages = sectors + 2 * map_pages(sectors) + slack_pages + 2
    return POOL_START + pages * SEALED_BLOCK
