"""Secrets Manager's model over the key service: named secrets, versions and stages (issue #24).

Each secret is one JSON document in ``<state dir>/secrets`` (encfs/keyd/secretdoc.py, docs/FORMAT.md
section 11); each version's value is sealed under a data key of its own from the secret's CMK.

Invariants:
- Every change is written (write, fsync, rename, fsync of the directory) before the call returns,
  under an exclusive ``flock`` on ``secrets/.lock``; readers take no lock and see the old or the
  new document whole.
- AWSCURRENT, AWSPREVIOUS and AWSPENDING are each on at most one version; AWSCURRENT moving to a
  new version leaves AWSPREVIOUS on the version it left. At most MAX_VERSIONS versions are kept:
  the oldest versions without a stage go first.
- A secret scheduled for deletion gives no value and takes no version until restored; the first
  call that names it (or lists secrets) after its DeletedDate removes it for good (lazily, as a
  key's deletion in encfs/keys/service.py).
- Every call is audited in the key service's audit log (names, version ids, stages and the CMK;
  never a value). Reading a value is also the CMK's audited Decrypt, and sealing one its
  GenerateDataKey, with the secret's name and version id as encryption context.
"""

from __future__ import annotations

import os
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encfs.atomicfile import write_atomic
from encfs.errors import (
    EncfsError,
    InvalidCiphertext,
    KeyNotFound,
    SecretNotFound,
    SecretStateError,
    StateError,
    UsageError,
)
from encfs.filelock import WriterLock
from encfs.keyd import secretdoc
from encfs.keyd.secretdoc import CURRENT, MAX_VALUE_BYTES, PENDING, SecretDoc, SecretVersion
from encfs.keys.audit import iso_time

if TYPE_CHECKING:
    from encfs.keys.service import KeyService

MAX_VERSIONS = 100  # AWS keeps about 100 versions of a secret
DELETION_WINDOW_DAYS = (7, 30)  # AWS's RecoveryWindowInDays
DEFAULT_KEY = "alias/encfs/secrets"  # stands in for AWS's aws/secretsmanager key; encfs never creates it
MAX_DESCRIPTION = 2048
RANDOM_PASSWORD_LENGTH = 32
# AWS GetRandomPassword's default characters: letters, digits and ASCII punctuation, each kind at least once.
_PASSWORD_KINDS = (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation)


def random_password(length: int = RANDOM_PASSWORD_LENGTH) -> str:
    """A value for `secret rotate` without one: as AWS's GetRandomPassword by default (host CSPRNG)."""
    alphabet = "".join(_PASSWORD_KINDS)
    while True:
        password = "".join(secrets.choice(alphabet) for _ in range(length))
        if all(any(c in kind for c in password) for kind in _PASSWORD_KINDS):
            return password


def _check_value(value: bytes) -> bytes:
    if not isinstance(value, bytes):
        raise UsageError("a secret value is bytes")
    if not 1 <= len(value) <= MAX_VALUE_BYTES:
        raise UsageError(f"a secret value is 1 to {MAX_VALUE_BYTES} bytes, not {len(value)}")
    return value


class SecretStore:
    """Secrets in ``state_dir / "secrets"``, their values sealed through ``keys`` (local or the daemon's)."""

    def __init__(self, state_dir: Path, keys: KeyService, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / "secrets"
        self.keys = keys
        self.clock = clock
        self._lock = WriterLock(self.dir / ".lock", f"the secrets directory {self.dir}")

    # -- plumbing -----------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.dir / secretdoc.file_name(name)

    def _locked(self) -> AbstractContextManager[None]:
        """The exclusive lock of every writer (encfs.filelock: re-entrant per thread)."""
        return self._lock.held()

    @contextmanager
    def _audited(self, operation: str, name: str | None, **fields: Any) -> Iterator[dict[str, Any]]:
        """Audit ``operation`` (success or failure); the block may add key_id, version_id, ..."""
        info: dict[str, Any] = dict(fields)
        if name is not None:
            info["secret_name"] = name
        try:
            yield info
        except EncfsError as e:
            self.keys.audit.record(operation, outcome="failure", error=e.message, now=self.clock(), **info)
            raise
        self.keys.audit.record(operation, now=self.clock(), **info)

    def _write(self, doc: SecretDoc) -> None:
        try:
            write_atomic(self._path(doc.name), doc.encode(), 0o600, sync_dir=True)
        except OSError as e:
            raise StateError(f"cannot write secret file {self._path(doc.name)}: {e.strerror}") from None

    def _purge_if_due(self, doc: SecretDoc) -> bool:
        """Remove ``doc``'s secret if its recovery window has ended; whether it did."""
        now = self.clock()
        if doc.deleted_date is None or doc.deleted_date > now:
            return False
        with self._locked():
            fresh = secretdoc.read(self._path(doc.name), doc.name)
            if fresh is None:
                return True
            if fresh.deleted_date is None or fresh.deleted_date > now:
                return False  # restored meanwhile
            secretdoc.remove(self._path(doc.name))
        self.keys.audit.record("DeleteSecret", key_id=doc.key_id, now=now, secret_name=doc.name,
                               trigger="recovery window ended")
        return True

    def _find(self, name: str) -> SecretDoc | None:
        """The secret's document, after any deletion that is due (None: there is no such secret)."""
        doc = secretdoc.read(self._path(secretdoc.check_name(name)), name)
        if doc is not None and self._purge_if_due(doc):
            return None
        return doc

    def _load(self, name: str, info: dict[str, Any] | None = None) -> SecretDoc:
        doc = self._find(name)
        if doc is None:
            raise SecretNotFound(f"no secret named {name!r}")
        if info is not None:
            info["key_id"] = doc.key_id
        return doc

    def _live(self, name: str, info: dict[str, Any], action: str) -> SecretDoc:
        """The secret, refused if it is scheduled for deletion."""
        doc = self._load(name, info)
        if doc.deleted_date is not None:
            raise SecretStateError(f"secret {name} is scheduled for deletion on {iso_time(doc.deleted_date)}: "
                                   f"restore it with `encfs secret restore {name}` to {action}")
        return doc

    def _new_version(self, name: str, key: str, value: bytes, stages: list[str]) -> SecretVersion:
        """Seal ``value`` under a fresh data key of ``key`` (one seal per data key)."""
        version_id = str(uuid.uuid4())
        data_key = self.keys.generate_data_key(key, secretdoc.kms_context(name, version_id), encfs_internal=True)
        assert data_key.plaintext is not None
        sealed = secretdoc.seal_value(data_key.plaintext, os.urandom(secretdoc.NONCE_LEN), name, version_id, value)
        return SecretVersion(version_id, self.clock(), [], data_key.key_id, data_key.ciphertext_blob, sealed)

    def _add(self, doc: SecretDoc, version: SecretVersion, stages: list[str]) -> None:
        doc.versions.append(version)
        for stage in stages:
            doc.move_stage(stage, version)
        doc.prune(MAX_VERSIONS)
        doc.last_changed = version.created

    # -- Secrets Manager's operations ----------------------------------------

    def create(self, name: str, value: bytes, key: str | None = None, description: str = "") -> dict[str, Any]:
        """CreateSecret: a new secret whose first version (AWSCURRENT) holds ``value``, under CMK ``key``
        (default alias/encfs/secrets, which must exist: encfs creates no key on its own)."""
        with self._audited("CreateSecret", name) as info:
            secretdoc.check_name(name)
            _check_value(value)
            if len(description) > MAX_DESCRIPTION:
                raise UsageError(f"a secret's description is at most {MAX_DESCRIPTION} characters")
            with self._locked():
                old = self._find(name)
                if old is not None and old.deleted_date is not None:
                    raise SecretStateError(f"secret {name} is scheduled for deletion on {iso_time(old.deleted_date)}: "
                                           f"restore it (`encfs secret restore {name}`) or choose another name")
                if old is not None:
                    raise UsageError(f"secret {name} already exists (`encfs secret put {name}` adds a version)")
                try:
                    version = self._new_version(name, key or DEFAULT_KEY, value, [CURRENT])
                except KeyNotFound:
                    if key is not None:
                        raise
                    raise KeyNotFound(f"secret {name} is new and no key was given, and there is no "
                                      f"{DEFAULT_KEY}: give --kms-key-id KEY, or create that alias "
                                      f"(`encfs key create --alias encfs/secrets`)") from None
                info["key_id"], info["version_id"] = version.key_id, version.version_id
                doc = SecretDoc(name, version.key_id, description, version.created, version.created)
                self._add(doc, version, [CURRENT])
                self._write(doc)
            return {"Name": name, "VersionId": version.version_id, "KmsKeyId": version.key_id}

    def put(self, name: str, value: bytes, stages: list[str] | None = None) -> dict[str, Any]:
        """PutSecretValue: a new version with ``stages`` (default AWSCURRENT; the version that was
        current becomes AWSPREVIOUS)."""
        with self._audited("PutSecretValue", name) as info:
            stages = secretdoc.check_stages(stages if stages is not None else [CURRENT])
            _check_value(value)
            info["version_stages"] = stages
            with self._locked():
                doc = self._live(name, info, "add a version")
                version = self._new_version(name, doc.key_id, value, stages)
                info["version_id"] = version.version_id
                self._add(doc, version, stages)
                self._write(doc)
            return {"Name": name, "VersionId": version.version_id, "VersionStages": list(version.stages)}

    def get(self, name: str, version_id: str | None = None, version_stage: str | None = None) -> dict[str, Any]:
        """GetSecretValue: ``SecretString`` if the value is UTF-8 text, else ``SecretBinary`` (bytes)."""
        with self._audited("GetSecretValue", name) as info:
            doc = self._live(name, info, "read it")
            if version_id is not None:
                version = doc.by_id(version_id)
                if version is None:
                    raise SecretNotFound(f"secret {name} has no version {version_id}")
                if version_stage is not None and version_stage not in version.stages:
                    raise SecretNotFound(f"version {version_id} of secret {name} is not staged {version_stage}")
            else:
                stage = version_stage or CURRENT
                found = doc.by_stage(stage)
                if found is None:
                    raise SecretNotFound(f"secret {name} has no version staged {stage}")
                version = found
            info["version_id"], info["version_stages"] = version.version_id, list(version.stages)
            value = self._open(name, version)
            out: dict[str, Any] = {"Name": name, "VersionId": version.version_id,
                                   "VersionStages": list(version.stages), "CreatedDate": iso_time(version.created)}
            try:
                out["SecretString"] = value.decode("utf-8")
            except UnicodeDecodeError:
                out["SecretBinary"] = value
            return out

    def _open(self, name: str, version: SecretVersion) -> bytes:
        context = secretdoc.kms_context(name, version.version_id)
        try:
            data_key = self.keys.decrypt(version.wrapped_key, context, key=version.key_id).plaintext
        except InvalidCiphertext as e:
            raise InvalidCiphertext(f"secret {name} version {version.version_id}: its data key: {e.message} "
                                    f"(damaged, or moved from another secret or version)") from None
        if len(data_key) != 32:
            raise InvalidCiphertext(f"secret {name} version {version.version_id}: its data key is not 32 bytes")
        return secretdoc.open_value(data_key, version.sealed_value, name, version.version_id)

    def list(self) -> list[dict[str, Any]]:
        """ListSecrets, by name (no values). Secrets scheduled for deletion are listed, with DeletedDate."""
        with self._audited("ListSecrets", None):
            try:
                names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
            except FileNotFoundError:
                names = []
            except OSError as e:
                raise StateError(f"cannot read the secrets directory {self.dir}: {e.strerror}") from None
            out = []
            for file in names:
                doc = secretdoc.read(self.dir / file, None)
                if doc is None or self._purge_if_due(doc):
                    continue
                entry = doc.describe()
                del entry["Versions"]
                entry["SecretVersionsToStages"] = entry.pop("VersionIdsToStages")
                out.append(entry)
            return sorted(out, key=lambda e: e["Name"])

    def describe(self, name: str) -> dict[str, Any]:
        """DescribeSecret: metadata, versions with their stages and dates; never a value."""
        with self._audited("DescribeSecret", name) as info:
            return self._load(name, info).describe()

    def rotate(self, name: str, value: bytes | None = None) -> dict[str, Any]:
        """RotateSecret: a new version staged AWSPENDING (written first), then made AWSCURRENT (the
        old one AWSPREVIOUS). Without ``value``, a random 32-character password; a rotation that
        was cut short (an AWSPENDING version is left) is finished with that version instead."""
        with self._audited("RotateSecret", name) as info:
            if value is not None:
                _check_value(value)
            with self._locked():
                doc = self._live(name, info, "rotate it")
                pending = doc.by_stage(PENDING)
                if value is not None or pending is None or CURRENT in pending.stages:
                    fresh = value if value is not None else random_password().encode()
                    pending = self._new_version(name, doc.key_id, fresh, [PENDING])
                    self._add(doc, pending, [PENDING])
                    self._write(doc)  # step 1: AWSPENDING is durable before AWSCURRENT moves
                info["version_id"] = pending.version_id
                doc.move_stage(CURRENT, pending)
                pending.stages.remove(PENDING)
                doc.last_rotated = doc.last_changed = self.clock()
                self._write(doc)
            return {"Name": name, "VersionId": pending.version_id}

    def delete(self, name: str, recovery_window_days: int | None = 30, force: bool = False) -> dict[str, Any]:
        """DeleteSecret: scheduled after 7 to 30 days (default 30), or at once with ``force``
        (ForceDeleteWithoutRecovery, which also ends a scheduled deletion early)."""
        with self._audited("DeleteSecret", name, force=force) as info:
            lo, hi = DELETION_WINDOW_DAYS
            days = 30 if recovery_window_days is None else recovery_window_days
            if not force and not lo <= days <= hi:
                raise UsageError(f"recovery window must be {lo} to {hi} days, not {days}")
            with self._locked():
                doc = self._load(name, info)
                now = self.clock()
                if force:
                    secretdoc.remove(self._path(name))
                    return {"Name": name, "DeletionDate": iso_time(now)}
                if doc.deleted_date is not None:
                    raise SecretStateError(f"secret {name} is already scheduled for deletion on "
                                           f"{iso_time(doc.deleted_date)}")
                doc.deleted_date = now + days * 86400
                info["recovery_window_days"] = days
                self._write(doc)
            return {"Name": name, "DeletionDate": iso_time(doc.deleted_date)}

    def restore(self, name: str) -> dict[str, Any]:
        """RestoreSecret: cancel a scheduled deletion."""
        with self._audited("RestoreSecret", name) as info, self._locked():
            doc = self._load(name, info)
            if doc.deleted_date is None:
                raise SecretStateError(f"secret {name} is not scheduled for deletion")
            doc.deleted_date = None
            self._write(doc)
            return {"Name": name}

    def key_of(self, name: str) -> str:
        """The id of the CMK that seals the secret's new versions (the daemon decides access on it)."""
        return self._load(name).key_id
