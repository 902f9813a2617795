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

from encfs.blocks import NONCE_LEN, OVERHEAD, TAG_LEN, BlockAuthError, BlockCipher, RunViews

_NONCE = bytes(NONCE_LEN)
_TAG = bytes(TAG_LEN)


class NullBlockCipher(BlockCipher):
    """BlockCipher's framing and sizes with no encryption work: no AES-GCM, no nonces drawn,
    no AAD built (benchmark only). Sealed blocks carry an all-zero tag and an all-zero nonce,
    or, sealed with a ``counter``, the counter nonces BlockCipher would use (they cost no system
    call, and a caller that reads its counters back from the blocks sees the real ones)."""

    __slots__ = ()

    def seal(self, block_no: int, plaintext: bytes, counter: int | None = None) -> bytes:
        if not 0 < len(plaintext) <= self.block_size:
            raise ValueError(f"a block holds 1 to {self.block_size} bytes, not {len(plaintext)}")
        return (_NONCE if counter is None else self.nonces(1, counter)) + bytes(plaintext) + _TAG

    def open(self, block_no: int, sealed: bytes | memoryview) -> bytes:
        if not OVERHEAD < len(sealed) <= self.sealed_block:
            raise BlockAuthError(block_no)
        return bytes(sealed[NONCE_LEN:len(sealed) - TAG_LEN])

    def seal_range(self, block_numbers: range, plaintext: bytes | memoryview,  # type: ignore[override]
                   counter: int | None = None) -> bytes:
        pt = memoryview(plaintext).cast("B")
        self.check_run(block_numbers, len(pt) + len(block_numbers) * OVERHEAD, len(pt))
        nonces = None if counter is None else self.nonces(len(block_numbers), counter)
        parts: list[bytes | memoryview] = []
        for npos, ipos in zip(range(0, NONCE_LEN * len(block_numbers), NONCE_LEN), range(0, len(pt), self.block_size)):
            parts += (_NONCE if nonces is None else nonces[npos:npos + NONCE_LEN], pt[ipos:ipos + self.block_size],
                      _TAG)
        return b"".join(parts)

    def seal_into(self, block_numbers: range, plaintext: bytes | memoryview, out: memoryview | bytearray,
                  counter: int | None = None) -> None:
        memoryview(out).cast("B")[:] = self.seal_range(block_numbers, plaintext, counter)

    def open_into(self, block_numbers: range, sealed: bytes | memoryview, out: memoryview | bytearray) -> None:
        mv, out = memoryview(sealed), memoryview(out).cast("B")
        self.check_run(block_numbers, len(mv), len(out))
        pos = opos = 0
        for _ in block_numbers:
            end = opos + min(self.sealed_block, len(mv) - pos) - OVERHEAD
            out[opos:end] = mv[pos + NONCE_LEN:pos + NONCE_LEN + end - opos]
            pos, opos = pos + self.sealed_block, end


    def seal_views(self, block_numbers: range, views: RunViews, counter: int | None = None) -> None:
        views.check(block_numbers, self.block_size)
        nonces = None if counter is None else memoryview(self.nonces(len(block_numbers), counter))
        for k, (_, nonce_at, body, plain) in enumerate(zip(block_numbers, views.nonces, views.bodies, views.plains)):
            nonce_at[:] = _NONCE if nonces is None else nonces[k * NONCE_LEN:(k + 1) * NONCE_LEN]
            body[:-TAG_LEN] = plain
            body[-TAG_LEN:] = _TAG

    def open_views(self, block_numbers: range, views: RunViews) -> None:
        views.check(block_numbers, self.block_size)
        size = self.block_size
        for _, body, plain in zip(block_numbers, views.bodies, views.plains):
            plain[:] = body[:size]


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
