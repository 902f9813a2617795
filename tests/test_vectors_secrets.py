"""docs/FORMAT.md section 11 vector: a secret version's sealed value, checked against
encfs.keyd.secretdoc and against cryptography directly (the spec's own words)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from test_vectors import DOC, hexbytes, parse_vectors

from encfs.errors import InvalidCiphertext
from encfs.keyd import secretdoc

SECTION = DOC.split("## 11. Secrets", 1)[1]
SV = {v["vector"]: v for v in parse_vectors(SECTION)}


def encode(context: dict[str, str]) -> bytes:
    """§1's canonical encoding, from the spec text: u16 count, pairs sorted by key, u16-length-prefixed."""
    out = struct.pack(">H", len(context))
    for k, v in sorted((k.encode(), v.encode()) for k, v in context.items()):
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


def test_the_vector_is_there_and_its_key_is_what_the_text_says() -> None:
    assert set(SV) == {"secrets-value"}
    assert hexbytes(SV["secrets-value"]["data_key"]) == \
        hashlib.sha256(b"encfs FORMAT.md test vector secret data key").digest()


def test_sealed_value_vector() -> None:
    v = SV["secrets-value"]
    key, nonce, aad, sealed = (hexbytes(v[f]) for f in ("data_key", "nonce", "aad", "sealed"))
    name, version_id, value = v["name"], v["version_id"], v["value"].encode()
    # the spec's words, with cryptography alone
    assert aad == b"ESV\x01" + encode({"encfs:secret": name, "encfs:secret-version": version_id})
    assert sealed[:16] == b"ESV\x01" + nonce
    assert AESGCM(key).decrypt(nonce, sealed[16:], aad) == value
    assert len(sealed) == 16 + len(value) + 16
    # the code writes and reads exactly this
    assert secretdoc.value_aad(name, version_id) == aad
    assert secretdoc.seal_value(key, nonce, name, version_id, value) == sealed
    assert secretdoc.open_value(key, sealed, name, version_id) == value


@pytest.mark.parametrize("name,version_id", [("prod/db-password2", None), (None, "3f2a6c1e-8b4d-4e2f-9a7c-5d6e7f809103")])
def test_the_aad_binds_the_name_and_the_version_id(name: str | None, version_id: str | None) -> None:
    """Even under the right data key, a value opened as another secret's or version's is refused."""
    v = SV["secrets-value"]
    key = hexbytes(v["data_key"])
    sealed = secretdoc.seal_value(key, hexbytes(v["nonce"]), v["name"], v["version_id"], b"value")
    assert secretdoc.open_value(key, sealed, v["name"], v["version_id"]) == b"value"
    with pytest.raises(InvalidCiphertext, match="failed authentication"):
        secretdoc.open_value(key, sealed, name or v["name"], version_id or v["version_id"])


@pytest.mark.parametrize("at", [0, 3, 4, 16, -1])
def test_a_flipped_byte_is_refused(at: int) -> None:
    v = SV["secrets-value"]
    sealed = bytearray(hexbytes(v["sealed"]))
    sealed[at] ^= 1
    with pytest.raises(InvalidCiphertext):
        secretdoc.open_value(hexbytes(v["data_key"]), bytes(sealed), v["name"], v["version_id"])
