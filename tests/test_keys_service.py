"""KeyService API on a real SoftHSM2 token: keys, aliases, states, rotation,
context binding, tamper detection, BYOK, data-key cache and audit.

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs.errors import (
    ContextMismatch,
    InvalidCiphertext,
    KeyImportError,
    KeyNotFound,
    KeyStateError,
    StateError,
    TokenError,
    UsageError,
)
from encfs.keys.audit import iso_time
from encfs.keys.blob import HEADER_LEN, MIN_BLOB_LEN, CiphertextBlob
from encfs.keys.cache import DataKeyCache
from encfs.keys.context import encode_context
from encfs.keys.service import KeyService, token_object_id

CTX = {"purpose": "unit-test", "tenant": "acme"}


# -- helpers -----------------------------------------------------------------


def new_key(service: KeyService, **kw: Any) -> str:
    return service.create_key(**kw)["KeyId"]


def audit_records(service: KeyService) -> list[dict[str, Any]]:
    return list(service.audit.read())


def records_for(service: KeyService, operation: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(service) if r["operation"] == operation]


def oaep_sha1() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def wrap_material(pem: bytes, material: bytes) -> bytes:
    pub = serialization.load_pem_public_key(pem)
    return pub.encrypt(material, oaep_sha1())  # type: ignore[union-attr]


def import_material(service: KeyService, key: str, material: bytes, valid_to: float | None = None) -> dict[str, Any]:
    params = service.get_parameters_for_import(key, "RSAES_OAEP_SHA_1")
    return service.import_key_material(key, wrap_material(params.public_key_pem, material),
                                       params.import_token, valid_to=valid_to)


def crypto_ops(service: KeyService, key: str, blob: bytes, other: str) -> dict[str, Any]:
    """Every crypto operation on ``key`` as a zero-argument callable."""
    return {
        "generate_data_key": lambda: service.generate_data_key(key, CTX),
        "generate_data_key_without_plaintext": lambda: service.generate_data_key(key, CTX, with_plaintext=False),
        "encrypt": lambda: service.encrypt(key, b"hello", CTX),
        "decrypt": lambda: service.decrypt(blob, CTX),
        "re_encrypt_from": lambda: service.re_encrypt(blob, CTX, other),
        "rotate": lambda: service.rotate_key(key),
    }


# -- create / list / describe ------------------------------------------------


def test_create_list_describe(service: KeyService, clock: Any) -> None:
    assert service.list_keys() == []
    created = service.create_key(description="first key")
    key_id = created["KeyId"]
    assert str(uuid.UUID(key_id)) == key_id
    assert created["KeyState"] == "Enabled"
    assert created["Origin"] == "TOKEN"
    assert created["CurrentKeyVersion"] == 1
    assert created["Description"] == "first key"
    clock.advance(1)
    second = new_key(service, description="second key")
    assert second != key_id

    listed = service.list_keys()
    assert [k["KeyId"] for k in listed] == [key_id, second]
    assert {k["Description"] for k in listed} == {"first key", "second key"}

    desc = service.describe_key(key_id)
    assert desc["KeyId"] == key_id
    assert desc["KeyState"] == "Enabled"
    assert desc["KeyRotationEnabled"] is False
    assert [v["Version"] for v in desc["KeyVersions"]] == [1]
    attrs = desc["TokenAttributes"]
    assert attrs["sensitive"] is True
    assert attrs["extractable"] is False
    assert attrs["never_extractable"] is True


def test_create_key_puts_a_backing_key_on_the_token(service: KeyService, token: Any) -> None:
    key_id = new_key(service)
    assert token.has_object(token_object_id(key_id, 1))
    assert not token.has_object(token_object_id(key_id, 2))


def test_create_key_rejects_unknown_origin(service: KeyService) -> None:
    with pytest.raises(UsageError, match="origin"):
        service.create_key(origin="AWS_CLOUDHSM")
    assert service.list_keys() == []


def test_unknown_key_ids_and_aliases(service: KeyService) -> None:
    new_key(service)
    missing = str(uuid.uuid4())
    with pytest.raises(KeyNotFound, match=missing):
        service.describe_key(missing)
    with pytest.raises(KeyNotFound, match="nosuchalias"):
        service.describe_key("alias/nosuchalias")
    with pytest.raises(KeyNotFound, match="nosuchalias"):
        service.describe_key("nosuchalias")
    with pytest.raises(KeyNotFound):
        service.generate_data_key(missing)
    with pytest.raises(KeyNotFound):
        service.encrypt("alias/nosuchalias", b"x")
    with pytest.raises(KeyNotFound):
        service.update_alias("alias/dangling", missing)
    assert "alias/dangling" not in service.list_aliases()


# -- aliases -----------------------------------------------------------------


def test_alias_create_resolve_move_delete(service: KeyService) -> None:
    a = service.create_key(alias="zq-payments-master")
    key_a = a["KeyId"]
    assert a["Aliases"] == ["alias/zq-payments-master"]
    key_b = new_key(service)

    # resolve by bare name and by alias/name
    assert service.describe_key("zq-payments-master")["KeyId"] == key_a
    assert service.describe_key("alias/zq-payments-master")["KeyId"] == key_a
    assert service.list_aliases() == {"alias/zq-payments-master": key_a}

    # a data key generated via the alias belongs to the key
    dk = service.generate_data_key("zq-payments-master", CTX)
    assert dk.key_id == key_a

    # move the alias
    assert service.update_alias("alias/zq-payments-master", key_b) == key_b
    assert service.describe_key("zq-payments-master")["KeyId"] == key_b
    assert service.describe_key(key_a)["Aliases"] == []
    assert service.describe_key(key_b)["Aliases"] == ["alias/zq-payments-master"]
    # the old blob still decrypts (it names the key id, not the alias)
    assert service.decrypt(dk.ciphertext_blob, CTX).plaintext == dk.plaintext
    # ...and insisting on the alias (now key_b) fails
    with pytest.raises(InvalidCiphertext):
        service.decrypt(dk.ciphertext_blob, CTX, key="zq-payments-master")

    # a second alias for the same key; update_alias creates it
    service.update_alias("zq-second", key_b)
    assert service.describe_key(key_b)["Aliases"] == ["alias/zq-payments-master", "alias/zq-second"]

    service.delete_alias("zq-payments-master")
    assert service.list_aliases() == {"alias/zq-second": key_b}
    with pytest.raises(KeyNotFound):
        service.describe_key("alias/zq-payments-master")
    # the keys themselves are untouched
    assert {k["KeyId"] for k in service.list_keys()} == {key_a, key_b}


def test_create_key_with_taken_alias_fails_without_creating_a_key(service: KeyService) -> None:
    new_key(service, alias="taken")
    with pytest.raises(UsageError, match="already exists"):
        service.create_key(alias="alias/taken")
    assert len(service.list_keys()) == 1


def test_delete_unknown_alias_fails(service: KeyService) -> None:
    with pytest.raises((UsageError, KeyNotFound), match="does not exist"):
        service.delete_alias("never-created")


@pytest.mark.parametrize("bad", ["alias/aws/ebs", "awsfoo", "has space", "alias/", "", "x" * 300])
def test_invalid_alias_names(service: KeyService, bad: str) -> None:
    key_id = new_key(service)
    with pytest.raises(UsageError):
        service.update_alias(bad, key_id)
    assert service.list_aliases() == {}


def test_alias_is_never_stored_in_ciphertext(service: KeyService) -> None:
    name = "Zebra-Quokka_7731"
    key_id = new_key(service, alias=name)
    blobs = [
        service.encrypt(name, b"some plaintext", CTX),
        service.encrypt(f"alias/{name}", b"some plaintext", CTX),
        service.generate_data_key(name, CTX).ciphertext_blob,
        service.generate_data_key(f"alias/{name}", {}, with_plaintext=False).ciphertext_blob,
    ]
    for blob in blobs:
        assert name.encode() not in blob
        assert b"alias/" not in blob
        assert uuid.UUID(key_id).bytes in blob  # the key id is what the blob carries
    # after the alias is deleted every blob still decrypts
    service.delete_alias(name)
    assert service.decrypt(blobs[0], CTX).plaintext == b"some plaintext"
    assert service.decrypt(blobs[3], {}).key_id == key_id


# -- state machine -----------------------------------------------------------


def test_disable_enable(service: KeyService) -> None:
    key_id = new_key(service)
    other = new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)

    assert service.disable_key(key_id)["KeyState"] == "Disabled"
    assert service.describe_key(key_id)["KeyState"] == "Disabled"
    for name, op in crypto_ops(service, key_id, blob, other).items():
        with pytest.raises(KeyStateError, match="disabled") as exc:
            op()
        assert key_id in str(exc.value), name
    # re-encrypting *to* a disabled key fails too
    other_blob = service.encrypt(other, b"x", CTX)
    with pytest.raises(KeyStateError, match="disabled"):
        service.re_encrypt(other_blob, CTX, key_id)
    # disabling twice is harmless
    assert service.disable_key(key_id)["KeyState"] == "Disabled"

    assert service.enable_key(key_id)["KeyState"] == "Enabled"
    assert service.decrypt(blob, CTX).plaintext == b"payload"
    for op in crypto_ops(service, key_id, blob, other).values():
        op()


def test_schedule_deletion_window_bounds(service: KeyService) -> None:
    key_id = new_key(service)
    for days in (0, 6, 31, 365, -7):
        with pytest.raises(UsageError, match="7 to 30"):
            service.schedule_key_deletion(key_id, days=days)
        assert service.describe_key(key_id)["KeyState"] == "Enabled"
    for days in (7, 30):
        k = new_key(service)
        desc = service.schedule_key_deletion(k, days=days)
        assert desc["KeyState"] == "PendingDeletion"
        assert "DeletionDate" in desc


def test_pending_deletion_blocks_crypto_and_cancel_returns_disabled(service: KeyService) -> None:
    key_id = new_key(service)
    other = new_key(service)
    blob = service.encrypt(key_id, b"payload", CTX)
    service.schedule_key_deletion(key_id, days=7)
    assert service.describe_key(key_id)["KeyState"] == "PendingDeletion"

    for name, op in crypto_ops(service, key_id, blob, other).items():
        with pytest.raises(KeyStateError) as exc:
            op()
        assert "pending deletion" in str(exc.value).lower(), name
    with pytest.raises(KeyStateError, match="pending deletion"):
        service.re_encrypt(service.encrypt(other, b"x", CTX), CTX, key_id)
    with pytest.raises(KeyStateError):
        service.enable_key(key_id)
    with pytest.raises(KeyStateError):
        service.schedule_key_deletion(key_id, days=7)

    desc = service.cancel_key_deletion(key_id)
    assert desc["KeyState"] == "Disabled"
    assert "DeletionDate" not in desc
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(blob, CTX)
    with pytest.raises(KeyStateError):
        service.cancel_key_deletion(key_id)
    service.enable_key(key_id)
    assert service.decrypt(blob, CTX).plaintext == b"payload"


def test_deletion_happens_after_window(service: KeyService, token: Any, clock: Any) -> None:
    key_id = new_key(service, alias="doomed")
    service.rotate_key(key_id)
    keeper = new_key(service)
    blobs = [service.encrypt(key_id, b"old data", CTX)]
    service.rotate_key(key_id)
    blobs.append(service.generate_data_key(key_id, CTX).ciphertext_blob)
    versions = [1, 2, 3]
    for v in versions:
        assert token.has_object(token_object_id(key_id, v))

    service.schedule_key_deletion(key_id, days=10)
    clock.advance(days=9)
    assert service.describe_key(key_id)["KeyState"] == "PendingDeletion"  # not yet
    for v in versions:
        assert token.has_object(token_object_id(key_id, v))

    clock.advance(days=2)  # window + 1 day
    listed = [k["KeyId"] for k in service.list_keys()]  # any call applies the deletion
    assert key_id not in listed and keeper in listed
    for v in versions:
        assert not token.has_object(token_object_id(key_id, v))
    with pytest.raises(KeyNotFound, match="deleted"):
        service.describe_key(key_id)
    with pytest.raises(KeyNotFound):
        service.describe_key("doomed")  # its alias went with it
    assert "alias/doomed" not in service.list_aliases()
    for blob in blobs:
        with pytest.raises(KeyNotFound, match="deleted"):
            service.decrypt(blob, CTX)
    deletes = records_for(service, "DeleteKey")
    assert [r["key_id"] for r in deletes] == [key_id]
    assert deletes[0]["outcome"] == "success" and deletes[0]["trigger"]
    # the surviving key is untouched
    assert token.has_object(token_object_id(keeper, 1))
    service.encrypt(keeper, b"still fine")


def test_deletion_is_triggered_by_a_crypto_call_too(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    blob = service.encrypt(key_id, b"x")
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    with pytest.raises(KeyNotFound, match="deleted"):
        service.decrypt(blob)


# -- rotation ----------------------------------------------------------------


def test_rotate_on_demand(service: KeyService, token: Any) -> None:
    key_id = new_key(service)
    dk1 = service.generate_data_key(key_id, CTX)
    enc1 = service.encrypt(key_id, b"v1 data", CTX)
    assert dk1.key_version == 1

    desc = service.rotate_key(key_id)
    assert desc["CurrentKeyVersion"] == 2
    assert [v["Version"] for v in desc["KeyVersions"]] == [1, 2]
    assert token.has_object(token_object_id(key_id, 2))
    assert token.has_object(token_object_id(key_id, 1))  # old version kept

    dk2 = service.generate_data_key(key_id, CTX)
    assert dk2.key_version == 2
    assert CiphertextBlob.parse(dk2.ciphertext_blob).header.key_version == 2
    assert CiphertextBlob.parse(service.encrypt(key_id, b"x")).header.key_version == 2

    d1 = service.decrypt(dk1.ciphertext_blob, CTX)
    assert (d1.plaintext, d1.key_version) == (dk1.plaintext, 1)
    assert service.decrypt(enc1, CTX).plaintext == b"v1 data"
    d2 = service.decrypt(dk2.ciphertext_blob, CTX)
    assert (d2.plaintext, d2.key_version) == (dk2.plaintext, 2)

    rec = records_for(service, "RotateKeyOnDemand")
    assert [(r["key_id"], r["key_version"], r["outcome"]) for r in rec] == [(key_id, 2, "success")]


def test_automatic_rotation(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    old = service.generate_data_key(key_id, CTX)
    start = clock()
    desc = service.enable_key_rotation(key_id, period_days=90)
    assert desc["KeyRotationEnabled"] is True
    assert desc["RotationPeriodInDays"] == 90

    clock.advance(days=89)
    assert service.generate_data_key(key_id, CTX).key_version == 1  # not before the period
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 1

    clock.advance(days=2)  # 91 days after enabling
    assert service.generate_data_key(key_id, CTX).key_version == 2
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 2
    assert service.decrypt(old.ciphertext_blob, CTX).plaintext == old.plaintext

    auto = records_for(service, "RotateKey")
    assert len(auto) == 1
    assert auto[0]["key_id"] == key_id and auto[0]["key_version"] == 2
    assert "automatic" in auto[0]["trigger"]

    # a lazily applied rotation is dated at its scheduled time (day 90), so the
    # schedule does not drift with usage: the next one is due at day 180, not 181
    versions = service.describe_key(key_id)["KeyVersions"]
    assert versions[1]["CreationDate"] == iso_time(start + 90 * 86400)
    clock.advance(days=88.5)  # day 179.5
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 2
    clock.advance(days=1)  # day 180.5
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 3

    # several missed periods give one new version, dated at the latest scheduled time
    clock.advance(days=300)  # day 480.5: rotations were due at 270, 360 and 450
    desc = service.describe_key(key_id)
    assert desc["CurrentKeyVersion"] == 4
    assert desc["KeyVersions"][-1]["CreationDate"] == iso_time(start + 450 * 86400)

    service.disable_key_rotation(key_id)
    clock.advance(days=400)
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 4
    assert len(records_for(service, "RotateKey")) == 3


def test_automatic_rotation_skips_disabled_keys(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    service.enable_key_rotation(key_id, period_days=90)
    service.disable_key(key_id)
    clock.advance(days=100)
    assert service.describe_key(key_id)["CurrentKeyVersion"] == 1
    assert records_for(service, "RotateKey") == []


@pytest.mark.parametrize("period", [0, 1, 89, 2561, 10000])
def test_rotation_period_bounds(service: KeyService, period: int) -> None:
    key_id = new_key(service)
    with pytest.raises(UsageError, match="90 to 2560"):
        service.enable_key_rotation(key_id, period_days=period)
    assert service.describe_key(key_id)["KeyRotationEnabled"] is False


def test_rotation_period_limits_accepted(service: KeyService) -> None:
    for period in (90, 2560):
        key_id = new_key(service)
        assert service.enable_key_rotation(key_id, period_days=period)["RotationPeriodInDays"] == period


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


# -- BYOK (imported key material) --------------------------------------------


def test_byok_import_and_host_side_check(service: KeyService, token: Any) -> None:
    created = service.create_key(origin="EXTERNAL", description="byok")
    key_id = created["KeyId"]
    assert created["KeyState"] == "PendingImport"
    assert created["Origin"] == "EXTERNAL"
    assert not token.has_object(token_object_id(key_id, 1))
    for op in (lambda: service.generate_data_key(key_id), lambda: service.encrypt(key_id, b"x")):
        with pytest.raises(KeyStateError, match="pending import"):
            op()
    with pytest.raises(KeyStateError):
        service.rotate_key(key_id)

    params = service.get_parameters_for_import(key_id, "RSAES_OAEP_SHA_1")
    assert params.public_key_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert params.key_id == key_id
    pub = serialization.load_pem_public_key(params.public_key_pem)
    assert pub.key_size >= 2048  # type: ignore[union-attr]

    material = os.urandom(32)
    desc = service.import_key_material(key_id, pub.encrypt(material, oaep_sha1()),  # type: ignore[union-attr]
                                       params.import_token)
    assert desc["KeyState"] == "Enabled"
    assert desc["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    attrs = service.describe_key(key_id)["TokenAttributes"]
    assert attrs["sensitive"] is True and attrs["extractable"] is False
    # the RSA wrapping pair is gone after a successful import
    assert not token.has_object(token_object_id(key_id, 0xFFFFFFFF))

    ctx = {"byok": "yes"}
    blob = service.encrypt(key_id, b"imported material works", ctx)
    # Open the blob on the host with the material we imported: the token key IS that material.
    header = CiphertextBlob.parse(blob).header
    host = AESGCM(material).decrypt(header.nonce, blob[HEADER_LEN:], blob[:HEADER_LEN] + encode_context(ctx))
    assert host == b"imported material works"
    with pytest.raises(Exception):
        AESGCM(os.urandom(32)).decrypt(header.nonce, blob[HEADER_LEN:], blob[:HEADER_LEN] + encode_context(ctx))
    assert service.decrypt(blob, ctx).plaintext == b"imported material works"

    with pytest.raises(KeyStateError, match="imported"):
        service.rotate_key(key_id)
    with pytest.raises(KeyStateError):
        service.enable_key_rotation(key_id, period_days=90)


def test_byok_rejects_bad_import_token_and_garbage(service: KeyService) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    with pytest.raises(KeyImportError, match="no import parameters"):
        service.import_key_material(key_id, b"\x00" * 384, "0" * 32)
    params = service.get_parameters_for_import(key_id)
    wrapped = wrap_material(params.public_key_pem, os.urandom(32))
    with pytest.raises(KeyImportError, match="import token"):
        service.import_key_material(key_id, wrapped, "f" * 32)
    with pytest.raises(KeyImportError):
        service.import_key_material(key_id, os.urandom(384), params.import_token)
    assert service.describe_key(key_id)["KeyState"] == "PendingImport"
    # new parameters invalidate the old import token
    params2 = service.get_parameters_for_import(key_id)
    with pytest.raises(KeyImportError):
        service.import_key_material(key_id, wrapped, params.import_token)
    service.import_key_material(key_id, wrap_material(params2.public_key_pem, os.urandom(32)), params2.import_token)
    assert service.describe_key(key_id)["KeyState"] == "Enabled"


@pytest.mark.parametrize("size", [1, 16, 24, 30, 48])
def test_byok_rejects_wrong_material_length(service: KeyService, token: Any, size: int) -> None:
    """Only 256-bit material is accepted, although SoftHSM2 reports CKA_VALUE_LEN 0 after C_UnwrapKey."""
    key_id = new_key(service, origin="EXTERNAL")
    params = service.get_parameters_for_import(key_id)
    wrapped = wrap_material(params.public_key_pem, os.urandom(size))
    expected = (KeyImportError, TokenError) if size % 8 else KeyImportError
    with pytest.raises(expected) as exc:
        service.import_key_material(key_id, wrapped, params.import_token)
    if size % 8 == 0:
        assert f"{size} bytes" in str(exc.value)
    assert service.describe_key(key_id)["KeyState"] == "PendingImport"
    assert not token.has_object(token_object_id(key_id, 1))
    with pytest.raises(KeyStateError):
        service.encrypt(key_id, b"x")
    # the same parameters still take valid material
    service.import_key_material(key_id, wrap_material(params.public_key_pem, os.urandom(32)), params.import_token)
    assert service.describe_key(key_id)["KeyState"] == "Enabled"


def test_import_parameters_only_for_external_keys(service: KeyService) -> None:
    key_id = new_key(service)
    with pytest.raises(KeyStateError, match="EXTERNAL"):
        service.get_parameters_for_import(key_id)
    with pytest.raises(UsageError):
        service.get_parameters_for_import(key_id, "RSAES_PKCS1_V1_5")


def test_byok_expiry_and_reimport(service: KeyService, token: Any, clock: Any) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    material = os.urandom(32)
    desc = import_material(service, key_id, material, valid_to=clock() + 5 * 86400)
    assert desc["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    blob = service.encrypt(key_id, b"before expiry", CTX)
    assert token.has_object(token_object_id(key_id, 1))

    clock.advance(days=4)
    assert service.describe_key(key_id)["KeyState"] == "Enabled"
    clock.advance(days=2)
    assert service.describe_key(key_id)["KeyState"] == "PendingImport"
    assert not token.has_object(token_object_id(key_id, 1))
    for op in (lambda: service.decrypt(blob, CTX), lambda: service.encrypt(key_id, b"x"),
               lambda: service.generate_data_key(key_id)):
        with pytest.raises(KeyStateError, match="pending import"):
            op()
    assert [r["key_id"] for r in records_for(service, "DeleteImportedKeyMaterial")] == [key_id]

    # different material is refused; the key stays PendingImport with nothing on the token
    with pytest.raises(KeyImportError, match="differs"):
        import_material(service, key_id, os.urandom(32))
    assert service.describe_key(key_id)["KeyState"] == "PendingImport"
    assert not token.has_object(token_object_id(key_id, 1))
    with pytest.raises(KeyStateError):
        service.decrypt(blob, CTX)

    # the same material comes back (no expiry this time) and old blobs decrypt again
    desc = import_material(service, key_id, material)
    assert desc["KeyState"] == "Enabled"
    assert service.decrypt(blob, CTX).plaintext == b"before expiry"
    clock.advance(days=365)
    assert service.describe_key(key_id)["KeyState"] == "Enabled"


def test_byok_import_valid_to_must_be_future(service: KeyService, clock: Any) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    params = service.get_parameters_for_import(key_id)
    with pytest.raises(UsageError):
        service.import_key_material(key_id, wrap_material(params.public_key_pem, os.urandom(32)),
                                    params.import_token, valid_to=clock() - 1)


def test_byok_import_parameters_expire(service: KeyService, clock: Any) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    params = service.get_parameters_for_import(key_id)
    clock.advance(days=2)
    with pytest.raises(KeyImportError, match="expired"):
        service.import_key_material(key_id, wrap_material(params.public_key_pem, os.urandom(32)),
                                    params.import_token)


def test_byok_sha256_oaep_is_a_clear_token_error(service: KeyService) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    params = service.get_parameters_for_import(key_id, "RSAES_OAEP_SHA_256")
    assert params.wrapping_algorithm == "RSAES_OAEP_SHA_256"
    pub = serialization.load_pem_public_key(params.public_key_pem)
    wrapped = pub.encrypt(os.urandom(32), padding.OAEP(  # type: ignore[union-attr]
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    with pytest.raises(TokenError, match="SHA_256"):
        service.import_key_material(key_id, wrapped, params.import_token)
    assert service.describe_key(key_id)["KeyState"] == "PendingImport"
    fail = [r for r in records_for(service, "ImportKeyMaterial") if r["outcome"] == "failure"]
    assert len(fail) == 1 and "SHA_256" in fail[0]["error"]


def test_byok_deletion_destroys_wrapping_pair(service: KeyService, token: Any, clock: Any) -> None:
    key_id = new_key(service, origin="EXTERNAL")
    service.get_parameters_for_import(key_id)
    assert token.has_object(token_object_id(key_id, 0xFFFFFFFF))
    service.schedule_key_deletion(key_id, days=7)
    assert service.cancel_key_deletion(key_id)["KeyState"] == "PendingImport"
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    assert service.list_keys() == []
    assert not token.has_object(token_object_id(key_id, 0xFFFFFFFF))


# -- data-key cache ------------------------------------------------------------


class MonoClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cache_hits_skip_token_and_audit(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    first = service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert first.plaintext == dk.plaintext
    assert cache.hits == 0
    n_decrypt = len(records_for(service, "Decrypt"))
    assert n_decrypt == 1
    for i in range(5):
        again = service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        assert again.plaintext == dk.plaintext
        assert (again.key_id, again.key_version) == (key_id, 1)
        assert cache.hits == i + 1
    assert len(records_for(service, "Decrypt")) == n_decrypt
    # a different context is a different entry and is checked on the token
    with pytest.raises(ContextMismatch):
        service.decrypt(dk.ciphertext_blob, {"other": "ctx"}, cache=cache)
    # insisting on the wrong key is refused even with a cached entry
    other = new_key(service)
    with pytest.raises(InvalidCiphertext):
        service.decrypt(dk.ciphertext_blob, CTX, key=other, cache=cache)


def test_cache_max_uses(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache(max_uses=3)
    for _ in range(7):
        assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    # 1 unwrap + 2 hits, 1 unwrap + 2 hits, 1 unwrap
    assert len(records_for(service, "Decrypt")) == 3
    assert cache.hits == 4


def test_cache_max_age(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    mono = MonoClock()
    cache = DataKeyCache(max_age=60, clock=mono)
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    mono.t += 59
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 1
    assert len(records_for(service, "Decrypt")) == 1
    mono.t += 1  # 60 s after the unwrap: expired
    assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    assert cache.hits == 1
    assert len(records_for(service, "Decrypt")) == 2
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 2


def test_cache_respects_key_state(service: KeyService) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert cache.hits == 1
    service.disable_key(key_id)
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    fail = [r for r in records_for(service, "Decrypt") if r["outcome"] == "failure"]
    assert len(fail) == 1 and "disabled" in fail[0]["error"]
    service.enable_key(key_id)
    assert service.decrypt(dk.ciphertext_blob, CTX, cache=cache).plaintext == dk.plaintext
    service.schedule_key_deletion(key_id, days=7)
    with pytest.raises(KeyStateError, match="pending deletion"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)


def test_cache_entry_of_deleted_key_is_not_served(service: KeyService, clock: Any) -> None:
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    service.schedule_key_deletion(key_id, days=7)
    clock.advance(days=8)
    with pytest.raises(KeyNotFound, match="deleted"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    assert len(cache) == 0
    fail = [r for r in records_for(service, "Decrypt") if r["outcome"] == "failure"]
    assert len(fail) == 1 and fail[0]["key_id"] == key_id


def test_cache_sees_state_changes_made_by_another_service_instance(service: KeyService, token: Any,
                                                                  clock: Any) -> None:
    """Another KeyService on the same home (as another process would be) disables the key."""
    key_id = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    cache = DataKeyCache()
    service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
    other = KeyService(service.home, token, clock=clock)
    try:
        other.disable_key(key_id)
    finally:
        other.audit.close()
    with pytest.raises(KeyStateError, match="disabled"):
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)


def test_cache_limits_validated() -> None:
    for kw in ({"max_age": 0}, {"max_uses": 0}, {"max_entries": 0}):
        with pytest.raises(ValueError):
            DataKeyCache(**kw)


# -- audit -------------------------------------------------------------------


def test_audit_records_every_call(service: KeyService, clock: Any) -> None:
    key_id = new_key(service, alias="audited")
    other = new_key(service)
    dk = service.generate_data_key(key_id, CTX)
    service.decrypt(dk.ciphertext_blob, CTX)
    blob = service.encrypt(key_id, b"p", CTX)
    service.re_encrypt(blob, CTX, other)
    service.describe_key("audited")
    service.list_keys()
    service.rotate_key(key_id)
    service.disable_key(key_id)
    with pytest.raises(KeyStateError):
        service.encrypt(key_id, b"p", CTX)
    with pytest.raises(ContextMismatch):
        service.decrypt(service.encrypt(other, b"q", CTX), {"wrong": "ctx"})
    with pytest.raises(KeyNotFound):
        service.describe_key("alias/missing")
    service.enable_key(key_id)
    service.schedule_key_deletion(other, days=7)
    service.cancel_key_deletion(other)

    recs = audit_records(service)
    for r in recs:
        assert r["outcome"] in ("success", "failure")
        assert r["principal"]["uid"] == os.getuid()
        assert r["principal"]["pid"] == os.getpid()
        assert r["time"].endswith("Z")
        if r["outcome"] == "failure":
            assert r["error"]
        else:
            assert "error" not in r
    ops = [r["operation"] for r in recs]
    for op in ("CreateKey", "GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt", "DescribeKey", "ListKeys",
               "RotateKeyOnDemand", "DisableKey", "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion"):
        assert op in ops, op
    by_op = {}
    for r in recs:
        by_op.setdefault(r["operation"], []).append(r)
    gdk = by_op["GenerateDataKey"][0]
    assert (gdk["key_id"], gdk["key_version"], gdk["encryption_context"]) == (key_id, 1, CTX)
    assert by_op["CreateKey"][0]["key_id"] == key_id
    enc_fail = [r for r in by_op["Encrypt"] if r["outcome"] == "failure"]
    assert len(enc_fail) == 1 and enc_fail[0]["key_id"] == key_id and "disabled" in enc_fail[0]["error"]
    dec_fail = [r for r in by_op["Decrypt"] if r["outcome"] == "failure"]
    assert len(dec_fail) == 1 and dec_fail[0]["key_id"] == other
    assert dec_fail[0]["encryption_context"] == {"wrong": "ctx"}
    desc_fail = [r for r in by_op["DescribeKey"] if r["outcome"] == "failure"]
    assert len(desc_fail) == 1 and "missing" in desc_fail[0]["error"]
    assert by_op["ScheduleKeyDeletion"][0]["key_id"] == other


def test_audit_records_validation_failures(service: KeyService) -> None:
    """Calls rejected for bad arguments are audited as failures too."""
    key_id = new_key(service)
    attempts = [
        ("ScheduleKeyDeletion", lambda: service.schedule_key_deletion(key_id, days=3)),
        ("EnableKeyRotation", lambda: service.enable_key_rotation(key_id, period_days=10)),
        ("GenerateDataKey", lambda: service.generate_data_key(key_id, number_of_bytes=0)),
        ("GetParametersForImport", lambda: service.get_parameters_for_import(key_id, "RSA_NONE")),
        ("CreateKey", lambda: service.create_key(origin="BOGUS")),
    ]
    for op, call in attempts:
        before = len(records_for(service, op))
        with pytest.raises(UsageError) as exc:
            call()
        recs = records_for(service, op)
        assert len(recs) == before + 1, op
        assert recs[-1]["outcome"] == "failure"
        assert recs[-1]["error"] == exc.value.message


def test_audit_log_never_contains_secrets(service: KeyService, tmp_path: Path) -> None:
    key_id = new_key(service)
    secrets: list[bytes] = []
    cache = DataKeyCache()
    for n in (16, 32, 64):
        dk = service.generate_data_key(key_id, CTX, number_of_bytes=n)
        assert dk.plaintext is not None
        secrets.append(dk.plaintext)
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        service.decrypt(dk.ciphertext_blob, CTX, cache=cache)
        service.re_encrypt(dk.ciphertext_blob, CTX, key_id)
    no_pt = service.generate_data_key(key_id, CTX, with_plaintext=False)
    secrets.append(service.decrypt(no_pt.ciphertext_blob, CTX).plaintext)
    messages = [b"TOP-SECRET-PAYLOAD-" + os.urandom(8).hex().encode(), os.urandom(200)]
    for m in messages:
        blob = service.encrypt(key_id, m, CTX)
        service.decrypt(blob, CTX)
        with pytest.raises(ContextMismatch):
            service.decrypt(blob, {"bad": "ctx"})
    with pytest.raises(UsageError):
        service.encrypt(key_id, messages[0] * 300, CTX)
    ext = new_key(service, origin="EXTERNAL")
    material = os.urandom(32)
    import_material(service, ext, material)
    secrets.append(material)

    raw = (service.home / "audit.log").read_bytes()
    assert raw.count(b"\n") >= 20
    for line in raw.splitlines():
        json.loads(line)
    for s in secrets:
        for form in (s, s.hex().encode(), s.hex().upper().encode(), base64.b64encode(s),
                     base64.urlsafe_b64encode(s), base64.b64encode(s).rstrip(b"=")):
            assert form not in raw
    for m in messages:
        for form in (m, m.hex().encode(), base64.b64encode(m)):
            assert form not in raw
    # sanity: the search above would have found what it looks for
    assert key_id.encode() in raw


def test_generate_data_key_can_seed_the_cache(service: KeyService) -> None:
    from encfs.keys.cache import DataKeyCache

    key = service.create_key()["KeyId"]
    cache = DataKeyCache()
    dk = service.generate_data_key(key, {"f": "1"}, cache=cache)
    before = sum(1 for r in service.audit.read() if r["operation"] == "Decrypt")
    assert service.decrypt(dk.ciphertext_blob, {"f": "1"}, cache=cache).plaintext == dk.plaintext
    assert sum(1 for r in service.audit.read() if r["operation"] == "Decrypt") == before  # no token call
    assert cache.hits == 1
    service.disable_key(key)
    with pytest.raises(KeyStateError):
        service.decrypt(dk.ciphertext_blob, {"f": "1"}, cache=cache)


def test_a_killed_writers_temporary_copy_is_removed_by_the_next_write(service: KeyService) -> None:
    """A writer killed between writing keys.json.tmp.PID (or the copy's) and renaming it leaves
    that file; the next writer, under the lock, removes those of dead processes only."""
    import subprocess
    import sys

    service.create_key(alias="first")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    home = service.store.path.parent
    dead = [home / f"keys.json.tmp.{gone}", home / f"keys.json.bak.tmp.{gone}"]
    live = home / "keys.json.bak.tmp.1"  # pid 1 is alive: its copy is not ours to remove
    for p in (*dead, live):
        p.write_bytes(b"{}")
    service.create_key(alias="second")
    assert not any(p.exists() for p in dead) and live.exists()


def test_a_dead_writers_temporary_that_cannot_be_removed_is_a_state_error(service: KeyService) -> None:
    """A leftover temporary the next writer cannot remove (here a directory in its place) is one
    line naming it, and no change is made, rather than an OSError escaping the store."""
    import subprocess
    import sys

    service.create_key(alias="first")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stuck = service.store.path.parent / f"keys.json.bak.tmp.{gone}"
    stuck.mkdir()
    before = service.store.path.read_bytes()
    with pytest.raises(StateError) as exc:
        service.create_key(alias="second")
    assert str(exc.value) == f"cannot remove a dead writer's temporary key metadata {stuck}: Is a directory"
    assert service.store.path.read_bytes() == before
    stuck.rmdir()
    service.create_key(alias="second")


def test_maintenance_due_is_computed_once_per_metadata_version(service: KeyService, clock: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every data-key operation asks when maintenance is next due; the walk over the keys runs once
    per version of keys.json, and a change (a deletion scheduled) is seen by the next call."""
    from encfs.keys import metadata

    key, other = new_key(service), new_key(service)
    blob = service.encrypt(key, b"x")
    walks = []
    real = metadata.KeyDB.next_event
    monkeypatch.setattr(metadata.KeyDB, "next_event", lambda db: walks.append(1) or real(db))
    for _ in range(20):
        service.decrypt(blob)
    assert len(walks) <= 1
    service.schedule_key_deletion(other, days=7)
    clock.advance(days=8)
    service.decrypt(blob)  # the first call after the window ends deletes the other key
    assert other not in {k["KeyId"] for k in service.list_keys()}
