"""Damaged and tampered volume images, through the real CLI and real loop devices: tampered or swapped
sectors and a zeroed sector map read as I/O errors (never wrong bytes), a damaged map slot loses
nothing and is repaired, a volume from before mirrored maps with a damaged newest map attaches only
with --accept-rollback, and a damaged header copy (one: a warning; both: refused).

The ``Rig`` (tests/volume_helpers.py) undoes whatever a test set up, also when it fails.
"""

from __future__ import annotations

from pathlib import Path

from volume_helpers import (
    MiB,
    Rig,
    dd_read,
    dd_write,
    flip,
    pattern,
    patterns,
    py,
    pytestmark,  # noqa: F401 - root, /dev/fuse, loop devices, the tools
    read_ok,
    rig,
)

__all__ = ["rig"]  # the fixture, used by name

from encfs.block.layout import (
    EXTENT_SECTORS,
    HEADER_SLOT,
    SLOT_A,
    SLOT_B,
    map_offset,
    sector_offset,
)
from encfs.blocks import SEALED_BLOCK

# -- tampered sectors and sector maps --------------------------------------------------------------


def test_tampered_or_swapped_sectors_read_as_io_errors(rig: Rig) -> None:
    image = rig.create(fmt=1)  # format 1's slots; test_cow_store.py has format 2's
    loop = rig.attach(image)
    good = patterns(990, 20, 1)  # sectors 990..1009
    dd_write(loop, 990 * 4096, good, rig.tmp)
    swap = patterns(2000, 2, 1)
    dd_write(loop, 2000 * 4096, swap, rig.tmp)
    rig.detach(loop)

    # A first write of a sector lands in slot A; flip a byte in both slots anyway.
    for slot in (SLOT_A, SLOT_B):
        flip(image, sector_offset(1000, slot) + 100)
    with open(image, "r+b") as f:
        a0, a1 = sector_offset(2000, SLOT_A), sector_offset(2001, SLOT_A)
        f.seek(a0)
        s0 = f.read(SEALED_BLOCK)
        f.seek(a1)
        s1 = f.read(SEALED_BLOCK)
        assert s0 != bytes(SEALED_BLOCK) and s1 != bytes(SEALED_BLOCK)
        f.seek(a0)
        f.write(s1)
        f.seek(a1)
        f.write(s0)

    loop = rig.attach(image)
    for sector in (1000, 2000, 2001):
        r = dd_read(loop, sector * 4096, 4096)
        assert r.returncode != 0, f"sector {sector} was read despite tampering: {r.stdout[:32]!r}"
        assert b"Input/output error" in r.stderr, r.stderr
    for sector in range(990, 1010):
        if sector != 1000:
            assert read_ok(loop, sector * 4096, 4096) == pattern(sector, 1)
    assert read_ok(loop, 3000 * 4096, 4096) == bytes(4096)
    # each failure is logged with the image and the cause, once (issue #23)
    failures = [line for line in (rig.tmp / "daemon.log").read_text().splitlines() if "integrity failure" in line]
    assert failures and all(f"{str(image)!r}: block " in f and "(tampered)" in f for f in failures), failures
    assert len(failures) == len({f.split(" ERROR ")[1] for f in failures}), failures
    # a multi-sector read over the damage fails: never wrong bytes
    r = dd_read(loop, 996 * 4096, 8 * 4096)
    assert r.returncode != 0, "a read covering a tampered sector succeeded"
    assert r.stdout == b"" or r.stdout == good[6 * 4096:6 * 4096 + len(r.stdout)]
    # the daemon survives authentication failures, and a rewrite heals the sector
    [row] = rig.listed()
    assert row["State"] == "attached"
    dd_write(loop, 1000 * 4096, pattern(1000, 2), rig.tmp)
    assert read_ok(loop, 1000 * 4096, 4096) == pattern(1000, 2)
    rig.detach(loop)

    # a zeroed sector map does not make its extent read as "never written": it fails
    with open(image, "r+b") as f:
        for slot in (0, 1):
            f.seek(map_offset(1, slot))
            f.write(bytes(SEALED_BLOCK))
    loop = rig.attach(image)
    r = dd_read(loop, EXTENT_SECTORS * 4096 + 8 * MiB, 4096)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert read_ok(loop, 1000 * 4096, 4096) == pattern(1000, 2)
    rig.detach(loop)


def _damage_map(image: Path, extent: int, slot: int, how: str) -> bytes:
    """Flip one bit in, or zero, one sector-map slot of a detached volume; returns the damaged bytes."""
    with open(image, "r+b") as f:
        f.seek(map_offset(extent, slot))
        sealed = bytearray(f.read(SEALED_BLOCK))
        if how == "bit flip":
            sealed[700 + 1000 * slot] ^= 0x10
        else:
            sealed[:] = bytes(SEALED_BLOCK)
        f.seek(map_offset(extent, slot))
        f.write(sealed)
    return bytes(sealed)


def _map_slot(image: Path, extent: int, slot: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(map_offset(extent, slot))
        return f.read(SEALED_BLOCK)


# Makes a volume's header what the first release wrote: flag byte 5 = 0 (no mirrored maps, no header
# MAC) and the volume key wrapped with that release's context, in both copies. A subprocess: SoftHSM2
# takes one token directory per process, and this one may have loaded another.
CLEAR_FLAGS = r"""
import dataclasses, sys
from pathlib import Path
from encfs.block.header import read_header, write_header
from encfs.keys.service import KeyService
with KeyService.open(Path(sys.argv[1])) as ks, open(sys.argv[2], "r+b") as f:
    h, _w = read_header(f.fileno())
    wrapped = ks.re_encrypt(h.wrapped_key, h.context(), h.key_id, {"encfs:volume": h.volume_id.hex()},
                        encfs_internal=True)
    write_header(f.fileno(), dataclasses.replace(h, flags=0, wrapped_key=wrapped))
"""


def _clear_mirrored_flag(image: Path, home: Path) -> None:
    py(CLEAR_FLAGS, home, image)


def test_a_damaged_map_slot_loses_nothing_and_is_repaired(rig: Rig) -> None:
    """Both map slots hold the newest map at rest: a bit flip in either, or either zeroed, still reads
    back what was fsync'd last, and the daemon logs the damage and rewrites the slot."""
    image = rig.create(fmt=1)
    assert rig.info(image)["MapsMirrored"] is True
    loop = rig.attach(image)
    s = EXTENT_SECTORS + 1000  # in extent 1
    dd_write(loop, s * 4096, pattern(s, 1), rig.tmp)
    dd_write(loop, s * 4096, pattern(s, 2), rig.tmp)
    dd_write(loop, 10 * 4096, pattern(10, 1), rig.tmp)
    rig.detach(loop)
    log = rig.tmp / "daemon.log"
    extent_1 = f"extent 1 (plaintext bytes {EXTENT_SECTORS * 4096}-{2 * EXTENT_SECTORS * 4096 - 1})"
    # Each round damages one slot and relies on the other, which the round before repaired.
    for how, slot in (("bit flip", 1), ("bit flip", 0), ("zeroed", 1), ("zeroed", 0)):
        seen = log.read_text() if log.exists() else ""
        damaged = _damage_map(image, 1, slot, how)
        loop = rig.attach(image)
        assert read_ok(loop, s * 4096, 4096) == pattern(s, 2), f"{how} in map slot {slot} rolled sector {s} back"
        rig.detach(loop)
        logged = log.read_text()[len(seen):]
        assert f"sector map of {extent_1} is damaged in slot {slot}" in logged, logged
        assert f"rewriting slot {slot}" in logged
        assert _map_slot(image, 1, slot) != damaged, f"map slot {slot} was not repaired"
    # both slots damaged: that extent's sectors are EIO, the other extent's read fine
    for slot in (0, 1):
        _damage_map(image, 1, slot, "bit flip")
    loop = rig.attach(image)
    for sector in (s, EXTENT_SECTORS, 2 * EXTENT_SECTORS - 1):
        r = dd_read(loop, sector * 4096, 4096)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, f"sector {sector} read despite its map"
    assert read_ok(loop, 10 * 4096, 4096) == pattern(10, 1)
    assert read_ok(loop, (EXTENT_SECTORS - 1) * 4096, 4096) == bytes(4096)
    rig.detach(loop)


def test_an_old_style_volume_with_a_damaged_newest_map_refuses_to_attach(rig: Rig) -> None:
    """A volume made before mirrored maps holds the newest and the previous map: a damaged newest is
    refused in one line naming the extent and --accept-rollback, which then attaches with the older map."""
    image = rig.create(fmt=1)
    loop = rig.attach(image)
    s = EXTENT_SECTORS + 1000
    dd_write(loop, s * 4096, pattern(s, 1), rig.tmp)
    rig.detach(loop)
    previous = _map_slot(image, 1, 0)  # the map naming pattern 1 (both slots hold it)
    loop = rig.attach(image)
    dd_write(loop, s * 4096, pattern(s, 2), rig.tmp)
    rig.detach(loop)

    def make_old_style() -> None:  # slot 0 the previous map, slot 1 the newest, flag byte 0
        with open(image, "r+b") as f:
            f.seek(map_offset(1, 0))
            f.write(previous)
        _clear_mirrored_flag(image, rig.home)
        assert rig.info(image)["MapsMirrored"] is False

    make_old_style()  # intact: attaches as it is, and is upgraded
    loop = rig.attach(image)
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 2)
    rig.detach(loop)
    assert rig.info(image)["MapsMirrored"] is True and rig.info(image)["Warnings"] == []

    make_old_style()
    _damage_map(image, 1, 1, "bit flip")
    msg = rig.fails("volume", "attach", image)
    assert f"extent 1 (plaintext bytes {EXTENT_SECTORS * 4096}-{2 * EXTENT_SECTORS * 4096 - 1}) " \
           "is damaged in slot 1" in msg, msg
    assert f"encfs volume attach --accept-rollback {image}" in msg, msg
    rig.assert_nothing_attached()
    assert rig.info(image)["MapsMirrored"] is False

    log = rig.tmp / "rollback.log"
    loop = rig.ok("volume", "attach", "--accept-rollback", image, "--log-file", log).strip()
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 1)  # the rollback, as accepted
    rig.detach(loop)
    assert "map slot 1 is damaged; using the map in slot 0, which may be older" in log.read_text()
    assert rig.info(image)["MapsMirrored"] is True
    loop = rig.attach(image)  # upgraded: attaches without the option from now on
    assert read_ok(loop, s * 4096, 4096) == pattern(s, 1)
    rig.detach(loop)


# -- damaged header copies -------------------------------------------------------------------------


def test_attach_with_both_header_copies_damaged_fails(rig: Rig) -> None:
    image = rig.create()
    flip(image, 200)
    flip(image, HEADER_SLOT + 200)
    msg = rig.fails("volume", "attach", image)
    assert "both volume header copies are damaged" in msg, msg
    rig.assert_nothing_attached()
    assert "damaged" in rig.fails("volume", "info", image)


def test_one_damaged_header_copy_still_attaches_with_a_warning(rig: Rig) -> None:
    image = rig.create()
    loop = rig.attach(image)
    dd_write(loop, 0, patterns(0, 16, 7), rig.tmp)
    rig.detach(loop)
    for copy in (0, 1):
        flip(image, copy * HEADER_SLOT + 50)
        info = rig.info(image)
        assert len(info["Warnings"]) == 1 and f"header copy {copy}" in info["Warnings"][0], info
        assert f"header copy {copy}" in rig.ok("volume", "info", image)
        loop = rig.attach(image)
        assert read_ok(loop, 0, 16 * 4096) == patterns(0, 16, 7)
        rig.detach(loop)
        flip(image, copy * HEADER_SLOT + 50)  # undo
        assert rig.info(image)["Warnings"] == []
