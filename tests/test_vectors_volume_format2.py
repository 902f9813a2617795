"""docs/FORMAT.md §7.7 vectors, format 2 (§7.6): its header (also with one-sync commits), a sealed sector,
map nodes, a snapshot table page, commit records (also one that lists its transaction's pages), the
limits, and the image a real CowStore writes from the same inputs (also on a one-sync volume)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from test_vectors import hexbytes
from test_vectors_volume import VOL
from volume_helpers import rechecksum, with_flags

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
from encfs.block.header import (
    COW_FORMAT,
    HEADER_MAC,
    ONE_SYNC_COMMITS,
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
    commit_offset,
    node_block_number,
    page_offset,
)
from encfs.block.maptree import node_from_bytes
from encfs.block.records import MAX_TABLE_PAGES
from encfs.blocks import SEALED_BLOCK, BlockAuthError, BlockCipher, counter_nonces

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
        VolumeHeader.parse(with_flags(record, 0))
    unknown = rechecksum(record[:4] + b"\x03" + record[5:4064])
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
        end = page_offset(store.pages + 1)
        assert os.path.getsize(path) > end and not any(os.pread(fd, 1 << 20, end))  # zeros ahead (§7.6.1)
        store.cut_zeros_ahead()  # as a clean close does: at rest the image ends with its pool
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
