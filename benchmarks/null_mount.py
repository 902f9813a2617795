#!/usr/bin/env python3
"""Benchmark-only launcher: serve an encfs CIPHERDIR with the content cipher switched off.

Usage (the harness runs it; it is not an `encfs` command and never a mount option):
    ENCFS_HOME=... python benchmarks/null_mount.py [--server NAME] CIPHERDIR MOUNTPOINT

(``--server`` as in ``encfs mount``: encfs, the default, or pyfuse3.)

It runs the very same ``encfs.fuse.mount.serve()`` path as ``encfs mount --foreground``, with one
difference: ``EncryptedFS.cipher_class`` is replaced, in this process and its sealing worker
only, by ``NullBlockCipher``, which keeps BlockCipher's framing (nonce 12 + data + tag 16,
all-zero tag, all-zero nonce unless sealed with counter nonces) but does no AES-GCM. Everything else stays: per-file data keys are
still generated and unwrapped through the key service, names, symlinks and xattrs are still
encrypted, headers are still written, large reads and writes still go through the sealing
worker. The difference between this target and encfs is therefore what the content encryption
itself costs.

A filesystem written through this launcher holds PLAINTEXT contents and is not readable by a real
encfs mount (blocks do not authenticate): use a throwaway CIPHERDIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

from encfs.blocks import NONCE_LEN, PLAIN_BLOCK, TAG_LEN, BlockCipher

_TAG = bytes(TAG_LEN)
Buffer = bytes | bytearray | memoryview


class CopyAead:
    """AESGCM's four methods with the encryption left out: the ciphertext is the plaintext and
    the tag is 16 zero bytes; nothing is checked (benchmark only)."""

    __slots__ = ()

    def encrypt(self, nonce: Buffer, data: Buffer, associated_data: Buffer) -> bytes:
        return bytes(data) + _TAG

    def decrypt(self, nonce: Buffer, data: Buffer, associated_data: Buffer) -> bytes:
        return bytes(memoryview(data)[:-TAG_LEN])

    def encrypt_into(self, nonce: Buffer, data: Buffer, associated_data: Buffer, buf: memoryview) -> None:
        buf[:len(data)] = data
        buf[len(data):] = _TAG

    def decrypt_into(self, nonce: Buffer, data: Buffer, associated_data: Buffer, buf: memoryview) -> None:
        buf[:] = memoryview(data)[:-TAG_LEN]


class NullBlockCipher(BlockCipher):
    """BlockCipher with its AEAD swapped for CopyAead, and all-zero nonces where it would draw
    random ones (counter nonces stay: they cost no system call, and a caller that reads its
    counters back from the blocks sees the real ones). Every seal and open runs BlockCipher's own
    code (runs, kept views, one-block paths, AAD), so the null cipher cannot drift from it: the
    difference is AES-GCM and getrandom(2) alone (benchmark only)."""

    __slots__ = ()

    def __init__(self, key: bytes, scope: bytes, block_size: int = PLAIN_BLOCK,
                 nonce_prefix: bytes | None = None) -> None:
        super().__init__(key, scope, block_size, nonce_prefix)
        self._aead = CopyAead()  # type: ignore[assignment]

    def nonces(self, count: int, counter: int | None = None) -> bytes:
        return bytes(NONCE_LEN * count) if counter is None else super().nonces(count, counter)


def main(argv: list[str]) -> int:
    server = "encfs"
    if argv[:1] == ["--server"] and len(argv) > 1:
        server, argv = argv[1], argv[2:]
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
                    mount_mod.MountOptions(server=server))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
