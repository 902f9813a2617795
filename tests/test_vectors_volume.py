"""docs/FORMAT.md section 7 vectors: volume header records (flags 01 and the authenticated flags 03), sealed
sectors, sealed sector maps (§7.4); §7.8: a header with a recovery record. Format 2's vectors (§7.7) are
checked in test_vectors_volume_format2.py, which takes ``VOL`` and the header helpers from here."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_vectors import DOC, hexbytes, parse_vectors
from volume_helpers import rechecksum, with_flags

from encfs.block.header import (
    HEADER_MAC,
    MAPS_MIRRORED,
    RECOVERY_KEY,
    VolumeFormatError,
    VolumeHeader,
    header_mac_key,
)
from encfs.block.layout import (
    SLOT_A,
    SLOT_B,
    map_block_number,
    map_offset,
    sector_block_number,
    sector_offset,
)
from encfs.block.recovery import WrongRecoveryKey, open_record, recovery_kek, seal_record
from encfs.block.sectors import SectorStore, _get
from encfs.blocks import BlockCipher
from encfs.keys.context import encode_context

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


def test_header_flag_byte() -> None:
    """Byte 5 was reserved (0) before the maps were mirrored: such a header still parses, unmirrored;
    a flag bit this encfs does not know is refused."""
    v = VOL["volume-header"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]),
                     flags=int(v["flags"], 16))
    old = VolumeHeader.parse(with_flags(h.pack(), 0))
    assert not old.maps_mirrored and old.seq == h.seq and old.volume_id == h.volume_id
    for unknown in (0x10, 0x81):
        with pytest.raises(VolumeFormatError, match="unknown feature flags"):
            VolumeHeader.parse(with_flags(h.pack(), unknown))
    with pytest.raises(VolumeFormatError, match="format 1 with one-sync commits"):
        VolumeHeader.parse(with_flags(h.pack(), 0x08))


def _mac_vector() -> tuple[dict[str, str], VolumeHeader, bytes]:
    v = VOL["volume-header-mac"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]),
                     flags=int(v["flags"], 16), seals_reserved=int(v["seals_reserved"]))
    return v, h, hexbytes(v["data_key"])


def test_authenticated_header_vector() -> None:
    v, h, data_key = _mac_vector()
    assert h.flags == MAPS_MIRRORED | HEADER_MAC and h.authenticated
    vid = h.volume_id
    # the wrapped key: a ciphertext blob (§2) of the data key under the vector CMK, marked context
    context = json.loads(v["context"])
    assert h.context() == context
    blob = hexbytes(v["wrapped_key"])
    encoded = encode_context(context)
    assert AESGCM(hexbytes(v["cmk"])).decrypt(blob[33:45], blob[45:], blob[:45] + encoded) == data_key
    assert h.key_id == v["key_id"]
    # the MAC key: HKDF-SHA256(data key, salt = volume id, info), computed with cryptography directly
    mac_key = HKDF(hashes.SHA256(), 32, salt=vid, info=v["mac_info"].encode()).derive(data_key)
    assert mac_key.hex() == v["mac_key"] == header_mac_key(data_key, vid).hex()
    record = h.pack(mac_key)
    assert len(record) == 4096
    assert hashlib.sha256(record).hexdigest() == v["record_sha256"]
    assert record.startswith(hexbytes(v["record_prefix"]))
    assert record.endswith(hexbytes(v["record_suffix"]))
    assert record[4008:4024] == uuid.UUID(v["key_id"]).bytes
    assert struct.unpack(">Q", record[4024:4032])[0] == h.seals_reserved
    mac = HMAC(mac_key, hashes.SHA256())
    mac.update(record[:4032])
    assert record[4032:4064] == mac.finalize() == hexbytes(v["mac"])
    assert record[4064:] == hashlib.sha256(record[:4064]).digest()
    assert not any(record[46 + len(blob):4008])
    parsed = VolumeHeader.parse(record)
    assert parsed == h and parsed.verify(mac_key) and not parsed.verify(bytes(32))
    with pytest.raises(ValueError, match="MAC key"):
        h.pack()


@pytest.mark.parametrize("offset,value,error", [
    (6, b"\x01", "nonzero reserved bytes"),
    (7, b"\x80", "nonzero reserved bytes"),
    (46 + 93, b"\x01", "nonzero reserved bytes"),  # the padding after the wrapped key
    (4007, b"\x01", "nonzero reserved bytes"),
    (4008, b"\xff", "names a CMK other than the one its wrapped key is under"),
    (44, b"\x0f\xa0", "impossible geometry"),  # a wrapped key reaching into the key id
])
def test_authenticated_header_refuses_nonzero_reserved_bytes(offset: int, value: bytes, error: str) -> None:
    """Under HEADER_MAC every byte means something or must be zero, whatever its checksum says."""
    _v, h, data_key = _mac_vector()
    record = bytearray(h.pack(header_mac_key(data_key, h.volume_id)))
    record[offset:offset + len(value)] = value
    with pytest.raises(VolumeFormatError, match=error):
        VolumeHeader.parse(rechecksum(record))
    # without HEADER_MAC (the first release's format) reserved bytes and padding are not checked
    if offset in (6, 7) or 46 + 93 <= offset < 4032:
        record[5] = MAPS_MIRRORED
        assert VolumeHeader.parse(rechecksum(record)).flags == MAPS_MIRRORED


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


# -- recovery key (FORMAT.md §7.8) ----------------------------------------------------------------


def _recovery_vector() -> tuple[dict[str, str], VolumeHeader, bytes]:
    v = VOL["volume-recovery"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(VOL["volume2-header"]["wrapped_key"]),
                     seq=int(v["seq"]), flags=int(v["flags"], 16), seals_reserved=int(v["seals_reserved"]),
                     version=int(v["version"]), recovery=hexbytes(v["record"]))
    return v, h, hexbytes(v["data_key"])


def test_recovery_record_vector() -> None:
    v, h, data_key = _recovery_vector()
    vid, rk, nonce = h.volume_id, hexbytes(v["recovery_key"]), hexbytes(v["nonce"])
    assert rk == hashlib.sha256(b"encfs FORMAT.md test vector volume recovery key").digest()
    assert h.flags == HEADER_MAC | RECOVERY_KEY and h.has_recovery_key and h.copy_on_write
    # KEK and the record, computed with cryptography directly from §7.8's words
    kek = HKDF(hashes.SHA256(), 32, salt=vid, info=v["recovery_info"].encode()).derive(rk)
    assert kek.hex() == v["kek"] == recovery_kek(rk, vid).hex()
    aad = b"ENCV" + bytes([2]) + vid
    assert aad.hex() == v["aad"]
    record = nonce + AESGCM(kek).encrypt(nonce, data_key, aad)
    assert record == hexbytes(v["record"]) and len(record) == 60
    assert seal_record(data_key, h, rk, nonce) == record
    assert open_record(h, rk, "vector") == data_key
    with pytest.raises(WrongRecoveryKey):
        open_record(h, bytes(32), "vector")
    # the header: the record at [3948, 4008), under the MAC
    mac_key = header_mac_key(data_key, vid)
    packed = h.pack(mac_key)
    assert hashlib.sha256(packed).hexdigest() == v["record_sha256"]
    assert packed.startswith(hexbytes(v["record_prefix"])) and packed[3948:] == hexbytes(v["record_suffix"])
    assert packed[3948:4008] == record and packed[5] == 0x06
    assert not any(packed[46 + len(h.wrapped_key):3948])
    mac = HMAC(mac_key, hashes.SHA256())
    mac.update(packed[:4032])
    assert packed[4032:4064] == mac.finalize() == hexbytes(v["mac"])
    parsed = VolumeHeader.parse(packed)
    assert parsed == h and parsed.verify(mac_key) and parsed.recovery == record
    # without the record (and flag) it is the header of volume2-header, at that sequence number
    plain = replace(h, flags=HEADER_MAC, recovery=b"", seq=int(VOL["volume2-header"]["seq"]))
    assert hashlib.sha256(plain.pack(mac_key)).hexdigest() == VOL["volume2-header"]["record_sha256"]


def test_recovery_record_is_authenticated_and_format_2_only() -> None:
    _v, h, data_key = _recovery_vector()
    mac_key = header_mac_key(data_key, h.volume_id)
    packed = h.pack(mac_key)
    # any change to the record (or dropping it with its flag) fails the MAC
    for changed in (packed[:3960] + bytes([packed[3960] ^ 1]) + packed[3961:4064],
                    packed[:5] + b"\x02" + packed[6:3948] + bytes(60) + packed[4008:4064]):
        assert not VolumeHeader.parse(rechecksum(changed)).verify(mac_key)
    # format 1 has no recovery record
    with pytest.raises(VolumeFormatError, match="format 1 with a recovery key"):
        VolumeHeader.parse(rechecksum(packed[:4] + b"\x01\x07" + packed[6:4064]))
    # without the flag the record's bytes are padding, which must be zero
    with pytest.raises(VolumeFormatError, match="nonzero reserved bytes"):
        VolumeHeader.parse(rechecksum(packed[:5] + b"\x02" + packed[6:4064]))
