"""Read or write a detached volume through encfs in a separate process (the token of an
ENCFS_HOME is loaded there, not in pytest's process: SoftHSM2 serves one config per process).

    python volume_tool.py write IMAGE OFFSET < data     write at OFFSET, flush
    python volume_tool.py discard IMAGE OFFSET LENGTH   discard the range (as the loop device's TRIM), flush
    python volume_tool.py read IMAGE > data             the whole plaintext
    python volume_tool.py digests IMAGE                 JSON: sha256 of the live contents and of
                                                        each snapshot's (read as restore reads it)
    python volume_tool.py write-files IMAGE OFFSET FILE [OFFSET FILE ...]
                                                        write each FILE at its OFFSET, flush; then digests
    python volume_tool.py snapshots IMAGE               JSON: the snapshot table's rows (id, size, created,
                                                        description, ...), oldest first
    python volume_tool.py pages IMAGE                   JSON: a format-2 image's live map (sector -> page,
                                                        and the map nodes' pages)
    python volume_tool.py make-snapshots IMAGE N        N times: write random data, flush, snapshot; then
                                                        digests
    python volume_tool.py sectors IMAGE                 JSON: for the live volume and each snapshot, each
                                                        sector's digest (null: it fails authentication) and
                                                        where it lies (format 2: its page; format 1: its slot)

The functions below run it from a test, with ENCFS_HOME=home.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from encfs.block.cow import CowStore
from encfs.block.snapshots import new_snapshot_id
from encfs.block.volume import OpenVolume, open_volume
from encfs.blocks import BlockAuthError
from encfs.keys.config import HsmOptions
from encfs.keys.service import KeyService


def _run(home: Path, *args: str | Path, timeout: float = 120) -> bytes:
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, env=env, timeout=timeout)
    assert p.returncode == 0, f"volume_tool {args[0]}: {p.stderr.decode().strip()}"
    return p.stdout


def run(home: Path, *args: str | Path, timeout: float = 120) -> Any:
    return json.loads(_run(home, *args, timeout=timeout))


def contents(image: Path, home: Path) -> bytes:
    """The whole plaintext of the live volume."""
    return _run(home, "read", image)


def digests(image: Path, home: Path) -> dict[str, Any]:
    """{"live": sha256, "format": N, "snapshots": {id: sha256}} (snapshots in the table's order)."""
    return run(home, "digests", image)


def write(image: Path, home: Path, chunks: dict[int, bytes], scratch: Path) -> dict[str, Any]:
    """Write ``chunks`` ({offset: data}, any alignment) in one open, flush; then digests()."""
    args: list[str | Path] = []
    for i, (offset, data) in enumerate(chunks.items()):
        (scratch / f"chunk-{i}").write_bytes(data)
        args += [str(offset), scratch / f"chunk-{i}"]
    try:
        return run(home, "write-files", image, *args)
    finally:
        for f in args[1::2]:
            Path(f).unlink()


def make_snapshots(image: Path, home: Path, n: int) -> dict[str, Any]:
    """``n`` snapshots, each of new random contents (not in the catalog: `snapshot list` adds them)."""
    return run(home, "make-snapshots", image, str(n))


def live_pages(image: Path, home: Path) -> dict[str, Any]:
    """{"sectors": {sector: page}, "nodes": [[level, index, page]]} of a format-2 image's live map."""
    out = run(home, "pages", image)
    out["sectors"] = {int(s): p for s, p in out["sectors"].items()}
    return out


def sectors(image: Path, home: Path) -> dict[str, Any]:
    """{"live": {"sha": [...], "at": {sector: page or slot}}, "snapshots": {id: {...}}} (sha[s] is
    None where sector s fails authentication; "at" lists written sectors only)."""
    out = run(home, "sectors", image)
    for tree in [out["live"], *out["snapshots"].values()]:
        tree["at"] = {int(s): p for s, p in tree["at"].items()}
    return out


def _sectors(read: Any, count: int, at: Any) -> dict[str, Any]:
    """Each sector's short digest, read one leaf's worth at a time (one by one where that fails)."""
    sha: list[str | None] = []
    for first in range(0, count, 1024):
        n = min(1024, count - first)
        try:
            data = read(first, n)
            sha += [hashlib.sha256(data[i * 4096:(i + 1) * 4096]).hexdigest()[:16] for i in range(n)]
        except BlockAuthError:
            for s in range(first, first + n):
                try:
                    sha.append(hashlib.sha256(read(s, 1)).hexdigest()[:16])
                except BlockAuthError:
                    sha.append(None)
    return {"sha": sha, "at": {s: p for s in range(count) if (p := at(s))}}


def _all_sectors(vol: OpenVolume) -> dict[str, Any]:
    store, count = vol.store, vol.size // 4096
    if not isinstance(store, CowStore):
        return {"live": _sectors(store.read_sectors, count, store._state), "snapshots": {}}
    trees = {snap.id: (store.snapshot_tree(snap), snap.size // 4096) for snap in store.snapshots}
    return {"live": _sectors(store.read_sectors, count, store.tree.get),
            "snapshots": {sid: _sectors(lambda f, n, t=tree: store.read_tree(t, f, n), n, tree.get)
                          for sid, (tree, n) in trees.items()}}


def _digests(vol: OpenVolume) -> dict[str, Any]:
    out: dict[str, Any] = {"live": hashlib.sha256(vol.read(0, vol.size)).hexdigest(),
                           "format": vol.header.version, "snapshots": {}}
    if isinstance(vol.store, CowStore):
        for snap in vol.store.snapshots:  # as restore reads them (snapshots.SnapshotSource)
            data = vol.store.read_tree(vol.store.snapshot_tree(snap), 0, snap.size // 4096)
            out["snapshots"][snap.id] = hashlib.sha256(data).hexdigest()
    return out


def main(argv: list[str]) -> None:
    with KeyService.open(None, HsmOptions()) as ks:
        vol = open_volume(Path(argv[1]), ks)
        try:
            if argv[0] == "write":
                vol.write(int(argv[2]), sys.stdin.buffer.read())
                vol.flush()
            elif argv[0] == "discard":
                vol.discard(int(argv[2]), int(argv[3]))
                vol.flush()
            elif argv[0] == "write-files":
                for offset, path in zip(argv[2::2], argv[3::2]):
                    vol.write(int(offset), Path(path).read_bytes())
                vol.flush()
                json.dump(_digests(vol), sys.stdout)
            elif argv[0] == "make-snapshots":
                for _ in range(int(argv[2])):
                    for _ in range(3):
                        length = random.randrange(1, 256 * 1024)
                        vol.write(random.randrange(vol.size - length), os.urandom(length))
                    vol.flush()
                    vol.store.snapshot(new_snapshot_id(), "", time.time())
                json.dump(_digests(vol), sys.stdout)
            elif argv[0] == "sectors":
                json.dump(_all_sectors(vol), sys.stdout)
            elif argv[0] == "snapshots":
                assert isinstance(vol.store, CowStore)
                json.dump([asdict(s) for s in vol.store.snapshots], sys.stdout)
            elif argv[0] == "digests":
                json.dump(_digests(vol), sys.stdout)
            elif argv[0] == "pages":
                assert isinstance(vol.store, CowStore)
                tree = vol.store.tree
                json.dump({"sectors": {s: p for s in range(vol.size // 4096) if (p := tree.get(s))},
                           "nodes": [[lvl, i, p] for (lvl, i), p in sorted(tree.pages.items())]}, sys.stdout)
            else:
                sys.stdout.buffer.write(vol.read(0, vol.size))
        finally:
            vol.close()


if __name__ == "__main__":
    main(sys.argv[1:])
