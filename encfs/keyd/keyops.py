"""The key daemon's KMS operations: key management and cryptographic operations, each decided on
the key it acts on (an alias resolved, a blob's key read from the blob) before it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from encfs.errors import AccessDenied, EncfsError, UsageError
from encfs.keyd import actions
from encfs.keyd.call import (
    Call,
    Handler,
    blob_key_id,
    bool_arg,
    context_arg,
    contexts_arg,
    data_key_json,
    int_arg,
    str_arg,
)
from encfs.keyd.protocol import b64, unb64
from encfs.keys.metadata import ORIGIN_TOKEN, normalize_alias
from encfs.keys.service import KeyService

# -- key management ---------------------------------------------------------------------------


def _check_reserved_alias(c: Call, alias: str) -> None:
    """An alias under alias/encfs/ (the secrets' default key's) is the officers' to give: a
    user who took alias/encfs/secrets first would hold every secret stored without a key."""
    if normalize_alias(alias).startswith(actions.RESERVED_ALIAS_PREFIX):
        c.allow(actions.RESERVED_ALIAS, None)


def create_key(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    c.allow("kms:CreateKey", None)
    alias = a.get("Alias")
    if alias is not None and not isinstance(alias, str):
        raise UsageError("Alias must be a string")
    if alias:
        _check_reserved_alias(c, alias)
    result = c.ks.create_key(str_arg(a, "Description", ""), alias, str_arg(a, "Origin", ORIGIN_TOKEN))
    c.access.on_key_created(result["KeyId"], c.principal)
    return result


def list_keys(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    c.allow("kms:ListKeys", None)
    return {"Keys": c.ks.list_keys()}


def list_aliases(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    c.allow("kms:ListAliases", None)
    return {"Aliases": c.ks.list_aliases()}


def describe_key(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    c.allow("kms:DescribeKey", key_id)
    return c.ks.describe_key(key_id)


def describe_token(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    c.allow("kms:DescribeToken", None)
    return c.ks.token_status()


def update_alias(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    alias = str_arg(a, "AliasName")
    target = c.key(a, "TargetKeyId")
    c.allow("kms:UpdateAlias", target)
    _check_reserved_alias(c, alias)
    try:
        current = c.ks.resolve_key_id(alias)
    except EncfsError:
        current = None
    if current is not None and current != target:
        c.allow("kms:UpdateAlias", current)  # AWS: moving an alias needs both keys' permission
    return {"AliasName": c.ks.update_alias(alias, target)}


def delete_alias(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    alias = str_arg(a, "AliasName")
    c.allow("kms:DeleteAlias", c.ks.resolve_key_id(alias))
    c.ks.delete_alias(alias)
    return {}


def _state_change(action: str, run: Callable[[KeyService, str, dict[str, Any]], dict[str, Any]]) -> Handler:
    def handler(c: Call, a: dict[str, Any]) -> dict[str, Any]:
        key_id = c.key(a)
        c.allow(action, key_id)
        return run(c.ks, key_id, a)
    return handler


def _schedule_deletion(ks: KeyService, key_id: str, a: dict[str, Any]) -> dict[str, Any]:
    return ks.schedule_key_deletion(key_id, int_arg(a, "PendingWindowInDays", 30))


def _enable_rotation(ks: KeyService, key_id: str, a: dict[str, Any]) -> dict[str, Any]:
    return ks.enable_key_rotation(key_id, int_arg(a, "RotationPeriodInDays", 365))


def _retire_version(ks: KeyService, key_id: str, a: dict[str, Any]) -> dict[str, Any]:
    return ks.retire_key_version(key_id, int_arg(a, "KeyVersion"))


def get_parameters_for_import(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    c.allow("kms:GetParametersForImport", key_id)
    p = c.ks.get_parameters_for_import(key_id, str_arg(a, "WrappingAlgorithm", "RSAES_OAEP_SHA_1"))
    return {"KeyId": p.key_id, "WrappingAlgorithm": p.wrapping_algorithm, "PublicKey": b64(p.public_key_pem),
            "ImportToken": p.import_token, "ParametersValidTo": p.valid_to}


def import_key_material(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = c.key(a)
    c.allow("kms:ImportKeyMaterial", key_id)
    valid_to = a.get("ValidTo")
    if valid_to is not None and not isinstance(valid_to, (int, float)):
        raise UsageError("ValidTo must be a number (seconds since the epoch)")
    return c.ks.import_key_material(key_id, unb64(a.get("EncryptedKeyMaterial"), "EncryptedKeyMaterial"),
                                    str_arg(a, "ImportToken"), valid_to=valid_to)


# -- cryptographic operations -----------------------------------------------------------------


def generate_data_key(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, context = c.key(a), context_arg(a)
    with_plaintext = bool_arg(a, "WithPlaintext", True)
    c.allow("kms:GenerateDataKey" if with_plaintext else "kms:GenerateDataKeyWithoutPlaintext", key_id, context)
    return data_key_json(c.ks.generate_data_key(key_id, context, int_arg(a, "NumberOfBytes", 32), with_plaintext,
                                                encfs_internal=bool_arg(a, "EncfsInternal")))


def generate_data_keys(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, contexts = c.key(a), contexts_arg(a)
    for context in contexts:
        c.allow("kms:GenerateDataKey", key_id, context)
    keys = c.ks.generate_data_keys(key_id, contexts, int_arg(a, "NumberOfBytes", 32),
                                   encfs_internal=bool_arg(a, "EncfsInternal"))
    return {"DataKeys": [data_key_json(k) for k in keys]}


def encrypt_many(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, contexts = c.key(a), contexts_arg(a)
    plaintexts = a.get("Plaintexts")
    if not isinstance(plaintexts, list) or len(plaintexts) != len(contexts):
        raise UsageError("Plaintexts must be a list as long as EncryptionContexts")
    for context in contexts:
        c.allow("kms:Encrypt", key_id, context)
    keys = c.ks.encrypt_many(key_id, [unb64(p, "Plaintexts") for p in plaintexts], contexts,
                             encfs_internal=bool_arg(a, "EncfsInternal"))
    return {"DataKeys": [data_key_json(k) for k in keys]}


def encrypt(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id, context = c.key(a), context_arg(a)
    c.allow("kms:Encrypt", key_id, context)
    blob = c.ks.encrypt(key_id, unb64(a.get("Plaintext"), "Plaintext"), context,
                        encfs_internal=bool_arg(a, "EncfsInternal"))
    return {"KeyId": key_id, "CiphertextBlob": b64(blob)}


def decrypt(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    blob, context = unb64(a.get("CiphertextBlob"), "CiphertextBlob"), context_arg(a)
    c.allow("kms:Decrypt", blob_key_id(blob), context)
    expected = a.get("KeyId")
    done = c.ks.decrypt(blob, context, key=expected if isinstance(expected, str) else None)
    return {"KeyId": done.key_id, "KeyVersion": done.key_version, "Plaintext": b64(done.plaintext)}


def cached_key_usable(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    """A client's data-key cache hit: may it still use the key? (Decrypt's permission, the key
    Enabled; no token call and, like a local cache hit, no record unless denied.)"""
    key_id = str_arg(a, "KeyId")
    c.allow("kms:Decrypt", key_id, context_arg(a))
    expected = a.get("ExpectedKeyId")
    if isinstance(expected, str) and c.ks.resolve_key_id(expected) != key_id:
        return {"Usable": False}
    return {"Usable": c.ks.key_enabled(key_id)}


def data_key_usable(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    key_id = str_arg(a, "KeyId")
    try:
        c.access.check(c.principal, "kms:DescribeKey", key_id)
    except AccessDenied:
        try:
            c.access.check(c.principal, "kms:GenerateDataKey", key_id)
        except AccessDenied:
            return {"Usable": False}  # the caller then asks for new keys, which decides and audits
    return {"Usable": c.ks.data_key_usable(key_id, int_arg(a, "KeyVersion"))}


def re_encrypt(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    blob, context = unb64(a.get("CiphertextBlob"), "CiphertextBlob"), context_arg(a, "SourceEncryptionContext")
    dest_key = c.key(a, "DestinationKeyId")
    dest_context = context_arg(a, "DestinationEncryptionContext") if "DestinationEncryptionContext" in a else context
    c.allow("kms:ReEncryptFrom", blob_key_id(blob), context)
    c.allow("kms:ReEncryptTo", dest_key, dest_context)
    out = c.ks.re_encrypt(blob, context, dest_key, dest_context, encfs_internal=bool_arg(a, "EncfsInternal"))
    return {"KeyId": dest_key, "CiphertextBlob": b64(out)}


KEY_OPERATIONS: dict[str, Handler] = {
    "CreateKey": create_key,
    "ListKeys": list_keys,
    "ListAliases": list_aliases,
    "DescribeKey": describe_key,
    "DescribeToken": describe_token,
    "UpdateAlias": update_alias,
    "DeleteAlias": delete_alias,
    "EnableKey": _state_change("kms:EnableKey", lambda ks, k, a: ks.enable_key(k)),
    "DisableKey": _state_change("kms:DisableKey", lambda ks, k, a: ks.disable_key(k)),
    "ScheduleKeyDeletion": _state_change("kms:ScheduleKeyDeletion", _schedule_deletion),
    "CancelKeyDeletion": _state_change("kms:CancelKeyDeletion", lambda ks, k, a: ks.cancel_key_deletion(k)),
    "RotateKeyOnDemand": _state_change("kms:RotateKeyOnDemand", lambda ks, k, a: ks.rotate_key(k)),
    "EnableKeyRotation": _state_change("kms:EnableKeyRotation", _enable_rotation),
    "DisableKeyRotation": _state_change("kms:DisableKeyRotation", lambda ks, k, a: ks.disable_key_rotation(k)),
    "RetireKeyVersion": _state_change("kms:RetireKeyVersion", _retire_version),
    "DeleteImportedKeyMaterial": _state_change("kms:DeleteImportedKeyMaterial",
                                               lambda ks, k, a: ks.delete_imported_key_material(k)),
    "GetParametersForImport": get_parameters_for_import,
    "ImportKeyMaterial": import_key_material,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeys": generate_data_keys,
    "EncryptMany": encrypt_many,
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "ReEncrypt": re_encrypt,
    "CachedKeyUsable": cached_key_usable,
    "DataKeyUsable": data_key_usable,
}
