"""A dict-backed snapshot source and import target for the export tests, and a subprocess driver.

``DictSource`` is a snapshot held as {sector: 4096 bytes} (the sectors not in it read as zeros),
``DictTarget`` a fresh volume that records what is written to it; both follow the Protocols of
encfs.block.export, which the volume code implements for real.

Run as a script (SoftHSM2 is loaded once per process, so a second key service needs its own):
    export_tool.py export DIR SEED MIB      export the snapshot seeded_source(SEED, MIB)
    export_tool.py verify DIR SEED MIB      import DIR's newest manifest and compare it with that snapshot
with ENCFS_HOME naming a home whose key service has a CMK aliased "fs"; prints the stats as JSON.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from encfs.blocks import BlockAuthError

SECTOR = 4096


class DictSource:
    def __init__(self, volume_id: bytes, snapshot_id: str, size: int, sectors: dict[int, bytes],
                 key_id: str, description: str = "", created: float = 1.7e9) -> None:
        self.volume_id, self.snapshot_id, self.size = volume_id, snapshot_id, size
        self.description, self.created, self.key_id = description, created, key_id
        self.sectors = dict(sectors)
        self.bad: set[int] = set()  # sectors that fail authentication
        self.reads = 0

    def written_runs(self) -> Iterator[tuple[int, int]]:
        run: list[int] = []
        for s in sorted(self.sectors):
            if run and s != run[0] + run[1]:
                yield run[0], run[1]
                run = []
            run = [run[0], run[1] + 1] if run else [s, 1]
        if run:
            yield run[0], run[1]

    def read_sectors(self, first: int, count: int) -> bytearray:
        self.reads += 1
        out = bytearray()
        for s in range(first, first + count):
            if s in self.bad:
                raise BlockAuthError(s)
            out += self.sectors.get(s, bytes(SECTOR))
        return out

    def plaintext(self) -> bytes:
        out = bytearray(self.size)
        for s, data in self.sectors.items():
            out[s * SECTOR:(s + 1) * SECTOR] = data
        return bytes(out)


class DictTarget:
    def __init__(self, size: int) -> None:
        self.size = size
        self.writes: dict[int, bytes] = {}  # sector -> data
        self.flushes = 0

    def write_sectors(self, first: int, data: bytes) -> None:
        assert len(data) % SECTOR == 0 and data, "whole sectors only"
        assert (first + len(data) // SECTOR) * SECTOR <= self.size, "past the end of the volume"
        for i in range(len(data) // SECTOR):
            self.writes[first + i] = bytes(data[i * SECTOR:(i + 1) * SECTOR])

    def flush(self) -> None:
        self.flushes += 1

    def plaintext(self) -> bytes:
        out = bytearray(self.size)
        for s, data in self.writes.items():
            out[s * SECTOR:(s + 1) * SECTOR] = data
        return bytes(out)


def seeded_source(seed: int, mib: int, key_id: str) -> DictSource:
    """A snapshot of ``mib`` MiB, nearly every sector written with random bytes (a few holes)."""
    rng = random.Random(seed)
    sectors = mib * 256
    data = rng.randbytes(sectors * SECTOR)
    holes = set(rng.sample(range(sectors), sectors // 50))
    written = {s: data[s * SECTOR:(s + 1) * SECTOR] for s in range(sectors) if s not in holes}
    return DictSource(bytes(range(16)), f"snap-{seed:032x}", sectors * SECTOR, written, key_id,
                      description=f"seeded {seed}")


def main(argv: list[str]) -> None:
    from encfs.block.export import export_snapshot, import_snapshot, read_manifest
    from encfs.keys.service import KeyService

    mode, directory, seed, mib = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    with KeyService.open(Path(os.environ["ENCFS_HOME"]), provision=False) as ks:
        src = seeded_source(seed, mib, str(ks.describe_key("fs")["KeyId"]))
        if mode == "export":
            print(json.dumps(asdict(export_snapshot(src, directory, ks))), flush=True)
        elif mode == "verify":
            manifest = read_manifest(directory, ks)
            target = DictTarget(manifest.size)
            stats = import_snapshot(directory, ks, manifest, target)
            assert manifest.snapshot_id == src.snapshot_id and manifest.size == src.size
            assert target.plaintext() == src.plaintext(), "the import differs from the snapshot"
            print(json.dumps(asdict(stats)), flush=True)
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
