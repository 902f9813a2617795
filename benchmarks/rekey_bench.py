"""The re-key and check rows of `encfs bench` (bench.py imports this; it is not run on its own).

Per repetition, on a fresh format-2 volume of VOLUME MiB filled in full through its loop device
(1 MiB writes, every sector different, fsync: the fill rate is a row, the sequential write rate to
compare the others with) and then detached, each timed around the whole command, as a user waits:

- `encfs rekey VOL --key OTHER`: a re-wrap (the volume key moves to another CMK; no sector is
  rewritten), seconds;
- `encfs rekey VOL --full`: every written sector re-encrypted under a fresh volume key, MB/s of
  the data (issue #21 asks for at least half the sequential write rate);
- `encfs fsck VOL`, with a cold cache, MB/s of the data, if this encfs has `encfs fsck`;

and on a CIPHERDIR holding the harness's source tree (made through a mount, then unmounted), if
this encfs re-keys filesystems: `encfs rekey CIPHERDIR --key OTHER`, seconds, and seconds per
10,000 entries (issue #21: under 15 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

MiB = 1 << 20
OTHER = "bench-rekey"  # the second CMK the re-wraps move to

# metric key -> (label, unit); "{n}" is the MiB written or the tree's entries. Times: lower is better.
METRICS = {
    "fill": ("volume filled through its loop device (1 MiB writes + fsync), {n} MiB", "MB/s"),
    "rewrap_volume": ("`encfs rekey VOL --key OTHER` (re-wrap), {n} MiB written", "s"),
    "full_volume": ("`encfs rekey VOL --full` (every sector re-encrypted), {n} MiB written", "MB/s"),
    "fsck_volume": ("`encfs fsck VOL`, cold cache, {n} MiB written", "MB/s"),
    "rewrap_fs": ("`encfs rekey CIPHERDIR --key OTHER` (re-wrap) of a {n}-entry tree", "s"),
    "rewrap_fs_per_10k": ("the same, per 10,000 entries", "s"),
}

# volume(mib): makes a fresh volume, fills it through its loop device and detaches it; yields
# (image, fill MB/s) and removes it afterwards. filesystem(): a CIPHERDIR holding the source tree,
# unmounted; yields (cipherdir, entries) and removes it afterwards.
VolumeFactory = Callable[[int], AbstractContextManager[tuple[Path, float]]]
FilesystemFactory = Callable[[], AbstractContextManager[tuple[Path, int]]]


def metric_key(name: str, n: int) -> str:
    return f"{name}_{n}"


def label(key: str) -> tuple[str, str]:
    name, _, n = key.rpartition("_")
    text, unit = METRICS[name]
    return text.format(n=n), unit


def order(key: str) -> tuple[int, int]:
    name, _, n = key.rpartition("_")
    return list(METRICS).index(name), int(n)


def encfs(env: dict[str, str], *args: str | Path, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "encfs", *map(str, args)], env=env, capture_output=True,
                          timeout=timeout)
    return time.perf_counter() - t0, proc


def checked(env: dict[str, str], *args: str | Path) -> float:
    took, proc = encfs(env, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"encfs {' '.join(map(str, args[:2]))}: {proc.stderr.decode(errors='replace').strip()}")
    return took


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def measure(volume_mib: int, volume: VolumeFactory, filesystem: FilesystemFactory, env: dict[str, str],
            note: Callable[[str], None]) -> dict[str, float]:
    """One repetition of every row this encfs can run (see the module docstring)."""
    out: dict[str, float] = {}
    if encfs(env, "key", "describe", OTHER)[1].returncode != 0:
        checked(env, "key", "create", "--alias", OTHER)
    n = volume_mib
    with volume(n) as (image, fill_rate):
        out[metric_key("fill", n)] = fill_rate
        out[metric_key("rewrap_volume", n)] = checked(env, "rekey", image, "--key", OTHER)
        drop_caches()
        out[metric_key("full_volume", n)] = n * MiB / checked(env, "rekey", image, "--full") / 1e6
        if encfs(env, "fsck", "--help")[1].returncode == 0:
            drop_caches()
            out[metric_key("fsck_volume", n)] = n * MiB / checked(env, "fsck", image) / 1e6
        else:
            note("fsck rows skipped: this encfs has no `encfs fsck`")
    with filesystem() as (cipherdir, entries):
        _took, dry = encfs(env, "rekey", cipherdir, "--key", OTHER, "--dry-run")
        if dry.returncode != 0:
            note(f"filesystem re-wrap rows skipped: {dry.stderr.decode(errors='replace').strip()}")
        else:
            took = checked(env, "rekey", cipherdir, "--key", OTHER)
            out[metric_key("rewrap_fs", entries)] = took
            out[metric_key("rewrap_fs_per_10k", entries)] = took * 10_000 / entries
    return out
