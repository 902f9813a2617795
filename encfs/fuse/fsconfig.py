"""The filesystem config in CIPHERDIR, and the keys it unlocks.

``encfs.conf`` (JSON) holds the format version, feature flags, filesystem
id, the CMK's key id and the filesystem secret wrapped by the CMK with the
encryption context {"encfs:fs": <fs id hex>, "encfs:purpose": "filesystem"}.
An identical copy, ``encfs.conf.bak``, is written beside it. From format 2
on, each copy carries ``mac``: HMAC-SHA256 over the canonical encoding of
all its other fields under a key derived from the filesystem secret, so a
copy is authenticated as a whole (docs/FORMAT.md §6.1).

Invariants:
- A copy is trusted only once its secret unwraps on the token and (format
  >= 2) its MAC verifies; a copy that fails either is damaged: ignored,
  logged and, on a read-write mount, rewritten from the good copy. A claim
  of a newer format or an unknown feature is believed only from a verified
  copy (FsVersionError) and such a copy is never overwritten.
- Two verified copies that disagree refuse the mount; nothing guesses
  which one is right. The one exception is an interrupted ``encfs rekey``
  (rewrap.py, which refuses mounts meanwhile): copies that hold the same
  secret and differ only in key_id and wrapped secret are then its move, and
  either is the config (``open_config(rewrap_to=...)``).
- Format-1 copies (no MAC) stay readable; the first read-write mount
  upgrades both copies to format 2, and ``FsConfig.format`` is 2 only once
  that reached the disk: it always tells what every reader of this
  CIPHERDIR will see.
- Config files are written with write-fsync-rename, never in place.
- With RECOVERY_FEATURE a verified copy has its recovery root (``wrapped_recovery_root``,
  unwrapped into ``OpenedConfig.root`` at load) and, while a recovery key is set, the recovery
  wrapping; without it, neither. Two verified copies that differ only there (one with, one
  without) are an interrupted ``encfs recovery-key`` change: the copy with the recovery key is
  the config only while an ``add``'s re-key marker exists (``"adding"``, rewrap.py), else the copy
  without it. Someone who can write the backing store can plant an old copy and a marker (or
  replace both copies: a full rollback); no config rule can tell that from a real history.

Keys derived from the 32-byte filesystem secret with HKDF-SHA256:
  info b"encfs names v1"      -> 64 bytes, AES-SIV name key
  info b"encfs metadata v1"   -> 32 bytes, AES-GCM key for symlinks and xattrs
  info b"encfs config mac v2" -> 32 bytes, HMAC-SHA256 key of the config copies
File contents use per-file data keys (see content.py), not these.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.atomicfile import write_atomic
from encfs.errors import EncfsError, InvalidCiphertext, KeyNotFound
from encfs.fuse.configcopy import (
    BINDING_FEATURES,
    BINDING_UPGRADE,
    BLOCK_FEATURES,
    COMMON_FEATURES,
    DEFAULT_BLOCK_SIZE,
    DERIVED_FEATURE,
    FS_FORMAT,
    KNOWN_FEATURES,
    MAC_FROM_FORMAT,
    MAC_INFO,
    RECOVERY_FEATURE,
    RECOVERY_FIELD,
    ROOT_FIELD,
    SPARSE_FEATURE,
    FsConfig,
    FsConfigError,
    FsVersionError,
    _check_known,
    _read_copy,
    _verify,
    canonical_json,
    config_mac,
    config_mac_key,
    features_for,
    sealed_config_bytes,
)
from encfs.fuse.mountlock import LOCK_NAME, REKEY_MARKER
from encfs.fuse.recoverykeys import seal_keys
from encfs.keys.service import KeyService

CONFIG_NAME = "encfs.conf"
BACKUP_NAME = "encfs.conf.bak"
COPIES = (CONFIG_NAME, BACKUP_NAME)
# What a legacy EncFS (vgough/encfs, Debian's `encfs` package) keeps in its root directory
LEGACY_ENCFS_CONFIGS = (".encfs6.xml", ".encfs5", ".encfs4")


# -- two verified copies that differ -----------------------------------------------------------------

def _binding_stage(features: set[str]) -> int:
    """How far the binding upgrade got: 0 before it, 1 while resealing, 2 done (-1: no stage)."""
    stages = [set(), {BINDING_UPGRADE}, set(BINDING_FEATURES)]
    own = features & {BINDING_UPGRADE, *BINDING_FEATURES}
    return stages.index(own) if own in stages else -1


def _newer_of(a: FsConfig, b: FsConfig) -> FsConfig | None:
    """Of two verified copies that differ, the one an interrupted upgrade (format 1 -> 2, a
    binding stage, or sparse files; each written backup first) left newer; None if they differ
    otherwise."""
    if (a.fs_id, a.key_id, a.wrapped_secret) != (b.fs_id, b.key_id, b.wrapped_secret):
        return None
    rest_a, rest_b = (set(c.features) - {BINDING_UPGRADE, *BINDING_FEATURES, SPARSE_FEATURE} for c in (a, b))
    ka, kb = ((c.format, _binding_stage(set(c.features)), SPARSE_FEATURE in c.features) for c in (a, b))
    if rest_a != rest_b or ka[1] < 0 or kb[1] < 0 or ka == kb:
        return None
    if all(x >= y for x, y in zip(ka, kb, strict=True)):
        return a
    if all(y >= x for x, y in zip(ka, kb, strict=True)):
        return b
    return None


def _recovery_change(a: FsConfig, b: FsConfig) -> bool:
    """Whether two copies differ only in the recovery key, one with it and one without (an
    interrupted `encfs recovery-key add` or `remove`)."""
    return replace(a, features=(), wrapped_root=None, recovery=None) == \
        replace(b, features=(), wrapped_root=None, recovery=None) and \
        set(a.features) - {RECOVERY_FEATURE} == set(b.features) - {RECOVERY_FEATURE} and \
        (a.recovery is None) != (b.recovery is None)


def adding_recovery_key(cipherdir: Path) -> bool:
    """Whether the re-key marker is an `encfs recovery-key add`'s (rewrap.py): only then is a copy
    with the recovery key newer than one without. Without it the copy without wins, so that a
    planted older copy cannot bring a removed recovery key back (THREAT_MODEL.md)."""
    try:
        marker = json.loads((cipherdir / REKEY_MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("adding") is True


def _same_but_wrapping(a: FsConfig, b: FsConfig) -> bool:
    """Whether two copies differ only in the CMK that wraps the secret (an interrupted re-wrap)."""
    return (a.fs_id, a.features, a.format) == (b.fs_id, b.features, b.format)


# -- loading -----------------------------------------------------------------------------------------

def peek_config(cipherdir: Path) -> tuple[FsConfig, list[str]]:
    """The config as far as it can be read without the token (``encfs info``, checks before forking):
    the primary copy, or else the backup, NOT verified; a warning for each copy that is missing,
    unparsable, or differs from the other. Raises if no copy has the shape of a config."""
    if not cipherdir.is_dir():
        raise FsConfigError(f"{cipherdir} is not a directory")
    copies = [_read_copy(cipherdir, name) for name in COPIES]
    if all(c.missing for c in copies):
        legacy = next((n for n in LEGACY_ENCFS_CONFIGS if os.path.lexists(cipherdir / n)), None)
        if legacy is not None:  # same fstab type, fuse.encfs: the helper may be handed one
            raise FsConfigError(f"{cipherdir} is a legacy EncFS directory ({legacy}), not an encfs filesystem: "
                                f"mount it with the legacy encfs (/usr/bin/encfs)")
        raise FsConfigError(f"{cipherdir} is not an encfs filesystem (no {CONFIG_NAME})")
    warnings = [f"{c.name} is {c.problem}" for c in copies if c.problem]
    found = [c for c in copies if c.config is not None]
    if not found:
        raise FsConfigError(f"{cipherdir}: " + "; ".join(warnings))
    if len(found) == 2 and found[0].body != found[1].body:
        warnings.append(f"{CONFIG_NAME} and {BACKUP_NAME} differ")
    config = found[0].config
    assert config is not None
    try:
        _check_known(config)
    except FsVersionError as e:
        warnings.append(f"{found[0].name}: {e.message} (or it is damaged: a mount verifies it)")
    return config, warnings


def _disagreement(a: FsConfig, b: FsConfig) -> str:
    if a.fs_id != b.fs_id:
        return "fs_id"
    if a.key_id != b.key_id:
        return "key_id"
    if set(a.features) != set(b.features):
        sizes = [a.block_size, b.block_size]
        if sizes[0] != sizes[1]:
            return f"the block size ({sizes[0]} in {CONFIG_NAME}, {sizes[1]} in {BACKUP_NAME})"
        return "the features"
    if a.wrapped_secret != b.wrapped_secret:
        return "the wrapped secret"
    return "their contents"


@dataclass
class OpenedConfig:
    """A verified config, the keys it unlocks, and what loading found and did (for the log)."""

    config: FsConfig
    keys: FsKeys
    warnings: list[str]
    secret: bytes = field(default=b"", repr=False)  # for rewriting the copies (set_features)
    root: bytes | None = field(default=None, repr=False)  # the recovery root (RECOVERY_FEATURE)


def open_config(cipherdir: Path, ks: KeyService, *, writable: bool,
                rewrap_to: str | None = None) -> OpenedConfig:
    """Verify both copies on the token and pick the config (FORMAT.md §6.1 load rules).

    With ``writable`` (a read-write mount, under the mount lock): a missing or damaged copy is
    rewritten from the good one, and a format-1 config is upgraded to format 2. ``rewrap_to``:
    the CMK an interrupted ``encfs rekey`` moves the filesystem to (its marker, rewrap.py);
    two copies that differ only by that move are not a disagreement, and the one under
    ``rewrap_to`` is taken (FORMAT.md §6.9).
    """
    if not cipherdir.is_dir():
        raise FsConfigError(f"{cipherdir} is not a directory")
    copies = [_read_copy(cipherdir, name) for name in COPIES]
    if all(c.missing for c in copies):
        legacy = next((n for n in LEGACY_ENCFS_CONFIGS if os.path.lexists(cipherdir / n)), None)
        if legacy is not None:  # same fstab type, fuse.encfs: the helper may be handed one
            raise FsConfigError(f"{cipherdir} is a legacy EncFS directory ({legacy}), not an encfs filesystem: "
                                f"mount it with the legacy encfs (/usr/bin/encfs)")
        raise FsConfigError(f"{cipherdir} is not an encfs filesystem (no {CONFIG_NAME})")
    secrets: dict[tuple[str, str, bytes], bytes | EncfsError] = {}
    for copy in copies:
        config = copy.config
        if config is None:
            continue
        ref = (config.fs_id, config.key_id, config.wrapped_secret)
        if ref not in secrets:
            try:
                secrets[ref] = ks.decrypt(config.wrapped_secret, config.fs_context(), key=config.key_id).plaintext
            except (InvalidCiphertext, KeyNotFound) as e:  # a damaged fs_id, key_id or blob; others propagate
                secrets[ref] = e
        secret = secrets[ref]
        if isinstance(secret, EncfsError):
            copy.problem, copy.unwrap_error = f"damaged (the filesystem key in it does not unwrap: {secret.message})", secret
        else:
            _verify(copy, secret)
    good = [c for c in copies if c.problem is None]
    if not good:
        errors = [c.unwrap_error for c in copies if c.unwrap_error is not None]
        if len(errors) == 2 and errors[0].message == errors[1].message:
            raise errors[0]  # one cause for both (a wrong token, a deleted key): not damage to the copies
        raise FsConfigError(f"{cipherdir}: " + "; ".join(f"{c.name} is {c.problem}" for c in copies))
    warnings = [f"{c.name} is {c.problem}" for c in copies if c.problem]
    chosen = good[0]
    stale: list[str] = []
    if len(good) == 2 and good[0].body != good[1].body:
        a, b = (c.config for c in good)
        assert a is not None and b is not None
        newer = _newer_of(a, b)
        moved = rewrap_to is not None and _same_but_wrapping(a, b) and \
            secrets[(a.fs_id, a.key_id, a.wrapped_secret)] == secrets[(b.fs_id, b.key_id, b.wrapped_secret)]
        if moved:
            chosen = next((c for c in good if c.config is not None and c.config.key_id == rewrap_to), good[0])
            stale.append(next(c for c in good if c is not chosen).name)
            warnings.append(f"{stale[-1]} is still under the CMK an interrupted `encfs rekey` moves from")
        elif _recovery_change(a, b):
            with_key = adding_recovery_key(cipherdir)
            chosen = next(c for c in good if c.config is not None and (c.config.recovery is not None) == with_key)
            stale.append(next(c for c in good if c is not chosen).name)
            warnings.append(f"{stale[-1]} is from before an interrupted `encfs recovery-key` change"
                            if with_key else f"{stale[-1]} has a recovery key the other copy has not: dropped")
        elif newer is not None:
            # An upgrade that stopped between the two copies: the newer copy is the config.
            chosen = next(c for c in good if c.config is newer)
            older = next(c for c in good if c is not chosen)
            stale.append(older.name)
            assert older.config is not None
            what = (f"format {older.config.format}" if older.config.format != newer.format
                    else f"without the features {sorted(set(newer.features) - set(older.config.features))}")
            warnings.append(f"{older.name} is still {what} (an interrupted upgrade)")
        else:
            raise FsConfigError(f"{cipherdir}: {CONFIG_NAME} and {BACKUP_NAME} are both intact but disagree on "
                                f"{_disagreement(a, b)}: delete the wrong one and mount again to restore it "
                                f"from the other")
    config = chosen.config
    assert config is not None
    secret = secrets[(config.fs_id, config.key_id, config.wrapped_secret)]
    assert isinstance(secret, bytes)
    opened = OpenedConfig(config, derive_fs_keys(secret, config.fs_id), warnings, secret)
    if config.wrapped_root is not None:
        try:
            opened.root = ks.decrypt(config.wrapped_root, config.root_context(), key=config.key_id).plaintext
        except (InvalidCiphertext, KeyNotFound) as e:
            raise FsConfigError(f"{cipherdir}: its recovery root does not unwrap ({e.message})") from None
    if writable:
        if config.format < FS_FORMAT:
            _upgrade(cipherdir, opened, secret)
        else:
            _restore(cipherdir, opened, secret, [c.name for c in copies if c.problem] + stale)
    return opened


def _restore(cipherdir: Path, opened: OpenedConfig, secret: bytes, names: list[str]) -> None:
    """Rewrite the copies ``names`` from the verified config (best effort: a read-only CIPHERDIR
    still mounts from the good copy)."""
    data = sealed_config_bytes(opened.config, secret)
    for name in names:
        try:
            write_atomic(cipherdir / name, data, 0o644, sync_dir=True)
        except OSError as e:
            opened.warnings.append(f"cannot restore {name}: {e.strerror}")
            continue
        opened.warnings.append(f"restored {name} from the good copy")


def _upgrade(cipherdir: Path, opened: OpenedConfig, secret: bytes) -> None:
    """Format 1 -> FS_FORMAT: the backup first, then the primary. ``opened.config`` says the new
    format only once both are on disk; until then every reader still sees format-1 files only."""
    new = replace(opened.config, format=FS_FORMAT)
    data = sealed_config_bytes(new, secret)
    for name in (BACKUP_NAME, CONFIG_NAME):
        try:
            write_atomic(cipherdir / name, data, 0o644, sync_dir=True)
        except OSError as e:
            opened.warnings.append(f"cannot upgrade the config to format {FS_FORMAT} ({name}: {e.strerror}); "
                                   f"it stays format {opened.config.format}")
            return
    opened.warnings.append(f"upgraded the config from format {opened.config.format} to {FS_FORMAT}")
    opened.config = new


def set_features(cipherdir: Path, opened: OpenedConfig, features: tuple[str, ...]) -> None:
    """Write both copies with ``features`` (the backup first: open_config takes the newer copy of
    an interrupted change, _newer_of); ``opened.config`` changes once both are on disk. OSError
    if a copy cannot be written."""
    write_config(cipherdir, opened, replace(opened.config, features=features))


def write_config(cipherdir: Path, opened: OpenedConfig, new: FsConfig) -> None:
    """Write both copies as ``new`` (sealed with ``opened.secret``), the backup first;
    ``opened.config`` changes once both are on disk. OSError if a copy cannot be written."""
    data = sealed_config_bytes(new, opened.secret)
    for name in (BACKUP_NAME, CONFIG_NAME):
        write_atomic(cipherdir / name, data, 0o644, sync_dir=True)
    opened.config = new


def init_filesystem(cipherdir: Path, ks: KeyService, key: str, block_size: int = DEFAULT_BLOCK_SIZE,
                    recovery_key: Callable[[], bytes] | None = None, wrapped_file_keys: bool = False) -> FsConfig:
    """Create a new filesystem in an empty (or new) directory; on failure leave no trace of it.
    ``recovery_key``: called once the CMK has wrapped the keys, gives the filesystem a recovery
    key (RECOVERY_FEATURE; recoverykeys.py). ``wrapped_file_keys``: every new file's key is
    wrapped by the CMK (without DERIVED_FEATURE)."""
    features = features_for(block_size) + (() if wrapped_file_keys else (DERIVED_FEATURE,))
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
        dk = ks.generate_data_key(key, probe.fs_context(), with_plaintext=True, encfs_internal=True)
        config = FsConfig(fs_id=fs_id, key_id=dk.key_id, wrapped_secret=dk.ciphertext_blob, features=features)
        assert dk.plaintext is not None
        if recovery_key is not None:
            root = ks.generate_data_key(dk.key_id, probe.root_context(), with_plaintext=True, encfs_internal=True)
            assert root.plaintext is not None
            config = replace(config, features=(*features, RECOVERY_FEATURE), wrapped_root=root.ciphertext_blob,
                             recovery=seal_keys(recovery_key(), fs_id, dk.plaintext, root.plaintext))
    except BaseException:
        if created:
            cipherdir.rmdir()  # an unknown or disabled key leaves no empty directory behind
        raise
    data = sealed_config_bytes(config, dk.plaintext)
    write_atomic(cipherdir / BACKUP_NAME, data, 0o644)
    write_atomic(cipherdir / CONFIG_NAME, data, 0o644, sync_dir=True)
    # The mount lock's file (mountlock.py), so that a read-only mount never has to create it.
    os.close(os.open(cipherdir / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return config


@dataclass(frozen=True)
class FsKeys:
    name_key: bytes = field(repr=False)
    meta_key: bytes = field(repr=False)
    file_root: bytes = field(repr=False)  # what derived file keys come from (DERIVED_FEATURE; filekeys.py)


def derive_fs_keys(secret: bytes, fs_id: str) -> FsKeys:
    """HKDF-SHA256(secret, salt = fs id bytes) -> the name and metadata keys, and the file-key root."""

    def derive(info: bytes, n: int) -> bytes:
        return HKDF(hashes.SHA256(), n, salt=bytes.fromhex(fs_id), info=info).derive(secret)

    return FsKeys(name_key=derive(b"encfs names v1", 64), meta_key=derive(b"encfs metadata v1", 32),
                  file_root=derive(b"encfs file keys v1", 32))


def add_sparse(cipherdir: Path, opened: OpenedConfig) -> None:
    """Give a format-2 filesystem SPARSE_FEATURE (a read-write mount, under the mount lock).
    Nothing else changes: files without holes read the same. A failure leaves it without
    (files are then extended with sealed zeros, as before) and is a warning."""
    config = opened.config
    if SPARSE_FEATURE in config.features or config.format < FS_FORMAT:
        return
    try:
        set_features(cipherdir, opened, (*config.features, SPARSE_FEATURE))
    except OSError as e:
        opened.warnings.append(f"cannot enable sparse files ({e.strerror}); the next read-write mount tries again")
        return
    opened.warnings.append("upgraded: files may have holes (sparse-files)")


# What configcopy.py defines is re-exported: fsconfig is where the rest of encfs finds the config
# (recovery.py reads and verifies copies itself).
__all__ = ["BACKUP_NAME", "BINDING_FEATURES", "BINDING_UPGRADE", "BLOCK_FEATURES", "COMMON_FEATURES", "CONFIG_NAME",
           "COPIES", "DEFAULT_BLOCK_SIZE", "DERIVED_FEATURE", "FS_FORMAT", "KNOWN_FEATURES", "LEGACY_ENCFS_CONFIGS",
           "MAC_FROM_FORMAT", "MAC_INFO", "RECOVERY_FEATURE", "RECOVERY_FIELD", "REKEY_MARKER", "ROOT_FIELD",
           "SPARSE_FEATURE", "FsConfig", "FsConfigError", "FsKeys", "FsVersionError", "OpenedConfig", "_read_copy",
           "_verify", "add_sparse", "adding_recovery_key", "canonical_json", "config_mac", "config_mac_key",
           "derive_fs_keys", "features_for", "init_filesystem", "open_config", "peek_config", "sealed_config_bytes",
           "set_features", "write_config"]
