"""The filesystem config in CIPHERDIR, and the keys it unlocks.

``encfs.conf`` (JSON) holds the format version, feature flags, filesystem
id, the CMK's key id and the filesystem secret wrapped by the CMK with the
encryption context {"encfs:fs": <fs id hex>, "encfs:purpose": "filesystem"}.
An identical copy, ``encfs.conf.bak``, is written beside it; loading falls
back to it when the primary is missing or damaged, so losing one small file
never makes the filesystem unreadable. Config files are written with
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
from encfs.errors import EncfsError
from encfs.keys.service import KeyService

CONFIG_NAME = "encfs.conf"
BACKUP_NAME = "encfs.conf.bak"
FS_FORMAT = 1
FEATURES = ("aes256gcm-4k-blocks", "per-file-keys", "siv-names", "long-names", "long-symlinks")


class FsConfigError(EncfsError):
    """CIPHERDIR is not an encfs filesystem, or its config is unusable."""


@dataclass(frozen=True)
class FsConfig:
    fs_id: str  # 32 hex chars
    key_id: str
    wrapped_secret: bytes
    features: tuple[str, ...] = FEATURES
    format: int = FS_FORMAT

    def fs_context(self) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:purpose": "filesystem"}

    def file_context(self, file_id: bytes) -> dict[str, str]:
        return {"encfs:fs": self.fs_id, "encfs:file": file_id.hex()}

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "features": list(self.features), "fs_id": self.fs_id,
                "key_id": self.key_id, "wrapped_secret": base64.b64encode(self.wrapped_secret).decode()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FsConfig:
        fmt = d.get("format")
        if fmt != FS_FORMAT:
            raise FsConfigError(f"unsupported encfs filesystem format {fmt!r} (this encfs reads {FS_FORMAT})")
        unknown = sorted(set(d.get("features", [])) - set(FEATURES))
        if unknown:
            raise FsConfigError(f"filesystem uses unknown feature {unknown[0]!r}: upgrade encfs")
        try:
            return cls(fs_id=str(d["fs_id"]), key_id=str(d["key_id"]),
                       wrapped_secret=base64.b64decode(d["wrapped_secret"], validate=True),
                       features=tuple(d["features"]), format=fmt)
        except (KeyError, ValueError, TypeError) as e:
            raise FsConfigError(f"filesystem config is missing or has a bad field: {e}") from None


def init_filesystem(cipherdir: Path, ks: KeyService, key: str) -> FsConfig:
    """Create a new filesystem in an empty (or new) directory."""
    cipherdir.mkdir(parents=True, exist_ok=True)
    if any(cipherdir.iterdir()):
        raise FsConfigError(f"{cipherdir} is not empty: init needs an empty directory")
    fs_id = uuid.uuid4().hex
    probe = FsConfig(fs_id=fs_id, key_id="", wrapped_secret=b"")
    dk = ks.generate_data_key(key, probe.fs_context(), with_plaintext=False)
    config = FsConfig(fs_id=fs_id, key_id=dk.key_id, wrapped_secret=dk.ciphertext_blob)
    data = (json.dumps(config.to_json(), indent=1) + "\n").encode()
    write_atomic(cipherdir / BACKUP_NAME, data, 0o644)
    write_atomic(cipherdir / CONFIG_NAME, data, 0o644, sync_dir=True)
    return config


def load_config(cipherdir: Path) -> tuple[FsConfig, list[str]]:
    """The config, from the primary or the backup; also a list of warnings."""
    if not cipherdir.is_dir():
        raise FsConfigError(f"{cipherdir} is not a directory")
    errors: list[str] = []
    for name in (CONFIG_NAME, BACKUP_NAME):
        try:
            config = FsConfig.from_json(json.loads((cipherdir / name).read_bytes()))
        except FileNotFoundError:
            errors.append(f"{name} is missing")
            continue
        except FsConfigError:
            raise
        except (OSError, ValueError) as e:
            errors.append(f"{name} is damaged ({type(e).__name__})")
            continue
        return config, errors
    if all("missing" in e for e in errors):
        raise FsConfigError(f"{cipherdir} is not an encfs filesystem (no {CONFIG_NAME})")
    raise FsConfigError(f"{cipherdir}: " + "; ".join(errors))


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
