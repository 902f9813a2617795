"""Helpers of the KeyService tests (test_keys_service*.py, test_keys_budget.py, test_keys_rollback.py):
a key created through the service, its audit records by operation, key material wrapped for a BYOK
import, and every crypto operation on a key as a zero-argument callable."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from encfs.keys.service import KeyService

CTX = {"purpose": "unit-test", "tenant": "acme"}


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
