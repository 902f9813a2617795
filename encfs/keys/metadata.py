"""Key metadata: states, versions, aliases; kept outside the token.

Key states live here, not in token attributes, because HSMs such as CloudHSM
offer no SO functions over PKCS#11 to flip them (docs/dev/pkcs11.md).

Storage: ``$ENCFS_HOME/keys.json`` and its copy ``keys.json.bak``, each
replaced atomically (write, fsync, rename; keys.json first) under an exclusive
``flock`` on ``keys.lock``; readers take no lock and see either the old or the
new file. Invariants:
- a key record exists here only once its backing key version exists on the
  token (create writes the token first and removes the token object if the
  metadata write fails);
- a missing or damaged keys.json is never read as "no keys": the copy takes
  its place (with a warning, and keys.json is rewritten from it); with
  neither file, ``on_missing`` decides (KeyService refuses if the token holds
  encfs keys, docs/FORMAT.md section 4);
- with a PKCS#11 module, these files are the key store: ``create`` (only
  `encfs hsm init`) writes the first, empty one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from encfs.atomicfile import remove_dead_temporaries, write_atomic
from encfs.errors import ConfigError, KeyNotFound, StateError, UsageError
from encfs.filelock import WriterLock

log = logging.getLogger("encfs.keys")

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
    sealed: int = 0  # blobs sealed (or reserved) under it: its nonce budget (budget.py)
    # Who holds blobs sealed under it (usage.py): targets such as "fs:<id>", "volume:<id>",
    # "export:<id>", or "other"; None: not known (a version from before usage was recorded).
    used_by: list[str] | None = None
    retired: float | None = None  # when its token object was destroyed (`encfs key retire-version`)


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


@functools.lru_cache(maxsize=1024)  # every decrypt resolves its --key (an id or an alias)
def _is_uuid(s: str) -> bool:
    try:
        return str(uuid.UUID(s)) == s.lower()
    except ValueError:
        return False


is_key_id = _is_uuid  # a key id rather than an alias (the audit trail's lookup of deleted keys)


def normalize_alias(name: str) -> str:
    """``name`` or ``alias/name`` -> ``alias/name``; UsageError if malformed."""
    alias = name if name.startswith(ALIAS_PREFIX) else ALIAS_PREFIX + name
    if not _ALIAS_RE.match(alias) or _is_uuid(name):
        raise UsageError(f"invalid alias {name!r}: use letters, digits, '/', '_' and '-'")
    if alias.startswith("alias/aws"):
        raise UsageError(f"alias {name!r} is reserved (names starting with 'aws' are AWS's)")
    return alias


class KeyStore:
    """The metadata file and its copy, with atomic replace and cross-process locking.

    ``on_missing`` is called (it may raise) when neither keys.json nor its copy exists,
    before that is taken as an empty store."""

    def __init__(self, home: Path, on_missing: Callable[[], None] | None = None) -> None:
        self.path = home / "keys.json"
        self.backup = home / "keys.json.bak"
        self._lock = WriterLock(home / "keys.lock", "key metadata")
        self._on_missing = on_missing
        # (stat of keys.json, its metadata, when its maintenance is next due)
        self._cache: tuple[tuple[int, int, int], KeyDB, float | None] | None = None

    def exists(self) -> bool:
        """Whether keys.json or its copy is there (with a PKCS#11 module, the key store itself)."""
        return self.path.exists() or self.backup.exists()

    def create(self) -> bool:
        """Start an empty store unless one exists (`encfs hsm init` with a PKCS#11 module);
        ``on_missing`` checks first. Returns whether it was created."""
        with self._locked():
            if self.exists():
                return False
            self._save(self.load().to_json())
            return True

    def _stat_key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read key metadata {self.path}: {e.strerror}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @staticmethod
    def _read(path: Path) -> KeyDB:
        """Parse one file; OSError (FileNotFoundError included) and ValueError for damage."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            parsed = json.loads(data)
            if not isinstance(parsed, dict) or "format" not in parsed:
                raise ValueError("not an encfs key store")
            if parsed["format"] != STORE_FORMAT:
                raise ConfigError(f"key metadata {path} has unsupported format {parsed['format']!r}")
            return KeyDB.from_json(parsed)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise ValueError(str(e) or type(e).__name__) from None

    def load(self) -> KeyDB:
        """The current metadata (cached until the file changes). Do not mutate."""
        return self.load_with_due()[0]

    def load_with_due(self) -> tuple[KeyDB, float | None]:
        """load(), and when its maintenance is next due (KeyDB.next_event), computed once per
        version of keys.json: every data-key operation asks (KeyService._db), and the walk over
        all keys cost as much as the rest of a cached decrypt."""
        key = self._stat_key()
        cached = self._cache  # read once: another thread may replace it meanwhile
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        why = "is missing"
        if key is not None:
            try:
                db = self._read(self.path)
            except FileNotFoundError:
                pass  # replaced meanwhile by a rename? then the copy is just as new
            except OSError as e:
                raise StateError(f"cannot read key metadata {self.path}: {e.strerror}") from None
            except ValueError as e:
                why = f"is damaged ({e})"
            else:
                due = db.next_event()
                self._cache = (key, db, due)
                return db, due
        db = self._from_backup(why)
        return db, db.next_event()

    def _from_backup(self, why: str) -> KeyDB:
        """keys.json is missing or damaged: use the copy, and put keys.json back from it."""
        try:
            db = self._read(self.backup)
        except FileNotFoundError:
            if why != "is missing":
                raise StateError(f"key metadata {self.path} {why} and its copy {self.backup.name} is missing: "
                                 f"restore {self.path.name} from a backup") from None
            if self._on_missing is not None:
                self._on_missing()
            return KeyDB()
        except OSError as e:
            raise StateError(f"key metadata {self.path} {why}; its copy {self.backup} cannot be read: "
                             f"{e.strerror}") from None
        except ValueError as e:
            raise StateError(f"key metadata {self.path} {why} and its copy {self.backup.name} is damaged "
                             f"({e}): restore {self.path.name} from a backup") from None
        restored = self._restore()
        log.warning("key metadata %s %s: using its copy %s%s", self.path, why, self.backup.name,
                    f" (and restored {self.path.name} from it)" if restored else
                    f" ({self.path.name} could not be restored from it)")
        return db

    def _restore(self) -> bool:
        """Rewrite keys.json from the copy, under the lock, unless a writer has meanwhile."""
        try:
            with self._locked():
                try:
                    self._read(self.path)
                    return True  # a writer got there first
                except (OSError, ValueError):
                    pass
                write_atomic(self.path, self.backup.read_bytes(), 0o600, sync_dir=True)
                self._cache = None
                return True
        except (OSError, StateError):
            return False

    def _locked(self) -> AbstractContextManager[None]:
        """The exclusive lock of every writer (encfs.filelock: re-entrant per thread)."""
        return self._lock.held()

    def locked(self) -> AbstractContextManager[None]:
        """The lock every writer of keys.json takes (a backup copies the store under it)."""
        return self._locked()

    @contextmanager
    def transaction(self) -> Iterator[KeyDB]:
        """Yield a private copy of the metadata; save it if the block succeeds."""
        with self._locked():
            self._cache = None
            db = KeyDB.from_json(self.load().to_json())  # deep copy
            before = db.to_json()
            yield db
            after = db.to_json()
            if after != before:
                self._save(after)

    def _save(self, data: dict[str, Any]) -> None:
        text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
        self._cache = None
        try:  # a writer killed mid-write left its temporary (we hold the lock)
            remove_dead_temporaries(self.path, self.backup)
        except OSError as e:
            raise StateError(f"cannot remove a dead writer's temporary key metadata "
                             f"{e.filename or self.path.parent}: {e.strerror}") from None
        try:
            write_atomic(self.path, text, 0o600, sync_dir=True)
        except OSError as e:
            raise StateError(f"cannot write key metadata {self.path}: {e.strerror}") from None
        # The change is made (keys.json holds it): a copy that cannot follow must not survive
        # stale, where a lost keys.json would bring back an older state.
        try:
            write_atomic(self.backup, text, 0o600, sync_dir=True)
        except OSError as e:
            try:
                self.backup.unlink(missing_ok=True)
                outcome = "removed the old copy"
            except OSError:
                outcome = "the old copy is stale"
            log.warning("cannot write the key metadata copy %s: %s (%s)", self.backup, e.strerror, outcome)
