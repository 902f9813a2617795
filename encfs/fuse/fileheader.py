"""The header of a regular file's backing file, and its state (docs/FORMAT.md §6.4).

Header (128 bytes, then blocks)::

    0   4   magic b"ENCF"
    4   1   content version (1 or 2)
    5   1   reserved (0)
    6   16  file id (random)
    22  2   u16 length n of the wrapped data key blob
    24  n   wrapped data key (key-service ciphertext blob; context
            {"encfs:fs": <fs id hex>, "encfs:file": <file id hex>})
    24+n    zero padding to 128 bytes

Version 2 differs from version 1 only in what it promises: the backing file carries its
state (FileState) in the xattr ``user.encfs.state``, so that blocks past the end may be
written in place (content.py). A version-1 file becomes version 2 in place, by writing its
state and then its version byte.

Invariants:
- The header is written once, when the file gets its data key; later only the version
  byte may change (1 -> 2), a one-byte write that cannot tear. A torn header would lose
  every block.
- The state is sealed under the file's data key with the block framing, as block number
  STATE_BLOCK, which no content block can have: it is bound to its file. A missing or
  damaged state reads as "nothing synced" (synced size 0), which only weakens what a
  crash recovery may treat as damage; it never makes data unreadable.
- The state's ``synced_size`` only ever names a size whose blocks were durable (written,
  then fdatasync'd) when the state was written: what lies past it was never acknowledged
  by an fsync. (A file found cut below that size keeps it: the missing range reads EIO.)
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from encfs.blocks import BlockAuthError, BlockCipher

MAGIC = b"ENCF"
V1, V2 = 1, 2
HEADER_LEN = 128
VERSION_OFFSET = 4
FILE_ID_LEN = 16
STATE_XATTR = "user.encfs.state"
STATE_BLOCK = (1 << 64) - 1
_FIXED = struct.Struct(">4sBB16sH")
_STATE = struct.Struct(">QQQ")  # synced size, seals counted, reserved (0)
# A data key's nonce budget (docs/FORMAT.md §6.4): blocks draw random 96-bit GCM nonces, and
# NIST SP 800-38D §8.3 allows 2^32 such seals per key. A file gets a fresh data key at its first
# write past REKEY_AT seals (rekeyfile.py); past SEAL_LIMIT (only if that keeps failing, e.g. on
# a full disk) writes are refused. The margin covers the count a crash may lose (content.py).
SEAL_BUDGET = 1 << 32
REKEY_AT = 1 << 31
SEAL_LIMIT = SEAL_BUDGET - (1 << 24)
NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class HeaderError(Exception):
    """The file header is missing, truncated or malformed."""


@dataclass(frozen=True)
class FileHeader:
    file_id: bytes
    wrapped_key: bytes
    version: int = V2

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, self.version, 0, self.file_id, len(self.wrapped_key))
        body = fixed + self.wrapped_key
        if len(body) > HEADER_LEN:
            raise ValueError("wrapped data key does not fit the file header")
        return body.ljust(HEADER_LEN, b"\0")

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        if len(data) < HEADER_LEN:
            raise HeaderError(f"file header truncated ({len(data)} of {HEADER_LEN} bytes)")
        magic, version, reserved, file_id, n = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise HeaderError("not an encfs file (bad magic)")
        if version not in (V1, V2):
            raise HeaderError(f"unsupported file content version {version}")
        if reserved or _FIXED.size + n > HEADER_LEN or any(data[_FIXED.size + n:HEADER_LEN]):
            raise HeaderError("file header has nonzero reserved bytes or an oversized key blob")
        return cls(file_id, bytes(data[_FIXED.size:_FIXED.size + n]), version)


@dataclass(frozen=True)
class FileState:
    """What a version-2 file records about itself besides its blocks."""

    synced_size: int = 0  # plaintext bytes durable when this state was written
    seals: int = 0  # seals under the data key when this state was written (itself included)

    def seal(self, cipher: BlockCipher) -> bytes:
        return bytes(cipher.seal(STATE_BLOCK, _STATE.pack(self.synced_size, self.seals, 0)))

    @classmethod
    def open(cls, cipher: BlockCipher, sealed: bytes) -> FileState:
        """BlockAuthError if it does not authenticate (damaged, or another file's)."""
        synced, seals, reserved = _STATE.unpack(cipher.open(STATE_BLOCK, sealed))
        if reserved:
            raise BlockAuthError(STATE_BLOCK)
        return cls(synced, seals)


SPENT = FileState(0, REKEY_AT)  # what a state that fails authentication counts as


def read_state(fd: int, cipher: BlockCipher) -> FileState | None:
    """The file's state (the initial one if it has none yet); None if it fails authentication
    (the caller then counts the key's budget as spent: SPENT)."""
    try:
        return FileState.open(cipher, os.getxattr(fd, STATE_XATTR))
    except OSError as e:
        if e.errno in (errno.ENODATA, *NO_XATTRS):
            return FileState()
        raise
    except (BlockAuthError, struct.error):
        return None


def write_state(fd: int, cipher: BlockCipher, state: FileState) -> None:
    """Replace the file's state (setxattr replaces the whole value atomically)."""
    os.setxattr(fd, STATE_XATTR, state.seal(cipher))
