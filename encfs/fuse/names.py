"""Encrypted names, symlink targets and xattrs of the filesystem.

- Names: AES-SIV (deterministic, authenticated) under the filesystem's name
  key with associated data [b"encfs-name-v1", directory id], so one name in
  two directories encrypts differently and lookup needs no scan. Encoded as
  unpadded base64url, whose alphabet has no '.', so every backing name that
  contains a '.' is encfs's own (``encfs.dirid``, long-name entries, config).
- Long names: when the encoded name exceeds 255 bytes, the directory entry
  is ``encfs.ln.<base64url(SHA-256(encoded))>`` and a side file
  ``encfs.ln.<hash>.name`` holds the encoded name (as gocryptfs does).
- Legacy symlink targets and xattr values: AES-256-GCM under the metadata key
  with a fresh nonce; AAD names the purpose (and, for xattrs, the encrypted
  name). Read always; written only by filesystems without the bound forms.
- Long symlink targets: a target up to SYMLINK_MAX (4095) bytes is allowed, as
  on a local filesystem, but its encoding no longer fits a backing symlink
  once it exceeds 4095 bytes. Then (filesystem feature "long-symlinks") the
  backing symlink holds a reference ``encfs.lt.<length>.<random id>`` (the
  '.' marks it as encfs's own) and the sealed target, with the reference in
  its AAD, is the file LONGLINK_DIR/<reference> in the CIPHERDIR root; it
  lives until the symlink's last hard link is removed.
- Bound forms (filesystem features "bound-dirids", "bound-symlinks",
  "padded-xattr-names"; docs/FORMAT.md §6.3): directory ids and symlink
  targets are sealed for their place, AAD = parent directory id || backing
  entry name, so neither can be moved to another directory or link; xattr
  names are padded like file names. Every bound value is sealed under its
  own key, HKDF-SHA256(metadata key, salt = 16 random bytes stored with the
  value, info = purpose), so the metadata key has no nonce budget to spend.
- encrypt_name is deterministic, so the last NAME_CACHE names it encoded are
  kept: a LOOKUP is mostly followed by a CREATE, MKDIR or UNLINK of the same
  name, which then costs no AES-SIV, and so is a name looked up again once the
  kernel has dropped its dentry (memory pressure, drop_caches).
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.errors import IntegrityError

NAME_MAX = 255
DIRID_FILE = b"encfs.dirid"
DIRID_XATTR = "user.encfs.dirid"
LONGNAME_PREFIX = b"encfs.ln."
LONGNAME_SUFFIX = b".name"
XATTR_PREFIX = b"user.encfs.x."
XATTR_LONG_PREFIX = b"user.encfs.xl."
SYMLINK_MAX = 4095  # PATH_MAX - 1: the longest target a symlink may have
LONGLINK_PREFIX = b"encfs.lt."
BOUND_LONGLINK_PREFIX = b"encfs.lt2."  # a long target bound to its link
BOUND_LINK_PREFIX = b"2."  # an inline target bound to its link ('.' is not base64url)
PADDED_XATTR_PREFIX = b"user.encfs.xp."
PADDED_XATTR_LONG_PREFIX = b"user.encfs.xq."
# A FIFO, socket or device cannot hold user.* xattrs on Linux (EPERM): its xattrs (security.*,
# trusted.*; the kernel refuses user.* on it before asking) are kept in trusted.*, where root
# may (FORMAT.md §6.3).
SPECIAL_XATTR_PREFIX = b"trusted.encfs.xp."
SPECIAL_XATTR_LONG_PREFIX = b"trusted.encfs.xq."
_SHORT_XATTR_PREFIXES = (XATTR_PREFIX, PADDED_XATTR_PREFIX, SPECIAL_XATTR_PREFIX)
_LONG_XATTR_PREFIXES = (XATTR_LONG_PREFIX, PADDED_XATTR_LONG_PREFIX, SPECIAL_XATTR_LONG_PREFIX)
_PADDED_PREFIXES = (PADDED_XATTR_PREFIX, PADDED_XATTR_LONG_PREFIX, SPECIAL_XATTR_PREFIX, SPECIAL_XATTR_LONG_PREFIX)
LONGLINK_DIR = b"encfs.longlinks"
DIRID_LEN = 16
_NAME_AD = b"encfs-name-v1"
_SYMLINK_AAD = b"encfs-symlink-v1"
_XATTR_AAD = b"encfs-xattr-v1"
_PADDED_XATTR_AD = b"encfs-xattr-v2"
# Bound values: salt(16) || nonce(12) || AES-256-GCM(HKDF(meta key, salt, info), ...)
SALT_LEN = 16
BOUND_OVERHEAD = SALT_LEN + 12 + 16
SEALED_DIRID_LEN = DIRID_LEN + BOUND_OVERHEAD
INFO_DIRID = b"encfs dirid v2"
INFO_SYMLINK = b"encfs symlink v2"
INFO_XATTR = b"encfs xattr v2"


class NameAuthError(IntegrityError):
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
    return stored.startswith((LONGLINK_PREFIX, BOUND_LONGLINK_PREFIX))


def is_bound_symlink(stored: bytes) -> bool:
    """True if a backing symlink's target (inline or reference) is in the bound form."""
    return stored.startswith((BOUND_LINK_PREFIX, BOUND_LONGLINK_PREFIX))


def pad16(data: bytes) -> bytes:
    pad = 16 - len(data) % 16
    return data + bytes([pad]) * pad


def unpad16(padded: bytes) -> bytes:
    pad = padded[-1] if padded else 0
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise NameAuthError("name has bad padding")
    return padded[:-pad]


def longname_side_file(entry: bytes) -> bytes:
    return entry + LONGNAME_SUFFIX


# Encoded names kept by NameCipher.encrypt_name (emptied when full: no per-call eviction cost).
# An entry takes 200-650 bytes with its name (7-21 MB when full); 4,096 missed on every name of a
# 10,000-file working set swept again (benchmarks/HISTORY.md, nineteenth round).
NAME_CACHE = 32768


class NameCipher:
    """Encrypts names (deterministic) and metadata values (randomized)."""

    def __init__(self, name_key: bytes, meta_key: bytes) -> None:
        self._siv = AESSIV(name_key)
        self._gcm = AESGCM(meta_key)
        self._meta_key = meta_key
        self._encoded: dict[tuple[bytes, bytes], bytes] = {}

    # -- names --------------------------------------------------------------

    def encrypt_name(self, name: bytes, dirid: bytes) -> bytes:
        """The encoded ciphertext of ``name`` in directory ``dirid`` (may exceed 255 bytes).

        Names are padded (PKCS#7) to a multiple of 16 bytes first, so the backing
        name reveals the length only to 16 bytes, as with gocryptfs.
        """
        encoded = self._encoded.get((name, dirid))
        if encoded is None:
            encoded = b64e(self._siv.encrypt(pad16(name), [_NAME_AD, dirid]))
            if len(self._encoded) >= NAME_CACHE:
                self._encoded.clear()
            self._encoded[name, dirid] = encoded
        return encoded

    def decrypt_name(self, encoded: bytes, dirid: bytes) -> bytes:
        try:
            padded = self._siv.decrypt(b64d(encoded), [_NAME_AD, dirid])
        except (InvalidTag, ValueError) as e:
            raise NameAuthError("name failed authentication") from e
        return unpad16(padded)

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
        if stored.startswith(BOUND_LINK_PREFIX):
            return max(0, (len(stored) - len(BOUND_LINK_PREFIX)) * 3 // 4 - BOUND_OVERHEAD)
        return max(0, len(stored) * 3 // 4 - 28)

    # -- bound values: one HKDF-derived key per seal ----------------------------------

    def _seal_bound(self, info: bytes, data: bytes, aad: bytes) -> bytes:
        salt, nonce = os.urandom(SALT_LEN), os.urandom(12)
        key = HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(self._meta_key)
        return salt + nonce + AESGCM(key).encrypt(nonce, data, aad)

    def _open_bound(self, info: bytes, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < BOUND_OVERHEAD:
            raise NameAuthError("sealed value is truncated")
        key = HKDF(hashes.SHA256(), 32, salt=sealed[:SALT_LEN], info=info).derive(self._meta_key)
        try:
            return AESGCM(key).decrypt(sealed[SALT_LEN:SALT_LEN + 12], sealed[SALT_LEN + 12:], aad)
        except InvalidTag as e:
            raise NameAuthError("value failed authentication (or belongs to another place)") from e

    @staticmethod
    def place(parent_dirid: bytes, entry: bytes) -> bytes:
        """The AAD that binds a value to a backing entry: parent directory id (16 bytes) || entry name."""
        assert len(parent_dirid) == DIRID_LEN and b"/" not in entry
        return parent_dirid + entry

    def seal_dirid(self, dirid: bytes, parent_dirid: bytes, entry: bytes) -> bytes:
        return self._seal_bound(INFO_DIRID, dirid, self.place(parent_dirid, entry))

    def open_dirid(self, stored: bytes, parent_dirid: bytes, entry: bytes) -> bytes:
        if len(stored) != SEALED_DIRID_LEN:
            raise NameAuthError("sealed directory id has the wrong length")
        return self._open_bound(INFO_DIRID, stored, self.place(parent_dirid, entry))

    def seal_symlink(self, target: bytes, parent_dirid: bytes, entry: bytes) -> bytes:
        """The inline bound form stored in a backing symlink (may exceed SYMLINK_MAX)."""
        return BOUND_LINK_PREFIX + b64e(self._seal_bound(INFO_SYMLINK, target, self.place(parent_dirid, entry)))

    def new_bound_long_symlink(self, target: bytes, parent_dirid: bytes, entry: bytes) -> tuple[bytes, bytes]:
        """(reference for the backing symlink, sealed target for LONGLINK_DIR/<reference>)."""
        ref = BOUND_LONGLINK_PREFIX + str(len(target)).encode() + b"." + b64e(os.urandom(18))
        return ref, self._seal_bound(INFO_SYMLINK, target, self.place(parent_dirid, entry) + b"/" + ref)

    def open_symlink(self, stored: bytes, parent_dirid: bytes, entry: bytes,
                     long_sealed: bytes | None = None) -> bytes:
        """The target of a bound backing symlink ``stored`` at (parent_dirid, entry); for a
        long one, ``long_sealed`` is its side file's content."""
        aad = self.place(parent_dirid, entry)
        if stored.startswith(BOUND_LONGLINK_PREFIX):
            if long_sealed is None:
                raise NameAuthError("long symlink target is missing")
            return self._open_bound(INFO_SYMLINK, long_sealed, aad + b"/" + stored)
        if not stored.startswith(BOUND_LINK_PREFIX):
            raise NameAuthError("symlink target is not in the bound form")
        try:
            raw = b64d(stored[len(BOUND_LINK_PREFIX):])
        except ValueError as e:
            raise NameAuthError("symlink target is not encfs-encoded") from e
        return self._open_bound(INFO_SYMLINK, raw, aad)

    # -- xattrs ---------------------------------------------------------------------------

    def xattr_name(self, name: bytes, padded: bool = False, special: bool = False) -> bytes:
        """Backing xattr name for a plaintext xattr name (deterministic).

        ``padded`` (feature "padded-xattr-names"): the name is padded as file names are
        (PKCS#7 to 16 bytes), so the backing name shows its length only to 16 bytes.
        ``special``: the padded form in trusted.*, for a FIFO, socket or device.
        When ``<prefix><encoded>`` would exceed XATTR_NAME_MAX, the backing name is
        ``<long prefix><base64url(SHA-256(encoded))>`` and the stored value starts with
        the encoded name (see encrypt_xattr_value).
        """
        padded = padded or special
        encoded = self._xattr_encoded(name, padded)
        prefix, long_prefix = ((SPECIAL_XATTR_PREFIX, SPECIAL_XATTR_LONG_PREFIX) if special
                               else (PADDED_XATTR_PREFIX, PADDED_XATTR_LONG_PREFIX) if padded
                               else (XATTR_PREFIX, XATTR_LONG_PREFIX))
        short = prefix + encoded
        if len(short) <= NAME_MAX:
            return short
        return long_prefix + b64e(hashlib.sha256(encoded).digest())

    def _xattr_encoded(self, name: bytes, padded: bool) -> bytes:
        if padded:
            return b64e(self._siv.encrypt(pad16(name), [_PADDED_XATTR_AD]))
        return b64e(self._siv.encrypt(name, [_XATTR_AAD]))

    @staticmethod
    def is_xattr(backing: bytes) -> bool:
        return backing.startswith(_SHORT_XATTR_PREFIXES + _LONG_XATTR_PREFIXES)

    @staticmethod
    def is_long_xattr(backing: bytes) -> bool:
        return backing.startswith(_LONG_XATTR_PREFIXES)

    @staticmethod
    def is_padded_xattr(backing: bytes) -> bool:
        return backing.startswith(_PADDED_PREFIXES)

    def xattr_plain_name(self, backing: bytes, stored: bytes | None = None) -> bytes:
        """Plaintext name of a backing xattr; long names need the ``stored`` value."""
        padded = self.is_padded_xattr(backing)
        short = next((p for p in _SHORT_XATTR_PREFIXES if backing.startswith(p)), None)
        if short is not None:
            encoded = backing[len(short):]
        elif self.is_long_xattr(backing) and stored is not None:
            encoded = self._split_long(backing, stored)[0]
        else:
            raise NameAuthError("not an encfs xattr")
        try:
            plain = self._siv.decrypt(b64d(encoded), [_PADDED_XATTR_AD if padded else _XATTR_AAD])
        except (InvalidTag, ValueError) as e:
            raise NameAuthError("xattr name failed authentication") from e
        return unpad16(plain) if padded else plain

    @staticmethod
    def _split_long(backing: bytes, stored: bytes) -> tuple[bytes, bytes]:
        """(encoded name, sealed value) of a long-named xattr's stored value."""
        if len(stored) < 2:
            raise NameAuthError("long xattr value is truncated")
        n = int.from_bytes(stored[:2], "big")
        encoded = stored[2:2 + n]
        prefix = next(p for p in _LONG_XATTR_PREFIXES if backing.startswith(p))
        if len(encoded) != n or prefix + b64e(hashlib.sha256(encoded).digest()) != backing:
            raise NameAuthError("long xattr name does not match its hash")
        return encoded, stored[2 + n:]

    def encrypt_xattr_value(self, backing_name: bytes, value: bytes, name: bytes | None = None) -> bytes:
        """What to store under ``backing_name``: the sealed value (preceded, for a long
        name, by u16 length and the encoded name, which readers check against the hash).
        A padded name's value is sealed under a key of its own (info INFO_XATTR)."""
        padded = self.is_padded_xattr(backing_name)
        if padded:
            sealed = self._seal_bound(INFO_XATTR, value, backing_name)
        else:
            sealed = self._seal(value, _XATTR_AAD + backing_name)
        if not self.is_long_xattr(backing_name):
            return sealed
        assert name is not None, "a long xattr name must be given to store it"
        encoded = self._xattr_encoded(name, padded)
        return len(encoded).to_bytes(2, "big") + encoded + sealed

    def decrypt_xattr_value(self, backing_name: bytes, stored: bytes) -> bytes:
        if self.is_long_xattr(backing_name):
            stored = self._split_long(backing_name, stored)[1]
        if self.is_padded_xattr(backing_name):
            return self._open_bound(INFO_XATTR, stored, backing_name)
        return self._open(stored, _XATTR_AAD + backing_name)
