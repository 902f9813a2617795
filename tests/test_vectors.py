"""docs/FORMAT.md is the specification: check its test vectors and tables against the code.

Everything expected here is read from docs/FORMAT.md itself (the ```vector blocks and the decrypt
error table), never from a copy, so the document and the code cannot drift apart silently.
Checks run on three levels:

- pure code: encode_context / context_digest / CiphertextBlob reproduce every vector;
- an independent reference: the test's own encoder written from the spec text, hashlib, and
  cryptography's AESGCM open every blob vector with the documented key material K;
- the real token: K is imported into SoftHSM2 through the BYOK path, and the token must compute
  exactly the documented function (same bytes as host AES-GCM) and open the documented blobs.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import encfs.errors
from encfs.keys.blob import HEADER_LEN, MIN_BLOB_LEN, BlobHeader, CiphertextBlob
from encfs.keys.context import context_digest, encode_context
from encfs.keys.service import KeyService, token_object_id
from encfs.keys.token import Token

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
DOC = FORMAT_MD.read_text(encoding="utf-8")

_VECTOR_BLOCK = re.compile(r"^```vector[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


# -- reading the document -------------------------------------------------------


def parse_vectors(doc: str) -> list[dict[str, str]]:
    """Every ```vector block as {field: value}; indented lines continue the previous field."""
    vectors = []
    for match in _VECTOR_BLOCK.finditer(doc):
        fields: dict[str, str] = {}
        last: str | None = None
        for line in match.group(1).splitlines():
            if not line.strip():
                continue
            if line[0].isspace():
                assert last is not None, f"continuation line before any field: {line!r}"
                fields[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            assert sep, f"vector line is not 'name: value': {line!r}"
            name = name.strip()
            assert name not in fields, f"field {name!r} given twice in vector {fields.get('vector')}"
            fields[name] = value.strip()
            last = name
        assert "vector" in fields, f"vector block without a name: {match.group(0)[:80]!r}"
        vectors.append(fields)
    return vectors


def hexbytes(value: str) -> bytes:
    return bytes.fromhex("".join(value.split()))


def context_of(v: dict[str, str]) -> dict[str, str]:
    ctx = json.loads(v["context"])
    assert isinstance(ctx, dict) and all(isinstance(x, str) for kv in ctx.items() for x in kv)
    return ctx


VECTORS = parse_vectors(DOC.split("## 6. Filesystem format", 1)[0])  # key-service sections 1-5
CONTEXT_VECTORS = [v for v in VECTORS if "encoded" in v]
BLOB_VECTORS = [v for v in VECTORS if "blob" in v]


def by_name(vectors: list[dict[str, str]]) -> Any:
    return pytest.mark.parametrize("vec", vectors, ids=[v["vector"] for v in vectors])


def decrypt_error_table(doc: str) -> dict[str, tuple[str, list[str]]]:
    """The 'Decrypt procedure and errors' table: step -> (error class name, message patterns)."""
    section = doc.split("### Decrypt procedure and errors", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, tuple[str, list[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 4 or not re.fullmatch(r"\d+[a-z]?", cells[0]):
            continue
        step, _check, error, message = cells
        error_class = error.strip("`")
        if not re.fullmatch(r"[A-Za-z]+", error_class):
            continue  # a row that only points at sub-steps
        patterns = []
        for alternative in message.split(" / "):
            text = alternative.strip().strip("`")
            pat = re.escape(text).replace(r"\(\.\.\.\)", ".*")
            pat = re.sub(r"\bN\b", r"\\d+", pat)
            pat = re.sub(r"\b(ID|X|Y)\b", "[0-9a-f-]{36}", pat)
            patterns.append(pat)
        rows[step] = (error_class, patterns)
    return rows


# -- the document itself --------------------------------------------------------


def test_document_has_the_required_vectors() -> None:
    names = [v["vector"] for v in VECTORS]
    assert len(names) == len(set(names)), f"duplicate vector names: {names}"
    assert len(CONTEXT_VECTORS) >= 3 and len(BLOB_VECTORS) >= 2
    assert len(CONTEXT_VECTORS) + len(BLOB_VECTORS) == len(VECTORS), "a vector of unknown kind"
    contexts = [context_of(v) for v in CONTEXT_VECTORS]
    assert {} in contexts, "no vector for the empty context"
    assert any(len(c) == 1 for c in contexts), "no vector with exactly one pair"
    several = [c for c in contexts if len(c) >= 3]
    assert any(any(ord(ch) > 127 for kv in c.items() for s in kv for ch in s) for c in several), \
        "no multi-pair vector with non-ASCII UTF-8"
    assert any(list(c) != sorted(c, key=lambda k: k.encode()) for c in several), \
        "no vector whose keys are given out of canonical order"


def test_document_sections() -> None:
    for heading in ("## 1. Encryption context", "## 2. Ciphertext blob v1", "## 3. Token objects",
                    "## 4. Key metadata", "## 5. Audit log"):
        assert heading in DOC
    assert "## 6. Filesystem format" in DOC  # checked by tests/test_vectors_fs.py


# -- encryption context ---------------------------------------------------------


def reference_encode(context: dict[str, str]) -> bytes:
    """The encoding exactly as FORMAT.md section 1 words it, independent of encfs."""
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = struct.pack(">H", len(pairs))
    for k, v in pairs:
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


@by_name(CONTEXT_VECTORS)
def test_context_vector(vec: dict[str, str]) -> None:
    ctx = context_of(vec)
    encoded = hexbytes(vec["encoded"])
    assert reference_encode(ctx) == encoded, "the vector does not follow the spec text"
    assert encode_context(ctx) == encoded
    assert encode_context(dict(reversed(list(ctx.items())))) == encoded, "encoding depends on order"
    digest = hexbytes(vec["digest"])
    assert hashlib.sha256(encoded).digest()[:8] == digest
    assert context_digest(encoded) == digest


# -- ciphertext blob: pure code and host AES-GCM --------------------------------


@by_name(BLOB_VECTORS)
def test_blob_vector_layout(vec: dict[str, str]) -> None:
    blob = hexbytes(vec["blob"])
    ctx = context_of(vec)
    encoded = encode_context(ctx)
    parsed = CiphertextBlob.parse(blob)
    h = parsed.header
    assert h.key_id == uuid.UUID(vec["key_id"])
    assert h.key_version == int(vec["key_version"])
    assert h.algorithm == int(vec["algorithm"])
    assert h.nonce == hexbytes(vec["nonce"])
    assert h.context_digest == hexbytes(vec["context_digest"]) == context_digest(encoded)
    ciphertext, tag = hexbytes(vec["ciphertext"]), hexbytes(vec["tag"])
    assert len(ciphertext) == len(hexbytes(vec["plaintext"])) and len(tag) == 16
    assert parsed.sealed == ciphertext + tag
    assert len(blob) == MIN_BLOB_LEN + len(ciphertext)
    assert parsed.pack() == blob
    assert BlobHeader(h.key_id, h.key_version, h.context_digest, h.nonce, h.algorithm).pack() == blob[:HEADER_LEN]
    assert parsed.aad(encoded) == blob[:HEADER_LEN] + encoded == hexbytes(vec["aad"])


@by_name(BLOB_VECTORS)
def test_blob_vector_opens_with_host_aesgcm(vec: dict[str, str]) -> None:
    k = hexbytes(vec["cmk"])
    assert len(k) == 32
    blob, aad = hexbytes(vec["blob"]), hexbytes(vec["aad"])
    nonce, plaintext = hexbytes(vec["nonce"]), hexbytes(vec["plaintext"])
    assert AESGCM(k).decrypt(nonce, blob[HEADER_LEN:], aad) == plaintext
    assert AESGCM(k).encrypt(nonce, plaintext, aad) == blob[HEADER_LEN:]


@by_name(BLOB_VECTORS)
def test_blob_vector_any_flipped_byte_fails(vec: dict[str, str]) -> None:
    """Every byte of the blob, and of the encoded context, is authenticated."""
    aesgcm = AESGCM(hexbytes(vec["cmk"]))
    blob = hexbytes(vec["blob"])
    encoded = encode_context(context_of(vec))
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(InvalidTag):
            aesgcm.decrypt(bytes(bad[33:45]), bytes(bad[HEADER_LEN:]), bytes(bad[:HEADER_LEN]) + encoded)
    for i in range(len(encoded)):
        bad_ctx = bytearray(encoded)
        bad_ctx[i] ^= 0x80
        with pytest.raises(InvalidTag):
            aesgcm.decrypt(blob[33:45], blob[HEADER_LEN:], blob[:HEADER_LEN] + bytes(bad_ctx))


# -- the real token ---------------------------------------------------------------


@pytest.fixture(scope="module")
def byok(tmp_path_factory: pytest.TempPathFactory, token: Token) -> Iterator[tuple[KeyService, Callable[[bytes], str]]]:
    """A key service on the session token; import(K) gives the id of an EXTERNAL key holding K."""
    ks = KeyService(tmp_path_factory.mktemp("vectors-home"), token)
    imported: dict[bytes, str] = {}

    def import_material(k: bytes) -> str:
        if k not in imported:
            key_id = ks.create_key(description="FORMAT.md vector", origin="EXTERNAL")["KeyId"]
            params = ks.get_parameters_for_import(key_id, "RSAES_OAEP_SHA_1")
            public = serialization.load_pem_public_key(params.public_key_pem)
            wrapped = public.encrypt(k, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
            ks.import_key_material(key_id, wrapped, params.import_token)
            imported[k] = key_id
        return imported[k]

    yield ks, import_material
    ks.audit.close()


@by_name(BLOB_VECTORS)
def test_blob_vector_through_token(vec: dict[str, str], byok: tuple[KeyService, Callable[[bytes], str]]) -> None:
    service, import_material = byok
    k = hexbytes(vec["cmk"])
    key_id = import_material(k)
    tid = token_object_id(key_id, 1)
    assert service.store.load().keys[key_id].versions[0].token_id == tid.hex()
    ctx = context_of(vec)
    encoded = encode_context(ctx)
    nonce, plaintext = hexbytes(vec["nonce"]), hexbytes(vec["plaintext"])

    # The token opens the documented bytes (documented AAD, documented ciphertext and tag).
    doc_blob = hexbytes(vec["blob"])
    assert service.token.decrypt_gcm(tid, nonce, hexbytes(vec["aad"]), doc_blob[HEADER_LEN:]) == plaintext

    # The same vector under the imported key's real id, version 1: the token computes exactly
    # the documented function, and the service opens the result.
    header = BlobHeader(uuid.UUID(key_id), 1, context_digest(encoded), nonce)
    aad = header.pack() + encoded
    sealed = service.token.encrypt_gcm(tid, nonce, aad, plaintext)
    assert sealed == AESGCM(k).encrypt(nonce, plaintext, aad)
    blob = header.pack() + sealed
    opened = service.decrypt(blob, dict(reversed(list(ctx.items()))))
    assert (opened.key_id, opened.key_version, opened.plaintext) == (key_id, 1, plaintext)

    # The service's own blobs (random nonce) are the documented function too.
    data_key = service.generate_data_key(key_id, ctx, 32)
    for produced, expected in ((service.encrypt(key_id, plaintext, ctx), plaintext),
                               (data_key.ciphertext_blob, data_key.plaintext)):
        p = CiphertextBlob.parse(produced)
        assert (p.header.key_id, p.header.key_version) == (uuid.UUID(key_id), 1)
        assert p.header.context_digest == context_digest(encoded)
        assert AESGCM(k).decrypt(p.header.nonce, p.sealed, produced[:HEADER_LEN] + encoded) == expected


# -- decrypt errors, as tabulated in FORMAT.md -----------------------------------


def _set(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value):]


def _flip(blob: bytes, offset: int) -> bytes:
    return _set(blob, offset, bytes([blob[offset] ^ 0x01]))


Case = Callable[[KeyService, Any, str, str, bytes], Any]  # (service, clock, key, other key, blob)


def _deleted(s: KeyService, clock: Any, key: str, blob: bytes) -> Any:
    s.schedule_key_deletion(key, 7)
    clock.advance(days=8)
    return s.decrypt(blob, {"k": "v"})


# One way to reach each step of the table; what the step must raise is read from FORMAT.md.
ERROR_CASES: dict[str, Case] = {
    "1": lambda s, c, key, other, blob: s.decrypt(blob[:MIN_BLOB_LEN - 1], {"k": "v"}),
    "2": lambda s, c, key, other, blob: s.decrypt(_flip(blob, 0), {"k": "v"}),
    "3": lambda s, c, key, other, blob: s.decrypt(_set(blob, 3, b"\x02"), {"k": "v"}),
    "4": lambda s, c, key, other, blob: s.decrypt(_set(blob, 4, b"\x02"), {"k": "v"}),
    "5": lambda s, c, key, other, blob: s.decrypt(_set(blob, 21, bytes(4)), {"k": "v"}),
    "6": lambda s, c, key, other, blob: s.decrypt(_set(blob, 5, uuid.uuid4().bytes), {"k": "v"}),
    "7": lambda s, c, key, other, blob: _deleted(s, c, key, blob),
    "8": lambda s, c, key, other, blob: s.decrypt(blob, {"k": "v"}, key=other),
    "9": lambda s, c, key, other, blob: (s.disable_key(key), s.decrypt(blob, {"k": "v"})),
    "10": lambda s, c, key, other, blob: s.decrypt(_set(blob, 21, struct.pack(">I", 2)), {"k": "v"}),
    "11a": lambda s, c, key, other, blob: s.decrypt(blob, {"k": "w"}),
    "11b": lambda s, c, key, other, blob: s.decrypt(_flip(blob, len(blob) - 1), {"k": "v"}),
}
ERROR_TABLE = decrypt_error_table(DOC)


def test_error_table_lists_every_step() -> None:
    assert sorted(ERROR_TABLE) == sorted(ERROR_CASES)


@pytest.mark.parametrize("step", sorted(ERROR_CASES))
def test_decrypt_error_as_documented(step: str, service: KeyService, clock: Any) -> None:
    error_class, patterns = ERROR_TABLE[step]
    key = service.create_key()["KeyId"]
    other = service.create_key()["KeyId"]
    blob = service.encrypt(key, b"secret", {"k": "v"})
    assert service.decrypt(blob, {"k": "v"}).plaintext == b"secret"
    with pytest.raises(encfs.errors.EncfsError) as info:
        ERROR_CASES[step](service, clock, key, other, blob)
    assert type(info.value) is getattr(encfs.errors, error_class), (step, info.value)
    assert any(re.search(p, info.value.message) for p in patterns), (step, info.value.message, patterns)
    failures = [r for r in service.audit.read() if r["operation"] == "Decrypt" and r["outcome"] == "failure"]
    assert failures and failures[-1]["error"] == info.value.message
