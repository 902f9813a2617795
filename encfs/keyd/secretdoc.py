"""A secret's stored document and its sealed values (docs/FORMAT.md section 11).

Invariants:
- A value is sealed with AES-256-GCM under a data key of its own (one seal per data key: its nonce
  budget is 1), and its AAD binds the format version, the secret's name and the version id: a
  sealed value moved to another secret or version fails authentication. The data key's blob is
  bound to the same name and version id by its KMS encryption context.
- A document names its secret, and lives in a file named by the SHA-256 of that name: no name
  can make a path outside the secrets directory, and a file copied over another secret's is
  refused as damaged.
- A file that does not parse as a document is a one-line StateError naming it, never "no secret".
  Nothing here puts a value, or a data key, in an exception or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs.errors import InvalidCiphertext, StateError, UsageError
from encfs.keys.audit import iso_time
from encfs.keys.context import encode_context

DOC_FORMAT = 1
SEALED_MAGIC = b"ESV"
SEALED_VERSION = 1
SEALED_HEADER_LEN = 4  # magic || version: the part of the sealed value in the AAD
NONCE_LEN = 12
TAG_LEN = 16
MIN_SEALED_LEN = SEALED_HEADER_LEN + NONCE_LEN + TAG_LEN
MAX_VALUE_BYTES = 65536  # AWS's SecretString / SecretBinary limit
CONTEXT_SECRET = "encfs:secret"
CONTEXT_VERSION = "encfs:secret-version"
CURRENT, PREVIOUS, PENDING = "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"
MAX_STAGES_PER_VERSION = 20  # AWS's limit
_NAME_RE = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
_STAGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,256}")


def check_name(name: str) -> str:
    """A secret name as AWS allows it: 1 to 512 of ``A-Za-z0-9/_+=.@-``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(f"secret name {name!r}: 1 to 512 characters of A-Z a-z 0-9 / _ + = . @ -")
    return name


def check_stages(stages: list[str]) -> list[str]:
    if not 1 <= len(stages) <= MAX_STAGES_PER_VERSION:
        raise UsageError(f"a version takes 1 to {MAX_STAGES_PER_VERSION} stages, not {len(stages)}")
    for stage in stages:
        if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
            raise UsageError(f"version stage {stage!r}: 1 to 256 characters of A-Z a-z 0-9 _ . -")
    return list(dict.fromkeys(stages))


def file_name(name: str) -> str:
    """The document's file name in the secrets directory: hex SHA-256 of the UTF-8 name."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest() + ".json"


def kms_context(name: str, version_id: str) -> dict[str, str]:
    """The encryption context of a version's data key (reserved ``encfs:`` keys)."""
    return {CONTEXT_SECRET: name, CONTEXT_VERSION: version_id}


def value_aad(name: str, version_id: str) -> bytes:
    """AAD of a sealed value: its header (magic, version) || the encoded KMS context."""
    return SEALED_MAGIC + bytes([SEALED_VERSION]) + encode_context(kms_context(name, version_id))


def seal_value(data_key: bytes, nonce: bytes, name: str, version_id: str, value: bytes) -> bytes:
    """``"ESV" || 01 || nonce || AES-256-GCM(data_key, nonce, value, AAD)`` (ciphertext || tag)."""
    assert len(data_key) == 32 and len(nonce) == NONCE_LEN
    return (SEALED_MAGIC + bytes([SEALED_VERSION]) + nonce
            + AESGCM(data_key).encrypt(nonce, value, value_aad(name, version_id)))


def open_value(data_key: bytes, sealed: bytes, name: str, version_id: str) -> bytes:
    """The value of ``sealed``; InvalidCiphertext (exit 65) if it is not one, or fails authentication."""
    where = f"secret {name} version {version_id}"
    if len(sealed) < MIN_SEALED_LEN or sealed[:3] != SEALED_MAGIC:
        raise InvalidCiphertext(f"{where}: the stored value is not a sealed secret value (damaged)")
    if sealed[3] != SEALED_VERSION:
        raise InvalidCiphertext(f"{where}: unsupported sealed value version {sealed[3]}")
    nonce = sealed[SEALED_HEADER_LEN:SEALED_HEADER_LEN + NONCE_LEN]
    try:
        return AESGCM(data_key).decrypt(nonce, sealed[SEALED_HEADER_LEN + NONCE_LEN:], value_aad(name, version_id))
    except InvalidTag:
        raise InvalidCiphertext(f"{where}: the stored value failed authentication: it is damaged, was "
                                f"tampered with, or was moved from another secret or version") from None


@dataclass
class SecretVersion:
    version_id: str
    created: float
    stages: list[str]
    key_id: str
    wrapped_key: bytes  # the KMS ciphertext blob of the data key
    sealed_value: bytes

    def to_json(self) -> dict[str, Any]:
        return {"version_id": self.version_id, "created": self.created, "stages": self.stages,
                "key_id": self.key_id, "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
                "sealed_value": base64.b64encode(self.sealed_value).decode()}


@dataclass
class SecretDoc:
    name: str
    key_id: str  # the CMK new versions are sealed under
    description: str
    created: float
    last_changed: float
    last_rotated: float | None = None
    deleted_date: float | None = None  # AWS's DeletedDate: when a scheduled deletion purges it
    versions: list[SecretVersion] = field(default_factory=list)  # oldest first

    def to_json(self) -> dict[str, Any]:
        return {"format": DOC_FORMAT, "name": self.name, "key_id": self.key_id, "description": self.description,
                "created": self.created, "last_changed": self.last_changed, "last_rotated": self.last_rotated,
                "deleted_date": self.deleted_date, "versions": [v.to_json() for v in self.versions]}

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    def by_stage(self, stage: str) -> SecretVersion | None:
        return next((v for v in self.versions if stage in v.stages), None)

    def by_id(self, version_id: str) -> SecretVersion | None:
        return next((v for v in self.versions if v.version_id == version_id), None)

    def move_stage(self, stage: str, to: SecretVersion) -> None:
        """Attach ``stage`` to ``to`` alone; AWSCURRENT moving leaves AWSPREVIOUS on the version
        that had it (AWS's rule)."""
        old = self.by_stage(stage)
        if old is to:
            return
        if old is not None:
            old.stages.remove(stage)
            if stage == CURRENT:
                self.move_stage(PREVIOUS, old)
        to.stages.append(stage)

    def prune(self, keep: int) -> list[str]:
        """Drop the oldest versions without a stage until at most ``keep`` remain; their ids."""
        dropped: list[str] = []
        for v in list(self.versions):
            if len(self.versions) <= keep:
                break
            if not v.stages:
                self.versions.remove(v)
                dropped.append(v.version_id)
        return dropped

    def describe(self) -> dict[str, Any]:
        """AWS's DescribeSecret, with each version's dates (ListSecretVersionIds) as ``Versions``."""
        out: dict[str, Any] = {
            "Name": self.name, "Description": self.description, "KmsKeyId": self.key_id,
            "RotationEnabled": False, "CreatedDate": iso_time(self.created),
            "LastChangedDate": iso_time(self.last_changed),
            "VersionIdsToStages": {v.version_id: list(v.stages) for v in self.versions if v.stages},
            "Versions": [{"VersionId": v.version_id, "VersionStages": list(v.stages),
                          "CreatedDate": iso_time(v.created), "KmsKeyId": v.key_id} for v in self.versions],
        }
        if self.last_rotated is not None:
            out["LastRotatedDate"] = iso_time(self.last_rotated)
        if self.deleted_date is not None:
            out["DeletedDate"] = iso_time(self.deleted_date)
        return out


class _Damaged(Exception):
    pass


def _get(d: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = d.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Damaged(f"field {name!r} missing or of the wrong type")
    return value


def _b64(d: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(_get(d, name, str), validate=True)
    except (binascii.Error, ValueError):
        raise _Damaged(f"field {name!r} is not base64") from None


def _version_from_json(d: Any) -> SecretVersion:
    if not isinstance(d, dict):
        raise _Damaged("a version is not an object")
    stages = _get(d, "stages", list)
    if not all(isinstance(s, str) for s in stages):
        raise _Damaged("a version's stages are not strings")
    return SecretVersion(_get(d, "version_id", str), float(_get(d, "created", (int, float))), list(stages),
                         _get(d, "key_id", str), _b64(d, "wrapped_key"), _b64(d, "sealed_value"))


def _optional_time(d: dict[str, Any], name: str) -> float | None:
    return None if d.get(name) is None else float(_get(d, name, (int, float)))


def parse(data: bytes, path: Path, name: str | None) -> SecretDoc:
    """The document in ``data`` (read from ``path``), which must be secret ``name`` if given."""
    try:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise _Damaged("not a JSON object")
        if d.get("format") != DOC_FORMAT:
            raise _Damaged(f"unknown format {d.get('format')!r}")
        doc = SecretDoc(_get(d, "name", str), _get(d, "key_id", str), _get(d, "description", str),
                        float(_get(d, "created", (int, float))), float(_get(d, "last_changed", (int, float))),
                        _optional_time(d, "last_rotated"), _optional_time(d, "deleted_date"),
                        [_version_from_json(v) for v in _get(d, "versions", list)])
        if path.name != file_name(doc.name) or (name is not None and doc.name != name):
            raise _Damaged("it names another secret than its file name says")
        ids = [v.version_id for v in doc.versions]
        if len(set(ids)) != len(ids):
            raise _Damaged("a version id is given twice")
        stages = [s for v in doc.versions for s in v.stages]
        if len(set(stages)) != len(stages):
            raise _Damaged("a stage is on two versions")
    except (ValueError, _Damaged) as e:  # json's errors are ValueErrors (UnicodeDecodeError too)
        why = str(e) if isinstance(e, _Damaged) else "not valid JSON"
        raise StateError(f"secret file {path} is damaged ({why}): restore it from a backup or remove it") from None
    return doc


def read(path: Path, name: str | None) -> SecretDoc | None:
    """The document at ``path`` (None if there is no such file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read secret file {path}: {e.strerror}") from None
    return parse(data, path, name)


def remove(path: Path) -> None:
    """Remove a document for good (its directory entry is made durable)."""
    from encfs.diskio import fsync_dir

    try:
        os.unlink(path)
        fsync_dir(os.fsencode(path.parent))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"cannot remove secret file {path}: {e.strerror}") from None
