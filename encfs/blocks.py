"""The AEAD block layer shared by the filesystem and the volumes.

Content is cut into fixed-size plaintext blocks; each block is sealed on its
own with AES-256-GCM under the owner's data key (a file's or a volume's):

    sealed block = nonce (12) || ciphertext (len(plaintext)) || tag (16)
    AAD          = scope || u64 block number (big-endian)

``scope`` names the owner (a file id, a volume id), so a block cannot be
moved to another position or another owner without failing authentication.
Every seal draws a fresh random 96-bit nonce, so rewriting a block never
reuses a (key, nonce) pair; callers keep the number of seals per data key
well under 2**32 (NIST SP 800-38D, random nonces).

The offset arithmetic is pure and lives in module-level functions so that
callers (FUSE read/write, volume I/O) and tests share one definition.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PLAIN_BLOCK = 4096
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN
SEALED_BLOCK = PLAIN_BLOCK + OVERHEAD

_U64 = struct.Struct(">Q")


class BlockAuthError(Exception):
    """A sealed block failed authentication (tampered, moved, truncated or wrong key)."""

    def __init__(self, block_no: int) -> None:
        super().__init__(f"block {block_no} failed authentication")
        self.block_no = block_no


def blocks_touched(offset: int, length: int) -> range:
    """Block numbers that plaintext bytes [offset, offset+length) fall in."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be non-negative")
    if length == 0:
        return range(offset // PLAIN_BLOCK, offset // PLAIN_BLOCK)
    return range(offset // PLAIN_BLOCK, (offset + length - 1) // PLAIN_BLOCK + 1)


def sealed_offset(block_no: int, header_len: int = 0) -> int:
    """Where block ``block_no`` starts in a sealed stream behind a header."""
    return header_len + block_no * SEALED_BLOCK


def sealed_size(plain_size: int, header_len: int = 0) -> int:
    """Size of the sealed stream holding ``plain_size`` plaintext bytes."""
    full, rest = divmod(plain_size, PLAIN_BLOCK)
    return header_len + full * SEALED_BLOCK + (rest + OVERHEAD if rest else 0)


def plain_size(sealed_len: int, header_len: int = 0) -> int:
    """Inverse of sealed_size. ValueError if no plaintext size maps to ``sealed_len``."""
    body = sealed_len - header_len
    if body < 0:
        raise ValueError(f"sealed stream of {sealed_len} bytes is shorter than its header")
    full, rest = divmod(body, SEALED_BLOCK)
    if rest == 0:
        return full * PLAIN_BLOCK
    if rest <= OVERHEAD:
        raise ValueError(f"sealed stream ends in a fragment of {rest} bytes")
    return full * PLAIN_BLOCK + rest - OVERHEAD


class BlockCipher:
    """Seals and opens blocks of one owner. One instance per data key (reuse it)."""

    __slots__ = ("_aead", "_scope")

    def __init__(self, key: bytes, scope: bytes) -> None:
        if len(key) != 32:
            raise ValueError("BlockCipher needs a 256-bit key")
        self._aead = AESGCM(key)
        self._scope = bytes(scope)

    def aad(self, block_no: int) -> bytes:
        return self._scope + _U64.pack(block_no)

    def seal(self, block_no: int, plaintext: bytes) -> bytes:
        """nonce || ciphertext || tag for ``plaintext`` (at most PLAIN_BLOCK bytes)."""
        if not 0 < len(plaintext) <= PLAIN_BLOCK:
            raise ValueError(f"a block holds 1 to {PLAIN_BLOCK} bytes, not {len(plaintext)}")
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, self.aad(block_no))

    def open(self, block_no: int, sealed: bytes | memoryview) -> bytes:
        """Plaintext of a sealed block; BlockAuthError if it does not authenticate."""
        if not OVERHEAD < len(sealed) <= SEALED_BLOCK:
            raise BlockAuthError(block_no)
        try:  # slices of a memoryview: no copy of the block before decryption
            return self._aead.decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], self.aad(block_no))
        except InvalidTag:
            raise BlockAuthError(block_no) from None

    def seal_blocks(self, blocks: Sequence[tuple[int, bytes | memoryview]]) -> bytes:
        """Seal (block number, plaintext) pairs and concatenate the results.

        One getrandom(2) supplies every nonce of the batch: large writes make
        no system call per 4 KiB block.
        """
        nonces = os.urandom(NONCE_LEN * len(blocks))
        encrypt, aad = self._aead.encrypt, self.aad
        out = []
        for i, (block_no, plaintext) in enumerate(blocks):
            if not 0 < len(plaintext) <= PLAIN_BLOCK:
                raise ValueError(f"a block holds 1 to {PLAIN_BLOCK} bytes, not {len(plaintext)}")
            nonce = nonces[i * NONCE_LEN:(i + 1) * NONCE_LEN]
            out.append(nonce)
            out.append(encrypt(nonce, plaintext, aad(block_no)))
        return b"".join(out)

    def seal_run(self, first_block: int, plaintext: bytes | memoryview) -> bytes:
        """Seal consecutive blocks; only the last may be short."""
        mv = memoryview(plaintext)
        return self.seal_blocks([(first_block + i, mv[off:off + PLAIN_BLOCK])
                                 for i, off in enumerate(range(0, len(mv), PLAIN_BLOCK))])

    def open_run(self, first_block: int, sealed: bytes | memoryview) -> bytes:
        """Open consecutive sealed blocks (as written by seal_run)."""
        mv = memoryview(sealed)
        return b"".join(self.open(first_block + i, mv[off:off + SEALED_BLOCK])
                        for i, off in enumerate(range(0, len(mv), SEALED_BLOCK)))
