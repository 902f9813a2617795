"""How the key service (service.py) names and describes a CMK: the CKA_IDs of its backing keys
on the token, its DescribeKey JSON, and the refusal of an operation on a key that is not Enabled.
Shared by KeyService and its mixins (keyadmin.py, cryptoops.py, keyimport.py).

Of service.py's invariants this module keeps one: a description carries ids, states, dates and
versions, never key material (backing keys are named on the token by id, not exported).
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from encfs.errors import KeyStateError
from encfs.keys.audit import iso_time
from encfs.keys.metadata import DISABLED, PENDING_DELETION, PENDING_IMPORT, KeyDB, KeyRecord, KeyVersion
from encfs.keys.usage import still_used

WRAPPING_PAIR_VERSION = 0xFFFFFFFF  # the version field of an EXTERNAL key's import (wrapping) key pair


def token_object_id(key_id: str, version: int) -> bytes:
    """CKA_ID of a backing key: 16-byte key UUID || u32 version (0xFFFFFFFF: import pair)."""
    return uuid.UUID(key_id).bytes + struct.pack(">I", version)


def key_state_error(rec: KeyRecord, operation: str) -> KeyStateError:
    """The refusal of ``operation``, which needs an Enabled key, on ``rec`` in another state."""
    detail = {
        DISABLED: "is disabled",
        PENDING_DELETION: f"is pending deletion (scheduled for {iso_time(rec.deletion_date or 0)})",
        PENDING_IMPORT: "is pending import (it has no key material)",
    }.get(rec.state, f"is in state {rec.state}")
    return KeyStateError(f"key {rec.key_id} {detail}: {operation} needs an Enabled key")


def _version_json(rec: KeyRecord, v: KeyVersion) -> dict[str, Any]:
    out: dict[str, Any] = {"Version": v.version, "CreationDate": iso_time(v.created),
                           "UsedBy": "unknown" if v.used_by is None else list(v.used_by)}
    if v.retired is not None:
        out["KeyVersionState"], out["RetiredDate"] = "Retired", iso_time(v.retired)
    else:
        out["KeyVersionState"] = "Current" if v is rec.current else ("InUse" if still_used(v) else "Unused")
    return out


def key_metadata_json(rec: KeyRecord, db: KeyDB) -> dict[str, Any]:
    """Describe a key in AWS KMS DescribeKey vocabulary."""
    out: dict[str, Any] = {
        "KeyId": rec.key_id,
        "Aliases": db.aliases_of(rec.key_id),
        "Description": rec.description,
        "KeyState": rec.state,
        "Origin": rec.origin,
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "CreationDate": iso_time(rec.created),
        "CurrentKeyVersion": rec.versions[-1].version if rec.versions else None,
        "KeyVersions": [_version_json(rec, v) for v in rec.versions],
        "KeyRotationEnabled": rec.rotation_period_days is not None,
    }
    if rec.rotation_period_days is not None:
        out["RotationPeriodInDays"] = rec.rotation_period_days
        out["NextRotationDate"] = iso_time(rec.next_rotation() or 0)
    if rec.deletion_date is not None:
        out["DeletionDate"] = iso_time(rec.deletion_date)
    if rec.imported is not None:
        out["ExpirationModel"] = ("KEY_MATERIAL_EXPIRES" if rec.imported.valid_to is not None
                                  else "KEY_MATERIAL_DOES_NOT_EXPIRE")
        if rec.imported.valid_to is not None:
            out["ValidTo"] = iso_time(rec.imported.valid_to)
    return out
