"""Encrypted names, symlink targets and xattrs of the filesystem.

- Names: AES-SIV (deterministic, authenticated) under the filesystem's name
  key with associated data [b"encfs-name-v1", directory id], so one name in
  two directories encrypts differently and lookup needs no scan. Encoded as
  unpadded base64url, whose alphabet has no '.', so every backing name that
  contains a '.' is encfs's own (``encfs.dirid``, long-name entries, config).
- Long names: when the encoded name exceeds 255 bytes, the directory entry
  is ``encfs.ln.<base64url(SHA-256(encoded))>`` and a side file
  ``encfs.ln.<hash>.name`` holds the encoded name (as gocryptfs does).
- Symlink targets and xattr values: AES-256-GCM under the metadata key with
  a fresh nonce; AAD names the purpose (and, for xattrs, the encrypted name).
- Long symlink targets: a target up to SYMLINK_MAX (4095) bytes is allowed, as
  on a local filesystem, but its encoding no longer fits a backing symlink
  once it exceeds 4095 bytes. Then (filesystem feature "long-symlinks") the
  backing symlink holds a reference ``encfs.lt.<length>.<random id>`` (the
  '.' marks it as encfs's own) and the sealed target, with the reference in
  its AAD, is the file LONGLINK_DIR/<reference> in the CIPHERDIR root; it
  lives until the symlink's last hard link is removed.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

NAME_MAX = 255
DIRID_FILE = b"encfs.dirid"
DIRID_XATTR = "user.encfs.dirid"
LONGNAME_PREFIX = b"encfs.ln."
LONGNAME_SUFFIX = b".name"
XATTR_PREFIX = b"user.encfs.x."
XATTR_LONG_PREFIX = b"user.encfs.xl."
SYMLINK_MAX = 4095  # PATH_MAX - 1: the longest target a symlink may have
LONGLINK_PREFIX = b"encfs.lt."
LONGLINK_DIR = b"encfs.longlinks"
DIRID_LEN = 16
_NAME_AD = b"encfs-name-v1"
_SYMLINK_AAD = b"encfs-symlink-v1"
_XATTR_AAD = b"encfs-xattr-v1"


class NameAuthError(Exception):
    """A backing name, symlink target or xattr failed authentication."""


def b64e(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64d(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def is_internal(backing_name: bytes) -> bool:
    """True for backing entries that are encfs's own bookkeeping, not user entries."""
    return b"." in backing_name and not is_longname_entry(backing_name)


def is_longname_entry(backing_name: bytes) -> bool:
    return backing_name.startswith(LONGNAME_PREFIX) and not backing_name.endswith(LONGNAME_SUFFIX)


def is_long_symlink(stored: bytes) -> bool:
    """True if a backing symlink's target is a long-target reference, not the sealed target."""
    return stored.startswith(LONGLINK_PREFIX)


def longname_side_file(entry: bytes) -> bytes:
    return entry + LONGNAME_SUFFIX


class NameCipher:
    """Encrypts names (deterministic) and metadata values (randomized)."""

    def __init__(self, name_key: bytes, meta_key: bytes) -> None:
        self._siv = AESSIV(name_key)
        self._gcm = AESGCM(meta_key)

    # -- names --------------------------------------------------------------

    def encrypt_name(self, name: bytes, dirid: bytes) -> bytes:
        """The encoded ciphertext of ``name`` in directory ``dirid`` (may exceed 255 bytes).

        Names are padded (PKCS#7) to a multiple of 16 bytes first, so the backing
        name reveals the length only to 16 bytes, as with gocryptfs.
        """
        pad = 16 - len(name) % 16
        return b64e(self._siv.encrypt(name + bytes([pad]) * pad, [_NAME_AD, dirid]))

    def decrypt_name(self, encoded: bytes, dirid: bytes) -> bytes:
        try:
            padded = self._siv.decrypt(b64d(encoded), [_NAME_AD, dirid])
        except (InvalidTag, ValueError) as e:
            raise NameAuthError("name failed authentication") from e
        pad = padded[-1] if padded else 0
        if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
            raise NameAuthError("name has bad padding")
        return padded[:-pad]

    @staticmethod
    def backing_entry(encoded: bytes) -> tuple[bytes, bytes | None]:
        """(directory entry, long-name side-file content or None) for an encoded name."""
        if len(encoded) <= NAME_MAX:
            return encoded, None
        return LONGNAME_PREFIX + b64e(hashlib.sha256(encoded).digest()), encoded

    # -- symlink targets and xattr values -------------------------------------

    def _seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._gcm.encrypt(nonce, data, aad)

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 28:
            raise NameAuthError("sealed value is truncated")
        try:
            return self._gcm.decrypt(sealed[:12], sealed[12:], aad)
        except InvalidTag as e:
            raise NameAuthError("value failed authentication") from e

    def encrypt_symlink(self, target: bytes) -> bytes:
        return b64e(self._seal(target, _SYMLINK_AAD))

    def decrypt_symlink(self, stored: bytes) -> bytes:
        try:
            raw = b64d(stored)
        except ValueError as e:
            raise NameAuthError("symlink target is not encfs-encoded") from e
        return self._open(raw, _SYMLINK_AAD)

    def new_long_symlink(self, target: bytes) -> tuple[bytes, bytes]:
        """(reference stored in the backing symlink, sealed target for the side file)."""
        ref = LONGLINK_PREFIX + str(len(target)).encode() + b"." + b64e(os.urandom(18))
        return ref, self._seal(target, _SYMLINK_AAD + ref)

    def open_long_symlink(self, ref: bytes, sealed: bytes) -> bytes:
        return self._open(sealed, _SYMLINK_AAD + ref)

    @staticmethod
    def symlink_size(stored: bytes) -> int:
        """Plaintext target length of a backing symlink target (inline or long)."""
        if is_long_symlink(stored):
            try:
                return int(stored.split(b".")[2])
            except (IndexError, ValueError):
                return 0
        return max(0, len(stored) * 3 // 4 - 28)

    def xattr_name(self, name: bytes) -> bytes:
        """Backing xattr name for a plaintext xattr name (deterministic).

        When ``user.encfs.x.<encoded>`` would exceed XATTR_NAME_MAX, the backing
        name is ``user.encfs.xl.<base64url(SHA-256(encoded))>`` and the stored
        value starts with the encoded name (see encrypt_xattr_value).
        """
        encoded = self._xattr_encoded(name)
        short = XATTR_PREFIX + encoded
        if len(short) <= NAME_MAX:
            return short
        return XATTR_LONG_PREFIX + b64e(hashlib.sha256(encoded).digest())

    def _xattr_encoded(self, name: bytes) -> bytes:
        return b64e(self._siv.encrypt(name, [_XATTR_AAD]))

    def xattr_plain_name(self, backing: bytes, stored: bytes | None = None) -> bytes:
        """Plaintext name of a backing xattr; long names need the ``stored`` value."""
        if backing.startswith(XATTR_PREFIX):
            encoded = backing[len(XATTR_PREFIX):]
        elif backing.startswith(XATTR_LONG_PREFIX) and stored is not None:
            encoded = self._split_long(backing, stored)[0]
        else:
            raise NameAuthError("not an encfs xattr")
        try:
            return self._siv.decrypt(b64d(encoded), [_XATTR_AAD])
        except (InvalidTag, ValueError) as e:
            raise NameAuthError("xattr name failed authentication") from e

    @staticmethod
    def _split_long(backing: bytes, stored: bytes) -> tuple[bytes, bytes]:
        """(encoded name, sealed value) of a long-named xattr's stored value."""
        if len(stored) < 2:
            raise NameAuthError("long xattr value is truncated")
        n = int.from_bytes(stored[:2], "big")
        encoded = stored[2:2 + n]
        if len(encoded) != n or XATTR_LONG_PREFIX + b64e(hashlib.sha256(encoded).digest()) != backing:
            raise NameAuthError("long xattr name does not match its hash")
        return encoded, stored[2 + n:]

    def encrypt_xattr_value(self, backing_name: bytes, value: bytes, name: bytes | None = None) -> bytes:
        """What to store under ``backing_name``: the sealed value (preceded, for a long
        name, by u16 length and the encoded name, which readers check against the hash)."""
        sealed = self._seal(value, _XATTR_AAD + backing_name)
        if not backing_name.startswith(XATTR_LONG_PREFIX):
            return sealed
        assert name is not None, "a long xattr name must be given to store it"
        encoded = self._xattr_encoded(name)
        return len(encoded).to_bytes(2, "big") + encoded + sealed

    def decrypt_xattr_value(self, backing_name: bytes, stored: bytes) -> bytes:
        if backing_name.startswith(XATTR_LONG_PREFIX):
            stored = self._split_long(backing_name, stored)[1]
        return self._open(stored, _XATTR_AAD + backing_name)
