"""docs/FORMAT.md section 7 vectors: volume header records (flags 01 and the authenticated flags 03), sealed
sectors, sealed sector maps; format 2 (§7.7): its header, a sealed sector, map nodes, a snapshot table page
and a commit record, and the image a real CowStore writes from the same inputs; §7.8: a header with a
recovery record."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import asdict, replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.block.budget import SealBudget
from encfs.block.cow import (
    COMMIT_SCOPE,
    DATA_SCOPE,
    NODE_SCOPE,
    TABLE_SCOPE,
    Commit,
    CowStore,
    Snapshot,
)
from encfs.block.records import MAX_TABLE_PAGES
from encfs.block.header import (
    COW_FORMAT,
    HEADER_MAC,
    MAPS_MIRRORED,
    ONE_SYNC_COMMITS,
    RECOVERY_KEY,
    VolumeFormatError,
    VolumeHeader,
    header_mac_key,
    new_header,
)
from encfs.block.layout import (
    COMMIT_START,
    MAX_PAGES,
    POOL_START,
    SECTOR_SIZE,
    SLOT_A,
    SLOT_B,
    commit_offset,
    map_block_number,
    map_offset,
    node_block_number,
    page_offset,
    sector_block_number,
    sector_offset,
)
from encfs.block.maptree import node_from_bytes
from encfs.block.recovery import WrongRecoveryKey, open_record, recovery_kek, seal_record
from encfs.block.sectors import SectorStore, _get
from encfs.blocks import SEALED_BLOCK, BlockAuthError, BlockCipher, counter_nonces
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


def _rechecksum(record: bytes | bytearray) -> bytes:
    return bytes(record[:4064]) + hashlib.sha256(bytes(record[:4064])).digest()


def _with_flags(record: bytes, flags: int) -> bytes:
    return _rechecksum(record[:5] + bytes([flags]) + record[6:4064])


def test_header_flag_byte() -> None:
    """Byte 5 was reserved (0) before the maps were mirrored: such a header still parses, unmirrored;
    a flag bit this encfs does not know is refused."""
    v = VOL["volume-header"]
    h = VolumeHeader(hexbytes(v["volume_id"]), int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]),
                     flags=int(v["flags"], 16))
    old = VolumeHeader.parse(_with_flags(h.pack(), 0))
    assert not old.maps_mirrored and old.seq == h.seq and old.volume_id == h.volume_id
    for unknown in (0x10, 0x81):
        with pytest.raises(VolumeFormatError, match="unknown feature flags"):
            VolumeHeader.parse(_with_flags(h.pack(), unknown))
    with pytest.raises(VolumeFormatError, match="format 1 with one-sync commits"):
        VolumeHeader.parse(_with_flags(h.pack(), 0x08))


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
        VolumeHeader.parse(_rechecksum(record))
    # without HEADER_MAC (the first release's format) reserved bytes and padding are not checked
    if offset in (6, 7) or 46 + 93 <= offset < 4032:
        record[5] = MAPS_MIRRORED
        assert VolumeHeader.parse(_rechecksum(record)).flags == MAPS_MIRRORED


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


# -- format 2 (FORMAT.md §7.6, vectors §7.7) -----------------------------------------------------

V2_NAMES = ("volume2-header", "volume2-sector", "volume2-leaf", "volume2-root", "volume2-table", "volume2-commit",
            "volume2-image", "volume2-limits")


def test_format2_section_has_every_vector() -> None:
    assert set(V2_NAMES) <= set(VOL)


def _v2_nonce(v: dict[str, str]) -> bytes:
    """prefix (4) || u64 counter, big-endian, as §7.6.8 words it."""
    nonce = hexbytes(v["nonce_prefix"]) + struct.pack(">Q", int(v["counter"]))
    assert nonce == hexbytes(v["nonce"])
    return nonce


def _v2_seal(v: dict[str, str], scope: bytes, plaintext: bytes) -> bytes:
    """The sealed block by hand: nonce || AES-256-GCM(key, plaintext, AAD = volume id || scope || u64 BE block)."""
    nonce = _v2_nonce(v)
    aad = hexbytes(v["volume_id"]) + scope + struct.pack(">Q", int(v["block_number"]))
    sealed = nonce + AESGCM(hexbytes(v["data_key"])).encrypt(nonce, plaintext, aad)
    assert len(sealed) == SEALED_BLOCK == 4124
    assert hashlib.sha256(sealed).hexdigest() == v["sealed_sha256"]
    # the same bytes from encfs's BlockCipher with a counter, under the store's scope; they open there
    cipher = BlockCipher(hexbytes(v["data_key"]), hexbytes(v["volume_id"]) + scope,
                         nonce_prefix=hexbytes(v["nonce_prefix"]))
    assert cipher.seal(int(v["block_number"]), plaintext, counter=int(v["counter"])) == sealed
    assert counter_nonces(hexbytes(v["nonce_prefix"]), int(v["counter"]), 1) == nonce
    assert cipher.open(int(v["block_number"]), sealed) == plaintext
    with pytest.raises(BlockAuthError):
        cipher.open(int(v["block_number"]) + 1, sealed)  # bound to its place
    return sealed


def _v2_sector_plaintext(v: dict[str, str]) -> bytes:
    unit = v["plaintext_unit"].encode()
    return (unit * (SECTOR_SIZE // len(unit) + 1))[:SECTOR_SIZE]


def _v2_node_plaintext(v: dict[str, str]) -> bytes:
    entries = dict(map(int, e.split("=")) for e in v["entries"].split())
    return b"".join(struct.pack("<I", entries.get(j, 0)) for j in range(1024))


def _v2_table_plaintext(v: dict[str, str]) -> bytes:
    data = v["json"].encode()
    assert hexbytes(v["length"]) == struct.pack("<I", len(data))
    return (hexbytes(v["length"]) + data).ljust(SECTOR_SIZE, b"\0")


def _v2_commit_plaintext(v: dict[str, str]) -> bytes:
    table = [int(p) for p in v["table"].split()]
    record = struct.pack("<8sQQIB3xIH", b"ENCVCOMM", int(v["txg"]), int(v["table_txg"]), int(v["root"]),
                         int(v["depth"]), int(v["pages"]), len(table))
    record += b"".join(struct.pack("<I", p) for p in table)
    listed = _listed(v)
    if listed:
        record += struct.pack("<H", len(listed)) + b"".join(struct.pack("<I", p) + d for p, d in listed)
    assert record == hexbytes(v["plaintext"])
    return record.ljust(SECTOR_SIZE, b"\0")


def test_format2_header_vector() -> None:
    v = VOL["volume2-header"]
    data_key, vid = hexbytes(v["data_key"]), hexbytes(v["volume_id"])
    h = VolumeHeader(vid, int(v["size"]), hexbytes(v["wrapped_key"]), seq=int(v["seq"]), flags=int(v["flags"], 16),
                     seals_reserved=int(v["seals_reserved"]), version=int(v["version"]))
    assert h.copy_on_write and h.flags == HEADER_MAC and h.version == COW_FORMAT
    # what `encfs volume create` makes by default (the sequence number comes from the header writes),
    # which since one-sync commits also sets bit 3 (§7.6.7); this vector is a volume made before
    made = new_header(h.size, h.wrapped_key, vid, seals=h.seals_reserved)
    assert made.flags == HEADER_MAC | ONE_SYNC_COMMITS == 0x0A and made.one_sync_commits and not h.one_sync_commits
    assert replace(made, seq=h.seq, flags=h.flags) == h
    assert h.wrapped_key == hexbytes(VOL["volume-header-mac"]["wrapped_key"])  # the context is the same
    mac_key = header_mac_key(data_key, vid)
    record = h.pack(mac_key)
    assert hashlib.sha256(record).hexdigest() == v["record_sha256"]
    assert record.startswith(hexbytes(v["record_prefix"])) and record.endswith(hexbytes(v["record_suffix"]))
    assert record[4] == 2 and record[5] == 0x02
    assert struct.unpack(">Q", record[4024:4032])[0] == int(v["seals_reserved"])
    mac = HMAC(mac_key, hashes.SHA256())
    mac.update(record[:4032])
    assert record[4032:4064] == mac.finalize() == hexbytes(v["mac"])
    parsed = VolumeHeader.parse(record)
    assert parsed == h and parsed.verify(mac_key)
    with pytest.raises(VolumeFormatError, match="format 2 without its MAC"):
        VolumeHeader.parse(_with_flags(record, 0))
    unknown = _rechecksum(record[:4] + b"\x03" + record[5:4064])
    with pytest.raises(VolumeFormatError, match="unsupported volume format version 3"):
        VolumeHeader.parse(unknown)


def test_format2_sector_vector() -> None:
    v = VOL["volume2-sector"]
    plain = _v2_sector_plaintext(v)
    assert hashlib.sha256(plain).hexdigest() == v["plaintext_sha256"]
    assert int(v["block_number"]) == int(v["sector"])
    sealed = _v2_seal(v, DATA_SCOPE, plain)
    assert sealed.startswith(hexbytes(v["sealed_prefix"]))
    assert page_offset(int(v["page"])) == int(v["image_offset"]) == POOL_START + (int(v["page"]) - 1) * 4124


@pytest.mark.parametrize("name", ["volume2-leaf", "volume2-root"])
def test_format2_node_vectors(name: str) -> None:
    v = VOL[name]
    plain = _v2_node_plaintext(v)
    assert hashlib.sha256(plain).hexdigest() == v["plaintext_sha256"]
    level, index = int(v["level"]), int(v["index"])
    assert node_block_number(level, index) == int(v["block_number"]) == level << 56 | index
    node = node_from_bytes(plain)
    for entry in v["entries"].split():
        j, page = map(int, entry.split("="))
        assert node[j] == page
    _v2_seal(v, NODE_SCOPE, plain)
    assert page_offset(int(v["page"])) == int(v["image_offset"])


def test_format2_table_vector() -> None:
    v = VOL["volume2-table"]
    plain = _v2_table_plaintext(v)
    assert hashlib.sha256(plain).hexdigest() == v["plaintext_sha256"]
    assert int(v["block_number"]) == int(v["table_txg"]) << 10 | int(v["page_index"])
    _v2_seal(v, TABLE_SCOPE, plain)
    assert page_offset(int(v["page"])) == int(v["image_offset"])
    snaps = [Snapshot(**s) for s in json.loads(v["json"])]  # the keys are exactly Snapshot's, in its order
    assert json.dumps([asdict(s) for s in snaps], separators=(",", ":")) == v["json"]


def test_format2_commit_vector() -> None:
    v = VOL["volume2-commit"]
    plain = _v2_commit_plaintext(v)
    commit = Commit(int(v["txg"]), int(v["table_txg"]), int(v["root"]), int(v["depth"]), int(v["pages"]),
                    [int(p) for p in v["table"].split()])
    assert commit.pack() == plain
    assert Commit.parse(plain) == commit
    assert int(v["block_number"]) == int(v["slot"])
    assert commit_offset(int(v["slot"])) == int(v["image_offset"]) == 131072 + 65536 * int(v["slot"])
    sealed = _v2_seal(v, COMMIT_SCOPE, plain)
    assert sealed.startswith(hexbytes(v["sealed_prefix"]))


def test_format2_one_sync_header_vector() -> None:
    """What `encfs volume create` makes now: volume2-header with bit 3 set, MAC'd like it."""
    v, one = VOL["volume2-header"], VOL["volume2-header-one-sync"]
    vid = hexbytes(v["volume_id"])
    made = new_header(int(v["size"]), hexbytes(v["wrapped_key"]), vid, seals=int(v["seals_reserved"]))
    h = replace(made, seq=int(v["seq"]))
    assert h.flags == int(one["flags"], 16) == HEADER_MAC | ONE_SYNC_COMMITS and h.one_sync_commits
    mac_key = header_mac_key(hexbytes(v["data_key"]), vid)
    record = h.pack(mac_key)
    assert record.startswith(hexbytes(one["record_prefix"])) and record[4032:4064] == hexbytes(one["mac"])
    assert hashlib.sha256(record).hexdigest() == one["record_sha256"]
    parsed = VolumeHeader.parse(record)
    assert parsed == h and parsed.verify(mac_key)


def _listed(v: dict[str, str]) -> list[tuple[int, bytes]]:
    return [(int(p), bytes.fromhex(d)) for p, d in (e.split(":") for e in v.get("listed", "").split())]


def test_format2_listed_commit_vector() -> None:
    """A one-sync volume's commit record (§7.6.4, §7.6.7): the pages its transaction wrote, each with
    the first 16 bytes of the SHA-256 of its sealed bytes."""
    v, table = VOL["volume2-commit-listed"], VOL["volume2-table"]
    listed = _listed(v)
    assert listed == [(int(table["page"]), bytes.fromhex(table["sealed_sha256"])[:16])]
    plain = _v2_commit_plaintext(v)
    commit = Commit(int(v["txg"]), int(v["table_txg"]), int(v["root"]), int(v["depth"]), int(v["pages"]),
                    [int(p) for p in v["table"].split()], listed)
    assert commit.pack() == plain and Commit.parse(plain) == commit
    assert _v2_seal(v, COMMIT_SCOPE, plain).startswith(hexbytes(v["sealed_prefix"]))
    assert commit.room() == (4096 - 40 - 4) // 20 == 202
    too_many = plain[:42] + struct.pack("<H", 203) + plain[44:]
    assert Commit.parse(too_many) is None  # more than fit: damaged


def test_format2_limits_vector() -> None:
    v = VOL["volume2-limits"]
    assert POOL_START == int(v["pool_start"]) and COMMIT_START == int(v["commit_start"])
    assert MAX_PAGES == int(v["max_pages"]) and MAX_TABLE_PAGES == int(v["max_table_pages"])
    plain = Commit(1, 0, 0, 1, 0, []).pack()
    for depth in range(0, 7):  # a reader takes depths 1 to max_depth only
        record = plain[:28] + bytes([depth]) + plain[29:]
        assert (Commit.parse(record) is not None) == (1 <= depth <= int(v["max_depth"]))
    for too_big in (Commit(1, 0, MAX_PAGES + 1, 1, 0, []), Commit(1, 0, 0, 1, 0, [MAX_PAGES + 1])):
        with pytest.raises((struct.error, OverflowError)):  # page numbers are u32
            too_big.pack()
    budget = SealBudget(0, lambda _n: None, "v", counter=True)
    assert budget.limits() == (int(v["counter_warn"]), int(v["counter_refuse_sectors"]), int(v["counter_refuse_all"]))


def _v2_image(path: str, monkeypatch: pytest.MonkeyPatch, one_sync: bool = False) -> bytes:
    """The image of the §7.7 sequence, written by a real CowStore with the vectors' inputs."""
    sector, table, image = VOL["volume2-sector"], VOL["volume2-table"], VOL["volume2-image"]
    snap = json.loads(table["json"])[0]
    prefix = hexbytes(image["nonce_prefix"])
    real_urandom = os.urandom
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with monkeypatch.context() as m:  # the store draws its nonce prefix at random: this one is fixed
            m.setattr(os, "urandom", lambda n: prefix if n == len(prefix) else real_urandom(n))
            budget = SealBudget(int(image["first_counter"]), lambda _n: None, "v", counter=True)
            store = CowStore(fd, hexbytes(image["data_key"]), hexbytes(image["volume_id"]),
                             snap["size"] // SECTOR_SIZE, budget, one_sync=one_sync)
        store.format()
        store.write_sectors(int(sector["sector"]), _v2_sector_plaintext(sector))
        store.flush()
        made = store.snapshot(snap["id"], snap["description"], snap["created"])
        assert asdict(made) == snap
        assert budget.used - 1 == int(image["last_counter"])
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def test_format2_image_through_the_store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = VOL["volume2-image"]
    img = _v2_image(str(tmp_path / "img"), monkeypatch)
    assert len(img) == int(v["image_size"]) == page_offset(int(VOL["volume2-commit"]["pages"]) + 1)
    assert not any(img[:COMMIT_START])  # the header is written by create, not by the store
    # every unit of §7.7 at its place, as computed by hand
    units = [("volume2-sector", DATA_SCOPE, _v2_sector_plaintext), ("volume2-leaf", NODE_SCOPE, _v2_node_plaintext),
             ("volume2-root", NODE_SCOPE, _v2_node_plaintext), ("volume2-table", TABLE_SCOPE, _v2_table_plaintext),
             ("volume2-commit", COMMIT_SCOPE, _v2_commit_plaintext)]
    for name, scope, plaintext in units:
        u = VOL[name]
        at = int(u["image_offset"])
        assert img[at:at + SEALED_BLOCK] == _v2_seal(u, scope, plaintext(u)), name
    # the mirror in slot 0: the same record, sealed for slot 0 with the last counter
    c = VOL["volume2-commit"]
    mirror = dict(c, slot="0", block_number="0", counter=v["last_counter"],
                  nonce=(hexbytes(c["nonce_prefix"]) + struct.pack(">Q", int(v["last_counter"]))).hex(),
                  sealed_sha256=v["slot0_sha256"])
    assert img[COMMIT_START:COMMIT_START + SEALED_BLOCK] == _v2_seal(mirror, COMMIT_SCOPE, _v2_commit_plaintext(c))
    assert hashlib.sha256(img).hexdigest() == v["image_sha256"]
    # and a store opening that image (another prefix) reads the sector, the map and the snapshot back
    fd = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        store = CowStore(fd, hexbytes(v["data_key"]), hexbytes(v["volume_id"]), 16384,
                         SealBudget(int(v["last_counter"]) + 1, lambda _n: None, "v", counter=True))
        store.load()
        s = VOL["volume2-sector"]
        assert store.read_sectors(int(s["sector"]), 1) == _v2_sector_plaintext(s)
        assert store.tree.depth == int(c["depth"]) and store.tree.root_page == int(c["root"])
        assert [asdict(x) for x in store.snapshots] == json.loads(VOL["volume2-table"]["json"])
        assert store.txg == int(c["txg"]) + 1
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
        assert not VolumeHeader.parse(_rechecksum(changed)).verify(mac_key)
    # format 1 has no recovery record
    with pytest.raises(VolumeFormatError, match="format 1 with a recovery key"):
        VolumeHeader.parse(_rechecksum(packed[:4] + b"\x01\x07" + packed[6:4064]))
    # without the flag the record's bytes are padding, which must be zero
    with pytest.raises(VolumeFormatError, match="nonzero reserved bytes"):
        VolumeHeader.parse(_rechecksum(packed[:5] + b"\x02" + packed[6:4064]))


def test_one_sync_image_through_the_store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The §7.7 sequence on a one-sync volume: every unit as before, and in both slots the listed
    record of volume2-commit-listed (the mirror sealed for slot 0 with the last counter)."""
    v, c = VOL["volume2-image"], VOL["volume2-commit-listed"]
    img = _v2_image(str(tmp_path / "img"), monkeypatch, one_sync=True)
    old = _v2_image(str(tmp_path / "old"), monkeypatch)
    pool = slice(COMMIT_START + 2 * 65536, None)
    assert len(img) == len(old) and img[pool] == old[pool]  # the same pages; only the records differ
    at = int(c["image_offset"])
    assert img[at:at + SEALED_BLOCK] == _v2_seal(c, COMMIT_SCOPE, _v2_commit_plaintext(c))
    mirror = dict(c, slot="0", block_number="0", counter=v["last_counter"],
                  nonce=(hexbytes(c["nonce_prefix"]) + struct.pack(">Q", int(v["last_counter"]))).hex())
    mirror["sealed_sha256"] = hashlib.sha256(img[COMMIT_START:COMMIT_START + SEALED_BLOCK]).hexdigest()
    assert img[COMMIT_START:COMMIT_START + SEALED_BLOCK] == _v2_seal(mirror, COMMIT_SCOPE, _v2_commit_plaintext(c))
