"""A volume's recovery key (issue #23): a second wrapping of the volume key that opens the volume
without the HSM, like a LUKS recovery keyslot. Off by default.

The header (docs/FORMAT.md §7.8) then has flag RECOVERY_KEY (bit 2) and a 60-byte recovery record
at the end of its padding, [3948, 4008)::

    nonce (12) || AES-256-GCM(KEK, nonce, volume key, AAD) (32 + 16-byte tag)
    KEK = HKDF-SHA256(recovery key, salt = volume id, info = "encfs volume recovery v1", 32)
    AAD = "ENCV" || format version (1 byte) || volume id (16)

The record is covered by the header MAC, which is keyed by the volume key: only a holder of the
volume key (through the CMK or the recovery key) can add, change or remove it.

Invariants:
- The record only ever wraps the volume key of the header it is in: a full re-key (a new
  volume key) either wraps the new key under the same recovery key (the file is given) or is
  refused; restore, copy and import make volumes without one.
- Opening with a recovery key reads no token: the CMK-wrapped blob is kept as it is, and the
  header MAC and the nonce reservation are written with the volume key alone.
- A wrong recovery key is WrongRecoveryKey (exit 77), the same message for both header
  copies, so read_verified() reports it rather than damage; a copy without the record is
  NoRecoveryKey (a copy an interrupted add or remove left loses to the other).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.block.header import (
    COW_FORMAT,
    MAGIC,
    RECOVERY_KEY,
    RECOVERY_RECORD,
    VolumeHeader,
    VolumeKeyMismatch,
)
from encfs.errors import UsageError

if TYPE_CHECKING:
    from encfs.keys.service import KeyService

RECOVERY_INFO = b"encfs volume recovery v1"
_NONCE = 12
log = logging.getLogger("encfs.block")


class WrongRecoveryKey(VolumeKeyMismatch):
    """The recovery key given does not open the volume's recovery record."""

    exit_code = 77  # EX_NOPERM, as a wrong PIN or backup recovery key


class NoRecoveryKey(VolumeKeyMismatch):
    """The volume has no recovery key (or this header copy has none)."""


def recovery_kek(recovery_key: bytes, volume_id: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=volume_id, info=RECOVERY_INFO).derive(recovery_key)


def recovery_aad(version: int, volume_id: bytes) -> bytes:
    return MAGIC + bytes([version]) + volume_id


def seal_record(volume_key: bytes, header: VolumeHeader, recovery_key: bytes, nonce: bytes | None = None) -> bytes:
    """The recovery record of ``header``'s volume for ``volume_key`` under ``recovery_key``."""
    nonce = nonce or os.urandom(_NONCE)
    sealed = AESGCM(recovery_kek(recovery_key, header.volume_id)).encrypt(
        nonce, volume_key, recovery_aad(header.version, header.volume_id))
    record = nonce + sealed
    assert len(record) == RECOVERY_RECORD
    return record


def open_record(header: VolumeHeader, recovery_key: bytes, where: object) -> bytes:
    """The volume key from ``header``'s recovery record (NoRecoveryKey, WrongRecoveryKey)."""
    if not header.has_recovery_key:
        raise NoRecoveryKey(f"volume {where} has no recovery key")
    try:
        return AESGCM(recovery_kek(recovery_key, header.volume_id)).decrypt(
            header.recovery[:_NONCE], header.recovery[_NONCE:], recovery_aad(header.version, header.volume_id))
    except InvalidTag:
        raise WrongRecoveryKey(f"the recovery key does not open volume {where} (another volume's, "
                               "or an old one?)") from None


def with_record(header: VolumeHeader, volume_key: bytes, recovery_key: bytes | None) -> VolumeHeader:
    """``header`` with a recovery record for ``volume_key`` (``recovery_key`` None: without one)."""
    if recovery_key is None:
        return replace(header, flags=header.flags & ~RECOVERY_KEY, recovery=b"")
    if header.version != COW_FORMAT:
        raise UsageError("a format-1 volume cannot have a recovery key: `encfs volume upgrade` it first")
    return replace(header, flags=header.flags | RECOVERY_KEY, recovery=seal_record(volume_key, header, recovery_key))


def set_recovery_key(path: Path, recovery_key: bytes | None, ks: KeyService | None = None,
                     opened_with: bytes | None = None) -> VolumeHeader:
    """Add (or with None remove) the recovery record of the detached volume at ``path``, whose
    volume key comes from ``ks`` or, without the token, from the current recovery key ``opened_with``."""
    from encfs.block.attach import refuse_attached
    from encfs.block.header import header_mac_key
    from encfs.block.volume import VolumeError, _Header, _read_verified, open_locked, read_volume_header

    refuse_attached(path, read_volume_header(path)[0].volume_id.hex())
    fd = open_locked(path)  # the lock an attach takes: its daemon would write its own header over ours
    try:
        header, key, warnings = _read_verified(fd, path, ks, None, opened_with)
        for w in warnings:  # the header write below replaces the damaged copy
            log.warning("%s: %s", path, w)
        if not header.authenticated:
            raise VolumeError(f"volume {path} predates the header MAC: attach it once (which upgrades it) first")
        new = with_record(header, key, recovery_key)
        try:
            return _Header(fd, header, header_mac_key(key, header.volume_id)).update(
                flags=new.flags, recovery=new.recovery)
        except OSError as e:
            raise VolumeError(f"cannot write the header of {path}: {e.strerror}") from None
    finally:
        os.close(fd)
