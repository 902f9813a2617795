"""docs/FORMAT.md section 7 vectors: volume header record, sealed sectors, sealed sector maps."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.block.header import MAPS_MIRRORED, VolumeFormatError, VolumeHeader
from encfs.block.layout import (
    SLOT_A,
    SLOT_B,
    map_block_number,
    map_offset,
    sector_block_number,
    sector_offset,
)
from encfs.block.sectors import SectorStore, _get
from encfs.blocks import BlockCipher

VOL = {v["vector"]: v for v in parse_vectors(DOC.split("## 7. Volume format", 1)[1])}


def test_header_record_vector() -> None:
    v = VOL["volume-header"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]),
                     flags=int(v["flags"], 16))
    assert h.maps_mirrored and h.flags == MAPS_MIRRORED
    record = h.pack()
    assert len(record) == 4096
    assert hashlib.sha256(record).hexdigest() == v["record_sha256"]
    assert record.startswith(hexbytes(v["record_prefix"]))
    assert record.endswith(hexbytes(v["record_suffix"]))
    assert VolumeHeader.parse(record) == h
    # the trailing 32 bytes are SHA-256 of the first 4064, as documented
    assert record[4064:] == hashlib.sha256(record[:4064]).digest()


def _with_flags(record: bytes, flags: int) -> bytes:
    body = record[:5] + bytes([flags]) + record[6:4064]
    return body + hashlib.sha256(body).digest()


def test_header_flag_byte() -> None:
    """Byte 5 was reserved (0) before the maps were mirrored: such a header still parses, unmirrored;
    a flag bit this encfs does not know is refused."""
    v = VOL["volume-header"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]),
                     flags=int(v["flags"], 16))
    old = VolumeHeader.parse(_with_flags(h.pack(), 0))
    assert not old.maps_mirrored and old.seq == h.seq and old.volume_id == h.volume_id
    for unknown in (0x02, 0x81):
        with pytest.raises(VolumeFormatError, match="unknown feature flags"):
            VolumeHeader.parse(_with_flags(h.pack(), unknown))


def test_sector_vector() -> None:
    v = VOL["volume-sector"]
    key, vid, sector = hexbytes(v["data_key"]), hexbytes(v["volume_id"]), int(v["sector"])
    slot = {"A": SLOT_A, "B": SLOT_B}[v["slot"]]
    assert sector_block_number(sector, slot) == int(v["block_number"]) == 2 * sector + slot - 1
    assert sector_offset(sector, slot) == int(v["image_offset"])
    plain = (b"encfs sector vector " * 205)[:4096]
    assert hashlib.sha256(plain).hexdigest() == v["plaintext_sha256"]
    nonce = hexbytes(v["nonce"])
    aad = vid + b"sector" + struct.pack(">Q", int(v["block_number"]))
    sealed = nonce + AESGCM(key).encrypt(nonce, plain, aad)
    assert hashlib.sha256(sealed).hexdigest() == v["sealed_sha256"]
    assert sealed.startswith(hexbytes(v["sealed_prefix"]))
    assert BlockCipher(key, vid + b"sector").open(int(v["block_number"]), sealed) == plain


def test_map_vector_through_the_store(tmp_path) -> None:
    v = VOL["volume-map"]
    key, vid = hexbytes(v["data_key"]), hexbytes(v["volume_id"])
    extent, mslot = int(v["extent"]), int(v["map_slot"])
    assert map_offset(extent, mslot) == int(v["image_offset"])
    bitmap = bytearray(2048)
    bitmap[0] = 0b10_01_00_01
    record = (struct.pack(">Q", int(v["seq"])) + bytes(bitmap)).ljust(4096, b"\0")
    nonce = hexbytes(v["nonce"])
    sealed = nonce + AESGCM(key).encrypt(nonce, record, vid + b"map" + struct.pack(">Q",
                                                                                  map_block_number(extent, mslot)))
    assert hashlib.sha256(sealed).hexdigest() == v["sealed_sha256"]
    # A store reading an image that holds this map (and an older one in the other slot) sees its states.
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        store = SectorStore(fd, key, vid, 2 * 8192)
        store.format_maps()
        os.pwrite(fd, sealed, map_offset(extent, mslot))
        fresh = SectorStore(fd, key, vid, 2 * 8192)
        states = [_get(fresh._map(extent).current, i) for i in range(4)]
        names = {0: "unwritten", 1: "A", 2: "B"}
        assert ",".join(names[s] for s in states) == v["first_states"]
    finally:
        os.close(fd)
