"""Ciphertext blob: the versioned envelope returned by encrypt/generate-data-key.

Layout (docs/FORMAT.md, "Ciphertext blob v1"), big-endian:

    offset size field
    0      3    magic b"EKB"
    3      1    format version (1)
    4      1    algorithm id (1 = AES-256-GCM computed by the token, 12-byte nonce)
    5      16   key id (UUID bytes)
    21     4    backing-key version (u32, first version is 1)
    25     8    context digest (SHA-256(encoded context)[:8])
    33     12   nonce
    45     n    ciphertext
    45+n   16   GCM tag

AAD = bytes[0:45] || encoded context, so every header field is authenticated
and the blob is bound to its context. Decrypt needs nothing but the blob and
the context: the key id and version come from the header.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from encfs.errors import InvalidCiphertext

MAGIC = b"EKB"
FORMAT_VERSION = 1
ALG_AES_256_GCM_TOKEN = 1
NONCE_LEN = 12
TAG_LEN = 16

_HEADER = struct.Struct(">3sBB16sI8s12s")
HEADER_LEN = _HEADER.size  # 45
MIN_BLOB_LEN = HEADER_LEN + TAG_LEN

ALGORITHMS = {ALG_AES_256_GCM_TOKEN: "AES_256_GCM"}


@dataclass(frozen=True)
class BlobHeader:
    """The authenticated header of a ciphertext blob."""

    key_id: uuid.UUID
    key_version: int
    context_digest: bytes
    nonce: bytes
    algorithm: int = ALG_AES_256_GCM_TOKEN

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.algorithm,
            self.key_id.bytes,
            self.key_version,
            self.context_digest,
            self.nonce,
        )


def key_id_of(data: bytes) -> str:
    """The CMK id a blob's header names (the key daemon decides on it before the key service
    parses and checks the whole blob); InvalidCiphertext if it is not a blob at all."""
    if len(data) < MIN_BLOB_LEN or data[:3] != MAGIC:
        CiphertextBlob.parse(data)  # raises the precise one-line error
    return str(uuid.UUID(bytes=bytes(data[5:21])))


@dataclass(frozen=True)
class CiphertextBlob:
    """A parsed blob: header plus ciphertext-with-tag."""

    header: BlobHeader
    sealed: bytes  # ciphertext || tag

    def pack(self) -> bytes:
        return self.header.pack() + self.sealed

    def aad(self, encoded_context: bytes) -> bytes:
        return self.header.pack() + encoded_context

    @classmethod
    def parse(cls, data: bytes) -> CiphertextBlob:
        """Parse ``data``; raise InvalidCiphertext on any malformation."""
        if len(data) < MIN_BLOB_LEN:
            raise InvalidCiphertext(
                f"ciphertext blob is truncated: {len(data)} bytes, "
                f"a blob has at least {MIN_BLOB_LEN}"
            )
        magic, version, alg, key_id, key_version, digest, nonce = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise InvalidCiphertext("not an encfs ciphertext blob (bad magic)")
        if version != FORMAT_VERSION:
            raise InvalidCiphertext(f"unsupported ciphertext blob version {version}")
        if alg not in ALGORITHMS:
            raise InvalidCiphertext(f"unsupported ciphertext blob algorithm id {alg}")
        if key_version == 0:
            raise InvalidCiphertext("ciphertext blob names backing-key version 0")
        header = BlobHeader(uuid.UUID(bytes=key_id), key_version, digest, nonce, alg)
        return cls(header, bytes(data[HEADER_LEN:]))
