"""Volumes made before mirrored sector maps (header flag MAPS_MIRRORED clear), opened by open_volume()
on a plain image file with a real SoftHSM2 token (no FUSE, no loop device): upgraded when every map is
intact, refused in one line when a damaged map slot leaves only an older map, unless the rollback is
accepted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from encfs.block.header import HEADER_MAC, MAPS_MIRRORED, read_header
from encfs.block.layout import EXTENT_SECTORS, SECTOR_SIZE, map_block_number, map_offset
from encfs.block.volume import VolumeError, create_volume, open_volume
from encfs.blocks import SEALED_BLOCK, BlockAuthError, BlockCipher
from encfs.keys.service import KeyService

OLD, NEW = b"O" * SECTOR_SIZE, b"N" * SECTOR_SIZE
SECTOR = EXTENT_SECTORS + 5  # in extent 1


def _seq(path: Path, ks: KeyService, extent: int, slot: int) -> int | None:
    """The sequence number in a map slot, None if it fails authentication."""
    with open(path, "rb") as f:
        header, _w = read_header(f.fileno())
        key = ks.decrypt(header.wrapped_key, header.context()).plaintext
        try:
            plain = BlockCipher(key, header.volume_id + b"map").open(
                map_block_number(extent, slot), os.pread(f.fileno(), SEALED_BLOCK, map_offset(extent, slot)))
        except BlockAuthError:
            return None
    return int.from_bytes(plain[:8], "big")


def old_style_volume(path: Path, ks: KeyService) -> int:
    """A 64 MiB volume as the first release left it at rest: sector SECTOR written OLD, flushed, then
    NEW, flushed; map slot (returned) of extent 1 holds the newest map, the other slot the previous one,
    and the header's flag byte is 0 (no mirrored maps, no header MAC)."""
    create_volume(path, 64 << 20, ks, ks.create_key()["KeyId"], version=1)
    vol = open_volume(path, ks)
    try:
        vol.write(SECTOR * SECTOR_SIZE, OLD)
        vol.flush()
        previous = os.pread(vol.fd, 2 * SEALED_BLOCK, map_offset(1, 0))
        vol.write(SECTOR * SECTOR_SIZE, NEW)
        vol.flush()
        vol.store.sync_mirrors()
        newest = vol.store._maps[1].slot
        older = 1 - newest  # the first release's next flush would write its map here
        os.pwrite(vol.fd, previous[older * SEALED_BLOCK:(older + 1) * SEALED_BLOCK], map_offset(1, older))
        # ... and a header without HEADER_MAC, whose key is wrapped with the first release's context
        h = vol.header
        wrapped = ks.re_encrypt(h.wrapped_key, h.context(), h.key_id, {"encfs:volume": h.volume_id.hex()},
                            encfs_internal=True)
        vol.headers.update(flags=0, wrapped_key=wrapped, seals_reserved=0)
    finally:
        vol.close()
    assert _seq(path, ks, 1, newest) == _seq(path, ks, 1, older) + 1
    return newest


def test_a_new_volume_is_flagged_mirrored(tmp_path: Path, service: KeyService) -> None:
    create_volume(tmp_path / "v.img", 64 << 20, service, service.create_key()["KeyId"], version=1)
    with open(tmp_path / "v.img", "rb") as f:
        assert read_header(f.fileno())[0].flags == MAPS_MIRRORED | HEADER_MAC
    for extent in (0, 1):
        assert _seq(tmp_path / "v.img", service, extent, 0) == _seq(tmp_path / "v.img", service, extent, 1)


def test_an_intact_old_volume_is_mirrored_then_flagged_on_first_open(tmp_path: Path, service: KeyService) -> None:
    path = tmp_path / "old.img"
    old_style_volume(path, service)
    vol = open_volume(path, service)
    try:
        assert vol.header.maps_mirrored
        assert vol.read(SECTOR * SECTOR_SIZE, SECTOR_SIZE) == NEW
    finally:
        vol.close()
    with open(path, "rb") as f:
        header, warnings = read_header(f.fileno())
    assert header.maps_mirrored and warnings == []
    assert _seq(path, service, 1, 0) == _seq(path, service, 1, 1)


@pytest.mark.parametrize("damage", ["bit flip", "zeroed"])
def test_an_old_volume_with_a_damaged_newest_map_is_refused_unless_the_rollback_is_accepted(
        tmp_path: Path, service: KeyService, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    path = tmp_path / "old.img"
    newest = old_style_volume(path, service)
    with open(path, "r+b") as f:
        at = map_offset(1, newest) + 1000
        f.seek(at)
        f.write(bytes([f.read(1)[0] ^ 0x04]) if damage == "bit flip" else bytes(SEALED_BLOCK - 1000))
    before = path.read_bytes()
    with pytest.raises(VolumeError) as e:
        open_volume(path, service)
    msg = e.value.message
    assert "\n" not in msg
    lo = EXTENT_SECTORS * SECTOR_SIZE
    assert f"sector map of extent 1 (plaintext bytes {lo}-{2 * lo - 1}) is damaged in slot {newest}" in msg
    assert f"encfs volume attach --accept-rollback {path}" in msg
    assert path.read_bytes() == before  # a refusal writes nothing
    with pytest.raises(VolumeError):
        open_volume(path, service)  # and refuses again, no lock left behind

    vol = open_volume(path, service, accept_rollback=True)
    try:
        assert vol.read(SECTOR * SECTOR_SIZE, SECTOR_SIZE) == OLD  # the rollback, as accepted
        assert vol.header.maps_mirrored
    finally:
        vol.close()
    assert "is damaged; using the map in slot" in caplog.text
    assert _seq(path, service, 1, 0) == _seq(path, service, 1, 1)
    vol = open_volume(path, service)  # upgraded: no option needed any more
    try:
        assert vol.read(SECTOR * SECTOR_SIZE, SECTOR_SIZE) == OLD
    finally:
        vol.close()


def test_an_old_volume_whose_extent_lost_both_map_slots_is_upgraded_with_that_extent_eio(
        tmp_path: Path, service: KeyService) -> None:
    path = tmp_path / "old.img"
    old_style_volume(path, service)
    with open(path, "r+b") as f:
        f.seek(map_offset(1, 0))
        f.write(bytes(2 * SEALED_BLOCK))
    vol = open_volume(path, service)
    try:
        assert vol.header.maps_mirrored
        with pytest.raises(BlockAuthError):
            vol.read(SECTOR * SECTOR_SIZE, SECTOR_SIZE)
        assert vol.read(0, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    finally:
        vol.close()
