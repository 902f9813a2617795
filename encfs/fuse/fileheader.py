"""The header of a regular file's backing file, and its state (docs/FORMAT.md §6.4).

Header (128 bytes, then blocks)::

    0   4   magic b"ENCF"
    4   1   content version (1 or 2)
    5   1   key source: 0 wrapped (the blob follows), 1 derived (no blob: n = 0)
    6   16  file id (random)
    22  2   u16 length n of the wrapped data key blob
    24  n   wrapped data key (key-service ciphertext blob; context
            {"encfs:fs": <fs id hex>, "encfs:file": <file id hex>})
    24+n    zero padding to 128 bytes

A derived key (filesystems with the feature ``derived-file-keys``: filekeys.py) is computed
from the filesystem's file-key root and the file id, so the header carries no blob.

Version 2 differs from version 1 only in what it promises: the backing file carries its
state (FileState) in the xattr ``user.encfs.state`` (on a backing store without user xattrs,
in the file ``encfs.journal/<file id hex>.state``: state_file()), so that blocks past the end
may be written in place (content.py). A version-1 file becomes version 2 in place, by writing
its state and then its version byte.

Invariants:
- The header is written once, when the file gets its data key; later only the version
  byte may change (1 -> 2), a one-byte write that cannot tear. A torn header would lose
  every block.
- The state is sealed under the file's data key with the block framing, as block number
  STATE_BLOCK, which no content block can have: it is bound to its file. A missing or
  damaged state reads as "nothing synced" (synced size 0), which only weakens what a
  crash recovery may treat as damage; it never makes a sealed block unreadable (the
  file's holes, which only the state names, then read EIO).
- The state's hole list (holes.py) names only blocks that read as zeros: a block enters
  it before its backing bytes are punched, and leaves it only after the block written
  into it is durable (content.py).
- The state's ``synced_size`` only ever names a size whose blocks were durable (written,
  then fdatasync'd) when the state was written. It may lag: on a mount an fsync's synced
  size is written about a second later, so what lies past it may have been acknowledged by
  an fsync just before a crash. (A file found cut below that size keeps it: the missing
  range reads EIO.)
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from encfs.atomicfile import write_atomic
from encfs.blocks import BlockAuthError, BlockCipher
from encfs.errors import IntegrityError
from encfs.fuse.holes import EXTENT, HOLES_MAX, pack_extents, unpack_extents

MAGIC = b"ENCF"
V1, V2 = 1, 2
WRAPPED, DERIVED = 0, 1  # the key source byte
HEADER_LEN = 128
VERSION_OFFSET = 4
FILE_ID_LEN = 16
STATE_XATTR = "user.encfs.state"
STATE_SUFFIX = b".state"  # encfs.journal/<file id hex>.state: the state where xattrs are not kept
JOURNAL_DIR = b"encfs.journal"
_PROBE = "user.encfs.probe"
_SEALED_STATE = 12 + 24 + 16  # without holes; each hole extent adds 16 (holes.py)
STATE_BLOCK = (1 << 64) - 1
_FIXED = struct.Struct(">4sBB16sH")
_STATE = struct.Struct(">QQQ")  # synced size, seals counted, hole extents that follow (0 before sparse files)
# A data key's nonce budget (docs/FORMAT.md §6.4): blocks draw random 96-bit GCM nonces, and
# NIST SP 800-38D §8.3 allows 2^32 such seals per key. A file gets a fresh data key at its first
# write past REKEY_AT seals (rekeyfile.py); past SEAL_LIMIT (only if that keeps failing, e.g. on
# a full disk) writes are refused. The margin covers the count a crash may lose (content.py).
SEAL_BUDGET = 1 << 32
REKEY_AT = 1 << 31
SEAL_LIMIT = SEAL_BUDGET - (1 << 24)
NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class HeaderError(IntegrityError):
    """The file header is missing, truncated or malformed."""


@dataclass(frozen=True)
class FileHeader:
    file_id: bytes
    wrapped_key: bytes  # empty for a derived key
    version: int = V2

    @property
    def derived(self) -> bool:
        """Whether the file's key is derived from the file-key root (filekeys.py), not wrapped here."""
        return not self.wrapped_key

    def pack(self) -> bytes:
        source = DERIVED if self.derived else WRAPPED
        fixed = _FIXED.pack(MAGIC, self.version, source, self.file_id, len(self.wrapped_key))
        body = fixed + self.wrapped_key
        if len(body) > HEADER_LEN:
            raise ValueError("wrapped data key does not fit the file header")
        return body.ljust(HEADER_LEN, b"\0")

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        if len(data) < HEADER_LEN:
            raise HeaderError(f"file header truncated ({len(data)} of {HEADER_LEN} bytes)")
        magic, version, source, file_id, n = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise HeaderError("not an encfs file (bad magic)")
        if version not in (V1, V2):
            raise HeaderError(f"unsupported file content version {version}")
        if source not in (WRAPPED, DERIVED) or (source == DERIVED) != (n == 0) or _FIXED.size + n > HEADER_LEN \
                or any(data[_FIXED.size + n:HEADER_LEN]):
            raise HeaderError("file header has an unknown key source, a key blob that does not match it, "
                              "or nonzero padding")
        return cls(file_id, bytes(data[_FIXED.size:_FIXED.size + n]), version)


@dataclass(frozen=True)
class FileState:
    """What a version-2 file records about itself besides its blocks."""

    synced_size: int = 0  # plaintext bytes durable when this state was written
    seals: int = 0  # seals under the data key when this state was written (itself included)
    holes: tuple[tuple[int, int], ...] = ()  # (first block, count): blocks with no sealed version (holes.py)

    def seal(self, cipher: BlockCipher) -> bytes:
        body = _STATE.pack(self.synced_size, self.seals, len(self.holes)) + pack_extents(self.holes)
        return bytes(cipher.seal(STATE_BLOCK, body))

    @classmethod
    def open(cls, cipher: BlockCipher, sealed: bytes) -> FileState:
        """BlockAuthError if it does not authenticate (damaged, or another file's) or its hole
        list is malformed."""
        plain = cipher.open(STATE_BLOCK, sealed)
        synced, seals, count = _STATE.unpack_from(plain)
        try:
            holes = unpack_extents(plain[_STATE.size:], count)
        except ValueError:
            raise BlockAuthError(STATE_BLOCK) from None
        return cls(synced, seals, holes)


SPENT = FileState(0, REKEY_AT)  # what a state that fails authentication counts as


def read_state(fd: int, cipher: BlockCipher, side: bytes | None = None) -> FileState | None:
    """The file's state (the initial one if it has none yet); None if it fails authentication
    (the caller then counts the key's budget as spent: SPENT). ``side``: the state's file, on a
    backing store without user xattrs (state_file())."""
    try:
        if side is None:
            sealed = os.getxattr(fd, STATE_XATTR)
        else:
            with open(side, "rb") as f:
                sealed = f.read(_SEALED_STATE + HOLES_MAX * EXTENT.size + 1)
        return FileState.open(cipher, sealed)
    except FileNotFoundError:
        return FileState()
    except OSError as e:
        if e.errno in (errno.ENODATA, *NO_XATTRS):
            return FileState()
        raise
    except (BlockAuthError, struct.error, ValueError):
        return None


def write_state(fd: int, cipher: BlockCipher, state: FileState, side: bytes | None = None) -> None:
    """Replace the file's state: setxattr, or the ``side`` file, each replaced as a whole."""
    if side is None:
        os.setxattr(fd, STATE_XATTR, state.seal(cipher))
        return
    os.makedirs(os.path.dirname(side), mode=0o700, exist_ok=True)
    write_atomic(side, state.seal(cipher), 0o600)


def remove_state(fd: int, side: bytes | None = None) -> None:
    """Drop the file's state (a file emptied or gone: its key goes with it)."""
    try:
        if side is None:
            os.removexattr(fd, STATE_XATTR)
        else:
            os.unlink(side)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOENT, *NO_XATTRS):
            raise


def journal_dir_entry(root: bytes, file_id: bytes, suffix: bytes = b"") -> bytes:
    """``encfs.journal/<file id hex><suffix>``: the journal directory names a file's journal,
    state file and re-key side file by its id."""
    return os.path.join(root, JOURNAL_DIR, file_id.hex().encode() + suffix)


def state_file(root: bytes, file_id: bytes) -> bytes:
    """Where a file's state lives on a backing store without user xattrs."""
    return journal_dir_entry(root, file_id, STATE_SUFFIX)


def user_xattrs_supported(path: bytes) -> bool:
    """Whether the backing store at ``path`` keeps user xattrs (probed with a set and a remove);
    an answer other than "not supported" (a read-only store, no permission) counts as yes."""
    try:
        os.setxattr(path, _PROBE, b"")
        os.removexattr(path, _PROBE)
    except OSError as e:
        return e.errno not in NO_XATTRS
    return True
