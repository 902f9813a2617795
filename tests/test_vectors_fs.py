"""docs/FORMAT.md section 6 vectors: the filesystem's keys, config MAC, names, blocks (and the block framing's
counter nonces), header, symlinks, xattrs.

The vectors are read from the document itself and checked against encfs's
code and, independently, against `cryptography` primitives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.blocks import BlockAuthError, BlockCipher, counter_nonces, sealed_offset, sealed_size
from encfs.fuse.content import FileContent, plain_file_size
from encfs.fuse.fileheader import (
    HEADER_LEN,
    STATE_BLOCK,
    V1,
    V2,
    FileHeader,
    FileState,
    HeaderError,
)
from encfs.fuse.fsconfig import canonical_json, config_mac, config_mac_key, derive_fs_keys
from encfs.fuse.journal import Journal
from encfs.fuse.names import NAME_MAX, NameAuthError, NameCipher, b64d
from encfs.fuse.recoverykeys import WrongKey, file_key, open_keys, recovery_kek, seal_keys

FS = {v["vector"]: v for v in parse_vectors(DOC.split("## 6. Filesystem format", 1)[1])}


def test_section_has_every_vector() -> None:
    assert set(FS) >= {"fs-keys", "config-mac", "name-short", "name-long", "content-block", "content-layout-32k",
                       "content-layout-4k", "file-header", "symlink", "xattr", "file-state", "journal",
                       "dirid-bound", "symlink-bound", "xattr-padded", "block-counter-nonce",
                       "file-state-holes", "fs-recovery", "fs-derived-file-key"}


def test_fs_key_derivation() -> None:
    v = FS["fs-keys"]
    keys = derive_fs_keys(hexbytes(v["fs_secret"]), v["fs_id"])
    assert keys.name_key == hexbytes(v["name_key"])
    assert keys.meta_key == hexbytes(v["meta_key"])


def test_config_mac_vector() -> None:
    v = FS["config-mac"]
    secret, fs_id = hexbytes(v["fs_secret"]), v["fs_id"]
    config = json.loads(v["config"])
    body = {k: val for k, val in config.items() if k != "mac"}
    assert config_mac_key(secret, fs_id) == hexbytes(v["mac_key"])
    assert canonical_json(body) == hexbytes(v["canonical"])
    assert config_mac(secret, config) == hexbytes(v["mac"])  # `mac` itself is left out of what is covered
    assert base64.b64encode(hexbytes(v["mac"])).decode() == config["mac"]
    # Independently: HKDF, the canonical JSON and HMAC straight from the documented rules.
    key = HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=b"encfs config mac v2").derive(secret)
    assert key == hexbytes(v["mac_key"])
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical == hexbytes(v["canonical"])
    h = HMAC(key, hashes.SHA256())
    h.update(canonical)
    assert h.finalize() == hexbytes(v["mac"])
    # any change of a covered field changes the MAC
    assert config_mac(secret, {**body, "format": 3}) != hexbytes(v["mac"])


@pytest.mark.parametrize("name", ["name-short", "name-long"])
def test_name_vectors(name: str) -> None:
    v = FS[name]
    nc = NameCipher(hexbytes(v["name_key"]), bytes(32))
    plain, dirid, encoded = hexbytes(v["name"]), hexbytes(v["dirid"]), hexbytes(v["encoded"])
    assert nc.encrypt_name(plain, dirid) == encoded
    assert nc.decrypt_name(encoded, dirid) == plain
    entry, side = NameCipher.backing_entry(encoded)
    assert entry == hexbytes(v["entry"])
    assert (side is None) == (len(encoded) <= NAME_MAX)
    # Independently: AES-SIV over the PKCS#7-padded name with the documented associated data.
    pad = 16 - len(plain) % 16
    raw = AESSIV(hexbytes(v["name_key"])).encrypt(plain + bytes([pad]) * pad, [b"encfs-name-v1", dirid])
    assert b64d(encoded) == raw
    with pytest.raises(NameAuthError):
        nc.decrypt_name(encoded, bytes(16))  # another directory


def test_content_block_vector() -> None:
    v = FS["content-block"]
    key, file_id, block_no = hexbytes(v["data_key"]), hexbytes(v["file_id"]), int(v["block_no"])
    sealed, plain, nonce = hexbytes(v["sealed"]), hexbytes(v["plaintext"]), hexbytes(v["nonce"])
    assert sealed[:12] == nonce
    assert AESGCM(key).encrypt(nonce, plain, file_id + struct.pack(">Q", block_no)) == sealed[12:]
    bc = BlockCipher(key, file_id)
    assert bc.open(block_no, sealed) == plain
    with pytest.raises(BlockAuthError):
        bc.open(block_no + 1, sealed)


def test_block_counter_nonce_vector() -> None:
    v = FS["block-counter-nonce"]
    key, scope, prefix = hexbytes(v["data_key"]), hexbytes(v["scope"]), hexbytes(v["nonce_prefix"])
    counter, block_no = int(v["counter"]), int(v["block_no"])
    nonce, plain, sealed = hexbytes(v["nonce"]), hexbytes(v["plaintext"]), hexbytes(v["sealed"])
    assert key == hashlib.sha256(b"encfs FORMAT.md test vector counter nonces").digest()
    assert scope == hashlib.sha256(b"encfs FORMAT.md test vector counter nonces scope").digest()[:16]
    # the documented construction, independently: prefix || u64 counter, then plain AES-GCM
    assert nonce == prefix + struct.pack(">Q", counter) == counter_nonces(prefix, counter, 1)
    assert sealed == nonce + AESGCM(key).encrypt(nonce, plain, scope + struct.pack(">Q", block_no))
    # encfs seals exactly these bytes (counter mode is deterministic) and opens them without the prefix
    bc = BlockCipher(key, scope, nonce_prefix=prefix)
    assert bc.seal(block_no, plain, counter=counter) == sealed
    assert bc.seal_run(block_no, plain, counter=counter) == sealed
    assert BlockCipher(key, scope).open(block_no, sealed) == plain
    with pytest.raises(BlockAuthError):
        bc.open(block_no + 1, sealed)


@pytest.mark.parametrize("name", ["content-layout-32k", "content-layout-4k"])
def test_content_layout_vectors(name: str, tmp_path: Path) -> None:
    v = FS[name]
    block, plain, backing = int(v["block_size"]), int(v["plain_size"]), int(v["backing_size"])
    block_no, offset = int(v["block_no"]), int(v["block_offset"])
    assert sealed_size(plain, HEADER_LEN, block) == backing
    assert plain_file_size(backing, block) == plain
    assert sealed_offset(block_no, HEADER_LEN, block) == offset
    # and a real file written through FileContent has that layout
    key, file_id, data = bytes(range(32)), bytes(16), os.urandom(plain)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        header = FileHeader(file_id, bytes(93), V2)
        content = FileContent.create(fd, header, BlockCipher(key, file_id, block), os.fsencode(tmp_path), set())
        content.write(0, data)
        assert os.fstat(fd).st_size == backing
        sealed = os.pread(fd, block + 28, offset)
        assert AESGCM(key).decrypt(sealed[:12], sealed[12:], file_id + struct.pack(">Q", block_no)) == \
            data[block_no * block:(block_no + 1) * block]
        assert content.read(0, plain) == data
    finally:
        os.close(fd)


def test_file_header_vector() -> None:
    v = FS["file-header"]
    header = hexbytes(v["header"])
    assert len(header) == HEADER_LEN
    parsed = FileHeader.parse(header)
    assert parsed.file_id == hexbytes(v["file_id"])
    assert parsed.wrapped_key == hexbytes(v["wrapped_key"])
    assert parsed.version == V1 and parsed.pack() == header
    v2 = header[:4] + bytes([2]) + header[5:]  # version 2 differs in the version byte only
    assert FileHeader.parse(v2).version == V2 and FileHeader.parse(v2).pack() == v2
    for bad in (header[:5] + b"\x01" + header[6:], header[:-1] + b"\x01"):  # reserved, padding
        with pytest.raises(HeaderError):
            FileHeader.parse(bad)


def test_derived_file_key_vector() -> None:
    v = FS["fs-derived-file-key"]
    secret, fs_id, file_id = hexbytes(v["fs_secret"]), v["fs_id"], hexbytes(v["file_id"])
    root = HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=b"encfs file keys v1").derive(secret)
    assert root == hexbytes(v["file_root"]) == derive_fs_keys(secret, fs_id).file_root
    key = HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=b"encfs file key v1" + file_id).derive(root)
    assert key == hexbytes(v["file_key"]) == file_key(root, fs_id, file_id)
    header = hexbytes(v["header"])
    parsed = FileHeader.parse(header)
    assert parsed.file_id == file_id and parsed.derived and parsed.wrapped_key == b"" and parsed.version == V2
    assert parsed.pack() == header == FileHeader(file_id, b"").pack()
    # source 1 with a blob, source 0 without one, and an unknown source are damaged headers
    for bad in (header[:22] + b"\x00\x01\x01" + header[25:], header[:5] + b"\x00" + header[6:],
                header[:5] + b"\x02" + header[6:]):
        with pytest.raises(HeaderError):
            FileHeader.parse(bad)


def test_file_state_vector() -> None:
    v = FS["file-state"]
    key, file_id, value = hexbytes(v["data_key"]), hexbytes(v["file_id"]), hexbytes(v["xattr_value"])
    aad = file_id + struct.pack(">Q", STATE_BLOCK)
    assert aad == hexbytes(v["aad"]) and value[:12] == hexbytes(v["nonce"]) and len(value) == 52
    plain = struct.pack(">QQQ", int(v["synced_size"]), int(v["seals"]), 0)
    assert AESGCM(key).encrypt(value[:12], plain, aad) == value[12:]
    state = FileState.open(BlockCipher(key, file_id), value)
    assert state == FileState(int(v["synced_size"]), int(v["seals"]))
    assert FileState.open(BlockCipher(key, file_id), state.seal(BlockCipher(key, file_id))) == state
    with pytest.raises(BlockAuthError):
        FileState.open(BlockCipher(key, bytes(16)), value)  # another file's


def test_file_state_holes_vector() -> None:
    v = FS["file-state-holes"]
    key, file_id, value = hexbytes(v["data_key"]), hexbytes(v["file_id"]), hexbytes(v["xattr_value"])
    holes = tuple(tuple(int(x) for x in e.split("+")) for e in v["holes"].split(", "))
    # Independently: the documented layout, then plain AES-GCM with the state's AAD.
    plain = struct.pack(">QQQ", int(v["synced_size"]), int(v["seals"]), len(holes)) + \
        b"".join(struct.pack(">QQ", a, n) for a, n in holes)
    assert plain == hexbytes(v["plaintext"]) and len(value) == 52 + 16 * len(holes)
    assert value[:12] == hexbytes(v["nonce"])
    assert AESGCM(key).encrypt(value[:12], plain, file_id + struct.pack(">Q", STATE_BLOCK)) == value[12:]
    state = FileState.open(BlockCipher(key, file_id), value)
    assert state == FileState(int(v["synced_size"]), int(v["seals"]), holes)  # type: ignore[arg-type]
    # A malformed list fails like a damaged state (touching extents must have been merged).
    nonce = value[:12]
    for bad in ([(1, 62), (63, 1)], [(5, 1), (1, 1)], [(1, 0)]):
        body = struct.pack(">QQQ", 1, 1, len(bad)) + b"".join(struct.pack(">QQ", a, n) for a, n in bad)
        sealed = nonce + AESGCM(key).encrypt(nonce, body, file_id + struct.pack(">Q", STATE_BLOCK))
        with pytest.raises(BlockAuthError):
            FileState.open(BlockCipher(key, file_id), sealed)


def test_journal_vector(tmp_path: Path) -> None:
    v = FS["journal"]
    key, file_id, block_no = hexbytes(v["data_key"]), hexbytes(v["file_id"]), int(v["block_no"])
    head, run, sync = hexbytes(v["header"]), hexbytes(v["run"]), hexbytes(v["sync"])
    sealed = run[24:]
    assert run[:24] == struct.pack(">4sIQII", b"EJRN", 1, block_no, len(sealed), 0)
    assert AESGCM(key).decrypt(sealed[:12], sealed[12:], file_id + struct.pack(">Q", block_no)) == \
        hexbytes(v["plaintext"])
    # A journal made of these bytes is what encfs's Journal reads, and writes.
    root = os.fsencode(tmp_path)
    journal = Journal(root, file_id)
    os.makedirs(os.path.dirname(journal.path))
    with open(journal.path, "wb") as f:
        f.write(head + run + sync)
    assert journal.open_existing()
    runs, end, notes = journal.scan(BlockCipher(key, file_id))
    assert [(r.first, r.count, r.offset, r.length) for r in runs] == [(block_no, 1, 32 + 24, len(sealed))]
    assert end == len(head + run + sync) and notes == []
    journal.remove()
    journal.append(block_no, 1, sealed)
    journal.sync()
    with open(journal.path, "rb") as f:
        written = f.read()
    # Followed by zeros written ahead, to a page boundary and beyond (the records end there).
    records = head + run + sync
    assert written[:len(records)] == records and not any(written[len(records):])
    assert len(written) % 4096 == 0 and len(written) >= 2 * len(records)
    journal.close()


def test_symlink_vector() -> None:
    v = FS["symlink"]
    nc = NameCipher(bytes(64), hexbytes(v["meta_key"]))
    assert nc.decrypt_symlink(hexbytes(v["stored"])) == hexbytes(v["target"])
    raw = b64d(hexbytes(v["stored"]))
    assert AESGCM(hexbytes(v["meta_key"])).decrypt(raw[:12], raw[12:], b"encfs-symlink-v1") == hexbytes(v["target"])


def test_xattr_vector() -> None:
    v = FS["xattr"]
    nc = NameCipher(hexbytes(v["name_key"]), hexbytes(v["meta_key"]))
    backing = hexbytes(v["backing_name"])
    assert nc.xattr_name(hexbytes(v["name"])) == backing
    assert nc.xattr_plain_name(backing) == hexbytes(v["name"])
    assert nc.decrypt_xattr_value(backing, hexbytes(v["sealed"])) == hexbytes(v["value"])
    with pytest.raises(NameAuthError):
        nc.decrypt_xattr_value(backing + b"x", hexbytes(v["sealed"]))


def _seal_key(meta_key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(meta_key)


def test_bound_dirid_vector() -> None:
    v = FS["dirid-bound"]
    meta_key, parent, entry = hexbytes(v["meta_key"]), hexbytes(v["parent_dirid"]), hexbytes(v["entry"])
    stored = hexbytes(v["stored"])
    nc = NameCipher(bytes(64), meta_key)
    assert nc.open_dirid(stored, parent, entry) == hexbytes(v["dirid"])
    # Independently: HKDF with the stored salt, then AES-GCM with AAD = parent id || entry.
    key = _seal_key(meta_key, hexbytes(v["salt"]), b"encfs dirid v2")
    assert key == hexbytes(v["seal_key"])
    assert stored[:28] == hexbytes(v["salt"]) + hexbytes(v["nonce"])
    assert AESGCM(key).decrypt(stored[16:28], stored[28:], parent + entry) == hexbytes(v["dirid"])
    assert len(nc.seal_dirid(hexbytes(v["dirid"]), parent, entry)) == len(stored) == 60
    for other_parent, other_entry in ((bytes(16), entry), (parent, entry + b"x")):  # another place
        with pytest.raises(NameAuthError):
            nc.open_dirid(stored, other_parent, other_entry)


def test_bound_symlink_vector() -> None:
    v = FS["symlink-bound"]
    meta_key, parent, entry = hexbytes(v["meta_key"]), hexbytes(v["parent_dirid"]), hexbytes(v["entry"])
    stored = hexbytes(v["stored"])
    nc = NameCipher(bytes(64), meta_key)
    assert nc.open_symlink(stored, parent, entry) == hexbytes(v["target"])
    assert NameCipher.symlink_size(stored) == len(hexbytes(v["target"]))
    assert stored.startswith(b"2.")
    raw = b64d(stored[2:])
    key = _seal_key(meta_key, raw[:16], b"encfs symlink v2")
    assert key == hexbytes(v["seal_key"]) and raw[16:28] == hexbytes(v["nonce"])
    assert AESGCM(key).decrypt(raw[16:28], raw[28:], parent + entry) == hexbytes(v["target"])
    with pytest.raises(NameAuthError):
        nc.open_symlink(stored, parent, entry[:-1])  # another link


def test_padded_xattr_vector() -> None:
    v = FS["xattr-padded"]
    name_key, meta_key, name = hexbytes(v["name_key"]), hexbytes(v["meta_key"]), hexbytes(v["name"])
    nc = NameCipher(name_key, meta_key)
    backing, sealed = hexbytes(v["backing_name"]), hexbytes(v["sealed"])
    assert nc.xattr_name(name, padded=True) == backing
    assert nc.xattr_plain_name(backing) == name
    assert nc.decrypt_xattr_value(backing, sealed) == hexbytes(v["value"])
    pad = 16 - len(name) % 16
    raw = AESSIV(name_key).encrypt(name + bytes([pad]) * pad, [b"encfs-xattr-v2"])
    assert backing == b"user.encfs.xp." + base64.urlsafe_b64encode(raw).rstrip(b"=")
    key = _seal_key(meta_key, sealed[:16], b"encfs xattr v2")
    assert key == hexbytes(v["seal_key"])
    assert AESGCM(key).decrypt(sealed[16:28], sealed[28:], backing) == hexbytes(v["value"])


def test_fs_recovery_vector() -> None:
    v = FS["fs-recovery"]
    rk, fs_id = hexbytes(v["recovery_key"]), v["fs_id"]
    secret, root, wrapped = hexbytes(v["fs_secret"]), hexbytes(v["recovery_root"]), hexbytes(v["wrapped"])
    assert recovery_kek(rk, fs_id) == hexbytes(v["kek"])
    assert seal_keys(rk, fs_id, secret, root, hexbytes(v["nonce"])) == wrapped
    assert open_keys(rk, fs_id, wrapped) == (secret, root)
    assert file_key(root, fs_id, hexbytes(v["file_id"])) == hexbytes(v["file_key"])
    # Independently, with `cryptography` alone.
    kek = HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=b"encfs fs recovery v1").derive(rk)
    aad = b"encfs fs recovery v1" + bytes.fromhex(fs_id)
    assert AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad) == secret + root
    info = b"encfs file key v1" + hexbytes(v["file_id"])
    assert HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=info).derive(root) == hexbytes(v["file_key"])
    with pytest.raises(WrongKey):  # another key, or the wrapping of another filesystem
        open_keys(bytes(32), fs_id, wrapped)
    with pytest.raises(WrongKey):
        open_keys(rk, "0" * 32, wrapped)


def test_a_directory_of_ten_thousand_names_is_encoded_once() -> None:
    """Looked up again after the kernel dropped its dentries (a cold stat, read or delete of
    each file of a large directory), every name is still in encrypt_name's cache: AES-SIV runs
    once per name, not on every pass."""
    from encfs.fuse import names as names_mod

    nc = names_mod.NameCipher(bytes(64), bytes(32))
    calls = []
    siv = nc._siv

    class Counting:
        def encrypt(self, data: bytes, ad: list[bytes]) -> bytes:
            calls.append(data)
            return siv.encrypt(data, ad)

    nc._siv = Counting()  # type: ignore[assignment]
    names = [b"file%05d" % i for i in range(10_000)]
    first = [nc.encrypt_name(n, b"\0" * 16) for n in names]
    for _ in range(3):
        assert [nc.encrypt_name(n, b"\0" * 16) for n in names] == first
    assert len(calls) == len(names)


def test_encoded_names_are_kept_per_directory_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """encrypt_name's cache returns what AES-SIV gives, keyed by name and directory id, and
    stays within NAME_CACHE entries."""
    from encfs.fuse import names as names_mod

    monkeypatch.setattr(names_mod, "NAME_CACHE", 8)
    nc = names_mod.NameCipher(bytes(64), bytes(32))
    siv = AESSIV(bytes(64))

    def uncached(name: bytes, dirid: bytes) -> bytes:
        return names_mod.b64e(siv.encrypt(names_mod.pad16(name), [names_mod._NAME_AD, dirid]))

    for i in range(20):
        for dirid in (b"\0" * 16, b"\1" * 16):
            name = b"file-%d" % (i % 11)
            assert nc.encrypt_name(name, dirid) == uncached(name, dirid)
            assert nc.encrypt_name(name, dirid) == nc.encrypt_name(name, dirid)
            assert len(nc._encoded) <= 8
    assert nc.encrypt_name(b"a", b"\0" * 16) != nc.encrypt_name(b"a", b"\1" * 16)
