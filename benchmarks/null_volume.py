#!/usr/bin/env python3
"""Benchmark-only launcher: a volume served exactly like an attached encfs volume, without encryption.

Usage (the harness runs it; it is not an `encfs` command and never an option):
    python benchmarks/null_volume.py IMAGE MOUNTPOINT SIZE_MIB [FORMAT]

It creates a fresh IMAGE with the layout of encfs's volume format FORMAT (2, the default of
`encfs volume create`: copy-on-write pages, a map tree, commit records; 1: two-slot sectors and
sector maps) and serves it with the same raw /dev/fuse server (encfs.block.fuseserver.VolumeServer)
as `encfs volume attach`, with one difference: the store's ``cipher_class`` (``CowStore``'s or
``SectorStore``'s) is replaced, in this process and its sealing worker only, by
``NullBlockCipher`` (same framing and counter nonces, no AES-GCM). The harness attaches a loop
device to MOUNTPOINT/volume. So "encfs volume / this" is what encryption costs on the volume path.
The image holds PLAINTEXT and has no header: use a throwaway path.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from null_mount import NullBlockCipher  # noqa: E402

from encfs.block.budget import SealBudget  # noqa: E402
from encfs.block.cow import CowStore  # noqa: E402
from encfs.block.fuseserver import VolumeServer, fuse_mount  # noqa: E402
from encfs.block.layout import SECTOR_SIZE, image_size  # noqa: E402
from encfs.block.sectors import SectorStore  # noqa: E402
from encfs.block.volume import StoreFile  # noqa: E402


class NullSectorStore(SectorStore):
    cipher_class = NullBlockCipher  # type: ignore[assignment]


class NullCowStore(CowStore):
    cipher_class = NullBlockCipher  # type: ignore[assignment]


class NullVolume(StoreFile):
    """The VolumeFile protocol over a NullCowStore or NullSectorStore."""

    def __init__(self, store: CowStore | SectorStore) -> None:
        self.store = store

    def grow(self, new_size: int) -> None:
        raise OSError(95, "not supported by the benchmark volume")


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[3:] not in ([], ["1"], ["2"]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    image, mountpoint, size_mib = Path(argv[0]), argv[1], int(argv[2])
    sectors = size_mib * (1 << 20) // SECTOR_SIZE
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    store: CowStore | SectorStore
    if argv[3:] == ["1"]:
        os.ftruncate(fd, image_size(sectors))
        store = NullSectorStore(fd, bytes(32), bytes(16), sectors)
        store.format_maps()
    else:  # as create_volume() then open_volume() do; the seal count needs no header here
        budget = SealBudget(0, lambda _n: None, str(image), counter=True)
        store = NullCowStore(fd, bytes(32), bytes(16), sectors, budget, one_sync=True)  # as new_header() sets
        store.format()
        store.load()
    store.start_seal_worker(bytes(32))  # as `encfs volume attach` does: the null cipher runs in it
    try:
        server = VolumeServer(fuse_mount(mountpoint, "encfs-null-volume"), NullVolume(store))
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        try:
            server.serve()
        finally:
            server.final_flush()
    finally:
        store.stop_seal_worker()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
