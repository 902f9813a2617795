"""The filesystem config in CIPHERDIR, and the keys it unlocks.

``encfs.conf`` (JSON) holds the format version, feature flags, filesystem
id, the CMK's key id and the filesystem secret wrapped by the CMK with the
encryption context {"encfs:fs": <fs id hex>, "encfs:purpose": "filesystem"}.
An identical copy, ``encfs.conf.bak``, is written beside it; loading falls
back to it when the primary is missing or damaged, so losing one small file
never makes the filesystem unreadable; a read-write mount then rewrites the
lost copy from the good one. Config files are written with
write-fsync-rename, never in place.

Keys derived from the 32-byte filesystem secret with HKDF-SHA256:
  info b"encfs names v1"    -> 64 bytes, AES-SIV name key
  info b"encfs metadata v1" -> 32 bytes, AES-GCM key for symlinks and xattrs
File contents use per-file data keys (see content.py), not these.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.atomicfile import write_atomic
from encfs.errors import EncfsError, InvalidCiphertext, KeyNotFound
from encfs.keys.service import KeyService

CONFIG_NAME = "encfs.conf"
BACKUP_NAME = "encfs.conf.bak"
FS_FORMAT = 1
# Content block size, one flag per size. 32 KiB is the default since the 4 KiB blocks of the first
# filesystems made reads CPU-bound (one AES-GCM call per 4 KiB costs more than the AES itself);
# 4 KiB filesystems stay readable and can still be created (`encfs init --block-size 4096`).
BLOCK_FEATURES = {"aes256gcm-4k-blocks": 4096, "aes256gcm-32k-blocks": 32768}
DEFAULT_BLOCK_SIZE = 32768
COMMON_FEATURES = ("per-file-keys", "siv-names", "long-names", "long-symlinks")
KNOWN_FEATURES = (*BLOCK_FEATURES, *COMMON_FEATURES)


def features_for(block_size: int) -> tuple[str, ...]:
    """The feature flags of a new filesystem with ``block_size``-byte content blocks."""
    for flag, size in BLOCK_FEATURES.items():
        if size == block_size:
            return (flag, *COMMON_FEATURES)
    sizes = ", ".join(str(n) for n in BLOCK_FEATURES.values())
    raise FsConfigError(f"block size must be one of {sizes}, not {block_size}")


class FsConfigError(EncfsError):
    """CIPHERDIR is not an encfs filesystem, or its config is unusable."""


class FsVersionError(FsConfigError):
    """The config is intact but written by a newer encfs (format or feature unknown here)."""


@dataclass(frozen=True)
class FsConfig:
    fs_id: str  # 32 hex chars
    key_id: str
    wrapped_secret: bytes
    features: tuple[str, ...] = features_for(DEFAULT_BLOCK_SIZE)
    format: int = FS_FORMAT

    @property
    def block_size(self) -> int:
        """Plaintext bytes per content block (from_json guarantees exactly one block flag)."""
        return next(BLOCK_FEATURES[f] for f in self.features if f in BLOCK_FEATURES)

    def fs_context(self) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:purpose": "filesystem"}

    def file_context(self, file_id: bytes) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:file": file_id.hex()}

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "features": list(self.features), "fs_id": self.fs_id,
                "key_id": self.key_id, "wrapped_secret": base64.b64encode(self.wrapped_secret).decode()}

    @classmethod
    def from_json(cls, d: Any) -> FsConfig:
        """Raises FsVersionError for a newer format or feature, FsConfigError for a malformed config."""
        if not isinstance(d, dict):
            raise FsConfigError(f"filesystem config is a JSON {type(d).__name__}, not an object")
        fmt, features = d.get("format"), d.get("features")
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise FsConfigError(f"filesystem config has a bad format field {fmt!r}")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise FsConfigError("filesystem config has a bad features field")
        if fmt != FS_FORMAT:
            raise FsVersionError(f"unsupported encfs filesystem format {fmt!r} (this encfs reads {FS_FORMAT})")
        unknown = sorted(set(features) - set(KNOWN_FEATURES))
        if unknown:
            raise FsVersionError(f"filesystem uses unknown feature {unknown[0]!r}: upgrade encfs")
        if len([f for f in features if f in BLOCK_FEATURES]) != 1:
            raise FsConfigError("filesystem config must name exactly one content block size")
        try:
            return cls(fs_id=str(d["fs_id"]), key_id=str(d["key_id"]),
                       wrapped_secret=base64.b64decode(d["wrapped_secret"], validate=True),
                       features=tuple(d["features"]), format=fmt)
        except (KeyError, ValueError, TypeError) as e:
            raise FsConfigError(f"filesystem config is missing or has a bad field: {e}") from None


def _config_bytes(config: FsConfig) -> bytes:
    return (json.dumps(config.to_json(), indent=1) + "\n").encode()


def init_filesystem(cipherdir: Path, ks: KeyService, key: str,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> FsConfig:
    """Create a new filesystem in an empty (or new) directory; on failure leave no trace of it."""
    features = features_for(block_size)
    created = not cipherdir.exists()
    try:
        cipherdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FsConfigError(f"cannot create {cipherdir}: {e.strerror}") from None
    if not created and any(cipherdir.iterdir()):
        raise FsConfigError(f"{cipherdir} is not empty: init needs an empty directory")
    try:
        fs_id = uuid.uuid4().hex
        probe = FsConfig(fs_id=fs_id, key_id="", wrapped_secret=b"")
        dk = ks.generate_data_key(key, probe.fs_context(), with_plaintext=False)
    except BaseException:
        if created:
            cipherdir.rmdir()  # an unknown or disabled key leaves no empty directory behind
        raise
    config = FsConfig(fs_id=fs_id, key_id=dk.key_id, wrapped_secret=dk.ciphertext_blob, features=features)
    data = _config_bytes(config)
    write_atomic(cipherdir / BACKUP_NAME, data, 0o644)
    write_atomic(cipherdir / CONFIG_NAME, data, 0o644, sync_dir=True)
    return config


def _read_copy(path: Path) -> FsConfig:
    return FsConfig.from_json(json.loads(path.read_bytes()))


def load_config(cipherdir: Path) -> tuple[FsConfig, list[str]]:
    """The config, from the primary or else the backup; also a warning for each copy that is lost.

    A copy that is missing, unreadable or malformed is a warning while the other
    copy is good; a copy of a newer format or with an unknown feature is an error.
    """
    if not cipherdir.is_dir():
        raise FsConfigError(f"{cipherdir} is not a directory")
    found: list[FsConfig] = []
    warnings: list[str] = []
    missing = 0
    for name in (CONFIG_NAME, BACKUP_NAME):
        try:
            found.append(_read_copy(cipherdir / name))
        except FileNotFoundError:
            missing += 1
            warnings.append(f"{name} is missing")
        except FsVersionError:
            raise  # intact, but newer than this encfs (or a half-done upgrade): the other copy is no better
        except FsConfigError as e:
            warnings.append(f"{name} is damaged ({e.message})")
        except (OSError, ValueError) as e:
            warnings.append(f"{name} is damaged ({type(e).__name__})")
    if found:
        return found[0], warnings
    if missing == 2:
        raise FsConfigError(f"{cipherdir} is not an encfs filesystem (no {CONFIG_NAME})")
    raise FsConfigError(f"{cipherdir}: " + "; ".join(warnings))


def repair_config(cipherdir: Path, config: FsConfig) -> list[str]:
    """Rewrite each copy of the config that is not ``config`` (missing, damaged, or unparsable) from
    ``config``, which must be the copy that unlocked; returns the names rewritten."""
    repaired = []
    for name in (CONFIG_NAME, BACKUP_NAME):
        try:
            if _read_copy(cipherdir / name) == config:
                continue
        except FsVersionError:
            continue  # load_config refuses these; never overwrite a newer config
        except (EncfsError, OSError, ValueError):
            pass
        try:
            write_atomic(cipherdir / name, _config_bytes(config), 0o644, sync_dir=True)
        except OSError:
            continue  # best effort: a read-only CIPHERDIR still mounts from the good copy
        repaired.append(name)
    return repaired


@dataclass(frozen=True)
class FsKeys:
    name_key: bytes
    meta_key: bytes


def derive_fs_keys(secret: bytes, fs_id: str) -> FsKeys:
    """HKDF-SHA256(secret, salt = fs id bytes) -> the name and metadata keys."""

    def derive(info: bytes, n: int) -> bytes:
        return HKDF(hashes.SHA256(), n, salt=bytes.fromhex(fs_id), info=info).derive(secret)

    return FsKeys(name_key=derive(b"encfs names v1", 64), meta_key=derive(b"encfs metadata v1", 32))


def unlock(config: FsConfig, ks: KeyService) -> FsKeys:
    """Unwrap the filesystem secret on the token and derive the name and metadata keys."""
    secret = ks.decrypt(config.wrapped_secret, config.fs_context(), key=config.key_id).plaintext
    return derive_fs_keys(secret, config.fs_id)


def unlock_any(cipherdir: Path, config: FsConfig, ks: KeyService,
               warnings: list[str]) -> tuple[FsConfig, FsKeys]:
    """``unlock(config)``, or, if the copy it came from is corrupt in a way that still parses (a
    damaged wrapped secret, fs id or key id), the other copy; appends a warning when it falls back."""
    try:
        return config, unlock(config, ks)
    except (InvalidCiphertext, KeyNotFound) as first:
        for name in (CONFIG_NAME, BACKUP_NAME):
            try:
                other = _read_copy(cipherdir / name)
            except (EncfsError, OSError, ValueError):
                continue
            if other == config:
                continue
            try:
                keys = unlock(other, ks)
            except (InvalidCiphertext, KeyNotFound):
                continue
            bad = BACKUP_NAME if name == CONFIG_NAME else CONFIG_NAME
            warnings.append(f"{bad} is damaged (the filesystem key in it does not unwrap: {first.message})")
            return other, keys
        raise
