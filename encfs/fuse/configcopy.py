"""One copy of the filesystem config (``encfs.conf`` or ``encfs.conf.bak``; fsconfig.py): what it
holds (the format and feature flags, FsConfig), its MAC, and reading and verifying it
(docs/FORMAT.md §6.1). fsconfig.py picks the config from the two copies, writes them, and
re-exports these names.

Invariants (those of fsconfig.py's that concern a single copy):
- Reading parses a copy for its shape only; a copy is trusted once its secret has unwrapped
  (the caller's part) and _verify has passed it: from format 2 on, its MAC over every other field.
- A newer format or an unknown feature is believed (FsVersionError) only from a copy whose MAC
  verified; in a format-1 copy, which has no MAC, it is damage.
- A verified copy names exactly one content block size; one of format >= 2 has RECOVERY_FEATURE
  exactly when it has its recovery root, and the recovery wrapping only with that root.
- Nothing here writes to the CIPHERDIR or calls the token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.errors import EncfsError

FS_FORMAT = 2  # what `encfs init` writes and a read-write mount upgrades format 1 to
MAC_FROM_FORMAT = 2  # every format from this one on carries `mac`, computed the same way
MAC_INFO = b"encfs config mac v2"
# Content block size, one flag per size. 4 KiB again since 2026-12-06 (32 KiB from 2026-11-28, while
# the daemon's threads opened blocks themselves and convoyed on the GIL); 32 KiB filesystems stay
# readable and can still be created (`encfs init --block-size 32768`).
BLOCK_FEATURES = {"aes256gcm-4k-blocks": 4096, "aes256gcm-32k-blocks": 32768}
DEFAULT_BLOCK_SIZE = 4096  # FORMAT.md 6.4: "Why 4 KiB by default"
# Directory ids and symlink targets bound to their place, xattr names padded (FORMAT.md §6.3).
# New filesystems have them; an older one gets them from its first read-write mount (binding.py),
# which sets BINDING_UPGRADE while it reseals, so that an encfs that knows neither refuses the
# half-upgraded filesystem instead of failing on its first sealed directory id.
BINDING_FEATURES = ("bound-dirids", "bound-symlinks", "padded-xattr-names")
BINDING_UPGRADE = "binding-upgrade"
# Files may have holes, recorded in their authenticated state (FORMAT.md §6.4). New filesystems have
# it; an older one gets it at its first read-write mount (add_sparse): from then on an encfs that
# does not know it refuses the filesystem rather than read holes as EIO.
SPARSE_FEATURE = "sparse-files"
# New files' data keys are derived from a recovery root, which a recovery key also wraps (recovery.py,
# FORMAT.md §6.10): off by default, set by `encfs init --recovery-key` or `encfs recovery-key add`.
RECOVERY_FEATURE = "recovery-key"
# New files' data keys are derived from the file-key root (FsKeys.file_root; filekeys.py, FORMAT.md
# §6.4): no token call per file. New filesystems have it unless `encfs init --wrapped-file-keys`;
# filesystems without it wrap every new file's key by the CMK, as before.
DERIVED_FEATURE = "derived-file-keys"
COMMON_FEATURES = ("per-file-keys", "siv-names", "long-names", "long-symlinks", *BINDING_FEATURES, SPARSE_FEATURE)
KNOWN_FEATURES = (*BLOCK_FEATURES, *COMMON_FEATURES, BINDING_UPGRADE, RECOVERY_FEATURE, DERIVED_FEATURE)
_FS_ID = re.compile(r"[0-9a-f]{32}")
ROOT_FIELD, RECOVERY_FIELD = "wrapped_recovery_root", "recovery_wrapped_keys"


def features_for(block_size: int) -> tuple[str, ...]:
    """The feature flags of a new filesystem with ``block_size``-byte content blocks (and the
    wrapped file keys of `encfs init --wrapped-file-keys`: init_filesystem adds DERIVED_FEATURE)."""
    for flag, size in BLOCK_FEATURES.items():
        if size == block_size:
            return (flag, *COMMON_FEATURES)
    sizes = ", ".join(str(n) for n in BLOCK_FEATURES.values())
    raise FsConfigError(f"block size must be one of {sizes}, not {block_size}")


class FsConfigError(EncfsError):
    """CIPHERDIR is not an encfs filesystem, or its config is unusable."""


class FsVersionError(FsConfigError):
    """The config is intact but written by a newer encfs (format or feature unknown here)."""


class _Damaged(Exception):
    """One copy is unusable; the message says why (never key material)."""


@dataclass(frozen=True)
class FsConfig:
    fs_id: str  # 32 hex chars
    key_id: str
    wrapped_secret: bytes
    features: tuple[str, ...] = features_for(DEFAULT_BLOCK_SIZE)
    format: int = FS_FORMAT
    # With RECOVERY_FEATURE (recovery.py): the recovery root wrapped by the CMK, and the secret and
    # root sealed under the recovery key's KEK (None once that key is removed).
    wrapped_root: bytes | None = None
    recovery: bytes | None = None

    @property
    def block_size(self) -> int:
        """Plaintext bytes per content block (a verified config names exactly one block flag)."""
        return next(BLOCK_FEATURES[f] for f in self.features if f in BLOCK_FEATURES)

    def fs_context(self) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:purpose": "filesystem"}

    def file_context(self, file_id: bytes) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:file": file_id.hex()}

    def root_context(self) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:purpose": "recovery root"}

    def to_json(self) -> dict[str, Any]:
        """Every field but ``mac`` (the recovery fields only when set)."""
        body: dict[str, Any] = {"format": self.format, "features": list(self.features), "fs_id": self.fs_id,
                                "key_id": self.key_id, "wrapped_secret": base64.b64encode(self.wrapped_secret).decode()}
        if self.wrapped_root is not None:
            body[ROOT_FIELD] = base64.b64encode(self.wrapped_root).decode()
        if self.recovery is not None:
            body[RECOVERY_FIELD] = base64.b64encode(self.recovery).decode()
        return body


# -- the MAC (FORMAT.md §6.1; the same for every format >= 2) ---------------------------------------

def canonical_json(body: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (non-ASCII characters as themselves, not \\u escapes)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_mac_key(secret: bytes, fs_id: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(fs_id), info=MAC_INFO).derive(secret)


def config_mac(secret: bytes, body: dict[str, Any]) -> bytes:
    """HMAC-SHA256 of a copy's fields other than ``mac``, keyed by its own fs_id and secret."""
    h = HMAC(config_mac_key(secret, body["fs_id"]), hashes.SHA256())
    h.update(canonical_json({k: v for k, v in body.items() if k != "mac"}))
    return h.finalize()


def sealed_config_bytes(config: FsConfig, secret: bytes) -> bytes:
    """A format >= 2 copy as written to disk: the fields, then ``mac``, one per line."""
    body = config.to_json()
    body["mac"] = base64.b64encode(config_mac(secret, body)).decode()
    return (json.dumps(body, indent=1) + "\n").encode()


# -- reading one copy --------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Damaged("a field appears twice")
    return d


def _b64(d: dict[str, Any], name: str) -> bytes:
    value = d.get(name)
    if not isinstance(value, str):
        raise _Damaged(f"no {name} field")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _Damaged(f"its {name} is not base64") from None


@dataclass
class _Copy:
    """One copy as read: ``body`` (the parsed JSON) once it has the shape of a config."""

    name: str
    body: dict[str, Any] | None = None
    config: FsConfig | None = None  # fields as read; trusted only when ``problem`` is None after checking
    mac: bytes | None = None
    problem: str | None = None  # why the copy is missing or damaged
    missing: bool = False
    unwrap_error: EncfsError | None = field(default=None, repr=False)


def _read_copy(cipherdir: Path, name: str) -> _Copy:
    """Parse one copy leniently (shape only: format and features are judged later)."""
    copy = _Copy(name)
    try:
        raw = (cipherdir / name).read_bytes()
    except FileNotFoundError:
        copy.missing, copy.problem = True, "missing"
        return copy
    except OSError as e:
        copy.problem = f"unreadable ({e.strerror})"
        return copy
    try:
        try:
            d = json.loads(raw, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError):
            raise _Damaged("not JSON") from None
        if not isinstance(d, dict):
            raise _Damaged(f"a JSON {type(d).__name__}, not an object")
        fmt, features = d.get("format"), d.get("features")
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise _Damaged(f"bad format field {fmt!r}")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise _Damaged("bad features field")
        fs_id, key_id = d.get("fs_id"), d.get("key_id")
        if not isinstance(fs_id, str) or not _FS_ID.fullmatch(fs_id):
            raise _Damaged("bad fs_id field")
        if not isinstance(key_id, str) or not key_id:
            raise _Damaged("bad key_id field")
        wrapped = _b64(d, "wrapped_secret")
        if fmt >= MAC_FROM_FORMAT:
            if "mac" not in d:
                raise _Damaged(f"format {fmt} without a MAC")
            copy.mac = _b64(d, "mac")
        root = _b64(d, ROOT_FIELD) if ROOT_FIELD in d else None
        recovery = _b64(d, RECOVERY_FIELD) if RECOVERY_FIELD in d else None
        copy.body = d
        copy.config = FsConfig(fs_id=fs_id, key_id=key_id, wrapped_secret=wrapped, features=tuple(features),
                               format=fmt, wrapped_root=root, recovery=recovery)
    except _Damaged as e:
        copy.problem = f"damaged ({e})"
    return copy


def _check_known(config: FsConfig) -> None:
    """FsVersionError for a format or feature this encfs does not know (only asked of verified copies)."""
    if config.format > FS_FORMAT:
        raise FsVersionError(f"unsupported encfs filesystem format {config.format} (this encfs reads 1 to "
                             f"{FS_FORMAT}): upgrade encfs")
    unknown = sorted(set(config.features) - set(KNOWN_FEATURES))
    if unknown:
        raise FsVersionError(f"filesystem uses unknown feature {unknown[0]!r}: upgrade encfs")


def _one_block_size(config: FsConfig) -> bool:
    return len([f for f in config.features if f in BLOCK_FEATURES]) == 1


def _verify(copy: _Copy, secret: bytes) -> None:
    """Judge a copy whose secret unwrapped: sets ``copy.problem`` if it is damaged; raises for a
    verified copy that is newer than this encfs or malformed."""
    config = copy.config
    assert config is not None and copy.body is not None
    if config.format >= MAC_FROM_FORMAT:
        assert copy.mac is not None
        if not hmac.compare_digest(config_mac(secret, copy.body), copy.mac):
            copy.problem = "damaged (its MAC does not verify)"
            return
        _check_known(config)  # authenticated: a newer format is really newer
        if not _one_block_size(config):
            raise FsConfigError("filesystem config must name exactly one content block size")
        if (RECOVERY_FEATURE in config.features) != (config.wrapped_root is not None) or \
                (config.recovery is not None and config.wrapped_root is None):
            raise FsConfigError(f"filesystem config has {RECOVERY_FEATURE!r} without its recovery root, or the "
                                f"other way round")
        return
    # Format 1 has no MAC: what the token authenticates (fs_id, key_id, wrapped_secret) is checked by
    # the unwrap; the rest must be exactly what format 1 allows. No format-1 copy was ever written with
    # another format number or a feature this encfs does not know, so those are damage, not news.
    if config.format != 1:
        copy.problem = f"damaged (format {config.format} never existed)"
    elif set(config.features) - set(KNOWN_FEATURES):
        copy.problem = f"damaged (unknown feature {min(set(config.features) - set(KNOWN_FEATURES))!r})"
    elif not _one_block_size(config):
        copy.problem = "damaged (it does not name exactly one content block size)"
