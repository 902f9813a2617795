#!/usr/bin/env python3
"""Benchmark-only launcher: serve an encfs CIPHERDIR with the content cipher switched off.

Usage (the harness runs it; it is not an `encfs` command and never a mount option):
    ENCFS_HOME=... python benchmarks/null_mount.py CIPHERDIR MOUNTPOINT

It runs the very same ``encfs.fuse.mount.serve()`` path as ``encfs mount --foreground``, with one
difference: ``EncryptedFS.cipher_class`` is replaced, in this process only, by ``NullBlockCipher``,
which keeps BlockCipher's framing (nonce 12 + data + tag 16, all-zero nonce and tag) but does no
AES-GCM. Everything else stays: per-file data keys are still generated and unwrapped through the
key service, names, symlinks and xattrs are still encrypted, headers are still written. The
difference between this target and encfs is therefore what the content encryption itself costs.

A filesystem written through this launcher holds PLAINTEXT contents and is not readable by a real
encfs mount (blocks do not authenticate): use a throwaway CIPHERDIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

from encfs.blocks import NONCE_LEN, OVERHEAD, PLAIN_BLOCK, BlockAuthError, check_block_size

_NONCE = bytes(NONCE_LEN)
_TAG = bytes(OVERHEAD - NONCE_LEN)


class NullBlockCipher:
    """BlockCipher's interface and sizes, without encryption (benchmark only)."""

    __slots__ = ("_scope", "block_size", "sealed_block")

    def __init__(self, key: bytes, scope: bytes, block_size: int = PLAIN_BLOCK) -> None:
        if len(key) != 32:
            raise ValueError("BlockCipher needs a 256-bit key")
        self._scope = bytes(scope)
        self.block_size = check_block_size(block_size)
        self.sealed_block = block_size + OVERHEAD

    def aad(self, block_no: int) -> bytes:
        return self._scope + block_no.to_bytes(8, "big")

    def seal(self, block_no: int, plaintext: bytes) -> bytes:
        if not 0 < len(plaintext) <= self.block_size:
            raise ValueError(f"a block holds 1 to {self.block_size} bytes, not {len(plaintext)}")
        return _NONCE + bytes(plaintext) + _TAG

    def open(self, block_no: int, sealed: bytes | memoryview) -> bytes:
        if not OVERHEAD < len(sealed) <= self.sealed_block:
            raise BlockAuthError(block_no)
        return bytes(sealed[NONCE_LEN:len(sealed) - (OVERHEAD - NONCE_LEN)])

    def seal_blocks(self, blocks) -> bytes:
        return b"".join(self.seal(n, p) for n, p in blocks)

    def seal_run(self, first_block: int, plaintext: bytes | memoryview) -> bytes:
        mv, step = memoryview(plaintext), self.block_size
        out = []
        for off in range(0, len(mv), step):
            out += (_NONCE, mv[off:off + step], _TAG)
        return b"".join(out)

    def open_run(self, first_block: int, sealed: bytes | memoryview) -> bytes:
        mv, step = memoryview(sealed), self.sealed_block
        return b"".join(self.open(first_block + i, mv[off:off + step])
                        for i, off in enumerate(range(0, len(mv), step)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    import encfs.fuse.mount as mount_mod
    from encfs.fuse.fs import EncryptedFS
    from encfs.keys.config import HsmOptions

    class NullCipherFS(EncryptedFS):
        cipher_class = NullBlockCipher

    mount_mod.EncryptedFS = NullCipherFS  # this process only
    cipherdir, mountpoint = Path(argv[0]).absolute(), Path(argv[1]).absolute()
    mount_mod.serve(cipherdir, mountpoint, None, HsmOptions(),
                    mount_mod.MountOptions())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
