"""The snapshot rows of `encfs bench` (bench.py imports this; it is not run on its own).

For each fill level (a quarter of the volume, then all of it), per repetition: a fresh format-2
volume (`encfs volume create` + `attach`, no filesystem), FILL MiB written through its loop device
(1 MiB writes, every 4 KiB sector different, then fsync, as `dd conv=fsync` would), and then:

- `encfs snapshot create /dev/loopN --json`, timed around the whole command (what a user waits for:
  Python start, the key service opened, the daemon's part, the list read back) and as the command
  itself reports it (``Seconds``: from after the key service is open);
- `encfs snapshot create IMAGE` once the volume is detached (it then reads no map: constant time);
- the daemon's part alone: one setxattr(user.encfs.snapshot.create) on the volume's private FUSE
  file, as the command makes it (the daemon commits, records the snapshot, commits again);
- the snapshot list that the command reads back (getxattr(user.encfs.snapshots), two snapshots by
  then): the daemon works out every snapshot's exclusive and shared space, so this part walks the
  maps and grows with the data;
- once, on the full volume, if this encfs has `encfs snapshot export|import`: the snapshot exported
  to a fresh directory, then imported into a new volume, as MB/s of the snapshot's data.

Snapshots copy no data, so the two fill levels should take the same time; the rows show it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

MiB = 1 << 20
CONTROL_CREATE = "user.encfs.snapshot.create"  # encfs.block.fuseserver.CONTROL_CREATE
CONTROL_LIST = "user.encfs.snapshots"  # encfs.block.fuseserver.CONTROL_LIST

# metric key -> (label, unit); "{fill}" is the MiB written. Times: lower is better.
METRICS = {
    "fill": ("fill through the loop device (1 MiB writes + fsync), {fill} MiB", "MB/s"),
    "create_cli": ("`encfs snapshot create` (whole command), {fill} MiB written", "s"),
    "create_reported": ("`encfs snapshot create`, as it reports (`Seconds`), {fill} MiB written", "s"),
    "create_detached": ("`encfs snapshot create IMAGE` of the detached volume (whole command), {fill} MiB written",
                        "s"),
    "create_daemon": ("daemon's part (the setxattr), {fill} MiB written", "s"),
    "list": ("snapshot list read back (the getxattr; 2 snapshots), {fill} MiB written", "s"),
    "export": ("`encfs snapshot export` of {fill} MiB", "MB/s"),
    "import": ("`encfs snapshot import` of {fill} MiB into a new volume", "MB/s"),
}

# volume(MiB): a context manager that makes and attaches a fresh volume, yields (image, loop device),
# and detaches and removes it afterwards
VolumeFactory = Callable[[int], AbstractContextManager[tuple[Path, str]]]


def fills(volume_mib: int) -> list[int]:
    return [volume_mib // 4, volume_mib]


def metric_key(name: str, fill: int) -> str:
    return f"{name}_{fill}"


def label(key: str) -> tuple[str, str]:
    name, _, fill = key.rpartition("_")
    text, unit = METRICS[name]
    return text.format(fill=fill), unit


def order(key: str) -> tuple[int, int]:
    """Rows by measure, then by fill."""
    name, _, fill = key.rpartition("_")
    return list(METRICS).index(name), int(fill)


def _chunks(total_mib: int) -> Iterator[bytearray]:
    """1 MiB buffers whose every 4 KiB sector differs from every other (so that nothing
    content-named deduplicates them): random bytes with the sector's number in front."""
    buf = bytearray(os.urandom(MiB))
    for mib in range(total_mib):
        for s in range(MiB // 4096):
            buf[s * 4096:s * 4096 + 8] = (mib * 256 + s).to_bytes(8, "little")
        yield buf


def fill(dev: str, mib: int) -> float:
    """Write ``mib`` MiB at the start of ``dev`` and fsync; MB/s."""
    t0 = time.perf_counter()
    fd = os.open(dev, os.O_WRONLY)
    try:
        for buf in _chunks(mib):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return mib * MiB / (time.perf_counter() - t0) / 1e6


def control_file(run_dir: Path, dev: str) -> str:
    """The attached volume's private FUSE file (from the attach registry in ``run_dir``)."""
    for entry in sorted((run_dir / "volumes").glob("*.json")):
        a = json.loads(entry.read_text())
        if a.get("loop") == dev:
            return f"{a['mountpoint']}/volume"
    raise RuntimeError(f"{dev}: no attachment in {run_dir}")


def create_daemon(control: str) -> float:
    """Seconds inside the setxattr that asks the daemon for a snapshot (what `encfs snapshot
    create` sends; the snapshot is not put in the catalog, which the benchmark does not need)."""
    request = json.dumps({"id": "snap-" + os.urandom(8).hex(), "description": "bench",
                          "created": time.time()}).encode()
    t0 = time.perf_counter()
    os.setxattr(control, CONTROL_CREATE, request)
    return time.perf_counter() - t0


def list_daemon(control: str) -> float:
    """Seconds of the getxattr that lists the snapshots with their space (what `encfs snapshot
    create` and `list` read back); the size probe and the read, as os.getxattr makes them."""
    t0 = time.perf_counter()
    json.loads(os.getxattr(control, CONTROL_LIST))
    return time.perf_counter() - t0


def create_cli(target: str, env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds around the command, seconds it reports, snapshot id); ``target``: the loop device
    or the image."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "encfs", "snapshot", "create", target, "--json"], env=env,
                          capture_output=True, timeout=300)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"encfs snapshot create: {proc.stderr.decode(errors='replace').strip()}")
    out = json.loads(proc.stdout)
    return took, float(out["Seconds"]), out["SnapshotId"]


def has_export() -> bool:
    import importlib.util

    return importlib.util.find_spec("encfs.block.export") is not None


def transfer(image: Path, sid: str, data_bytes: int, workdir: Path, env: dict[str, str]) -> dict[str, float]:
    """`encfs snapshot export IMAGE@SID DIR`, then `encfs snapshot import DIR NEWIMG`: MB/s of the
    snapshot's data (``data_bytes``), each timed around the whole command."""
    out: dict[str, float] = {}
    directory, new = workdir / "export", workdir / "imported.img"
    for name, cmd in (("export", ["export", f"{image}@{sid}", str(directory)]),
                      ("import", ["import", str(directory), str(new)])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "encfs", "snapshot", *cmd], env=env, capture_output=True,
                              timeout=1800)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"encfs snapshot {name}: {proc.stderr.decode(errors='replace').strip()}")
        out[name] = data_bytes / took / 1e6
    return out


def measure(volume_mib: int, volume: VolumeFactory, run_dir: Path, env: dict[str, str],
            note: Callable[[str], None]) -> dict[str, float]:
    """One repetition of every snapshot row; ``volume(mib)`` makes, attaches and afterwards
    detaches and removes a fresh volume, yielding (image, loop device)."""
    out: dict[str, float] = {}
    levels = fills(volume_mib)
    for n in levels:
        with volume(volume_mib) as (image, dev):
            out[metric_key("fill", n)] = fill(dev, n)
            wall, reported, sid = create_cli(dev, env)
            out[metric_key("create_cli", n)] = wall
            out[metric_key("create_reported", n)] = reported
            control = control_file(run_dir, dev)
            out[metric_key("create_daemon", n)] = create_daemon(control)
            out[metric_key("list", n)] = list_daemon(control)
            if n == levels[-1]:
                if not has_export():
                    note("snapshot export/import rows skipped: this encfs has no encfs.block.export")
                    continue
                try:
                    for k, v in transfer(image, sid, n * MiB, image.parent, env).items():
                        out[metric_key(k, n)] = v
                except RuntimeError as e:
                    note(f"snapshot export/import failed: {e}")
            detach(image, env)
            out[metric_key("create_detached", n)] = create_cli(str(image), env)[0]
    return out


def detach(image: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "encfs", "volume", "detach", str(image)], env=env,
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"encfs volume detach: {proc.stderr.decode(errors='replace').strip()}")
