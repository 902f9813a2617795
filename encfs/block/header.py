"""The volume header, kept in two copies as LUKS2 does.

Each copy is one 4096-byte record (docs/FORMAT.md section 7.2)::

    0     4   magic b"ENCV"
    4     1   format version: 1 (two slots per sector) or 2 (copy-on-write,
              cow.py; HEADER_MAC is required)
    5     1   feature flags: bit 0 (MAPS_MIRRORED) = every extent's two sector-map
              slots are kept as mirrors (sectors.py); bit 1 (HEADER_MAC) = the
              record is authenticated and holds the fields marked (M) below;
              bit 2 (RECOVERY_KEY, format 2 only) = the recovery record (R) is
              set (recovery.py); bit 3 (ONE_SYNC_COMMITS, format 2 only) = a
              commit record may list its transaction's pages and be made
              durable with them by one fdatasync (commitcheck.py); other bits
              are refused
    6     2   reserved (0)
    8     8   u64 sequence number
    16    16  volume id
    32    8   u64 size in bytes (a multiple of the sector size)
    40    4   u32 sector size (4096)
    44    2   u16 length n of the wrapped data key
    46    n   the volume's data key as a key-service ciphertext blob, context
              {"encfs:volume": <volume id hex>}, with HEADER_MAC also
              "encfs:header": "mac-v1"
    46+n      zero padding to 4008 (to 4064 without HEADER_MAC; to 3948 with
              RECOVERY_KEY)
    3948  60  (R) RECOVERY_KEY only: the recovery record (recovery.py)
    4008  16  (M) the CMK's key id (UUID bytes), the one the blob names
    4024  8   (M) u64 seals reserved (budget.py)
    4032  32  (M) HMAC-SHA256 of bytes [0, 4032), keyed by header_mac_key()
    4064  32  SHA-256 of bytes [0, 4064)

Invariants:
- An update writes copy 0, syncs, writes copy 1, syncs, each with the next
  sequence number; a reader takes the newest copy it accepts, so a torn
  header write never loses the volume.
- With HEADER_MAC, parse() refuses nonzero reserved bytes (6-7 and the
  padding, which ends where the recovery record starts if there is one)
  and a key id that differs from the blob's, so the MAC covers every byte
  that means anything (the recovery record too: only a holder of the
  volume key can add, change or remove it).
- read_verified() accepts a copy only if its volume key unwraps under the
  CMK it names (with the context above, so a copy whose HEADER_MAC was
  cleared does not unwrap), or from its recovery record when the caller
  opens with a recovery key, and, with HEADER_MAC, its MAC verifies; any
  other copy is damaged (a warning) and the other copy wins. Once a copy
  with HEADER_MAC passes its checksum, a copy without HEADER_MAC is
  ignored: it can only be an older header (HEADER_MAC is never cleared).
  A copy whose CMK the key service cannot use (disabled, pending deletion)
  is passed over, with a warning, only if a newer copy verifies (a re-wrap
  cut between the copies by a crash); otherwise that error is raised.
- An authenticated header is never packed without its MAC key.

Byte 5 was reserved (0) in the first release, which ignores it; the release
before HEADER_MAC refuses bit 1, the release before recovery keys bit 2, the
release before one-sync commits bit 3 (it would take a listed record without
checking its pages).
A volume with bit 0 or bit 1 clear is upgraded by the first open_volume() (volume.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.block.layout import SECTOR_SIZE, header_offset
from encfs.diskio import pwrite_all
from encfs.errors import EncfsError, InvalidCiphertext
from encfs.keys.blob import CiphertextBlob

MAGIC = b"ENCV"
VOLUME_FORMAT = 1
COW_FORMAT = 2  # copy-on-write sectors, a versioned map and snapshots (cow.py)
RECORD = 4096
_BODY = RECORD - 32  # covered by the SHA-256
_MACED = _BODY - 32  # covered by the HMAC (HEADER_MAC)
_TRAILER = struct.Struct(">16sQ")  # (M) key id, seals reserved
_PAD_END = _MACED - _TRAILER.size  # 4008: where the padding of an authenticated header ends
_FIXED = struct.Struct(">4sBB2sQ16sQIH")
MAPS_MIRRORED = 0x01  # feature flag: both map slots of every extent hold the newest map at rest
HEADER_MAC = 0x02  # feature flag: the record carries the key id, the seal reservation and an HMAC
RECOVERY_KEY = 0x04  # feature flag: a recovery record before the trailer (format 2 with HEADER_MAC only)
ONE_SYNC_COMMITS = 0x08  # feature flag (format 2 only): commits may list their pages (commitcheck.py)
KNOWN_FLAGS = MAPS_MIRRORED | HEADER_MAC | RECOVERY_KEY | ONE_SYNC_COMMITS
RECOVERY_RECORD = 60  # nonce, AES-256-GCM of the 32-byte volume key, tag
_RECOVERY_AT = _PAD_END - RECOVERY_RECORD  # 3948
MAC_INFO = b"encfs volume header mac v1"
HEADER_MARK = "mac-v1"  # in the wrapped key's context once the header is authenticated


class VolumeFormatError(EncfsError):
    """The image is not an encfs volume, or both header copies are damaged."""


class VolumeKeyMismatch(EncfsError):
    """The volume's key is not the CMK the caller insisted on (``--key``)."""


def header_mac_key(volume_key: bytes, volume_id: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=volume_id, info=MAC_INFO).derive(volume_key)


def _mac(mac_key: bytes, data: bytes) -> bytes:
    return hmac.new(mac_key, data, hashlib.sha256).digest()


@dataclass(frozen=True)
class VolumeHeader:
    volume_id: bytes
    size: int
    wrapped_key: bytes
    seq: int = 0
    sector_size: int = SECTOR_SIZE
    flags: int = 0
    seals_reserved: int = 0  # stored with HEADER_MAC only; format 2: the nonce counter's reservation
    mac: bytes = field(default=b"", compare=False, repr=False)  # as read, checked by verify()
    version: int = VOLUME_FORMAT
    recovery: bytes = b""  # RECOVERY_KEY: the recovery record (recovery.py)

    @property
    def copy_on_write(self) -> bool:
        return self.version == COW_FORMAT

    @property
    def maps_mirrored(self) -> bool:
        return bool(self.flags & MAPS_MIRRORED)

    @property
    def authenticated(self) -> bool:
        """Whether the format has the MAC (HEADER_MAC); verify() tells whether it holds."""
        return bool(self.flags & HEADER_MAC)

    @property
    def has_recovery_key(self) -> bool:
        return bool(self.flags & RECOVERY_KEY)

    @property
    def one_sync_commits(self) -> bool:
        return bool(self.flags & ONE_SYNC_COMMITS)

    @property
    def sectors(self) -> int:
        return self.size // self.sector_size

    @property
    def key_id(self) -> str:
        return str(CiphertextBlob.parse(self.wrapped_key).header.key_id)

    def context(self) -> dict[str, str]:
        ctx = {"encfs:volume": self.volume_id.hex()}
        if self.authenticated:
            ctx["encfs:header"] = HEADER_MARK
        return ctx

    def _maced(self) -> bytes:
        """The bytes before the MAC (before the SHA-256 without HEADER_MAC)."""
        fixed = _FIXED.pack(MAGIC, self.version, self.flags, b"\0\0", self.seq, self.volume_id, self.size,
                            self.sector_size, len(self.wrapped_key))
        end = _PAD_END if self.authenticated else _BODY
        if self.has_recovery_key:
            if len(self.recovery) != RECOVERY_RECORD or not self.authenticated:
                raise ValueError("a recovery record is 60 bytes, in an authenticated header")
            end = _RECOVERY_AT
        body = (fixed + self.wrapped_key).ljust(end, b"\0")
        if len(body) != end:
            raise ValueError("wrapped key does not fit the volume header")
        body += self.recovery if self.has_recovery_key else b""
        if self.authenticated:
            body += _TRAILER.pack(uuid.UUID(self.key_id).bytes, self.seals_reserved)
        return body

    def pack(self, mac_key: bytes | None = None) -> bytes:
        body = self._maced()
        if self.authenticated:
            if mac_key is None:
                raise ValueError("an authenticated volume header needs its MAC key")
            body += _mac(mac_key, body)
        return body + hashlib.sha256(body).digest()

    def verify(self, mac_key: bytes) -> bool:
        """Whether the MAC read with this header is right (parse() made _maced() the bytes read)."""
        return self.authenticated and hmac.compare_digest(_mac(mac_key, self._maced()), self.mac)

    @classmethod
    def parse(cls, record: bytes) -> VolumeHeader:
        """Check what needs no key: magic, checksum, version, flags, geometry, reserved bytes."""
        if len(record) < RECORD:
            raise VolumeFormatError("volume header is truncated")
        body, digest = record[:_BODY], record[_BODY:RECORD]
        magic, version, flags, reserved, seq, vid, size, sector_size, n = _FIXED.unpack_from(body)
        if magic != MAGIC:
            raise VolumeFormatError("not an encfs volume (bad magic)")
        if hashlib.sha256(body).digest() != digest:
            raise VolumeFormatError("volume header checksum mismatch")
        if version not in (VOLUME_FORMAT, COW_FORMAT):
            raise VolumeFormatError(f"unsupported volume format version {version} (made by a newer encfs?)")
        if version == COW_FORMAT and not flags & HEADER_MAC:
            raise VolumeFormatError("volume header of format 2 without its MAC")
        if flags & ~KNOWN_FLAGS:
            raise VolumeFormatError(f"volume header has unknown feature flags 0x{flags:02x} "
                                    "(made by a newer encfs?)")
        if flags & RECOVERY_KEY and version != COW_FORMAT:
            raise VolumeFormatError(f"volume header of format {version} with a recovery key")
        if flags & ONE_SYNC_COMMITS and version != COW_FORMAT:
            raise VolumeFormatError(f"volume header of format {version} with one-sync commits")
        end = _RECOVERY_AT if flags & RECOVERY_KEY else _PAD_END if flags & HEADER_MAC else _BODY
        if sector_size != SECTOR_SIZE or size % sector_size or _FIXED.size + n > end:
            raise VolumeFormatError("volume header has impossible geometry")
        wrapped = bytes(body[_FIXED.size:_FIXED.size + n])
        if not flags & HEADER_MAC:
            return cls(vid, size, wrapped, seq, sector_size, flags, version=version)
        if reserved != b"\0\0" or any(body[_FIXED.size + n:end]):
            raise VolumeFormatError("volume header has nonzero reserved bytes")
        key_id, seals = _TRAILER.unpack_from(body, _PAD_END)
        try:
            named = CiphertextBlob.parse(wrapped).header.key_id.bytes
        except InvalidCiphertext:
            raise VolumeFormatError("volume header holds a malformed wrapped key") from None
        if named != key_id:
            raise VolumeFormatError("volume header names a CMK other than the one its wrapped key is under")
        recovery = bytes(body[_RECOVERY_AT:_PAD_END]) if flags & RECOVERY_KEY else b""
        return cls(vid, size, wrapped, seq, sector_size, flags, seals, bytes(body[_MACED:_BODY]), version, recovery)


def new_header(size: int, wrapped_key: bytes, volume_id: bytes | None = None, seals: int = 0,
               version: int = COW_FORMAT) -> VolumeHeader:
    flags = HEADER_MAC | ONE_SYNC_COMMITS if version == COW_FORMAT else MAPS_MIRRORED | HEADER_MAC
    return VolumeHeader(volume_id or uuid.uuid4().bytes, size, wrapped_key, flags=flags, seals_reserved=seals,
                        version=version)


def _copies(fd: int) -> tuple[list[tuple[int, VolumeHeader]], list[str]]:
    """The copies that parse, and a warning per copy that does not."""
    found: list[tuple[int, VolumeHeader]] = []
    problems: list[str] = []
    for copy in (0, 1):
        try:
            found.append((copy, VolumeHeader.parse(os.pread(fd, RECORD, header_offset(copy)))))
        except VolumeFormatError as e:
            problems.append(f"header copy {copy}: {e.message}")
    if not found:
        if all("bad magic" in p or "truncated" in p for p in problems):
            raise VolumeFormatError("not an encfs volume (no valid header)")
        raise VolumeFormatError("both volume header copies are damaged: " + "; ".join(problems))
    if len(found) == 2 and found[0][1].volume_id != found[1][1].volume_id:
        raise VolumeFormatError("the two header copies belong to different volumes")
    return found, problems


def _newest(found: list[tuple[int, VolumeHeader]], problems: list[str], mac: bool) -> VolumeHeader:
    """The newest copy; with ``mac`` (a copy has HEADER_MAC) only copies with HEADER_MAC count."""
    if mac:
        for copy, h in found:
            if not h.authenticated:
                problems.append(f"header copy {copy}: an older header without a MAC (an interrupted upgrade?); "
                                "ignored")
        found = [(c, h) for c, h in found if h.authenticated]
        if not found:
            raise VolumeFormatError("no volume header copy authenticates: " + "; ".join(problems))
    return max((h for _c, h in found), key=lambda h: h.seq)


def read_header(fd: int) -> tuple[VolumeHeader, list[str]]:
    """The newest copy that parses (nothing authenticated: no key), and a warning per damaged copy."""
    found, problems = _copies(fd)
    return _newest(found, problems, any(h.authenticated for _c, h in found)), problems


def read_verified(fd: int, unwrap: Callable[[VolumeHeader], bytes]) -> tuple[VolumeHeader, bytes, list[str]]:
    """The newest copy whose key ``unwrap`` opens and whose MAC (HEADER_MAC) verifies, that key, and a
    warning per copy that fails. ``unwrap`` raises InvalidCiphertext (damage) or VolumeKeyMismatch for
    a copy; another error, or the same one for both copies, is raised: it is no damage to a copy."""
    found, problems = _copies(fd)
    keys: dict[tuple[bytes, bool, bytes], bytes | EncfsError] = {}
    good: list[tuple[int, VolumeHeader]] = []
    errors: list[EncfsError] = []
    unusable: list[tuple[int, VolumeHeader, EncfsError]] = []  # the key service could not say
    for copy, h in found:
        ref = (h.wrapped_key, h.authenticated, h.recovery)  # a recovery unwrap reads the record
        if ref not in keys:
            try:
                keys[ref] = unwrap(h)
            except (InvalidCiphertext, VolumeKeyMismatch) as e:
                keys[ref] = e
            except EncfsError as e:  # its CMK is disabled, pending deletion, missing, ...
                unusable.append((copy, h, e))
                continue
        key = keys[ref]
        if isinstance(key, EncfsError):
            errors.append(key)
            problems.append(f"header copy {copy}: its volume key does not unwrap ({key.message})")
        elif h.authenticated and not h.verify(header_mac_key(key, h.volume_id)):
            problems.append(f"header copy {copy}: MAC mismatch (tampered or damaged)")
        else:
            good.append((copy, h))
    if not good:
        if unusable:
            raise unusable[0][2]
        if len(errors) == len(found) and len({e.message for e in errors}) == 1:
            raise errors[0]
        raise VolumeFormatError("no volume header copy authenticates: " + "; ".join(problems))
    # A copy with HEADER_MAC that passes its checksum but not its MAC was tampered with (damage fails
    # the checksum): it still rules out the copies without HEADER_MAC, which can only be older.
    header = _newest(good, problems, any(h.authenticated for _c, h in found))
    for copy, h, refused in unusable:
        # Only an older copy may be passed over (a re-wrap a crash cut between the two copies,
        # then the old CMK disabled); never the newest: that would roll the header back.
        if h.seq >= header.seq:
            raise refused
        problems.append(f"header copy {copy}: an older header under a CMK that cannot be used ({refused.message}); "
                        "ignored")
    key = keys[(header.wrapped_key, header.authenticated, header.recovery)]
    assert isinstance(key, bytes)
    return header, key, problems


def copies_behind(fd: int, header: VolumeHeader) -> list[int]:
    """The header copies that parse but hold an older header than ``header`` (a header write a
    crash cut between the two copies)."""
    found, _problems = _copies(fd)
    return [copy for copy, h in found if h.seq < header.seq]


def write_header(fd: int, header: VolumeHeader, mac_key: bytes | None = None) -> VolumeHeader:
    """Write ``header`` with the next sequence number to both copies, one at a time."""
    record = replace(header, seq=header.seq + 1).pack(mac_key)
    for copy in (0, 1):
        pwrite_all(fd, record, header_offset(copy))
        os.fsync(fd)
    return VolumeHeader.parse(record)
