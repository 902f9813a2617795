"""KeyService API on a real SoftHSM2 token: encryption-context binding, re-encryption, tamper
detection (every flipped byte, truncation, relabelled blobs) and the size bounds of encrypt and
generate_data_key.

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

import os
import uuid

import pytest
from keys_helpers import CTX, new_key, records_for

from encfs.errors import ContextMismatch, InvalidCiphertext, UsageError
from encfs.keys.blob import HEADER_LEN, MIN_BLOB_LEN, CiphertextBlob
from encfs.keys.service import KeyService

# -- encryption context ------------------------------------------------------


def test_context_must_match_exactly(service: KeyService) -> None:
    key_id = new_key(service)
    ctx = {"bucket": "b1", "object": "o/1", "ünï": "cödé"}
    dk = service.generate_data_key(key_id, ctx)
    assert dk.plaintext is not None and len(dk.plaintext) == 32

    # insertion order does not matter
    reordered = dict(reversed(list(ctx.items())))
    assert list(reordered) != list(ctx)
    assert service.decrypt(dk.ciphertext_blob, reordered).plaintext == dk.plaintext

    wrong = [
        {},  # missing
        None,
        {"bucket": "b1", "object": "o/1"},  # one pair missing
        {**ctx, "extra": "1"},  # extra pair
        {**ctx, "bucket": "b2"},  # different value
        {"Bucket": "b1", "object": "o/1", "ünï": "cödé"},  # key case differs
        {"bucket": "b1", "object": "o/1", "ünï": "cödé "},  # trailing space
    ]
    for bad in wrong:
        with pytest.raises(ContextMismatch, match="context"):
            service.decrypt(dk.ciphertext_blob, bad)

    # a blob made without a context refuses a context
    plain = service.encrypt(key_id, b"no ctx")
    assert service.decrypt(plain).plaintext == b"no ctx"
    assert service.decrypt(plain, {}).plaintext == b"no ctx"
    with pytest.raises(ContextMismatch):
        service.decrypt(plain, {"a": "b"})


def test_re_encrypt_to_other_key(service: KeyService) -> None:
    src = new_key(service)
    dst = new_key(service, alias="dest")
    dk = service.generate_data_key(src, CTX)

    # same context (default), destination by alias
    moved = service.re_encrypt(dk.ciphertext_blob, CTX, "dest")
    assert isinstance(moved, bytes)
    assert moved != dk.ciphertext_blob
    parsed = CiphertextBlob.parse(moved)  # it is a blob, not plaintext
    assert str(parsed.header.key_id) == dst
    assert dk.plaintext not in moved
    out = service.decrypt(moved, CTX)
    assert (out.key_id, out.plaintext) == (dst, dk.plaintext)
    with pytest.raises(InvalidCiphertext):
        service.decrypt(moved, CTX, key=src)

    # new destination context
    new_ctx = {"purpose": "moved"}
    moved2 = service.re_encrypt(dk.ciphertext_blob, CTX, dst, new_ctx)
    assert CiphertextBlob.parse(moved2).header.key_id == uuid.UUID(dst)
    assert service.decrypt(moved2, new_ctx, key=dst).plaintext == dk.plaintext
    with pytest.raises(ContextMismatch):
        service.decrypt(moved2, CTX)

    # the source context must be right to re-encrypt
    with pytest.raises(ContextMismatch):
        service.re_encrypt(dk.ciphertext_blob, new_ctx, dst)
    # re-encrypt to the same key with a new context
    same = service.re_encrypt(dk.ciphertext_blob, CTX, src, {"v": "2"})
    assert service.decrypt(same, {"v": "2"}).plaintext == dk.plaintext
    with pytest.raises(ContextMismatch):
        service.decrypt(same, CTX)

    rec = records_for(service, "ReEncrypt")
    ok = [r for r in rec if r["outcome"] == "success"]
    assert len(ok) == 3
    assert ok[1]["destination_key_id"] == dst
    assert ok[1]["destination_context"] == new_ctx
    assert ok[1]["encryption_context"] == CTX


# -- tamper detection --------------------------------------------------------


def test_every_flipped_byte_is_detected(service: KeyService) -> None:
    key_id = new_key(service)
    new_key(service)  # other keys exist on the service
    dk = service.generate_data_key(key_id, CTX)
    blob = dk.ciphertext_blob
    assert dk.plaintext is not None
    assert len(blob) == HEADER_LEN + 32 + 16
    for pos in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= mask
            with pytest.raises(InvalidCiphertext) as exc:
                service.decrypt(bytes(bad), CTX)
            if pos >= HEADER_LEN or pos < 5:
                # body/tag and magic/version/alg: never blamed on the context
                assert not isinstance(exc.value, ContextMismatch), (pos, mask, exc.value)
    # the original still decrypts
    assert service.decrypt(blob, CTX).plaintext == dk.plaintext


def test_truncated_blobs(service: KeyService) -> None:
    key_id = new_key(service)
    blob = service.encrypt(key_id, b"0123456789abcdef" * 4, CTX)
    for length in (0, 1, 3, 10, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 5, MIN_BLOB_LEN - 1):
        with pytest.raises(InvalidCiphertext, match="truncated"):
            service.decrypt(blob[:length], CTX)
    for length in (MIN_BLOB_LEN, MIN_BLOB_LEN + 1, len(blob) - 16, len(blob) - 1):
        with pytest.raises(InvalidCiphertext):
            service.decrypt(blob[:length], CTX)
    # extension is tampering too
    with pytest.raises(InvalidCiphertext):
        service.decrypt(blob + b"\x00", CTX)


def test_blob_relabelled_with_another_key_id(service: KeyService) -> None:
    key_a = new_key(service)
    key_b = new_key(service)
    blob = service.encrypt(key_a, b"secret for a", CTX)
    forged = blob[:5] + uuid.UUID(key_b).bytes + blob[21:]
    with pytest.raises(InvalidCiphertext):
        service.decrypt(forged, CTX)
    with pytest.raises(InvalidCiphertext):
        service.decrypt(forged, CTX, key=key_b)
    with pytest.raises(InvalidCiphertext):
        service.re_encrypt(forged, CTX, key_b)


def test_decrypt_insisting_on_another_key(service: KeyService) -> None:
    key_a = new_key(service)
    key_b = new_key(service, alias="bee")
    blob = service.encrypt(key_a, b"x", CTX)
    for ref in (key_b, "bee", "alias/bee"):
        with pytest.raises(InvalidCiphertext, match=key_a):
            service.decrypt(blob, CTX, key=ref)
    assert service.decrypt(blob, CTX, key=key_a).plaintext == b"x"


def test_blob_with_unknown_version(service: KeyService) -> None:
    key_id = new_key(service)
    blob = service.encrypt(key_id, b"x")
    forged = blob[:21] + (7).to_bytes(4, "big") + blob[25:]
    with pytest.raises(InvalidCiphertext, match="version 7"):
        service.decrypt(forged)


# -- encrypt / generate_data_key bounds --------------------------------------


def test_encrypt_size_limit(service: KeyService) -> None:
    key_id = new_key(service)
    data = os.urandom(4096)
    blob = service.encrypt(key_id, data, CTX)
    assert service.decrypt(blob, CTX).plaintext == data
    assert service.decrypt(service.encrypt(key_id, b""), None).plaintext == b""
    with pytest.raises(UsageError, match="4096"):
        service.encrypt(key_id, os.urandom(4097), CTX)
    fail = [r for r in records_for(service, "Encrypt") if r["outcome"] == "failure"]
    assert len(fail) == 1 and "4097" in fail[0]["error"]


def test_generate_data_key_without_plaintext(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX, with_plaintext=False)
    assert dk.plaintext is None
    assert dk.key_id == key_id and dk.key_version == 1
    out = service.decrypt(dk.ciphertext_blob, CTX)
    assert len(out.plaintext) == 32
    assert records_for(service, "GenerateDataKeyWithoutPlaintext")[0]["key_id"] == key_id


def test_data_key_sizes(service: KeyService) -> None:
    key_id = new_key(service)
    for n in (1, 16, 64, 1024):
        dk = service.generate_data_key(key_id, number_of_bytes=n)
        assert dk.plaintext is not None and len(dk.plaintext) == n
        assert service.decrypt(dk.ciphertext_blob).plaintext == dk.plaintext
    for n in (0, -1, 1025, 4096):
        with pytest.raises(UsageError):
            service.generate_data_key(key_id, number_of_bytes=n)


def test_data_keys_are_distinct(service: KeyService) -> None:
    key_id = new_key(service)
    keys = {service.generate_data_key(key_id, CTX).plaintext for _ in range(50)}
    assert len(keys) == 50
