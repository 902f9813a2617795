"""KeyService API on a real SoftHSM2 token: BYOK (imported key material): import parameters,
wrapped material checked on the host, bad tokens and lengths, expiry and re-import, deletion.

Fixtures (tests/conftest.py): ``service`` is a KeyService with its own metadata
home on the session-wide SoftHSM2 token ``token``; ``clock`` is its FakeClock.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keys_helpers import CTX, import_material, new_key, oaep_sha1, records_for, wrap_material

from encfs.errors import KeyImportError, KeyStateError, TokenError, UsageError
from encfs.keys.blob import HEADER_LEN, CiphertextBlob
from encfs.keys.context import encode_context
from encfs.keys.service import KeyService, token_object_id

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
