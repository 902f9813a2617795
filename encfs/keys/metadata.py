"""Key metadata: states, versions, aliases; kept outside the token.

Key states live here, not in token attributes, because HSMs such as CloudHSM
offer no SO functions over PKCS#11 to flip them (../shared/notes/pkcs11.md).

Storage: ``$ENCFS_HOME/keys.json``, replaced atomically (write, fsync,
rename) under an exclusive ``flock`` on ``keys.lock``; readers take no lock
and see either the old or the new file. Invariant: a key record exists here
only once its backing key version exists on the token (create writes the
token first and removes the token object if the metadata write fails).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from encfs.atomicfile import write_atomic
from encfs.errors import ConfigError, KeyNotFound, UsageError

ENABLED = "Enabled"
DISABLED = "Disabled"
PENDING_DELETION = "PendingDeletion"
PENDING_IMPORT = "PendingImport"
KEY_STATES = (ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT)

ORIGIN_TOKEN = "TOKEN"
ORIGIN_EXTERNAL = "EXTERNAL"

ALIAS_PREFIX = "alias/"
_ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")
STORE_FORMAT = 1


@dataclass
class KeyVersion:
    """One backing key on the token. ``token_id`` is the CKA_ID (hex)."""

    version: int
    created: float
    token_id: str


@dataclass
class ImportState:
    """BYOK bookkeeping for a key with origin EXTERNAL."""

    wrapping_algorithm: str | None = None
    wrapping_token_id: str | None = None  # CKA_ID of the RSA pair (hex)
    import_token: str | None = None
    parameters_valid_to: float | None = None
    valid_to: float | None = None  # key material expiry; None = never
    # A blob sealed under the imported material at first import: re-imports must open it.
    check_nonce: str | None = None
    check_sealed: str | None = None
    check_digest: str | None = None


@dataclass
class KeyRecord:
    key_id: str
    created: float
    state: str
    origin: str = ORIGIN_TOKEN
    description: str = ""
    versions: list[KeyVersion] = field(default_factory=list)
    deletion_date: float | None = None
    pre_deletion_state: str | None = None
    rotation_period_days: int | None = None
    last_rotation: float | None = None
    imported: ImportState | None = None

    @property
    def current(self) -> KeyVersion:
        return self.versions[-1]

    def version(self, number: int) -> KeyVersion | None:
        for v in self.versions:
            if v.version == number:
                return v
        return None

    def next_rotation(self) -> float | None:
        if self.rotation_period_days is None or self.last_rotation is None:
            return None
        return self.last_rotation + self.rotation_period_days * 86400

    def next_event(self) -> float | None:
        """Earliest time at which maintenance must act on this key."""
        times = [self.deletion_date if self.state == PENDING_DELETION else None]
        if self.state == ENABLED:
            times.append(self.next_rotation())
        if self.imported is not None and self.state != PENDING_IMPORT:
            times.append(self.imported.valid_to)
        present = [t for t in times if t is not None]
        return min(present) if present else None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRecord:
        d = dict(d)
        d["versions"] = [KeyVersion(**v) for v in d.get("versions", [])]
        if d.get("imported") is not None:
            d["imported"] = ImportState(**d["imported"])
        return cls(**d)


@dataclass
class KeyDB:
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias/NAME -> key id
    deleted: dict[str, float] = field(default_factory=dict)  # key id -> deletion time

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "keys": {k: asdict(r) for k, r in sorted(self.keys.items())},
            "aliases": dict(sorted(self.aliases.items())),
            "deleted": dict(sorted(self.deleted.items())),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyDB:
        if d.get("format") != STORE_FORMAT:
            raise ConfigError(f"key metadata has unsupported format {d.get('format')!r}")
        return cls(
            keys={k: KeyRecord.from_json(r) for k, r in d.get("keys", {}).items()},
            aliases=dict(d.get("aliases", {})),
            deleted=dict(d.get("deleted", {})),
        )

    def aliases_of(self, key_id: str) -> list[str]:
        return sorted(a for a, k in self.aliases.items() if k == key_id)

    def resolve(self, ref: str) -> KeyRecord:
        """Find a key by id or alias; raise KeyNotFound naming what was asked."""
        key_id = ref
        if not _is_uuid(ref):
            alias = normalize_alias(ref)
            found = self.aliases.get(alias)
            if found is None:
                raise KeyNotFound(f"no key or alias named {ref!r}")
            key_id = found
        rec = self.keys.get(key_id)
        if rec is None:
            if key_id in self.deleted:
                raise KeyNotFound(f"key {key_id} was deleted")
            raise KeyNotFound(f"key {key_id} does not exist")
        return rec

    def next_event(self) -> float | None:
        times = [t for t in (r.next_event() for r in self.keys.values()) if t is not None]
        return min(times) if times else None


def _is_uuid(s: str) -> bool:
    try:
        return str(uuid.UUID(s)) == s.lower()
    except ValueError:
        return False


def normalize_alias(name: str) -> str:
    """``name`` or ``alias/name`` -> ``alias/name``; UsageError if malformed."""
    alias = name if name.startswith(ALIAS_PREFIX) else ALIAS_PREFIX + name
    if not _ALIAS_RE.match(alias) or _is_uuid(name):
        raise UsageError(f"invalid alias {name!r}: use letters, digits, '/', '_' and '-'")
    if alias.startswith("alias/aws"):
        raise UsageError(f"alias {name!r} is reserved (names starting with 'aws' are AWS's)")
    return alias


class KeyStore:
    """The metadata file, with atomic replace and cross-process locking."""

    def __init__(self, home: Path) -> None:
        self.path = home / "keys.json"
        self._lock_path = home / "keys.lock"
        self._cache: tuple[tuple[int, int, int], KeyDB] | None = None

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> KeyDB:
        """The current metadata (cached until the file changes). Do not mutate."""
        key = self._stat_key()
        if key is None:
            return KeyDB()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            with open(self.path, encoding="utf-8") as f:
                db = KeyDB.from_json(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"key metadata {self.path} is unreadable: {e}") from None
        self._cache = (key, db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[KeyDB]:
        """Yield a private copy of the metadata; save it if the block succeeds."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cache = None
            db = KeyDB.from_json(self.load().to_json())  # deep copy
            before = db.to_json()
            yield db
            after = db.to_json()
            if after != before:
                self._save(after)
        finally:
            os.close(fd)

    def _save(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        write_atomic(self.path, text.encode(), 0o600, sync_dir=True)
        self._cache = None
