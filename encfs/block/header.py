"""The volume header, kept in two copies as LUKS2 does.

Each copy is one 4096-byte record (docs/FORMAT.md section 7)::

    0     4   magic b"ENCV"
    4     1   format version (1)
    5     1   feature flags: bit 0 (MAPS_MIRRORED) = every extent's two sector-map
              slots are kept as mirrors (sectors.py); other bits are refused
    6     2   reserved (0)
    8     8   u64 sequence number
    16    16  volume id
    32    8   u64 size in bytes (a multiple of the sector size)
    40    4   u32 sector size (4096)
    44    2   u16 length n of the wrapped data key
    46    n   the volume's data key as a key-service ciphertext blob,
              context {"encfs:volume": <volume id hex>}
    46+n      zero padding to 4064
    4064  32  SHA-256 of bytes [0, 4064)

An update writes copy 0, syncs, writes copy 1, syncs, each with the next
sequence number. A reader takes the valid copy with the highest sequence
number, so a torn header write never loses the volume.

Byte 5 was reserved (0) in the first release, which ignores it: a volume
made before MAPS_MIRRORED reads with flags 0 and is upgraded by the first
open_volume() (volume.py); an older encfs still reads a flagged volume.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from dataclasses import dataclass, replace

from encfs.block.layout import SECTOR_SIZE, header_offset
from encfs.diskio import pwrite_all
from encfs.errors import EncfsError
from encfs.keys.blob import CiphertextBlob

MAGIC = b"ENCV"
VOLUME_FORMAT = 1
RECORD = 4096
_BODY = RECORD - 32
_FIXED = struct.Struct(">4sBB2sQ16sQIH")
MAPS_MIRRORED = 0x01  # feature flag: both map slots of every extent hold the newest map at rest
KNOWN_FLAGS = MAPS_MIRRORED


class VolumeFormatError(EncfsError):
    """The image is not an encfs volume, or both header copies are damaged."""


@dataclass(frozen=True)
class VolumeHeader:
    volume_id: bytes
    size: int
    wrapped_key: bytes
    seq: int = 0
    sector_size: int = SECTOR_SIZE
    flags: int = 0

    @property
    def maps_mirrored(self) -> bool:
        return bool(self.flags & MAPS_MIRRORED)

    @property
    def sectors(self) -> int:
        return self.size // self.sector_size

    @property
    def key_id(self) -> str:
        return str(CiphertextBlob.parse(self.wrapped_key).header.key_id)

    def context(self) -> dict[str, str]:
        return {"encfs:volume": self.volume_id.hex()}

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, VOLUME_FORMAT, self.flags, b"\0\0", self.seq, self.volume_id, self.size,
                            self.sector_size, len(self.wrapped_key))
        body = (fixed + self.wrapped_key).ljust(_BODY, b"\0")
        if len(body) != _BODY:
            raise ValueError("wrapped key does not fit the volume header")
        return body + hashlib.sha256(body).digest()

    @classmethod
    def parse(cls, record: bytes) -> VolumeHeader:
        if len(record) < RECORD:
            raise VolumeFormatError("volume header is truncated")
        body, digest = record[:_BODY], record[_BODY:RECORD]
        magic, version, flags, _r, seq, vid, size, sector_size, n = _FIXED.unpack_from(body)
        if magic != MAGIC:
            raise VolumeFormatError("not an encfs volume (bad magic)")
        if hashlib.sha256(body).digest() != digest:
            raise VolumeFormatError("volume header checksum mismatch")
        if version != VOLUME_FORMAT:
            raise VolumeFormatError(f"unsupported volume format version {version}")
        if flags & ~KNOWN_FLAGS:
            raise VolumeFormatError(f"volume header has unknown feature flags 0x{flags:02x} "
                                    "(made by a newer encfs?)")
        if sector_size != SECTOR_SIZE or size % sector_size or _FIXED.size + n > _BODY:
            raise VolumeFormatError("volume header has impossible geometry")
        return cls(vid, size, bytes(body[_FIXED.size:_FIXED.size + n]), seq, sector_size, flags)


def new_header(size: int, wrapped_key: bytes, volume_id: bytes | None = None) -> VolumeHeader:
    return VolumeHeader(volume_id or uuid.uuid4().bytes, size, wrapped_key, flags=MAPS_MIRRORED)


def read_header(fd: int) -> tuple[VolumeHeader, list[str]]:
    """The newest valid header copy, and a warning per damaged copy."""
    found: list[VolumeHeader] = []
    problems: list[str] = []
    for copy in (0, 1):
        try:
            found.append(VolumeHeader.parse(os.pread(fd, RECORD, header_offset(copy))))
        except VolumeFormatError as e:
            problems.append(f"header copy {copy}: {e.message}")
    if not found:
        if all("bad magic" in p or "truncated" in p for p in problems):
            raise VolumeFormatError("not an encfs volume (no valid header)")
        raise VolumeFormatError("both volume header copies are damaged: " + "; ".join(problems))
    if len(found) == 2 and found[0].volume_id != found[1].volume_id:
        raise VolumeFormatError("the two header copies belong to different volumes")
    return max(found, key=lambda h: h.seq), problems


def write_header(fd: int, header: VolumeHeader) -> VolumeHeader:
    """Write ``header`` with the next sequence number to both copies, one at a time."""
    new = replace(header, seq=header.seq + 1)
    record = new.pack()
    for copy in (0, 1):
        pwrite_all(fd, record, header_offset(copy))
        os.fsync(fd)
    return new
