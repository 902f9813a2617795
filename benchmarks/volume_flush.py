#!/usr/bin/env python3
"""What one volume flush costs, kernel-free: SectorStore.write + flush() on an image file.

Usage (a measurement, not a test; run from the repository root with the project's venv):
    python benchmarks/volume_flush.py [--dir DIR] [--rounds N] [--extents K]

Each round writes one random 4 KiB sector into each of K extents (so K sector maps are
dirty) and times flush(): fdatasync of the data, the sealed map writes and their fsync.
Prints the median and the 10th/90th percentiles in milliseconds. The image is a fresh
sparse file in DIR (default /var/tmp), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from encfs.block.layout import EXTENT_SECTORS, SECTOR_SIZE, image_size
from encfs.block.sectors import SectorStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--extents", type=int, default=1)
    args = ap.parse_args()
    sectors = max(args.extents, 1) * EXTENT_SECTORS
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        fd = os.open(os.path.join(d, "vol.img"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, image_size(sectors))
            store = SectorStore(fd, os.urandom(32), os.urandom(16), sectors)
            store.format_maps()
            rng = random.Random(1)
            times = []
            for _ in range(args.rounds):
                for e in range(args.extents):
                    store.write((e * EXTENT_SECTORS + rng.randrange(EXTENT_SECTORS)) * SECTOR_SIZE,
                                rng.randbytes(SECTOR_SIZE))
                t = time.perf_counter()
                store.flush()
                times.append((time.perf_counter() - t) * 1000)
        finally:
            os.close(fd)
    q = statistics.quantiles(times, n=10)
    print(f"flush of {args.extents} dirty extent map(s), {args.rounds} rounds: "
          f"median {statistics.median(times):.3f} ms, p10 {q[0]:.3f} ms, p90 {q[-1]:.3f} ms")


if __name__ == "__main__":
    main()
