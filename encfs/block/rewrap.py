"""``encfs rekey`` without ``--full`` for volumes and snapshot exports: the wrapped key moves to
another CMK, or to its CMK's newest backing-key version, and no sector or object is rewritten.

Envelope encryption is what makes this cheap: a volume's sectors (and every snapshot inside a
format-2 volume) are sealed under one volume key, which the header holds wrapped by the CMK;
an export directory's objects are sealed under keys derived from one export key, which
DIR/key holds wrapped. Re-wrapping is one ReEncrypt in the key service (the plaintext key
never leaves it) and one crash-safe rewrite of what holds the blob.

Invariants:
- A volume's header is rewritten the one way headers change (volume._Header.update: copy 0,
  fsync, copy 1, fsync, the next sequence number): after a crash either copy may be the
  newer, and each unwraps (the old one while the old CMK is usable). The volume's lock is
  held throughout, and an attached volume is refused.
- DIR/key is replaced by write-fsync-rename (atomicfile.write_atomic): it is old or new.
- Nothing is written when the blob is already under the destination CMK's newest version,
  or with ``dry_run``.
- The re-wrapped copy is read back and unwrapped before the command reports success.
- A volume's recovery record (recovery.py) wraps the volume key, which a re-wrap keeps: it
  stays valid. With its recovery key file, a volume whose CMK is lost is moved to another.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.block.attach import refuse_attached
from encfs.block.exportformat import KEY_FILE, TMP, KeyFile, export_context
from encfs.block.header import copies_behind, header_mac_key
from encfs.block.volume import (
    VolumeError,
    _Header,
    _read_verified,
    open_locked,
    open_volume,
    read_volume_header,
)
from encfs.keys.blob import CiphertextBlob
from encfs.keys.service import KeyService


@dataclass(frozen=True)
class Rewrapped:
    """What a re-wrap did (or, with dry_run, would do)."""

    target: Path
    kind: str  # "volume" or "export"
    from_key: str
    from_version: int
    to_key: str
    to_version: int
    seconds: float
    repaired: list[str] = field(default_factory=list)  # header copies rewritten from the good one

    @property
    def changed(self) -> bool:
        return (self.from_key, self.from_version) != (self.to_key, self.to_version)


def _where(blob: bytes) -> tuple[str, int]:
    header = CiphertextBlob.parse(blob).header
    return str(header.key_id), header.key_version


def destination(ks: KeyService, blob: bytes, dest_key: str | None) -> tuple[str, int]:
    """The CMK and backing-key version ``blob`` moves to: ``dest_key``'s newest version, or
    without it the newest version of the CMK the blob names."""
    described = ks.describe_key(dest_key if dest_key is not None else _where(blob)[0])
    return str(described["KeyId"]), int(described["CurrentKeyVersion"])


def rewrap_volume(path: Path, ks: KeyService, dest_key: str | None, dry_run: bool = False,
                  recovery_key: bytes | None = None) -> Rewrapped:
    """``recovery_key``: the volume key is taken from the header's recovery record and wrapped
    afresh (Encrypt) under the destination CMK, so that a volume whose CMK is lost (deleted,
    another token) moves to a new one; the recovery record stays valid (same volume key)."""
    start = time.monotonic()
    refuse_attached(path, read_volume_header(path)[0].volume_id.hex())
    fd = open_locked(path, writable=not dry_run)
    try:
        header, key, warnings = _read_verified(fd, path, ks, None, recovery_key)
        old, new = _where(header.wrapped_key), destination(ks, header.wrapped_key, dest_key)
        # A damaged copy, or one a crash left under the old CMK, is rewritten even when the
        # newest copy needs nothing: running the command again finishes the job.
        if dry_run:
            return Rewrapped(path, "volume", *old, *new, time.monotonic() - start, warnings)
        if old == new and not warnings and not copies_behind(fd, header):
            ks.usage.forget(f"volume:{header.volume_id.hex()}", new)  # a run after a crash may end here
            return Rewrapped(path, "volume", *old, *new, time.monotonic() - start, [])
        if not header.authenticated:  # a volume from before HEADER_MAC: its first open upgrades it
            os.close(fd)
            fd = -1
            open_volume(path, ks).close()
            return rewrap_volume(path, ks, dest_key)
        wrapped = header.wrapped_key
        if old != new and recovery_key is not None:  # the old CMK may be gone: wrap the key itself
            wrapped = ks.encrypt(new[0], key, header.context(), encfs_internal=True)
        elif old != new:
            wrapped = ks.re_encrypt(header.wrapped_key, header.context(), new[0], encfs_internal=True)
        _Header(fd, header, header_mac_key(key, header.volume_id)).update(wrapped_key=wrapped)
        written, _key, left = _read_verified(fd, path, ks, None)
        if _where(written.wrapped_key) != new or left:
            raise VolumeError(f"volume {path}: the re-wrapped header did not read back"
                              + (f" ({left[0]})" if left else ""))
        ks.usage.forget(f"volume:{header.volume_id.hex()}", new)
        return Rewrapped(path, "volume", *old, *new, time.monotonic() - start, warnings)
    finally:
        if fd >= 0:
            os.close(fd)


def rewrap_export(directory: Path, ks: KeyService, dest_key: str | None, dry_run: bool = False) -> Rewrapped:
    from encfs.block.export import unwrap_key

    start = time.monotonic()
    keys = unwrap_key(directory, ks)  # ExportError / ExportDamaged in one line if it does not
    where = directory / KEY_FILE
    kf = KeyFile.parse(where.read_bytes(), str(where))
    old, new = _where(kf.wrapped_key), destination(ks, kf.wrapped_key, dest_key)
    if old != new and not dry_run:
        context = export_context(kf.volume_id)
        wrapped = ks.re_encrypt(kf.wrapped_key, context, new[0], encfs_internal=True)
        tmp = directory / TMP  # where exports keep their temporary files (cleared by the next export)
        write_atomic(where, KeyFile(kf.volume_id, wrapped).pack(), mode=0o600, sync_dir=True,
                     tmp_dir=tmp if tmp.is_dir() else None)
        probe = b"encfs rekey read-back"
        if unwrap_key(directory, ks).object_name(probe) != keys.object_name(probe):
            raise VolumeError(f"{where}: the re-wrapped key did not read back")
    return Rewrapped(directory, "export", *old, *new, time.monotonic() - start)
