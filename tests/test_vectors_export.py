"""docs/FORMAT.md section 9 vectors: the export key file, the derived keys, an object and a manifest,
checked against encfs.block.exportformat and against cryptography directly (the spec's own words)."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import json
import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.block.exportformat import ExportDamaged, ExportKeys, KeyFile, Manifest, export_context
from encfs.keys.blob import CiphertextBlob
from encfs.keys.context import context_digest, encode_context

EXP = {v["vector"]: v for v in parse_vectors(DOC.split("## 9. Snapshot exports", 1)[1].split("## 10. ", 1)[0])}
PLAINTEXT = (b"encfs export vector " * 410)[:8192]


def hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=bytes(32), info=info).derive(key)  # "no salt" = 32 zero bytes


def test_the_vectors_are_all_there() -> None:
    assert set(EXP) == {"export-keys", "export-object", "export-manifest"}
    export_key = hashlib.sha256(b"encfs FORMAT.md test vector export key").digest()
    assert all(hexbytes(v["export_key"]) == export_key for v in EXP.values())


def test_key_file_and_derived_keys() -> None:
    v = EXP["export-keys"]
    key, vid = hexbytes(v["export_key"]), hexbytes(v["volume_id"])
    context = json.loads(v["context"])
    assert context == export_context(vid)
    doc = json.loads(v["key_file"])
    assert doc["format"] == 1 and doc["volume_id"] == vid.hex()
    # the wrapped key is a §2 blob of K under the vector CMK, bound to the context
    blob = bytes.fromhex(doc["wrapped_key"])
    parsed = CiphertextBlob.parse(blob)
    encoded = encode_context(context)
    assert parsed.header.key_id == uuid.UUID(v["key_id"]) and parsed.header.key_version == 1
    assert parsed.header.context_digest == context_digest(encoded) and parsed.header.nonce == hexbytes(v["blob_nonce"])
    assert AESGCM(hexbytes(v["cmk"])).decrypt(parsed.header.nonce, parsed.sealed, blob[:45] + encoded) == key
    # the code writes and reads exactly this file
    kf = KeyFile(vid, blob)
    assert kf.pack() == v["key_file"].encode() + b"\n"
    assert KeyFile.parse(kf.pack(), "DIR/key") == kf
    assert hkdf(key, b"encfs export names v1").hex() == v["name_key"]
    assert hkdf(key, b"encfs export manifest v1").hex() == v["manifest_key"]


def test_object_vector() -> None:
    v = EXP["export-object"]
    key, vid = hexbytes(v["export_key"]), hexbytes(v["volume_id"])
    assert hashlib.sha256(PLAINTEXT).hexdigest() == v["plaintext_sha256"]
    name = std_hmac.new(hkdf(key, b"encfs export names v1"), PLAINTEXT, "sha256").digest()
    assert name.hex() == v["name"] and v["path"] == f"objects/{name.hex()[:2]}/{name.hex()}"
    object_key = hkdf(key, b"encfs export object v1" + name)
    assert object_key.hex() == v["object_key"]
    sealed = AESGCM(object_key).encrypt(bytes(12), PLAINTEXT, vid + name)
    assert len(sealed) == int(v["object_size"]) == len(PLAINTEXT) + 16
    assert hashlib.sha256(sealed).hexdigest() == v["object_sha256"]
    assert sealed.startswith(hexbytes(v["object_prefix"])) and sealed.endswith(hexbytes(v["tag"]))
    # the code: same name, same bytes (deterministic), and it opens them
    keys = ExportKeys(key, vid)
    assert keys.object_name(PLAINTEXT) == name
    assert keys.seal_object(name, PLAINTEXT) == sealed
    assert keys.open_object(name.hex(), sealed, len(PLAINTEXT), "the vector") == PLAINTEXT


def test_object_bound_to_its_name_and_volume() -> None:
    v = EXP["export-object"]
    key, vid, name = hexbytes(v["export_key"]), hexbytes(v["volume_id"]), hexbytes(v["name"])
    sealed = ExportKeys(key, vid).seal_object(name, PLAINTEXT)
    other_name = bytes(32)
    with pytest.raises(ExportDamaged, match="fails authentication"):
        ExportKeys(key, vid).open_object(other_name.hex(), sealed, len(PLAINTEXT), "object x")
    with pytest.raises(ExportDamaged, match="fails authentication"):
        ExportKeys(key, bytes(16)).open_object(name.hex(), sealed, len(PLAINTEXT), "object x")
    # sealed for its name by a holder of K, but with other contents: refused by the name check
    keys = ExportKeys(key, vid)
    forged = keys.seal_object(name, PLAINTEXT[::-1])
    with pytest.raises(ExportDamaged, match="object x does not hash to its name"):
        keys.open_object(name.hex(), forged, len(PLAINTEXT), "object x")


def test_manifest_vector() -> None:
    v = EXP["export-manifest"]
    key, vid, sid = hexbytes(v["export_key"]), hexbytes(v["volume_id"]), v["snapshot_id"]
    aad = b"ENCX\x01" + vid + sid.encode()
    assert aad == hexbytes(v["aad"])
    nonce = hexbytes(v["nonce"])
    sealed = b"ENCX\x01" + nonce + AESGCM(hkdf(key, b"encfs export manifest v1")).encrypt(nonce, v["json"].encode(),
                                                                                          aad)
    assert len(sealed) == int(v["manifest_size"])
    assert hashlib.sha256(sealed).hexdigest() == v["manifest_sha256"]
    assert sealed.startswith(hexbytes(v["manifest_prefix"])) and sealed.endswith(hexbytes(v["tag"]))
    name = EXP["export-object"]["name"]
    expected = Manifest(vid, sid, (1 << 20) + 8192, "nightly", 1700000000.5, (None, name))
    assert expected.to_json() == v["json"].encode()
    keys = ExportKeys(key, vid)
    assert keys.manifest_aad(sid) == aad
    assert keys.open_manifest(sid, sealed) == expected
    with pytest.raises(ExportDamaged, match="fails authentication"):
        keys.open_manifest("snap-other", sealed)
    # a reader refuses JSON that breaks a rule even when it authenticates (written by a holder of K)
    for change in ({"chunk_size": 65536}, {"chunks": [None]}, {"size": 1000}, {"chunks": [None, "AB" * 32]},
                   {"snapshot_id": "snap-other"}, {"format": 2}):
        doc = dict(json.loads(v["json"]), **change)
        bad = b"ENCX\x01" + nonce + AESGCM(hkdf(key, b"encfs export manifest v1")).encrypt(
            nonce, json.dumps(doc).encode(), aad)
        with pytest.raises(ExportDamaged, match=f"manifest {sid} (is malformed|names another)"):
            keys.open_manifest(sid, bad)
